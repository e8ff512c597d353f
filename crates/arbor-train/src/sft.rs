//! The SFT stage: supervised fine-tuning on trajectories recorded through the gateway (e.g. the
//! scripted-oracle policy's rollouts), trained as trees with the loss on model-generated tokens
//! only.
//!
//! # Data
//!
//! Each run directory (`arbor run --out RUN`) holds `RUN/results.jsonl` (one rollout result per
//! line) and `RUN/gateway/calls.jsonl` (every model call as token ids). [`load_sessions`] keeps
//! the rollouts whose status is in [`SftConfig::statuses`] (default: `passed` only) and whose
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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arbor_model::{AuxStats, Qwen3Config, Qwen3Model};
use arbor_tree::{LossNormalization, Pack, PackOptions, Sequence, TrajectoryTree, pack_tree};
use candle::Tensor;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::rl::sft_loss_on;
use crate::{Result, TrainError};

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

/// One kept rollout's recorded session.
#[derive(Debug, Clone)]
pub struct SftSession {
    /// Index of the run directory in the `runs` list.
    pub run: usize,
    /// Gateway session id (unprefixed).
    pub session: String,
    /// Task id, scaffold and domain of the rollout.
    pub task_id: String,
    /// Scaffold name.
    pub scaffold: String,
    /// Task domain.
    pub domain: String,
    /// One sequence per call (ids and group prefixed `r{run}/`).
    pub sequences: Vec<Sequence>,
}

/// What [`load_sessions`] found.
#[derive(Debug, Clone, Default)]
pub struct SftData {
    /// Kept sessions, in run then session-id order.
    pub sessions: Vec<SftSession>,
    /// Results filtered out by status or domain.
    pub filtered: usize,
    /// Kept results whose session has no token-level call in the gateway store.
    pub missing: usize,
}

/// The fields of a `results.jsonl` line this stage needs (the record is owned by
/// `arbor-rollout`; reading only these keeps this crate free of the rollout stack).
#[derive(Deserialize)]
struct ResultLine {
    task_id: String,
    scaffold: String,
    #[serde(default)]
    domain: String,
    status: String,
    session: String,
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// Gathers the sessions of the kept rollouts of every run directory.
pub fn load_sessions(runs: &[PathBuf], cfg: &SftConfig) -> Result<SftData> {
    let mut data = SftData::default();
    for (r, run) in runs.iter().enumerate() {
        let results_path = run.join("results.jsonl");
        let text = std::fs::read_to_string(&results_path).map_err(|e| io(&results_path, e))?;
        let mut kept = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let res: ResultLine = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(e) => {
                    // A torn last line from a killed run; anything else is a real error.
                    if n + 1 == text.lines().count() {
                        tracing::warn!("{}: skipping torn last line", results_path.display());
                        continue;
                    }
                    return Err(TrainError::Input(format!(
                        "{}:{}: {e}",
                        results_path.display(),
                        n + 1
                    )));
                }
            };
            let status_ok = cfg.statuses.contains(&res.status);
            let domain_ok = cfg.domains.as_ref().is_none_or(|d| d.contains(&res.domain));
            if status_ok && domain_ok {
                kept.push(res);
            } else {
                data.filtered += 1;
            }
        }
        let gateway = run.join("gateway");
        let seqs = arbor_gateway::tree::store_sequences(&gateway)
            .map_err(|e| TrainError::Input(format!("{}: {e}", gateway.display())))?;
        let mut by_session: std::collections::HashMap<String, Vec<Sequence>> =
            std::collections::HashMap::new();
        for s in seqs {
            if let Some(g) = s.group.clone() {
                by_session.entry(g).or_default().push(s);
            }
        }
        // Results are in completion order, which varies between runs; session ids do not, so
        // the same run directory always gives the same data order (and the same SFT run).
        kept.sort_by(|a, b| a.session.cmp(&b.session));
        for res in kept {
            let Some(mut seqs) = by_session.remove(&res.session) else {
                data.missing += 1;
                tracing::warn!(session = %res.session, "kept rollout has no recorded calls");
                continue;
            };
            for s in &mut seqs {
                s.id = format!("r{r}/{}", s.id);
                s.group = Some(format!("r{r}/{}", res.session));
            }
            data.sessions.push(SftSession {
                run: r,
                session: res.session,
                task_id: res.task_id,
                scaffold: res.scaffold,
                domain: res.domain,
                sequences: seqs,
            });
        }
    }
    Ok(data)
}

