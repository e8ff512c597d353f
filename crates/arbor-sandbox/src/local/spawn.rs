//! Starting a sandbox's init in new namespaces.
//!
//! `clone3` creates the child directly in fresh mount, PID, network (unless
//! the spec shares the host's), UTS and IPC namespaces (so init is PID 1 without an extra process) and returns a
//! pidfd, which lets the supervisor wait for and signal exactly this process
//! without pid-reuse races. Between `clone3` and `execve` the child runs only
//! async-signal-safe system calls: the supervisor is multi-threaded.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use crate::protocol::{INIT_CONTROL_FD, INIT_ENV};

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

/// A started init.
pub struct Spawned {
    /// Host pid of init.
    pub pid: i32,
    /// pidfd of init.
    pub pidfd: OwnedFd,
    /// Supervisor's end of the control socket (close-on-exec).
    pub sock: OwnedFd,
}

/// Start `init_path` as PID 1 of new namespaces with the control socket on fd
/// 3. With `host_network` it stays in the host's network namespace.
pub fn spawn_init(init_path: &Path, host_network: bool) -> io::Result<Spawned> {
    let (parent, child) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let path = CString::new(init_path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let env = CString::new(format!("{INIT_ENV}=1")).map_err(io::Error::other)?;
    let argv = [c"arbor-sandbox-init".as_ptr(), std::ptr::null()];
    let envp = [env.as_ptr(), std::ptr::null()];
    let child_fd = child.as_raw_fd();

    let mut pidfd: libc::c_int = -1;
    let netns = if host_network { 0 } else { libc::CLONE_NEWNET };
    let mut args = CloneArgs {
        flags: (libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | netns
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
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
        unsafe {
            if child_fd == INIT_CONTROL_FD {
                let flags = libc::fcntl(child_fd, libc::F_GETFD);
                libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else {
                libc::dup2(child_fd, INIT_CONTROL_FD);
            }
            // Descriptors the supervisor inherited without close-on-exec
            // (a build jobserver, a parent's pipes) must not reach the sandbox.
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
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(child);
    // SAFETY: CLONE_PIDFD stored a new descriptor we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Spawned {
        pid: ret as i32,
        pidfd,
        sock: parent,
    })
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
    // SAFETY: zeroed siginfo is a valid out-parameter.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: valid pidfd and out-parameter.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                flags,
            )
        };
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

/// Start time of a process in clock ticks since boot (field 22 of
/// /proc/PID/stat), used with the pid to identify a process across time.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}
