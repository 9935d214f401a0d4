//! autoembed's bookkeeping schema (`--state-schema`, `autoembed` by
//! default): the rows it holds for a batch (`claims`), the rows the provider
//! rejected (`failures`), and which model made the vectors (`models`,
//! `vectors`). Created on first use, or by `setup`; idempotent, and safe for
//! concurrent first runs (they serialise on an advisory lock, so
//! `IF NOT EXISTS` cannot race).

use super::sql::quote_ident;
use super::Db;
use crate::error::{describe_pg, Error, Result};
use postgres::types::Type;
use postgres::Client;

/// Which of the state tables exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateSchema {
    /// Some version of the schema exists (failures are recorded).
    pub exists: bool,
    /// The newest table exists too: nothing to create.
    pub current: bool,
}

impl StateSchema {
    pub fn look_up(client: &mut Client, schema: &str) -> Result<StateSchema> {
        let row = client.query_typed_one(
            "SELECT to_regclass(format('%I.failures', $1::text)) IS NOT NULL, \
                    to_regclass(format('%I.claims', $1::text)) IS NOT NULL",
            &[(&schema, Type::TEXT)],
        )?;
        Ok(StateSchema {
            exists: row.get(0),
            current: row.get(1),
        })
    }

    /// Create the schema, or the tables an older version lacks.
    pub fn ensure(self, db: &mut Db, schema: &str) -> Result<()> {
        if self.current {
            return Ok(());
        }
        let mut tx = db.begin()?;
        tx.batch_execute(&ddl(schema)).map_err(|e| {
            Error::Database(format!(
                "cannot create the state schema {} (--state-schema, AUTOEMBED_STATE_SCHEMA): {}",
                quote_ident(schema),
                describe_pg(&e)
            ))
        })?;
        tx.commit()?;
        Ok(())
    }
}

/// The bookkeeping schema's DDL, for `setup`, its `--print-sql` and first use.
pub fn ddl(state_schema: &str) -> String {
    let s = quote_ident(state_schema);
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('autoembed state schema'));
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.failures (
    table_name      text        NOT NULL,
    row_id          text        NOT NULL,
    text_hash       bigint      NOT NULL,
    attempts        integer     NOT NULL,
    last_error      text        NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    next_try_at     timestamptz NOT NULL,
    PRIMARY KEY (table_name, row_id)
);
COMMENT ON TABLE {s}.failures IS
    'autoembed: rows the provider rejected, with their next try; delete a row to retry it now';
CREATE TABLE IF NOT EXISTS {s}.models (
    table_name  text        PRIMARY KEY,
    model       text        NOT NULL,
    dimensions  integer     NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE {s}.models IS
    'autoembed: the model that made each table''s vectors, except the rows listed in vectors';
CREATE TABLE IF NOT EXISTS {s}.vectors (
    table_name  text        NOT NULL,
    row_id      text        NOT NULL,
    model       text        NOT NULL,
    dimensions  integer     NOT NULL,
    embedded_at timestamptz NOT NULL,
    PRIMARY KEY (table_name, row_id)
);
COMMENT ON TABLE {s}.vectors IS
    'autoembed: rows whose vector another model made than the one in models';
CREATE TABLE IF NOT EXISTS {s}.claims (
    table_name    text        NOT NULL,
    row_id        text        NOT NULL,
    holder        text        NOT NULL,
    backend_pid   integer,
    backend_start timestamptz,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (table_name, row_id)
);
COMMENT ON TABLE {s}.claims IS
    'autoembed: rows a run is embedding; free when expires_at has passed or the backend_pid (with backend_start) is gone';"
    )
}
