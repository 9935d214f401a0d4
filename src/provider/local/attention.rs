//! Self-attention over a packed batch, in plain loops: for every sequence
//! and head, `softmax(q · kᵀ / √d) · v`, read straight out of the fused
//! query-key-value rows and written straight into the context rows.
//!
//! Why not candle's matmul and softmax: each sequence's attention is a few
//! tiny products (61 × 32 by 32 × 61 for a product description) that cost
//! more in views, copies and dispatch than in arithmetic; done with candle
//! they took a fifth of the local model's time for under 3% of its
//! multiply-adds. The sequences go to every core; the loops are compiled
//! for AVX2 and FMA too, picked at run time.

use super::cpu::{avx2_fma, reduce};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `qkv` holds `n` rows of `[q | k | v]` (each `h` wide, heads side by side);
/// `spans` are the sequences' `(first row, rows)`, all `n` rows; `ctx`
/// (`n × h`, not yet written: every element of it is) gets the
/// attended values, head by head in the same layout as `q`.
pub(super) fn attention(
    qkv: &[f32],
    spans: &[(usize, usize)],
    heads: usize,
    h: usize,
    ctx: &mut [MaybeUninit<f32>],
) {
    let mut rest = ctx;
    let mut jobs = Vec::with_capacity(spans.len());
    for &(at, t) in spans {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(t * h);
        jobs.push((&qkv[at * 3 * h..(at + t) * 3 * h], mine));
        rest = tail;
    }
    let fast = avx2_fma();
    jobs.into_par_iter().for_each(|(qkv, ctx)| {
        if fast {
            // SAFETY: avx2_fma() checked that the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                sequence_avx2(qkv, heads, h, ctx)
            }
        } else {
            sequence(qkv, heads, h, ctx)
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sequence_avx2(qkv: &[f32], heads: usize, h: usize, ctx: &mut [MaybeUninit<f32>]) {
    sequence(qkv, heads, h, ctx)
}

/// One sequence: `qkv` its `t` rows of `3h`, `ctx` its `t` rows of `h`.
/// Head widths of 32 and 64 (MiniLM's and BERT-base's) keep a query's
/// context in registers; others take the same loops with a width known
/// only at run time.
#[inline(always)]
fn sequence(qkv: &[f32], heads: usize, h: usize, ctx: &mut [MaybeUninit<f32>]) {
    match h / heads {
        32 => sequence_of::<32>(qkv, heads, h, ctx),
        64 => sequence_of::<64>(qkv, heads, h, ctx),
        _ => sequence_of::<0>(qkv, heads, h, ctx),
    }
}

/// Queries whose scores are summed together: eight independent sums in
/// flight, where one query's sums waited on each other (a chain of adds).
const QG: usize = 8;

/// [`sequence`] for heads `HD` wide (0: `h / heads`, read at run time).
#[inline(always)]
fn sequence_of<const HD: usize>(qkv: &[f32], heads: usize, h: usize, ctx: &mut [MaybeUninit<f32>]) {
    let hd = if HD == 0 { h / heads } else { HD };
    let t = ctx.len() / h;
    let scale = 1.0 / (hd as f32).sqrt();
    // One head's keys in blocks of eight (`hd × 8` each, zero-padded), so a
    // query's scores for eight keys are summed in one register; then the
    // probabilities of a group of queries.
    let blocks = t.div_ceil(8);
    let mut keys = vec![0f32; blocks * hd * 8];
    let mut scores = vec![0f32; QG * blocks * 8];
    let mut inv = [0f32; QG];
    let mut acc = vec![0f32; hd];
    for head in 0..heads {
        let (q0, k0, v0) = (head * hd, h + head * hd, 2 * h + head * hd);
        for (j, row) in qkv.chunks_exact(3 * h).enumerate() {
            for (d, k) in row[k0..k0 + hd].iter().enumerate() {
                keys[((j / 8) * hd + d) * 8 + j % 8] = *k;
            }
        }
        for first in (0..t).step_by(QG) {
            let g = QG.min(t - first);
            // Past the sequence's last query, the last again (dropped below).
            let queries: [&[f32]; QG] = std::array::from_fn(|r| {
                let i = (first + r).min(t - 1);
                &qkv[i * 3 * h + q0..][..hd]
            });
            for (b, keys) in keys.chunks_exact(hd * 8).enumerate() {
                let mut sum = [[0f32; 8]; QG];
                for (d, k) in keys.chunks_exact(8).enumerate() {
                    for (sum, q) in sum.iter_mut().zip(&queries) {
                        let q = q[d];
                        for l in 0..8 {
                            sum[l] += q * k[l];
                        }
                    }
                }
                for (r, sum) in sum.iter().enumerate() {
                    scores[(r * blocks + b) * 8..][..8].copy_from_slice(sum);
                }
            }
            for (r, inv) in inv.iter_mut().enumerate().take(g) {
                let p = &mut scores[r * blocks * 8..][..t];
                let max = reduce(p, f32::NEG_INFINITY, |m, s| if s > m { s } else { m });
                for p in p.iter_mut() {
                    *p = exp(((*p - max) * scale).max(-87.0));
                }
                *inv = 1.0 / reduce(p, 0.0, |a, b| a + b);
            }
            let p = |r: usize| &scores[r * blocks * 8..][..t];
            let mut r = 0;
            while r < g {
                let i = first + r;
                if HD == 0 {
                    let out = &mut ctx[i * h + q0..][..hd];
                    context(p(r), qkv, v0, h, &mut acc, inv[r], out);
                    r += 1;
                } else if r + 1 < g {
                    // Two queries at once: each value row read once for both.
                    let (a, b) = ctx[i * h..(i + 2) * h].split_at_mut(h);
                    let outs = [&mut a[q0..q0 + hd], &mut b[q0..q0 + hd]];
                    context_pair(
                        &[p(r), p(r + 1)],
                        qkv,
                        v0,
                        h,
                        &mut [[0f32; HD]; 2],
                        &inv[r..r + 2],
                        outs,
                    );
                    r += 2;
                } else {
                    // A fixed-size accumulator: the compiler keeps it in registers.
                    let out = &mut ctx[i * h + q0..][..hd];
                    context(p(r), qkv, v0, h, &mut [0f32; HD], inv[r], out);
                    r += 1;
                }
            }
        }
    }
}

/// [`context`] for two queries: `p` their probabilities, `inv` their
/// normalisers, `out` their context.
#[inline(always)]
fn context_pair<const HD: usize>(
    p: &[&[f32]; 2],
    qkv: &[f32],
    v0: usize,
    h: usize,
    acc: &mut [[f32; HD]; 2],
    inv: &[f32],
    out: [&mut [MaybeUninit<f32>]; 2],
) {
    let [a0, a1] = acc;
    for ((&p0, &p1), row) in p[0].iter().zip(p[1]).zip(qkv.chunks_exact(3 * h)) {
        let v = &row[v0..v0 + HD];
        for d in 0..HD {
            a0[d] += p0 * v[d];
            a1[d] += p1 * v[d];
        }
    }
    for ((out, acc), inv) in out.into_iter().zip([a0, a1]).zip(inv) {
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            o.write(a * inv);
        }
    }
}

/// A query's context: `Σ_j p[j] · v_j` over the head's values (from column
/// `v0` of each row of `3h`), times `inv`, into `out`.
#[inline(always)]
fn context(
    p: &[f32],
    qkv: &[f32],
    v0: usize,
    h: usize,
    acc: &mut [f32],
    inv: f32,
    out: &mut [MaybeUninit<f32>],
) {
    let hd = acc.len();
    acc.fill(0.0);
    for (&p, row) in p.iter().zip(qkv.chunks_exact(3 * h)) {
        for (a, v) in acc.iter_mut().zip(&row[v0..v0 + hd]) {
            *a += p * v;
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        o.write(a * inv);
    }
}

/// e^x for x in -87..=0 (the scores less their maximum), Cephes' float
/// polynomial with no libm call, so the loop above vectorises; relative
/// error under 2e-7.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // x = n·ln 2 + r: adding 1.5 · 2^23 rounds x·log2(e) to the integer n,
    // left in the low bits of the sum.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

/// [`attention`] as a candle op on the fused query-key-value tensor.
pub(super) struct Attention<'a> {
    pub spans: &'a [(usize, usize)],
    pub heads: usize,
    pub hidden: usize,
}

impl candle_core::CustomOp1 for Attention<'_> {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let h = self.hidden;
        let n: usize = self.spans.iter().map(|s| s.1).sum();
        match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) if b - a == n * 3 * h => {
                // Not zeroed first (a pass on one core): attention() writes it all.
                let mut ctx: Vec<f32> = Vec::with_capacity(n * h);
                attention(
                    &v[a..b],
                    self.spans,
                    self.heads,
                    h,
                    &mut ctx.spare_capacity_mut()[..n * h],
                );
                // SAFETY: attention() wrote every head of every row of the
                // spans, which cover all n rows.
                unsafe { ctx.set_len(n * h) };
                Ok((candle_core::CpuStorage::F32(ctx), (n, h).into()))
            }
            _ => candle_core::bail!("attention: expected {n} contiguous f32 rows of {}", 3 * h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook computation, one number at a time.
    fn reference(qkv: &[f32], spans: &[(usize, usize)], heads: usize, h: usize) -> Vec<f32> {
        let hd = h / heads;
        let mut ctx = vec![0f32; qkv.len() / 3];
        for &(at, t) in spans {
            for head in 0..heads {
                for i in 0..t {
                    let s: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..hd)
                                .map(|d| {
                                    let q = qkv[(at + i) * 3 * h + head * hd + d];
                                    let k = qkv[(at + j) * 3 * h + h + head * hd + d];
                                    f64::from(q) * f64::from(k)
                                })
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        let v: f64 = (0..t)
                            .map(|j| {
                                e[j] * f64::from(qkv[(at + j) * 3 * h + 2 * h + head * hd + d])
                            })
                            .sum();
                        ctx[(at + i) * h + head * hd + d] = (v / sum) as f32;
                    }
                }
            }
        }
        ctx
    }

    #[test]
    fn exp_is_within_2e7_of_libm() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - want) / want).abs());
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn matches_the_textbook_formula() {
        // Heads of 32 (in registers) and of 12 (not a multiple of 8),
        // sequences of 1, 5 and 9 rows.
        for (heads, h) in [(2, 64), (2, 24)] {
            check(heads, h);
        }
    }

    fn check(heads: usize, h: usize) {
        let spans = [(0, 1), (1, 5), (6, 9)];
        let n = 15;
        let qkv: Vec<f32> = (0..n * 3 * h)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 2.0)
            .collect();
        let want = reference(&qkv, &spans, heads, h);
        for fast in [false, true] {
            let mut got = vec![MaybeUninit::new(f32::NAN); n * h];
            if fast {
                attention(&qkv, &spans, heads, h, &mut got);
            } else {
                for &(at, t) in &spans {
                    sequence(
                        &qkv[at * 3 * h..(at + t) * 3 * h],
                        heads,
                        h,
                        &mut got[at * h..(at + t) * h],
                    );
                }
            }
            // SAFETY: every element was initialised (NaN, until written).
            let got: Vec<f32> = got.iter().map(|g| unsafe { g.assume_init() }).collect();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "fast {fast}, element {i}: {g} vs {w}");
            }
        }
    }
}
