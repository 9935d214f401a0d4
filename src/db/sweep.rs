//! Forgetting what autoembed recorded about rows that are gone: a deleted
//! row's failure and its model record would otherwise stay forever. Run at
//! the end of a run that claimed rows, beside the sweep of lapsed claims.

use super::sql::Params;
use super::target::{Quoted, Target};
use crate::error::Result;
use postgres::types::Type;
use postgres::GenericClient;

impl Target {
    /// Delete the failure and model records of rows no longer in the
    /// table; returns how many records went.
    pub fn forget_deleted(&self, c: &mut impl GenericClient) -> Result<u64> {
        let Quoted {
            table,
            id,
            id_type,
            state,
            ..
        } = &self.sql;
        let mut p = Params::default();
        let key = p.bind(&self.key, Type::TEXT);
        let gone = |r: &str| {
            format!(
                "{r}.table_name = {key} AND NOT EXISTS \
                 (SELECT 1 FROM {table} t WHERE t.{id} = {r}.row_id::{id_type})"
            )
        };
        let sql = format!(
            "WITH f AS (DELETE FROM {state}.failures f WHERE {} RETURNING 1), \
                  v AS (DELETE FROM {state}.vectors v WHERE {} RETURNING 1) \
             SELECT (SELECT count(*) FROM f) + (SELECT count(*) FROM v)",
            gone("f"),
            gone("v"),
        );
        Ok(p.query(c, &sql)?
            .first()
            .map_or(0, |r| r.get::<_, i64>(0) as u64))
    }
}
