//! Submitting: pending rows taken for a job until it is collected,
//! planned like any batch, written to a JSONL file on disk within the
//! provider's limits, their ids and text hashes recorded, the file
//! uploaded and the job created on it. A create is sent once: a failure
//! that may have made the job leaves the intent for the next run to look for.

use super::{provider_error, spool, Run, SUBMIT_FOR};
use crate::db::batch_jobs::{Intent, JobRows};
use crate::db::writes::BatchWrite;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::job::plan::{Planner, EARLIER_TEXTS};
use crate::job::report::StopReason;
use crate::provider::batch_api::{MAX_FILE_BYTES, MAX_JOB_REQUESTS};
use crate::provider::ProviderError;
use crate::random;
use crate::signals::Stop;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::time::Instant;

impl Run<'_> {
    /// Submit pending rows as new jobs until a budget, the time or the
    /// rows run out.
    pub(super) fn submit(
        &mut self,
        db: &mut Db,
        planner: &Planner,
        started: Instant,
        stop: &Stop,
    ) -> Result<StopReason> {
        let deadline = self.cfg.budget.max_seconds.map(|d| started + d);
        let mut seq = 0u64;
        let mut cursor = None;
        loop {
            if stop.requested() {
                return Ok(StopReason::Signal);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(StopReason::MaxSeconds);
            }
            let limit = match planner.claim_up_to(MAX_JOB_REQUESTS) {
                Ok(n) => n,
                Err(reason) => return Ok(reason),
            };
            match self.submit_job(db, planner, limit, &mut seq, &mut cursor)? {
                Submitted::Nothing => return Ok(StopReason::Drained),
                Submitted::Job { stop: Some(reason) } => return Ok(reason),
                Submitted::Job { stop: None } => {}
            }
        }
    }

    /// Claim up to `limit` rows and send them as one job.
    fn submit_job(
        &mut self,
        db: &mut Db,
        planner: &Planner,
        limit: usize,
        seq: &mut u64,
        cursor: &mut Option<String>,
    ) -> Result<Submitted> {
        let intent = format!("{:016x}{:016x}", random::u64(), random::u64());
        let sel = self.selection();
        let target = self.target;
        let job = Intent {
            id: &intent,
            model: &self.cfg.provider.model,
            reembed: self.cfg.reembed.is_some(),
            submit_for: SUBMIT_FOR,
        };
        let mut tx = db.begin()?;
        let ids = target.take_for_job(&mut tx, job, cursor.as_deref(), limit, &sel)?;
        if ids.is_empty() {
            tx.rollback()?;
            return Ok(Submitted::Nothing);
        }
        tx.commit()?;
        planner.took(ids.len());
        let spool = spool()?;
        let built = self.build_file(db, planner, &intent, &ids, seq, spool.as_file());
        let (built, stop) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = target.end_job(db.client(), &intent);
                return Err(e);
            }
        };
        // The next job starts after the last row this one looked at: rows
        // the file had no room for go in it.
        if built.through.is_some() {
            cursor.clone_from(&built.through);
        }
        if built.rows == 0 {
            target.end_job(db.client(), &intent)?;
            return Ok(Submitted::Job { stop });
        }
        if !target.seal_job(db.client(), &intent, built.tokens, SUBMIT_FOR)? {
            return Ok(Submitted::Job { stop });
        }
        let uploaded = self.api.upload(spool.path());
        let file = match self.call(uploaded) {
            Ok(f) => f,
            Err(e) => {
                // No job can exist without its file.
                target.end_job(db.client(), &intent)?;
                return Err(e);
            }
        };
        if !target.record_file(db.client(), &intent, &file, SUBMIT_FOR)? {
            let _ = self.api.delete_file(&file);
            return Ok(Submitted::Job { stop });
        }
        let created = self.api.create(&file, &intent, &target.key);
        self.tally.requests += 1;
        let job = match created {
            Ok(job) => job,
            Err(e @ ProviderError::Rejected { .. }) => {
                // Refused outright: there is no job.
                target.end_job(db.client(), &intent)?;
                let _ = self.api.delete_file(&file);
                return Err(provider_error(e));
            }
            // The job may exist: the next run looks for it by its intent.
            Err(e) => return Err(provider_error(e)),
        };
        if !target.record_job(db.client(), &intent, &job.id)? {
            crate::warn!("batch job {} was dropped meanwhile; cancelling it", job.id);
            let _ = self.api.cancel(&job.id);
            return Ok(Submitted::Job { stop });
        }
        crate::info!(
            "submitted batch job {} with {} rows ({} requests, {} tokens)",
            job.id,
            built.rows,
            built.requests,
            built.tokens
        );
        self.tally.submitted += built.rows;
        Ok(Submitted::Job { stop })
    }

    /// Read the rows taken a page at a time, plan them, and write their
    /// requests to `file`; the job's rows, and why submitting stops after
    /// it. Rows the file has no room for are left out (let go when the
    /// job's rows are recorded), and taken by the next job.
    fn build_file(
        &mut self,
        db: &mut Db,
        planner: &Planner,
        intent: &str,
        ids: &[String],
        seq: &mut u64,
        file: &std::fs::File,
    ) -> Result<(Built, Option<StopReason>)> {
        let io = |e: std::io::Error| {
            Error::Config(format!("cannot write a temporary file (TMPDIR): {e}"))
        };
        let sel = self.selection();
        let sel = &sel;
        let mut out = BufWriter::new(file);
        let mut built = Built::default();
        let mut bytes = 0u64;
        // The request of rows whose text was sent, for the rows that copy
        // it: as many as the plan remembers texts to copy.
        let mut request_of: HashMap<String, i32> = HashMap::new();
        // Rows in the file whose request is not recorded yet.
        let mut unrecorded = JobRows::default();
        let first_seq = *seq;
        let mut stop = None;
        // Ids whose rows were read (or given back): the others are given back after.
        let mut looked_at = 0;
        for page in ids.chunks(self.cfg.budget.batch_size.max(1)) {
            looked_at += page.len();
            let rows = self.target.read(db.client(), page, sel)?;
            planner.gave_back(page.len() - rows.len());
            let units = planner.units(&rows);
            let plan = planner.plan(*seq, &units);
            *seq += 1;
            let mut lines = Vec::with_capacity(plan.send.len());
            let mut page_bytes = 0u64;
            for item in &plan.send {
                let line = self.api.line(
                    &(built.requests as usize + lines.len()).to_string(),
                    &item.text,
                );
                page_bytes += line.len() as u64 + 1;
                lines.push(line);
            }
            if bytes + page_bytes > MAX_FILE_BYTES {
                // The file is full: this page and the rest go in the next job.
                planner.gave_back(rows.len());
                break;
            }
            for line in &lines {
                out.write_all(line.as_bytes()).map_err(io)?;
                out.write_all(b"\n").map_err(io)?;
            }
            built.through = page.last().cloned();
            bytes += page_bytes;
            let mut request = vec![None; rows.len()];
            for (n, item) in plan.send.iter().enumerate() {
                let k = built.requests + n as i32;
                request[item.row] = Some(k);
                if request_of.len() < EARLIER_TEXTS {
                    request_of.insert(rows[item.row].id.clone(), k);
                }
                for &j in plan.same_text.get(&item.row).into_iter().flatten() {
                    request[j] = Some(k);
                }
                built.tokens += item.tokens.unwrap_or(0) as i64;
            }
            built.requests += plan.send.len() as i32;
            for (i, from) in &plan.copy {
                request[*i] = request_of.get(from).copied();
            }
            self.tally.truncated += plan.truncated;
            for (i, row) in rows.iter().enumerate().take(plan.cut) {
                if let Some(k) = request[i] {
                    unrecorded.ids.push(row.id.clone());
                    unrecorded.hashes.push(row.text_hash);
                    unrecorded.requests.push(k);
                    built.rows += 1;
                }
            }
            if unrecorded.ids.len() >= RECORD_EVERY {
                self.target.record_page(db.client(), intent, &unrecorded)?;
                unrecorded = JobRows::default();
            }
            if !plan.too_long.is_empty() {
                let failed = plan
                    .too_long
                    .iter()
                    .map(|(i, e)| (&rows[*i], e.clone()))
                    .collect();
                let write = BatchWrite::new(Vec::new(), failed, None, self.target.half);
                self.target.write_batch(db, &write, self.models, false)?;
                self.tally.failed += plan.too_long.len() as u64;
            }
            if plan.stop.is_some() {
                stop = plan.stop;
                break;
            }
        }
        out.flush().map_err(io)?;
        self.target.record_page(db.client(), intent, &unrecorded)?;
        planner.gave_back(ids.len() - looked_at);
        // Texts identical to one of this job are sent again by a later job.
        for s in first_seq..*seq {
            planner.settle(s, &[]);
        }
        Ok((built, stop))
    }
}

/// What a job's file holds.
#[derive(Debug, Default)]
struct Built {
    rows: u64,
    requests: i32,
    tokens: i64,
    /// The last id of the last page in the file.
    through: Option<String>,
}

/// Rows whose request is recorded in one statement: few enough that
/// memory stays flat, many enough that a job takes a few statements.
const RECORD_EVERY: usize = 5_000;

/// What one submission did.
enum Submitted {
    /// No pending row was left to claim.
    Nothing,
    /// A job was sent (or its rows all failed or were cut); a budget may stop the run.
    Job { stop: Option<StopReason> },
}
