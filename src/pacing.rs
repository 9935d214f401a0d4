//! Pacing: stay under the provider's per-minute limits instead of running
//! into them. A 429 costs a round trip and a wait, and with several workers
//! one 429 tends to become many; spacing the requests out costs nothing.
//!
//! Two buckets, one for tokens and one for requests, shared by all workers
//! of a run. Each refills continuously at its per-minute limit / 60 a
//! second. The rate comes from `--tokens-per-minute` / `--requests-per-minute`
//! or from the `x-ratelimit-limit-*` headers of the replies (the lower
//! wins); the `x-ratelimit-remaining-*` headers pull the bucket down to what
//! the provider says is left (never up), and a 429 empties it for as long as
//! the provider asks everyone to wait. A bucket with no known rate paces
//! nothing, so a provider without limits costs nothing; but when a provider
//! that states no limits answers 429, the requests bucket takes 90% of the
//! rate at which replies succeeded over the last second (and 90% of that at
//! each further 429), so the workers stop racing each other into 429s; each
//! success then adds back a little (half a request a second per second), as
//! TCP does, so one early 429 does not slow a whole backfill. Buckets refill at
//! 95% of the limit, to leave room for network jitter.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The share of a limit autoembed aims for: requests reach the provider a
/// little later or earlier than they leave, and a bucket paced at exactly
/// its limit turns that jitter into 429s.
const HEADROOM: f64 = 0.95;

/// What one reply said about the provider's limits (`x-ratelimit-*`); all optional.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    /// Until the bucket is full again (`x-ratelimit-reset-*`: `6m0s`, `1s`, `48ms`).
    pub reset_tokens: Option<Duration>,
    pub reset_requests: Option<Duration>,
}

impl Limits {
    /// Read the headers through `get` (a case-insensitive header lookup).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Limits {
        let num = |name: &str| get(name).and_then(|v| v.trim().parse::<u64>().ok());
        Limits {
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            limit_requests: num("x-ratelimit-limit-requests"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            reset_tokens: get("x-ratelimit-reset-tokens").and_then(parse_duration),
            reset_requests: get("x-ratelimit-reset-requests").and_then(parse_duration),
        }
    }
}

/// A duration as the reset headers write it: `1h2m3.5s`, `6m0s`, `1s`, `48ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else {
            return None;
        };
        total += value * unit;
        rest = &rest[len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// Why [`Pacer::admit`] did not let a request go.
#[derive(Debug, PartialEq, Eq)]
pub enum NotAdmitted {
    /// The wait would pass the run's deadline.
    OutOfTime,
    /// A stop signal arrived while waiting.
    Stopped,
}

#[derive(Debug)]
struct Bucket {
    /// Units a second from the user's flag.
    configured: Option<f64>,
    /// Units a second from the provider's headers, or guessed from 429s.
    learned: Option<f64>,
    /// `learned` was guessed from 429s, and grows with each success.
    guessed: bool,
    /// The most the bucket holds: one second's worth of a configured rate,
    /// or the most the provider has said it had.
    cap: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: Option<u64>, now: Instant) -> Bucket {
        let configured = per_minute.map(|n| n as f64 / 60.0);
        let cap = configured.unwrap_or(0.0);
        Bucket {
            configured,
            learned: None,
            guessed: false,
            cap,
            // Half full: the first requests (new connections, TLS) reach the
            // provider late, and then arrive closer together than they left.
            level: cap / 2.0,
            at: now,
        }
    }

    fn rate(&self) -> Option<f64> {
        let rate = match (self.configured, self.learned) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(rate * HEADROOM)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate() {
            let gained = rate * now.saturating_duration_since(self.at).as_secs_f64();
            self.level = (self.level + gained).min(self.cap);
        }
        self.at = now;
    }

    /// How long until `n` units may go (a request larger than the bucket
    /// goes when it is full, and leaves it in debt).
    fn wait(&self, n: f64) -> Duration {
        let Some(rate) = self.rate().filter(|r| *r > 0.0) else {
            return Duration::ZERO;
        };
        let need = n.min(self.cap);
        if self.level >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(((need - self.level) / rate).min(3600.0))
        }
    }

    fn take(&mut self, n: f64) {
        if self.rate().is_some() {
            self.level -= n;
        }
    }

    /// The provider's word: its per-minute limit, what is left of it after
    /// a request of `sent` units, and how long until it is whole again.
    fn observe(
        &mut self,
        limit: Option<u64>,
        remaining: Option<u64>,
        reset: Option<Duration>,
        sent: f64,
    ) {
        if let (true, Some(r)) = (self.guessed, self.learned) {
            // Additive increase: half a unit a second more per second of successes.
            let r = r + 0.5 / r.max(0.5);
            self.learned = Some(r);
            self.cap = r.max(1.0);
        }
        let Some(left) = remaining.map(|r| r as f64) else {
            if let Some(limit) = limit.filter(|l| *l > 0) {
                self.learned = Some(limit as f64 / 60.0);
                self.guessed = false;
            }
            return;
        };
        let first = self.rate().is_none();
        self.cap = self.cap.max(left + sent);
        if let Some(limit) = limit.filter(|l| *l > 0) {
            self.learned = Some(limit as f64 / 60.0);
            self.guessed = false;
        } else if let Some(reset) = reset.filter(|r| !r.is_zero()) {
            // No limit header: the bucket refills what is missing in `reset`.
            if self.cap > left {
                self.learned = Some((self.cap - left) / reset.as_secs_f64());
                self.guessed = false;
            }
        }
        if self.rate().is_some() {
            self.level = if first { left } else { self.level.min(left) };
        }
    }

    /// The provider said 429: whatever this bucket thought, it is empty.
    fn empty(&mut self) {
        self.level = self.level.min(0.0);
    }
}

