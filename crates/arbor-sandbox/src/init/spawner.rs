//! The init program's second role: the spawner, which clones each sandbox's
//! init on behalf of the supervisor (why: `local/spawn.rs`).
//!
//! It is started once per backend with its request socket on descriptor 3,
//! and serves one [`SpawnRequest`] at a time: the socket for the new init
//! arrives with the request, the new init's pidfd goes back with the reply.
//! The new init is created with `CLONE_PARENT`, so it is the supervisor's
//! child, not the spawner's: the spawner never waits for anything. It exits
//! when the supervisor closes the socket (or dies).

use std::os::fd::{AsFd, AsRawFd};

use crate::local::spawn::clone_init;
use crate::protocol::{self, ProtocolError, SpawnReply, SpawnRequest};

/// Serve spawn requests until the supervisor hangs up.
pub(super) fn serve() -> Result<(), String> {
    let sock = super::control();
    if nix::sys::stat::fstat(sock).is_err() {
        return Err("no request socket on descriptor 3: started by arbor, not by hand".into());
    }
    // New inits get their own socket on descriptor 3, never this one.
    nix::fcntl::fcntl(
        sock,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("request socket: {e}"))?;
    super::stdio_to_null();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (req, fds) = match protocol::recv::<SpawnRequest>(sock.as_raw_fd(), &mut buf) {
            Ok(v) => v,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(ProtocolError::Io(nix::Error::EINTR)) => continue,
            Err(e) => return Err(format!("reading a spawn request: {e}")),
        };
        let started = match fds.as_slice() {
            [child_sock] => clone_init(&req.init, req.host_network, child_sock.as_fd(), true)
                .map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), e.to_string())),
            _ => Err((libc::EINVAL, "expected exactly one descriptor".into())),
        };
        // Our copies of the new init's socket must not keep it open.
        drop(fds);
        let sent = match started {
            Ok((pid, pidfd)) => protocol::send(
                sock.as_raw_fd(),
                &SpawnReply::Started { pid },
                &[pidfd.as_raw_fd()],
            ),
            Err((errno, message)) => protocol::send(
                sock.as_raw_fd(),
                &SpawnReply::Failed { errno, message },
                &[],
            ),
        };
        sent.map_err(|e| format!("answering a spawn request: {e}"))?;
    }
}