/// Splits session indices into (train, held-out), deterministically from `cfg.seed`.
pub fn split_sessions(n: usize, cfg: &SftConfig) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x5eed_e7a1);
    idx.shuffle(&mut rng);
    let mut n_eval = if n >= 2 && cfg.eval_fraction > 0.0 {
        ((n as f64 * cfg.eval_fraction).round() as usize).max(1)
    } else {
        0
    };
    n_eval = n_eval.min(cfg.max_eval_sessions).min(n.saturating_sub(1));
    let mut eval: Vec<usize> = idx[..n_eval].to_vec();
    let mut train: Vec<usize> = idx[n_eval..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
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

/// Trainer state stored with the periodic checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SftState {
    step: usize,
    fingerprint: String,
    eval_loss_before: Option<f64>,
}

/// FNV-1a: a hash that is stable across builds (the std hasher is not).
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn fingerprint(cfg: &SftConfig, init: &str, sessions: &[SftSession]) -> Result<String> {
    // Checkpoint cadence does not change the trained model; leave it out so it can change on
    // resume.
    let mut c = cfg.clone();
    c.save_every = 0;
    c.eval_every = 0;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    h = fnv(
        &serde_json::to_vec(&c).map_err(|e| TrainError::Input(e.to_string()))?,
        h,
    );
    h = fnv(init.as_bytes(), h);
    for s in sessions {
        for q in &s.sequences {
            h = fnv(q.id.as_bytes(), h);
            for t in &q.tokens {
                h = fnv(&t.to_le_bytes(), h);
            }
            for &m in &q.loss_mask {
                h = fnv(&[m as u8], h);
            }
        }
    }
    Ok(format!("{h:016x}"))
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

/// Reads `sft_log.jsonl` (unparsable lines, e.g. a torn last line, are skipped).
pub fn read_log(path: &Path) -> Vec<SftStepLog> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn write_log(path: &Path, lines: &[SftStepLog]) -> Result<()> {
    let mut buf = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut buf, l).map_err(|e| TrainError::Input(e.to_string()))?;
        buf.push(b'\n');
    }
    checkpoint::write_atomic(path, &buf)
}

