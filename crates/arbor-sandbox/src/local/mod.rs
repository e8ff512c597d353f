//! The local backend: sandboxes on this Linux machine, from namespaces,
//! overlayfs, cgroups and seccomp. Requires root (see ARCHITECTURE.md for the
//! rootless plan).
//!
//! Per sandbox the host holds: one init process (PID 1 of its namespaces),
//! one directory `<state_root>/sb/<id>/` with a `state.json` for gc and an
//! empty `fs/` mount point (the sandbox's private tmpfs is mounted there only
//! inside its own mount namespace), and its cgroups. Mounts never appear in
//! the host namespace, so a dead sandbox cannot leave one behind.

mod bridge;
pub mod cgroup;
pub mod gc;
mod mask;
mod spawn;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Result, SandboxError};
use crate::protocol::{self, ExecKind, FromInit, InitConfig, ProtocolError, ToInit};
use crate::spec::{ExecRequest, ExecResult, SandboxSpec};
use crate::{Backend, Sandbox};
use cgroup::{Cgroups, ExecCgroup, SandboxCgroup};
use gc::StateFile;

/// How long to wait for a new sandbox's init to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After a command exits, how long to keep reading output that a background
/// process it left behind may still be writing to the same pipes.
const OUTPUT_GRACE: Duration = Duration::from_millis(50);
/// Largest file read back through `read_file`/`read_tar`.
const MAX_READ: usize = 1 << 30;

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
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            state_root: std::env::var_os("ARBOR_SANDBOX_STATE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/run/arbor")),
            init_program: None,
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

struct Shared {
    state_root: PathBuf,
    init_path: PathBuf,
    cgroups: Cgroups,
    /// Bounds sandbox starts and teardowns in flight. They are kernel work
    /// (fork, namespaces, cgroupfs, mounts) that serializes on kernel locks:
    /// beyond a few per core more at once adds no throughput, only hundreds
    /// of blocked threads that starve everything else in the process.
    lifecycle: tokio::sync::Semaphore,
}

/// Raise this process's soft open-file limit to its hard limit: each live
/// sandbox holds a few descriptors (pidfd, control socket, bridges), and the
/// common default soft limit of 1024 would cap density far below what the
/// host can run. Commands inside get their own limit from the spec.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("reading RLIMIT_NOFILE: {e}"),
    }
}

