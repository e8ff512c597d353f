//! The RL loop, and on-policy distillation as the same loop with teachers.
//!
//! One iteration:
//!
//! 1. **Sample.** `tasks_per_iteration` training tasks of each domain (fresh ones, or the next
//!    window of a fixed pool: `task_pool`), `group_size` rollouts each, under the bash
//!    scaffold, in real sandboxes, against this stage's own
//!    [`arbor_policy::EmbeddedPolicy`] (an upstream of the run's gateway, which records every
//!    call as token ids with the policy's behaviour logprobs).
//! 2. **Score.** Verifier rewards; group-relative advantages with infrastructure failures
//!    left out ([`crate::advantage`]).
//! 3. **Update.** The recorded calls of the scored rollouts become one trajectory tree per
//!    domain (a group's samples share their prompt), packed under a token budget;
//!    [`arbor_train::rl_update`] takes the steps, each one AdamW step on the sum of the packs'
//!    [`arbor_train::rl_loss`] (turn-level GSPO, IcePop, MCLA; plus the reverse-KL term toward
//!    the task domain's teacher when distilling). This module only chooses the paths and
//!    their weights: every trained episode weighs the same, a call of an episode with `n`
//!    calls has weight `1 / (episodes * n)`, so long failing episodes do not outweigh short
//!    passing ones. For RL, rollouts whose advantage is zero give no gradient and are skipped.
//! 4. **Swap.** The new weights are checkpointed and loaded into the running policy (a version
//!    bump; nothing restarts).
//!
//! # Output (`out/`)
//!
//! - `iter-NNN/`: the iteration's run directory (results, gateway calls).
//! - `checkpoint/`: weights after the last finished iteration, with `state.json`
//!   (replaced atomically; a killed stage continues from it).
//! - `best/`: the weights that sampled the best training pass rate so far (the expert).
//! - `rl_log.jsonl`: one [`IterationLog`] per iteration (the learning curves).
//! - `final/` + `rl_report.json`: the finished stage (present = nothing left to do).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arbor_model::Qwen3Model;
use arbor_policy::EmbeddedPolicy;
use arbor_rollout::Progress;
use arbor_rollout::experiment::DatasetSpec;
use arbor_rollout::runner::ProgressFn as RolloutProgressFn;
use serde::{Deserialize, Serialize};

use crate::advantage::group_advantages;
use crate::config::{Overlong, RlSpec, RolloutSpec};
use crate::rollouts::{self, Episode, TaskSet};
use crate::{RecipeError, Result};

mod log;
mod train;

pub use log::{IterationLog, read_log};
use log::{append_line, generated_tokens, io, json_line, sample_stats, without_signal};
use train::{Targets, Trained, Trainer, TrainingSet};

/// The run's log, one line per iteration.
pub const LOG_FILE: &str = "rl_log.jsonl";
/// Present once the stage is finished.
pub const REPORT_FILE: &str = "rl_report.json";

/// One RL or distillation stage.
#[derive(Debug, Clone)]
pub struct RlStage {
    /// Label in logs (`rl/terminal`, `distill`).
    pub label: String,
    /// Iterations, groups, optimizer and loss settings.
    pub spec: RlSpec,
    /// Scaffold and limits of the rollouts.
    pub rollout: RolloutSpec,
    /// Domains whose training tasks are sampled (`tasks_per_iteration` each).
    pub domains: Vec<String>,
    /// Task difficulty.
    pub difficulty: u32,
    /// Seed of the task draws.
    pub seed: u64,
    /// Checkpoint to start from (also the reference of the KL-to-start curve).
    pub init: PathBuf,
    /// Teacher checkpoint per domain (on-policy distillation); empty for RL.
    pub teachers: BTreeMap<String, PathBuf>,
    /// Output directory.
    pub out: PathBuf,
}

