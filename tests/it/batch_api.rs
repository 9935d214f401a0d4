//! `--batch-api`: a job's whole life across separate runs, against the
//! mock's Files and Batch endpoints: submitted, in flight across ticks
//! (its rows held from every other run), completed, expired, cancelled,
//! a row edited meanwhile, a refused request, a crash between creating a
//! job and recording it; and the budgets, dry-run, verify and `batch-jobs`.

use crate::support::mock::{self, Mock};
use crate::support::{self, autoembed, SpawnPiped, TestDb};

const DIMS: usize = 1536;

fn batch(db: &TestDb, mock: &Mock, args: &[&str]) -> support::Run {
    let mut all = vec!["run-once", "--batch-api", "--json"];
    all.extend_from_slice(args);
    autoembed(db, mock, &all)
}

/// The only job the mock has, checked to be the only one.
fn only_job(mock: &Mock) -> mock::BatchJob {
    let jobs = mock.batch_jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs.into_iter().next().expect("one job")
}

fn state_count(db: &mut TestDb, table: &str) -> i64 {
    let s = db.state_schema();
    db.count(&format!("SELECT count(*) FROM {s}.{table}"))
}

#[test]
fn a_job_is_submitted_held_across_ticks_and_collected_at_half_the_price() {
    let mut db = TestDb::new("batch_life");
    db.products(30, DIMS);
    let mock = Mock::start(DIMS);

    // dry-run prices the batch rate: half of the synchronous estimate.
    let sync = autoembed(&db, &mock, &["dry-run", "--json"]).json();
    let half = autoembed(&db, &mock, &["dry-run", "--batch-api", "--json"]).json();
    let cost = |v: &serde_json::Value| v["estimated_cost_usd"].as_f64().expect("cost");
    assert_eq!(half["estimated_tokens"], sync["estimated_tokens"]);
    assert!(
        (cost(&half) - cost(&sync) / 2.0).abs() < 1e-15,
        "{half} {sync}"
    );
    assert_eq!(half["jobs_in_flight"], 0);

    let first = batch(&db, &mock, &[]);
    assert_eq!(first.code, 0, "{first:?}");
    let v = first.json();
    assert_eq!(
        (v["submitted"].as_u64(), v["collected"].as_u64()),
        (Some(30), Some(0))
    );
    assert_eq!(
        (v["embedded"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(0), Some(1))
    );
    let job = only_job(&mock);
    assert_eq!((job.status.as_str(), job.requests), ("validating", 30));
    // The intent travels in the job's metadata, recorded before the job was made.
    let s = db.state_schema();
    let recorded: String = db
        .client
        .query_one(
            &format!("SELECT intent_id || ' ' || job_id FROM {s}.batch_jobs"),
            &[],
        )
        .expect("job record")
        .get(0);
    assert_eq!(
        recorded,
        format!(
            "{} {}",
            job.metadata["autoembed_intent"].as_str().unwrap_or(""),
            job.id
        )
    );

    // While it is in flight no other run sends its rows: not a synchronous
    // run, not another job; every status before the end leaves it alone.
    let sync_run = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(
        (sync_run.code, sync_run.json()["embedded"].as_u64()),
        (0, Some(0))
    );
    assert!(mock.embedded_inputs().is_empty());
    for status in ["validating", "in_progress", "finalizing"] {
        mock.set_batch_status(&job.id, status);
        let tick = batch(&db, &mock, &[]).json();
        assert_eq!(
            (
                tick["submitted"].as_u64(),
                tick["embedded"].as_u64(),
                tick["jobs_in_flight"].as_i64()
            ),
            (Some(0), Some(0), Some(1)),
            "{status}: {tick}"
        );
    }
    assert_eq!(mock.batch_jobs().len(), 1);

    mock.set_batch_status(&job.id, "completed");
    let done = batch(&db, &mock, &[]);
    assert_eq!(done.code, 0, "{done:?}");
    let v = done.json();
    assert_eq!(
        (v["embedded"].as_u64(), v["collected"].as_u64()),
        (Some(30), Some(30))
    );
    assert_eq!(
        (v["jobs_in_flight"].as_i64(), v["pending_after"].as_i64()),
        (Some(0), Some(0))
    );
    let tokens: u64 = (1..=30)
        .map(|i| mock::tokens_for(&format!("product {i}")))
        .sum();
    assert_eq!(v["tokens"].as_u64(), Some(tokens));
    // The output came back in reverse order: matched by custom_id, every vector is its row's.
    assert_eq!(db.correct_rows(DIMS), (30, 0));
    assert_eq!(
        (
            state_count(&mut db, "batch_jobs"),
            state_count(&mut db, "claims")
        ),
        (0, 0)
    );
    // The input, output and error files are deleted at the provider.
    assert_eq!(mock.batch_files(), 0);
    // Nothing went through the synchronous endpoint.
    assert!(mock.embedded_inputs().is_empty());
}

#[test]
fn a_row_edited_while_its_job_is_in_flight_keeps_its_new_text_and_goes_in_the_next_job() {
    let mut db = TestDb::new("batch_edit");
    db.products(10, DIMS);
    let mock = Mock::start(DIMS);
    assert_eq!(batch(&db, &mock, &[]).json()["submitted"], 10);
    let first = only_job(&mock);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'edited 3' WHERE product_id_internal = 3"
    ));
    mock.set_batch_status(&first.id, "completed");
    let v = batch(&db, &mock, &[]).json();
    assert_eq!(
        (v["embedded"].as_u64(), v["changed"].as_u64()),
        (Some(9), Some(1)),
        "{v}"
    );
    // Not overwritten with the old text's vector, and sent again at once.
    let table = db.table();
    assert_eq!(db.vector(&table, "product_id_internal", "3"), None);
    assert_eq!(
        (v["submitted"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(1), Some(1))
    );
    let second = mock.batch_jobs().pop().expect("second job");
    assert_eq!(second.requests, 1);
    mock.set_batch_status(&second.id, "completed");
    assert_eq!(batch(&db, &mock, &[]).json()["embedded"], 1);
    assert_eq!(
        db.vector(&table, "product_id_internal", "3"),
        Some(mock::vector_for("edited 3", DIMS))
    );
    assert_eq!(db.correct_rows(DIMS), (10, 0));
}

