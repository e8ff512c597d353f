//! The local backend's settings and handle: [`LocalConfig`], [`find_init`],
//! and [`LocalBackend`] with its constructor (privilege check, state root,
//! cgroups). Creating sandboxes is in `sandbox.rs`, beside the handle it builds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::cgroup::Cgroups;
use super::limits::{self, HostLimits};
use super::spawner::Spawner;
use crate::error::{Result, SandboxError};

static SELF_IS_INIT: AtomicBool = AtomicBool::new(false);

/// Declare that the running binary dispatches to [`crate::init::run`] when
/// started as init (the `arbor` CLI does), so it can serve as its own init
/// when no `arbor-sandbox-init` binary is installed beside it.
pub fn allow_self_as_init() {
    SELF_IS_INIT.store(true, Ordering::Relaxed);
}

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where per-sandbox state lives; a private tmpfs is mounted here.
    pub state_root: PathBuf,
    /// The init program; found automatically when `None` (see [`find_init`]).
    pub init_program: Option<PathBuf>,
    /// Most sandboxes alive at once; the next is refused with
    /// [`SandboxError::AtLimit`]. `None`: only the host's limits apply.
    pub max_live: Option<usize>,
    /// Refuse a new sandbox while the host's `MemAvailable` is below this
    /// (MiB; 0: no floor). Default 256, or `$ARBOR_SANDBOX_MIN_AVAILABLE_MB`.
    pub min_available_mb: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            state_root: std::env::var_os("ARBOR_SANDBOX_STATE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/run/arbor")),
            init_program: None,
            max_live: None,
            min_available_mb: std::env::var("ARBOR_SANDBOX_MIN_AVAILABLE_MB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256),
        }
    }
}

/// Locate the init program:
/// 1. `ARBOR_SANDBOX_INIT_BIN`;
/// 2. if the running executable declared [`allow_self_as_init`] (the `arbor`
///    CLI does): `arbor-init` beside it (same package, so same version, and
///    small), else the executable itself;
/// 3. otherwise `arbor-sandbox-init` beside the running executable or one
///    level up (test binaries live in `target/*/deps`).
pub fn find_init(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ARBOR_SANDBOX_INIT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| SandboxError::io("current executable", e))?;
    if SELF_IS_INIT.load(Ordering::Relaxed) {
        let sibling = exe.with_file_name("arbor-init");
        return Ok(if sibling.is_file() { sibling } else { exe });
    }
    let mut dir = exe.parent();
    for _ in 0..2 {
        if let Some(d) = dir {
            let candidate = d.join("arbor-sandbox-init");
            if candidate.is_file() {
                return Ok(candidate);
            }
            dir = d.parent();
        }
    }
    Err(SandboxError::Setup(
        "cannot find the arbor-sandbox-init program: build it (cargo build -p arbor-sandbox) \
         or set ARBOR_SANDBOX_INIT_BIN"
            .into(),
    ))
}

/// What every sandbox of one backend shares.
pub(super) struct Shared {
    pub(super) state_root: PathBuf,
    pub(super) init_path: PathBuf,
    pub(super) cgroups: Cgroups,
    /// Clones each sandbox's init (see `spawn.rs`).
    pub(super) spawner: Spawner,
    /// Bounds sandbox starts and teardowns in flight. They are kernel work
    /// (fork, namespaces, cgroupfs, mounts) that serializes on kernel locks:
    /// beyond a few per core more at once adds no throughput, only hundreds
    /// of blocked threads that starve everything else in the process.
    pub(super) lifecycle: tokio::sync::Semaphore,
    /// Refuses a start at the host's limits; counts live sandboxes.
    pub(super) limits: HostLimits,
}

/// Creates sandboxes on this machine.
#[derive(Clone)]
pub struct LocalBackend {
    pub(super) shared: Arc<Shared>,
}

impl LocalBackend {
    /// Check privileges, prepare the state directory and cgroups.
    pub fn new(config: LocalConfig) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError::Unsupported(
                "the local sandbox backend needs root (rootless user-namespace mode is not implemented yet)"
                    .into(),
            ));
        }
        let init_path = find_init(config.init_program.as_deref())?;
        match limits::raise_nofile() {
            Ok((soft, hard)) if soft < limits::WANT_NOFILE / 4 => tracing::warn!(
                "RLIMIT_NOFILE is {soft} (hard {hard}; raising the hard limit needs \
                 CAP_SYS_RESOURCE and fs.nr_open): each live sandbox holds a descriptor, so \
                 sandboxes are refused once about {soft} descriptors are open"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("RLIMIT_NOFILE: {e}"),
        }
        prepare_state_root(&config.state_root)?;
        let cgroups = Cgroups::detect().map_err(|e| SandboxError::io("cgroups", e))?;
        cgroups
            .prepare()
            .map_err(|e| SandboxError::io("cgroups", e))?;
        let spawner = Spawner::start(&init_path).map_err(|e| {
            SandboxError::io(
                format!("start the sandbox spawner {}", init_path.display()),
                e,
            )
        })?;
        let limits = HostLimits::new(config.max_live, config.min_available_mb, &cgroups);
        Ok(LocalBackend {
            shared: Arc::new(Shared {
                limits,
                state_root: config.state_root,
                init_path,
                cgroups,
                spawner,
                lifecycle: tokio::sync::Semaphore::new(
                    2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
                ),
            }),
        })
    }

    /// With default settings.
    pub fn with_defaults() -> Result<Self> {
        Self::new(LocalConfig::default())
    }

    /// The cgroup hierarchies in use.
    pub fn cgroups(&self) -> &Cgroups {
        &self.shared.cgroups
    }

    /// The state directory.
    pub fn state_root(&self) -> &Path {
        &self.shared.state_root
    }

    /// Sandboxes of this backend alive now (and being started).
    pub fn live(&self) -> usize {
        self.shared.limits.live()
    }
}

/// Mount a private tmpfs on the state root unless one is there already:
/// overlay layers must not live on the same filesystem as the host root
/// they are stacked on.
fn prepare_state_root(root: &Path) -> Result<()> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(root)
        .map_err(|e| SandboxError::io(format!("create {}", root.display()), e))?;
    let canonical = root
        .canonicalize()
        .map_err(|e| SandboxError::io("state root", e))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SandboxError::io("mountinfo", e))?;
    let mounted = info
        .lines()
        .any(|l| l.split(' ').nth(4) == canonical.to_str());
    if !mounted {
        mount(
            Some("tmpfs"),
            &canonical,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0700"),
        )
        .map_err(|e| {
            SandboxError::io(format!("mount tmpfs on {}", canonical.display()), e.into())
        })?;
        mount(
            None::<&str>,
            &canonical,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| SandboxError::io("make state root private", e.into()))?;
    }
    std::fs::create_dir_all(canonical.join("sb"))
        .map_err(|e| SandboxError::io("create sb dir", e))?;
    Ok(())
}
