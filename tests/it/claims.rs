//! Claims hold nothing open while the provider works: no transaction, no
//! lock on the user's table, no pooled connection; a killed run's rows are
//! free again at once on a direct connection and after the lease through a
//! pooler; a stopped run lets go of what it held.

use crate::support::mock::{Fault, Mock};
use crate::support::{self, autoembed, SpawnPiped, TestDb};
use std::time::{Duration, Instant};

/// The rows claimed (each batch's claim lists its rows).
fn claims(db: &mut TestDb) -> i64 {
    let state = db.state_schema();
    db.count(&format!(
        "SELECT coalesce(sum(cardinality(row_ids)), 0)::bigint FROM {state}.claims"
    ))
}

#[test]
fn a_migration_during_a_request_is_not_blocked_and_no_transaction_is_held() {
    let mut db = TestDb::new("migrate");
    db.products(30, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    let app = db.schema.clone();
    let child = db
        .cmd(&mock)
        .env("DATABASE_URL", support::url_named(&app))
        .args(["run-once", "--json", "--batch-size", "10"])
        .spawn_piped();
    held.wait_for("request arrived");
    // While the provider works, autoembed holds no transaction open and no
    // lock on the table (the other workers may be connecting meanwhile)...
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_stat_activity a WHERE a.application_name = '{app}' \
             AND (a.state LIKE 'idle in transaction%' OR EXISTS (SELECT 1 FROM pg_locks l \
               WHERE l.pid = a.pid AND l.relation = '{app}.products'::regclass))"
        )),
        0
    );
    // ...so a migration (which needs an exclusive lock) does not wait for it,
    // and neither does the application behind the migration.
    let s = db.schema.clone();
    db.exec(&format!(
        "SET lock_timeout = '2s';
         ALTER TABLE {s}.products ADD COLUMN note text;
         UPDATE {s}.products SET note = 'x' WHERE product_id_internal = 3;
         RESET lock_timeout;"
    ));
    // The rows being embedded are claimed, and only those.
    assert_eq!(claims(&mut db), 10);
    held.release();
    mock.unhold();
    let out = support::finish(child);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["embedded"], 30);
    assert_eq!(db.correct_rows(1536), (30, 0));
    assert_eq!(claims(&mut db), 0, "claims left behind");
}

#[test]
fn a_repeatable_read_default_still_claims_each_row_once() {
    let mut db = TestDb::new("rr");
    db.products(2_000, 1536);
    let mock = Mock::start(1536);
    mock.latency(Duration::from_millis(10));
    // Every claim and every write says which isolation level it ran at: the
    // race a repeatable-read claim loses is too narrow to hit on purpose, so
    // the test asks each transaction instead.
    let r = autoembed(&db, &mock, &["setup"]);
    assert_eq!(r.code, 0, "{r:?}");
    let (s, state) = (db.schema.clone(), db.state_schema());
    db.exec(&format!(
        "CREATE TABLE {s}.isolation_seen (tx text, level text);
         CREATE FUNCTION {s}.note_isolation() RETURNS trigger LANGUAGE plpgsql AS $f$
           BEGIN
             INSERT INTO {s}.isolation_seen VALUES (TG_TABLE_NAME, current_setting('transaction_isolation'));
             RETURN NULL;
           END $f$;
         CREATE TRIGGER note_isolation AFTER INSERT OR UPDATE OR DELETE ON {state}.claims
           FOR EACH STATEMENT EXECUTE FUNCTION {s}.note_isolation();
         CREATE TRIGGER note_isolation AFTER INSERT OR UPDATE OR DELETE ON {state}.models
           FOR EACH STATEMENT EXECUTE FUNCTION {s}.note_isolation();
         CREATE TRIGGER note_isolation AFTER UPDATE ON {s}.products
           FOR EACH STATEMENT EXECUTE FUNCTION {s}.note_isolation();"
    ));
    let url = format!(
        "{}?options=-c%20default_transaction_isolation%3Drepeatable%5C%20read",
        support::url_with_password()
    );
    let workers: Vec<_> = (0..3)
        .map(|_| {
            db.cmd(&mock)
                .env("DATABASE_URL", &url)
                .args(["backfill", "--json", "--batch-size", "50"])
                .spawn_piped()
        })
        .collect();
    for w in workers {
        let out = support::finish(w);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.json()["failed"], 0);
    }
    assert_eq!(
        crate::support::sent_and_distinct(&mock),
        (2_000, 2_000),
        "paid twice"
    );
    assert_eq!(db.correct_rows(1536), (2_000, 0));
    // Claims (and their release), the table's model and the writes of
    // vectors, all of them at READ COMMITTED.
    let seen = |tx: &str, level: &str| {
        format!("SELECT count(*) FROM {s}.isolation_seen WHERE tx = '{tx}' AND level {level}")
    };
    assert!(db.count(&seen("claims", "= 'read committed'")) >= 40);
    assert!(db.count(&seen("products", "= 'read committed'")) >= 40);
    assert!(db.count(&seen("models", "= 'read committed'")) >= 3);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.isolation_seen WHERE level <> 'read committed'"
        )),
        0
    );
}

