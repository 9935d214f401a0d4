//! run-once and backfill against a real PostgreSQL and the mock provider:
//! the exact vector lands in the exact row, budgets hold, edits win, workers
//! never pay twice, bad rows are split out and recorded.

use crate::support::SpawnPiped;

use crate::support::mock::{vector_for, Mock};
use crate::support::{autoembed, run, TestDb};
use std::time::Duration;

#[test]
fn embeds_every_pending_row_with_the_exact_vector_of_its_text() {
    let mut db = TestDb::new("exact");
    db.products(250, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = NULL WHERE product_id_internal = 3;
         UPDATE {s}.products SET embedding_text = '' WHERE product_id_internal = 4;
         UPDATE {s}.products SET embedding_text = E' \\t\\n ' WHERE product_id_internal = 5;
         UPDATE {s}.products SET embedding_text = '跑步鞋 👟 שלום e\u{301}' WHERE product_id_internal = 6;"
    ));
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["command"], "run-once");
    assert_eq!(j["embedded"], 247);
    assert_eq!(j["failed"], 0);
    assert_eq!(j["pending_after"], 0);
    assert_eq!(j["requests"], 3);
    assert_eq!(j["stop_reason"], "drained");
    assert!(j["elapsed_ms"].is_u64());
    let expected_tokens: u64 = mock
        .embedded_inputs()
        .iter()
        .map(|t| crate::support::mock::tokens_for(t))
        .sum();
    assert_eq!(j["tokens"], expected_tokens);

    let table = db.table();
    assert_eq!(
        db.vector(&table, "product_id_internal", "6"),
        Some(vector_for("跑步鞋 👟 שלום e\u{301}", 1536))
    );
    assert_eq!(
        db.vector(&table, "product_id_internal", "250"),
        Some(vector_for("product 250", 1536))
    );
    for blank in ["3", "4", "5"] {
        assert_eq!(
            db.vector(&table, "product_id_internal", blank),
            None,
            "blank row {blank} was embedded"
        );
    }
    assert_eq!(db.correct_rows(1536), (247, 0));
    // Blank text is never sent.
    assert!(mock.embedded_inputs().iter().all(|t| !t.trim().is_empty()));
    // The OpenAI dialect: bearer key, base64, model without a vendor prefix.
    let req = &mock.requests()[0];
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {}", crate::support::API_KEY).as_str())
    );
    assert_eq!(req.body["encoding_format"], "base64");
    assert_eq!(req.body["model"], "text-embedding-3-small");
    assert!(req.body.get("dimensions").is_none());
    assert_eq!(req.path, "/v1/embeddings");
}

#[test]
fn run_once_takes_the_oldest_ids_first_and_stops_at_max_rows() {
    let mut db = TestDb::new("maxrows");
    db.products(250, 1536);
    let mock = Mock::start(1536);
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--max-rows",
            "120",
            "--batch-size",
            "50",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["pending_after"].as_i64()),
        (Some(120), Some(130))
    );
    assert_eq!(j["stop_reason"], "max_rows");
    let sizes: Vec<usize> = mock.requests().iter().map(|r| r.inputs.len()).collect();
    assert_eq!(sizes, vec![50, 50, 20]);
    // Numeric id order, not text order: 1..=120 exactly.
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM {s}.products WHERE embedding IS NOT NULL AND product_id_internal <= 120")),
        120
    );
}

#[test]
fn max_seconds_stops_taking_new_batches() {
    let mut db = TestDb::new("maxsecs");
    db.products(200, 1536);
    let mock = Mock::start(1536);
    mock.latency(Duration::from_millis(300));
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--max-seconds",
            "1",
            "--batch-size",
            "10",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["stop_reason"], "max_seconds");
    let embedded = j["embedded"].as_i64().unwrap_or(-1);
    assert!((10..200).contains(&embedded), "{j}");
    assert_eq!(j["pending_after"].as_i64(), Some(200 - embedded));
    assert_eq!(db.correct_rows(1536), (embedded, 0));
}

#[test]
fn backfill_has_no_row_budget_by_default() {
    let mut db = TestDb::new("backfill");
    db.products(2500, 1536);
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["backfill", "--batch-size", "500"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("embedded 2500 rows"), "{r:?}");
    assert!(r.stdout.contains("0 pending"), "{r:?}");
    assert_eq!(db.correct_rows(1536), (2500, 0));
    // The default run-once budget would have stopped at 1000.
    let mut db2 = TestDb::new("runonce_budget");
    db2.products(1500, 1536);
    let j = autoembed(&db2, &mock, &["run-once", "--json"]).json();
    assert_eq!(
        (j["embedded"].as_u64(), j["stop_reason"].as_str()),
        (Some(1000), Some("max_rows"))
    );
}

