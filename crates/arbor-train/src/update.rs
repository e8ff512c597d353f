//! One RL or distillation update over the packs of an iteration ([`rl_update`]).
//!
//! 1. **Prepare.** Each pack becomes an [`RlBatch`] with the caller's path weights `c_k`, the
//!    teacher's log-probabilities (or distributions) when distilling, and the reference's
//!    log-probabilities: the KL penalty's target when `kl_coef != 0`, and on the way the
//!    sampled-token statistics KL(policy || reference) ([`k3`]) and the reverse KL to the
//!    teacher, both before any step.
//! 2. **Step.** `passes` passes over the packs dealt round-robin into `minibatches` groups; one
//!    AdamW step per group on the sum of its packs' [`rl_loss`] plus the MoE load-balancing
//!    term formed once from their merged statistics.
//!
//! The caller chooses which paths train, with which advantage (on the packs' sequences) and
//! which weight; every loss of the update is formed here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arbor_model::{AuxStats, Qwen3Model, train::AdamWTrainer};
use arbor_tree::Pack;
use candle::Tensor;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::loss::k3;
use crate::rl::{RlBatch, RlConfig, RlStats, rl_loss};

/// The per-token reverse-KL term of distillation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistillEstimator {
    /// docs/recipe.md §5: `r_t = log pi_expert(y_t) - log pi_student(y_t)` of the sampled token as a
    /// per-token advantage of a policy-gradient term.
    #[default]
    Sampled,
    /// The exact KL over the vocabulary at each sampled context: the same expectation without
    /// the variance of the sampled token (one more student forward per update).
    Full,
}

/// One pack of an update, with the teacher of its paths.
#[derive(Clone)]
pub struct UpdatePack {
    /// The group the pack belongs to (the recipe's domain); reverse-KL sums are kept per label.
    pub label: String,
    /// Tokens and paths: per-path loss masks, behaviour log-probabilities, turns, advantages.
    pub pack: Pack,
    /// The teacher the distillation term pulls toward (`None`: no distillation term).
    pub teacher: Option<Arc<Qwen3Model>>,
}

/// Everything one update reads besides the model and its optimizer.
#[derive(Clone)]
pub struct RlUpdate {
    /// The packs of the update's trees.
    pub packs: Vec<UpdatePack>,
    /// Paths over all packs: a path's weight `c_k` is `1 / total_paths` unless `weights` names it.
    pub total_paths: usize,
    /// Weight `c_k` by path (sequence) id.
    pub weights: HashMap<String, f32>,
    /// The reference policy (the stage's start): KL statistic, and the KL penalty's target.
    pub reference: Arc<Qwen3Model>,
    /// Loss settings of the first step. Step `s` draws MCLA routing with seed
    /// `config.mcla.seed + 1000 s` (room for up to 1000 passes per step, which use
    /// `seed + k`).
    pub config: RlConfig,
    /// How the reverse KL to a teacher is measured.
    pub estimator: DistillEstimator,
    /// Passes over the packs (at least one).
    pub passes: usize,
    /// Steps per pass: the packs are dealt round-robin into this many minibatches (fewer when
    /// there are fewer packs).
    pub minibatches: usize,
}

impl RlUpdate {
    /// The loss settings of step `step` (its own MCLA routing draws).
    fn step_config(&self, step: usize) -> RlConfig {
        let mut cfg = self.config;
        cfg.mcla.seed = self.config.mcla.seed + step as u64 * 1000;
        cfg
    }
}

/// What an update measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateStats {
    /// Statistics of the first step (before any update: on-policy ratios).
    pub first: RlStats,
    /// Optimizer steps taken.
    pub steps: usize,
    /// KL(policy || reference) per trained token before the update (k3 of
    /// `log pi_ref - log pi_behaviour`); `None` when nothing was trained.
    pub kl_to_reference: Option<f64>,
    /// Per pack label: sum over trained tokens of `logp_behaviour - logp_teacher`, and the count.
    pub reverse_kl: BTreeMap<String, (f64, u64)>,
}

