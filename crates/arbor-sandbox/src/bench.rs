//! `arbor sandbox bench`: latency and density of the local backend, as one
//! JSON object. Every phase is bounded and cleans up after itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::local::{LocalBackend, LocalSandbox, gc};
use crate::pool::Pool;
use crate::{Backend, ExecRequest, Result, Sandbox, SandboxError, SandboxSpec};

/// Sizes of the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Iterations of each latency measurement.
    pub n: usize,
    /// Sandboxes held alive at once for the density measurement.
    pub live: usize,
    /// Concurrency while creating the live sandboxes.
    pub concurrency: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            n: 50,
            live: 200,
            concurrency: 8,
        }
    }
}

/// Median and 99th percentile, milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

/// Median and p99 of a sample (NaN when empty).
pub fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles {
            p50: f64::NAN,
            p99: f64::NAN,
        };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub create_exec_destroy_ms: Percentiles,
    pub pooled_create_exec_destroy_ms: Percentiles,
    pub exec_roundtrip_ms: Percentiles,
    pub fork_ms: Percentiles,
    pub fork_state_mb: f64,
    pub live_sandboxes: usize,
    pub live_requested: usize,
    pub live_create_s: f64,
    pub rss_mb_per_live_sandbox: f64,
    pub host_mb_per_live_sandbox: f64,
    pub leaked: usize,
    pub n: usize,
    pub cgroup: String,
}

fn check(r: &crate::ExecResult, what: &str) -> Result<()> {
    if r.exit_code != 0 {
        return Err(SandboxError::Setup(format!(
            "bench {what}: exit {} {}",
            r.exit_code,
            r.stderr_str()
        )));
    }
    Ok(())
}

/// Run the benchmark. Progress goes to stderr.
pub async fn run(backend: &LocalBackend, opts: &BenchOptions) -> Result<BenchReport> {
    let spec = SandboxSpec::default();
    let n = opts.n.max(1);
    warm_up(backend, &spec).await?;
    let cold = create_exec_destroy(backend, &spec, n).await?;
    let pooled = pooled_create_exec_destroy(backend, &spec, n).await?;
    let sb = backend.create(&spec).await?;
    let rt = exec_roundtrips(sb.as_ref(), n * 4).await?;
    let (forks, state_kb) = forks(sb.as_ref(), n).await?;
    sb.destroy().await?;
    let live = live_phase(backend, &spec, opts).await;
    let leaks = gc::leaks(backend.state_root(), backend.cgroups());
    let count = live.held.max(1) as f64;
    Ok(BenchReport {
        create_exec_destroy_ms: percentiles(cold),
        pooled_create_exec_destroy_ms: percentiles(pooled),
        exec_roundtrip_ms: percentiles(rt),
        fork_ms: percentiles(forks),
        fork_state_mb: state_kb / 1024.0,
        live_sandboxes: live.alive,
        live_requested: opts.live,
        live_create_s: live.create_s,
        rss_mb_per_live_sandbox: live.rss_kb as f64 / 1024.0 / count,
        host_mb_per_live_sandbox: live.host_mb_per_sandbox(),
        leaked: leaks.total(),
        n,
        cgroup: match backend.cgroups() {
            crate::local::cgroup::Cgroups::V1 { .. } => "v1".into(),
            crate::local::cgroup::Cgroups::V2 { .. } => "v2".into(),
        },
    })
}

/// The first sandbox builds the rootfs mask and faults in the init binary:
/// keep that out of the measurements.
pub async fn warm_up(backend: &dyn Backend, spec: &SandboxSpec) -> Result<()> {
    let sb = backend.create(spec).await?;
    sb.exec(ExecRequest::new(["true"])).await?;
    sb.destroy().await
}

/// Milliseconds of `n` fresh sandboxes, each created, running `true`, destroyed.
pub async fn create_exec_destroy(
    backend: &dyn Backend,
    spec: &SandboxSpec,
    n: usize,
) -> Result<Vec<f64>> {
    eprintln!("bench: create+exec+destroy x{n}");
    let mut cold = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let sb = backend.create(spec).await?;
        check(&sb.exec(ExecRequest::new(["true"])).await?, "true")?;
        sb.destroy().await?;
        cold.push(ms(t.elapsed()));
    }
    Ok(cold)
}

/// The same through a warm pool, each taken when one is ready.
async fn pooled_create_exec_destroy(
    backend: &LocalBackend,
    spec: &SandboxSpec,
    n: usize,
) -> Result<Vec<f64>> {
    eprintln!("bench: pooled create+exec+destroy x{n}");
    let pool = Pool::new(Arc::new(backend.clone()), 4, 16);
    pool.prefill(spec).await?;
    let mut pooled = Vec::with_capacity(n);
    for _ in 0..n {
        // Measure the steady state the pool is for: a warm sandbox is ready.
        while pool.warm(spec) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let t = Instant::now();
        let sb = pool.get(spec).await?;
        check(&sb.exec(ExecRequest::new(["true"])).await?, "true")?;
        sb.destroy().await?;
        pooled.push(ms(t.elapsed()));
    }
    pool.close().await;
    Ok(pooled)
}

/// Milliseconds of `count` runs of `true` in one sandbox.
async fn exec_roundtrips(sb: &dyn Sandbox, count: usize) -> Result<Vec<f64>> {
    eprintln!("bench: exec roundtrip x{count}");
    let mut rt = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        check(&sb.exec(ExecRequest::new(["true"])).await?, "true")?;
        rt.push(ms(t.elapsed()));
    }
    Ok(rt)
}

