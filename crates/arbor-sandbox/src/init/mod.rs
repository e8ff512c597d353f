//! The init process: PID 1 of a sandbox.
//!
//! The supervisor starts it with `clone3` in fresh mount, PID, network, UTS
//! and IPC namespaces, with the control socket on descriptor 3. It builds the
//! root filesystem, resolves the spec's user in it, reports `Ready`, then serves: each `Exec` request forks a
//! confined child; each reaped child is reported as `Exited`. It is
//! single-threaded, so forking from it is safe.
//!
//! When the control socket closes (the supervisor destroyed the sandbox or
//! died), init exits, and the kernel kills everything left in its PID
//! namespace. Nothing a sandbox runs can outlive it.

mod child;
mod copy;
mod files;
mod overlay;
mod rootfs;
mod seccomp;
mod spawner;
mod user;

pub use copy::copy_layer;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::protocol::{
    self, ExecKind, FromInit, INIT_CONTROL_FD, INIT_ENV, MAX_MESSAGE, SPAWNER_ROLE, ToInit,
};
use child::{ChildContext, ChildFds};

/// True when this process was started by the supervisor as a sandbox init.
/// Binaries that can act as init call [`run`] when this holds.
pub fn is_init_invocation() -> bool {
    std::env::var_os(INIT_ENV).is_some()
}

/// Run as a sandbox's init (or, when started in that role, as the spawner
/// that clones inits for the supervisor). Never returns.
pub fn run() -> ! {
    let role = std::env::var(INIT_ENV).unwrap_or_default();
    let served = if role == SPAWNER_ROLE {
        spawner::serve()
    } else {
        serve_sandbox()
    };
    let code = match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("arbor-sandbox-init: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn control() -> BorrowedFd<'static> {
    // SAFETY: descriptor 3 is the control socket for the life of the process;
    // the supervisor put it there before exec.
    unsafe { BorrowedFd::borrow_raw(INIT_CONTROL_FD) }
}

/// Stdin/stdout came from the supervisor; init has no use for them, and
/// holding them would keep the supervisor's pipes open. Stderr stays for
/// diagnostics.
fn stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

fn serve_sandbox() -> Result<(), String> {
    let sock = control();
    if nix::sys::stat::fstat(sock).is_err() {
        return Err(
            "no control socket on descriptor 3: this program is started by arbor, not by hand"
                .into(),
        );
    }
    // The control socket must not leak into commands: one holding it could
    // forge reports or intercept the descriptors sent to init.
    nix::fcntl::fcntl(
        sock,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("control socket: {e}"))?;
    stdio_to_null();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let cfg = match protocol::recv::<ToInit>(sock.as_raw_fd(), &mut buf) {
        Ok((ToInit::Config(cfg), _)) => cfg,
        Ok(_) => return Err("first control message was not Config".into()),
        Err(e) => return Err(format!("reading config: {e}")),
    };

    // Protect init: never the OOM killer's choice, never ptrace-able or
    // readable through /proc by the processes it runs.
    let _ = std::fs::write("/proc/self/oom_score_adj", b"-1000");
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));

    let setup = seccomp::Filters::build().and_then(|f| {
        let fd = rootfs::build(&cfg)?;
        // After the pivot: the names resolve in the sandbox's own files.
        let identity = cfg.user.as_deref().map(user::resolve).transpose()?;
        Ok((f, fd, identity))
    });
    let (filters, fs_fd, identity) = match setup {
        Ok(v) => v,
        Err(error) => {
            let _ = protocol::send(
                sock.as_raw_fd(),
                &FromInit::Failed {
                    error: error.clone(),
                },
                &[],
            );
            return Err(error);
        }
    };
    protocol::send(sock.as_raw_fd(), &FromInit::Ready { fs_fd }, &[]).map_err(|e| e.to_string())?;
    let mut env = cfg.env.clone();
    if let Some(id) = identity.as_ref().filter(|_| cfg.home_from_passwd) {
        env.push(("HOME".into(), id.home.clone()));
    }
    let ctx = ChildContext {
        filters: &filters,
        base_env: &env,
        workdir: &cfg.workdir,
        nofile: cfg.nofile,
        identity: identity.as_ref(),
    };
    serve(&ctx, &mut buf)
}

fn serve(ctx: &ChildContext, buf: &mut [u8]) -> Result<(), String> {
    let sock = control();
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(|e| e.to_string())?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| e.to_string())?;
    // Children we were asked to start, by pid; orphans adopted by init are
    // reaped but not reported.
    let mut running: HashMap<Pid, u64> = HashMap::new();
    loop {
        let (sock_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(sock, PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap(&mut running)?;
        }
        if sock_ready {
            match protocol::recv::<ToInit>(sock.as_raw_fd(), buf) {
                Ok((
                    ToInit::Exec {
                        id,
                        kind,
                        stdin,
                        cgroup_fds,
                    },
                    fds,
                )) => match start(kind, fds, stdin, cgroup_fds, ctx) {
                    Ok(pid) => {
                        running.insert(pid, id);
                    }
                    Err(error) => {
                        protocol::send(sock.as_raw_fd(), &FromInit::SpawnFailed { id, error }, &[])
                            .map_err(|e| e.to_string())?;
                    }
                },
                Ok((ToInit::Config(_), _)) => return Err("unexpected second Config".into()),
                // The supervisor is gone: returning ends init and, with it,
                // every process of the sandbox.
                Err(protocol::ProtocolError::Closed) => return Ok(()),
                Err(protocol::ProtocolError::Io(nix::errno::Errno::EINTR)) => {}
                Err(e) => return Err(format!("control socket: {e}")),
            }
        }
    }
}

fn start(
    kind: ExecKind,
    fds: Vec<OwnedFd>,
    has_stdin: bool,
    cgroup_fds: usize,
    ctx: &ChildContext,
) -> Result<Pid, String> {
    let want = 2 + usize::from(has_stdin) + cgroup_fds;
    if fds.len() != want {
        return Err(format!("expected {want} descriptors, got {}", fds.len()));
    }
    let mut it = fds.into_iter();
    let (Some(stdout), Some(stderr)) = (it.next(), it.next()) else {
        return Err("missing output descriptors".into());
    };
    let stdin = if has_stdin { it.next() } else { None };
    let child_fds = ChildFds {
        stdout,
        stderr,
        stdin,
        cgroups: it.collect(),
    };
    // SAFETY: init is single-threaded, so the child is a complete copy.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => child::run(kind, child_fds, ctx),
        Ok(ForkResult::Parent { child }) => Ok(child),
        Err(e) => Err(format!("fork: {e}")),
    }
}

fn reap(running: &mut HashMap<Pid, u64>) -> Result<(), String> {
    let sock = control();
    loop {
        let (pid, code, signal) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, code, None),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32, Some(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return Ok(()),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waitpid: {e}")),
        };
        if let Some(id) = running.remove(&pid) {
            protocol::send(
                sock.as_raw_fd(),
                &FromInit::Exited { id, code, signal },
                &[],
            )
            .map_err(|e| e.to_string())?;
        }
    }
}
