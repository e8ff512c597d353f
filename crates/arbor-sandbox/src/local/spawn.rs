//! Starting processes in new namespaces with `clone3`.
//!
//! A sandbox's init is created directly in fresh mount, PID, network (unless
//! the spec shares the host's), UTS and IPC namespaces (so init is PID 1
//! without an extra process). The supervisor then keeps only its pid, not
//! a pidfd: init is its unreaped child, so the pid cannot be reused before
//! the supervisor reaps it ([`kill_child`]), and one descriptor fewer per
//! live sandbox is what lets 10,000 fit under a 20,000 `RLIMIT_NOFILE`.
//!
//! The supervisor does not clone inits itself: a fork copies the caller's
//! descriptor table and page tables, and the child then closes every
//! inherited descriptor, so the cost of a fork of the supervisor grows with
//! the number of live sandboxes (a descriptor each) and with its memory.
//! Instead a small spawner process (the init program in its second role,
//! see `spawner.rs`) clones each init with `CLONE_PARENT`: the new init is
//! still the supervisor's child (reaped by pid), but the clone
//! copies only the spawner's handful of descriptors and pages.
//!
//! Between `clone3` and `execve` the child runs only async-signal-safe
//! system calls: the caller may be multi-threaded.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use crate::protocol::{INIT_CONTROL_FD, INIT_ENV, SPAWNER_ROLE};

/// `struct clone_args` (linux/sched.h, version 2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// A started process with its end of a control socket.
pub struct Spawned {
    /// Host pid.
    pub pid: i32,
    /// Its pidfd.
    pub pidfd: OwnedFd,
    /// The supervisor's end of its control socket (close-on-exec).
    pub sock: OwnedFd,
}

/// The namespaces of a new sandbox init: all fresh, except the network
/// namespace with `host_network`.
pub fn init_namespaces(host_network: bool) -> u64 {
    let netns = if host_network { 0 } else { libc::CLONE_NEWNET };
    (libc::CLONE_NEWNS | libc::CLONE_NEWPID | netns | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC)
        as u64
}

/// A `SOCK_SEQPACKET` pair (both ends close-on-exec): the caller's end and
/// the end that becomes descriptor 3 of a new process.
pub fn control_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Start the spawner: the init program in its spawner role, in the
/// caller's namespaces, with its control socket on descriptor 3.
pub fn start_spawner(init_path: &Path) -> io::Result<Spawned> {
    let (parent, child) = control_pair()?;
    let (pid, pidfd) = clone_exec(init_path, SPAWNER_ROLE, child.as_fd(), 0)?;
    drop(child);
    Ok(Spawned {
        pid,
        pidfd,
        sock: parent,
    })
}

/// Clone `init_path` as a sandbox init (PID 1 of new namespaces) with
/// `sock` as its descriptor 3. With `sibling`, the new process becomes a
/// child of the caller's parent (`CLONE_PARENT`): how the spawner starts
/// inits for the supervisor.
pub fn clone_init(
    init_path: &Path,
    host_network: bool,
    sock: BorrowedFd<'_>,
    sibling: bool,
) -> io::Result<(i32, OwnedFd)> {
    let parent = if sibling {
        libc::CLONE_PARENT as u64
    } else {
        0
    };
    clone_exec(init_path, "1", sock, init_namespaces(host_network) | parent)
}

/// `clone3` with `flags` (plus `CLONE_PIDFD`) and exec `path` with only
/// `INIT_ENV=role` in its environment and `sock` on descriptor 3; every
/// other descriptor above 2 is closed. Returns the child's pid and pidfd.
fn clone_exec(
    path: &Path,
    role: &str,
    sock: BorrowedFd<'_>,
    flags: u64,
) -> io::Result<(i32, OwnedFd)> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let env = CString::new(format!("{INIT_ENV}={role}")).map_err(io::Error::other)?;
    let argv = [c"arbor-sandbox-init".as_ptr(), std::ptr::null()];
    let envp = [env.as_ptr(), std::ptr::null()];
    let child_fd = sock.as_raw_fd();

    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: flags | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        // With CLONE_PARENT the kernel requires 0: the child takes the
        // caller's own exit signal (SIGCHLD, to the supervisor).
        exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork. The child only calls
    // fcntl/dup2/close_range/execve/_exit on data prepared above, all async-signal-safe.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        // SAFETY: see above; never returns.
        unsafe { exec_child(child_fd, &path, &argv, &envp) }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CLONE_PIDFD stored a new descriptor we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((ret as i32, pidfd))
}

/// The child's side of [`clone_exec`]: socket to descriptor 3, close the
/// rest, exec.
///
/// # Safety
/// Only in the child of a fork-like clone; never returns.
unsafe fn exec_child(
    child_fd: RawFd,
    path: &CStr,
    argv: &[*const libc::c_char; 2],
    envp: &[*const libc::c_char; 2],
) -> ! {
    // SAFETY: async-signal-safe calls on valid descriptors and pointers.
    unsafe {
        if child_fd == INIT_CONTROL_FD {
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        } else {
            libc::dup2(child_fd, INIT_CONTROL_FD);
        }
        // Descriptors inherited without close-on-exec (a build jobserver, a
        // parent's pipes) must not reach the sandbox.
        libc::syscall(
            libc::SYS_close_range,
            INIT_CONTROL_FD as u32 + 1,
            u32::MAX,
            0u32,
        );
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(127);
    }
}

/// Send a signal through a pidfd (no pid-reuse race).
pub fn pidfd_kill(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: valid pidfd; null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ESRCH: already exited, which is what we wanted.
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Reap the process behind a pidfd; `block` waits for it to exit.
/// Returns true once reaped (or already gone).
pub fn pidfd_reap(pidfd: &OwnedFd, block: bool) -> io::Result<bool> {
    reap(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, block)
}

/// `waitid(2)` for exit on one process (`idtype` `P_PID` or `P_PIDFD`), retried on EINTR.
/// Returns true once reaped (or already gone).
fn reap(idtype: libc::idtype_t, id: libc::id_t, block: bool) -> io::Result<bool> {
    // SAFETY: zeroed siginfo is a valid out-parameter.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: a pid or pidfd the caller owns, and a valid out-parameter.
        let r = unsafe { libc::waitid(idtype, id, &mut info, flags) };
        if r == 0 {
            // With WNOHANG and no state change, si_pid stays 0.
            // SAFETY: reading the pid field of a filled siginfo.
            return Ok(block || unsafe { info.si_pid() } != 0);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(true),
            _ => return Err(e),
        }
    }
}

/// Send a signal to `pid`, a child of this process that it has not reaped
/// yet: until it is reaped its pid stays taken (a zombie keeps it), so the
/// pid names exactly this process, without a pidfd to hold open per child.
/// This relies on nothing in the process reaping children it did not
/// start (`wait(-1)`); std and tokio wait for their own pids only.
pub fn kill_child(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain kill(2); see above for why the pid is ours.
    if unsafe { libc::kill(pid, sig) } < 0 {
        let e = io::Error::last_os_error();
        // ESRCH: already reaped, which is what we wanted.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Reap the child `pid`; `block` waits for it to exit. Returns true once
/// reaped (or already gone).
pub fn reap_child(pid: i32, block: bool) -> io::Result<bool> {
    reap(libc::P_PID, pid as libc::id_t, block)
}

/// Start time of a process in clock ticks since boot (field 22 of
/// /proc/PID/stat), used with the pid to identify a process across time.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}
