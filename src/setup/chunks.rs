//! `setup` for a chunked target (`--chunks-table`): the chunks table, with
//! a foreign key to the source table (`ON DELETE CASCADE`: a deleted row
//! leaves no chunk) and the HNSW index a similarity search needs; the
//! trigger that deletes a row's chunks when its text is edited (so the row
//! is pending again, and no stale chunk is found meanwhile); and the
//! bookkeeping schema. A row is pending when it has text and no chunk: a
//! probe of the chunks table's key, without reading the text.
//!
//! `--uninstall` leaves the chunks table, whose vectors were paid for:
//! `DROP TABLE` it when it is no longer wanted.

use super::{failed, Objects};
use crate::db::chunks::row_lock;
use crate::db::sql::{cut, dollar_quote, quote_ident, quote_literal};
use crate::db::target::Target;
use crate::db::{state, Db, MAX_INDEXED_VECTOR};
use crate::error::{Error, Result};

/// What setup creates for a chunks table, quoted.
pub struct ChunkObjects {
    /// `"schema"."table"`.
    table: String,
    source: String,
    source_id: String,
    id_type: String,
    embedding: String,
    /// `"<vector schema>".vector(N)` or `halfvec(N)`, with its cosine operator class.
    column_type: String,
    opclass: String,
    /// `"schema"."<table>_<column>_hnsw"`, and the name alone.
    index: String,
    index_name: String,
    /// pgvector indexes `vector` only up to 2,000 dimensions.
    too_wide: Option<u32>,
}

impl ChunkObjects {
    /// The objects of `target`'s chunks table; `None` without one.
    pub fn new(target: &Target) -> Option<ChunkObjects> {
        let chunks = target.chunks.as_ref()?;
        let vector_schema = quote_ident(target.vector_schema());
        let (kind, ops) = if target.half {
            ("halfvec", "halfvec_cosine_ops")
        } else {
            ("vector", "vector_cosine_ops")
        };
        let index_name = format!(
            "{}_{}_hnsw",
            cut(&chunks.table_name, 40),
            cut(&target.embedding_column, 16)
        );
        Some(ChunkObjects {
            table: chunks.table.clone(),
            source: target.table.clone(),
            source_id: quote_ident(&target.id_column),
            id_type: target.id_type().to_string(),
            embedding: quote_ident(&target.embedding_column),
            column_type: match target.dimensions {
                Some(n) => format!("{vector_schema}.{kind}({n})"),
                None => format!("{vector_schema}.{kind}"),
            },
            opclass: format!("{vector_schema}.{ops}"),
            index: format!(
                "{}.{}",
                quote_ident(&chunks.schema_name),
                quote_ident(&index_name)
            ),
            index_name: quote_ident(&index_name),
            too_wide: target
                .dimensions
                .filter(|n| !target.half && *n > MAX_INDEXED_VECTOR),
        })
    }