/// Creates sandboxes on this machine.
#[derive(Clone)]
pub struct LocalBackend {
    shared: Arc<Shared>,
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
        raise_fd_limit();
        prepare_state_root(&config.state_root)?;
        let cgroups = Cgroups::detect().map_err(|e| SandboxError::io("cgroups", e))?;
        cgroups
            .prepare()
            .map_err(|e| SandboxError::io("cgroups", e))?;
        Ok(LocalBackend {
            shared: Arc::new(Shared {
                state_root: config.state_root,
                init_path,
                cgroups,
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

    /// Create a sandbox, returning the concrete type (with local-only extras).
    pub async fn create_local(&self, spec: &SandboxSpec) -> Result<LocalSandbox> {
        self.start(spec, None).await
    }

    async fn start(&self, spec: &SandboxSpec, fork_from: Option<PathBuf>) -> Result<LocalSandbox> {
        validate(spec)?;
        let sh = &self.shared;
        let lower = match &spec.rootfs {
            Some(dir) => vec![dir.clone()],
            None => {
                let mask = mask::ensure_mask(&sh.state_root)
                    .map_err(|e| SandboxError::io("build rootfs mask", e))?;
                vec![mask, PathBuf::from("/")]
            }
        };
        let id = new_id();
        let dir = sh.state_root.join("sb").join(&id);
        let private_dir = dir.join("fs");
        // Directories, cgroups (cgroupfs writes take a kernel-wide lock) and
        // the fork of this possibly large process all block: keep them off
        // the async workers, which also serve the gateway and the policy.
        // Held until init reports ready: its mounts are kernel work too.
        let permit = self
            .shared
            .lifecycle
            .acquire()
            .await
            .map_err(|e| SandboxError::Setup(format!("sandbox start: {e}")))?;
        let (mut guard, cg, pid, sock) = {
            let sh = self.shared.clone();
            let (id, dir, private_dir, limits) = (
                id.clone(),
                dir.clone(),
                private_dir.clone(),
                spec.limits.clone(),
            );
            tokio::task::spawn_blocking(move || -> Result<_> {
                std::fs::create_dir_all(&private_dir)
                    .map_err(|e| SandboxError::io("create state dir", e))?;
                let mut guard = StartGuard {
                    dir: dir.clone(),
                    cgroup: None,
                    init: None,
                };
                let cg = sh
                    .cgroups
                    .create(&id, &limits)
                    .map_err(|e| SandboxError::io("create cgroups", e))?;
                guard.cgroup = Some(cg.clone());
                let spawned = spawn::spawn_init(&sh.init_path).map_err(|e| {
                    SandboxError::io(format!("start init {}", sh.init_path.display()), e)
                })?;
                let pid = spawned.pid;
                guard.init = Some(spawned.pidfd);
                // Attach before init receives its config: it forks nothing until then.
                cg.attach(pid)
                    .map_err(|e| SandboxError::io("attach init to cgroups", e))?;
                let state = StateFile {
                    id: id.clone(),
                    supervisor_pid: std::process::id() as i32,
                    supervisor_start: spawn::process_start_time(std::process::id() as i32)
                        .unwrap_or(0),
                    init_pid: pid,
                    init_start: spawn::process_start_time(pid).unwrap_or(0),
                    cgroups: cg.dirs().to_vec(),
                };
                state
                    .write(&dir)
                    .map_err(|e| SandboxError::io("write state file", e))?;
                Ok((guard, cg, pid, spawned.sock))
            })
            .await
            .map_err(|e| SandboxError::Setup(format!("sandbox start task: {e}")))??
        };

        set_nonblocking(&sock).map_err(|e| SandboxError::io("control socket", e))?;
        // SAFETY: OwnedFd keeps the descriptor open and unchanged for the
        // AsyncFd's whole life.
        let sock = unsafe { AsyncFd::register(sock) }
            .map_err(|e| SandboxError::io("control socket", io::Error::other(e.to_string())))?;
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/root".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TERM".into(), "dumb".into()),
        ];
        for (k, v) in &spec.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let config = InitConfig {
            id: id.clone(),
            lower,
            private_dir,
            workspace_bytes: spec.limits.workspace_mb.saturating_mul(1 << 20),
            binds: spec.binds.clone(),
            hostname: spec.hostname.clone(),
            workdir: spec.workdir.clone(),
            fork_from,
            env,
            nofile: spec.limits.nofile,
        };
        send(&sock, &ToInit::Config(Box::new(config)), &[]).await?;
        let mut buf = vec![0u8; 4096];
        let ready = tokio::time::timeout(READY_TIMEOUT, recv(&sock, &mut buf))
            .await
            .map_err(|_| {
                SandboxError::Setup(format!("sandbox {id}: init did not report ready in time"))
            })?;
        let fs_fd = match ready {
            Ok((FromInit::Ready { fs_fd }, _)) => fs_fd,
            Ok((FromInit::Failed { error }, _)) => {
                return Err(SandboxError::Setup(format!("sandbox {id}: {error}")));
            }
            Ok((other, _)) => {
                return Err(SandboxError::Setup(format!(
                    "sandbox {id}: unexpected {other:?}"
                )));
            }
            Err(e) => {
                return Err(SandboxError::Setup(format!(
                    "sandbox {id}: init died during setup ({e})"
                )));
            }
        };

        drop(permit);

        let control = Arc::new(Control {
            sock,
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let reader = tokio::spawn(read_loop(control.clone()));
        let mut bridges = Vec::new();
        let targets = spec
            .network
            .unix_bridges
            .iter()
            .map(|b| (b.port, bridge::Target::Unix(b.host_socket.clone())))
            .chain(
                spec.network
                    .tcp_bridges
                    .iter()
                    .map(|b| (b.port, bridge::Target::Tcp(b.host_addr))),
            );
        for (port, target) in targets {
            match bridge::start(pid, port, target) {
                Ok(h) => bridges.push(h),
                Err(e) => {
                    reader.abort();
                    for h in bridges {
                        h.abort();
                    }
                    return Err(SandboxError::io(format!("bridge on port {port}"), e));
                }
            }
        }
        let pidfd = guard
            .init
            .take()
            .ok_or_else(|| SandboxError::Setup("lost init pidfd".into()))?;
        guard.cgroup = None;
        guard.dir = PathBuf::new();
        Ok(LocalSandbox {
            inner: Arc::new(Inner {
                id,
                spec: spec.clone(),
                backend: self.clone(),
                pid,
                pidfd: Arc::new(pidfd),
                fs_fd,
                control,
                cgroup: cg,
                dir,
                next_exec: AtomicU64::new(1),
                destroyed: AtomicBool::new(false),
                tasks: Mutex::new({
                    let mut t = bridges;
                    t.push(reader);
                    t
                }),
            }),
        })
    }
}

#[async_trait]
impl Backend for LocalBackend {
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(self.create_local(spec).await?))
    }
}

/// Undo a half-built sandbox if `start` fails part-way.
struct StartGuard {
    dir: PathBuf,
    cgroup: Option<SandboxCgroup>,
    init: Option<OwnedFd>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(pidfd) = self.init.take() {
            let _ = spawn::pidfd_kill(&pidfd, libc::SIGKILL);
            let _ = spawn::pidfd_reap(&pidfd, true);
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn validate(spec: &SandboxSpec) -> Result<()> {
    if !spec.workdir.starts_with('/') {
        return Err(SandboxError::Invalid(format!(
            "workdir {:?} must be absolute",
            spec.workdir
        )));
    }
    if let Some(r) = &spec.rootfs
        && !r.is_dir()
    {
        return Err(SandboxError::Invalid(format!(
            "rootfs {} is not a directory",
            r.display()
        )));
    }
    for b in &spec.binds {
        if !b.source.is_absolute() || !b.source.exists() {
            return Err(SandboxError::Invalid(format!(
                "bind source {} must be an existing absolute path",
                b.source.display()
            )));
        }
        if !b.target.starts_with('/') {
            return Err(SandboxError::Invalid(format!(
                "bind target {:?} must be absolute",
                b.target
            )));
        }
    }
    for b in &spec.network.tcp_bridges {
        if !b.host_addr.ip().is_loopback() {
            return Err(SandboxError::Invalid(format!(
                "tcp bridge target {} is not a loopback address",
                b.host_addr
            )));
        }
    }
    if spec.limits.memory_mb < 16 || spec.limits.pids < 4 || spec.limits.workspace_mb < 1 {
        return Err(SandboxError::Invalid(
            "limits too small (memory_mb >= 16, pids >= 4, workspace_mb >= 1)".into(),
        ));
    }
    Ok(())
}

fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().r#gen();
    format!("sb-{n:016x}")
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

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    Ok(())
}

fn would_block(e: ProtocolError) -> io::Result<std::result::Result<(), ProtocolError>> {
    match e {
        ProtocolError::Io(nix::errno::Errno::EAGAIN) => Err(io::ErrorKind::WouldBlock.into()),
        other => Ok(Err(other)),
    }
}

async fn send(sock: &AsyncFd<OwnedFd>, msg: &ToInit, fds: &[i32]) -> Result<()> {
    loop {
        let mut guard = sock
            .writable()
            .await
            .map_err(|e| SandboxError::io("control socket", e))?;
        let res = guard.try_io(|s| match protocol::send(s.as_raw_fd(), msg, fds) {
            Ok(()) => Ok(Ok(())),
            Err(e) => would_block(e),
        });
        match res {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Err(e)) => return Err(SandboxError::io("control socket", e)),
            Err(_would_block) => continue,
        }
    }
}

async fn recv(
    sock: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
) -> std::result::Result<(FromInit, Vec<OwnedFd>), ProtocolError> {
    loop {
        let mut guard = sock.readable().await.map_err(|e| {
            ProtocolError::Io(nix::errno::Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        })?;
        let res = guard.try_io(|s| match protocol::recv::<FromInit>(s.as_raw_fd(), buf) {
            Ok(v) => Ok(Ok(v)),
            Err(ProtocolError::Io(nix::errno::Errno::EAGAIN)) => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Ok(Err(e)),
        });
        match res {
            Ok(Ok(r)) => return r,
            Ok(Err(e)) => {
                return Err(ProtocolError::Io(nix::errno::Errno::from_raw(
                    e.raw_os_error().unwrap_or(libc::EIO),
                )));
            }
            Err(_would_block) => continue,
        }
    }
}

/// How a child of init ended, as reported by init.
#[derive(Debug, Clone, Copy)]
struct Exit {
    code: i32,
    signal: Option<i32>,
}

/// Why a command has no exit status.
#[derive(Debug)]
enum Failure {
    /// init could not start it.
    Spawn(String),
    /// init is gone.
    Gone(String),
}

/// The control channel of one sandbox, shared with its reader task.
struct Control {
    sock: AsyncFd<OwnedFd>,
    pending: Mutex<HashMap<u64, oneshot::Sender<std::result::Result<Exit, Failure>>>>,
    dead: AtomicBool,
}

impl Control {
    fn take(&self, id: u64) -> Option<oneshot::Sender<std::result::Result<Exit, Failure>>> {
        self.pending.lock().ok()?.remove(&id)
    }
}

/// Dispatch init's reports to waiting commands; when init goes away, fail
/// every waiter instead of leaving it hanging.
async fn read_loop(control: Arc<Control>) {
    let mut buf = vec![0u8; 4096];
    let reason = loop {
        match recv(&control.sock, &mut buf).await {
            Ok((FromInit::Exited { id, code, signal }, _)) => {
                if let Some(tx) = control.take(id) {
                    let _ = tx.send(Ok(Exit { code, signal }));
                }
            }
            Ok((FromInit::SpawnFailed { id, error }, _)) => {
                if let Some(tx) = control.take(id) {
                    let _ = tx.send(Err(Failure::Spawn(error)));
                }
            }
            Ok((other, _)) => tracing::warn!("unexpected message from init: {other:?}"),
            Err(ProtocolError::Closed) => break "init exited".to_string(),
            Err(e) => break format!("control channel failed: {e}"),
        }
    };
    control.dead.store(true, Ordering::SeqCst);
    if let Ok(mut p) = control.pending.lock() {
        for (_, tx) in p.drain() {
            let _ = tx.send(Err(Failure::Gone(reason.clone())));
        }
    }
}

/// A sandbox on this machine. Cheap to clone (shared handle); destroyed
/// explicitly with [`Sandbox::destroy`] or, as a safety net, when the last
/// handle is dropped.
#[derive(Clone)]
pub struct LocalSandbox {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    spec: SandboxSpec,
    backend: LocalBackend,
    pid: i32,
    pidfd: Arc<OwnedFd>,
    fs_fd: i32,
    control: Arc<Control>,
    cgroup: SandboxCgroup,
    dir: PathBuf,
    next_exec: AtomicU64,
    destroyed: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Raw outcome of a child of init.
struct ChildOutcome {
    exit: Exit,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
    timed_out: bool,
    oom_killed: bool,
    duration: Duration,
}

impl LocalSandbox {
    /// Host pid of the sandbox's init.
    pub fn init_pid(&self) -> i32 {
        self.inner.pid
    }

    /// The sandbox's cgroups.
    pub fn cgroup(&self) -> &SandboxCgroup {
        &self.inner.cgroup
    }

    /// The spec it was created from.
    pub fn spec(&self) -> &SandboxSpec {
        &self.inner.spec
    }

    /// Fork, returning the concrete type.
    pub async fn fork_local(&self) -> Result<LocalSandbox> {
        self.inner.check_alive()?;
        let from = PathBuf::from(format!("/proc/{}/fd/{}", self.inner.pid, self.inner.fs_fd));
        self.inner.backend.start(&self.inner.spec, Some(from)).await
    }

    async fn run_child(
        &self,
        kind: ExecKind,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
        cap: usize,
    ) -> Result<ChildOutcome> {
        let inner = &self.inner;
        inner.check_alive()?;
        let id = inner.next_exec.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdin_pipe = match &stdin {
            Some(_) => Some(pipe()?),
            None => None,
        };
        // cgroupfs mkdir/rmdir contend on a kernel-wide lock when thousands
        // of sandboxes churn: never on the async workers.
        let (exec_cg, procs) = {
            let cg = inner.cgroup.clone();
            tokio::task::spawn_blocking(move || cg.exec_group(id))
                .await
                .map_err(|e| SandboxError::Setup(format!("command cgroup task: {e}")))?
                .map_err(|e| SandboxError::io("command cgroup", e))?
        };
        let exec_cg = ExecGroupGuard(Some(exec_cg));
        let (tx, rx) = oneshot::channel();
        inner
            .control
            .pending
            .lock()
            .map_err(|_| SandboxError::Setup("poisoned lock".into()))?
            .insert(id, tx);
        let mut fds = vec![out_w.as_raw_fd(), err_w.as_raw_fd()];
        if let Some((r, _)) = &stdin_pipe {
            fds.push(r.as_raw_fd());
        }
        fds.push(procs.as_raw_fd());
        let oom_before = inner.cgroup.oom_kills();
        let msg = ToInit::Exec {
            id,
            kind,
            stdin: stdin_pipe.is_some(),
            cgroup_fds: 1,
        };
        if let Err(e) = send(&inner.control.sock, &msg, &fds).await {
            inner.control.take(id);
            return Err(e);
        }
        // Only the child may hold the write ends, or we would never see EOF.
        drop((out_w, err_w, procs));
        let stdin_task = stdin_pipe.zip(stdin).map(|((r, w), data)| {
            drop(r);
            tokio::spawn(async move {
                if let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(w) {
                    let _ = tx.write_all(&data).await;
                }
            })
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let out_task = tokio::spawn(read_capped(out_r, cap, stop_rx.clone()));
        let err_task = tokio::spawn(read_capped(err_r, cap, stop_rx));

        let mut rx = rx;
        let (exit, timed_out) = tokio::select! {
            r = &mut rx => (r, false),
            _ = tokio::time::sleep(timeout) => {
                let dir = exec_cg.dir();
                let v2 = matches!(inner.backend.shared.cgroups, Cgroups::V2 { .. });
                let _ = tokio::task::spawn_blocking(move || cgroup::kill_group(&dir, v2)).await;
                (rx.await, true)
            }
        };
        let exit = match exit {
            Ok(Ok(exit)) => exit,
            Ok(Err(Failure::Spawn(reason))) => {
                let _ = stop_tx.send(true);
                return Err(SandboxError::Spawn {
                    id: inner.id.clone(),
                    reason,
                });
            }
            Ok(Err(Failure::Gone(reason))) => {
                let _ = stop_tx.send(true);
                return Err(self.gone_or(reason));
            }
            Err(_) => {
                let _ = stop_tx.send(true);
                return Err(self.gone_or("init stopped answering".into()));
            }
        };
        // A daemon started by the command may hold the pipes open forever.
        let readers = async { (out_task.await, err_task.await) };
        tokio::pin!(readers);
        let (out, err) = match tokio::time::timeout(OUTPUT_GRACE, &mut readers).await {
            Ok(r) => r,
            Err(_) => {
                let _ = stop_tx.send(true);
                readers.await
            }
        };
        if let Some(t) = stdin_task {
            t.abort();
        }
        let (stdout, t1) = out.unwrap_or_default();
        let (stderr, t2) = err.unwrap_or_default();
        let oom_killed = inner.cgroup.oom_kills() > oom_before;
        Ok(ChildOutcome {
            exit,
            stdout,
            stderr,
            truncated: t1 || t2,
            timed_out,
            oom_killed,
            duration: start.elapsed(),
        })
    }

    fn gone_or(&self, reason: String) -> SandboxError {
        SandboxError::Gone {
            id: self.inner.id.clone(),
            reason,
        }
    }

    async fn file_op(&self, kind: ExecKind, stdin: Option<Vec<u8>>, what: &str) -> Result<Vec<u8>> {
        let timeout = Duration::from_secs_f64(self.inner.spec.limits.exec_timeout_s.max(1.0));
        let out = self.run_child(kind, stdin, timeout, MAX_READ).await?;
        if out.exit.code != 0 || out.timed_out {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(SandboxError::File {
                path: what.to_string(),
                message: if out.timed_out {
                    "timed out".into()
                } else {
                    msg
                },
            });
        }
        Ok(out.stdout)
    }
}

/// Removes a command's cgroup when the command is done (if it is empty),
/// on the blocking pool when a runtime is there (see `run_child`).
struct ExecGroupGuard(Option<ExecCgroup>);

impl ExecGroupGuard {
    fn dir(&self) -> PathBuf {
        self.0.as_ref().map(|c| c.dir.clone()).unwrap_or_default()
    }
}

impl Drop for ExecGroupGuard {
    fn drop(&mut self) {
        let Some(cg) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(move || cg.release());
            }
            Err(_) => cg.release(),
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::io("pipe", e.into()))
}

/// Read a pipe to EOF (or until told to stop), keeping at most `cap` bytes
/// and discarding the rest, so a flood costs no memory.
///
/// On `stop` (the command exited but a process it left behind still holds
/// the pipe), whatever is already buffered in the pipe is drained first:
/// everything the command itself wrote is in the buffer by the time it
/// exits, so stopping never loses its output, however late this task gets
/// scheduled on a loaded host. Only later writes by leftovers are dropped.
async fn read_capped(fd: OwnedFd, cap: usize, mut stop: watch::Receiver<bool>) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut truncated = false;
    if set_nonblocking(&fd).is_err() {
        return (out, truncated);
    }
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return (out, truncated);
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let mut keep = |out: &mut Vec<u8>, data: &[u8]| {
        let room = cap.saturating_sub(out.len());
        if data.len() > room {
            truncated = true;
        }
        out.extend_from_slice(&data[..data.len().min(room)]);
    };
    loop {
        tokio::select! {
            r = rx.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => keep(&mut out, &chunk[..n]),
            },
            _ = stop.changed() => {
                // Plain non-blocking read(2): tokio's `try_read` would skip
                // the syscall while the reactor has not yet marked the pipe
                // readable, which is exactly the late case.
                use std::os::fd::AsFd;
                loop {
                    match nix::unistd::read(rx.as_fd(), &mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => keep(&mut out, &chunk[..n]),
                    }
                }
                break;
            }
        }
    }
    (out, truncated)
}

impl Inner {
    fn check_alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(SandboxError::Gone {
                id: self.id.clone(),
                reason: "destroyed".into(),
            });
        }
        if self.control.dead.load(Ordering::SeqCst) {
            return Err(SandboxError::Gone {
                id: self.id.clone(),
                reason: "init exited".into(),
            });
        }
        Ok(())
    }

    /// Kill, reap, remove cgroups and state. Blocking; idempotent.
    fn teardown(&self) -> Result<()> {
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        spawn::pidfd_kill(&self.pidfd, libc::SIGKILL)
            .map_err(|e| SandboxError::io("kill init", e))?;
        spawn::pidfd_reap(&self.pidfd, true).map_err(|e| SandboxError::io("reap init", e))?;
        self.cgroup
            .remove()
            .map_err(|e| SandboxError::io("remove cgroups", e))?;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SandboxError::io("remove state dir", e)),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.destroyed.swap(true, Ordering::SeqCst)
            && let Err(e) = self.teardown()
        {
            tracing::warn!(
                "sandbox {} dropped without destroy; cleanup failed: {e}",
                self.id
            );
        }
    }
}

