//! autoembed's PostgreSQL layer: every statement it sends lives below this
//! module, one file per concern.
//!
//! - [`sql`]: building a statement with its parameters; the shared expressions;
//! - [`catalog`]: what the table looks like (read-only, before anything runs);
//! - [`access`]: what this role may do to it and to the state schema;
//! - [`state`]: the bookkeeping schema (claims, failures, models);
//! - [`target`]: a checked table and the conditions that select its rows;
//! - [`claims`]: taking rows for a batch, and letting them go;
//! - [`writes`]: storing vectors and failures;
//! - [`counts`]: what verify, dry-run and the summary report;
//! - [`model_records`]: which model made which vectors;
//! - [`sweep`]: forgetting the records of deleted rows;
//! - [`legacy`]: adopting the state earlier versions kept by table.
//!
//! Two rules shape every statement: identifiers from configuration are
//! resolved by the database and then quoted, never pasted, and values travel
//! as parameters; and it must work through a transaction-mode pooler
//! (Supabase 6543, pgbouncer `pool_mode = transaction`), so there are no
//! named prepared statements, no session state, and the `vector` type's OID
//! is looked up rather than assumed.
//!
//! No transaction here is ever open while autoembed waits for anything but
//! the database: each one claims, or writes, and commits.

pub mod access;
pub mod batch_jobs;
pub mod catalog;
pub mod chunks;
pub mod claims;
pub mod counts;
pub mod legacy;
pub mod model_records;
pub mod sql;
pub mod state;
pub mod sweep;
pub mod target;
pub mod writes;

pub use sql::quote_ident;

use crate::config::Config;
use crate::error::{describe_pg, Error, Result};
use postgres::error::SqlState;
use postgres::types::{Kind, Type};
use postgres::{Client, IsolationLevel, Transaction};
use std::time::Duration;

/// How long a statement waits for a lock another session holds before the
/// run stops (exit 3), when the role sets no `lock_timeout` of its own.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection, with the `vector` type of this database when pgvector is installed.
pub struct Db {
    client: Client,
    /// Where it connected, to connect again after the connection was lost.
    endpoint: Endpoint,
    pub vector: Option<VectorTypes>,
    /// Whether this connection is its own server backend (not a pooler's):
    /// then a claim can name the backend, and a dead holder frees its rows at once.
    pub direct: bool,
}

/// The most dimensions pgvector indexes as `vector` (HNSW and IVFFlat);
/// wider vectors are indexed as `halfvec` (up to 4,000).
pub const MAX_INDEXED_VECTOR: u32 = 2000;

/// The `vector` and `vector[]` types, whose OIDs differ between databases,
/// and `halfvec`, `halfvec[]` (pgvector 0.7 and later).
#[derive(Clone, Debug)]
pub struct VectorTypes {
    pub scalar: Type,
    pub array: Type,
    pub half: Option<(Type, Type)>,
    pub version: String,
}

impl VectorTypes {
    /// Whether a column of type `oid` holds a dense vector autoembed writes
    /// (`vector` or `halfvec`).
    pub fn is_dense(&self, oid: u32) -> bool {
        oid == self.scalar.oid() || self.half.as_ref().is_some_and(|(h, _)| h.oid() == oid)
    }

    /// Whether `oid` is `halfvec`.
    pub fn is_half(&self, oid: u32) -> bool {
        self.half.as_ref().is_some_and(|(h, _)| h.oid() == oid)
    }
}

/// Where the database is, as [`Db::connect`] needs it again to reconnect.
#[derive(Clone)]
struct Endpoint {
    pg: postgres::Config,
    tls: crate::tls::Settings,
    label: String,
}

impl Db {
    /// Connect and look up pgvector. Connection failures are exit-3 errors.
    pub fn connect(cfg: &Config) -> Result<Db> {
        Db::open(Endpoint {
            pg: cfg.database.clone(),
            tls: cfg.tls.clone(),
            label: cfg.database_label(),
        })
    }

