//! Taking rows for a batch, and letting them go.
//!
//! A claim is one row in `<state>.claims` per batch: the table and
//! embedding column's key, the ids of the rows it holds (and the first and
//! last of them, in id order), the holder, an expiry and, on a direct
//! connection, the holder's backend. It is taken in a short transaction
//! that commits before any request is sent: nothing is held open, and no
//! lock is kept on the user's table, while the provider works.
//!
//! - Taking ([`Target::claim`]): under a transaction-level advisory lock on
//!   the table's key, one statement sweeps the table's lapsed claims, picks
//!   the selected rows after the run's cursor that no live claim holds and
//!   inserts their claim. Claims of a table are taken one at a time, on
//!   every host, so two live claims never share a row. The texts are read
//!   after the claim commits ([`Target::read`]), beside other claims.
//! - The snapshot race: the lock is taken in a statement of its own, so
//!   the claim's statement reads with a snapshot taken after the previous
//!   claim committed; and a batch's vectors are written and its claim ended
//!   in one transaction, so a snapshot sees a row either still claimed or
//!   already embedded, never free and pending in between.
//! - Lapsing: a claim is free once its expiry passes, or at once when the
//!   backend it names is gone (a SIGKILLed run on a direct connection).
//!   Through a pooler the backend is the pooler's, so only the expiry counts.
//! - Before sending, a holder whose claim may lapse during the request
//!   extends it ([`Target::confirm`]). A claim that lapsed lives only until
//!   the next claim of the table sweeps it away; one that is gone sends
//!   nothing, since its rows may be another run's.
//! - The write ends the batch's claim in its own transaction; at its end a
//!   run that claimed rows releases whatever it still holds, and sweeps the
//!   table's lapsed claims ([`Target::release_run`]); a run that claimed
//!   nothing holds nothing and leaves the sweep to the next that works.
//!
//! One row a batch keeps a claim cheap (one small insert, one delete), and
//! lets it last a day: rows handed to a provider's batch job.

use super::sql::{quote_literal, text_hash, Params, BACKEND_START};
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

/// The claim record of one batch (its `claim_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimId(pub i64);

/// A batch's row ids, in id order, as one claim took them (or dry-run picked them).
#[derive(Debug)]
pub struct Taken {
    pub ids: Vec<String>,
    /// The claim that holds them; `None` when only picked (dry-run) or empty.
    pub claim: Option<ClaimId>,
    /// Whether more selected rows follow the last one.
    pub more: bool,
}

/// The columns [`Target::claim_fields`] gives values for.
const CLAIM_FIELDS: [&str; 4] = ["holder", "backend_pid", "backend_start", "expires_at"];

/// The statement that ends claim `claim` (a bound placeholder): in the
/// write that stores its rows, or alone.
pub(super) fn end_claim(state: &str, claim: &str) -> String {
    format!("DELETE FROM {state}.claims c WHERE c.claim_id = {claim}")
}

impl Target {
    /// End `claim` (its rows need nothing after all).
    pub fn end_claim(
        &self,
        c: &mut impl GenericClient,
        claim: ClaimId,
    ) -> Result<(), postgres::Error> {
        let mut p = Params::default();
        let sql = end_claim(&self.sql.state, &p.bind_owned(claim.0, Type::INT8));
        p.execute(c, &sql).map(|_| ())
    }

    /// Up to `limit` selected rows after `cursor`, in id order, claimed
    /// under `lease` (or, without one, only picked: dry-run). One row more
    /// than the limit is read, not returned: it says whether more work
    /// follows. The caller commits, then reads the texts ([`Target::read`]):
    /// claims of a table are taken one at a time, so the claim does only
    /// what must be done under its lock.
    pub fn claim(
        &self,
        c: &mut impl GenericClient,
        cursor: Option<&str>,
        limit: usize,
        sel: &Selection<'_>,
        lease: Option<Lease<'_>>,
    ) -> Result<Taken> {
        let q = &self.sql;
        if lease.is_some() {
            // Its own statement: the claim's snapshot is taken after the
            // wait. A claim lost in a crash frees its rows, which is what
            // the crash does anyway: its commit need not wait for the disk.
            c.batch_execute(&format!(
                "SET LOCAL synchronous_commit = off; {}",
                self.claims_lock()
            ))?;
        }
        let limit = limit as i64;
        let mut p = Params::default();
        let (key, candidates) = self.candidates(sel, &cursor, &mut p);
        let n = p.bind(&limit, Type::INT8);
        let pick = format!(
            "SELECT t.{id} AS k, t.{id}::text AS id FROM {table} t \
             WHERE {candidates} ORDER BY t.{id} LIMIT {n} + 1",
            id = q.id,
            table = q.table,
        );
        let (take, claim_id) = match lease {
            None => (String::new(), "NULL::bigint".to_string()),
            Some(lease) => {
                let fields = self.claim_fields(&mut p, lease).join(", ");
                (
                    format!(
                        ", swept AS (DELETE FROM {state}.claims c WHERE c.table_name = {key} AND {lapsed}), \
                         taken AS (INSERT INTO {state}.claims AS c \
                           (table_name, row_ids, first_id, last_id, {columns}) \
                         SELECT {key}, b.ids, b.ids[1], b.ids[cardinality(b.ids)], {fields} \
                         FROM (SELECT array_agg(id ORDER BY k) AS ids FROM \
                               (SELECT k, id FROM pick ORDER BY k LIMIT {n}) s) b \
                         WHERE b.ids IS NOT NULL RETURNING c.claim_id)",
                        state = q.state,
                        lapsed = lapsed("c"),
                        columns = CLAIM_FIELDS.join(", "),
                    ),
                    "(SELECT claim_id FROM taken)".to_string(),
                )
            }
        };
        let sql = format!(
            "WITH pick AS ({pick}){take} \
             SELECT id, {claim_id} FROM pick ORDER BY k"
        );
        let mut ids = Vec::new();
        let mut claim = None;
        for r in p.query(c, &sql)? {
            claim = r.get::<_, Option<i64>>(1).map(ClaimId);
            ids.push(r.get::<_, String>(0));
        }
        let more = ids.len() as i64 > limit;
        ids.truncate(limit as usize);
        Ok(Taken { ids, claim, more })
    }

