//! The provider's batch jobs this table has in flight (`<state>.batch_jobs`)
//! and the rows each holds (`<state>.batch_rows`, one row each, so that a
//! claim or a probe finds a held row by its key however big the job).
//!
//! A job's life in these tables, every step its own short transaction:
//! 1. the intent and its rows: under the table's claim lock (the one every
//!    claim takes), the intent is inserted, naming the submitting backend
//!    and the time by which the job must be created, and the first pending
//!    rows no claim and no job holds are taken for it;
//! 2. for each row, the hash of the text read and the request (`custom_id`)
//!    it went in, recorded a page at a time before the job is created (a
//!    crash after creating it must leave all that collecting needs); then
//!    the rows left out of the file are let go;
//! 3. the job's id, once the provider created it; an intent whose
//!    submitter is gone without recording one is looked for at the
//!    provider by its id in the job's metadata and adopted, or dropped
//!    (its rows with it) when the provider has no such job;
//! 4. collecting: one run at a time (a lease on the record) writes the
//!    vectors with the same compare-and-set as any batch, then the record
//!    goes, its rows with it (`ON DELETE CASCADE`), and rows that got
//!    nothing are pending again.

use super::claims::Claimed;
use super::sql::{backend_gone, Params, BACKEND_START};
use super::target::{Selection, Target};
use crate::error::Result;
use postgres::types::Type;
use postgres::GenericClient;
use std::time::Duration;

/// What a job's rows are: ids, text hashes and the request each is in.
#[derive(Debug, Default)]
pub struct JobRows {
    pub ids: Vec<String>,
    pub hashes: Vec<i64>,
    /// The request (`custom_id`) each row's text went in; rows with the
    /// same text share one.
    pub requests: Vec<i32>,
    /// `backfill --reembed`: the vectors replace those the rows have.
    pub reembed: bool,
}

impl JobRows {
    /// The rows as a write takes them (their texts are not needed).
    pub fn claimed(&self) -> Vec<Claimed> {
        self.ids
            .iter()
            .zip(&self.hashes)
            .map(|(id, &text_hash)| Claimed {
                id: id.clone(),
                text: String::new(),
                text_hash,
            })
            .collect()
    }
}

/// One record of `<state>.batch_jobs`.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub intent: String,
    pub job_id: Option<String>,
    pub input_file_id: Option<String>,
    pub model: String,
    pub rows: i64,
    pub tokens: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Seconds since the intent was made.
    pub age_secs: i64,
    /// No job recorded, and the submitter is gone or out of time.
    pub abandoned: bool,
}

/// The batch jobs of a table, added up (for `verify`, budgets and reports).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct InFlight {
    pub jobs: i64,
    pub rows: i64,
    pub tokens: i64,
    /// Seconds since the oldest was submitted.
    pub oldest_secs: Option<i64>,
}

/// What a new job is, before its rows are taken.
#[derive(Debug, Clone, Copy)]
pub struct Intent<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub reembed: bool,
    /// How long the submitter has to create the job.
    pub submit_for: Duration,
}

