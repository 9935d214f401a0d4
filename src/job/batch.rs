//! One batch, after its claim: plan it (its rows, or their chunks), send
//! its texts, write what came back, release its claims. No transaction is
//! open while the provider works.

use super::plan::{BatchPlan, Planner};
use super::send::{Halt, Hold, Sender};
use super::units::{chunk_of, PlanRow, Unit};
use crate::config::Config;
use crate::db::chunks::{ChunkOut, ChunkVector, ChunkWrite};
use crate::db::claims::{ClaimId, Claimed, Holder, Lease};
use crate::db::model_records::Models;
use crate::db::target::Target;
use crate::db::writes::BatchWrite;
use crate::db::Db;
use crate::error::{Error, Result};
use std::time::{Duration, Instant};

/// What every batch of a run shares.
pub struct Context<'a> {
    pub cfg: &'a Config,
    pub target: &'a Target,
    pub models: &'a Models,
    pub planner: Planner,
}

/// A batch taken: its rows, with their texts.
pub struct Claim {
    pub seq: u64,
    pub rows: Vec<Claimed>,
    /// The claim record that holds them.
    pub claim: ClaimId,
    /// Whether more candidates follow this batch.
    pub more: bool,
    /// Taken no earlier than this (the claims expire a lease after it).
    pub claimed_at: Instant,
}

/// A worker's own connection, claim holder and way to the provider.
pub struct Worker<'a> {
    pub db: &'a mut Db,
    pub holder: Holder,
    pub sender: Sender<'a>,
}

/// What one batch did.
pub struct BatchOutcome {
    /// Rows sent cut to the model's input limit.
    pub truncated: u64,
    pub written: u64,
    /// Chunks written, with a chunks table.
    pub chunks: u64,
    pub changed: u64,
    pub failed: u64,
    /// Why the run must stop after this batch, if it must.
    pub halt: Option<Halt>,
    /// A budget cut this batch short.
    pub budget: Option<super::report::StopReason>,
}

/// Plan, send, write and release one claimed batch.
pub fn process(ctx: &Context<'_>, w: &mut Worker<'_>, claim: Claim) -> Result<BatchOutcome> {
    let Claim {
        seq,
        rows,
        claim,
        claimed_at,
        ..
    } = claim;
    let units = ctx.planner.units(&rows);
    let plan = ctx.planner.plan(seq, &units);
    // Whatever happens below, later batches waiting on this one go on.
    let mut settle = Settle {
        ctx,
        seq,
        written: Vec::new(),
    };
    // Rows a budget cut stay in the claim until its write ends it: the
    // run stops after this batch.
    let kept = &units[..plan.cut];

    let mut vectors: Vec<(usize, Vec<f32>)> = Vec::with_capacity(plan.send.len());
    let mut rejected: Vec<(usize, String)> = plan.too_long.clone();
    let halt = {
        let mut hold = Claims {
            db: &mut *w.db,
            target: ctx.target,
            claim,
            lease: Lease {
                holder: &w.holder,
                length: ctx.cfg.claim_lease,
                direct: false,
            },
            rows: kept.iter().map(|u| rows[u.row].id.as_str()).collect(),
            expires: claimed_at + ctx.cfg.claim_lease,
            request_timeout: ctx.cfg.provider.request_timeout,
        };
        hold.lease.direct = hold.db.direct;
        w.sender
            .embed(&plan.send, &mut hold, &mut vectors, &mut rejected)
            .err()
    };
    if halt.is_none() {
        ctx.planner.wait_for(&plan.wait_for);
    }
    let copy = halt.is_none();
    let (written, sent, failures, chunks) = if ctx.target.chunks.is_some() {
        let batch = chunk_rows(&plan, &rows, kept, vectors, rejected, copy, claim);
        let written = ctx.target.write_chunks(w.db, &batch, ctx.models)?;
        let chunks = batch
            .rows
            .iter()
            .filter(|(r, _)| written.contains(&r.id))
            .map(|(_, c)| c.len() as u64)
            .sum();
        (written, batch.rows.len(), batch.failures, chunks)
    } else {
        // One unit a row: unit `i` is row `i`.
        let batch = outcome_rows(
            &plan,
            &rows,
            vectors,
            rejected,
            copy,
            ctx.target.half,
            claim,
        );
        let written =
            ctx.target
                .write_batch(w.db, &batch, ctx.models, ctx.cfg.reembed.is_some())?;
        let sent = batch.vector_count() + batch.copies.len();
        (written, sent, batch.failures, 0)
    };
    for (row, err) in &failures {
        crate::warn!("row {} failed: {err}", row.id);
    }
    let outcome = BatchOutcome {
        truncated: plan.truncated,
        written: written.len() as u64,
        chunks,
        changed: (sent - written.len()) as u64,
        failed: failures.len() as u64,
        halt,
        budget: plan.stop,
    };
    crate::debug!(
        "batch of {}: {} written, {} changed meanwhile, {} failed",
        kept.len(),
        outcome.written,
        outcome.changed,
        outcome.failed
    );
    // The plan copies from the units of the rows that were written.
    let written: std::collections::HashSet<&str> = written.iter().map(String::as_str).collect();
    settle.written = kept
        .iter()
        .filter(|u| written.contains(rows[u.row].id.as_str()))
        .map(|u| u.id().to_string())
        .collect();
    Ok(outcome)
}