#[test]
fn text_edited_while_its_request_is_in_flight_is_not_overwritten_and_the_app_is_not_blocked() {
    let mut db = TestDb::new("inflight");
    db.products(10, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    let child = db.cmd(&mock).args(["run-once", "--json"]).spawn_piped();
    held.wait_for("request arrived");
    // The application edits a row that is being embedded. It must not wait
    // for the HTTP call: if it blocked, the statement timeout would fail it.
    let s = db.schema.clone();
    db.exec(&format!(
        "SET statement_timeout = '10s';
         UPDATE {s}.products SET embedding_text = 'edited text' WHERE product_id_internal = 7;
         RESET statement_timeout;"
    ));
    held.release();
    let out = crate::support::finish(child);
    let j = out.json();
    assert_eq!(Some(out.code), Some(0));
    assert_eq!(
        (
            j["embedded"].as_u64(),
            j["changed"].as_u64(),
            j["pending_after"].as_i64()
        ),
        (Some(9), Some(1), Some(1))
    );
    let table = db.table();
    assert_eq!(
        db.vector(&table, "product_id_internal", "7"),
        None,
        "a stale vector was written"
    );

    mock.unhold();
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.json()["embedded"], 1);
    assert_eq!(
        db.vector(&table, "product_id_internal", "7"),
        Some(vector_for("edited text", 1536))
    );
    assert_eq!(db.correct_rows(1536), (10, 0));
}

#[test]
fn concurrent_workers_embed_every_row_once_and_never_pay_twice() {
    let mut db = TestDb::new("workers");
    db.products(10_000, 1536);
    let mock = Mock::start(1536);
    mock.latency(Duration::from_millis(15));
    let children: Vec<_> = (0..4)
        .map(|_| {
            db.cmd(&mock)
                .args(["backfill", "--json", "--batch-size", "100"])
                .spawn_piped()
        })
        .collect();
    let mut total = 0;
    let mut busy_workers = 0;
    for c in children {
        let out = crate::support::finish(c);
        assert_eq!(Some(out.code), Some(0), "{}", out.stderr);
        let j = out.json();
        let embedded = j["embedded"].as_u64().unwrap_or(0);
        total += embedded;
        busy_workers += u32::from(embedded > 0);
    }
    assert!(busy_workers >= 2, "the workers did not overlap");
    assert_eq!(
        crate::support::sent_and_distinct(&mock),
        (10_000, 10_000),
        "some text was sent twice"
    );
    assert_eq!(total, 10_000);
    assert_eq!(db.correct_rows(1536), (10_000, 0));
}

#[test]
fn a_rejected_row_is_split_out_recorded_and_not_resent_before_its_next_try() {
    let mut db = TestDb::new("badrow");
    db.products(100, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'POISON text' WHERE product_id_internal = 37"
    ));
    let mock = Mock::start(1536);
    mock.reject_inputs_containing("POISON");
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(
        (
            j["embedded"].as_u64(),
            j["failed"].as_u64(),
            j["pending_after"].as_i64()
        ),
        (Some(99), Some(1), Some(1))
    );
    assert!(r.stderr.contains("row 37 failed"), "{r:?}");
    assert_eq!(db.correct_rows(1536), (99, 0));
    let st = db.state_schema();
    let row = db
        .client
        .query_one(
            &format!(
                "SELECT attempts, last_error, extract(epoch FROM next_try_at - last_failed_at)::int FROM {st}.failures
                 WHERE table_name = $1 AND row_id = '37'"
            ),
            &[&format!("\"{s}\".\"products\".\"embedding\"")],
        )
        .expect("failure recorded");
    assert_eq!(row.get::<_, i32>(0), 1);
    assert!(row.get::<_, String>(1).contains("maximum context length"));
    assert_eq!(row.get::<_, i32>(2), 600);

    // The next run does not resend it, and says so in dry-run and verify.
    let before = mock.requests().len();
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!((r.code, r.json()["embedded"].as_u64()), (0, Some(0)));
    assert_eq!(mock.requests().len(), before);
    assert_eq!(
        autoembed(&db, &mock, &["dry-run", "--json"]).json()["failed"],
        1
    );
    assert_eq!(
        autoembed(&db, &mock, &["verify", "--json"]).json()["counts"]["failed"],
        1
    );

    // --retry-failed sends it now; the backoff doubles.
    let r = autoembed(&db, &mock, &["backfill", "--retry-failed", "--json"]);
    assert_eq!((r.code, r.json()["failed"].as_u64()), (1, Some(1)));
    let row = db
        .client
        .query_one(
            &format!("SELECT attempts, extract(epoch FROM next_try_at - last_failed_at)::int FROM {st}.failures WHERE row_id = '37'"),
            &[],
        )
        .expect("failure");
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (2, 1200));

    // A new text makes it eligible again; success clears the record.
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'fixed text' WHERE product_id_internal = 37"
    ));
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!((r.code, r.json()["embedded"].as_u64()), (0, Some(1)));
    assert_eq!(db.count(&format!("SELECT count(*) FROM {st}.failures")), 0);
    assert_eq!(db.correct_rows(1536), (100, 0));
}

