//! `autoembed watch`: a long-running worker that embeds rows as they become
//! pending, with the same claims, plan, writes and settings as `run-once`.
//!
//! Each round is a run of the pool until nothing is pending; between rounds
//! it waits `--poll-interval`, or less when a NOTIFY from `setup --notify`
//! arrives (on a connection of its own; notifications lost while it was
//! disconnected are made up for by the round after it reconnects, which
//! looks at the whole table). What will pass (the provider down or rate
//! limiting, the database gone or a lock held) is waited out with a
//! back-off; a key, a grant or a setting that is wrong ends it, so that a
//! supervisor shows it. SIGTERM and SIGINT end it with exit 0: no new
//! batch, the request in flight abandoned, claims released.

use super::metrics::Metrics;
use super::plan::{self, Planner};
use super::{pool, prepare};
use crate::checks::{self, Opened};
use crate::config::Config;
use crate::db::catalog::{notify_trigger, NOTIFY_CHANNEL};
use crate::db::quote_ident;
use crate::db::Db;
use crate::error::Result;
use crate::output;
use crate::provider;
use crate::signals::{sleep_unless_stopped, Stop};
use postgres::fallible_iterator::FallibleIterator;
use std::time::{Duration, Instant};

/// The longest wait between two tries after something that may pass.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a wait for a notification lasts before the stop flag is looked at.
const SLICE: Duration = Duration::from_millis(200);
/// After a notification, how long to wait for the rows that arrive with it
/// (an application's inserts in quick succession) before the round starts.
const LINGER: Duration = Duration::from_millis(20);

/// Watch until stopped; the exit code.
pub fn run(cfg: &Config, stop: &Stop) -> Result<i32> {
    let Opened {
        cfg,
        mut db,
        target,
        state,
    } = checks::open(cfg)?;
    let cfg = &cfg;
    let provider = provider::build(&cfg.provider)?;
    let (models, embedder) = prepare(cfg, &mut db, &target, state, provider.embedder)?;
    let metrics = cfg
        .metrics_addr
        .as_deref()
        .map(Metrics::serve)
        .transpose()?;
    let notify = db.has_trigger(&target.table, &notify_trigger(&target.embedding_column))?;
    let mut listener = Listener::new(notify, &target.key);
    crate::info!(
        "watching {} (every {:.1} s{})",
        target.table,
        cfg.poll_interval.as_secs_f64(),
        if notify {
            ", and at once on NOTIFY"
        } else {
            "; `setup --notify` wakes it at once"
        }
    );
    let mut backoff = Duration::ZERO;
    let mut totals = Totals::new(&target.table);
    while !stop.requested() {
        listener.connect(cfg);
        let planner = Planner::new(plan::Shape::of(cfg), provider.counter.clone(), false)?;
        let report = pool::run(
            cfg,
            &mut db,
            &target,
            embedder.clone(),
            planner,
            &models,
            stop,
        );
        if let Some(m) = &metrics {
            m.record(&report);
        }
        totals.add(&report);
        if totals.last_said.elapsed() >= SUMMARY_EVERY && totals.since_said > 0 {
            totals.say(cfg.json);
        }
        if report.stop_reason == super::report::StopReason::Signal {
            break;
        }
        match &report.error {
            None => backoff = Duration::ZERO,
            Some(e) if report.may_pass => {
                backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                crate::warn!("{e}; trying again in {} s", backoff.as_secs());
                if !sleep_unless_stopped(backoff, stop.flag()) {
                    break;
                }
                continue;
            }
            Some(e) => {
                output::log(-2, &format!("error: {e}"));
                totals.finish(cfg.json);
                return Ok(report.exit_code);
            }
        }
        listener.wait(cfg.poll_interval, stop);
    }
    crate::info!("{} received: stopped", stop.name());
    totals.finish(cfg.json);
    Ok(0)
}

