//! `arbor train rl-check`: does RL, run through the production loop, learn?
//!
//! On the `rlcheck` task family (`arbor_task::domains::rlcheck`: eight operations, each with
//! one fixed command, nothing copied from the instruction) a fresh byte-level model is
//! fine-tuned on demonstrations from an imperfect demonstrator (a share `demo_error_rate` of
//! them run another operation's command, and fail), so it has the command format but picks
//! the right command only part of the time. RL from there (the same [`RlStage`] as the
//! pipeline: sandboxed rollouts, the gateway, the embedded policy with weight swaps,
//! turn-level GSPO + IcePop on packed trees) must push the sampled held-out pass rate close
//! to 1. Both models are evaluated on the same held-out tasks, `eval_samples` samples each at
//! the RL temperature.
//!
//! ```text
//! base/            the fresh model
//! demo-tasks/N/    demonstration tasks, set N running operation op+N's command (0 = right)
//! demo/N/          scripted-oracle rollouts of set N
//! sft/             SFT on every demonstration rollout (passed and failed)
//! eval/sft/        held-out rollouts of sft/
//! rl/              the RL stage (rl_log.jsonl, final/, best/)
//! eval/rl/         held-out rollouts of rl/final/
//! rl_check.json    the report
//! ```
//!
//! Every piece is resumable as in the pipeline; `config.json` binds the directory to its
//! settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arbor_rollout::experiment::{DatasetSpec, PolicySpec};
use arbor_train::sft::{SftConfig, SftEvent, SftInit, train_sft};
use serde::{Deserialize, Serialize};

use crate::config::{ModelSpec, RlSpec, RolloutSpec};
use crate::pipeline::{PipelineEvent, PipelineProgress, rl_progress, rollout_progress};
use crate::rl::RlStage;
use crate::rollouts::{self, SampledRate, TaskSet};
use crate::{RecipeError, Result};

/// The task family.
const FAMILY: &str = "rlcheck";
/// The report file.
pub const REPORT_FILE: &str = "rl_check.json";

/// Settings of a check (every field has a default: the full check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlCheckConfig {
    /// Seed of the tasks, the demonstrator's errors and the fresh model.
    pub seed: u64,
    /// The fresh model.
    pub model: ModelSpec,
    /// Scaffold and limits of every rollout.
    pub rollout: RolloutSpec,
    /// Demonstration tasks (training split).
    pub demonstrations: usize,
    /// Share of demonstrations that run another operation's command.
    pub demo_error_rate: f64,
    /// SFT on the demonstrations (every rollout is kept, failed ones included).
    pub sft: SftConfig,
    /// The RL stage.
    pub rl: RlSpec,
    /// Held-out tasks of each evaluation.
    pub eval_tasks: usize,
    /// Samples per held-out task (at `rl.temperature`).
    pub eval_samples: u32,
}

impl Default for RlCheckConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            model: ModelSpec::default(),
            // The longest demonstration reply is 70 bytes; a cap below it cuts the right
            // answer short.
            rollout: RolloutSpec {
                max_steps: 3,
                max_tokens: 96,
                observation_chars: 100,
                concurrency: 16,
                ..RolloutSpec::default()
            },
            demonstrations: 256,
            demo_error_rate: 0.62,
            // Long enough that sampled replies are well formed (at 300 steps a third of the
            // samples at temperature 1 were garbled, and RL spent itself on the format): what
            // is left to learn is which command, the mapping RL must sharpen.
            sft: SftConfig {
                steps: Some(1500),
                lr: 3e-3,
                max_tokens_per_pack: 2048,
                statuses: vec!["passed".into(), "failed".into()],
                eval_fraction: 0.05,
                max_eval_sessions: 4,
                save_every: 500,
                ..SftConfig::default()
            },
            rl: RlSpec {
                iterations: 24,
                tasks_per_iteration: 16,
                group_size: 8,
                updates_per_iteration: 1,
                minibatches: 2,
                lr: 3e-4,
                ..RlSpec::default()
            },
            eval_tasks: 100,
            eval_samples: 4,
        }
    }
}

impl RlCheckConfig {
    /// A reduced check for the test suite: fewer tasks, iterations and samples.
    pub fn reduced() -> Self {
        let d = Self::default();
        Self {
            demonstrations: 128,
            sft: SftConfig {
                steps: Some(800),
                save_every: 400,
                ..d.sft.clone()
            },
            rl: RlSpec {
                iterations: 8,
                ..d.rl.clone()
            },
            eval_tasks: 48,
            ..d
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.demo_error_rate) {
            return Err(format!(
                "demo_error_rate must be in [0, 1), got {}",
                self.demo_error_rate
            ));
        }
        if self.demonstrations == 0 || self.eval_tasks == 0 || self.eval_samples == 0 {
            return Err("demonstrations, eval_tasks and eval_samples must be positive".into());
        }
        self.rl.validate("rl")?;
        self.model
            .config()
            .validate()
            .map_err(|e| format!("model: {e}"))
    }
}

