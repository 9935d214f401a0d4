//! `autoembed watch`: rows embedded as they become pending, woken by
//! `setup --notify` or by polling; what will pass is waited out; SIGTERM
//! ends it cleanly; beside cron nothing is paid twice.

use crate::support::mock::{vector_for, Fault, Mock};
use crate::support::{
    autoembed, finish, sent_and_distinct, signal, wait_for_count, SpawnPiped, TestDb,
};
use std::process::Child;

fn embedded(db: &TestDb) -> String {
    format!(
        "SELECT count(*) FROM {} WHERE embedding IS NOT NULL",
        db.table()
    )
}

fn watch(db: &TestDb, mock: &Mock, poll: &str) -> Child {
    db.cmd(mock)
        .env("DATABASE_URL", crate::support::url_named(&db.schema))
        .args([
            "watch",
            "--poll-interval",
            poll,
            "--batch-size",
            "10",
            "--json",
        ])
        .spawn_piped()
}

fn stop(child: Child) -> crate::support::Run {
    signal(&child, "-TERM");
    finish(child)
}

#[test]
fn watch_embeds_new_and_edited_rows_when_notified_and_stops_cleanly_on_sigterm() {
    let mut db = TestDb::new("watchnotify");
    db.products(20, 1536);
    let mock = Mock::start(1536);
    assert_eq!(autoembed(&db, &mock, &["setup", "--notify"]).code, 0);
    // An hour between looks: only a notification can wake it.
    let child = watch(&db, &mock, "3600");
    let mut c = crate::support::connect();
    wait_for_count(&mut c, &embedded(&db), 20, "the rows pending at start");
    let table = db.table();
    c.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'new ' || g FROM generate_series(21, 25) g;
         UPDATE {table} SET embedding_text = 'edited' WHERE product_id_internal = 3;"
    ))
    .expect("insert");
    wait_for_count(
        &mut c,
        &embedded(&db),
        25,
        "rows inserted and edited while it waits",
    );
    assert_eq!(
        db.vector(&table, "product_id_internal", "3"),
        Some(vector_for("edited", 1536))
    );
    let out = stop(child);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("received: stopped"), "{out:?}");
    // A JSON line per batch on stderr, and the summary on stdout at the end.
    let batches: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .filter(|v: &serde_json::Value| v["event"] == "batch")
        .collect();
    assert_eq!(
        batches
            .iter()
            .map(|b| b["embedded"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        26,
        "20 at start, 5 inserted, 1 edited: {out:?}"
    );
    assert!(batches.len() >= 3, "{out:?}");
    assert_eq!(out.json()["embedded"], 26, "{out:?}");
    let st = db.state_schema();
    assert_eq!(db.count(&format!("SELECT count(*) FROM {st}.claims")), 0);
    assert_eq!(db.correct_rows(1536), (25, 0));
}

#[test]
fn watch_polls_without_notify_and_carries_on_after_its_connections_are_killed() {
    let mut db = TestDb::new("watchpoll");
    db.products(10, 1536);
    let mock = Mock::start(1536);
    let child = watch(&db, &mock, "0.2");
    let mut c = crate::support::connect();
    wait_for_count(&mut c, &embedded(&db), 10, "the rows pending at start");
    let killed: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = '{}') k",
                db.schema
            ),
            &[],
        )
        .expect("terminate")
        .get(0);
    assert!(killed >= 1);
    c.batch_execute(&format!(
        "INSERT INTO {} SELECT g, 'product ' || g FROM generate_series(11, 30) g",
        db.table()
    ))
    .expect("insert");
    wait_for_count(
        &mut c,
        &embedded(&db),
        30,
        "rows inserted after the connection was lost",
    );
    let out = stop(child);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("reconnected") || out.stderr.contains("connection"),
        "{out:?}"
    );
    assert_eq!(db.correct_rows(1536), (30, 0));
}

