//! `arbor sandbox ...`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use arbor_sandbox::bench::{self, BenchOptions};
use arbor_sandbox::local::{LocalBackend, LocalConfig, gc};
use arbor_sandbox::{Backend, ExecRequest, ImageSource, NetworkSpec, SandboxSpec};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Subcommand)]
pub enum Command {
    /// Create a sandbox, run one command in it, print its output, destroy it.
    /// Exits with the command's exit code (124 on timeout, like timeout(1)).
    Exec(ExecArgs),
    /// Remove sandboxes, processes and cgroups left behind by a crashed supervisor.
    Gc(GcArgs),
    /// Measure latency and density; prints one JSON object on stdout.
    Bench(BenchArgs),
}

/// The sandbox's network, as `--net` names it.
#[derive(Clone, Copy, ValueEnum)]
pub enum Net {
    /// Own network namespace with only a loopback interface; nothing routes out.
    None,
    /// The host's network namespace: NO network isolation (commands reach
    /// whatever the host reaches). For image builds that download packages,
    /// like `docker build --network host`; never for untrusted code.
    Host,
}

impl Net {
    /// The spec's network for this mode (bridges to host services are set up
    /// by the library's callers, e.g. `arbor run` for black-box agents; none here).
    fn spec(self) -> NetworkSpec {
        match self {
            Net::None => NetworkSpec::default(),
            Net::Host => NetworkSpec {
                host: true,
                ..NetworkSpec::default()
            },
        }
    }
}

#[derive(Args)]
pub struct ExecArgs {
    /// Root filesystem directory (default: read-only view of host system dirs).
    #[arg(long, conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// Run in a container image (pulled into the image store on first use);
    /// its Env, User and WorkingDir apply.
    #[arg(long)]
    image: Option<String>,
    /// Working directory [default: the image's WorkingDir, else /workspace].
    #[arg(long)]
    workdir: Option<String>,
    #[command(flatten)]
    store: super::image::StoreArgs,
    /// Memory limit, MiB.
    #[arg(long, default_value_t = 2048)]
    memory_mb: u64,
    /// Wall-clock timeout, seconds; the whole process tree is killed.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// Network mode of the sandbox.
    #[arg(long, value_enum, default_value = "none")]
    net: Net,
    /// Max processes.
    #[arg(long, default_value_t = 512)]
    pids: u64,
    /// CPU quota in cores (0.5 = half a core); 0 = no quota.
    #[arg(long, default_value_t = 0.0)]
    cpus: f64,
    /// Size of the writable layer, MiB.
    #[arg(long, default_value_t = 4096)]
    workspace_mb: u64,
    /// Print a JSON result (exit code, flags, duration) to stderr after the output.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct GcArgs {
    /// Also remove sandboxes whose supervisor is still running.
    #[arg(long)]
    all: bool,
    /// Only report what is left (processes, mounts, cgroups, state directories); exit 1 if
    /// anything is.
    #[arg(long)]
    check: bool,
    /// With --check: only what the supervisor with this pid left (its state directories,
    /// their cgroups and processes), for a host where other supervisors run sandboxes.
    #[arg(long, value_name = "PID", requires = "check")]
    supervisor: Option<i32>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Iterations per latency measurement.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// Sandboxes held alive at once, each with a running process.
    #[arg(long, default_value_t = 200)]
    live: usize,
    /// Parallel creations in the density phase.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Most sandboxes the backend holds at once; the next is refused like at a host limit.
    #[arg(long, value_name = "N")]
    max_live: Option<usize>,
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Exec(a) => exec(a).await,
        Command::Gc(a) => gc_cmd(a),
        Command::Bench(a) => bench_cmd(a).await,
    }
}

async fn exec(a: ExecArgs) -> Result<i32> {
    let backend: Box<dyn Backend> = match a.image {
        Some(_) => Box::new(a.store.backend(false)?),
        None => {
            Box::new(LocalBackend::with_defaults().context("starting the local sandbox backend")?)
        }
    };
    let default_workdir = if a.image.is_some() {
        String::new()
    } else {
        "/workspace".into()
    };
    let mut spec = SandboxSpec {
        rootfs: a.rootfs,
        image: a.image.map(ImageSource::Reference),
        workdir: a.workdir.unwrap_or(default_workdir),
        network: a.net.spec(),
        ..Default::default()
    };
    spec.limits.memory_mb = a.memory_mb;
    spec.limits.pids = a.pids;
    spec.limits.cpus = a.cpus;
    spec.limits.workspace_mb = a.workspace_mb;
    let sb = backend
        .create(&spec)
        .await
        .context("creating the sandbox")?;
    let req = ExecRequest::new(a.command).timeout(Duration::from_secs_f64(a.timeout_s));
    let result = sb.exec(req).await;
    let destroyed = sb.destroy().await;
    let r = result.context("running the command")?;
    destroyed.context("destroying the sandbox")?;
    use std::io::Write;
    std::io::stdout().write_all(&r.stdout)?;
    std::io::stderr().write_all(&r.stderr)?;
    if r.truncated {
        eprintln!(
            "arbor: output truncated at {} bytes per stream",
            spec.limits.output_cap_bytes
        );
    }
    if r.timed_out {
        eprintln!(
            "arbor: timed out after {:.1}s; process tree killed",
            a.timeout_s
        );
    }
    if r.oom_killed {
        eprintln!("arbor: out of memory (limit {} MiB)", a.memory_mb);
    }
    if a.json {
        eprintln!(
            "{}",
            serde_json::json!({
                "exit_code": r.exit_code, "signal": r.signal, "timed_out": r.timed_out,
                "oom_killed": r.oom_killed, "truncated": r.truncated,
                "duration_ms": r.duration.as_secs_f64() * 1000.0,
            })
        );
    }
    Ok(if r.timed_out { 124 } else { r.exit_code })
}

fn gc_cmd(a: GcArgs) -> Result<i32> {
    let backend = LocalBackend::with_defaults().context("starting the local sandbox backend")?;
    if a.check {
        let l = match a.supervisor {
            Some(pid) => gc::leaks_of(backend.state_root(), backend.cgroups(), pid),
            None => gc::leaks(backend.state_root(), backend.cgroups()),
        };
        println!("{}", serde_json::to_string(&l)?);
        return Ok(if l.is_clean() { 0 } else { 1 });
    }
    let report = gc::gc(backend.state_root(), backend.cgroups(), a.all);
    println!("{}", serde_json::to_string(&report)?);
    if !report.errors.is_empty() {
        bail!("gc finished with {} errors", report.errors.len());
    }
    Ok(0)
}

async fn bench_cmd(a: BenchArgs) -> Result<i32> {
    let _ = a.json;
    let backend = LocalBackend::new(LocalConfig {
        max_live: a.max_live,
        ..Default::default()
    })
    .context("starting the local sandbox backend")?;
    let opts = BenchOptions {
        n: a.n,
        live: a.live,
        concurrency: a.concurrency,
    };
    let report = bench::run(&backend, &opts).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}
