//! `rl_log.jsonl`: one [`IterationLog`] per iteration (the learning curves), and the sampling
//! statistics of an iteration's episodes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rollouts::Episode;
use crate::{RecipeError, Result};

/// One line of `rl_log.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IterationLog {
    /// 0-based iteration.
    pub iteration: usize,
    /// Rollouts sampled, scored (not infrastructure errors), passed.
    pub rollouts: usize,
    pub scored: usize,
    pub passed: usize,
    /// passed / scored: the training pass rate of the weights that sampled this iteration.
    pub pass_rate: f64,
    /// Mean verifier reward of the scored rollouts.
    pub mean_reward: f64,
    /// Per-domain training pass rate.
    pub domain_pass_rate: BTreeMap<String, f64>,
    pub infra_errors: usize,
    /// Groups and groups whose rewards differ.
    pub groups: usize,
    pub groups_with_signal: usize,
    /// Scored rollouts with a reply cut at the rollout's `max_tokens` (the drift toward
    /// replies that never stop shows here first), and how many of them `overlong = "filter"`
    /// left out of the update.
    #[serde(default)]
    pub overlong: usize,
    #[serde(default)]
    pub overlong_filtered: usize,
    /// Paths (model calls) trained and their tree sizes.
    pub paths: usize,
    pub unique_tokens: u64,
    pub flat_tokens: u64,
    /// Generated tokens the loss saw (a shared token counts once per path).
    pub loss_tokens: u64,
    /// GSPO objective value of the first update.
    pub gspo_loss: f64,
    /// IcePop-masked fraction and clipped-turn fraction of the first update.
    pub masked_fraction: f64,
    pub clipped_fraction: f64,
    /// Variance of the importance weights `exp(logp_rollout - logp_train)` with one forward
    /// pass and with the MCLA mean of `mcla_passes` passes (first update, before its step).
    pub iw_var_single: f64,
    pub iw_var_mcla: f64,
    pub mcla_passes: usize,
    /// KL(policy || start checkpoint) on the trained paths' sampled tokens (k3 estimator;
    /// `None` when nothing was trained).
    pub kl_to_init: Option<f64>,
    /// Reverse KL(student || teacher) per token on the student's samples (distillation), as the
    /// first update's loss measured it (the packs of its minibatch).
    pub reverse_kl_to_teacher: Option<f64>,
    /// The same per domain over all of the iteration's trained tokens, before any update:
    /// the mean of `log pi_student(y_t) - log pi_expert(y_t)` over the sampled tokens (an
    /// unbiased estimate with either estimator).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub domain_reverse_kl_to_teacher: BTreeMap<String, f64>,
    /// Wall seconds sampling and training; generated tokens per second while sampling;
    /// unique tree tokens processed per second while training.
    pub sample_seconds: f64,
    pub train_seconds: f64,
    pub sample_tokens_per_s: f64,
    pub train_tokens_per_s: f64,
    /// Policy version serving the next iteration.
    pub policy_version: u64,
    /// Optimizer steps taken this iteration (`updates_per_iteration x minibatches`, fewer
    /// when there were fewer packs than minibatches, 0 without signal).
    #[serde(default)]
    pub steps: usize,
}

/// Whether the last `patience` iterations of `log` all had no group with reward variance
/// (`patience` 0: never).
pub(super) fn without_signal(log: &[IterationLog], patience: usize) -> bool {
    patience > 0
        && log.len() >= patience
        && log[log.len() - patience..]
            .iter()
            .all(|l| l.groups_with_signal == 0)
}

/// An i/o error naming its path.
pub(super) fn io(path: &Path, e: std::io::Error) -> RecipeError {
    RecipeError::Io(format!("{}: {e}", path.display()))
}

/// `v` as one line of JSON.
pub(super) fn json_line(v: &impl Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| RecipeError::Io(e.to_string()))
}

/// The log entry of iteration `iteration` as far as its samples tell: counts, pass rates, reward.
pub(super) fn sample_stats(iteration: usize, episodes: &[Episode]) -> IterationLog {
    use arbor_rollout::record::Status;
    let mut e = IterationLog {
        iteration,
        rollouts: episodes.len(),
        ..IterationLog::default()
    };
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut reward = 0.0;
    for x in episodes {
        if x.status == Status::InfraError {
            e.infra_errors += 1;
            continue;
        }
        e.scored += 1;
        reward += x.reward;
        let d = per.entry(x.domain.clone()).or_default();
        d.1 += 1;
        if x.status == Status::Passed {
            e.passed += 1;
            d.0 += 1;
        }
    }
    if e.scored > 0 {
        e.pass_rate = e.passed as f64 / e.scored as f64;
        e.mean_reward = reward / e.scored as f64;
    }
    e.domain_pass_rate = per
        .into_iter()
        .map(|(d, (p, n))| (d, p as f64 / n.max(1) as f64))
        .collect();
    e
}

/// Tokens the policy generated in `episodes` (the sampling throughput's numerator).
pub(super) fn generated_tokens(episodes: &[Episode]) -> u64 {
    episodes
        .iter()
        .flat_map(|e| &e.sequences)
        .map(|s| s.loss_mask.iter().filter(|&&m| m).count() as u64)
        .sum()
}

/// Reads `rl_log.jsonl` (a torn last line from a killed stage is ignored).
pub fn read_log(path: &Path) -> Vec<IterationLog> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Appends `v` as one JSON line and syncs it (the line is in the log before it counts).
pub(super) fn append_line(path: &Path, v: &impl Serialize) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    writeln!(f, "{}", json_line(v)?).map_err(|e| io(path, e))?;
    f.sync_data().map_err(|e| io(path, e))
}
