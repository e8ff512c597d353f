//! `arbor train ...`: the training stages (SFT over recorded runs; RL, distillation and
//! held-out evaluation over live rollouts) and the whole pipeline.

use std::path::PathBuf;

use anyhow::{Context, Result};
use arbor_train::sft::{SftConfig, SftEvent, SftInit, SftReport, train_sft};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum Command {
    /// Pretrain a fresh byte-level model to copy from its context, on generated corpora with
    /// no task data (the stand-in for a pretrained base model): phase 1 repeats lines of random
    /// letters (default 2000 steps at lr 1e-2), phase 2 mixes task-shaped names in repeats,
    /// quoted spans, key/value recall and Markov text (default 1000 steps at 3e-3). Prints the
    /// held-out copy loss fresh, after phase 1 and after phase 2. Resumable.
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on the passed rollouts of run directories, trained as trees with
    /// the loss on model-generated tokens only. Resumable: rerun the same command.
    Sft(SftArgs),
    /// RL: group sampling with the embedded policy on fresh training tasks (at `[rl]
    /// temperature`, the temperature the trainer's log-probabilities use), verifier rewards,
    /// group-relative advantages, turn-level GSPO + IcePop + MCLA updates on packed trees,
    /// weights swapped into the running policy. Resumable: rerun the same command.
    Rl(super::pipeline::RlArgs),
    /// On-policy distillation: the student samples mixed-domain tasks, each domain's expert
    /// scores its tokens; RL loss plus a per-token reverse-KL term (`[distill]
    /// distill_estimator`: "sampled" token or "full" vocabulary). Resumable.
    Distill(super::pipeline::DistillArgs),
    /// Held-out pass rate of a checkpoint on one domain.
    Eval(super::pipeline::EvalArgs),
    /// The whole Specialize-then-Unify pipeline: oracle rollouts -> SFT per domain -> RL per
    /// domain -> on-policy distillation -> held-out evaluation, with a Markdown report.
    /// Resumable: rerun the same command.
    Pipeline(super::pipeline::PipelineArgs),
    /// The check that RL learns: on the `rlcheck` task family (eight operations, one fixed
    /// command each), SFT on demonstrations of which a share run the wrong command, then RL
    /// through the production loop; prints the held-out pass rate of both, sampled at the RL
    /// temperature several times per task, with standard errors. Resumable.
    RlCheck(super::rlcheck::RlCheckArgs),
}

#[derive(Args)]
pub struct SftArgs {
    /// A run directory (`arbor run --out`); repeat for several.
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    /// Start checkpoint directory, or `tiny` (dense byte-level, width 64, 2 layers, ~0.13 M
    /// parameters) / `tiny-moe` (same with 4 experts, top-2) for a fresh seeded model.
    #[arg(long)]
    init: String,
    /// Output directory: final checkpoint, sft_log.jsonl, sft_report.json.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps (default: --epochs passes over the packs).
    #[arg(long)]
    steps: Option<usize>,
    /// Passes over the training packs when --steps is not given.
    #[arg(long)]
    epochs: Option<f64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Token budget per pack.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seed (held-out split, pack order, fresh model).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep only these domains (comma separated).
    #[arg(long, value_delimiter = ',')]
    domain: Option<Vec<String>>,
    /// Rollout statuses to keep (comma separated; default passed).
    #[arg(long, value_delimiter = ',')]
    status: Option<Vec<String>>,
    /// A JSON or TOML file with any `SftConfig` fields; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object (the report) instead of a progress bar and a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Start checkpoint directory, or `tiny` / `tiny-moe` for a fresh seeded model.
    #[arg(long, default_value = "tiny")]
    init: String,
    /// Output directory: final checkpoint, sft_log.jsonl, sft_report.json, copy_loss.json, and
    /// the induction phase in induction/.
    #[arg(long)]
    out: PathBuf,
    /// Steps of the induction phase (random letters repeated verbatim; 0 = skip it)
    /// [default: 2000].
    #[arg(long)]
    induction_steps: Option<usize>,
    /// Peak learning rate of the induction phase [default: 1e-2].
    #[arg(long)]
    induction_lr: Option<f64>,
    /// Steps of the mixed-corpus phase [default: 1000].
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate of the mixed-corpus phase [default: 3e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// Token budget per pack (tokens per step) [default: 4096].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seed (corpora, fresh model).
    #[arg(long)]
    seed: Option<u64>,
    /// A JSON or TOML file with any `PretrainConfig` fields; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object (the report) instead of a progress bar and a summary.
    #[arg(long)]
    json: bool,
}

pub async fn run(c: Command) -> Result<i32> {
    match c {
        Command::Pretrain(a) => tokio::task::block_in_place(|| pretrain(a)),
        Command::Sft(a) => tokio::task::block_in_place(|| sft(a)),
        Command::Rl(a) => super::pipeline::rl(a).await,
        Command::Distill(a) => super::pipeline::distill(a).await,
        Command::Eval(a) => super::pipeline::eval(a).await,
        Command::Pipeline(a) => super::pipeline::pipeline(a).await,
        Command::RlCheck(a) => super::rlcheck::rl_check(a).await,
    }
}

fn load_config<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
    } else {
        toml::from_str(&text).with_context(|| format!("{}", path.display()))
    }
}

