//! The supervisor's end of a sandbox's control channel: the `SOCK_SEQPACKET`
//! socket shared with init (see [`crate::protocol`]), driven by tokio, and
//! the reader task that hands init's reports to the commands waiting on them.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::error::{Result, SandboxError};
use crate::protocol::{self, FromInit, ProtocolError, ToInit};

/// How a child of init ended, as reported by init.
#[derive(Debug, Clone, Copy)]
pub(super) struct Exit {
    pub(super) code: i32,
    pub(super) signal: Option<i32>,
}

/// Why a command has no exit status.
#[derive(Debug)]
pub(super) enum Failure {
    /// init could not start it.
    Spawn(String),
    /// init is gone.
    Gone(String),
}

/// Where the reader task delivers one command's end.
pub(super) type ExitSender = oneshot::Sender<std::result::Result<Exit, Failure>>;

/// The control channel of one sandbox, shared with its reader task.
pub(super) struct Control {
    pub(super) sock: AsyncFd<OwnedFd>,
    pub(super) pending: Mutex<HashMap<u64, ExitSender>>,
    pub(super) dead: AtomicBool,
}

impl Control {
    /// Wrap init's control socket; no reader task runs yet (see [`read_loop`]).
    pub(super) fn new(sock: AsyncFd<OwnedFd>) -> Self {
        Control {
            sock,
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        }
    }

    /// Remove (and return) the waiter of command `id`.
    pub(super) fn take(&self, id: u64) -> Option<ExitSender> {
        self.pending.lock().ok()?.remove(&id)
    }
}

/// Register init's socket with tokio (non-blocking, so the reactor drives it).
pub(super) fn register(sock: OwnedFd) -> Result<AsyncFd<OwnedFd>> {
    set_nonblocking(&sock).map_err(|e| SandboxError::io("control socket", e))?;
    // SAFETY: OwnedFd keeps the descriptor open and unchanged for the
    // AsyncFd's whole life.
    unsafe { AsyncFd::register(sock) }
        .map_err(|e| SandboxError::io("control socket", io::Error::other(e.to_string())))
}

/// Set `O_NONBLOCK` on a descriptor.
pub(super) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    Ok(())
}

/// `EAGAIN` as tokio's `WouldBlock` (retry when ready); any other error is final.
fn would_block(e: ProtocolError) -> io::Result<std::result::Result<(), ProtocolError>> {
    match e {
        ProtocolError::Io(nix::errno::Errno::EAGAIN) => Err(io::ErrorKind::WouldBlock.into()),
        other => Ok(Err(other)),
    }
}

/// Send one message (with descriptors) to init.
pub(super) async fn send(sock: &AsyncFd<OwnedFd>, msg: &ToInit, fds: &[i32]) -> Result<()> {
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

/// Receive one message (with descriptors) from init.
pub(super) async fn recv(
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

/// Dispatch init's reports to waiting commands; when init goes away, fail
/// every waiter instead of leaving it hanging.
pub(super) async fn read_loop(control: Arc<Control>) {
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
