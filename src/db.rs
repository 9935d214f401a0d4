//! All of autoembed's SQL, behind a blocking repository.
//!
//! Two rules shape every statement here:
//! - identifiers from configuration are resolved by the database
//!   (`to_regclass`, `pg_attribute`) and then quoted by [`quote_ident`],
//!   never pasted; values always travel as parameters;
//! - it must work through a transaction-mode pooler (Supabase 6543,
//!   pgbouncer `pool_mode = transaction`), so there are no named prepared
//!   statements (`query_typed` sends unnamed ones), no session state, and the
//!   `vector` type's OID is looked up rather than assumed.
//!
//! Claiming rows: a batch runs in one transaction that holds
//! `pg_try_advisory_xact_lock(table, hash(id))` for each claimed row across
//! the HTTP call. Advisory locks don't block the application's UPDATEs, vanish
//! when the connection dies (SIGKILL frees the rows at once), and stop two
//! workers from paying for the same row. The write is a compare-and-set on
//! the text itself, so a text edited during the request keeps its row pending.

use crate::config::Config;
use crate::error::{describe_pg, Error, Result};
use pgvector::Vector;
use postgres::types::{Kind, ToSql, Type};
use postgres::{Client, GenericClient, Transaction};
use std::time::Duration;

/// The bookkeeping schema's DDL: idempotent, and safe for concurrent first
/// runs (they serialise on an advisory lock, so `IF NOT EXISTS` cannot race).
pub fn state_ddl(state_schema: &str) -> String {
    state_ddl_quoted(&quote_ident(state_schema))
}

fn state_ddl_quoted(s: &str) -> String {
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
    'autoembed: rows whose vector another model made than the one in models';"
    )
}

/// Which model made a vector: its name (without `openai/`) and size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stamp {
    pub model: String,
    pub dimensions: i32,
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} dimensions)", self.model, self.dimensions)
    }
}

/// What a run knows, from its start, about which models made the table's
/// vectors. The table has a baseline model (the first autoembed ran with);
/// only rows another model made are listed, so a table that keeps its
/// model costs no bookkeeping per row.
#[derive(Debug, Clone)]
pub struct Models {
    /// The model of this run.
    pub current: Stamp,
    /// The current model is the baseline: its rows need no record.
    pub is_baseline: bool,
    /// Some rows are listed (another model than the baseline made them).
    pub listed: bool,
}

/// How many of a table's vectors each model made.
#[derive(Debug, Clone)]
pub struct ModelCounts {
    /// The model of the rows without a record of their own.
    pub baseline: Stamp,
    /// Vectors by model, most first.
    pub counts: Vec<(Stamp, i64)>,
}

/// `backfill --reembed`: which rows that have a vector are embedded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reembed {
    /// Those another model (or size) made.
    Changed,
    /// All of them.
    All,
}

/// Text that is never sent: empty or only whitespace (the API rejects empty
/// input, and a vector of nothing means nothing).
/// ASCII whitespace only, the same set as the SQL side's `[^ \t\n\r\f\v]`,
/// so that counts and claims agree whatever the database's locale.
pub fn is_blank(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'\x0b'))
}

/// Quote an identifier the way `quote_ident` does, always.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A connection, with the `vector` type of this database when pgvector is installed.
pub struct Db {
    client: Client,
    pub vector: Option<VectorTypes>,
}

/// The `vector` and `vector[]` types, whose OIDs differ between databases.
#[derive(Clone, Debug)]
pub struct VectorTypes {
    pub scalar: Type,
    pub array: Type,
    pub version: String,
}

