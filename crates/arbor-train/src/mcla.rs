//! MCLA (Monte-Carlo log-probability averaging, docs/recipe.md §4).
//!
//! With stochastic routing (router noise in training mode, [`ForwardOptions::router_noise`]) a
//! MoE's token log-probability is a random estimate; its noise inflates the variance of the
//! importance weights `w = exp(logp_rollout - logp_train)` that GSPO and IcePop act on. MCLA runs
//! `K` forward passes with independent routing draws and uses their mean
//! `logp_bar = (1/K) sum_k logp^(k)` (gradient through every pass). `K = 1` is off.

use arbor_model::{AuxStats, ForwardOptions, Qwen3Model, TreeBatch};
use candle::Tensor;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::loss::RlPath;

/// MCLA settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mcla {
    /// Forward passes `K` averaged (1 = off).
    pub passes: usize,
    /// Standard deviation of the router-logit noise in training mode (0 = deterministic routing).
    pub router_noise: f32,
    /// Seed of pass 0; pass `k` uses `seed + k`. Change it every step (e.g. derive it from the
    /// step number), or every step sees the same routing draws.
    pub seed: u64,
}

impl Default for Mcla {
    /// Off: one deterministic pass.
    fn default() -> Self {
        Self {
            passes: 1,
            router_noise: 0.0,
            seed: 0,
        }
    }
}

impl Mcla {
    /// `K` passes with the report's setting in mind (K = 8) and the given routing noise.
    pub fn new(passes: usize, router_noise: f32, seed: u64) -> Self {
        Self {
            passes,
            router_noise,
            seed,
        }
    }

    /// Passes actually worth running on `model`: without MoE layers or without noise every pass
    /// is identical, so one is enough.
    pub fn effective_passes(&self, model: &Qwen3Model) -> usize {
        if model.config().num_experts == 0 || self.router_noise <= 0.0 {
            1
        } else {
            self.passes.max(1)
        }
    }
}

/// The result of [`mcla_logprobs`].
#[derive(Debug, Clone)]
pub struct McLogprobs {
    /// `logp_bar`, `[T]`, differentiable.
    pub mean: Tensor,
    /// The values of pass 0 alone: what training would use with `K = 1`.
    pub single: Vec<f32>,
    /// The values of `mean`.
    pub mean_values: Vec<f32>,
    /// MoE load-balancing statistics summed over the passes (their loss is that of the mean
    /// counts and probabilities, since [`AuxStats::loss`] normalises by the summed weights).
    pub aux: AuxStats,
    /// Passes run.
    pub passes: usize,
}

/// Per-token log-probabilities of `batch` averaged over `K` stochastic-routing passes.
///
/// `wanted` limits the LM head to the tokens that carry a loss (others get 0),
/// `aux_token_weights` is passed to every pass (use `g_t` on a tree), and `temperature` is the
/// sampling temperature the behaviour log-probabilities were drawn at.
pub fn mcla_logprobs(
    model: &Qwen3Model,
    batch: &TreeBatch,
    wanted: Option<&[bool]>,
    aux_token_weights: Option<Vec<f32>>,
    mcla: &Mcla,
    temperature: f32,
) -> Result<McLogprobs> {
    let passes = mcla.effective_passes(model);
    let mut sum: Option<Tensor> = None;
    let mut aux = AuxStats::default();
    let mut single = Vec::new();
    for k in 0..passes {
        let opts = ForwardOptions {
            train: mcla.router_noise > 0.0,
            router_noise: mcla.router_noise,
            noise_seed: mcla.seed.wrapping_add(k as u64),
            aux_token_weights: aux_token_weights.clone(),
            temperature,
        };
        let (lp, a) = model.token_logprobs_where(batch, &opts, wanted)?;
        aux.merge(a)?;
        if k == 0 {
            single = lp.to_vec1::<f32>()?;
        }
        sum = Some(match sum {
            None => lp,
            Some(s) => (s + lp)?,
        });
    }
    let sum = match sum {
        Some(s) => s,
        None => return Err(crate::TrainError::Input("no forward pass".into())),
    };
    let mean = if passes > 1 {
        (sum / passes as f64)?
    } else {
        sum
    };
    let mean_values = if passes > 1 {
        mean.to_vec1::<f32>()?
    } else {
        single.clone()
    };
    tracing::debug!(passes, tokens = batch.len(), "mcla log-probabilities");
    Ok(McLogprobs {
        mean,
        single,
        mean_values,
        aux,
        passes,
    })
}

/// Moments of the importance weights `w = exp(logp_rollout - logp_train)` over the loss tokens
/// of a batch (a shared token counts once per path that trains it). Kept as sums so packs merge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportanceStats {
    /// Tokens counted.
    pub tokens: u64,
    /// `sum w`.
    pub sum: f64,
    /// `sum w^2`.
    pub sum_sq: f64,
}

impl ImportanceStats {
    /// The moments of `w` for `train` log-probabilities (indexed like the paths' indices) against
    /// each path's behaviour log-probabilities.
    pub fn new(train: &[f32], paths: &[RlPath]) -> Self {
        let mut s = Self::default();
        for p in paths {
            for ((&i, &m), &old) in p.indices.iter().zip(&p.loss_mask).zip(&p.old_logprobs) {
                let Some(&lp) = train.get(i as usize) else {
                    continue;
                };
                if m {
                    let w = ((old - lp) as f64).exp();
                    s.tokens += 1;
                    s.sum += w;
                    s.sum_sq += w * w;
                }
            }
        }
        s
    }

    /// Mean of `w`.
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.sum / self.tokens as f64
        }
    }

    /// Population variance of `w`.
    pub fn variance(&self) -> f64 {
        if self.tokens == 0 {
            return 0.0;
        }
        let m = self.mean();
        (self.sum_sq / self.tokens as f64 - m * m).max(0.0)
    }

    /// Adds another batch's sums.
    pub fn merge(&mut self, o: &ImportanceStats) {
        self.tokens += o.tokens;
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
    }
}
