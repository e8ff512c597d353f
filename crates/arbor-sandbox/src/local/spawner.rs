//! The supervisor's client of the spawner process (see `spawn.rs` for why
//! inits are cloned by a separate small process, and `init/spawner.rs` for
//! its side).
//!
//! One spawner runs per backend. Requests are serialized (a clone takes a
//! fraction of a millisecond); a spawner that died is restarted on the next
//! request, and one that stops answering is given up on after a timeout.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::spawn::{self, Spawned};
use crate::protocol::{self, ProtocolError, SpawnReply, SpawnRequest};

/// How long one spawn request may take before the spawner is presumed hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Clones sandbox inits through a spawner process.
pub(super) struct Spawner {
    init_path: PathBuf,
    running: Mutex<Option<Spawned>>,
}

impl Spawner {
    /// Start the spawner for `init_path`.
    pub(super) fn start(init_path: &Path) -> io::Result<Self> {
        let running = start_process(init_path)?;
        Ok(Spawner {
            init_path: init_path.to_path_buf(),
            running: Mutex::new(Some(running)),
        })
    }

    /// Start a sandbox init, a child of this process, in new namespaces.
    /// Blocking.
    pub(super) fn spawn_init(&self, host_network: bool) -> io::Result<Spawned> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| io::Error::other("spawner lock poisoned"))?;
        let (ours, theirs) = spawn::control_pair()?;
        let req = SpawnRequest {
            init: self.init_path.clone(),
            host_network,
        };
        // One retry: the first failure may only mean the spawner died
        // (killed by hand, by the OOM killer), which a restart cures.
        for attempt in 0..2 {
            if running.is_none() {
                *running = Some(start_process(&self.init_path)?);
            }
            let Some(proc) = running.as_ref() else {
                continue;
            };
            match request(proc, &req, &theirs) {
                Ok((pid, pidfd)) => {
                    return Ok(Spawned {
                        pid,
                        pidfd,
                        sock: ours,
                    });
                }
                Err(Failure::Clone(e)) => return Err(e),
                Err(Failure::Channel(e)) if attempt == 1 => return Err(e),
                Err(Failure::Channel(e)) => {
                    tracing::warn!("sandbox spawner failed ({e}); restarting it");
                    if let Some(dead) = running.take() {
                        stop(dead);
                    }
                }
            }
        }
        Err(io::Error::other("sandbox spawner unavailable"))
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        if let Some(proc) = self.running.get_mut().ok().and_then(Option::take) {
            stop(proc);
        }
    }
}

/// Why a request failed: the clone itself (reported by the spawner), or the
/// channel to the spawner.
enum Failure {
    Clone(io::Error),
    Channel(io::Error),
}

fn start_process(init_path: &Path) -> io::Result<Spawned> {
    let proc = spawn::start_spawner(init_path)?;
    let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as i64, 0);
    setsockopt(&proc.sock, sockopt::ReceiveTimeout, &timeout).map_err(io::Error::from)?;
    Ok(proc)
}

/// One round trip: send the request with `child_sock`, wait for the reply.
fn request(
    proc: &Spawned,
    req: &SpawnRequest,
    child_sock: &OwnedFd,
) -> Result<(i32, OwnedFd), Failure> {
    let sock = proc.sock.as_raw_fd();
    let channel = |e: ProtocolError| Failure::Channel(io::Error::other(format!("spawner: {e}")));
    protocol::send(sock, req, &[child_sock.as_raw_fd()]).map_err(channel)?;
    let mut buf = [0u8; 1024];
    let (reply, mut fds) = protocol::recv::<SpawnReply>(sock, &mut buf).map_err(channel)?;
    match reply {
        SpawnReply::Started { pid } if fds.len() == 1 => Ok((pid, fds.remove(0))),
        SpawnReply::Started { pid } => Err(Failure::Channel(io::Error::other(format!(
            "spawner started init {pid} but sent {} descriptors",
            fds.len()
        )))),
        SpawnReply::Failed { errno, message } => {
            tracing::debug!("spawner: {message}");
            Err(Failure::Clone(io::Error::from_raw_os_error(errno)))
        }
    }
}

/// Close the spawner's socket (it exits on end-of-file) and reap it; kill
/// it first if it does not go within a moment.
fn stop(proc: Spawned) {
    let Spawned { pidfd, sock, .. } = proc;
    drop(sock);
    for _ in 0..100 {
        if spawn::pidfd_reap(&pidfd, false).unwrap_or(true) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = spawn::pidfd_kill(&pidfd, libc::SIGKILL);
    let _ = spawn::pidfd_reap(&pidfd, true);
}