impl Db {
    /// Connect and look up pgvector. Connection failures are exit-3 errors.
    pub fn connect(cfg: &Config) -> Result<Db> {
        let mut pg = cfg.database.clone();
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(10));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("autoembed");
        }
        let connector = crate::tls::connector(&cfg.tls)?;
        let mut client = pg.connect(connector).map_err(|e| {
            let why = describe_pg(&e);
            let label = cfg.database_label();
            let mode = cfg.tls.mode.name();
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
        Ok(Db { client, vector })
    }

    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Look up the table and its columns, without judging them.
    pub fn inspect(&mut self, cfg: &Config) -> Result<Facts> {
        inspect(&mut self.client, cfg)
    }

    /// The API key stored as Supabase Vault secret `name`.
    pub fn vault_secret(&mut self, name: &str) -> Result<String> {
        let flag = "(--api-key-vault-secret, AUTOEMBED_API_KEY_VAULT_SECRET)";
        let row = self
            .client
            .query_typed_opt(
                "SELECT decrypted_secret FROM vault.decrypted_secrets WHERE name = $1 LIMIT 1",
                &[(&name, Type::TEXT)],
            )
            .map_err(|e| match e.code() {
                Some(c) if *c == postgres::error::SqlState::UNDEFINED_TABLE
                    || *c == postgres::error::SqlState::INVALID_SCHEMA_NAME =>
                {
                    Error::Config(format!("this database has no Supabase Vault (vault.decrypted_secrets) {flag}"))
                }
                Some(c) if *c == postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => Error::Config(format!(
                    "this database role may not read vault.decrypted_secrets: connect as a role that may, \
                     or set the key in AUTOEMBED_API_KEY instead {flag}"
                )),
                _ => Error::from(e),
            })?;
        let secret: Option<String> = row.and_then(|r| r.get(0));
        match secret.filter(|s| !s.is_empty()) {
            Some(s) => {
                crate::output::set_secrets([s.clone()]);
                Ok(s)
            }
            None => Err(Error::Config(format!(
                "no Vault secret named {name:?} {flag}"
            ))),
        }
    }

    /// Begin the transaction that one batch lives in.
    pub fn begin(&mut self, idle_limit: Duration) -> Result<Transaction<'_>> {
        let mut tx = self.client.transaction()?;
        // The transaction idles while the provider answers; keep a server-side
        // idle_in_transaction_session_timeout shorter than that from ending it.
        tx.batch_execute(&format!(
            "SET LOCAL idle_in_transaction_session_timeout = {}",
            idle_limit.as_millis()
        ))?;
        Ok(tx)
    }
}

fn vector_types(client: &mut Client) -> Result<Option<VectorTypes>> {
    let row = client.query_typed_opt(
        "SELECT t.oid, t.typarray, n.nspname::text, e.extversion \
         FROM pg_extension e JOIN pg_type t ON t.typnamespace = e.extnamespace AND t.typname = 'vector' \
         JOIN pg_namespace n ON n.oid = t.typnamespace WHERE e.extname = 'vector'",
        &[],
    )?;
    Ok(row.map(|r| {
        let schema: String = r.get(2);
        let scalar = Type::new("vector".into(), r.get(0), Kind::Simple, schema.clone());
        let array = Type::new(
            "_vector".into(),
            r.get(1),
            Kind::Array(scalar.clone()),
            schema,
        );
        VectorTypes {
            scalar,
            array,
            version: r.get(3),
        }
    }))
}

