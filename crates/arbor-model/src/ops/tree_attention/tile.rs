//! The register-tile kernels: a second, independent implementation of the tree-attention forward
//! and backward (tiles of 16 keys kept in registers, blocks of 4 queries), compiled for tests
//! only. Tests run it through the op against the dense reference, like the production kernels.
//!
//! Same contract as `kernel.rs`: `q`: `[Hq, T, D]`, `k`, `v`: `[Hkv, T, D]`; the forward writes
//! the output and the per-(head, query) logsumexp, the backward the three gradients.

// Kernels index several parallel per-lane arrays by the same lane index.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::mask::TreeMask;
use crate::ops::simd;

/// Keys scored together: a tile of 16 f32 lanes stays in registers (two AVX2 vectors).
const TILE: usize = 16;

/// Queries processed together: they share every key tile, so each key row loaded from cache feeds
/// `QB` queries (4 x 16 scores fit in eight AVX2 registers).
const QB: usize = 4;

/// Queries per forward task: a task owns these output rows of one head.
const CHUNK: usize = 64;

/// Per-head transpose `[H, T, D] -> [H, D, T + TILE]` (zero padded), so that the scores of a tile of
/// consecutive keys are `D` vector FMAs across keys instead of `TILE` horizontal dot products.
fn transpose_padded(x: &[f32], h: usize, t: usize, d: usize) -> Vec<f32> {
    let tp = t + TILE;
    let mut out = vec![0f32; h * d * tp];
    out.par_chunks_mut(d * tp).enumerate().for_each(|(hh, o)| {
        let src = &x[hh * t * d..(hh + 1) * t * d];
        for (j, row) in src.chunks_exact(d).enumerate() {
            for (dd, &val) in row.iter().enumerate() {
                o[dd * tp + j] = val;
            }
        }
    });
    out
}

/// `sc[b][x] = sum_d a[b * d + dd] * bt[dd * stride + j0 + x]` for `QB` query rows.
#[inline(always)]
fn tile_scores_qb(a: &[f32], d: usize, bt: &[f32], stride: usize, j0: usize) -> [[f32; TILE]; QB] {
    let mut sc = [[0f32; TILE]; QB];
    for dd in 0..d {
        let row = &bt[dd * stride + j0..dd * stride + j0 + TILE];
        for b in 0..QB {
            let ab = a[b * d + dd];
            for x in 0..TILE {
                sc[b][x] += ab * row[x];
            }
        }
    }
    sc
}

/// `y[dd] += sum_b c[b] * xs[b * d + dd]` (one pass over `y` for `QB` sources).
#[inline(always)]
fn axpy_qb(c0: [f32; QB], xs: &[f32], d: usize, y: &mut [f32]) {
    let (x0, rest) = xs.split_at(d);
    let (x1, rest) = rest.split_at(d);
    let (x2, x3) = rest.split_at(d);
    // Zipped iterators: no bounds checks, so the loop vectorises.
    for ((((yv, a), b), c), e) in y.iter_mut().zip(x0).zip(x1).zip(x2).zip(&x3[..d]) {
        *yv += c0[0] * a + c0[1] * b + c0[2] * c + c0[3] * e;
    }
}

/// `ys[b * d + dd] += c[b] * x[dd]` for the `QB` rows of `ys` (one pass over `x`).
#[inline(always)]
fn axpy_rows(c: [f32; QB], x: &[f32], d: usize, ys: &mut [f32]) {
    let (y0, rest) = ys.split_at_mut(d);
    let (y1, rest) = rest.split_at_mut(d);
    let (y2, y3) = rest.split_at_mut(d);
    for ((((xv, a), b), cc), e) in x.iter().zip(y0).zip(y1).zip(y2).zip(&mut y3[..d]) {
        *a += c[0] * xv;
        *b += c[1] * xv;
        *cc += c[2] * xv;
        *e += c[3] * xv;
    }
}

/// Splits queries `q0..q1` into blocks of at most `QB` consecutive tokens of one contiguous run
/// (each token the parent of the next), so a block shares all ancestor runs.
fn query_blocks(mask: &TreeMask, q0: usize, q1: usize, out: &mut Vec<(usize, usize)>) {
    let parent = mask.parent();
    out.clear();
    let mut i = q0;
    while i < q1 {
        let mut n = 1;
        while n < QB && i + n < q1 && parent[i + n] == (i + n - 1) as i32 {
            n += 1;
        }
        out.push((i, n));
        i += n;
    }
}

