//! `verify`: every check a CI smoke test or an operator wants before trusting
//! a run, each named, then the table's counts. Exits 0 only when all pass,
//! 3 when the database can't be reached, 1 when any other check fails.

use crate::checks::{self, dimension_mismatch, Check};
use crate::config::Config;
use crate::db::batch_jobs::InFlight;
use crate::db::catalog::{TableFacts, TableLookup};
use crate::db::counts::Counts;
use crate::db::model_records::{ModelCounts, Stamp};
use crate::db::target::Target;
use crate::db::{quote_ident, Db};
use crate::models::ProviderKind;
use crate::pacing::Pacer;
use crate::provider::{self, RequestStats, Requester, RetryOutcome, RetryPolicy};
use crate::signals::Stop;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub command: &'static str,
    pub ok: bool,
    pub checks: Vec<Check>,
    pub counts: Option<Counts>,
    /// The provider's batch jobs in flight for the table (`--batch-api`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_jobs: Option<InFlight>,
    #[serde(skip)]
    pub exit_code: i32,
}

impl VerifyReport {
    pub fn human(&self) -> String {
        let mut s = format!(
            "verify: {}\n",
            if self.ok {
                "all checks passed"
            } else {
                "some checks failed"
            }
        );
        for c in &self.checks {
            s += &format!(
                "  {:<4}  {:<16}  {}\n",
                match (c.ok, c.warning) {
                    (false, _) => "FAIL",
                    (true, true) => "warn",
                    (true, false) => "ok",
                },
                c.name,
                c.detail
            );
        }
        if let Some(c) = &self.counts {
            s += &format!(
                "rows {}, embedded {}, pending {}, blank {}, failed {}",
                c.rows, c.embedded, c.pending, c.blank, c.failed
            );
            if let Some(n) = c.chunks {
                s += &format!(", chunks {n}");
            }
            if c.no_id > 0 {
                s += &format!(
                    ", without an id {} (never embedded: the id column is NULL)",
                    c.no_id
                );
            }
        }
        s.trim_end().to_string()
    }
}

pub fn verify(cfg: &Config, stop: &Stop) -> VerifyReport {
    let mut report = VerifyReport {
        command: "verify",
        ok: false,
        checks: Vec::new(),
        counts: None,
        batch_jobs: None,
        exit_code: 1,
    };
    let mut db = match Db::connect(cfg) {
        Ok(db) => db,
        Err(e) => {
            report.checks.push(Check::fail("database", e.to_string()));
            report.exit_code = 3;
            return report;
        }
    };
    report
        .checks
        .push(Check::pass("database", cfg.database_label()));
    let keyed;
    let mut vault_error = None;
    let cfg = match checks::with_vault_key(cfg, &mut db) {
        Ok(c) => {
            keyed = c;
            &keyed
        }
        Err(e) => {
            vault_error = Some(e.to_string());
            cfg
        }
    };
    let facts = match db.inspect(cfg) {
        Ok(f) => f,
        Err(e) => {
            report.checks.push(Check::fail("table", e.to_string()));
            report.exit_code = 3;
            return report;
        }
    };
    let (mut checks, target) = checks::evaluate(cfg, &db, &facts);
    if let (Some(msg), Some(c)) = (vault_error, checks.iter_mut().find(|c| c.name == "api_key")) {
        *c = Check::fail("api_key", msg);
    }
    report.checks.extend(checks);
    if let Some(t) = &target {
        match db.access(t, &cfg.state_schema) {
            Ok(a) => {
                report
                    .checks
                    .extend(checks::access_checks(cfg.mode, &a, t, &cfg.state_schema))
            }
            Err(e) => report.checks.push(Check::fail("privileges", e.to_string())),
        }
    }
    if let (Some(t), TableLookup::Found(facts)) = (&target, &facts.table) {
        report.checks.extend(setup_checks(t, facts));
    }
    // The provider, built once for the checks that call it (so the local
    // model loads once), and only if one does.
    let embedder = Embedder::default();
    if cfg.provider.kind == ProviderKind::Local {
        report.checks.push(local_model_check(cfg, &embedder));
    }
    if let Some(target) = &target {
        if !report.checks.iter().any(|c| c.name == "dimensions") {
            report
                .checks
                .push(probe_dimensions(cfg, target, stop, &embedder));
        }
        if facts.state.exists {
            report.checks.push(models_check(cfg, target, &mut db));
        }
        match target.counts(db.client(), facts.state.exists) {
            Ok(c) => report.counts = Some(c),
            Err(e) => report.checks.push(Check::fail("counts", e.to_string())),
        }
        if facts.state.current {
            match target.in_flight(db.client()) {
                Ok(f) if f.jobs > 0 || cfg.provider.batch_api => {
                    report.checks.push(batch_jobs_check(&f));
                    report.batch_jobs = Some(f);
                }
                Ok(_) => {}
                Err(e) => report.checks.push(Check::fail("batch_jobs", e.to_string())),
            }
        }
    }
    report.ok = report.checks.iter().all(|c| c.ok);
    report.exit_code = if report.ok { 0 } else { 1 };
    report
}