/// The run's two buckets, shared by its workers.
#[derive(Debug)]
pub struct Pacer {
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    tokens: Bucket,
    requests: Bucket,
    /// After a 429, no worker sends before this.
    hold_until: Option<Instant>,
    /// When the replies of the last second came (for a provider that states no limits).
    replies: std::collections::VecDeque<Instant>,
}

impl Buckets {
    fn refill(&mut self, now: Instant) {
        self.tokens.refill(now);
        self.requests.refill(now);
    }
}

impl Pacer {
    pub fn new(tokens_per_minute: Option<u64>, requests_per_minute: Option<u64>) -> Pacer {
        let now = Instant::now();
        Pacer {
            buckets: Mutex::new(Buckets {
                tokens: Bucket::new(tokens_per_minute, now),
                requests: Bucket::new(requests_per_minute, now),
                hold_until: None,
                replies: Default::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests need their tokens counted to be paced.
    pub fn paces_tokens(&self) -> bool {
        self.lock().tokens.rate().is_some()
    }

    /// Wait until a request of `tokens` may go, then count it against both
    /// buckets. Never waits past `deadline`; returns early on `stop`.
    pub fn admit(
        &self,
        tokens: u64,
        deadline: Option<Instant>,
        stop: &AtomicBool,
    ) -> Result<(), NotAdmitted> {
        loop {
            let wait = {
                let mut b = self.lock();
                let now = Instant::now();
                b.refill(now);
                let held = b
                    .hold_until
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                let wait = held
                    .max(b.tokens.wait(tokens as f64))
                    .max(b.requests.wait(1.0));
                if wait.is_zero() {
                    b.tokens.take(tokens as f64);
                    b.requests.take(1.0);
                    return Ok(());
                }
                wait
            };
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return Err(NotAdmitted::OutOfTime);
            }
            crate::trace!("pacing: waiting {} ms", wait.as_millis());
            // Wake up at most every 100 ms: another worker may have taken
            // what this one waits for, or a reply may have changed the rate.
            if !crate::signals::sleep_unless_stopped(wait.min(Duration::from_millis(100)), stop) {
                return Err(NotAdmitted::Stopped);
            }
        }
    }

    /// What a successful reply to a request of `tokens` said.
    pub fn observe(&self, limits: &Limits, tokens: u64) {
        let mut b = self.lock();
        let now = Instant::now();
        b.refill(now);
        b.replies.push_back(now);
        while b
            .replies
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
        {
            b.replies.pop_front();
        }
        b.tokens.observe(
            limits.limit_tokens,
            limits.remaining_tokens,
            limits.reset_tokens,
            tokens as f64,
        );
        b.requests.observe(
            limits.limit_requests,
            limits.remaining_requests,
            limits.reset_requests,
            1.0,
        );
    }

    /// The provider said 429 and to wait `wait`: no worker sends before
    /// then, and both buckets start again from empty.
    pub fn penalize(&self, wait: Duration) {
        let mut b = self.lock();
        let now = Instant::now();
        b.refill(now);
        if b.tokens.rate().is_none() {
            // No limit known: learn one from the 429 itself.
            let recent = b
                .replies
                .iter()
                .filter(|t| now.duration_since(**t) <= Duration::from_secs(1))
                .count() as f64;
            let r = &mut b.requests;
            let per_second = match (r.learned, r.guessed) {
                (Some(guess), true) => Some(guess * 0.9),
                (None, _) if r.configured.is_none() => Some(recent.max(1.0) * 0.9),
                _ => None,
            };
            if let Some(per_second) = per_second {
                r.learned = Some(per_second);
                r.guessed = true;
                r.cap = per_second.max(1.0);
            }
        }
        b.tokens.empty();
        b.requests.empty();
        let until = now + wait;
        b.hold_until = Some(b.hold_until.map_or(until, |t| t.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_rate_spaces_requests_and_unknown_limits_pace_nothing() {
        let now = Instant::now();
        let mut b = Bucket::new(Some(600), now); // holds 10, starts at 5, refills 9.5 a second
        assert_eq!(b.wait(5.0), Duration::ZERO);
        b.take(5.0);
        assert_eq!(b.wait(4.75), Duration::from_millis(500));
        b.refill(now + Duration::from_millis(500));
        assert_eq!(b.wait(4.75), Duration::ZERO);

        let mut free = Bucket::new(None, now);
        free.take(1e9);
        assert_eq!(free.wait(1e9), Duration::ZERO);
    }

    #[test]
    fn headers_set_the_rate_and_only_ever_lower_the_level() {
        let now = Instant::now();
        let mut b = Bucket::new(None, now);
        b.observe(Some(60_000), Some(900), None, 100.0); // 1,000 a second: paced at 950
        assert_eq!((b.rate(), b.level, b.cap), (Some(950.0), 900.0, 1000.0));
        b.observe(Some(60_000), Some(950), None, 100.0);
        assert_eq!(
            b.level, 900.0,
            "a higher remaining does not raise the level"
        );
        assert_eq!(b.wait(995.0), Duration::from_millis(100));
        b.empty();
        assert_eq!(b.wait(95.0), Duration::from_millis(100));

        // Without a limit header, the reset time gives the rate.
        let mut r = Bucket::new(None, now);
        r.observe(None, Some(0), Some(Duration::from_millis(500)), 50.0);
        assert_eq!((r.rate(), r.level), (Some(100.0 * HEADROOM), 0.0));
    }

    #[test]
    fn a_429_from_a_provider_without_stated_limits_sets_a_request_rate() {
        let p = Pacer::new(None, None);
        for _ in 0..20 {
            p.observe(&Limits::default(), 10);
        }
        assert_eq!(p.lock().requests.rate(), None);
        p.penalize(Duration::from_millis(10));
        let rate = p.lock().requests.rate().unwrap_or(0.0);
        assert!((rate - 20.0 * 0.9 * HEADROOM).abs() < 1e-9, "{rate}");
        p.penalize(Duration::from_millis(10));
        let slower = p.lock().requests.rate().unwrap_or(0.0);
        assert!((slower - rate * 0.9).abs() < 1e-9, "{slower}");
        p.observe(&Limits::default(), 10);
        let faster = p.lock().requests.rate().unwrap_or(0.0);
        assert!(faster > slower, "{faster}");
    }

    #[test]
    fn reads_the_openai_headers() {
        let headers = [
            ("x-ratelimit-limit-tokens", "1000000"),
            ("x-ratelimit-remaining-tokens", "999200"),
            ("x-ratelimit-limit-requests", "3000"),
            ("x-ratelimit-remaining-requests", "2999"),
            ("x-ratelimit-reset-tokens", "48ms"),
            ("x-ratelimit-reset-requests", "1m0.5s"),
        ];
        let l = Limits::from_headers(|name| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        });
        assert_eq!(
            l,
            Limits {
                limit_tokens: Some(1_000_000),
                remaining_tokens: Some(999_200),
                limit_requests: Some(3000),
                remaining_requests: Some(2999),
                reset_tokens: Some(Duration::from_millis(48)),
                reset_requests: Some(Duration::from_millis(60_500)),
            }
        );
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_duration("soon"), None);
    }
}