/// Number of keys of the tile at `j0` (of `n` keys) visible to query `i` in the query's own run
/// (keys `<= i`); all `n` in an ancestor run.
#[inline(always)]
fn visible_in_tile(own: bool, i: usize, j0: usize, n: usize) -> usize {
    if own {
        n.min((i + 1).saturating_sub(j0))
    } else {
        n
    }
}

/// Forward for all heads: writes `out` `[Hq, T, D]` and `lse` `[Hq, T]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
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
    // Parallel over (head, chunk of queries); each task owns disjoint output rows.
    let mut tasks: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
    for (h, (oh, lh)) in out.chunks_mut(t * d).zip(lse.chunks_mut(t)).enumerate() {
        for (b, (o, l)) in oh
            .chunks_mut(CHUNK * d)
            .zip(lh.chunks_mut(CHUNK))
            .enumerate()
        {
            tasks.push((h, b * CHUNK, o, l));
        }
    }
    let tp = t + TILE;
    let kt = transpose_padded(k, hkv, t, d);
    tasks.into_par_iter().for_each(|(h, q0, o, l)| {
        simd::dispatch(|| {
            let kh = h / group;
            let ktb = &kt[kh * d * tp..(kh + 1) * d * tp];
            let vb = &v[kh * t * d..(kh + 1) * t * d];
            let qh = &q[h * t * d..(h + 1) * t * d];
            forward_chunk(mask, qh, ktb, vb, d, scale, q0, o, l);
        })
    });
}

/// Forward of the queries `q0..q0 + l.len()` of one head: output rows `o`, logsumexps `l`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_chunk(
    mask: &TreeMask,
    qh: &[f32],
    ktb: &[f32],
    vb: &[f32],
    d: usize,
    scale: f32,
    q0: usize,
    o: &mut [f32],
    l: &mut [f32],
) {
    let mut acc = vec![0f32; QB * d];
    let mut qs = vec![0f32; QB * d];
    let mut blocks = Vec::new();
    query_blocks(mask, q0, q0 + l.len(), &mut blocks);
    for &(i0, nb) in &blocks {
        load_scaled(qh, d, i0, nb, scale, &mut qs);
        acc.iter_mut().for_each(|a| *a = 0.0);
        let (m, sum) = forward_block(mask, &qs, ktb, vb, d, i0, nb, &mut acc);
        for b in 0..nb {
            let r = i0 + b - q0;
            let inv = 1.0 / sum[b];
            for (oo, a) in o[r * d..(r + 1) * d]
                .iter_mut()
                .zip(&acc[b * d..(b + 1) * d])
            {
                *oo = a * inv;
            }
            l[r] = m[b] + sum[b].ln();
        }
    }
}

/// Fills rows `0..nb` of `qs` with `scale *` the queries `i0..i0 + nb`; the other rows with 0.
#[inline(always)]
fn load_scaled(qh: &[f32], d: usize, i0: usize, nb: usize, scale: f32, qs: &mut [f32]) {
    qs.iter_mut().for_each(|x| *x = 0.0);
    for b in 0..nb {
        let qi = &qh[(i0 + b) * d..(i0 + b + 1) * d];
        for (a, x) in qs[b * d..(b + 1) * d].iter_mut().zip(qi) {
            *a = x * scale;
        }
    }
}

/// Online softmax of one query block over all its ancestor runs: accumulates the unnormalised
/// `P V` into `acc`; returns the running max and sum of each query.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_block(
    mask: &TreeMask,
    qs: &[f32],
    ktb: &[f32],
    vb: &[f32],
    d: usize,
    i0: usize,
    nb: usize,
    acc: &mut [f32],
) -> ([f32; QB], [f32; QB]) {
    let tp = ktb.len() / d;
    let i_last = i0 + nb - 1;
    let mut m = [f32::NEG_INFINITY; QB];
    let mut sum = [0f32; QB];
    mask.for_each_run(i_last, |s, e| {
        let own = e == i_last;
        let mut j0 = s;
        while j0 <= e {
            let n = (e + 1 - j0).min(TILE);
            let mut sc = tile_scores_qb(qs, d, ktb, tp, j0);
            for b in 0..QB {
                let lim = if b < nb {
                    visible_in_tile(own, i0 + b, j0, n)
                } else {
                    0
                };
                if lim == 0 {
                    sc[b] = [0.0; TILE];
                    continue;
                }
                let acc_b = &mut acc[b * d..(b + 1) * d];
                softmax_tile_row(&mut sc[b], lim, &mut m[b], &mut sum[b], acc_b);
            }
            for x in 0..n {
                let j = j0 + x;
                let vrow = &vb[j * d..(j + 1) * d];
                let pc = [sc[0][x], sc[1][x], sc[2][x], sc[3][x]];
                axpy_rows(pc, vrow, d, acc);
            }
            j0 += n;
        }
    });
    (m, sum)
}

