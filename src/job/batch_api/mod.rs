//! run-once and backfill with `--batch-api`: the provider's batch jobs,
//! at half the price, collected by later runs. Nothing waits a day: a run
//! collects the jobs that ended, submits pending rows as new jobs, and exits.
//!
//! - Collecting: each job this table has in flight is asked for; an
//!   ended one's output and error files are downloaded to disk and read
//!   line by line, the vectors matched to rows by `custom_id` and written
//!   with the compare-and-set of every batch (a row edited meanwhile keeps
//!   its new text, and is embedded again), the provider's refusals recorded
//!   as failed rows; then the job's record and its rows go, so rows that got
//!   nothing (expired, cancelled, a server error) are pending again.
//! - Submitting: rows are taken for the job until it is collected, planned
//!   like any batch (too-long texts, identical texts sent once, budgets),
//!   written as a JSONL file on disk within the provider's limits, and
//!   their ids and text hashes recorded before the job is created.
//! - No double spend: the intent is recorded before anything is sent and
//!   its id travels in the job's metadata; a run that finds an intent
//!   whose submitter died without recording a job looks for it at the
//!   provider and adopts it, or drops it (its rows are pending again) when
//!   the provider has none. A create is never repeated.
//!
//! The synchronous path ([`super::pool`]) never sends a row a job holds:
//! every claim leaves out the rows a job holds (`<state>.batch_rows`).

use super::plan::{Planner, Shape};
use super::report::{RunReport, StopReason};
use crate::config::Config;
use crate::db::batch_jobs::{JobRecord, JobRows};
use crate::db::model_records::Models;
use crate::db::target::{Selection, Target};
use crate::db::writes::BatchWrite;
use crate::db::{quote_ident, Db};
use crate::error::{Error, Result};
use crate::output;
use crate::provider::batch_api::{BatchApi, JobStatus, LineResult, RemoteJob};
use crate::provider::ProviderError;
use crate::signals::Stop;
use crate::tokens::Counter;
use std::io::BufRead;
use std::time::{Duration, Instant};

pub mod list;
mod submit;

/// How long a submitting run has, from its last step, to create the job
/// before another run may look for it at the provider.
const SUBMIT_FOR: Duration = Duration::from_secs(15 * 60);
/// How long a run that collects a job has it to itself.
const COLLECT_LEASE: Duration = Duration::from_secs(30 * 60);

/// What a run did with batch jobs.
#[derive(Debug, Default)]
struct Tally {
    /// Rows written from collected jobs.
    embedded: u64,
    /// Rows collected jobs answered for, written or not.
    collected: u64,
    /// Rows edited while their job was in flight: not written, pending again.
    changed: u64,
    failed: u64,
    truncated: u64,
    /// Rows sent in new jobs.
    submitted: u64,
    /// Tokens of the collected vectors, as the provider counted them.
    tokens: u64,
    /// Calls to the provider.
    requests: u64,
    jobs_in_flight: i64,
}

struct Run<'a> {
    cfg: &'a Config,
    target: &'a Target,
    models: &'a Models,
    api: BatchApi,
    tally: Tally,
}

/// Collect, then submit, then report.
pub fn run(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    models: &Models,
    counter: Counter,
    stop: &Stop,
) -> RunReport {
    let started = Instant::now();
    let mut run = Run {
        cfg,
        target,
        models,
        api: BatchApi::new(&cfg.provider),
        tally: Tally::default(),
    };
    let outcome = run.collect(db).and_then(|()| {
        let in_flight = target.in_flight(db.client())?;
        let planner = Planner::new(shape(cfg, in_flight.tokens), counter, true)?;
        run.submit(db, &planner, started, stop)
    });
    let (stop_reason, error) = match outcome {
        Ok(reason) => (reason, None),
        Err(e) => (StopReason::Error, Some(e)),
    };
    if let Ok(f) = target.in_flight(db.client()) {
        run.tally.jobs_in_flight = f.jobs;
    }
    let pending_after = match &error {
        Some(Error::Database(_)) => None,
        _ => target.count_pending(db.client()).ok(),
    };
    let t = &run.tally;
    RunReport {
        command: cfg.mode.name(),
        table: target.table.clone(),
        model: cfg.provider.model.clone(),
        embedded: t.embedded,
        chunks: None,
        failed: t.failed,
        truncated: t.truncated,
        changed: t.changed,
        pending_after,
        requests: t.requests,
        retries: 0,
        rate_limited: 0,
        tokens: t.tokens,
        elapsed_ms: started.elapsed().as_millis() as u64,
        stop_reason,
        error: error.as_ref().map(|e| output::redact(&e.to_string())),
        may_pass: error.as_ref().is_some_and(Error::may_pass),
        exit_code: super::report::exit_code(error.as_ref(), stop, t.failed),
        batch: Some(super::report::BatchApiReport {
            submitted: t.submitted,
            collected: t.collected,
            jobs_in_flight: t.jobs_in_flight,
        }),
    }
}

