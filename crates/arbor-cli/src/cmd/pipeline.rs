//! Running the recipe from the command line: the pipeline with a progress display and the
//! results table (shared by `arbor train pipeline` and `arbor quickstart`), and the single
//! stages (`arbor train rl|distill|eval`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arbor_recipe::pipeline::{PipelineEvent, PipelineProgress, PipelineResults, ROWS};
use arbor_recipe::rl::{RlEvent, RlStage};
use arbor_recipe::{PipelineConfig, run_pipeline};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

/// The quickstart's pipeline (also the defaults of the single-stage commands).
pub const QUICKSTART: &str = include_str!("../../../../examples/quickstart.toml");

pub fn bar() -> ProgressBar {
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

/// A line above the bar; on stderr directly when the bar is not drawn (not a terminal), so
/// logs of unattended runs still show every stage and iteration.
fn say(b: &ProgressBar, msg: String) {
    if b.is_hidden() {
        eprintln!("{msg}");
    } else {
        b.println(msg);
    }
}

/// Why an RL stage stopped early, for the progress line.
const NO_SIGNAL: &str = "no group had reward variance in the last `stop_without_signal` iterations (every sample passed, or every sample failed), so there is no gradient";

/// The progress display of pipeline events: a bar, with a line per finished stage piece.
pub fn progress_display(b: &ProgressBar) -> PipelineProgress {
    let b = b.clone();
    Arc::new(move |ev: PipelineEvent| match ev {
        PipelineEvent::Stage { stage, skipped } => {
            if skipped {
                say(&b, format!("{stage}: already finished"));
            } else if b.is_hidden() {
                eprintln!("{stage}: started");
            }
            b.set_position(0);
            b.set_length(0);
            b.set_message(stage);
        }
        PipelineEvent::Rollouts {
            stage,
            done,
            total,
            passed,
        } => {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(format!("{stage}: rollouts, {passed} passed"));
        }
        PipelineEvent::SftStep {
            stage,
            step,
            total,
            loss,
        } => {
            b.set_length(total as u64);
            b.set_position(step as u64);
            b.set_message(format!("{stage}: loss {loss:.3}"));
        }
        PipelineEvent::Iteration { stage, total, log } => say(
            &b,
            format!(
                "{stage} iteration {}/{total}: train pass rate {:.3}, {} of {} groups with signal, {} cut at max_tokens, KL to start {}, IW var {:.2e} (MCLA {:.2e}){}, {:.0}s sampling + {:.0}s training",
                log.iteration + 1,
                log.pass_rate,
                log.groups_with_signal,
                log.groups,
                log.overlong,
                log.kl_to_init.map_or("-".into(), |k| format!("{k:.4}")),
                log.iw_var_single,
                log.iw_var_mcla,
                log.reverse_kl_to_teacher
                    .map_or(String::new(), |k| format!(", reverse KL to expert {k:.4}")),
                log.sample_seconds,
                log.train_seconds
            ),
        ),
        PipelineEvent::StoppedWithoutSignal { stage, iteration } => say(
            &b,
            format!(
                "{stage}: stopped before iteration {}: {}",
                iteration + 1,
                NO_SIGNAL
            ),
        ),
        PipelineEvent::Evaluated { row, domain, rate } => say(
            &b,
            format!(
                "held-out {domain} / {row}: {}/{} passed ({:.3})",
                rate.passed,
                rate.n,
                rate.rate()
            ),
        ),
        PipelineEvent::EvaluatedSampled { row, domain, rate } => say(
            &b,
            format!(
                "held-out {domain} / {row}: {:.3} +- {:.3} ({} tasks, {}/{} samples passed)",
                rate.rate, rate.std_err, rate.tasks, rate.passed, rate.samples
            ),
        ),
    })
}

/// Runs the pipeline with a progress bar, returning its results.
pub async fn run_with_progress(cfg: &PipelineConfig, out: &Path) -> Result<PipelineResults> {
    let b = bar();
    let progress = progress_display(&b);
    let res = run_pipeline(cfg, out, progress)
        .await
        .with_context(|| format!("pipeline `{}` in {}", cfg.name, out.display()))?;
    b.finish_and_clear();
    Ok(res)
}

/// The results table, one line per domain.
pub fn print_table(res: &PipelineResults) {
    println!("held-out pass rate (n tasks per domain):");
    print!("{:<10}", "domain");
    for r in ROWS {
        print!(" {r:>14}");
    }
    println!();
    for (d, cells) in &res.domains {
        print!("{d:<10}");
        for r in ROWS {
            match cells.get(r) {
                Some(c) => print!(" {:>14}", format!("{:.3} (n={})", c.pass_rate, c.n)),
                None => print!(" {:>14}", "-"),
            }
        }
        println!();
    }
    let Some(first) = res
        .domains
        .values()
        .flat_map(|c| c.values())
        .find_map(|c| c.sampled)
    else {
        return;
    };
    println!(
        "sampled pass@1 at temperature {} ({} samples per task, +- standard error):",
        first.temperature,
        first.samples / first.tasks.max(1)
    );
    for (d, cells) in &res.domains {
        print!("{d:<10}");
        for r in ROWS {
            match cells.get(r).and_then(|c| c.sampled) {
                Some(s) => print!(" {:>14}", format!("{:.3}+-{:.3}", s.pass_rate, s.std_err)),
                None => print!(" {:>14}", "-"),
            }
        }
        println!();
    }
}

/// The end of a pipeline command: one JSON object with `json`, else the table and the report.
pub fn print_results(res: &PipelineResults, json: bool) {
    if json {
        println!("{}", results_json(res));
    } else {
        print_table(res);
        println!("report: {}", res.report.display());
    }
}

/// The JSON object `arbor train pipeline --json` prints.
pub fn results_json(res: &PipelineResults) -> serde_json::Value {
    let domains: BTreeMap<_, _> = res
        .domains
        .iter()
        .map(|(d, cells)| {
            let rows: BTreeMap<_, _> = cells
                .iter()
                .map(|(r, c)| {
                    let mut v = serde_json::json!({
                        "pass_rate": c.pass_rate, "n": c.n, "passed": c.passed,
                        "std_err": c.std_err, "infra_errors": c.infra_errors,
                    });
                    if let Some(s) = c.sampled {
                        v["sampled"] = serde_json::json!({
                            "pass_rate": s.pass_rate, "std_err": s.std_err, "tasks": s.tasks,
                            "samples": s.samples, "passed": s.passed,
                            "temperature": s.temperature,
                        });
                    }
                    (r.clone(), v)
                })
                .collect();
            (d.clone(), rows)
        })
        .collect();
    serde_json::json!({
        "domains": domains,
        "name": res.name,
        "params": res.params,
        "report": res.report,
        "seconds": res.seconds,
    })
}

#[derive(Args)]
pub struct PipelineArgs {
    /// Pipeline file (TOML; see examples/pipeline-small.toml).
    config: PathBuf,
    /// Output directory (default: the file's `output`). Rerun the same command to continue
    /// an interrupted pipeline.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object {"domains": {D: {row: {"pass_rate", "n", ...}}}} at the end
    /// instead of the table (progress goes to stderr).
    #[arg(long)]
    json: bool,
}

pub async fn pipeline(a: PipelineArgs) -> Result<i32> {
    let (cfg, _) = PipelineConfig::load(&a.config)?;
    let out = a.out.clone().unwrap_or_else(|| cfg.output.clone());
    let res = run_with_progress(&cfg, &out).await?;
    print_results(&res, a.json);
    Ok(0)
}

/// Where a single stage takes its settings from.
#[derive(Args)]
pub struct StageConfig {
    /// Pipeline file whose [rollout], [rl] / [distill], [eval], difficulty and seed apply
    /// (default: the quickstart's).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl StageConfig {
    fn load(&self) -> Result<PipelineConfig> {
        Ok(match &self.config {
            Some(p) => PipelineConfig::load(p)?.0,
            None => PipelineConfig::parse(QUICKSTART)
                .map_err(|e| anyhow::anyhow!("built-in quickstart config: {e}"))?,
        })
    }
}

#[derive(Args)]
pub struct RlArgs {
    /// Start checkpoint (e.g. an `arbor train sft` output).
    #[arg(long)]
    init: PathBuf,
    /// Domains whose training tasks are sampled (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    domain: Vec<String>,
    /// Output directory (rerun to continue).
    #[arg(long)]
    out: PathBuf,
    /// Iterations (overrides the config).
    #[arg(long)]
    iterations: Option<usize>,
    #[command(flatten)]
    stage: StageConfig,
}

#[derive(Args)]
pub struct DistillArgs {
    /// The student's start checkpoint.
    #[arg(long)]
    init: PathBuf,
    /// A domain's expert: DOMAIN=CHECKPOINT; repeat per domain.
    #[arg(long = "teacher", required = true)]
    teachers: Vec<String>,
    /// Output directory (rerun to continue).
    #[arg(long)]
    out: PathBuf,
    /// Iterations (overrides the config).
    #[arg(long)]
    iterations: Option<usize>,
    #[command(flatten)]
    stage: StageConfig,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Domain.
    #[arg(long)]
    domain: String,
    /// Held-out tasks (overrides the config).
    #[arg(long)]
    n: Option<usize>,
    /// Sampling temperature of the evaluated policy (overrides `[eval] temperature`; default
    /// 1.0; 0 = greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Run directory of the evaluation rollouts.
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    stage: StageConfig,
}

async fn run_stage(st: RlStage) -> Result<i32> {
    let b = bar();
    let total = st.spec.iterations;
    let progress: arbor_recipe::rl::ProgressFn = {
        let b = b.clone();
        Arc::new(move |ev: RlEvent<'_>| match ev {
            RlEvent::Sampling {
                iteration,
                progress,
            } => {
                b.set_length(progress.total as u64);
                b.set_position(progress.done as u64);
                b.set_message(format!(
                    "iteration {}/{total}: rollouts, {} passed",
                    iteration + 1,
                    progress.passed
                ));
            }
            RlEvent::Iteration(l) => say(&b, serde_json::to_string(l).unwrap_or_default()),
            RlEvent::AlreadyFinished => say(&b, "already finished in this output directory".into()),
            RlEvent::StoppedWithoutSignal { iteration } => say(
                &b,
                format!("stopped before iteration {}: {}", iteration + 1, NO_SIGNAL),
            ),
            RlEvent::Start { .. } => {}
        })
    };
    let report = st.run(progress).await?;
    b.finish_and_clear();
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

pub async fn rl(a: RlArgs) -> Result<i32> {
    let cfg = a.stage.load()?;
    let mut spec = cfg.rl.clone();
    if let Some(n) = a.iterations {
        spec.iterations = n;
    }
    run_stage(RlStage {
        label: format!("rl/{}", a.domain.join("+")),
        spec,
        rollout: cfg.rollout.clone(),
        domains: a.domain,
        difficulty: cfg.difficulty,
        seed: cfg.seed,
        init: a.init,
        teachers: BTreeMap::new(),
        out: a.out,
    })
    .await
}

pub async fn distill(a: DistillArgs) -> Result<i32> {
    let cfg = a.stage.load()?;
    let mut spec = cfg.distill.clone();
    if let Some(n) = a.iterations {
        spec.iterations = n;
    }
    let mut teachers = BTreeMap::new();
    for t in &a.teachers {
        let Some((d, p)) = t.split_once('=') else {
            bail!("--teacher takes DOMAIN=CHECKPOINT, got `{t}`");
        };
        teachers.insert(d.to_string(), PathBuf::from(p));
    }
    run_stage(RlStage {
        label: "distill".into(),
        spec,
        rollout: cfg.rollout.clone(),
        domains: teachers.keys().cloned().collect(),
        difficulty: cfg.difficulty,
        seed: cfg.seed ^ 0xd157,
        init: a.init,
        teachers,
        out: a.out,
    })
    .await
}

pub async fn eval(a: EvalArgs) -> Result<i32> {
    let cfg = a.stage.load()?;
    let mut spec = cfg.eval.clone();
    if let Some(n) = a.n {
        spec.heldout_tasks = n;
    }
    if a.temperature.is_some() {
        spec.temperature = a.temperature;
    }
    let rate = arbor_recipe::eval::evaluate(
        &a.checkpoint,
        &a.domain,
        &spec,
        cfg.difficulty,
        &cfg.rollout,
        &a.out,
        None,
    )
    .await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"domain": a.domain, "pass_rate": rate.rate(), "n": rate.n,
                "passed": rate.passed, "std_err": rate.std_err(), "infra_errors": rate.infra_errors})
        );
    } else {
        println!(
            "{}: {}/{} held-out tasks passed ({:.3} ± {:.3}); rollouts in {}",
            a.domain,
            rate.passed,
            rate.n,
            rate.rate(),
            rate.std_err(),
            a.out.display()
        );
    }
    Ok(0)
}