    fn open(endpoint: Endpoint) -> Result<Db> {
        let mut pg = endpoint.pg.clone();
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(10));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("autoembed");
        }
        let connector = crate::tls::connector(&endpoint.tls)?;
        let mut client = pg.connect(connector).map_err(|e| {
            let why = describe_pg(&e);
            let label = &endpoint.label;
            let mode = endpoint.tls.mode.name();
            // A certificate that fails the check is a configuration matter,
            // never a reason to try without it.
            if why.contains("invalid peer certificate") {
                Error::Config(format!(
                    "TLS to {label} failed verification (sslmode={mode}): {why}; check sslrootcert and the host name in --database-url (DATABASE_URL)"
                ))
            } else if why.contains("server does not support TLS") {
                Error::Config(format!(
                    "{label} does not offer TLS, which sslmode={mode} requires (--database-url, DATABASE_URL)"
                ))
            } else {
                Error::Database(format!("cannot connect to {label}: {why}"))
            }
        })?;
        let vector = vector_types(&mut client)?;
        let direct = is_direct(&mut client, &pg)?;
        if direct {
            // Wait a bounded time for a lock another session holds (a
            // migration, a long transaction), unless the role sets its own.
            // Only on a connection of our own: through a pooler a session
            // setting would stay behind for the pool's other clients.
            client.batch_execute(&format!(
                "SELECT set_config('lock_timeout', '{}ms', false) \
                 WHERE current_setting('lock_timeout') IN ('0', '0ms')",
                LOCK_TIMEOUT.as_millis()
            ))?;
        }
        Ok(Db {
            client,
            endpoint,
            vector,
            direct,
        })
    }

    /// Connect again when the connection was lost (a restarted server, a
    /// terminated backend); a no-op while it is open.
    pub fn reconnect_if_closed(&mut self) -> Result<()> {
        if self.client.is_closed() {
            *self = Db::open(self.endpoint.clone())?;
            crate::info!("reconnected to {}", self.endpoint.label);
        }
        Ok(())
    }

    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// A transaction at READ COMMITTED, whatever the database's or role's
    /// default: a claim's statement must see what the claims before it committed.
    pub fn begin(&mut self) -> Result<Transaction<'_>, postgres::Error> {
        self.client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
    }

    /// Run `f` in a transaction at READ COMMITTED and commit it. Every
    /// statement that writes goes through here or [`Db::begin`]: a lone
    /// statement would run at the database's default isolation, and under
    /// `repeatable read` two runs recording the same row (a claim, the
    /// table's model) fail with a serialization error.
    pub fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut tx = self.begin()?;
        let out = f(&mut tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// A read-only transaction at READ COMMITTED (dry-run).
    pub fn read_only(&mut self) -> Result<Transaction<'_>> {
        Ok(self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .read_only(true)
            .start()?)
    }
}

/// Whether an error on a write may pass if the write is tried again: a
/// deadlock, a serialization failure, or a connection lost before the commit.
pub fn is_retryable(e: &postgres::Error) -> bool {
    match e.code() {
        Some(c) => {
            *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
        }
        None => {
            e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
}

fn vector_types(client: &mut Client) -> Result<Option<VectorTypes>> {
    let row = client.query_typed_opt(
        "SELECT t.oid, t.typarray, n.nspname::text, e.extversion, h.oid, h.typarray \
         FROM pg_extension e JOIN pg_type t ON t.typnamespace = e.extnamespace AND t.typname = 'vector' \
         JOIN pg_namespace n ON n.oid = t.typnamespace \
         LEFT JOIN pg_type h ON h.typnamespace = e.extnamespace AND h.typname = 'halfvec' \
         WHERE e.extname = 'vector'",
        &[],
    )?;
    Ok(row.map(|r| {
        let schema: String = r.get(2);
        let scalar = Type::new("vector".into(), r.get(0), Kind::Simple, schema.clone());
        let array = Type::new(
            "_vector".into(),
            r.get(1),
            Kind::Array(scalar.clone()),
            schema.clone(),
        );
        let half = match (r.get::<_, Option<u32>>(4), r.get::<_, Option<u32>>(5)) {
            (Some(oid), Some(array)) => {
                let scalar = Type::new("halfvec".into(), oid, Kind::Simple, schema.clone());
                let array = Type::new(
                    "_halfvec".into(),
                    array,
                    Kind::Array(scalar.clone()),
                    schema,
                );
                Some((scalar, array))
            }
            _ => None,
        };
        VectorTypes {
            scalar,
            array,
            half,
            version: r.get(3),
        }
    }))
}

/// A connection is direct when the server listens on the port we dialled
/// (or both ends are a Unix socket). Through a pooler (pgbouncer on 6432,
/// Supabase on 6543) the server's port differs, and the backend is the
/// pooler's, shared with others and outliving this process.
fn is_direct(client: &mut Client, pg: &postgres::Config) -> Result<bool> {
    let server_port: Option<i32> = client
        .query_typed_one("SELECT inet_server_port()", &[])?
        .get(0);
    let dialled = match pg.get_hosts().first() {
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(_)) => None,
        _ => Some(i32::from(pg.get_ports().first().copied().unwrap_or(5432))),
    };
    Ok(server_port == dialled)
}
