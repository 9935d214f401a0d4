//! Roles that may not do everything: a read-only database, missing column
//! grants, row-level security, a state schema the role may not create.
//! Each is found before anything is paid for, and named with its fix.

use crate::support::mock::{vector_for, Mock};
use crate::support::{run, Run, TestDb, TestRole};

fn as_role(db: &TestDb, mock: &Mock, role: &TestRole, args: &[&str]) -> Run {
    run(db.cmd(mock).env("DATABASE_URL", role.url()).args(args))
}

fn check<'a>(verify: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    verify["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name}: {verify}"))
}

#[test]
fn a_read_only_database_stops_a_run_before_any_request_and_dry_run_still_works() {
    let mut db = TestDb::new("readonly");
    db.products(5, 1536);
    let role = TestRole::new(
        &mut db,
        "GRANT SELECT, UPDATE ON {s}.products TO {role}; GRANT CREATE ON DATABASE test TO {role};
         ALTER ROLE {role} SET default_transaction_read_only = on;",
    );
    let mock = Mock::start(1536);
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("the database is read-only (default_transaction_read_only is on)"),
        "{r:?}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert_eq!(mock.requests().len(), 0);
    let v = as_role(&db, &mock, &role, &["verify", "--json"]);
    assert_eq!(v.code, 1, "{v:?}");
    assert_eq!(check(&v.json(), "writable")["ok"], false);
    let dry = as_role(&db, &mock, &role, &["dry-run", "--json"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(dry.json()["would_embed"], 5);
}

#[test]
fn a_missing_grant_is_named_before_anything_is_paid_for() {
    let mut db = TestDb::new("grants");
    db.products(5, 1536);
    let role = TestRole::new(&mut db, "GRANT SELECT ON {s}.products TO {role};");
    let mock = Mock::start(1536);
    let s = db.schema.clone();
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "GRANT UPDATE (\"embedding\") ON \"{s}\".\"products\" TO \"{}\"",
            role.name
        )),
        "{r:?}"
    );
    assert_eq!(mock.requests().len(), 0);

    // With the column grant, the state schema is next: the role may not create it.
    db.exec(&format!(
        "GRANT UPDATE (embedding) ON {s}.products TO {}",
        role.name
    ));
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "may not create it: GRANT CREATE ON DATABASE \"test\" TO \"{}\"",
            role.name
        )) && r.stderr.contains("--state-schema"),
        "{r:?}"
    );
    let v = as_role(&db, &mock, &role, &["verify", "--json"]).json();
    assert_eq!(check(&v, "state_schema")["ok"], false, "{v}");
    assert_eq!(check(&v, "privileges")["ok"], true, "{v}");
    // Setup as this role changes nothing either; printing it works.
    let r = as_role(&db, &mock, &role, &["setup"]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = as_role(&db, &mock, &role, &["setup", "--print-sql"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("CREATE TRIGGER"), "{r:?}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{s}' AND indexname LIKE '%autoembed%'"
        )),
        0
    );
    assert_eq!(mock.requests().len(), 0);

    // Once an administrator has run setup, the role runs.
    assert_eq!(run(db.cmd(&mock).args(["setup"])).code, 0);
    let st = db.state_schema();
    db.exec(&format!(
        "GRANT USAGE ON SCHEMA {st} TO {r}; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {st} TO {r};",
        r = role.name
    ));
    let r = as_role(&db, &mock, &role, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(db.correct_rows(1536), (5, 0));
}

#[test]
fn row_level_security_that_hides_rows_from_updates_is_found_and_never_paid_for_twice() {
    let mut db = TestDb::new("rls");
    db.products(10, 1536);
    let s = db.schema.clone();
    let role = TestRole::new(
        &mut db,
        "GRANT SELECT, UPDATE ON {s}.products TO {role}; GRANT CREATE ON DATABASE test TO {role};
         ALTER TABLE {s}.products ENABLE ROW LEVEL SECURITY;
         CREATE POLICY reads ON {s}.products FOR SELECT TO {role} USING (true);",
    );
    let mock = Mock::start(1536);
    // Reads allowed, updates not: found before any request.
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("row-level security on")
            && r.stderr.contains("update no rows")
            && r.stderr.contains("FOR UPDATE TO"),
        "{r:?}"
    );
    assert_eq!(mock.requests().len(), 0);
    let v = as_role(&db, &mock, &role, &["verify", "--json"]).json();
    assert_eq!(check(&v, "row_security")["ok"], false, "{v}");

    // An update policy that reaches only some rows: the batch is paid once,
    // the rows it reaches get their vectors, the others are recorded as
    // failed and the run stops with the fix; the next run does not pay for them.
    db.exec(&format!(
        "CREATE POLICY some_updates ON {s}.products FOR UPDATE TO {} USING (product_id_internal <= 6)",
        role.name
    ));
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("4 rows of")
            && r.stderr
                .contains("took no vector although their text is unchanged"),
        "{r:?}"
    );
    assert_eq!(mock.embedded_inputs().len(), 10);
    let table = db.table();
    assert_eq!(
        db.vector(&table, "product_id_internal", "6"),
        Some(vector_for("product 6", 1536))
    );
    assert_eq!(db.vector(&table, "product_id_internal", "7"), None);
    let r = as_role(&db, &mock, &role, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 0);
    assert_eq!(mock.embedded_inputs().len(), 10, "paid again");
    let st = db.state_schema();
    assert_eq!(db.count(&format!("SELECT count(*) FROM {st}.failures")), 4);
}

#[test]
fn setup_that_fails_part_way_changes_nothing() {
    let mut db = TestDb::new("halfsetup");
    db.products(5, 1536);
    let s = db.schema.clone();
    let role = TestRole::new(
        &mut db,
        "ALTER TABLE {s}.products OWNER TO {role}; GRANT CREATE ON SCHEMA {s} TO {role};
         GRANT CREATE ON DATABASE test TO {role};
         CREATE FUNCTION {s}.products_embedding_autoembed_reset() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';",
    );
    let mock = Mock::start(1536);
    // The index builds, then the trigger's function belongs to someone else.
    let r = as_role(&db, &mock, &role, &["setup"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("setup failed (trigger)") && r.stderr.contains("must be owner"),
        "{r:?}"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{s}' AND indexname LIKE '%autoembed%'"
        )),
        0,
        "the index was left behind"
    );
    let st = db.state_schema();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_namespace WHERE nspname = '{st}'"
        )),
        0
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.products'::regclass AND NOT tgisinternal"
        )),
        0
    );
}

#[test]
fn a_table_locked_by_another_session_stops_the_run_after_a_bounded_wait() {
    let mut db = TestDb::new("locked");
    db.products(5, 1536);
    let role = TestRole::new(
        &mut db,
        "GRANT SELECT, UPDATE ON {s}.products TO {role}; GRANT CREATE ON DATABASE test TO {role};
         ALTER ROLE {role} SET lock_timeout = '300ms';",
    );
    let mock = Mock::start(1536);
    // A migration holds the table in an open transaction.
    let mut migration = crate::support::connect();
    let s = db.schema.clone();
    migration
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {s}.products IN ACCESS EXCLUSIVE MODE;"
        ))
        .expect("lock");
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("gave up waiting for a lock another session holds"),
        "{r:?}"
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    assert_eq!(mock.requests().len(), 0);
    migration.batch_execute("COMMIT").expect("commit");
    // The next run carries on.
    let r = as_role(&db, &mock, &role, &["run-once"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(db.correct_rows(1536), (5, 0));
}