/// One query's online-softmax step over a tile of scores: rescales the running sum and `acc_row`
/// to a new max, turns the first `lim` scores into unnormalised probabilities (the rest into 0)
/// and adds them to the sum. Branch-free over the whole tile so the loops vectorise.
#[inline(always)]
fn softmax_tile_row(
    row: &mut [f32; TILE],
    lim: usize,
    m: &mut f32,
    sum: &mut f32,
    acc_row: &mut [f32],
) {
    let mut bmax = f32::NEG_INFINITY;
    for (x, &v) in row.iter().enumerate() {
        bmax = bmax.max(if x < lim { v } else { f32::NEG_INFINITY });
    }
    if bmax > *m {
        let corr = if *m == f32::NEG_INFINITY {
            0.0
        } else {
            simd::exp_approx(*m - bmax)
        };
        *sum *= corr;
        simd::scale(corr, acc_row);
        *m = bmax;
    }
    let mb = *m;
    let mut ts = 0f32;
    for (x, v) in row.iter_mut().enumerate() {
        let p = simd::exp_approx(*v - mb);
        *v = if x < lim { p } else { 0.0 };
        ts += *v;
    }
    *sum += ts;
}

/// One KV head's keys and values in the forms the backward reads.
#[derive(Clone, Copy)]
struct KvTiles<'a> {
    /// Keys `[T, D]`, row-major.
    k: &'a [f32],
    /// Keys transposed and padded, `[D, T + TILE]`.
    kt: &'a [f32],
    /// Values transposed and padded, `[D, T + TILE]`.
    vt: &'a [f32],
    d: usize,
}

/// One query block's rows for the backward (rows past the block's length are 0).
struct BlockRows {
    /// `scale * q`.
    qs: Vec<f32>,
    /// `q`.
    qr: Vec<f32>,
    /// `dO`.
    dob: Vec<f32>,
    /// Logsumexp of each query.
    li: [f32; QB],
    /// `dO . O` of each query.
    di: [f32; QB],
}

/// Backward for all heads, given the forward's `lse` and `delta = rowsum(dO * O)`: writes `dq`,
/// `dk`, `dv`. Parallel over KV heads (each owns its dK, dV and its query group's dQ).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
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
    let tp = t + TILE;
    let kt = transpose_padded(k, hkv, t, d);
    let vt = transpose_padded(v, hkv, t, d);
    dq.par_chunks_mut(group * t * d)
        .zip(dk.par_chunks_mut(t * d))
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(kh, ((dqg, dkh), dvh))| {
            simd::dispatch(|| {
                let kv = KvTiles {
                    k: &k[kh * t * d..(kh + 1) * t * d],
                    kt: &kt[kh * d * tp..(kh + 1) * d * tp],
                    vt: &vt[kh * d * tp..(kh + 1) * d * tp],
                    d,
                };
                let mut blocks = Vec::new();
                query_blocks(mask, 0, t, &mut blocks);
                for g in 0..group {
                    let h = kh * group + g;
                    backward_head(
                        mask,
                        &blocks,
                        kv,
                        &q[h * t * d..(h + 1) * t * d],
                        &d_o[h * t * d..(h + 1) * t * d],
                        (&lse[h * t..(h + 1) * t], &delta[h * t..(h + 1) * t]),
                        scale,
                        &mut dqg[g * t * d..(g + 1) * t * d],
                        dkh,
                        dvh,
                    );
                }
            })
        });
}

