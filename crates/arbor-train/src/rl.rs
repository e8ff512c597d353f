//! The model-level entry points a trainer calls: [`RlBatch`] (a flattened tree or pack with its
//! per-path RL fields), [`rl_loss`] and [`sft_loss_on`].

use std::sync::Arc;

use arbor_model::{AuxStats, ForwardOptions, Qwen3Model, TreeBatch, TreeMask};
use arbor_tree::{FlatTree, LossNormalization, Pack};
use candle::Tensor;
use serde::{Deserialize, Serialize};

use crate::loss::{
    DistillStats, ExpertDistribution, ExpertTarget, GspoConfig, GspoStats, IcePop, LengthNorm,
    RlPath, rl_objective_with,
};
use crate::mcla::{ImportanceStats, Mcla, mcla_logprobs};
use crate::{Result, TrainError};

/// Settings of [`rl_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RlConfig {
    /// Clip range of the turn ratio.
    pub clip_eps: f32,
    /// IcePop token masking (`None` = off).
    pub icepop: Option<IcePop>,
    /// Coefficient of the distillation term (used when the batch has expert log-probabilities).
    pub distill_coef: f32,
    /// Log-probability averaging.
    pub mcla: Mcla,
    /// Sampling temperature of the rollouts: the training log-probabilities are those of
    /// `logits / temperature`, the distribution the behaviour log-probabilities came from.
    #[serde(default = "one")]
    pub temperature: f32,
    /// Coefficient `beta` of the KL penalty toward the batch's reference log-probabilities
    /// ([`crate::loss::kl_penalty`]; used when the batch carries them, 0 = off).
    #[serde(default)]
    pub kl_coef: f32,
    /// Divisors of GSPO's turn and path sums ([`LengthNorm`]).
    #[serde(default)]
    pub length_norm: LengthNorm,
}

fn one() -> f32 {
    1.0
}

impl Default for RlConfig {
    /// `eps = 0.2`, IcePop `[0.5, 2]`, no distillation, MCLA off, temperature 1.
    fn default() -> Self {
        Self {
            clip_eps: 0.2,
            icepop: Some(IcePop::default()),
            distill_coef: 0.0,
            mcla: Mcla::default(),
            temperature: 1.0,
            kl_coef: 0.0,
            length_norm: LengthNorm::Mean,
        }
    }
}

/// A flattened tree (or one pack of it) ready for [`rl_loss`].
#[derive(Debug, Clone)]
pub struct RlBatch {
    /// Tokens, positions and the ancestor relation.
    pub tree: TreeBatch,
    /// Every path of the flattening, with its own per-token fields and its weight `c_k`.
    pub paths: Vec<RlPath>,
    /// `g_t` per token: weights of the MoE load-balancing statistics.
    pub aux_token_weights: Vec<f32>,
    /// The expert's log-probability of each token (for distillation), see [`Self::set_expert`].
    pub expert_logprobs: Option<Vec<f32>>,
    /// The expert's whole next-token distribution at each trained token (for the exact
    /// reverse KL), see [`Self::set_expert_distribution`]. Takes precedence over
    /// `expert_logprobs`.
    pub expert_distribution: Option<ExpertDistribution>,
    /// The reference policy's log-probability of each token, for the KL penalty
    /// ([`RlConfig::kl_coef`]); computed by the caller (it usually has them for logging).
    pub reference_logprobs: Option<Vec<f32>>,
}

impl RlBatch {
    /// A batch from a flattening whose paths are part of an optimizer step of `total_paths`
    /// paths: each path gets weight `1 / total_paths`, so the losses of all packs of the step
    /// add up to the mean over its paths. Paths read their own loss mask, behaviour logprobs and
    /// turns (per-path overrides included) and their advantage, which must be set.
    pub fn from_flat(flat: &FlatTree, total_paths: usize) -> Result<Self> {
        if total_paths < flat.paths.len() || total_paths == 0 {
            return Err(TrainError::Input(format!(
                "{} paths in a step of {total_paths}",
                flat.paths.len()
            )));
        }
        let weight = 1.0 / total_paths as f32;
        let mut paths = Vec::with_capacity(flat.paths.len());
        for (k, p) in flat.paths.iter().enumerate() {
            let advantage = p
                .advantage
                .ok_or_else(|| TrainError::MissingAdvantage { path: p.id.clone() })?
                as f32;
            paths.push(RlPath {
                id: p.id.clone(),
                indices: p.indices(),
                loss_mask: flat.path_loss_mask(k),
                old_logprobs: flat.path_logprobs(k),
                turns: flat.path_turns(k),
                advantage,
                weight,
            });
        }
        let mask = TreeMask::new(flat.parent.clone(), flat.subtree_end.clone())?;
        let tree = TreeBatch::with_mask(
            flat.input_ids.clone(),
            flat.position_ids.clone(),
            Arc::new(mask),
        )?;
        Ok(Self {
            tree,
            paths,
            aux_token_weights: flat.leaf_count.iter().map(|&g| g as f32).collect(),
            expert_logprobs: None,
            expert_distribution: None,
            reference_logprobs: None,
        })
    }

