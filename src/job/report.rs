//! What a run reports: the summary line, or one JSON object with `--json`.
//! The keys are part of autoembed's interface; keep them stable.

use crate::provider::RequestStats;
use serde::Serialize;

/// What the workers of a run did, added up as they go.
#[derive(Debug, Default)]
pub struct Tally {
    pub truncated: u64,
    pub embedded: u64,
    pub chunks: u64,
    pub failed: u64,
    pub changed: u64,
    pub stats: RequestStats,
    /// Tokens as the provider reported them.
    pub tokens: u64,
}

/// Why the loop ended. When several reasons meet, the later variant wins
/// (an error over a signal over a budget over `drained`), so `drained`
/// always means that nothing this run could take is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
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
    /// With a chunks table: the chunks those rows were written as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
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
    /// With `--batch-api`: the batch jobs' side of the run.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchApiReport>,
    /// The error may pass by itself ([`crate::error::Error::may_pass`]).
    #[serde(skip)]
    pub may_pass: bool,
    #[serde(skip)]
    pub exit_code: i32,
}

/// What a run with `--batch-api` did with the provider's batch jobs.
#[derive(Debug, Clone, Serialize)]
pub struct BatchApiReport {
    /// Rows sent in the jobs this run created.
    pub submitted: u64,
    /// Rows the jobs that ended brought back, written or not.
    pub collected: u64,
    /// Jobs of this table still at the provider after the run.
    pub jobs_in_flight: i64,
}

/// A run's exit code: its error's, else the signal's, else 1 when rows
/// failed, else 0.
pub fn exit_code(
    error: Option<&crate::error::Error>,
    stop: &crate::signals::Stop,
    failed: u64,
) -> i32 {
    match (error, stop.exit_code()) {
        (Some(e), _) => e.exit_code(),
        (None, Some(code)) => code,
        (None, None) if failed > 0 => 1,
        _ => 0,
    }
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
    /// With a chunks table: the chunks those rows would be written as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    /// Rows that would be sent cut to the model's input limit.
    pub truncated: u64,
    /// Rows over the limit that `--on-too-long skip` would not send.
    pub too_long: u64,
    pub estimated_tokens: u64,
    /// Whether `estimated_tokens` is the provider's own count (cl100k_base).
    pub tokens_exact: bool,
    pub estimated_cost_usd: Option<f64>,
    /// With `--batch-api`: jobs in flight (their rows are not counted again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_in_flight: Option<i64>,
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
                if let Some(n) = r.chunks {
                    s += &format!(" as {n} chunks");
                }
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
                if let Some(b) = &r.batch {
                    s += &format!(
                        "; batch jobs: {} rows submitted, {} collected, {} in flight",
                        b.submitted, b.collected, b.jobs_in_flight
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
                     ({}{} tokens, {cost} with {}{})",
                    r.pending,
                    r.table,
                    r.failed,
                    r.would_embed,
                    if r.tokens_exact { "" } else { "~" },
                    r.estimated_tokens,
                    r.model,
                    if r.jobs_in_flight.is_some() {
                        " at the batch price"
                    } else {
                        ""
                    }
                );
                if let Some(n) = r.chunks {
                    s += &format!("; {n} chunks");
                }
                if r.truncated > 0 {
                    s += &format!("; {} texts cut to the model's limit", r.truncated);
                }
                if r.too_long > 0 {
                    s += &format!("; {} texts too long, skipped", r.too_long);
                }
                if let Some(n) = r.jobs_in_flight {
                    s += &format!("; batch jobs in flight: {n}");
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