#[test]
fn expired_and_cancelled_jobs_write_what_they_finished_and_send_the_rest_again() {
    let mut db = TestDb::new("batch_end");
    db.products(10, DIMS);
    let mock = Mock::start(DIMS);
    batch(&db, &mock, &[]);
    let job = only_job(&mock);
    // An expired job answered its first half: those land, the rest go again.
    mock.set_batch_status(&job.id, "expired");
    let v = batch(&db, &mock, &[]).json();
    assert_eq!(
        (v["embedded"].as_u64(), v["failed"].as_u64()),
        (Some(5), Some(0)),
        "{v}"
    );
    assert_eq!(
        (v["submitted"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(5), Some(1))
    );
    assert_eq!(db.correct_rows(DIMS), (5, 0));

    // `batch-jobs` lists it; `--cancel` asks the provider to stop it.
    let listed = autoembed(&db, &mock, &["batch-jobs", "--json"]);
    assert_eq!(listed.code, 0, "{listed:?}");
    let jobs = listed.json()["jobs"].clone();
    let second = mock.batch_jobs().pop().expect("second job");
    assert_eq!(jobs[0]["job_id"], second.id.as_str());
    assert_eq!(
        (jobs[0]["status"].as_str(), jobs[0]["rows"].as_i64()),
        (Some("validating"), Some(5))
    );
    let unknown = autoembed(&db, &mock, &["batch-jobs", "--cancel", "batch_nope"]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown.stderr.contains("--cancel \"batch_nope\""),
        "{unknown:?}"
    );
    let cancel = autoembed(&db, &mock, &["batch-jobs", "--cancel", "all", "--json"]);
    assert_eq!(cancel.code, 0, "{cancel:?}");
    let c = cancel.json()["jobs"][0].clone();
    assert_eq!(
        (c["status"].as_str(), c["cancelled"].as_bool()),
        (Some("cancelling"), Some(true))
    );
    // Cancelling is still in flight; once cancelled, its finished half lands.
    let tick = batch(&db, &mock, &[]).json();
    assert_eq!(
        (tick["submitted"].as_u64(), tick["jobs_in_flight"].as_i64()),
        (Some(0), Some(1))
    );
    mock.set_batch_status(&second.id, "cancelled");
    let v = batch(&db, &mock, &[]).json();
    assert_eq!(
        (v["embedded"].as_u64(), v["submitted"].as_u64()),
        (Some(2), Some(3)),
        "{v}"
    );
    let third = mock.batch_jobs().pop().expect("third job");
    mock.set_batch_status(&third.id, "completed");
    assert_eq!(batch(&db, &mock, &[]).json()["embedded"], 3);
    assert_eq!(db.correct_rows(DIMS), (10, 0));
}

#[test]
fn a_collect_that_fails_part_way_is_taken_up_by_the_next_run() {
    let mut db = TestDb::new("batch_retry");
    db.products(10, DIMS);
    let mock = Mock::start(DIMS);
    batch(&db, &mock, &[]);
    mock.set_batch_status(&only_job(&mock).id, "completed");
    // The output file cannot be downloaded, three tries running: the run
    // stops (exit 3) and writes nothing.
    mock.fail_batch_calls("GET /v1/files/", 3);
    let failed = batch(&db, &mock, &[]);
    assert_eq!(failed.code, 3, "{failed:?}");
    assert!(
        failed.stderr.contains("downloading batch file"),
        "{failed:?}"
    );
    // The next run collects it at once, not after the collect's lease.
    let v = batch(&db, &mock, &[]).json();
    assert_eq!(
        (v["embedded"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(10), Some(0)),
        "{v}"
    );
    assert_eq!(db.correct_rows(DIMS), (10, 0));
}

#[test]
fn a_request_the_provider_refuses_fails_its_row_and_the_others_land() {
    let mut db = TestDb::new("batch_refused");
    db.products(10, DIMS);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'POISON 4' WHERE product_id_internal = 4"
    ));
    let mock = Mock::start(DIMS);
    mock.reject_inputs_containing("POISON");
    batch(&db, &mock, &[]);
    mock.set_batch_status(&only_job(&mock).id, "completed");
    let run = batch(&db, &mock, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let v = run.json();
    assert_eq!(
        (v["embedded"].as_u64(), v["failed"].as_u64()),
        (Some(9), Some(1))
    );
    // Recorded with the provider's words, and not sent again before its next try.
    let state = db.state_schema();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {state}.failures WHERE row_id = '4' AND last_error LIKE '%maximum context length%'"
        )),
        1
    );
    assert_eq!(
        (v["submitted"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(0), Some(0))
    );
}