/// The batch jobs in flight: how many, their rows, the oldest; a warning
/// when one is past the provider's window (24 h) without having ended.
fn batch_jobs_check(f: &InFlight) -> Check {
    if f.jobs == 0 {
        return Check::pass("batch_jobs", "none in flight");
    }
    let hours = f.oldest_secs.unwrap_or(0) as f64 / 3600.0;
    let detail = format!(
        "{} in flight with {} rows ({} tokens), the oldest submitted {hours:.1} h ago",
        f.jobs, f.rows, f.tokens
    );
    if hours > 24.0 {
        Check::warn(
            "batch_jobs",
            format!(
                "{detail}: past the provider's 24 h window; a run collects it once the provider ends it \
                 (`autoembed batch-jobs` shows it; `--cancel` stops it)"
            ),
        )
    } else {
        Check::pass("batch_jobs", detail)
    }
}

/// The configured provider, built on first use.
type Embedder = std::cell::OnceCell<Result<Arc<dyn provider::Embedder>, String>>;

fn embedder<'a>(
    cell: &'a Embedder,
    cfg: &Config,
) -> &'a Result<Arc<dyn provider::Embedder>, String> {
    cell.get_or_init(|| {
        provider::build(&cfg.provider)
            .map(|p| p.embedder)
            .map_err(|e| e.to_string())
    })
}

/// For a model autoembed doesn't know: one tiny request, unless --offline.
fn probe_dimensions(cfg: &Config, target: &Target, stop: &Stop, cell: &Embedder) -> Check {
    if cfg.offline && cfg.provider.kind != ProviderKind::Local {
        return Check::pass(
            "dimensions",
            format!(
                "not checked (--offline; {} is not a known model)",
                cfg.provider.model
            ),
        );
    }
    let embedder = match embedder(cell, cfg) {
        Ok(e) => e.clone(),
        Err(e) => return Check::fail("dimensions", e.clone()),
    };
    let policy = RetryPolicy {
        transient_retries: 1,
        rate_limit_retries: 1,
        ..RetryPolicy::default()
    };
    let mut stats = RequestStats::default();
    let reply = provider::embed_with_retry(
        &Requester::new(embedder),
        provider::Request {
            inputs: &Arc::new(vec!["autoembed verify".to_string()]),
            tokens: 2,
            pacer: &Pacer::new(None, None),
            send_by: None,
        },
        &policy,
        None,
        stop.flag(),
        &mut stats,
    );
    let col = quote_ident(&target.embedding_column);
    match reply {
        Ok(e) => {
            let got = e.vectors.first().map_or(0, Vec::len) as u32;
            match target.dimensions {
                Some(want) if want != got => Check::fail(
                    "dimensions",
                    dimension_mismatch(&cfg.provider.model, got, &col, want),
                ),
                Some(want) => Check::pass(
                    "dimensions",
                    format!(
                        "{} gives {got}, {col} is vector({want})",
                        cfg.provider.model
                    ),
                ),
                None => Check::pass(
                    "dimensions",
                    format!(
                        "{} gives {got}, {col} has no fixed size",
                        cfg.provider.model
                    ),
                ),
            }
        }
        Err(RetryOutcome::Failed(e) | RetryOutcome::OutOfTime(e)) => {
            Check::fail("dimensions", format!("could not ask the provider: {e}"))
        }
        Err(RetryOutcome::Stopped | RetryOutcome::Unconfirmed) => {
            Check::fail("dimensions", "interrupted")
        }
    }
}

