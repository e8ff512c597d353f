//! Building the sandbox's filesystem, from inside its fresh mount namespace.
//!
//! Layout of the private tmpfs (mounted on `InitConfig::private_dir`, visible
//! only in this namespace; its size is the workspace limit):
//!
//! ```text
//! upper/            overlay upper layer of the root (every write lands here)
//! work/             overlay work directory
//! root/             the merged root, later pivoted into
//! binds/N/upper     upper layer of copy-on-write bind N
//! binds/N/work
//! dev/              bound on the sandbox's /dev
//! shm/              bound on the sandbox's /dev/shm
//! ```
//!
//! `/dev` and `/dev/shm` are directories of this tmpfs, not tmpfs mounts of
//! their own: every superblock takes a shrinker slot that the kernel sizes into
//! every memory cgroup, so kernel memory grows with live sandboxes times
//! superblocks, and these two need nothing a directory cannot give.
//!
//! Everything below happens before `pivot_root`, with full privileges; the
//! processes the sandbox later runs have none of them.

use std::ffi::CString;
use std::fs;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root, sethostname};

use super::copy::copy_layer;
use super::overlay::mount_overlay;
use crate::protocol::InitConfig;
use crate::spec::BindMode;

type Result<T> = std::result::Result<T, String>;

/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// `/proc` entries made read-only (kernel-wide knobs that are not namespaced).
const PROC_READONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// `/proc` files hidden behind `/dev/null` (kernel memory and timing leaks).
const PROC_MASKED: [&str; 6] = [
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "kmsg",
];

fn ctx<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Build the root filesystem and pivot into it. Returns a close-on-exec
/// `O_PATH` descriptor of the private tmpfs root, kept so the supervisor can
/// copy this sandbox's writable layers when forking.
pub fn build(cfg: &InitConfig) -> Result<RawFd> {
    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(ctx("make mounts private"))?;

    let private = cfg.private_dir.as_path();
    let size = format!("size={},mode=0755", cfg.workspace_bytes);
    mount(
        Some("tmpfs"),
        private,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(size.as_str()),
    )
    .map_err(ctx(format_args!(
        "mount private tmpfs on {}",
        private.display()
    )))?;
    let upper = private.join("upper");
    let work = private.join("work");
    let root = private.join("root");
    for d in [&work, &root] {
        fs::create_dir(d).map_err(ctx(format_args!("create {}", d.display())))?;
    }

    if let Some(src) = &cfg.fork_from {
        // A fork starts from the parent's writable layers, copied; the lower
        // layers are shared read-only, so the cost is what the parent changed.
        copy_layer(&src.join("upper"), &upper).map_err(ctx("copy parent's writable layer"))?;
        let binds = src.join("binds");
        if binds.exists() {
            for entry in fs::read_dir(&binds).map_err(ctx("read parent's binds"))? {
                let entry = entry.map_err(ctx("read parent's binds"))?;
                let dst = private.join("binds").join(entry.file_name()).join("upper");
                copy_layer(&entry.path().join("upper"), &dst)
                    .map_err(ctx("copy parent's bind layer"))?;
            }
        }
    } else {
        fs::create_dir(&upper).map_err(ctx("create upper"))?;
    }

    mount_overlay(&cfg.lower, &upper, &work, &root)?;
    // Make the root itself a mount point we can pivot into (it already is).

    let workdir = inside(&root, &cfg.workdir)?;
    mkdir_p(&workdir, 0o755)?;

    for (i, bind) in cfg.binds.iter().enumerate() {
        let target = inside(&root, &bind.target)?;
        let meta = fs::metadata(&bind.source)
            .map_err(ctx(format_args!("bind source {}", bind.source.display())))?;
        if meta.is_dir() {
            mkdir_p(&target, 0o755)?;
        } else {
            if let Some(parent) = target.parent() {
                mkdir_p(parent, 0o755)?;
            }
            if !target.exists() {
                fs::File::create(&target)
                    .map_err(ctx(format_args!("create {}", target.display())))?;
            }
        }
        match bind.mode {
            BindMode::ReadOnly => bind_readonly(&bind.source, &target)?,
            BindMode::CopyOnWrite => {
                if !meta.is_dir() {
                    return Err(format!(
                        "copy-on-write bind {} must be a directory",
                        bind.source.display()
                    ));
                }
                let layer = private.join("binds").join(i.to_string());
                let (u, w) = (layer.join("upper"), layer.join("work"));
                mkdir_p(&u, 0o755)?;
                mkdir_p(&w, 0o755)?;
                mount_overlay(std::slice::from_ref(&bind.source), &u, &w, &target)?;
            }
        }
    }

    build_dev(&root, private)?;
    build_proc(&root)?;
    let tmp = root.join("tmp");
    mkdir_p(&tmp, 0o1777)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(ctx("chmod /tmp"))?;

    sethostname(&cfg.hostname).map_err(ctx("sethostname"))?;
    // With the host's network there is no namespace of our own to set up.
    if !cfg.host_network {
        loopback_up().map_err(ctx("bring loopback up"))?;
    }

    let fs_fd = open(
        private,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx("open private tmpfs"))?
    .into_raw_fd();

    // pivot_root(".", ".") stacks the old root on top of the new one; a lazy
    // unmount then drops it (and every host mount with it) from this namespace.
    chdir(&root).map_err(ctx("chdir new root"))?;
    pivot_root(".", ".").map_err(ctx("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(ctx("detach old root"))?;
    chdir("/").map_err(ctx("chdir /"))?;
    Ok(fs_fd)
}

/// Resolve a sandbox path under the new root, refusing `..` tricks.
fn inside(root: &Path, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("sandbox path {path:?} must be absolute"));
    }
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::RootDir => {}
            _ => {
                return Err(format!(
                    "sandbox path {path:?} must not contain '.' or '..'"
                ));
            }
        }
    }
    Ok(out)
}

