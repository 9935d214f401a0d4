//! The int8 dense layers of `--local-precision int8`: each weight matrix
//! quantised per output channel once, at load; each token's activations
//! quantised as they arrive; the products summed exactly in i32, by
//! AVX-512 VNNI or AVX2 where the CPU has them and by a portable loop
//! elsewhere (the same integers on every CPU, so the same vectors).
//!
//! The ranges come from AVX2's u8 × i8 multiply-add (`vpmaddubsw`), which
//! adds two products in a saturating i16: activations in 0..=127
//! (asymmetric, one scale and zero point per token) and weights in
//! -127..=127 (symmetric, one scale per output channel) keep
//! 2 · 127 · 127 < 2^15, so no sum saturates. Measured on
//! `tests/data/minilm-reference.json`, that split of the bits is what keeps
//! every vector within cosine 0.99 of fp32's: 7-bit weights with 8-bit
//! activations lose the long repetitive text (0.980: a weight's error
//! repeats in every token, so pooling does not average it out), and
//! per-token scales keep one token's outliers from blurring the others (one
//! scale per matrix, as dynamic quantisation usually does). Each channel's
//! scale is the one, among its largest weight and a few clipped ranges,
//! that leaves the least squared error.

use super::cpu::{avx2_fma, reduce};
use super::panel::{self, NR};
use rayon::prelude::*;
use std::mem::MaybeUninit;
/// Tokens of one kernel call: eight accumulators in flight for VNNI's
/// multiply-add, whose latency is five cycles.
const MR: usize = 8;
// The AVX2 kernel takes the rows four at a time.
const _: () = assert!(MR.is_multiple_of(4));
/// The k of one multiply-add: four u8 × i8 products summed into one i32.
const KG: usize = 4;
/// Largest quantised weight (see the module comment).
const W_MAX: f32 = 127.0;
/// Largest quantised activation (7 bits: see the module comment).
const A_MAX: f32 = 127.0;

/// A dense layer `y = x · Wᵀ + b` with W in int8.
pub(super) struct Int8Dense {
    pub(super) inp: usize,
    pub(super) out: usize,
    /// Multiply-add groups along k: `inp` rounded up to [`KG`], over `KG`.
    groups: usize,
    /// Panel after panel of [`NR`] output channels; in a panel, group after
    /// group, each `NR × KG` bytes (channel-major within the group), the
    /// layout the kernel reads with two 32-byte loads.
    packed: Vec<i8>,
    /// Per output channel (padded to whole panels): the weight's scale, the
    /// sum of its quantised weights (to take the activations' zero point
    /// out), its bias.
    scale: Vec<f32>,
    colsum: Vec<i32>,
    bias: Vec<f32>,
    /// The fastest kernel this CPU runs, chosen at load.
    dot: Kernel,
}

impl Int8Dense {
    /// `weight` is `(out, inp)` row-major, as the model stores it.
    pub(super) fn new(weight: &[f32], out: usize, inp: usize, bias: &[f32]) -> Int8Dense {
        let groups = inp.div_ceil(KG);
        let panels = out.div_ceil(NR);
        // Each channel on its own (every core), then packed.
        let channels: Vec<(f32, Vec<i8>)> = weight
            .par_chunks_exact(inp)
            .take(out)
            .map(|row| {
                let s = channel_scale(row);
                (s, row.iter().map(|w| round(w / s) as i8).collect())
            })
            .collect();
        let mut packed = vec![0i8; panels * groups * NR * KG];
        let mut scale = vec![1f32; panels * NR];
        let mut colsum = vec![0i32; panels * NR];
        let mut padded_bias = vec![0f32; panels * NR];
        for (o, (s, q)) in channels.into_iter().enumerate() {
            scale[o] = s;
            padded_bias[o] = bias.get(o).copied().unwrap_or(0.0);
            colsum[o] = q.iter().map(|&q| i32::from(q)).sum();
            let (panel, c) = (o / NR, o % NR);
            for (k, q) in q.into_iter().enumerate() {
                packed[((panel * groups + k / KG) * NR + c) * KG + k % KG] = q;
            }
        }
        Int8Dense {
            inp,
            out,
            groups,
            packed,
            scale,
            colsum,
            bias: padded_bias,
            dot: kernels()[0].1,
        }
    }

