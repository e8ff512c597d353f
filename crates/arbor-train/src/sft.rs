//! The SFT stage: supervised fine-tuning on trajectories recorded through the gateway (e.g. the
//! scripted-oracle policy's rollouts), trained as trees with the loss on model-generated tokens
//! only.
//!
//! Each section below is a submodule: `data` (Data), `step` (Training), `output` (Output and
//! Resume); this file holds the settings, the report and [`train_sessions`], which runs them.
//!
//! # Data
//!
//! Each run directory (`arbor run --out RUN`) holds `RUN/results.jsonl` (one rollout result per
//! line) and `RUN/gateway/calls.jsonl` (every model call as token ids), read together with
//! `arbor_trace::read_run`. [`load_sessions`] keeps the rollouts whose status is in [`SftConfig::statuses`] (default: `passed` only) and whose
//! domain passes [`SftConfig::domains`], and takes each kept rollout's gateway session as
//! `arbor_tree::Sequence`s (one per call: prompt tokens without loss, completion tokens with
//! loss). Sequence and session ids are prefixed with the run's index (`r0/...`) because session
//! names are deterministic and repeat across runs.
//!
//! # Training
//!
//! A deterministic fraction of the sessions (by seed) is held out. The training sessions form
//! one forest (`TrajectoryTree::from_sequences`: every session is a tree whose calls share their
//! common prefixes, and identical prefixes across sessions, like the system prompt, are shared
//! too), packed once into packs of at most [`SftConfig::max_tokens_per_pack`] tokens
//! (`arbor_tree::pack_tree`). An epoch visits the packs in a seeded random order; one optimizer
//! step takes [`SftConfig::packs_per_step`] packs, with `arbor-tree`'s exact loss weights
//! normalised over the step's own paths (token mean by default), so the step loss is the mean
//! NLL of the generated tokens of its paths, exactly as if every call were trained alone.
//! AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`.
//!
//! # Output (`out/`)
//!
//! - `config.json` + `model.safetensors`: the final checkpoint ([`arbor_model::Qwen3Model::save`]
//!   format), written at the end.
//! - `checkpoint/`: the periodic checkpoint (every [`SftConfig::save_every`] steps), replaced
//!   atomically ([`crate::checkpoint`]), with `state.json` (step, fingerprint, held-out loss
//!   before training). Removed once the stage is finished.
//! - `sft_log.jsonl`: one [`SftStepLog`] per step (the learning curve).
//! - `sft_report.json`: the [`SftReport`]; its presence means the stage is finished.
//!
//! # Resume (what it does exactly)
//!
//! - `sft_report.json` present with the same fingerprint (config + data): nothing is trained, the
//!   stored report is returned with `resumed = "finished"`. A different fingerprint is an error
//!   (use another `out`).
//! - `checkpoint/` present with the same fingerprint: the model is loaded from it, training
//!   continues at the next step with the same pack order and learning-rate schedule, and log
//!   lines after the checkpoint's step (steps that will be redone) are dropped from
//!   `sft_log.jsonl`. AdamW's moment estimates are *not* in the checkpoint (`arbor-model`'s
//!   optimizer does not expose them): they restart from zero (with bias correction restarting),
//!   so the continued run is close to, not bit-identical with, an uninterrupted one.
//! - otherwise training starts from `init` and any old log is discarded.

mod data;
mod output;
mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use arbor_model::{Qwen3Config, Qwen3Model};
use arbor_tree::LossNormalization;
use serde::{Deserialize, Serialize};

pub use data::{SftData, SftSession, load_sessions, split_sessions};
pub use output::read_log;
pub use step::{lr_at, packs_loss, sequences_loss};

use crate::{Result, TrainError};
use output::{StageDir, Start};
use step::Plan;

