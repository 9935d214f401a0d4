//! Storing a batch's outcome in one short transaction: the vectors (only
//! into rows that still hold the text that was embedded), the copies of
//! vectors written earlier in the run, the rows the provider rejected, and
//! the end of the batch's claim. A deadlock, a serialization failure
//! or a connection lost before the commit is retried (on a new connection
//! if need be): these vectors were paid for.

use super::claims::{end_claim, ClaimId, Claimed};
use super::model_records::Models;
use super::sql::{text_hash, Params};
use super::target::{Quoted, Target};
use super::{is_retryable, Db};
use crate::error::Result;
use pgvector::{HalfVector, Vector};
use postgres::types::Type;
use postgres::Transaction;
use std::collections::HashSet;
use std::time::Duration;

/// A batch's vectors as the column takes them.
#[derive(Debug)]
enum Dense {
    Full(Vec<Vector>),
    Half(Vec<HalfVector>),
}

impl Default for Dense {
    fn default() -> Dense {
        Dense::Full(Vec::new())
    }
}

/// What one batch brings back to the database.
#[derive(Debug, Default)]
pub struct BatchWrite<'a> {
    /// Rows that get a vector of their text ([`BatchWrite::push_vector`]),
    /// and those vectors, in the same order, as the write binds them.
    stored: Vec<&'a Claimed>,
    vectors: Dense,
    /// Rows and the row, written earlier in the run, whose vector they copy.
    pub copies: Vec<(&'a Claimed, String)>,
    /// Rows the provider rejected, and why.
    pub failures: Vec<(&'a Claimed, String)>,
    /// The batch's claim, which ends now.
    pub release: Option<ClaimId>,
}

impl<'a> BatchWrite<'a> {
    /// A write of no vectors yet; [`BatchWrite::push_vector`] adds them.
    /// `half`: the column is `halfvec`.
    pub fn new(
        copies: Vec<(&'a Claimed, String)>,
        failures: Vec<(&'a Claimed, String)>,
        release: Option<ClaimId>,
        half: bool,
    ) -> BatchWrite<'a> {
        BatchWrite {
            copies,
            failures,
            release,
            vectors: if half {
                Dense::Half(Vec::new())
            } else {
                Dense::Full(Vec::new())
            },
            ..BatchWrite::default()
        }
    }

    /// `row` gets `vector`, the vector of its text.
    pub fn push_vector(&mut self, row: &'a Claimed, vector: Vec<f32>) {
        self.stored.push(row);
        match &mut self.vectors {
            Dense::Full(v) => v.push(Vector::from(vector)),
            Dense::Half(v) => v.push(HalfVector::from_f32_slice(&vector)),
        }
    }

    /// How many rows get a vector of their own text.
    pub fn vector_count(&self) -> usize {
        self.stored.len()
    }
}

/// How many tries a write gets before the run gives up on it.
const WRITE_TRIES: u32 = 6;

/// Run `write` (one transaction) until it commits, retrying what may pass:
/// a deadlock, a serialization failure, a lost connection (on a new one).
pub(super) fn with_retries<T>(
    db: &mut Db,
    mut write: impl FnMut(&mut Db) -> Result<T, postgres::Error>,
) -> Result<T> {
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = match db.reconnect_if_closed() {
            Ok(()) => write(db).map_err(|e| (is_retryable(&e), e.into())),
            Err(e) => Err((true, e)),
        };
        match attempt {
            Ok(done) => return Ok(done),
            Err((true, e)) if tries < WRITE_TRIES => {
                let wait = Duration::from_millis(100 << tries);
                crate::warn!(
                    "writing a batch failed ({e}); trying again in {} ms",
                    wait.as_millis()
                );
                std::thread::sleep(wait);
            }
            Err((_, e)) => return Err(e),
        }
    }
}

impl Target {
    /// Write `batch` in one transaction, retrying what may pass; returns
    /// the ids whose vector was written (the others changed meanwhile).
    pub fn write_batch(
        &self,
        db: &mut Db,
        batch: &BatchWrite<'_>,
        models: &Models,
        reembed: bool,
    ) -> Result<Vec<String>> {
        let written = with_retries(db, |db| self.try_write(db, batch, models, reembed))?;
        self.check_reachable(db, batch, &written, reembed)?;
        Ok(written)
    }

    /// A row the write did not store normally changed meanwhile. If one
    /// still holds the text that was embedded, the role's `UPDATE` cannot
    /// reach it (row-level security, a trigger that skips it): such rows
    /// are recorded as failed, so that later runs do not pay for them
    /// again, and the run stops with the fix.
    fn check_reachable(
        &self,
        db: &mut Db,
        batch: &BatchWrite<'_>,
        written: &[String],
        reembed: bool,
    ) -> Result<()> {
        if batch.stored.len() + batch.copies.len() == written.len() {
            return Ok(());
        }
        let written: HashSet<&str> = written.iter().map(String::as_str).collect();
        let unwritten: Vec<&Claimed> = batch
            .stored
            .iter()
            .copied()
            .chain(batch.copies.iter().map(|(c, _)| *c))
            .filter(|c| !written.contains(c.id.as_str()))
            .collect();
        let ids: Vec<&str> = unwritten.iter().map(|c| c.id.as_str()).collect();
        let hashes: Vec<i64> = unwritten.iter().map(|c| c.text_hash).collect();
        let mut p = Params::default();
        let sql = format!(
            "SELECT v.id FROM unnest({}, {}) AS v(id, h) JOIN {table} t ON {holds}",
            p.bind(&ids, Type::TEXT_ARRAY),
            p.bind(&hashes, Type::INT8_ARRAY),
            table = self.sql.table,
            holds = self.still_holds("v", reembed),
        );
        let unreachable: HashSet<String> = p
            .query(db.client(), &sql)?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        if unreachable.is_empty() {
            return Ok(());
        }
        let why = "the role's UPDATE does not reach this row (row-level security, or a trigger)";
        let failed: Vec<(&Claimed, String)> = unwritten
            .into_iter()
            .filter(|c| unreachable.contains(&c.id))
            .map(|c| (c, why.to_string()))
            .collect();
        db.in_transaction(|tx| Ok(self.record_failures(tx, &failed)?))?;
        Err(crate::error::Error::Config(format!(
            "{} rows of {table} took no vector although their text is unchanged: \
             the role's UPDATE does not reach them (row-level security, or a trigger); \
             add an UPDATE policy for this role or connect as one with BYPASSRLS \
             (`autoembed verify` checks the policies); they are recorded as failed",
            failed.len(),
            table = self.sql.table,
        )))
    }

    fn try_write(
        &self,
        db: &mut Db,
        batch: &BatchWrite<'_>,
        models: &Models,
        reembed: bool,
    ) -> Result<Vec<String>, postgres::Error> {
        let mut tx = db.begin()?;
        let mut written = Vec::new();
        // The batch's claim ends in the first statement that stores
        // something (one statement fewer a batch), else on its own.
        let mut release = batch.release;
        if !batch.stored.is_empty() {
            let ids: Vec<&str> = batch.stored.iter().map(|c| c.id.as_str()).collect();
            let hashes: Vec<i64> = batch.stored.iter().map(|c| c.text_hash).collect();
            let mut p = Params::default();
            let source = format!(
                "SELECT * FROM unnest({}, {}, {}) AS v(id, h, e)",
                p.bind(&ids, Type::TEXT_ARRAY),
                p.bind(&hashes, Type::INT8_ARRAY),
                match &batch.vectors {
                    Dense::Full(v) => p.bind(v, self.vector_array()),
                    Dense::Half(v) => p.bind(v, self.vector_array()),
                },
            );
            written.extend(self.store(&mut tx, p, &source, models, reembed, release.take())?);
        }
        if !batch.copies.is_empty() {
            let ids: Vec<&str> = batch.copies.iter().map(|(c, _)| c.id.as_str()).collect();
            let hashes: Vec<i64> = batch.copies.iter().map(|(c, _)| c.text_hash).collect();
            let sources: Vec<&str> = batch.copies.iter().map(|(_, s)| s.as_str()).collect();
            let Quoted {
                table,
                id,
                text,
                embedding,
                id_type,
                ..
            } = &self.sql;
            let mut p = Params::default();
            let source = format!(
                "SELECT c.id, c.h, s.{embedding} AS e FROM unnest({ids}, {hashes}, {sources}) AS c(id, h, src) \
                 JOIN {table} s ON s.{id} = c.src::{id_type} AND {hash} = c.h AND s.{embedding} IS NOT NULL",
                ids = p.bind(&ids, Type::TEXT_ARRAY),
                hashes = p.bind(&hashes, Type::INT8_ARRAY),
                sources = p.bind(&sources, Type::TEXT_ARRAY),
                hash = text_hash(&text.on("s")),
            );
            written.extend(self.store(&mut tx, p, &source, models, reembed, release.take())?);
        }
        self.record_failures(&mut tx, &batch.failures)?;
        if let Some(claim) = release {
            self.end_claim(&mut tx, claim)?;
        }
        tx.commit()?;
        Ok(written)
    }

    /// The compare-and-set: row `t` is the row `id` of `v` names, still
    /// holds the text whose hash `v.h` is, and (unless re-embedding) still
    /// has no vector. The write stores only such rows; a row that is one
    /// and was not stored was out of the write's reach.
    fn still_holds(&self, v: &str, reembed: bool) -> String {
        let Quoted {
            id,
            text,
            embedding,
            id_type,
            ..
        } = &self.sql;
        let still_null = if reembed {
            String::new()
        } else {
            format!(" AND t.{embedding} IS NULL")
        };
        format!(
            "t.{id} = {v}.id::{id_type} AND {} = {v}.h{still_null}",
            text_hash(&text.on("t"))
        )
    }

    /// The one statement that stores vectors: from `source` (`id`, `h` the
    /// hash of the text they are for, `e`) into the rows that still hold
    /// that text, their failures forgotten, their model noted, and the
    /// claim `release` ended.
    fn store<'a>(
        &'a self,
        tx: &mut Transaction<'_>,
        mut p: Params<'a>,
        source: &str,
        models: &'a Models,
        reembed: bool,
        release: Option<ClaimId>,
    ) -> Result<Vec<String>, postgres::Error> {
        let Quoted {
            table,
            id,
            embedding,
            ..
        } = &self.sql;
        let sql = format!(
            "WITH v AS ({source}), \
             upd AS (UPDATE {table} t SET {embedding} = v.e FROM v WHERE {holds} \
                     RETURNING t.{id}::text AS id) \
             {} SELECT id FROM upd",
            self.bookkeeping(&mut p, models, release),
            holds = self.still_holds("v", reembed),
        );
        Ok(p.query(tx, &sql)?.into_iter().map(|r| r.get(0)).collect())
    }

    /// What follows the rows `upd` (`id`, as text) a write stored, in the
    /// same statement: their failures forgotten, their model noted, and the
    /// claim `release` ended.
    pub(super) fn bookkeeping<'a>(
        &'a self,
        p: &mut Params<'a>,
        models: &'a Models,
        release: Option<ClaimId>,
    ) -> String {
        let state = &self.sql.state;
        let key = p.bind(&self.key, Type::TEXT);
        // Rows the baseline model made need no record (and lose an old one);
        // rows another model made are listed.
        let note = match (models.is_baseline, models.listed) {
            (true, false) => String::new(),
            (true, true) => format!(
                ", vec AS (DELETE FROM {state}.vectors r USING upd \
                 WHERE r.table_name = {key} AND r.row_id = upd.id)"
            ),
            (false, _) => format!(
                ", vec AS (INSERT INTO {state}.vectors (table_name, row_id, model, dimensions, embedded_at) \
                 SELECT {key}, id, {model}, {dims}, now() FROM upd ON CONFLICT (table_name, row_id) DO UPDATE \
                 SET model = excluded.model, dimensions = excluded.dimensions, embedded_at = excluded.embedded_at)",
                model = p.bind(&models.current.model, Type::TEXT),
                dims = p.bind(&models.current.dimensions, Type::INT4),
            ),
        };
        let end_claims = match release {
            None => String::new(),
            Some(claim) => format!(
                ", rel AS ({})",
                end_claim(state, &p.bind_owned(claim.0, Type::INT8))
            ),
        };
        format!(
            ", del AS (DELETE FROM {state}.failures f USING upd WHERE f.table_name = {key} AND f.row_id = upd.id) \
             {note}{end_claims}"
        )
    }

    /// Record rows the provider rejected, with their next try: 10 minutes
    /// after the first failure, doubling after each further one of the same text.
    pub(super) fn record_failures(
        &self,
        tx: &mut Transaction<'_>,
        failed: &[(&Claimed, String)],
    ) -> Result<(), postgres::Error> {
        if failed.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = failed.iter().map(|(c, _)| c.id.as_str()).collect();
        let hashes: Vec<i64> = failed.iter().map(|(c, _)| c.text_hash).collect();
        let errors: Vec<&str> = failed.iter().map(|(_, e)| e.as_str()).collect();
        let Quoted {
            table,
            id,
            text,
            id_type,
            state,
            ..
        } = &self.sql;
        let mut p = Params::default();
        let sql = format!(
            "INSERT INTO {state}.failures AS f \
               (table_name, row_id, text_hash, attempts, last_error, first_failed_at, last_failed_at, next_try_at) \
             SELECT {key}, r.id, r.h, 1, r.err, now(), now(), now() + interval '10 minutes' \
             FROM unnest({ids}, {hashes}, {errors}) AS r(id, h, err) \
             JOIN {table} t ON t.{id} = r.id::{id_type} AND {hash} = r.h \
             ON CONFLICT (table_name, row_id) DO UPDATE SET \
               attempts = CASE WHEN f.text_hash = excluded.text_hash THEN f.attempts + 1 ELSE 1 END, \
               first_failed_at = CASE WHEN f.text_hash = excluded.text_hash THEN f.first_failed_at ELSE now() END, \
               next_try_at = now() + interval '10 minutes' * power(2, least(20, \
                   CASE WHEN f.text_hash = excluded.text_hash THEN f.attempts ELSE 0 END)), \
               text_hash = excluded.text_hash, last_error = excluded.last_error, last_failed_at = now()",
            key = p.bind(&self.key, Type::TEXT),
            ids = p.bind(&ids, Type::TEXT_ARRAY),
            hashes = p.bind(&hashes, Type::INT8_ARRAY),
            errors = p.bind(&errors, Type::TEXT_ARRAY),
            hash = text_hash(&text.on("t")),
        );
        p.execute(tx, &sql).map(|_| ())
    }
}