/// Moves the model files of `from` into `to` (each rename is atomic; the report written after
/// them marks the stage complete).
fn install_final(model: &Qwen3Model, out: &Path) -> Result<()> {
    let tmp = out.join(".final.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    model.save(&tmp)?;
    for f in ["config.json", "model.safetensors"] {
        std::fs::rename(tmp.join(f), out.join(f)).map_err(|e| io(&out.join(f), e))?;
    }
    std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))
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
    let fp = fingerprint(cfg, &init_label, &data.sessions)?;

    let report_path = out.join(REPORT_FILE);
    if report_path.is_file() {
        let text = std::fs::read_to_string(&report_path).map_err(|e| io(&report_path, e))?;
        let mut rep: SftReport = serde_json::from_str(&text)
            .map_err(|e| TrainError::Input(format!("{}: {e}", report_path.display())))?;
        if rep.fingerprint != fp {
            return Err(TrainError::Input(format!(
                "{} holds a finished SFT stage with another config or data (fingerprint {} != {fp}); use another output directory",
                out.display(),
                rep.fingerprint
            )));
        }
        progress(SftEvent::AlreadyFinished);
        rep.resumed = "finished".into();
        return Ok(rep);
    }

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

    // Resume from the periodic checkpoint, or start fresh.
    let ckpt_dir = out.join(CHECKPOINT_DIR);
    let log_path = out.join(LOG_FILE);
    let (model, start_step, mut eval_before, resumed) =
        match checkpoint::load_latest::<SftState>(&ckpt_dir)? {
            Some((m, st)) if st.fingerprint == fp => {
                (m, st.step, st.eval_loss_before, "checkpoint")
            }
            Some((_, st)) => {
                return Err(TrainError::ForeignCheckpoint {
                    dir: ckpt_dir.clone(),
                    found: st.fingerprint.to_string(),
                    expected: fp.to_string(),
                });
            }
            None => (init.build()?, 0, None, "fresh"),
        };
    let mut log: Vec<SftStepLog> = read_log(&log_path)
        .into_iter()
        .filter(|l| l.step <= start_step)
        .collect();
    write_log(&log_path, &log)?;
    tracing::info!(
        resumed,
        start_step,
        total_steps,
        train = train.len(),
        eval = eval.len(),
        packs = packs.len(),
        unique = tree.unique_tokens(),
        flat = tree.flat_tokens(),
        "sft"
    );
    progress(SftEvent::Start {
        total_steps,
        start_step,
        train_sessions: train.len(),
        eval_sessions: eval.len(),
        packs: packs.len(),
    });

    if start_step == 0 {
        eval_before = packs_loss(&model, &eval_packs)?;
        if let Some(l) = eval_before {
            progress(SftEvent::Eval { step: 0, loss: l });
        }
    }

    let mut opt = arbor_model::train::AdamWTrainer::new(model.vars(), cfg.lr, cfg.weight_decay)?;
    let mut logf = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .map_err(|e| io(&log_path, e))?;
    for s in start_step..total_steps {
        let t0 = Instant::now();
        let lr = lr_at(cfg, s, total_steps);
        opt.params_mut().lr = lr;
        let (epoch, chosen) = step_packs(cfg, packs.len(), s);
        let step_norm = chosen
            .iter()
            .map(|&i| packs[i].flat.normalizer())
            .fold(arbor_tree::Normalizer::default(), |a, b| a.merge(b));
        let (mut total, mut aux) = (None::<Tensor>, AuxStats::default());
        let (mut tokens, mut flat_tokens, mut paths) = (0u64, 0u64, 0u64);
        for &i in &chosen {
            let flat = &packs[i].flat;
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
            let (l, a) = sft_loss_on(&model, flat, &w)?;
            aux.merge(a)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        let Some(nll) = total else {
            tracing::warn!(step = s + 1, "step without generated tokens skipped");
            continue;
        };
        let loss_value = nll.to_scalar::<f32>()? as f64;
        let mut loss = nll;
        if let Some(a) = aux.loss()? {
            loss = (loss + (a * model.config().router_aux_loss_coef)?)?;
        }
        opt.backward_step(&loss)?;
        let seconds = t0.elapsed().as_secs_f64();
        let step = s + 1;
        let eval_loss = if cfg.eval_every > 0 && step % cfg.eval_every == 0 && step < total_steps {
            let l = packs_loss(&model, &eval_packs)?;
            if let Some(l) = l {
                progress(SftEvent::Eval { step, loss: l });
            }
            l
        } else {
            None
        };
        let line = SftStepLog {
            step,
            epoch,
            lr,
            loss: loss_value,
            tokens,
            flat_tokens,
            loss_tokens: step_norm.loss_tokens,
            paths,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            eval_loss,
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| TrainError::Input(e.to_string()))?;
        bytes.push(b'\n');
        logf.write_all(&bytes).map_err(|e| io(&log_path, e))?;
        logf.flush().map_err(|e| io(&log_path, e))?;
        progress(SftEvent::Step(&line));
        log.push(line);
        if cfg.save_every > 0 && step % cfg.save_every == 0 && step < total_steps {
            // The log must be on disk up to `step` before a checkpoint claims it.
            logf.sync_data().map_err(|e| io(&log_path, e))?;
            checkpoint::save(
                &ckpt_dir,
                &model,
                &SftState {
                    step,
                    fingerprint: fp.clone(),
                    eval_loss_before: eval_before,
                },
            )?;
        }
    }
    drop(logf);

    let eval_after = packs_loss(&model, &eval_packs)?;
    if let Some(l) = eval_after {
        progress(SftEvent::Eval {
            step: total_steps,
            loss: l,
        });
    }
    install_final(&model, out)?;

    let secs: f64 = log.iter().map(|l| l.seconds).sum();
    let toks: u64 = log.iter().map(|l| l.tokens).sum();
    let flat: u64 = log.iter().map(|l| l.flat_tokens).sum();
    let tail = &log[log.len().saturating_sub(10)..];
    let report = SftReport {
        steps: total_steps,
        resumed: resumed.into(),
        resumed_from: start_step,
        train_sessions: train.len(),
        eval_sessions: eval.len(),
        filtered_results: data.filtered,
        missing_sessions: data.missing,
        train_paths: tree.num_paths(),
        train_unique_tokens: tree.unique_tokens(),
        train_flat_tokens: tree.flat_tokens(),
        packs: packs.len(),
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
        wall_seconds: wall.elapsed().as_secs_f64(),
        checkpoint: out.to_path_buf(),
        params: model.num_params(),
        init: init_label,
        config: cfg.clone(),
        fingerprint: fp,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| TrainError::Input(e.to_string()))?;
    checkpoint::write_atomic(&report_path, &json)?;
    if ckpt_dir.exists() {
        std::fs::remove_dir_all(&ckpt_dir).map_err(|e| io(&ckpt_dir, e))?;
    }
    Ok(report)
}
