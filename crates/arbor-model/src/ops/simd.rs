//! Small dense kernels (dot, axpy, scale) written so that LLVM vectorises them.
//!
//! The crate cannot set `target-cpu` for the whole workspace, so the hot loops of the fused ops are
//! compiled twice: once for the baseline x86-64 target and once with AVX2+FMA enabled, picked at
//! run time (see [`has_avx2_fma`]). The kernels themselves are plain Rust; `#[inline(always)]` lets
//! them be re-specialised inside a `#[target_feature]` function.

/// Dot product with sixteen independent accumulators (breaks the add dependency chain).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let ra = ca.remainder();
    let rb = cb.remainder();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    let mut t = 0f32;
    for v in acc {
        t += v;
    }
    t + s
}

/// `y += a * x`.
#[inline(always)]
#[allow(dead_code)]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * *xi;
    }
}

/// `y *= a`.
#[inline(always)]
pub(crate) fn scale(a: f32, y: &mut [f32]) {
    for yi in y.iter_mut() {
        *yi *= a;
    }
}

/// Whether the AVX2+FMA specialisations can run on this CPU.
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` in a context compiled with AVX2+FMA when the CPU has them (the closure body is inlined
/// into the target-feature function, so its loops are vectorised with 256-bit FMA).
#[inline(always)]
pub(crate) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has_avx2_fma() {
            // SAFETY: the features were detected at run time just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `e^x` for `x <= 88`, vectorisable (no libm call): Cody-Waite range reduction to
/// `|r| <= ln2 / 2` and a degree-6 Taylor polynomial, relative error below `2e-7`. Inputs below
/// `-87` flush to the smallest normal float (about `1e-38`), which is harmless in a softmax.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer in f32 arithmetic.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80f32;
        while x < 80.0 {
            let a = super::exp_approx(x) as f64;
            let b = (x as f64).exp();
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }
}
