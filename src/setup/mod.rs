//! `autoembed setup`: what a table needs for long-term use, as DDL that is
//! run, printed for a migration file, or reversed.
//!
//! - a trigger that sets the embedding to NULL when the text changes (and
//!   only then), so edited rows become pending and the next run re-embeds them;
//! - a partial index on the id of rows without an embedding, so finding
//!   pending rows stays cheap on large tables;
//! - the bookkeeping schema (failed rows);
//! - with `--chunks-table`, instead of the trigger and the index: the
//!   chunks table and its similarity index ([`chunks`]).
//!
//! Everything is idempotent. Identifiers are quoted; nothing from
//! configuration is pasted.

mod chunks;

use crate::db::catalog::{notify_trigger, reset_trigger, NOTIFY_CHANNEL};
use crate::db::sql::{cut, dollar_quote, quote_literal};
use crate::db::target::Target;
use crate::db::{quote_ident, state, Db};
use crate::error::{describe_pg, Error, Result};

/// Names of the objects setup creates for one table.
pub struct Objects {
    table: String,
    id: String,
    /// The columns whose edit changes the text, quoted.
    sources: Vec<String>,
    embedding: String,
    /// Schema-qualified, quoted.
    function: String,
    /// The function's own `search_path`: it must not depend on the caller's
    /// (a subscription's apply worker runs with an empty one, where
    /// pgvector's `=` is not found).
    search_path: String,
    trigger: String,
    /// The index's predicate: the rows a run selects (no vector, some text).
    queue_rows: String,
    /// Whether the table is partitioned (its index is built partition by partition).
    partitioned: bool,
    index: IndexName,
    /// The embedding column, unquoted: part of the index's name on each partition.
    column: String,
    /// What earlier versions created (named by the table alone, so that a
    /// second embedding column replaced the first one's): the index
    /// (`WHERE <embedding> IS NULL`, blank rows included) and the trigger
    /// function, dropped once the new ones are there.
    old_index: IndexName,
    old_function: String,
    /// This column's key in the state tables, and the table's key of earlier versions.
    keys: [String; 2],
    /// `--notify`: the function and trigger that send a NOTIFY for `watch`.
    notify_function: String,
    notify_trigger: String,
    /// The text goes to a chunks table ([`chunks`]): no trigger or queue
    /// index on the table, whose rows are pending by their text's hash.
    chunked: bool,
}

/// The index setup builds on a table or a partition:
/// `<table>_<embedding column>_autoembed_queue`.
const INDEX: &str = "autoembed_queue";

/// An index's schema and name, quoted (an index lives in its table's schema).
struct IndexName {
    schema: String,
    name: String,
}

impl IndexName {
    /// Setup's index for `column` on table `name` of `schema`.
    fn new(schema: &str, name: &str, column: &str) -> IndexName {
        IndexName {
            schema: quote_ident(schema),
            name: quote_ident(&format!("{}_{INDEX}", per_column(name, column))),
        }
    }

    fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl Objects {
    pub fn new(target: &Target) -> Objects {
        let base = per_column(&target.table_name, &target.embedding_column);
        let old_base = cut(&target.table_name, 40);
        let schema = quote_ident(&target.schema_name);
        let embedding = quote_ident(&target.embedding_column);
        Objects {
            table: target.table.clone(),
            id: quote_ident(&target.id_column),
            sources: target.text_sources.iter().map(|c| quote_ident(c)).collect(),
            queue_rows: if target.text_indexable {
                format!("{embedding} IS NULL AND {}", target.has_text_sql())
            } else {
                // A template over other types reads casts that are not
                // immutable (a timestamp's text depends on the session).
                format!("{embedding} IS NULL")
            },
            embedding,
            function: format!(
                "{schema}.{}",
                quote_ident(&format!("{base}_autoembed_reset"))
            ),
            search_path: format!("pg_catalog, {}", quote_ident(target.vector_schema())),
            trigger: quote_ident(&reset_trigger(&target.embedding_column)),
            partitioned: target.partitioned,
            index: IndexName::new(
                &target.schema_name,
                &target.table_name,
                &target.embedding_column,
            ),
            column: target.embedding_column.clone(),
            old_index: IndexName {
                schema: schema.clone(),
                name: quote_ident(&format!("{old_base}_autoembed_pending")),
            },
            old_function: format!(
                "{schema}.{}",
                quote_ident(&format!("{old_base}_autoembed_reset"))
            ),
            keys: [target.key.clone(), target.legacy_key.clone()],
            notify_function: format!(
                "{schema}.{}",
                quote_ident(&format!("{base}_autoembed_notify"))
            ),
            notify_trigger: quote_ident(&notify_trigger(&target.embedding_column)),
            chunked: target.chunks.is_some(),
        }
    }

    /// The partial index on the rows a run selects: blank rows are not in
    /// it, so they cost nothing per run. `CONCURRENTLY` keeps writes flowing
    /// while it builds (not inside a transaction, so migrations get the plain
    /// form; nor on a partitioned table, where the plain form builds every
    /// partition's index while holding writes back; `autoembed setup` builds
    /// them one by one, concurrently).
    pub fn index_sql(&self, concurrently: bool) -> String {
        let how = if concurrently && !self.partitioned {
            IndexBuild::Concurrently
        } else {
            IndexBuild::Plain
        };
        self.index_on(&self.index, &self.table, how)
    }

    /// The index `index` on `table` (the table or one of its partitions).
    fn index_on(&self, index: &IndexName, table: &str, how: IndexBuild) -> String {
        let (concurrently, only) = match how {
            IndexBuild::Plain => ("", ""),
            IndexBuild::Concurrently => ("CONCURRENTLY ", ""),
            IndexBuild::OnlyThis => ("", "ONLY "),
        };
        format!(
            "CREATE INDEX {concurrently}IF NOT EXISTS {} ON {only}{table} ({}) WHERE {};",
            index.name, self.id, self.queue_rows
        )
    }

    /// The trigger function and trigger. It fires on an edit of the
    /// columns the text comes from (the text column, or the columns a
    /// generated text column reads: in a `BEFORE` trigger `NEW` does not
    /// hold a generated value yet), compares their bytes (a case-only edit
    /// under `citext` or a nondeterministic collation is an edit), and fires
    /// for changes applied by logical replication too (`ENABLE ALWAYS`).
    /// An UPDATE that changes the text but also sets the embedding itself
    /// keeps that embedding.
    pub fn trigger_sql(&self) -> String {
        let Objects {
            table,
            sources,
            embedding,
            function,
            search_path,
            trigger,
            ..
        } = self;
        let edited = self.edited();
        let body = dollar_quote(&format!(
            "
BEGIN
  IF ({edited})
     AND NEW.{embedding} IS NOT DISTINCT FROM OLD.{embedding} THEN
    NEW.{embedding} := NULL;
  END IF;
  RETURN NEW;
END
"
        ));
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
  SET search_path = {search_path} AS {body};
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} BEFORE UPDATE OF {columns} ON {table}
  FOR EACH ROW EXECUTE FUNCTION {function}();
ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger};
{old}",
            columns = sources.join(", "),
            old = self.old_function_sql(),
        )
    }

    /// Whether an UPDATE edited the text: the bytes (a case-only edit under
    /// `citext` or a nondeterministic collation is an edit) of a column it
    /// comes from.
    fn edited(&self) -> String {
        self.sources
            .iter()
            .map(|c| {
                format!("NEW.{c}::text COLLATE \"C\" IS DISTINCT FROM OLD.{c}::text COLLATE \"C\"")
            })
            .collect::<Vec<_>>()
            .join("\n      OR ")
    }

    /// `setup --notify`: after a row becomes pending (inserted without a
    /// vector, or its text edited), a NOTIFY on [`NOTIFY_CHANNEL`] with this
    /// column's state key, which `watch` listens for. PostgreSQL sends one
    /// notification per transaction for any number of rows, at commit.
    pub fn notify_sql(&self) -> String {
        let Objects {
            table,
            sources,
            embedding,
            notify_function: function,
            notify_trigger: trigger,
            keys,
            chunked,
            ..
        } = self;
        let body = dollar_quote(&format!(
            "
BEGIN
  PERFORM pg_notify({}, {});
  RETURN NULL;
END
",
            quote_literal(NOTIFY_CHANNEL),
            quote_literal(&keys[0])
        ));
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
  SET search_path = pg_catalog AS {body};
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OF {columns} ON {table}
  FOR EACH ROW {when}EXECUTE FUNCTION {function}();
ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger};",
            // With a chunks table every insert and text edit is pending.
            columns = if *chunked {
                sources.join(", ")
            } else {
                format!("{}, {embedding}", sources.join(", "))
            },
            when = if *chunked {
                String::new()
            } else {
                format!("WHEN (NEW.{embedding} IS NULL) ")
            },
        )
    }

    /// Drop the trigger function an earlier version made for this column
    /// (named by the table alone), with its trigger; one it made for
    /// another column stays until setup runs for that one.
    fn old_function_sql(&self) -> String {
        let clears = quote_literal(&format!("NEW.{} := NULL", self.embedding));
        let function = quote_literal(&format!("{}()", self.old_function));
        format!(
            "DO {};",
            dollar_quote(&format!(
                " BEGIN
  IF position({clears} in coalesce((SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure({function})), '')) > 0 THEN
    DROP FUNCTION {}() CASCADE;
  END IF;
END ",
                self.old_function
            ))
        )
    }

    /// Whether `predicate` (an index's, as `pg_get_expr` writes it) is the
    /// one earlier versions gave this column's index.
    fn is_old_predicate(&self, predicate: &str) -> bool {
        predicate.contains(&format!("({} IS NULL)", self.embedding))
            || predicate.contains(&format!("({} IS NULL)", self.column))
    }

    /// Drop the index an earlier version made for this column (in a migration).
    fn old_index_sql(&self) -> String {
        let index = quote_literal(&self.old_index.qualified());
        let [quoted, bare] = [
            format!("({} IS NULL)", self.embedding),
            format!("({} IS NULL)", self.column),
        ]
        .map(|p| quote_literal(&p));
        format!(
            "DO {};",
            dollar_quote(&format!(
                " DECLARE p text := coalesce((SELECT pg_get_expr(indpred, indrelid) FROM pg_index \
                   WHERE indexrelid = to_regclass({index})), '');
BEGIN
  IF position({quoted} in p) > 0 OR position({bare} in p) > 0 THEN
    DROP INDEX {};
  END IF;
END ",
                self.old_index.qualified()
            ))
        )
    }

    pub fn uninstall_sql(&self, state_schema: &str) -> String {
        let s = quote_ident(state_schema);
        format!(
            "DROP TRIGGER IF EXISTS {trigger} ON {table};
DROP FUNCTION IF EXISTS {function}();
DROP TRIGGER IF EXISTS {notify_trigger} ON {table};
DROP FUNCTION IF EXISTS {notify_function}();
DROP INDEX IF EXISTS {index};
{old_index}
{old_function}
DO {body};",
            notify_trigger = self.notify_trigger,
            notify_function = self.notify_function,
            trigger = self.trigger,
            table = self.table,
            function = self.function,
            index = self.index.qualified(),
            old_index = self.old_index_sql(),
            old_function = self.old_function_sql(),
            body = dollar_quote(&format!(
                " BEGIN
  IF to_regclass('{s_lit}.batch_jobs') IS NOT NULL THEN
    IF EXISTS (SELECT 1 FROM {s}.batch_jobs WHERE table_name IN ({keys})) THEN
      RAISE EXCEPTION 'the table has batch jobs in flight at the provider: cancel them (autoembed batch-jobs --cancel all), let a run collect them, then uninstall';
    END IF;
  END IF;
  IF to_regclass('{s_lit}.failures') IS NOT NULL THEN
    DELETE FROM {s}.failures WHERE table_name IN ({keys});
    IF to_regclass('{s_lit}.vectors') IS NOT NULL THEN
      DELETE FROM {s}.models WHERE table_name IN ({keys});
      DELETE FROM {s}.vectors WHERE table_name IN ({keys});
      IF to_regclass('{s_lit}.claims') IS NOT NULL THEN
        DELETE FROM {s}.claims WHERE table_name IN ({keys});
      END IF;
      IF NOT EXISTS (SELECT 1 FROM {s}.failures) AND NOT EXISTS (SELECT 1 FROM {s}.models)
         AND (to_regclass('{s_lit}.batch_jobs') IS NULL OR NOT EXISTS (SELECT 1 FROM {s}.batch_jobs)) THEN
        DROP SCHEMA {s} CASCADE;
      END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM {s}.failures) THEN
      DROP SCHEMA {s} CASCADE;
    END IF;
  END IF;
END ",
                s_lit = s.replace('\'', "''"),
                keys = self
                    .keys
                    .iter()
                    .map(|k| quote_literal(k))
                    .collect::<Vec<_>>()
                    .join(", "),
            ))
        )
    }
}

