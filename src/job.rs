//! The batch loop that run-once, backfill and dry-run share.
//!
//! Each batch is one transaction: claim up to `--batch-size` pending rows in
//! id order (advisory locks, see `db`), ask the provider for their vectors,
//! write the ones whose text did not change meanwhile, record the rows the
//! provider rejected, commit. A rejected batch is split in halves until the
//! offending rows are found, so one bad row never holds back the others.
//! dry-run walks the same loop without locks, API calls or writes.

use crate::checks::{self, dimension_mismatch};
use crate::config::{Config, Mode};
use crate::db::{quote_ident, Claimed, Db, Eligibility, Target};
use crate::error::{Error, Result};
use crate::output;
use crate::provider::{
    self, Embedder, Embeddings, ProviderError, RequestStats, RetryOutcome, RetryPolicy,
};
use crate::signals::Stop;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Drained,
    MaxRows,
    MaxSeconds,
    Signal,
    Error,
}

/// What run-once and backfill did; printed as the summary or `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub command: &'static str,
    pub table: String,
    pub model: String,
    /// Rows whose vector was written.
    pub embedded: u64,
    /// Rows the provider rejected in this run (recorded in the state schema).
    pub failed: u64,
    /// Rows whose text changed while their request was in flight: not
    /// written, still pending, embedded by the next run.
    pub changed: u64,
    pub pending_after: Option<i64>,
    pub requests: u64,
    pub retries: u64,
    pub rate_limited: u64,
    pub tokens: u64,
    pub elapsed_ms: u64,
    pub stop_reason: StopReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub exit_code: i32,
}

/// What dry-run found.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    pub command: &'static str,
    pub table: String,
    pub model: String,
    pub pending: i64,
    pub failed: i64,
    pub would_embed: u64,
    pub estimated_tokens: u64,
    pub estimated_cost_usd: Option<f64>,
    pub sample_ids: Vec<String>,
}

pub enum Report {
    Run(RunReport),
    DryRun(DryRunReport),
}

impl Report {
    pub fn exit_code(&self) -> i32 {
        match self {
            Report::Run(r) => r.exit_code,
            Report::DryRun(_) => 0,
        }
    }

    pub fn json(&self) -> String {
        let v = match self {
            Report::Run(r) => serde_json::to_string(r),
            Report::DryRun(r) => serde_json::to_string(r),
        };
        v.unwrap_or_else(|_| "{}".into())
    }

    pub fn human(&self) -> String {
        match self {
            Report::Run(r) => {
                let mut s = format!(
                    "{}: embedded {} rows of {} in {:.1} s ({} requests, {} tokens)",
                    r.command,
                    r.embedded,
                    r.table,
                    r.elapsed_ms as f64 / 1000.0,
                    r.requests,
                    r.tokens
                );
                if r.failed > 0 {
                    s += &format!(
                        "; {} rows failed (see the state schema's failures table)",
                        r.failed
                    );
                }
                if r.changed > 0 {
                    s += &format!(
                        "; {} rows changed during their request and stay pending",
                        r.changed
                    );
                }
                if let Some(p) = r.pending_after {
                    s += &format!("; {p} pending");
                }
                s += &format!("; stopped: {}", stop_reason_text(r.stop_reason));
                s
            }
            Report::DryRun(r) => {
                let cost = r
                    .estimated_cost_usd
                    .map(|c| format!("about ${c:.6}"))
                    .unwrap_or_else(|| "unknown cost (model not in the price table)".into());
                let mut s = format!(
                    "dry-run: {} rows pending in {} ({} failed, held back); this run would embed {} \
                     (~{} tokens, {cost} with {})",
                    r.pending, r.table, r.failed, r.would_embed, r.estimated_tokens, r.model
                );
                if !r.sample_ids.is_empty() {
                    s += &format!("; first ids: {}", r.sample_ids.join(", "));
                }
                s
            }
        }
    }
}

