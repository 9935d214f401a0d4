//! What every integration test needs: a schema of its own in the local
//! PostgreSQL (with pgvector), a mock embeddings server, and a way to run the
//! real `autoembed` binary against both with a clean environment.

pub use autoembed_mock as mock;

use mock::Mock;
use postgres::{Client, NoTls};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The recognisable secrets every test passes, and checks never leak.
pub const API_KEY: &str = "sk-test-SECRETKEY-4f9a1c";
pub const DB_PASSWORD: &str = "pw-SECRET-77d1e";

/// The database the tests use: `AUTOEMBED_TEST_DATABASE_URL`, else the
/// local server with trust auth (`scripts/dev-db.sh` prepares it).
pub fn admin_url() -> String {
    std::env::var("AUTOEMBED_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// The same database with a password in the URL: trust auth ignores it,
/// and every test can then check that it never appears in any output.
pub fn url_with_password() -> String {
    admin_url().replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1)
}

/// [`url_with_password`] with `application_name` set, so that a test can
/// tell autoembed's connections apart in `pg_stat_activity`.
pub fn url_named(app: &str) -> String {
    format!("{}?application_name={app}", url_with_password())
}

pub fn connect() -> Client {
    Client::connect(&admin_url(), NoTls)
        .expect("connect to the test database (run scripts/dev-db.sh)")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A schema of the test's own, dropped at the end.
pub struct TestDb {
    pub schema: String,
    pub client: Client,
    pub dir: PathBuf,
}

impl TestDb {
    pub fn new(name: &str) -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let schema = format!("t_{}_{}_{}", name, std::process::id(), n);
        let mut client = connect();
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_lock(4242); CREATE EXTENSION IF NOT EXISTS vector; SELECT pg_advisory_unlock(4242);
                 DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_state CASCADE;
                 CREATE SCHEMA {schema};"
            ))
            .expect("create test schema");
        let dir = std::env::temp_dir().join(&schema);
        std::fs::create_dir_all(&dir).expect("test dir");
        TestDb {
            schema,
            client,
            dir,
        }
    }

    /// `products` as users have it, with `n` rows whose text is `product <id>`.
    pub fn products(&mut self, n: i64, dims: usize) -> &mut Self {
        self.exec(&format!(
            "CREATE TABLE {s}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector({dims}));
             INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(1, {n}) g;",
            s = self.schema
        ));
        self
    }

    pub fn exec(&mut self, sql: &str) {
        self.client
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub fn table(&self) -> String {
        format!("{}.products", self.schema)
    }

    pub fn state_schema(&self) -> String {
        format!("{}_state", self.schema)
    }

    /// The stored vector of one row, exactly (`None` when NULL).
    pub fn vector(&mut self, table: &str, id_col: &str, id: &str) -> Option<Vec<f32>> {
        let sql = format!("SELECT embedding::real[] FROM {table} WHERE {id_col}::text = $1");
        self.client
            .query_one(&sql, &[&id])
            .expect("read vector")
            .get(0)
    }

    pub fn count(&mut self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Rows of `products` whose vector is exactly the mock's vector of their current text.
    pub fn correct_rows(&mut self, dims: usize) -> (i64, i64) {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT embedding_text, embedding::real[] FROM {}.products",
                    self.schema
                ),
                &[],
            )
            .expect("read products");
        let mut correct = 0;
        let mut wrong = 0;
        for r in rows {
            let text: Option<String> = r.get(0);
            let v: Option<Vec<f32>> = r.get(1);
            match (text, v) {
                (Some(t), Some(v)) if v == mock::vector_for(&t, dims) => correct += 1,
                (_, Some(_)) => wrong += 1,
                _ => {}
            }
        }
        (correct, wrong)
    }

    /// The binary with a clean environment pointed at this schema and `mock`.
    pub fn cmd(&self, mock: &Mock) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_autoembed"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url_with_password())
            .env("AUTOEMBED_TABLE", self.table())
            .env("AUTOEMBED_STATE_SCHEMA", self.state_schema())
            .env("AUTOEMBED_PROVIDER", "openai")
            .env("AUTOEMBED_API_BASE", &mock.base)
            .env("OPENAI_API_KEY", API_KEY)
            .current_dir(&self.dir);
        c
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self.client.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE; DROP SCHEMA IF EXISTS {s}_state CASCADE;",
            s = self.schema
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The advisory lock that serialises the tests' role and grant changes.
const ROLES_LOCK: i64 = 4243;

