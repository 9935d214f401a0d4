//! A table autoembed has checked and can work on, with every identifier
//! quoted once, and the conditions that select its rows (pending, not held
//! back by a failure, not claimed by another run), each written once and
//! shared by the claim, dry-run and the counts.

use super::catalog::{ColumnFacts, TableFacts};
use super::sql::{backend_gone, has_text, quote_ident, quote_literal, text_hash, Params};
use super::VectorTypes;
use crate::config::Reembed;
use postgres::types::Type;

/// The table, its three columns and the state schema, checked and quoted.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"schema"."table"`.
    pub table: String,
    /// This table's and embedding column's key in the state tables,
    /// `"schema"."table"."column"`, so that two embedding columns of one
    /// table keep their claims, failures and models apart.
    pub key: String,
    /// The key earlier versions used (the table alone), adopted when the
    /// table has no other vector column ([`Target::sole_vector_column`]).
    pub legacy_key: String,
    /// The embedding column is the table's only vector column.
    pub sole_vector_column: bool,
    /// The table's schema and name as the catalog stores them.
    pub schema_name: String,
    pub table_name: String,
    pub id_column: String,
    /// Where the text comes from, for messages: `"column"`, or the template.
    pub text_label: String,
    /// The columns the text is read from (the text column, or a template's).
    pub text_columns: Vec<String>,
    /// The columns whose edit changes the text: those, except that a stored
    /// generated column stands for the columns its expression reads.
    pub text_sources: Vec<String>,
    /// The text's expression may appear in an index predicate (it is
    /// immutable: a column, or a template over text columns only).
    pub text_indexable: bool,
    pub embedding_column: String,
    /// N of `vector(N)`, when the column fixes it.
    pub dimensions: Option<u32>,
    /// A partitioned table (its rows live in partitions).
    pub partitioned: bool,
    /// The embedding column is `halfvec(N)` (written as half-precision floats).
    pub half: bool,
    /// `--chunks-table`: the text goes there in chunks, each with its
    /// vector (the embedding column is that table's).
    pub chunks: Option<ChunkTable>,
    pub(super) vector: VectorTypes,
    pub(super) sql: Quoted,
}

/// The embedding column as the checks found it (or, for a chunks table
/// that setup is about to create, as it will be).
pub struct Embedding {
    pub name: String,
    /// N of `vector(N)`, when the column fixes it.
    pub dimensions: Option<u32>,
    pub half: bool,
}

impl Embedding {
    pub fn of(c: &ColumnFacts, vector: &VectorTypes) -> Embedding {
        Embedding {
            name: c.name.clone(),
            dimensions: u32::try_from(c.typmod).ok().filter(|d| *d > 0),
            half: vector.is_half(c.type_oid),
        }
    }
}

/// `--chunks-table`: where a row's chunks and their vectors live. Its
/// columns are autoembed's own: `source_id` (the row's id), `chunk_index`
/// (from 0), `chunk_text`, `source_hash` (the hash of the row's text the
/// chunks were split from) and the embedding column.
#[derive(Debug, Clone)]
pub struct ChunkTable {
    /// `"schema"."table"`.
    pub table: String,
    pub schema_name: String,
    pub table_name: String,
    /// Whether it exists yet (`setup` creates it).
    pub exists: bool,
}

/// Where a row's text comes from, as the target is built from it.
pub enum Text<'a> {
    Column(&'a ColumnFacts),
    /// `--text-template` and the columns it names, each checked.
    Template(&'a crate::template::Template, Vec<&'a ColumnFacts>),
}

/// The quoted pieces every statement is built from.
#[derive(Debug, Clone)]
pub(super) struct Quoted {
    pub table: String,
    pub id: String,
    pub text: TextSql,
    pub embedding: String,
    /// The id column's type, as `format_type` writes it, for casts from text.
    pub id_type: String,
    pub state: String,
    /// The chunks table, `"schema"."table"`, when the text goes there.
    pub chunks: Option<String>,
}

/// A row's text in SQL: a quoted column, or a template's pieces (quoted
/// columns and literals), rendered by the database.
#[derive(Debug, Clone)]
pub(super) enum TextSql {
    Column(String),
    /// (is a column, quoted column or literal text).
    Template(Vec<(bool, String)>),
}