fn stop_reason_text(r: StopReason) -> &'static str {
    match r {
        StopReason::Drained => "nothing left to do",
        StopReason::MaxRows => "row budget spent (--max-rows)",
        StopReason::MaxSeconds => "time budget spent (--max-seconds)",
        StopReason::Signal => "signal",
        StopReason::Error => "error",
    }
}

/// Connect, check the table and run the loop. Errors before the loop
/// (configuration, connection) are returned; errors inside it end the loop
/// and are reported with the work done so far.
pub fn run(cfg: &Config, stop: &Stop) -> Result<Report> {
    let mut db = Db::connect(cfg)?;
    let facts = db.inspect(cfg)?;
    let (checks, target) = checks::evaluate(cfg, &db, &facts);
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        return Err(Error::Config(bad.detail.clone()));
    }
    let Some(target) = target else {
        return Err(Error::config("the table could not be checked"));
    };
    crate::debug!(
        "table {} (id {}, text {}, embedding {}), database {}",
        target.table,
        quote_ident(&target.id_column),
        quote_ident(&target.text_column),
        quote_ident(&target.embedding_column),
        cfg.database_label()
    );
    if cfg.mode == Mode::DryRun {
        return dry_run(cfg, &mut db, &target, facts.state_exists).map(Report::DryRun);
    }
    target.ensure_state(&mut db, facts.state_exists)?;
    let guarded: Arc<dyn Embedder> = Arc::new(DimensionGuard::new(
        cfg,
        &target,
        provider::build(&cfg.provider),
    ));
    Ok(Report::Run(embed_loop(
        cfg, &mut db, &target, guarded, stop,
    )))
}

