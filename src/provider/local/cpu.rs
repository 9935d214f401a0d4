//! What this CPU can run, asked once per call site: the loops of the local
//! model are compiled twice, for any x86-64 and for AVX2 with FMA, and the
//! second is picked where the CPU has them (a plain build targets CPUs
//! from 2003, whose vectors are four floats wide); how finely an
//! element-wise step is cut for the cores; and how a float reduction is
//! written so that it vectorises.

/// Floats per task when an element-wise step is spread over the cores:
/// enough that a task outweighs its scheduling.
pub(super) const PAR_CHUNK: usize = 1 << 14;

/// The CPU has AVX2 and FMA (checked once; the answer is cached).
pub(super) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `xs` folded by `f` in eight lanes, then the lanes folded: a plain fold
/// of floats stays scalar (the compiler keeps the order of the operations).
#[inline(always)]
pub(super) fn reduce(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            lanes[l] = f(lanes[l], c[l]);
        }
    }
    lanes.iter().chain(tail).fold(init, |a, &b| f(a, b))
}

/// `Σ f(x)` over `xs`, summed in eight lanes like [`reduce`] (which folds
/// the values themselves, so cannot map them first).
#[inline(always)]
pub(super) fn sum_of(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += f(c[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&x| f(x)).sum::<f32>()
}
