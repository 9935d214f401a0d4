//! Storing a batch's chunks (`--chunks-table`) in one short transaction:
//! for each row whose chunks all came back, and only if the row still
//! holds the text they were split from, its chunks replace the ones it
//! had (a row is written whole or not at all); then the failures, the
//! model records and the end of the claim, as for a column
//! ([`super::writes`]).
//!
//! A row with chunks needs nothing ([`Target::has_vector`]); setup's
//! trigger deletes them when the row's text is edited. The trigger and the
//! write take the same transaction-level advisory lock on the row
//! ([`row_lock`]), so an edit is either seen by the write's check (and
//! nothing is written) or comes after its commit (and deletes what it
//! wrote): no stale chunk survives an edit. Each chunk also carries
//! `source_hash`, the hash of the text it was split from.

use super::claims::{ClaimId, Claimed};
use super::model_records::Models;
use super::sql::{text_hash, Params};
use super::target::{Quoted, Target};
use super::writes::with_retries;
use super::Db;
use crate::error::Result;
use pgvector::{HalfVector, Vector};
use postgres::types::Type;

/// Where a chunk's vector comes from.
#[derive(Debug)]
pub enum ChunkVector {
    /// The provider's reply.
    Sent(Vec<f32>),
    /// The same text's vector, written earlier in the run as chunk `chunk` of row `row`.
    Copy { row: String, chunk: i32 },
}

/// One chunk of a row: its text and its vector.
#[derive(Debug)]
pub struct ChunkOut<'a> {
    pub text: &'a str,
    pub vector: ChunkVector,
}

/// What one batch brings back to a chunks table.
#[derive(Debug)]
pub struct ChunkWrite<'a> {
    /// Rows whose every chunk has a vector, with their chunks in order.
    pub rows: Vec<(&'a Claimed, Vec<ChunkOut<'a>>)>,
    /// Rows one of whose chunks the provider rejected, and why.
    pub failures: Vec<(&'a Claimed, String)>,
    /// The batch's claim, which ends now.
    pub release: ClaimId,
}

impl ChunkWrite<'_> {
    /// How many chunks the write stores.
    pub fn chunk_count(&self) -> usize {
        self.rows.iter().map(|(_, c)| c.len()).sum()
    }
}

/// The advisory lock a chunked write and setup's trigger take on one row:
/// `key` the target's key and `id` the row's id as text, both SQL.
pub fn row_lock(key: &str, id: &str) -> String {
    format!("pg_advisory_xact_lock(hashtext({key}), hashtext({id}))")
}

impl Target {
    /// Write `batch` in one transaction, retrying what may pass; returns
    /// the ids of the rows whose chunks were written (the others changed meanwhile).
    pub fn write_chunks(
        &self,
        db: &mut Db,
        batch: &ChunkWrite<'_>,
        models: &Models,
    ) -> Result<Vec<String>> {
        let ids: Vec<&str> = batch.rows.iter().map(|(r, _)| r.id.as_str()).collect();
        with_retries(db, |db| {
            let mut tx = db.begin()?;
            // In a statement of its own, so that the write's snapshot
            // follows every edit that took the lock first.
            let mut p = Params::default();
            let lock = format!(
                "SELECT count({}) FROM (SELECT DISTINCT unnest({}) AS id ORDER BY 1) AS r",
                row_lock(&p.bind(&self.key, Type::TEXT), "r.id"),
                p.bind(&ids, Type::TEXT_ARRAY)
            );
            p.query(&mut tx, &lock)?;
            let written = self.store_chunks(&mut tx, batch, models)?;
            self.record_failures(&mut tx, &batch.failures)?;
            tx.commit()?;
            Ok(written)
        })
    }

