//! Refusing the next sandbox when the host is at a limit, before anything of
//! it is started: a start that runs into a limit part-way fails in whatever
//! step hit it (`Too many open files` from a socket, `EAGAIN` from clone),
//! and its cleanup can fail the same way, leaving state behind. Checked per
//! start, in this order (cheapest first):
//!
//! - the backend's own maximum of live sandboxes (`LocalConfig::max_live`);
//! - `MemAvailable` below a floor (`LocalConfig::min_available_mb`);
//! - tasks on the host (`/proc/loadavg`) against `kernel.pid_max` and
//!   `kernel.threads-max`, and the `pids` cgroups above the sandboxes;
//! - this process's open descriptors against its `RLIMIT_NOFILE`.
//!
//! Each leaves a reserve, so the host (and this process) can still do its
//! other work at the moment the next sandbox is refused.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::cgroup::Cgroups;
use crate::error::{Result, SandboxError};

/// Descriptors kept free for a start in flight (control pair, pidfd, pipes,
/// cgroup and state files) and for the rest of the process (connections).
const FD_RESERVE: usize = 128;
/// Descriptors a start may leave open, for the estimate between recounts.
const FDS_PER_START: usize = 2;
/// Starts between exact recounts of the open descriptors.
const RECOUNT_EVERY: usize = 256;
/// Tasks kept free for the rest of the host (its own processes and threads).
const PID_RESERVE: u64 = 256;
/// Tasks a new sandbox needs at least: its init and one command.
const PIDS_PER_SANDBOX: u64 = 2;
/// What `RLIMIT_NOFILE` is raised to when the hard limit is lower (as root):
/// each live sandbox holds one descriptor.
pub(super) const WANT_NOFILE: u64 = 1 << 16;

/// The checks of one backend and its count of live sandboxes.
pub(super) struct HostLimits {
    max_live: Option<usize>,
    min_available_kb: u64,
    /// `pids` cgroup directories holding the sandboxes (arbor's and its ancestors').
    pid_groups: Vec<PathBuf>,
    live: AtomicUsize,
    fds: Mutex<FdGauge>,
}

/// Open descriptors: counted exactly now and then, estimated in between
/// (counting lists `/proc/self/fd`, which costs a millisecond at 10k).
#[derive(Default)]
struct FdGauge {
    counted: usize,
    starts_since: usize,
}

impl HostLimits {
    pub(super) fn new(max_live: Option<usize>, min_available_mb: u64, cgroups: &Cgroups) -> Self {
        HostLimits {
            max_live,
            min_available_kb: min_available_mb.saturating_mul(1024),
            pid_groups: pid_groups(cgroups),
            live: AtomicUsize::new(0),
            fds: Mutex::new(FdGauge {
                counted: 0,
                starts_since: RECOUNT_EVERY,
            }),
        }
    }

    /// Sandboxes admitted and not yet released.
    pub(super) fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Check every limit; on success the new sandbox counts as live until
    /// [`HostLimits::release`].
    pub(super) fn admit(&self) -> Result<()> {
        let live = self.live.fetch_add(1, Ordering::SeqCst);
        let checked = self.check(live);
        if checked.is_err() {
            self.release();
        }
        checked
    }

