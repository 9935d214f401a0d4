//! The batch loop that run-once, backfill and dry-run share.
//!
//! Each batch is one transaction: claim up to `--batch-size` pending rows in
//! id order (advisory locks, see `db`), ask the provider for their vectors,
//! write the ones whose text did not change meanwhile, record the rows the
//! provider rejected, commit. A rejected batch is split in halves until the
//! offending rows are found, so one bad row never holds back the others.
//! dry-run walks the same loop without locks, API calls or writes.

use crate::checks::{self, dimension_mismatch};
use crate::config::{Config, Mode, TooLong};
use crate::db::{self, quote_ident, Claimed, Db, Eligibility, Target};
use crate::error::{Error, Result};
use crate::output;
use crate::pacing::Pacer;
use crate::provider::{
    self, Embedder, Embeddings, ProviderError, RequestStats, RetryOutcome, RetryPolicy,
};
use crate::signals::Stop;
use crate::tokens::{Counter, MAX_REQUEST_TOKENS};
use postgres::Transaction;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Drained,
    MaxRows,
    MaxSeconds,
    MaxTokens,
    MaxCost,
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
    /// Rows whose text was cut to the model's input limit before sending.
    pub truncated: u64,
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
    /// Rows that would be sent cut to the model's input limit.
    pub truncated: u64,
    /// Rows over the limit that `--on-too-long skip` would not send.
    pub too_long: u64,
    pub estimated_tokens: u64,
    /// Whether `estimated_tokens` is the provider's own count (cl100k_base).
    pub tokens_exact: bool,
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
                     ({}{} tokens, {cost} with {})",
                    r.pending,
                    r.table,
                    r.failed,
                    r.would_embed,
                    if r.tokens_exact { "" } else { "~" },
                    r.estimated_tokens,
                    r.model
                );
                if r.truncated > 0 {
                    s += &format!("; {} texts cut to the model's limit", r.truncated);
                }
                if r.too_long > 0 {
                    s += &format!("; {} texts too long, skipped", r.too_long);
                }
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
        StopReason::MaxTokens => "token budget spent (--max-tokens)",
        StopReason::MaxCost => "cost budget spent (--max-cost-usd)",
        StopReason::Signal => "signal",
        StopReason::Error => "error",
    }
}

/// Connect, check the table and run the loop. Errors before the loop
/// (configuration, connection) are returned; errors inside it end the loop
/// and are reported with the work done so far.
pub fn run(cfg: &Config, stop: &Stop) -> Result<Report> {
    let checks::Opened {
        cfg,
        mut db,
        target,
        state_exists,
    } = checks::open(cfg)?;
    let cfg = &cfg;
    let counter = Counter::for_provider(&cfg.provider)?;
    if cfg.mode == Mode::DryRun {
        return dry_run(cfg, &mut db, &target, state_exists, &counter).map(Report::DryRun);
    }
    let embedder = provider::build(&cfg.provider, &counter)?;
    target.ensure_state(&mut db, state_exists)?;
    let models = target.models(db.client(), stamp(cfg, &target))?;
    if !models.is_baseline && cfg.reembed.is_none() {
        crate::debug!(
            "the table's vectors were first made by another model than {}; `backfill --reembed` replaces them",
            models.current
        );
    }
    let guarded: Arc<dyn Embedder> = Arc::new(DimensionGuard::new(cfg, &target, embedder));
    let report = embed_loop(cfg, &mut db, &target, guarded, counter, &models, stop);
    if cfg.reembed.is_some() && report.stop_reason == StopReason::Drained {
        // Every vector is the current model's now: it becomes the baseline.
        if target.settle_models(db.client(), &models)? {
            crate::info!(
                "all vectors of {} are from {} now",
                target.table,
                models.current
            );
        }
    }
    Ok(Report::Run(report))
}

/// The model this run embeds with, as the state tables record it.
pub(crate) fn stamp(cfg: &Config, target: &Target) -> db::Stamp {
    let model =
        provider::known_model(&cfg.provider.model).map_or(cfg.provider.model.as_str(), |m| m.name);
    let dimensions = target
        .dimensions
        .or_else(|| provider::expected_dimensions(&cfg.provider))
        .unwrap_or(0);
    db::Stamp {
        model: model.to_string(),
        dimensions: dimensions as i32,
    }
}

