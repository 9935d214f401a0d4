//! Schemas users really have: a generated text column, case-insensitive
//! text, partitioned tables, tables full of blank rows, names that look
//! like SQL. `setup` works on each, and its trigger re-embeds exactly the
//! rows whose text changed.

use crate::support::mock::{vector_for, Mock};
use crate::support::{run, Run, TestDb};
use std::process::Command;

/// The binary for these tests' `vector(8)` columns.
fn cmd(db: &TestDb, mock: &Mock) -> Command {
    let mut c = db.cmd(mock);
    c.env("AUTOEMBED_DIMENSIONS", "8");
    c
}

fn autoembed(db: &TestDb, mock: &Mock, args: &[&str]) -> Run {
    run(cmd(db, mock).args(args))
}

/// Run on `table` instead of the test's `products`.
fn on(db: &TestDb, mock: &Mock, table: &str, args: &[&str]) -> Run {
    run(cmd(db, mock).env("AUTOEMBED_TABLE", table).args(args))
}

fn pending(db: &mut TestDb, table: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM {table} WHERE embedding IS NULL"
    ))
}

#[test]
fn a_generated_text_column_is_re_embedded_when_a_column_it_reads_changes_and_only_then() {
    let mut db = TestDb::new("generated");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, name text, description text,
             views int NOT NULL DEFAULT 0,
             embedding_text text GENERATED ALWAYS AS (name || ' ' || description) STORED,
             embedding vector(8));
         INSERT INTO {s}.products (product_id_internal, name, description)
             SELECT g, 'name ' || g, 'about ' || g FROM generate_series(1, 6) g;"
    ));
    let mock = Mock::start(8);
    assert_eq!(autoembed(&db, &mock, &["setup"]).code, 0);
    assert_eq!(autoembed(&db, &mock, &["backfill"]).code, 0);
    assert_eq!(db.correct_rows(8), (6, 0));
    let table = db.table();

    db.exec(&format!("UPDATE {table} SET views = views + 1"));
    assert_eq!(
        pending(&mut db, &table),
        0,
        "an unrelated edit re-embeds nothing"
    );

    db.exec(&format!(
        "UPDATE {table} SET description = 'rewritten' WHERE product_id_internal = 2"
    ));
    db.exec(&format!(
        "UPDATE {table} SET name = 'renamed' WHERE product_id_internal = 3"
    ));
    assert_eq!(pending(&mut db, &table), 2);
    let before = mock.requests().len();
    let j = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 2, "{j}");
    assert_eq!(mock.requests().len(), before + 1);
    assert_eq!(
        db.vector(&table, "product_id_internal", "2"),
        Some(vector_for("name 2 rewritten", 8))
    );
    assert_eq!(
        db.vector(&table, "product_id_internal", "3"),
        Some(vector_for("renamed about 3", 8))
    );
}

#[test]
fn case_only_edits_are_edits_under_citext_and_nondeterministic_collations() {
    let mut db = TestDb::new("caseless");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE EXTENSION IF NOT EXISTS citext;
         CREATE COLLATION IF NOT EXISTS {s}.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY,
             embedding_text text COLLATE {s}.ci, embedding vector(8));
         INSERT INTO {s}.products VALUES (1, 'Apple pie'), (2, 'APPLE PIE');
         CREATE TABLE {s}.notes (product_id_internal bigint PRIMARY KEY, embedding_text citext, embedding vector(8));
         INSERT INTO {s}.notes VALUES (1, 'Apple pie'), (2, 'APPLE PIE');"
    ));
    let mock = Mock::start(8);
    for table in [db.table(), format!("{s}.notes")] {
        assert_eq!(on(&db, &mock, &table, &["setup"]).code, 0, "{table}");
        // One row a batch: the second text must not get the first one's
        // vector because the two compare equal.
        let j = on(
            &db,
            &mock,
            &table,
            &["backfill", "--batch-size", "1", "--json"],
        )
        .json();
        assert_eq!(j["embedded"], 2, "{table}: {j}");
        for (id, text) in [("1", "Apple pie"), ("2", "APPLE PIE")] {
            assert_eq!(
                db.vector(&table, "product_id_internal", id),
                Some(vector_for(text, 8)),
                "{table} row {id}"
            );
        }
        db.exec(&format!(
            "UPDATE {table} SET embedding_text = 'apple pie' WHERE product_id_internal = 1"
        ));
        assert_eq!(pending(&mut db, &table), 1, "{table}: a case-only edit");
        assert_eq!(on(&db, &mock, &table, &["run-once"]).code, 0);
        assert_eq!(
            db.vector(&table, "product_id_internal", "1"),
            Some(vector_for("apple pie", 8)),
            "{table}"
        );
    }
}

