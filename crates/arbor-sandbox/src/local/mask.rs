//! The default root filesystem: the host's `/`, seen through a mask layer.
//!
//! The sandbox root is an overlay with lower layers `mask:/`. The mask turns
//! the host root into an allow-list: every top-level entry that is not a
//! system directory becomes a whiteout (invisible), the directories a
//! sandbox needs fresh (`/tmp`, `/root`, `/home`, `/var`, ...) become empty
//! opaque directories, and secrets under `/etc` (shadow files, host keys)
//! are whited out. Nothing is copied, so building the view costs a few
//! `mknod`s once per host-root layout, and each sandbox mounts it in O(1).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Host top-level directories visible (read-only) in the default rootfs.
pub const ALLOWED: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];

/// Directories that exist but start empty and private in every sandbox.
const FRESH: &[(&str, u32)] = &[
    ("tmp", 0o1777),
    ("root", 0o700),
    ("home", 0o755),
    ("workspace", 0o755),
    ("var", 0o755),
    ("run", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("mnt", 0o755),
    ("opt", 0o755),
];

/// Files under `/etc` hidden from sandboxes.
const ETC_SECRETS: &[&str] = &[
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "ssl/private",
    "security/opasswd",
    "sudoers",
    "sudoers.d",
];

/// Build (or reuse) the mask for the current host root under `state_root`.
/// Returns its path. The name encodes the host root's entries, so a changed
/// host layout gets a fresh mask.
pub fn ensure_mask(state_root: &Path) -> io::Result<PathBuf> {
    let mut names: Vec<String> = fs::read_dir("/")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut secrets: Vec<String> = ETC_SECRETS.iter().map(|s| s.to_string()).collect();
    if let Ok(ssh) = fs::read_dir("/etc/ssh") {
        for e in ssh.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ssh_host_") && !n.ends_with(".pub") {
                secrets.push(format!("ssh/{n}"));
            }
        }
    }
    let key = fnv(names.iter().chain(secrets.iter()));
    let dir = state_root.join(format!("mask-{key:016x}"));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = state_root.join(format!("mask-{key:016x}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp)?;
    for name in &names {
        if ALLOWED.contains(&name.as_str()) || FRESH.iter().any(|(f, _)| f == name) {
            continue;
        }
        whiteout(&tmp.join(name))?;
    }
    for (name, mode) in FRESH {
        let p = tmp.join(name);
        fs::DirBuilder::new().mode(*mode).create(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
        opaque(&p)?;
    }
    let var_tmp = tmp.join("var/tmp");
    fs::create_dir(&var_tmp)?;
    fs::set_permissions(&var_tmp, fs::Permissions::from_mode(0o1777))?;
    for s in &secrets {
        let p = tmp.join("etc").join(s);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        whiteout(&p)?;
    }
    // Directories created for /etc must not be empty-opaque: only the named
    // entries are hidden, the rest of /etc shows through.
    fs::write(tmp.join(".complete"), b"")?;
    match fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another supervisor built the same mask concurrently.
        Err(_) if dir.join(".complete").exists() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

fn fnv<'a>(items: impl Iterator<Item = &'a String>) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for s in items {
        for b in s.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// An overlay whiteout: a 0:0 character device.
fn whiteout(p: &Path) -> io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: valid path; creates a device node (needs CAP_MKNOD).
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mark a directory opaque: lower layers' contents are hidden below it.
fn opaque(p: &Path) -> io::Result<()> {
    let c = cpath(p)?;
    let name = c"trusted.overlay.opaque";
    // SAFETY: valid path and attribute name; value is one byte.
    if unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
