//! Supabase-ready: `setup` (trigger, partial index, state schema; printed,
//! run, reversed), the API key from Vault, and the examples that ship.

use crate::support::mock::{vector_for, Mock};
use crate::support::{autoembed, run, TestDb, API_KEY};

#[test]
fn setup_adds_a_trigger_that_re_embeds_edited_rows_only_and_an_index_and_uninstall_removes_them() {
    let mut db = TestDb::new("setup");
    db.products(20, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "ALTER TABLE {s}.products ADD COLUMN price numeric DEFAULT 1"
    ));
    let mock = Mock::start(1536);
    let v = autoembed(&db, &mock, &["verify", "--json"]).json();
    let detail = |j: &serde_json::Value, name: &str| {
        j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["detail"].as_str().unwrap_or("").to_string())
    };
    assert!(
        detail(&v, "reset_trigger")
            .unwrap_or_default()
            .contains("run `autoembed setup`"),
        "{v}"
    );
    assert!(
        detail(&v, "pending_index")
            .unwrap_or_default()
            .contains("CREATE INDEX CONCURRENTLY"),
        "{v}"
    );

    for _ in 0..2 {
        // Idempotent: twice is the same as once.
        let r = autoembed(&db, &mock, &["setup"]);
        assert_eq!(r.code, 0, "{r:?}");
    }
    let v = autoembed(&db, &mock, &["verify", "--json"]).json();
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        detail(&v, "reset_trigger")
            .unwrap_or_default()
            .contains("edited rows are re-embedded"),
        "{v}"
    );
    assert_eq!(
        detail(&v, "pending_index").as_deref(),
        Some("a partial index finds pending rows")
    );

    assert_eq!(autoembed(&db, &mock, &["backfill"]).code, 0);
    assert_eq!(db.correct_rows(1536), (20, 0));
    let requests = mock.requests().len();
    // Another column changes: no paid re-embedding.
    db.exec(&format!("UPDATE {s}.products SET price = 2"));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NULL"
        )),
        0
    );
    // The text changes: the row is pending again, and the next run re-embeds it.
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'new text' WHERE product_id_internal = 3"
    ));
    // Text and embedding set together (the application embeds itself): kept.
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'app text',
             embedding = (SELECT embedding FROM {s}.products WHERE product_id_internal = 5) WHERE product_id_internal = 4"
    ));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NULL"
        )),
        1
    );
    let j = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 1);
    assert_eq!(mock.requests().len(), requests + 1);
    let table = db.table();
    assert_eq!(
        db.vector(&table, "product_id_internal", "3"),
        Some(vector_for("new text", 1536))
    );

    // The partial index serves the pending-row lookup.
    db.exec("SET enable_seqscan = off");
    let plan: String = db
        .client
        .query(
            &format!(
                "EXPLAIN SELECT product_id_internal FROM {s}.products WHERE embedding IS NULL \
                 AND coalesce(embedding_text COLLATE \"C\" ~ '[^ \\t\\n\\r\\f\\v]', false) \
                 ORDER BY product_id_internal LIMIT 100"
            ),
            &[],
        )
        .expect("explain")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    db.exec("RESET enable_seqscan");
    assert!(
        plan.contains("products_embedding_autoembed_queue"),
        "{plan}"
    );

    let r = autoembed(&db, &mock, &["setup", "--uninstall"]);
    assert_eq!(r.code, 0, "{r:?}");
    let st = db.state_schema();
    assert_eq!(db.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.products'::regclass AND NOT tgisinternal")), 0);
    assert_eq!(db.count(&format!("SELECT count(*) FROM pg_indexes WHERE schemaname = '{s}' AND indexname LIKE '%autoembed%'")), 0);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_namespace WHERE nspname = '{st}'"
        )),
        0
    );
    assert_eq!(db.count(&format!("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE nspname = '{s}'")), 0);
}

