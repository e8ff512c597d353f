//! `arbor task ...`: generate, list and validate task sets.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use arbor_sandbox::local::LocalBackend;
use arbor_task::{CheckOptions, GenOptions, OpenOptions, PrepareOptions, Split};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum Command {
    /// Generate tasks of a built-in domain (swe, terminal, webcoding, websearch, general) or of
    /// the `rlcheck` family (the tasks of `arbor train rl-check`).
    Gen(GenArgs),
    /// List the tasks of a source (native folder/JSONL, SWE-bench JSONL, Harbor folders).
    List(ListArgs),
    /// Run every task's oracle (must score 1) and null solution (must score 0) in
    /// sandboxes; prints one JSON object.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct GenArgs {
    /// Domain.
    #[arg(long)]
    domain: String,
    /// Number of tasks.
    #[arg(long)]
    n: usize,
    /// Seed (same seed, same tasks).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (one JSON file per task).
    #[arg(long)]
    out: PathBuf,
    /// Difficulty 1 (easiest) ..= 5.
    #[arg(long, default_value_t = 2)]
    difficulty: u32,
    /// Split: train, heldout or any. Splits never share a task.
    #[arg(long, default_value = "train")]
    split: Split,
}

#[derive(Args)]
pub struct SourceArgs {
    /// Task source: folder or JSONL of native tasks, SWE-bench JSONL, Harbor task folder(s).
    source: PathBuf,
    /// SWE-bench config (repo mirrors, install and test commands); default: swebench.toml beside the JSONL.
    #[arg(long)]
    swebench_config: Option<PathBuf>,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    src: SourceArgs,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CheckArgs {
    /// Task sources (each as for `list`); their tasks are checked together.
    #[arg(required = true)]
    sources: Vec<PathBuf>,
    /// SWE-bench config for SWE-bench sources.
    #[arg(long)]
    swebench_config: Option<PathBuf>,
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long)]
    json: bool,
    /// Tasks checked at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Run tasks that need a container image on the default rootfs (with a
    /// warning) instead of pulling or building their image.
    #[arg(long)]
    allow_default_rootfs: bool,
    /// Give Dockerfile RUN steps the host's network (`docker build` does).
    #[arg(long)]
    build_network_host: bool,
    #[command(flatten)]
    store: super::image::StoreArgs,
}

fn open_opts(s: &SourceArgs) -> OpenOptions {
    OpenOptions {
        swebench_config: s.swebench_config.clone(),
    }
}

pub async fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Gen(a) => {
            let opts = GenOptions {
                difficulty: a.difficulty,
                split: a.split,
            };
            let files = arbor_task::gen_to_dir(&a.domain, a.n, a.seed, &opts, &a.out)?;
            eprintln!(
                "wrote {} {} tasks to {}",
                files.len(),
                a.domain,
                a.out.display()
            );
            Ok(0)
        }
        Command::List(a) => {
            let tasks = arbor_task::list(&a.src.source, &open_opts(&a.src))
                .with_context(|| format!("reading {}", a.src.source.display()))?;
            anyhow::ensure!(
                !tasks.is_empty(),
                "no tasks found in {}",
                a.src.source.display()
            );
            for t in &tasks {
                if a.json {
                    println!("{}", serde_json::to_string(t)?);
                } else {
                    println!(
                        "{:<40} {:<10} {:<12} {:<8} {}",
                        t.id,
                        t.domain,
                        t.verifier,
                        t.split.as_deref().unwrap_or("-"),
                        t.instruction
                    );
                }
            }
            eprintln!("{} tasks", tasks.len());
            Ok(0)
        }
        Command::Check(a) => {
            let _ = a.json;
            let open = OpenOptions {
                swebench_config: a.swebench_config.clone(),
            };
            let mut tasks = Vec::new();
            for source in &a.sources {
                let found = arbor_task::load(source, &open)
                    .with_context(|| format!("reading {}", source.display()))?;
                anyhow::ensure!(!found.is_empty(), "no tasks found in {}", source.display());
                tasks.extend(found);
            }
            let images = !a.allow_default_rootfs
                && tasks
                    .iter()
                    .any(|t| arbor_task::run::sandbox_spec(t).image.is_some());
            let backend: Arc<dyn arbor_sandbox::Backend> = if images {
                Arc::new(a.store.backend(a.build_network_host)?)
            } else {
                Arc::new(
                    LocalBackend::with_defaults().context("starting the local sandbox backend")?,
                )
            };
            let bar = ProgressBar::new(tasks.len() as u64).with_style(
                ProgressStyle::with_template(
                    "checking {bar:30} {pos}/{len} tasks, {elapsed} elapsed, eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let progress_bar = bar.clone();
            let opts = CheckOptions {
                concurrency: a.concurrency,
                prepare: PrepareOptions {
                    allow_default_rootfs: a.allow_default_rootfs,
                    images,
                },
                progress: Some(Arc::new(move |done, _total| {
                    progress_bar.set_position(done as u64)
                })),
                ..Default::default()
            };
            let report = arbor_task::check(backend, tasks, &opts).await;
            bar.finish_and_clear();
            println!("{}", serde_json::to_string(&report)?);
            let ok = report.oracle_pass == report.tasks
                && report.null_fail == report.tasks
                && report.infra_errors == 0;
            Ok(if ok { 0 } else { 1 })
        }
    }
}
