//! The provider's batch jobs this table has in flight (`<state>.batch_jobs`).
//!
//! A job's life in this table, every step its own short transaction:
//! 1. the intent: its rows are claimed (one claim row, held for a day and
//!    more, by no backend) and the intent is inserted beside it, naming the
//!    submitting backend and the time by which the job must be created;
//! 2. its rows, their text hashes and which request (`custom_id`) each is
//!    in, recorded before the job is created (a crash after creating it
//!    must leave all that is needed to collect it); the claim shrinks to
//!    exactly those rows;
//! 3. the job's id, once the provider created it; an intent whose
//!    submitter is gone without recording one is looked for at the
//!    provider by its id in the job's metadata and adopted, or dropped
//!    (its claim with it) when the provider has no such job;
//! 4. collecting: one run at a time (a lease on the record) writes the
//!    vectors with the same compare-and-set as any batch, then the record
//!    and its claim go, and rows that got nothing are pending again.

use super::claims::{ClaimId, Claimed};
use super::sql::Params;
use super::target::Target;
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
    pub inputs: Vec<i32>,
    /// Tokens of the requests, as counted before they were sent.
    pub tokens: i64,
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
    pub claim: ClaimId,
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

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Target {
    /// Record the intent of a job on the rows `claim` holds (in the
    /// claim's transaction): it must be created within `submit_for`.
    pub fn begin_intent(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        claim: ClaimId,
        model: &str,
        reembed: bool,
        submit_for: Duration,
    ) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "INSERT INTO {state}.batch_jobs (intent_id, table_name, claim_id, model, reembed, \
               submitter_pid, submitter_start, submit_by) \
             SELECT {intent}, {key}, {claim}, {model}, {reembed}, pg_backend_pid(), \
               (SELECT a.backend_start FROM pg_stat_get_activity(pg_backend_pid()) a), \
               now() + {ms} * interval '1 millisecond'",
            state = self.sql.state,
            intent = p.bind(&intent, Type::TEXT),
            key = p.bind(&self.key, Type::TEXT),
            claim = p.bind_owned(claim.0, Type::INT8),
            model = p.bind(&model, Type::TEXT),
            reembed = p.bind_owned(reembed, Type::BOOL),
            ms = p.bind_owned(millis(submit_for), Type::INT8),
        );
        p.execute(c, &sql).map(|_| ())
    }

    /// Record the job's rows, before it is created; its claim then holds
    /// exactly them, and `submit_for` more time is given. False when the
    /// intent is gone (another run found its submitter dead): send nothing.
    pub fn record_rows(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        rows: &JobRows,
        submit_for: Duration,
    ) -> Result<bool, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "WITH j AS (UPDATE {state}.batch_jobs SET row_ids = {ids}, text_hashes = {hashes}, \
               inputs = {inputs}, tokens = {tokens}, submit_by = now() + {ms} * interval '1 millisecond' \
               WHERE intent_id = {intent} AND job_id IS NULL RETURNING claim_id), \
             c AS (UPDATE {state}.claims c SET row_ids = {ids}, first_id = {ids}[1], \
               last_id = {ids}[cardinality({ids})] FROM j WHERE c.claim_id = j.claim_id RETURNING 1) \
             SELECT count(*) FROM c",
            state = self.sql.state,
            ids = p.bind(&rows.ids, Type::TEXT_ARRAY),
            hashes = p.bind(&rows.hashes, Type::INT8_ARRAY),
            inputs = p.bind(&rows.inputs, Type::INT4_ARRAY),
            tokens = p.bind_owned(rows.tokens, Type::INT8),
            ms = p.bind_owned(millis(submit_for), Type::INT8),
            intent = p.bind(&intent, Type::TEXT),
        );
        Ok(p.query(c, &sql)?
            .first()
            .is_some_and(|r| r.get::<_, i64>(0) == 1))
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
            "UPDATE {state}.batch_jobs SET input_file_id = {file}, \
               submit_by = now() + {ms} * interval '1 millisecond' \
             WHERE intent_id = {intent} AND job_id IS NULL",
            state = self.sql.state,
            file = p.bind(&file_id, Type::TEXT),
            ms = p.bind_owned(millis(submit_for), Type::INT8),
            intent = p.bind(&intent, Type::TEXT),
        );
        Ok(p.execute(c, &sql)? == 1)
    }

    /// The provider created job `job_id` for `intent`: record it, and hold
    /// its rows for `hold` (no backend: they outlive the run). False when
    /// the intent is gone: the job must be cancelled.
    pub fn record_job(
        &self,
        c: &mut impl GenericClient,
        intent: &str,
        job_id: &str,
        hold: Duration,
    ) -> Result<bool, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "WITH j AS (UPDATE {state}.batch_jobs SET job_id = {job}, submitted_at = now() \
               WHERE intent_id = {intent} AND (job_id IS NULL OR job_id = {job}) RETURNING claim_id), \
             c AS (UPDATE {state}.claims c SET expires_at = now() + {ms} * interval '1 millisecond', \
               backend_pid = NULL, backend_start = NULL FROM j WHERE c.claim_id = j.claim_id RETURNING 1) \
             SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM c)",
            state = self.sql.state,
            job = p.bind(&job_id, Type::TEXT),
            intent = p.bind(&intent, Type::TEXT),
            ms = p.bind_owned(millis(hold), Type::INT8),
        );
        Ok(p.query(c, &sql)?
            .first()
            .is_some_and(|r| r.get::<_, i64>(0) == 1))
    }

    /// Keep the rows of a job still in flight held for `hold` from now.
    pub fn hold_job(
        &self,
        c: &mut impl GenericClient,
        claim: ClaimId,
        hold: Duration,
    ) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.claims SET expires_at = greatest(expires_at, now() + {ms} * interval '1 millisecond') \
             WHERE claim_id = {claim}",
            state = self.sql.state,
            ms = p.bind_owned(millis(hold), Type::INT8),
            claim = p.bind_owned(claim.0, Type::INT8),
        );
        p.execute(c, &sql).map(|_| ())
    }

    /// The batch jobs of this table, oldest first.
    pub fn batch_jobs(
        &self,
        c: &mut impl GenericClient,
    ) -> Result<Vec<JobRecord>, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "SELECT j.intent_id, j.job_id, j.input_file_id, j.model, j.claim_id, \
               cardinality(j.row_ids)::bigint, j.tokens, extract(epoch FROM j.created_at)::bigint, \
               extract(epoch FROM now() - j.created_at)::bigint, \
               j.job_id IS NULL AND (j.submit_by < now() OR NOT EXISTS (\
                 SELECT 1 FROM pg_stat_get_activity(j.submitter_pid) a \
                 WHERE a.backend_start IS NULL OR a.backend_start = j.submitter_start)) \
             FROM {state}.batch_jobs j WHERE j.table_name = {key} ORDER BY j.created_at, j.intent_id",
            state = self.sql.state,
            key = p.bind(&self.key, Type::TEXT),
        );
        Ok(p.query(c, &sql)?
            .into_iter()
            .map(|r| JobRecord {
                intent: r.get(0),
                job_id: r.get(1),
                input_file_id: r.get(2),
                model: r.get(3),
                claim: ClaimId(r.get(4)),
                rows: r.get(5),
                tokens: r.get(6),
                created_at: r.get(7),
                age_secs: r.get(8),
                abandoned: r.get(9),
            })
            .collect())
    }

    /// The jobs of this table added up; nothing when the table is not
    /// there yet (a state schema older than batch jobs).
    pub fn in_flight(&self, c: &mut impl GenericClient) -> Result<InFlight, postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "SELECT count(*), coalesce(sum(cardinality(row_ids)), 0)::bigint, \
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
        let mut p = Params::default();
        let sql = format!(
            "UPDATE {state}.batch_jobs SET collecting_until = now() + {ms} * interval '1 millisecond' \
             WHERE intent_id = {intent} AND (collecting_until IS NULL OR collecting_until < now()) \
             RETURNING row_ids, text_hashes, inputs, tokens, reembed",
            state = self.sql.state,
            ms = p.bind_owned(millis(lease), Type::INT8),
            intent = p.bind(&intent, Type::TEXT),
        );
        Ok(p.query(c, &sql)?.first().map(|r| JobRows {
            ids: r.get(0),
            hashes: r.get(1),
            inputs: r.get(2),
            tokens: r.get(3),
            reembed: r.get(4),
        }))
    }

    /// The job of `intent` is done with (collected, or never created): its
    /// record and its claim go, and the rows that got nothing are pending.
    pub fn end_job(&self, c: &mut impl GenericClient, intent: &str) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = format!(
            "WITH j AS (DELETE FROM {state}.batch_jobs WHERE intent_id = {intent} RETURNING claim_id) \
             DELETE FROM {state}.claims c USING j WHERE c.claim_id = j.claim_id",
            state = self.sql.state,
            intent = p.bind(&intent, Type::TEXT),
        );
        p.execute(c, &sql).map(|_| ())
    }
}
