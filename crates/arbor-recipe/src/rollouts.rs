//! Rollouts as the recipe uses them: an `arbor-rollout` experiment built from the pipeline's
//! settings, run into a directory, and read back as scored episodes with their token-level
//! calls.

use std::path::Path;

use arbor_rollout::experiment::{DatasetSpec, PolicySpec, ScaffoldSpec, Timeouts};
use arbor_rollout::record::{RolloutResult, Status};
use arbor_rollout::runner::ProgressFn;
use arbor_rollout::{Experiment, RunOptions, Summary};
use arbor_trace::RunRollout;
use arbor_tree::Sequence;
use serde::{Deserialize, Serialize};

use crate::config::RolloutSpec;
use crate::{RecipeError, Result};

/// Tasks of one built-in domain.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSet {
    /// Domain.
    pub domain: String,
    /// Number of tasks.
    pub n: usize,
    /// Generator seed.
    pub seed: u64,
    /// `train` or `heldout`.
    pub split: &'static str,
    /// 1..=5.
    pub difficulty: u32,
}

impl TaskSet {
    /// The experiment dataset generating these tasks.
    pub fn dataset(&self) -> DatasetSpec {
        DatasetSpec {
            domain: Some(self.domain.clone()),
            n: Some(self.n),
            seed: self.seed,
            split: Some(self.split.to_string()),
            difficulty: Some(self.difficulty),
            ..DatasetSpec::default()
        }
    }
}

/// The experiment for the tasks of `datasets` x `samples` under the bash scaffold against
/// `policy`.
pub fn experiment(
    name: &str,
    out: &Path,
    datasets: Vec<DatasetSpec>,
    samples: u32,
    policy: PolicySpec,
    spec: &RolloutSpec,
) -> Experiment {
    Experiment {
        name: name.to_string(),
        output: out.to_path_buf(),
        datasets,
        scaffolds: vec![ScaffoldSpec::Bash(spec.scaffold())],
        policy,
        samples,
        concurrency: spec.concurrency.max(1),
        infra_retries: 2,
        timeouts: Timeouts {
            agent_s: spec.agent_timeout_s,
            model_call_s: spec.agent_timeout_s,
        },
        verifier: Default::default(),
        warm_pool: 0,
        allow_default_rootfs: false,
        images: Default::default(),
        gateway: Default::default(),
        backend: Default::default(),
    }
}

/// The embedded policy over a checkpoint directory, sampled at `temperature` (`None`: 1.0).
pub fn embedded(checkpoint: &Path, spec: &RolloutSpec, temperature: Option<f32>) -> PolicySpec {
    PolicySpec::Embedded {
        checkpoint: checkpoint.to_path_buf(),
        max_tokens: Some(spec.max_tokens),
        max_concurrency: spec.policy_concurrency,
        temperature,
    }
}

/// Writes the demonstration tasks of `sets` into `dir` (native task files) and returns the
/// dataset reading them. The scripted oracle answers by instruction, so a task whose
/// instruction repeats an earlier one's with a different oracle (templated generators do that
/// now and then, with different data) is left out; returns how many were. Repeats with the
/// same oracle (constant instructions like "rename every .txt file") are kept.
pub fn write_demonstration_tasks(sets: &[TaskSet], dir: &Path) -> Result<(DatasetSpec, usize)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| RecipeError::Io(format!("{}: {e}", dir.display())))?;
    }
    // instruction -> the oracle of the first task with it.
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut dropped = 0;
    for set in sets {
        let split = set.split.parse().map_err(RecipeError::Config)?;
        let opts = arbor_task::GenOptions {
            difficulty: set.difficulty,
            split,
        };
        let tasks = arbor_task::domains::generate(&set.domain, set.n, set.seed, &opts)
            .map_err(|e| RecipeError::Config(format!("generating {} tasks: {e}", set.domain)))?;
        for t in tasks {
            let oracle = serde_json::to_string(&t.oracle)
                .map_err(|e| RecipeError::Config(format!("task {}: {e}", t.id)))?;
            match seen.get(&t.instruction) {
                Some(first) if *first != oracle => {
                    dropped += 1;
                    continue;
                }
                Some(_) => {}
                None => {
                    seen.insert(t.instruction.clone(), oracle);
                }
            }
            arbor_task::dataset::write_task_json(dir, &t)
                .map_err(|e| RecipeError::Io(format!("{}: {e}", dir.display())))?;
        }
    }
    Ok((
        DatasetSpec {
            path: Some(dir.to_path_buf()),
            ..DatasetSpec::default()
        },
        dropped,
    ))
}

