//! Taking rows for a batch, and letting them go.
//!
//! A claim is a row in `<state>.claims` (the table and embedding column's
//! key, row id, holder, expiry, and, on a direct connection, the holder's
//! backend), taken in a short
//! transaction that commits before any request is sent: nothing is held
//! open, and no lock is kept on the user's table, while the provider works.
//!
//! - Picking: the candidates after the run's shared cursor that no other
//!   run holds ([`Target::candidates`], only a read: the one step the
//!   run's workers take in turn).
//! - Taking: `INSERT ... ON CONFLICT DO UPDATE ... WHERE` the old claim has
//!   lapsed, so of two workers racing for a row exactly one gets it
//!   ([`Target::take`]).
//! - The snapshot race: a worker can claim a row another worker finished
//!   after the first statement's snapshot was taken; the texts are re-read in
//!   a new statement (READ COMMITTED: a new snapshot), and a row that is no
//!   longer pending drops out before anything is sent.
//! - Lapsing: a claim is free once its expiry passes, or at once when the
//!   backend it names is gone (a SIGKILLed run on a direct connection).
//!   Through a pooler the backend is the pooler's, so only the expiry counts.
//! - Before sending, a holder whose claim may lapse during the request
//!   extends it ([`Target::confirm`]), and sends only the rows it still holds.
//! - The write releases the batch's claims in its own transaction; at its
//!   end a run that claimed rows releases whatever it still holds, and
//!   sweeps the table's lapsed claims ([`Target::release_run`]); a run that
//!   claimed nothing holds nothing and leaves the sweep to the next that works.
//!
//! The claim records only a row's id and an expiry, so a claim can equally
//! last a day (rows handed to a provider's batch job).

use super::sql::{text_hash, Params};
use super::target::{lapsed, Selection, Target};
use crate::error::Result;
use postgres::types::Type;
use postgres::GenericClient;
use std::time::Duration;

/// Who holds a claim: one worker of one run (`<run>:<worker>`).
#[derive(Debug, Clone)]
pub struct Holder {
    pub name: String,
}

impl Holder {
    pub fn new(run: &str, worker: usize) -> Holder {
        Holder {
            name: format!("{run}:{worker}"),
        }
    }
}

/// How a claim is taken: for whom, for how long, and whether the
/// connection's backend can stand for the holder.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'h> {
    pub holder: &'h Holder,
    pub length: Duration,
    pub direct: bool,
}

/// The first step of a claim: the rows to try, in id order.
#[derive(Debug)]
pub struct Candidates {
    /// Up to the limit asked for.
    pub ids: Vec<String>,
    /// Whether more candidates follow.
    pub more: bool,
}

/// One row taken for embedding.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    /// The text as read; the vector is written only if the row still holds it.
    pub text: String,
    /// The text's hash as the database computes it ([`super::sql::text_hash`]):
    /// what the write compares, so that texts need not travel back.
    pub text_hash: i64,
}

/// The claims (alias `c`) of `holder` on the rows `ids` (all three bound
/// placeholders), found by one probe of the claims index per id.
///
/// Written as `c.ctid = ANY (...)` because the plain `c.row_id = ANY (ids)`
/// lets PostgreSQL read every claim of the table instead: it judges the
/// table by statistics taken when it was nearly empty, while a backfill
/// leaves thousands of dead claims behind it (1.5 ms a statement instead of
/// 0.4 ms for 100 rows among 20,000 dead claims). A claim that another run
/// took over in the meantime has a new `ctid`, and is left alone.
pub(super) fn held_by(state: &str, key: &str, holder: &str, ids: &str) -> String {
    format!(
        "c.ctid = ANY (ARRAY(SELECT (SELECT h.ctid FROM {state}.claims h \
           WHERE h.table_name = {key} AND h.row_id = r.id AND h.holder = {holder}) \
         FROM unnest({ids}::text[]) AS r(id)))"
    )
}

impl Target {
    /// Up to `limit` selected rows after `cursor`, in id order, that no
    /// other run holds; one row more than the limit is read, not returned:
    /// it says whether more work follows. Only reads: the run's workers
    /// call this one at a time, since it moves their shared cursor, and
    /// take the rows ([`Target::take`]) beside each other.
    pub fn candidates(
        &self,
        c: &mut impl GenericClient,
        cursor: Option<&str>,
        limit: usize,
        sel: &Selection<'_>,
    ) -> Result<Candidates> {
        let q = &self.sql;
        let limit = limit as i64;
        let mut p = Params::default();
        let key = p.bind(&self.key, Type::TEXT);
        let selected = self.selected(sel, &key, &mut p);
        let after = match &cursor {
            Some(_) => format!(
                "AND t.{} > {}::text::{}",
                q.id,
                p.bind(&cursor, Type::TEXT),
                q.id_type
            ),
            None => String::new(),
        };
        let sql = format!(
            "SELECT t.{id}::text FROM {table} t WHERE {selected} {after} \
             ORDER BY t.{id} LIMIT {n} + 1",
            id = q.id,
            table = q.table,
            n = p.bind(&limit, Type::INT8),
        );
        let mut ids: Vec<String> = p.query(c, &sql)?.into_iter().map(|r| r.get(0)).collect();
        let more = ids.len() as i64 > limit;
        ids.truncate(limit as usize);
        Ok(Candidates { ids, more })
    }