/// What the catalog says about the configured table.
#[derive(Debug, Clone)]
pub enum TableLookup {
    Found(TableFacts),
    NotFound,
    /// The name is not valid SQL (the database's message).
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct Facts {
    pub table: TableLookup,
    pub state_exists: bool,
}

#[derive(Debug, Clone)]
pub struct TableFacts {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `r` table, `p` partitioned table, `v` view, ...
    pub kind: String,
    pub columns: Vec<ColumnFacts>,
    pub primary_key: Vec<String>,
    /// Columns that alone carry a unique index without a predicate.
    pub unique_columns: Vec<String>,
    /// Whether a valid partial index `WHERE <embedding> IS NULL` exists.
    pub has_pending_index: bool,
    /// Whether `autoembed setup`'s trigger is on the table.
    pub has_reset_trigger: bool,
    /// The planner's estimate of the table's rows.
    pub estimated_rows: f64,
}

#[derive(Debug, Clone)]
pub struct ColumnFacts {
    pub name: String,
    /// As `format_type` writes it: usable in a cast.
    pub type_sql: String,
    pub type_oid: u32,
    /// pg_type.typcategory: `S` for string types.
    pub category: String,
    /// For `vector(N)`, N; -1 when unconstrained.
    pub typmod: i32,
}

impl TableFacts {
    pub fn column(&self, name: &str) -> Option<&ColumnFacts> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

fn inspect(client: &mut Client, cfg: &Config) -> Result<Facts> {
    let state_exists = client
        .query_typed_one(
            // The newest of the state tables: an older schema gets the rest on first use.
            "SELECT to_regclass(format('%I.vectors', $1::text)) IS NOT NULL",
            &[(&cfg.state_schema, Type::TEXT)],
        )?
        .get(0);
    let oid: Option<u32> = match client.query_typed_one(
        "SELECT to_regclass($1::text)::oid",
        &[(&cfg.table, Type::TEXT)],
    ) {
        Ok(row) => row.get(0),
        Err(e) if e.as_db_error().is_some() => {
            return Ok(Facts {
                table: TableLookup::Invalid(describe_pg(&e)),
                state_exists,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let Some(oid) = oid else {
        return Ok(Facts {
            table: TableLookup::NotFound,
            state_exists,
        });
    };
    let row = client.query_typed_one(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.reltuples::float8, \
                EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = $2 AND g.tgenabled <> 'D') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[(&oid, Type::OID), (&crate::setup::TRIGGER, Type::TEXT)],
    )?;
    let columns = client
        .query_typed(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, \
                    t.typcategory::text, a.atttypmod \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[(&oid, Type::OID)],
        )?
        .into_iter()
        .map(|r| ColumnFacts {
            name: r.get(0),
            type_sql: r.get(1),
            type_oid: r.get(2),
            category: r.get(3),
            typmod: r.get(4),
        })
        .collect();
    let indexes = client.query_typed(
        "SELECT i.indisprimary, i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL, \
                i.indpred IS NOT NULL AND i.indisvalid, pg_get_expr(i.indpred, i.indrelid), \
                array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) \
         FROM pg_index i WHERE i.indrelid = $1",
        &[(&oid, Type::OID)],
    )?;
    let mut primary_key = Vec::new();
    let mut unique_columns = Vec::new();
    let mut has_pending_index = false;
    let emb_null = format!("({} IS NULL)", quote_ident(&cfg.embedding_column));
    let emb_null_bare = format!("({} IS NULL)", cfg.embedding_column);
    for r in indexes {
        let (primary, unique, partial): (bool, bool, bool) = (r.get(0), r.get(1), r.get(2));
        let predicate: Option<String> = r.get(3);
        let cols: Vec<String> = r.get(4);
        if primary {
            primary_key = cols.clone();
        }
        if unique && cols.len() == 1 {
            unique_columns.push(cols[0].clone());
        }
        if partial {
            let p = predicate.unwrap_or_default();
            if p.contains(&emb_null) || p.contains(&emb_null_bare) {
                has_pending_index = true;
            }
        }
    }
    Ok(Facts {
        table: TableLookup::Found(TableFacts {
            oid,
            schema: row.get(0),
            name: row.get(1),
            kind: row.get(2),
            columns,
            primary_key,
            unique_columns,
            has_pending_index,
            has_reset_trigger: row.get(4),
            estimated_rows: row.get(3),
        }),
        state_exists,
    })
}

/// A table autoembed has checked and can work on: every identifier quoted,
/// every statement built once.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"schema"."table"`, also the key of this table's rows in the state tables.
    pub table: String,
    /// The table's schema and name as the catalog stores them.
    pub schema_name: String,
    pub table_name: String,
    pub id_column: String,
    pub text_column: String,
    pub embedding_column: String,
    /// N of `vector(N)`, when the column fixes it.
    pub dimensions: Option<u32>,
    /// First key of the advisory locks: the table's OID.
    lock_class: i32,
    vector: VectorTypes,
    names: Names,
}

/// The quoted pieces every statement is built from.
#[derive(Debug, Clone)]
struct Names {
    t: String,
    i: String,
    x: String,
    e: String,
    /// The id column's type, as `format_type` writes it, for casts from text.
    idt: String,
    state: String,
}

/// What one claim took.
#[derive(Debug)]
pub struct Claim {
    /// The rows locked for this transaction, with their text (blank ones left out).
    pub rows: Vec<Claimed>,
    /// Where the next claim starts; `None` when nothing was left to look at.
    pub next: Option<String>,
    /// Whether more candidates follow this batch.
    pub more: bool,
}

/// The first half of a claim: the rows this transaction locked.
#[derive(Debug)]
pub struct Candidates {
    /// The candidates this transaction locked (others hold the rest).
    pub locked: Vec<String>,
    /// Where the next claim starts; `None` when nothing was left to look at.
    pub next: Option<String>,
    /// Whether more candidates follow.
    pub more: bool,
}

/// One row taken for embedding.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    /// The text as read; the vector is written only if the row still holds it.
    pub text: String,
    /// `hashtextextended(text, 0)`, as the database computed it: what the
    /// write compares, so that texts need not travel back.
    pub text_hash: i64,
}

/// The counts `verify` prints.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counts {
    pub rows: i64,
    pub embedded: i64,
    pub pending: i64,
    pub blank: i64,
    pub failed: i64,
}

/// Which pending rows a claim may take.
#[derive(Debug, Clone, Copy)]
pub struct Eligibility {
    /// Skip rows that failed and are not due, or gave up (`--max-attempts`);
    /// false when the state schema does not exist yet.
    pub skip_failed: bool,
    pub max_attempts: u32,
    /// Also rows that have a vector (`backfill --reembed`).
    pub reembed: Option<Reembed>,
}

impl Target {
    /// Build the statements for `table`. The caller has checked the columns.
    pub fn new(
        table: &TableFacts,
        id: &ColumnFacts,
        text: &str,
        embedding: &ColumnFacts,
        vector: VectorTypes,
        state_schema: &str,
    ) -> Target {
        let names = Names {
            t: table.qualified(),
            i: quote_ident(&id.name),
            x: quote_ident(text),
            e: quote_ident(&embedding.name),
            idt: id.type_sql.clone(),
            state: quote_ident(state_schema),
        };
        Target {
            table: names.t.clone(),
            schema_name: table.schema.clone(),
            table_name: table.name.clone(),
            id_column: id.name.clone(),
            text_column: text.to_string(),
            embedding_column: embedding.name.clone(),
            dimensions: u32::try_from(embedding.typmod).ok().filter(|d| *d > 0),
            lock_class: table.oid as i32,
            vector,
            names,
        }
    }

