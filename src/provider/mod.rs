//! Embedding providers: the trait the batch loop calls, the models autoembed
//! knows, how a failed request is classified, and the retry policy.
//!
//! A provider makes one attempt per call and says what kind of failure it
//! saw; [`embed_with_retry`] decides whether to wait and try again, so every
//! provider gets the same policy (429s wait as told, transient faults back
//! off with jitter, credential and quota errors stop at once).

pub mod batch_api;
mod http;
#[cfg(feature = "local")]
pub mod local;
mod openai;

pub use openai::OpenAiClient;

use crate::config::ProviderConfig;
#[cfg(feature = "local")]
use crate::models::ProviderKind;
use crate::pacing::{NotAdmitted, Pacer};
use crate::tokens::Counter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A successful reply: one vector per input, in input order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the provider reports; `None` when it sent no usage.
    pub tokens: Option<u64>,
    /// What the reply's headers said about the provider's rate limits.
    pub limits: crate::pacing::Limits,
}

/// Why one request failed, by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The inputs were refused (400, 413, 422): split the batch to find the
    /// offending rows; a single rejected input is the row's failure.
    #[error("rejected ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// Slow down and retry; not the rows' fault.
    #[error("rate limited: {message}")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// Server error, timeout, dropped connection or unusable reply: retry.
    #[error("{message}")]
    Transient {
        retry_after: Option<Duration>,
        message: String,
    },
    /// Bad key, no credit, unknown model or endpoint: stop the run.
    #[error("{message}")]
    Fatal { message: String },
    /// The configuration cannot work (vectors that don't fit the column, a
    /// local model that does not load): a configuration error (exit 2).
    #[error("{message}")]
    Misconfigured { message: String },
}

impl ProviderError {
    /// The same failure, its message opening with the call that met it.
    pub fn in_call(self, what: &str) -> ProviderError {
        let said = |m: String| format!("{what}: {m}");
        match self {
            ProviderError::Rejected { status, message } => ProviderError::Rejected {
                status,
                message: said(message),
            },
            ProviderError::RateLimited {
                retry_after,
                message,
            } => ProviderError::RateLimited {
                retry_after,
                message: said(message),
            },
            ProviderError::Transient {
                retry_after,
                message,
            } => ProviderError::Transient {
                retry_after,
                message: said(message),
            },
            ProviderError::Fatal { message } => ProviderError::Fatal {
                message: said(message),
            },
            ProviderError::Misconfigured { message } => ProviderError::Misconfigured {
                message: said(message),
            },
        }
    }
}

/// Something that turns texts into vectors, one attempt per call.
pub trait Embedder: Send + Sync {
    fn embed(&self, inputs: &[&str]) -> Result<Embeddings, ProviderError>;
}

/// The configured provider: how it counts tokens and how it embeds.
pub struct Provider {
    pub counter: Counter,
    pub embedder: Arc<dyn Embedder>,
}

/// Build the configured provider. For the local model this reads its
/// tokenizer (a missing model is a configuration error) but not its
/// weights, which load on the first request.
pub fn build(cfg: &ProviderConfig) -> crate::error::Result<Provider> {
    #[cfg(feature = "local")]
    if cfg.kind == ProviderKind::Local {
        let path = cfg.model_path.clone().unwrap_or_default();
        let tokenizer = Arc::new(
            local::WordPiece::load(&path)
                .map_err(|e| crate::error::Error::Config(e.to_string()))?,
        );
        return Ok(Provider {
            counter: Counter::Model(tokenizer.clone()),
            embedder: Arc::new(local::Lazy::new(path, cfg.local_precision, tokenizer)),
        });
    }
    Ok(Provider {
        counter: Counter::for_model(&cfg.model, cfg.kind),
        embedder: Arc::new(OpenAiClient::new(cfg)),
    })
}

/// How the retry loop behaves; the defaults are what runs in production.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after a transient fault before the run gives up (exit 3).
    pub transient_retries: u32,
    /// Retries after 429 before the run gives up.
    pub rate_limit_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            transient_retries: 4,
            rate_limit_retries: 30,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// Why the retry loop returned without vectors.
#[derive(Debug)]
pub enum RetryOutcome {
    /// A final answer for these inputs (rejected or fatal), or retries spent.
    Failed(ProviderError),
    /// The next wait would pass the run's deadline.
    OutOfTime(ProviderError),
    /// A stop signal arrived while waiting.
    Stopped,
    /// The request's `send_by` has passed: its rows' claims must be
    /// confirmed before it is sent (again).
    Unconfirmed,
}

