//! TLS to the database, by sslmode, against the local PostgreSQL with TLS on
//! (scripts/dev-db.sh turns it on with a throwaway CA: a server certificate
//! for `localhost` signed by `ca.crt`, and an unrelated `other-ca.crt`).

use crate::support::SpawnPiped;

use crate::support::mock::Mock;
use crate::support::{run, TestDb};
use std::path::PathBuf;

fn tls_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("AUTOEMBED_TEST_TLS_DIR")
            .unwrap_or_else(|_| "/var/lib/postgresql/autoembed-tls".into()),
    )
}

fn url(host: &str, query: &str) -> String {
    format!(
        "postgresql://postgres:{}@{host}:5432/test?{query}",
        crate::support::DB_PASSWORD
    )
}

#[test]
fn each_sslmode_connects_or_refuses_as_libpq_would() {
    let ca = tls_dir().join("ca.crt");
    let other = tls_dir().join("other-ca.crt");
    assert!(
        ca.exists(),
        "{} is missing: run scripts/dev-db.sh",
        ca.display()
    );
    let (ca, other) = (ca.display().to_string(), other.display().to_string());
    let mut db = TestDb::new("tls");
    db.products(4, 1536);
    let mock = Mock::start(1536);
    let ok = [
        ("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
        ("127.0.0.1", "sslmode=require".to_string()),
        ("127.0.0.1", "sslmode=prefer".to_string()),
        ("127.0.0.1", "sslmode=disable".to_string()),
    ];
    for (host, query) in &ok {
        let r = run(db
            .cmd(&mock)
            .env("DATABASE_URL", url(host, query))
            .args(["verify", "--json"]));
        assert_eq!(r.code, 0, "{host} {query}: {r:?}");
    }
    let refused = [
        (
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            "failed verification (sslmode=verify-full)",
        ),
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={other}"),
            "failed verification (sslmode=verify-full)",
        ),
        (
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={other}"),
            "failed verification (sslmode=verify-ca)",
        ),
        (
            "127.0.0.1",
            format!("sslmode=require&sslrootcert={other}"),
            "failed verification (sslmode=require)",
        ),
        (
            "localhost",
            "sslmode=verify-full".to_string(),
            "sslmode=verify-full needs sslrootcert=PATH",
        ),
        (
            "localhost",
            "sslmode=verify-ca&sslrootcert=/no/such/ca.pem".to_string(),
            "cannot read sslrootcert /no/such/ca.pem",
        ),
        (
            "localhost",
            "sslmode=sometimes".to_string(),
            "invalid sslmode \"sometimes\"",
        ),
    ];
    for (host, query, want) in &refused {
        let r = run(db
            .cmd(&mock)
            .env("DATABASE_URL", url(host, query))
            .args(["run-once"]));
        assert_eq!(r.code, 2, "{host} {query}: {r:?}");
        assert!(
            r.stderr.contains(want),
            "{host} {query}: want {want:?} in {r:?}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    }
    assert!(
        mock.requests().is_empty(),
        "a refused connection must not reach the provider"
    );
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NOT NULL"
        )),
        0
    );
}

/// Whether the connection of a run (found by application_name while its
/// request is held at the provider) is encrypted.
fn encrypted(db: &mut TestDb, mock: &Mock, query: &str) -> bool {
    let app = format!("{}_{}", db.schema, query.len());
    let schema = db.schema.clone();
    db.exec(&format!("UPDATE {schema}.products SET embedding = NULL"));
    let held = mock.hold();
    let child = db
        .cmd(mock)
        .env(
            "DATABASE_URL",
            url("localhost", &format!("{query}&application_name={app}")),
        )
        .args(["run-once", "--concurrency", "1"])
        .spawn_piped();
    held.wait_for("request arrived");
    let ssl: bool = db
        .client
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid WHERE a.application_name = $1",
            &[&app],
        )
        .expect("pg_stat_ssl")
        .get(0);
    mock.unhold();
    held.release();
    let out = crate::support::finish(child);
    assert!(out.code == 0);
    ssl
}

#[test]
fn require_and_verify_modes_encrypt_and_disable_does_not() {
    let mut db = TestDb::new("tlsenc");
    db.products(30, 1536);
    let ca = tls_dir().join("ca.crt").display().to_string();
    let mock = Mock::start(1536);
    assert!(encrypted(&mut db, &mock, "sslmode=require"));
    assert!(encrypted(
        &mut db,
        &mock,
        &format!("sslmode=verify-full&sslrootcert={ca}")
    ));
    assert!(!encrypted(&mut db, &mock, "sslmode=disable"));
}