    /// The one statement that stores chunks: upserted by (row, number),
    /// the row's higher-numbered old chunks deleted (two sets of rows that
    /// never meet, so one statement does both), for the rows whose every
    /// chunk has a vector and that still hold their text (read and hashed
    /// once a row, by its id: in a join the planner may hash every row of
    /// a small table's texts instead).
    fn store_chunks<'a>(
        &'a self,
        tx: &mut postgres::Transaction<'_>,
        batch: &'a ChunkWrite<'a>,
        models: &'a Models,
    ) -> Result<Vec<String>, postgres::Error> {
        let Quoted {
            table,
            id,
            text,
            embedding,
            id_type,
            chunks,
            ..
        } = &self.sql;
        let Some(chunks) = chunks else {
            return Ok(Vec::new());
        };
        let n = batch.chunk_count();
        let (mut ids, mut hashes, mut numbers, mut bodies) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut sent, mut copy_rows, mut copy_numbers) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (row, parts) in &batch.rows {
            for (k, part) in parts.iter().enumerate() {
                ids.push(row.id.as_str());
                hashes.push(row.text_hash);
                numbers.push(k as i32);
                bodies.push(part.text);
                match &part.vector {
                    ChunkVector::Sent(v) => {
                        sent.push(Some(v.as_slice()));
                        copy_rows.push(None);
                        copy_numbers.push(None);
                    }
                    ChunkVector::Copy { row, chunk } => {
                        sent.push(None);
                        copy_rows.push(Some(row.as_str()));
                        copy_numbers.push(Some(*chunk));
                    }
                }
            }
        }
        let mut p = Params::default();
        let vectors = if self.half {
            let v: Vec<Option<HalfVector>> = sent
                .iter()
                .map(|v| v.map(HalfVector::from_f32_slice))
                .collect();
            p.bind_owned(v, self.vector_array())
        } else {
            let v: Vec<Option<Vector>> = sent
                .iter()
                .map(|v| v.map(|v| Vector::from(v.to_vec())))
                .collect();
            p.bind_owned(v, self.vector_array())
        };
        let sql = format!(
            "WITH v AS (SELECT * FROM unnest({ids}, {hashes}, {numbers}, {bodies}, {vectors}, {copy_rows}, {copy_numbers}) \
                        AS v(id, h, k, body, e, crow, ck)), \
             f AS (SELECT v.id, v.h, v.k, v.body, coalesce(v.e, (SELECT s.{embedding} FROM {chunks} s \
                     WHERE s.source_id = v.crow::{id_type} AND s.chunk_index = v.ck AND s.chunk_text = v.body)) AS e \
                   FROM v), \
             r AS (SELECT f.id, f.h, max(f.k) AS last FROM f GROUP BY f.id, f.h HAVING bool_and(f.e IS NOT NULL)), \
             upd AS (SELECT r.id, r.last FROM r \
                     WHERE (SELECT {hash} FROM {table} t WHERE t.{id} = r.id::{id_type}) = r.h), \
             put AS (INSERT INTO {chunks} AS c (source_id, chunk_index, chunk_text, source_hash, {embedding}) \
                     SELECT f.id::{id_type}, f.k, f.body, f.h, f.e FROM f JOIN upd USING (id) \
                     ON CONFLICT (source_id, chunk_index) DO UPDATE SET chunk_text = excluded.chunk_text, \
                       source_hash = excluded.source_hash, {embedding} = excluded.{embedding}), \
             gone AS (DELETE FROM {chunks} c USING upd WHERE c.source_id = upd.id::{id_type} AND c.chunk_index > upd.last) \
             {bookkeeping} SELECT id FROM upd",
            ids = p.bind_owned(ids, Type::TEXT_ARRAY),
            hashes = p.bind_owned(hashes, Type::INT8_ARRAY),
            numbers = p.bind_owned(numbers, Type::INT4_ARRAY),
            bodies = p.bind_owned(bodies, Type::TEXT_ARRAY),
            copy_rows = p.bind_owned(copy_rows, Type::TEXT_ARRAY),
            copy_numbers = p.bind_owned(copy_numbers, Type::INT4_ARRAY),
            hash = text_hash(&text.on("t")),
            bookkeeping = self.bookkeeping(&mut p, models, Some(batch.release)),
        );
        Ok(p.query(tx, &sql)?.into_iter().map(|r| r.get(0)).collect())
    }
}
