//! The state earlier versions kept: they keyed the state tables by the
//! table alone, so that two embedding columns of one table shared their
//! failures and models. This version keys them by table and column
//! ([`Target::key`]); a run adopts the old records when that is not ambiguous.

use super::sql::quote_ident;
use super::target::Target;
use super::Db;
use crate::error::Result;
use postgres::types::Type;

impl Target {
    /// Move the records an earlier version keyed by the table alone to this
    /// column's key ([`Target::key`]), when that cannot be ambiguous (the
    /// table has one vector column). Records the new key already has win.
    /// Claims are left to lapse: a run of the earlier version may hold them.
    pub fn adopt_legacy_state(&self, db: &mut Db, schema: &str) -> Result<()> {
        if !self.sole_vector_column {
            return Ok(());
        }
        let s = quote_ident(schema);
        let keys: [(&(dyn postgres::types::ToSql + Sync), Type); 2] =
            [(&self.legacy_key, Type::TEXT), (&self.key, Type::TEXT)];
        let legacy: bool = db
            .client()
            .query_typed_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {s}.failures WHERE table_name = $1) \
                     OR EXISTS (SELECT 1 FROM {s}.vectors WHERE table_name = $1) \
                     OR EXISTS (SELECT 1 FROM {s}.models WHERE table_name = $1)"
                ),
                &keys[..1],
            )?
            .get(0);
        if !legacy {
            return Ok(());
        }
        let moved = format!(
            "WITH f AS (UPDATE {s}.failures f SET table_name = $2 WHERE f.table_name = $1 \
                  AND NOT EXISTS (SELECT 1 FROM {s}.failures n WHERE n.table_name = $2 AND n.row_id = f.row_id)), \
                  v AS (UPDATE {s}.vectors v SET table_name = $2 WHERE v.table_name = $1 \
                  AND NOT EXISTS (SELECT 1 FROM {s}.vectors n WHERE n.table_name = $2 AND n.row_id = v.row_id)) \
             UPDATE {s}.models m SET table_name = $2 WHERE m.table_name = $1 \
               AND NOT EXISTS (SELECT 1 FROM {s}.models n WHERE n.table_name = $2)"
        );
        let left = format!(
            "WITH f AS (DELETE FROM {s}.failures WHERE table_name = $1), \
                  v AS (DELETE FROM {s}.vectors WHERE table_name = $1) \
             DELETE FROM {s}.models WHERE table_name = $1"
        );
        db.in_transaction(|tx| {
            tx.batch_execute("SELECT pg_advisory_xact_lock(hashtext('autoembed state schema'))")?;
            tx.execute_typed(&moved, &keys)?;
            tx.execute_typed(&left, &keys[..1])?;
            Ok(())
        })?;
        crate::info!(
            "state of {} now kept under its column's key {}",
            self.table,
            self.key
        );
        Ok(())
    }
}
