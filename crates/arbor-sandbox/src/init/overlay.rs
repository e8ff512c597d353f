//! Mounting an overlayfs from lower directories, an upper and a work directory.
//!
//! The classic `mount(2)` takes every option in one string of at most one
//! page (4 KiB) and cannot name paths containing `,` or `:`. That is enough
//! for the default root (two short lower layers) and stays the path used
//! whenever it fits, so ordinary sandboxes start with the same system calls.
//! An image of many layers with long cache paths does not fit: it is mounted
//! through the new mount API instead, one `lowerdir+` parameter per layer
//! (Linux >= 6.8), then `fsmount` and `move_mount` onto the target.

use std::os::fd::AsFd;
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
    let what = |step: &str| {
        let n = lower.len();
        let target = target.display().to_string();
        let step = step.to_string();
        move |e: rustix::io::Errno| format!("overlay of {n} layers on {target}: {step}: {e}")
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(what("fsopen"))?;
    for (i, dir) in lower.iter().enumerate() {
        fsconfig_set_string(fs.as_fd(), "lowerdir+", dir).map_err(|e| {
            if i == 0 && e == rustix::io::Errno::INVAL {
                format!(
                    "the image has too many layers for this kernel: its {} lower \
                     directories do not fit in one mount option string, and this kernel's \
                     overlayfs lacks the 'lowerdir+' parameter (Linux >= 6.8) to add them \
                     one by one",
                    lower.len()
                )
            } else {
                format!("overlay layer {}: {e}", dir.display())
            }
        })?;
    }
    fsconfig_set_string(fs.as_fd(), "upperdir", upper).map_err(what("upperdir"))?;
    fsconfig_set_string(fs.as_fd(), "workdir", work).map_err(what("workdir"))?;
    fsconfig_create(fs.as_fd()).map_err(what("create"))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )
    .map_err(what("fsmount"))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(what("move_mount"))
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