impl TextSql {
    /// The text of row `alias` (`t`); with an empty alias, of the row an
    /// index predicate or a trigger sees. A template's NULL column is empty.
    pub fn on(&self, alias: &str) -> String {
        let prefix = if alias.is_empty() {
            String::new()
        } else {
            format!("{alias}.")
        };
        match self {
            TextSql::Column(c) => format!("{prefix}{c}"),
            TextSql::Template(pieces) => {
                let parts: Vec<String> = pieces
                    .iter()
                    .map(|(column, s)| {
                        if *column {
                            format!("coalesce({prefix}{s}::text, '')")
                        } else {
                            quote_literal(s)
                        }
                    })
                    .collect();
                format!("({})", parts.join(" || "))
            }
        }
    }

    /// Whether row `alias` has text to send ([`has_text`]): for a template,
    /// some column it reads has (its literals alone are no text).
    pub fn has_text(&self, alias: &str) -> String {
        match self {
            TextSql::Column(_) => has_text(&self.on(alias)),
            TextSql::Template(pieces) => {
                let prefix = if alias.is_empty() {
                    String::new()
                } else {
                    format!("{alias}.")
                };
                let any: Vec<String> = pieces
                    .iter()
                    .filter(|(column, _)| *column)
                    .map(|(_, c)| has_text(&format!("{prefix}{c}")))
                    .collect();
                format!("({})", any.join(" OR "))
            }
        }
    }
}

/// Which rows a claim (or dry-run, or a count) selects.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'m> {
    /// Leave out rows that failed and are not due, or gave up
    /// (`--max-attempts`); false when there is no state schema yet.
    pub skip_failed: bool,
    pub max_attempts: i32,
    /// Leave out rows another worker holds; false when there is no claims table yet.
    pub skip_claimed: bool,
    /// Leave out rows a batch job holds; false when there is no such table yet.
    pub skip_batched: bool,
    /// Also rows that have a vector (`backfill --reembed`).
    pub reembed: Option<Reembedding<'m>>,
}

/// `backfill --reembed`: which rows with a vector are embedded again, and
/// the run's model they are judged against.
#[derive(Debug, Clone, Copy)]
pub struct Reembedding<'m> {
    pub which: Reembed,
    pub model: &'m str,
    pub dimensions: i32,
    /// The run's model made the rows without a record of their own.
    pub model_is_baseline: bool,
}

