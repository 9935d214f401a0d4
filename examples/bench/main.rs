//! The throughput benchmark: autoembed next to its ceiling and its peer.
//!
//! Run it with `scripts/bench.sh` (which builds in release mode, installs the
//! reference script's Python packages in a virtual environment and passes
//! their interpreter). Every figure comes from the same machine, data and
//! mock server in one run; each timing is the median of `--runs` runs.
//!
//! Scenarios (each can be skipped):
//! - `throughput`: a `products` table of `--rows` rows with realistic texts
//!   (50 to 2,000 characters) and `vector(1536)`; autoembed backfill at mock
//!   latency 0 ms against the database's own ceiling for the same write (one
//!   `UPDATE ... FROM` a table already holding the same vectors), taken in
//!   turns, at least 5 rounds after an untimed run that fills the mock's
//!   cache of vectors, each measured run after a checkpoint;
//! - `latency`: the same at 200 ms per request, for several `--concurrency`
//!   values, against the reference cron script (`../shared/bench/reference_cron.py`,
//!   looped as cron would run it) on `--ref-rows` rows;
//! - `tick`: a run-once with 100 pending rows on a 1,000,000-row table and on
//!   a 10,000-row table, with and without the partial index on pending rows;
//! - `memory`: peak RSS of a backfill of 10,000 and of 200,000 pending rows;
//! - `local`: `--provider local` (all-MiniLM-L6-v2 in process) on
//!   `--local-rows` product descriptions from `examples/products.csv` into
//!   `vector(384)`: rows/s, tokens per text, peak RSS, CPU utilisation
//!   (autoembed's own process) and the model's load time, at concurrency 1
//!   and 2 (the default);
//! - `chunks`: long documents backfilled into a chunks table against the
//!   plain path writing the same vectors ([`chunks`]);
//! - `batch`: a backfill through the provider's batch jobs ([`batch`]).
//!
//! The first line names the machine: the CPU, its cores and the vector
//! extensions the matrix kernels can pick from, so that figures from
//! different machines can be told apart.
//!
//! ```text
//! cargo run --release --example bench -- [--rows N] [--runs N] [--ref-rows N]
//!     [--local-rows N] [--chunk-docs N] [--batch-rows N] [--python PATH]
//!     [--skip throughput,latency,tick,memory,local,chunks,batch]
//! ```

mod batch;
mod chunks;

use autoembed_mock as mock;

use postgres::{Client, NoTls};
use std::process::Command;
use std::time::{Duration, Instant};

const SCHEMA: &str = "autoembed_bench";

struct Opts {
    rows: i64,
    runs: usize,
    ref_rows: i64,
    local_rows: i64,
    chunk_docs: i64,
    batch_rows: i64,
    python: Option<String>,
    skip: Vec<String>,
    url: String,
    bin: String,
}

fn main() {
    let opts = parse_args();
    let mut db =
        Client::connect(&opts.url, NoTls).unwrap_or_else(|e| fail(&format!("connect: {e}")));
    exec(
        &mut db,
        &format!("CREATE EXTENSION IF NOT EXISTS vector; CREATE SCHEMA IF NOT EXISTS {SCHEMA}"),
    );
    println!("# autoembed benchmark\n");
    println!(
        "machine: {}; {} cores; vector extensions: {}; PostgreSQL {}; rows {}; runs per figure {} (medians)\n",
        cpu_model(),
        cores(),
        cpu_extensions(),
        query_text(&mut db, "SHOW server_version"),
        opts.rows,
        opts.runs
    );
    if !opts.skip.iter().any(|s| s == "throughput") {
        throughput(&opts, &mut db);
    }
    if !opts.skip.iter().any(|s| s == "latency") {
        latency(&opts, &mut db);
    }
    if !opts.skip.iter().any(|s| s == "tick") {
        tick(&opts, &mut db);
    }
    if !opts.skip.iter().any(|s| s == "memory") {
        memory(&opts, &mut db);
    }
    if !opts.skip.iter().any(|s| s == "local") {
        local(&opts, &mut db);
    }
    if !opts.skip.iter().any(|s| s == "chunks") {
        chunks::chunks(&opts, &mut db);
    }
    if !opts.skip.iter().any(|s| s == "batch") {
        batch::batch(&opts, &mut db);
    }
}

