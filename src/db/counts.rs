//! The counts verify, dry-run and the summary report: rows, embedded,
//! pending, blank, failed (and chunks, with a chunks table).

use super::sql::text_hash;
use super::target::{Quoted, Target};
use crate::error::Result;
use postgres::types::Type;
use postgres::GenericClient;

/// The counts `verify` prints.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counts {
    pub rows: i64,
    pub embedded: i64,
    pub pending: i64,
    pub blank: i64,
    pub failed: i64,
    /// Rows without a vector whose id is NULL: never embedded, since the
    /// vector could not be written back to them.
    pub no_id: i64,
    /// With `--chunks-table`: the chunks it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<i64>,
}

impl Target {
    pub fn count_pending(&self, c: &mut impl GenericClient) -> Result<i64> {
        let sql = format!(
            "SELECT count(*) FROM {} t WHERE {}",
            self.sql.table,
            self.pending()
        );
        Ok(c.query_typed_one(&sql, &[])?.get(0))
    }

    /// Failed rows whose text has not changed since they failed.
    pub fn count_failed(&self, c: &mut impl GenericClient, state_exists: bool) -> Result<i64> {
        if !state_exists {
            return Ok(0);
        }
        let Quoted {
            table,
            id,
            text,
            id_type,
            state,
            ..
        } = &self.sql;
        let sql = format!(
            "SELECT count(*) FROM {state}.failures f JOIN {table} t ON t.{id} = f.row_id::{id_type} \
             WHERE f.table_name = $1 AND {without} AND {hash} = f.text_hash",
            without = self.lacks_vector("t"),
            hash = text_hash(&text.on("t"))
        );
        Ok(c.query_typed_one(&sql, &[(&self.key, Type::TEXT)])?.get(0))
    }

    pub fn counts(&self, c: &mut impl GenericClient, state_exists: bool) -> Result<Counts> {
        let Quoted { table, text, .. } = &self.sql;
        let sql = format!(
            "SELECT count(*), count(*) FILTER (WHERE {embedded}), \
                    count(*) FILTER (WHERE {pending}), \
                    count(*) FILTER (WHERE {without} AND NOT {with_text}), \
                    count(*) FILTER (WHERE {without} AND NOT {has_id}), \
                    {chunks} \
             FROM {table} t",
            embedded = self.has_vector("t"),
            without = self.lacks_vector("t"),
            chunks = match &self.sql.chunks {
                Some(chunks) => format!("(SELECT count(*) FROM {chunks})"),
                None => "NULL::int8".into(),
            },
            pending = self.pending(),
            with_text = text.has_text("t"),
            has_id = self.has_id(),
        );
        let r = c.query_typed_one(&sql, &[])?;
        Ok(Counts {
            rows: r.get(0),
            embedded: r.get(1),
            pending: r.get(2),
            blank: r.get(3),
            no_id: r.get(4),
            chunks: r.get(5),
            failed: self.count_failed(c, state_exists)?,
        })
    }
}