fn embed_loop(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    embedder: Arc<dyn Embedder>,
    stop: &Stop,
) -> RunReport {
    let started = Instant::now();
    let deadline = cfg.budget.max_seconds.map(|d| started + d);
    let mut report = RunReport {
        command: cfg.mode.name(),
        table: target.table.clone(),
        model: cfg.provider.model.clone(),
        embedded: 0,
        failed: 0,
        changed: 0,
        pending_after: None,
        requests: 0,
        retries: 0,
        rate_limited: 0,
        tokens: 0,
        elapsed_ms: 0,
        stop_reason: StopReason::Drained,
        error: None,
        exit_code: 0,
    };
    let progress = Progress::new(cfg, db, target);
    let mut batcher = Batcher {
        embedder,
        policy: RetryPolicy::default(),
        deadline,
        stop: stop.flag(),
        stats: RequestStats::default(),
        tokens: 0,
    };
    let eligibility = Eligibility {
        skip_failed: !cfg.retry_failed,
        max_attempts: cfg.budget.max_attempts,
    };
    // Keep the server from ending a transaction that waits on the provider.
    let idle_limit = cfg.provider.request_timeout * 6 + Duration::from_secs(600);
    let mut cursor: Option<String> = None;
    let mut taken: u64 = 0;
    let mut error: Option<Error> = None;

    loop {
        if stop.requested() {
            report.stop_reason = StopReason::Signal;
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            report.stop_reason = StopReason::MaxSeconds;
            break;
        }
        let limit = match cfg.budget.max_rows {
            Some(max) if taken >= max => {
                report.stop_reason = StopReason::MaxRows;
                break;
            }
            Some(max) => cfg.budget.batch_size.min((max - taken) as usize),
            None => cfg.budget.batch_size,
        };
        let outcome = one_batch(
            db,
            target,
            &mut batcher,
            cursor.as_deref(),
            limit,
            eligibility,
            idle_limit,
        );
        let batch = match outcome {
            Ok(b) => b,
            Err(e) => {
                error = Some(e);
                report.stop_reason = StopReason::Error;
                break;
            }
        };
        let Some(next) = batch.next_cursor else {
            report.stop_reason = StopReason::Drained;
            break;
        };
        cursor = Some(next);
        taken += batch.taken;
        report.embedded += batch.written;
        report.changed += batch.changed;
        report.failed += batch.failed;
        progress.advance(
            batch.written + batch.failed + batch.changed,
            &report,
            &batcher,
        );
        if let Some(halt) = batch.halt {
            match halt {
                // Rate limits are the provider pacing us: the budget ran out,
                // which is a normal stop. Anything else is an outage.
                Halt::OutOfTime(why @ ProviderError::RateLimited { .. }) => {
                    crate::info!(
                        "stopping: waiting out the rate limit would pass --max-seconds ({why})"
                    );
                    report.stop_reason = StopReason::MaxSeconds;
                }
                Halt::OutOfTime(why) => {
                    error = Some(Error::Provider(format!(
                        "still failing when --max-seconds ran out, rows stay pending: {why}"
                    )));
                    report.stop_reason = StopReason::Error;
                }
                Halt::Stopped => report.stop_reason = StopReason::Signal,
                Halt::Error(e) => {
                    error = Some(e);
                    report.stop_reason = StopReason::Error;
                }
            }
            break;
        }
    }
    progress.finish();
    if report.stop_reason == StopReason::Signal {
        crate::info!(
            "{} received: stopped after committing the batches done",
            stop.name()
        );
    }
    report.requests = batcher.stats.requests;
    report.retries = batcher.stats.retries;
    report.rate_limited = batcher.stats.rate_limited;
    report.tokens = batcher.tokens;
    if !matches!(error, Some(Error::Database(_))) {
        match target.count_pending(db.client()) {
            Ok(n) => report.pending_after = Some(n),
            Err(e) => crate::warn!("cannot count pending rows: {e}"),
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report.exit_code = match (&error, stop.exit_code()) {
        (Some(e), _) => e.exit_code(),
        (None, Some(code)) => code,
        (None, None) if report.failed > 0 => 1,
        _ => 0,
    };
    report.error = error.map(|e| output::redact(&e.to_string()));
    report
}

/// What one batch did.
struct BatchOutcome {
    /// The last candidate id (the next cursor); `None` when nothing is left.
    next_cursor: Option<String>,
    taken: u64,
    written: u64,
    changed: u64,
    failed: u64,
    /// Why the loop must stop after this batch, if it must.
    halt: Option<Halt>,
}

/// Why a batch could not finish all its rows.
#[derive(Debug)]
enum Halt {
    Error(Error),
    OutOfTime(ProviderError),
    Stopped,
}

fn one_batch(
    db: &mut Db,
    target: &Target,
    batcher: &mut Batcher<'_>,
    cursor: Option<&str>,
    limit: usize,
    eligibility: Eligibility,
    idle_limit: Duration,
) -> Result<BatchOutcome> {
    let mut tx = db.begin(idle_limit)?;
    // The state schema exists: run() created it before the loop.
    let (rows, next_cursor) = target.claim(&mut tx, cursor, limit, eligibility, true, true)?;
    let mut outcome = BatchOutcome {
        next_cursor,
        taken: rows.len() as u64,
        written: 0,
        changed: 0,
        failed: 0,
        halt: None,
    };
    if rows.is_empty() {
        return Ok(outcome);
    }
    let mut vectors: Vec<(usize, Vec<f32>)> = Vec::with_capacity(rows.len());
    let mut rejected: Vec<(usize, String)> = Vec::new();
    outcome.halt = batcher.embed(&rows, 0, &mut vectors, &mut rejected).err();
    let done: Vec<(&Claimed, Vec<f32>)> = vectors.into_iter().map(|(i, v)| (&rows[i], v)).collect();
    let failed: Vec<(&Claimed, String)> =
        rejected.into_iter().map(|(i, e)| (&rows[i], e)).collect();
    let written = target.write(&mut tx, &done)?;
    target.record_failures(&mut tx, &failed)?;
    tx.commit()?;
    for (row, err) in &failed {
        crate::warn!("row {} failed: {err}", row.id);
    }
    outcome.written = written.len() as u64;
    outcome.changed = (done.len() - written.len()) as u64;
    outcome.failed = failed.len() as u64;
    crate::debug!(
        "batch of {}: {} written, {} changed meanwhile, {} failed",
        rows.len(),
        outcome.written,
        outcome.changed,
        outcome.failed
    );
    Ok(outcome)
}

/// Sends rows to the provider, splitting rejected requests.
struct Batcher<'a> {
    embedder: Arc<dyn Embedder>,
    policy: RetryPolicy,
    deadline: Option<Instant>,
    stop: &'a AtomicBool,
    stats: RequestStats,
    tokens: u64,
}

impl Batcher<'_> {
    /// Embed `rows` (whose first index in the batch is `offset`), pushing
    /// vectors and rejected rows by batch index. A rejected request of
    /// several rows is split in halves; a rejected single row is its failure.
    fn embed(
        &mut self,
        rows: &[Claimed],
        offset: usize,
        vectors: &mut Vec<(usize, Vec<f32>)>,
        rejected: &mut Vec<(usize, String)>,
    ) -> std::result::Result<(), Halt> {
        let inputs = Arc::new(rows.iter().map(|r| r.text.clone()).collect::<Vec<_>>());
        let reply = provider::embed_with_retry(
            &self.embedder,
            &inputs,
            &self.policy,
            self.deadline,
            self.stop,
            &mut self.stats,
        );
        match reply {
            Ok(Embeddings {
                vectors: vs,
                tokens,
            }) => {
                self.tokens += tokens.unwrap_or(0);
                vectors.extend(vs.into_iter().enumerate().map(|(i, v)| (offset + i, v)));
                Ok(())
            }
            Err(RetryOutcome::Failed(ProviderError::Rejected { status, message }))
                if rows.len() > 1 =>
            {
                crate::debug!(
                    "request of {} rows rejected ({status}: {message}); splitting it",
                    rows.len()
                );
                let mid = rows.len() / 2;
                self.embed(&rows[..mid], offset, vectors, rejected)?;
                self.embed(&rows[mid..], offset + mid, vectors, rejected)
            }
            Err(RetryOutcome::Failed(ProviderError::Rejected { status, message })) => {
                rejected.push((offset, format!("{status}: {message}")));
                Ok(())
            }
            Err(RetryOutcome::Failed(ProviderError::Mismatch { message })) => {
                Err(Halt::Error(Error::Config(message)))
            }
            Err(RetryOutcome::Failed(e @ ProviderError::Fatal { .. })) => {
                Err(Halt::Error(Error::Provider(e.to_string())))
            }
            Err(RetryOutcome::Failed(e)) => Err(Halt::Error(Error::Provider(format!(
                "gave up after {} retries, rows stay pending: {e}",
                self.policy.transient_retries
            )))),
            Err(RetryOutcome::OutOfTime(e)) => Err(Halt::OutOfTime(e)),
            Err(RetryOutcome::Stopped) => Err(Halt::Stopped),
        }
    }
}

