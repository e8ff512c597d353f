//! Fused CPU ops with hand-written backward passes: RMSNorm, rotary embedding driven by explicit
//! position ids, and per-token log-probabilities of target tokens.
//!
//! candle's fast kernels for these have no backward, and the composed fallbacks allocate several
//! full-size temporaries per call (and as many backward nodes); on the training step they cost
//! more than the matmuls. Each op here is one pass forward and one pass backward.

use std::sync::Arc;

use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd;
use crate::sample::logsumexp;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what} must be contiguous"),
    }
}

fn to_vec(x: &Tensor) -> Result<Vec<f32>> {
    x.flatten_all()?.to_vec1::<f32>()
}

/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 64;

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

/// `y = x / sqrt(mean(x^2) + eps) * weight` over the last dimension, differentiable in both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op2(weight, RmsNorm { eps })
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "arbor-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "rms_norm input")?;
        let w = contiguous(s2, l2, "rms_norm weight")?;
        let d = w.len();
        if d == 0 || l1.shape().dims().last() != Some(&d) {
            bail!(
                "rms_norm: weight {:?} does not match input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let mut y = vec![0f32; x.len()];
        let eps = self.eps;
        y.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .for_each(|(yc, xc)| {
                simd::dispatch(|| {
                    for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                        let r = 1.0 / (simd::dot(xr, xr) / d as f32 + eps).sqrt();
                        for ((yi, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                            *yi = xi * r * wi;
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = to_vec(x)?;
        let wv = to_vec(w)?;
        let gv = to_vec(g)?;
        let d = wv.len();
        let eps = self.eps;
        let mut dx = vec![0f32; xv.len()];
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROWS_PER_TASK * d)
            .zip(xv.par_chunks(ROWS_PER_TASK * d))
            .zip(gv.par_chunks(ROWS_PER_TASK * d))
            .map(|((dxc, xc), gc)| {
                simd::dispatch(|| {
                    let mut dw = vec![0f32; d];
                    let mut u = vec![0f32; d];
                    for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                        let r = 1.0 / (simd::dot(xr, xr) / d as f32 + eps).sqrt();
                        for (((ui, gi), wi), (dwi, xi)) in
                            u.iter_mut().zip(gr).zip(&wv).zip(dw.iter_mut().zip(xr))
                        {
                            *ui = gi * wi;
                            *dwi += gi * xi * r;
                        }
                        let c = simd::dot(&u, xr) * r * r * r / d as f32;
                        for ((o, ui), xi) in dxr.iter_mut().zip(&u).zip(xr) {
                            *o = ui * r - xi * c;
                        }
                    }
                    dw
                })
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in partial {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// Cos/sin tables gathered at explicit position ids, shared by every layer of one forward.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    half: usize,
}

impl RopeTables {
    /// Tables for `positions` with the Hugging Face (rotate-half, non-interleaved) convention:
    /// `inv_freq[i] = theta^(-2i / head_dim)`.
    pub fn new(positions: &[u32], head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            half,
        }
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }
}

struct Rope {
    tables: RopeTables,
    /// Rotate by `-angle` (the backward of a rotation is the inverse rotation).
    inverse: bool,
}

/// Rotary embedding of `x: [T, H, D]`, token `t` rotated by its own position's angles.
pub fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(Rope {
        tables: tables.clone(),
        inverse: false,
    })
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "arbor-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "rope input")?;
        let (t, h, d) = l.shape().dims3()?;
        let half = self.tables.half;
        if d != 2 * half || t != self.tables.len() {
            bail!(
                "rope: input {:?} does not match tables ({} x {half})",
                l.shape(),
                self.tables.len()
            );
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let (cos, sin) = (&self.tables.cos, &self.tables.sin);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * d)
            .zip(x.par_chunks(h * d))
            .enumerate()
            .for_each(|(ti, (yr, xr))| {
                let c = &cos[ti * half..(ti + 1) * half];
                let s = &sin[ti * half..(ti + 1) * half];
                for (yh, xh) in yr.chunks_mut(d).zip(xr.chunks(d)) {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        let si = sign * s[i];
                        y1[i] = x1[i] * c[i] - x2[i] * si;
                        y2[i] = x2[i] * c[i] + x1[i] * si;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let inv = Rope {
            tables: self.tables.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(g.apply_op1(inv)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Token log-probabilities

struct TokenLogprobs {
    targets: Arc<Vec<u32>>,
}

/// `out[n] = log_softmax(logits[n])[targets[n]]` for `logits: [N, V]`, differentiable in the
/// logits. One pass, no `[N, V]` log-softmax temporary kept for the backward.
pub fn token_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    logits.apply_op1(TokenLogprobs {
        targets: Arc::new(targets.to_vec()),
    })
}

impl CustomOp1 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "arbor-token-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "logits")?;
        let (n, v) = l.shape().dims2()?;
        if self.targets.len() != n {
            bail!(
                "token_logprobs: {} targets for {n} rows",
                self.targets.len()
            );
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("token_logprobs: target {bad} outside the vocabulary of {v}");
        }
        let mut out = vec![0f32; n];
        out.par_iter_mut()
            .zip(x.par_chunks(v))
            .zip(self.targets.par_iter())
            .for_each(|((o, r), &t)| {
                *o = r[t as usize] - logsumexp(r);
            });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let x = to_vec(logits)?;
        let gv = to_vec(g)?;
        let (n, v) = logits.dims2()?;
        let mut dx = vec![0f32; n * v];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(gv.par_iter().zip(self.targets.par_iter()))
            .for_each(|((dr, r), (&gi, &t))| {
                if gi == 0.0 {
                    return;
                }
                let lse = logsumexp(r);
                for (o, xi) in dr.iter_mut().zip(r) {
                    *o = -gi * (xi - lse).exp();
                }
                dr[t as usize] += gi;
            });
        Ok(Some(Tensor::from_vec(dx, (n, v), logits.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

struct SwiGlu;

/// `silu(gate) * up`, element-wise, differentiable in both (one pass each way instead of the
/// four composed ops and their backward nodes).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let gate = gate.contiguous()?;
    let up = up.contiguous()?;
    gate.apply_op2(&up, SwiGlu)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + simd::exp_approx(-x))
}

/// Elements handed to one rayon task.
const ELEMS_PER_TASK: usize = 16 * 1024;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "arbor-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "swiglu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let g = contiguous(s1, l1, "swiglu gate")?;
        let u = contiguous(s2, l2, "swiglu up")?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                g.par_chunks(ELEMS_PER_TASK)
                    .zip(u.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(yc, (gc, uc))| {
                simd::dispatch(|| {
                    for ((y, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                        *y = g * sigmoid(g) * u;
                    }
                })
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = to_vec(gate)?;
        let u = to_vec(up)?;
        let gr = to_vec(grad)?;
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        dg.par_chunks_mut(ELEMS_PER_TASK)
            .zip(du.par_chunks_mut(ELEMS_PER_TASK))
            .zip(
                g.par_chunks(ELEMS_PER_TASK)
                    .zip(u.par_chunks(ELEMS_PER_TASK)),
            )
            .zip(gr.par_chunks(ELEMS_PER_TASK))
            .for_each(|(((dgc, duc), (gc, uc)), grc)| {
                simd::dispatch(|| {
                    for ((((dg, du), &g), &u), &o) in
                        dgc.iter_mut().zip(duc.iter_mut()).zip(gc).zip(uc).zip(grc)
                    {
                        let s = sigmoid(g);
                        *du = o * g * s;
                        *dg = o * u * s * (1.0 + g * (1.0 - s));
                    }
                })
            });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}