/// Start a batch run as `app`, let it reach `call`, and SIGKILL it there.
fn kill_at(db: &mut TestDb, mock: &Mock, call: &str, app: &str) {
    let held = mock.hold_batch_call(call);
    let mut child = db
        .cmd(mock)
        .env("DATABASE_URL", support::url_named(app))
        .args(["run-once", "--batch-api", "--json"])
        .spawn_piped();
    held.wait_for(call);
    child.kill().expect("kill");
    let _ = child.wait();
    support::wait_until_gone(db, app);
    mock.unhold_batch_calls();
    held.release();
}

#[test]
fn a_crash_between_creating_a_job_and_recording_it_is_adopted_and_not_paid_twice() {
    let mut db = TestDb::new("batch_crash");
    db.products(12, DIMS);
    let mock = Mock::start(DIMS);
    let app = format!("{}_a", db.schema);
    kill_at(&mut db, &mock, "POST /v1/batches", &app);
    let job = only_job(&mock);
    // The next run finds the intent without a job, finds the job by it, and adopts it.
    let v = batch(&db, &mock, &[]).json();
    assert_eq!(
        (v["submitted"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(0), Some(1)),
        "{v}"
    );
    assert_eq!(mock.batch_jobs().len(), 1, "no second job");
    mock.set_batch_status(&job.id, "completed");
    assert_eq!(batch(&db, &mock, &[]).json()["embedded"], 12);
    assert_eq!(db.correct_rows(DIMS), (12, 0));
}

#[test]
fn a_crash_before_the_job_was_created_frees_its_rows_for_the_next_job() {
    let mut db = TestDb::new("batch_early");
    db.products(12, DIMS);
    let mock = Mock::start(DIMS);
    let app = format!("{}_b", db.schema);
    kill_at(&mut db, &mock, "POST /v1/files", &app);
    assert!(mock.batch_jobs().is_empty());
    assert_eq!(mock.batch_files(), 1);
    // No job has the intent: it is dropped, its rows sent in a new job.
    let v = batch(&db, &mock, &[]).json();
    assert_eq!(
        (v["submitted"].as_u64(), v["jobs_in_flight"].as_i64()),
        (Some(12), Some(1)),
        "{v}"
    );
    let job = only_job(&mock);
    // The orphan's file stays at the provider (its id never came back); the new job's too.
    assert_eq!(mock.batch_files(), 2);
    mock.set_batch_status(&job.id, "completed");
    assert_eq!(batch(&db, &mock, &[]).json()["embedded"], 12);
    assert_eq!(db.correct_rows(DIMS), (12, 0));
}

#[test]
fn token_and_cost_budgets_count_the_jobs_in_flight() {
    let mut db = TestDb::new("batch_budget");
    db.products(10, DIMS);
    let mock = Mock::start(DIMS);
    let tokens = |ids: std::ops::RangeInclusive<i64>| -> u64 {
        ids.map(|i| mock::tokens_for(&format!("product {i}"))).sum()
    };
    // Half the price: $0.01 per million tokens buys the first four rows' tokens.
    let usd = format!("{}", (tokens(1..=4) as f64 + 0.5) * 0.01 / 1e6);
    let args = ["--max-cost-usd", usd.as_str()];
    let v = batch(&db, &mock, &args).json();
    assert_eq!(
        (v["submitted"].as_u64(), v["stop_reason"].as_str()),
        (Some(4), Some("max_cost")),
        "{v}"
    );
    // The job in flight spends the budget of the next tick.
    let v = batch(&db, &mock, &args).json();
    assert_eq!(
        (v["submitted"].as_u64(), v["stop_reason"].as_str()),
        (Some(0), Some("max_cost")),
        "{v}"
    );
    let max_tokens = tokens(1..=4).to_string();
    let v = batch(&db, &mock, &["--max-tokens", &max_tokens]).json();
    assert_eq!(
        (v["submitted"].as_u64(), v["stop_reason"].as_str()),
        (Some(0), Some("max_tokens")),
        "{v}"
    );
    let dry = autoembed(
        &db,
        &mock,
        &["dry-run", "--batch-api", "--json", "--max-cost-usd", &usd],
    )
    .json();
    assert_eq!(
        (dry["would_embed"].as_u64(), dry["jobs_in_flight"].as_i64()),
        (Some(0), Some(1)),
        "{dry}"
    );
    // Once collected, the budget buys the next rows.
    mock.set_batch_status(&only_job(&mock).id, "completed");
    let v = batch(&db, &mock, &args).json();
    assert_eq!(
        (v["embedded"].as_u64(), v["submitted"].as_u64()),
        (Some(4), Some(4)),
        "{v}"
    );
}

#[test]
fn verify_shows_the_jobs_in_flight_and_warns_past_the_window() {
    let mut db = TestDb::new("batch_verify");
    db.products(6, DIMS);
    let mock = Mock::start(DIMS);
    batch(&db, &mock, &[]);
    let check = |db: &TestDb| {
        let r = autoembed(db, &mock, &["verify", "--json"]);
        let v = r.json();
        let c = v["checks"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "batch_jobs").cloned())
            .unwrap_or_else(|| panic!("no batch_jobs check: {v}"));
        (r.code, v["batch_jobs"].clone(), c)
    };
    let (code, jobs, c) = check(&db);
    assert_eq!(code, 0, "{c}");
    assert_eq!(
        (jobs["jobs"].as_i64(), jobs["rows"].as_i64()),
        (Some(1), Some(6))
    );
    assert_eq!(
        (c["ok"].as_bool(), c["warning"].as_bool()),
        (Some(true), Some(false)),
        "{c}"
    );
    let s = db.state_schema();
    db.exec(&format!(
        "UPDATE {s}.batch_jobs SET submitted_at = now() - interval '25 hours'"
    ));
    let (_, _, c) = check(&db);
    assert_eq!(c["warning"].as_bool(), Some(true), "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap_or("")
            .contains("past the provider's 24 h window"),
        "{c}"
    );
    // Uninstalling while jobs are in flight would lose them: refused.
    let un = autoembed(&db, &mock, &["setup", "--uninstall"]);
    assert_eq!(un.code, 2, "{un:?}");
    assert!(un.stderr.contains("batch jobs in flight"), "{un:?}");
}

#[test]
fn batch_api_is_refused_where_it_cannot_work() {
    let db = TestDb::new("batch_refuse");
    let mock = Mock::start(DIMS);
    for (args, words) in [
        (
            vec!["run-once", "--batch-api", "--provider", "openrouter"],
            "--provider openai only",
        ),
        (vec!["watch", "--batch-api"], "is for run-once and backfill"),
        (
            vec!["run-once", "--batch-api", "--chunks-table", "chunks"],
            "does not embed into --chunks-table",
        ),
    ] {
        let r = autoembed(&db, &mock, &args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains(words), "{args:?}: {r:?}");
    }
    let r = support::run(
        db.cmd(&mock)
            .env("AUTOEMBED_BATCH_API", "maybe")
            .arg("run-once"),
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("AUTOEMBED_BATCH_API"), "{r:?}");
    assert!(mock.batch_calls().is_empty());
}