/// How often a watcher that has done something says so in sum.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What a watcher has done since it started.
struct Totals {
    table: String,
    started: Instant,
    embedded: u64,
    failed: u64,
    requests: u64,
    tokens: u64,
    pending: Option<i64>,
    /// Rows done since the last summary, and when that was.
    since_said: u64,
    last_said: Instant,
}

impl Totals {
    fn new(table: &str) -> Totals {
        Totals {
            table: table.to_string(),
            started: Instant::now(),
            embedded: 0,
            failed: 0,
            requests: 0,
            tokens: 0,
            pending: None,
            since_said: 0,
            last_said: Instant::now(),
        }
    }

    fn add(&mut self, r: &super::report::RunReport) {
        self.embedded += r.embedded;
        self.failed += r.failed;
        self.requests += r.requests;
        self.tokens += r.tokens;
        self.pending = r.pending_after.or(self.pending);
        self.since_said += r.embedded + r.failed;
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "command": "watch",
            "table": self.table,
            "embedded": self.embedded,
            "failed": self.failed,
            "requests": self.requests,
            "tokens": self.tokens,
            "pending": self.pending,
            "elapsed_s": self.started.elapsed().as_secs(),
        })
    }

    fn human(&self) -> String {
        format!(
            "watch: embedded {} rows of {} ({} failed, {} requests, {} tokens) in {} s; {} pending",
            self.embedded,
            self.table,
            self.failed,
            self.requests,
            self.tokens,
            self.started.elapsed().as_secs(),
            self.pending.map_or("?".to_string(), |p| p.to_string())
        )
    }

    /// The periodic summary, on stderr.
    fn say(&mut self, json: bool) {
        if json {
            let mut v = self.json();
            v["event"] = "summary".into();
            output::log_json(&v.to_string());
        } else {
            crate::info!("{}", self.human());
        }
        self.since_said = 0;
        self.last_said = Instant::now();
    }

    /// The summary at the end, on stdout like every command's.
    fn finish(&self, json: bool) {
        output::print(&if json {
            self.json().to_string()
        } else {
            self.human()
        });
    }
}

/// The connection that listens for `setup --notify`'s notifications.
struct Listener {
    wanted: bool,
    /// The state key the notifications for this target carry.
    key: String,
    db: Option<Db>,
}

impl Listener {
    fn new(wanted: bool, key: &str) -> Listener {
        Listener {
            wanted,
            key: key.to_string(),
            db: None,
        }
    }

    /// Listen, if the table notifies and no connection listens yet. A
    /// failure leaves polling alone (a transaction pooler cannot LISTEN).
    fn connect(&mut self, cfg: &Config) {
        if !self.wanted || self.db.as_mut().is_some_and(|d| !d.client().is_closed()) {
            return;
        }
        self.db = Db::connect(cfg).ok().and_then(|mut db| {
            match db
                .client()
                .batch_execute(&format!("LISTEN {}", quote_ident(NOTIFY_CHANNEL)))
            {
                Ok(()) => Some(db),
                Err(e) => {
                    crate::warn!("cannot LISTEN ({e}); looking every --poll-interval instead");
                    None
                }
            }
        });
    }

    /// Wait up to `every`, until a notification for this target arrives or a
    /// stop is asked for.
    fn wait(&mut self, every: Duration, stop: &Stop) {
        let until = Instant::now() + every;
        while !stop.requested() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let slice = left.min(SLICE);
            let Some(db) = self.db.as_mut() else {
                sleep_unless_stopped(slice, stop.flag());
                continue;
            };
            let next = db
                .client()
                .notifications()
                .timeout_iter(slice)
                .next()
                .map(|n| n.is_some_and(|n| n.payload() == self.key));
            match next {
                Ok(true) => {
                    sleep_unless_stopped(LINGER, stop.flag());
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    crate::warn!("stopped listening ({e}); connecting again after the next look");
                    self.db = None;
                }
            }
        }
    }
}
