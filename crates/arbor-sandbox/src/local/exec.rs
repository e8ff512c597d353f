//! Running one child of init (a command or a file transfer) from the
//! supervisor: its own cgroup, pipes for stdin/stdout/stderr passed to init by
//! `SCM_RIGHTS`, the wait for init's report under a timeout that kills the
//! child's whole group, and output read with a cap.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::cgroup::{self, ExecCgroup, SandboxCgroup};
use super::control::{self, Control, Exit, Failure};
use crate::error::{Result, SandboxError};
use crate::protocol::{ExecKind, ToInit};

/// After a command exits, how long to keep reading output that a background
/// process it left behind may still be writing to the same pipes.
const OUTPUT_GRACE: Duration = Duration::from_millis(50);

/// What running a child needs of its sandbox.
pub(super) struct ExecTarget<'a> {
    /// The sandbox's id (named in errors).
    pub(super) sandbox_id: &'a str,
    pub(super) control: &'a Control,
    pub(super) cgroup: &'a SandboxCgroup,
    /// How a timed-out child's group is killed differs between v1 and v2.
    pub(super) cgroups_v2: bool,
}

/// Raw outcome of a child of init.
pub(super) struct ChildOutcome {
    pub(super) exit: Exit,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    pub(super) truncated: bool,
    pub(super) timed_out: bool,
    pub(super) oom_killed: bool,
    pub(super) duration: Duration,
}

/// The pipes of one child: (read end, write end) each.
struct Pipes {
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
    stdin: Option<(OwnedFd, OwnedFd)>,
}

/// The supervisor's side of a running child's output.
struct Readers {
    out: JoinHandle<(Vec<u8>, bool)>,
    err: JoinHandle<(Vec<u8>, bool)>,
    /// Tells the readers to stop waiting for EOF.
    stop: watch::Sender<bool>,
    stdin: Option<JoinHandle<()>>,
}

/// Run child `id` of the target's init to completion or `timeout`, keeping at
/// most `cap` bytes of each output stream.
pub(super) async fn run_child(
    target: &ExecTarget<'_>,
    id: u64,
    kind: ExecKind,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    cap: usize,
) -> Result<ChildOutcome> {
    let start = Instant::now();
    let pipes = pipes(stdin.is_some())?;
    let (exec_cg, procs) = exec_cgroup(target.cgroup, id).await?;
    let exec_cg = ExecGroupGuard(Some(exec_cg));
    let rx = register_waiter(target.control, id)?;
    let oom_before = target.cgroup.oom_kills();
    let readers = dispatch(target.control, id, kind, pipes, procs, stdin, cap).await?;
    let (exit, timed_out) = wait_exit(rx, timeout, &exec_cg, target.cgroups_v2).await;
    let exit = match exit {
        Ok(Ok(exit)) => exit,
        failed => {
            let _ = readers.stop.send(true);
            return Err(failure_error(target.sandbox_id, failed));
        }
    };
    let (stdout, stderr, truncated) = collect(readers).await;
    Ok(ChildOutcome {
        exit,
        stdout,
        stderr,
        truncated,
        timed_out,
        oom_killed: target.cgroup.oom_kills() > oom_before,
        duration: start.elapsed(),
    })
}

/// Output pipes, and a stdin pipe when there is input to feed.
fn pipes(stdin: bool) -> Result<Pipes> {
    Ok(Pipes {
        out: pipe()?,
        err: pipe()?,
        stdin: if stdin { Some(pipe()?) } else { None },
    })
}

/// Create the child's own cgroup `x<id>` and open its `cgroup.procs` (passed
/// to init, which moves the child there before it execs).
async fn exec_cgroup(cgroup: &SandboxCgroup, id: u64) -> Result<(ExecCgroup, File)> {
    // cgroupfs mkdir/rmdir contend on a kernel-wide lock when thousands
    // of sandboxes churn: never on the async workers.
    let cg = cgroup.clone();
    tokio::task::spawn_blocking(move || cg.exec_group(id))
        .await
        .map_err(|e| SandboxError::Setup(format!("command cgroup task: {e}")))?
        .map_err(|e| SandboxError::io("command cgroup", e))
}

