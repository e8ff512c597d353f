//! The SFT stage's training (module docs of [`super`], "Training"): the packed forest of the
//! training sessions and the held-out packs, the learning-rate schedule, the seeded pack order,
//! one optimizer step, and the loop that logs, evaluates and checkpoints.

use std::time::Instant;

use arbor_model::train::AdamWTrainer;
use arbor_model::{AuxStats, Qwen3Model};
use arbor_tree::{Normalizer, Pack, PackOptions, Sequence, TrajectoryTree, pack_tree};
use candle::Tensor;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::data::{SftData, SftSession, split_sessions};
use super::output::StageDir;
use super::{SftConfig, SftEvent, SftStepLog};
use crate::rl::sft_loss_on;
use crate::{Result, TrainError};

/// The data of a stage ready to step through.
pub(super) struct Plan {
    /// The forest of the training sessions.
    pub tree: TrajectoryTree,
    /// Its packs (an epoch visits each once).
    pub packs: Vec<Pack>,
    /// Packs of the held-out sessions.
    pub eval_packs: Vec<Pack>,
    /// Training sessions.
    pub train: usize,
    /// Held-out sessions.
    pub eval: usize,
    /// Optimizer steps of the stage.
    pub total_steps: usize,
}

impl Plan {
    /// Splits `data` (seeded), packs the training forest and the held-out sessions once, and
    /// counts the steps (`steps`, or `epochs` passes over the packs).
    pub(super) fn new(data: &SftData, cfg: &SftConfig) -> Result<Plan> {
        let (train_idx, eval_idx) = split_sessions(data.sessions.len(), cfg);
        if train_idx.is_empty() {
            return Err(TrainError::Input(format!(
                "no training sessions: {} kept, {} filtered out by status {:?} / domains {:?}, {} without calls",
                data.sessions.len(),
                data.filtered,
                cfg.statuses,
                cfg.domains,
                data.missing
            )));
        }
        let train: Vec<&SftSession> = train_idx.iter().map(|&i| &data.sessions[i]).collect();
        let eval: Vec<&SftSession> = eval_idx.iter().map(|&i| &data.sessions[i]).collect();
        let (tree, packs) = packs_of(&train, cfg.max_tokens_per_pack)?;
        let eval_packs = if eval.is_empty() {
            Vec::new()
        } else {
            packs_of(&eval, cfg.max_tokens_per_pack)?.1
        };
        let per = cfg.packs_per_step.max(1);
        let steps_per_epoch = packs.len().div_ceil(per).max(1);
        let total_steps = cfg
            .steps
            .unwrap_or_else(|| ((cfg.epochs * steps_per_epoch as f64).ceil() as usize).max(1));
        Ok(Plan {
            tree,
            packs,
            eval_packs,
            train: train.len(),
            eval: eval.len(),
            total_steps,
        })
    }
}

/// Packs of the forest of `sessions` under `budget`.
fn packs_of(sessions: &[&SftSession], budget: usize) -> Result<(TrajectoryTree, Vec<Pack>)> {
    let seqs: Vec<Sequence> = sessions
        .iter()
        .flat_map(|s| s.sequences.iter().cloned())
        .collect();
    let tree = TrajectoryTree::from_sequences(&seqs)
        .map_err(|e| TrainError::Input(format!("trajectory tree: {e}")))?;
    let (_, packs) = pack_tree(&tree, &PackOptions::new(budget))
        .map_err(|e| TrainError::Input(format!("packing: {e}")))?;
    Ok((tree, packs))
}

/// Mean NLL of the generated tokens of `packs` (packed from one tree with its global
/// normalizer, so the packs' weighted losses add up to the whole token mean). `None` when there
/// is nothing to score.
pub fn packs_loss(model: &Qwen3Model, packs: &[Pack]) -> Result<Option<f64>> {
    let mut total = 0.0f64;
    let mut any = false;
    for p in packs {
        if p.loss_weight.iter().all(|&w| w == 0.0) {
            continue;
        }
        let (loss, _) = sft_loss_on(model, &p.flat, &p.loss_weight)?;
        total += loss.to_scalar::<f32>()? as f64;
        any = true;
    }
    Ok(any.then_some(total))
}

/// Mean NLL (token mean over every sequence's `loss_mask` tokens) of `seqs` under `model`,
/// computed as a tree packed under `budget`: the held-out metric, public so callers can score a
/// checkpoint on any sequences.
pub fn sequences_loss(model: &Qwen3Model, seqs: &[Sequence], budget: usize) -> Result<Option<f64>> {
    let tree = TrajectoryTree::from_sequences(seqs)
        .map_err(|e| TrainError::Input(format!("trajectory tree: {e}")))?;
    let (_, packs) = pack_tree(&tree, &PackOptions::new(budget))
        .map_err(|e| TrainError::Input(format!("packing: {e}")))?;
    packs_loss(model, &packs)
}

