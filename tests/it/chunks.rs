//! Long documents as chunks (`--chunks-table`): setup creates the table,
//! each chunk lands with the exact vector of its text, an edited row gets
//! all its chunks replaced, an unchanged one costs nothing, a deleted one
//! leaves none, and a row is written whole or not at all.

use crate::support::mock::{tokens_for, vector_for, Mock};
use crate::support::{autoembed, finish, SpawnPiped, TestDb};
use std::process::Command;

const DIMS: usize = 16;

/// A paragraph of about 40 tokens that names `what`.
fn paragraph(what: &str) -> String {
    format!(
        "This paragraph is about {what}. It goes on for a while, sentence after sentence, \
         so that a few of them fill a chunk of sixty-four tokens or so, and no more."
    )
}

/// A document of `n` paragraphs about `what`.
fn document(what: &str, n: usize) -> String {
    (0..n)
        .map(|i| paragraph(&format!("{what} part {i}")))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `documents` (id, title, body), and the command pointed at its chunks.
fn documents(db: &mut TestDb, bodies: &[(i64, &str)]) {
    let s = db.schema.clone();
    db.exec(&format!(
        "CREATE TABLE {s}.documents (id bigint PRIMARY KEY, title text, body text);"
    ));
    for (id, body) in bodies {
        db.client
            .execute(
                &format!("INSERT INTO {s}.documents (id, body) VALUES ($1, $2)"),
                &[id, body],
            )
            .expect("insert document");
    }
}

fn cmd(db: &TestDb, mock: &Mock) -> Command {
    let mut c = db.cmd(mock);
    c.env("AUTOEMBED_TABLE", format!("{}.documents", db.schema))
        .env("AUTOEMBED_TEXT_COLUMN", "body")
        .env(
            "AUTOEMBED_CHUNKS_TABLE",
            format!("{}.document_chunks", db.schema),
        )
        .env("AUTOEMBED_CHUNK_TOKENS", "64")
        .env("AUTOEMBED_CHUNK_OVERLAP", "0")
        .env("AUTOEMBED_MODEL", "text-embedding-3-small")
        .env("AUTOEMBED_DIMENSIONS", DIMS.to_string());
    c
}

fn go(db: &TestDb, mock: &Mock, args: &[&str]) -> crate::support::Run {
    crate::support::run(cmd(db, mock).args(args))
}

/// The chunks of document `id`, in order: (index, text, vector, source hash is current).
fn chunks(db: &mut TestDb, id: i64) -> Vec<(i32, String, Vec<f32>, bool)> {
    let s = db.schema.clone();
    db.client
        .query(
            &format!(
                "SELECT c.chunk_index, c.chunk_text, c.embedding::real[], \
                        c.source_hash = hashtextextended(d.body COLLATE \"C\", 0) \
                 FROM {s}.document_chunks c JOIN {s}.documents d ON d.id = c.source_id \
                 WHERE c.source_id = $1 ORDER BY c.chunk_index"
            ),
            &[&id],
        )
        .expect("read chunks")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Every chunk of `id` holds the exact vector of its text, fits the size,
/// is split from the row's current text, and together they cover it.
fn assert_chunked(db: &mut TestDb, id: i64, body: &str) -> usize {
    let got = chunks(db, id);
    assert!(!got.is_empty(), "document {id} has no chunks");
    for (k, (index, text, vector, current)) in got.iter().enumerate() {
        assert_eq!(*index, k as i32, "chunk numbers run from 0");
        assert_eq!(vector, &vector_for(text, DIMS), "chunk {k} of {id}");
        assert!(tokens_for(text) <= 64, "chunk {k} of {id} is too long");
        assert!(*current, "chunk {k} of {id} is of an older text");
        assert!(
            body.contains(text.as_str()),
            "chunk {k} is not from the text"
        );
    }
    for para in body.split("\n\n") {
        assert!(
            got.iter().any(|(_, t, _, _)| t.contains(para)),
            "paragraph {para:?} of {id} is in no chunk"
        );
    }
    got.len()
}

#[test]
fn setup_creates_the_chunks_table_and_every_chunk_gets_the_exact_vector_of_its_text() {
    let mut db = TestDb::new("chunks");
    let long = document("lighthouses", 5);
    documents(&mut db, &[(1, &long), (2, "a short note"), (3, "  ")]);
    let mock = Mock::start(DIMS);
    let s = db.schema.clone();

    // Before setup, a run names the command that creates the table.
    let r = go(&db, &mock, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("document_chunks") && r.stderr.contains("autoembed setup"),
        "{r:?}"
    );

    let sql = go(&db, &mock, &["setup", "--print-sql"]);
    assert_eq!(sql.code, 0, "{sql:?}");
    assert!(sql.stdout.contains("ON DELETE CASCADE"), "{}", sql.stdout);
    assert!(sql.stdout.contains("USING hnsw"), "{}", sql.stdout);
    let r = go(&db, &mock, &["setup"]);
    assert_eq!(r.code, 0, "{r:?}");
    // A foreign key that cascades, and the similarity index.
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = '{s}.document_chunks'::regclass \
             AND contype = 'f' AND confdeltype = 'c' AND confrelid = '{s}.documents'::regclass"
        )),
        1
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{s}' \
             AND tablename = 'document_chunks' AND indexdef LIKE '%USING hnsw%vector_cosine_ops%'"
        )),
        1
    );

    // dry-run counts exactly the chunks and tokens the run sends.
    let dry = go(&db, &mock, &["dry-run", "--json"]).json();
    assert_eq!(mock.requests().len(), 0);
    let r = go(&db, &mock, &["backfill", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["failed"].as_u64()),
        (Some(2), Some(0))
    );
    let long_chunks = assert_chunked(&mut db, 1, &long);
    assert!(long_chunks >= 3, "{long_chunks} chunks");
    assert_eq!(assert_chunked(&mut db, 2, "a short note"), 1);
    assert!(chunks(&mut db, 3).is_empty(), "a blank row was chunked");
    assert_eq!(j["chunks"].as_u64(), Some(long_chunks as u64 + 1));
    assert_eq!(dry["would_embed"], j["embedded"]);
    assert_eq!(dry["chunks"], j["chunks"]);
    assert_eq!(dry["estimated_tokens"], j["tokens"]);
    assert!(dry["tokens_exact"].as_bool().unwrap_or(false));

    // A row whose text did not change costs nothing.
    let requests = mock.requests().len();
    let again = go(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(
        (again["embedded"].as_u64(), again["pending_after"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(mock.requests().len(), requests);

    // An edit of another column keeps the chunks; an edit of the text
    // deletes them at once (setup's trigger: no stale chunk is found), and
    // the next run replaces them all.
    db.exec(&format!(
        "UPDATE {s}.documents SET title = 'renamed' WHERE id = 1"
    ));
    assert_eq!(chunks(&mut db, 1).len(), long_chunks);
    let shorter = document("harbours", 2);
    db.client
        .execute(
            &format!("UPDATE {s}.documents SET body = $1 WHERE id = 1"),
            &[&shorter],
        )
        .expect("edit");
    assert!(
        chunks(&mut db, 1).is_empty(),
        "stale chunks stayed after the edit"
    );
    let v = go(&db, &mock, &["verify", "--offline"]);
    assert!(v.stdout.contains("pending 1"), "{v:?}");
    assert!(v.stdout.contains("edited rows are chunked again"), "{v:?}");
    let r = go(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(r["embedded"], 1);
    let now = assert_chunked(&mut db, 1, &shorter);
    assert!(now < long_chunks);
    assert!(chunks(&mut db, 1)
        .iter()
        .all(|(_, t, _, _)| !t.contains("lighthouses")));

    // A deleted row leaves no chunk; verify counts rows and chunks.
    db.exec(&format!("DELETE FROM {s}.documents WHERE id = 2"));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.document_chunks WHERE source_id = 2"
        )),
        0
    );
    let v = go(&db, &mock, &["verify", "--offline", "--json"]);
    let counts = &v.json()["counts"];
    assert_eq!(
        (
            counts["rows"].as_i64(),
            counts["embedded"].as_i64(),
            counts["chunks"].as_i64()
        ),
        (Some(2), Some(1), Some(now as i64)),
        "{v:?}"
    );
}

#[test]
fn a_rejected_chunk_fails_its_row_whole_naming_the_chunk() {
    let mut db = TestDb::new("chunkfail");
    let bad = format!("{}\n\n{}", paragraph("good things"), paragraph("POISON"));
    let good = document("gardens", 3);
    documents(&mut db, &[(1, &bad), (2, &good)]);
    let mock = Mock::start(DIMS);
    mock.reject_inputs_containing("POISON");
    assert_eq!(go(&db, &mock, &["setup"]).code, 0);
    let r = go(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["failed"].as_u64()),
        (Some(1), Some(1))
    );
    // Not half of it: the good first chunk of row 1 is not written either.
    assert!(chunks(&mut db, 1).is_empty());
    assert_chunked(&mut db, 2, &good);
    let s = db.state_schema();
    let error: String = db
        .client
        .query_one(
            &format!("SELECT last_error FROM {s}.failures WHERE row_id = '1'"),
            &[],
        )
        .expect("failure recorded")
        .get(0);
    assert!(error.starts_with("chunk 1: "), "{error}");
}