    /// One live sandbox is gone.
    pub(super) fn release(&self) {
        let _ = self
            .live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    fn check(&self, live: usize) -> Result<()> {
        if let Some(max) = self.max_live
            && live >= max
        {
            return Err(at_limit(
                "max live",
                format!("{live} live sandboxes, the backend's maximum is {max}"),
            ));
        }
        if self.min_available_kb > 0
            && let Some(avail) = meminfo_kb("MemAvailable")
        {
            check_memory(avail, self.min_available_kb)?;
        }
        check_tasks()?;
        for g in &self.pid_groups {
            check_pid_group(g)?;
        }
        self.check_fds(live)
    }

    fn check_fds(&self, live: usize) -> Result<()> {
        let (soft, _) = nofile().map_err(|e| SandboxError::io("RLIMIT_NOFILE", e))?;
        let mut g = self
            .fds
            .lock()
            .map_err(|_| SandboxError::Setup("descriptor gauge poisoned".into()))?;
        let estimate = g.counted + FDS_PER_START * g.starts_since;
        if g.starts_since >= RECOUNT_EVERY || estimate + FD_RESERVE > soft as usize {
            g.counted = open_fds().map_err(|e| SandboxError::io("count open files", e))?;
            g.starts_since = 0;
        }
        check_open_files(g.counted + FDS_PER_START * g.starts_since, soft, live)?;
        g.starts_since += 1;
        Ok(())
    }
}

fn at_limit(limit: &'static str, detail: String) -> SandboxError {
    SandboxError::AtLimit { limit, detail }
}

fn check_memory(available_kb: u64, floor_kb: u64) -> Result<()> {
    if available_kb >= floor_kb {
        return Ok(());
    }
    Err(at_limit(
        "memory",
        format!(
            "MemAvailable is {} MiB, below the floor of {} MiB (LocalConfig::min_available_mb)",
            available_kb / 1024,
            floor_kb / 1024
        ),
    ))
}

/// Tasks on the host against `pid_max` and `threads-max`.
fn check_tasks() -> Result<()> {
    let (Some(tasks), Some(pid_max), Some(threads_max)) = (
        host_tasks(),
        read_u64("/proc/sys/kernel/pid_max"),
        read_u64("/proc/sys/kernel/threads-max"),
    ) else {
        return Ok(());
    };
    check_task_count(tasks, pid_max, threads_max)
}

fn check_task_count(tasks: u64, pid_max: u64, threads_max: u64) -> Result<()> {
    let (limit, max, knob) = if pid_max <= threads_max {
        ("pids", pid_max, "kernel.pid_max")
    } else {
        ("threads", threads_max, "kernel.threads-max")
    };
    if tasks + PIDS_PER_SANDBOX + PID_RESERVE <= max {
        return Ok(());
    }
    Err(at_limit(
        limit,
        format!(
            "{tasks} processes and threads on the host, {knob} is {max} (a sandbox needs \
             {PIDS_PER_SANDBOX}, {PID_RESERVE} are kept for the host); raise {knob} or run \
             fewer sandboxes"
        ),
    ))
}

/// A `pids` cgroup's current count against its `pids.max`.
fn check_pid_group(dir: &Path) -> Result<()> {
    let Ok(max) = std::fs::read_to_string(dir.join("pids.max")) else {
        return Ok(());
    };
    let Ok(max) = max.trim().parse::<u64>() else {
        return Ok(()); // "max": unlimited
    };
    let current = read_u64(dir.join("pids.current")).unwrap_or(0);
    if current + PIDS_PER_SANDBOX <= max {
        return Ok(());
    }
    Err(at_limit(
        "cgroup pids",
        format!(
            "{current} tasks in {}, its pids.max is {max}",
            dir.display()
        ),
    ))
}

fn check_open_files(open: usize, soft: u64, live: usize) -> Result<()> {
    if open + FD_RESERVE <= soft as usize {
        return Ok(());
    }
    Err(at_limit(
        "open files",
        format!(
            "{open} descriptors open in this process, RLIMIT_NOFILE is {soft} ({FD_RESERVE} \
             are kept free; {live} live sandboxes hold one each); raise it (`ulimit -n`, \
             LimitNOFILE=) or run fewer sandboxes"
        ),
    ))
}

/// The `pids` cgroups the sandboxes live under: arbor's subtree and each
/// ancestor up to the hierarchy's root (which has no `pids.max`).
fn pid_groups(cgroups: &Cgroups) -> Vec<PathBuf> {
    let (root, subtree) = match cgroups {
        Cgroups::V1 { pids, .. } => (pids.clone(), pids.join(super::cgroup::SUBTREE)),
        Cgroups::V2 { root } => (root.clone(), root.join(super::cgroup::SUBTREE)),
    };
    subtree
        .ancestors()
        .take_while(|d| d.starts_with(&root) && *d != root)
        .map(Path::to_path_buf)
        .collect()
}

/// Raise the soft open-file limit to the hard one, and as root the hard one
/// to [`WANT_NOFILE`] (bounded by `fs.nr_open`) when it is lower: each live
/// sandbox holds a descriptor, and common defaults (1024 soft, 4096 or
/// 20000 hard) cap density far below what the host can run. Commands inside
/// get their own limit from the spec. Returns the limits now in force.
pub(super) fn raise_nofile() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, setrlimit};
    let (soft, hard) = nofile()?;
    let nr_open = read_u64("/proc/sys/fs/nr_open").unwrap_or(WANT_NOFILE);
    let want_hard = if nix::unistd::geteuid().is_root() && hard < WANT_NOFILE {
        WANT_NOFILE.min(nr_open).max(hard)
    } else {
        hard
    };
    if soft < want_hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want_hard, want_hard)
    {
        tracing::debug!("raising RLIMIT_NOFILE from {soft}/{hard} to {want_hard}: {e}");
        // Without the privilege to raise the hard limit, the soft one still can be.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    nofile()
}

fn nofile() -> io::Result<(u64, u64)> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(io::Error::from)
}

/// Descriptors open in this process.
pub fn open_fds() -> io::Result<usize> {
    // The listing's own descriptor is one of the entries.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Tasks (processes and threads) on the host: the fourth field of
/// `/proc/loadavg` is `running/total`.
fn host_tasks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok()
}

fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `/proc/meminfo` field, KiB.
pub(crate) fn meminfo_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_of(r: Result<()>) -> (&'static str, String) {
        match r {
            Err(SandboxError::AtLimit { limit, detail }) => (limit, detail),
            other => panic!("expected AtLimit, got {other:?}"),
        }
    }

    #[test]
    fn each_check_names_its_limit_and_the_numbers() {
        assert!(check_task_count(1000, 32768, 100_000).is_ok());
        let (l, d) = limit_of(check_task_count(32600, 32768, 100_000));
        assert_eq!(l, "pids");
        assert!(
            d.contains("32600") && d.contains("kernel.pid_max is 32768"),
            "{d}"
        );
        let (l, d) = limit_of(check_task_count(9900, 32768, 10_000));
        assert_eq!(l, "threads");
        assert!(d.contains("kernel.threads-max is 10000"), "{d}");

        assert!(check_open_files(100, 20000, 50).is_ok());
        let (l, d) = limit_of(check_open_files(19_900, 20000, 9_800));
        assert_eq!(l, "open files");
        assert!(
            d.contains("19900") && d.contains("RLIMIT_NOFILE is 20000"),
            "{d}"
        );
        assert!(d.contains("9800 live"), "{d}");

        assert!(check_memory(2 << 20, 1 << 20).is_ok());
        let (l, d) = limit_of(check_memory(100 << 10, 512 << 10));
        assert_eq!(l, "memory");
        assert!(d.contains("100 MiB") && d.contains("512 MiB"), "{d}");
    }

    #[test]
    fn host_figures_are_readable() {
        assert!(host_tasks().is_some_and(|n| n > 0));
        assert!(meminfo_kb("MemAvailable").is_some_and(|n| n > 0));
        // stdin, stdout, stderr at least.
        assert!(open_fds().expect("count") >= 3);
    }
}
