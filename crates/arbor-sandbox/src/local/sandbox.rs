//! A local sandbox's life: creating one (`LocalBackend::create_local`, also
//! behind [`Backend::create`] and fork), the [`LocalSandbox`] handle and its
//! [`Sandbox`] operations, and teardown.
//!
//! Start, in order: validate the spec; on the blocking pool, create the state
//! directory and cgroups, `clone3` init, attach it and write `state.json`;
//! send init its config and wait for it to report ready; start the control
//! reader and the bridges.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use super::backend::{LocalBackend, Shared};
use super::cgroup::{Cgroups, SandboxCgroup};
use super::control::{self, Control};
use super::exec::{self, ChildOutcome, ExecTarget};
use super::gc::StateFile;
use super::limits::HostLimits;
use super::validate::validate;
use super::{bridge, mask, spawn};
use crate::error::{Result, SandboxError};
use crate::protocol::{ExecKind, FromInit, InitConfig, ToInit};
use crate::spec::{ExecRequest, ExecResult, Limits, SandboxSpec};
use crate::{Backend, Sandbox};

/// How long to wait for a new sandbox's init to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest file read back through `read_file`/`read_tar`.
const MAX_READ: usize = 1 << 30;

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
    /// Init, this process's unreaped child (see `spawn::kill_child`).
    pid: i32,
    fs_fd: i32,
    control: Arc<Control>,
    cgroup: SandboxCgroup,
    dir: PathBuf,
    next_exec: AtomicU64,
    destroyed: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What the blocking part of a start leaves: init running in its cgroups.
struct HostSide {
    guard: StartGuard,
    cgroup: SandboxCgroup,
    pid: i32,
    sock: OwnedFd,
}

impl LocalBackend {
    /// Create a sandbox, returning the concrete type (with local-only extras).
    pub async fn create_local(&self, spec: &SandboxSpec) -> Result<LocalSandbox> {
        self.start(spec, None).await
    }

