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
//!    domain (a group's samples share their prompt), packed under a token budget; each update
//!    is one AdamW step on the sum of the packs' [`arbor_train::rl_loss`] (turn-level GSPO,
//!    IcePop, MCLA; plus the reverse-KL term toward the task domain's teacher when
//!    distilling). Every trained episode weighs the same: a call of an episode with `n` calls
//!    has weight `1 / (episodes * n)`, so long failing episodes do not outweigh short passing
//!    ones. For RL, rollouts whose advantage is zero give no gradient and are skipped.
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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arbor_model::{AuxStats, ForwardOptions, Qwen3Model, train::AdamWTrainer};
use arbor_rollout::Progress;
use arbor_rollout::runner::ProgressFn as RolloutProgressFn;
use arbor_train::{RlBatch, RlStats, rl_loss};
use arbor_tree::{PackOptions, Sequence, TrajectoryTree, pack_tree};
use candle::Tensor;
use serde::{Deserialize, Serialize};

use crate::advantage::group_advantages;
use crate::config::{DistillEstimator, RlSpec, RolloutSpec};
use crate::rollouts::{self, Episode, TaskSet};
use crate::{RecipeError, Result};
use arbor_rollout::experiment::DatasetSpec;

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

/// Whether the last `patience` iterations of `log` all had no group with reward variance
/// (`patience` 0: never).
fn without_signal(log: &[IterationLog], patience: usize) -> bool {
    patience > 0
        && log.len() >= patience
        && log[log.len() - patience..]
            .iter()
            .all(|l| l.groups_with_signal == 0)
}

fn io(path: &Path, e: std::io::Error) -> RecipeError {
    RecipeError::Io(format!("{}: {e}", path.display()))
}

