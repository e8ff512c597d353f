//! The numbers of a run report, computed from `results.jsonl` alone.
//!
//! Definitions (the Markdown report and `arbor report --json` share them):
//!
//! - A **task** here is a (task id, scaffold) pair: samples of one task under
//!   two scaffolds are different experiments and are never pooled into one
//!   pass@k estimate.
//! - **Scored** rollouts are those whose status is not `infra_error`; an
//!   infrastructure failure says nothing about the policy, so it is kept out
//!   of every rate and reward. A task with no scored sample drops out of
//!   pass@k entirely.
//! - **pass@1** = mean over tasks of (passed / scored samples).
//! - **pass@k** = mean over tasks with at least `k` scored samples of the
//!   unbiased estimator `1 - C(n-c, k) / C(n, k)` (n scored, c passed).
//! - **Mean reward** is over scored rollouts, with the standard error of the
//!   mean (sample standard deviation / sqrt(n)).
//! - Percentiles are nearest-rank, like the end-of-run summary's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{RolloutResult, Status};

/// The policy label of runs that replay task oracles: they test the
/// infrastructure and say nothing about a model.
pub const ORACLE_POLICY: &str = "scripted-oracle";

/// A mean with its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanSe {
    pub mean: f64,
    /// Standard error of the mean; `None` with fewer than two values.
    pub se: Option<f64>,
    pub n: usize,
}

impl MeanSe {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<MeanSe> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let se = (n > 1).then(|| {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        });
        Some(MeanSe { mean, se, n })
    }
}

/// pass@k for one `k`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PassAtK {
    pub k: u32,
    pub value: f64,
    /// Tasks with at least `k` scored samples (the ones averaged).
    pub tasks: usize,
}

/// Rollout counts by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub passed: usize,
    pub failed: usize,
    pub agent_failure: usize,
    pub infra_error: usize,
}

/// One row of the per-domain or per-scaffold table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStats {
    /// The domain or scaffold name.
    pub name: String,
    pub rollouts: usize,
    pub scored: usize,
    pub passed: usize,
    /// Tasks (task, scaffold pairs) in the group with a scored sample.
    pub tasks: usize,
    pub pass_at_1: Option<f64>,
    pub mean_reward: Option<MeanSe>,
    pub infra_errors: usize,
    pub agent_failures: usize,
    /// Mean turns over scored rollouts.
    pub mean_turns: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Rollouts that carry one failure class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureClass {
    /// `sandbox`, `upstream`, `verifier`, `setup`, `agent_timeout`, `agent_error`...
    pub class: String,
    pub count: usize,
    /// Of `count`, how many ended as `infra_error` (the rest are the agent's).
    pub infra_errors: usize,
    pub agent_failures: usize,
    /// The first message seen, shortened, to make the class concrete.
    pub example: String,
}

/// Token totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenUse {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// Mean prompt + completion tokens per rollout (final attempts).
    pub mean_per_rollout: Option<f64>,
    pub format_errors: u64,
}

/// p50/p90 of a duration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub total: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

/// Time use. Durations are each rollout's final attempt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeUse {
    pub total_s: Spread,
    pub agent_s: Spread,
    pub verify_s: Spread,
    /// Per agent step overhead (not model call, not command), every step of
    /// every rollout pooled.
    pub overhead_steps: usize,
    pub overhead_p50_ms: f64,
    pub overhead_p99_ms: f64,
    /// Total model-call and command time over all rollouts, seconds.
    pub model_s: f64,
    pub action_s: f64,
    /// From the earliest rollout start (finished_at - total_s) to the last
    /// finish; spans pauses between resumed invocations.
    pub wall_s: f64,
}

/// Everything a report shows, in one serializable object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Distinct policy labels in the run.
    pub policies: Vec<String>,
    /// Every rollout used the `scripted-oracle` policy: an infrastructure test.
    pub infrastructure_test: bool,
    /// Rollouts that used the `scripted-oracle` policy.
    pub oracle_rollouts: usize,
    pub rollouts: usize,
    pub scored: usize,
    pub status: StatusCounts,
    /// Tasks (task, scaffold pairs) seen / with a scored sample.
    pub tasks: usize,
    pub scored_tasks: usize,
    /// Largest number of scored samples of one task.
    pub max_samples: u32,
    pub pass_at_1: Option<f64>,
    /// pass@k for k = 1, 2, 4, ... up to `max_samples`, and `max_samples`.
    pub pass_at_k: Vec<PassAtK>,
    pub mean_reward: Option<MeanSe>,
    /// Rollouts that needed more than one attempt, and the extra attempts.
    pub retried_rollouts: usize,
    pub extra_attempts: u64,
    pub by_domain: Vec<GroupStats>,
    pub by_scaffold: Vec<GroupStats>,
    /// Sorted by count, largest first.
    pub failures: Vec<FailureClass>,
    pub tokens: TokenUse,
    pub time: TimeUse,
}