    /// Claim `ids` under `lease`; returns those taken, in order. Of two runs
    /// racing for a row exactly one takes it: the insert of the other one
    /// meets the first one's claim, which has not lapsed.
    pub fn take(
        &self,
        c: &mut impl GenericClient,
        ids: &[String],
        lease: Lease<'_>,
    ) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lease_ms = lease.length.as_millis() as i64;
        let mut p = Params::default();
        let sql = format!(
            "INSERT INTO {state}.claims AS c \
               (table_name, row_id, holder, backend_pid, backend_start, expires_at) \
             SELECT {key}, id, {holder}, \
                    CASE WHEN {direct} THEN pg_backend_pid() END, \
                    CASE WHEN {direct} THEN (SELECT a.backend_start FROM pg_stat_get_activity(pg_backend_pid()) a) END, \
                    now() + {lease_ms} * interval '1 millisecond' \
             FROM unnest({ids}::text[]) WITH ORDINALITY AS i(id, n) ORDER BY n \
             ON CONFLICT (table_name, row_id) DO UPDATE SET holder = excluded.holder, \
               backend_pid = excluded.backend_pid, backend_start = excluded.backend_start, \
               expires_at = excluded.expires_at \
             WHERE {lapsed} \
             RETURNING c.row_id",
            state = self.sql.state,
            key = p.bind(&self.key, Type::TEXT),
            holder = p.bind(&lease.holder.name, Type::TEXT),
            direct = p.bind(&lease.direct, Type::BOOL),
            lease_ms = p.bind(&lease_ms, Type::INT8),
            ids = p.bind(&ids, Type::TEXT_ARRAY),
            lapsed = lapsed("c"),
        );
        let taken: std::collections::HashSet<String> =
            p.query(c, &sql)?.into_iter().map(|r| r.get(0)).collect();
        Ok(ids
            .iter()
            .filter(|id| taken.contains(*id))
            .cloned()
            .collect())
    }

    /// The last step of a claim: the taken rows that are still selected,
    /// with their texts, read in a new statement (a new snapshot), so a row
    /// another worker finished just before we took it drops out here.
    pub fn read(
        &self,
        c: &mut impl GenericClient,
        ids: &[String],
        sel: &Selection<'_>,
    ) -> Result<Vec<Claimed>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let q = &self.sql;
        let mut p = Params::default();
        let key = p.bind(&self.key, Type::TEXT);
        let own = Selection {
            skip_claimed: false,
            ..*sel
        };
        let selected = self.selected(&own, &key, &mut p);
        let sql = format!(
            "SELECT t.{id}::text, {text}::text, {hash} FROM {table} t \
             WHERE t.{id} = ANY({ids}::text[]::{id_type}[]) AND {selected} ORDER BY t.{id}",
            id = q.id,
            text = q.text.on("t"),
            table = q.table,
            id_type = q.id_type,
            hash = text_hash(&q.text.on("t")),
            ids = p.bind(&ids, Type::TEXT_ARRAY),
        );
        Ok(p.query(c, &sql)?
            .into_iter()
            .map(|r| Claimed {
                id: r.get(0),
                text: r.get(1),
                text_hash: r.get(2),
            })
            .collect())
    }

    /// Extend `holder`'s claims on `ids` by `lease` (and name this
    /// connection's backend); returns the ids it still holds. Rows whose
    /// claim lapsed and went to another run are not returned: never send them.
    pub fn confirm(
        &self,
        c: &mut impl GenericClient,
        ids: &[&str],
        lease: Lease<'_>,
    ) -> Result<Vec<String>> {
        let lease_ms = lease.length.as_millis() as i64;
        let mut p = Params::default();
        let state = &self.sql.state;
        let sql = format!(
            "UPDATE {state}.claims c SET expires_at = now() + {lease_ms} * interval '1 millisecond', \
               backend_pid = CASE WHEN {direct} THEN pg_backend_pid() END, \
               backend_start = CASE WHEN {direct} THEN (SELECT a.backend_start FROM pg_stat_get_activity(pg_backend_pid()) a) END \
             WHERE {held} RETURNING c.row_id",
            lease_ms = p.bind(&lease_ms, Type::INT8),
            direct = p.bind(&lease.direct, Type::BOOL),
            held = held_by(
                state,
                &p.bind(&self.key, Type::TEXT),
                &p.bind(&lease.holder.name, Type::TEXT),
                &p.bind(&ids, Type::TEXT_ARRAY),
            ),
        );
        Ok(p.query(c, &sql)?.into_iter().map(|r| r.get(0)).collect())
    }

    /// Let go of `holder`'s claims on `ids`.
    pub fn release(
        &self,
        c: &mut impl GenericClient,
        holder: &Holder,
        ids: &[&str],
    ) -> Result<(), postgres::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut p = Params::default();
        let state = &self.sql.state;
        let sql = format!(
            "DELETE FROM {state}.claims c WHERE {}",
            held_by(
                state,
                &p.bind(&self.key, Type::TEXT),
                &p.bind(&holder.name, Type::TEXT),
                &p.bind(&ids, Type::TEXT_ARRAY),
            )
        );
        p.execute(c, &sql).map(|_| ())
    }

    /// Let go of every claim of run `run` (all its workers) on this table,
    /// and sweep away the lapsed claims other runs left behind (a killed
    /// run's, on rows deleted or embedded since), which nothing else would
    /// ever remove.
    pub fn release_run(&self, c: &mut impl GenericClient, run: &str) -> Result<u64> {
        let prefix = format!("{run}:");
        let mut p = Params::default();
        let sql = format!(
            "DELETE FROM {state}.claims c WHERE c.table_name = {key} \
             AND (starts_with(c.holder, {prefix}) OR {lapsed})",
            state = self.sql.state,
            key = p.bind(&self.key, Type::TEXT),
            prefix = p.bind(&prefix, Type::TEXT),
            lapsed = lapsed("c"),
        );
        Ok(p.execute(c, &sql)?)
    }
}