fn json_line(v: &impl Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| RecipeError::Io(e.to_string()))
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

    /// Runs (or continues) the stage.
    pub async fn run(&self, progress: ProgressFn) -> Result<RlReport> {
        let wall = Instant::now();
        let out = &self.out;
        std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
        let report_path = out.join(REPORT_FILE);
        if report_path.is_file() {
            let text = std::fs::read_to_string(&report_path).map_err(|e| io(&report_path, e))?;
            progress(RlEvent::AlreadyFinished);
            return serde_json::from_str(&text)
                .map_err(|e| RecipeError::Io(format!("{}: {e}", report_path.display())));
        }
        let identity = self.identity();
        let identity_text = json_line(&identity)?;
        let ckpt_dir = out.join("checkpoint");
        let best_dir = out.join("best");
        let (model, mut state) = match arbor_train::checkpoint::load_latest::<RlState>(&ckpt_dir)? {
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
        // Log lines of iterations the checkpoint does not hold are redone.
        let log_path = out.join(LOG_FILE);
        let mut log: Vec<IterationLog> = read_log(&log_path)
            .into_iter()
            .filter(|l| l.iteration < state.done)
            .collect();
        let text: String = log
            .iter()
            .map(|l| json_line(l).map(|s| s + "\n"))
            .collect::<Result<_>>()?;
        arbor_train::checkpoint::write_atomic(&log_path, text.as_bytes())?;

        let reference = Arc::new(Qwen3Model::load(&self.init)?);
        let mut teachers: HashMap<String, Arc<Qwen3Model>> = HashMap::new();
        for (d, dir) in &self.teachers {
            teachers.insert(d.clone(), Arc::new(Qwen3Model::load(dir)?));
        }
        let serving = Qwen3Model::load(match state.done {
            0 => self.init.as_path(),
            _ => ckpt_dir.as_path(),
        })?;
        let mut opts = arbor_policy::PolicyOptions {
            default_max_tokens: self.rollout.max_tokens as usize,
            ..arbor_policy::PolicyOptions::default()
        };
        if let Some(c) = self.rollout.policy_concurrency {
            opts.max_concurrency = c.max(1);
        }
        let policy = arbor_policy::EmbeddedPolicy::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            serving,
            opts,
        )
        .await
        .map_err(|e| RecipeError::Rollout(format!("starting the policy: {e}")))?;
        // Moved to a blocking thread for each update and back (hence the Option).
        let mut trainer = Some(Trainer {
            opt: AdamWTrainer::new(model.vars(), self.spec.lr, 0.0)?,
            model,
        });
        progress(RlEvent::Start {
            total: self.spec.iterations,
            start: state.done,
        });

        let result: Result<()> = async {
            for it in state.done..self.spec.iterations {
                if teachers.is_empty() && without_signal(&log, self.spec.stop_without_signal) {
                    progress(RlEvent::StoppedWithoutSignal { iteration: it });
                    break;
                }
                let t_sample = Instant::now();
                let run_dir = out.join(format!("iter-{it:03}"));
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
                entry.sample_tokens_per_s =
                    generated_tokens(&episodes) as f64 / sample_seconds.max(1e-9);

                // The weights that sampled this iteration are the expert if they did best.
                if entry.scored > 0 && entry.pass_rate > state.best_pass_rate {
                    state.best_pass_rate = entry.pass_rate;
                    state.best_iteration = Some(it);
                    let m = &trainer.as_ref().ok_or_else(lost)?.model;
                    arbor_train::checkpoint::save(
                        &best_dir,
                        m,
                        &serde_json::json!({
                            "iteration": it, "pass_rate": entry.pass_rate,
                        }),
                    )?;
                }

                let (adv, gstats) = group_advantages(&episodes, self.spec.normalize_std);
                entry.groups = gstats.groups;
                entry.groups_with_signal = gstats.groups_with_signal;
                let distilling = !teachers.is_empty();
                let mut by_domain: BTreeMap<String, Vec<Sequence>> = BTreeMap::new();
                let trained: Vec<(Episode, f64)> = episodes
                    .into_iter()
                    .zip(adv)
                    .filter_map(|(e, a)| a.map(|a| (e, a)))
                    .filter(|(e, a)| (*a != 0.0 || distilling) && !e.sequences.is_empty())
                    .collect();
                // Every trained episode weighs the same, however many calls it made: a path
                // (one call) gets 1 / (episodes * calls of its episode).
                let mut weights = HashMap::new();
                let n_episodes = trained.len() as f32;
                for (e, a) in trained {
                    let w = 1.0 / (n_episodes * e.sequences.len() as f32);
                    for mut s in e.sequences {
                        s.advantage = Some(a);
                        weights.insert(s.id.clone(), w);
                        by_domain.entry(e.domain.clone()).or_default().push(s);
                    }
                }
                let t_train = Instant::now();
                let job = UpdateJob {
                    spec: self.spec.clone(),
                    iteration: it,
                    by_domain,
                    weights,
                    reference: reference.clone(),
                    teachers: teachers.clone(),
                };
                let mut tr = trainer.take().ok_or_else(lost)?;
                let (tr, upd) = tokio::task::spawn_blocking(move || {
                    let r = job.run(&mut tr);
                    (tr, r)
                })
                .await
                .map_err(|e| RecipeError::Train(format!("update task: {e}")))?;
                trainer = Some(tr);
                let upd = upd?;
                entry.paths = upd.paths;
                entry.unique_tokens = upd.unique_tokens;
                entry.flat_tokens = upd.flat_tokens;
                entry.loss_tokens = upd.first.gspo.loss_tokens;
                entry.gspo_loss = upd.first.gspo_loss;
                entry.masked_fraction = upd.first.masked_fraction();
                entry.clipped_fraction = upd.first.gspo.clipped_fraction();
                entry.iw_var_single = upd.first.iw_single.variance();
                entry.iw_var_mcla = upd.first.iw_mcla.variance();
                entry.mcla_passes = upd.first.mcla_passes;
                entry.kl_to_init = upd.kl_to_init;
                entry.reverse_kl_to_teacher = distilling.then(|| upd.first.distill.reverse_kl());
                entry.domain_reverse_kl_to_teacher = upd
                    .reverse_kl
                    .iter()
                    .filter(|(_, (_, n))| *n > 0)
                    .map(|(d, (s, n))| (d.clone(), s / *n as f64))
                    .collect();
                entry.train_seconds = t_train.elapsed().as_secs_f64();
                entry.steps = upd.steps;
                entry.train_tokens_per_s = (upd.unique_tokens as f64
                    * self.spec.updates_per_iteration as f64)
                    / entry.train_seconds.max(1e-9);

                state.done = it + 1;
                let m = &trainer.as_ref().ok_or_else(lost)?.model;
                arbor_train::checkpoint::save(&ckpt_dir, m, &state)?;
                entry.policy_version = policy
                    .load(&ckpt_dir)
                    .await
                    .map_err(|e| RecipeError::Rollout(format!("swapping weights: {e}")))?;
                append_line(&log_path, &entry)?;
                progress(RlEvent::Iteration(&entry));
                log.push(entry);
            }
            Ok(())
        }
        .await;
        let _ = policy.shutdown().await;
        result?;

        let model = &trainer.as_ref().ok_or_else(lost)?.model;
        let final_dir = out.join("final");
        model.save(&final_dir)?;
        if state.best_iteration.is_none() {
            // Nothing was scored: the expert is the final model.
            model.save(&best_dir)?;
        }
        let report = RlReport {
            label: self.label.clone(),
            iterations: log.len(),
            final_checkpoint: final_dir,
            best_checkpoint: best_dir,
            best_iteration: state.best_iteration.unwrap_or(self.spec.iterations),
            best_pass_rate: state.best_pass_rate.max(0.0),
            seconds: wall.elapsed().as_secs_f64(),
        };
        arbor_train::checkpoint::write_atomic(
            &report_path,
            serde_json::to_string_pretty(&report)
                .map_err(|e| RecipeError::Io(e.to_string()))?
                .as_bytes(),
        )?;
        Ok(report)
    }
}