#[test]
fn a_partitioned_table_is_set_up_embedded_and_re_embedded() {
    let mut db = TestDb::new("partitioned");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(8))
             PARTITION BY RANGE (product_id_internal);
         CREATE TABLE {s}.products_low PARTITION OF {s}.products FOR VALUES FROM (0) TO (100);
         CREATE TABLE {s}.products_high PARTITION OF {s}.products FOR VALUES FROM (100) TO (1000)
             PARTITION BY RANGE (product_id_internal);
         CREATE TABLE {s}.products_high_a PARTITION OF {s}.products_high FOR VALUES FROM (100) TO (500);
         CREATE TABLE {s}.products_high_b PARTITION OF {s}.products_high FOR VALUES FROM (500) TO (1000);
         INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(1, 900, 7) g;"
    ));
    let rows = db.count(&format!("SELECT count(*) FROM {s}.products"));
    let mock = Mock::start(8);
    let r = autoembed(&db, &mock, &["setup"]);
    assert_eq!(r.code, 0, "{r:?}");
    // Idempotent.
    assert_eq!(autoembed(&db, &mock, &["setup"]).code, 0);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = '{s}' AND c.relname LIKE '%autoembed_queue' AND i.indisvalid"
        )),
        5,
        "an index on the table and on each partition, all valid"
    );
    let v = autoembed(&db, &mock, &["verify", "--json"]).json();
    assert_eq!(v["ok"], true, "{v}");

    let j = autoembed(&db, &mock, &["backfill", "--batch-size", "10", "--json"]).json();
    assert_eq!(j["embedded"], rows, "{j}");
    assert_eq!(db.correct_rows(8), (rows, 0));
    let table = db.table();
    db.exec(&format!(
        "UPDATE {table} SET embedding_text = 'moved on' WHERE product_id_internal = 526"
    ));
    assert_eq!(pending(&mut db, &table), 1);
    assert_eq!(autoembed(&db, &mock, &["run-once"]).code, 0);
    assert_eq!(
        db.vector(&table, "product_id_internal", "526"),
        Some(vector_for("moved on", 8))
    );
}

#[test]
fn blank_rows_are_not_in_setups_index() {
    let mut db = TestDb::new("blank");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(8));
         INSERT INTO {s}.products SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE E' \\t\\n' END
             FROM generate_series(1, 3000) g;
         INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(3001, 3010) g;"
    ));
    let mock = Mock::start(8);
    assert_eq!(autoembed(&db, &mock, &["setup"]).code, 0);
    // A new index's row count is exact: only the ten rows with text are in it.
    assert_eq!(
        db.count(&format!(
            "SELECT reltuples::bigint FROM pg_class \
             WHERE oid = '{s}.products_embedding_autoembed_queue'::regclass"
        )),
        10
    );
    let j = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 10, "{j}");
    assert_eq!(db.correct_rows(8), (10, 0));
}

