//! The production tree-attention kernels, blocked on top of `gemm`: a block of consecutive
//! queries of one DFS run shares every ancestor run, so scores, probabilities and gradients of a
//! (query block, key chunk) pair are small dense matrix products (flash-attention style), and
//! only the block that contains the queries themselves needs a causal mask.

// Kernels index several parallel per-lane arrays by the same lane index.
#![allow(clippy::needless_range_loop)]

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::mask::TreeMask;
use crate::ops::simd;

/// Queries per block.
const BQ: usize = 32;
/// Keys per chunk.
const BK: usize = 128;

/// A row-major (or transposed) view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }
    fn cols(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: ld,
        }
    }
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `C[m x n] (row stride ldc) = (accumulate ? C : 0) + alpha * A[m x k] B[k x n]`.
#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: View,
    b: View,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.fits(m, k) && b.fits(k, n) && (m - 1) * ldc + n <= c.len(),
        "gemm bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        return;
    }
    // SAFETY: every index touched is inside the slices (checked above); dst does not alias the
    // inputs (distinct borrows).
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Blocks of at most `BQ` consecutive queries of one contiguous run.
fn blocks(mask: &TreeMask) -> Vec<(usize, usize)> {
    let parent = mask.parent();
    let t = parent.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < t {
        let mut n = 1;
        while n < BQ && i + n < t && parent[i + n] == (i + n - 1) as i32 {
            n += 1;
        }
        out.push((i, n));
        i += n;
    }
    out
}

/// Forward for all heads. `q`: `[Hq, T, D]`, `k`, `v`: `[Hkv, T, D]`; writes `out` `[Hq, T, D]`
/// and `lse` `[Hq, T]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    mask: &TreeMask,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (hq, hkv, t, d): (usize, usize, usize, usize),
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let group = hq / hkv;
    let blocks = blocks(mask);
    out.par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each(|(h, (oh, lh))| {
            simd::dispatch(|| {
                let kh = h / group;
                let kb = &k[kh * t * d..(kh + 1) * t * d];
                let vb = &v[kh * t * d..(kh + 1) * t * d];
                let qh = &q[h * t * d..(h + 1) * t * d];
                let mut s = vec![0f32; BQ * BK];
                let mut acc = vec![0f32; BQ * d];
                for &(i0, nb) in &blocks {
                    let i_last = i0 + nb - 1;
                    let qb = View::rows(&qh[i0 * d..(i0 + nb) * d], d);
                    acc[..nb * d].iter_mut().for_each(|x| *x = 0.0);
                    let mut m = [f32::NEG_INFINITY; BQ];
                    let mut l = [0f32; BQ];
                    mask.for_each_run(i_last, |rs, re| {
                        let own = re == i_last;
                        let mut j0 = rs;
                        while j0 <= re {
                            let nk = (re + 1 - j0).min(BK);
                            // S = scale * Qb K^T
                            mm(
                                nb,
                                nk,
                                d,
                                &mut s,
                                BK,
                                false,
                                qb,
                                View::cols(&kb[j0 * d..(j0 + nk) * d], d),
                                scale,
                            );
                            for b in 0..nb {
                                let lim = if own {
                                    nk.min((i0 + b + 1).saturating_sub(j0))
                                } else {
                                    nk
                                };
                                let row = &mut s[b * BK..b * BK + nk];
                                let mut mx = f32::NEG_INFINITY;
                                for (x, &val) in row.iter().enumerate() {
                                    mx = mx.max(if x < lim { val } else { f32::NEG_INFINITY });
                                }
                                if mx > m[b] {
                                    let corr = if m[b] == f32::NEG_INFINITY {
                                        0.0
                                    } else {
                                        simd::exp_approx(m[b] - mx)
                                    };
                                    l[b] *= corr;
                                    simd::scale(corr, &mut acc[b * d..(b + 1) * d]);
                                    m[b] = mx;
                                }
                                let mb = m[b];
                                let mut ts = 0f32;
                                for (x, val) in row.iter_mut().enumerate() {
                                    let p = simd::exp_approx(*val - mb);
                                    *val = if x < lim { p } else { 0.0 };
                                    ts += *val;
                                }
                                l[b] += ts;
                            }
                            // acc += P V
                            mm(
                                nb,
                                d,
                                nk,
                                &mut acc,
                                d,
                                true,
                                View::rows(&s, BK),
                                View::rows(&vb[j0 * d..(j0 + nk) * d], d),
                                1.0,
                            );
                            j0 += nk;
                        }
                    });
                    for b in 0..nb {
                        let inv = 1.0 / l[b];
                        let i = i0 + b;
                        for (o, a) in oh[i * d..(i + 1) * d]
                            .iter_mut()
                            .zip(&acc[b * d..(b + 1) * d])
                        {
                            *o = a * inv;
                        }
                        lh[i] = m[b] + l[b].ln();
                    }
                }
            })
        });
}

