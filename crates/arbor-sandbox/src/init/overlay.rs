//! Mounting an overlayfs from lower directories, an upper and a work directory.
//!
//! The classic `mount(2)` takes every option in one string of at most one
//! page (4 KiB) and cannot name paths containing `,` or `:`. That is enough
//! for the default root (two short lower layers) and stays the path used
//! whenever it fits, so ordinary sandboxes start with the same system calls.
//! An image of many layers with long cache paths does not fit: it is mounted
//! through the new mount API instead, one `lowerdir+` parameter per layer
//! (Linux >= 6.8), then `fsmount` and `move_mount` onto the target.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
    fsconfig_set_string, fsmount, fsopen, move_mount,
};

type Result<T> = std::result::Result<T, String>;

/// Largest option string the classic mount call passes whole (one page,
/// including the terminating NUL).
const MAX_LEGACY_OPTIONS: usize = 4095;

/// Mount an overlay of `lower` (uppermost first) with `upper` and `work` on `target`.
pub fn mount_overlay(lower: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<()> {
    match legacy_options(lower, upper, work) {
        Some(opts) => mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| format!("mount overlay on {} ({opts}): {e}", target.display())),
        None => mount_with_fsconfig(lower, upper, work, target),
    }
}

/// The classic option string, or `None` when some path cannot be written in
/// it or the whole does not fit in one page.
fn legacy_options(lower: &[PathBuf], upper: &Path, work: &Path) -> Option<String> {
    let lowers = lower.iter().map(|p| plain(p)).collect::<Option<Vec<_>>>()?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        plain(upper)?,
        plain(work)?
    );
    (opts.len() <= MAX_LEGACY_OPTIONS).then_some(opts)
}

/// `p` as text the classic option string can hold (no separators or escapes).
fn plain(p: &Path) -> Option<&str> {
    p.to_str().filter(|s| !s.contains([',', ':', '\\']))
}

/// Build the overlay with `fsopen`/`fsconfig`, one `lowerdir+` per layer.
fn mount_with_fsconfig(lower: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<()> {
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| format!("overlay on {}: fsopen: {e}", target.display()))?;
    // Every failure below names the step and adds the kernel's own reason.
    let fail = |step: String, e: rustix::io::Errno| {
        format!(
            "overlay of {} layers on {}: {step}: {e}{}",
            lower.len(),
            target.display(),
            kernel_log(&fs)
        )
    };
    for dir in lower {
        fsconfig_set_string(fs.as_fd(), "lowerdir+", dir).map_err(|e| {
            if e == rustix::io::Errno::INVAL {
                fail(
                    format!(
                        "the image has too many layers for this kernel: its lower directories \
                         do not fit in one mount option string, and adding them one by one \
                         needs overlayfs's 'lowerdir+' (Linux >= 6.8); refused at {}",
                        dir.display()
                    ),
                    e,
                )
            } else {
                fail(format!("layer {}", dir.display()), e)
            }
        })?;
    }
    fsconfig_set_string(fs.as_fd(), "upperdir", upper).map_err(|e| fail("upperdir".into(), e))?;
    fsconfig_set_string(fs.as_fd(), "workdir", work).map_err(|e| fail("workdir".into(), e))?;
    fsconfig_create(fs.as_fd()).map_err(|e| fail("create".into(), e))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )
    .map_err(|e| fail("fsmount".into(), e))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| fail("move_mount".into(), e))
}

/// The messages the kernel queued on a filesystem context (read one per
/// call until none is left), as ` (kernel: a; b)`, or empty.
fn kernel_log(fs: &OwnedFd) -> String {
    let mut msgs = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 || msgs.len() >= 8 {
            break;
        }
        msgs.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    if msgs.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {})", msgs.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_plain_paths_use_the_classic_call() {
        let lower = [PathBuf::from("/a"), PathBuf::from("/b")];
        let opts = legacy_options(&lower, Path::new("/u"), Path::new("/w"));
        assert_eq!(
            opts.as_deref(),
            Some("lowerdir=/a:/b,upperdir=/u,workdir=/w")
        );
    }

    #[test]
    fn long_or_unusual_paths_need_fsconfig() {
        let long: Vec<PathBuf> = (0..60)
            .map(|i| PathBuf::from(format!("/cache/{}/{i}", "x".repeat(80))))
            .collect();
        assert!(legacy_options(&long, Path::new("/u"), Path::new("/w")).is_none());
        let colon = [PathBuf::from("/layers/sha256:abc")];
        assert!(legacy_options(&colon, Path::new("/u"), Path::new("/w")).is_none());
    }
}