/// Unbiased pass@k of one task with `n` samples of which `c` passed:
/// `1 - C(n-c, k) / C(n, k)`, computed as a product so large `n` does not
/// overflow. `None` if `k` is 0 or exceeds `n`.
pub fn pass_at_k(n: u32, c: u32, k: u32) -> Option<f64> {
    if k == 0 || k > n || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    // C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    let ratio: f64 = (n - c + 1..=n)
        .map(|i| 1.0 - f64::from(k) / f64::from(i))
        .product();
    Some(1.0 - ratio)
}

/// The k values reported for `max` samples: powers of two up to `max`, and `max`.
pub fn k_values(max: u32) -> Vec<u32> {
    let mut ks = Vec::new();
    let mut k = 1u32;
    while k <= max {
        ks.push(k);
        match k.checked_mul(2) {
            Some(next) => k = next,
            None => break,
        }
    }
    if max > 0 && ks.last() != Some(&max) {
        ks.push(max);
    }
    ks
}

/// Nearest-rank `q`-quantile of `v` (sorted in place); 0 when empty.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Scored-sample and pass counts per (task id, scaffold).
fn task_counts<'a>(
    results: impl Iterator<Item = &'a RolloutResult>,
) -> BTreeMap<(&'a str, &'a str), (u32, u32)> {
    let mut tasks: BTreeMap<(&str, &str), (u32, u32)> = BTreeMap::new();
    for r in results {
        let e = tasks
            .entry((r.key.task_id.as_str(), r.key.scaffold.as_str()))
            .or_default();
        if r.status.is_scored() {
            e.0 += 1;
            if r.passed {
                e.1 += 1;
            }
        }
    }
    tasks
}

/// Mean over tasks with at least `k` scored samples; `None` if there are none.
fn mean_pass_at_k(tasks: &BTreeMap<(&str, &str), (u32, u32)>, k: u32) -> (Option<f64>, usize) {
    let v: Vec<f64> = tasks
        .values()
        .filter_map(|&(n, c)| pass_at_k(n, c, k))
        .collect();
    let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    (mean, v.len())
}

fn group<'a>(
    results: &'a [RolloutResult],
    key: impl Fn(&RolloutResult) -> &str,
) -> Vec<GroupStats> {
    let mut by: BTreeMap<&str, Vec<&'a RolloutResult>> = BTreeMap::new();
    for r in results {
        by.entry(key(r)).or_default().push(r);
    }
    by.into_iter()
        .map(|(name, rs)| {
            let scored: Vec<&RolloutResult> = rs
                .iter()
                .copied()
                .filter(|r| r.status.is_scored())
                .collect();
            let tasks = task_counts(rs.iter().copied());
            let (pass_at_1, scored_tasks) = mean_pass_at_k(&tasks, 1);
            let rewards: Vec<f64> = scored.iter().map(|r| r.reward).collect();
            GroupStats {
                name: name.to_string(),
                rollouts: rs.len(),
                scored: scored.len(),
                passed: scored.iter().filter(|r| r.passed).count(),
                tasks: scored_tasks,
                pass_at_1,
                mean_reward: MeanSe::of(&rewards),
                infra_errors: rs.iter().filter(|r| r.status == Status::InfraError).count(),
                agent_failures: rs
                    .iter()
                    .filter(|r| r.status == Status::AgentFailure)
                    .count(),
                mean_turns: (!scored.is_empty()).then(|| {
                    scored.iter().map(|r| f64::from(r.turns)).sum::<f64>() / scored.len() as f64
                }),
                prompt_tokens: rs.iter().map(|r| r.prompt_tokens).sum(),
                completion_tokens: rs.iter().map(|r| r.completion_tokens).sum(),
            }
        })
        .collect()
}