fn embed_loop(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    embedder: Arc<dyn Embedder>,
    counter: Counter,
    models: &db::Models,
    stop: &Stop,
) -> RunReport {
    let started = Instant::now();
    let shared = Shared {
        cfg,
        counter,
        models,
        target,
        stop,
        deadline: cfg.budget.max_seconds.map(|d| started + d),
        eligibility: Eligibility {
            skip_failed: !cfg.retry_failed,
            max_attempts: cfg.budget.max_attempts,
            reembed: cfg.reembed,
        },
        // Keep the server from ending a transaction that waits on the provider.
        idle_limit: cfg.provider.request_timeout * 6 + Duration::from_secs(600),
        queue: Mutex::new(Queue::default()),
        tally: Mutex::new(Tally::default()),
        more_work: (Mutex::new(None), Condvar::new()),
        progress: Progress::new(cfg, db, target),
        budget: token_budget(cfg),
        earlier: Earlier::default(),
        pacer: Pacer::new(cfg.budget.tokens_per_minute, cfg.budget.requests_per_minute),
    };
    std::thread::scope(|scope| {
        for n in 1..cfg.concurrency {
            let (shared, embedder) = (&shared, embedder.clone());
            scope.spawn(move || {
                // Extra workers start only when the first batch was full:
                // a cron tick with little to do opens one connection.
                if !shared.wait_for_more_work() {
                    return;
                }
                match Db::connect(cfg) {
                    Ok(mut db) => worker(shared, &mut db, embedder, false),
                    Err(e) => crate::warn!("worker {n} cannot connect, going on without it: {e}"),
                }
            });
        }
        worker(&shared, db, embedder.clone(), true);
    });
    shared.progress.finish();

    let queue = lock(&shared.queue);
    let tally = lock(&shared.tally);
    let error = queue.error.as_ref();
    let stop_reason = if error.is_some() {
        StopReason::Error
    } else {
        queue.stop.unwrap_or(StopReason::Drained)
    };
    if stop_reason == StopReason::Signal {
        crate::info!(
            "{} received: stopped after committing the work done",
            stop.name()
        );
    }
    let pending_after = match error {
        Some(Error::Database(_)) => None,
        _ => target
            .count_pending(db.client())
            .map_err(|e| crate::warn!("cannot count pending rows: {e}"))
            .ok(),
    };
    RunReport {
        command: cfg.mode.name(),
        table: target.table.clone(),
        model: cfg.provider.model.clone(),
        embedded: tally.embedded,
        failed: tally.failed,
        truncated: tally.truncated,
        changed: tally.changed,
        pending_after,
        requests: tally.stats.requests,
        retries: tally.stats.retries,
        rate_limited: tally.stats.rate_limited,
        tokens: tally.tokens,
        elapsed_ms: started.elapsed().as_millis() as u64,
        stop_reason,
        error: error.map(|e| output::redact(&e.to_string())),
        exit_code: match (error, stop.exit_code()) {
            (Some(e), _) => e.exit_code(),
            (None, Some(code)) => code,
            (None, None) if tally.failed > 0 => 1,
            _ => 0,
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the workers of one run share.
struct Shared<'a> {
    cfg: &'a Config,
    counter: Counter,
    models: &'a db::Models,
    target: &'a Target,
    stop: &'a Stop,
    deadline: Option<Instant>,
    eligibility: Eligibility,
    idle_limit: Duration,
    queue: Mutex<Queue>,
    tally: Mutex<Tally>,
    /// Set by the first worker after its first claim: whether the others start.
    more_work: (Mutex<Option<bool>>, Condvar),
    progress: Progress,
    budget: Option<TokenBudget>,
    /// Keeps all workers under the provider's per-minute limits.
    pacer: Pacer,
    /// Texts written earlier in the run, to copy rather than send.
    earlier: Earlier,
}

/// Where the next claim starts and why the run stops; claims are taken one
/// at a time under its lock, so workers never scan over each other's rows.
#[derive(Default)]
struct Queue {
    cursor: Option<String>,
    taken: u64,
    stop: Option<StopReason>,
    error: Option<Error>,
}

#[derive(Default)]
struct Tally {
    truncated: u64,
    embedded: u64,
    failed: u64,
    changed: u64,
    stats: RequestStats,
    tokens: u64,
}

/// The outcome of one attempt to claim a batch.
enum Next<'d> {
    /// Rows to embed in this transaction, and whether more candidates follow.
    Rows(Transaction<'d>, Vec<Claimed>, bool),
    /// Every candidate was taken by another run: try the next ones.
    Skipped,
    Stop,
}

impl Shared<'_> {
    fn wait_for_more_work(&self) -> bool {
        let (m, cv) = &self.more_work;
        let mut decided = lock(m);
        while decided.is_none() {
            decided = cv.wait(decided).unwrap_or_else(|e| e.into_inner());
        }
        decided.unwrap_or(false)
    }

    fn decide_more_work(&self, go: bool) {
        let (m, cv) = &self.more_work;
        let mut decided = lock(m);
        if decided.is_none() {
            *decided = Some(go);
            cv.notify_all();
        }
    }

    /// Record why the run stops; the first reason and the first error win.
    fn halt(&self, reason: StopReason, error: Option<Error>) {
        let mut q = lock(&self.queue);
        q.stop.get_or_insert(reason);
        if q.error.is_none() {
            q.error = error;
        }
    }

    /// Claim the next batch. Only the choice of candidates (which moves the
    /// cursor) happens under the queue's lock; the transaction is opened
    /// before and the texts are read after, beside other workers.
    fn claim<'d>(&self, db: &'d mut Db) -> Next<'d> {
        if lock(&self.queue).stop.is_some() {
            return Next::Stop;
        }
        let mut tx = match db.begin(self.idle_limit) {
            Ok(tx) => tx,
            Err(e) => {
                self.halt(StopReason::Error, Some(e));
                return Next::Stop;
            }
        };
        let (locked, more) = {
            let mut q = lock(&self.queue);
            if q.stop.is_some() {
                return Next::Stop;
            }
            let reason = if self.stop.requested() {
                Some(StopReason::Signal)
            } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
                Some(StopReason::MaxSeconds)
            } else {
                None
            };
            let limit = match self.cfg.budget.max_rows {
                Some(max) if q.taken >= max => 0,
                Some(max) => self.cfg.budget.batch_size.min((max - q.taken) as usize),
                None => self.cfg.budget.batch_size,
            };
            if let Some(reason) = reason.or((limit == 0).then_some(StopReason::MaxRows)) {
                q.stop = Some(reason);
                return Next::Stop;
            }
            // The state schema exists: run() created it before the loop.
            let candidates = self.target.candidates(
                &mut tx,
                q.cursor.as_deref(),
                limit,
                self.eligibility,
                true,
                Some(self.models),
            );
            match candidates {
                Err(e) => {
                    q.stop.get_or_insert(StopReason::Error);
                    q.error.get_or_insert(e);
                    return Next::Stop;
                }
                Ok(db::Candidates { next: None, .. }) => {
                    q.stop = Some(StopReason::Drained);
                    return Next::Stop;
                }
                Ok(db::Candidates { locked, next, more }) => {
                    q.cursor = next;
                    // Counted now, so that the next claim respects --max-rows;
                    // rows that drop out on reading are given back below.
                    q.taken += locked.len() as u64;
                    (locked, more)
                }
            }
        };
        let rows = match self
            .target
            .read(&mut tx, &locked, self.eligibility, Some(self.models))
        {
            Ok(rows) => rows,
            Err(e) => {
                self.halt(StopReason::Error, Some(e));
                return Next::Stop;
            }
        };
        if rows.len() < locked.len() {
            lock(&self.queue).taken -= (locked.len() - rows.len()) as u64;
        }
        if rows.is_empty() {
            return Next::Skipped;
        }
        Next::Rows(tx, rows, more)
    }
}