#[async_trait]
impl Sandbox for LocalSandbox {
    fn id(&self) -> &str {
        &self.inner.id
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecResult> {
        if req.argv.is_empty() {
            return Err(SandboxError::Invalid("empty command".into()));
        }
        let limits = &self.inner.spec.limits;
        let timeout = req
            .timeout
            .unwrap_or_else(|| Duration::from_secs_f64(limits.exec_timeout_s.max(0.001)));
        let cap = req.output_cap.unwrap_or(limits.output_cap_bytes);
        let env = req.env.into_iter().collect();
        let kind = ExecKind::Command {
            argv: req.argv,
            env,
            cwd: req.cwd,
        };
        let out = self.run_child(kind, req.stdin, timeout, cap).await?;
        Ok(ExecResult {
            exit_code: out.exit.code,
            signal: out.exit.signal,
            stdout: out.stdout,
            stderr: out.stderr,
            truncated: out.truncated,
            timed_out: out.timed_out,
            oom_killed: out.oom_killed,
            duration: out.duration,
        })
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.file_op(
            ExecKind::WriteFile {
                path: path.into(),
                mode,
            },
            Some(data.to_vec()),
            path,
        )
        .await
        .map(|_| ())
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.file_op(ExecKind::ReadFile { path: path.into() }, None, path)
            .await
    }

    async fn write_tar(&self, dest: &str, archive: Vec<u8>) -> Result<()> {
        self.file_op(
            ExecKind::WriteTar { dest: dest.into() },
            Some(archive),
            dest,
        )
        .await
        .map(|_| ())
    }

    async fn read_tar(&self, path: &str) -> Result<Vec<u8>> {
        self.file_op(ExecKind::ReadTar { path: path.into() }, None, path)
            .await
    }

    async fn fork(&self) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(self.fork_local().await?))
    }

    async fn destroy(&self) -> Result<()> {
        if self.inner.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let inner = self.inner.clone();
        let _permit = self
            .inner
            .backend
            .shared
            .lifecycle
            .acquire()
            .await
            .map_err(|e| SandboxError::Setup(format!("teardown: {e}")))?;
        tokio::task::spawn_blocking(move || inner.teardown())
            .await
            .map_err(|e| SandboxError::Setup(format!("teardown task: {e}")))?
    }
}
