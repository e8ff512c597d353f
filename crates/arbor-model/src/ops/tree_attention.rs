//! Tree attention: exact softmax attention restricted to a token's ancestors in a DFS-flattened
//! prefix tree, as a candle custom op with a CPU forward and backward.
//!
//! A flattened trajectory tree puts every ancestor of a token to its left. Token `j` is visible to
//! token `i` iff `j <= i < subtree_end[j]` (equivalently, `j` is on the parent chain of `i`, or is
//! `i`). The ancestors of `i` form a handful of contiguous runs (one per tree node on its path), so
//! the op walks those runs instead of a `T x T` mask: work and memory are proportional to the
//! number of visible (query, key) pairs plus `O(T * heads * head_dim)`.
//!
//! The forward uses a blocked, numerically stable online softmax (flash-attention style) and keeps
//! the per-(head, query) logsumexp for the backward, which recomputes probabilities from it instead
//! of storing them.

// Kernels index several parallel per-lane arrays by the same lane index.
#![allow(clippy::needless_range_loop)]

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd;
use crate::ModelError;

/// The ancestor relation of a DFS-flattened forest, in the compact forms the op needs.
///
/// Built from `parent` (token-level parent index, `-1` for a root) and `subtree_end` (exclusive end
/// of each token's subtree in DFS order). Both are validated against each other, because a causal
/// or otherwise inconsistent mask would silently break the equivalence with per-path training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    parent: Vec<i32>,
    subtree_end: Vec<u32>,
    /// First token of the contiguous parent-chain run that ends at each token.
    run_start: Vec<u32>,
    /// Number of visible (query, key) pairs, self included.
    pairs: u64,
}

impl TreeMask {
    /// Validates and wraps a DFS-ordered parent / subtree-end description.
    pub fn new(parent: Vec<i32>, subtree_end: Vec<u32>) -> std::result::Result<Self, ModelError> {
        let t = parent.len();
        if subtree_end.len() != t {
            return Err(ModelError::InvalidTree(format!(
                "parent has {t} entries but subtree_end has {}",
                subtree_end.len()
            )));
        }
        // A stack of open subtrees checks that the parent pointers and the intervals describe the
        // same DFS pre-order forest.
        let mut stack: Vec<usize> = Vec::new();
        for i in 0..t {
            let end = subtree_end[i] as usize;
            if end <= i || end > t {
                return Err(ModelError::InvalidTree(format!(
                    "subtree_end[{i}] = {end} outside ({i}, {t}]"
                )));
            }
            while let Some(&top) = stack.last() {
                if subtree_end[top] as usize <= i {
                    stack.pop();
                } else {
                    break;
                }
            }
            let expected = stack.last().map_or(-1, |&p| p as i64);
            if parent[i] as i64 != expected {
                return Err(ModelError::InvalidTree(format!(
                    "parent[{i}] = {} but the DFS intervals imply {expected}",
                    parent[i]
                )));
            }
            if let Some(&top) = stack.last()
                && end > subtree_end[top] as usize
            {
                return Err(ModelError::InvalidTree(format!(
                    "subtree of {i} ends after its parent's"
                )));
            }
            stack.push(i);
        }
        let mut run_start = vec![0u32; t];
        let mut depth = vec![0u64; t];
        let mut pairs = 0u64;
        for i in 0..t {
            let p = parent[i];
            run_start[i] = if i > 0 && p == i as i32 - 1 {
                run_start[i - 1]
            } else {
                i as u32
            };
            depth[i] = if p >= 0 { depth[p as usize] + 1 } else { 0 };
            pairs += depth[i] + 1;
        }
        Ok(Self {
            parent,
            subtree_end,
            run_start,
            pairs,
        })
    }