/// `rl_check.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlCheckReport {
    /// Held-out pass rate of the SFT start, sampled at the RL temperature.
    pub sft_pass: f64,
    /// Its standard error (across tasks).
    pub sft_pass_se: f64,
    /// Held-out pass rate after RL, same tasks, same sampling.
    pub rl_pass: f64,
    /// Its standard error.
    pub rl_pass_se: f64,
    /// `(rl_pass - sft_pass) / sqrt(se_sft^2 + se_rl^2)`.
    pub gain_z: f64,
    /// Held-out tasks and samples per task of each evaluation.
    pub eval_tasks: usize,
    pub eval_samples: u32,
    /// Sampling temperature of RL and both evaluations.
    pub temperature: f32,
    /// RL iterations run.
    pub iterations: usize,
    /// Training pass rate per RL iteration.
    pub train_pass_rates: Vec<f64>,
    /// Mean over iterations of the importance-weight variance of the first update with one
    /// forward pass and with the MCLA mean of `mcla_passes` passes (they differ for an MoE
    /// student with router noise), and `mcla_passes`.
    pub iw_var_single: f64,
    pub iw_var_mcla: f64,
    pub mcla_passes: usize,
    /// Demonstrations, and how many ran a wrong command.
    pub demonstrations: usize,
    pub demonstrations_wrong: usize,
    /// Model parameters.
    pub params: usize,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// Runs (or continues) the check into `out`.
