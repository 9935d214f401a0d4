//! Sending a batch's texts to the provider: one request, split in halves
//! when the provider rejects it (until the rejected rows are found) or when
//! it would carry more tokens than the provider takes; and before each
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

impl Sender<'_> {
    /// Embed `items`, pushing vectors and rejected rows by batch index.
    pub fn embed(
        &mut self,
        items: &[Item],
        hold: &mut dyn Hold,
        vectors: &mut Vec<(usize, Vec<f32>)>,
        rejected: &mut Vec<(usize, String)>,
    ) -> Result<(), Halt> {
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
            return self.halves(items, hold, vectors, rejected);
        }
        let mut items = items.to_vec();
        loop {
            if Instant::now() >= hold.send_by() {
                let rows: Vec<usize> = items.iter().map(|i| i.row).collect();
                let held = hold.confirm(&rows).map_err(Halt::Error)?;
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
                    send_by: Some(hold.send_by()),
                },
                &self.policy,
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
                    vectors.extend(vs.into_iter().zip(&items).map(|(v, i)| (i.row, v)));
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
                    self.halves(&items, hold, vectors, rejected)
                }
                Err(RetryOutcome::Failed(ProviderError::Rejected { status, message })) => {
                    rejected.push((items[0].row, format!("{status}: {message}")));
                    Ok(())
                }
                Err(RetryOutcome::Failed(ProviderError::Misconfigured { message })) => {
                    Err(Halt::Error(Error::Config(message)))
                }
                Err(RetryOutcome::Failed(e @ ProviderError::Fatal { .. })) => {
                    Err(Halt::Error(Error::Provider(e.to_string())))
                }
                Err(RetryOutcome::Failed(e)) => Err(Halt::Error(Error::Provider(format!(
                    "gave up after {} retries, rows stay pending: {e}",
                    self.policy.transient_retries
                )))),
                Err(RetryOutcome::OutOfTime(e)) => Err(Halt::OutOfTime(e)),
                Err(RetryOutcome::Stopped) => Err(Halt::Stopped),
            };
        }
    }

    fn halves(
        &mut self,
        items: &[Item],
        hold: &mut dyn Hold,
        vectors: &mut Vec<(usize, Vec<f32>)>,
        rejected: &mut Vec<(usize, String)>,
    ) -> Result<(), Halt> {
        let mid = items.len() / 2;
        self.embed(&items[..mid], hold, vectors, rejected)?;
        self.embed(&items[mid..], hold, vectors, rejected)
    }
}