    /// Rows that need an embedding.
    fn pending(&self) -> String {
        let Names { e, x, .. } = &self.names;
        format!("t.{e} IS NULL AND t.{x} IS NOT NULL AND t.{x}::text ~ '[^ \\t\\n\\r\\f\\v]'")
    }

    /// What a claim selects on: no embedding and some text. It reads no text
    /// (texts may be compressed or toasted); blank ones are dropped after
    /// the read, in [`is_blank`].
    fn unembedded(&self) -> String {
        let Names { e, x, .. } = &self.names;
        format!("t.{e} IS NULL AND t.{x} IS NOT NULL")
    }

    /// What a claim selects on: [`Target::unembedded`], and with
    /// `--reembed` rows that have a vector too: all of them, or those not
    /// made by the current model (`$2` table key, `${m}` model, `${m}+1`
    /// dimensions).
    fn claimable(&self, reembed: Option<Reembed>, models: &Models, m: usize) -> String {
        let Names { e, x, i, state, .. } = &self.names;
        let listed = |cond: &str| {
            format!(
                "EXISTS (SELECT 1 FROM {state}.vectors r WHERE r.table_name = $2 \
                 AND r.row_id = t.{i}::text AND {cond})",
            )
        };
        match reembed {
            None => self.unembedded(),
            Some(Reembed::All) => format!("t.{x} IS NOT NULL"),
            Some(Reembed::Changed) => {
                let made_by_other = if models.is_baseline {
                    listed(&format!("(r.model <> ${m} OR r.dimensions <> ${})", m + 1))
                } else {
                    format!(
                        "NOT {}",
                        listed(&format!("r.model = ${m} AND r.dimensions = ${}", m + 1))
                    )
                };
                format!("t.{x} IS NOT NULL AND (t.{e} IS NULL OR {made_by_other})")
            }
        }
    }

    /// The models of the table's vectors as this run starts; records the
    /// current model as the table's baseline when it has none yet.
    pub fn models(&self, c: &mut impl GenericClient, current: Stamp) -> Result<Models> {
        let state = &self.names.state;
        c.query_typed(
            &format!(
                "INSERT INTO {state}.models (table_name, model, dimensions) VALUES ($1, $2, $3) \
                 ON CONFLICT (table_name) DO NOTHING"
            ),
            &[
                (&self.table, Type::TEXT),
                (&current.model, Type::TEXT),
                (&current.dimensions, Type::INT4),
            ],
        )?;
        let row = c.query_typed_one(
            &format!(
                "SELECT m.model, m.dimensions, \
                        EXISTS (SELECT 1 FROM {state}.vectors r WHERE r.table_name = $1) \
                 FROM {state}.models m WHERE m.table_name = $1"
            ),
            &[(&self.table, Type::TEXT)],
        )?;
        let baseline = Stamp {
            model: row.get(0),
            dimensions: row.get(1),
        };
        Ok(Models {
            is_baseline: baseline == current,
            current,
            listed: row.get(2),
        })
    }

