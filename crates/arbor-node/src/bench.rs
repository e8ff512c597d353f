//! The remote exec overhead figure of `arbor node bench`: what a node adds
//! to a command's round trip. The same command runs alternately in a
//! sandbox of this host's backend and in one on a node, in one process, so
//! both see the same machine load; the overhead of a pair is the remote
//! time minus the local one.

use std::time::Instant;

use arbor_sandbox::bench::{Percentiles, percentiles};
use arbor_sandbox::{Backend, ExecRequest, Result, Sandbox, SandboxError, SandboxSpec};
use serde::Serialize;

/// Round trips of `true`, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ExecOverhead {
    /// Pairs measured (after a warm-up).
    pub n: usize,
    pub local_exec_ms: Percentiles,
    pub remote_exec_ms: Percentiles,
    /// Per pair, remote minus local.
    pub remote_exec_overhead_ms: Percentiles,
}

/// Measures `n` pairs on one sandbox of each backend (destroyed after).
pub async fn exec_overhead(
    local: &dyn Backend,
    remote: &dyn Backend,
    spec: &SandboxSpec,
    n: usize,
) -> Result<ExecOverhead> {
    let l = local.create(spec).await?;
    let r = match remote.create(spec).await {
        Ok(r) => r,
        Err(e) => {
            let _ = l.destroy().await;
            return Err(e);
        }
    };
    let measured = pairs(l.as_ref(), r.as_ref(), n).await;
    let _ = l.destroy().await;
    let _ = r.destroy().await;
    let (local_ms, remote_ms) = measured?;
    let overhead = local_ms
        .iter()
        .zip(&remote_ms)
        .map(|(l, r)| r - l)
        .collect();
    Ok(ExecOverhead {
        n,
        local_exec_ms: percentiles(local_ms),
        remote_exec_ms: percentiles(remote_ms),
        remote_exec_overhead_ms: percentiles(overhead),
    })
}

async fn pairs(l: &dyn Sandbox, r: &dyn Sandbox, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    // Warm-up: the node's connection is opened, both code paths are paged in.
    for _ in 0..10 {
        round_trip(l).await?;
        round_trip(r).await?;
    }
    let (mut local, mut remote) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        local.push(round_trip(l).await?);
        remote.push(round_trip(r).await?);
    }
    Ok((local, remote))
}

/// One `true`, milliseconds.
async fn round_trip(sb: &dyn Sandbox) -> Result<f64> {
    let t = Instant::now();
    let out = sb.exec(ExecRequest::new(["true"])).await?;
    if out.exit_code != 0 {
        return Err(SandboxError::Setup(format!(
            "`true` exited {} in sandbox {}",
            out.exit_code,
            sb.id()
        )));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}