/// Learning rate of 0-based step `s` of `total`: linear warm-up, then cosine to the floor.
pub fn lr_at(cfg: &SftConfig, s: usize, total: usize) -> f64 {
    if cfg.warmup_steps > 0 && s < cfg.warmup_steps {
        return cfg.lr * (s + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let x = ((s.saturating_sub(cfg.warmup_steps)) as f64 / span).min(1.0);
    let floor = cfg.lr * cfg.min_lr_ratio;
    floor + (cfg.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
}

/// The packs of 0-based step `s`: epoch `e` visits the packs in a permutation seeded by
/// `(seed, e)`, so the order is the same after a resume.
fn step_packs(cfg: &SftConfig, n_packs: usize, s: usize) -> (usize, Vec<usize>) {
    let per = cfg.packs_per_step.max(1);
    let steps_per_epoch = n_packs.div_ceil(per).max(1);
    let epoch = s / steps_per_epoch;
    let k = s % steps_per_epoch;
    let mut order: Vec<usize> = (0..n_packs).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        cfg.seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(epoch as u64),
    );
    order.shuffle(&mut rng);
    let end = ((k + 1) * per).min(n_packs);
    (epoch, order[k * per..end].to_vec())
}

/// One optimizer step (0-based `s`): the packs of the step, weighted over the step's own paths,
/// one summed loss (plus the MoE load-balancing term), one AdamW update. Its log line, without
/// a held-out loss; `None` when the step has no generated token (nothing is updated).
fn train_step(
    model: &Qwen3Model,
    opt: &mut AdamWTrainer,
    plan: &Plan,
    cfg: &SftConfig,
    s: usize,
) -> Result<Option<SftStepLog>> {
    let t0 = Instant::now();
    let lr = lr_at(cfg, s, plan.total_steps);
    opt.params_mut().lr = lr;
    let (epoch, chosen) = step_packs(cfg, plan.packs.len(), s);
    let step_norm = chosen
        .iter()
        .map(|&i| plan.packs[i].flat.normalizer())
        .fold(Normalizer::default(), |a, b| a.merge(b));
    let (mut total, mut aux) = (None::<Tensor>, AuxStats::default());
    let (mut tokens, mut flat_tokens, mut paths) = (0u64, 0u64, 0u64);
    for &i in &chosen {
        let flat = &plan.packs[i].flat;
        let w: Vec<f32> = flat
            .loss_weights_with(cfg.normalization, &step_norm)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        tokens += flat.input_ids.len() as u64;
        flat_tokens += flat.paths.iter().map(|p| p.len as u64).sum::<u64>();
        paths += flat.paths.len() as u64;
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        let (l, a) = sft_loss_on(model, flat, &w)?;
        aux.merge(a)?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    let Some(nll) = total else {
        return Ok(None);
    };
    let loss_value = nll.to_scalar::<f32>()? as f64;
    let mut loss = nll;
    if let Some(a) = aux.loss()? {
        loss = (loss + (a * model.config().router_aux_loss_coef)?)?;
    }
    opt.backward_step(&loss)?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Some(SftStepLog {
        step: s + 1,
        epoch,
        lr,
        loss: loss_value,
        tokens,
        flat_tokens,
        loss_tokens: step_norm.loss_tokens,
        paths,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        eval_loss: None,
    }))
}

/// Steps `start..plan.total_steps`: each step's line appended to the log, the held-out loss
/// every `eval_every` steps, the periodic checkpoint every `save_every` steps (the last step
/// gets neither: the caller measures and saves the final model).
pub(super) fn run_steps(
    model: &Qwen3Model,
    plan: &Plan,
    cfg: &SftConfig,
    dir: &mut StageDir,
    start: usize,
    eval_before: Option<f64>,
    progress: &mut dyn FnMut(SftEvent<'_>),
) -> Result<()> {
    let total_steps = plan.total_steps;
    let mut opt = AdamWTrainer::new(model.vars(), cfg.lr, cfg.weight_decay)?;
    for s in start..total_steps {
        let Some(mut line) = train_step(model, &mut opt, plan, cfg, s)? else {
            tracing::warn!(step = s + 1, "step without generated tokens skipped");
            continue;
        };
        let step = line.step;
        if cfg.eval_every > 0 && step % cfg.eval_every == 0 && step < total_steps {
            line.eval_loss = packs_loss(model, &plan.eval_packs)?;
            if let Some(l) = line.eval_loss {
                progress(SftEvent::Eval { step, loss: l });
            }
        }
        let line = dir.append(line)?;
        progress(SftEvent::Step(line));
        if cfg.save_every > 0 && step % cfg.save_every == 0 && step < total_steps {
            dir.save_checkpoint(model, step, eval_before)?;
        }
    }
    Ok(())
}
