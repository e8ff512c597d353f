//! The wire protocol between the supervisor (the process using this crate) and
//! the init process (PID 1 inside each sandbox).
//!
//! Transport: a `SOCK_SEQPACKET` Unix socket pair, so message boundaries are
//! kept and file descriptors travel with a message (`SCM_RIGHTS`). Each
//! message is one JSON document. Output never crosses this socket: the
//! supervisor creates pipes and passes their write ends, so a chatty command
//! cannot stall the control channel.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::spec::Bind;

/// Largest message accepted (an exec request with a large environment).
pub const MAX_MESSAGE: usize = 192 * 1024;
/// Most descriptors one message carries.
pub const MAX_FDS: usize = 8;
/// The control socket's descriptor number in the init process.
pub const INIT_CONTROL_FD: RawFd = 3;
/// Environment variable that tells a binary it was started as a sandbox init.
pub const INIT_ENV: &str = "__ARBOR_SANDBOX_INIT";
/// The value of [`INIT_ENV`] that starts the init program as the spawner
/// (the process that clones each sandbox's init for the supervisor).
pub const SPAWNER_ROLE: &str = "spawner";

/// How the init process builds the sandbox. Sent once, first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    /// Sandbox id (for messages).
    pub id: String,
    /// Overlay lower layers, uppermost first.
    pub lower: Vec<PathBuf>,
    /// Host directory on which the sandbox mounts its private tmpfs (in its
    /// own mount namespace: the host sees an empty directory).
    pub private_dir: PathBuf,
    /// Size of the private tmpfs (the writable layer), bytes.
    pub workspace_bytes: u64,
    /// Extra host paths to make visible.
    pub binds: Vec<Bind>,
    /// UTS hostname.
    pub hostname: String,
    /// Created if missing; default cwd of commands.
    pub workdir: String,
    /// When forking: a path (through `/proc/PID/fd/N` of the parent's init)
    /// to the parent's private tmpfs, whose writable layers are copied.
    pub fork_from: Option<PathBuf>,
    /// Environment every command starts with.
    pub env: Vec<(String, String)>,
    /// RLIMIT_NOFILE for commands.
    pub nofile: u64,
    /// The spec's `user` (Docker `USER` syntax), resolved by init against
    /// the sandbox's own `/etc/passwd` and `/etc/group`.
    pub user: Option<String>,
    /// Set `HOME` from the user's passwd entry (the spec's env did not set it).
    pub home_from_passwd: bool,
    /// Init shares the host's network namespace: no loopback setup.
    pub host_network: bool,
}

/// What a child of init does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecKind {
    /// Run a program.
    Command {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
    },
    /// Write stdin to `path` (parents created) with `mode`.
    WriteFile { path: String, mode: u32 },
    /// Copy `path` to stdout.
    ReadFile { path: String },
    /// Unpack a tar archive from stdin into directory `dest`.
    WriteTar { dest: String },
    /// Write a tar archive of `path` (file or directory) to stdout.
    ReadTar { path: String },
}

/// Supervisor to init.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToInit {
    /// Sandbox construction parameters; must be the first message.
    Config(Box<InitConfig>),
    /// Start a child. Descriptors, in order: stdout write end, stderr write
    /// end, then stdin read end if `stdin`, then `cgroup_fds` open
    /// `cgroup.procs` files the child joins before anything else.
    Exec {
        id: u64,
        kind: ExecKind,
        stdin: bool,
        cgroup_fds: usize,
    },
}

/// Init to supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromInit {
    /// The sandbox is built. `fs_fd` is the descriptor number, in init, of
    /// the private tmpfs root (reachable as `/proc/<init>/fd/<fs_fd>`), used to fork.
    Ready { fs_fd: i32 },
    /// The sandbox could not be built.
    Failed { error: String },
    /// A child ended.
    Exited {
        id: u64,
        code: i32,
        signal: Option<i32>,
    },
    /// A child could not be started at all.
    SpawnFailed { id: u64, error: String },
}

/// Supervisor to spawner: clone a sandbox init. The message carries one
/// descriptor, the socket that becomes the new init's descriptor 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// The init program to execute.
    pub init: PathBuf,
    /// Stay in the host's network namespace.
    pub host_network: bool,
}

/// Spawner to supervisor, one per [`SpawnRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SpawnReply {
    /// Started; the message carries the new init's pidfd.
    Started { pid: i32 },
    /// `clone3` failed with this `errno` (or the request was malformed).
    Failed { errno: i32, message: String },
}

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("control socket: {0}")]
    Io(#[from] nix::Error),
    #[error("control message is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("control socket closed")]
    Closed,
    #[error("control message too large ({0} bytes)")]
    TooLarge(usize),
}

/// Send one message with descriptors (blocking or non-blocking per the socket).
pub fn send<T: Serialize>(sock: RawFd, msg: &T, fds: &[RawFd]) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(msg)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    let iov = [IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receive one message and its descriptors (close-on-exec).
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: RawFd,
    buf: &mut [u8],
) -> Result<(T, Vec<OwnedFd>), ProtocolError> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            sock,
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for us;
                // nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Err(ProtocolError::Closed);
    }
    let msg = serde_json::from_slice(&buf[..len])?;
    Ok((msg, fds))
}