/// How an index is built.
#[derive(Clone, Copy)]
enum IndexBuild {
    /// In one statement, holding writes back while it builds (a migration).
    Plain,
    /// Beside the writes (`autoembed setup`).
    Concurrently,
    /// On a partitioned table alone, to which the partitions' indexes are attached.
    OnlyThis,
}

/// The whole setup as one script, for `setup --print-sql`.
pub fn print_sql(target: &Target, state_schema: &str, how: crate::config::Setup) -> String {
    let o = Objects::new(target);
    if let Some(c) = chunks::ChunkObjects::new(target) {
        return c.print_sql(&o, state_schema, how);
    }
    if how.uninstall {
        return format!(
            "-- autoembed setup --uninstall for {}\n{}\n",
            o.table,
            o.uninstall_sql(state_schema)
        );
    }
    format!(
        "-- autoembed setup for {table}: generated by `autoembed setup --print-sql`.\n\
         -- Idempotent; paste into a migration (e.g. supabase/migrations/<timestamp>_autoembed.sql).\n\n\
         -- Bookkeeping: rows being embedded (claims), rows the provider rejected, which model made the vectors, batch jobs in flight.\n{state}\n\n\
         -- Re-embed a row when its text changes: set its embedding to NULL.\n{trigger}\n\n\
         -- Find pending rows without scanning the table. On a large, busy table\n\
         -- prefer CREATE INDEX CONCURRENTLY, outside a transaction (or `autoembed setup`).\n{index}\n\
         -- The index of earlier versions, which also held rows without text.\n{old_index}\n{notify}",
        notify = if how.notify {
            format!(
                "\n-- Wake `autoembed watch` when a row becomes pending (NOTIFY at commit).\n{}\n",
                o.notify_sql()
            )
        } else {
            String::new()
        },
        table = o.table,
        state = state::ddl(state_schema),
        trigger = o.trigger_sql(),
        index = o.index_sql(false),
        old_index = o.old_index_sql(),
    )
}