/// The rows of a chunked write: a row goes when every one of its chunks
/// has a vector (sent, shared with a chunk of the batch, or copied unless
/// the batch stopped); a row one of whose chunks was rejected fails, the
/// chunk named; the rest (a batch that stopped) stay pending.
fn chunk_rows<'r>(
    plan: &BatchPlan,
    rows: &'r [Claimed],
    units: &[Unit<'r>],
    vectors: Vec<(usize, Vec<f32>)>,
    rejected: Vec<(usize, String)>,
    copy: bool,
    claim: ClaimId,
) -> ChunkWrite<'r> {
    let mut got: Vec<Option<ChunkVector>> = units.iter().map(|_| None).collect();
    for (i, v) in vectors {
        for &j in plan.same_text.get(&i).into_iter().flatten() {
            got[j] = Some(ChunkVector::Sent(v.clone()));
        }
        got[i] = Some(ChunkVector::Sent(v));
    }
    if copy {
        for (i, from) in &plan.copy {
            if let Some((chunk, row)) = chunk_of(from) {
                got[*i] = Some(ChunkVector::Copy {
                    row: row.to_string(),
                    chunk,
                });
            }
        }
    }
    let mut why: std::collections::BTreeMap<usize, String> = Default::default();
    for (i, e) in rejected {
        let same = plan.same_text.get(&i).into_iter().flatten().copied();
        for j in same.chain([i]) {
            let u = &units[j];
            why.entry(u.row)
                .or_insert_with(|| format!("chunk {}: {e}", u.chunk.unwrap_or(0)));
        }
    }
    let mut write = ChunkWrite {
        rows: Vec::new(),
        failures: Vec::new(),
        release: claim,
    };
    let mut start = 0;
    while start < units.len() {
        let row = units[start].row;
        let end = start + units[start..].iter().take_while(|u| u.row == row).count();
        if let Some(e) = why.remove(&row) {
            write.failures.push((&rows[row], e));
        } else if got[start..end].iter().all(Option::is_some) {
            let parts = (start..end)
                .filter_map(|j| {
                    let vector = got[j].take()?;
                    Some(ChunkOut {
                        text: units[j].text,
                        vector,
                    })
                })
                .collect();
            write.rows.push((&rows[row], parts));
        }
        start = end;
    }
    write
}

/// The rows of the write: vectors and failures repeated for the rows that
/// shared a text, copies (unless the batch stopped), and the batch's
/// claim ended.
fn outcome_rows<'r>(
    plan: &BatchPlan,
    rows: &'r [Claimed],
    vectors: Vec<(usize, Vec<f32>)>,
    rejected: Vec<(usize, String)>,
    copy: bool,
    half: bool,
    claim: ClaimId,
) -> BatchWrite<'r> {
    let shared = |i: usize| plan.same_text.get(&i).map(Vec::as_slice).unwrap_or(&[]);
    let failures = rejected
        .into_iter()
        .flat_map(|(i, e)| {
            let mut out: Vec<(&'r Claimed, String)> =
                shared(i).iter().map(|&j| (&rows[j], e.clone())).collect();
            out.push((&rows[i], e));
            out
        })
        .collect();
    let copies = if copy {
        plan.copy
            .iter()
            .map(|(i, from)| (&rows[*i], from.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let mut batch = BatchWrite::new(copies, failures, Some(claim), half);
    for (i, v) in vectors {
        for &j in shared(i) {
            batch.push_vector(&rows[j], v.clone());
        }
        batch.push_vector(&rows[i], v);
    }
    batch
}

/// Marks the batch settled in the plan when it goes out of scope.
struct Settle<'p, 'a> {
    ctx: &'p Context<'a>,
    seq: u64,
    written: Vec<String>,
}

impl Drop for Settle<'_, '_> {
    fn drop(&mut self) {
        let written: Vec<&str> = self.written.iter().map(String::as_str).collect();
        self.ctx.planner.settle(self.seq, &written);
    }
}

/// The claims of a batch being sent.
struct Claims<'a, 'r> {
    db: &'a mut Db,
    target: &'a Target,
    claim: ClaimId,
    lease: Lease<'a>,
    /// The row id of each unit of the batch.
    rows: Vec<&'r str>,
    /// When the claims expire, at the latest (measured from before the claim).
    expires: Instant,
    request_timeout: Duration,
}

/// Time for the write after a reply, within the lease.
const WRITE_MARGIN: Duration = Duration::from_secs(1);

impl Hold for Claims<'_, '_> {
    fn send_by(&self) -> Instant {
        self.expires
            .checked_sub(self.request_timeout + WRITE_MARGIN)
            .unwrap_or(self.expires)
    }

    fn confirm(&mut self, rows: &[usize]) -> std::result::Result<Vec<usize>, Error> {
        let asked = Instant::now();
        self.db.reconnect_if_closed()?;
        let (target, lease, claim) = (self.target, self.lease, self.claim);
        let held: std::collections::HashSet<String> = self
            .db
            .in_transaction(|tx| target.confirm(tx, claim, lease))?
            .into_iter()
            .collect();
        self.expires = asked + self.lease.length;
        Ok(rows
            .iter()
            .copied()
            .filter(|&i| held.contains(self.rows[i]))
            .collect())
    }
}