/// The finished stage (`rl_report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlReport {
    pub label: String,
    /// Iterations run (fewer than configured when the stage stopped without signal).
    pub iterations: usize,
    /// Weights after the last update.
    pub final_checkpoint: PathBuf,
    /// Weights that sampled the best training pass rate (the expert).
    pub best_checkpoint: PathBuf,
    pub best_iteration: usize,
    pub best_pass_rate: f64,
    pub seconds: f64,
}

/// What `checkpoint/state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RlState {
    identity: String,
    /// Iterations finished (the checkpoint holds the weights after them).
    done: usize,
    best_iteration: Option<usize>,
    best_pass_rate: f64,
}

/// A progress callback of a stage.
pub type ProgressFn = Arc<dyn Fn(RlEvent<'_>) + Send + Sync>;

/// Progress of a stage.
#[derive(Debug, Clone)]
pub enum RlEvent<'a> {
    /// Starting (or continuing after `start` finished iterations).
    Start { total: usize, start: usize },
    /// Sampling progress of the current iteration.
    Sampling {
        iteration: usize,
        progress: &'a Progress,
    },
    /// An iteration finished.
    Iteration(&'a IterationLog),
    /// The stage was already finished.
    AlreadyFinished,
    /// The stage stopped before `iteration`: `stop_without_signal` iterations in a row had no
    /// group with reward variance.
    StoppedWithoutSignal { iteration: usize },
}

/// What must match for a checkpoint to be continued: every setting that shapes the stage's
/// samples and updates (not its label or output directory). Stored as JSON in `state.json` and
/// compared after parsing, not as text, so a checkpoint written before a setting existed still
/// resumes when the setting's default is what it ran with (the specs fill missing fields with
/// their defaults), and one whose settings differ does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageIdentity {
    spec: RlSpec,
    rollout: RolloutSpec,
    domains: Vec<String>,
    difficulty: u32,
    seed: u64,
    init: PathBuf,
    teachers: BTreeMap<String, PathBuf>,
}

impl StageIdentity {
    /// Whether a stored identity (JSON text) names the same stage; unreadable text does not.
    fn matches(&self, stored: &str) -> bool {
        serde_json::from_str::<StageIdentity>(stored).is_ok_and(|s| s == *self)
    }
}

impl RlStage {
    fn identity(&self) -> StageIdentity {
        StageIdentity {
            spec: self.spec.clone(),
            rollout: self.rollout.clone(),
            domains: self.domains.clone(),
            difficulty: self.difficulty,
            seed: self.seed,
            init: self.init.clone(),
            teachers: self.teachers.clone(),
        }
    }

