//! Copying an overlay upper layer: for fork (inside the new sandbox's init)
//! and, through [`copy_layer`], for capturing a sandbox's writable layer as
//! an image layer.
//!
//! An upper layer is not an ordinary tree: deletions are whiteouts (character
//! devices 0:0) and replaced directories carry the `trusted.overlay.opaque`
//! extended attribute. The copy keeps both, plus modes, owners, modification
//! times (build tools compare them), hard links (two names of one inode stay
//! one file linked twice: package managers install them, and copying them
//! apart would double their size) and file capabilities
//! (`security.capability`, e.g. ping's). Symlinks are copied as links, never
//! followed.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Copy the overlay layer `src` (a directory) to `dst` (created, with its
/// missing parents; it must not exist) recursively, keeping whiteouts,
/// opaque markers, modes, owners, times, hard links, `user.*` attributes and
/// `security.capability`. Other `trusted.overlay.*` attributes are dropped:
/// they describe `src`'s own mount (origins, inode indexes), not content.
/// Needs the privileges to create device nodes and set `trusted.*`
/// attributes (root).
pub fn copy_layer(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    Copier::default().entry(src, dst, &meta)
}

/// State of one copy: where each multiply-linked inode was first copied.
#[derive(Default)]
struct Copier {
    links: HashMap<(u64, u64), PathBuf>,
}

impl Copier {
    fn entry(&mut self, src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let ft = meta.file_type();
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                // The first copy already carries owner, mode, times, xattrs.
                return fs::hard_link(first, dst);
            }
            self.links.insert(key, dst.to_path_buf());
        }
        if ft.is_dir() {
            fs::create_dir(dst)?;
            for entry in fs::read_dir(src)? {
                let entry = entry?;
                let m = entry.metadata()?;
                self.entry(&entry.path(), &dst.join(entry.file_name()), &m)?;
            }
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
        finish(src, dst, meta)
    }
}

/// Owner, attributes, mode and times of a freshly created `dst`, in the
/// order that keeps each: chown clears set-id bits and file capabilities,
/// so those are set after it; times last, since every change touches them.
fn finish(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let c = cpath(dst)?;
    // SAFETY: valid path; lchown does not follow the final symlink.
    if unsafe { libc::lchown(c.as_ptr(), meta.uid(), meta.gid()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    copy_xattrs(src, dst)?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
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
    // SAFETY: valid path and a two-element times array; no symlink followed.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Whether an extended attribute is layer content worth copying.
fn keep_xattr(name: &[u8]) -> bool {
    name == b"trusted.overlay.opaque"
        || name == b"security.capability"
        || name.starts_with(b"user.")
}

/// Names of `path`'s extended attributes (none where unsupported).
fn list_xattrs(path: &CString) -> io::Result<Vec<u8>> {
    let mut names = vec![0u8; 4096];
    loop {
        // SAFETY: the buffer is valid for the length passed.
        let n = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            names.truncate(n as usize);
            return Ok(names);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) if names.len() < 1 << 20 => names.resize(names.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// Copy the attributes [`keep_xattr`] accepts.
fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
    let s = cpath(src)?;
    let d = cpath(dst)?;
    let names = list_xattrs(&s)?;
    let mut val = vec![0u8; 65536];
    for name in names.split(|b| *b == 0).filter(|n| keep_xattr(n)) {
        let cname =
            CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // SAFETY: buffers are valid for the lengths passed.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_content_attributes_only() {
        assert!(keep_xattr(b"trusted.overlay.opaque"));
        assert!(keep_xattr(b"security.capability"));
        assert!(keep_xattr(b"user.mime_type"));
        assert!(!keep_xattr(b"trusted.overlay.origin"));
        assert!(!keep_xattr(b"trusted.overlay.impure"));
        assert!(!keep_xattr(b"security.selinux"));
    }

    #[test]
    fn hard_links_stay_linked() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("a"), b"same").unwrap();
        fs::hard_link(src.join("a"), src.join("d/b")).unwrap();
        fs::write(src.join("c"), b"other").unwrap();
        let dst = tmp.path().join("out/dst");
        copy_layer(&src, &dst).unwrap();
        let (a, b) = (
            fs::metadata(dst.join("a")).unwrap(),
            fs::metadata(dst.join("d/b")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 2);
        assert_eq!(fs::read(dst.join("d/b")).unwrap(), b"same");
        assert_eq!(fs::metadata(dst.join("c")).unwrap().nlink(), 1);
    }
}