fn parse_args() -> Opts {
    let mut o = Opts {
        rows: 20_000,
        runs: 3,
        ref_rows: 2_000,
        local_rows: 2_000,
        chunk_docs: 2_000,
        batch_rows: 100_000,
        python: None,
        skip: Vec::new(),
        url: std::env::var("AUTOEMBED_BENCH_DATABASE_URL")
            // Loopback without TLS, like the ceiling, which moves nothing over
            // the wire; the throughput scenario also measures TLS.
            .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable".into()),
        bin: "target/release/autoembed".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--rows" => o.rows = val().parse().unwrap_or_else(|_| fail("--rows")),
            "--runs" => o.runs = val().parse().unwrap_or_else(|_| fail("--runs")),
            "--ref-rows" => o.ref_rows = val().parse().unwrap_or_else(|_| fail("--ref-rows")),
            "--local-rows" => o.local_rows = val().parse().unwrap_or_else(|_| fail("--local-rows")),
            "--chunk-docs" => o.chunk_docs = val().parse().unwrap_or_else(|_| fail("--chunk-docs")),
            "--batch-rows" => o.batch_rows = val().parse().unwrap_or_else(|_| fail("--batch-rows")),
            "--python" => o.python = Some(val()),
            "--skip" => o.skip = val().split(',').map(str::to_string).collect(),
            "--bin" => o.bin = val(),
            _ => fail(&format!("unknown argument {a}")),
        }
    }
    o
}

fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(2)
}

fn exec(db: &mut Client, sql: &str) {
    db.batch_execute(sql).unwrap_or_else(|e| {
        let msg = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string());
        fail(&format!("{sql}: {msg}"))
    });
}

fn query_i64(db: &mut Client, sql: &str) -> i64 {
    db.query_one(sql, &[])
        .map(|r| r.get(0))
        .unwrap_or_else(|e| fail(&format!("{sql}: {e}")))
}

fn query_text(db: &mut Client, sql: &str) -> String {
    db.simple_query(sql)
        .ok()
        .and_then(|rows| {
            rows.into_iter().find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
        })
        .unwrap_or_default()
}

/// The text of product `g`: 50 to 2,000 characters of one of four
/// descriptions, numbered (SQL, over `generate_series(...) g`).
pub(crate) const PRODUCT_TEXT: &str = concat!(
    "left(format('Product %s: %s', g, repeat((ARRAY[",
    "'Lightweight running shoe with breathable mesh upper and a responsive foam midsole. ', ",
    "'Cast iron skillet, pre-seasoned, oven safe, works on induction and over a campfire. ', ",
    "'Wireless headphones with active noise cancelling, thirty hours of battery and fast charging. ', ",
    "'Waterproof hiking boot in full-grain leather with a grippy rubber outsole and ankle support. '",
    "])[1 + g % 4], 25)), 50 + (abs(hashint4(g::int)) % 1951))"
);