    /// `x` (`n × inp`, row-major) times the weights plus the bias: `n × out`;
    /// with `gelu`, GELU of that.
    pub(super) fn forward_slice(&self, x: &[f32], gelu: bool) -> Vec<f32> {
        let (dot, fast) = (self.dot, avx2_fma());
        let task = |x: &[f32], y: &mut [MaybeUninit<f32>]| {
            if fast {
                // SAFETY: avx2_fma() checked that the CPU has AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    self.rows_avx2(x, y, dot, gelu)
                }
            } else {
                self.rows(x, y, dot, gelu)
            }
        };
        // SAFETY: rows() writes every element of its tokens' rows, panel by
        // panel, all `out` columns.
        unsafe { panel::on_every_core(x, self.inp, self.out, MR, task) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(&self, x: &[f32], y: &mut [MaybeUninit<f32>], dot: Kernel, gelu: bool) {
        self.rows(x, y, dot, gelu)
    }

    /// One task: quantise these tokens, then every panel against them.
    #[inline(always)]
    fn rows(&self, x: &[f32], y: &mut [MaybeUninit<f32>], dot: Kernel, gelu: bool) {
        let n = x.len() / self.inp;
        let lda = self.groups * KG;
        let blocks = n.div_ceil(MR);
        let mut qa = vec![0u8; blocks * MR * lda];
        let mut a_scale = vec![0f32; blocks * MR];
        let mut a_zero = vec![0i32; blocks * MR];
        for (i, row) in x.chunks_exact(self.inp).enumerate() {
            let (s, z) = quantise(row, &mut qa[i * lda..i * lda + self.inp]);
            a_scale[i] = s;
            a_zero[i] = z;
        }
        let panel_len = self.groups * NR * KG;
        let mut acc = [[0i32; NR]; MR];
        let mut values = [0f32; NR];
        for (panel, b) in self.packed.chunks_exact(panel_len).enumerate() {
            let c0 = panel * NR;
            let cols = (self.out - c0).min(NR);
            let (colsum, w_scale, bias) = (
                &self.colsum[c0..c0 + NR],
                &self.scale[c0..c0 + NR],
                &self.bias[c0..c0 + NR],
            );
            for block in 0..blocks {
                let a = &qa[block * MR * lda..(block + 1) * MR * lda];
                dot(a, lda, b, self.groups, &mut acc);
                for (r, acc) in acc.iter().enumerate() {
                    let i = block * MR + r;
                    if i >= n {
                        break;
                    }
                    let (zero, a_scale) = (a_zero[i], a_scale[i]);
                    let channels = colsum.iter().zip(w_scale).zip(bias);
                    for ((v, acc), ((colsum, w_scale), bias)) in
                        values.iter_mut().zip(acc).zip(channels)
                    {
                        *v = (acc - zero * colsum) as f32 * (a_scale * w_scale) + bias;
                    }
                    panel::store(&mut values, gelu, &mut y[i * self.out + c0..][..cols]);
                }
            }
        }
    }
}

/// Quantises one token's activations into `q` (0..=127): its scale and
/// zero point, so that `x ≈ (q - zero) · scale`.
#[inline(always)]
fn quantise(row: &[f32], q: &mut [u8]) -> (f32, i32) {
    // Compare-and-select, not f32::min (whose NaN rule keeps it scalar);
    // 0 is in the range, so zero maps to an integer exactly.
    let lo = reduce(row, 0.0, |m, v| if v < m { v } else { m });
    let hi = reduce(row, 0.0, |m, v| if v > m { v } else { m });
    let scale = if hi > lo { (hi - lo) / A_MAX } else { 1.0 };
    let zero = (-lo / scale).round().clamp(0.0, A_MAX);
    let inv = 1.0 / scale;
    for (q, &v) in q.iter_mut().zip(row) {
        // Adding 2^23 rounds a float in 0..=127 into its low mantissa bits:
        // no float-to-int conversion, so the loop vectorises.
        *q = ((v * inv + zero).clamp(0.0, A_MAX) + 8_388_608.0).to_bits() as u8;
    }
    (scale, zero as i32)
}

/// A channel's scale: of its largest weight over [`W_MAX`] and the clipped
/// ranges below it, the one that leaves the least squared error.
fn channel_scale(row: &[f32]) -> f32 {
    let max = row.iter().fold(0f32, |m, w| m.max(w.abs()));
    if max == 0.0 {
        return 1.0;
    }
    let error = |s: f32| -> f32 { row.iter().map(|w| (w - round(w / s) * s).powi(2)).sum() };
    (0..20)
        .map(|i| max / W_MAX * (1.0 - 0.02 * i as f32))
        .map(|s| (error(s), s))
        .fold(
            (f32::INFINITY, 1.0),
            |best, e| if e.0 < best.0 { e } else { best },
        )
        .1
}

/// `x` rounded half away from zero and clamped to ±[`W_MAX`], without a
/// libm call (the loops above stay vectorised).
fn round(x: f32) -> f32 {
    ((x + 0.5f32.copysign(x)) as i32 as f32).clamp(-W_MAX, W_MAX)
}

/// `acc[r][c] = Σ_k a[r][k] · b[c][k]` for [`MR`] rows of `a` (stride `lda`)
/// and one packed panel `b` of `groups` groups.
type Kernel = fn(&[u8], usize, &[i8], usize, &mut [[i32; NR]; MR]);

/// The kernels this CPU runs, fastest first, by name; the portable one last.
fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut found: Vec<(&'static str, Kernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vnni") {
            found.push(("avx512vnni", vnni::dot));
        }
        if has!("avx2") {
            found.push(("avx2", avx2::dot));
        }
    }
    found.push(("portable", dot_portable));
    found
}