/// Gradients through one query head: writes its `dq` rows and adds into its KV head's `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head(
    mask: &TreeMask,
    blocks: &[(usize, usize)],
    kv: KvTiles,
    qh: &[f32],
    doh: &[f32],
    (lh, deltah): (&[f32], &[f32]),
    scale: f32,
    dqh: &mut [f32],
    dkh: &mut [f32],
    dvh: &mut [f32],
) {
    let d = kv.d;
    let mut dq = vec![0f32; QB * d];
    let mut rows = BlockRows {
        qs: vec![0f32; QB * d],
        qr: vec![0f32; QB * d],
        dob: vec![0f32; QB * d],
        li: [0f32; QB],
        di: [0f32; QB],
    };
    for &(i0, nb) in blocks {
        rows.qs.iter_mut().for_each(|x| *x = 0.0);
        rows.qr.iter_mut().for_each(|x| *x = 0.0);
        rows.dob.iter_mut().for_each(|x| *x = 0.0);
        dq.iter_mut().for_each(|x| *x = 0.0);
        rows.li = [0f32; QB];
        rows.di = [0f32; QB];
        for b in 0..nb {
            let r = (i0 + b) * d;
            rows.qr[b * d..(b + 1) * d].copy_from_slice(&qh[r..r + d]);
            rows.dob[b * d..(b + 1) * d].copy_from_slice(&doh[r..r + d]);
            for (a, x) in rows.qs[b * d..(b + 1) * d].iter_mut().zip(&qh[r..r + d]) {
                *a = x * scale;
            }
            rows.li[b] = lh[i0 + b];
            rows.di[b] = deltah[i0 + b];
        }
        backward_block(mask, kv, &rows, (i0, nb), scale, &mut dq, dkh, dvh);
        for b in 0..nb {
            let i = i0 + b;
            dqh[i * d..(i + 1) * d].copy_from_slice(&dq[b * d..(b + 1) * d]);
        }
    }
}

/// One query block against all its ancestor runs: adds the block's share of `dv`, `dk` (rows of
/// the keys) and its `dq` rows (`dq`, `QB x D`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_block(
    mask: &TreeMask,
    kv: KvTiles,
    rows: &BlockRows,
    (i0, nb): (usize, usize),
    scale: f32,
    dq: &mut [f32],
    dkh: &mut [f32],
    dvh: &mut [f32],
) {
    let d = kv.d;
    let i_last = i0 + nb - 1;
    mask.for_each_run(i_last, |s, e| {
        let own = e == i_last;
        let mut j0 = s;
        while j0 <= e {
            let n = (e + 1 - j0).min(TILE);
            let (p, ds) = tile_probs_and_grads(kv, rows, own, (i0, nb), j0, n, scale);
            for x in 0..n {
                let j = j0 + x;
                let kj = &kv.k[j * d..(j + 1) * d];
                let pc = [p[0][x], p[1][x], p[2][x], p[3][x]];
                let dc = [ds[0][x], ds[1][x], ds[2][x], ds[3][x]];
                axpy_qb(pc, &rows.dob, d, &mut dvh[j * d..(j + 1) * d]);
                axpy_qb(dc, &rows.qr, d, &mut dkh[j * d..(j + 1) * d]);
                axpy_rows(dc, kj, d, dq);
            }
            j0 += n;
        }
    });
}

/// Probabilities `P` (from the saved logsumexp) and score gradients
/// `dS = P * (dO V^T - delta) * scale` of a block against the key tile at `j0`; 0 where hidden.
#[inline(always)]
fn tile_probs_and_grads(
    kv: KvTiles,
    rows: &BlockRows,
    own: bool,
    (i0, nb): (usize, usize),
    j0: usize,
    n: usize,
    scale: f32,
) -> ([[f32; TILE]; QB], [[f32; TILE]; QB]) {
    let tp = kv.kt.len() / kv.d;
    let mut p = tile_scores_qb(&rows.qs, kv.d, kv.kt, tp, j0);
    let dp = tile_scores_qb(&rows.dob, kv.d, kv.vt, tp, j0);
    let mut ds = [[0f32; TILE]; QB];
    for b in 0..QB {
        let lim = if b < nb {
            visible_in_tile(own, i0 + b, j0, n)
        } else {
            0
        };
        for x in 0..TILE {
            let e = simd::exp_approx(p[b][x] - rows.li[b]);
            let e = if x < lim { e } else { 0.0 };
            p[b][x] = e;
            ds[b][x] = e * (dp[b][x] - rows.di[b]) * scale;
        }
    }
    (p, ds)
}
