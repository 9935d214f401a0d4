//! The rules a table must meet before autoembed touches it, written once and
//! used twice: `verify` prints them as checks, and every other subcommand
//! stops at the first one that fails (exit 2, before any API call).

mod chunks;

use crate::config::{Config, Mode};
use crate::db::access::{Access, Rls, StateAccess};
use crate::db::catalog::ColumnFacts;
use crate::db::catalog::{Facts, TableFacts, TableLookup};
use crate::db::state::StateSchema;
use crate::db::target::{Embedding, Target, Text};
use crate::db::{quote_ident, Db, VectorTypes};
use crate::models::ProviderKind;

/// One named check and what it found; `detail` of a failed check is the
/// one-line error that says what to fix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Passed, but something deserves a look (shown as `warn`).
    pub warning: bool,
    pub detail: String,
}

impl Check {
    pub fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            warning: false,
            detail: detail.into(),
        }
    }
    pub fn fail(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            warning: false,
            detail: detail.into(),
        }
    }
    pub fn warn(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            warning: true,
            detail: detail.into(),
        }
    }
}

/// A connection and a checked table, ready to work on.
pub struct Opened {
    /// The configuration, with the API key from Vault when one was named.
    pub cfg: Config,
    pub db: Db,
    pub target: Target,
    pub state: StateSchema,
}

/// Connect, read the key from Vault if asked, check the table; the first
/// failed check is the error (exit 2), before any API call or write.
pub fn open(cfg: &Config) -> crate::error::Result<Opened> {
    let mut db = Db::connect(cfg)?;
    let cfg = with_vault_key(cfg, &mut db)?;
    let facts = db.inspect(&cfg)?;
    let (checks, target) = evaluate(&cfg, &db, &facts);
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        return Err(crate::error::Error::Config(bad.detail.clone()));
    }
    let target =
        target.ok_or_else(|| crate::error::Error::config("the table could not be checked"))?;
    // `setup --print-sql` only prints: any role may, on any server.
    let prints = cfg.mode == Mode::Setup && cfg.setup.print_sql;
    let access = if prints {
        None
    } else {
        Some(db.access(&target, &cfg.state_schema)?)
    };
    if let Some(bad) = access
        .iter()
        .flat_map(|a| access_checks(cfg.mode, a, &target, &cfg.state_schema))
        .find(|c| !c.ok)
    {
        // A database that takes no writes is unreachable for a run's
        // purpose (exit 3); a missing grant is configuration (exit 2).
        return Err(if bad.name == "writable" {
            crate::error::Error::Database(bad.detail)
        } else {
            crate::error::Error::Config(bad.detail)
        });
    }
    crate::debug!(
        "table {} (id {}, text {}, embedding {}), database {}",
        target.table,
        quote_ident(&target.id_column),
        target.text_label,
        quote_ident(&target.embedding_column),
        cfg.database_label()
    );
    Ok(Opened {
        cfg,
        db,
        target,
        state: facts.state,
    })
}

/// `cfg` with the API key read from Supabase Vault, when
/// `--api-key-vault-secret` names one; unchanged otherwise.
pub fn with_vault_key(cfg: &Config, db: &mut Db) -> crate::error::Result<Config> {
    let mut cfg = cfg.clone();
    if let Some(name) = &cfg.provider.vault_secret {
        cfg.provider.api_key = Some(db.vault_secret(name)?);
    }
    Ok(cfg)
}

/// Check pgvector, the table and its columns, the model's dimensions (when
/// known offline) and the key; return the checks and, when the table passed,
/// the [`Target`] to work on.
pub fn evaluate(cfg: &Config, db: &Db, facts: &Facts) -> (Vec<Check>, Option<Target>) {
    let mut checks = Vec::new();
    let vector = match &db.vector {
        Some(v) => {
            checks.push(Check::pass("pgvector", format!("version {}", v.version)));
            Some(v.clone())
        }
        None => {
            checks.push(Check::fail(
                "pgvector",
                "pgvector is not installed in this database: run `create extension vector` (locally, scripts/dev-db.sh does it)",
            ));
            None
        }
    };
    let target = table_checks(cfg, facts, vector, &mut checks);
    if !matches!(cfg.mode, Mode::DryRun | Mode::Setup) {
        checks.push(key_check(cfg));
    }
    (checks, target)
}