    /// Builds the mask from parent pointers alone (DFS order required), deriving `subtree_end`.
    pub fn from_parent(parent: Vec<i32>) -> std::result::Result<Self, ModelError> {
        let t = parent.len();
        let mut end: Vec<u32> = (1..=t as u32).collect();
        for i in (0..t).rev() {
            let p = parent[i];
            if p >= i as i32 {
                return Err(ModelError::InvalidTree(format!(
                    "parent[{i}] = {p} is not to the left"
                )));
            }
            if p >= 0 {
                let p = p as usize;
                end[p] = end[p].max(end[i]);
            }
        }
        Self::new(parent, end)
    }

    /// A single causal sequence of `len` tokens (a chain).
    pub fn causal(len: usize) -> Self {
        Self::forest(&[len])
    }

    /// Independent causal sequences packed back to back (the "linear" layout of several paths).
    pub fn forest(lengths: &[usize]) -> Self {
        let total: usize = lengths.iter().sum();
        let mut parent = Vec::with_capacity(total);
        let mut subtree_end = Vec::with_capacity(total);
        let mut off = 0usize;
        for &len in lengths {
            for k in 0..len {
                parent.push(if k == 0 { -1 } else { (off + k - 1) as i32 });
                subtree_end.push((off + len) as u32);
            }
            off += len;
        }
        let mut run_start = Vec::with_capacity(total);
        let mut pairs = 0u64;
        let mut off = 0usize;
        for &len in lengths {
            for k in 0..len {
                run_start.push(off as u32);
                pairs += k as u64 + 1;
            }
            off += len;
        }
        Self {
            parent,
            subtree_end,
            run_start,
            pairs,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// Whether the mask has no tokens.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// Token-level parent pointers (`-1` for roots).
    pub fn parent(&self) -> &[i32] {
        &self.parent
    }

    /// Exclusive DFS end of each token's subtree.
    pub fn subtree_end(&self) -> &[u32] {
        &self.subtree_end
    }

    /// Number of visible (query, key) pairs: the attention work, versus `T * T` for a dense mask.
    pub fn visible_pairs(&self) -> u64 {
        self.pairs
    }

    /// Whether key `j` is visible to query `i`.
    pub fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && i < self.subtree_end[j] as usize
    }

    /// Calls `f(start, end_inclusive)` for each contiguous run of ancestors-or-self of `i`.
    #[inline(always)]
    fn for_each_run(&self, i: usize, mut f: impl FnMut(usize, usize)) {
        let mut e = i as i64;
        while e >= 0 {
            let s = self.run_start[e as usize] as usize;
            f(s, e as usize);
            e = self.parent[s] as i64;
        }
    }

    /// [`Self::for_each_run`] for the sibling kernel module.
    #[inline(always)]
    pub(crate) fn for_each_run_pub(&self, i: usize, f: impl FnMut(usize, usize)) {
        self.for_each_run(i, f)
    }

    /// A dense `[T, T]` additive mask (0 visible, -inf hidden) for the reference implementation.
    /// Costs `T * T` memory: tests only.
    pub fn dense_bias(&self, device: &candle::Device) -> Result<Tensor> {
        let t = self.len();
        let mut m = vec![f32::NEG_INFINITY; t * t];
        for i in 0..t {
            self.for_each_run(i, |s, e| {
                for j in s..=e {
                    m[i * t + j] = 0.0;
                }
            });
        }
        Tensor::from_vec(m, (t, t), device)
    }
}

/// Exact tree attention. `q`: `[Hq, T, D]`, `k`, `v`: `[Hkv, T, D]` (head-major, `Hq` a multiple
/// of `Hkv` for grouped-query attention). Returns `[Hq, T, D]`. Differentiable in `q`, `k`, `v`.
pub fn tree_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<TreeMask>,
    scale: f32,
) -> Result<Tensor> {
    let op = TreeAttention {
        mask: mask.clone(),
        scale,
        lse: Arc::new(Mutex::new(None)),
    };
    q.apply_op3(k, v, op)
}