#[test]
fn a_name_holding_setups_own_quote_tag_is_set_up_like_any_other() {
    let mut db = TestDb::new("dollar");
    let s = db.schema.clone();
    let table = format!("{s}.\"odd$autoembed$name\"");
    db.exec(&format!(
        "CREATE TABLE {table} (product_id_internal bigint PRIMARY KEY, \"text$autoembed$\" text, embedding vector(8));
         INSERT INTO {table} VALUES (1, 'one'), (2, 'two');"
    ));
    let mock = Mock::start(8);
    let on = |db: &TestDb, args: &[&str]| {
        run(cmd(db, &mock)
            .env("AUTOEMBED_TABLE", &table)
            .env("AUTOEMBED_TEXT_COLUMN", "text$autoembed$")
            .args(args))
    };
    let r = on(&db, &["setup"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(on(&db, &["backfill"]).code, 0);
    db.exec(&format!(
        "UPDATE {table} SET \"text$autoembed$\" = 'three' WHERE product_id_internal = 2"
    ));
    assert_eq!(pending(&mut db, &table), 1);
    assert_eq!(on(&db, &["run-once"]).code, 0);
    assert_eq!(
        db.vector(&table, "product_id_internal", "2"),
        Some(vector_for("three", 8))
    );
    let r = on(&db, &["setup", "--uninstall"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND NOT tgisinternal",
            table.replace('\'', "''")
        )),
        0
    );
}

#[test]
fn rows_edited_on_the_publisher_are_re_embedded_on_a_subscriber() {
    let mut db = TestDb::new("replica");
    let s = db.schema.clone();
    let wal: String = db
        .client
        .query_one("SHOW wal_level", &[])
        .expect("wal_level")
        .get(0);
    assert_eq!(
        wal, "logical",
        "run scripts/test-db.sh: it sets wal_level = logical"
    );
    // The publisher (the test database) sends ids and texts; the subscriber
    // (a database of its own) holds the embeddings.
    let table_sql = format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(8));"
    );
    let repl = Replication::new(&s);
    let Replication {
        sub_db,
        publication,
        slot,
        subscription,
    } = &repl;
    db.exec(&format!(
        "{table_sql}
         INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(1, 5) g;
         CREATE PUBLICATION {publication} FOR TABLE {s}.products (product_id_internal, embedding_text);"
    ));
    // Created apart: a slot on the same server cannot be made by CREATE
    // SUBSCRIPTION itself, nor in a transaction that has written.
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ));
    db.exec(&format!("DROP DATABASE IF EXISTS {sub_db}"));
    db.exec(&format!("CREATE DATABASE {sub_db}"));
    let sub_url = repl.url();
    let mut sub = postgres::Client::connect(&sub_url, postgres::NoTls).expect("subscriber");
    let publisher = crate::support::admin_url().replace("postgresql://", "");
    let (userhost, dbname) = publisher.rsplit_once('/').expect("url");
    let (user, hostport) = userhost.split_once('@').expect("url");
    let (host, port) = hostport.split_once(':').expect("url");
    sub.batch_execute(&format!(
        "CREATE EXTENSION vector; CREATE SCHEMA {s}; {table_sql}
         CREATE SUBSCRIPTION {subscription} CONNECTION 'host={host} port={port} user={user} dbname={dbname}'
             PUBLICATION {publication} WITH (create_slot = false, slot_name = '{slot}');"
    ))
    .expect("subscription");
    let count = format!("SELECT count(*) FROM {s}.products");
    crate::support::wait_for_count(&mut sub, &count, 5, "rows copied to the subscriber");
    let mock = Mock::start(8);
    let on_sub = |args: &[&str]| run(cmd(&db, &mock).env("DATABASE_URL", &sub_url).args(args));
    assert_eq!(on_sub(&["setup"]).code, 0);
    assert_eq!(on_sub(&["backfill"]).code, 0);
    let table = db.table();
    crate::support::connect()
        .batch_execute(&format!(
            "UPDATE {table} SET embedding_text = 'edited upstream' WHERE product_id_internal = 4"
        ))
        .expect("edit on the publisher");
    crate::support::wait_for_count(
        &mut sub,
        &format!("SELECT count(*) FROM {table} WHERE embedding_text = 'edited upstream'"),
        1,
        "the edit replicated",
    );
    // The replicated edit cleared the old vector (the trigger fires for
    // the subscription's changes too), so the next run embeds it.
    crate::support::wait_for_count(
        &mut sub,
        &format!("SELECT count(*) FROM {table} WHERE embedding IS NULL"),
        1,
        "rows pending on the subscriber",
    );
    let j = on_sub(&["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 1, "{j}");
    let v: Option<Vec<f32>> = sub
        .query_one(
            &format!("SELECT embedding::real[] FROM {table} WHERE product_id_internal = 4"),
            &[],
        )
        .expect("vector")
        .get(0);
    assert_eq!(v, Some(vector_for("edited upstream", 8)));
}

/// The replication test's publication, slot, subscriber database and
/// subscription, removed at the end whether the test passed or not (a
/// slot left behind would keep the server's WAL forever).
struct Replication {
    sub_db: String,
    publication: String,
    slot: String,
    subscription: String,
}

impl Replication {
    fn new(schema: &str) -> Replication {
        Replication {
            sub_db: format!("{schema}_sub"),
            publication: format!("{schema}_pub"),
            slot: format!("{schema}_slot"),
            subscription: format!("{schema}_subscription"),
        }
    }

    fn url(&self) -> String {
        crate::support::admin_url().replace("/test", &format!("/{}", self.sub_db))
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        let url = self.url();
        let Replication {
            sub_db,
            publication,
            slot,
            subscription,
        } = self;
        if let Ok(mut sub) = postgres::Client::connect(&url, postgres::NoTls) {
            let _ = sub.batch_execute(&format!(
                "ALTER SUBSCRIPTION {subscription} DISABLE; \
                 ALTER SUBSCRIPTION {subscription} SET (slot_name = NONE); \
                 DROP SUBSCRIPTION {subscription};"
            ));
        }
        let mut admin = crate::support::connect();
        let _ = admin.batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ));
        let _ = admin.batch_execute(&format!("DROP PUBLICATION IF EXISTS {publication}"));
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {sub_db} WITH (FORCE)"));
    }
}