/// An already running OpenAI-compatible server (the RL stage's own embedded policy, whose
/// weights it swaps between iterations), sampled at `temperature`.
pub fn served(base_url: String, spec: &RolloutSpec, temperature: f32) -> PolicySpec {
    PolicySpec::Upstream {
        base_urls: vec![base_url],
        model: "arbor-embedded".into(),
        api_key_env: None,
        max_tokens: Some(spec.max_tokens),
        // 1.0 is the server's default: leaving it out keeps the experiment text of a
        // temperature-1 stage what it was, so run directories from before resume.
        temperature: (temperature != 1.0).then_some(temperature),
    }
}

/// Runs `exp` into `out`. A directory left by an interrupted invocation is resumed when its
/// experiment runs the same work (concurrency and timeouts may differ), and started over
/// otherwise (the RL stage's policy address changes between invocations, and its rollouts are
/// redone from the same weights).
pub async fn run(exp: &Experiment, out: &Path, on_progress: Option<ProgressFn>) -> Result<Summary> {
    let text = toml::to_string(exp)
        .map_err(|e| RecipeError::Config(format!("serializing experiment: {e}")))?;
    let resume = out.join("results.jsonl").is_file();
    if resume {
        let old = std::fs::read_to_string(out.join("experiment.toml")).unwrap_or_default();
        let same =
            Experiment::parse(&old).is_ok_and(|old| arbor_rollout::store::same_work(&old, exp));
        if !same {
            std::fs::remove_dir_all(out)
                .map_err(|e| RecipeError::Io(format!("{}: {e}", out.display())))?;
        }
    }
    let resume = out.join("results.jsonl").is_file();
    let opts = RunOptions {
        out: Some(out.to_path_buf()),
        resume,
        on_progress,
        ..RunOptions::default()
    };
    arbor_rollout::run(exp, &text, opts)
        .await
        .map_err(|e| RecipeError::Rollout(format!("{}: {e}", out.display())))
}

/// One scored rollout with its recorded calls.
#[derive(Debug, Clone)]
pub struct Episode {
    /// Task id (the group key).
    pub task_id: String,
    /// Task domain.
    pub domain: String,
    /// How it ended.
    pub status: Status,
    /// Verifier reward.
    pub reward: f64,
    /// One sequence per model call (prompt without loss, completion with loss and the
    /// behaviour logprobs), ids prefixed with `prefix`.
    pub sequences: Vec<Sequence>,
}

impl Episode {
    /// Generated tokens of the longest reply (model call) of the episode: a reply as long as
    /// the rollout's `max_tokens` was cut there.
    pub fn longest_reply(&self) -> usize {
        self.sequences
            .iter()
            .map(|s| match s.loss_mask.is_empty() {
                true => s.tokens.len(),
                false => s.loss_mask.iter().filter(|&&m| m).count(),
            })
            .max()
            .unwrap_or(0)
    }
}

/// Reads a run directory's results and calls (`arbor_trace::read_run`, results sorted by
/// session id). Episodes whose session recorded no call keep an empty `sequences` (they still
/// count in the group statistics).
pub fn load_episodes(run: &Path, prefix: &str) -> Result<Vec<Episode>> {
    let found = arbor_trace::read_run(run, prefix, |r: &RolloutResult| &r.session, |_| true)
        .map_err(|e| RecipeError::Rollout(format!("{}: {e}", run.display())))?;
    let mut out = Vec::new();
    for RunRollout {
        result: r,
        sequences,
    } in found.rollouts
    {
        let mut sequences = sequences.unwrap_or_default();
        sequences.sort_by(|a, b| a.id.cmp(&b.id));
        for s in &mut sequences {
            s.reward = Some(r.reward);
        }
        out.push(Episode {
            task_id: r.key.task_id,
            domain: r.domain,
            status: r.status,
            reward: r.reward,
            sequences,
        });
    }
    Ok(out)
}