/// File names inside the output directory.
pub const LOG_FILE: &str = "sft_log.jsonl";
/// The report; its presence marks a finished stage.
pub const REPORT_FILE: &str = "sft_report.json";
/// The periodic checkpoint's directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// Settings of the SFT stage (all fields have defaults, so a partial TOML/JSON works).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Number of optimizer steps; `None` = `epochs` passes over the training packs.
    pub steps: Option<usize>,
    /// Passes over the training packs when `steps` is not set (fractions allowed).
    pub epochs: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps from `lr / warmup_steps` to `lr`.
    pub warmup_steps: usize,
    /// Cosine decay after warm-up ends at `min_lr_ratio * lr` on the last step.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Token budget of one pack (a micro-batch of one forward pass).
    pub max_tokens_per_pack: usize,
    /// Packs per optimizer step (gradients of the packs are summed, weights normalised over the
    /// step's paths).
    pub packs_per_step: usize,
    /// Loss normalization over the step's paths.
    pub normalization: LossNormalization,
    /// Seed of the held-out split and of the pack order.
    pub seed: u64,
    /// Rollout statuses kept (`passed`, `failed`, `agent_failure`, `infra_error`).
    pub statuses: Vec<String>,
    /// Domains kept (`None` = all).
    pub domains: Option<Vec<String>>,
    /// Fraction of sessions held out for the evaluation loss (at least one when there are two
    /// or more sessions and the fraction is positive).
    pub eval_fraction: f64,
    /// Cap on held-out sessions (the held-out loss is computed a few times; keep it cheap).
    pub max_eval_sessions: usize,
    /// Held-out loss every this many steps (0 = only before and after training).
    pub eval_every: usize,
    /// Periodic checkpoint every this many steps (0 = none; the final one is always written).
    pub save_every: usize,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            steps: None,
            epochs: 3.0,
            lr: 3e-3,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_tokens_per_pack: 8192,
            packs_per_step: 1,
            normalization: LossNormalization::TokenMean,
            seed: 0,
            statuses: vec!["passed".into()],
            domains: None,
            eval_fraction: 0.1,
            max_eval_sessions: 8,
            eval_every: 0,
            save_every: 50,
        }
    }
}

/// Where the model starts.
#[derive(Debug, Clone)]
pub enum SftInit {
    /// A checkpoint directory (`config.json` + `model.safetensors`).
    Dir(PathBuf),
    /// A freshly initialised model (seeded).
    Fresh {
        /// Its configuration.
        config: Qwen3Config,
        /// Initialisation seed.
        seed: u64,
    },
}

impl SftInit {
    /// `tiny` / `tiny-moe` (see [`tiny_byte_config`], [`tiny_moe_byte_config`]) or a directory.
    pub fn parse(s: &str, seed: u64) -> Self {
        match s {
            "tiny" => SftInit::Fresh {
                config: tiny_byte_config(),
                seed,
            },
            "tiny-moe" => SftInit::Fresh {
                config: tiny_moe_byte_config(),
                seed,
            },
            dir => SftInit::Dir(PathBuf::from(dir)),
        }
    }

    pub(crate) fn build(&self) -> Result<Qwen3Model> {
        match self {
            SftInit::Dir(d) => Ok(Qwen3Model::load(d)?),
            SftInit::Fresh { config, seed } => Ok(Qwen3Model::new(config.clone(), *seed)?),
        }
    }

    fn label(&self) -> String {
        match self {
            SftInit::Dir(d) => d.display().to_string(),
            SftInit::Fresh { config, seed } => format!(
                "fresh(hidden={}, layers={}, experts={}, seed={seed})",
                config.hidden_size, config.num_hidden_layers, config.num_experts
            ),
        }
    }
}

/// The fresh model of `--init tiny`: the byte-level (vocabulary 256) dense decoder `arbor policy
/// init` also writes: width 64, 2 layers, 4 query / 2 key-value heads, MLP 192, untied head,
/// about 0.13 M parameters. Small enough that SFT + RL of the quickstart fit minutes on 2 cores.
pub fn tiny_byte_config() -> Qwen3Config {
    Qwen3Config::tiny(256, 64, 2, 4, 2)
}