/// `autoembed setup`: check the table, then print or run the DDL.
pub fn command(cfg: &crate::config::Config) -> Result<Vec<String>> {
    let crate::checks::Opened {
        mut db,
        target,
        state,
        ..
    } = crate::checks::open(cfg)?;
    if cfg.setup.print_sql {
        return Ok(vec![print_sql(&target, &cfg.state_schema, cfg.setup)]);
    }
    // The DDL refuses too (for --print-sql's migration); here it is said first.
    if cfg.setup.uninstall && state.current && target.in_flight(db.client())?.jobs > 0 {
        return Err(crate::error::Error::config(
            "setup --uninstall: the table has batch jobs in flight at the provider; cancel them (autoembed batch-jobs --cancel all), let a --batch-api run collect them, then uninstall",
        ));
    }
    run(&mut db, &target, &cfg.state_schema, cfg.setup)
}

/// Run setup (or `--uninstall`) against the database. The index is built
/// first (the step that takes long, and the one a table can refuse), then
/// the state schema and the trigger in one transaction; when a step fails,
/// the indexes this run built are dropped again, so setup either completes
/// or changes nothing.
pub fn run(
    db: &mut Db,
    target: &Target,
    state_schema: &str,
    how: crate::config::Setup,
) -> Result<Vec<String>> {
    let o = Objects::new(target);
    let chunks = chunks::ChunkObjects::new(target);
    if how.uninstall {
        let what = match &chunks {
            None => format!("removed the trigger, index and bookkeeping of {}", o.table),
            Some(c) => format!(
                "removed the trigger and bookkeeping of {}; the chunks table {} stays (DROP TABLE it when it is no longer wanted)",
                o.table,
                c.table()
            ),
        };
        db.client()
            .batch_execute(&o.uninstall_sql(state_schema))
            .map_err(|e| failed("uninstall", &e))?;
        crate::info!("{what}");
        return Ok(vec![what]);
    }
    if let Some(c) = chunks {
        return c.run(db, &o, state_schema, how);
    }
    // Building an index concurrently waits for every transaction that could
    // use it: that wait is the role's to bound, not autoembed's default.
    db.client()
        .batch_execute("RESET lock_timeout")
        .map_err(|e| failed("lock_timeout", &e))?;
    let mut built = Vec::new();
    let indexed = build_indexes(db, target, &o, &mut built);
    let rest = indexed.and_then(|()| {
        db.in_transaction(|tx| {
            tx.batch_execute(&state::ddl(state_schema))
                .map_err(|e| failed("state schema", &e))?;
            tx.batch_execute(&o.trigger_sql())
                .map_err(|e| failed("trigger", &e))?;
            if how.notify {
                tx.batch_execute(&o.notify_sql())
                    .map_err(|e| failed("notify trigger", &e))?;
            }
            Ok(())
        })
    });
    if let Err(e) = rest {
        for index in built.iter().rev() {
            let _ = db
                .client()
                .batch_execute(&format!("DROP INDEX IF EXISTS {index}"));
        }
        return Err(e);
    }
    let old = o.old_index.qualified();
    if db
        .index_predicate(&old)?
        .is_some_and(|p| o.is_old_predicate(&p))
    {
        let how = if o.partitioned { "" } else { "CONCURRENTLY " };
        db.client()
            .batch_execute(&format!("DROP INDEX {how}IF EXISTS {old}"))
            .map_err(|e| failed("the index of an earlier version", &e))?;
    }
    let mut done = vec![
        format!("index {} on {} ready", o.index.name, o.table),
        format!("state schema {} ready", quote_ident(state_schema)),
        format!("trigger {} on {} ready", o.trigger, o.table),
    ];
    if how.notify {
        done.push(format!(
            "trigger {} on {} ready (NOTIFY for autoembed watch)",
            o.notify_trigger, o.table
        ));
    }
    for what in &done {
        crate::info!("{what}");
    }
    Ok(done)
}