/// Claim, embed, write, commit, until the queue says stop.
fn worker(shared: &Shared<'_>, db: &mut Db, embedder: Arc<dyn Embedder>, first: bool) {
    let mut batcher = Batcher {
        counter: shared.counter.clone(),
        on_too_long: shared.cfg.on_too_long,
        budget: shared.budget.as_ref(),
        pacer: &shared.pacer,
        requester: provider::Requester::new(embedder),
        policy: RetryPolicy::default(),
        deadline: shared.deadline,
        stop: shared.stop.flag(),
        stats: RequestStats::default(),
        tokens: 0,
    };
    // Whatever happens to the first worker, the others must not wait forever.
    struct Decide<'s, 'a>(&'s Shared<'a>);
    impl Drop for Decide<'_, '_> {
        fn drop(&mut self) {
            self.0.decide_more_work(false);
        }
    }
    let _decide = first.then_some(Decide(shared));
    let mut decided = !first;
    loop {
        let (tx, rows, more) = match shared.claim(db) {
            Next::Rows(tx, rows, more) => (tx, rows, more),
            Next::Skipped => continue,
            Next::Stop => break,
        };
        if !decided {
            // Extra workers only when another batch follows this one.
            shared.decide_more_work(more);
            decided = true;
        }
        match one_batch(shared, &mut batcher, tx, &rows) {
            Ok(batch) => {
                {
                    let mut t = lock(&shared.tally);
                    t.embedded += batch.written;
                    t.changed += batch.changed;
                    t.failed += batch.failed;
                    t.truncated += batch.truncated;
                }
                shared.progress.advance(&batch, &shared.tally, &batcher);
                match batch.halt {
                    None => {}
                    // Rate limits are the provider pacing us: the budget ran
                    // out, which is a normal stop. Anything else is an outage.
                    Some(Halt::OutOfTime(why @ ProviderError::RateLimited { .. })) => {
                        crate::info!(
                            "stopping: waiting out the rate limit would pass --max-seconds ({why})"
                        );
                        shared.halt(StopReason::MaxSeconds, None);
                    }
                    Some(Halt::OutOfTime(why)) => shared.halt(
                        StopReason::Error,
                        Some(Error::Provider(format!(
                            "still failing when --max-seconds ran out, rows stay pending: {why}"
                        ))),
                    ),
                    Some(Halt::Stopped) => shared.halt(StopReason::Signal, None),
                    Some(Halt::Budget(reason)) => shared.halt(reason, None),
                    Some(Halt::Error(e)) => shared.halt(StopReason::Error, Some(e)),
                }
            }
            Err(e) => shared.halt(StopReason::Error, Some(e)),
        }
    }
    let mut t = lock(&shared.tally);
    t.stats.requests += batcher.stats.requests;
    t.stats.retries += batcher.stats.retries;
    t.stats.rate_limited += batcher.stats.rate_limited;
    t.tokens += batcher.tokens;
}