/// Reference: dense scores, additive mask, softmax, weighted sum (all candle composed ops).
pub fn tree_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &TreeMask,
    scale: f32,
) -> Result<Tensor> {
    let (hq, _t, _d) = q.dims3()?;
    let hkv = k.dim(0)?;
    let group = hq / hkv;
    let rep = |x: &Tensor| -> Result<Tensor> {
        if group == 1 {
            return Ok(x.clone());
        }
        let (h, t, d) = x.dims3()?;
        x.unsqueeze(1)?
            .expand((h, group, t, d))?
            .reshape((h * group, t, d))
    };
    let k = rep(k)?;
    let v = rep(v)?;
    let bias = mask.dense_bias(q.device())?;
    let s = (q.matmul(&k.t()?)? * scale as f64)?.broadcast_add(&bias)?;
    let p = candle_nn::ops::softmax(&s, candle::D::Minus1)?;
    p.matmul(&v)
}

struct TreeAttention {
    mask: Arc<TreeMask>,
    scale: f32,
    /// Logsumexp per (head, query), written by the forward, read by the backward.
    lse: Arc<Mutex<Option<Vec<f32>>>>,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("tree attention: {what} must be contiguous"),
    }
}

impl TreeAttention {
    fn check(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (hq, t, d) = q.dims3()?;
        let (hkv, tk, dk) = k.dims3()?;
        if k.dims() != v.dims() || tk != t || dk != d || hkv == 0 || !hq.is_multiple_of(hkv) {
            bail!("tree attention: bad shapes q {q:?} k {k:?} v {v:?}");
        }
        if t != self.mask.len() {
            bail!(
                "tree attention: {t} tokens but the mask has {}",
                self.mask.len()
            );
        }
        Ok((hq, hkv, t, d))
    }
}

/// Whether to use the gemm-blocked kernels (default) or the register-tile kernels
/// (`ARBOR_TREE_ATTENTION=tile`, kept as an independent implementation for cross-checks).
fn use_gemm_kernels() -> bool {
    static GEMM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GEMM.get_or_init(|| {
        std::env::var("ARBOR_TREE_ATTENTION")
            .map(|v| v != "tile")
            .unwrap_or(true)
    })
}

/// Keys scored together: a tile of 16 f32 lanes stays in registers (two AVX2 vectors).
const TILE: usize = 16;

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

