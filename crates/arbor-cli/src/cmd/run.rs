//! `arbor run EXPERIMENT.toml`: run (or resume) an experiment.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use arbor_rollout::{Experiment, Progress, RunOptions};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct RunArgs {
    /// Experiment file (TOML): datasets, scaffolds, policy, samples, concurrency, timeouts.
    experiment: PathBuf,
    /// Run directory (default: the experiment's `output`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a run that was interrupted: rollouts already recorded are
    /// skipped, the rest are run, none twice.
    #[arg(long)]
    resume: bool,
    /// Rollouts in flight at once (overrides the experiment).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Print one JSON summary object on stdout at the end (human output goes to stderr).
    #[arg(long)]
    json: bool,
    /// Skip writing the Markdown report.
    #[arg(long)]
    no_report: bool,
}

pub async fn run(a: RunArgs) -> Result<i32> {
    let text = std::fs::read_to_string(&a.experiment)
        .with_context(|| format!("reading {}", a.experiment.display()))?;
    let exp = Experiment::load(&a.experiment)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let pb = bar.clone();
    let on_progress = Arc::new(move |p: &Progress| {
        pb.set_length(p.total as u64);
        pb.set_position(p.done as u64);
        let scored = p.passed + p.failed + p.agent_failures;
        let rate = if scored > 0 {
            100.0 * p.passed as f64 / scored as f64
        } else {
            0.0
        };
        pb.set_message(format!(
            "pass {rate:.1}% | failed {} | agent failures {} | infra errors {} | live sandboxes {}",
            p.failed, p.agent_failures, p.infra_errors, p.live_sandboxes
        ));
    });
    // First Ctrl-C: stop launching, let rollouts in flight finish and be
    // recorded. Second: exit now (resume later; `arbor sandbox gc` reclaims
    // sandboxes of the dead process).
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
                bar.println(
                    "interrupted: finishing the rollouts in flight (Ctrl-C again to quit now; --resume continues)",
                );
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let summary = arbor_rollout::run(
        &exp,
        &text,
        RunOptions {
            out: a.out.clone(),
            resume: a.resume,
            concurrency: a.concurrency,
            on_progress: Some(on_progress),
            stop: Some(stop.clone()),
            backend: None,
            on_result: None,
        },
    )
    .await?;
    bar.finish_and_clear();
    let dir = PathBuf::from(&summary.run_dir);
    if !a.no_report {
        match arbor_rollout::report::write_report(&dir) {
            Ok(p) => eprintln!("report: {}", p.display()),
            Err(e) => eprintln!("warning: writing the report failed: {e:#}"),
        }
    }
    if summary.policy == arbor_agent::policy::scripted::NAME {
        eprintln!(
            "note: scripted-oracle replays reference solutions; it tests the infrastructure, not a model"
        );
    }
    eprintln!(
        "{}: {} rollouts ({} new), passed {}, failed {}, agent failures {}, infra errors {}, lost {}; \
         {:.0} rollouts/min, step overhead p50 {:.2} ms, peak {} live sandboxes; results in {}",
        summary.name,
        summary.rollouts,
        summary.new_rollouts,
        summary.passed,
        summary.failed,
        summary.agent_failures,
        summary.infra_errors,
        summary.lost,
        summary.rollouts_per_min,
        summary.p50_step_overhead_ms,
        summary.peak_live_sandboxes,
        dir.display()
    );
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    if stop.load(Ordering::Relaxed) || summary.lost > 0 {
        return Ok(2);
    }
    Ok(0)
}