    /// How many of the table's vectors each model made: the baseline (`None`
    /// before autoembed's first run) and the count by model.
    pub fn model_counts(&self, c: &mut impl GenericClient) -> Result<Option<ModelCounts>> {
        let Names { t, i, e, state, .. } = &self.names;
        let Some(base) = c.query_typed_opt(
            &format!("SELECT model, dimensions FROM {state}.models WHERE table_name = $1"),
            &[(&self.table, Type::TEXT)],
        )?
        else {
            return Ok(None);
        };
        let baseline = Stamp {
            model: base.get(0),
            dimensions: base.get(1),
        };
        let rows = c.query_typed(
            &format!(
                "SELECT coalesce(r.model, $2), coalesce(r.dimensions, $3), count(*) \
                 FROM {t} t LEFT JOIN {state}.vectors r ON r.table_name = $1 AND r.row_id = t.{i}::text \
                 WHERE t.{e} IS NOT NULL GROUP BY 1, 2 ORDER BY 3 DESC, 1"
            ),
            &[
                (&self.table, Type::TEXT),
                (&baseline.model, Type::TEXT),
                (&baseline.dimensions, Type::INT4),
            ],
        )?;
        let counts = rows
            .into_iter()
            .map(|r| {
                (
                    Stamp {
                        model: r.get(0),
                        dimensions: r.get(1),
                    },
                    r.get(2),
                )
            })
            .collect();
        Ok(Some(ModelCounts { baseline, counts }))
    }

    /// After a `--reembed` that left no vector of another model: the current
    /// model becomes the baseline, and the list of rows is emptied.
    pub fn settle_models(&self, c: &mut impl GenericClient, models: &Models) -> Result<bool> {
        if models.is_baseline {
            return Ok(false);
        }
        let Names { t, i, e, state, .. } = &self.names;
        let others: i64 = c
            .query_typed_one(
                &format!(
                    "SELECT count(*) FROM {t} t WHERE t.{e} IS NOT NULL AND NOT EXISTS (\
                       SELECT 1 FROM {state}.vectors r WHERE r.table_name = $1 \
                       AND r.row_id = t.{i}::text AND r.model = $2 AND r.dimensions = $3)"
                ),
                &[
                    (&self.table, Type::TEXT),
                    (&models.current.model, Type::TEXT),
                    (&models.current.dimensions, Type::INT4),
                ],
            )?
            .get(0);
        if others > 0 {
            return Ok(false);
        }
        c.query_typed(
            &format!(
                "WITH m AS (UPDATE {state}.models SET model = $2, dimensions = $3, since = now() \
                            WHERE table_name = $1) \
                 DELETE FROM {state}.vectors WHERE table_name = $1"
            ),
            &[
                (&self.table, Type::TEXT),
                (&models.current.model, Type::TEXT),
                (&models.current.dimensions, Type::INT4),
            ],
        )?;
        Ok(true)
    }

    /// Rows not held back by a recorded failure ($2 table key, $3 max
    /// attempts); `true` when failures are not consulted.
    fn not_failed(&self, consult: bool) -> String {
        if !consult {
            return "true".into();
        }
        let Names { i, x, state, .. } = &self.names;
        format!(
            "NOT EXISTS (SELECT 1 FROM {state}.failures f WHERE f.table_name = $2 \
             AND f.row_id = t.{i}::text AND f.text_hash = hashtextextended(t.{x}::text, 0) \
             AND (f.attempts >= $3 OR f.next_try_at > now()))"
        )
    }

