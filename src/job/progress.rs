//! Progress of a backfill: a bar on a terminal, elsewhere a log line every
//! ten seconds, so cron mail and CI logs stay short. A watcher logs a line
//! per batch instead (a JSON object per line with `--json`), for a service's
//! journal.

use super::report::Tally;
use crate::config::{Config, Mode};
use crate::db::target::Target;
use crate::db::Db;
use crate::output;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A progress bar on a terminal for backfill; elsewhere a log line every ten seconds.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    log_every: Option<Duration>,
    last: Mutex<Instant>,
    /// `watch`: a line per batch; `Some(true)` as JSON.
    per_batch: Option<bool>,
}

/// What one batch did, for its log line.
pub struct BatchLine {
    pub embedded: u64,
    pub failed: u64,
    pub changed: u64,
    pub requests: u64,
    pub tokens: u64,
    pub ms: u64,
}

impl Progress {
    pub fn new(cfg: &Config, db: &mut Db, target: &Target) -> Progress {
        let backfill = cfg.mode == Mode::Backfill;
        let mut p = Progress {
            bar: None,
            log_every: None,
            last: Mutex::new(Instant::now()),
            per_batch: (cfg.mode == Mode::Watch).then_some(cfg.json),
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

    /// `rows` more rows are done; `t` is the run's tally after them.
    pub fn advance(&self, rows: u64, failed_now: bool, t: &Tally) {
        if let Some(bar) = &self.bar {
            bar.inc(rows);
            if failed_now {
                bar.set_message(format!("{} failed", t.failed));
            }
        } else if let Some(every) = self.log_every {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= every {
                *last = Instant::now();
                crate::info!(
                    "{} embedded, {} failed so far ({} requests, {} tokens)",
                    t.embedded,
                    t.failed,
                    t.stats.requests,
                    t.tokens
                );
            }
        }
    }

    /// A watcher's line for one batch (nothing for other commands).
    pub fn batch(&self, table: &str, b: &BatchLine) {
        match self.per_batch {
            None => {}
            Some(true) => output::log_json(
                &serde_json::json!({
                    "event": "batch",
                    "table": table,
                    "embedded": b.embedded,
                    "failed": b.failed,
                    "changed": b.changed,
                    "requests": b.requests,
                    "tokens": b.tokens,
                    "ms": b.ms,
                })
                .to_string(),
            ),
            Some(false) => crate::info!(
                "batch: {} embedded, {} failed, {} changed meanwhile ({} requests, {} tokens, {} ms)",
                b.embedded,
                b.failed,
                b.changed,
                b.requests,
                b.tokens,
                b.ms
            ),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