/// Milliseconds of `n` forks of `sb` after it wrote 10 MB, and the KiB it wrote.
async fn forks(sb: &dyn Sandbox, n: usize) -> Result<(Vec<f64>, f64)> {
    eprintln!("bench: fork of a sandbox holding 10 MB x{n}");
    let r = sb
        .exec(ExecRequest::shell(
            "mkdir -p /workspace/data && for i in $(seq 1 40); do head -c 262144 /dev/urandom > /workspace/data/f$i; done && du -sk /workspace/data",
        ))
        .await?;
    check(&r, "write files")?;
    let state_kb: f64 = r
        .stdout_str()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let mut forks = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let child = sb.fork().await?;
        forks.push(ms(t.elapsed()));
        child.destroy().await?;
    }
    Ok((forks, state_kb))
}

/// What the density phase measured.
pub struct LivePhase {
    /// Sandboxes created (the per-sandbox figures divide by it).
    pub held: usize,
    /// Of those, how many still had their process running.
    pub alive: usize,
    /// Seconds to create them all.
    pub create_s: f64,
    /// Resident memory of their processes, KiB.
    pub rss_kb: u64,
    /// Host `MemAvailable` before creating them, KiB.
    pub mem_before_kb: u64,
    /// Host `MemAvailable` with all of them alive, KiB.
    pub mem_after_kb: u64,
}

impl LivePhase {
    /// Host memory taken per live sandbox, MB.
    pub fn host_mb_per_sandbox(&self) -> f64 {
        self.mem_before_kb.saturating_sub(self.mem_after_kb) as f64
            / 1024.0
            / self.held.max(1) as f64
    }
}

/// Exit 0 when a `sleep` process runs in the sandbox; shell builtins only,
/// so it works in images without procps.
const SLEEPER_ALIVE: &str =
    "for c in /proc/[0-9]*/comm; do read n < \"$c\" && [ \"$n\" = sleep ] && exit 0; done; exit 1";

/// Hold `opts.live` sandboxes at once, each with a process running, measure
/// them, destroy them. Errors are reported on stderr, not returned: the
/// figures of what did start are still the result.
pub async fn live_phase(
    backend: &LocalBackend,
    spec: &SandboxSpec,
    opts: &BenchOptions,
) -> LivePhase {
    let live = opts.live;
    eprintln!("bench: holding {live} live sandboxes");
    let mem_before_kb = mem_available_kb();
    let t = Instant::now();
    let (sandboxes, mut first_err) = create_live(backend, spec, live, opts.concurrency).await;
    let create_s = t.elapsed().as_secs_f64();
    // Every one must still have its process running.
    let mut alive = 0;
    let mut rss_kb = 0u64;
    for sb in &sandboxes {
        if let Ok(r) = sb.exec(ExecRequest::shell(SLEEPER_ALIVE)).await
            && r.exit_code == 0
        {
            alive += 1;
        }
        rss_kb += tree_rss_kb(sb.cgroup().dirs());
    }
    let mem_after_kb = mem_available_kb();
    eprintln!("bench: {alive}/{live} alive; destroying");
    let held = sandboxes.len();
    if let Some(e) = destroy_all(sandboxes, opts.concurrency).await {
        first_err.get_or_insert(e);
    }
    if let Some(e) = first_err {
        eprintln!("bench: error during live phase: {e}");
    }
    LivePhase {
        held,
        alive,
        create_s,
        rss_kb,
        mem_before_kb,
        mem_after_kb,
    }
}

/// Create `live` sandboxes, `concurrency` at a time, each left running a
/// sleeper; returns those created and the first error.
async fn create_live(
    backend: &LocalBackend,
    spec: &SandboxSpec,
    live: usize,
    concurrency: usize,
) -> (Vec<LocalSandbox>, Option<SandboxError>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(live);
    for _ in 0..live {
        let backend = backend.clone();
        let spec = spec.clone();
        let sem = sem.clone();
        handles.push(tokio::spawn(async move {
            let _permit = sem
                .acquire_owned()
                .await
                .map_err(|e| SandboxError::Setup(e.to_string()))?;
            let sb = backend.create_local(&spec).await?;
            let r = sb
                .exec(ExecRequest::shell("sleep 3600 >/dev/null 2>&1 &"))
                .await?;
            check(&r, "start sleeper")?;
            Ok::<_, SandboxError>(sb)
        }));
    }
    let mut sandboxes = Vec::with_capacity(live);
    let mut first_err = None;
    for h in handles {
        match h.await {
            Ok(Ok(sb)) => sandboxes.push(sb),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(SandboxError::Setup(e.to_string()));
            }
        }
    }
    (sandboxes, first_err)
}

/// Destroy sandboxes, `concurrency` at a time; returns the first error.
async fn destroy_all(sandboxes: Vec<LocalSandbox>, concurrency: usize) -> Option<SandboxError> {
    let dsem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut dh = Vec::new();
    for sb in sandboxes {
        let dsem = dsem.clone();
        dh.push(tokio::spawn(async move {
            let _p = dsem.acquire_owned().await;
            sb.destroy().await
        }));
    }
    let mut first_err = None;
    for h in dh {
        if let Ok(Err(e)) = h.await {
            first_err.get_or_insert(e);
        }
    }
    first_err
}

fn mem_available_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory of the processes in a sandbox's groups (deduplicated).
fn tree_rss_kb(dirs: &[std::path::PathBuf]) -> u64 {
    let mut pids = std::collections::HashSet::new();
    for d in dirs {
        gc::collect_procs(d, &mut pids);
    }
    pids.into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}