#[test]
fn rows_past_max_attempts_wait_for_a_new_text() {
    let mut db = TestDb::new("maxattempts");
    db.products(5, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'POISON' WHERE product_id_internal = 2"
    ));
    let mock = Mock::start(1536);
    mock.reject_inputs_containing("POISON");
    assert_eq!(autoembed(&db, &mock, &["run-once"]).code, 1);
    let st = db.state_schema();
    // Make the next try due: it is retried, as attempts (1) < max (2).
    db.exec(&format!(
        "UPDATE {st}.failures SET next_try_at = now() - interval '1 second'"
    ));
    assert_eq!(
        autoembed(&db, &mock, &["run-once", "--max-attempts", "2"]).code,
        1
    );
    assert_eq!(
        db.count(&format!("SELECT attempts::bigint FROM {st}.failures")),
        2
    );
    // Due again, but attempts (2) >= max (2): not sent.
    db.exec(&format!(
        "UPDATE {st}.failures SET next_try_at = now() - interval '1 second'"
    ));
    let before = mock.requests().len();
    let r = autoembed(&db, &mock, &["run-once", "--max-attempts", "2", "--json"]);
    assert_eq!((r.code, r.json()["embedded"].as_u64()), (0, Some(0)));
    assert_eq!(mock.requests().len(), before);
}

#[test]
fn a_backlog_of_failing_rows_does_not_hide_the_healthy_rows_behind_it() {
    let mut db = TestDb::new("backlog");
    db.products(300, 1536);
    let s = db.schema.clone();
    db.exec(&format!("UPDATE {s}.products SET embedding_text = 'POISON ' || product_id_internal WHERE product_id_internal <= 150"));
    let mock = Mock::start(1536);
    mock.reject_inputs_containing("POISON");
    let j = autoembed(&db, &mock, &["run-once", "--json", "--max-rows", "1000"]).json();
    assert_eq!(
        (j["embedded"].as_u64(), j["failed"].as_u64()),
        (Some(150), Some(150))
    );
    // The next run skips all 150 recorded failures and finds the new row.
    db.exec(&format!("INSERT INTO {s}.products VALUES (301, 'new row')"));
    let j = autoembed(&db, &mock, &["run-once", "--json", "--max-rows", "100"]).json();
    assert_eq!(
        (j["embedded"].as_u64(), j["failed"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn a_batch_too_large_for_the_server_is_split() {
    let mut db = TestDb::new("split413");
    db.products(100, 1536);
    let mock = Mock::start(1536);
    mock.max_inputs(32);
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        (r.json()["embedded"].as_u64(), r.json()["failed"].as_u64()),
        (Some(100), Some(0))
    );
    assert_eq!(db.correct_rows(1536), (100, 0));
}

#[test]
fn dry_run_calls_no_api_and_writes_nothing() {
    let mut db = TestDb::new("dryrun");
    db.products(1200, 1536);
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["dry-run", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["command"], "dry-run");
    assert_eq!(
        (j["pending"].as_i64(), j["would_embed"].as_u64()),
        (Some(1200), Some(1000))
    );
    let tokens: u64 = (1..=1000)
        .map(|i| crate::support::mock::tokens_for(&format!("product {i}")))
        .sum();
    assert_eq!(j["estimated_tokens"], tokens);
    let cost = j["estimated_cost_usd"].as_f64().unwrap_or(-1.0);
    assert!((cost - tokens as f64 * 0.02 / 1e6).abs() < 1e-12, "{j}");
    let ids: Vec<&str> = j["sample_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ids, vec!["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
    assert!(mock.requests().is_empty());
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NOT NULL"
        )),
        0
    );
    let st = db.state_schema();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_namespace WHERE nspname = '{st}'"
        )),
        0,
        "dry-run created the state schema"
    );
    // dry-run needs no key.
    let r = crate::support::run(db.cmd(&mock).env_remove("OPENAI_API_KEY").args([
        "dry-run",
        "--max-rows",
        "unlimited",
        "--json",
    ]));
    assert_eq!((r.code, r.json()["would_embed"].as_u64()), (0, Some(1200)));
}