fn table_checks(
    cfg: &Config,
    facts: &Facts,
    vector: Option<VectorTypes>,
    checks: &mut Vec<Check>,
) -> Option<Target> {
    let table = match &facts.table {
        TableLookup::Found(t) if matches!(t.kind.as_str(), "r" | "p") => {
            checks.push(Check::pass("table", t.qualified()));
            t
        }
        TableLookup::Found(t) => {
            checks.push(Check::fail(
                "table",
                format!(
                    "{} is not a table (--table, AUTOEMBED_TABLE)",
                    t.qualified()
                ),
            ));
            return None;
        }
        TableLookup::NotFound => {
            checks.push(Check::fail(
                "table",
                format!(
                    "table {:?} not found (--table, AUTOEMBED_TABLE; write it as SQL does: schema.table, quoted where needed)",
                    cfg.table
                ),
            ));
            return None;
        }
        TableLookup::Invalid(msg) => {
            checks.push(Check::fail(
                "table",
                format!(
                    "--table (AUTOEMBED_TABLE) {:?} is not a valid table name: {msg}",
                    cfg.table
                ),
            ));
            return None;
        }
    };
    let qualified = table.qualified();
    let missing = |col: &str, flag: &str, var: &str| {
        format!(
            "column {} not found in {qualified} ({flag}, {var}; the name is matched exactly, as the catalog stores it)",
            quote_ident(col)
        )
    };

    // The id column: named, or the single-column primary key.
    let id = match &cfg.id_column {
        Some(name) => match table.column(name) {
            None => Err(missing(name, "--id-column", "AUTOEMBED_ID_COLUMN")),
            Some(c) if !table.unique_columns.contains(&c.name) => Err(format!(
                "id column {} is not unique (no unique index on it alone): name another with --id-column (AUTOEMBED_ID_COLUMN)",
                quote_ident(&c.name)
            )),
            Some(c) => Ok(c),
        },
        None => match table.primary_key.as_slice() {
            [one] => table
                .column(one)
                .ok_or_else(|| missing(one, "--id-column", "AUTOEMBED_ID_COLUMN")),
            [] => Err(format!(
                "{qualified} has no primary key: name a unique column with --id-column (AUTOEMBED_ID_COLUMN)"
            )),
            many => Err(format!(
                "the primary key of {qualified} has {} columns: name one unique column with --id-column (AUTOEMBED_ID_COLUMN)",
                many.len()
            )),
        },
    };
    let id = push(
        checks,
        "id_column",
        id.map(|c| (c, format!("{} ({}, unique)", c.name, c.type_sql))),
    );

    let text = match &cfg.text_template {
        None => {
            let text = match table.column(&cfg.text_column) {
                None => Err(missing(
                    &cfg.text_column,
                    "--text-column",
                    "AUTOEMBED_TEXT_COLUMN",
                )),
                Some(c) if c.category != "S" => Err(format!(
                    "text column {} is {}, not a text type (--text-column, AUTOEMBED_TEXT_COLUMN)",
                    quote_ident(&c.name),
                    c.type_sql
                )),
                Some(c) => Ok((c, format!("{} ({})", c.name, c.type_sql))),
            };
            push(checks, "text_column", text).map(Text::Column)
        }
        Some(template) => {
            let found: Result<Vec<&ColumnFacts>, String> = template
                .columns()
                .iter()
                .map(|c| {
                    table
                        .column(c)
                        .ok_or_else(|| missing(c, "--text-template", "AUTOEMBED_TEXT_TEMPLATE"))
                })
                .collect();
            match found {
                Ok(columns) => {
                    let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
                    checks.push(Check::pass(
                        "text_column",
                        format!("a template over {}", names.join(", ")),
                    ));
                    Some(Text::Template(template, columns))
                }
                Err(e) => {
                    checks.push(Check::fail("text_column", e));
                    None
                }
            }
        }
    };

    let (embedding, chunks) = match (&facts.chunks, id) {
        (None, _) => (
            push(
                checks,
                "embedding_column",
                embedding_column(cfg, table, &vector),
            )
            .zip(vector.as_ref())
            .map(|(c, v)| Embedding::of(c, v)),
            None,
        ),
        (Some(_), None) => (None, None),
        (Some(lookup), Some(id)) => {
            match chunks::chunks_table(cfg, table, id, lookup, &vector, checks) {
                Some((e, c)) => (Some(e), Some(c)),
                None => (None, None),
            }
        }
    };

    let (Some(id), Some(text), Some(embedding), Some(vector)) = (id, text, embedding, vector)
    else {
        return None;
    };
    let target = Target::new(
        table,
        id,
        text,
        embedding,
        chunks,
        vector,
        &cfg.state_schema,
    );
    if let Some(check) = dimension_check(cfg, &target) {
        checks.push(check);
    }
    Some(target)
}

