//! Layer normalisation, `(x - mean) / √(var + eps) · weight + bias` for each
//! token's row, in place on every core, with the residual addition before
//! it fused in. Candle's layer norm zeroed its output on one core and
//! summed each row in one chain of scalar additions; here a row is summed
//! in lanes ([`sum_of`]) and the loops are compiled for AVX2 too.

use super::cpu::{avx2_fma, sum_of, PAR_CHUNK};
use candle_core::{CpuStorage, Layout, Tensor};
use rayon::prelude::*;

pub(super) struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    pub(super) fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Norm, String> {
        let e = |e: candle_core::Error| e.to_string();
        Ok(Norm {
            weight: weight.to_vec1().map_err(e)?,
            bias: bias.to_vec1().map_err(e)?,
            eps: eps as f32,
        })
    }

    /// `x = norm(x)`, in place.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<()> {
        x.inplace_op1(self)
    }

    /// `x = norm(x + residual)`, in place.
    pub(super) fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
    ) -> candle_core::Result<()> {
        x.inplace_op2(residual, self)
    }

    fn on_every_core(&self, x: &mut [f32], residual: Option<&[f32]>) {
        let h = self.weight.len();
        let rows = (PAR_CHUNK / h).max(1) * h;
        let fast = avx2_fma();
        let task = |(x, r): (&mut [f32], Option<&[f32]>)| {
            if fast {
                // SAFETY: avx2_fma() checked that the CPU has AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    self.rows_avx2(x, r)
                }
            } else {
                self.rows(x, r)
            }
        };
        match residual {
            Some(r) => x
                .par_chunks_mut(rows)
                .zip(r.par_chunks(rows))
                .for_each(|(x, r)| task((x, Some(r)))),
            None => x.par_chunks_mut(rows).for_each(|x| task((x, None))),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(&self, x: &mut [f32], residual: Option<&[f32]>) {
        self.rows(x, residual)
    }

    #[inline(always)]
    fn rows(&self, x: &mut [f32], residual: Option<&[f32]>) {
        let h = self.weight.len();
        for (i, x) in x.chunks_exact_mut(h).enumerate() {
            if let Some(r) = residual {
                for (x, r) in x.iter_mut().zip(&r[i * h..(i + 1) * h]) {
                    *x += r;
                }
            }
            let n = h as f32;
            let mean = sum_of(x, |x| x) / n;
            let var = sum_of(x, |x| (x - mean) * (x - mean)) / n;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((x, w), b) in x.iter_mut().zip(&self.weight).zip(&self.bias) {
                *x = (*x - mean) * inv * w + b;
            }
        }
    }

    /// The contiguous f32 rows of `storage`, whole rows of this norm's width.
    fn rows_of<'s>(&self, storage: &'s mut CpuStorage, layout: &Layout) -> Option<&'s mut [f32]> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) if (b - a) % self.weight.len() == 0 => {
                Some(&mut v[a..b])
            }
            _ => None,
        }
    }
}

impl candle_core::InplaceOp1 for Norm {
    fn name(&self) -> &'static str {
        "norm"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let h = self.weight.len();
        match self.rows_of(storage, layout) {
            Some(x) => {
                self.on_every_core(x, None);
                Ok(())
            }
            None => candle_core::bail!("norm: expected contiguous f32 rows of {h}"),
        }
    }
}

impl candle_core::InplaceOp2 for Norm {
    fn name(&self) -> &'static str {
        "add-and-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let h = self.weight.len();
        let residual = match (s2, l2.contiguous_offsets()) {
            (CpuStorage::F32(r), Some((c, d))) => &r[c..d],
            _ => candle_core::bail!("add-and-norm: expected a contiguous f32 residual"),
        };
        match self.rows_of(s1, l1) {
            Some(x) if x.len() == residual.len() => {
                self.on_every_core(x, Some(residual));
                Ok(())
            }
            _ => candle_core::bail!(
                "add-and-norm: expected contiguous f32 rows of {h}, as many as the residual's"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_candles_layer_norm_after_the_residual() {
        use candle_core::{Device, Module};
        // Rows that are not whole lanes of eight.
        let (n, h) = (37, 27);
        let values = |k: usize| -> Vec<f32> {
            (0..n * h)
                .map(|i| ((i * 7919 + k * 104_729) % 1000) as f32 / 250.0 - 2.0)
                .collect()
        };
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(1)[..h].to_vec(), h, &dev).unwrap();
        let b = Tensor::from_vec(values(2)[..h].to_vec(), h, &dev).unwrap();
        let x = Tensor::from_vec(values(3), (n, h), &dev).unwrap();
        let r = Tensor::from_vec(values(4), (n, h), &dev).unwrap();
        let candle = candle_nn::LayerNorm::new(w.clone(), b.clone(), 1e-12);
        let want: Vec<f32> = candle
            .forward(&(&x + &r).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let norm = Norm::new(w, b, 1e-12).unwrap();
        let got = x.copy().unwrap();
        norm.forward_residual(&got, &r).unwrap();
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
        let alone = x.copy().unwrap();
        norm.forward(&alone).unwrap();
        let want: Vec<f32> = candle
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
    }
}
