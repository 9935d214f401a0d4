//! The vectors must fit the column: every reply's size is checked against
//! it (or the model's known size), and a model whose very first reply does
//! not fit is a configuration error, before anything is written.

use crate::checks::dimension_mismatch;
use crate::config::Config;
use crate::db::quote_ident;
use crate::db::target::Target;
use crate::provider::{Embedder, Embeddings, ProviderError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Checks every reply's vector size against the column (or the model).
/// A wrong size is a bad reply, retried like any other; but when the model
/// is unknown and its very first reply doesn't fit the column, it is a
/// configuration error (exit 2), and nothing has been written yet.
pub struct DimensionGuard {
    inner: Arc<dyn Embedder>,
    model: String,
    column_label: String,
    column: Option<u32>,
    known: Option<u32>,
    learned: Mutex<Option<usize>>,
    any_good: AtomicBool,
}

impl DimensionGuard {
    pub fn new(cfg: &Config, target: &Target, inner: Arc<dyn Embedder>) -> Self {
        DimensionGuard {
            inner,
            model: cfg.provider.model.clone(),
            column_label: quote_ident(&target.embedding_column),
            column: target.dimensions,
            known: cfg.provider.expected_dimensions(),
            learned: Mutex::new(None),
            any_good: AtomicBool::new(false),
        }
    }
}

impl Embedder for DimensionGuard {
    fn embed(&self, inputs: &[&str]) -> std::result::Result<Embeddings, ProviderError> {
        let reply = self.inner.embed(inputs)?;
        let Some(got) = reply.vectors.first().map(Vec::len) else {
            return Ok(reply);
        };
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        let expected = self.column.or(self.known).map(|d| d as usize).or(*learned);
        match expected {
            Some(want) if want != got => {
                if let (Some(column), None, false) = (
                    self.column,
                    self.known,
                    self.any_good.load(Ordering::SeqCst),
                ) {
                    return Err(ProviderError::Misconfigured {
                        message: dimension_mismatch(
                            &self.model,
                            got as u32,
                            &self.column_label,
                            column,
                        ),
                    });
                }
                Err(ProviderError::Transient {
                    retry_after: None,
                    message: format!(
                        "unusable reply: vectors of {got} dimensions, expected {want}"
                    ),
                })
            }
            _ => {
                *learned = Some(got);
                self.any_good.store(true, Ordering::SeqCst);
                Ok(reply)
            }
        }
    }
}
