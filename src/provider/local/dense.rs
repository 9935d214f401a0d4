//! The model's dense layers, `y = x · Wᵀ + b` (GELU of it for the
//! up-projection), in fp32 (gemm, the matrix kernels candle itself calls)
//! or int8 ([`super::int8`]).
//!
//! fp32 calls gemm directly rather than through candle's matmul: the
//! output starts as the bias, written on every core, and gemm adds the
//! product to it, where candle zeroed the output on one core and the bias
//! took another pass.

use super::gelu::gelu_on_every_core;
use super::int8::Int8Dense;
use crate::models::Precision;
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

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
            Precision::Fp32 => Dense::Fp32(Fp32Dense {
                inp,
                out,
                weight,
                bias,
            }),
            Precision::Int8 => Dense::Int8(Int8Dense::new(&weight, out, inp, &bias)),
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1_no_bwd(&Apply {
            dense: self,
            gelu: false,
        })
    }

    /// GELU of the layer's output: in int8, block by block as it is
    /// computed (while in cache); in fp32, after gemm, on every core.
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
                    Dense::Fp32(d) => {
                        let mut y = d.forward_slice(x);
                        if self.gelu {
                            gelu_on_every_core(&mut y);
                        }
                        y
                    }
                    Dense::Int8(d) => d.forward_slice(x, self.gelu),
                };
                Ok((CpuStorage::F32(y), Shape::from(((b - a) / inp, out))))
            }
            _ => candle_core::bail!("dense: expected contiguous f32 rows of {inp}"),
        }
    }
}

pub(super) struct Fp32Dense {
    inp: usize,
    out: usize,
    /// `(out, in)` row-major: read as Wᵀ through its strides.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Fp32Dense {
    fn forward_slice(&self, x: &[f32]) -> Vec<f32> {
        let (n, inp, out) = (x.len() / self.inp, self.inp, self.out);
        let mut y: Vec<f32> = Vec::with_capacity(n * out);
        y.spare_capacity_mut()[..n * out]
            .par_chunks_mut(out)
            .for_each(|row| {
                for (y, b) in row.iter_mut().zip(&self.bias) {
                    y.write(*b);
                }
            });
        // SAFETY: every row was written with the bias (`out` = its length).
        unsafe { y.set_len(n * out) };
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: x is n × inp (row stride inp), the weight out × inp read
        // as its transpose (column stride inp, row stride 1), y n × out and
        // initialised (read_dst): every index gemm forms is inside them.
        unsafe {
            gemm::gemm(
                n,
                out,
                inp,
                y.as_mut_ptr(),
                1,
                out as isize,
                true,
                x.as_ptr(),
                1,
                inp as isize,
                self.weight.as_ptr(),
                inp as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        y
    }
}