/// Shortens a failure message to one line of at most `max` characters.
fn shorten(msg: &str, max: usize) -> String {
    let line = msg
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if line.chars().count() <= max {
        return line.to_string();
    }
    let cut: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

fn spread(values: impl Iterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    Spread {
        total: v.iter().sum(),
        p50: percentile(&mut v, 0.5),
        p90: percentile(&mut v, 0.9),
        max: v.last().copied().unwrap_or(0.0),
    }
}

/// Computes every report number from a run's results.
pub fn compute(results: &[RolloutResult]) -> Stats {
    let mut s = Stats {
        rollouts: results.len(),
        ..Stats::default()
    };
    let mut policies: Vec<String> = results.iter().map(|r| r.policy.clone()).collect();
    policies.sort();
    policies.dedup();
    s.policies = policies;
    s.oracle_rollouts = results.iter().filter(|r| r.policy == ORACLE_POLICY).count();
    s.infrastructure_test = !results.is_empty() && s.oracle_rollouts == results.len();

    for r in results {
        match r.status {
            Status::Passed => s.status.passed += 1,
            Status::Failed => s.status.failed += 1,
            Status::AgentFailure => s.status.agent_failure += 1,
            Status::InfraError => s.status.infra_error += 1,
        }
        if r.attempts > 1 {
            s.retried_rollouts += 1;
            s.extra_attempts += u64::from(r.attempts - 1);
        }
    }
    let rewards: Vec<f64> = results
        .iter()
        .filter(|r| r.status.is_scored())
        .map(|r| r.reward)
        .collect();
    s.scored = rewards.len();
    s.mean_reward = MeanSe::of(&rewards);

    let tasks = task_counts(results.iter());
    s.tasks = tasks.len();
    s.scored_tasks = tasks.values().filter(|&&(n, _)| n > 0).count();
    s.max_samples = tasks.values().map(|&(n, _)| n).max().unwrap_or(0);
    s.pass_at_1 = mean_pass_at_k(&tasks, 1).0;
    s.pass_at_k = k_values(s.max_samples)
        .into_iter()
        .filter_map(|k| {
            let (value, n) = mean_pass_at_k(&tasks, k);
            value.map(|value| PassAtK { k, value, tasks: n })
        })
        .collect();

    s.by_domain = group(results, |r| r.domain.as_str());
    s.by_scaffold = group(results, |r| r.key.scaffold.as_str());

    let mut classes: BTreeMap<&str, FailureClass> = BTreeMap::new();
    for r in results {
        let Some(f) = &r.failure else { continue };
        let e = classes
            .entry(f.class.as_str())
            .or_insert_with(|| FailureClass {
                class: f.class.clone(),
                count: 0,
                infra_errors: 0,
                agent_failures: 0,
                example: shorten(&f.message, 160),
            });
        e.count += 1;
        match r.status {
            Status::InfraError => e.infra_errors += 1,
            Status::AgentFailure => e.agent_failures += 1,
            _ => {}
        }
    }
    s.failures = classes.into_values().collect();
    s.failures
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.class.cmp(&b.class)));

    let prompt: u64 = results.iter().map(|r| r.prompt_tokens).sum();
    let completion: u64 = results.iter().map(|r| r.completion_tokens).sum();
    s.tokens = TokenUse {
        prompt,
        completion,
        total: prompt + completion,
        mean_per_rollout: (!results.is_empty())
            .then(|| (prompt + completion) as f64 / results.len() as f64),
        format_errors: results.iter().map(|r| u64::from(r.format_errors)).sum(),
    };

    let mut overhead: Vec<f64> = results
        .iter()
        .flat_map(|r| r.timing.overhead_ms.iter().copied())
        .filter(|x| x.is_finite())
        .collect();
    let start = results
        .iter()
        .map(|r| r.finished_at - r.total_s)
        .fold(f64::INFINITY, f64::min);
    let end = results
        .iter()
        .map(|r| r.finished_at)
        .fold(f64::NEG_INFINITY, f64::max);
    s.time = TimeUse {
        total_s: spread(results.iter().map(|r| r.total_s)),
        agent_s: spread(results.iter().map(|r| r.agent_s)),
        verify_s: spread(results.iter().map(|r| r.verify_s)),
        overhead_steps: overhead.len(),
        overhead_p50_ms: percentile(&mut overhead, 0.5),
        overhead_p99_ms: percentile(&mut overhead, 0.99),
        model_s: results.iter().map(|r| r.timing.model_ms).sum::<f64>() / 1000.0,
        action_s: results.iter().map(|r| r.timing.action_ms).sum::<f64>() / 1000.0,
        wall_s: if end > start { end - start } else { 0.0 },
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact binomials for small n, to check the product form.
    fn binom(n: u32, k: u32) -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * f64::from(n - i) / f64::from(i + 1))
    }

    #[test]
    fn pass_at_k_matches_the_binomial_formula() {
        for n in 1..=10 {
            for c in 0..=n {
                for k in 1..=n {
                    let want = 1.0 - binom(n - c, k) / binom(n, k);
                    let got = pass_at_k(n, c, k).unwrap();
                    assert!((got - want).abs() < 1e-12, "n={n} c={c} k={k}");
                }
            }
        }
        assert_eq!(pass_at_k(4, 1, 2), Some(0.5));
        assert_eq!(pass_at_k(3, 1, 4), None);
        assert_eq!(pass_at_k(3, 1, 0), None);
    }

    #[test]
    fn k_values_are_powers_of_two_and_the_max() {
        assert_eq!(k_values(0), Vec::<u32>::new());
        assert_eq!(k_values(1), vec![1]);
        assert_eq!(k_values(4), vec![1, 2, 4]);
        assert_eq!(k_values(6), vec![1, 2, 4, 6]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.9), 5.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn standard_error() {
        let m = MeanSe::of(&[0.0, 1.0, 1.0, 0.0]).unwrap();
        assert_eq!(m.mean, 0.5);
        // sample sd = sqrt(1/3), se = sqrt(1/3)/2
        assert!((m.se.unwrap() - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(MeanSe::of(&[1.0]).unwrap().se, None);
        assert!(MeanSe::of(&[]).is_none());
    }
}