/// The fresh model of `--init tiny-moe`: [`tiny_byte_config`] with every MLP replaced by 4
/// experts of width 64, top-2 routing (about 0.15 M parameters).
pub fn tiny_moe_byte_config() -> Qwen3Config {
    tiny_byte_config().with_moe(4, 2, 64)
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// One line of `sft_log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftStepLog {
    /// 1-based step.
    pub step: usize,
    /// Epoch (0-based) the step belongs to.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean NLL of the step's generated tokens (before the update).
    pub loss: f64,
    /// Tokens forwarded (the packs' unique tokens: a shared prefix once per pack).
    pub tokens: u64,
    /// Tokens the same paths would cost trained one by one.
    pub flat_tokens: u64,
    /// Generated (loss) tokens, counted per path.
    pub loss_tokens: u64,
    /// Paths (calls) in the step.
    pub paths: u64,
    /// Wall seconds of the step (forward, backward, update).
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_s: f64,
    /// Held-out loss after this step, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// What [`train_sft`] reports (also `out/sft_report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftReport {
    /// Optimizer steps of the stage.
    pub steps: usize,
    /// `fresh`, `checkpoint` (continued from step `resumed_from`) or `finished` (nothing done).
    pub resumed: String,
    /// Step the run continued from (0 when it started fresh).
    pub resumed_from: usize,
    /// Training and held-out sessions, and the results filtered out / without calls.
    pub train_sessions: usize,
    /// Held-out sessions.
    pub eval_sessions: usize,
    /// Results not kept by the status / domain filter.
    pub filtered_results: usize,
    /// Kept results without recorded calls.
    pub missing_sessions: usize,
    /// Paths (calls) in the training forest.
    pub train_paths: usize,
    /// Unique tokens of the training forest.
    pub train_unique_tokens: u64,
    /// Flat tokens (sum of path lengths) of the training forest.
    pub train_flat_tokens: u64,
    /// Packs per epoch.
    pub packs: usize,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Mean loss of the last `min(10, steps)` steps (less noisy than one step).
    pub final_loss_avg: f64,
    /// Held-out loss before and after training (`None` without held-out sessions).
    pub eval_loss_before: Option<f64>,
    /// Held-out loss after training.
    pub eval_loss_after: Option<f64>,
    /// Forwarded tokens per second over all logged steps.
    pub tokens_per_s: f64,
    /// Flat-equivalent tokens per second (what linear training would need to match).
    pub flat_tokens_per_s: f64,
    /// Seconds spent in steps (all invocations) and wall seconds of this invocation.
    pub train_seconds: f64,
    /// Wall seconds of this invocation.
    pub wall_seconds: f64,
    /// The final checkpoint directory.
    pub checkpoint: PathBuf,
    /// Parameters of the model.
    pub params: usize,
    /// Where the model started.
    pub init: String,
    /// The configuration.
    pub config: SftConfig,
    /// Hash of the config and the training data (resume refuses a different one).
    pub fingerprint: String,
}

/// Events for a progress display.
#[derive(Debug)]
pub enum SftEvent<'a> {
    /// Training is about to start (or continue at `start_step`).
    Start {
        /// Total steps of the stage.
        total_steps: usize,
        /// Steps already done (resume).
        start_step: usize,
        /// Sessions for training / held out.
        train_sessions: usize,
        /// Held-out sessions.
        eval_sessions: usize,
        /// Packs per epoch.
        packs: usize,
    },
    /// A held-out loss was measured after `step` steps.
    Eval {
        /// Steps done.
        step: usize,
        /// Held-out loss.
        loss: f64,
    },
    /// A step finished.
    Step(&'a SftStepLog),
    /// The stage was already finished; nothing was trained.
    AlreadyFinished,
}

