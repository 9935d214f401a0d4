//! Through a real pgbouncer in transaction mode (what Supabase's port 6543
//! is): no named prepared statements, no session state, concurrent workers.

mod support;

use support::SpawnPiped;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::mock::Mock;
use support::TestDb;

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
    let url = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/test",
        support::DB_PASSWORD,
        bouncer.port
    );

    let verify = support::run(
        db.cmd(&mock)
            .env("DATABASE_URL", &url)
            .args(["verify", "--json"]),
    );
    assert_eq!(verify.code, 0, "{verify:?}");
    let dry = support::run(
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
        let out = support::finish(w);
        assert_eq!(Some(out.code), Some(0), "{}", out.stderr);
    }
    let inputs = mock.embedded_inputs();
    let mut distinct = inputs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!((inputs.len(), distinct.len()), (1500, 1500));
    assert_eq!(db.correct_rows(1536), (1500, 0));
}
