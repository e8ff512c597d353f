//! A child of init: joins its cgroups, gives up privileges, then runs a
//! program or a built-in file operation. Runs in a freshly forked copy of the
//! single-threaded init, so ordinary Rust is safe here.
//!
//! Privilege order matters: cgroup join and `oom_score_adj` need privileges;
//! then capabilities are dropped, a command switches to the spec's user
//! (supplementary groups, gid, uid: each step needs the privilege the next
//! one gives up), `no_new_privs` is set and seccomp installed last, right
//! before `execve` (which the filter allows).

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
use nix::unistd::{dup2, execve, setsid};

use super::files;
use super::seccomp::Filters;
use super::user::Identity;
use crate::protocol::ExecKind;

/// Capabilities kept by sandboxed processes (root inside may still own and
/// chmod its files and switch users, as in a container). Everything that
/// reaches beyond the sandbox (SYS_ADMIN, MKNOD, NET_ADMIN, SYS_PTRACE,
/// SYS_MODULE, ...) is dropped from every set, including the bounding set.
const KEPT: [Capability; 11] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
];

/// What a child needs besides its request.
pub struct ChildContext<'a> {
    pub filters: &'a Filters,
    pub base_env: &'a [(String, String)],
    pub workdir: &'a str,
    pub nofile: u64,
    /// The user commands switch to; `None` keeps root.
    pub identity: Option<&'a Identity>,
}

/// The descriptors a child receives.
pub struct ChildFds {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub stdin: Option<OwnedFd>,
    pub cgroups: Vec<OwnedFd>,
}

/// Run in the forked child; never returns.
pub fn run(kind: ExecKind, fds: ChildFds, ctx: &ChildContext) -> ! {
    let code = match setup_and_run(kind, fds, ctx) {
        Ok(code) => code,
        Err(msg) => {
            let _ = writeln!(std::io::stderr(), "arbor-sandbox: {msg}");
            126
        }
    };
    // SAFETY: _exit skips atexit handlers inherited from init, which belong to it.
    unsafe { libc::_exit(code) }
}

fn setup_and_run(kind: ExecKind, fds: ChildFds, ctx: &ChildContext) -> Result<i32, String> {
    // Join the per-command cgroup first, so even a failing setup is accounted
    // and a timeout kill finds every descendant.
    for cg in &fds.cgroups {
        nix::unistd::write(cg, b"0").map_err(|e| format!("join cgroup: {e}"))?;
    }
    drop(fds.cgroups);

    let mut stdin_fd = fds.stdin;
    if stdin_fd.is_none() {
        stdin_fd = Some(
            std::fs::File::open("/dev/null")
                .map_err(|e| format!("open /dev/null: {e}"))?
                .into(),
        );
    }
    if let Some(stdin) = &stdin_fd {
        let mut target = unsafe_fd(0);
        dup2(stdin, &mut target).map_err(|e| format!("dup2 stdin: {e}"))?;
        std::mem::forget(target);
    }
    let mut out = unsafe_fd(1);
    dup2(&fds.stdout, &mut out).map_err(|e| format!("dup2 stdout: {e}"))?;
    std::mem::forget(out);
    let mut err = unsafe_fd(2);
    dup2(&fds.stderr, &mut err).map_err(|e| format!("dup2 stderr: {e}"))?;
    std::mem::forget(err);
    drop(stdin_fd);
    drop(fds.stdout);
    drop(fds.stderr);

    // init blocks SIGCHLD (it reads a signalfd) and the Rust runtime ignores
    // SIGPIPE; neither may leak into the command.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("sigmask: {e}"))?;
    // SAFETY: restoring the default disposition has no handler to be unsafe about.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map_err(|e| format!("SIGPIPE: {e}"))?;
    setsid().map_err(|e| format!("setsid: {e}"))?;
    // init is protected from the OOM killer; commands are fair game.
    std::fs::write("/proc/self/oom_score_adj", b"0").map_err(|e| format!("oom_score_adj: {e}"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("rlimit core: {e}"))?;
    // Raising the hard limit needs CAP_SYS_RESOURCE, which the host may not
    // grant even to root; never ask for more than the current hard limit.
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("rlimit nofile: {e}"))?;
    let nofile = ctx.nofile.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile)
        .map_err(|e| format!("rlimit nofile: {e}"))?;

    match kind {
        ExecKind::Command { argv, env, cwd } => {
            let cwd = cwd.as_deref().unwrap_or(ctx.workdir);
            std::env::set_current_dir(cwd).map_err(|e| format!("working directory {cwd}: {e}"))?;
            let mut full_env: Vec<(String, String)> = ctx.base_env.to_vec();
            for (k, v) in env {
                full_env.retain(|(key, _)| key != &k);
                full_env.push((k, v));
            }
            let program = argv.first().ok_or("empty command")?;
            let path_var = full_env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_str())
                .unwrap_or("/usr/local/bin:/usr/bin:/bin");
            let resolved = resolve(program, path_var);
            let cargv = to_cstrings(argv.iter().map(|s| s.as_bytes()))?;
            let cenv = to_cstrings(
                full_env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}").into_bytes()),
            )?;
            drop_privileges(ctx.filters, ctx.identity)?;
            let Some(path) = resolved else {
                let _ = writeln!(std::io::stderr(), "{program}: command not found");
                return Ok(127);
            };
            let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            let e = execve(&cpath, &cargv, &cenv).err();
            let _ = writeln!(
                std::io::stderr(),
                "{program}: {}",
                e.map(|e| e.desc()).unwrap_or("exec failed")
            );
            Ok(if e == Some(nix::errno::Errno::ENOENT) {
                127
            } else {
                126
            })
        }
        other => {
            std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
            // File operations act on untrusted paths (an agent may have planted
            // symlinks), so they run as confined as commands do, but as
            // root: the task layer places files anywhere, whatever the user.
            drop_privileges(ctx.filters, None)?;
            Ok(match files::run(other) {
                Ok(()) => 0,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "{e}");
                    1
                }
            })
        }
    }
}