fn mkdir_p(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(ctx(format_args!("create {}", path.display())))
}

fn bind_readonly(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(ctx(format_args!("bind {}", source.display())))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(ctx(format_args!("make {} read-only", target.display())))
}

/// A minimal `/dev`: a few character devices, a private devpts and shm.
fn build_dev(root: &Path, private: &Path) -> Result<()> {
    let dev = root.join("dev");
    mkdir_p(&dev, 0o755)?;
    bind_private_dir(&private.join("dev"), &dev, 0o755, MsFlags::MS_NOEXEC)?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let node = dev.join(name);
        fs::File::create(&node).map_err(ctx(format_args!("create /dev/{name}")))?;
        mount(
            Some(&host),
            &node,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(ctx(format_args!("bind /dev/{name}")))?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts, 0o755)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(ctx("mount /dev/pts"))?;
    let shm = dev.join("shm");
    mkdir_p(&shm, 0o1777)?;
    bind_private_dir(&private.join("shm"), &shm, 0o1777, MsFlags::empty())?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link))
            .map_err(ctx(format_args!("link /dev/{link}")))?;
    }
    Ok(())
}

/// Bind a fresh directory of the private tmpfs on `target`, `nosuid` and
/// `nodev` (the tmpfs's own flags) plus `extra`.
fn bind_private_dir(source: &Path, target: &Path, mode: u32, extra: MsFlags) -> Result<()> {
    mkdir_p(source, mode)?;
    // The umask may have cut the mode (1777 for shm).
    fs::set_permissions(source, fs::Permissions::from_mode(mode))
        .map_err(ctx(format_args!("chmod {}", source.display())))?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(ctx(format_args!("bind {}", target.display())))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra,
        None::<&str>,
    )
    .map_err(ctx(format_args!("set flags of {}", target.display())))
}

/// A private `/proc` (this PID namespace only) with kernel-wide knobs read-only.
fn build_proc(root: &Path) -> Result<()> {
    let proc_dir = root.join("proc");
    mkdir_p(&proc_dir, 0o555)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(ctx("mount /proc"))?;
    for name in PROC_READONLY {
        let p = proc_dir.join(name);
        if p.exists() {
            bind_readonly(&p, &p)?;
        }
    }
    for name in PROC_MASKED {
        let p = proc_dir.join(name);
        if p.is_file() {
            mount(
                Some("/dev/null"),
                &p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(ctx(format_args!("mask /proc/{name}")))?;
        }
    }
    Ok(())
}

/// Set IFF_UP on `lo` in this (new) network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized ifreq; the
    // socket is closed on every path.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        let name = CString::new("lo").unwrap_or_default();
        for (i, b) in name.as_bytes_with_nul().iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut res = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if res == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            res = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if res < 0 { Err(err) } else { Ok(()) }
    }
}