    /// The chunks table, `"schema"."table"`.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The trigger that deletes a row's chunks when its text is edited,
    /// under the row's lock ([`row_lock`]) so that a write in progress
    /// either sees the edit or is deleted by it. It runs as setup's role
    /// (`SECURITY DEFINER`, with its own `search_path`), so the
    /// application's role needs no grant on the chunks table.
    fn trigger_sql(&self, o: &Objects) -> String {
        let Objects {
            table,
            sources,
            function,
            trigger,
            id,
            ..
        } = o;
        let body = dollar_quote(&format!(
            "
BEGIN
  IF ({}) THEN
    PERFORM {};
    DELETE FROM {} WHERE source_id = OLD.{id};
  END IF;
  RETURN NULL;
END
",
            o.edited(),
            row_lock(&quote_literal(&o.keys[0]), &format!("OLD.{id}::text")),
            self.table
        ));
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS {body};
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} AFTER UPDATE OF {columns} ON {table}
  FOR EACH ROW EXECUTE FUNCTION {function}();
ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger};",
            columns = sources.join(", "),
        )
    }

    /// The table and its index; idempotent.
    fn table_sql(&self) -> Result<String> {
        let ChunkObjects {
            table,
            source,
            source_id,
            id_type,
            embedding,
            column_type,
            opclass,
            index_name,
            ..
        } = self;
        if let Some(n) = self.too_wide {
            return Err(Error::Config(format!(
                "{embedding} of {table} is vector({n}), and pgvector indexes vector only up to {MAX_INDEXED_VECTOR} dimensions: \
                 make it halfvec({n}) (ALTER TABLE {table} ALTER COLUMN {embedding} TYPE halfvec({n})), or set --dimensions (AUTOEMBED_DIMENSIONS) lower"
            )));
        }
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {table} (
  source_id {id_type} NOT NULL REFERENCES {source} ({source_id}) ON DELETE CASCADE,
  chunk_index integer NOT NULL,
  chunk_text text NOT NULL,
  source_hash bigint NOT NULL,
  {embedding} {column_type} NOT NULL,
  PRIMARY KEY (source_id, chunk_index)
);
CREATE INDEX IF NOT EXISTS {index_name} ON {table} USING hnsw ({embedding} {opclass});"
        ))
    }

    /// The whole setup as one script, for `setup --print-sql`.
    pub fn print_sql(&self, o: &Objects, state_schema: &str, how: crate::config::Setup) -> String {
        if how.uninstall {
            return format!(
                "-- autoembed setup --uninstall for {} (chunks in {}, which stays)\n{}\n",
                self.source,
                self.table,
                o.uninstall_sql(state_schema)
            );
        }
        let table = self.table_sql().unwrap_or_else(|e| format!("-- {e}"));
        format!(
            "-- autoembed setup for {source}, chunked into {chunks}: generated by `autoembed setup --print-sql`.\n\
             -- Idempotent; paste into a migration (e.g. supabase/migrations/<timestamp>_autoembed.sql).\n\n\
             -- Bookkeeping: rows being embedded (claims), rows the provider rejected, which model made the vectors.\n{state}\n\n\
             -- The chunks of each row, replaced when its text changes, gone when it is deleted;\n\
             -- and the index a similarity search over them uses.\n{table}\n\n\
             -- Re-embed a row when its text changes: delete its chunks.\n{trigger}\n{notify}",
            trigger = self.trigger_sql(o),
            source = self.source,
            chunks = self.table,
            state = state::ddl(state_schema),
            notify = if how.notify {
                format!(
                    "\n-- Wake `autoembed watch` when a row is inserted or its text edited (NOTIFY at commit).\n{}\n",
                    o.notify_sql()
                )
            } else {
                String::new()
            },
        )
    }

    /// Run setup in one transaction (`--uninstall` is the table's own:
    /// [`super::run`]): it completes or changes nothing. The chunks table is autoembed's own, so building its
    /// index in the transaction holds back only autoembed's writes.
    pub fn run(
        &self,
        db: &mut Db,
        o: &Objects,
        state_schema: &str,
        how: crate::config::Setup,
    ) -> Result<Vec<String>> {
        let table = self.table_sql()?;
        db.in_transaction(|tx| {
            tx.batch_execute(&state::ddl(state_schema))
                .map_err(|e| failed("state schema", &e))?;
            tx.batch_execute(&table)
                .map_err(|e| failed("chunks table", &e))?;
            tx.batch_execute(&self.trigger_sql(o))
                .map_err(|e| failed("trigger", &e))?;
            if how.notify {
                tx.batch_execute(&o.notify_sql())
                    .map_err(|e| failed("notify trigger", &e))?;
            }
            Ok(())
        })?;
        let mut done = vec![
            format!("state schema {} ready", quote_ident(state_schema)),
            format!("chunks table {} ready", self.table),
            format!("index {} on {} ready", self.index, self.table),
            format!("trigger {} on {} ready", o.trigger, self.source),
        ];
        if how.notify {
            done.push(format!("NOTIFY trigger on {} ready", self.source));
        }
        for what in &done {
            crate::info!("{what}");
        }
        Ok(done)
    }
}