/// A descriptor number we are about to overwrite with dup2; never closed here.
fn unsafe_fd(n: i32) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: 0/1/2 are open (inherited from init's /dev/null or the caller);
    // the OwnedFd is forgotten after dup2 so it never closes them twice.
    unsafe { OwnedFd::from_raw_fd(n) }
}

fn to_cstrings<I, B>(items: I) -> Result<Vec<CString>, String>
where
    I: IntoIterator<Item = B>,
    B: Into<Vec<u8>>,
{
    items
        .into_iter()
        .map(|b| {
            CString::new(b).map_err(|_| "argument or environment contains a NUL byte".to_string())
        })
        .collect()
}

/// `PATH` lookup against the command's own environment (init's is empty).
fn resolve(program: &str, path_var: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path.
    let ok = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
    ok && p.is_file()
}

fn drop_privileges(filters: &Filters, identity: Option<&Identity>) -> Result<(), String> {
    let kept: HashSet<Capability> = KEPT.into_iter().collect();
    for cap in caps::all() {
        if !kept.contains(&cap) {
            // Unknown-to-kernel capabilities fail with EINVAL; nothing to drop.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient caps: {e}"))?;
    caps::set(None, CapSet::Inheritable, &kept).map_err(|e| format!("inheritable caps: {e}"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(|e| format!("effective caps: {e}"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| format!("permitted caps: {e}"))?;
    if let Some(id) = identity {
        switch_user(id)?;
    }
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    filters.apply().map_err(|e| format!("seccomp: {e}"))
}

/// Become `id`: supplementary groups, then gid, then uid (real, effective
/// and saved, so there is no way back). Leaving uid 0 makes the kernel clear
/// the permitted and effective capability sets; they and the inheritable
/// set are cleared explicitly as well, so a non-root user holds none.
fn switch_user(id: &Identity) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(|e| format!("setgroups {:?}: {e}", id.groups))?;
    let gid = Gid::from_raw(id.gid);
    setresgid(gid, gid, gid).map_err(|e| format!("setgid {}: {e}", id.gid))?;
    let uid = Uid::from_raw(id.uid);
    setresuid(uid, uid, uid).map_err(|e| format!("setuid {}: {e}", id.uid))?;
    if id.uid != 0 {
        for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
            caps::clear(None, set).map_err(|e| format!("clear {set:?} caps: {e}"))?;
        }
    }
    Ok(())
}
