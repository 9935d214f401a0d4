//! The model's dense layers, `y = x · Wᵀ + b` (GELU of it for the
//! up-projection), in fp32 ([`super::fp32`]) or int8 ([`super::int8`]), as
//! candle ops: the weights packed at load, the bias and GELU applied to
//! each block of the output while it is in cache (candle's matmul zeroed
//! the output on one core, and the bias and GELU each took another pass).

use super::fp32::Fp32Dense;
use super::int8::Int8Dense;
use crate::models::Precision;
use candle_core::{CpuStorage, Layout, Shape, Tensor};

pub(super) enum Dense {
    Fp32(Fp32Dense),
    Int8(Int8Dense),
}

impl Dense {
    /// `weight` is `(out, in)`, as the model stores it.
    pub(super) fn new(weight: Tensor, bias: Tensor, precision: Precision) -> Result<Dense, String> {
        let e = |e: candle_core::Error| e.to_string();
        let (out, inp) = weight.dims2().map_err(e)?;
        let bias: Vec<f32> = bias.to_vec1().map_err(e)?;
        let weight: Vec<f32> = weight.flatten_all().map_err(e)?.to_vec1().map_err(e)?;
        if bias.len() != out {
            return Err(format!(
                "a dense layer of {out} x {inp} has {} biases",
                bias.len()
            ));
        }
        Ok(match precision {
            Precision::Fp32 => Dense::Fp32(Fp32Dense::new(&weight, out, inp, &bias)),
            Precision::Int8 => Dense::Int8(Int8Dense::new(&weight, out, inp, &bias)),
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1_no_bwd(&Apply {
            dense: self,
            gelu: false,
        })
    }

    /// GELU of the layer's output, block by block as it is computed.
    pub(super) fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1_no_bwd(&Apply {
            dense: self,
            gelu: true,
        })
    }

    /// `(in, out)`.
    fn size(&self) -> (usize, usize) {
        match self {
            Dense::Fp32(d) => (d.inp, d.out),
            Dense::Int8(d) => (d.inp, d.out),
        }
    }
}

/// The layer as a candle op, so it reads the activations where they are.
struct Apply<'a> {
    dense: &'a Dense,
    gelu: bool,
}

impl candle_core::CustomOp1 for Apply<'_> {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (inp, out) = self.dense.size();
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) if (b - a) % inp == 0 => {
                let x = &v[a..b];
                let y = match self.dense {
                    Dense::Fp32(d) => d.forward_slice(x, self.gelu),
                    Dense::Int8(d) => d.forward_slice(x, self.gelu),
                };
                Ok((CpuStorage::F32(y), Shape::from(((b - a) / inp, out))))
            }
            _ => candle_core::bail!("dense: expected contiguous f32 rows of {inp}"),
        }
    }
}