/// Checks every reply's vector size against the column (or the model).
/// A wrong size is a bad reply, retried like any other; but when the model
/// is unknown and its very first reply doesn't fit the column, it is a
/// configuration error (exit 2), and nothing has been written yet.
struct DimensionGuard {
    inner: Arc<dyn Embedder>,
    model: String,
    column_label: String,
    column: Option<u32>,
    known: Option<u32>,
    learned: Mutex<Option<usize>>,
    any_good: AtomicBool,
}

impl DimensionGuard {
    fn new(cfg: &Config, target: &Target, inner: Arc<dyn Embedder>) -> Self {
        DimensionGuard {
            inner,
            model: cfg.provider.model.clone(),
            column_label: quote_ident(&target.embedding_column),
            column: target.dimensions,
            known: provider::expected_dimensions(&cfg.provider),
            learned: Mutex::new(None),
            any_good: AtomicBool::new(false),
        }
    }
}

impl Embedder for DimensionGuard {
    fn embed(&self, inputs: &[&str]) -> std::result::Result<Embeddings, ProviderError> {
        let reply = self.inner.embed(inputs)?;
        let Some(got) = reply.vectors.first().map(Vec::len) else {
            return Ok(reply);
        };
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        let expected = self.column.or(self.known).map(|d| d as usize).or(*learned);
        match expected {
            Some(want) if want != got => {
                if let (Some(column), None, false) = (
                    self.column,
                    self.known,
                    self.any_good.load(Ordering::SeqCst),
                ) {
                    return Err(ProviderError::Mismatch {
                        message: dimension_mismatch(
                            &self.model,
                            got as u32,
                            &self.column_label,
                            column,
                        ),
                    });
                }
                Err(ProviderError::Transient {
                    retry_after: None,
                    message: format!(
                        "unusable reply: vectors of {got} dimensions, expected {want}"
                    ),
                })
            }
            _ => {
                *learned = Some(got);
                self.any_good.store(true, Ordering::SeqCst);
                Ok(reply)
            }
        }
    }
}

