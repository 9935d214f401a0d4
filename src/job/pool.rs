//! The workers of one run: up to `--concurrency` threads, each with its
//! own connection, taking batches one claim at a time (claims move a shared
//! cursor, so workers never scan over each other's rows) until the queue
//! says stop. The first batch goes alone: the others start only after its
//! reply, and only when more work follows, so a bad key costs one request
//! and a quiet cron tick opens one connection.

use super::batch::{self, Claim, Context, Worker};
use super::plan::Planner;
use super::progress::{BatchLine, Progress};
use super::report::{self, RunReport, StopReason, Tally};
use super::send::{Halt, Sender};
use crate::config::Config;
use crate::db::claims::{Holder, Lease, Taken};
use crate::db::model_records::Models;
use crate::db::target::{Selection, Target};
use crate::db::Db;
use crate::error::Error;
use crate::output;
use crate::pacing::Pacer;
use crate::provider::{Embedder, ProviderError, Requester, RetryPolicy};
use crate::signals::Stop;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// What the workers of one run share.
pub struct Pool<'a> {
    ctx: Context<'a>,
    stop: &'a Stop,
    deadline: Option<Instant>,
    /// This run's name in the claims it takes.
    run_id: String,
    pacer: Pacer,
    queue: Mutex<Queue>,
    tally: Mutex<Tally>,
    /// When the other workers start: see [`Gate`].
    gate: (Mutex<Gate>, Condvar),
    progress: Progress,
}

/// The first batch goes alone. Its claim says whether more work follows:
/// then the other workers connect (while its request is in flight); its
/// reply says whether the provider takes requests: then they start claiming.
#[derive(Default, Clone, Copy)]
struct Gate {
    connect: Option<bool>,
    claim: Option<bool>,
}

/// Where the next claim starts and why the run stops.
#[derive(Default)]
struct Queue {
    cursor: Option<String>,
    /// The next claim's place in the run's order (the plan follows it).
    next_seq: u64,
    stop: Option<StopReason>,
    error: Option<Error>,
}

/// The outcome of one attempt to claim a batch.
enum Next {
    Rows(Claim),
    /// Every row claimed was emptied meanwhile: claim the next ones.
    Skipped,
    /// The connection was lost before anything was taken: connect again and retry.
    Reconnect(Error),
    Stop,
}

/// Connections lost in a row, at a claim, before a worker gives up.
const RECONNECTS: u32 = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run the workers until the work or a budget runs out; report what they did.
pub fn run(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    embedder: Arc<dyn Embedder>,
    planner: Planner,
    models: &Models,
    stop: &Stop,
) -> RunReport {
    let started = Instant::now();
    let pool = Pool {
        ctx: Context {
            cfg,
            target,
            models,
            planner,
        },
        stop,
        deadline: cfg.budget.max_seconds.map(|d| started + d),
        run_id: run_id(),
        pacer: Pacer::new(cfg.budget.tokens_per_minute, cfg.budget.requests_per_minute),
        queue: Mutex::new(Queue::default()),
        tally: Mutex::new(Tally::default()),
        gate: (Mutex::new(Gate::default()), Condvar::new()),
        progress: Progress::new(cfg, db, target),
    };
    std::thread::scope(|scope| {
        for n in 1..cfg.concurrency {
            let (pool, embedder) = (&pool, embedder.clone());
            scope.spawn(move || {
                if !pool.wait_at_gate(|g| g.connect) {
                    return;
                }
                match Db::connect(cfg) {
                    Ok(mut db) if pool.wait_at_gate(|g| g.claim) => pool.work(&mut db, embedder, n),
                    Ok(_) => {}
                    Err(e) => crate::warn!("worker {n} cannot connect, going on without it: {e}"),
                }
            });
        }
        pool.work(db, embedder.clone(), 0);
    });
    pool.progress.finish();
    pool.report(db, started)
}

/// A name for this run's claims: unique enough that two runs never share it.
fn run_id() -> String {
    format!("{:016x}", crate::random::u64())
}