    /// A batch from one pack of a packing (weights `1 / K` with `K` the packing's path count).
    pub fn from_pack(pack: &Pack) -> Result<Self> {
        Self::from_flat(&pack.flat, pack.normalizer.num_paths as usize)
    }

    /// Tokens that some path trains: the only ones whose log-probability is needed.
    pub fn wanted(&self) -> Vec<bool> {
        let mut w = vec![false; self.tree.len()];
        for p in &self.paths {
            for (&i, &m) in p.indices.iter().zip(&p.loss_mask) {
                if m && let Some(x) = w.get_mut(i as usize) {
                    *x = true;
                }
            }
        }
        w
    }

    /// Scores the batch's tokens with `expert` (deterministic routing, no gradient) for the
    /// distillation term, at the student's sampling `temperature` (the reverse KL is then
    /// between the two tempered distributions).
    pub fn set_expert(&mut self, expert: &Qwen3Model, temperature: f32) -> Result<()> {
        self.expert_logprobs = Some(self.logprobs_under(expert, temperature)?);
        Ok(())
    }

    /// Log-probabilities of the batch's tokens under `model` at `temperature` (deterministic
    /// routing, no gradient), computed at the [`Self::wanted`] tokens only.
    pub fn logprobs_under(&self, model: &Qwen3Model, temperature: f32) -> Result<Vec<f32>> {
        let wanted = self.wanted();
        let opts = ForwardOptions {
            temperature,
            ..ForwardOptions::default()
        };
        let (lp, _) = model.token_logprobs_where(&self.tree, &opts, Some(&wanted))?;
        Ok(lp.detach().to_vec1::<f32>()?)
    }

    /// Scores the batch with `expert`'s whole next-token distribution (at `temperature`) at
    /// every trained token, for the exact per-token reverse KL
    /// ([`crate::loss::distill_full_loss`]).
    pub fn set_expert_distribution(&mut self, expert: &Qwen3Model, temperature: f32) -> Result<()> {
        let tokens = self.trained_tokens();
        let opts = ForwardOptions {
            temperature,
            ..ForwardOptions::default()
        };
        let (rows, _) = expert.next_token_log_softmax(&self.tree, &opts, &tokens)?;
        let vocab = rows.dim(1)?;
        self.expert_distribution = Some(ExpertDistribution {
            tokens,
            log_probs: rows.detach().flatten_all()?.to_vec1::<f32>()?,
            vocab,
        });
        Ok(())
    }

    /// The expert's log-probability of token `t` (the sampled one) from whichever of
    /// [`Self::set_expert`] / [`Self::set_expert_distribution`] scored the batch; `None` when
    /// neither did or `t` was not scored.
    pub fn expert_logprob_of(&self, t: usize) -> Option<f32> {
        if let Some(d) = &self.expert_distribution {
            let row = d.row_of(t as u32)?;
            let id = *self.tree.input_ids.get(t)? as usize;
            return d.log_probs.get(row * d.vocab + id).copied();
        }
        self.expert_logprobs.as_ref()?.get(t).copied()
    }

    /// Indices of [`Self::wanted`] tokens, ascending.
    fn trained_tokens(&self) -> Vec<u32> {
        self.wanted()
            .iter()
            .enumerate()
            .filter(|(_, w)| **w)
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// What one [`rl_loss`] call measured; [`RlStats::merge`] combines the packs of a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RlStats {
    /// GSPO / IcePop counts.
    pub gspo: GspoStats,
    /// Distillation sums (zero when off).
    pub distill: DistillStats,
    /// Value of the GSPO term (sum over calls of a step gives the step's value).
    pub gspo_loss: f64,
    /// Value of the distillation term before its coefficient.
    pub distill_loss: f64,
    /// Value of the KL-penalty term before its coefficient (0 when off).
    pub kl_penalty: f64,
    /// Forward passes averaged (MCLA `K` actually run).
    pub mcla_passes: usize,
    /// Importance weights `exp(logp_rollout - logp_train)` with one pass (`K = 1`).
    pub iw_single: ImportanceStats,
    /// The same with the MCLA mean (equal to `iw_single` when `K = 1`).
    pub iw_mcla: ImportanceStats,
}

impl RlStats {
    /// Fraction of loss tokens IcePop masked.
    pub fn masked_fraction(&self) -> f64 {
        self.gspo.masked_fraction()
    }