#[test]
fn a_token_budget_never_writes_half_a_row_and_dry_run_agrees() {
    let mut db = TestDb::new("chunkbudget");
    let docs: Vec<String> = (0..3).map(|i| document(&format!("topic {i}"), 3)).collect();
    documents(&mut db, &[(1, &docs[0]), (2, &docs[1]), (3, &docs[2])]);
    let mock = Mock::start(DIMS);
    assert_eq!(go(&db, &mock, &["setup"]).code, 0);
    // Room for the first document and a chunk or two of the second.
    let first: u64 = docs[0].split("\n\n").map(tokens_for).sum();
    let budget = (first + 50).to_string();
    let dry = go(&db, &mock, &["dry-run", "--json", "--max-tokens", &budget]).json();
    let r = go(&db, &mock, &["run-once", "--json", "--max-tokens", &budget]);
    let j = r.json();
    assert_eq!(j["stop_reason"], "max_tokens", "{r:?}");
    assert_eq!(j["embedded"], 1);
    assert_chunked(&mut db, 1, &docs[0]);
    assert!(chunks(&mut db, 2).is_empty(), "half a row was written");
    assert!(mock
        .embedded_inputs()
        .iter()
        .all(|t| !t.contains("topic 1")));
    assert_eq!(
        (dry["would_embed"].as_u64(), dry["chunks"].clone()),
        (Some(1), j["chunks"].clone())
    );
    assert_eq!(dry["estimated_tokens"], j["tokens"]);
}

