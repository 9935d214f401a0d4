//! How each kind of provider failure ends a run: credentials and quota stop
//! it at once (exit 3, rows still pending), rate limits and transient faults
//! are waited out and retried, unusable replies are never written.

use crate::support::mock::{Fault, Mock};
use crate::support::{autoembed, TestDb, API_KEY};
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

#[test]
fn azure_openai_is_called_on_its_deployment_url_with_its_api_key_header() {
    let mut db = TestDb::new("azure");
    db.products(12, 1536);
    let mock = Mock::start(1536);
    let resource = mock.base.trim_end_matches("/v1").to_string();
    let azure = |db: &TestDb| {
        let mut c = db.cmd(&mock);
        c.env_remove("OPENAI_API_KEY")
            .env_remove("AUTOEMBED_API_BASE")
            .env("AUTOEMBED_PROVIDER", "azure")
            .env("AUTOEMBED_MODEL", "prod-embeddings")
            .env("AZURE_OPENAI_ENDPOINT", &resource)
            .env("AZURE_OPENAI_API_KEY", API_KEY);
        c
    };
    let r = crate::support::run(azure(&db).args(["run-once", "--json"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(db.correct_rows(1536), (12, 0));
    let seen = &mock.requests()[0];
    assert_eq!(
        seen.path,
        "/openai/deployments/prod-embeddings/embeddings?api-version=2024-10-21"
    );
    assert_eq!(seen.header("api-key"), Some(API_KEY));
    assert_eq!(seen.header("authorization"), None);
    // Without the resource or the key: exit 2, naming the variable.
    for (unset, says) in [
        ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_ENDPOINT"),
        ("AZURE_OPENAI_API_KEY", "set AZURE_OPENAI_API_KEY"),
    ] {
        let r = crate::support::run(azure(&db).env_remove(unset).args(["run-once"]));
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains(says), "{r:?}");
    }
}

#[test]
fn request_extra_fields_go_into_every_request_and_may_not_replace_autoembeds_own() {
    let mut db = TestDb::new("extra");
    db.products(3, 1536);
    let mock = Mock::start(1536);
    let r = crate::support::run(
        db.cmd(&mock)
            .env(
                "AUTOEMBED_REQUEST_EXTRA",
                r#"{"input_type":"document","truncate":"END"}"#,
            )
            .args(["run-once"]),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let body = &mock.requests()[0].body;
    assert_eq!(body["input_type"], "document");
    assert_eq!(body["truncate"], "END");
    assert_eq!(body["model"], "text-embedding-3-small");
    assert_eq!(db.correct_rows(1536), (3, 0));
    for (bad, says) in [
        ("[1]", "must be a JSON object"),
        ("{oops", "is not JSON"),
        (r#"{"model":"other"}"#, "may not set \"model\""),
        (r#"{"input":[]}"#, "may not set \"input\""),
    ] {
        let r = crate::support::run(
            db.cmd(&mock)
                .env("AUTOEMBED_REQUEST_EXTRA", bad)
                .args(["run-once"]),
        );
        assert_eq!(r.code, 2, "{bad}: {r:?}");
        assert!(
            r.stderr.contains(says)
                && r.stderr
                    .contains("--request-extra (AUTOEMBED_REQUEST_EXTRA)"),
            "{bad}: {r:?}"
        );
    }
    assert_eq!(mock.requests().len(), 1);
}

#[test]
fn the_documented_provider_settings_send_what_they_say() {
    // README's rows: (API base path, model, column size, dimensions, extra JSON).
    for (path, model, size, dimensions, extra) in [
        (
            "/v1beta/openai",
            "gemini-embedding-001",
            768,
            Some("768"),
            None,
        ),
        ("/v1", "mistral-embed", 1024, None, None),
        (
            "/v1",
            "jina-embeddings-v3",
            1024,
            None,
            Some(r#"{"task":"retrieval.passage"}"#),
        ),
        (
            "/v1",
            "voyage-3.5",
            1024,
            None,
            Some(r#"{"input_type":"document"}"#),
        ),
    ] {
        let mut db = TestDb::new("providers");
        db.products(2, size);
        let mock = Mock::start(size);
        let base = mock.base.trim_end_matches("/v1").to_string() + path;
        let mut c = db.cmd(&mock);
        c.env("AUTOEMBED_PROVIDER", "openai-compatible")
            .env("AUTOEMBED_API_BASE", &base)
            .env("AUTOEMBED_API_KEY", API_KEY)
            .env("AUTOEMBED_MODEL", model);
        if let Some(d) = dimensions {
            c.env("AUTOEMBED_DIMENSIONS", d);
        }
        if let Some(e) = extra {
            c.env("AUTOEMBED_REQUEST_EXTRA", e);
        }
        let r = crate::support::run(c.args(["run-once"]));
        assert_eq!(r.code, 0, "{model}: {r:?}");
        let requests = mock.requests();
        let seen = requests.last().expect("a request");
        assert_eq!(seen.path, format!("{path}/embeddings"), "{model}");
        assert_eq!(seen.body["model"], model);
        assert_eq!(
            seen.body["dimensions"].as_u64(),
            dimensions.and_then(|d| d.parse().ok()),
            "{model}"
        );
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {API_KEY}").as_str())
        );
        if let Some(e) = extra {
            let extra: serde_json::Value = serde_json::from_str(e).expect("json");
            for (k, v) in extra.as_object().expect("object") {
                assert_eq!(&seen.body[k], v, "{model}: {k}");
            }
        }
        assert_eq!(db.correct_rows(size), (2, 0), "{model}");
    }
}