    /// The task draw of one iteration per domain: fresh training tasks, or the next window of
    /// the fixed pool (`task_pool`; a window that runs past the pool's end wraps to its start).
    fn tasks(&self, iteration: usize) -> Vec<DatasetSpec> {
        let k = self.spec.tasks_per_iteration;
        let mut out = Vec::new();
        for (d, domain) in self.domains.iter().enumerate() {
            let set = |n: usize, draw: u64| TaskSet {
                domain: domain.clone(),
                n,
                seed: self
                    .seed
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add((draw << 8) | d as u64)
                    .wrapping_add(0x5151),
                split: "train",
                difficulty: self.difficulty,
            };
            let pool = self.spec.task_pool;
            if pool == 0 {
                out.push(set(k, iteration as u64).dataset());
                continue;
            }
            // One seed for the whole pool (draw 0: a pool of `tasks_per_iteration` tasks is
            // iteration 0's fresh draw).
            let mut start = (iteration * k) % pool;
            let mut left = k;
            while left > 0 {
                let take = left.min(pool - start);
                let mut ds = set(pool, 0).dataset();
                ds.skip = start;
                ds.limit = Some(take);
                out.push(ds);
                left -= take;
                start = 0;
            }
        }
        out
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    fn best_dir(&self) -> PathBuf {
        self.out.join("best")
    }

    /// Runs (or continues) the stage.
    pub async fn run(&self, progress: ProgressFn) -> Result<RlReport> {
        let wall = Instant::now();
        std::fs::create_dir_all(&self.out).map_err(|e| io(&self.out, e))?;
        let report_path = self.out.join(REPORT_FILE);
        if report_path.is_file() {
            let text = std::fs::read_to_string(&report_path).map_err(|e| io(&report_path, e))?;
            progress(RlEvent::AlreadyFinished);
            return serde_json::from_str(&text)
                .map_err(|e| RecipeError::Io(format!("{}: {e}", report_path.display())));
        }
        let (model, state, log) = self.resume()?;
        let targets = self.targets()?;
        let policy = self.start_policy(state.done).await?;
        let mut run = Running {
            trainer: Some(Trainer::new(model, self.spec.lr)?),
            state,
            log,
            targets,
        };
        progress(RlEvent::Start {
            total: self.spec.iterations,
            start: run.state.done,
        });
        let result = self.iterations(&mut run, &policy, &progress).await;
        let _ = policy.shutdown().await;
        result?;
        self.finish(&run, wall)
    }

    /// The model to continue (the checkpoint's, or the start's), its state, and the log lines
    /// of the iterations it holds: the log file is rewritten without the others, which are
    /// redone.
    fn resume(&self) -> Result<(Qwen3Model, RlState, Vec<IterationLog>)> {
        let identity = self.identity();
        let identity_text = json_line(&identity)?;
        let ckpt_dir = self.checkpoint_dir();
        let (model, state) = match arbor_train::checkpoint::load_latest::<RlState>(&ckpt_dir)? {
            Some((m, mut st)) if identity.matches(&st.identity) => {
                // Rewritten in today's form with the next checkpoint.
                st.identity = identity_text;
                (m, st)
            }
            Some(_) => {
                return Err(RecipeError::Config(format!(
                    "{} holds a checkpoint of another stage configuration; use another output directory",
                    ckpt_dir.display()
                )));
            }
            None => (
                Qwen3Model::load(&self.init)?,
                RlState {
                    identity: identity_text,
                    done: 0,
                    best_iteration: None,
                    best_pass_rate: -1.0,
                },
            ),
        };
        let log_path = self.out.join(LOG_FILE);
        let log: Vec<IterationLog> = read_log(&log_path)
            .into_iter()
            .filter(|l| l.iteration < state.done)
            .collect();
        let text: String = log
            .iter()
            .map(|l| json_line(l).map(|s| s + "\n"))
            .collect::<Result<_>>()?;
        arbor_train::checkpoint::write_atomic(&log_path, text.as_bytes())?;
        Ok((model, state, log))
    }

    /// The start checkpoint (the KL reference) and each domain's teacher.
    fn targets(&self) -> Result<Targets> {
        let reference = Arc::new(Qwen3Model::load(&self.init)?);
        let mut teachers = HashMap::new();
        for (d, dir) in &self.teachers {
            teachers.insert(d.clone(), Arc::new(Qwen3Model::load(dir)?));
        }
        Ok(Targets {
            reference,
            teachers,
        })
    }

    /// The stage's own policy server, serving the weights after `done` iterations.
    async fn start_policy(&self, done: usize) -> Result<EmbeddedPolicy> {
        let serving = Qwen3Model::load(match done {
            0 => self.init.clone(),
            _ => self.checkpoint_dir(),
        })?;
        let mut opts = arbor_policy::PolicyOptions {
            default_max_tokens: self.rollout.max_tokens as usize,
            ..arbor_policy::PolicyOptions::default()
        };
        if let Some(c) = self.rollout.policy_concurrency {
            opts.max_concurrency = c.max(1);
        }
        EmbeddedPolicy::start(SocketAddr::from(([127, 0, 0, 1], 0)), serving, opts)
            .await
            .map_err(|e| RecipeError::Rollout(format!("starting the policy: {e}")))
    }

    /// The iterations the checkpoint does not hold yet, each sample, score, update, swap.
    async fn iterations(
        &self,
        run: &mut Running,
        policy: &EmbeddedPolicy,
        progress: &ProgressFn,
    ) -> Result<()> {
        for it in run.state.done..self.spec.iterations {
            if !run.distilling() && without_signal(&run.log, self.spec.stop_without_signal) {
                progress(RlEvent::StoppedWithoutSignal { iteration: it });
                break;
            }
            let (episodes, mut entry) = self.sample(it, policy, progress).await?;
            self.keep_best(it, &entry, run)?;
            // Score.
            let (mut adv, gstats) = group_advantages(&episodes, self.spec.normalize_std);
            entry.groups = gstats.groups;
            entry.groups_with_signal = gstats.groups_with_signal;
            let max_tokens = self.rollout.max_tokens as usize;
            for (e, a) in episodes.iter().zip(adv.iter_mut()) {
                if a.is_some() && e.longest_reply() >= max_tokens {
                    entry.overlong += 1;
                    if self.spec.overlong == Overlong::Filter && !run.distilling() {
                        *a = None;
                        entry.overlong_filtered += 1;
                    }
                }
            }
            let set = TrainingSet::new(episodes, adv, run.distilling());
            let t_train = Instant::now();
            let trained = self.update(it, set, run).await?;
            record_update(&mut entry, &trained, run.distilling());
            entry.train_seconds = t_train.elapsed().as_secs_f64();
            entry.train_tokens_per_s = (trained.unique_tokens as f64
                * self.spec.updates_per_iteration as f64)
                / entry.train_seconds.max(1e-9);
            self.swap(it, entry, run, policy, progress).await?;
        }
        Ok(())
    }

    /// Step 1: iteration `it`'s rollouts against `policy`, read back as episodes, with the log
    /// entry of their statistics and sampling time.
    async fn sample(
        &self,
        it: usize,
        policy: &EmbeddedPolicy,
        progress: &ProgressFn,
    ) -> Result<(Vec<Episode>, IterationLog)> {
        let t_sample = Instant::now();
        let run_dir = self.out.join(format!("iter-{it:03}"));
        let exp = rollouts::experiment(
            &format!("{}-iter-{it}", self.label.replace('/', "-")),
            &run_dir,
            self.tasks(it),
            self.spec.group_size,
            rollouts::served(policy.base_url(), &self.rollout, self.spec.temperature),
            &self.rollout,
        );
        let on_progress: RolloutProgressFn = {
            let p = progress.clone();
            Arc::new(move |pr: &Progress| {
                p(RlEvent::Sampling {
                    iteration: it,
                    progress: pr,
                })
            })
        };
        rollouts::run(&exp, &run_dir, Some(on_progress)).await?;
        let episodes = rollouts::load_episodes(&run_dir, &format!("i{it}/"))?;
        let sample_seconds = t_sample.elapsed().as_secs_f64();
        let mut entry = sample_stats(it, &episodes);
        entry.sample_seconds = sample_seconds;
        entry.sample_tokens_per_s = generated_tokens(&episodes) as f64 / sample_seconds.max(1e-9);
        Ok((episodes, entry))
    }

    /// The weights that sampled iteration `it` become `best/` (the expert) if they did best.
    fn keep_best(&self, it: usize, entry: &IterationLog, run: &mut Running) -> Result<()> {
        if entry.scored > 0 && entry.pass_rate > run.state.best_pass_rate {
            run.state.best_pass_rate = entry.pass_rate;
            run.state.best_iteration = Some(it);
            arbor_train::checkpoint::save(
                &self.best_dir(),
                &run.trainer()?.model,
                &serde_json::json!({
                    "iteration": it, "pass_rate": entry.pass_rate,
                }),
            )?;
        }
        Ok(())
    }

    /// Step 3 on a blocking thread: the trainer moves there and back.
    async fn update(&self, it: usize, set: TrainingSet, run: &mut Running) -> Result<Trained> {
        let (spec, rollout, targets) =
            (self.spec.clone(), self.rollout.clone(), run.targets.clone());
        let mut tr = run.trainer.take().ok_or_else(lost)?;
        let (tr, trained) = tokio::task::spawn_blocking(move || {
            let r = train::update(&spec, &rollout, it, set, &targets, &mut tr);
            (tr, r)
        })
        .await
        .map_err(|e| RecipeError::Train(format!("update task: {e}")))?;
        run.trainer = Some(tr);
        trained
    }

    /// Step 4: the new weights are checkpointed with the state and loaded into the policy;
    /// then the iteration's log line is appended (after the checkpoint that holds it).
    async fn swap(
        &self,
        it: usize,
        mut entry: IterationLog,
        run: &mut Running,
        policy: &EmbeddedPolicy,
        progress: &ProgressFn,
    ) -> Result<()> {
        run.state.done = it + 1;
        let ckpt_dir = self.checkpoint_dir();
        arbor_train::checkpoint::save(&ckpt_dir, &run.trainer()?.model, &run.state)?;
        entry.policy_version = policy
            .load(&ckpt_dir)
            .await
            .map_err(|e| RecipeError::Rollout(format!("swapping weights: {e}")))?;
        append_line(&self.out.join(LOG_FILE), &entry)?;
        progress(RlEvent::Iteration(&entry));
        run.log.push(entry);
        Ok(())
    }

    /// The finished stage: `final/`, `best/` when no iteration was scored, `rl_report.json`.
    fn finish(&self, run: &Running, wall: Instant) -> Result<RlReport> {
        let model = &run.trainer()?.model;
        let final_dir = self.out.join("final");
        let best_dir = self.best_dir();
        model.save(&final_dir)?;
        if run.state.best_iteration.is_none() {
            // Nothing was scored: the expert is the final model.
            model.save(&best_dir)?;
        }
        let report = RlReport {
            label: self.label.clone(),
            iterations: run.log.len(),
            final_checkpoint: final_dir,
            best_checkpoint: best_dir,
            best_iteration: run.state.best_iteration.unwrap_or(self.spec.iterations),
            best_pass_rate: run.state.best_pass_rate.max(0.0),
            seconds: wall.elapsed().as_secs_f64(),
        };
        arbor_train::checkpoint::write_atomic(
            &self.out.join(REPORT_FILE),
            serde_json::to_string_pretty(&report)
                .map_err(|e| RecipeError::Io(e.to_string()))?
                .as_bytes(),
        )?;
        Ok(report)
    }
}

/// A stage between its start and its report (besides its policy server).
struct Running {
    state: RlState,
    /// Log lines of the finished iterations.
    log: Vec<IterationLog>,
    /// Moved to a blocking thread for each update and back (hence the Option).
    trainer: Option<Trainer>,
    targets: Targets,
}

impl Running {
    fn trainer(&self) -> Result<&Trainer> {
        self.trainer.as_ref().ok_or_else(lost)
    }