impl Pool<'_> {
    /// Wait until the first worker has decided what `step` reads.
    fn wait_at_gate(&self, step: impl Fn(&Gate) -> Option<bool>) -> bool {
        let (m, cv) = &self.gate;
        let mut gate = lock(m);
        loop {
            if let Some(go) = step(&gate) {
                return go;
            }
            gate = cv.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn open_gate(&self, step: impl Fn(&mut Gate) -> &mut Option<bool>, go: bool) {
        let (m, cv) = &self.gate;
        let mut gate = lock(m);
        step(&mut gate).get_or_insert(go);
        cv.notify_all();
    }

    /// Record why the run stops: the weightiest reason and the first error win.
    fn halt(&self, reason: StopReason, error: Option<Error>) {
        let mut q = lock(&self.queue);
        q.stop = Some(q.stop.map_or(reason, |r| r.max(reason)));
        if q.error.is_none() {
            q.error = error;
        }
    }

    fn selection(&self) -> Selection<'_> {
        Selection {
            skip_failed: !self.ctx.cfg.retry_failed,
            max_attempts: self.ctx.cfg.budget.max_attempts as i32,
            skip_claimed: true,
            skip_batched: true,
            reembed: self.ctx.cfg.reembed.map(|r| self.ctx.models.reembedding(r)),
        }
    }

    /// Claim the next batch: the claim under the queue's lock (it moves the
    /// run's cursor; claims of a table are taken one at a time anyway, see
    /// [`crate::db::claims`]), the texts read after it commits, beside the
    /// other workers. Nothing is open when the request is sent.
    fn claim(&self, db: &mut Db, holder: &Holder) -> Next {
        if lock(&self.queue).stop.is_some() {
            return Next::Stop;
        }
        if let Err(e) = db.reconnect_if_closed() {
            self.halt(StopReason::Error, Some(e));
            return Next::Stop;
        }
        let direct = db.direct;
        let sel = self.selection();
        let mut tx = match db.begin() {
            Ok(tx) => tx,
            // The server dropped the idle connection (a restart, an
            // operator): nothing was taken yet.
            Err(e) if crate::db::is_retryable(&e) => return Next::Reconnect(e.into()),
            Err(e) => {
                self.halt(StopReason::Error, Some(e.into()));
                return Next::Stop;
            }
        };
        let lease = Lease {
            holder,
            length: self.ctx.cfg.claim_lease,
            direct,
        };
        let (seq, taken, claimed_at) = {
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
            let limit = match (reason, self.ctx.planner.claim_limit()) {
                (Some(r), _) | (None, Err(r)) => {
                    q.stop = Some(q.stop.map_or(r, |s| s.max(r)));
                    return Next::Stop;
                }
                (None, Ok(limit)) => limit,
            };
            let claimed_at = Instant::now();
            let taken = self
                .ctx
                .target
                .claim(&mut tx, q.cursor.as_deref(), limit, &sel, Some(lease))
                .and_then(|taken| {
                    tx.commit()?;
                    Ok(taken)
                });
            match taken {
                Err(e) => {
                    q.stop = Some(StopReason::Error);
                    q.error.get_or_insert(e);
                    return Next::Stop;
                }
                Ok(Taken {
                    ids,
                    claim: Some(claim),
                    more,
                }) if !ids.is_empty() => {
                    q.cursor = ids.last().cloned();
                    let seq = q.next_seq;
                    q.next_seq += 1;
                    // Counted now, so that the next claim respects --max-rows;
                    // rows dropping out on reading are given back below.
                    self.ctx.planner.took(ids.len());
                    (seq, (ids, claim, more), claimed_at)
                }
                Ok(_) => {
                    q.stop.get_or_insert(StopReason::Drained);
                    return Next::Stop;
                }
            }
        };
        let (ids, claim, more) = taken;
        match self.ctx.target.read(db.client(), &ids, &sel) {
            Ok(rows) => {
                self.ctx.planner.gave_back(ids.len() - rows.len());
                if rows.is_empty() {
                    // Every row was emptied meanwhile: the claim holds nothing to send.
                    self.ctx.planner.skip(seq);
                    let target = self.ctx.target;
                    return match db.in_transaction(|tx| Ok(target.end_claim(tx, claim)?)) {
                        Ok(()) => Next::Skipped,
                        Err(e) => {
                            self.halt(StopReason::Error, Some(e));
                            Next::Stop
                        }
                    };
                }
                Next::Rows(Claim {
                    seq,
                    rows,
                    claim,
                    more,
                    claimed_at,
                })
            }
            Err(e) => {
                self.ctx.planner.skip(seq);
                self.halt(StopReason::Error, Some(e));
                Next::Stop
            }
        }
    }

    /// Claim, embed, write, until the queue says stop.
    fn work(&self, db: &mut Db, embedder: Arc<dyn Embedder>, n: usize) {
        let mut w = Worker {
            db,
            holder: Holder::new(&self.run_id, n),
            sender: Sender {
                counter: self.ctx.planner.counter(),
                pacer: &self.pacer,
                requester: Requester::new(embedder),
                policy: RetryPolicy::default(),
                deadline: self.deadline,
                stop: self.stop.flag(),
                stats: Default::default(),
                tokens: 0,
            },
        };
        // Whatever happens to the first worker, the others must not wait forever.
        struct Decide<'p, 'a>(&'p Pool<'a>);
        impl Drop for Decide<'_, '_> {
            fn drop(&mut self) {
                self.0.open_gate(|g| &mut g.connect, false);
                self.0.open_gate(|g| &mut g.claim, false);
            }
        }
        let first = n == 0;
        let _decide = first.then_some(Decide(self));
        let mut decided = !first;
        let mut lost = 0;
        loop {
            let claim = match self.claim(w.db, &w.holder) {
                Next::Rows(claim) => claim,
                Next::Skipped => continue,
                Next::Reconnect(e) if lost < RECONNECTS => {
                    lost += 1;
                    crate::warn!("the database connection was lost ({e}); connecting again");
                    continue;
                }
                Next::Reconnect(e) => {
                    self.halt(StopReason::Error, Some(e));
                    break;
                }
                Next::Stop => break,
            };
            lost = 0;
            let more = claim.more;
            if !decided {
                self.open_gate(|g| &mut g.connect, more);
            }
            let batch_started = Instant::now();
            let outcome = batch::process(&self.ctx, &mut w, claim);
            let ok = matches!(&outcome, Ok(b) if b.halt.is_none() && b.budget.is_none());
            {
                // What this batch's requests did: the sender counts from zero again.
                let stats = std::mem::take(&mut w.sender.stats);
                let tokens = std::mem::take(&mut w.sender.tokens);
                let mut t = lock(&self.tally);
                t.stats.requests += stats.requests;
                t.stats.retries += stats.retries;
                t.stats.rate_limited += stats.rate_limited;
                t.tokens += tokens;
                if let Ok(b) = &outcome {
                    self.progress.batch(
                        &self.ctx.target.table,
                        &BatchLine {
                            embedded: b.written,
                            failed: b.failed,
                            changed: b.changed,
                            requests: stats.requests,
                            tokens,
                            ms: batch_started.elapsed().as_millis() as u64,
                        },
                    );
                    t.embedded += b.written;
                    t.chunks += b.chunks;
                    t.changed += b.changed;
                    t.failed += b.failed;
                    t.truncated += b.truncated;
                    self.progress
                        .advance(b.written + b.failed + b.changed, b.failed > 0, &t);
                }
            }
            if !decided {
                // The others start after the first batch's reply, and only
                // when another batch follows it.
                self.open_gate(|g| &mut g.claim, more && ok);
                decided = true;
            }
            match outcome {
                Err(e) => self.halt(StopReason::Error, Some(e)),
                Ok(b) => {
                    if let Some(reason) = b.budget {
                        self.halt(reason, None);
                    }
                    match b.halt {
                        None => {}
                        // Rate limits are the provider pacing us: the budget ran
                        // out, which is a normal stop. Anything else is an outage.
                        Some(Halt::OutOfTime(why @ ProviderError::RateLimited { .. })) => {
                            crate::info!(
                                "stopping: waiting out the rate limit would pass --max-seconds ({why})"
                            );
                            self.halt(StopReason::MaxSeconds, None);
                        }
                        Some(Halt::OutOfTime(why)) => self.halt(
                            StopReason::Error,
                            Some(Error::Unavailable(format!(
                                "still failing when --max-seconds ran out, rows stay pending: {why}"
                            ))),
                        ),
                        Some(Halt::Stopped) => self.halt(StopReason::Signal, None),
                        Some(Halt::Error(e)) => self.halt(StopReason::Error, Some(e)),
                    }
                }
            }
        }
    }

    /// Release what the run still holds and say what it did.
    fn report(&self, db: &mut Db, started: Instant) -> RunReport {
        let queue = lock(&self.queue);
        let tally = lock(&self.tally);
        let error = queue.error.as_ref();
        let stop_reason = if error.is_some() {
            StopReason::Error
        } else {
            queue.stop.unwrap_or(StopReason::Drained)
        };
        if stop_reason == StopReason::Signal {
            crate::info!(
                "{} received: stopped after committing the work done",
                self.stop.name()
            );
        }
        let target = self.ctx.target;
        // A run that claimed nothing holds nothing, and leaves the sweep of
        // others' lapsed claims to one that worked: an idle look (a quiet
        // cron tick, a watcher's every second) stays a few index probes.
        let released = if queue.next_seq == 0 {
            Ok(0)
        } else {
            db.reconnect_if_closed()
                .and_then(|()| db.in_transaction(|tx| target.release_run(tx, &self.run_id)))
        };
        match released {
            Ok(0) => {}
            Ok(n) => crate::debug!("released the claims of {n} rows"),
            Err(e) => {
                crate::warn!("cannot release this run's claims (they lapse by themselves): {e}")
            }
        }
        // A run that worked, and did not end on the database, forgets the
        // records of rows deleted since (the next one will, otherwise).
        if queue.next_seq > 0 && !matches!(error, Some(Error::Database(_))) {
            match db.in_transaction(|tx| target.forget_deleted(tx)) {
                Ok(0) => {}
                Ok(n) => crate::debug!("forgot {n} records of deleted rows"),
                Err(e) => crate::warn!("cannot forget the records of deleted rows: {e}"),
            }
        }
        // After a database error the count would most likely fail (or wait) too.
        let pending_after = match error {
            Some(Error::Database(_)) => None,
            _ => match self.ctx.target.count_pending(db.client()) {
                Ok(n) => Some(n),
                Err(e) => {
                    crate::warn!("cannot count pending rows: {e}");
                    None
                }
            },
        };
        RunReport {
            command: self.ctx.cfg.mode.name(),
            table: self.ctx.target.table.clone(),
            model: self.ctx.cfg.provider.model.clone(),
            embedded: tally.embedded,
            chunks: self.ctx.target.chunks.as_ref().map(|_| tally.chunks),
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
            batch: None,
            error: error.map(|e| output::redact(&e.to_string())),
            may_pass: error.is_some_and(Error::may_pass),
            exit_code: report::exit_code(error, self.stop, tally.failed),
        }
    }
}