/// A products table of `n` rows, texts of 50 to 2,000 characters, `pending`
/// of them (the highest ids) without an embedding; the others hold `filler`.
fn products(db: &mut Client, name: &str, n: i64, pending: i64) {
    let t = format!("{SCHEMA}.{name}");
    let exists = query_i64(
        db,
        &format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = '{SCHEMA}' AND tablename = '{name}'"
        ),
    );
    if exists == 1 && query_i64(db, &format!("SELECT count(*) FROM {t}")) == n {
        exec(db, &format!("UPDATE {t} SET embedding = NULL WHERE product_id_internal > {} AND embedding IS NOT NULL", n - pending));
        return;
    }
    let started = Instant::now();
    exec(
        db,
        &format!(
            "DROP TABLE IF EXISTS {t};
             CREATE TABLE {t} (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(1536));
             INSERT INTO {t}
             SELECT g, {text},
                    CASE WHEN g <= {keep} THEN (SELECT array_agg(((i % 97) - 48) / 64.0)::vector FROM generate_series(1, 1536) i) END
             FROM generate_series(1, {n}) g;",
            keep = n - pending,
            text = PRODUCT_TEXT,
        ),
    );
    exec(db, &format!("VACUUM ANALYZE {t}"));
    eprintln!(
        "bench: generated {t} ({n} rows) in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// Every row pending again, dead rows vacuumed, and a checkpoint, so that
/// every measured run starts from the same state: no checkpoint falls into
/// one run and not the next (it makes the first write of each page after it
/// log the whole page). autoembed's own tables are vacuumed too, as
/// autovacuum would have done between two real backfills: each run inserts
/// and deletes a claim per batch, and without it the dead claims of all the
/// earlier rounds would weigh on the later ones.
fn reset(db: &mut Client, t: &str) {
    exec(db, &format!("UPDATE {t} SET embedding = NULL"));
    exec(db, &format!("VACUUM ANALYZE {t}"));
    let state: Vec<String> = db
        .query(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables WHERE schemaname = $1",
            &[&format!("{SCHEMA}_state")],
        )
        .unwrap_or_else(|e| fail(&format!("list the state tables: {e}")))
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in state {
        exec(db, &format!("VACUUM ANALYZE {table}"));
    }
    exec(db, "CHECKPOINT");
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// CPU seconds this process (the mock server) has used so far.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

struct Measured {
    seconds: f64,
    json: serde_json::Value,
    max_rss_kb: u64,
    /// CPU time over wall time, in percent of one core (200 = both of two
    /// cores busy throughout), as /usr/bin/time reports it.
    cpu_percent: f64,
}

/// Run autoembed under /usr/bin/time -v against the mock server.
fn autoembed(opts: &Opts, mock: &mock::Mock, table: &str, args: &[&str]) -> Measured {
    let provider = [
        ("AUTOEMBED_PROVIDER", "openai".to_string()),
        ("AUTOEMBED_API_BASE", mock.base.clone()),
        ("OPENAI_API_KEY", "sk-bench".to_string()),
    ];
    measure(opts, &provider, table, args)
}

/// Run autoembed under /usr/bin/time -v with this provider environment.
fn measure(opts: &Opts, provider: &[(&str, String)], table: &str, args: &[&str]) -> Measured {
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(&opts.bin)
        .args(args)
        .arg("--json")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &opts.url)
        .env("AUTOEMBED_TABLE", table)
        .env("AUTOEMBED_STATE_SCHEMA", format!("{SCHEMA}_state"))
        .envs(provider.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| fail(&format!("run autoembed (is /usr/bin/time installed?): {e}")));
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let max_rss_kb = time_field(&stderr, "Maximum resident set size (kbytes)").unwrap_or(0);
    let cpu_percent = time_field(&stderr, "Percent of CPU this job got").unwrap_or(0.0);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| fail(&format!("autoembed printed no JSON: {stderr}")));
    Measured {
        seconds,
        json,
        max_rss_kb,
        cpu_percent,
    }
}

/// The value of one line of `/usr/bin/time -v`'s report (`label: value`,
/// a percentage's `%` left out).
fn time_field<T: std::str::FromStr>(stderr: &str, label: &str) -> Option<T> {
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix(label)?.strip_prefix(": "))
        .and_then(|v| v.trim().trim_end_matches('%').parse().ok())
}