#[test]
fn watch_waits_out_a_provider_outage_and_marks_nothing_failed() {
    let mut db = TestDb::new("watchdown");
    db.products(10, 1536);
    let mock = Mock::start(1536);
    mock.always(Some(
        Fault::openai(503, "server_is_overloaded", "Overloaded")
            .with_header("retry-after-ms", "10"),
    ));
    let child = watch(&db, &mock, "0.2");
    // It keeps trying (several rounds), and gives up on nothing.
    let start = std::time::Instant::now();
    while mock.faults_served() < 12 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "it stopped trying"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    mock.always(None);
    let mut c = crate::support::connect();
    wait_for_count(&mut c, &embedded(&db), 10, "rows once the provider is back");
    let out = stop(child);
    assert_eq!(out.code, 0, "{out:?}");
    let st = db.state_schema();
    assert_eq!(db.count(&format!("SELECT count(*) FROM {st}.failures")), 0);
}

#[test]
fn watch_ends_on_a_refused_key_so_a_supervisor_shows_it() {
    let mut db = TestDb::new("watchkey");
    db.products(5, 1536);
    let mock = Mock::start(1536);
    mock.always(Some(Fault::openai(
        401,
        "invalid_api_key",
        "Incorrect API key provided",
    )));
    let out = finish(watch(&db, &mock, "0.2"));
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("the API key was refused"), "{out:?}");
    assert_eq!(mock.faults_served(), 1);
}

#[test]
fn two_watchers_beside_cron_runs_pay_for_each_text_once() {
    let mut db = TestDb::new("watchcron");
    db.products(2000, 1536);
    let mock = Mock::start(1536);
    let watchers = [watch(&db, &mock, "0.2"), watch(&db, &mock, "0.2")];
    let crons: Vec<Child> = (0..2)
        .map(|_| {
            db.cmd(&mock)
                .args(["run-once", "--batch-size", "10", "--max-rows", "100000"])
                .spawn_piped()
        })
        .collect();
    for cron in crons {
        let out = finish(cron);
        assert!(out.code == 0, "{out:?}");
    }
    let mut c = crate::support::connect();
    wait_for_count(&mut c, &embedded(&db), 2000, "every row");
    for child in watchers {
        let out = stop(child);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let (sent, distinct) = sent_and_distinct(&mock);
    assert_eq!(sent, distinct, "a text was paid for twice");
    assert_eq!(db.correct_rows(1536), (2000, 0));
}

/// `GET path` on `addr`, the whole reply (empty when it cannot be had).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let mut out = String::new();
    if write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").is_ok() {
        let _ = s.read_to_string(&mut out);
    }
    out
}

#[test]
fn watch_serves_its_counters_to_prometheus() {
    use std::io::BufRead;
    let mut db = TestDb::new("watchmetrics");
    db.products(10, 1536);
    let mock = Mock::start(1536);
    // Port 0: the watcher says where it listens.
    let mut child = db
        .cmd(&mock)
        .args([
            "watch",
            "--poll-interval",
            "0.2",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .spawn_piped();
    let stderr = child.stderr.take().expect("stderr");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let addr = loop {
        let line = seen
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the metrics address in the log");
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    let mut c = crate::support::connect();
    wait_for_count(&mut c, &embedded(&db), 10, "the rows pending at start");
    let start = std::time::Instant::now();
    let body = loop {
        let reply = http_get(&addr, "/metrics");
        if reply.contains("autoembed_rows_embedded_total 10") {
            break reply;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "{reply}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for line in [
        "autoembed_rows_failed_total 0",
        "autoembed_requests_total 1",
        "autoembed_pending_rows 0",
        "# EOF",
    ] {
        assert!(body.contains(line), "{line} in {body}");
    }
    assert!(
        !body.contains("autoembed_last_write_timestamp_seconds 0\n"),
        "{body}"
    );
    let other = http_get(&addr, "/");
    assert!(other.starts_with("HTTP/1.1 404"), "{other:?}");
    signal(&child, "-TERM");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}