#[test]
fn a_killed_run_on_a_direct_connection_frees_its_rows_at_once() {
    let mut db = TestDb::new("sigkill");
    db.products(30, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    let app = db.schema.clone();
    let mut child = db
        .cmd(&mock)
        .env("DATABASE_URL", support::url_named(&app))
        .args(["run-once", "--batch-size", "10"])
        .spawn_piped();
    held.wait_for("request arrived");
    assert_eq!(claims(&mut db), 10);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    support::wait_until_gone(&mut db, &app);
    mock.unhold();
    held.release();
    // The claims are still in the table, but their holder is gone: the next
    // run takes the rows without waiting for the lease (120 s).
    assert_eq!(claims(&mut db), 10);
    // Two of the claimed rows are deleted meanwhile: no run will claim them
    // again, and their dead claims are swept all the same.
    let s = db.schema.clone();
    db.exec(&format!(
        "DELETE FROM {s}.products WHERE product_id_internal IN (1, 2)"
    ));
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 28);
    assert_eq!(db.correct_rows(1536), (28, 0));
    assert_eq!(claims(&mut db), 0, "dead claims left behind");
}

#[test]
fn sigterm_releases_the_claims_of_the_request_in_flight() {
    let mut db = TestDb::new("release");
    db.products(30, 1536);
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
    held.wait_for("request arrived");
    assert_eq!(claims(&mut db), 10);
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let out = support::finish(child);
    held.release();
    assert_eq!(out.code, 143, "{out:?}");
    assert_eq!(out.json()["stop_reason"], "signal");
    assert_eq!(claims(&mut db), 0, "a stopped run kept its claims");
    // A run with a lease of hours would find the rows free all the same.
    mock.unhold();
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.json()["embedded"], 30, "{r:?}");
}

#[test]
fn a_lease_too_short_for_a_request_is_refused() {
    let db = TestDb::new("lease");
    let mock = Mock::start(1536);
    let r = autoembed(
        &db,
        &mock,
        &["run-once", "--claim-lease", "30", "--request-timeout", "60"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("--claim-lease (AUTOEMBED_CLAIM_LEASE)")
            && r.stderr.contains("--request-timeout"),
        "{r:?}"
    );
    assert_eq!(mock.requests().len(), 0);
}

#[test]
fn a_claim_that_lapsed_during_a_rate_limit_wait_is_confirmed_and_its_rows_are_not_sent_twice() {
    let mut db = TestDb::new("lapse");
    db.products(10, 1536);
    let mock = Mock::start(1536);
    // The first request is told to wait 10 s; the run's claims last 3 s.
    mock.script([
        Fault::openai(429, "rate_limit_exceeded", "Rate limit reached")
            .with_header("retry-after", "10"),
    ]);
    let args = [
        "run-once",
        "--json",
        "--concurrency",
        "1",
        "--request-timeout",
        "1",
        "--claim-lease",
        "3",
    ];
    let waiting = db.cmd(&mock).args(args).spawn_piped();
    // Once its claims have lapsed, another run takes the rows and embeds them.
    let state = db.state_schema();
    let start = Instant::now();
    while db.count(&format!(
        "SELECT count(*) FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid \
         WHERE n.nspname = '{state}' AND c.relname = 'claims'"
    )) == 0
        || db.count(&format!(
            "SELECT coalesce(sum(cardinality(row_ids)), 0)::bigint FROM {state}.claims \
             WHERE expires_at < now()"
        )) < 10
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the claims never lapsed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let other = autoembed(&db, &mock, &args);
    assert_eq!(other.json()["embedded"], 10, "{other:?}");
    // The waiting run confirms its claims before it sends again, finds
    // them gone, and sends nothing.
    let out = support::finish(waiting);
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["rate_limited"].as_u64()),
        (Some(0), Some(1)),
        "{j}"
    );
    assert_eq!(
        crate::support::sent_and_distinct(&mock),
        (10, 10),
        "paid twice"
    );
    assert_eq!(db.correct_rows(1536), (10, 0));
}

#[test]
fn the_claims_table_of_an_earlier_version_is_replaced_on_first_use() {
    let mut db = TestDb::new("oldclaims");
    db.products(12, 1536);
    let state = db.state_schema();
    // An earlier version's schema: one claim per row, and one of them left behind.
    db.exec(&format!(
        "CREATE SCHEMA {state};
         CREATE TABLE {state}.failures (table_name text NOT NULL, row_id text NOT NULL,
           text_hash bigint NOT NULL, attempts integer NOT NULL, last_error text NOT NULL,
           first_failed_at timestamptz NOT NULL, last_failed_at timestamptz NOT NULL,
           next_try_at timestamptz NOT NULL, PRIMARY KEY (table_name, row_id));
         CREATE TABLE {state}.claims (table_name text NOT NULL, row_id text NOT NULL,
           holder text NOT NULL, backend_pid integer, backend_start timestamptz,
           expires_at timestamptz NOT NULL, PRIMARY KEY (table_name, row_id));
         INSERT INTO {state}.claims VALUES ('x', '1', 'old:0', NULL, NULL, now() + interval '1 hour');"
    ));
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["run-once", "--json", "--batch-size", "5"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 12, "{r:?}");
    assert_eq!(db.correct_rows(1536), (12, 0));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_schema = '{state}' AND table_name = 'claims' AND column_name = 'row_ids'"
        )),
        1
    );
    assert_eq!(claims(&mut db), 0);
}