    /// Adds another pack's statistics.
    pub fn merge(&mut self, o: &RlStats) {
        self.gspo.merge(&o.gspo);
        self.distill.merge(&o.distill);
        self.gspo_loss += o.gspo_loss;
        self.distill_loss += o.distill_loss;
        self.kl_penalty += o.kl_penalty;
        self.mcla_passes = self.mcla_passes.max(o.mcla_passes);
        self.iw_single.merge(&o.iw_single);
        self.iw_mcla.merge(&o.iw_mcla);
    }
}

/// The result of [`rl_loss`].
#[derive(Debug, Clone)]
pub struct RlOutput {
    /// `gspo + distill_coef * distill` (without the MoE load-balancing term).
    pub loss: Tensor,
    /// MoE load-balancing statistics of this batch. The auxiliary loss is a product of means,
    /// not additive over packs: merge the packs' stats, then add
    /// `aux.loss()? * router_aux_loss_coef` once per step (or use [`RlOutput::with_aux`] for a
    /// step made of this single batch).
    pub aux: AuxStats,
    /// Measurements for logging.
    pub stats: RlStats,
}

impl RlOutput {
    /// `loss + coef * aux_loss` (for a step made of this batch alone).
    pub fn with_aux(&self, coef: f64) -> Result<Tensor> {
        match self.aux.loss()? {
            Some(a) => Ok((&self.loss + (a * coef)?)?),
            None => Ok(self.loss.clone()),
        }
    }
}

/// The RL loss of one batch: MCLA log-probabilities, turn-level GSPO with IcePop, plus the
/// distillation term when the batch carries the expert's log-probabilities (or distributions)
/// and `distill_coef != 0`, plus the KL penalty when it carries reference log-probabilities
/// and `kl_coef != 0`. The exact reverse KL takes the student's distributions from one
/// more forward pass with deterministic routing.
pub fn rl_loss(model: &Qwen3Model, batch: &RlBatch, cfg: &RlConfig) -> Result<RlOutput> {
    let wanted = batch.wanted();
    let mc = mcla_logprobs(
        model,
        &batch.tree,
        Some(&wanted),
        Some(batch.aux_token_weights.clone()),
        &cfg.mcla,
        cfg.temperature,
    )?;
    let gcfg = GspoConfig {
        clip_eps: cfg.clip_eps,
        icepop: cfg.icepop,
        length_norm: cfg.length_norm,
    };
    let student_rows = match &batch.expert_distribution {
        Some(d) if cfg.distill_coef != 0.0 => {
            let opts = ForwardOptions {
                temperature: cfg.temperature,
                ..ForwardOptions::default()
            };
            Some(
                model
                    .next_token_log_softmax(&batch.tree, &opts, &d.tokens)?
                    .0,
            )
        }
        _ => None,
    };
    let expert = match (&batch.expert_distribution, &student_rows) {
        (Some(expert), Some(student)) => Some(ExpertTarget::Distribution { student, expert }),
        _ => batch.expert_logprobs.as_deref().map(ExpertTarget::Tokens),
    };
    let terms = rl_objective_with(&mc.mean, &batch.paths, &gcfg, expert, cfg.distill_coef)?;
    let mut stats = RlStats {
        gspo: terms.gspo_stats,
        gspo_loss: terms.gspo.to_scalar::<f32>()? as f64,
        mcla_passes: mc.passes,
        iw_single: ImportanceStats::new(&mc.single, &batch.paths),
        iw_mcla: ImportanceStats::new(&mc.mean_values, &batch.paths),
        ..RlStats::default()
    };
    if let Some((d, ds)) = &terms.distill {
        stats.distill = *ds;
        stats.distill_loss = d.to_scalar::<f32>()? as f64;
    }
    let mut total = terms.total;
    if let (Some(reference), true) = (&batch.reference_logprobs, cfg.kl_coef != 0.0) {
        let (kl, _) = crate::loss::kl_penalty(&mc.mean, reference, &batch.paths)?;
        stats.kl_penalty = kl.to_scalar::<f32>()? as f64;
        total = (total + (kl * cfg.kl_coef as f64)?)?;
    }
    tracing::debug!(
        paths = batch.paths.len(),
        masked = stats.gspo.masked_fraction(),
        loss = stats.gspo_loss,
        "rl loss"
    );
    Ok(RlOutput {
        loss: total,
        aux: mc.aux,
        stats,
    })
}

/// SFT on a flattened tree or pack: NLL of the model-generated tokens with `arbor-tree`'s exact
/// loss weights (`weights` from [`FlatTree::loss_weights_with`] or a pack's `loss_weight`).
/// Returns the loss and the MoE statistics (weighted by `g_t`).
pub fn sft_loss_on(
    model: &Qwen3Model,
    flat: &FlatTree,
    weights: &[f32],
) -> Result<(Tensor, AuxStats)> {
    let mask = TreeMask::new(flat.parent.clone(), flat.subtree_end.clone())?;
    let tree = TreeBatch::with_mask(
        flat.input_ids.clone(),
        flat.position_ids.clone(),
        Arc::new(mask),
    )?;
    let wanted: Vec<bool> = weights.iter().map(|&w| w != 0.0).collect();
    let opts = ForwardOptions {
        aux_token_weights: Some(flat.leaf_count.iter().map(|&g| g as f32).collect()),
        ..ForwardOptions::default()
    };
    let (lp, aux) = model.token_logprobs_where(&tree, &opts, Some(&wanted))?;
    Ok((crate::loss::sft_loss(&lp, weights)?, aux))
}

/// SFT weights of a flattening normalised over its own paths (token mean by default).
pub fn sft_weights(flat: &FlatTree, norm: LossNormalization) -> Vec<f32> {
    flat.loss_weights(norm)
        .into_iter()
        .map(|w| w as f32)
        .collect()
}