/// One iteration's update of `model` with `opt` (module docs).
pub fn rl_update(
    model: &Qwen3Model,
    opt: &mut AdamWTrainer,
    update: &RlUpdate,
) -> Result<UpdateStats> {
    let mut st = UpdateStats::default();
    let batches = prepare(update, &mut st)?;
    let groups = update.minibatches.min(batches.len()).max(1);
    let mut steps = 0usize;
    for _pass in 0..update.passes.max(1) {
        for g in 0..groups {
            let cfg = update.step_config(steps);
            let group = batches.iter().skip(g).step_by(groups);
            let Some(stats) = step(model, opt, group, &cfg)? else {
                continue;
            };
            if steps == 0 {
                st.first = stats;
            }
            steps += 1;
        }
    }
    st.steps = steps;
    Ok(st)
}

/// The packs as loss batches (module docs, step 1), recording the KL statistics in `st`.
fn prepare(update: &RlUpdate, st: &mut UpdateStats) -> Result<Vec<RlBatch>> {
    let temperature = update.config.temperature;
    let mut batches = Vec::with_capacity(update.packs.len());
    let mut kl = (0.0f64, 0u64);
    for p in &update.packs {
        let mut b = RlBatch::from_flat(&p.pack.flat, update.total_paths)?;
        for path in &mut b.paths {
            if let Some(&w) = update.weights.get(&path.id) {
                path.weight = w;
            }
        }
        if let Some(teacher) = &p.teacher {
            match update.estimator {
                DistillEstimator::Sampled => b.set_expert(teacher, temperature)?,
                DistillEstimator::Full => b.set_expert_distribution(teacher, temperature)?,
            }
        }
        let lp = b.logprobs_under(&update.reference, temperature)?;
        let reverse_kl = sampled_kls(&b, &lp, &mut kl);
        if reverse_kl.1 > 0 {
            let r = st.reverse_kl.entry(p.label.clone()).or_default();
            r.0 += reverse_kl.0;
            r.1 += reverse_kl.1;
        }
        // The same reference log-probabilities are the KL penalty's target.
        b.reference_logprobs = (update.config.kl_coef != 0.0).then_some(lp);
        batches.push(b);
    }
    st.kl_to_reference = (kl.1 > 0).then(|| kl.0 / kl.1 as f64);
    Ok(batches)
}

/// Over `b`'s trained tokens: adds k3 of `d = logp_ref - logp_behaviour` and its count to `kl`
/// (one running sum over all packs), and returns the sum of `logp_behaviour - logp_teacher`
/// over the tokens the teacher scored, with their count.
fn sampled_kls(b: &RlBatch, reference: &[f32], kl: &mut (f64, u64)) -> (f64, u64) {
    let mut reverse_kl = (0.0f64, 0u64);
    for p in &b.paths {
        for ((&i, &m), &old) in p.indices.iter().zip(&p.loss_mask).zip(&p.old_logprobs) {
            if m {
                kl.0 += k3((reference[i as usize] - old) as f64);
                kl.1 += 1;
                if let Some(e) = b.expert_logprob_of(i as usize) {
                    reverse_kl.0 += (old - e) as f64;
                    reverse_kl.1 += 1;
                }
            }
        }
    }
    reverse_kl
}

/// One AdamW step on the summed loss of `batches` (module docs, step 2); `None`, and no step,
/// when there are none.
fn step<'a>(
    model: &Qwen3Model,
    opt: &mut AdamWTrainer,
    batches: impl Iterator<Item = &'a RlBatch>,
    cfg: &RlConfig,
) -> Result<Option<RlStats>> {
    let (mut stats, mut aux, mut total): (RlStats, AuxStats, Option<Tensor>) =
        (RlStats::default(), AuxStats::default(), None);
    for b in batches {
        let out = rl_loss(model, b, cfg)?;
        stats.merge(&out.stats);
        aux.merge(out.aux)?;
        total = Some(match total {
            None => out.loss,
            Some(x) => (x + out.loss)?,
        });
    }
    let Some(mut loss) = total else {
        return Ok(None);
    };
    if let Some(a) = aux.loss()? {
        loss = (loss + (a * model.config().router_aux_loss_coef)?)?;
    }
    opt.backward_step(&loss)?;
    Ok(Some(stats))
}