#[test]
fn two_embedding_columns_of_one_table_keep_their_triggers_and_state_apart() {
    let mut db = TestDb::new("twocols");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, title text,
             embedding vector(8), title_embedding vector(8));
         INSERT INTO {s}.products SELECT g, 'product ' || g, 'title ' || g FROM generate_series(1, 6) g;"
    ));
    let mock = Mock::start(8);
    mock.reject_inputs_containing("title 2");
    let titles = |db: &TestDb, args: &[&str]| {
        run(cmd(db, &mock)
            .env("AUTOEMBED_TEXT_COLUMN", "title")
            .env("AUTOEMBED_EMBEDDING_COLUMN", "title_embedding")
            .args(args))
    };
    assert_eq!(autoembed(&db, &mock, &["setup"]).code, 0);
    assert_eq!(titles(&db, &["setup"]).code, 0);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.products'::regclass AND NOT tgisinternal"
        )),
        2,
        "the second setup replaced the first one's trigger"
    );
    assert_eq!(autoembed(&db, &mock, &["backfill"]).code, 0);
    // Row 2's title is rejected: a failure of the title column only.
    assert_eq!(titles(&db, &["backfill"]).code, 1);
    let table = db.table();
    let vector = |db: &mut TestDb, column: &str, id: i64| -> Option<Vec<f32>> {
        db.client
            .query_one(
                &format!("SELECT {column}::real[] FROM {table} WHERE product_id_internal = $1"),
                &[&id],
            )
            .expect("vector")
            .get(0)
    };
    assert_eq!(
        vector(&mut db, "embedding", 2),
        Some(vector_for("product 2", 8))
    );
    assert_eq!(
        vector(&mut db, "title_embedding", 3),
        Some(vector_for("title 3", 8))
    );
    assert_eq!(vector(&mut db, "title_embedding", 2), None);
    let st = db.state_schema();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {st}.failures WHERE table_name = '\"{s}\".\"products\".\"title_embedding\"'"
        )),
        1
    );
    assert_eq!(db.count(&format!("SELECT count(*) FROM {st}.models")), 2);
    // Each trigger clears its own column.
    db.exec(&format!(
        "UPDATE {table} SET title = 'new title' WHERE product_id_internal = 4;
         UPDATE {table} SET embedding_text = 'new text' WHERE product_id_internal = 5;"
    ));
    assert_eq!(
        vector(&mut db, "embedding", 4),
        Some(vector_for("product 4", 8))
    );
    assert_eq!(vector(&mut db, "title_embedding", 4), None);
    assert_eq!(vector(&mut db, "embedding", 5), None);
    assert_eq!(
        vector(&mut db, "title_embedding", 5),
        Some(vector_for("title 5", 8))
    );
}

#[test]
fn the_state_an_earlier_version_kept_by_table_is_adopted_by_the_column() {
    let mut db = TestDb::new("legacy");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(8));
         INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(1, 4) g;"
    ));
    let mock = Mock::start(8);
    assert_eq!(autoembed(&db, &mock, &["setup"]).code, 0);
    // What an earlier version left: row 3 failed and waits for its next try.
    let st = db.state_schema();
    db.exec(&format!(
        "INSERT INTO {st}.failures VALUES ('\"{s}\".\"products\"', '3',
             hashtextextended('product 3' COLLATE \"C\", 0), 1, 'rejected', now(), now(), now() + interval '1 hour')"
    ));
    let j = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 3, "{j}");
    assert!(!mock.embedded_inputs().contains(&"product 3".to_string()));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {st}.failures WHERE table_name = '\"{s}\".\"products\".\"embedding\"' AND row_id = '3'"
        )),
        1
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {st}.failures WHERE table_name = '\"{s}\".\"products\"'"
        )),
        0
    );
}