pub async fn run_rl_check(
    cfg: &RlCheckConfig,
    out: &Path,
    progress: PipelineProgress,
) -> Result<RlCheckReport> {
    cfg.validate().map_err(RecipeError::Config)?;
    let wall = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    bind_config(cfg, out)?;
    let stage = |name: &str, done: bool| {
        progress(PipelineEvent::Stage {
            stage: name.into(),
            skipped: done,
        })
    };

    let base = out.join("base");
    stage("base", base.join("model.safetensors").is_file());
    if !base.join("model.safetensors").is_file() {
        arbor_policy::init_checkpoint(&base, cfg.model.config(), cfg.seed)
            .map_err(|e| RecipeError::Train(format!("initializing the base model: {e}")))?;
    }
    let params = arbor_model::Qwen3Model::load(&base)?.num_params();

    let (demo_runs, wrong) = demonstrations(cfg, out, &progress).await?;
    let sft = out.join("sft");
    stage("sft", sft.join(arbor_train::sft::REPORT_FILE).is_file());
    run_sft(cfg, &base, demo_runs, &sft, &progress).await?;

    let sft_rate = evaluate(cfg, &sft, &out.join("eval").join("sft"), "sft", &progress).await?;
    let rl = RlStage {
        label: "rl/rlcheck".into(),
        spec: cfg.rl.clone(),
        rollout: cfg.rollout.clone(),
        domains: vec![FAMILY.into()],
        difficulty: 1,
        seed: cfg.seed,
        init: sft.clone(),
        teachers: BTreeMap::new(),
        out: out.join("rl"),
    };
    stage("rl", rl.out.join(crate::rl::REPORT_FILE).is_file());
    let rl_report = rl
        .run(rl_progress(
            "rl".into(),
            cfg.rl.iterations,
            progress.clone(),
        ))
        .await?;
    let rl_rate = evaluate(
        cfg,
        &rl_report.final_checkpoint,
        &out.join("eval").join("rl"),
        "rl",
        &progress,
    )
    .await?;

    let log = crate::rl::read_log(&rl.out.join(crate::rl::LOG_FILE));
    let se = (sft_rate.std_err.powi(2) + rl_rate.std_err.powi(2)).sqrt();
    let report = RlCheckReport {
        sft_pass: sft_rate.rate,
        sft_pass_se: sft_rate.std_err,
        rl_pass: rl_rate.rate,
        rl_pass_se: rl_rate.std_err,
        gain_z: if se > 0.0 {
            (rl_rate.rate - sft_rate.rate) / se
        } else {
            0.0
        },
        eval_tasks: sft_rate.tasks,
        eval_samples: cfg.eval_samples,
        temperature: cfg.rl.temperature,
        iterations: rl_report.iterations,
        train_pass_rates: log.iter().map(|l| l.pass_rate).collect(),
        iw_var_single: mean(log.iter().map(|l| l.iw_var_single)),
        iw_var_mcla: mean(log.iter().map(|l| l.iw_var_mcla)),
        mcla_passes: cfg.rl.mcla_passes.max(1),
        demonstrations: cfg.demonstrations,
        demonstrations_wrong: wrong,
        params,
        seconds: wall.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| RecipeError::Io(e.to_string()))?;
    arbor_train::checkpoint::write_atomic(&out.join(REPORT_FILE), text.as_bytes())?;
    Ok(report)
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

fn io(path: &Path, e: std::io::Error) -> RecipeError {
    RecipeError::Io(format!("{}: {e}", path.display()))
}

/// `config.json`: a directory started with other settings is refused, not mixed.
fn bind_config(cfg: &RlCheckConfig, out: &Path) -> Result<()> {
    let path = out.join("config.json");
    let text = serde_json::to_string_pretty(cfg).map_err(|e| RecipeError::Io(e.to_string()))?;
    match std::fs::read_to_string(&path) {
        Ok(old) if old != text => Err(RecipeError::Config(format!(
            "{} was started with other settings ({}); use another output directory",
            out.display(),
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(_) => arbor_train::checkpoint::write_atomic(&path, text.as_bytes()).map_err(Into::into),
    }
}

/// Rolls out the demonstration sets with the scripted oracle; returns their run directories
/// and how many demonstrations ran a wrong command.
async fn demonstrations(
    cfg: &RlCheckConfig,
    out: &Path,
    progress: &PipelineProgress,
) -> Result<(Vec<PathBuf>, usize)> {
    let opts = arbor_task::GenOptions {
        difficulty: 1,
        split: arbor_task::domains::Split::Train,
    };
    let tasks = arbor_task::domains::generate(FAMILY, cfg.demonstrations, cfg.seed, &opts)
        .map_err(|e| RecipeError::Config(format!("generating {FAMILY} tasks: {e}")))?;
    let sets =
        arbor_task::domains::rlcheck::demonstration_sets(tasks, cfg.demo_error_rate, cfg.seed);
    let wrong = sets.iter().skip(1).map(Vec::len).sum();
    let mut runs = Vec::new();
    for (shift, set) in sets.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
        let dir = out.join("demo-tasks").join(shift.to_string());
        if !dir.is_dir() {
            let tmp = out.join("demo-tasks").join(format!(".{shift}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            for t in set {
                arbor_task::dataset::write_task_json(&tmp, t)
                    .map_err(|e| RecipeError::Io(format!("{}: {e}", tmp.display())))?;
            }
            std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        }
        let run = out.join("demo").join(shift.to_string());
        let label = format!("demonstrations {shift}");
        progress(PipelineEvent::Stage {
            stage: label.clone(),
            skipped: false,
        });
        let dataset = DatasetSpec {
            path: Some(dir),
            ..DatasetSpec::default()
        };
        let exp = rollouts::experiment(
            &format!("demo-{shift}"),
            &run,
            vec![dataset],
            1,
            PolicySpec::ScriptedOracle,
            &cfg.rollout,
        );
        rollouts::run(&exp, &run, Some(rollout_progress(label, progress.clone()))).await?;
        runs.push(run);
    }
    Ok((runs, wrong))
}

/// SFT from `base` on every demonstration rollout, on a blocking thread.
async fn run_sft(
    cfg: &RlCheckConfig,
    base: &Path,
    runs: Vec<PathBuf>,
    dir: &Path,
    progress: &PipelineProgress,
) -> Result<()> {
    let (scfg, base, dir, p) = (
        cfg.sft.clone(),
        base.to_path_buf(),
        dir.to_path_buf(),
        progress.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let mut total = 0;
        let mut on = |ev: SftEvent<'_>| match ev {
            SftEvent::Start { total_steps, .. } => total = total_steps,
            SftEvent::Step(l) => p(PipelineEvent::SftStep {
                stage: "sft".into(),
                step: l.step,
                total,
                loss: l.loss,
            }),
            _ => {}
        };
        train_sft(&SftInit::Dir(base), &runs, &dir, &scfg, &mut on).map_err(RecipeError::from)
    })
    .await
    .map_err(|e| RecipeError::Train(format!("SFT task: {e}")))?
    .map(|_| ())
}

/// The held-out tasks, `eval_samples` samples each at the RL temperature.
async fn evaluate(
    cfg: &RlCheckConfig,
    checkpoint: &Path,
    out: &Path,
    row: &str,
    progress: &PipelineProgress,
) -> Result<SampledRate> {
    let tasks = TaskSet {
        domain: FAMILY.into(),
        n: cfg.eval_tasks,
        seed: cfg.seed ^ 0xe7a1,
        split: "heldout",
        difficulty: 1,
    };
    let label = format!("eval/{row}");
    progress(PipelineEvent::Stage {
        stage: label.clone(),
        skipped: false,
    });
    let rate = crate::eval::evaluate_sampled(
        checkpoint,
        tasks,
        cfg.eval_samples,
        cfg.rl.temperature,
        &cfg.rollout,
        out,
        Some(rollout_progress(label, progress.clone())),
    )
    .await?;
    progress(PipelineEvent::EvaluatedSampled {
        row: row.into(),
        domain: FAMILY.into(),
        rate: rate.clone(),
    });
    Ok(rate)
}
