//! The rules a chunks table (`--chunks-table`) must meet: a plain table
//! with the columns and the key a run writes, or, for `setup`, one it can
//! create (its name, and the size of the model's vectors).

use super::{embedding_column, push, Check};
use crate::config::{Config, Mode};
use crate::db::catalog::{ColumnFacts, TableFacts, TableLookup};
use crate::db::target::{ChunkTable, Embedding};
use crate::db::{quote_ident, VectorTypes};

/// `--chunks-table`: the table exists with the columns a run writes (or,
/// for `setup`, will be created); returns its embedding column and place.
pub(super) fn chunks_table(
    cfg: &Config,
    source: &TableFacts,
    id: &ColumnFacts,
    (lookup, parts): &(TableLookup, Vec<String>),
    vector: &Option<VectorTypes>,
    checks: &mut Vec<Check>,
) -> Option<(Embedding, ChunkTable)> {
    let flag = "--chunks-table, AUTOEMBED_CHUNKS_TABLE";
    let name = cfg.chunks.as_ref().map_or("", |c| c.table.as_str());
    let table = match lookup {
        TableLookup::Found(t) if t.kind == "r" => t,
        TableLookup::Found(t) => {
            return refuse(
                checks,
                format!("{} is not a plain table ({flag})", t.qualified()),
            );
        }
        TableLookup::Invalid(msg) => {
            return refuse(
                checks,
                format!("{flag} {name:?} is not a valid table name: {msg}"),
            );
        }
        TableLookup::NotFound if cfg.mode != Mode::Setup => {
            return refuse(checks, format!("chunks table {name:?} not found ({flag}): `autoembed setup` creates it (`setup --print-sql` prints its DDL)"));
        }
        TableLookup::NotFound => {
            // Setup creates it, in the source table's schema unless named.
            let (schema, table_name) = match parts.as_slice() {
                [name] => (source.schema.clone(), name.clone()),
                [schema, name] => (schema.clone(), name.clone()),
                _ => {
                    return refuse(
                        checks,
                        format!("{flag} {name:?}: name a table as schema.table"),
                    );
                }
            };
            let Some(dimensions) = cfg.provider.expected_dimensions() else {
                return refuse(checks, format!(
                        "setup creates the chunks table, and the size of {}'s vectors is not known: set --dimensions (AUTOEMBED_DIMENSIONS)",
                        cfg.provider.model
                    ));
            };
            let chunks = ChunkTable {
                table: format!("{}.{}", quote_ident(&schema), quote_ident(&table_name)),
                schema_name: schema,
                table_name,
                exists: false,
            };
            checks.push(Check::pass(
                "chunks_table",
                format!("{} will be created", chunks.table),
            ));
            let embedding = Embedding {
                name: cfg.embedding_column.clone(),
                dimensions: Some(dimensions),
                half: dimensions > crate::db::MAX_INDEXED_VECTOR,
            };
            return Some((embedding, chunks));
        }
    };
    // The columns a run reads and writes, of the types it binds.
    let wanted = [
        ("source_id", id.type_sql.as_str()),
        ("chunk_index", "integer"),
        ("chunk_text", "text"),
        ("source_hash", "bigint"),
    ];
    for (column, type_sql) in wanted {
        if table.column(column).is_none_or(|c| c.type_sql != type_sql) {
            return refuse(checks, format!(
                    "chunks table {} has no column {column} {type_sql} ({flag}): autoembed writes source_id, chunk_index, chunk_text, source_hash and the embedding; `autoembed setup --print-sql` shows the table it expects",
                    table.qualified()
                ));
        }
    }
    if table.primary_key != ["source_id", "chunk_index"] {
        return refuse(checks, format!(
                "chunks table {} needs PRIMARY KEY (source_id, chunk_index) ({flag}): a row's chunks are replaced by it",
                table.qualified()
            ));
    }
    checks.push(Check::pass(
        "chunks_table",
        format!("{} (chunks of {})", table.qualified(), source.qualified()),
    ));
    let embedding = push(
        checks,
        "embedding_column",
        embedding_column(cfg, table, vector),
    )?;
    let embedding = Embedding::of(embedding, vector.as_ref()?);
    Some((
        embedding,
        ChunkTable {
            table: table.qualified(),
            schema_name: table.schema.clone(),
            table_name: table.name.clone(),
            exists: true,
        },
    ))
}

/// A failed `chunks_table` check: the one line that says what to fix.
fn refuse<T>(checks: &mut Vec<Check>, why: String) -> Option<T> {
    checks.push(Check::fail("chunks_table", why));
    None
}
