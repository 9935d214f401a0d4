//! The BERT forward pass, on the CPU with candle: the model's shape, its
//! weights taken by name (the dense layers' in fp32 or int8), and the
//! kernels candle would run on one core.

use super::attention::Attention;
use super::dense::Dense;
use super::norm::Norm;
use crate::models::Precision;
use candle_core::{Device, Module, Tensor};
use candle_nn::Embedding;
use std::collections::HashMap;

/// The sizes in `config.json` that the forward pass needs.
pub(super) struct Shape {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    eps: f64,
}

impl Shape {
    pub(super) fn from_config(c: &serde_json::Value) -> Result<Shape, String> {
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

/// The tensors of model.safetensors, taken by name with their shape checked.
struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Some exports prefix every name with "bert.".
    prefix: &'static str,
    eps: f64,
    precision: Precision,
}

impl Weights {
    fn new(tensors: HashMap<String, Tensor>, eps: f64, precision: Precision) -> Weights {
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        Weights {
            tensors,
            prefix,
            eps,
            precision,
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

    fn norm(&mut self, name: &str, size: usize) -> Result<Norm, String> {
        Norm::new(
            self.take(&format!("{name}.weight"), &[size])?,
            self.take(&format!("{name}.bias"), &[size])?,
            self.eps,
        )
    }

    fn dense(&mut self, name: &str, out: usize, inp: usize) -> Result<Dense, String> {
        Dense::new(
            self.take(&format!("{name}.weight"), &[out, inp])?,
            self.take(&format!("{name}.bias"), &[out])?,
            self.precision,
        )
    }
}

struct Layer {
    /// Query, key and value in one matrix: one matmul instead of three.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    out_norm: Norm,
}

pub(super) struct Bert {
    words: Embedding,
    positions: Embedding,
    token_type: Tensor,
    norm: Norm,
    layers: Vec<Layer>,
    pub(super) hidden: usize,
    heads: usize,
}

impl Bert {
    pub(super) fn new(
        shape: &Shape,
        weights: HashMap<String, Tensor>,
        precision: Precision,
    ) -> Result<Bert, String> {
        let h = shape.hidden;
        let mut w = Weights::new(weights, shape.eps, precision);
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
                qkv: Dense::new(weight, bias, precision)?,
                attn_out: w.dense(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                up: w.dense(&format!("{p}.intermediate.dense"), inner, h)?,
                down: w.dense(&format!("{p}.output.dense"), h, inner)?,
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
    pub(super) fn forward(&self, seqs: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let dev = Device::Cpu;
        let h = self.hidden;
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let n: usize = lens.iter().sum();
        let ids = Tensor::from_vec(seqs.concat(), n, &dev)?;
        let pos: Vec<u32> = lens.iter().flat_map(|&t| 0..t as u32).collect();
        let pos = Tensor::from_vec(pos, n, &dev)?;
        let mut x = (self.words.forward(&ids)? + self.positions.forward(&pos)?)?
            .broadcast_add(&self.token_type)?;
        self.norm.forward(&x)?;
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
            let ctx = qkv.apply_op1_no_bwd(&Attention {
                spans: &spans,
                heads: self.heads,
                hidden: h,
            })?;
            let attended = l.attn_out.forward(&ctx)?;
            l.attn_norm.forward_residual(&attended, &x)?;
            x = attended;
            let up = l.up.forward_gelu(&x)?;
            let down = l.down.forward(&up)?;
            l.out_norm.forward_residual(&down, &x)?;
            x = down;
        }
        let mut out = Vec::with_capacity(spans.len());
        for &(at, t) in &spans {
            let mut v: Vec<f32> = x.narrow(0, at, t)?.mean(0)?.to_vec1()?;
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|a| *a /= norm);
            out.push(v);
        }
        Ok(out)
    }
}
