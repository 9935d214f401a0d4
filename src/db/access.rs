//! What this role may do to the table and the state schema, read from the
//! catalog before a run pays for anything: a read-only database (a hot
//! standby, `default_transaction_read_only`), column privileges, row-level
//! security and its policies, and the state schema's grants. `checks` turns
//! these facts into the one-line errors that name the grant to add.

use super::sql::quote_ident;
use super::target::Target;
use super::Db;
use crate::error::Result;
use postgres::types::Type;

/// The state tables a run reads and writes.
const STATE_TABLES: [&str; 4] = ["claims", "failures", "models", "vectors"];

/// What the connected role may do.
#[derive(Debug, Clone)]
pub struct Access {
    pub role: String,
    pub database: String,
    /// Why nothing can be written, when nothing can.
    pub read_only: Option<&'static str>,
    /// Column privileges the role lacks: (privilege, column).
    pub missing: Vec<(&'static str, String)>,
    pub rls: Rls,
    pub state: StateAccess,
    /// With a chunks table: the privileges on it the role lacks (`INSERT`, ...).
    pub chunk_grants: Vec<String>,
}

/// Row-level security on the table, as it applies to this role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rls {
    /// Off, or the role bypasses it (owner without FORCE, BYPASSRLS, superuser).
    NotApplied,
    /// On: whether any policy lets this role read rows, and update them.
    Policies { select: bool, update: bool },
}

/// Whether the state schema is usable by this role.
#[derive(Debug, Clone)]
pub enum StateAccess {
    /// It exists and the role may use every state table.
    Usable,
    /// It does not exist yet, and the role may create it.
    Creatable,
    /// It does not exist, and the role may not create schemas in the database.
    NotCreatable,
    /// It exists, and these grants are missing (`USAGE ON SCHEMA x`, `INSERT ON x.claims`, ...).
    Missing(Vec<String>),
}

impl Db {
    /// Read what the connected role may do to `target` and `state_schema`.
    pub fn access(&mut self, target: &Target, state_schema: &str) -> Result<Access> {
        let mut columns = vec![("SELECT", target.id_column.as_str())];
        columns.extend(target.text_columns.iter().map(|c| ("SELECT", c.as_str())));
        if target.chunks.is_none() {
            columns.push(("SELECT", target.embedding_column.as_str()));
            columns.push(("UPDATE", target.embedding_column.as_str()));
        }
        let (privs, cols): (Vec<&str>, Vec<&str>) = columns.iter().copied().unzip();
        // A policy for `cmd` (`r` select, `w` update) that applies to this
        // role: to PUBLIC, or to a role it is a member of.
        let policy = |cmd: char| {
            format!(
                "EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND p.polcmd IN ('{cmd}', '*') \
                   AND (0::oid = ANY(p.polroles) OR EXISTS (SELECT 1 FROM unnest(p.polroles) pr(o) \
                        WHERE pg_has_role(pr.o, 'USAGE'))))"
            )
        };
        let row = self.client().query_typed_one(
            &format!(
                "SELECT current_user::text, current_database()::text, pg_is_in_recovery(), \
                        current_setting('transaction_read_only') = 'on', \
                        array(SELECT k.n::int4 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS k(p, c, n) \
                              WHERE NOT has_column_privilege(c.oid, k.c, k.p)), \
                        c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls \
                          OR (pg_has_role(c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)), \
                        {}, {}, \
                        to_regnamespace($4::text) IS NOT NULL, \
                        has_database_privilege(current_database(), 'CREATE') \
                 FROM pg_class c, pg_roles r WHERE c.oid = $1::text::regclass AND r.rolname = current_user",
                policy('r'),
                policy('w'),
            ),
            &[
                (&target.table, Type::TEXT),
                (&privs, Type::TEXT_ARRAY),
                (&cols, Type::TEXT_ARRAY),
                (&quote_ident(state_schema), Type::TEXT),
            ],
        )?;
        // 1-based positions in `columns` of the privileges the role lacks.
        let missing: Vec<i32> = row.get(4);
        let read_only = if row.get::<_, bool>(2) {
            Some("a hot standby")
        } else if row.get::<_, bool>(3) {
            Some("default_transaction_read_only is on")
        } else {
            None
        };
        let rls = if row.get(5) {
            Rls::Policies {
                select: row.get(6),
                update: row.get(7),
            }
        } else {
            Rls::NotApplied
        };
        let state = match (row.get::<_, bool>(8), row.get::<_, bool>(9)) {
            (false, true) => StateAccess::Creatable,
            (false, false) => StateAccess::NotCreatable,
            (true, _) => self.state_grants(state_schema)?,
        };
        Ok(Access {
            role: row.get(0),
            database: row.get(1),
            read_only,
            missing: missing
                .into_iter()
                .filter_map(|n| columns.get(usize::try_from(n).ok()?.checked_sub(1)?))
                .map(|&(p, c)| (p, c.to_string()))
                .collect(),
            rls,
            state,
            chunk_grants: self.chunk_grants(target)?,
        })
    }

    /// The grants on an existing chunks table this role lacks: a run
    /// reads, inserts, updates and deletes its rows.
    fn chunk_grants(&mut self, target: &Target) -> Result<Vec<String>> {
        let Some(chunks) = target.chunks.as_ref().filter(|c| c.exists) else {
            return Ok(Vec::new());
        };
        let rows = self.client().query_typed(
            "SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p \
             WHERE NOT has_table_privilege($1::text, p)",
            &[(&chunks.table, Type::TEXT)],
        )?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// The grants on the existing state schema this role lacks.
    fn state_grants(&mut self, state_schema: &str) -> Result<StateAccess> {
        let s = quote_ident(state_schema);
        let tables: Vec<String> = STATE_TABLES.iter().map(|t| format!("{s}.{t}")).collect();
        let rows = self.client().query_typed(
            "SELECT 'USAGE ON SCHEMA ' || $1 WHERE NOT has_schema_privilege($3::text, 'USAGE') \
             UNION ALL \
             SELECT p || ' ON ' || t FROM unnest($2::text[]) AS t, \
                    unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p \
             WHERE has_schema_privilege($3::text, 'USAGE') AND to_regclass(t) IS NOT NULL \
               AND NOT has_table_privilege(t, p)",
            &[
                (&s, Type::TEXT),
                (&tables, Type::TEXT_ARRAY),
                (&state_schema, Type::TEXT),
            ],
        )?;
        let missing: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
        Ok(if missing.is_empty() {
            StateAccess::Usable
        } else {
            StateAccess::Missing(missing)
        })
    }
}
