//! How each kind of provider failure ends a run: credentials and quota stop
//! it at once (exit 3, rows still pending), rate limits and transient faults
//! are waited out and retried, unusable replies are never written.

use crate::support::mock::{Fault, Mock};
use crate::support::{autoembed, TestDb};
use std::time::Duration;

fn pending_and_unfailed(db: &mut TestDb, n: i64) {
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NULL"
        )),
        n
    );
    let st = db.state_schema();
    let failures = db.count(&format!(
        "SELECT count(*) FROM pg_tables WHERE schemaname = '{st}' AND tablename = 'failures'"
    ));
    if failures == 1 {
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM {st}.failures")),
            0,
            "rows were marked failed"
        );
    }
}

#[test]
fn credential_and_quota_errors_stop_after_one_request_and_name_the_key_variable() {
    let cases = [
        (
            Fault::openai(
                401,
                "invalid_api_key",
                "Incorrect API key provided: sk-test-***",
            ),
            "the API key was refused (401)",
        ),
        (
            Fault::openai(403, "forbidden", "Your organisation has no access"),
            "access denied (403)",
        ),
        (
            Fault::Status {
                status: 402,
                body: r#"{"error":{"code":402,"message":"Insufficient credits"}}"#.into(),
                headers: vec![],
            },
            "out of credits (402)",
        ),
        (
            Fault::openai(429, "insufficient_quota", "You exceeded your current quota"),
            "quota exhausted (insufficient_quota)",
        ),
        (
            Fault::Body(r#"{"error":{"code":401,"message":"No auth credentials found"}}"#.into()),
            "the API key was refused (401)",
        ),
    ];
    for (fault, want) in cases {
        // Three batches' worth at the default concurrency: only the first
        // request goes out before its reply says stop.
        let mut db = TestDb::new("fatal");
        db.products(300, 1536);
        let mock = Mock::start(1536);
        mock.always(Some(fault.clone()));
        let r = autoembed(&db, &mock, &["run-once", "--json"]);
        assert_eq!(r.code, 3, "{fault:?}: {r:?}");
        assert!(
            r.stderr.contains(want) && r.stderr.contains("OPENAI_API_KEY"),
            "{fault:?}: {r:?}"
        );
        let j = r.json();
        assert_eq!(
            (j["stop_reason"].as_str(), j["requests"].as_u64()),
            (Some("error"), Some(1))
        );
        assert!(j["error"].as_str().unwrap_or("").contains(want));
        // The provider saw exactly one request, too.
        assert_eq!(mock.faults_served(), 1, "{fault:?}: {j}");
        pending_and_unfailed(&mut db, 300);
    }
}

#[test]
fn rate_limits_are_waited_out_and_do_not_count_against_the_rows() {
    let mut db = TestDb::new("ratelimit");
    db.products(120, 1536);
    let mock = Mock::start(1536);
    let limited = |h: &str, v: &str| {
        Fault::openai(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for requests",
        )
        .with_header(h, v)
    };
    mock.script([
        limited("retry-after-ms", "20"),
        limited("retry-after", "0"),
        Fault::openai(
            429,
            "rate_limit_exceeded",
            "Rate limit reached. Please try again in 30ms.",
        ),
        Fault::openai(429, "rate_limit_exceeded", "Rate limit reached"),
    ]);
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (
            j["embedded"].as_u64(),
            j["failed"].as_u64(),
            j["rate_limited"].as_u64()
        ),
        (Some(120), Some(0), Some(4))
    );
    assert_eq!(j["requests"], 6);
    assert_eq!(db.correct_rows(1536), (120, 0));
}