/// The plan's shape for batch jobs: the token budgets (`--max-tokens`,
/// `--max-cost-usd`) count the jobs already in flight.
pub fn shape(cfg: &Config, in_flight_tokens: i64) -> Shape<'_> {
    let mut shape = Shape::of(cfg);
    if let Some((tokens, _)) = &mut shape.bounds.max_tokens {
        *tokens = tokens.saturating_sub(in_flight_tokens.max(0) as u64);
    }
    shape
}

/// A file on disk for a job's JSONL, deleted when dropped.
fn spool() -> Result<tempfile::NamedTempFile> {
    tempfile::NamedTempFile::new()
        .map_err(|e| Error::Config(format!("cannot make a temporary file (TMPDIR): {e}")))
}

/// A provider failure as the run reports it.
fn provider_error(e: ProviderError) -> Error {
    match e {
        ProviderError::Misconfigured { message } => Error::Config(message),
        ProviderError::Rejected { message, .. } => Error::Config(format!(
            "the provider refused the batch job: {message}; check --model (AUTOEMBED_MODEL), --dimensions (AUTOEMBED_DIMENSIONS) and --api-base (AUTOEMBED_API_BASE)"
        )),
        e @ ProviderError::Fatal { .. } => Error::Provider(e.to_string()),
        e => Error::Unavailable(format!("{e}; the rows stay pending")),
    }
}