/// Panics unless every load of a kernel call stays inside `a` (MR rows of
/// stride `lda`) and `b` (`groups` groups of a panel): the bounds the unsafe
/// kernels rely on.
#[cfg(target_arch = "x86_64")]
fn assert_fits(a: &[u8], lda: usize, b: &[i8], groups: usize) {
    assert!(a.len() >= (MR - 1) * lda + groups * KG && b.len() >= groups * NR * KG);
}

/// The kernel in plain Rust: the reference the SIMD ones are tested against,
/// and what other CPUs run.
fn dot_portable(a: &[u8], lda: usize, b: &[i8], groups: usize, acc: &mut [[i32; NR]; MR]) {
    for (r, acc) in acc.iter_mut().enumerate() {
        let a = &a[r * lda..r * lda + groups * KG];
        *acc = [0; NR];
        for (g, a) in a.chunks_exact(KG).enumerate() {
            let b = &b[g * NR * KG..(g + 1) * NR * KG];
            for (c, b) in b.chunks_exact(KG).enumerate() {
                acc[c] += a
                    .iter()
                    .zip(b)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum::<i32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{assert_fits, KG, MR, NR};
    use std::arch::x86_64::*;

    /// The AVX2 kernel, for CPUs that have it (checked by `kernels()`).
    pub(super) fn dot(a: &[u8], lda: usize, b: &[i8], groups: usize, acc: &mut [[i32; NR]; MR]) {
        assert_fits(a, lda, b, groups);
        // SAFETY: kernels() hands this out only when the CPU has AVX2, and
        // assert_fits() keeps every load inside `a` and `b`.
        unsafe { dot_avx2(a.as_ptr(), lda, b.as_ptr(), groups, acc) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dot_avx2(
        a: *const u8,
        lda: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; NR]; MR],
    ) {
        // Four rows at a time: eight accumulators, the two halves of the
        // panel, and the constant fit AVX2's sixteen registers.
        let ones = _mm256_set1_epi16(1);
        for (four_rows, acc) in acc.chunks_exact_mut(4).enumerate() {
            let a = a.add(four_rows * 4 * lda);
            let mut c = [_mm256_setzero_si256(); 8];
            for g in 0..groups {
                let b0 = _mm256_loadu_si256(b.add(g * NR * KG).cast());
                let b1 = _mm256_loadu_si256(b.add(g * NR * KG + 32).cast());
                for r in 0..4 {
                    let four = a.add(r * lda + g * KG).cast::<i32>().read_unaligned();
                    let av = _mm256_set1_epi32(four);
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                    c[2 * r] = _mm256_add_epi32(c[2 * r], p0);
                    c[2 * r + 1] = _mm256_add_epi32(c[2 * r + 1], p1);
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                _mm256_storeu_si256(acc.as_mut_ptr().cast(), c[2 * r]);
                _mm256_storeu_si256(acc.as_mut_ptr().add(8).cast(), c[2 * r + 1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{assert_fits, KG, MR, NR};
    use std::arch::x86_64::*;

    /// The AVX-512 VNNI kernel: one `vpdpbusd` sums a row's four u8 × i8
    /// products for all [`NR`] channels of a group straight into i32.
    pub(super) fn dot(a: &[u8], lda: usize, b: &[i8], groups: usize, acc: &mut [[i32; NR]; MR]) {
        assert_fits(a, lda, b, groups);
        // SAFETY: kernels() hands this out only when the CPU has AVX-512F
        // and VNNI, and assert_fits() keeps every load inside `a` and `b`.
        unsafe { dot_vnni(a.as_ptr(), lda, b.as_ptr(), groups, acc) }
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot_vnni(
        a: *const u8,
        lda: usize,
        b: *const i8,
        groups: usize,
        acc: &mut [[i32; NR]; MR],
    ) {
        let mut c = [_mm512_setzero_si512(); MR];
        for g in 0..groups {
            let bv = _mm512_loadu_si512(b.add(g * NR * KG).cast());
            for (r, c) in c.iter_mut().enumerate() {
                let four = a.add(r * lda + g * KG).cast::<i32>().read_unaligned();
                *c = _mm512_dpbusd_epi32(*c, _mm512_set1_epi32(four), bv);
            }
        }
        for (acc, c) in acc.iter_mut().zip(c) {
            _mm512_storeu_si512(acc.as_mut_ptr().cast(), c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers that look like a layer's: a few large, most small, both signs.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if i % 97 == 0 {
                    u * 8.0
                } else {
                    u
                }
            })
            .collect()
    }

    #[test]
    fn every_kernel_gives_the_same_integers() {
        let (lda, groups) = (40, 9);
        // The full ranges, the largest pairs included (no i16 saturates).
        let mut a: Vec<u8> = (0..MR * lda).map(|i| (i * 37 % 128) as u8).collect();
        a[..KG].fill(127);
        let mut b: Vec<i8> = (0..groups * NR * KG)
            .map(|i| (i as i32 * 53 % 255 - 127) as i8)
            .collect();
        b[..2 * KG].fill(127);
        let mut want = [[0; NR]; MR];
        dot_portable(&a, lda, &b, groups, &mut want);
        assert_ne!(want, [[0; NR]; MR]);
        for (name, dot) in kernels() {
            let mut got = [[7; NR]; MR];
            dot(&a, lda, &b, groups, &mut got);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn products_stay_close_to_fp32() {
        // Sizes that are not whole panels, groups or kernel calls.
        let (n, inp, out) = (23, 38, 21);
        let (x, w, bias) = (values(n * inp, 1), values(out * inp, 2), values(out, 3));
        let dense = Int8Dense::new(&w, out, inp, &bias);
        let y = dense.forward_slice(&x, false);
        // GELU applied block by block is GELU applied after.
        let mut after = y.clone();
        super::super::gelu::gelu(&mut after);
        let fused = dense.forward_slice(&x, true);
        for (a, f) in after.iter().zip(&fused) {
            assert!((a - f).abs() < 1e-6, "{a} vs {f}");
        }
        assert_eq!(y.len(), n * out);
        for i in 0..n {
            let want: Vec<f32> = (0..out)
                .map(|o| {
                    let dot: f32 = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
                    dot + bias[o]
                })
                .collect();
            let got = &y[i * out..(i + 1) * out];
            let dot: f32 = want.iter().zip(got).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            let cosine = dot / (norm(&want) * norm(got));
            assert!(cosine > 0.999, "row {i}: cosine {cosine}");
        }
    }
}
