//! Pacing: a backfill against a provider that enforces a per-minute limit
//! finishes with at most a handful of 429s and at no less than 80% of the
//! allowed rate, whether the limit comes from the provider's
//! `x-ratelimit-*` headers or from `--tokens-per-minute` /
//! `--requests-per-minute`.
//!
//! The rate is the pacer's: measured on the mock's clock, from the fourth
//! request it answered to the last. The run's own start and end (connecting,
//! the other workers starting after the first reply, the final count) are
//! the machine's speed, and on a loaded 2-core machine they are seconds.

use crate::support::mock::{tokens_for, Mock, Seen};
use crate::support::{autoembed, TestDb};
use std::time::Duration;

/// 3,000 tokens a second, one second's worth at once: about half of what
/// a debug build reaches on a slow 2-core machine without a limit, so that
/// the limit bites however fast the machine is.
const TPM: u64 = 180_000;

/// Backfill `rows` rows; the run's JSON and the 429s the mock sent.
fn paced_backfill(name: &str, rows: i64, mock: &Mock, args: &[&str]) -> (serde_json::Value, usize) {
    let mut db = TestDb::new(name);
    db.products(rows, 1536);
    let mut all = vec!["backfill", "--json"];
    all.extend_from_slice(args);
    let r = autoembed(&db, mock, &all);
    assert_eq!(r.code, 0, "{r:?}");
    let json = r.json();
    assert_eq!(json["embedded"].as_i64(), Some(rows), "{json}");
    assert_eq!(db.correct_rows(1536), (rows, 0));
    (json, mock.rate_limited().0)
}

/// What `per` counts of each answered request, per second, from the
/// fourth answer to the last (the first three are the start's burst).
fn steady_rate(mock: &Mock, per: impl Fn(&Seen) -> f64) -> f64 {
    let seen = mock.requests();
    let span = match (seen.get(3), seen.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at).as_secs_f64(),
        _ => return 0.0,
    };
    seen.iter().skip(4).map(per).sum::<f64>() / span
}

/// A 10,000-row backfill against a mock enforcing [`TPM`] (sending its
/// `x-ratelimit-*` headers or not) ends with at most `max_429s` 429s and
/// at no less than 80% of the allowed rate.
fn paced_under_tpm(name: &str, headers: bool, args: &[&str], max_429s: usize) -> usize {
    let mock = Mock::start(1536);
    mock.rate_limits(Some(TPM), None, Duration::from_secs(1), headers);
    let (json, limited) = paced_backfill(name, 10_000, &mock, args);
    let rate = steady_rate(&mock, |r| {
        r.inputs.iter().map(|t| tokens_for(t)).sum::<u64>() as f64
    });
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
    // 4 requests a second; 24 requests of 10 rows. Small batches at a low
    // rate: a loaded 2-core machine running the whole suite sends 100-row
    // batches at 5 a second, so the limit, not the machine, sets the pace.
    mock.rate_limits(None, Some(240), Duration::from_secs(1), false);
    let (json, limited) = paced_backfill(
        "pacerpm",
        240,
        &mock,
        &["--requests-per-minute", "240", "--batch-size", "10"],
    );
    assert!(limited <= 2, "{limited} 429s: {json}");
    // 24 requests answered, and each refused one sent again.
    assert_eq!(json["requests"], 24 + limited as u64, "{json}");
    // Paced at no less than 80% of 4 requests a second.
    let rate = steady_rate(&mock, |_| 1.0);
    eprintln!("requests_per_minute: {rate:.1} requests/s, {json}");
    assert!(rate >= 3.2, "{rate:.1} requests/s: {json}");
    // And never faster than the limit allows, beyond its one-second burst.
    assert!(rate <= 4.0 * 1.25, "{rate:.1} requests/s: {json}");
}

#[test]
fn a_limit_nobody_states_is_learned_from_its_first_429s() {
    // No headers, no flag: the limit bites (so the tests above test
    // something), then the 429s teach the pacer a request rate.
    let limited = paced_under_tpm("pacenone", false, &[], 12);
    assert!(limited >= 1, "the limit never bit");
}
