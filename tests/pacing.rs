//! Pacing: a backfill against a provider that enforces a per-minute limit
//! finishes with at most a handful of 429s and at no less than 80% of the
//! allowed rate, whether the limit comes from the provider's
//! `x-ratelimit-*` headers or from `--tokens-per-minute` /
//! `--requests-per-minute`.

mod support;

use std::time::{Duration, Instant};
use support::mock::Mock;
use support::{autoembed, TestDb};

/// 3,000 tokens a second, one second's worth at once: about half of what
/// a debug build reaches on a slow 2-core machine without a limit, so that
/// the limit bites however fast the machine is.
const TPM: u64 = 180_000;

/// Backfill `rows` rows; the run's JSON, the 429s the mock sent, and the
/// tokens it accepted per second of the run.
fn paced_backfill(
    name: &str,
    rows: i64,
    mock: &Mock,
    args: &[&str],
) -> (serde_json::Value, usize, f64) {
    let mut db = TestDb::new(name);
    db.products(rows, 1536);
    let mut all = vec!["backfill", "--json"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let r = autoembed(&db, mock, &all);
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(r.code, 0, "{r:?}");
    let json = r.json();
    assert_eq!(json["embedded"].as_i64(), Some(rows), "{json}");
    assert_eq!(db.correct_rows(1536), (rows, 0));
    let (limited, tokens) = mock.rate_limited();
    (json, limited, tokens as f64 / seconds)
}

/// A 10,000-row backfill against a mock enforcing [`TPM`] (sending its
/// `x-ratelimit-*` headers or not) ends with at most `max_429s` 429s and
/// at no less than 80% of the allowed rate.
fn paced_under_tpm(name: &str, headers: bool, args: &[&str], max_429s: usize) -> usize {
    let mock = Mock::start(1536);
    mock.rate_limits(Some(TPM), None, Duration::from_secs(1), headers);
    let (json, limited, rate) = paced_backfill(name, 10_000, &mock, args);
    let allowed = TPM as f64 / 60.0;
    eprintln!(
        "{name}: {limited} 429s, {rate:.0} tokens/s of {allowed:.0} allowed ({:.0}%), {json}",
        100.0 * rate / allowed
    );
    assert!(limited <= max_429s, "{limited} 429s: {json}");
    assert_eq!(
        json["rate_limited"].as_u64(),
        Some(limited as u64),
        "{json}"
    );
    assert!(rate >= 0.8 * allowed, "{rate:.0} tokens/s: {json}");
    limited
}

#[test]
fn the_provider_headers_pace_a_backfill_under_its_token_limit() {
    paced_under_tpm("pacehdr", true, &[], 5);
}

#[test]
fn tokens_per_minute_paces_a_provider_that_sends_no_headers() {
    paced_under_tpm(
        "pacetpm",
        false,
        &["--tokens-per-minute", &TPM.to_string()],
        5,
    );
}

#[test]
fn requests_per_minute_paces_requests() {
    let mock = Mock::start(1536);
    // 10 requests a second; 30 requests of 100 rows.
    mock.rate_limits(None, Some(600), Duration::from_secs(1), false);
    let (json, limited, _) =
        paced_backfill("pacerpm", 3_000, &mock, &["--requests-per-minute", "600"]);
    assert!(limited <= 2, "{limited} 429s: {json}");
    // 30 requests answered, and each refused one sent again.
    assert_eq!(json["requests"], 30 + limited as u64, "{json}");
    // Paced at no less than 80% of 10 requests a second, from the first
    // request the mock answered to the last (the run's own start and end
    // are the machine's speed, not the pacer's).
    let seen = mock.requests();
    let span = match (seen.first(), seen.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at).as_secs_f64(),
        _ => f64::MAX,
    };
    let rate = (seen.len() - 1) as f64 / span;
    eprintln!("requests_per_minute: {rate:.1} requests/s over {span:.2} s");
    assert!(rate >= 8.0, "{rate:.1} requests/s: {json}");
}

#[test]
fn a_limit_nobody_states_is_learned_from_its_first_429s() {
    // No headers, no flag: the limit bites (so the tests above test
    // something), then the 429s teach the pacer a request rate.
    let limited = paced_under_tpm("pacenone", false, &[], 12);
    assert!(limited >= 1, "the limit never bit");
}