impl Target {
    /// Build the target for `table`. The caller has checked the columns.
    pub fn new(
        table: &TableFacts,
        id: &ColumnFacts,
        text: Text<'_>,
        embedding: Embedding,
        chunks: Option<ChunkTable>,
        vector: VectorTypes,
        state_schema: &str,
    ) -> Target {
        let (text_sql, text_label, text_columns, text_sources, text_indexable) = match &text {
            Text::Column(c) => (
                TextSql::Column(quote_ident(&c.name)),
                quote_ident(&c.name),
                vec![c.name.clone()],
                if c.generated_from.is_empty() {
                    vec![c.name.clone()]
                } else {
                    c.generated_from.clone()
                },
                true,
            ),
            Text::Template(t, columns) => {
                let mut sources: Vec<String> = Vec::new();
                for c in columns {
                    let from = if c.generated_from.is_empty() {
                        std::slice::from_ref(&c.name)
                    } else {
                        c.generated_from.as_slice()
                    };
                    for f in from {
                        if !sources.contains(f) {
                            sources.push(f.clone());
                        }
                    }
                }
                (
                    TextSql::Template(
                        t.pieces
                            .iter()
                            .map(|p| match p {
                                crate::template::Piece::Column(c) => (true, quote_ident(c)),
                                crate::template::Piece::Literal(l) => (false, l.clone()),
                            })
                            .collect(),
                    ),
                    format!(
                        "a template over {}",
                        t.columns()
                            .iter()
                            .map(|c| quote_ident(c))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    t.columns(),
                    sources,
                    columns.iter().all(|c| c.category == "S"),
                )
            }
        };
        let sql = Quoted {
            table: table.qualified(),
            id: quote_ident(&id.name),
            text: text_sql,
            embedding: quote_ident(&embedding.name),
            id_type: id.type_sql.clone(),
            state: quote_ident(state_schema),
            chunks: chunks.as_ref().map(|c| c.table.clone()),
        };
        let vector_columns = table
            .columns
            .iter()
            .filter(|c| vector.is_dense(c.type_oid))
            .count();
        Target {
            key: format!(
                "{}.{}",
                chunks.as_ref().map_or(&sql.table, |c| &c.table),
                sql.embedding
            ),
            legacy_key: sql.table.clone(),
            sole_vector_column: vector_columns == 1,
            table: sql.table.clone(),
            schema_name: table.schema.clone(),
            table_name: table.name.clone(),
            id_column: id.name.clone(),
            text_label,
            text_columns,
            text_sources,
            text_indexable,
            embedding_column: embedding.name,
            dimensions: embedding.dimensions,
            partitioned: table.kind == "p",
            half: embedding.half,
            chunks,
            vector,
            sql,
        }
    }

    /// The array type a batch's vectors are bound as: `vector[]`, or
    /// `halfvec[]` for a `halfvec` column.
    pub(super) fn vector_array(&self) -> postgres::types::Type {
        match &self.vector.half {
            Some((_, array)) if self.half => array.clone(),
            _ => self.vector.array.clone(),
        }
    }

    /// The id column's type, as `format_type` writes it.
    pub fn id_type(&self) -> &str {
        &self.sql.id_type
    }

    /// Whether a row has text to send, as an index predicate says it (no alias).
    pub fn has_text_sql(&self) -> String {
        self.sql.text.has_text("")
    }

    /// The schema of the pgvector extension (for a function's `search_path`).
    pub fn vector_schema(&self) -> &str {
        self.vector.scalar.schema()
    }

    /// Rows of `t` that need an embedding: none yet, and [`Target::sendable`].
    pub(super) fn pending(&self) -> String {
        format!("{} AND {}", self.lacks_vector("t"), self.sendable())
    }

    /// Whether row `alias` has its vector: in its embedding column, or,
    /// with a chunks table, chunks (setup's trigger deletes them when the
    /// text is edited). A probe of the chunks table's key: the text is not
    /// read, so a tick on a table of long documents costs what one on
    /// short rows does.
    pub(super) fn has_vector(&self, alias: &str) -> String {
        let Quoted {
            id,
            embedding,
            chunks,
            ..
        } = &self.sql;
        match chunks {
            None => format!("{alias}.{embedding} IS NOT NULL"),
            Some(chunks) => format!(
                "EXISTS (SELECT 1 FROM {chunks} k WHERE k.source_id = {alias}.{id} AND k.chunk_index = 0)"
            ),
        }
    }

    /// The negation of [`Target::has_vector`], written as setup's partial
    /// index predicate writes it (`embedding IS NULL`), so that the planner
    /// matches the two without having to simplify a `NOT`.
    pub(super) fn lacks_vector(&self, alias: &str) -> String {
        match &self.sql.chunks {
            None => format!("{alias}.{} IS NULL", self.sql.embedding),
            Some(_) => format!("NOT {}", self.has_vector(alias)),
        }
    }

    /// Rows of `t` that can be embedded at all: an id to write the vector
    /// back by (a nullable unique column can hold NULLs), and some text.
    fn sendable(&self) -> String {
        format!("{} AND {}", self.has_id(), self.sql.text.has_text("t"))
    }

    /// Rows of `t` whose id is not NULL: the only rows autoembed can claim and write.
    pub(super) fn has_id(&self) -> String {
        format!("t.{} IS NOT NULL", self.sql.id)
    }

    /// The rows of `t` a claim may take: those `sel` selects, after
    /// `cursor` (an id, as text) when there is one. Returns the bound
    /// table key and the condition.
    pub(super) fn candidates<'a>(
        &'a self,
        sel: &'a Selection<'a>,
        cursor: &'a Option<&'a str>,
        p: &mut Params<'a>,
    ) -> (String, String) {
        let key = p.bind(&self.key, Type::TEXT);
        let mut cond = self.selected(sel, &key, p);
        if cursor.is_some() {
            cond += &format!(
                " AND t.{} > {}::text::{}",
                self.sql.id,
                p.bind(cursor, Type::TEXT),
                self.sql.id_type
            );
        }
        (key, cond)
    }