    /// Create the bookkeeping schema on first use. Concurrent first runs
    /// serialise on an advisory lock, so `IF NOT EXISTS` cannot race.
    pub fn ensure_state(&self, db: &mut Db, exists: bool) -> Result<()> {
        if exists {
            return Ok(());
        }
        let mut tx = db.client.transaction()?;
        let s = &self.names.state;
        tx.batch_execute(&state_ddl_quoted(s)).map_err(|e| {
            Error::Database(format!(
                "cannot create the state schema {s} (--state-schema, AUTOEMBED_STATE_SCHEMA): {}",
                describe_pg(&e)
            ))
        })?;
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` pending rows after `cursor`, in id order, locked for this
    /// transaction (`lock = false` for dry-run: read only), with their texts.
    pub fn claim(
        &self,
        tx: &mut Transaction<'_>,
        cursor: Option<&str>,
        limit: usize,
        eligibility: Eligibility,
        lock: bool,
        models: Option<&Models>,
    ) -> Result<Claim> {
        let c = self.candidates(tx, cursor, limit, eligibility, lock, models)?;
        let rows = self.read(tx, &c.locked, eligibility, models)?;
        Ok(Claim {
            rows,
            next: c.next,
            more: c.more,
        })
    }

    /// What both halves of a claim select on (`$2` table key, `$3` max
    /// attempts), and the model and size it binds as `${m}` and `${m}+1`.
    fn eligible<'m>(
        &self,
        eligibility: Eligibility,
        models: Option<&'m Models>,
        m: usize,
    ) -> (String, Option<&'m str>, Option<i32>) {
        let pending = match models {
            Some(models) => self.claimable(eligibility.reembed, models, m),
            None => self.unembedded(),
        };
        let not_failed = self.not_failed(eligibility.skip_failed);
        let (model, dims) = models.map_or((None, None), |m| {
            (Some(m.current.model.as_str()), Some(m.current.dimensions))
        });
        (format!("{pending} AND {not_failed}"), model, dims)
    }

    /// The first half of a claim, the only part that must not run beside
    /// another worker's (it moves the cursor): up to `limit` pending rows
    /// after `cursor`, in id order, and the advisory locks on those no other
    /// run holds.
    pub fn candidates(
        &self,
        tx: &mut Transaction<'_>,
        cursor: Option<&str>,
        limit: usize,
        eligibility: Eligibility,
        lock: bool,
        models: Option<&Models>,
    ) -> Result<Candidates> {
        let key: &str = &self.table;
        let max_attempts = eligibility.max_attempts as i32;
        let limit = limit as i64;
        let Names { t, i, idt, .. } = &self.names;
        let (eligible, model, dims) = self.eligible(eligibility, models, 7);
        let after = if cursor.is_some() {
            format!("AND t.{i} > $1::text::{idt}")
        } else {
            String::new()
        };
        // $1 cursor, $2 table key, $3 max attempts, $4 limit, $5 lock class,
        // $6 take locks, $7 and $8 the current model and size. The candidates are fixed (ordered, limited,
        // materialised) before any lock is tried, so a worker never locks
        // more rows than it asked for. One candidate more than the limit is
        // read, not locked: it says whether more work follows.
        let sql = format!(
            "WITH cand AS MATERIALIZED (\
               SELECT t.{i} AS id FROM {t} t WHERE {eligible} {after} \
               ORDER BY t.{i} LIMIT $4 + 1), \
             numbered AS (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM cand) \
             SELECT id::text AS id_text, rn, \
                    CASE WHEN rn > $4 THEN false \
                         WHEN $6 THEN pg_try_advisory_xact_lock($5, hashtext(id::text)) ELSE true END \
             FROM numbered ORDER BY rn"
        );
        let cand = tx.query_typed(
            &sql,
            &[
                (&cursor, Type::TEXT),
                (&key, Type::TEXT),
                (&max_attempts, Type::INT4),
                (&limit, Type::INT8),
                (&self.lock_class, Type::INT4),
                (&lock, Type::BOOL),
                (&model, Type::TEXT),
                (&dims, Type::INT4),
            ],
        )?;
        let more = cand.len() as i64 > limit;
        let within = &cand[..cand.len().min(limit as usize)];
        let next = within.last().map(|r| r.get::<_, String>(0));
        let locked = within
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get(0))
            .collect();
        Ok(Candidates { locked, next, more })
    }

    /// The second half of a claim: the locked rows that are still pending,
    /// with their texts (blank ones left out). Read after locking, in a new
    /// statement (a new snapshot): a row another worker finished just before
    /// we locked it drops out here.
    pub fn read(
        &self,
        tx: &mut Transaction<'_>,
        ids: &[String],
        eligibility: Eligibility,
        models: Option<&Models>,
    ) -> Result<Vec<Claimed>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let key: &str = &self.table;
        let max_attempts = eligibility.max_attempts as i32;
        let (eligible, model, dims) = self.eligible(eligibility, models, 4);
        let Names { t, i, x, idt, .. } = &self.names;
        let read = format!(
            "SELECT t.{i}::text, t.{x}::text, hashtextextended(t.{x}::text, 0) FROM {t} t \
             WHERE t.{i} = ANY($1::text[]::{idt}[]) AND {eligible} ORDER BY t.{i}"
        );
        let rows = tx.query_typed(
            &read,
            &[
                (&ids, Type::TEXT_ARRAY),
                (&key, Type::TEXT),
                (&max_attempts, Type::INT4),
                (&model, Type::TEXT),
                (&dims, Type::INT4),
            ],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                id: r.get(0),
                text: r.get(1),
                text_hash: r.get(2),
            })
            .filter(|c| !is_blank(&c.text))
            .collect())
    }

    /// Write vectors whose row still holds the text that was embedded (and,
    /// unless re-embedding, still has no vector), and note which model made
    /// them. Returns the ids that were written; the others changed meanwhile.
    pub fn write(
        &self,
        tx: &mut Transaction<'_>,
        done: Vec<(&Claimed, Vec<f32>)>,
        models: &Models,
        reembed: bool,
    ) -> Result<Vec<String>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = done.iter().map(|(c, _)| c.id.as_str()).collect();
        let hashes: Vec<i64> = done.iter().map(|(c, _)| c.text_hash).collect();
        let vectors: Vec<Vector> = done.into_iter().map(|(_, v)| Vector::from(v)).collect();
        let source = "SELECT * FROM unnest($1::text[], $2::int8[], $3) AS v(id, h, e)";
        let third: (&(dyn ToSql + Sync), Type) = (&vectors, self.vector.array.clone());
        self.store(tx, source, &ids, &hashes, third, models, reembed)
    }

    /// Give rows the vector another row got earlier in this run for the
    /// same text (`(row, its text, the other row's id)`), as long as both
    /// still hold that text. Returns the ids that were written.
    pub fn copy(
        &self,
        tx: &mut Transaction<'_>,
        copies: &[(&Claimed, String)],
        models: &Models,
        reembed: bool,
    ) -> Result<Vec<String>> {
        if copies.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = copies.iter().map(|(c, _)| c.id.as_str()).collect();
        let hashes: Vec<i64> = copies.iter().map(|(c, _)| c.text_hash).collect();
        let sources: Vec<&str> = copies.iter().map(|(_, s)| s.as_str()).collect();
        let Names {
            t, i, x, e, idt, ..
        } = &self.names;
        let source = format!(
            "SELECT c.id, c.h, s.{e} AS e FROM unnest($1::text[], $2::int8[], $3::text[]) AS c(id, h, src) \
             JOIN {t} s ON s.{i} = c.src::{idt} AND hashtextextended(s.{x}::text, 0) = c.h \
             AND s.{e} IS NOT NULL"
        );
        let third: (&(dyn ToSql + Sync), Type) = (&sources, Type::TEXT_ARRAY);
        self.store(tx, &source, &ids, &hashes, third, models, reembed)
    }

    /// The one write statement: vectors from `source` (`id`, `h` the hash
    /// of the text they are for, `e`) into the rows that still hold that
    /// text, their failures forgotten, their model noted.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        tx: &mut Transaction<'_>,
        source: &str,
        ids: &[&str],
        hashes: &[i64],
        third: (&(dyn ToSql + Sync), Type),
        models: &Models,
        reembed: bool,
    ) -> Result<Vec<String>> {
        let Names {
            t,
            i,
            x,
            e,
            idt,
            state,
        } = &self.names;
        let still_null = if reembed {
            String::new()
        } else {
            format!("AND t.{e} IS NULL")
        };
        // Rows the baseline model made need no record (and lose an old one);
        // rows another model made are listed.
        let note = match (models.is_baseline, models.listed) {
            (true, false) => String::new(),
            (true, true) => format!(
                ", vec AS (DELETE FROM {state}.vectors r USING upd \
                 WHERE r.table_name = $4 AND r.row_id = upd.id)"
            ),
            (false, _) => format!(
                ", vec AS (INSERT INTO {state}.vectors (table_name, row_id, model, dimensions, embedded_at) \
                 SELECT $4, id, $5, $6, now() FROM upd ON CONFLICT (table_name, row_id) DO UPDATE \
                 SET model = excluded.model, dimensions = excluded.dimensions, embedded_at = excluded.embedded_at)"
            ),
        };
        let sql = format!(
            "WITH v AS ({source}), \
             upd AS (UPDATE {t} t SET {e} = v.e FROM v \
                     WHERE t.{i} = v.id::{idt} {still_null} AND hashtextextended(t.{x}::text, 0) = v.h \
                     RETURNING t.{i}::text AS id), \
             del AS (DELETE FROM {state}.failures f USING upd WHERE f.table_name = $4 AND f.row_id = upd.id) \
             {note} SELECT id FROM upd"
        );
        let rows = tx.query_typed(
            &sql,
            &[
                (&ids, Type::TEXT_ARRAY),
                (&hashes, Type::INT8_ARRAY),
                third,
                (&self.table, Type::TEXT),
                (&models.current.model, Type::TEXT),
                (&models.current.dimensions, Type::INT4),
            ],
        )?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Record rows the provider rejected, with their next try.
    pub fn record_failures(
        &self,
        tx: &mut Transaction<'_>,
        failed: &[(&Claimed, String)],
    ) -> Result<()> {
        if failed.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = failed.iter().map(|(c, _)| c.id.as_str()).collect();
        let texts: Vec<&str> = failed.iter().map(|(c, _)| c.text.as_str()).collect();
        let errors: Vec<&str> = failed.iter().map(|(_, e)| e.as_str()).collect();
        let Names {
            t,
            i,
            x,
            idt,
            state,
            ..
        } = &self.names;
        let sql = format!(
            "INSERT INTO {state}.failures AS f \
               (table_name, row_id, text_hash, attempts, last_error, first_failed_at, last_failed_at, next_try_at) \
             SELECT $1, r.id, hashtextextended(t.{x}::text, 0), 1, r.err, now(), now(), now() + interval '10 minutes' \
             FROM unnest($2::text[], $3::text[], $4::text[]) AS r(id, x, err) \
             JOIN {t} t ON t.{i} = r.id::{idt} AND t.{x}::text = r.x \
             ON CONFLICT (table_name, row_id) DO UPDATE SET \
               attempts = CASE WHEN f.text_hash = excluded.text_hash THEN f.attempts + 1 ELSE 1 END, \
               first_failed_at = CASE WHEN f.text_hash = excluded.text_hash THEN f.first_failed_at ELSE now() END, \
               next_try_at = now() + interval '10 minutes' * power(2, least(20, \
                   CASE WHEN f.text_hash = excluded.text_hash THEN f.attempts ELSE 0 END)), \
               text_hash = excluded.text_hash, last_error = excluded.last_error, last_failed_at = now()"
        );
        tx.execute_typed(
            &sql,
            &[
                (&self.table, Type::TEXT),
                (&ids, Type::TEXT_ARRAY),
                (&texts, Type::TEXT_ARRAY),
                (&errors, Type::TEXT_ARRAY),
            ],
        )?;
        Ok(())
    }

    pub fn count_pending(&self, c: &mut impl GenericClient) -> Result<i64> {
        let sql = format!(
            "SELECT count(*) FROM {} t WHERE {}",
            self.names.t,
            self.pending()
        );
        Ok(c.query_typed_one(&sql, &[])?.get(0))
    }

    /// Failed rows whose text has not changed since they failed.
    pub fn count_failed(&self, c: &mut impl GenericClient, state_exists: bool) -> Result<i64> {
        if !state_exists {
            return Ok(0);
        }
        let Names {
            t,
            i,
            x,
            e,
            idt,
            state,
        } = &self.names;
        let sql = format!(
            "SELECT count(*) FROM {state}.failures f JOIN {t} t ON t.{i} = f.row_id::{idt} \
             WHERE f.table_name = $1 AND t.{e} IS NULL AND hashtextextended(t.{x}::text, 0) = f.text_hash"
        );
        Ok(c.query_typed_one(&sql, &[(&self.table, Type::TEXT)])?
            .get(0))
    }

    pub fn counts(&self, c: &mut impl GenericClient, state_exists: bool) -> Result<Counts> {
        let Names { t, x, e, .. } = &self.names;
        let sql = format!(
            "SELECT count(*), count(*) FILTER (WHERE t.{e} IS NOT NULL), \
                    count(*) FILTER (WHERE {pending}), \
                    count(*) FILTER (WHERE t.{e} IS NULL AND NOT coalesce(t.{x}::text ~ '[^ \\t\\n\\r\\f\\v]', false)) \
             FROM {t} t",
            pending = self.pending()
        );
        let r = c.query_typed_one(&sql, &[])?;
        Ok(Counts {
            rows: r.get(0),
            embedded: r.get(1),
            pending: r.get(2),
            blank: r.get(3),
            failed: self.count_failed(c, state_exists)?,
        })
    }
}