/// Expect init's report on child `id` (registered before asking, so it cannot be missed).
fn register_waiter(
    control: &Control,
    id: u64,
) -> Result<oneshot::Receiver<std::result::Result<Exit, Failure>>> {
    let (tx, rx) = oneshot::channel();
    control
        .pending
        .lock()
        .map_err(|_| SandboxError::Setup("poisoned lock".into()))?
        .insert(id, tx);
    Ok(rx)
}

/// Ask init to start the child with the pipes' child ends and its cgroup,
/// then start feeding stdin and reading output.
async fn dispatch(
    control: &Control,
    id: u64,
    kind: ExecKind,
    pipes: Pipes,
    procs: File,
    stdin: Option<Vec<u8>>,
    cap: usize,
) -> Result<Readers> {
    let Pipes {
        out: (out_r, out_w),
        err: (err_r, err_w),
        stdin: stdin_pipe,
    } = pipes;
    let mut fds = vec![out_w.as_raw_fd(), err_w.as_raw_fd()];
    if let Some((r, _)) = &stdin_pipe {
        fds.push(r.as_raw_fd());
    }
    fds.push(procs.as_raw_fd());
    let msg = ToInit::Exec {
        id,
        kind,
        stdin: stdin_pipe.is_some(),
        cgroup_fds: 1,
    };
    if let Err(e) = control::send(&control.sock, &msg, &fds).await {
        control.take(id);
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
    let (stop, stop_rx) = watch::channel(false);
    Ok(Readers {
        out: tokio::spawn(read_capped(out_r, cap, stop_rx.clone())),
        err: tokio::spawn(read_capped(err_r, cap, stop_rx)),
        stop,
        stdin: stdin_task,
    })
}

/// Wait for init's report; past `timeout`, kill the child's whole group and
/// wait for the report of its death. Returns the report and whether it timed out.
async fn wait_exit(
    mut rx: oneshot::Receiver<std::result::Result<Exit, Failure>>,
    timeout: Duration,
    exec_cg: &ExecGroupGuard,
    cgroups_v2: bool,
) -> (
    std::result::Result<std::result::Result<Exit, Failure>, oneshot::error::RecvError>,
    bool,
) {
    tokio::select! {
        r = &mut rx => (r, false),
        _ = tokio::time::sleep(timeout) => {
            let dir = exec_cg.dir();
            let _ = tokio::task::spawn_blocking(move || cgroup::kill_group(&dir, cgroups_v2)).await;
            (rx.await, true)
        }
    }
}

/// The error for a child that has no exit status.
fn failure_error(
    sandbox_id: &str,
    failed: std::result::Result<std::result::Result<Exit, Failure>, oneshot::error::RecvError>,
) -> SandboxError {
    let id = sandbox_id.to_string();
    match failed {
        Ok(Err(Failure::Spawn(reason))) => SandboxError::Spawn { id, reason },
        Ok(Err(Failure::Gone(reason))) => SandboxError::Gone { id, reason },
        Ok(Ok(_)) | Err(_) => SandboxError::Gone {
            id,
            reason: "init stopped answering".into(),
        },
    }
}

/// The child's output once it exited: all of it if the pipes close within
/// [`OUTPUT_GRACE`], else what is buffered (a daemon it started may hold them open forever).
async fn collect(readers: Readers) -> (Vec<u8>, Vec<u8>, bool) {
    let Readers {
        out,
        err,
        stop,
        stdin,
    } = readers;
    let both = async { (out.await, err.await) };
    tokio::pin!(both);
    let (out, err) = match tokio::time::timeout(OUTPUT_GRACE, &mut both).await {
        Ok(r) => r,
        Err(_) => {
            let _ = stop.send(true);
            both.await
        }
    };
    if let Some(t) = stdin {
        t.abort();
    }
    let (stdout, t1) = out.unwrap_or_default();
    let (stderr, t2) = err.unwrap_or_default();
    (stdout, stderr, t1 || t2)
}

/// Removes a command's cgroup when the command is done (if it is empty),
/// on the blocking pool when a runtime is there (see [`exec_cgroup`]).
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

/// A close-on-exec pipe: (read end, write end).
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
    if control::set_nonblocking(&fd).is_err() {
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
