//! Mixture-of-experts layers: top-k routing (optionally noisy in training), the weighted sum of
//! the chosen experts, and the load-balancing statistics ([`AuxStats`]) that become the aux loss.

use candle::{DType, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{ForwardOptions, Mlp, Qwen3Model, linear, mlp_forward};
use crate::{ModelError, Result};

/// A mixture-of-experts feed-forward block.
pub(super) struct Moe {
    /// Router weights `[E, hidden]`.
    pub(super) router: Tensor,
    pub(super) experts: Vec<Mlp>,
}

/// Load-balancing statistics of the MoE layers of one or more forward passes.
///
/// Kept as sums so passes can be merged (e.g. every path trained separately) before forming the
/// loss, which is a product of two means and therefore not additive over passes.
#[derive(Debug, Clone, Default)]
pub struct AuxStats {
    pub(super) layers: Vec<LayerAux>,
}

#[derive(Debug, Clone)]
pub(super) struct LayerAux {
    /// Weighted number of tokens dispatched to each expert (top-k membership).
    counts: Vec<f64>,
    /// Weighted sum of router probabilities per expert (differentiable), `[E]`.
    prob_sum: Tensor,
    /// Sum of token weights.
    weight_sum: f64,
}

impl AuxStats {
    /// Whether no MoE layer contributed.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Adds another pass's statistics (same model).
    pub fn merge(&mut self, other: AuxStats) -> Result<()> {
        if self.layers.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.layers.is_empty() {
            return Ok(());
        }
        if other.layers.len() != self.layers.len() {
            return Err(ModelError::Input(
                "merging statistics of different models".into(),
            ));
        }
        for (a, b) in self.layers.iter_mut().zip(other.layers) {
            for (x, y) in a.counts.iter_mut().zip(&b.counts) {
                *x += y;
            }
            a.prob_sum = a.prob_sum.add(&b.prob_sum)?;
            a.weight_sum += b.weight_sum;
        }
        Ok(())
    }

    /// The load-balancing loss, averaged over MoE layers: per layer
    /// `E * sum_e (count_e / W) * (prob_e / W)` (the Switch / Qwen3-MoE form, where `count_e`
    /// counts tokens whose top-k contains `e`). `None` for a dense model.
    pub fn loss(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for l in &self.layers {
            if l.weight_sum <= 0.0 {
                continue;
            }
            let e = l.counts.len();
            let f: Vec<f32> = l
                .counts
                .iter()
                .map(|c| (c * e as f64 / (l.weight_sum * l.weight_sum)) as f32)
                .collect();
            let f = Tensor::from_vec(f, e, l.prob_sum.device())?;
            let term = (l.prob_sum.mul(&f)?).sum_all()?;
            total = Some(match total {
                None => term,
                Some(t) => t.add(&term)?,
            });
        }
        match total {
            Some(t) => Ok(Some((t / self.layers.len() as f64)?)),
            None => Ok(None),
        }
    }
}

impl Qwen3Model {
    /// One MoE layer over hidden states `h` `[T, hidden]`: the output and the layer's statistics.
    pub(super) fn moe_forward(
        &self,
        m: &Moe,
        h: &Tensor,
        opts: &ForwardOptions,
        layer: usize,
    ) -> Result<(Tensor, LayerAux)> {
        let (t, d) = h.dims2()?;
        let e = m.experts.len();
        let k = self.cfg.num_experts_per_tok;
        let mut logits = linear(h, &m.router)?;
        if opts.train && opts.router_noise > 0.0 {
            let mut rng = StdRng::seed_from_u64(opts.noise_seed ^ ((layer as u64 + 1) << 32));
            let noise: Vec<f32> = (0..t * e)
                .map(|_| {
                    let u1: f32 = rng.r#gen::<f32>().max(1e-12);
                    let u2: f32 = rng.r#gen::<f32>();
                    (-2.0 * u1.ln()).sqrt()
                        * (2.0 * std::f32::consts::PI * u2).cos()
                        * opts.router_noise
                })
                .collect();
            logits = (logits + Tensor::from_vec(noise, (t, e), &self.device)?)?;
        }
        let probs = candle_nn::ops::softmax(&logits, candle::D::Minus1)?;
        let pv = probs.to_vec2::<f32>()?;
        let mut topk = Vec::with_capacity(t * k);
        let weights_tok: Vec<f32> = match &opts.aux_token_weights {
            Some(w) => w.clone(),
            None => vec![1.0; t],
        };
        let mut counts = vec![0f64; e];
        let mut order: Vec<usize> = (0..e).collect();
        for (ti, row) in pv.iter().enumerate() {
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &ex in &order[..k] {
                topk.push(ex as u32);
                counts[ex] += weights_tok[ti] as f64;
            }
        }
        let idx = Tensor::from_vec(topk.clone(), (t, k), &self.device)?;
        let mut w = probs.gather(&idx, 1)?;
        if self.cfg.norm_topk_prob {
            w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        }
        let wflat = w.flatten_all()?;
        let mut tok_of: Vec<Vec<u32>> = vec![Vec::new(); e];
        let mut slot_of: Vec<Vec<u32>> = vec![Vec::new(); e];
        for (s, &ex) in topk.iter().enumerate() {
            tok_of[ex as usize].push((s / k) as u32);
            slot_of[ex as usize].push(s as u32);
        }
        let mut out = Tensor::zeros((t, d), DType::F32, &self.device)?;
        for (ex, mlp) in m.experts.iter().enumerate() {
            if tok_of[ex].is_empty() {
                continue;
            }
            let n = tok_of[ex].len();
            let toks = Tensor::from_slice(&tok_of[ex], n, &self.device)?;
            let slots = Tensor::from_slice(&slot_of[ex], n, &self.device)?;
            let xe = h.index_select(&toks, 0)?;
            let ye = mlp_forward(mlp, &xe)?;
            let we = wflat.index_select(&slots, 0)?.unsqueeze(1)?;
            out = out.index_add(&toks, &ye.broadcast_mul(&we)?, 0)?;
        }
        let wt = Tensor::from_vec(weights_tok.clone(), (t, 1), &self.device)?;
        let prob_sum = probs.broadcast_mul(&wt)?.sum(0)?;
        let weight_sum = weights_tok.iter().map(|&x| x as f64).sum();
        Ok((
            out,
            LayerAux {
                counts,
                prob_sum,
                weight_sum,
            },
        ))
    }
}