/// Runs the SFT stage (see the module docs for data, training, output and resume).
pub fn train_sft(
    init: &SftInit,
    runs: &[PathBuf],
    out: &Path,
    cfg: &SftConfig,
    progress: &mut dyn FnMut(SftEvent<'_>),
) -> Result<SftReport> {
    let data = load_sessions(runs, cfg)?;
    train_sessions(init, data, out, cfg, progress)
}

/// The SFT stage on sessions from anywhere (recorded runs: [`train_sft`]; a generated corpus:
/// [`crate::pretrain`]). Output, resume and fingerprint as in the module docs; the fingerprint
/// covers the sessions' tokens, so other data in the same `out` is refused.
pub fn train_sessions(
    init: &SftInit,
    data: SftData,
    out: &Path,
    cfg: &SftConfig,
    progress: &mut dyn FnMut(SftEvent<'_>),
) -> Result<SftReport> {
    let wall = Instant::now();
    if cfg.max_tokens_per_pack == 0 || cfg.lr <= 0.0 {
        return Err(TrainError::Input(
            "max_tokens_per_pack and lr must be positive".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let init_label = init.label();
    let fp = output::fingerprint(cfg, &init_label, &data.sessions)?;
    if let Some(rep) = output::finished_report(out, &fp)? {
        progress(SftEvent::AlreadyFinished);
        return Ok(rep);
    }
    let plan = Plan::new(&data, cfg)?;
    let (mut dir, start) = StageDir::open(out, init, &fp)?;
    tracing::info!(
        resumed = start.resumed,
        start_step = start.step,
        total_steps = plan.total_steps,
        train = plan.train,
        eval = plan.eval,
        packs = plan.packs.len(),
        unique = plan.tree.unique_tokens(),
        flat = plan.tree.flat_tokens(),
        "sft"
    );
    progress(SftEvent::Start {
        total_steps: plan.total_steps,
        start_step: start.step,
        train_sessions: plan.train,
        eval_sessions: plan.eval,
        packs: plan.packs.len(),
    });
    let model = &start.model;
    let mut eval_before = start.eval_before;
    if start.step == 0 {
        eval_before = packs_loss(model, &plan.eval_packs)?;
        if let Some(l) = eval_before {
            progress(SftEvent::Eval { step: 0, loss: l });
        }
    }
    step::run_steps(
        model,
        &plan,
        cfg,
        &mut dir,
        start.step,
        eval_before,
        progress,
    )?;
    let eval_after = packs_loss(model, &plan.eval_packs)?;
    if let Some(l) = eval_after {
        progress(SftEvent::Eval {
            step: plan.total_steps,
            loss: l,
        });
    }
    let stage = Stage {
        cfg,
        data: &data,
        plan: &plan,
        start: &start,
        init_label,
        fp,
        out,
        wall,
    };
    dir.install_final(model)?;
    let report = stage.report(&dir.log, eval_before, eval_after);
    dir.finish(&report)?;
    Ok(report)
}

/// What the report of a stage is made of, besides its log and held-out losses.
struct Stage<'a> {
    cfg: &'a SftConfig,
    data: &'a SftData,
    plan: &'a Plan,
    start: &'a Start,
    init_label: String,
    fp: String,
    out: &'a Path,
    wall: Instant,
}

impl Stage<'_> {
    /// The stage's report from its whole log (every invocation's steps).
    fn report(
        self,
        log: &[SftStepLog],
        eval_before: Option<f64>,
        eval_after: Option<f64>,
    ) -> SftReport {
        let secs: f64 = log.iter().map(|l| l.seconds).sum();
        let toks: u64 = log.iter().map(|l| l.tokens).sum();
        let flat: u64 = log.iter().map(|l| l.flat_tokens).sum();
        let tail = &log[log.len().saturating_sub(10)..];
        let tree = &self.plan.tree;
        SftReport {
            steps: self.plan.total_steps,
            resumed: self.start.resumed.into(),
            resumed_from: self.start.step,
            train_sessions: self.plan.train,
            eval_sessions: self.plan.eval,
            filtered_results: self.data.filtered,
            missing_sessions: self.data.missing,
            train_paths: tree.num_paths(),
            train_unique_tokens: tree.unique_tokens(),
            train_flat_tokens: tree.flat_tokens(),
            packs: self.plan.packs.len(),
            first_loss: log.first().map_or(f64::NAN, |l| l.loss),
            final_loss: log.last().map_or(f64::NAN, |l| l.loss),
            final_loss_avg: if tail.is_empty() {
                f64::NAN
            } else {
                tail.iter().map(|l| l.loss).sum::<f64>() / tail.len() as f64
            },
            eval_loss_before: eval_before,
            eval_loss_after: eval_after,
            tokens_per_s: toks as f64 / secs.max(1e-9),
            flat_tokens_per_s: flat as f64 / secs.max(1e-9),
            train_seconds: secs,
            wall_seconds: self.wall.elapsed().as_secs_f64(),
            checkpoint: self.out.to_path_buf(),
            params: self.start.model.num_params(),
            init: self.init_label,
            config: self.cfg.clone(),
            fingerprint: self.fp,
        }
    }
}