    /// The rows of `t` that `sel` selects; `key` is the bound table key.
    pub(super) fn selected<'a>(
        &'a self,
        sel: &'a Selection<'a>,
        key: &str,
        p: &mut Params<'a>,
    ) -> String {
        let Quoted {
            id, text, state, ..
        } = &self.sql;
        let mut cond = match &sel.reembed {
            None => self.pending(),
            Some(Reembedding {
                which: Reembed::All,
                ..
            }) => self.sendable(),
            Some(r) => {
                let model = p.bind(&r.model, Type::TEXT);
                let dims = p.bind(&r.dimensions, Type::INT4);
                let listed = |cond: &str| {
                    format!(
                        "EXISTS (SELECT 1 FROM {state}.vectors r WHERE r.table_name = {key} \
                         AND r.row_id = t.{id}::text AND {cond})"
                    )
                };
                let made_by_other = if r.model_is_baseline {
                    listed(&format!("(r.model <> {model} OR r.dimensions <> {dims})"))
                } else {
                    format!(
                        "NOT {}",
                        listed(&format!("r.model = {model} AND r.dimensions = {dims}"))
                    )
                };
                format!(
                    "{} AND ({} OR {made_by_other})",
                    self.sendable(),
                    self.lacks_vector("t")
                )
            }
        };
        if sel.skip_failed {
            let max_attempts = p.bind(&sel.max_attempts, Type::INT4);
            cond += &format!(
                " AND NOT EXISTS (SELECT 1 FROM {state}.failures f WHERE f.table_name = {key} \
                 AND f.row_id = t.{id}::text AND f.text_hash = {hash} \
                 AND (f.attempts >= {max_attempts} OR f.next_try_at > now()))",
                hash = text_hash(&text.on("t"))
            );
        }
        if sel.skip_claimed {
            // A probe of the table's few live claims, of whose ids only a
            // claim whose range covers the row looks through; and none at
            // all for a row past every claim's last id (computed once: the
            // run's own claims all end before its cursor). `OFFSET 0`
            // keeps the probe a probe.
            let id_type = &self.sql.id_type;
            cond += &format!(
                " AND (coalesce(t.{id} > (SELECT c.last_id::{id_type} FROM {state}.claims c \
                   WHERE c.table_name = {key} ORDER BY 1 DESC LIMIT 1), true) \
                 OR NOT EXISTS (SELECT 1 FROM {state}.claims c WHERE c.table_name = {key} \
                   AND t.{id} >= c.first_id::{id_type} AND t.{id} <= c.last_id::{id_type} \
                   AND t.{id}::text = ANY (c.row_ids) AND NOT {} OFFSET 0))",
                lapsed("c"),
            );
        }
        if sel.skip_batched {
            // Evaluated once, the first test spares a table without jobs
            // any probe; with jobs, each row is one index probe.
            cond += &format!(
                " AND (NOT EXISTS (SELECT 1 FROM {state}.batch_jobs j WHERE j.table_name = {key}) \
                 OR NOT EXISTS (SELECT 1 FROM {state}.batch_rows b WHERE b.table_name = {key} \
                   AND b.row_id = t.{id}::text))"
            );
        }
        cond
    }
}

/// A claim (alias `c`) that no longer holds its row: its lease has expired,
/// or it names a backend that is gone ([`backend_gone`]).
pub(super) fn lapsed(c: &str) -> String {
    format!(
        "({c}.expires_at < now() OR ({c}.backend_pid IS NOT NULL AND {}))",
        backend_gone(&format!("{c}.backend_pid"), &format!("{c}.backend_start"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_renders_quoted_columns_and_literals_with_nulls_empty() {
        let t = TextSql::Template(vec![
            (true, quote_ident("name")),
            (false, " by O'Brien ".into()),
            (true, quote_ident("My \"Brand\"")),
        ]);
        assert_eq!(
            t.on("t"),
            "(coalesce(t.\"name\"::text, '') || ' by O''Brien ' || coalesce(t.\"My \"\"Brand\"\"\"::text, ''))"
        );
        assert_eq!(
            t.on(""),
            "(coalesce(\"name\"::text, '') || ' by O''Brien ' || coalesce(\"My \"\"Brand\"\"\"::text, ''))"
        );
        // Its literals alone are no text: some column must have some.
        assert_eq!(
            t.has_text("t"),
            format!(
                "({} OR {})",
                has_text("t.\"name\""),
                has_text("t.\"My \"\"Brand\"\"\"")
            )
        );
        let c = TextSql::Column(quote_ident("body"));
        assert_eq!(c.on("s"), "s.\"body\"");
        assert_eq!(c.has_text("s"), has_text("s.\"body\""));
    }
}
