//! The candle glue of tree attention: a [`CustomOp3`] whose CPU forward and backward check shapes,
//! borrow the inputs as contiguous slices, and hand them to a kernel. The forward's logsumexp is
//! kept for the backward, which recomputes probabilities from it instead of storing them.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::kernel;
use super::mask::TreeMask;
use crate::ops::simd;

/// Exact tree attention. `q`: `[Hq, T, D]`, `k`, `v`: `[Hkv, T, D]` (head-major, `Hq` a multiple
/// of `Hkv` for grouped-query attention). Returns `[Hq, T, D]`. Differentiable in `q`, `k`, `v`.
pub fn tree_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<TreeMask>,
    scale: f32,
) -> Result<Tensor> {
    apply(q, k, v, mask, scale, Kernels::Gemm)
}

/// Which kernels compute the op.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kernels {
    /// The gemm-blocked production kernels (`kernel.rs`).
    Gemm,
    /// The independent register-tile kernels (`tile.rs`), for cross-checks in tests.
    #[cfg(test)]
    Tile,
}

/// [`tree_attention`] computed by the given kernels.
pub(super) fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<TreeMask>,
    scale: f32,
    kernels: Kernels,
) -> Result<Tensor> {
    let op = TreeAttention {
        mask: mask.clone(),
        scale,
        kernels,
        lse: Arc::new(Mutex::new(None)),
    };
    q.apply_op3(k, v, op)
}

struct TreeAttention {
    mask: Arc<TreeMask>,
    scale: f32,
    kernels: Kernels,
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
    /// Validates the shapes against each other and the mask; returns `(Hq, Hkv, T, D)`.
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

    /// The logsumexp the last forward stored.
    fn saved_lse(&self) -> Result<Vec<f32>> {
        match self.lse.lock() {
            Ok(g) => match g.as_ref() {
                Some(l) => Ok(l.clone()),
                None => bail!("tree attention: backward before forward"),
            },
            Err(_) => bail!("tree attention: poisoned logsumexp store"),
        }
    }
}

/// `delta_i = dO_i . O_i` (the softmax-Jacobian correction term), per (head, query).
fn row_deltas(d_o: &[f32], o: &[f32], hq: usize, t: usize, d: usize) -> Vec<f32> {
    let mut delta = vec![0f32; hq * t];
    delta.par_chunks_mut(t).enumerate().for_each(|(h, dh)| {
        for (i, x) in dh.iter_mut().enumerate() {
            let r = (h * t + i) * d;
            *x = simd::dot(&d_o[r..r + d], &o[r..r + d]);
        }
    });
    delta
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
        let dims = self.check(l1.shape(), l2.shape(), l3.shape())?;
        let (hq, _, t, d) = dims;
        let q = contiguous(s1, l1, "q")?;
        let k = contiguous(s2, l2, "k")?;
        let v = contiguous(s3, l3, "v")?;
        let mut out = vec![0f32; hq * t * d];
        let mut lse = vec![0f32; hq * t];
        let (mask, scale) = (&*self.mask, self.scale);
        match self.kernels {
            Kernels::Gemm => kernel::forward(mask, q, k, v, dims, scale, &mut out, &mut lse),
            #[cfg(test)]
            Kernels::Tile => super::tile::forward(mask, q, k, v, dims, scale, &mut out, &mut lse),
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
        let dims = self.check(q.shape(), k.shape(), v.shape())?;
        let (hq, hkv, t, d) = dims;
        let lse = self.saved_lse()?;
        let flat = |x: &Tensor| -> Result<Vec<f32>> { x.flatten_all()?.to_vec1::<f32>() };
        let (qv, kv, vv, ov, dov) = (flat(q)?, flat(k)?, flat(v)?, flat(o)?, flat(d_o)?);
        let mut dq = vec![0f32; hq * t * d];
        let mut dk = vec![0f32; hkv * t * d];
        let mut dv = vec![0f32; hkv * t * d];
        let (mask, scale) = (&*self.mask, self.scale);
        let delta = row_deltas(&dov, &ov, hq, t, d);
        match self.kernels {
            Kernels::Gemm => kernel::backward(
                mask, &qv, &kv, &vv, &dov, &lse, &delta, dims, scale, &mut dq, &mut dk, &mut dv,
            ),
            #[cfg(test)]
            Kernels::Tile => super::tile::backward(
                mask, &qv, &kv, &vv, &dov, &lse, &delta, dims, scale, &mut dq, &mut dk, &mut dv,
            ),
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (hq, t, d), dev)?),
            Some(Tensor::from_vec(dk, (hkv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (hkv, t, d), dev)?),
        ))
    }
}
