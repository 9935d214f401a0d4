//! Token counts: what a text costs and whether it fits.
//!
//! The OpenAI embedding models (directly or through OpenRouter) use the
//! `cl100k_base` encoding, which `tiktoken-rs` ships inside the crate, so
//! their counts are exact. Other models get a safe estimate (one token per
//! four bytes, rounded up) and no length limit of autoembed's own: their
//! server's rejection of a too-long input is handled like any rejected row.
//!
//! The local model counts with its own WordPiece tokenizer, `[CLS]` and
//! `[SEP]` included, and cuts inputs at its `max_seq_length` (256).
//!
//! Counting costs CPU, so callers count only where it can matter: a token is
//! at least one byte, so a text of at most N bytes has at most N tokens
//! (N + 2 with the local model's two special tokens).

use crate::models::{known_model, ProviderKind};
use std::sync::{Arc, OnceLock};
use tiktoken_rs::CoreBPE;

/// The encoding, loaded on first use: it takes tens of milliseconds and
/// megabytes that a run which counts nothing (the usual cron tick) never pays.
fn cl100k() -> &'static CoreBPE {
    tiktoken_rs::cl100k_base_singleton()
}

/// The most tokens one input may have (OpenAI's embedding models).
pub const MAX_INPUT_TOKENS: usize = 8192;
/// The most tokens one request may carry in all (OpenAI).
pub const MAX_REQUEST_TOKENS: usize = 300_000;

/// A model's own tokenizer (the local model's WordPiece), as counting needs it.
pub trait ModelTokenizer: Send + Sync {
    /// Tokens of `text`, special tokens included, before any cut.
    fn count(&self, text: &str) -> usize;
    /// The most tokens the model reads; it cuts longer inputs itself.
    fn max_tokens(&self) -> usize;
    /// The text to send for a `text` over the limit, or `None` when no cut is needed.
    fn truncate(&self, text: &str) -> Option<String>;
}

#[derive(Clone)]
pub enum Counter {
    /// `cl100k_base`, as OpenAI counts.
    Exact,
    /// One token per four bytes, rounded up.
    Estimate,
    /// The model's own tokenizer (the local model).
    #[cfg_attr(not(feature = "local"), allow(dead_code))]
    Model(Arc<dyn ModelTokenizer>),
}

impl Counter {
    pub fn for_model(model: &str, kind: ProviderKind) -> Counter {
        match known_model(model) {
            Some(m) if m.cl100k && kind != ProviderKind::Local => Counter::Exact,
            _ => Counter::Estimate,
        }
    }

    /// Whether counts are what the provider will bill (or report).
    pub fn is_exact(&self) -> bool {
        !matches!(self, Counter::Estimate)
    }

    /// Tokens of `text` as sent: for the local model, at most its limit,
    /// since it cuts longer inputs itself.
    pub fn count(&self, text: &str) -> usize {
        match self {
            Counter::Exact => cl100k().encode_ordinary(text).len(),
            Counter::Estimate => text.len().div_ceil(4).max(1),
            Counter::Model(wp) => wp.count(text).min(wp.max_tokens()),
        }
    }

    /// Tokens of `text` before any cut (what sizes a chunk): for the local
    /// model, its two special tokens included.
    pub fn tokens(&self, text: &str) -> usize {
        match self {
            Counter::Model(wp) => wp.count(text),
            _ => self.count(text),
        }
    }

    /// Where each token of `text` ends, in bytes, from one encoding of it:
    /// for `cl100k_base` only (other counters size a slice by counting it).
    pub fn token_ends(&self, text: &str) -> Option<Vec<usize>> {
        if !matches!(self, Counter::Exact) {
            return None;
        }
        // Each token's length in bytes, looked up once for the whole vocabulary.
        // (cl100k_base has 100,277 tokens, its special ones included.)
        static LENGTHS: OnceLock<Vec<u16>> = OnceLock::new();
        let lengths = LENGTHS.get_or_init(|| {
            let bpe = cl100k();
            (0..100_277)
                .map(|t| bpe.decode_bytes(&[t]).map_or(0, |b| b.len() as u16))
                .collect()
        });
        let mut end = 0;
        cl100k()
            .encode_ordinary(text)
            .into_iter()
            .map(|t| {
                end += usize::from(*lengths.get(t as usize)?);
                Some(end)
            })
            .collect()
    }

    /// The input limit autoembed enforces, when it knows one.
    pub fn max_input(&self) -> Option<usize> {
        match self {
            Counter::Exact => Some(MAX_INPUT_TOKENS),
            Counter::Estimate => None,
            Counter::Model(wp) => Some(wp.max_tokens()),
        }
    }

    /// Whether the provider limits a request to [`MAX_REQUEST_TOKENS`].
    pub fn limits_requests(&self) -> bool {
        matches!(self, Counter::Exact)
    }

    /// Tokens a text of `bytes` bytes can have at most.
    fn at_most(&self, bytes: usize) -> usize {
        match self {
            Counter::Model(_) => bytes + 2,
            _ => bytes,
        }
    }

    /// `text` cut to at most `max` tokens, or `None` when it already fits.
    pub fn truncate(&self, text: &str, max: usize) -> Option<String> {
        if self.at_most(text.len()) <= max {
            return None;
        }
        if let Counter::Model(wp) = self {
            return wp.truncate(text);
        }
        if !matches!(self, Counter::Exact) {
            return None;
        }
        let bpe = cl100k();
        let tokens = bpe.encode_ordinary(text);
        if tokens.len() <= max {
            return None;
        }
        // A cut can fall inside a character's bytes; step back until it doesn't.
        (0..8).map(|back| max.saturating_sub(back)).find_map(|n| {
            let bytes = bpe.decode_bytes(&tokens[..n]).ok()?;
            String::from_utf8(bytes).ok()
        })
    }

    /// Tokens of `text`, counted only when the byte length says it could
    /// exceed `limit`; otherwise `None` (it fits).
    pub fn over(&self, text: &str, limit: usize) -> Option<usize> {
        if self.at_most(text.len()) <= limit {
            return None;
        }
        Some(self.tokens(text)).filter(|n| *n > limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cl100k_exactly_and_truncates_on_a_character_boundary() {
        let c = Counter::for_model("text-embedding-3-small", ProviderKind::OpenAi);
        assert_eq!(c.count("hello world"), 2);
        let long = "é ".repeat(9000);
        let cut = c.truncate(&long, MAX_INPUT_TOKENS).expect("too long");
        assert!(c.count(&cut) <= MAX_INPUT_TOKENS);
        assert!(long.starts_with(&cut));
        assert!(c.truncate("short", MAX_INPUT_TOKENS).is_none());
        assert!(matches!(
            Counter::for_model("nomic-embed-text", ProviderKind::Compatible),
            Counter::Estimate
        ));
    }
}