/// What one batch did.
struct BatchOutcome {
    /// Rows sent cut to the model's input limit.
    truncated: u64,
    written: u64,
    changed: u64,
    failed: u64,
    /// Why the run must stop after this batch, if it must.
    halt: Option<Halt>,
}

/// Why a batch could not finish all its rows.
#[derive(Debug)]
enum Halt {
    Error(Error),
    OutOfTime(ProviderError),
    Stopped,
    /// The next request would pass `--max-tokens` or `--max-cost-usd`.
    Budget(StopReason),
}

/// Embed the claimed rows, write what came back, record what was rejected, commit.
fn one_batch(
    shared: &Shared<'_>,
    batcher: &mut Batcher<'_>,
    mut tx: Transaction<'_>,
    rows: &[Claimed],
) -> Result<BatchOutcome> {
    let mut vectors: Vec<(usize, Vec<f32>)> = Vec::with_capacity(rows.len());
    let mut rejected: Vec<(usize, String)> = Vec::new();
    let mut truncated = 0;
    let items = inputs_for(
        rows,
        &batcher.counter,
        batcher.on_too_long,
        &mut truncated,
        &mut rejected,
    );
    // Identical texts in a batch are sent once; every row gets the vector.
    let (unique, copies) = dedupe(items, rows);
    // A text an earlier batch of this run wrote is not sent again: its
    // vector is copied from that row.
    let (unique, earlier) = shared.earlier.split(unique, rows);
    let halt = batcher.embed(&unique, &mut vectors, &mut rejected).err();
    let done: Vec<(&Claimed, Vec<f32>)> = fan_out(vectors, &copies)
        .map(|(i, v)| (&rows[i], v))
        .collect();
    let failed: Vec<(&Claimed, String)> = fan_out(rejected, &copies)
        .map(|(i, e)| (&rows[i], e))
        .collect();
    let from_earlier: Vec<(&Claimed, String)> = fan_out(earlier, &copies)
        .map(|(i, src)| (&rows[i], src))
        .collect();
    let sent = done.len() + from_earlier.len();
    let (target, models, reembed) = (shared.target, shared.models, shared.cfg.reembed.is_some());
    let mut written = target.write(&mut tx, done, models, reembed)?;
    written.extend(target.copy(&mut tx, &from_earlier, models, reembed)?);
    target.record_failures(&mut tx, &failed)?;
    tx.commit()?;
    shared.earlier.remember(rows, &written);
    for (row, err) in &failed {
        crate::warn!("row {} failed: {err}", row.id);
    }
    let outcome = BatchOutcome {
        truncated,
        written: written.len() as u64,
        changed: (sent - written.len()) as u64,
        failed: failed.len() as u64,
        halt,
    };
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
    counter: Counter,
    on_too_long: TooLong,
    budget: Option<&'a TokenBudget>,
    pacer: &'a Pacer,
    requester: provider::Requester,
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
        items: &[(usize, String)],
        vectors: &mut Vec<(usize, Vec<f32>)>,
        rejected: &mut Vec<(usize, String)>,
    ) -> std::result::Result<(), Halt> {
        if items.is_empty() {
            return Ok(());
        }
        // No request over the provider's token limit: split before sending.
        let bytes: usize = items.iter().map(|(_, t)| t.len()).sum();
        let needs_count = self.budget.is_some()
            || self.pacer.paces_tokens()
            || (bytes > MAX_REQUEST_TOKENS && self.counter.limits_requests());
        let tokens = if needs_count {
            items.iter().map(|(_, t)| self.counter.count(t)).sum()
        } else {
            0
        };
        if tokens > MAX_REQUEST_TOKENS && self.counter.limits_requests() && items.len() > 1 {
            let mid = items.len() / 2;
            self.embed(&items[..mid], vectors, rejected)?;
            return self.embed(&items[mid..], vectors, rejected);
        }
        if let Some(budget) = self.budget {
            if let Err(reason) = budget.reserve(tokens as u64) {
                return Err(Halt::Budget(reason));
            }
        }
        let inputs = Arc::new(items.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>());
        let request = provider::Request {
            inputs: &inputs,
            tokens: tokens as u64,
            pacer: self.pacer,
        };
        let reply = provider::embed_with_retry(
            &self.requester,
            request,
            &self.policy,
            self.deadline,
            self.stop,
            &mut self.stats,
        );
        match reply {
            Ok(Embeddings {
                vectors: vs,
                tokens,
                ..
            }) => {
                self.tokens += tokens.unwrap_or(0);
                vectors.extend(vs.into_iter().zip(items).map(|(v, (i, _))| (*i, v)));
                Ok(())
            }
            Err(RetryOutcome::Failed(ProviderError::Rejected { status, message }))
                if items.len() > 1 =>
            {
                crate::debug!(
                    "request of {} rows rejected ({status}: {message}); splitting it",
                    items.len()
                );
                let mid = items.len() / 2;
                self.embed(&items[..mid], vectors, rejected)?;
                self.embed(&items[mid..], vectors, rejected)
            }
            Err(RetryOutcome::Failed(ProviderError::Rejected { status, message })) => {
                rejected.push((items[0].0, format!("{status}: {message}")));
                Ok(())
            }
            Err(RetryOutcome::Failed(ProviderError::Misconfigured { message })) => {
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

/// The tokens a run may still spend (`--max-tokens`, `--max-cost-usd`),
/// shared by its workers: a request is sent only once its tokens are reserved.
pub struct TokenBudget {
    limit: u64,
    reason: StopReason,
    spent: Mutex<u64>,
}

impl TokenBudget {
    fn reserve(&self, tokens: u64) -> std::result::Result<(), StopReason> {
        let mut spent = lock(&self.spent);
        if *spent + tokens > self.limit {
            return Err(self.reason);
        }
        *spent += tokens;
        Ok(())
    }
}

/// The budget in tokens, from `--max-tokens` and `--max-cost-usd` (whichever is tighter).
fn token_budget(cfg: &Config) -> Option<TokenBudget> {
    let by_tokens = cfg.budget.max_tokens.map(|t| (t, StopReason::MaxTokens));
    let by_cost = cfg
        .budget
        .max_cost_usd
        .zip(cfg.provider.price())
        .map(|(usd, price)| {
            (
                (usd / price * 1_000_000.0).floor() as u64,
                StopReason::MaxCost,
            )
        });
    let (limit, reason) = match (by_tokens, by_cost) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some(TokenBudget {
        limit,
        reason,
        spent: Mutex::new(0),
    })
}

/// The texts this run has written, each with one row that holds its vector:
/// a text met again in a later batch is copied, not sent. Texts are kept as
/// the 64-bit hash the database gave them (the copy itself checks, in the
/// database, that both rows still hold a text of that hash), and at most
/// [`EARLIER_TEXTS`] of them, so memory stays flat however long the backfill.
#[derive(Default)]
struct Earlier {
    rows: Mutex<HashMap<i64, Box<str>>>,
}

/// Texts (or the ids of rows to copy from) by batch index.
type Items = Vec<(usize, String)>;

/// Texts remembered by [`Earlier`]: about a megabyte and a half.
const EARLIER_TEXTS: usize = 20_000;

impl Earlier {
    /// Split `items` into those to send and, by batch index, the row to copy from.
    fn split(&self, items: Vec<(usize, String)>, rows: &[Claimed]) -> (Items, Items) {
        let known = lock(&self.rows);
        if known.is_empty() {
            return (items, Vec::new());
        }
        let mut send = Vec::with_capacity(items.len());
        let mut copy = Vec::new();
        for (i, text) in items {
            match known.get(&rows[i].text_hash) {
                Some(src) => copy.push((i, src.to_string())),
                None => send.push((i, text)),
            }
        }
        (send, copy)
    }

    /// Note the texts of the rows written in this batch.
    fn remember(&self, rows: &[Claimed], written: &[String]) {
        if written.is_empty() {
            return;
        }
        let written: std::collections::HashSet<&str> = written.iter().map(String::as_str).collect();
        let mut known = lock(&self.rows);
        for row in rows.iter().filter(|r| written.contains(r.id.as_str())) {
            if known.len() >= EARLIER_TEXTS {
                break;
            }
            known
                .entry(row.text_hash)
                .or_insert_with(|| row.id.as_str().into());
        }
    }
}

/// For the batch index of each text sent, the other rows that share it.
type Copies = HashMap<usize, Vec<usize>>;

/// The first item of each distinct text, and for each of those the batch
/// indexes of the other rows with the same text. Rows are matched by the
/// hash the database gave their text, then by the text sent.
fn dedupe(items: Vec<(usize, String)>, rows: &[Claimed]) -> (Vec<(usize, String)>, Copies) {
    let mut first: HashMap<i64, usize> = HashMap::new();
    let mut copies: Copies = HashMap::new();
    let mut keep = vec![true; items.len()];
    for (pos, (i, text)) in items.iter().enumerate() {
        match first.get(&rows[*i].text_hash) {
            Some(&owner) if items[owner].1 == *text => {
                copies.entry(items[owner].0).or_default().push(*i);
                keep[pos] = false;
            }
            Some(_) => {}
            None => {
                first.insert(rows[*i].text_hash, pos);
            }
        }
    }
    let unique = items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, k)| k.then_some(item))
        .collect();
    (unique, copies)
}

/// Results by batch index, repeated for the rows that shared the text.
fn fan_out<'c, T: Clone + 'c>(
    results: Vec<(usize, T)>,
    copies: &'c Copies,
) -> impl Iterator<Item = (usize, T)> + 'c {
    results.into_iter().flat_map(move |(i, v)| {
        let others = copies.get(&i).map(Vec::as_slice).unwrap_or(&[]);
        let mut out: Vec<(usize, T)> = others.iter().map(|&j| (j, v.clone())).collect();
        out.push((i, v));
        out
    })
}