#[test]
fn a_row_edited_while_its_chunks_are_in_flight_keeps_no_stale_chunk() {
    let mut db = TestDb::new("chunkedit");
    let body = document("rivers", 3);
    documents(&mut db, &[(1, &body)]);
    let mock = Mock::start(DIMS);
    assert_eq!(go(&db, &mock, &["setup"]).code, 0);
    let held = mock.hold();
    let child = cmd(&db, &mock).args(["run-once", "--json"]).spawn_piped();
    held.wait_for("request arrived");
    let s = db.schema.clone();
    db.exec(&format!(
        "SET statement_timeout = '10s'; UPDATE {s}.documents SET body = 'rewritten' WHERE id = 1; RESET statement_timeout;"
    ));
    held.release();
    the_edit_won(&mut db, &mock, finish(child), "rewritten");
}

#[test]
fn chunk_sizes_without_a_chunks_table_or_past_the_model_are_refused() {
    let mut db = TestDb::new("chunkflags");
    documents(&mut db, &[(1, "text")]);
    let mock = Mock::start(DIMS);
    let r = autoembed(&db, &mock, &["dry-run", "--chunk-tokens", "100"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--chunks-table"), "{r:?}");
    let r = go(&db, &mock, &["setup"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = go(&db, &mock, &["dry-run", "--chunk-tokens", "9000"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("--chunk-tokens") && r.stderr.contains("8192"),
        "{r:?}"
    );
    let r = go(&db, &mock, &["dry-run", "--chunk-overlap", "64"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--chunk-overlap"), "{r:?}");
}

#[test]
fn a_chunk_many_rows_share_is_paid_for_once_and_copied() {
    let mut db = TestDb::new("chunkcopy");
    let footer = paragraph("the shared footer");
    let docs: Vec<String> = (0..4)
        .map(|i| format!("{}\n\n{footer}", paragraph(&format!("item {i}"))))
        .collect();
    documents(
        &mut db,
        &[(1, &docs[0]), (2, &docs[1]), (3, &docs[2]), (4, &docs[3])],
    );
    let mock = Mock::start(DIMS);
    assert_eq!(go(&db, &mock, &["setup"]).code, 0);
    // Two batches of two: the footer is sent once in the first, shared
    // within it, and copied into the second from what the first wrote.
    let r = go(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--batch-size",
            "2",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(r.json()["embedded"], 4, "{r:?}");
    let footers = mock
        .embedded_inputs()
        .iter()
        .filter(|t| **t == footer)
        .count();
    assert_eq!(footers, 1, "the shared chunk was paid for {footers} times");
    for (i, doc) in docs.iter().enumerate() {
        assert_eq!(assert_chunked(&mut db, i as i64 + 1, doc), 2);
    }
}

#[test]
fn wide_vectors_go_to_a_halfvec_chunks_table_with_its_index() {
    let mut db = TestDb::new("chunkhalf");
    documents(&mut db, &[(1, &document("tides", 2))]);
    let mock = Mock::start(3072);
    let mut c = cmd(&db, &mock);
    c.env("AUTOEMBED_MODEL", "text-embedding-3-large")
        .env("AUTOEMBED_DIMENSIONS", "3072");
    let r = crate::support::run(c.arg("setup"));
    assert_eq!(r.code, 0, "{r:?}");
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{s}' \
             AND tablename = 'document_chunks' AND indexdef LIKE '%USING hnsw%halfvec_cosine_ops%'"
        )),
        1
    );
    let mut c = cmd(&db, &mock);
    c.env("AUTOEMBED_MODEL", "text-embedding-3-large")
        .env("AUTOEMBED_DIMENSIONS", "3072");
    let r = crate::support::run(c.args(["run-once", "--json"]));
    assert_eq!(r.json()["embedded"], 1, "{r:?}");
    let texts: Vec<String> = db
        .client
        .query(&format!("SELECT chunk_text FROM {s}.document_chunks"), &[])
        .expect("chunks")
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(texts.len(), 2);
    for text in texts {
        let exact: bool = db
            .client
            .query_one(
                &format!(
                    "SELECT embedding::real[] = $2::real[]::vector::halfvec::real[] \
                     FROM {s}.document_chunks WHERE chunk_text = $1"
                ),
                &[&text, &vector_for(&text, 3072)],
            )
            .expect("compare")
            .get(0);
        assert!(
            exact,
            "chunk {text:?} is not the half-precision vector of its text"
        );
    }
}

#[test]
fn a_text_template_is_chunked_as_the_database_renders_it() {
    let mut db = TestDb::new("chunktemplate");
    let body = document("canals", 3);
    documents(&mut db, &[(1, &body)]);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.documents SET title = 'Canals of the north'"
    ));
    let mock = Mock::start(DIMS);
    let with_template = |db: &TestDb, args: &[&str]| {
        let mut c = cmd(db, &mock);
        c.env_remove("AUTOEMBED_TEXT_COLUMN")
            .env("AUTOEMBED_TEXT_TEMPLATE", "{title}\\n\\n{body}");
        crate::support::run(c.args(args))
    };
    assert_eq!(with_template(&db, &["setup"]).code, 0);
    let r = with_template(&db, &["run-once", "--json"]);
    assert_eq!(r.json()["embedded"], 1, "{r:?}");
    let first = chunks(&mut db, 1)[0].1.clone();
    assert!(first.starts_with("Canals of the north\n\n"), "{first:?}");
    // An edit of any column the template reads makes the row pending again.
    db.exec(&format!(
        "UPDATE {s}.documents SET title = 'Canals of the south'"
    ));
    let r = with_template(&db, &["run-once", "--json"]);
    assert_eq!(r.json()["embedded"], 1, "{r:?}");
    let first = chunks(&mut db, 1)[0].1.clone();
    assert!(first.starts_with("Canals of the south"), "{first:?}");
}

#[test]
fn an_edit_committing_during_the_write_leaves_no_stale_chunk() {
    let mut db = TestDb::new("chunkrace");
    documents(&mut db, &[(1, &document("bridges", 2))]);
    let mock = Mock::start(DIMS);
    assert_eq!(go(&db, &mock, &["setup"]).code, 0);
    let held = mock.hold();
    let child = cmd(&db, &mock).args(["run-once", "--json"]).spawn_piped();
    held.wait_for("request arrived");
    // The application edits the row in a transaction still open when the
    // reply comes back: the write must wait for it, then see the edit.
    let s = db.schema.clone();
    let mut app = crate::support::connect();
    let mut tx = app.transaction().expect("begin");
    tx.execute(
        &format!("UPDATE {s}.documents SET body = 'rebuilt' WHERE id = 1"),
        &[],
    )
    .expect("edit");
    held.release();
    crate::support::wait_for_count(
        &mut db.client,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND wait_event = 'advisory' AND query LIKE 'SELECT count(pg_advisory_xact_lock(%'",
        1,
        "the write waiting for the edit",
    );
    tx.commit().expect("commit");
    the_edit_won(&mut db, &mock, finish(child), "rebuilt");
}

/// A run whose only row was edited to `text` while it worked wrote no
/// chunk of the old text; the next run chunks the new one.
fn the_edit_won(db: &mut TestDb, mock: &Mock, out: crate::support::Run, text: &str) {
    let j = out.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["changed"].as_u64()),
        (Some(0), Some(1)),
        "{out:?}"
    );
    assert!(
        chunks(db, 1).is_empty(),
        "chunks of the old text survived the edit"
    );
    mock.unhold();
    let r = go(db, mock, &["run-once", "--json"]).json();
    assert_eq!(r["embedded"], 1);
    assert_eq!(assert_chunked(db, 1, text), 1);
}

#[test]
fn a_chunks_table_of_the_wrong_shape_or_without_grants_is_refused_naming_the_fix() {
    let mut db = TestDb::new("chunkshape");
    documents(&mut db, &[(1, &document("ferries", 2))]);
    let s = db.schema.clone();
    let mock = Mock::start(DIMS);
    // One a user made by hand: no source_hash, no key.
    db.exec(&format!(
        "CREATE TABLE {s}.document_chunks (source_id bigint, chunk_index int, chunk_text text, embedding vector({DIMS}))"
    ));
    let r = go(&db, &mock, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no column source_hash bigint"), "{r:?}");
    assert!(r.stderr.contains("--chunks-table"), "{r:?}");
    db.exec(&format!(
        "ALTER TABLE {s}.document_chunks ADD COLUMN source_hash bigint"
    ));
    let r = go(&db, &mock, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("PRIMARY KEY (source_id, chunk_index)"),
        "{r:?}"
    );
    assert_eq!(mock.requests().len(), 0);

    // setup's own table, and a role that may read the documents but not write the chunks.
    db.exec(&format!("DROP TABLE {s}.document_chunks"));
    assert_eq!(go(&db, &mock, &["setup"]).code, 0);
    let role = crate::support::TestRole::new(
        &mut db,
        "GRANT SELECT ON {s}.documents TO {role}; GRANT SELECT ON {s}.document_chunks TO {role};
         GRANT USAGE ON SCHEMA {s}_state TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s}_state TO {role};",
    );
    let r = crate::support::run(
        cmd(&db, &mock)
            .env("DATABASE_URL", role.url())
            .arg("run-once"),
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "may not write the chunks table: GRANT INSERT, UPDATE, DELETE ON \"{s}\".\"document_chunks\""
        )),
        "{r:?}"
    );
    assert_eq!(mock.requests().len(), 0);
    // With the grants, the role runs; the application's edits need none
    // (the trigger runs as setup's role).
    db.exec(&format!(
        "GRANT INSERT, UPDATE, DELETE ON {s}.document_chunks TO {r}; GRANT UPDATE ON {s}.documents TO {r};",
        r = role.name
    ));
    let r = crate::support::run(
        cmd(&db, &mock)
            .env("DATABASE_URL", role.url())
            .args(["run-once", "--json"]),
    );
    assert_eq!(r.json()["embedded"], 1, "{r:?}");
    let mut app =
        postgres::Client::connect(&role.url(), postgres::NoTls).expect("connect as the role");
    db.exec(&format!(
        "REVOKE DELETE ON {s}.document_chunks FROM {}",
        role.name
    ));
    app.execute(
        &format!("UPDATE {s}.documents SET body = 'edited by the app' WHERE id = 1"),
        &[],
    )
    .expect("an edit by a role without DELETE on the chunks");
    assert!(chunks(&mut db, 1).is_empty());
}

#[test]
fn the_printed_sql_sets_up_a_database_as_setup_does() {
    let mut db = TestDb::new("chunkmigration");
    documents(&mut db, &[(1, &document("piers", 2))]);
    let mock = Mock::start(DIMS);
    let sql = go(&db, &mock, &["setup", "--print-sql"]);
    assert_eq!(sql.code, 0, "{sql:?}");
    // A migration runs it in one transaction.
    db.exec(&format!("BEGIN; {} COMMIT;", sql.stdout));
    let r = go(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.json()["embedded"], 1, "{r:?}");
    let v = go(&db, &mock, &["verify", "--offline"]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(v.stdout.contains("edited rows are chunked again"), "{v:?}");
    // --uninstall removes the trigger and leaves the paid-for chunks.
    let before = chunks(&mut db, 1).len();
    assert!(before > 0);
    let u = go(&db, &mock, &["setup", "--uninstall"]);
    assert_eq!(u.code, 0, "{u:?}");
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.documents'::regclass AND NOT tgisinternal"
        )),
        0
    );
    assert_eq!(chunks(&mut db, 1).len(), before);
}