/// Backward for all heads: given `o`, `d_o`, `lse` and `delta = rowsum(dO * O)`, writes `dq`,
/// `dk`, `dv`. Parallel over KV heads (each owns its dK, dV and its query group's dQ).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    mask: &TreeMask,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    lse: &[f32],
    delta: &[f32],
    (hq, hkv, t, d): (usize, usize, usize, usize),
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let group = hq / hkv;
    let blocks = blocks(mask);
    dq.par_chunks_mut(group * t * d)
        .zip(dk.par_chunks_mut(t * d))
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(kh, ((dqg, dkh), dvh))| {
            simd::dispatch(|| {
                let kb = &k[kh * t * d..(kh + 1) * t * d];
                let vb = &v[kh * t * d..(kh + 1) * t * d];
                let mut p = vec![0f32; BQ * BK];
                let mut dp = vec![0f32; BQ * BK];
                for g in 0..group {
                    let h = kh * group + g;
                    let qh = &q[h * t * d..(h + 1) * t * d];
                    let doh = &d_o[h * t * d..(h + 1) * t * d];
                    let dqh = &mut dqg[g * t * d..(g + 1) * t * d];
                    for &(i0, nb) in &blocks {
                        let i_last = i0 + nb - 1;
                        let qb = View::rows(&qh[i0 * d..(i0 + nb) * d], d);
                        let dob = View::rows(&doh[i0 * d..(i0 + nb) * d], d);
                        let dqb = &mut dqh[i0 * d..(i0 + nb) * d];
                        mask.for_each_run(i_last, |rs, re| {
                            let own = re == i_last;
                            let mut j0 = rs;
                            while j0 <= re {
                                let nk = (re + 1 - j0).min(BK);
                                let kc = &kb[j0 * d..(j0 + nk) * d];
                                let vc = &vb[j0 * d..(j0 + nk) * d];
                                mm(nb, nk, d, &mut p, BK, false, qb, View::cols(kc, d), scale);
                                mm(nb, nk, d, &mut dp, BK, false, dob, View::cols(vc, d), 1.0);
                                for b in 0..nb {
                                    let i = i0 + b;
                                    let lim = if own {
                                        nk.min((i + 1).saturating_sub(j0))
                                    } else {
                                        nk
                                    };
                                    let (li, di) = (lse[h * t + i], delta[h * t + i]);
                                    let pr = &mut p[b * BK..b * BK + nk];
                                    let dr = &mut dp[b * BK..b * BK + nk];
                                    for (x, (pv, dv_)) in
                                        pr.iter_mut().zip(dr.iter_mut()).enumerate()
                                    {
                                        let e = simd::exp_approx(*pv - li);
                                        let e = if x < lim { e } else { 0.0 };
                                        *pv = e;
                                        *dv_ = e * (*dv_ - di) * scale;
                                    }
                                }
                                // dV += P^T dO ; dK += dS^T Q ; dQ += dS K
                                mm(
                                    nk,
                                    d,
                                    nb,
                                    &mut dvh[j0 * d..(j0 + nk) * d],
                                    d,
                                    true,
                                    View::cols(&p, BK),
                                    dob,
                                    1.0,
                                );
                                mm(
                                    nk,
                                    d,
                                    nb,
                                    &mut dkh[j0 * d..(j0 + nk) * d],
                                    d,
                                    true,
                                    View::cols(&dp, BK),
                                    qb,
                                    1.0,
                                );
                                mm(
                                    nb,
                                    d,
                                    nk,
                                    dqb,
                                    d,
                                    true,
                                    View::rows(&dp, BK),
                                    View::rows(kc, d),
                                    1.0,
                                );
                                j0 += nk;
                            }
                        });
                    }
                }
            })
        });
}
