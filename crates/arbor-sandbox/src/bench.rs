//! `arbor sandbox bench`: latency and density of the local backend, as one
//! JSON object. Every phase is bounded and cleans up after itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::local::limits::open_fds;
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
    /// Creations per second in each successive tenth of the live phase: a
    /// rate that falls as the count grows shows a per-create cost that grows
    /// with the number of live sandboxes.
    pub live_create_per_s_by_tenth: Vec<f64>,
    /// Descriptors this process held per live sandbox, at the peak.
    pub fds_per_live_sandbox: f64,
    /// Why the live phase stopped short of `live_requested`, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_error: Option<String>,
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
    // Only what this process left: other supervisors may share the host.
    let leaks = gc::leaks_of(
        backend.state_root(),
        backend.cgroups(),
        std::process::id() as i32,
    );
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
        live_create_per_s_by_tenth: live.rate_by_tenth(),
        fds_per_live_sandbox: live.fds_per_sandbox(),
        live_error: live.error.clone(),
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
    /// Seconds from the start of the phase at which each was created, in order.
    pub created_at_s: Vec<f64>,
    /// Descriptors open in this process before creating them and with all alive.
    pub fds_before: usize,
    pub fds_after: usize,
    /// The first error (a refusal at a limit, a failed start), if any.
    pub error: Option<String>,
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

    /// Descriptors per live sandbox.
    pub fn fds_per_sandbox(&self) -> f64 {
        self.fds_after.saturating_sub(self.fds_before) as f64 / self.held.max(1) as f64
    }

    /// Creations per second in each tenth of the sandboxes created.
    pub fn rate_by_tenth(&self) -> Vec<f64> {
        let n = self.created_at_s.len();
        if n < 10 {
            return Vec::new();
        }
        let mut start = 0.0;
        (1..=10)
            .map(|k| {
                let (from, to) = ((k - 1) * n / 10, k * n / 10);
                let end = self.created_at_s[to - 1];
                let rate = (to - from) as f64 / (end - start).max(1e-9);
                start = end;
                (rate * 10.0).round() / 10.0
            })
            .collect()
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
    let fds_before = open_fds().unwrap_or(0);
    let t = Instant::now();
    let (sandboxes, created_at_s, mut first_err) =
        create_live(backend, spec, live, opts.concurrency).await;
    let create_s = t.elapsed().as_secs_f64();
    let fds_after = open_fds().unwrap_or(0);
    if let Some(e) = &first_err {
        eprintln!("bench: error during live phase: {e}");
    }
    eprintln!(
        "bench: {} created in {create_s:.1} s; checking each",
        sandboxes.len()
    );
    let (alive, rss_kb) = check_alive(&sandboxes, opts.concurrency).await;
    let mem_after_kb = mem_available_kb();
    eprintln!("bench: {alive}/{live} alive; destroying");
    let held = sandboxes.len();
    if let Some(e) = destroy_all(sandboxes, opts.concurrency).await {
        eprintln!("bench: error destroying: {e}");
        first_err.get_or_insert(e);
    }
    LivePhase {
        held,
        alive,
        create_s,
        created_at_s,
        fds_before,
        fds_after,
        error: first_err.map(|e| e.to_string()),
        rss_kb,
        mem_before_kb,
        mem_after_kb,
    }
}

/// How many sandboxes still run their sleeper, and the resident memory of
/// all their processes (KiB); `concurrency` checks at a time.
async fn check_alive(sandboxes: &[LocalSandbox], concurrency: usize) -> (usize, u64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(sandboxes.len());
    for sb in sandboxes {
        let (sb, sem) = (sb.clone(), sem.clone());
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let ok = matches!(sb.exec(ExecRequest::shell(SLEEPER_ALIVE)).await, Ok(r) if r.exit_code == 0);
            (ok, tree_rss_kb(sb.cgroup().dirs()))
        }));
    }
    let (mut alive, mut rss_kb) = (0, 0);
    for h in handles {
        if let Ok((ok, rss)) = h.await {
            alive += usize::from(ok);
            rss_kb += rss;
        }
    }
    (alive, rss_kb)
}

/// Create `live` sandboxes, `concurrency` at a time, each left running a
/// sleeper; returns those created, when each was (seconds from the start,
/// sorted), and the first error. After an error no more are started: a
/// refusal at a host limit would only repeat.
async fn create_live(
    backend: &LocalBackend,
    spec: &SandboxSpec,
    live: usize,
    concurrency: usize,
) -> (Vec<LocalSandbox>, Vec<f64>, Option<SandboxError>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(live);
    for _ in 0..live {
        let backend = backend.clone();
        let spec = spec.clone();
        let (sem, failed) = (sem.clone(), failed.clone());
        handles.push(tokio::spawn(async move {
            let _permit = sem
                .acquire_owned()
                .await
                .map_err(|e| SandboxError::Setup(e.to_string()))?;
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(None);
            }
            let started = async {
                let sb = backend.create_local(&spec).await?;
                let r = sb
                    .exec(ExecRequest::shell("sleep 3600 >/dev/null 2>&1 &"))
                    .await?;
                check(&r, "start sleeper")?;
                Ok::<_, SandboxError>(sb)
            }
            .await;
            if started.is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            started.map(|sb| Some((sb, t0.elapsed().as_secs_f64())))
        }));
    }
    let mut sandboxes = Vec::with_capacity(live);
    let mut created_at = Vec::with_capacity(live);
    let mut first_err = None;
    for h in handles {
        match h.await {
            Ok(Ok(Some((sb, at)))) => {
                sandboxes.push(sb);
                created_at.push(at);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(SandboxError::Setup(e.to_string()));
            }
        }
    }
    created_at.sort_by(f64::total_cmp);
    (sandboxes, created_at, first_err)
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
    crate::local::limits::meminfo_kb("MemAvailable").unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_by_tenth_shows_a_slowing_creation_rate() {
        let phase = |created_at_s: Vec<f64>| LivePhase {
            held: created_at_s.len(),
            alive: created_at_s.len(),
            create_s: created_at_s.last().copied().unwrap_or(0.0),
            created_at_s,
            fds_before: 10,
            fds_after: 30,
            error: None,
            rss_kb: 0,
            mem_before_kb: 0,
            mem_after_kb: 0,
        };
        // 100 creations, one every 10 ms: 100 per second in every tenth.
        let steady = phase((1..=100).map(|i| i as f64 * 0.01).collect());
        assert!(
            steady
                .rate_by_tenth()
                .iter()
                .all(|r| (*r - 100.0).abs() < 0.5)
        );
        assert_eq!(steady.fds_per_sandbox(), 0.2);
        // Each creation takes longer than the one before: the rate falls.
        let mut t = 0.0;
        let slowing = phase(
            (1..=100)
                .map(|i| {
                    t += i as f64 * 0.001;
                    t
                })
                .collect(),
        );
        let r = slowing.rate_by_tenth();
        assert_eq!(r.len(), 10);
        assert!(r[0] > 5.0 * r[9], "{r:?}");
        assert!(phase(vec![1.0; 5]).rate_by_tenth().is_empty());
    }
}