#[test]
fn works_with_quoted_identifiers_and_other_id_and_text_types() {
    let mut db = TestDb::new("idents");
    let s = db.schema.clone();
    db.exec(&format!(
        r#"CREATE SCHEMA "{s} Shop";
           CREATE TABLE "{s} Shop"."Items ""x""" ("Item ID" uuid PRIMARY KEY DEFAULT gen_random_uuid(), "Body Text" varchar(200), "Vec" vector(8));
           INSERT INTO "{s} Shop"."Items ""x""" ("Body Text") SELECT 'item ' || g FROM generate_series(1, 25) g;
           CREATE TABLE {s}.by_text (code text PRIMARY KEY, body char(20), embedding vector(8));
           INSERT INTO {s}.by_text SELECT 'c' || g, 'char ' || g FROM generate_series(1, 12) g;"#
    ));
    let mock = Mock::start(1536);
    let table = format!(r#""{s} Shop"."Items ""x""""#);
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--table",
            &table,
            "--text-column",
            "Body Text",
            "--embedding-column",
            "Vec",
            "--dimensions",
            "8",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 25);
    assert_eq!(mock.requests()[0].body["dimensions"], 8);
    let rows = db
        .client
        .query(
            &format!(r#"SELECT "Body Text", "Vec"::real[] FROM {table}"#),
            &[],
        )
        .expect("read");
    assert_eq!(rows.len(), 25);
    for row in rows {
        let text: String = row.get(0);
        assert_eq!(row.get::<_, Vec<f32>>(1), vector_for(&text, 8));
    }
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--table",
            &format!("{s}.by_text"),
            "--text-column",
            "body",
            "--dimensions",
            "8",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 12);
    // char(20) is sent as PostgreSQL's text of it (trailing blanks dropped).
    assert_eq!(
        db.vector(&format!("{s}.by_text"), "code", "c12"),
        Some(vector_for("char 12", 8))
    );
    let _ = db
        .client
        .batch_execute(&format!(r#"DROP SCHEMA "{s} Shop" CASCADE"#));
}

#[test]
fn an_unknown_model_whose_vectors_do_not_fit_the_column_stops_with_exit_2_and_writes_nothing() {
    let mut db = TestDb::new("unknownmodel");
    db.products(20, 384);
    let mock = Mock::start(768);
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--provider",
            "openai-compatible",
            "--model",
            "nomic-embed-text",
        ],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("returns 768 dimensions")
            && r.stderr.contains("vector(384)")
            && r.stderr.contains("--dimensions"),
        "{r:?}"
    );
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NOT NULL"
        )),
        0
    );
    // The compatible dialect: floats, no key sent, model name as given.
    let req = &mock.requests()[0];
    assert_eq!(req.body["encoding_format"], "float");
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.body["model"], "nomic-embed-text");
}

#[test]
fn openrouter_gets_vendor_model_names_and_its_key() {
    let mut db = TestDb::new("openrouter");
    db.products(5, 1536);
    let mock = Mock::start(1536);
    mock.ignore_base64();
    let r = crate::support::run(
        db.cmd(&mock)
            .env_remove("AUTOEMBED_PROVIDER")
            .env_remove("OPENAI_API_KEY")
            .env("OPENROUTER_API_KEY", crate::support::API_KEY)
            .args(["run-once", "--json"]),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let req = &mock.requests()[0];
    assert_eq!(req.body["model"], "openai/text-embedding-3-small");
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {}", crate::support::API_KEY).as_str())
    );
    // Floats came back although base64 was asked for: accepted all the same.
    assert_eq!(db.correct_rows(1536), (5, 0));
}