fn sft(a: SftArgs) -> Result<i32> {
    let mut cfg: SftConfig = match &a.config {
        Some(p) => load_config(p)?,
        None => SftConfig::default(),
    };
    if a.steps.is_some() {
        cfg.steps = a.steps;
    }
    if let Some(e) = a.epochs {
        cfg.epochs = e;
    }
    if let Some(lr) = a.lr {
        cfg.lr = lr;
    }
    if let Some(m) = a.max_tokens {
        cfg.max_tokens_per_pack = m;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if a.domain.is_some() {
        cfg.domains = a.domain.clone();
    }
    if let Some(s) = &a.status {
        cfg.statuses = s.clone();
    }
    let init = SftInit::parse(&a.init, cfg.seed);
    let report = with_progress(a.json, |progress| {
        train_sft(&init, &a.data, &a.out, &cfg, progress)
            .with_context(|| format!("SFT into {}", a.out.display()))
    })?;
    print_report("sft", &report, a.json, serde_json::json!({}));
    Ok(0)
}

fn pretrain(a: PretrainArgs) -> Result<i32> {
    use arbor_train::pretrain::{Phase, PretrainConfig, train_pretrain};
    let mut cfg: PretrainConfig = match &a.config {
        Some(p) => load_config(p)?,
        None => PretrainConfig::default(),
    };
    cfg.induction_steps = a.induction_steps.unwrap_or(cfg.induction_steps);
    cfg.induction_lr = a.induction_lr.unwrap_or(cfg.induction_lr);
    cfg.steps = a.steps.unwrap_or(cfg.steps);
    cfg.lr = a.lr.unwrap_or(cfg.lr);
    cfg.max_tokens_per_pack = a.max_tokens.unwrap_or(cfg.max_tokens_per_pack);
    cfg.seed = a.seed.unwrap_or(cfg.seed);
    let init = SftInit::parse(&a.init, cfg.seed);
    let (report, copy) = with_progress(a.json, |progress| {
        let mut shown = None;
        train_pretrain(&init, &a.out, &cfg, &mut |phase, ev| {
            if shown != Some(phase) && !a.json {
                shown = Some(phase);
                eprintln!(
                    "{}",
                    match phase {
                        Phase::Induction => "pretrain phase 1: induction (random letters repeated)",
                        Phase::Mixed => "pretrain phase 2: the mixed copy corpus",
                    }
                );
            }
            progress(ev)
        })
        .with_context(|| format!("pretraining into {}", a.out.display()))
    })?;
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    if !a.json {
        println!(
            "pretrain: held-out copy loss {:.4} -> {} after induction -> {} nats/byte ({} copy bytes in {} documents)",
            copy.before,
            f(copy.after_induction),
            f(copy.after),
            copy.copy_bytes,
            copy.documents
        );
    }
    print_report(
        "pretrain",
        &report,
        a.json,
        serde_json::json!({"copy_loss_before": copy.before,
            "copy_loss_after_induction": copy.after_induction, "copy_loss_after": copy.after}),
    );
    Ok(0)
}

/// Runs a stage with a progress bar (hidden with `--json`) fed by its events.
fn with_progress<T>(
    json: bool,
    stage: impl FnOnce(&mut dyn FnMut(SftEvent<'_>)) -> Result<T>,
) -> Result<T> {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut eval_msg = String::new();
    let mut progress = |ev: SftEvent<'_>| match ev {
        SftEvent::Start {
            total_steps,
            start_step,
            train_sessions,
            eval_sessions,
            packs,
        } => {
            bar.set_length(total_steps as u64);
            bar.set_position(start_step as u64);
            bar.println(format!(
                "{train_sessions} training sessions ({packs} packs), {eval_sessions} held out{}",
                if start_step > 0 {
                    format!("; resuming after step {start_step}")
                } else {
                    String::new()
                }
            ));
        }
        SftEvent::Eval { step, loss } => {
            eval_msg = format!(" held-out {loss:.3}");
            bar.println(format!("held-out loss after {step} steps: {loss:.4}"));
        }
        SftEvent::Step(l) => {
            bar.set_position(l.step as u64);
            bar.set_message(format!(
                "loss {:.3} {:.0} tok/s lr {:.1e}{eval_msg}",
                l.loss, l.tokens_per_s, l.lr
            ));
        }
        SftEvent::AlreadyFinished => {
            bar.println("already finished in this output directory (nothing to do)");
        }
    };
    let out = stage(&mut progress);
    bar.finish_and_clear();
    out
}

/// The stage's summary line, or one JSON object (the report's figures plus `extra`).
fn print_report(stage: &str, report: &SftReport, json: bool, extra: serde_json::Value) {
    if json {
        let mut v = serde_json::json!({
            "steps": report.steps,
            "resumed": report.resumed,
            "resumed_from": report.resumed_from,
            "train_sessions": report.train_sessions,
            "eval_sessions": report.eval_sessions,
            "first_loss": report.first_loss,
            "final_train_loss": report.final_loss,
            "final_train_loss_avg10": report.final_loss_avg,
            "eval_loss_before": report.eval_loss_before,
            "eval_loss_after": report.eval_loss_after,
            "unique_tokens_per_s": report.tokens_per_s,
            "flat_tokens_per_s": report.flat_tokens_per_s,
            "train_seconds": report.train_seconds,
            "seconds": report.wall_seconds,
            "params": report.params,
            "checkpoint": report.checkpoint,
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        println!("{v}");
    } else {
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "{stage}: {} steps ({}), train loss {:.4} -> {:.4} (last-10 mean {:.4}), held-out {} -> {}, {:.0} unique tok/s ({:.0} flat-equivalent), {:.1}s; checkpoint {}",
            report.steps,
            report.resumed,
            report.first_loss,
            report.final_loss,
            report.final_loss_avg,
            f(report.eval_loss_before),
            f(report.eval_loss_after),
            report.tokens_per_s,
            report.flat_tokens_per_s,
            report.wall_seconds,
            report.checkpoint.display()
        );
    }
}
