//! The `batch` scenario: a backfill of `--batch-rows` rows (100,000 by
//! default) through the provider's batch jobs (`--batch-api`) against the
//! mock, whose jobs complete a few seconds after they are created: the
//! calls made, the runs needed, the peak RSS of the submitting run next to
//! one that submits a tenth of the rows (the JSONL goes through a file on
//! disk, so memory must not grow with a job's size), and the cost dry-run
//! reports at the batch rate against the synchronous one. Vectors of 256
//! dimensions (`--dimensions 256`), so the mock's output files stay small.

use super::{autoembed, exec, fail, median, Measured, Opts, SCHEMA};
use autoembed_mock as mock;
use postgres::Client;
use std::time::Duration;

/// How long after its creation the mock completes a job.
const JOB_DELAY: Duration = Duration::from_secs(3);

fn table(db: &mut Client, name: &str, n: i64) -> String {
    let t = format!("{SCHEMA}.{name}");
    exec(
        db,
        &format!(
            "DROP TABLE IF EXISTS {t};
             CREATE TABLE {t} (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(256));
             INSERT INTO {t}
             SELECT g, {text}
             FROM generate_series(1, {n}) g;",
            text = super::PRODUCT_TEXT,
        ),
    );
    exec(db, &format!("VACUUM ANALYZE {t}"));
    t
}

/// What backfilling a table through batch jobs took.
struct Backfill {
    runs: usize,
    calls: usize,
    /// Peak RSS of the first (submitting) run, in MB.
    submit_rss: f64,
    /// Seconds of a synchronous run-once while every row is in a job.
    tick_secs: f64,
    measured: Vec<Measured>,
}

/// Backfill `t` through batch jobs until nothing is pending or in flight;
/// after the first run, a synchronous tick finds every row held.
fn backfill(opts: &Opts, mock: &mock::Mock, t: &str) -> Backfill {
    let calls_before = mock.batch_calls().len();
    let mut runs: Vec<Measured> = Vec::new();
    let mut tick_secs = f64::NAN;
    loop {
        let m = autoembed(
            opts,
            mock,
            t,
            &["backfill", "--batch-api", "--dimensions", "256"],
        );
        if m.json["error"].is_string() {
            fail(&format!("batch backfill failed: {}", m.json));
        }
        let done = m.json["jobs_in_flight"] == 0 && m.json["pending_after"] == 0;
        runs.push(m);
        if runs.len() == 1 {
            let tick = autoembed(opts, mock, t, &["run-once", "--dimensions", "256"]);
            if tick.json["embedded"] != 0 {
                fail(&format!(
                    "a synchronous tick embedded rows a job holds: {}",
                    tick.json
                ));
            }
            tick_secs = tick.seconds;
        }
        if done {
            break;
        }
        if runs.len() > 10 {
            fail("batch backfill: not done after 10 runs");
        }
        // Cron's ten minutes, shortened: the mock's jobs end after JOB_DELAY.
        std::thread::sleep(JOB_DELAY);
    }
    Backfill {
        runs: runs.len(),
        calls: mock.batch_calls().len() - calls_before,
        submit_rss: runs[0].max_rss_kb as f64 / 1024.0,
        tick_secs,
        measured: runs,
    }
}

pub fn batch(opts: &Opts, db: &mut Client) {
    let n = opts.batch_rows;
    println!(
        "## A backfill through batch jobs (`--batch-api`), jobs completing {} s after creation\n",
        JOB_DELAY.as_secs()
    );
    let mock = mock::Mock::start(256);
    mock.complete_batches_after(JOB_DELAY);
    let big = table(db, "batch_big", n);
    let small = table(db, "batch_small", n / 10);

    // The cost of the whole backfill, as dry-run says, both ways.
    let all = ["--max-rows", "unlimited", "--dimensions", "256"];
    let dry = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["dry-run"];
        args.extend_from_slice(&all);
        args.extend_from_slice(extra);
        autoembed(opts, &mock, &big, &args).json
    };
    let sync = dry(&[]);
    let half = dry(&["--batch-api"]);
    let usd = |v: &serde_json::Value| v["estimated_cost_usd"].as_f64().unwrap_or(f64::NAN);

    let (mut big_rss, mut small_rss, mut collect_rss, mut ticks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut summary = None;
    for _ in 0..opts.runs {
        exec(
            db,
            &format!("UPDATE {small} SET embedding = NULL; UPDATE {big} SET embedding = NULL"),
        );
        small_rss.push(backfill(opts, &mock, &small).submit_rss);
        let Backfill {
            runs,
            calls,
            submit_rss,
            tick_secs,
            measured,
        } = backfill(opts, &mock, &big);
        big_rss.push(submit_rss);
        ticks.push(tick_secs);
        collect_rss.push(
            measured
                .last()
                .map_or(0.0, |m| m.max_rss_kb as f64 / 1024.0),
        );
        let done = super::query_i64(
            db,
            &format!("SELECT count(*) FROM {big} WHERE embedding IS NOT NULL"),
        );
        if done != n {
            fail(&format!("batch backfill: {done} of {n} rows embedded"));
        }
        let submitted: u64 = measured
            .iter()
            .filter_map(|m| m.json["submitted"].as_u64())
            .sum();
        summary = Some((runs, calls, submitted, measured[0].seconds));
    }
    let Some((runs, calls, submitted, submit_secs)) = summary else {
        return;
    };
    println!("| | figure |");
    println!("|---|---|");
    println!("| rows | {n} |");
    println!("| runs needed (submit, then collect) | {runs} |");
    println!(
        "| calls to the Files and Batch endpoints | {calls} (uploads, creates, status reads, downloads, deletes; the synchronous path makes {} requests at `--batch-size` 100) |",
        (n + 99) / 100
    );
    println!("| rows submitted | {submitted} |");
    println!("| submitting run | {submit_secs:.1} s |");
    println!(
        "| peak RSS of the submitting run, {n} rows (median of {}) | {:.1} MB |",
        opts.runs,
        median(big_rss.clone())
    );
    println!(
        "| peak RSS of the submitting run, {} rows | {:.1} MB |",
        n / 10,
        median(small_rss.clone())
    );
    println!(
        "| peak RSS of the collecting run, {n} rows | {:.1} MB |",
        median(collect_rss)
    );
    println!(
        "| a synchronous `run-once` while all {n} rows are in jobs (it embeds none) | {:.2} s |",
        median(ticks)
    );
    println!(
        "| dry-run's cost, synchronous / batch | ${:.4} / ${:.4} (ratio {:.2}) |",
        usd(&sync),
        usd(&half),
        usd(&half) / usd(&sync)
    );
    println!(
        "\n{n} vs {} rows: {:+.1}% peak RSS of the submitting run.\n",
        n / 10,
        100.0 * (median(big_rss) / median(small_rss) - 1.0)
    );
}