#[test]
fn a_table_without_pgvector_or_with_the_wrong_shape_is_refused_before_any_call() {
    let mut db = TestDb::new("shapes");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.nopk (id bigint, embedding_text text, embedding vector(1536));
         CREATE TABLE {s}.composite (a int, b int, embedding_text text, embedding vector(1536), PRIMARY KEY (a, b));
         CREATE TABLE {s}.numtext (id bigint PRIMARY KEY, embedding_text integer, embedding vector(1536));
         CREATE TABLE {s}.notvec (id bigint PRIMARY KEY, embedding_text text, embedding real[]);
         CREATE TABLE {s}.small (id bigint PRIMARY KEY, embedding_text text, embedding vector(512));
         INSERT INTO {s}.small VALUES (1, 'one');"
    ));
    let mock = Mock::start(1536);
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "nopk",
            &[],
            "has no primary key: name a unique column with --id-column (AUTOEMBED_ID_COLUMN)",
        ),
        (
            "composite",
            &[],
            "has 2 columns: name one unique column with --id-column",
        ),
        ("composite", &["--id-column", "a"], "is not unique"),
        (
            "numtext",
            &[],
            "is integer, not a text type (--text-column, AUTOEMBED_TEXT_COLUMN)",
        ),
        (
            "notvec",
            &[],
            "not a pgvector vector or halfvec (--embedding-column, AUTOEMBED_EMBEDDING_COLUMN)",
        ),
        (
            "small",
            &[],
            "returns 1536 dimensions but \"embedding\" is vector(512): set --dimensions 512",
        ),
        (
            "numtext",
            &["--text-column", "Embedding_Text"],
            "column \"Embedding_Text\" not found",
        ),
        (
            "missing",
            &[],
            "table \"SCHEMA.missing\" not found (--table, AUTOEMBED_TABLE",
        ),
    ];
    for (table, extra, want) in cases {
        let t = format!("{s}.{table}");
        let mut args = vec!["run-once", "--table", &t];
        args.extend_from_slice(extra);
        let r = autoembed(&db, &mock, &args);
        assert_eq!(r.code, 2, "{table}: {r:?}");
        let want = want.replace("SCHEMA", &s);
        assert!(r.stderr.contains(&want), "{table}: want {want:?} in {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{table}: one line: {r:?}");
    }
    assert!(mock.requests().is_empty());
    // --dimensions 512 makes the vector(512) column work.
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--table",
            &format!("{s}.small"),
            "--dimensions",
            "512",
            "--json",
        ],
    );
    assert_eq!((r.code, r.json()["embedded"].as_u64()), (0, Some(1)));
    assert_eq!(
        db.vector(&format!("{s}.small"), "id", "1"),
        Some(vector_for("one", 512))
    );
}

#[test]
fn a_database_without_pgvector_is_a_clear_error() {
    let db = TestDb::new("nopgvector");
    let name = format!("{}_db", db.schema);
    let mut admin = crate::support::connect();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .expect("drop db");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create db");
    let url = crate::support::url_with_password().replace("/test", &format!("/{name}"));
    let mock = Mock::start(1536);
    let r = run(db.cmd(&mock).env("DATABASE_URL", &url).args(["run-once"]));
    let v = run(db
        .cmd(&mock)
        .env("DATABASE_URL", &url)
        .args(["verify", "--json"]));
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("pgvector is not installed in this database: run `create extension vector`"),
        "{r:?}"
    );
    assert_eq!(v.code, 1);
    let checks = v.json()["checks"].as_array().cloned().unwrap_or_default();
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "pgvector" && c["ok"] == false),
        "{v:?}"
    );
}

#[test]
fn sigterm_and_sigint_commit_what_is_done_abandon_the_request_in_flight_and_exit_143_or_130() {
    for (signal, code) in [("-TERM", 143), ("-INT", 130)] {
        let mut db = TestDb::new("signal");
        db.products(50, 1536);
        let mock = Mock::start(1536);
        let held = mock.hold();
        let child = db
            .cmd(&mock)
            .args([
                "backfill",
                "--json",
                "--batch-size",
                "10",
                "--concurrency",
                "1",
            ])
            .spawn_piped();
        // The first batch goes through; the second request hangs at the
        // provider (for a minute, the default request timeout) when the signal comes.
        held.wait_for("first request");
        held.release();
        held.wait_for("second request");
        let started = std::time::Instant::now();
        let sent = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let out = crate::support::finish(child);
        let took = started.elapsed();
        held.release();
        assert_eq!(Some(out.code), Some(code), "{}", out.stderr);
        assert!(took < Duration::from_secs(5), "took {took:?} to stop");
        let j = out.json();
        assert_eq!(
            (j["embedded"].as_u64(), j["stop_reason"].as_str()),
            (Some(10), Some("signal"))
        );
        assert_eq!(j["pending_after"], 40);
        assert_eq!(db.correct_rows(1536), (10, 0));
    }
}

