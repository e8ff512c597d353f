//! `arbor node bench`: a cluster's figures as one JSON object. The exec
//! overhead is `arbor_node::bench`; the run is an ordinary experiment on
//! the cluster backend (scripted oracle, five built-in domains x both
//! white-box scaffolds), read back from its run directory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use arbor_node::{ClientOptions, RemoteBackend};
use arbor_rollout::{Experiment, RolloutResult, RunOptions, Status};
use arbor_sandbox::SandboxSpec;
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    /// Node addresses (HOST:PORT), comma-separated; the first also serves the exec measurement.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// File holding the nodes' bearer token (default: $ARBOR_NODE_TOKEN).
    #[arg(long)]
    pub(crate) token_file: Option<PathBuf>,
    /// Tasks per built-in domain (rollouts = 10 x this).
    #[arg(long, default_value_t = 30)]
    n: u32,
    /// Rollouts in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Exec round-trip pairs measured.
    #[arg(long, default_value_t = 300)]
    exec_n: usize,
    /// SIGKILL this process (a node) once a third of the rollouts are recorded.
    #[arg(long)]
    kill_pid: Option<u32>,
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long)]
    json: bool,
}

/// Runs the bench with the nodes' `token` (read by the caller like `arbor node serve` does).
pub async fn run(a: BenchArgs, token: String) -> Result<i32> {
    let local = LocalBackend::new(LocalConfig::default()).context("the local sandbox backend")?;
    let remote = RemoteBackend::new(&a.nodes[0], &ClientOptions::new(token.clone()))?;
    let spec = SandboxSpec::default();
    let exec = arbor_node::bench::exec_overhead(&local, &remote, &spec, a.exec_n)
        .await
        .context("measuring exec round trips")?;
    drop(local);

    let scratch = tempfile::tempdir().context("scratch directory")?;
    let token_file = scratch.path().join("token");
    std::fs::write(&token_file, &token).context("writing the token file")?;
    let exp_file = write_experiment(scratch.path(), &a, &token_file)?;
    let text = std::fs::read_to_string(&exp_file)?;
    let exp = Experiment::load(&exp_file)?;
    let killed = Arc::new(AtomicBool::new(false));
    let requested = a.n as usize * 10;
    let opts = RunOptions {
        on_result: a
            .kill_pid
            .map(|pid| kill_after(pid, requested / 3, killed.clone())),
        ..Default::default()
    };
    let s = arbor_rollout::run(&exp, &text, opts).await?;
    let results = read_results(&scratch.path().join("run"))?;
    let keys: HashSet<_> = results.iter().map(|r| r.key.clone()).collect();
    let duplicates = results.len() - keys.len();
    let passed = results
        .iter()
        .filter(|r| r.status == Status::Passed)
        .count();
    let killed = killed.load(Ordering::SeqCst);
    let clean = s.lost == 0 && duplicates == 0 && keys.len() == requested;
    let report = json!({
        "nodes": a.nodes.len(),
        "requested": requested,
        "rollouts": keys.len(),
        "passed": passed,
        "lost": s.lost,
        "duplicates": duplicates,
        "infra_retries": s.infra_retries,
        "rollouts_per_min": s.rollouts_per_min,
        "seconds": s.seconds,
        "peak_live_sandboxes": s.peak_live_sandboxes,
        "exec_n": exec.n,
        "local_exec_ms": exec.local_exec_ms,
        "remote_exec_ms": exec.remote_exec_ms,
        "remote_exec_overhead_ms": exec.remote_exec_overhead_ms,
        "node_killed": killed,
        "recovered_after_node_kill": killed && clean && passed == requested,
    });
    println!("{report}");
    Ok(if clean { 0 } else { 1 })
}

/// A result callback that SIGKILLs `pid` when the `at`-th result is recorded.
fn kill_after(pid: u32, at: usize, killed: Arc<AtomicBool>) -> arbor_rollout::runner::ResultFn {
    let seen = AtomicUsize::new(0);
    Arc::new(move |_: &RolloutResult| {
        if seen.fetch_add(1, Ordering::SeqCst) + 1 == at.max(1) {
            let ok = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            killed.store(ok, Ordering::SeqCst);
        }
    })
}

fn write_experiment(dir: &Path, a: &BenchArgs, token: &Path) -> Result<PathBuf> {
    let mut text = format!(
        "name = \"cluster-bench\"\noutput = \"{out}\"\nconcurrency = {c}\ninfra_retries = 4\n\
         backend = {{ kind = \"cluster\", nodes = {nodes:?}, token_file = \"{token}\", placement_wait_s = 30 }}\n\
         [policy]\nkind = \"scripted-oracle\"\n[timeouts]\nagent_s = 120\n\
         [[scaffolds]]\nkind = \"bash\"\nmax_steps = 40\n[[scaffolds]]\nkind = \"tools\"\nmax_steps = 40\n",
        out = dir.join("run").display(),
        c = a.concurrency,
        nodes = a.nodes,
        token = token.display(),
    );
    for domain in ["swe", "terminal", "webcoding", "websearch", "general"] {
        text.push_str(&format!(
            "[[datasets]]\ndomain = \"{domain}\"\nn = {}\nseed = 5\n",
            a.n
        ));
    }
    let f = dir.join("exp.toml");
    std::fs::write(&f, text).context("writing the experiment")?;
    Ok(f)
}

fn read_results(run: &Path) -> Result<Vec<RolloutResult>> {
    let text = std::fs::read_to_string(run.join("results.jsonl")).context("reading results")?;
    let mut out = Vec::new();
    for line in text.lines() {
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(e) => bail!("a results line that does not parse: {e}"),
        }
    }
    Ok(out)
}