fn lost() -> RecipeError {
    RecipeError::Train("the trainer was lost by a failed update".into())
}

/// The trained model and its optimizer (moved to a blocking thread for each update).
struct Trainer {
    model: Qwen3Model,
    opt: AdamWTrainer,
}

/// One iteration's updates.
struct UpdateJob {
    spec: RlSpec,
    iteration: usize,
    by_domain: BTreeMap<String, Vec<Sequence>>,
    /// Weight `c_k` of each path (sequence id); paths not listed get `1 / paths`.
    weights: HashMap<String, f32>,
    reference: Arc<Qwen3Model>,
    teachers: HashMap<String, Arc<Qwen3Model>>,
}

/// What the updates measured.
#[derive(Default)]
struct UpdateStats {
    paths: usize,
    unique_tokens: u64,
    flat_tokens: u64,
    /// Statistics of the first step (before any update: on-policy ratios).
    first: RlStats,
    /// Optimizer steps taken.
    steps: usize,
    kl_to_init: Option<f64>,
    /// Per domain: sum over trained tokens of `logp_behaviour - logp_expert`, and the count.
    reverse_kl: BTreeMap<String, (f64, u64)>,
}

impl UpdateJob {
    fn run(self, t: &mut Trainer) -> Result<UpdateStats> {
        let mut st = UpdateStats::default();
        // One tree per domain (a pack must see one teacher), packed once.
        let mut packs = Vec::new();
        for (domain, seqs) in &self.by_domain {
            if seqs.is_empty() {
                continue;
            }
            let tree = TrajectoryTree::from_sequences(seqs)?;
            st.paths += tree.num_paths();
            st.unique_tokens += tree.unique_tokens();
            st.flat_tokens += tree.flat_tokens();
            let (_, p) = pack_tree(&tree, &PackOptions::new(self.spec.max_tokens_per_pack))?;
            packs.extend(p.into_iter().map(|p| (domain.clone(), p)));
        }
        if st.paths == 0 {
            return Ok(st);
        }
        let mut batches = Vec::with_capacity(packs.len());
        let (mut kl_sum, mut kl_n) = (0.0f64, 0u64);
        for (domain, pack) in &packs {
            let mut b = RlBatch::from_flat(&pack.flat, st.paths)?;
            for p in &mut b.paths {
                if let Some(&w) = self.weights.get(&p.id) {
                    p.weight = w;
                }
            }
            if let Some(teacher) = self.teachers.get(domain) {
                match self.spec.distill_estimator {
                    DistillEstimator::Sampled => b.set_expert(teacher, self.spec.temperature)?,
                    DistillEstimator::Full => {
                        b.set_expert_distribution(teacher, self.spec.temperature)?
                    }
                }
            }
            // KL(policy || start) on the sampled tokens: with d = logp_ref - logp_behaviour,
            // E[exp(d) - d - 1] (k3, unbiased and non-negative).
            let wanted = b.wanted();
            let opts = ForwardOptions {
                temperature: self.spec.temperature,
                ..ForwardOptions::default()
            };
            let (lp, _) = self
                .reference
                .token_logprobs_where(&b.tree, &opts, Some(&wanted))?;
            let lp = lp.to_vec1::<f32>()?;
            let mut reverse_kl = (0.0f64, 0u64);
            for p in &b.paths {
                for ((&i, &m), &old) in p.indices.iter().zip(&p.loss_mask).zip(&p.old_logprobs) {
                    if m {
                        let d = (lp[i as usize] - old) as f64;
                        kl_sum += d.exp() - d - 1.0;
                        kl_n += 1;
                        if let Some(e) = b.expert_logprob_of(i as usize) {
                            reverse_kl.0 += (old - e) as f64;
                            reverse_kl.1 += 1;
                        }
                    }
                }
            }
            if reverse_kl.1 > 0 {
                let r = st.reverse_kl.entry(domain.clone()).or_default();
                r.0 += reverse_kl.0;
                r.1 += reverse_kl.1;
            }
            // The same reference log-probabilities are the KL penalty's target.
            b.reference_logprobs = (self.spec.kl_coef != 0.0).then_some(lp);
            batches.push(b);
        }
        st.kl_to_init = (kl_n > 0).then(|| kl_sum / kl_n as f64);
        // Packs dealt round-robin into minibatches; one step per minibatch per pass. The
        // statistics are those of the first step (before any update: on-policy ratios).
        let groups = self.spec.minibatches.min(batches.len()).max(1);
        let mut step = 0usize;
        for _pass in 0..self.spec.updates_per_iteration.max(1) {
            for g in 0..groups {
                let cfg = self.spec.rl_config((self.iteration * 1024 + step) as u64);
                let (mut stats, mut aux, mut total): (RlStats, AuxStats, Option<Tensor>) =
                    (RlStats::default(), AuxStats::default(), None);
                for b in batches.iter().skip(g).step_by(groups) {
                    let out = rl_loss(&t.model, b, &cfg)?;
                    stats.merge(&out.stats);
                    aux.merge(out.aux)?;
                    total = Some(match total {
                        None => out.loss,
                        Some(x) => (x + out.loss)?,
                    });
                }
                let Some(mut loss) = total else { continue };
                if let Some(a) = aux.loss()? {
                    loss = (loss + (a * t.model.config().router_aux_loss_coef)?)?;
                }
                t.opt.backward_step(&loss)?;
                if step == 0 {
                    st.first = stats;
                }
                step += 1;
            }
        }
        st.steps = step;
        Ok(st)
    }
}