/// autoembed, over TLS too, and the database's ceiling, taken in turns
/// (one of each per round) so that the machine's drift over the scenario
/// falls on all three alike; the ratio is the median of each round's own.
fn throughput(opts: &Opts, db: &mut Client) {
    let t = format!("{SCHEMA}.products");
    products(db, "products", opts.rows, opts.rows);
    let mock = mock::Mock::start(1536);
    let tls_url = opts.url.replace("sslmode=disable", "sslmode=require");
    let tls_env = [
        ("AUTOEMBED_PROVIDER", "openai".to_string()),
        ("AUTOEMBED_API_BASE", mock.base.clone()),
        ("OPENAI_API_KEY", "sk-bench".to_string()),
        ("DATABASE_URL", tls_url),
    ];
    let rounds = opts.runs.max(5);
    let (mut ours, mut tls, mut ceiling) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratios, mut tls_ratios) = (Vec::new(), Vec::new());
    let (mut mock_cpu, mut rss) = (Vec::new(), Vec::new());
    let mut requests = 0;
    // A first, untimed run fills the mock's cache of vectors (as a provider
    // that precomputed them) and keeps the vectors for the ceiling's source.
    reset(db, &t);
    assert_done(&autoembed(opts, &mock, &t, &["backfill"]), opts.rows);
    exec(db, &format!("DROP TABLE IF EXISTS {t}_vectors; CREATE TABLE {t}_vectors AS SELECT product_id_internal, embedding FROM {t}; ANALYZE {t}_vectors"));
    for round in 0..rounds {
        reset(db, &t);
        let cpu = own_cpu_seconds();
        let m = autoembed(opts, &mock, &t, &["backfill"]);
        mock_cpu.push(own_cpu_seconds() - cpu);
        assert_done(&m, opts.rows);
        let rate = opts.rows as f64 / m.seconds;
        rss.push(m.max_rss_kb as f64 / 1024.0);
        requests = m.json["requests"].as_u64().unwrap_or(0);
        // The same over TLS (sslmode=require), as to a hosted database.
        reset(db, &t);
        let m = measure(opts, &tls_env, &t, &["backfill"]);
        assert_done(&m, opts.rows);
        let tls_rate = opts.rows as f64 / m.seconds;
        reset(db, &t);
        let started = Instant::now();
        exec(db, &format!("UPDATE {t} p SET embedding = v.embedding FROM {t}_vectors v WHERE p.product_id_internal = v.product_id_internal"));
        let ceiling_rate = opts.rows as f64 / started.elapsed().as_secs_f64();
        eprintln!(
            "bench: round {}: autoembed {rate:.0}, over TLS {tls_rate:.0}, ceiling {ceiling_rate:.0} rows/s",
            round + 1
        );
        ratios.push(rate / ceiling_rate);
        tls_ratios.push(tls_rate / ceiling_rate);
        ours.push(rate);
        tls.push(tls_rate);
        ceiling.push(ceiling_rate);
    }
    let (ours, ceiling, tls) = (median(ours), median(ceiling), median(tls));
    let (ratio, tls_ratio) = (median(ratios), median(tls_ratios));
    println!("## Backfill of {} rows, mock latency 0 ms\n", opts.rows);
    println!("| what | rows/s (median of {rounds}) |");
    println!("|---|---|");
    println!("| autoembed backfill (default settings: batch 100, concurrency 8; loopback, no TLS) | {ours:.0} |");
    println!("| PostgreSQL ceiling: one `UPDATE ... FROM` a table holding the same vectors | {ceiling:.0} |");
    println!(
        "| **ratio** (median of the rounds' ratios) | **{:.0}% of the ceiling** |",
        100.0 * ratio
    );
    println!(
        "| autoembed backfill over TLS (`sslmode=require`, as to a hosted database) | {tls:.0} ({:.0}% of the ceiling) |",
        100.0 * tls_ratio
    );
    println!(
        "\nautoembed made {requests} requests; peak RSS {:.0} MB; the mock server used {:.2} CPU s per run (median).\n",
        median(rss),
        median(mock_cpu)
    );
}

