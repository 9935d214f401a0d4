//! Sending a batch's texts to the provider: one request, split in halves
//! when the provider rejects it (until the rejected rows are found), when it
//! keeps failing (until the one input the provider fails on is found) or
//! when it would carry more tokens than the provider takes; and before each
//! request, a check that the batch's rows are still held.

use super::plan::Item;
use crate::error::Error;
use crate::pacing::Pacer;
use crate::provider::{
    self, Embeddings, ProviderError, RequestStats, Requester, RetryOutcome, RetryPolicy,
};
use crate::tokens::{Counter, MAX_REQUEST_TOKENS};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Why a batch could not send all its texts.
#[derive(Debug)]
pub enum Halt {
    Error(Error),
    /// A wait (a retry, a rate limit) would pass `--max-seconds`.
    OutOfTime(ProviderError),
    /// SIGINT or SIGTERM.
    Stopped,
}

/// The claims of the rows being sent: when they must be confirmed, and
/// which rows are still held.
pub trait Hold {
    /// After this instant a request might outlive the claims: confirm first.
    fn send_by(&self) -> Instant;
    /// Extend the claims on `rows` (batch indexes); the rows still held.
    fn confirm(&mut self, rows: &[usize]) -> Result<Vec<usize>, Error>;
}

/// One worker's way to the provider.
pub struct Sender<'a> {
    pub counter: &'a Counter,
    pub pacer: &'a Pacer,
    pub requester: Requester,
    pub policy: RetryPolicy,
    pub deadline: Option<Instant>,
    pub stop: &'a AtomicBool,
    pub stats: RequestStats,
    /// Tokens the provider reported.
    pub tokens: u64,
}

/// How a send failed, for the caller to judge.
enum Failure {
    Halt(Halt),
    /// The request kept failing with server errors or unusable replies.
    Transient(ProviderError),
}

impl From<Halt> for Failure {
    fn from(h: Halt) -> Failure {
        Failure::Halt(h)
    }
}

/// Retries for each half while a batch that keeps failing is searched for
/// the one input the provider fails on: one, so the search is quick.
const ISOLATING_RETRIES: u32 = 1;