impl Target {
    /// The intent of a job and up to `limit` selected rows after `cursor`,
    /// in id order, taken for it; their ids. The caller commits (nothing
    /// taken: it rolls back).
    pub fn take_for_job(
        &self,
        c: &mut impl GenericClient,
        intent: Intent<'_>,
        cursor: Option<&str>,
        limit: usize,
        sel: &Selection<'_>,
    ) -> Result<Vec<String>> {
        c.batch_execute(&self.claims_lock())?;
        let q = &self.sql;
        let mut p = Params::default();
        let sql = format!(
            "INSERT INTO {state}.batch_jobs (intent_id, table_name, model, reembed, \
               submitter_pid, submitter_start, submit_by) \
             SELECT {id}, {key}, {model}, {reembed}, pg_backend_pid(), {BACKEND_START}, {by}",
            state = q.state,
            id = p.bind(&intent.id, Type::TEXT),
            key = p.bind(&self.key, Type::TEXT),
            model = p.bind(&intent.model, Type::TEXT),
            reembed = p.bind_owned(intent.reembed, Type::BOOL),
            by = p.bind_later(intent.submit_for),
        );
        p.execute(c, &sql)?;
        let mut p = Params::default();
        let (key, candidates) = self.candidates(sel, &cursor, &mut p);
        let sql = format!(
            "WITH pick AS (SELECT t.{id} AS k, t.{id}::text AS id FROM {table} t \
               WHERE {candidates} ORDER BY t.{id} LIMIT {n}), \
             taken AS (INSERT INTO {state}.batch_rows (table_name, row_id, intent_id) \
               SELECT {key}, id, {intent} FROM pick) \
             SELECT id FROM pick ORDER BY k",
            id = q.id,
            table = q.table,
            state = q.state,
            n = p.bind_owned(limit as i64, Type::INT8),
            intent = p.bind(&intent.id, Type::TEXT),
        );
        Ok(p.query(c, &sql)?.into_iter().map(|r| r.get(0)).collect())
    }

