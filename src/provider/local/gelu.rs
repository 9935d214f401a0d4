//! GELU, the erf form BERT uses (`0.5 · x · (1 + erf(x / √2))`), with an erf
//! that vectorises, applied to each block of the up-projection's output
//! while it is in cache.

/// GELU in place, compiled into its caller (for its target features).
#[inline(always)]
pub(super) fn gelu(xs: &mut [f32]) {
    for x in xs {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
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