fn sample_stats(iteration: usize, episodes: &[Episode]) -> IterationLog {
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

fn generated_tokens(episodes: &[Episode]) -> u64 {
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

fn append_line(path: &Path, v: &impl Serialize) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    writeln!(f, "{}", json_line(v)?).map_err(|e| io(path, e))?;
    f.sync_data().map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_model::{Qwen3Config, TreeBatch};

    #[test]
    fn a_stage_stops_only_after_enough_iterations_without_signal_in_a_row() {
        let it = |signal| IterationLog {
            groups_with_signal: signal,
            ..IterationLog::default()
        };
        let log = vec![it(0), it(0), it(2), it(0), it(0)];
        assert!(!without_signal(&log, 0), "0 means never");
        assert!(without_signal(&log, 2));
        assert!(!without_signal(&log, 3), "iteration 2 had signal");
        assert!(!without_signal(&log[..1], 2), "too few iterations yet");
    }

    /// A terminal RL stage with `spec` (nothing is run: identity and task-draw tests).
    fn terminal_stage(spec: RlSpec) -> RlStage {
        RlStage {
            label: "rl/terminal".into(),
            spec,
            rollout: RolloutSpec::default(),
            domains: vec!["terminal".into()],
            difficulty: 1,
            seed: 7,
            init: "ckpt/sft".into(),
            teachers: BTreeMap::new(),
            out: "out".into(),
        }
    }

    /// A fixed pool is walked `tasks_per_iteration` at a time, wrapping at its end, and its
    /// first window is the fresh draw of iteration 0.
    #[test]
    fn a_task_pool_is_revisited_in_windows_and_fresh_draws_never_repeat() {
        let stage = |pool: usize| {
            terminal_stage(RlSpec {
                tasks_per_iteration: 4,
                task_pool: pool,
                ..RlSpec::default()
            })
        };
        let ids = |s: &RlStage, it: usize| -> Vec<String> {
            let exp = rollouts::experiment(
                "t",
                Path::new("out"),
                s.tasks(it),
                2,
                rollouts::served("http://127.0.0.1:1".into(), &s.rollout, 1.0),
                &s.rollout,
            );
            arbor_rollout::runner::load_tasks(&exp)
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect()
        };
        let fresh = stage(0);
        let (f0, f1) = (ids(&fresh, 0), ids(&fresh, 1));
        assert_eq!(f0.len(), 4);
        assert!(f0.iter().all(|id| !f1.contains(id)), "{f0:?} {f1:?}");

        let pooled = stage(6);
        let all: Vec<String> = (0..3).flat_map(|it| ids(&pooled, it)).collect();
        assert_eq!(all.len(), 12);
        // Iterations 0..3 take pool tasks 0-3, 4 5 0 1, 2-5: every task twice.
        assert_eq!(all[..4], f0[..]);
        assert_eq!(all[4..6], all[10..12]);
        assert_eq!(all[6..8], all[..2]);
        assert_eq!(all[8..10], all[2..4]);
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 6);

        let same = stage(4);
        assert_eq!(
            ids(&same, 0),
            ids(&same, 5),
            "a pool of one window repeats it"
        );
        assert!(
            RlSpec {
                task_pool: 3,
                tasks_per_iteration: 4,
                ..RlSpec::default()
            }
            .validate("rl")
            .is_err()
        );
    }

    /// A checkpoint written before `temperature` and `distill_estimator` existed (its identity
    /// has neither) resumes under today's defaults, and not under other values of them.
    #[test]
    fn an_identity_without_newer_settings_matches_their_defaults_only() {
        let stage = terminal_stage(RlSpec::default());
        let mut old: serde_json::Value = serde_json::to_value(stage.identity()).unwrap();
        let spec = old["spec"].as_object_mut().unwrap();
        assert!(spec.remove("temperature").is_some());
        assert!(spec.remove("distill_estimator").is_some());
        let old = old.to_string();
        assert!(stage.identity().matches(&old));
        assert!(
            stage
                .identity()
                .matches(&json_line(&stage.identity()).unwrap())
        );

        let mut hotter = stage.identity();
        hotter.spec.temperature = 0.5;
        assert!(
            !hotter.matches(&old),
            "another temperature is another stage"
        );
        let mut reseeded = stage.identity();
        reseeded.seed = 8;
        assert!(!reseeded.matches(&old));
        assert!(!stage.identity().matches("not json"));
        let unknown = old.replacen("\"seed\"", "\"extra\":1,\"seed\"", 1);
        assert!(
            !stage.identity().matches(&unknown),
            "a setting this build does not know"
        );
    }

    /// Log-probability of `completion` after `prompt` under `model` (sum over its tokens).
    fn completion_logprob(model: &Qwen3Model, prompt: &[u32], completion: &[u32]) -> f32 {
        let toks: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        let (lp, _) = model
            .token_logprobs(&TreeBatch::forest(&[&toks]), &ForwardOptions::default())
            .unwrap();
        lp.to_vec1::<f32>().unwrap()[prompt.len()..].iter().sum()
    }

    /// A recorded call: prompt without loss, completion with loss and the model's own
    /// (behaviour) logprobs, one turn.
    fn call(
        model: &Qwen3Model,
        id: &str,
        prompt: &[u32],
        completion: &[u32],
        adv: f64,
    ) -> Sequence {
        let toks: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        let (lp, _) = model
            .token_logprobs(&TreeBatch::forest(&[&toks]), &ForwardOptions::default())
            .unwrap();
        let mut s = Sequence::new(id, toks.clone());
        s.loss_mask = (0..toks.len()).map(|i| i >= prompt.len()).collect();
        s.logprobs = lp.to_vec1::<f32>().unwrap();
        s.advantage = Some(adv);
        s
    }

    /// One iteration's updates of `model` on `seqs` of `domain`; returns the updated model and
    /// what the updates measured.
    fn update(
        model: Qwen3Model,
        spec: RlSpec,
        domain: &str,
        seqs: Vec<Sequence>,
        reference: Arc<Qwen3Model>,
        teachers: HashMap<String, Arc<Qwen3Model>>,
    ) -> (Qwen3Model, UpdateStats) {
        let mut t = Trainer {
            opt: AdamWTrainer::new(model.vars(), spec.lr, 0.0).unwrap(),
            model,
        };
        let job = UpdateJob {
            spec,
            iteration: 0,
            by_domain: BTreeMap::from([(domain.to_string(), seqs)]),
            weights: HashMap::new(),
            reference,
            teachers,
        };
        let st = job.run(&mut t).unwrap();
        (t.model, st)
    }

    #[test]
    fn an_update_moves_probability_toward_the_positive_advantage_sample() {
        let cfg = Qwen3Config::tiny(256, 32, 1, 2, 1);
        let model = Qwen3Model::new(cfg, 3).unwrap();
        let prompt = b"<|user|>\nsay it<|end|>\n".map(u32::from).to_vec();
        let good = b"yes!".map(u32::from).to_vec();
        let bad = b"no..".map(u32::from).to_vec();
        let before = (
            completion_logprob(&model, &prompt, &good),
            completion_logprob(&model, &prompt, &bad),
        );
        // Group of 2: rewards 1 and 0 -> advantages +0.5 and -0.5.
        let seqs = vec![
            call(&model, "g0", &prompt, &good, 0.5),
            call(&model, "g1", &prompt, &bad, -0.5),
        ];
        let reference = Arc::new(Qwen3Model::new(model.config().clone(), 3).unwrap());
        let spec = RlSpec {
            lr: 1e-2,
            updates_per_iteration: 3,
            // One pack: one minibatch, whatever is asked for.
            minibatches: 4,
            ..RlSpec::default()
        };
        let (model, st) = update(model, spec, "terminal", seqs, reference, HashMap::new());
        // The two calls share the prompt: one tree, two paths, the prompt stored once.
        assert_eq!(st.paths, 2);
        assert_eq!(
            st.unique_tokens as usize,
            prompt.len() + good.len() + bad.len()
        );
        assert_eq!(st.flat_tokens as usize, 2 * (prompt.len() + 4));
        assert_eq!(st.steps, 3, "3 passes over 1 pack");
        // On-policy first update: ratios 1, nothing masked, KL to the (identical) start 0.
        assert_eq!(st.first.gspo.loss_tokens, 8);
        assert_eq!(st.first.gspo.masked_tokens, 0);
        assert!(st.kl_to_init.unwrap().abs() < 1e-6, "{:?}", st.kl_to_init);
        assert!(st.first.iw_single.variance() < 1e-9);
        let after = (
            completion_logprob(&model, &prompt, &good),
            completion_logprob(&model, &prompt, &bad),
        );
        assert!(after.0 > before.0 + 0.05, "good: {before:?} -> {after:?}");
        assert!(after.1 < before.1 - 0.05, "bad: {before:?} -> {after:?}");
    }

    /// With either estimator, a zero-advantage update moves the student toward the teacher, and
    /// the per-domain reverse KL logged before it is the mean sampled-token gap.
    #[test]
    fn zero_advantage_distillation_moves_the_student_toward_the_teacher() {
        for estimator in [DistillEstimator::Sampled, DistillEstimator::Full] {
            let cfg = Qwen3Config::tiny(256, 32, 1, 2, 1);
            let student = Qwen3Model::new(cfg.clone(), 5).unwrap();
            let teacher = Arc::new(Qwen3Model::new(cfg, 11).unwrap());
            let prompt = b"<|user|>\nhi<|end|>\n".map(u32::from).to_vec();
            let sample = b"abcdef".map(u32::from).to_vec();
            let seqs = vec![call(&student, "s0", &prompt, &sample, 0.0)];
            // Per-token gaps -r_t = log pi_s - log pi_t on the sample; their squares shrink as
            // the student moves toward the teacher.
            let token_lps = |m: &Qwen3Model| {
                let toks: Vec<u32> = prompt.iter().chain(&sample).copied().collect();
                let (lp, _) = m
                    .token_logprobs(&TreeBatch::forest(&[&toks]), &ForwardOptions::default())
                    .unwrap();
                lp.to_vec1::<f32>().unwrap()[prompt.len()..].to_vec()
            };
            let teacher_lp = token_lps(&teacher);
            let gap = |m: &Qwen3Model| -> (f32, f32) {
                let lp = token_lps(m);
                let d: Vec<f32> = lp.iter().zip(&teacher_lp).map(|(s, t)| s - t).collect();
                (d.iter().sum(), d.iter().map(|x| x * x).sum())
            };
            let before = gap(&student);
            let spec = RlSpec {
                lr: 2e-3,
                updates_per_iteration: 1,
                distill_coef: 1.0,
                distill_estimator: estimator,
                ..RlSpec::default()
            };
            let reference = Arc::new(Qwen3Model::new(student.config().clone(), 5).unwrap());
            let teachers = HashMap::from([("general".to_string(), teacher.clone())]);
            let (student, st) = update(student, spec, "general", seqs, reference, teachers);
            assert_eq!(st.first.distill.tokens, 6);
            let (sum, n) = st.reverse_kl["general"];
            assert_eq!(n, 6);
            assert!(
                (sum - before.0 as f64).abs() < 1e-3,
                "{sum} vs {}",
                before.0
            );
            if estimator == DistillEstimator::Sampled {
                let est = st.first.distill.reverse_kl();
                assert!((est - before.0 as f64 / 6.0).abs() < 1e-3);
            } else {
                // The exact KL is non-negative, unlike the sampled gaps.
                assert!(st.first.distill.reverse_kl() > 0.0);
            }
            // With a zero advantage only the distillation term acts: the student's log-probs
            // of its sample move toward the teacher's.
            let after = gap(&student);
            assert!(
                after.1 < before.1 * 0.9,
                "{estimator:?}: squared gap {before:?} -> {after:?}"
            );
        }
    }
}
