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