impl<'a> Run<'a> {
    fn selection(&self) -> Selection<'a> {
        Selection {
            skip_failed: !self.cfg.retry_failed,
            max_attempts: self.cfg.budget.max_attempts as i32,
            skip_claimed: true,
            skip_batched: true,
            reembed: self.cfg.reembed.map(|r| self.models.reembedding(r)),
        }
    }

    fn call<T>(&mut self, r: std::result::Result<T, ProviderError>) -> Result<T> {
        self.tally.requests += 1;
        r.map_err(provider_error)
    }

    /// Ask after every job of the table; collect those that ended.
    fn collect(&mut self, db: &mut Db) -> Result<()> {
        let records = self.target.batch_jobs(db.client())?;
        let mut refused = None;
        for rec in records {
            if rec.model != self.cfg.provider.model {
                crate::warn!(
                    "batch job {} was sent to {}: run with --model {} to collect it, or cancel it",
                    rec.job_id.as_deref().unwrap_or(&rec.intent),
                    rec.model,
                    rec.model
                );
                continue;
            }
            let remote = match &rec.job_id {
                Some(id) => {
                    let r = self.api.get(id);
                    self.call(r)?
                }
                // Another run is submitting it.
                None if !rec.abandoned => continue,
                None => match self.adopt(db, &rec)? {
                    Some(remote) => remote,
                    None => continue,
                },
            };
            if remote.status.in_flight() {
                continue;
            }
            if remote.status == JobStatus::Failed {
                let why = remote
                    .errors
                    .clone()
                    .unwrap_or_else(|| "no reason given".into());
                crate::warn!(
                    "batch job {} failed: {why}; its rows are pending again",
                    remote.id
                );
                self.target.end_job(db.client(), &rec.intent)?;
                self.delete_files(&rec, &remote);
                refused.get_or_insert(format!(
                    "the provider refused batch job {}: {why}; its rows are pending again, and no job was submitted",
                    remote.id
                ));
                continue;
            }
            let Some(rows) = self
                .target
                .collect_job(db.client(), &rec.intent, COLLECT_LEASE)?
            else {
                continue; // another run is collecting it
            };
            if let Err(e) = self.write_results(db, &remote, &rows) {
                // What was written stays (a later collect finds it written);
                // the next run collects the job again at once.
                let _ = self.target.stop_collecting(db.client(), &rec.intent);
                return Err(e);
            }
            self.target.end_job(db.client(), &rec.intent)?;
            crate::info!(
                "batch job {} {}: {} rows back",
                remote.id,
                remote.status.as_str(),
                rows.ids.len()
            );
            self.delete_files(&rec, &remote);
        }
        match refused {
            Some(why) => Err(Error::Config(why)),
            None => Ok(()),
        }
    }

    /// An intent whose submitter is gone without recording its job: the
    /// job the provider lists with its id, now recorded; or none, and the
    /// intent is dropped (its rows are pending again).
    fn adopt(&mut self, db: &mut Db, rec: &JobRecord) -> Result<Option<RemoteJob>> {
        let found = self.api.find_intent(&rec.intent, rec.created_at - 3600);
        match self.call(found)? {
            Some(remote) => {
                let recorded = self
                    .target
                    .record_job(db.client(), &rec.intent, &remote.id)?;
                if recorded {
                    crate::info!(
                        "adopted batch job {} (its submitter stopped before recording it)",
                        remote.id
                    );
                    Ok(Some(remote))
                } else {
                    Ok(None)
                }
            }
            None => {
                self.target.end_job(db.client(), &rec.intent)?;
                if let Some(file) = &rec.input_file_id {
                    let _ = self.api.delete_file(file);
                }
                crate::info!(
                    "dropped an unsent batch job (its submitter stopped before creating it): {} rows pending again",
                    rec.rows
                );
                Ok(None)
            }
        }
    }

    /// The provider keeps files until they are deleted; they are the user's storage.
    fn delete_files(&mut self, rec: &JobRecord, remote: &RemoteJob) {
        let files = [
            rec.input_file_id.as_ref(),
            remote.output_file_id.as_ref(),
            remote.error_file_id.as_ref(),
        ];
        for file in files.into_iter().flatten() {
            self.tally.requests += 1;
            if let Err(e) = self.api.delete_file(file) {
                crate::debug!("cannot delete batch file {file}: {e}");
            }
        }
    }

    /// Write what an ended job brought back, a page of rows at a time.
    fn write_results(&mut self, db: &mut Db, remote: &RemoteJob, rows: &JobRows) -> Result<()> {
        let claimed = rows.claimed();
        let requests = rows
            .requests
            .iter()
            .map(|&k| k as usize + 1)
            .max()
            .unwrap_or(0);
        let mut by_request: Vec<Vec<usize>> = vec![Vec::new(); requests];
        for (r, &k) in rows.requests.iter().enumerate() {
            by_request[k as usize].push(r);
        }
        let mut answered = vec![false; requests];
        let want = self
            .target
            .dimensions
            .or(self.cfg.provider.expected_dimensions());
        let page_size = self.cfg.budget.batch_size;
        let mut page = BatchWrite::new(Vec::new(), Vec::new(), None, self.target.half);
        let files = [&remote.output_file_id, &remote.error_file_id];
        for file in files.into_iter().flatten() {
            let spool = spool()?;
            let got = self.api.download(file, spool.path());
            self.call(got)?;
            let reader = std::io::BufReader::new(spool.reopen().map_err(|e| {
                Error::Config(format!("cannot read a temporary file (TMPDIR): {e}"))
            })?);
            for line in reader.lines() {
                let line = line.map_err(|e| {
                    Error::Unavailable(format!("cannot read batch file {file}: {e}"))
                })?;
                let Some(result) = self.api.parse_line(&line) else {
                    continue;
                };
                let request = |custom_id: &str| {
                    custom_id
                        .parse::<usize>()
                        .ok()
                        .filter(|&k| k < requests && !answered[k])
                };
                match result {
                    LineResult::Vector {
                        custom_id,
                        vector,
                        tokens,
                    } => {
                        let Some(k) = request(&custom_id) else {
                            continue;
                        };
                        answered[k] = true;
                        if let Some(d) = want.filter(|&d| d as usize != vector.len()) {
                            return Err(Error::Config(format!(
                                "batch job {} returned vectors of {} dimensions, and {} takes {d}: set --dimensions (AUTOEMBED_DIMENSIONS) or --model (AUTOEMBED_MODEL) to match, then cancel the job or let it be collected by a run that matches",
                                remote.id,
                                vector.len(),
                                quote_ident(&self.target.embedding_column)
                            )));
                        }
                        self.tally.tokens += tokens.unwrap_or(0);
                        for &r in &by_request[k] {
                            page.push_vector(&claimed[r], vector.clone());
                        }
                    }
                    LineResult::Rejected { custom_id, message } => {
                        let Some(k) = request(&custom_id) else {
                            continue;
                        };
                        answered[k] = true;
                        for &r in &by_request[k] {
                            page.failures.push((&claimed[r], message.clone()));
                        }
                    }
                    LineResult::Unanswered { .. } => {}
                }
                if page.vector_count() + page.failures.len() >= page_size {
                    self.write_page(db, &page, rows.reembed)?;
                    page = BatchWrite::new(Vec::new(), Vec::new(), None, self.target.half);
                }
            }
        }
        self.write_page(db, &page, rows.reembed)
    }

    fn write_page(&mut self, db: &mut Db, page: &BatchWrite<'_>, reembed: bool) -> Result<()> {
        if page.vector_count() + page.failures.len() == 0 {
            return Ok(());
        }
        let written = self.target.write_batch(db, page, self.models, reembed)?;
        for (row, err) in &page.failures {
            crate::warn!("row {} failed: {err}", row.id);
        }
        let t = &mut self.tally;
        t.collected += (page.vector_count() + page.failures.len()) as u64;
        t.embedded += written.len() as u64;
        t.changed += (page.vector_count() - written.len()) as u64;
        t.failed += page.failures.len() as u64;
        Ok(())
    }
}