/// The texts to send for `rows`, by batch index: too-long ones truncated
/// (counted in `truncated`) or, with `--on-too-long skip`, rejected.
fn inputs_for(
    rows: &[Claimed],
    counter: &Counter,
    on_too_long: TooLong,
    truncated: &mut u64,
    rejected: &mut Vec<(usize, String)>,
) -> Vec<(usize, String)> {
    let mut items = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        match fit(&row.text, counter, on_too_long) {
            Fit::Whole => items.push((i, row.text.clone())),
            Fit::Cut(cut) => {
                *truncated += 1;
                items.push((i, cut));
            }
            Fit::TooLong { tokens, max } => rejected.push((
                i,
                format!("too long: {tokens} tokens, the model takes {max} (--on-too-long skip; truncate would send the first {max})"),
            )),
        }
    }
    items
}

/// What is sent for one text.
enum Fit {
    /// The text as it is.
    Whole,
    /// Its first tokens, up to the model's limit.
    Cut(String),
    /// Nothing (`--on-too-long skip`).
    TooLong { tokens: usize, max: usize },
}

/// The one rule for texts over the model's input limit, for runs and dry-runs alike.
fn fit(text: &str, counter: &Counter, on_too_long: TooLong) -> Fit {
    let Some(max) = counter.max_input() else {
        return Fit::Whole;
    };
    match (counter.over(text, max), on_too_long) {
        (None, _) => Fit::Whole,
        (Some(tokens), TooLong::Skip) => Fit::TooLong { tokens, max },
        // The local model cuts a text itself when no word boundary is left to cut at.
        (Some(_), TooLong::Truncate) => Fit::Cut(
            counter
                .truncate(text, max)
                .unwrap_or_else(|| text.to_string()),
        ),
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
                    return Err(ProviderError::Misconfigured {
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

    fn advance(&self, batch: &BatchOutcome, tally: &Mutex<Tally>, batcher: &Batcher<'_>) {
        let rows = batch.written + batch.failed + batch.changed;
        if let Some(bar) = &self.bar {
            bar.inc(rows);
            if batch.failed > 0 {
                bar.set_message(format!("{} failed", lock(tally).failed));
            }
        } else if let Some(every) = self.log_every {
            let mut last = lock(&self.last);
            if last.elapsed() >= every {
                *last = Instant::now();
                let t = lock(tally);
                crate::info!(
                    "{} embedded, {} failed so far ({} requests, {} tokens in this worker)",
                    t.embedded,
                    t.failed,
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
fn dry_run(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    state_exists: bool,
    counter: &Counter,
) -> Result<DryRunReport> {
    let eligibility = Eligibility {
        skip_failed: !cfg.retry_failed && state_exists,
        max_attempts: cfg.budget.max_attempts,
        reembed: None,
    };
    let pending = target.count_pending(db.client())?;
    let failed = target.count_failed(db.client(), state_exists)?;
    let budget = token_budget(cfg);
    let mut tx = db.client().build_transaction().read_only(true).start()?;
    let mut cursor: Option<String> = None;
    let (mut would_embed, mut tokens, mut truncated, mut too_long) = (0u64, 0u64, 0u64, 0u64);
    // As in a run: a text written by an earlier batch is copied, not sent.
    let mut earlier = std::collections::HashSet::new();
    let mut sample_ids = Vec::new();
    'claims: loop {
        let limit = match cfg.budget.max_rows {
            Some(max) if would_embed >= max => break,
            Some(max) => cfg.budget.batch_size.min((max - would_embed) as usize),
            None => cfg.budget.batch_size,
        };
        let db::Claim { rows, next, .. } =
            target.claim(&mut tx, cursor.as_deref(), limit, eligibility, false, None)?;
        let Some(next) = next else { break };
        cursor = Some(next);
        let mut seen = std::collections::HashSet::new();
        let mut written_now = Vec::new();
        for row in &rows {
            // The same decisions as a run: what would be sent, each distinct
            // text of a batch counted once.
            let text = match fit(&row.text, counter, cfg.on_too_long) {
                Fit::Whole => row.text.clone(),
                Fit::Cut(cut) => {
                    truncated += 1;
                    cut
                }
                Fit::TooLong { .. } => {
                    too_long += 1;
                    continue;
                }
            };
            let key = row.text_hash;
            let n = if earlier.contains(&key) || seen.contains(&text) {
                0
            } else {
                counter.count(&text) as u64
            };
            seen.insert(text);
            written_now.push(key);
            if let Some(b) = &budget {
                if b.reserve(n).is_err() {
                    break 'claims;
                }
            }
            if sample_ids.len() < 10 {
                sample_ids.push(row.id.clone());
            }
            tokens += n;
            would_embed += 1;
        }
        for key in written_now {
            if earlier.len() < EARLIER_TEXTS {
                earlier.insert(key);
            }
        }
    }
    tx.rollback()?;
    Ok(DryRunReport {
        command: "dry-run",
        table: target.table.clone(),
        model: cfg.provider.model.clone(),
        pending,
        failed,
        would_embed,
        truncated,
        too_long,
        estimated_tokens: tokens,
        tokens_exact: counter.is_exact(),
        estimated_cost_usd: cfg
            .provider
            .price()
            .map(|p| tokens as f64 * p / 1_000_000.0),
        sample_ids,
    })
}