/// Queries processed together: they share every key tile, so each key row loaded from cache feeds
/// `QB` queries (4 x 16 scores fit in eight AVX2 registers).
const QB: usize = 4;

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
    out.clear();
    let mut i = q0;
    while i < q1 {
        let mut n = 1;
        while n < QB && i + n < q1 && mask.parent[i + n] == (i + n - 1) as i32 {
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

impl CustomOp3 for TreeAttention {
    fn name(&self) -> &'static str {
        "tree-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (hq, hkv, t, d) = self.check(l1.shape(), l2.shape(), l3.shape())?;
        let q = contiguous(s1, l1, "q")?;
        let k = contiguous(s2, l2, "k")?;
        let v = contiguous(s3, l3, "v")?;
        let mut out = vec![0f32; hq * t * d];
        let mut lse = vec![0f32; hq * t];
        let group = hq / hkv;
        let mask = &*self.mask;
        let scale = self.scale;
        if use_gemm_kernels() {
            super::tree_attention_gemm::forward(
                mask,
                q,
                k,
                v,
                (hq, hkv, t, d),
                scale,
                &mut out,
                &mut lse,
            );
        } else {
            // Parallel over (head, chunk of queries); each task owns disjoint output rows.
            const CHUNK: usize = 64;
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
                    let vbase = &v[kh * t * d..(kh + 1) * t * d];
                    let mut acc = vec![0f32; QB * d];
                    let mut qs = vec![0f32; QB * d];
                    let mut blocks = Vec::new();
                    query_blocks(mask, q0, q0 + l.len(), &mut blocks);
                    for &(i0, nb) in &blocks {
                        let i_last = i0 + nb - 1;
                        qs.iter_mut().for_each(|x| *x = 0.0);
                        for b in 0..nb {
                            let qi = &q[(h * t + i0 + b) * d..(h * t + i0 + b + 1) * d];
                            for (a, x) in qs[b * d..(b + 1) * d].iter_mut().zip(qi) {
                                *a = x * scale;
                            }
                        }
                        acc.iter_mut().for_each(|a| *a = 0.0);
                        let mut m = [f32::NEG_INFINITY; QB];
                        let mut sum = [0f32; QB];
                        mask.for_each_run(i_last, |s, e| {
                            let own = e == i_last;
                            let mut j0 = s;
                            while j0 <= e {
                                let n = (e + 1 - j0).min(TILE);
                                let mut sc = tile_scores_qb(&qs, d, ktb, tp, j0);
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
                                    // Branch-free over the whole tile so the loops vectorise.
                                    let mut bmax = f32::NEG_INFINITY;
                                    for (x, &v) in sc[b].iter().enumerate() {
                                        bmax =
                                            bmax.max(if x < lim { v } else { f32::NEG_INFINITY });
                                    }
                                    if bmax > m[b] {
                                        let corr = if m[b] == f32::NEG_INFINITY {
                                            0.0
                                        } else {
                                            simd::exp_approx(m[b] - bmax)
                                        };
                                        sum[b] *= corr;
                                        simd::scale(corr, &mut acc[b * d..(b + 1) * d]);
                                        m[b] = bmax;
                                    }
                                    let mb = m[b];
                                    let mut ts = 0f32;
                                    for (x, v) in sc[b].iter_mut().enumerate() {
                                        let p = simd::exp_approx(*v - mb);
                                        *v = if x < lim { p } else { 0.0 };
                                        ts += *v;
                                    }
                                    sum[b] += ts;
                                }
                                for x in 0..n {
                                    let j = j0 + x;
                                    let vrow = &vbase[j * d..(j + 1) * d];
                                    let pc = [sc[0][x], sc[1][x], sc[2][x], sc[3][x]];
                                    axpy_rows(pc, vrow, d, &mut acc);
                                }
                                j0 += n;
                            }
                        });
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
                })
            });
        }
        if let Ok(mut g) = self.lse.lock() {
            *g = Some(lse);
        }
        Ok((CpuStorage::F32(out), Shape::from((hq, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (hq, hkv, t, d) = self.check(q.shape(), k.shape(), v.shape())?;
        let lse = match self.lse.lock() {
            Ok(g) => match g.as_ref() {
                Some(l) => l.clone(),
                None => bail!("tree attention: backward before forward"),
            },
            Err(_) => bail!("tree attention: poisoned logsumexp store"),
        };
        let flat = |x: &Tensor| -> Result<Vec<f32>> { x.flatten_all()?.to_vec1::<f32>() };
        let (qv, kv, vv, ov, dov) = (flat(q)?, flat(k)?, flat(v)?, flat(o)?, flat(d_o)?);
        let group = hq / hkv;
        let mut dq = vec![0f32; hq * t * d];
        let mut dk = vec![0f32; hkv * t * d];
        let mut dv = vec![0f32; hkv * t * d];
        let mask = &*self.mask;
        let scale = self.scale;
        // delta_i = dO_i . O_i (the softmax-Jacobian correction term), per (head, query).
        let mut delta = vec![0f32; hq * t];
        delta.par_chunks_mut(t).enumerate().for_each(|(h, dh)| {
            for (i, x) in dh.iter_mut().enumerate() {
                let r = (h * t + i) * d;
                *x = simd::dot(&dov[r..r + d], &ov[r..r + d]);
            }
        });
        // Parallel over KV heads: a KV head owns its dK, dV and the dQ of its query-head group, so
        // tasks never write the same memory.
        if use_gemm_kernels() {
            super::tree_attention_gemm::backward(
                mask,
                &qv,
                &kv,
                &vv,
                &dov,
                &lse,
                &delta,
                (hq, hkv, t, d),
                scale,
                &mut dq,
                &mut dk,
                &mut dv,
            );
        } else {
            let tp = t + TILE;
            let kt = transpose_padded(&kv, hkv, t, d);
            let vt = transpose_padded(&vv, hkv, t, d);
            dq.par_chunks_mut(group * t * d)
                .zip(dk.par_chunks_mut(t * d))
                .zip(dv.par_chunks_mut(t * d))
                .enumerate()
                .for_each(|(kh, ((dqg, dkh), dvh))| {
                    simd::dispatch(|| {
                        let kbase = &kv[kh * t * d..(kh + 1) * t * d];
                        let ktb = &kt[kh * d * tp..(kh + 1) * d * tp];
                        let vtb = &vt[kh * d * tp..(kh + 1) * d * tp];
                        let mut dq = vec![0f32; QB * d];
                        let mut qs = vec![0f32; QB * d];
                        let mut qr = vec![0f32; QB * d];
                        let mut dob = vec![0f32; QB * d];
                        let mut blocks = Vec::new();
                        query_blocks(mask, 0, t, &mut blocks);
                        for g in 0..group {
                            let h = kh * group + g;
                            for &(i0, nb) in &blocks {
                                let i_last = i0 + nb - 1;
                                qs.iter_mut().for_each(|x| *x = 0.0);
                                qr.iter_mut().for_each(|x| *x = 0.0);
                                dob.iter_mut().for_each(|x| *x = 0.0);
                                dq.iter_mut().for_each(|x| *x = 0.0);
                                let mut li = [0f32; QB];
                                let mut di = [0f32; QB];
                                for b in 0..nb {
                                    let r = (h * t + i0 + b) * d;
                                    qr[b * d..(b + 1) * d].copy_from_slice(&qv[r..r + d]);
                                    dob[b * d..(b + 1) * d].copy_from_slice(&dov[r..r + d]);
                                    for (a, x) in
                                        qs[b * d..(b + 1) * d].iter_mut().zip(&qv[r..r + d])
                                    {
                                        *a = x * scale;
                                    }
                                    li[b] = lse[h * t + i0 + b];
                                    di[b] = delta[h * t + i0 + b];
                                }
                                mask.for_each_run(i_last, |s, e| {
                                    let own = e == i_last;
                                    let mut j0 = s;
                                    while j0 <= e {
                                        let n = (e + 1 - j0).min(TILE);
                                        let mut p = tile_scores_qb(&qs, d, ktb, tp, j0);
                                        let dp = tile_scores_qb(&dob, d, vtb, tp, j0);
                                        let mut ds = [[0f32; TILE]; QB];
                                        for b in 0..QB {
                                            let lim = if b < nb {
                                                visible_in_tile(own, i0 + b, j0, n)
                                            } else {
                                                0
                                            };
                                            for x in 0..TILE {
                                                let e = simd::exp_approx(p[b][x] - li[b]);
                                                let e = if x < lim { e } else { 0.0 };
                                                p[b][x] = e;
                                                ds[b][x] = e * (dp[b][x] - di[b]) * scale;
                                            }
                                        }
                                        for x in 0..n {
                                            let j = j0 + x;
                                            let kj = &kbase[j * d..(j + 1) * d];
                                            let pc = [p[0][x], p[1][x], p[2][x], p[3][x]];
                                            let dc = [ds[0][x], ds[1][x], ds[2][x], ds[3][x]];
                                            axpy_qb(pc, &dob, d, &mut dvh[j * d..(j + 1) * d]);
                                            axpy_qb(dc, &qr, d, &mut dkh[j * d..(j + 1) * d]);
                                            axpy_rows(dc, kj, d, &mut dq);
                                        }
                                        j0 += n;
                                    }
                                });
                                for b in 0..nb {
                                    let i = i0 + b;
                                    dqg[(g * t + i) * d..(g * t + i + 1) * d]
                                        .copy_from_slice(&dq[b * d..(b + 1) * d]);
                                }
                            }
                        }
                    })
                });
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (hq, t, d), dev)?),
            Some(Tensor::from_vec(dk, (hkv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (hkv, t, d), dev)?),
        ))
    }
}
