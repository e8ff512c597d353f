//! Copying an overlay upper layer, for fork.
//!
//! An upper layer is not an ordinary tree: deletions are whiteouts (character
//! devices 0:0) and replaced directories carry the `trusted.overlay.opaque`
//! extended attribute. The copy keeps both, plus modes, owners and
//! modification times (build tools compare them). Symlinks are copied as
//! links, never followed.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Copy `src` (a directory) to `dst` (created) recursively.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    copy_entry(src, dst, &meta)
}

fn copy_entry(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_dir() {
        fs::create_dir(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            let m = entry.metadata()?;
            copy_entry(&entry.path(), &dst.join(entry.file_name()), &m)?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(src, dst)?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        let c = cpath(dst)?;
        // SAFETY: valid NUL-terminated path; mknod only creates a node.
        if unsafe { libc::mknod(c.as_ptr(), meta.mode(), meta.rdev()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        // Sockets are not copied: they only mean something to a live process.
        return Ok(());
    }
    copy_xattrs(src, dst)?;
    let c = cpath(dst)?;
    // SAFETY: valid path; lchown/utimensat do not follow the final symlink.
    unsafe {
        if libc::lchown(c.as_ptr(), meta.uid(), meta.gid()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let times = [
            libc::timespec {
                tv_sec: meta.atime(),
                tv_nsec: meta.atime_nsec(),
            },
            libc::timespec {
                tv_sec: meta.mtime(),
                tv_nsec: meta.mtime_nsec(),
            },
        ];
        if libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // chown clears set-id bits; restore the mode of regular files last.
    if ft.is_file() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    Ok(())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Copy the `trusted.overlay.*` and `user.*` attributes (the ones overlayfs
/// and programs use); others are not meaningful in a fresh layer.
fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
    let s = cpath(src)?;
    let d = cpath(dst)?;
    let mut names = vec![0u8; 4096];
    // SAFETY: buffers are valid for the lengths passed.
    let n = unsafe { libc::llistxattr(s.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) {
            Ok(())
        } else {
            Err(e)
        };
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if !(name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.")) {
            continue;
        }
        let cname =
            CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut val = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                s.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let r = unsafe {
            libc::lsetxattr(
                d.as_ptr(),
                cname.as_ptr(),
                val.as_ptr().cast(),
                len as usize,
                0,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
