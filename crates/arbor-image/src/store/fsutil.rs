//! File operations the store needs: atomic small-file writes, unique
//! scratch names, on-disk size, and a metadata-preserving tree copy.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;

/// A name no other writer in this or another process uses: `<stem>.<pid>.<n>`.
pub(crate) fn unique_name(stem: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{stem}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid in a [`unique_name`], if it has one.
pub(crate) fn name_pid(name: &str) -> Option<i32> {
    let mut parts = name.rsplitn(3, '.');
    parts.next()?;
    parts.next()?.parse().ok()
}

/// Whether a process with this pid exists.
pub(crate) fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

/// Write `bytes` to `path` atomically (a unique sibling, fsync, rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(unique_name(&format!(".{file_name}")));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Bytes a tree occupies on disk (allocated blocks; hard links counted once).
pub(crate) fn disk_usage(root: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let m = fs::symlink_metadata(&path)?;
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        total += m.blocks() * 512;
        if m.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(total)
}

/// Remove a directory tree or a file; one already gone is fine.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Copy the tree under `src` into the existing directory `dst`, keeping what
/// an overlay layer is made of: modes (setuid included), owners, mtimes,
/// xattrs (`trusted.overlay.*` included), hard links, symlinks, whiteouts
/// (0:0 character devices) and fifos. Other device nodes and sockets are
/// skipped, as in an unpacked layer.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut links = HashMap::new();
    copy_children(src, dst, &mut links)?;
    copy_metadata(src, dst, &fs::symlink_metadata(src)?)
}

fn copy_children(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let m = fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_dir() {
            fs::create_dir(&to)?;
            copy_children(&from, &to, links)?;
        } else {
            if m.nlink() > 1 {
                if let Some(first) = links.get(&(m.dev(), m.ino())) {
                    fs::hard_link(first, &to)?;
                    continue;
                }
                links.insert((m.dev(), m.ino()), to.clone());
            }
            if ft.is_file() {
                fs::copy(&from, &to)?;
            } else if ft.is_symlink() {
                symlink(fs::read_link(&from)?, &to)?;
            } else if ft.is_char_device() && m.rdev() == 0 {
                mknod(&to, SFlag::S_IFCHR, Mode::empty(), 0)?;
            } else if ft.is_fifo() {
                mknod(&to, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)?;
            } else {
                continue;
            }
        }
        copy_metadata(&from, &to, &m)?;
    }
    Ok(())
}

fn copy_metadata(from: &Path, to: &Path, m: &fs::Metadata) -> io::Result<()> {
    let symlink = m.file_type().is_symlink();
    std::os::unix::fs::lchown(to, Some(m.uid()), Some(m.gid()))?;
    // After chown: chown clears setuid/setgid bits.
    if !symlink {
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    for name in xattr::list(from)? {
        if let Some(value) = xattr::get(from, &name)? {
            match xattr::set(to, &name, &value) {
                // Linux allows no user.* xattrs on symlinks; nothing to keep.
                Err(e) if symlink && e.raw_os_error() == Some(libc::EPERM) => {}
                other => other?,
            }
        }
    }
    let atime = TimeSpec::new(m.atime(), m.atime_nsec());
    let mtime = TimeSpec::new(m.mtime(), m.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}