/// A setup step that failed, and the database's reason.
fn failed(what: &str, e: &postgres::Error) -> Error {
    Error::Database(format!("setup failed ({what}): {}", describe_pg(e)))
}

/// Build the table's index, concurrently: on a partitioned table, an index
/// on the table alone, then one on each partition, each attached to its
/// parent's. An invalid index an interrupted build left is dropped and
/// built again. Pushes each index it creates onto `built`.
fn build_indexes(db: &mut Db, target: &Target, o: &Objects, built: &mut Vec<String>) -> Result<()> {
    let what = format!("index {} on {}", o.index.name, o.table);
    let exec = |db: &mut Db, sql: &str| {
        db.client()
            .batch_execute(sql)
            .map_err(|e| failed(&what, &e))
    };
    let mut create = |db: &mut Db, index: &IndexName, sql: String| -> Result<()> {
        let qualified = index.qualified();
        let valid = db.index_is_valid(&qualified)?;
        if valid == Some(true) {
            return Ok(());
        }
        if valid == Some(false) {
            exec(db, &format!("DROP INDEX IF EXISTS {qualified}"))?;
        }
        built.push(qualified);
        exec(db, &sql)
    };
    if !o.partitioned {
        return create(db, &o.index, o.index_sql(true));
    }
    create(
        db,
        &o.index,
        o.index_on(&o.index, &o.table, IndexBuild::OnlyThis),
    )?;
    for part in db.partitions(&target.table)? {
        let index = IndexName::new(&part.schema, &part.name, &o.column);
        let table = format!("{}.{}", quote_ident(&part.schema), quote_ident(&part.name));
        let how = if part.leaf {
            IndexBuild::Concurrently
        } else {
            IndexBuild::OnlyThis
        };
        create(db, &index, o.index_on(&index, &table, how))?;
        let parent = IndexName::new(&part.parent.0, &part.parent.1, &o.column);
        exec(
            db,
            &format!(
                "ALTER INDEX {} ATTACH PARTITION {}",
                parent.qualified(),
                index.qualified()
            ),
        )?;
    }
    Ok(())
}

/// The stem of the names setup gives a table's objects for one embedding
/// column: `<table>_<column>`, cut to leave room for a suffix.
fn per_column(table: &str, column: &str) -> String {
    format!("{}_{}", cut(table, 24), cut(column, 16))
}