fn latency(opts: &Opts, db: &mut Client) {
    let t = format!("{SCHEMA}.products");
    products(db, "products", opts.rows, opts.rows);
    let mock = mock::Mock::start(1536);
    mock.latency(Duration::from_millis(200));
    println!(
        "## Backfill of {} rows, mock latency 200 ms per request\n",
        opts.rows
    );
    println!("| what | rows/s (median of {}) | requests |", opts.runs);
    println!("|---|---|---|");
    let mut best = 0.0f64;
    let mut default_rate = 0.0;
    for conc in ["1", "2", "4", "8", "16"] {
        let mut rates = Vec::new();
        let mut requests = 0;
        for _ in 0..opts.runs {
            reset(db, &t);
            let m = autoembed(opts, &mock, &t, &["backfill", "--concurrency", conc]);
            assert_done(&m, opts.rows);
            rates.push(opts.rows as f64 / m.seconds);
            requests = m.json["requests"].as_u64().unwrap_or(0);
        }
        let r = median(rates);
        best = best.max(r);
        if conc == "8" {
            default_rate = r;
        }
        let note = if conc == "8" { " (default)" } else { "" };
        println!("| autoembed backfill, --concurrency {conc}{note} | {r:.0} | {requests} |");
    }
    let Some(python) = &opts.python else {
        println!(
            "\n(reference script skipped: pass --python with openai and psycopg2 installed)\n"
        );
        return;
    };
    let mut rates = Vec::new();
    let mut ref_requests = 0;
    for _ in 0..opts.runs {
        reset(db, &t);
        // The script reads `products` from its search_path: a copy of the first rows.
        exec(
            db,
            &format!(
                "CREATE SCHEMA IF NOT EXISTS {SCHEMA}_ref; DROP TABLE IF EXISTS {SCHEMA}_ref.products;
                 CREATE TABLE {SCHEMA}_ref.products AS SELECT * FROM {t} ORDER BY product_id_internal LIMIT {};
                 ALTER TABLE {SCHEMA}_ref.products ADD PRIMARY KEY (product_id_internal);",
                opts.ref_rows
            ),
        );
        let before = mock.requests().len();
        let started = Instant::now();
        loop {
            let left = query_i64(db, &format!("SELECT count(*) FROM {SCHEMA}_ref.products WHERE embedding IS NULL AND embedding_text IS NOT NULL"));
            if left == 0 {
                break;
            }
            // One process per run, as cron starts it; the script's table is `products`.
            let status = Command::new(python)
                .arg(reference_script())
                .env("OPENAI_API_KEY", "sk-bench")
                .env("OPENAI_BASE_URL", &mock.base)
                .env("PGHOST", "127.0.0.1")
                .env("PGDATABASE", "test")
                .env("PGUSER", "postgres")
                .env("PGPASSWORD", "")
                .env("PGOPTIONS", format!("-c search_path={SCHEMA}_ref,public"))
                .status()
                .unwrap_or_else(|e| fail(&format!("run the reference script: {e}")));
            if !status.success() {
                fail("the reference script failed");
            }
        }
        rates.push(opts.ref_rows as f64 / started.elapsed().as_secs_f64());
        ref_requests = mock.requests().len() - before;
    }
    let reference = median(rates);
    println!(
        "| reference cron script, looped until nothing is pending ({} rows) | {reference:.0} | {ref_requests} (for {} rows) |",
        opts.ref_rows, opts.ref_rows
    );
    println!(
        "| **ratio, autoembed default / reference** | **{:.0}x** (best {:.0}x) | |\n",
        default_rate / reference,
        best / reference
    );
}

fn reference_script() -> String {
    for p in [
        "../shared/bench/reference_cron.py",
        "/work/shared/bench/reference_cron.py",
    ] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    fail("../shared/bench/reference_cron.py not found")
}

fn tick(opts: &Opts, db: &mut Client) {
    println!("## A cron tick: run-once with 100 pending rows, mock latency 0 ms\n");
    println!(
        "| table | no partial index: ms (median of {}) | with the partial index: ms |",
        opts.runs.max(5)
    );
    println!("|---|---|---|");
    let mock = mock::Mock::start(1536);
    let mut results = Vec::new();
    for (name, n) in [("tick_10k", 10_000i64), ("tick_1m", 1_000_000)] {
        products(db, name, n, 100);
        let t = format!("{SCHEMA}.{name}");
        let mut row = Vec::new();
        for indexed in [false, true] {
            exec(db, &format!("DROP INDEX IF EXISTS {SCHEMA}.{name}_pending"));
            if indexed {
                exec(db, &format!("CREATE INDEX {name}_pending ON {t} (product_id_internal) WHERE embedding IS NULL; ANALYZE {t}"));
            }
            let mut times = Vec::new();
            for _ in 0..opts.runs.max(5) {
                exec(
                    db,
                    &format!(
                        "UPDATE {t} SET embedding = NULL WHERE product_id_internal > {}",
                        n - 100
                    ),
                );
                let m = autoembed(opts, &mock, &t, &["run-once"]);
                assert_done(&m, 100);
                times.push(m.seconds * 1000.0);
            }
            row.push(median(times));
        }
        println!("| {n} rows | {:.0} | {:.0} |", row[0], row[1]);
        results.push(row);
    }
    println!(
        "\n1,000,000 vs 10,000 rows: {:.1}x without the index, **{:.1}x with it**.\n",
        results[1][0] / results[0][0],
        results[1][1] / results[0][1]
    );
}