/// Which models made the table's vectors: a warning when some are not the
/// configured model's, with the command that replaces them.
fn models_check(cfg: &Config, target: &Target, db: &mut Db) -> Check {
    let current = Stamp::of(&cfg.provider, target);
    match target.model_counts(db.client()) {
        Err(e) => Check::fail("models", e.to_string()),
        Ok(None) => Check::pass("models", "no vectors recorded yet"),
        Ok(Some(ModelCounts { counts })) => {
            let total: i64 = counts.iter().map(|(_, n)| n).sum();
            let others: Vec<String> = counts
                .iter()
                .filter(|(s, _)| *s != current)
                .map(|(s, n)| format!("{n} from {s}"))
                .collect();
            if others.is_empty() {
                Check::pass("models", format!("all {total} vectors from {current}"))
            } else {
                Check::warn(
                    "models",
                    format!(
                        "{} of {total} vectors are not from {current}: run `autoembed backfill --reembed` to replace them",
                        others.join(", ")
                    ),
                )
            }
        }
    }
}

/// The local model loads and embeds: the smoke check of `--provider local`,
/// which needs no network, so it runs even with `--offline`.
fn local_model_check(cfg: &Config, cell: &Embedder) -> Check {
    let started = std::time::Instant::now();
    let model = match embedder(cell, cfg) {
        Ok(m) => m,
        Err(e) => return Check::fail("model", e.clone()),
    };
    let path = cfg
        .provider
        .model_path
        .as_deref()
        .unwrap_or(std::path::Path::new(""));
    match model.embed(&["autoembed verify"]) {
        Ok(e) => Check::pass(
            "model",
            format!(
                "{} ({}) from {}: loaded and embedded in {} ms, {} dimensions",
                cfg.provider.model,
                cfg.provider.local_precision.name(),
                path.display(),
                started.elapsed().as_millis(),
                e.vectors.first().map_or(0, Vec::len)
            ),
        ),
        Err(e) => Check::fail("model", e.to_string()),
    }
}

/// Whether `autoembed setup`'s trigger and index are there, and what to run if not.
/// A missing index fails only on a large table, where every run would scan it.
fn setup_checks(target: &Target, facts: &TableFacts) -> Vec<Check> {
    if let Some(chunks) = &target.chunks {
        let trigger = crate::db::catalog::reset_trigger(&target.embedding_column);
        return vec![Check::pass(
            "reset_trigger",
            if facts.has_reset_trigger {
                format!(
                    "edited rows are chunked again (trigger {trigger} deletes their chunks in {})",
                    chunks.table
                )
            } else {
                format!("no trigger: rows whose text changes keep their old chunks in {}; run `autoembed setup` to add it", chunks.table)
            },
        )];
    }
    let objects = crate::setup::Objects::new(target);
    let index = if facts.has_pending_index {
        Check::pass("pending_index", "a partial index finds pending rows")
    } else {
        let advice = format!(
            "no partial index on pending rows; run `autoembed setup` or: {}",
            objects.index_sql(true)
        );
        if facts.estimated_rows >= LARGE_TABLE {
            Check::fail(
                "pending_index",
                format!("{} rows and {advice}", facts.estimated_rows as i64),
            )
        } else {
            Check::pass(
                "pending_index",
                format!(
                    "not needed yet ({} rows), but {advice}",
                    facts.estimated_rows.max(0.0) as i64
                ),
            )
        }
    };
    let trigger = if facts.has_reset_trigger {
        Check::pass(
            "reset_trigger",
            format!(
                "edited rows are re-embedded (trigger {})",
                crate::db::catalog::reset_trigger(&target.embedding_column)
            ),
        )
    } else {
        Check::pass(
            "reset_trigger",
            "no trigger: rows whose text changes keep their old vector; run `autoembed setup` to add it",
        )
    };
    vec![index, trigger]
}

/// From this many rows on, finding pending rows without an index costs
/// every cron tick a full scan.
const LARGE_TABLE: f64 = 100_000.0;
