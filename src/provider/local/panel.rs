//! What the fp32 and int8 dense layers share: weights packed in panels of
//! [`NR`] output channels, the output filled by tasks of whole blocks of
//! tokens on every core, and the store of one finished row of a panel.

use super::gelu;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels of a packed panel: one AVX-512 register of floats or
/// i32, two AVX2 ones.
pub(super) const NR: usize = 16;

/// The `n × out` output of `x` (`n × inp`), filled by `task` on every core:
/// each task gets whole blocks of `block` tokens (the last task the rest)
/// and their rows of the output, not zeroed first (on one core, zeroing
/// took as long as a tenth of the products on all of them).
///
/// # Safety
/// `task` must write every element of the output rows it is given.
pub(super) unsafe fn on_every_core(
    x: &[f32],
    inp: usize,
    out: usize,
    block: usize,
    task: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let n = x.len() / inp;
    let mut y: Vec<f32> = Vec::with_capacity(n * out);
    // Enough tasks for every core, at most eight blocks each.
    let threads = rayon::current_num_threads().max(1);
    let rows = n.div_ceil(threads * 4).div_ceil(block).clamp(1, 8) * block;
    y.spare_capacity_mut()[..n * out]
        .par_chunks_mut(rows * out)
        .zip(x.par_chunks(rows * inp))
        .for_each(|(y, x)| task(x, y));
    // SAFETY: the caller's task wrote every element of every chunk.
    unsafe { y.set_len(n * out) };
    y
}

/// One token's finished row of a panel, GELU of it with `gelu`, written to
/// its place in the output (`out`: the panel's first `out.len()` channels).
#[inline(always)]
pub(super) fn store(values: &mut [f32; NR], gelu: bool, out: &mut [MaybeUninit<f32>]) {
    if gelu {
        gelu::gelu(values);
    }
    match <&mut [MaybeUninit<f32>; NR]>::try_from(&mut *out) {
        // A whole panel: a copy of known size, which stays inline (a loop
        // of `out.len()` becomes a call to memcpy).
        Ok(out) => *out = values.map(MaybeUninit::new),
        Err(_) => {
            for (y, v) in out.iter_mut().zip(values.iter()) {
                y.write(*v);
            }
        }
    }
}