/// A login role of the test's own (trust auth, no password), dropped with
/// what it owns and every grant it holds at the end.
pub struct TestRole {
    pub name: String,
}

impl TestRole {
    /// A role named after `db`'s schema, given `grants` (`{role}` and `{s}`
    /// stand for the role and the schema).
    pub fn new(db: &mut TestDb, grants: &str) -> TestRole {
        let name = format!("{}_role", db.schema);
        let s = db.schema.clone();
        // One role change at a time: two grants on the database at once
        // fail with "tuple concurrently updated".
        db.exec(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({ROLES_LOCK}); \
             DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN; GRANT USAGE ON SCHEMA {s} TO {name}; {}; COMMIT;",
            grants.replace("{role}", &name).replace("{s}", &s)
        ));
        TestRole { name }
    }

    /// The test database's URL for this role.
    pub fn url(&self) -> String {
        admin_url().replacen("postgres@", &format!("{}@", self.name), 1)
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&admin_url(), NoTls) {
            let _ = c.batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({ROLES_LOCK}); DROP OWNED BY {r}; DROP ROLE IF EXISTS {r}; COMMIT;",
                r = self.name
            ));
        }
    }
}

/// What a run printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {self:?}"))
    }

    /// Neither secret appears anywhere in the output.
    pub fn assert_no_secrets(&self) {
        for s in [API_KEY, DB_PASSWORD] {
            assert!(
                !self.stdout.contains(s) && !self.stderr.contains(s),
                "secret leaked: {self:?}"
            );
        }
    }
}

pub fn run(cmd: &mut Command) -> Run {
    let out: Output = cmd.output().expect("run autoembed");
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    r.assert_no_secrets();
    r
}

/// Start a run in the background, its output captured.
pub trait SpawnPiped {
    fn spawn_piped(&mut self) -> Child;
}

impl SpawnPiped for Command {
    fn spawn_piped(&mut self) -> Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn autoembed")
    }
}

/// Wait for a background run; like [`run`], it checks that no secret leaked.
pub fn finish(child: Child) -> Run {
    let out = child.wait_with_output().expect("wait for autoembed");
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    r.assert_no_secrets();
    r
}

/// Run with these arguments.
pub fn autoembed(db: &TestDb, mock: &Mock, args: &[&str]) -> Run {
    run(db.cmd(mock).args(args))
}

/// How many texts the mock embedded, and how many distinct ones: the two
/// are equal when no text was paid for twice.
pub fn sent_and_distinct(mock: &Mock) -> (usize, usize) {
    let inputs = mock.embedded_inputs();
    let mut distinct = inputs.clone();
    distinct.sort();
    distinct.dedup();
    (inputs.len(), distinct.len())
}

/// Wait until `sql` (on `client`) counts `want`, for at most 30 s: for what
/// another process does in its own time (a subscription, a watcher).
pub fn wait_for_count(client: &mut Client, sql: &str, want: i64, what: &str) {
    let start = std::time::Instant::now();
    loop {
        let n: i64 = client.query_one(sql, &[]).expect(sql).get(0);
        if n == want {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "{what}: {n} of {want} after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Send `signal` (`-TERM`, `-INT`) to a running autoembed.
pub fn signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {signal}");
}

/// Wait until no backend of `app` is left (a killed process's backends end
/// as soon as the server sees the socket close); bounded.
pub fn wait_until_gone(db: &mut TestDb, app: &str) {
    let start = std::time::Instant::now();
    while db.count(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"
    )) > 0
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "backends of {app} still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