impl Sender<'_> {
    /// Embed `items`, pushing vectors and rejected rows by batch index.
    ///
    /// - A rejected request (400, 413, 422) is split in halves until the
    ///   rejected rows are found. When a single row is rejected in the very
    ///   words that rejected the whole request, one harmless input is sent
    ///   alone: if it is rejected too, the request is what the provider
    ///   refuses (a model, `--dimensions`, an option), not the inputs: the
    ///   run stops (exit 2) and no row is marked failed.
    /// - A request that keeps failing with server errors or unusable replies
    ///   (one input that crashes the provider) is split the same way, each
    ///   half with one retry: when one half passes and the other fails, the
    ///   search goes on in the failing half, down to the one row, which is
    ///   recorded as failed. When both halves fail, the provider is down:
    ///   the run stops (exit 3) and the rows stay pending.
    pub fn embed(
        &mut self,
        items: &[Item],
        hold: &mut dyn Hold,
        vectors: &mut Vec<(usize, Vec<f32>)>,
        rejected: &mut Vec<(usize, String)>,
    ) -> Result<(), Halt> {
        let mut out = Sending {
            hold,
            vectors,
            rejected,
            search: Search::default(),
        };
        let policy = self.policy.clone();
        match self.send(items, &mut out, &policy) {
            Ok(()) => Ok(()),
            Err(Failure::Halt(h)) => Err(h),
            Err(Failure::Transient(e)) if items.len() > 1 => match self.isolate(items, &mut out) {
                Ok(()) => Ok(()),
                Err(Failure::Halt(h)) => Err(h),
                Err(Failure::Transient(_)) => Err(self.gave_up(&e)),
            },
            Err(Failure::Transient(e)) => Err(self.gave_up(&e)),
        }
    }

    fn gave_up(&self, e: &ProviderError) -> Halt {
        Halt::Error(Error::Unavailable(format!(
            "gave up after {} retries, rows stay pending: {e}",
            self.policy.transient_retries
        )))
    }

    /// `items` failed transiently: find the one input the provider fails on.
    fn isolate(&mut self, items: &[Item], out: &mut Sending<'_>) -> Result<(), Failure> {
        let quick = RetryPolicy {
            transient_retries: ISOLATING_RETRIES,
            ..self.policy.clone()
        };
        let (left, right) = items.split_at(items.len() / 2);
        let first = self.send(left, out, &quick);
        if let Err(Failure::Halt(h)) = first {
            return Err(Failure::Halt(h));
        }
        let second = self.send(right, out, &quick);
        let (failing, e) = match (first, second) {
            (_, Err(Failure::Halt(h))) => return Err(Failure::Halt(h)),
            (Ok(()), Ok(())) => return Ok(()),
            (Err(Failure::Transient(e)), Err(Failure::Transient(_))) => {
                return Err(Failure::Transient(e))
            }
            (Err(Failure::Transient(e)), Ok(())) => (left, e),
            (Ok(()), Err(Failure::Transient(e))) => (right, e),
            (Err(Failure::Halt(h)), _) => return Err(Failure::Halt(h)),
        };
        match failing {
            [one] => {
                crate::warn!(
                    "the provider fails on row {} every time; recording it as failed",
                    one.row
                );
                out.rejected.push((
                    one.row,
                    format!("the provider fails on this input every time: {e}"),
                ));
                Ok(())
            }
            _ => self.isolate(failing, out),
        }
    }

    fn send(
        &mut self,
        items: &[Item],
        out: &mut Sending<'_>,
        policy: &RetryPolicy,
    ) -> Result<(), Failure> {
        if items.is_empty() {
            return Ok(());
        }
        let bytes: usize = items.iter().map(|i| i.text.len()).sum();
        let over_limit = bytes > MAX_REQUEST_TOKENS && self.counter.limits_requests();
        let tokens: usize = if over_limit || self.pacer.paces_tokens() {
            items
                .iter()
                .map(|i| i.tokens.unwrap_or_else(|| self.counter.count(&i.text)))
                .sum()
        } else {
            0
        };
        // No request over the provider's token limit: split before sending.
        if tokens > MAX_REQUEST_TOKENS && self.counter.limits_requests() && items.len() > 1 {
            return self.halves(items, out, policy);
        }
        let mut items = items.to_vec();
        loop {
            if Instant::now() >= out.hold.send_by() {
                let rows: Vec<usize> = items.iter().map(|i| i.row).collect();
                let held = out.hold.confirm(&rows).map_err(Halt::Error)?;
                if held.len() < items.len() {
                    crate::warn!(
                        "{} rows were taken over by another run while this one waited; not sending them",
                        items.len() - held.len()
                    );
                    items.retain(|i| held.contains(&i.row));
                }
                if items.is_empty() {
                    return Ok(());
                }
            }
            let inputs = Arc::new(items.iter().map(|i| i.text.clone()).collect::<Vec<_>>());
            let reply = provider::embed_with_retry(
                &self.requester,
                provider::Request {
                    inputs: &inputs,
                    tokens: tokens as u64,
                    pacer: self.pacer,
                    send_by: Some(out.hold.send_by()),
                },
                policy,
                self.deadline,
                self.stop,
                &mut self.stats,
            );
            return match reply {
                Ok(Embeddings {
                    vectors: vs,
                    tokens,
                    ..
                }) => {
                    self.tokens += tokens.unwrap_or(0);
                    out.vectors
                        .extend(vs.into_iter().zip(&items).map(|(v, i)| (i.row, v)));
                    Ok(())
                }
                Err(RetryOutcome::Unconfirmed) => continue,
                Err(RetryOutcome::Failed(ProviderError::Rejected { status, message }))
                    if items.len() > 1 =>
                {
                    crate::debug!(
                        "request of {} rows rejected ({status}: {message}); splitting it",
                        items.len()
                    );
                    out.search
                        .whole
                        .get_or_insert(format!("{status}: {message}"));
                    self.halves(&items, out, policy)
                }
                Err(RetryOutcome::Failed(ProviderError::Rejected { status, message })) => {
                    let why = format!("{status}: {message}");
                    if out.search.whole.as_ref() == Some(&why) && !out.search.probed {
                        out.search.probed = true;
                        if self.refuses_any_input(&why, policy) {
                            out.rejected.retain(|(_, e)| *e != why);
                            return Err(Failure::Halt(Halt::Error(Error::Config(format!(
                                "the provider refuses the request itself, whatever the input ({why}): \
                                 check --model (AUTOEMBED_MODEL), --dimensions (AUTOEMBED_DIMENSIONS) \
                                 and --api-base (AUTOEMBED_API_BASE); no row was marked failed"
                            )))));
                        }
                    }
                    out.rejected.push((items[0].row, why));
                    Ok(())
                }
                Err(RetryOutcome::Failed(ProviderError::Misconfigured { message })) => {
                    Err(Halt::Error(Error::Config(message)).into())
                }
                Err(RetryOutcome::Failed(e @ ProviderError::Fatal { .. })) => {
                    Err(Halt::Error(Error::Provider(e.to_string())).into())
                }
                Err(RetryOutcome::Failed(e @ ProviderError::Transient { .. })) => {
                    Err(Failure::Transient(e))
                }
                Err(RetryOutcome::Failed(e)) => Err(Halt::Error(Error::Unavailable(format!(
                    "gave up after {} retries, rows stay pending: {e}",
                    policy.rate_limit_retries
                )))
                .into()),
                Err(RetryOutcome::OutOfTime(e)) => Err(Halt::OutOfTime(e).into()),
                Err(RetryOutcome::Stopped) => Err(Halt::Stopped.into()),
            };
        }
    }

    /// Whether the provider rejects a harmless input ([`PROBE`]) in the
    /// words `why` too: then it refuses the request, not the inputs.
    fn refuses_any_input(&mut self, why: &str, policy: &RetryPolicy) -> bool {
        let inputs = Arc::new(vec![PROBE.to_string()]);
        let reply = provider::embed_with_retry(
            &self.requester,
            provider::Request {
                inputs: &inputs,
                tokens: 1,
                pacer: self.pacer,
                send_by: None,
            },
            policy,
            self.deadline,
            self.stop,
            &mut self.stats,
        );
        matches!(reply, Err(RetryOutcome::Failed(ProviderError::Rejected { status, message }))
            if format!("{status}: {message}") == why)
    }

    fn halves(
        &mut self,
        items: &[Item],
        out: &mut Sending<'_>,
        policy: &RetryPolicy,
    ) -> Result<(), Failure> {
        let mid = items.len() / 2;
        self.send(&items[..mid], out, policy)?;
        self.send(&items[mid..], out, policy)
    }
}

/// What one batch's requests write to, carried through its splits.
struct Sending<'s> {
    hold: &'s mut dyn Hold,
    /// Vectors by batch index.
    vectors: &'s mut Vec<(usize, Vec<f32>)>,
    /// Rejected rows by batch index, and why.
    rejected: &'s mut Vec<(usize, String)>,
    search: Search,
}

/// What the splitting of one batch has seen.
#[derive(Default)]
struct Search {
    /// The words that rejected the first request of several rows.
    whole: Option<String>,
    /// Whether the provider was asked to embed [`PROBE`].
    probed: bool,
}

/// The input sent alone when a single row is rejected in the words that
/// rejected its whole batch: if this is rejected too, the request is.
const PROBE: &str = "autoembed";