    /// Start a sandbox; with `fork_from`, its writable layer starts as a copy of that one.
    async fn start(&self, spec: &SandboxSpec, fork_from: Option<PathBuf>) -> Result<LocalSandbox> {
        validate(spec)?;
        let lower = lower_layers(&self.shared, spec)?;
        // Before anything of it exists: a start that ran into a limit part-way
        // could fail to clean up for the same reason.
        self.shared.limits.admit()?;
        let admitted = Admitted(&self.shared.limits);
        let id = new_id();
        let dir = self.shared.state_root.join("sb").join(&id);
        let private_dir = dir.join("fs");
        // Held until init reports ready: its mounts are kernel work too.
        let permit = self
            .shared
            .lifecycle
            .acquire()
            .await
            .map_err(|e| SandboxError::Setup(format!("sandbox start: {e}")))?;
        let HostSide {
            mut guard,
            cgroup,
            pid,
            sock,
        } = self.start_host_side(&id, &dir, &private_dir, spec).await?;
        let sock = control::register(sock)?;
        let config = init_config(spec, &id, lower, private_dir, fork_from);
        let fs_fd = configure_init(&sock, config, &id).await?;
        drop(permit);

        let control = Arc::new(Control::new(sock));
        let reader = tokio::spawn(control::read_loop(control.clone()));
        let mut tasks = match start_bridges(pid, spec) {
            Ok(bridges) => bridges,
            Err(e) => {
                reader.abort();
                return Err(e);
            }
        };
        tasks.push(reader);
        guard.disarm();
        std::mem::forget(admitted);
        Ok(LocalSandbox {
            inner: Arc::new(Inner {
                id,
                spec: spec.clone(),
                backend: self.clone(),
                pid,
                fs_fd,
                control,
                cgroup,
                dir,
                next_exec: AtomicU64::new(1),
                destroyed: AtomicBool::new(false),
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// The host side of a start, on the blocking pool: state directory,
    /// cgroups, init cloned and attached, `state.json` written.
    async fn start_host_side(
        &self,
        id: &str,
        dir: &Path,
        private_dir: &Path,
        spec: &SandboxSpec,
    ) -> Result<HostSide> {
        // Directories, cgroups (cgroupfs writes take a kernel-wide lock) and
        // the fork of this possibly large process all block: keep them off
        // the async workers, which also serve the gateway and the policy.
        let sh = self.shared.clone();
        let (id, dir, private_dir, limits) = (
            id.to_string(),
            dir.to_path_buf(),
            private_dir.to_path_buf(),
            spec.limits.clone(),
        );
        let host_network = spec.network.host;
        tokio::task::spawn_blocking(move || {
            host_side(&sh, &id, dir, &private_dir, &limits, host_network)
        })
        .await
        .map_err(|e| SandboxError::Setup(format!("sandbox start task: {e}")))?
    }
}

#[async_trait]
impl Backend for LocalBackend {
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        Ok(Box::new(self.create_local(spec).await?))
    }
}

/// The overlay's lower layers: the spec's layers, the given rootfs, or the
/// mask over the host root.
fn lower_layers(sh: &Shared, spec: &SandboxSpec) -> Result<Vec<PathBuf>> {
    if !spec.layers.is_empty() {
        return Ok(spec.layers.clone());
    }
    Ok(match &spec.rootfs {
        Some(dir) => vec![dir.clone()],
        None => {
            let mask = mask::ensure_mask(&sh.state_root)
                .map_err(|e| SandboxError::io("build rootfs mask", e))?;
            vec![mask, PathBuf::from("/")]
        }
    })
}

/// Blocking body of [`LocalBackend::start_host_side`]; a failure undoes what was done.
fn host_side(
    sh: &Shared,
    id: &str,
    dir: PathBuf,
    private_dir: &Path,
    limits: &Limits,
    host_network: bool,
) -> Result<HostSide> {
    std::fs::create_dir_all(private_dir).map_err(|e| SandboxError::io("create state dir", e))?;
    let mut guard = StartGuard {
        dir: dir.clone(),
        cgroup: None,
        init: None,
    };
    let supervisor_pid = std::process::id() as i32;
    let mut state = StateFile {
        id: id.to_string(),
        supervisor_pid,
        supervisor_start: spawn::process_start_time(supervisor_pid).unwrap_or(0),
        init_pid: 0,
        init_start: 0,
        cgroups: sh.cgroups.subtrees().iter().map(|s| s.join(id)).collect(),
    };
    // Written first, so even a start that fails before init exists (and
    // then fails to remove its directory) leaves a directory that names its
    // supervisor, for gc and for counting one supervisor's leaks.
    state
        .write(&dir)
        .map_err(|e| SandboxError::io("write state file", e))?;
    let cg = sh
        .cgroups
        .create(id, limits)
        .map_err(|e| SandboxError::io("create cgroups", e))?;
    guard.cgroup = Some(cg.clone());
    let spawned = sh
        .spawner
        .spawn_init(host_network)
        .map_err(|e| SandboxError::io(format!("start init {}", sh.init_path.display()), e))?;
    let pid = spawned.pid;
    // Init is our unreaped child: its pid is enough (see `spawn::kill_child`).
    drop(spawned.pidfd);
    guard.init = Some(pid);
    // Attach before init receives its config: it forks nothing until then.
    cg.attach(pid)
        .map_err(|e| SandboxError::io("attach init to cgroups", e))?;
    state.init_pid = pid;
    state.init_start = spawn::process_start_time(pid).unwrap_or(0);
    state.cgroups = cg.dirs().to_vec();
    state
        .write(&dir)
        .map_err(|e| SandboxError::io("write state file", e))?;
    Ok(HostSide {
        guard,
        cgroup: cg,
        pid,
        sock: spawned.sock,
    })
}

/// What init needs to build the sandbox: layers, binds, names, and the
/// environment (a minimal default, overridden by the spec's).
fn init_config(
    spec: &SandboxSpec,
    id: &str,
    lower: Vec<PathBuf>,
    private_dir: PathBuf,
    fork_from: Option<PathBuf>,
) -> InitConfig {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/root".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
    ];
    // Another user's HOME comes from the sandbox's passwd, which only init can read.
    let home_from_passwd = spec.user.is_some() && !spec.env.contains_key("HOME");
    if home_from_passwd {
        env.retain(|(k, _)| k != "HOME");
    }
    for (k, v) in &spec.env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    InitConfig {
        id: id.to_string(),
        lower,
        private_dir,
        workspace_bytes: spec.limits.workspace_mb.saturating_mul(1 << 20),
        binds: spec.binds.clone(),
        hostname: spec.hostname.clone(),
        workdir: spec.workdir.clone(),
        fork_from,
        env,
        nofile: spec.limits.nofile,
        user: spec.user.clone(),
        home_from_passwd,
        host_network: spec.network.host,
    }
}

/// Send init its config and wait (bounded) for it to report ready; returns
/// init's descriptor of the writable layer (which forks copy from).
async fn configure_init(sock: &AsyncFd<OwnedFd>, config: InitConfig, id: &str) -> Result<i32> {
    control::send(sock, &ToInit::Config(Box::new(config)), &[]).await?;
    let mut buf = vec![0u8; 4096];
    let ready = tokio::time::timeout(READY_TIMEOUT, control::recv(sock, &mut buf))
        .await
        .map_err(|_| {
            SandboxError::Setup(format!("sandbox {id}: init did not report ready in time"))
        })?;
    match ready {
        Ok((FromInit::Ready { fs_fd }, _)) => Ok(fs_fd),
        Ok((FromInit::Failed { error }, _)) => {
            Err(SandboxError::Setup(format!("sandbox {id}: {error}")))
        }
        Ok((other, _)) => Err(SandboxError::Setup(format!(
            "sandbox {id}: unexpected {other:?}"
        ))),
        Err(e) => Err(SandboxError::Setup(format!(
            "sandbox {id}: init died during setup ({e})"
        ))),
    }
}

/// Serve the spec's bridges inside the sandbox of init `pid`; on failure,
/// none is left running.
fn start_bridges(pid: i32, spec: &SandboxSpec) -> Result<Vec<JoinHandle<()>>> {
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
    let mut bridges = Vec::new();
    for (port, target) in targets {
        match bridge::start(pid, port, target) {
            Ok(h) => bridges.push(h),
            Err(e) => {
                for h in bridges {
                    h.abort();
                }
                return Err(SandboxError::io(format!("bridge on port {port}"), e));
            }
        }
    }
    Ok(bridges)
}

/// A start admitted by the host's limits: counted live until the start
/// fails (dropped) or the sandbox is torn down (forgotten on success).
struct Admitted<'a>(&'a HostLimits);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Undo a half-built sandbox if `start` fails part-way.
struct StartGuard {
    dir: PathBuf,
    cgroup: Option<SandboxCgroup>,
    /// Init's pid, our unreaped child.
    init: Option<i32>,
}

impl StartGuard {
    /// The start succeeded: the sandbox's handle owns what is left.
    fn disarm(&mut self) {
        self.init = None;
        self.cgroup = None;
        self.dir = PathBuf::new();
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.init.take() {
            let _ = spawn::kill_child(pid, libc::SIGKILL);
            let _ = spawn::reap_child(pid, true);
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh random sandbox id.
fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().r#gen();
    format!("sb-{n:016x}")
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

    /// A host path to this sandbox's overlay upper directory: everything
    /// its commands and file operations changed in the root, in overlayfs's
    /// format (deletions are 0:0 character-device whiteouts, replaced
    /// directories carry `trusted.overlay.opaque`), e.g. to capture an image
    /// build step with [`crate::copy_layer`]. It reaches the sandbox's private
    /// tmpfs through its init (`/proc/<init>/fd/<n>/upper`), so it is valid
    /// only while the sandbox lives, and should be read while no command
    /// runs (a running one may change it under the reader). Besides what
    /// commands wrote it holds the directories init created in the root:
    /// mount points (`dev`, `proc`, bind targets), `tmp` and the workdir,
    /// where the lower layers lacked them; a caller capturing a build step
    /// may drop those when they are empty.
    pub fn writable_layer(&self) -> PathBuf {
        self.private_fs().join("upper")
    }

    /// The private tmpfs's root, reached through init's descriptor of it.
    fn private_fs(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.inner.pid, self.inner.fs_fd))
    }

    /// Fork, returning the concrete type.
    pub async fn fork_local(&self) -> Result<LocalSandbox> {
        self.inner.check_alive()?;
        let from = self.private_fs();
        self.inner.backend.start(&self.inner.spec, Some(from)).await
    }

    /// Run one child of init (see [`exec::run_child`]) if the sandbox is alive.
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
        let target = ExecTarget {
            sandbox_id: &inner.id,
            control: &inner.control,
            cgroup: &inner.cgroup,
            cgroups_v2: matches!(inner.backend.shared.cgroups, Cgroups::V2 { .. }),
        };
        exec::run_child(&target, id, kind, stdin, timeout, cap).await
    }

    /// A file transfer as a child of init: its output on success, else an error naming `what`.
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

impl Inner {
    /// Fail with `Gone` once destroyed or once init has exited.
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

    /// Kill, reap, remove cgroups and state. Blocking; called once (the
    /// `destroyed` flag guards it).
    fn teardown(&self) -> Result<()> {
        self.backend.shared.limits.release();
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        spawn::kill_child(self.pid, libc::SIGKILL).map_err(|e| SandboxError::io("kill init", e))?;
        spawn::reap_child(self.pid, true).map_err(|e| SandboxError::io("reap init", e))?;
        self.cgroup
            .remove()
            .map_err(|e| SandboxError::io("remove cgroups", e))?;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
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
