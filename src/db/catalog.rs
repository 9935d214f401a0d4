//! What the catalog says about the configured table and its columns,
//! read before anything runs, without judging it (`checks` judges), and
//! the API key when it lives in Supabase Vault.

use super::sql::{cut, quote_ident};
use super::Db;
use crate::config::Config;
use crate::error::{describe_pg, Error, Result};
use postgres::types::Type;
use postgres::Client;

/// The name of the trigger `autoembed setup` puts on a table for one
/// embedding column (`autoembed_reset_embedding` for `embedding`, the name
/// earlier versions gave the table's one trigger).
pub fn reset_trigger(embedding_column: &str) -> String {
    format!("autoembed_reset_{}", cut(embedding_column, 47))
}

/// The trigger `setup --notify` adds: a NOTIFY when a row becomes pending.
pub fn notify_trigger(embedding_column: &str) -> String {
    format!("autoembed_notify_{}", cut(embedding_column, 46))
}

/// The channel of those notifications; the payload is the target's state key.
pub const NOTIFY_CHANNEL: &str = "autoembed";

impl Db {
    /// Whether `table` (`"schema"."name"`) has an enabled trigger `name`.
    pub fn has_trigger(&mut self, table: &str, name: &str) -> Result<bool> {
        Ok(self
            .client
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass \
                 AND tgname = $2 AND tgenabled <> 'D')",
                &[(&table, Type::TEXT), (&name, Type::TEXT)],
            )?
            .get(0))
    }
}

impl Db {
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
}

/// One partition of a partitioned table, under its parent.
#[derive(Debug, Clone)]
pub struct Partition {
    pub schema: String,
    pub name: String,
    /// The partition's parent: schema and name.
    pub parent: (String, String),
    /// A partition that holds rows itself (not partitioned again).
    pub leaf: bool,
}

impl Db {
    /// Whether the index `name` (schema-qualified, quoted) is valid; `None`
    /// when there is no such index.
    pub fn index_is_valid(&mut self, name: &str) -> Result<Option<bool>> {
        Ok(self
            .client
            .query_typed_opt(
                "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1::text)",
                &[(&name, Type::TEXT)],
            )?
            .map(|r| r.get(0)))
    }

    /// The predicate of the index `name` (schema-qualified, quoted) as
    /// `pg_get_expr` writes it; `None` when there is no such index.
    pub fn index_predicate(&mut self, name: &str) -> Result<Option<String>> {
        Ok(self
            .client
            .query_typed_opt(
                "SELECT coalesce(pg_get_expr(i.indpred, i.indrelid), '') FROM pg_index i \
                 WHERE i.indexrelid = to_regclass($1::text)",
                &[(&name, Type::TEXT)],
            )?
            .map(|r| r.get(0)))
    }

    /// The partitions of `table` (`"schema"."name"`) at every level, each
    /// after its parent; empty for a table that is not partitioned.
    pub fn partitions(&mut self, table: &str) -> Result<Vec<Partition>> {
        let rows = self.client.query_typed(
            "SELECT n.nspname::text, c.relname::text, pn.nspname::text, pc.relname::text, p.isleaf \
             FROM pg_partition_tree($1::text::regclass) p \
             JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_class pc ON pc.oid = p.parentrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace \
             WHERE p.level > 0 AND c.relkind IN ('r', 'p') ORDER BY p.level, c.relname",
            &[(&table, Type::TEXT)],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| Partition {
                schema: r.get(0),
                name: r.get(1),
                parent: (r.get(2), r.get(3)),
                leaf: r.get(4),
            })
            .collect())
    }
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
    /// The chunks table (`--chunks-table`), when one is named, and its
    /// name's parts as `parse_ident` reads them (for one to be created).
    pub chunks: Option<(TableLookup, Vec<String>)>,
    pub state: super::state::StateSchema,
}

#[derive(Debug, Clone)]
pub struct TableFacts {
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
    /// For a stored generated column, the columns its expression reads
    /// (in a `BEFORE` trigger its own new value is not computed yet).
    pub generated_from: Vec<String>,
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
    Ok(Facts {
        state: super::state::StateSchema::look_up(client, &cfg.state_schema)?,
        table: look_up(client, &cfg.table, &cfg.embedding_column)?,
        chunks: match &cfg.chunks {
            Some(c) => Some((
                look_up(client, &c.table, &cfg.embedding_column)?,
                client
                    .query_typed_one("SELECT parse_ident($1::text)", &[(&c.table, Type::TEXT)])
                    .map(|r| r.get(0))
                    .unwrap_or_default(),
            )),
            None => None,
        },
    })
}

/// The table `name` (as SQL writes it) and its columns; `embedding_column`
/// names the column setup's trigger and index are for.
fn look_up(client: &mut Client, name: &str, embedding_column: &str) -> Result<TableLookup> {
    let oid: Option<u32> = match client
        .query_typed_one("SELECT to_regclass($1::text)::oid", &[(&name, Type::TEXT)])
    {
        Ok(row) => row.get(0),
        Err(e) if e.as_db_error().is_some() => return Ok(TableLookup::Invalid(describe_pg(&e))),
        Err(e) => return Err(e.into()),
    };
    let Some(oid) = oid else {
        return Ok(TableLookup::NotFound);
    };
    let row = client.query_typed_one(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.reltuples::float8, \
                EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = $2 AND g.tgenabled <> 'D') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[
            (&oid, Type::OID),
            (&reset_trigger(embedding_column), Type::TEXT),
        ],
    )?;
    let columns = client
        .query_typed(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, \
                    t.typcategory::text, a.atttypmod, \
                    array(SELECT s.attname::text FROM pg_attrdef ad \
                          JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                           AND d.refobjid = ad.adrelid AND d.deptype = 'n' \
                          JOIN pg_attribute s ON s.attrelid = ad.adrelid AND s.attnum = d.refobjsubid \
                          WHERE a.attgenerated = 's' AND ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
                          ORDER BY s.attnum) \
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
            generated_from: r.get(5),
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
    let emb_null = format!("({} IS NULL)", quote_ident(embedding_column));
    let emb_null_bare = format!("({} IS NULL)", embedding_column);
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
    Ok(TableLookup::Found(TableFacts {
        schema: row.get(0),
        name: row.get(1),
        kind: row.get(2),
        columns,
        primary_key,
        unique_columns,
        has_pending_index,
        has_reset_trigger: row.get(4),
        estimated_rows: row.get(3),
    }))
}