#[test]
fn concurrent_batches_within_one_run_respect_the_row_budget() {
    let mut db = TestDb::new("inrun");
    db.products(1000, 1536);
    let mock = Mock::start(1536);
    mock.latency(Duration::from_millis(20));
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--concurrency",
            "4",
            "--max-rows",
            "250",
            "--batch-size",
            "20",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["pending_after"].as_i64()),
        (Some(250), Some(750))
    );
    assert_eq!(j["stop_reason"], "max_rows");
    assert_eq!(db.correct_rows(1536), (250, 0));
    let s = db.schema.clone();
    // Oldest ids first, whichever worker took them.
    assert_eq!(
        db.count(&format!(
            "SELECT max(product_id_internal) FROM {s}.products WHERE embedding IS NOT NULL"
        )),
        250
    );
    let mut inputs = mock.embedded_inputs();
    inputs.sort();
    inputs.dedup();
    assert_eq!(inputs.len(), 250);
}

#[test]
fn rows_whose_unique_id_is_null_are_never_claimed_and_verify_counts_them() {
    let mut db = TestDb::new("nullid");
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.items (sku text UNIQUE, embedding_text text, embedding vector(8));
         INSERT INTO {s}.items VALUES ('a', 'apple', NULL), (NULL, 'no id', NULL),
                                      ('b', 'banana', NULL), (NULL, 'no id either', NULL);"
    ));
    let mock = Mock::start(8);
    let table = format!("{s}.items");
    let with = |cmd: &'static str| {
        vec![
            cmd,
            "--json",
            "--table",
            table.as_str(),
            "--id-column",
            "sku",
            "--batch-size",
            "1",
            "--dimensions",
            "8",
        ]
    };
    let dry = autoembed(&db, &mock, &with("dry-run"));
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(
        (
            dry.json()["pending"].as_i64(),
            dry.json()["would_embed"].as_i64()
        ),
        (Some(2), Some(2)),
        "{dry:?}"
    );
    let r = autoembed(&db, &mock, &with("run-once"));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 2, "{r:?}");
    assert_eq!(r.json()["pending_after"], 0, "{r:?}");
    // The rows with an id hold the vector of their text; the others are untouched.
    for (sku, text) in [("a", "apple"), ("b", "banana")] {
        let v: pgvector::Vector = db
            .client
            .query_one(
                &format!("SELECT embedding FROM {s}.items WHERE sku = $1"),
                &[&sku],
            )
            .expect("read")
            .get(0);
        assert_eq!(
            v.to_vec(),
            crate::support::mock::vector_for(text, 8),
            "{sku}"
        );
    }
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.items WHERE sku IS NULL AND embedding IS NULL"
        )),
        2
    );
    let v = autoembed(
        &db,
        &mock,
        &[
            "verify",
            "--json",
            "--offline",
            "--table",
            &table,
            "--id-column",
            "sku",
        ],
    );
    assert_eq!(v.json()["counts"]["no_id"], 2, "{v:?}");
}

#[test]
fn the_records_of_deleted_rows_are_forgotten() {
    let mut db = TestDb::new("forget");
    db.products(5, 1536);
    let s = db.schema.clone();
    let mock = Mock::start(1536);
    mock.reject_inputs_containing("product 2");
    assert_eq!(autoembed(&db, &mock, &["run-once"]).code, 1);
    let st = db.state_schema();
    let key = format!("\"{s}\".\"products\".\"embedding\"");
    // A row another model made, as a model switch leaves them.
    db.exec(&format!(
        "INSERT INTO {st}.vectors VALUES ('{key}', '4', 'other-model', 1536, now())"
    ));
    let records = |db: &mut TestDb| {
        db.count(&format!(
            "SELECT (SELECT count(*) FROM {st}.failures) + (SELECT count(*) FROM {st}.vectors)"
        ))
    };
    assert_eq!(records(&mut db), 2);
    db.exec(&format!(
        "DELETE FROM {s}.products WHERE product_id_internal IN (2, 4);
         INSERT INTO {s}.products VALUES (6, 'product six', NULL);"
    ));
    let j = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 1, "{j}");
    assert_eq!(records(&mut db), 0, "records of deleted rows left behind");
}
