//! Through a real pgbouncer in transaction mode (what Supabase's port 6543
//! is): no named prepared statements, no session state, concurrent workers.

use crate::support::SpawnPiped;

use crate::support::mock::Mock;
use crate::support::TestDb;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Bouncer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bouncer {
    /// autoembed's DATABASE_URL through this pooler.
    fn url(&self) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/test",
            crate::support::DB_PASSWORD,
            self.port
        )
    }
}

fn pgbouncer(dir: &std::path::Path) -> Bouncer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let dir = dir.join("pgbouncer");
    std::fs::create_dir_all(&dir).expect("dir");
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\ntest = host=127.0.0.1 port=5432 dbname=test user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\n\
             pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 50\n\
             unix_socket_dir =\nlogfile = {log}\npidfile = {pid}\n",
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display()
        ),
    )
    .expect("write ini");
    let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("pgbouncer is installed (scripts/dev-db.sh installs it)");
    let mut cmd = Command::new(binary);
    // pgbouncer refuses to run as root; drop to the postgres user then.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres", &dir.display().to_string()])
            .status();
        let _ = Command::new("chmod")
            .args(["755", &dir.parent().expect("parent").display().to_string()])
            .status();
        cmd.args(["-u", "postgres"]);
    }
    let child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    // Wait until it accepts connections (bounded).
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "pgbouncer did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Bouncer { child, port, dir }
}

#[test]
fn concurrent_runs_through_a_transaction_pooler_embed_everything_once() {
    let mut db = TestDb::new("pooler");
    db.products(1500, 1536);
    let mock = Mock::start(1536);
    mock.latency(Duration::from_millis(5));
    let bouncer = pgbouncer(&db.dir);
    let url = bouncer.url();

    let verify = crate::support::run(
        db.cmd(&mock)
            .env("DATABASE_URL", &url)
            .args(["verify", "--json"]),
    );
    assert_eq!(verify.code, 0, "{verify:?}");
    let dry = crate::support::run(
        db.cmd(&mock)
            .env("DATABASE_URL", &url)
            .args(["dry-run", "--json"]),
    );
    assert_eq!(dry.json()["pending"], 1500);

    let workers: Vec<_> = (0..3)
        .map(|_| {
            db.cmd(&mock)
                .env("DATABASE_URL", &url)
                .args(["backfill", "--json", "--batch-size", "40"])
                .spawn_piped()
        })
        .collect();
    for w in workers {
        let out = crate::support::finish(w);
        assert_eq!(Some(out.code), Some(0), "{}", out.stderr);
    }
    assert_eq!(
        crate::support::sent_and_distinct(&mock),
        (1500, 1500),
        "paid twice"
    );
    assert_eq!(db.correct_rows(1536), (1500, 0));
}

#[test]
fn runs_waiting_on_the_provider_hold_no_server_connection_of_the_pool() {
    let mut db = TestDb::new("poolfree");
    db.products(30, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    // Two server connections in the pool, three runs waiting on the provider.
    let bouncer = pgbouncer(&db.dir);
    let url = bouncer.url();
    let args = [
        "run-once",
        "--json",
        "--batch-size",
        "10",
        "--max-rows",
        "10",
        "--concurrency",
        "1",
    ];
    let mut runs = Vec::new();
    for n in 1..=3 {
        runs.push(
            db.cmd(&mock)
                .env("DATABASE_URL", &url)
                .args(args)
                .spawn_piped(),
        );
        // A run that kept its claim's transaction open across the request
        // would keep a server connection: the third could never claim.
        held.wait_for(&format!("request {n} (the pool is held)"));
    }
    // The application, through the same pool, is not kept waiting either.
    let verify = crate::support::run(db.cmd(&mock).env("DATABASE_URL", &url).args([
        "verify",
        "--json",
        "--offline",
    ]));
    assert_eq!(verify.code, 0, "{verify:?}");
    for _ in 0..3 {
        held.release();
    }
    mock.unhold();
    for r in runs {
        let out = crate::support::finish(r);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.json()["embedded"], 10, "{out:?}");
    }
    assert_eq!(
        crate::support::sent_and_distinct(&mock),
        (30, 30),
        "paid twice"
    );
    assert_eq!(db.correct_rows(1536), (30, 0));
}

#[test]
fn a_killed_run_behind_a_pooler_frees_its_rows_when_the_lease_ends() {
    let mut db = TestDb::new("poolkill");
    db.products(30, 1536);
    let mock = Mock::start(1536);
    let held = mock.hold();
    let bouncer = pgbouncer(&db.dir);
    let url = bouncer.url();
    let args = [
        "run-once",
        "--json",
        "--batch-size",
        "10",
        "--concurrency",
        "1",
        "--request-timeout",
        "1",
        "--claim-lease",
        "4",
    ];
    let mut child = db
        .cmd(&mock)
        .env("DATABASE_URL", &url)
        .args(args)
        .spawn_piped();
    held.wait_for("request arrived");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    mock.unhold();
    held.release();
    // The pooler's backend lives on, so the claims hold until their lease
    // ends: a run right after takes only the other rows.
    let r = crate::support::run(db.cmd(&mock).env("DATABASE_URL", &url).args(args));
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["pending_after"].as_i64()),
        (Some(20), Some(10)),
        "{j}"
    );
    let state = db.state_schema();
    let start = Instant::now();
    while db.count(&format!(
        "SELECT count(*) FROM {state}.claims WHERE expires_at > now()"
    )) > 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the lease never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = crate::support::run(db.cmd(&mock).env("DATABASE_URL", &url).args(args));
    assert_eq!(r.json()["embedded"], 10, "{r:?}");
    assert_eq!(db.correct_rows(1536), (30, 0));
}