#[test]
fn setup_print_sql_is_a_migration_that_runs_and_changes_nothing_by_itself() {
    let mut db = TestDb::new("printsql");
    db.products(5, 1536);
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["setup", "--print-sql"]);
    assert_eq!(r.code, 0, "{r:?}");
    let s = db.schema.clone();
    assert_eq!(db.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.products'::regclass AND NOT tgisinternal")), 0);
    assert!(
        r.stdout
            .contains("CREATE TRIGGER \"autoembed_reset_embedding\""),
        "{}",
        r.stdout
    );
    // A migration runs in a transaction: the printed SQL must work there, twice.
    for _ in 0..2 {
        db.exec(&format!("BEGIN;\n{}\nCOMMIT;", r.stdout));
    }
    let v = autoembed(&db, &mock, &["verify", "--json"]).json();
    assert_eq!(v["ok"], true, "{v}");
    let un = autoembed(&db, &mock, &["setup", "--print-sql", "--uninstall"]);
    db.exec(&format!("BEGIN;\n{}\nCOMMIT;", un.stdout));
    assert_eq!(db.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.products'::regclass AND NOT tgisinternal")), 0);
}

/// A stand-in for Supabase Vault: a `vault` schema with a view of the same
/// columns as `vault.decrypted_secrets` (the extension is not installable here).
fn fake_vault(db: &mut TestDb, name: &str, secret: &str) {
    db.exec(
        "SELECT pg_advisory_lock(4243);
         CREATE SCHEMA IF NOT EXISTS vault;
         CREATE TABLE IF NOT EXISTS vault.store (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text UNIQUE,
             description text DEFAULT '', secret text, key_id uuid, nonce bytea,
             created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
         CREATE OR REPLACE VIEW vault.decrypted_secrets AS
             SELECT id, name, description, secret, secret AS decrypted_secret, key_id, nonce, created_at, updated_at FROM vault.store;
         SELECT pg_advisory_unlock(4243);",
    );
    db.client
        .execute(
            "INSERT INTO vault.store (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET secret = excluded.secret",
            &[&name, &secret],
        )
        .expect("store the secret");
}

#[test]
fn the_api_key_can_come_from_supabase_vault() {
    let mut db = TestDb::new("vault");
    db.products(8, 1536);
    let name = format!("{}_openai_key", db.schema);
    fake_vault(&mut db, &name, API_KEY);
    let mock = Mock::start(1536);
    let r = run(db.cmd(&mock).env_remove("OPENAI_API_KEY").args([
        "run-once",
        "--json",
        "--api-key-vault-secret",
        &name,
    ]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 8);
    assert_eq!(
        mock.requests()[0].header("authorization"),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    let v = run(db
        .cmd(&mock)
        .env_remove("OPENAI_API_KEY")
        .env("AUTOEMBED_API_KEY_VAULT_SECRET", &name)
        .args(["verify", "--json", "-vvv"]));
    assert_eq!(v.code, 0, "{v:?}");

    // A secret that is not there: exit 2, naming the flag; nothing sent.
    let before = mock.requests().len();
    let r = run(db
        .cmd(&mock)
        .args(["run-once", "--api-key-vault-secret", "no_such_secret"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no Vault secret named \"no_such_secret\" (--api-key-vault-secret, AUTOEMBED_API_KEY_VAULT_SECRET)"), "{r:?}");
    let v = run(db.cmd(&mock).args([
        "verify",
        "--json",
        "--api-key-vault-secret",
        "no_such_secret",
    ]));
    assert_eq!(v.code, 1);
    assert!(v.stdout.contains("no Vault secret named"), "{v:?}");

    // A role that may not read the view: a clear error.
    let role = format!("{}_role", db.schema);
    let s = db.schema.clone();
    db.exec(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA {s} TO {role}; GRANT SELECT, UPDATE ON {s}.products TO {role};
         GRANT USAGE ON SCHEMA vault TO {role};"
    ));
    let url = crate::support::admin_url().replacen("postgres@", &format!("{role}@"), 1);
    let r = run(db.cmd(&mock).env("DATABASE_URL", &url).args([
        "run-once",
        "--api-key-vault-secret",
        &name,
    ]));
    db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role};"));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("may not read vault.decrypted_secrets"),
        "{r:?}"
    );
    assert_eq!(mock.requests().len(), before);
}

#[test]
fn the_shipped_examples_work_as_written() {
    let db = TestDb::new("examples");
    let name = format!("{}_db", db.schema);
    let mut admin = crate::support::connect();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .expect("drop");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create");
    let url = crate::support::admin_url().replace("/test", &format!("/{name}"));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut ex = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let read = |p: &str| {
            std::fs::read_to_string(
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples/").to_string() + p,
            )
            .expect(p)
        };
        // The table migration, twice (migrations may be re-run).
        for _ in 0..2 {
            ex.batch_execute(&read("supabase/20260101000000_products.sql"))
                .expect("products migration");
        }
        ex.batch_execute("INSERT INTO products (name, embedding_text) SELECT 'p' || g, 'text ' || g FROM generate_series(1, 30) g")
            .expect("rows");
        let mock = Mock::start(1536);
        let cmd = |args: &[&str]| {
            let mut c = db.cmd(&mock);
            c.env("DATABASE_URL", &url)
                .env("AUTOEMBED_TABLE", "public.products")
                .env_remove("AUTOEMBED_STATE_SCHEMA");
            run(c.args(args))
        };
        // The shipped setup migration is exactly what `setup --print-sql` prints for this table.
        let printed = cmd(&["setup", "--print-sql"]);
        assert_eq!(printed.code, 0, "{printed:?}");
        assert_eq!(
            printed.stdout.trim_end(),
            read("supabase/20260101000100_autoembed_setup.sql").trim_end(),
            "examples/supabase/20260101000100_autoembed_setup.sql is stale: regenerate it with autoembed setup --print-sql"
        );
        ex.batch_execute(&format!("BEGIN;\n{}\nCOMMIT;", printed.stdout))
            .expect("setup migration");
        // The Vault statement, against a stand-in for vault.create_secret.
        ex.batch_execute(
            "CREATE SCHEMA vault;
             CREATE TABLE vault.secrets (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text UNIQUE, description text, secret text);
             CREATE FUNCTION vault.create_secret(new_secret text, new_name text, new_description text DEFAULT '', new_key_id uuid DEFAULT NULL)
               RETURNS uuid LANGUAGE sql AS $$ INSERT INTO vault.secrets (name, description, secret) VALUES (new_name, new_description, new_secret) RETURNING id $$;
             CREATE VIEW vault.decrypted_secrets AS SELECT id, name, description, secret, secret AS decrypted_secret,
               NULL::uuid AS key_id, NULL::bytea AS nonce, now() AS created_at, now() AS updated_at FROM vault.secrets;",
        )
        .expect("vault stand-in");
        ex.batch_execute(&read("supabase/vault_secret.sql"))
            .expect("vault_secret.sql");
        let r = cmd(&[
            "run-once",
            "--json",
            "--api-key-vault-secret",
            "openai_api_key",
        ]);
        assert_eq!(
            (r.code, r.json()["embedded"].as_u64()),
            (0, Some(30)),
            "{r:?}"
        );
        assert_eq!(
            mock.requests()[0].header("authorization"),
            Some("Bearer sk-replace-me")
        );
        // The GitHub Actions workflow's check, with its environment.
        let workflow = read("github-actions/autoembed-verify.yml");
        assert!(workflow.contains("autoembed verify --offline"));
        let mut c = db.cmd(&mock);
        c.env("DATABASE_URL", &url)
            .env("AUTOEMBED_TABLE", "public.products")
            .env("AUTOEMBED_PROVIDER", "openai-compatible")
            .env("AUTOEMBED_API_BASE", "http://localhost:9/v1")
            .env_remove("OPENAI_API_KEY")
            .env_remove("AUTOEMBED_STATE_SCHEMA");
        let v = run(c.args(["verify", "--offline"]));
        assert_eq!(v.code, 0, "{v:?}");
    }));
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn the_crontab_example_line_runs_as_written() {
    let mut db = TestDb::new("crontab");
    db.products(12, 1536);
    let mock = Mock::start(1536);
    let crontab = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crontab.example"))
        .expect("crontab.example");
    let line = crontab
        .lines()
        .find(|l| l.starts_with("*/10 "))
        .expect("an active */10 line");
    let command = line.splitn(6, ' ').nth(5).expect("a command");
    // The same command, with the install directory and log file in the test's folder.
    let dir = db.dir.display().to_string();
    let log = format!("{dir}/autoembed.log");
    let command = command
        .replace("/opt/autoembed", &dir)
        .replace("/var/log/autoembed.log", &log);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_autoembed"), db.dir.join("autoembed"))
        .expect("symlink");
    std::fs::write(
        db.dir.join(".env"),
        format!(
            "DATABASE_URL={}\nAUTOEMBED_TABLE={}\nAUTOEMBED_STATE_SCHEMA={}\nAUTOEMBED_API_BASE={}\nOPENAI_API_KEY={}\n",
            crate::support::url_with_password(),
            db.table(),
            db.state_schema(),
            mock.base,
            API_KEY
        ),
    )
    .expect(".env");
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .status()
        .expect("sh");
    assert!(status.success());
    let logged = std::fs::read_to_string(&log).expect("log written");
    assert!(logged.contains("run-once: embedded 12 rows"), "{logged}");
    assert!(!logged.contains(API_KEY) && !logged.contains(crate::support::DB_PASSWORD));
    assert_eq!(db.correct_rows(1536), (12, 0));
}