#[test]
fn a_rate_limit_longer_than_the_time_budget_ends_the_run_cleanly() {
    let mut db = TestDb::new("ratelimit_budget");
    db.products(20, 1536);
    let mock = Mock::start(1536);
    mock.always(Some(
        Fault::openai(429, "rate_limit_exceeded", "Rate limit reached")
            .with_header("retry-after", "30"),
    ));
    let r = autoembed(&db, &mock, &["run-once", "--json", "--max-seconds", "2"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["stop_reason"], "max_seconds");
    pending_and_unfailed(&mut db, 20);
}

#[test]
fn transient_faults_and_unusable_replies_are_retried_and_never_written() {
    let mut db = TestDb::new("transient");
    db.products(100, 1536);
    let mock = Mock::start(1536);
    let faults = [
        Fault::openai(500, "server_error", "The server had an error")
            .with_header("retry-after-ms", "5"),
        Fault::openai(502, "bad_gateway", "Bad gateway"),
        Fault::openai(503, "server_is_overloaded", "Overloaded").with_header("retry-after", "0"),
        Fault::Reset,
        Fault::Body("this is not json".into()),
        Fault::WrongCount,
        Fault::WrongDims,
        Fault::RepeatedIndex,
        Fault::Body(r#"{"object":"list","data":[],"model":"x"}"#.into()),
        Fault::Body(r#"{"error":{"code":503,"message":"No provider available"}}"#.into()),
        Fault::Delay(Duration::from_millis(2500)),
    ];
    // Each batch meets one fault, then a good reply.
    mock.script(faults.into_iter().flat_map(|f| [f, Fault::Pass]));
    let r = autoembed(
        &db,
        &mock,
        &[
            "backfill",
            "--json",
            "--batch-size",
            "9",
            "--request-timeout",
            "1",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["failed"].as_u64()),
        (Some(100), Some(0))
    );
    assert_eq!(j["retries"], 11);
    assert_eq!(db.correct_rows(1536), (100, 0));
}

#[test]
fn a_provider_that_stays_down_ends_the_run_with_exit_3_and_rows_pending() {
    let mut db = TestDb::new("down");
    db.products(40, 1536);
    // Nothing listens on the mock's port once it is taken and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mock = Mock::start(1536);
    let r = crate::support::run(
        db.cmd(&mock)
            .env("AUTOEMBED_API_BASE", format!("http://127.0.0.1:{port}/v1"))
            .args(["run-once", "--json", "--max-seconds", "3"]),
    );
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("cannot reach http://127.0.0.1:"), "{r:?}");
    assert_eq!(r.json()["stop_reason"], "error");
    pending_and_unfailed(&mut db, 40);

    // Always 503: retried a few times, then each half once more (one input
    // could be what fails), then exit 3, nothing marked failed.
    mock.always(Some(
        Fault::openai(503, "server_is_overloaded", "Overloaded")
            .with_header("retry-after-ms", "10"),
    ));
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("gave up after 4 retries, rows stay pending: HTTP 503"),
        "{r:?}"
    );
    assert_eq!(r.json()["requests"], 5 + 2 + 2);
    pending_and_unfailed(&mut db, 40);
}

#[test]
fn a_request_the_provider_refuses_whatever_the_input_stops_the_run_and_marks_no_row_failed() {
    let mut db = TestDb::new("reqlevel");
    db.products(40, 1536);
    let mock = Mock::start(1536);
    mock.always(Some(Fault::openai(
        400,
        "invalid_request_error",
        "This model does not support specifying dimensions.",
    )));
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("the provider refuses the request itself")
            && r.stderr
                .contains("This model does not support specifying dimensions")
            && r.stderr.contains("--dimensions (AUTOEMBED_DIMENSIONS)"),
        "{r:?}"
    );
    // The batch of 40 halved down to one row (40, 20, 10, 5, 2, 1), then one
    // harmless input alone, rejected too: 7 requests, not 79.
    assert_eq!(r.json()["requests"], 7, "{r:?}");
    pending_and_unfailed(&mut db, 40);
}

#[test]
fn an_input_the_provider_fails_on_every_time_is_found_recorded_and_skipped() {
    let mut db = TestDb::new("poison");
    db.products(40, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'POISON pill' WHERE product_id_internal = 17"
    ));
    let mock = Mock::start(1536);
    mock.crash_on_inputs_containing("POISON");
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_i64(), j["failed"].as_i64()),
        (Some(39), Some(1)),
        "{j}"
    );
    assert_eq!(db.correct_rows(1536), (39, 0));
    let st = db.state_schema();
    let error: String = db
        .client
        .query_one(
            &format!("SELECT last_error FROM {st}.failures WHERE row_id = '17'"),
            &[],
        )
        .expect("failure of row 17")
        .get(0);
    assert!(error.contains("fails on this input every time"), "{error}");
    // The next tick pays for nothing and is not blocked by it.
    let before = mock.requests().len();
    db.exec(&format!(
        "INSERT INTO {s}.products VALUES (41, 'a new row', NULL)"
    ));
    let j = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(j["embedded"], 1, "{j}");
    assert_eq!(mock.requests().len(), before + 1);
}
