//! Faults injected at random and at the worst moment, and bad input: the
//! outcome must be exactly what a careful operator expects.

use crate::support::SpawnPiped;

use crate::support::mock::{vector_for, Fault, Mock};
use crate::support::{autoembed, TestDb};
use std::time::Duration;

#[test]
fn twenty_percent_faults_still_end_with_every_row_holding_the_vector_of_its_current_text() {
    let mut db = TestDb::new("faultrate");
    db.products(2000, 1536);
    let mock = Mock::start(1536);
    mock.fault_rate(
        0.2,
        vec![
            Fault::openai(500, "server_error", "The server had an error"),
            Fault::openai(502, "bad_gateway", "Bad gateway").with_header("retry-after", "0"),
            Fault::openai(503, "server_is_overloaded", "Overloaded")
                .with_header("retry-after-ms", "20"),
            Fault::Delay(Duration::from_millis(1500)),
            Fault::Reset,
            Fault::Body("<html>502 Bad Gateway</html>".into()),
            Fault::Body(r#"{"error":{"code":502,"message":"Upstream error"}}"#.into()),
            Fault::WrongCount,
            Fault::WrongDims,
            Fault::RepeatedIndex,
            Fault::MissingIndex,
        ],
    );
    let s = db.schema.clone();
    let mut runs = 0;
    loop {
        runs += 1;
        let r = autoembed(
            &db,
            &mock,
            &[
                "run-once",
                "--json",
                "--batch-size",
                "20",
                "--request-timeout",
                "1",
            ],
        );
        assert!(r.code == 0 || r.code == 3, "{r:?}");
        // The application keeps editing texts between runs.
        if runs == 1 {
            db.exec(&format!(
                "UPDATE {s}.products SET embedding_text = 'edited ' || product_id_internal, embedding = NULL
                 WHERE product_id_internal % 97 = 0"
            ));
        }
        if r.json()["pending_after"] == 0 && runs > 1 {
            break;
        }
        assert!(runs < 12, "still pending after {runs} runs");
    }
    assert_eq!(db.correct_rows(1536), (2000, 0));
    let st = db.state_schema();
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM {st}.failures")),
        0,
        "a transient fault marked a row failed"
    );
    let faults = mock.faults_served();
    assert!(faults >= 10, "only {faults} faults were injected");
    eprintln!(
        "faults: 2000 rows, {runs} runs, {} requests, {faults} faults injected, {} inputs sent",
        mock.requests().len() + faults,
        mock.embedded_inputs().len()
    );
}

#[test]
fn a_killed_database_connection_mid_request_is_reconnected_and_the_paid_batch_lands() {
    let mut db = TestDb::new("pgkill");
    db.products(30, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    let app = db.schema.clone();
    let url = crate::support::url_named(&app);
    let child = db
        .cmd(&mock)
        .env("DATABASE_URL", &url)
        .args([
            "backfill",
            "--json",
            "--batch-size",
            "10",
            "--concurrency",
            "1",
        ])
        .spawn_piped();
    held.wait_for("first request");
    held.release();
    held.wait_for("second request");
    // The server drops autoembed's connection while the provider works (a
    // restart, an idle timeout, an operator): the vectors of that request
    // were paid for, so the write connects again and lands.
    let killed = db.count(&format!(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}') k"
    ));
    assert_eq!(killed, 1);
    mock.unhold();
    held.release();
    let out = crate::support::finish(child);
    assert_eq!(Some(out.code), Some(0), "{}", out.stderr);
    let j = out.json();
    assert_eq!(
        (
            j["embedded"].as_u64(),
            j["requests"].as_u64(),
            j["stop_reason"].as_str()
        ),
        (Some(30), Some(3), Some("drained")),
        "{j}"
    );
    assert!(out.stderr.contains("reconnected"), "{}", out.stderr);
    assert_eq!(db.correct_rows(1536), (30, 0));
}

#[test]
fn odd_input_is_embedded_exactly_or_refused_clearly() {
    let mut db = TestDb::new("oddinput");
    let s = db.schema.clone();
    let big = "lorem ipsum dolor ".repeat(60_000); // about 1 MB
    db.exec(&format!(
        r#"CREATE EXTENSION IF NOT EXISTS citext;
           CREATE TABLE {s}.odd (id text PRIMARY KEY, "x""; DROP TABLE {s}.odd; --" citext, embedding vector(16));
           INSERT INTO {s}.odd VALUES ('a', 'Crème brûlée, 東京, مرحبا, 🍮'), ('b', '   '), ('c', NULL), ('d', 'CamelCase Text');"#
    ));
    db.client
        .execute(&format!(r#"INSERT INTO {s}.odd VALUES ('e', $1)"#), &[&big])
        .expect("insert 1 MB text");
    let mock = Mock::start(1536);
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--table",
            &format!("{s}.odd"),
            "--text-column",
            &format!("x\"; DROP TABLE {s}.odd; --"),
            "--dimensions",
            "16",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 3);
    assert_eq!(r.json()["truncated"], 1);
    let t = format!("{s}.odd");
    assert_eq!(
        db.vector(&t, "id", "a"),
        Some(vector_for("Crème brûlée, 東京, مرحبا, 🍮", 16))
    );
    assert_eq!(
        db.vector(&t, "id", "d"),
        Some(vector_for("CamelCase Text", 16))
    );
    // The 1 MB text is cut to the model's 8192 tokens, on a token boundary.
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let cut = bpe
        .decode(&bpe.encode_ordinary(&big)[..8192])
        .expect("decode");
    assert!(big.starts_with(&cut) && cut.len() < big.len());
    assert_eq!(db.vector(&t, "id", "e"), Some(vector_for(&cut, 16)));
    assert_eq!(
        mock.embedded_inputs()
            .iter()
            .filter(|i| i.len() > 100)
            .count(),
        1
    );
    assert_eq!(db.vector(&t, "id", "b"), None);
    let j = autoembed(
        &db,
        &mock,
        &[
            "verify",
            "--json",
            "--table",
            &t,
            "--text-column",
            &format!("x\"; DROP TABLE {s}.odd; --"),
            "--dimensions",
            "16",
        ],
    )
    .json();
    assert_eq!(j["counts"]["blank"], 2);
    assert_eq!(j["counts"]["embedded"], 3);
}

#[test]
fn every_connection_killed_mid_run_is_reconnected_and_the_run_finishes() {
    let mut db = TestDb::new("pgkillall");
    db.products(60, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    let app = db.schema.clone();
    let url = crate::support::url_named(&app);
    let child = db
        .cmd(&mock)
        .env("DATABASE_URL", &url)
        .args(["run-once", "--json", "--batch-size", "10"])
        .spawn_piped();
    held.wait_for("first request");
    // Every backend of the run goes (as in a restart), the first worker's
    // while its request is out, the others' while they wait to claim.
    let killed = db.count(&format!(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}') k"
    ));
    assert!(killed >= 1);
    mock.unhold();
    held.release();
    let out = crate::support::finish(child);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json()["embedded"], 60, "{}", out.stdout);
    assert_eq!(db.correct_rows(1536), (60, 0));
    let (sent, distinct) = crate::support::sent_and_distinct(&mock);
    assert_eq!(sent, distinct, "a text was paid for twice");
}