fn memory(opts: &Opts, db: &mut Client) {
    println!("## Peak memory of a backfill, mock latency 0 ms\n");
    println!(
        "| pending rows | peak RSS (MB, median of {}) | rows/s |",
        opts.runs
    );
    println!("|---|---|---|");
    let mock = mock::Mock::start(1536);
    let mut rss = Vec::new();
    for (name, n) in [("mem_10k", 10_000i64), ("mem_200k", 200_000)] {
        products(db, name, n, n);
        let t = format!("{SCHEMA}.{name}");
        let (mut peaks, mut rates) = (Vec::new(), Vec::new());
        for _ in 0..opts.runs {
            reset(db, &t);
            let m = autoembed(opts, &mock, &t, &["backfill"]);
            assert_done(&m, n);
            peaks.push(m.max_rss_kb as f64 / 1024.0);
            rates.push(n as f64 / m.seconds);
        }
        let mb = median(peaks);
        println!("| {n} | {mb:.1} | {:.0} |", median(rates));
        rss.push(mb);
    }
    println!(
        "\n200,000 vs 10,000 pending: {:+.1}% peak RSS.\n",
        100.0 * (rss[1] / rss[0] - 1.0)
    );
}

/// The local model on product descriptions: texts from examples/products.csv,
/// each followed by two other products' names and its own number (every text
/// distinct, so none is copied instead of embedded), about 61 tokens as in
/// issue 17's figures for PyTorch and ONNX Runtime.
fn local(opts: &Opts, db: &mut Client) {
    let home = std::env::var("HOME").unwrap_or_default();
    let model = std::env::var("AUTOEMBED_MODEL_PATH").unwrap_or_else(|_| {
        let data =
            std::env::var("XDG_DATA_HOME").unwrap_or_else(|_| format!("{home}/.local/share"));
        format!("{data}/autoembed/models/all-MiniLM-L6-v2")
    });
    let provider = [
        ("AUTOEMBED_PROVIDER", "local".to_string()),
        ("AUTOEMBED_MODEL_PATH", model.clone()),
    ];
    let n = opts.local_rows;
    let t = format!("{SCHEMA}.local_products");
    let csv = std::fs::read_to_string("examples/products.csv")
        .unwrap_or_else(|e| fail(&format!("examples/products.csv: {e}")));
    exec(
        db,
        &format!(
            "DROP TABLE IF EXISTS {t}; DROP TABLE IF EXISTS {t}_csv;
             CREATE TABLE {t}_csv (id int, name text, embedding_text text);
             CREATE TABLE {t} (id bigint PRIMARY KEY, embedding_text text, embedding vector(384));"
        ),
    );
    let mut copy = db
        .copy_in(&format!(
            "COPY {t}_csv FROM STDIN WITH (FORMAT csv, HEADER true)"
        ))
        .unwrap_or_else(|e| fail(&format!("copy: {e}")));
    std::io::Write::write_all(&mut copy, csv.as_bytes()).unwrap_or_else(|e| fail(&e.to_string()));
    copy.finish()
        .unwrap_or_else(|e| fail(&format!("copy: {e}")));
    exec(
        db,
        &format!(
            "INSERT INTO {t} (id, embedding_text)
             SELECT g, a.embedding_text || ' Goes well with the ' || b.name || ' and the ' || c.name || '. Item ' || g || '.'
             FROM generate_series(1, {n}) g
             JOIN {t}_csv a ON a.id = 1 + g % 300
             JOIN {t}_csv b ON b.id = 1 + (g * 7 + 3) % 300
             JOIN {t}_csv c ON c.id = 1 + (g * 13 + 5) % 300"
        ),
    );
    exec(db, &format!("VACUUM ANALYZE {t}"));
    println!("## The local model (all-MiniLM-L6-v2, in process)\n");
    let cores = cores();
    let loaded = measure(opts, &provider, &t, &["verify"]);
    let load = loaded.json["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "model"))
        .map(|c| c["detail"].to_string())
        .unwrap_or_else(|| fail(&format!("verify found no model: {}", loaded.json)));
    println!(
        "| precision | concurrency | rows/s (median of {}) | tokens per text | peak RSS (MB) | CPU busy (% of {cores} cores) | cosine to fp32 (min / mean) |",
        opts.runs
    );
    println!("|---|---|---|---|---|---|---|");
    // fp32 with one worker (no overlap) and at the default (2), then int8
    // at the default; int8's vectors are compared with fp32's, kept aside.
    for (precision, conc) in [("fp32", "1"), ("fp32", "2"), ("int8", "2")] {
        let (mut rates, mut peaks, mut busy, mut tokens) = (Vec::new(), Vec::new(), Vec::new(), 0);
        let mut env = provider.to_vec();
        env.push(("AUTOEMBED_LOCAL_PRECISION", precision.to_string()));
        for _ in 0..opts.runs {
            reset(db, &t);
            let m = measure(opts, &env, &t, &["backfill", "--concurrency", conc]);
            assert_done(&m, n);
            rates.push(n as f64 / m.seconds);
            peaks.push(m.max_rss_kb as f64 / 1024.0);
            busy.push(m.cpu_percent / cores as f64);
            tokens = m.json["tokens"].as_u64().unwrap_or(0);
        }
        let fidelity = if precision == "fp32" {
            exec(
                db,
                &format!("DROP TABLE IF EXISTS {t}_fp32; CREATE TABLE {t}_fp32 AS SELECT id, embedding FROM {t}"),
            );
            "1 / 1".to_string()
        } else {
            let row = db
                .query_one(
                    &format!(
                        "SELECT min(1 - (a.embedding <=> b.embedding)), avg(1 - (a.embedding <=> b.embedding))
                         FROM {t} a JOIN {t}_fp32 b USING (id)"
                    ),
                    &[],
                )
                .unwrap_or_else(|e| fail(&format!("compare with fp32: {e}")));
            let (min, mean): (f64, f64) = (row.get(0), row.get(1));
            format!("{min:.4} / {mean:.4}")
        };
        println!(
            "| {precision} | {conc} | {:.0} | {:.1} | {:.0} | {:.0} | {fidelity} |",
            median(rates),
            tokens as f64 / n as f64,
            median(peaks),
            median(busy)
        );
    }
    println!(
        "\nTokens include [CLS] and [SEP]. CPU busy is autoembed's own process (user + system time over wall \
         time, over all cores); the database's writes run in its backend, outside it. \
         verify's model check (load + one text): {load}.\n\
         For comparison, issue 17's figures on a 2-core AVX2-only EPYC (61 tokens a text, batch 32): \
         sentence-transformers on PyTorch 75-82 texts/s (1.2 GB), ONNX Runtime fp32 75-86 (290 MB), \
         ONNX Runtime int8 122-138 (210 MB).\n"
    );
}

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU's name, from /proc/cpuinfo (Linux), so figures from different
/// machines can be told apart.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The vector extensions the matrix kernels pick from at run time: AVX2
/// and FMA, or AVX-512 (with VNNI for int8 dot products).
fn cpu_extensions() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let found: Vec<&str> = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        if found.is_empty() {
            "none of avx2, fma, avx512f, avx512vnni".into()
        } else {
            found.join(", ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

fn assert_done(m: &Measured, rows: i64) {
    if m.json["embedded"].as_i64() != Some(rows) {
        fail(&format!("expected {rows} rows embedded: {}", m.json));
    }
}