#[test]
fn halfvec_columns_are_written_and_sparsevec_and_bit_columns_refused() {
    let mut db = TestDb::new("halfvec");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text,
             embedding halfvec(8), sparse sparsevec(8), bits bit(8));
         INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(1, 5) g;"
    ));
    let mock = Mock::start(8);
    assert_eq!(autoembed(&db, &mock, &["setup"]).code, 0);
    let v = autoembed(&db, &mock, &["verify", "--json"]);
    assert_eq!(v.code, 0, "{v:?}");
    assert_eq!(autoembed(&db, &mock, &["backfill"]).code, 0);
    // Each row holds its text's vector at half precision, exactly.
    for id in 1..=5i64 {
        let exact = vector_for(&format!("product {id}"), 8);
        let row = db
            .client
            .query_one(
                &format!(
                    "SELECT embedding::real[] = $2::real[]::vector::halfvec::real[] FROM {s}.products \
                     WHERE product_id_internal = $1"
                ),
                &[&id, &exact],
            )
            .expect("compare");
        assert!(row.get::<_, bool>(0), "row {id}");
    }
    for (column, why) in [
        (
            "sparse",
            "is sparsevec(8): embeddings APIs return dense vectors",
        ),
        (
            "bits",
            "is bit(8): a binary vector is made from a dense one",
        ),
    ] {
        let r = run(cmd(&db, &mock)
            .env("AUTOEMBED_EMBEDDING_COLUMN", column)
            .args(["run-once"]));
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains(why), "{r:?}");
    }
}

#[test]
fn a_text_template_renders_several_columns_and_setup_watches_exactly_those() {
    let mut db = TestDb::new("template");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, name text, brand text,
             description text, price numeric NOT NULL DEFAULT 1, embedding vector(8));
         INSERT INTO {s}.products VALUES
             (1, 'Rain jacket', 'Copperleaf', 'Keeps you dry.', 1, NULL),
             (2, 'Tent', NULL, 'Two people.', 1, NULL),
             (3, NULL, '  ', NULL, 1, NULL),
             (4, 'Stove {{x}}', 'Ember', '', 1, NULL);"
    ));
    let mock = Mock::start(8);
    let template = r"{name} by {brand}\n\n{description}";
    let with = |db: &TestDb, args: &[&str]| {
        run(cmd(db, &mock)
            .env("AUTOEMBED_TEXT_TEMPLATE", template)
            .args(args))
    };
    assert_eq!(with(&db, &["setup"]).code, 0);
    let dry = with(&db, &["dry-run", "--json"]).json();
    let j = with(&db, &["backfill", "--json"]).json();
    // Row 3 holds no text in any column the template reads: blank.
    assert_eq!(j["embedded"], 3, "{j}");
    assert_eq!(dry["would_embed"], j["embedded"]);
    assert_eq!(dry["estimated_tokens"], j["tokens"], "{dry} {j}");
    let table = db.table();
    for (id, text) in [
        ("1", "Rain jacket by Copperleaf\n\nKeeps you dry."),
        ("2", "Tent by \n\nTwo people."),
        ("4", "Stove {x} by Ember\n\n"),
    ] {
        assert_eq!(
            db.vector(&table, "product_id_internal", id),
            Some(vector_for(text, 8)),
            "row {id}"
        );
    }
    // The trigger watches the template's columns, and only those.
    db.exec(&format!("UPDATE {table} SET price = 2"));
    assert_eq!(pending(&mut db, &table), 1, "only the blank row");
    db.exec(&format!(
        "UPDATE {table} SET brand = 'Granite' WHERE product_id_internal = 2"
    ));
    assert_eq!(with(&db, &["run-once"]).code, 0);
    assert_eq!(
        db.vector(&table, "product_id_internal", "2"),
        Some(vector_for("Tent by Granite\n\nTwo people.", 8))
    );
    // A template naming a missing column, or malformed, is exit 2 naming the flag.
    for (bad, says) in [
        ("{name} {colour}", "column \"colour\" not found"),
        ("{name", "unclosed {"),
    ] {
        let r = run(cmd(&db, &mock)
            .env("AUTOEMBED_TEXT_TEMPLATE", bad)
            .args(["run-once"]));
        assert_eq!(r.code, 2, "{r:?}");
        assert!(
            r.stderr.contains(says) && r.stderr.contains("--text-template"),
            "{r:?}"
        );
    }
}