/// A progress bar on a terminal for backfill; elsewhere a log line every
/// ten seconds, so cron mail and CI logs stay short.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    log_every: Option<Duration>,
    last: Mutex<Instant>,
}

impl Progress {
    fn new(cfg: &Config, db: &mut Db, target: &Target) -> Progress {
        let backfill = cfg.mode == Mode::Backfill;
        let mut p = Progress {
            bar: None,
            log_every: None,
            last: Mutex::new(Instant::now()),
        };
        if !backfill || output::level() < 0 {
            return p;
        }
        if output::stderr_is_terminal() && !cfg.json {
            let total = target.count_pending(db.client()).unwrap_or(0).max(0) as u64;
            let total = cfg.budget.max_rows.map_or(total, |m| total.min(m));
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            p.bar = Some(bar);
        } else {
            p.log_every = Some(Duration::from_secs(10));
        }
        p
    }

    fn advance(&self, rows: u64, report: &RunReport, batcher: &Batcher<'_>) {
        if let Some(bar) = &self.bar {
            bar.inc(rows);
            if report.failed > 0 {
                bar.set_message(format!("{} failed", report.failed));
            }
        } else if let Some(every) = self.log_every {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= every {
                *last = Instant::now();
                crate::info!(
                    "{} embedded, {} failed, {} requests, {} tokens so far",
                    report.embedded,
                    report.failed,
                    batcher.stats.requests,
                    batcher.tokens
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The same claim loop as a run, read-only: no locks, no API call, no write.
fn dry_run(cfg: &Config, db: &mut Db, target: &Target, state_exists: bool) -> Result<DryRunReport> {
    let eligibility = Eligibility {
        skip_failed: !cfg.retry_failed,
        max_attempts: cfg.budget.max_attempts,
    };
    let pending = target.count_pending(db.client())?;
    let failed = target.count_failed(db.client(), state_exists)?;
    let mut tx = db.client().build_transaction().read_only(true).start()?;
    let mut cursor: Option<String> = None;
    let (mut would_embed, mut tokens) = (0u64, 0u64);
    let mut sample_ids = Vec::new();
    loop {
        let limit = match cfg.budget.max_rows {
            Some(max) if would_embed >= max => break,
            Some(max) => cfg.budget.batch_size.min((max - would_embed) as usize),
            None => cfg.budget.batch_size,
        };
        let (rows, next) = target.claim(
            &mut tx,
            cursor.as_deref(),
            limit,
            eligibility,
            state_exists,
            false,
        )?;
        let Some(next) = next else { break };
        cursor = Some(next);
        for row in &rows {
            if sample_ids.len() < 10 {
                sample_ids.push(row.id.clone());
            }
            tokens += provider::estimate_tokens(&row.text);
        }
        would_embed += rows.len() as u64;
    }
    tx.rollback()?;
    let price = provider::known_model(&cfg.provider.model).map(|m| m.usd_per_million_tokens);
    Ok(DryRunReport {
        command: "dry-run",
        table: target.table.clone(),
        model: cfg.provider.model.clone(),
        pending,
        failed,
        would_embed,
        estimated_tokens: tokens,
        estimated_cost_usd: price.map(|p| tokens as f64 * p / 1_000_000.0),
        sample_ids,
    })
}