    /// Record, for a page of the job's rows, the hash of the text sent and
    /// the request it went in (before the job is created).
    pub fn record_page(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        rows: &JobRows,
    ) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_rows b SET text_hash = v.h, request = v.r \
             FROM unnest({ids}, {hashes}, {requests}) AS v(id, h, r) \
             WHERE b.table_name = {key} AND b.row_id = v.id AND b.intent_id = {job}",
            state = self.sql.state,
            ids = p.bind(&rows.ids, Type::TEXT_ARRAY),
            hashes = p.bind(&rows.hashes, Type::INT8_ARRAY),
            requests = p.bind(&rows.requests, Type::INT4_ARRAY),
            key = p.bind(&self.key, Type::TEXT),
            job = p.bind(&intent, Type::TEXT),
        );
        p.execute(c, &sql).map(|_| ())
    }

    /// The job's file is written: its tokens recorded, the rows it left
    /// out let go, and `submit_for` more time given. False when the intent
    /// is gone (another run found its submitter dead): send nothing.
    pub fn seal_job(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        tokens: i64,
        submit_for: Duration,
    ) -> Result<bool, postgres::Error> {
        let state = &self.sql.state;
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_jobs SET tokens = {tokens}, submit_by = {by} \
             WHERE intent_id = {intent} AND job_id IS NULL",
            tokens = p.bind_owned(tokens, Type::INT8),
            by = p.bind_later(submit_for),
            intent = p.bind(&intent, Type::TEXT),
        );
        if p.execute(c, &sql)? != 1 {
            return Ok(false);
        }
        let mut p = Params::default();
        let sql = format!(
            "DELETE FROM {state}.batch_rows WHERE intent_id = {} AND request IS NULL",
            p.bind(&intent, Type::TEXT)
        );
        p.execute(c, &sql)?;
        Ok(true)
    }

    /// The input file uploaded for `intent`, and `submit_for` more time to
    /// create the job. False when the intent is gone: create nothing.
    pub fn record_file(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        file_id: &str,
        submit_for: Duration,
    ) -> Result<bool, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_jobs SET input_file_id = {file}, submit_by = {by} \
             WHERE intent_id = {intent} AND job_id IS NULL",
            state = self.sql.state,
            file = p.bind(&file_id, Type::TEXT),
            by = p.bind_later(submit_for),
            intent = p.bind(&intent, Type::TEXT),
        );
        Ok(p.execute(c, &sql)? == 1)
    }

    /// The provider created job `job_id` for `intent`: record it. False
    /// when the intent is gone: the job must be cancelled.
    pub fn record_job(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        job_id: &str,
    ) -> Result<bool, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_jobs SET job_id = {job}, submitted_at = now() \
             WHERE intent_id = {intent} AND (job_id IS NULL OR job_id = {job})",
            state = self.sql.state,
            job = p.bind(&job_id, Type::TEXT),
            intent = p.bind(&intent, Type::TEXT),
        );
        Ok(p.execute(c, &sql)? == 1)
    }

    /// The batch jobs of this table, oldest first.
    pub fn batch_jobs(
        &self,
        c: &mut impl GenericClient,
    ) -> Result<Vec<JobRecord>, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "SELECT j.intent_id, j.job_id, j.input_file_id, j.model, \
               (SELECT count(*) FROM {state}.batch_rows b WHERE b.intent_id = j.intent_id), \
               j.tokens, extract(epoch FROM j.created_at)::bigint, \
               extract(epoch FROM now() - j.created_at)::bigint, \
               j.job_id IS NULL AND (j.submit_by < now() OR {gone}) \
             FROM {state}.batch_jobs j WHERE j.table_name = {key} ORDER BY j.created_at, j.intent_id",
            state = self.sql.state,
            gone = backend_gone("j.submitter_pid", "j.submitter_start"),
            key = p.bind(&self.key, Type::TEXT),
        );
        Ok(p.query(c, &sql)?
            .into_iter()
            .map(|r| JobRecord {
                intent: r.get(0),
                job_id: r.get(1),
                input_file_id: r.get(2),
                model: r.get(3),
                rows: r.get(4),
                tokens: r.get(5),
                created_at: r.get(6),
                age_secs: r.get(7),
                abandoned: r.get(8),
            })
            .collect())
    }

    /// The jobs of this table added up.
    pub fn in_flight(&self, c: &mut impl GenericClient) -> Result<InFlight, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "SELECT count(*), \
               (SELECT count(*) FROM {state}.batch_rows b WHERE b.table_name = {key}), \
               coalesce(sum(tokens), 0)::bigint, \
               extract(epoch FROM now() - min(coalesce(submitted_at, created_at)))::bigint \
             FROM {state}.batch_jobs WHERE table_name = {key}",
            state = self.sql.state,
            key = p.bind(&self.key, Type::TEXT),
        );
        let r = p.query(c, &sql)?;
        Ok(r.first()
            .map(|r| InFlight {
                jobs: r.get(0),
                rows: r.get(1),
                tokens: r.get(2),
                oldest_secs: r.get(3),
            })
            .unwrap_or_default())
    }

    /// Take the job of `intent` for collecting, for `lease`, unless another
    /// run is collecting it; its rows.
    pub fn collect_job(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        lease: Duration,
    ) -> Result<Option<JobRows>, postgres::Error> {
        let state = &self.sql.state;
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_jobs SET collecting_until = {until} \
             WHERE intent_id = {intent} AND (collecting_until IS NULL OR collecting_until < now()) \
             RETURNING reembed",
            until = p.bind_later(lease),
            intent = p.bind(&intent, Type::TEXT),
        );
        let Some(job) = p.query(c, &sql)?.into_iter().next() else {
            return Ok(None);
        };
        let mut rows = JobRows {
            reembed: job.get(0),
            ..JobRows::default()
        };
        let mut p = Params::default();
        let sql = format!(
            "SELECT row_id, text_hash, request FROM {state}.batch_rows \
             WHERE intent_id = {} AND request IS NOT NULL ORDER BY request",
            p.bind(&intent, Type::TEXT)
        );
        for r in p.query(c, &sql)? {
            rows.ids.push(r.get(0));
            rows.hashes.push(r.get(1));
            rows.requests.push(r.get(2));
        }
        Ok(Some(rows))
    }

    /// Give up collecting the job of `intent` (the next run takes it over).
    pub fn stop_collecting(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
    ) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_jobs SET collecting_until = NULL WHERE intent_id = {intent}",
            state = self.sql.state,
            intent = p.bind(&intent, Type::TEXT),
        );
        p.execute(c, &sql).map(|_| ())
    }

    /// The job of `intent` is done with (collected, or never created): its
    /// record goes, its rows with it, and those that got nothing are pending.
    pub fn end_job(&self, c: &mut impl GenericClient, intent: &str) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "DELETE FROM {state}.batch_jobs WHERE intent_id = {intent}",
            state = self.sql.state,
            intent = p.bind(&intent, Type::TEXT),
        );
        p.execute(c, &sql).map(|_| ())
    }
}
