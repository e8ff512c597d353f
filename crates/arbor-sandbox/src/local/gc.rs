//! Finding and removing what dead supervisors left behind, and counting
//! leftovers (for tests and the benchmark).
//!
//! Every sandbox records `state.json` (supervisor and init pids with their
//! start times, and cgroup paths) before it is handed out. A sandbox whose
//! supervisor is no longer running is an orphan: its init is killed, its
//! cgroups removed, its directory deleted. Cgroups under `arbor/` with no
//! state directory at all (a crash between mkdir and the state file) are
//! removed too.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cgroup::{self, Cgroups};
use super::spawn::process_start_time;

/// Written per sandbox at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub id: String,
    pub supervisor_pid: i32,
    pub supervisor_start: u64,
    pub init_pid: i32,
    pub init_start: u64,
    pub cgroups: Vec<PathBuf>,
}

impl StateFile {
    /// Write atomically into `dir/state.json`.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("state.json.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(tmp, dir.join("state.json"))
    }
}

/// What gc removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub sandboxes_removed: usize,
    pub sandboxes_kept: usize,
    pub processes_killed: usize,
    pub cgroups_removed: usize,
    pub errors: Vec<String>,
}

/// What is left on the host.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Leaks {
    /// Processes inside arbor cgroups.
    pub processes: usize,
    /// Mounts below the state root's `sb/` in the host namespace.
    pub mounts: usize,
    /// Cgroup directories below `arbor/`.
    pub cgroups: usize,
    /// Sandbox state directories.
    pub state_dirs: usize,
}

impl Leaks {
    /// Everything left: processes + mounts + cgroups + state directories
    /// (the benchmark's `leaked`).
    pub fn total(&self) -> usize {
        self.processes + self.mounts + self.cgroups + self.state_dirs
    }

    /// Nothing at all is left.
    pub fn is_clean(&self) -> bool {
        self.total() == 0
    }
}

fn alive(pid: i32, start: u64) -> bool {
    process_start_time(pid).is_some_and(|s| start == 0 || s == start)
}

/// Remove orphaned sandboxes. With `all`, remove every sandbox, including
/// ones whose supervisor still runs (only for when none should exist).
pub fn gc(state_root: &Path, cgroups: &Cgroups, all: bool) -> GcReport {
    let mut report = GcReport::default();
    let sb = state_root.join("sb");
    let mut known = Vec::new();
    for entry in fs::read_dir(&sb).into_iter().flatten().flatten() {
        let dir = entry.path();
        let id = entry.file_name().to_string_lossy().into_owned();
        let state: Option<StateFile> = fs::read(dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if state.is_none() && !all && (young(&dir) || !dir.exists()) {
            // Being created (state.json not written yet) or being destroyed
            // by a live process right now: not garbage. A crash leaves it
            // for a later gc once it is older than the grace period.
            report.sandboxes_kept += 1;
            known.push(id);
            continue;
        }
        if let Some(s) = &state
            && !all
            && s.supervisor_pid != std::process::id() as i32
            && alive(s.supervisor_pid, s.supervisor_start)
        {
            report.sandboxes_kept += 1;
            known.push(id);
            continue;
        }
        if let Some(s) = &state
            && !all
            && s.supervisor_pid == std::process::id() as i32
        {
            // Our own live sandboxes are not garbage.
            report.sandboxes_kept += 1;
            known.push(id);
            continue;
        }
        if let Some(s) = &state
            && alive(s.init_pid, s.init_start)
        {
            // SAFETY: plain kill(2) of a pid verified by start time.
            unsafe { libc::kill(s.init_pid, libc::SIGKILL) };
            report.processes_killed += 1;
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(s.init_pid, s.init_start) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let dirs = state
            .map(|s| s.cgroups)
            .unwrap_or_else(|| cgroup_dirs_named(cgroups, &id));
        for d in dirs {
            report.processes_killed += count_procs(&d);
            match cgroup::remove_group(&d, true) {
                Ok(()) => report.cgroups_removed += 1,
                Err(e) if !d.exists() => tracing::debug!("cgroup already gone: {e}"),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => report.sandboxes_removed += 1,
            // Its owner removed it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.errors.push(format!("{}: {e}", dir.display())),
        }
    }
    // Cgroups with no state directory.
    for subtree in cgroups.subtrees() {
        for entry in fs::read_dir(&subtree).into_iter().flatten().flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) || (!all && young(&entry.path())) {
                // A young cgroup may belong to a sandbox being created whose
                // state directory was not there when we listed.
                continue;
            }
            report.processes_killed += count_procs(&entry.path());
            match cgroup::remove_group(&entry.path(), true) {
                Ok(()) => report.cgroups_removed += 1,
                Err(e) if !entry.path().exists() => tracing::debug!("cgroup already gone: {e}"),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    report
}

/// How long a sandbox directory or cgroup without a state file is presumed
/// to be in the middle of creation (or destruction) by a live process.
const GRACE: Duration = Duration::from_secs(30);

/// Modified within [`GRACE`] (a missing path counts as not young).
fn young(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < GRACE)
}

fn cgroup_dirs_named(cgroups: &Cgroups, id: &str) -> Vec<PathBuf> {
    cgroups
        .subtrees()
        .into_iter()
        .map(|s| s.join(id))
        .filter(|d| d.exists())
        .collect()
}

fn count_procs(dir: &Path) -> usize {
    let mut n = cgroup::procs(dir).len();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            n += count_procs(&e.path());
        }
    }
    n
}

fn count_dirs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| 1 + count_dirs(&e.path()))
        .sum()
}