    /// Distillation trains every sample toward a teacher, and never stops for lack of signal.
    fn distilling(&self) -> bool {
        !self.targets.teachers.is_empty()
    }
}

fn lost() -> RecipeError {
    RecipeError::Train("the trainer was lost by a failed update".into())
}

/// Fills the update's part of an iteration's log line (statistics of its first step).
fn record_update(entry: &mut IterationLog, trained: &Trained, distilling: bool) {
    let first = &trained.update.first;
    entry.paths = trained.paths;
    entry.unique_tokens = trained.unique_tokens;
    entry.flat_tokens = trained.flat_tokens;
    entry.loss_tokens = first.gspo.loss_tokens;
    entry.gspo_loss = first.gspo_loss;
    entry.masked_fraction = first.masked_fraction();
    entry.clipped_fraction = first.gspo.clipped_fraction();
    entry.iw_var_single = first.iw_single.variance();
    entry.iw_var_mcla = first.iw_mcla.variance();
    entry.mcla_passes = first.mcla_passes;
    entry.kl_to_init = trained.update.kl_to_reference;
    entry.reverse_kl_to_teacher = distilling.then(|| first.distill.reverse_kl());
    entry.domain_reverse_kl_to_teacher = trained
        .update
        .reverse_kl
        .iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(d, (s, n))| (d.clone(), s / *n as f64))
        .collect();
    entry.steps = trained.update.steps;
}

#[cfg(test)]
mod tests;
