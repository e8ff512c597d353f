//! The dense reference of tree attention: the ground truth the kernels are tested against.
//! Costs `T * T` memory (a full additive mask), so it is for tests and cross-checks only.

use candle::{Result, Tensor};

use super::mask::TreeMask;

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
