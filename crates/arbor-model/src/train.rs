//! Losses over per-token log-probabilities and the AdamW step.
//!
//! Every loss here is written over a `[T]` vector of token log-probabilities, so the same function
//! serves a single path (T = path length) and a flattened tree (T = unique tokens): for linear
//! losses a per-token weight carries the path structure (see `arbor-tree`'s loss weights); for
//! path-dependent losses ([`clipped_pg_loss`]) each path gathers its tokens from the shared vector
//! and the gather's backward sums the duplicates, which is exactly the per-path gradient.

use candle::{Tensor, Var, backprop::GradStore};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

use crate::{ModelError, Result};

/// `-sum_t w_t * logp_t`: SFT with per-token weights (0 where the loss mask is off).
pub fn weighted_nll(logprobs: &Tensor, weights: &[f32]) -> Result<Tensor> {
    let t = logprobs.dim(0)?;
    if weights.len() != t {
        return Err(ModelError::Input(format!(
            "{} weights for {t} tokens",
            weights.len()
        )));
    }
    let w = Tensor::from_slice(weights, t, logprobs.device())?;
    Ok(logprobs.mul(&w)?.sum_all()?.neg()?)
}

/// One path of a policy-gradient batch: which entries of the log-probability vector form the path
/// (in order), which of them are trained, the behaviour log-probabilities and the advantage.
#[derive(Debug, Clone)]
pub struct PgPath {
    /// Indices into the `[T]` log-probability vector, one per path token.
    pub indices: Vec<u32>,
    /// Loss mask per path token.
    pub loss_mask: Vec<bool>,
    /// Behaviour-policy log-probability per path token.
    pub old_logprobs: Vec<f32>,
    /// Advantage of this path (leaf).
    pub advantage: f32,
}

/// PPO-style clipped policy-gradient loss: per path, the masked token mean of
/// `min(r A, clip(r, 1-eps, 1+eps) A)` with `r = exp(logp - logp_old)`; mean over paths; negated.
pub fn clipped_pg_loss(logprobs: &Tensor, paths: &[PgPath], clip_eps: f32) -> Result<Tensor> {
    if paths.is_empty() {
        return Err(ModelError::Input("no paths".into()));
    }
    let mut idx = Vec::new();
    let mut old = Vec::new();
    let mut adv = Vec::new();
    let mut coef = Vec::new();
    let k = paths.len() as f32;
    for p in paths {
        if p.loss_mask.len() != p.indices.len() || p.old_logprobs.len() != p.indices.len() {
            return Err(ModelError::Input(
                "path fields have different lengths".into(),
            ));
        }
        let n = p.loss_mask.iter().filter(|&&m| m).count().max(1) as f32;
        idx.extend_from_slice(&p.indices);
        old.extend_from_slice(&p.old_logprobs);
        adv.extend(std::iter::repeat_n(p.advantage, p.indices.len()));
        coef.extend(
            p.loss_mask
                .iter()
                .map(|&m| if m { 1.0 / (n * k) } else { 0.0 }),
        );
    }
    let dev = logprobs.device();
    let n = idx.len();
    let idx = Tensor::from_vec(idx, n, dev)?;
    let lp = logprobs.index_select(&idx, 0)?;
    let old = Tensor::from_vec(old, n, dev)?;
    let adv = Tensor::from_vec(adv, n, dev)?;
    let coef = Tensor::from_vec(coef, n, dev)?;
    let ratio = (lp - old)?.exp()?;
    let unclipped = ratio.mul(&adv)?;
    let clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)?.mul(&adv)?;
    let obj = unclipped.minimum(&clipped)?;
    Ok(obj.mul(&coef)?.sum_all()?.neg()?)
}

/// AdamW over the model's parameters: candle-nn's update rule (decoupled weight decay, bias
/// corrected moments), fused into one pass per parameter. candle-nn's version allocates about a
/// dozen full-size temporaries per parameter tensor; on a small model that is a visible share of
/// a training step, and it is the same fixed cost in tree and linear training.
pub struct AdamWTrainer {
    vars: Vec<Var>,
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    params: ParamsAdamW,
    step_t: i32,
}

impl AdamWTrainer {
    /// An optimiser over `vars` with learning rate `lr` and decoupled weight decay `weight_decay`.
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let params = ParamsAdamW {
            lr,
            weight_decay,
            ..ParamsAdamW::default()
        };
        Self::with_params(vars, params)
    }

    /// An optimiser with explicit AdamW hyper-parameters.
    pub fn with_params(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| (vec![0f32; v.elem_count()], vec![0f32; v.elem_count()]))
            .collect();
        Ok(Self {
            vars,
            moments,
            params,
            step_t: 0,
        })
    }

    /// The hyper-parameters (e.g. to change the learning rate between steps).
    pub fn params_mut(&mut self) -> &mut ParamsAdamW {
        &mut self.params
    }

    /// Backward of `loss` and one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// One update from precomputed (e.g. accumulated) gradients; parameters without a gradient
    /// are left unchanged.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let scale_m = (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32;
        let scale_v = (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32;
        let decay = (1.0 - p.lr * p.weight_decay) as f32;
        let (lr, eps) = (p.lr as f32, p.eps as f32);
        for (var, (m, v)) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            let mut theta = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            const CHUNK: usize = 16 * 1024;
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((th, m), v), g)| {
                    for (((t, m), v), &g) in
                        th.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g)
                    {
                        *m = *m * b1 + g * (1.0 - b1);
                        *v = *v * b2 + g * g * (1.0 - b2);
                        let upd = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
                        *t = *t * decay - upd * lr;
                    }
                });
            var.set(&Tensor::from_vec(theta, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}