/// The embedding column of `table` (the table's, or the chunks table's).
pub(super) fn embedding_column<'t>(
    cfg: &Config,
    table: &'t TableFacts,
    vector: &Option<VectorTypes>,
) -> Result<(&'t ColumnFacts, String), String> {
    let missing = |col: &str| {
        format!(
            "column {} not found in {} (--embedding-column, AUTOEMBED_EMBEDDING_COLUMN; the name is matched exactly, as the catalog stores it)",
            quote_ident(col),
            table.qualified()
        )
    };
    match (table.column(&cfg.embedding_column), vector) {
        (None, _) => Err(missing(&cfg.embedding_column)),
        (Some(c), Some(v)) if v.is_dense(c.type_oid) => Ok((c, format!("{} ({})", c.name, c.type_sql))),
        (Some(c), _) if c.type_sql.starts_with("sparsevec") => Err(format!(
            "embedding column {} is {}: embeddings APIs return dense vectors; use a vector(N) or halfvec(N) column (--embedding-column, AUTOEMBED_EMBEDDING_COLUMN)",
            quote_ident(&c.name),
            c.type_sql
        )),
        (Some(c), _) if c.type_sql.starts_with("bit") => Err(format!(
            "embedding column {} is {}: a binary vector is made from a dense one; embed into a vector(N) or halfvec(N) column and index binary_quantize(embedding)::bit(N) (--embedding-column, AUTOEMBED_EMBEDDING_COLUMN)",
            quote_ident(&c.name),
            c.type_sql
        )),
        (Some(c), _) => Err(format!(
            "embedding column {} is {}, not a pgvector vector or halfvec (--embedding-column, AUTOEMBED_EMBEDDING_COLUMN)",
            quote_ident(&c.name),
            c.type_sql
        )),
    }
}

