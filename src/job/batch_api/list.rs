//! `autoembed batch-jobs`: the provider's batch jobs this table has in
//! flight, each as the provider sees it now; with `--cancel JOB` (or
//! `all`), asked to stop. A cancelled job is collected by the next run
//! like any that ended: what it finished is written, the rest is pending.

use crate::checks::{self, Opened};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::provider::batch_api::BatchApi;
use serde::Serialize;

/// One job, as listed.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// The provider's id; `None` while the job is being created.
    pub job_id: Option<String>,
    pub intent: String,
    /// As the provider says now (`submitting` before it has the job).
    pub status: String,
    pub rows: i64,
    pub tokens: i64,
    pub age_secs: i64,
    /// `--cancel` asked the provider to stop it.
    pub cancelled: bool,
}

/// What `batch-jobs` prints.
#[derive(Debug, Serialize)]
pub struct JobsReport {
    pub command: &'static str,
    pub table: String,
    pub jobs: Vec<Listed>,
}

impl JobsReport {
    pub fn human(&self) -> String {
        if self.jobs.is_empty() {
            return format!("batch-jobs: no batch job in flight for {}", self.table);
        }
        let mut s = format!(
            "batch-jobs: {} in flight for {}\n",
            self.jobs.len(),
            self.table
        );
        for j in &self.jobs {
            s += &format!(
                "  {:<24}  {:<12}  {:>7} rows  {:>10} tokens  {:>6} h old{}\n",
                j.job_id.as_deref().unwrap_or("(being created)"),
                j.status,
                j.rows,
                j.tokens,
                format!("{:.1}", j.age_secs as f64 / 3600.0),
                if j.cancelled { "  cancel asked" } else { "" }
            );
        }
        s.trim_end().to_string()
    }
}

/// List the table's jobs; cancel `cfg.cancel_jobs` (an id, or `all`).
pub fn command(cfg: &Config) -> Result<JobsReport> {
    let Opened {
        cfg,
        mut db,
        target,
        state,
    } = checks::open(cfg)?;
    let records = match state.current {
        true => target.batch_jobs(db.client())?,
        false => Vec::new(),
    };
    let cancel = cfg.cancel_jobs.as_deref();
    if let Some(id) = cancel.filter(|&c| c != "all") {
        if !records.iter().any(|r| r.job_id.as_deref() == Some(id)) {
            return Err(Error::config(format!(
                "--cancel {id:?}: {} has no such batch job in flight; `autoembed batch-jobs` lists them",
                target.table
            )));
        }
    }
    let api = BatchApi::new(&cfg.provider);
    let mut jobs = Vec::new();
    for r in records {
        let mut listed = Listed {
            job_id: r.job_id.clone(),
            intent: r.intent.clone(),
            status: "submitting".into(),
            rows: r.rows,
            tokens: r.tokens,
            age_secs: r.age_secs,
            cancelled: false,
        };
        if let Some(id) = &r.job_id {
            let wanted = cancel.is_some_and(|c| c == "all" || c == id);
            let remote = match wanted {
                true => api.cancel(id),
                false => api.get(id),
            };
            match remote {
                Ok(job) => {
                    listed.status = job.status.as_str().into();
                    listed.cancelled = wanted;
                }
                Err(e) if wanted => {
                    return Err(Error::Provider(format!(
                        "cannot cancel batch job {id}: {e}"
                    )))
                }
                Err(e) => listed.status = format!("unknown ({e})"),
            }
        }
        jobs.push(listed);
    }
    Ok(JobsReport {
        command: "batch-jobs",
        table: target.table.clone(),
        jobs,
    })
}