/// Counters the retry loop adds to.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestStats {
    pub requests: u64,
    pub retries: u64,
    pub rate_limited: u64,
}

/// One request's inputs and its tokens (0 when not counted), paced by
/// `pacer`, not sent (nor sent again) after `send_by`.
pub struct Request<'a> {
    pub inputs: &'a Arc<Vec<String>>,
    pub tokens: u64,
    pub pacer: &'a Pacer,
    pub send_by: Option<Instant>,
}

/// Call `embedder` until it answers, retrying as `policy` says and pacing
/// every attempt, never sleeping past `deadline` and returning early when
/// `stop` is set.
pub fn embed_with_retry(
    requester: &Requester,
    req: Request<'_>,
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    stop: &AtomicBool,
    stats: &mut RequestStats,
) -> Result<Embeddings, RetryOutcome> {
    let mut transient = 0u32;
    let mut limited = 0u32;
    loop {
        if req.send_by.is_some_and(|t| Instant::now() >= t) {
            return Err(RetryOutcome::Unconfirmed);
        }
        match req.pacer.admit(req.tokens, deadline, stop) {
            Ok(()) => {}
            Err(NotAdmitted::Stopped) => return Err(RetryOutcome::Stopped),
            Err(NotAdmitted::OutOfTime) => {
                return Err(RetryOutcome::OutOfTime(ProviderError::RateLimited {
                    retry_after: None,
                    message:
                        "the rate limit leaves no room for another request before the deadline"
                            .into(),
                }))
            }
        }
        if req.send_by.is_some_and(|t| Instant::now() >= t) {
            return Err(RetryOutcome::Unconfirmed);
        }
        stats.requests += 1;
        let err = match requester.call(req.inputs, stop) {
            None => return Err(RetryOutcome::Stopped),
            Some(Ok(e)) => {
                req.pacer.observe(&e.limits, req.tokens);
                return Ok(e);
            }
            Some(Err(e)) => e,
        };
        let wait = match &err {
            ProviderError::Rejected { .. }
            | ProviderError::Fatal { .. }
            | ProviderError::Misconfigured { .. } => return Err(RetryOutcome::Failed(err)),
            ProviderError::RateLimited { retry_after, .. } => {
                stats.rate_limited += 1;
                limited += 1;
                if limited > policy.rate_limit_retries {
                    return Err(RetryOutcome::Failed(err));
                }
                let wait = retry_after.unwrap_or_else(|| backoff(policy, limited));
                req.pacer.penalize(wait.min(policy.max_delay));
                wait
            }
            ProviderError::Transient { retry_after, .. } => {
                transient += 1;
                if transient > policy.transient_retries {
                    return Err(RetryOutcome::Failed(err));
                }
                retry_after
                    .map(|d| d.min(policy.max_delay))
                    .unwrap_or_else(|| backoff(policy, transient))
            }
        };
        let wait = wait.min(policy.max_delay);
        if let Some(deadline) = deadline {
            if Instant::now() + wait >= deadline {
                return Err(RetryOutcome::OutOfTime(err));
            }
        }
        crate::debug!("{err}; retrying in {} ms", wait.as_millis());
        stats.retries += 1;
        if !crate::signals::sleep_unless_stopped(wait, stop) {
            return Err(RetryOutcome::Stopped);
        }
    }
}

/// A long-lived thread that makes one worker's requests, so that a stop
/// signal can abandon a request at once instead of waiting up to
/// `--request-timeout` for its reply. One thread per worker, reused for
/// every request: memory stays flat however many requests a run makes.
pub struct Requester {
    jobs: mpsc::Sender<Job>,
}

/// The inputs of one request and where its reply goes.
type Job = (
    Arc<Vec<String>>,
    mpsc::Sender<Result<Embeddings, ProviderError>>,
);

impl Requester {
    pub fn new(embedder: Arc<dyn Embedder>) -> Requester {
        let (jobs, queue) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("autoembed-request".into())
            .spawn(move || {
                // Ends when the Requester, and with it the sender, is dropped.
                for (inputs, reply) in queue {
                    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                    let _ = reply.send(embedder.embed(&refs));
                }
            });
        if let Err(e) = spawned {
            crate::warn!("cannot start a request thread: {e}");
        }
        Requester { jobs }
    }