/// What the role may do, judged for `mode`: a dry-run only reads the
/// table; setup creates the state schema; a run also writes the embedding
/// column and the state tables.
pub fn access_checks(mode: Mode, a: &Access, target: &Target, state_schema: &str) -> Vec<Check> {
    let role = quote_ident(&a.role);
    let table = &target.table;
    let writes = !matches!(mode, Mode::DryRun);
    let runs = !matches!(mode, Mode::DryRun | Mode::Setup);
    let mut checks = Vec::new();
    if writes {
        checks.push(match a.read_only {
            Some(why) => Check::fail(
                "writable",
                format!("the database is read-only ({why}): point DATABASE_URL at the primary"),
            ),
            None => Check::pass("writable", "the database takes writes"),
        });
    }
    if !matches!(mode, Mode::Setup) {
        let missing: Vec<String> = ["SELECT", "UPDATE"]
            .into_iter()
            .filter(|p| runs || *p == "SELECT")
            .filter_map(|p| {
                let cols: Vec<String> = a
                    .missing
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .map(|(_, c)| quote_ident(c))
                    .collect();
                (!cols.is_empty()).then(|| format!("{p} ({})", cols.join(", ")))
            })
            .collect();
        checks.push(if missing.is_empty() {
            Check::pass(
                "privileges",
                match &target.chunks {
                    None => format!("{role} may read the table and write the embedding column"),
                    Some(c) => format!("{role} may read the table and write {}", c.table),
                },
            )
        } else {
            Check::fail(
                "privileges",
                format!(
                    "{role} may not do what a run does on {table}: GRANT {} ON {table} TO {role}",
                    missing.join(", ")
                ),
            )
        });
        if let Some(chunks) = target.chunks.as_ref().filter(|_| runs) {
            if !a.chunk_grants.is_empty() {
                checks.push(Check::fail(
                    "privileges",
                    format!(
                        "{role} may not write the chunks table: GRANT {} ON {} TO {role}",
                        a.chunk_grants.join(", "),
                        chunks.table
                    ),
                ));
            }
        }
        let policy = |cmd: &str| {
            format!(
                "row-level security on {table} lets {role} {} no rows: add a policy (CREATE POLICY autoembed_{} ON {table} FOR {cmd} TO {role} USING (true)) or connect as a role with BYPASSRLS",
                if cmd == "SELECT" { "read" } else { "update" },
                cmd.to_lowercase()
            )
        };
        checks.push(match a.rls {
            Rls::NotApplied => Check::pass(
                "row_security",
                "row-level security does not apply to this role",
            ),
            Rls::Policies { select: false, .. } => Check::fail("row_security", policy("SELECT")),
            Rls::Policies { update: false, .. } if runs && target.chunks.is_none() => Check::fail(
                "row_security",
                format!(
                    "{} (the vectors would be paid for and never stored)",
                    policy("UPDATE")
                ),
            ),
            Rls::Policies { .. } => Check::warn(
                "row_security",
                format!(
                    "row-level security applies to {role}: rows its policies hide are not embedded"
                ),
            ),
        });
    }
    if writes {
        let schema = quote_ident(state_schema);
        let other = "or name another with --state-schema (AUTOEMBED_STATE_SCHEMA)";
        checks.push(match &a.state {
            StateAccess::Usable => Check::pass("state_schema", format!("{schema} is usable")),
            StateAccess::Creatable => Check::pass("state_schema", format!("{schema} will be created on first use")),
            StateAccess::NotCreatable => Check::fail(
                "state_schema",
                format!(
                    "the state schema {schema} does not exist and {role} may not create it: GRANT CREATE ON DATABASE {} TO {role}, run `autoembed setup` once as a role that may, {other}",
                    quote_ident(&a.database)
                ),
            ),
            StateAccess::Missing(grants) if runs => Check::fail(
                "state_schema",
                format!("{role} may not use the state schema: GRANT {} TO {role}, {other}", grants.join(", ")),
            ),
            StateAccess::Missing(_) => Check::pass("state_schema", format!("{schema} exists")),
        });
    }
    checks
}

pub(super) fn push<'a, T>(
    checks: &mut Vec<Check>,
    name: &'static str,
    r: Result<(&'a T, String), String>,
) -> Option<&'a T> {
    match r {
        Ok((value, detail)) => {
            checks.push(Check::pass(name, detail));
            Some(value)
        }
        Err(detail) => {
            checks.push(Check::fail(name, detail));
            None
        }
    }
}

/// The model's output size against the column, when both are known offline.
fn dimension_check(cfg: &Config, target: &Target) -> Option<Check> {
    let expected = cfg.provider.expected_dimensions()?;
    let column = target.dimensions?;
    let col = quote_ident(&target.embedding_column);
    Some(if expected == column {
        Check::pass(
            "dimensions",
            format!(
                "{} gives {expected}, {col} is vector({column})",
                cfg.provider.model
            ),
        )
    } else {
        Check::fail(
            "dimensions",
            dimension_mismatch(&cfg.provider.model, expected, &col, column),
        )
    })
}

pub fn dimension_mismatch(model: &str, got: u32, col: &str, column: u32) -> String {
    format!(
        "{model} returns {got} dimensions but {col} is vector({column}): set --dimensions {column} \
         (AUTOEMBED_DIMENSIONS) if the model accepts it, or use a matching model or column"
    )
}

fn key_check(cfg: &Config) -> Check {
    let p = &cfg.provider;
    match (&p.api_key, p.kind) {
        (Some(_), _) if p.vault_secret.is_some() => Check::pass(
            "api_key",
            format!(
                "read from the Vault secret {:?}",
                p.vault_secret.as_deref().unwrap_or_default()
            ),
        ),
        (Some(_), _) => Check::pass("api_key", format!("set in {}", p.key_var)),
        (None, ProviderKind::Compatible) => Check::pass("api_key", "none (the server needs none)"),
        (_, ProviderKind::Local) => Check::pass("api_key", "none (the local model needs none)"),
        (None, _) => Check::fail(
            "api_key",
            format!(
                "no API key for {}: set {} (or AUTOEMBED_API_KEY) in the environment or .env",
                p.kind.name(),
                p.key_var
            ),
        ),
    }
}