    /// The texts of the claimed rows `ids` that are still selected, in id
    /// order, read after the claim committed. A row the claim holds cannot
    /// be finished by another run meanwhile; one edited since is read as it
    /// is now, and one that no longer needs a vector (emptied) drops out.
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
        let own = Selection {
            skip_claimed: false,
            skip_batched: false,
            ..*sel
        };
        let mut p = Params::default();
        let key = p.bind(&self.key, Type::TEXT);
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

    /// The lock every claim of this table takes first, for the rest of its
    /// transaction (a short one: it commits before any request).
    pub(super) fn claims_lock(&self) -> String {
        format!(
            "SELECT pg_advisory_xact_lock(hashtext('autoembed claims'), hashtext({}))",
            quote_literal(&self.key)
        )
    }

    /// The holder, backend and expiry of a claim taken under `lease`: the
    /// values for the columns of [`CLAIM_FIELDS`], in order.
    fn claim_fields<'a>(&self, p: &mut Params<'a>, lease: Lease<'a>) -> [String; 4] {
        let direct = p.bind_owned(lease.direct, Type::BOOL);
        [
            p.bind(&lease.holder.name, Type::TEXT),
            format!("CASE WHEN {direct} THEN pg_backend_pid() END"),
            format!("CASE WHEN {direct} THEN {BACKEND_START} END"),
            p.bind_later(lease.length),
        ]
    }

    /// Extend `claim` by `lease`, and name this connection's backend;
    /// returns the ids it holds. A claim that lapsed is extended only if no
    /// claim was taken since: each one sweeps the lapsed claims away first.
    /// An empty list means the rows may be another run's: never send them.
    pub fn confirm(
        &self,
        c: &mut impl GenericClient,
        claim: ClaimId,
        lease: Lease<'_>,
    ) -> Result<Vec<String>> {
        c.batch_execute(&self.claims_lock())?;
        let mut p = Params::default();
        let claim = p.bind_owned(claim.0, Type::INT8);
        let set: Vec<String> = CLAIM_FIELDS
            .iter()
            .zip(self.claim_fields(&mut p, lease))
            .map(|(column, value)| format!("{column} = {value}"))
            .collect();
        let sql = format!(
            "UPDATE {state}.claims c SET {set} WHERE c.claim_id = {claim} RETURNING c.row_ids",
            state = self.sql.state,
            set = set.join(", "),
        );
        Ok(p.query(c, &sql)?
            .into_iter()
            .flat_map(|r| r.get::<_, Vec<String>>(0))
            .collect())
    }

    /// Let go of every claim of run `run` (all its workers) on this table,
    /// and sweep away the lapsed claims other runs left behind (a killed
    /// run's), which nothing else would ever remove. Returns the rows let go.
    pub fn release_run(&self, c: &mut impl GenericClient, run: &str) -> Result<i64> {
        let prefix = format!("{run}:");
        let mut p = Params::default();
        let sql = format!(
            "WITH gone AS (DELETE FROM {state}.claims c WHERE c.table_name = {key} \
               AND (starts_with(c.holder, {prefix}) OR {lapsed}) RETURNING cardinality(c.row_ids) AS n) \
             SELECT coalesce(sum(n), 0)::bigint FROM gone",
            state = self.sql.state,
            key = p.bind(&self.key, Type::TEXT),
            prefix = p.bind(&prefix, Type::TEXT),
            lapsed = lapsed("c"),
        );
        Ok(p.query(c, &sql)?
            .first()
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0))
    }
}