    /// One request; `None` when `stop` was set before the reply came.
    fn call(
        &self,
        inputs: &Arc<Vec<String>>,
        stop: &AtomicBool,
    ) -> Option<Result<Embeddings, ProviderError>> {
        let (tx, rx) = mpsc::channel();
        let gone = || {
            Some(Err(ProviderError::Transient {
                retry_after: None,
                message: "the request thread is gone".into(),
            }))
        };
        if self.jobs.send((inputs.clone(), tx)).is_err() {
            return gone();
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(reply) => return Some(reply),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return gone(),
            }
        }
    }
}

/// Exponential backoff with up to 50% jitter: base, 2*base, 4*base, ...
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy
        .base_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let exp = exp.min(policy.max_delay);
    let jitter = exp.mul_f64(jitter_fraction() * 0.5);
    exp + jitter
}

/// A number in [0, 1) that differs between calls and processes; good enough
/// to keep several workers from retrying in lockstep.
fn jitter_fraction() -> f64 {
    (crate::random::u64() % 10_000) as f64 / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Scripted(Mutex<Vec<Result<Embeddings, ProviderError>>>);

    fn scripted(replies: Vec<Result<Embeddings, ProviderError>>) -> Requester {
        Requester::new(Arc::new(Scripted(Mutex::new(replies))))
    }

    fn input() -> Arc<Vec<String>> {
        Arc::new(vec!["a".to_string()])
    }

    /// A request with a pacer of its own: a 429 in one test must not hold another.
    fn req(inputs: &Arc<Vec<String>>) -> Request<'_> {
        Request {
            inputs,
            tokens: 1,
            pacer: Box::leak(Box::new(Pacer::new(None, None))),
            send_by: None,
        }
    }

    impl Embedder for Scripted {
        fn embed(&self, _inputs: &[&str]) -> Result<Embeddings, ProviderError> {
            self.0.lock().unwrap().remove(0)
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            ..RetryPolicy::default()
        }
    }

    fn ok() -> Result<Embeddings, ProviderError> {
        Ok(Embeddings {
            vectors: vec![vec![1.0]],
            tokens: Some(1),
            ..Embeddings::default()
        })
    }

    #[test]
    fn retries_rate_limits_and_transient_faults_then_succeeds() {
        let p = scripted(vec![
            Err(ProviderError::RateLimited {
                retry_after: Some(Duration::from_millis(1)),
                message: "429".into(),
            }),
            Err(ProviderError::Transient {
                retry_after: None,
                message: "503".into(),
            }),
            ok(),
        ]);
        let mut stats = RequestStats::default();
        let r = embed_with_retry(
            &p,
            req(&input()),
            &fast(),
            None,
            &AtomicBool::new(false),
            &mut stats,
        );
        assert!(r.is_ok());
        assert_eq!(
            (stats.requests, stats.retries, stats.rate_limited),
            (3, 2, 1)
        );
    }

    #[test]
    fn fatal_and_rejected_are_not_retried() {
        for e in [
            ProviderError::Fatal {
                message: "401".into(),
            },
            ProviderError::Rejected {
                status: 400,
                message: "bad".into(),
            },
        ] {
            let p = scripted(vec![Err(e.clone()), ok()]);
            let mut stats = RequestStats::default();
            let r = embed_with_retry(
                &p,
                req(&input()),
                &fast(),
                None,
                &AtomicBool::new(false),
                &mut stats,
            );
            assert!(matches!(r, Err(RetryOutcome::Failed(got)) if got == e));
            assert_eq!(stats.requests, 1);
        }
    }

    #[test]
    fn transient_faults_give_up_after_the_retry_limit() {
        let errs = (0..10)
            .map(|_| {
                Err(ProviderError::Transient {
                    retry_after: None,
                    message: "502".into(),
                })
            })
            .collect();
        let p = scripted(errs);
        let mut stats = RequestStats::default();
        let r = embed_with_retry(
            &p,
            req(&input()),
            &fast(),
            None,
            &AtomicBool::new(false),
            &mut stats,
        );
        assert!(matches!(
            r,
            Err(RetryOutcome::Failed(ProviderError::Transient { .. }))
        ));
        assert_eq!(stats.requests, 5);
    }

    #[test]
    fn a_wait_past_the_deadline_returns_out_of_time() {
        let p = scripted(vec![Err(ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
            message: "429".into(),
        })]);
        let policy = RetryPolicy::default();
        let deadline = Some(Instant::now() + Duration::from_secs(1));
        let mut stats = RequestStats::default();
        let r = embed_with_retry(
            &p,
            req(&input()),
            &policy,
            deadline,
            &AtomicBool::new(false),
            &mut stats,
        );
        assert!(matches!(r, Err(RetryOutcome::OutOfTime(_))));
    }
}