/// Count what arbor sandboxes have left on this host.
pub fn leaks(state_root: &Path, cgroups: &Cgroups) -> Leaks {
    let mut l = Leaks::default();
    let mut seen_pids = std::collections::HashSet::new();
    for subtree in cgroups.subtrees() {
        l.cgroups += count_dirs(&subtree);
        collect_procs(&subtree, &mut seen_pids);
    }
    l.processes = seen_pids.len();
    let sb = state_root.join("sb");
    let sb_str = sb.to_string_lossy().into_owned();
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        l.mounts = info
            .lines()
            .filter(|line| {
                line.split(' ')
                    .nth(4)
                    .is_some_and(|m| m.starts_with(&sb_str))
            })
            .count();
    }
    l.state_dirs = fs::read_dir(&sb).map(|d| d.count()).unwrap_or(0);
    l
}

/// What one supervisor (by pid) left on this host, for when other
/// supervisors' sandboxes live beside it (a shared machine): the state
/// directories whose `state.json` names it, their cgroups, the processes in
/// those and the mounts below them. A start writes `state.json` right after
/// creating the directory, before anything else, so what it leaves names
/// it; a directory without one, or a cgroup without a directory, cannot be
/// attributed and is left to [`leaks`] (another supervisor's start in
/// progress, or one killed midway by an older version that wrote the file last).
pub fn leaks_of(state_root: &Path, cgroups: &Cgroups, supervisor_pid: i32) -> Leaks {
    let mut l = Leaks::default();
    let sb = state_root.join("sb");
    let mut ours = std::collections::HashSet::new();
    for entry in fs::read_dir(&sb).into_iter().flatten().flatten() {
        let state: Option<StateFile> = fs::read(entry.path().join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if state.is_some_and(|s| s.supervisor_pid == supervisor_pid) {
            ours.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    l.state_dirs = ours.len();
    let mut pids = std::collections::HashSet::new();
    for subtree in cgroups.subtrees() {
        for id in &ours {
            let dir = subtree.join(id);
            if dir.is_dir() {
                l.cgroups += 1 + count_dirs(&dir);
                collect_procs(&dir, &mut pids);
            }
        }
    }
    l.processes = pids.len();
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        let under: Vec<String> = ours
            .iter()
            .map(|id| sb.join(id).to_string_lossy().into_owned())
            .collect();
        l.mounts = info
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|m| under.iter().any(|u| m.starts_with(u.as_str())))
            .count();
    }
    l
}

/// Pids in a group directory and all its child groups.
pub(crate) fn collect_procs(dir: &Path, out: &mut std::collections::HashSet<i32>) {
    out.extend(cgroup::procs(dir));
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_procs(&e.path(), out);
        }
    }
}