/// Pass rate of a run: passed / scored rollouts (infrastructure errors excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PassRate {
    /// Scored rollouts.
    pub n: usize,
    /// Of which passed.
    pub passed: usize,
    /// Rollouts lost to infrastructure errors (not in `n`).
    pub infra_errors: usize,
}

impl PassRate {
    /// From a run directory's results.
    pub fn of_run(run: &Path) -> Result<Self> {
        let loaded = arbor_rollout::store::load_results(&run.join("results.jsonl"), false)
            .map_err(|e| RecipeError::Rollout(format!("{}: {e}", run.display())))?;
        let mut p = PassRate::default();
        for r in &loaded.results {
            match r.status {
                Status::InfraError => p.infra_errors += 1,
                Status::Passed => {
                    p.n += 1;
                    p.passed += 1;
                }
                _ => p.n += 1,
            }
        }
        Ok(p)
    }

    /// passed / n (0 without scored rollouts).
    pub fn rate(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.passed as f64 / self.n as f64
        }
    }

    /// Binomial standard error of the rate.
    pub fn std_err(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let p = self.rate();
        (p * (1.0 - p) / self.n as f64).sqrt()
    }
}

/// A pass rate over tasks sampled several times each: the mean over tasks of each task's share
/// of passed samples, with the standard error of that mean across tasks (samples of one task
/// are not independent draws of the rate, tasks are).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SampledRate {
    /// The mean of the per-task pass shares.
    pub rate: f64,
    /// Standard error of `rate` across tasks.
    pub std_err: f64,
    /// Tasks with at least one scored sample.
    pub tasks: usize,
    /// Scored samples.
    pub samples: usize,
    /// Of which passed.
    pub passed: usize,
    /// Samples lost to infrastructure errors (not scored).
    pub infra_errors: usize,
}

impl SampledRate {
    /// From a run directory's results.
    pub fn of_run(run: &Path) -> Result<Self> {
        let loaded = arbor_rollout::store::load_results(&run.join("results.jsonl"), false)
            .map_err(|e| RecipeError::Rollout(format!("{}: {e}", run.display())))?;
        let mut by_task: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        let mut out = SampledRate::default();
        for r in &loaded.results {
            if r.status == Status::InfraError {
                out.infra_errors += 1;
                continue;
            }
            let e = by_task.entry(r.key.task_id.as_str()).or_default();
            e.0 += 1;
            out.samples += 1;
            if r.status == Status::Passed {
                e.1 += 1;
                out.passed += 1;
            }
        }
        let shares: Vec<f64> = by_task
            .values()
            .map(|&(n, p)| p as f64 / n as f64)
            .collect();
        out.tasks = shares.len();
        if out.tasks > 0 {
            let n = out.tasks as f64;
            out.rate = shares.iter().sum::<f64>() / n;
            if out.tasks > 1 {
                let var = shares.iter().map(|s| (s - out.rate).powi(2)).sum::<f64>() / (n - 1.0);
                out.std_err = (var / n).sqrt();
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn demonstration_tasks_never_share_an_instruction_with_another_oracle() {
        let dir = std::env::temp_dir().join(format!("arbor-demo-{}", std::process::id()));
        let sets: Vec<TaskSet> = ["websearch", "terminal"]
            .iter()
            .map(|d| TaskSet {
                domain: d.to_string(),
                n: 200,
                seed: 1,
                split: "train",
                difficulty: 1,
            })
            .collect();
        let (ds, dropped) = write_demonstration_tasks(&sets, &dir).unwrap();
        let tasks = arbor_task::load(ds.path.as_ref().unwrap(), &Default::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tasks.len() + dropped, 400);
        let mut by_instruction: HashMap<&str, String> = HashMap::new();
        let mut repeats = 0;
        for t in &tasks {
            let oracle = serde_json::to_string(&t.oracle).unwrap();
            if let Some(o) = by_instruction.insert(&t.instruction, oracle.clone()) {
                assert_eq!(o, oracle, "{}", t.id);
                repeats += 1;
            }
        }
        // Constant-instruction templates (same instruction, same oracle) are kept.
        assert!(repeats > 0);
    }
}
