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

/// `out[x] = sum_d a[d] * bt[d * stride + j0 + x]` for a tile of keys starting at `j0`.
#[inline(always)]
fn tile_scores(a: &[f32], bt: &[f32], stride: usize, j0: usize) -> [f32; TILE] {
    let mut sc = [0f32; TILE];
    for (dd, &ad) in a.iter().enumerate() {
        let row = &bt[dd * stride + j0..dd * stride + j0 + TILE];
        for x in 0..TILE {
            sc[x] += ad * row[x];
        }
    }
    sc
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
        // Parallel over (head, query block); each task owns disjoint output rows.
        const QB: usize = 64;
        let mut tasks: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
        for (h, (oh, lh)) in out.chunks_mut(t * d).zip(lse.chunks_mut(t)).enumerate() {
            for (b, (o, l)) in oh.chunks_mut(QB * d).zip(lh.chunks_mut(QB)).enumerate() {
                tasks.push((h, b * QB, o, l));
            }
        }
        let tp = t + TILE;
        let kt = transpose_padded(k, hkv, t, d);
        tasks.into_par_iter().for_each(|(h, q0, o, l)| {
            simd::dispatch(|| {
                let kh = h / group;
                let ktb = &kt[kh * d * tp..(kh + 1) * d * tp];
                let vbase = &v[kh * t * d..(kh + 1) * t * d];
                let mut acc = vec![0f32; d];
                let mut qs = vec![0f32; d];
                for (r, lr) in l.iter_mut().enumerate() {
                    let i = q0 + r;
                    let qi = &q[(h * t + i) * d..(h * t + i + 1) * d];
                    for (a, b) in qs.iter_mut().zip(qi) {
                        *a = b * scale;
                    }
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    let mut m = f32::NEG_INFINITY;
                    let mut sum = 0f32;
                    mask.for_each_run(i, |s, e| {
                        let mut j0 = s;
                        while j0 <= e {
                            let n = (e + 1 - j0).min(TILE);
                            let mut sc = tile_scores(&qs, ktb, tp, j0);
                            let mut bmax = f32::NEG_INFINITY;
                            for &x in &sc[..n] {
                                bmax = bmax.max(x);
                            }
                            if bmax > m {
                                let corr = if m == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    simd::exp_approx(m - bmax)
                                };
                                sum *= corr;
                                simd::scale(corr, &mut acc);
                                m = bmax;
                            }
                            for x in sc.iter_mut() {
                                *x = simd::exp_approx(*x - m);
                            }
                            for (x, &p) in sc[..n].iter().enumerate() {
                                sum += p;
                                let j = j0 + x;
                                simd::axpy(p, &vbase[j * d..(j + 1) * d], &mut acc);
                            }
                            j0 += n;
                        }
                    });
                    let inv = 1.0 / sum;
                    let orow = &mut o[r * d..(r + 1) * d];
                    for (oo, a) in orow.iter_mut().zip(&acc) {
                        *oo = a * inv;
                    }
                    *lr = m + sum.ln();
                }
            })
        });
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
                    let mut dqi = vec![0f32; d];
                    let mut qs = vec![0f32; d];
                    for g in 0..group {
                        let h = kh * group + g;
                        for i in 0..t {
                            let r = (h * t + i) * d;
                            let qi = &qv[r..r + d];
                            let doi = &dov[r..r + d];
                            let li = lse[h * t + i];
                            let di = delta[h * t + i];
                            for (a, b) in qs.iter_mut().zip(qi) {
                                *a = b * scale;
                            }
                            dqi.iter_mut().for_each(|x| *x = 0.0);
                            mask.for_each_run(i, |s, e| {
                                let mut j0 = s;
                                while j0 <= e {
                                    let n = (e + 1 - j0).min(TILE);
                                    let mut p = tile_scores(&qs, ktb, tp, j0);
                                    let dp = tile_scores(doi, vtb, tp, j0);
                                    let mut ds = [0f32; TILE];
                                    for x in 0..TILE {
                                        p[x] = simd::exp_approx(p[x] - li);
                                        ds[x] = p[x] * (dp[x] - di) * scale;
                                    }
                                    for x in 0..n {
                                        let j = j0 + x;
                                        let kj = &kbase[j * d..(j + 1) * d];
                                        simd::axpy(p[x], doi, &mut dvh[j * d..(j + 1) * d]);
                                        simd::axpy(ds[x], kj, &mut dqi);
                                        simd::axpy(ds[x], qi, &mut dkh[j * d..(j + 1) * d]);
                                    }
                                    j0 += n;
                                }
                            });
                            dqg[(g * t + i) * d..(g * t + i + 1) * d].copy_from_slice(&dqi);
                        }
                    }
                })
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (hq, t, d), dev)?),
            Some(Tensor::from_vec(dk, (hkv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (hkv, t, d), dev)?),
        ))
    }
}
