//! Unpacking one layer blob into a directory in overlayfs's format, refusing
//! every entry that would land outside it.
//!
//! The `tar` crate reads the entries and writes file content, modes,
//! ownership, mtimes and xattrs; every path is validated here first: no `..`,
//! no absolute path, no parent component that is a symlink (checked with
//! `lstat`, never followed), hard-link targets under the same rules. OCI
//! whiteouts become what overlayfs reads: `.wh.NAME` a 0:0 character device
//! `NAME`, `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its
//! directory. Device nodes are skipped (a layer must not hand a sandbox a
//! device); fifos are kept.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;
use tar::{Entry, EntryType};

use crate::digest::{Digest, HashingReader};
use crate::error::{ImageError, Result};

/// The overlayfs xattr marking a directory opaque (it hides lower layers).
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// xattrs a layer may not set: overlayfs would act on them (redirects,
/// metacopy), and only whiteout conversion above writes overlay metadata.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// tar + gzip (possibly multi-member).
    Gzip,
}

impl Compression {
    /// From an OCI or Docker layer media type.
    pub fn from_media_type(media_type: &str) -> Result<Compression> {
        let mt = media_type.trim();
        if mt.contains("zstd") {
            return Err(ImageError::Invalid(format!(
                "layer media type {mt}: zstd-compressed layers are not supported (re-push the image with gzip layers)"
            )));
        }
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") || mt == "application/gzip" {
            Ok(Compression::Gzip)
        } else if mt.ends_with(".tar") || mt.ends_with("/tar") || mt == "application/x-tar" {
            Ok(Compression::None)
        } else {
            Err(ImageError::Invalid(format!(
                "unsupported layer media type {mt:?}"
            )))
        }
    }

    /// From a blob's first bytes (archives do not always say): gzip's magic, else tar.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else {
            Compression::None
        }
    }
}

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (files, directories, links, whiteouts).
    pub entries: u64,
    /// Device nodes skipped.
    pub skipped_devices: u64,
}

/// Unpack `blob` into the existing empty directory `dest`, verifying the
/// blob's digest (when given) and that the uncompressed stream hashes to
/// `diff_id`. On error `dest` holds a partial layer: the caller discards it.
pub fn unpack_blob(
    blob: &mut dyn Read,
    compression: Compression,
    blob_digest: Option<&Digest>,
    diff_id: &Digest,
    dest: &Path,
) -> Result<UnpackStats> {
    let mut blob_hash = HashingReader::new(blob);
    let stats;
    {
        let stream: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(&mut blob_hash),
            Compression::Gzip => Box::new(MultiGzDecoder::new(&mut blob_hash)),
        };
        let mut diff_hash = HashingReader::new(stream);
        stats = unpack_tar(&mut diff_hash, dest)?;
        let actual = diff_hash
            .drain_and_finish()
            .map_err(|e| stream_error("layer stream", e))?;
        diff_id.verify(&actual, "uncompressed layer (diff_id)")?;
    }
    if let Some(expected) = blob_digest {
        let actual = blob_hash
            .drain_and_finish()
            .map_err(|e| stream_error("layer blob", e))?;
        expected.verify(&actual, "layer blob")?;
    }
    Ok(stats)
}

/// Unpack the tar stream `reader` into `dest` (see the module doc).
pub fn unpack_tar(reader: impl Read, dest: &Path) -> Result<UnpackStats> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut stats = UnpackStats::default();
    let mut dir_times = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| stream_error("layer tar", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| stream_error("layer tar", e))?;
        if entry.header().entry_type() == EntryType::Directory
            && let Ok(mtime) = entry.header().mtime()
        {
            dir_times.push((entry.path_bytes().into_owned(), mtime));
        }
        unpack_entry(&mut entry, dest, &mut stats)?;
    }
    // Directory mtimes last: creating their children changed them.
    for (raw, mtime) in dir_times.iter().rev() {
        let dir = dest.join(clean_path(raw, "")?);
        let time = TimeSpec::new(*mtime as i64, 0);
        match utimensat(
            AT_FDCWD,
            &dir,
            &time,
            &time,
            UtimensatFlags::NoFollowSymlink,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(ImageError::io(
                    format!("set mtime of {}", dir.display()),
                    e.into(),
                ));
            }
        }
    }
    // Read the end-of-archive blocks and padding too, so the caller's hash
    // covers the whole stream.
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| stream_error("layer tar", e))?;
    Ok(stats)
}

fn unpack_entry<R: Read>(
    entry: &mut Entry<'_, R>,
    dest: &Path,
    stats: &mut UnpackStats,
) -> Result<()> {
    let raw = entry.path_bytes().into_owned();
    let name = String::from_utf8_lossy(&raw).into_owned();
    let rel = clean_path(&raw, &name)?;
    let kind = entry.header().entry_type();
    if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
        return Ok(());
    }
    if rel.as_os_str().is_empty() {
        // The layer root: only its mode and owner are taken.
        if kind == EntryType::Directory {
            entry.unpack(dest).map_err(|e| write_error(&name, e))?;
        }
        return Ok(());
    }
    ensure_parents(dest, &rel, &name)?;
    let file_name = rel.file_name().unwrap_or_default().as_bytes();
    if file_name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
        return whiteout(dest, &rel, &name, stats);
    }
    let target = dest.join(&rel);
    match kind {
        EntryType::Char | EntryType::Block => {
            tracing::debug!(entry = %name, "skipping a device node in a layer");
            stats.skipped_devices += 1;
            return Ok(());
        }
        EntryType::Link => hard_link(entry, dest, &target, &name)?,
        EntryType::Directory => {
            clear(&target, true, &name)?;
            let xattrs = pax_xattrs(entry, &name)?;
            entry.unpack(&target).map_err(|e| write_error(&name, e))?;
            for (key, value) in xattrs {
                xattr::set(&target, OsStr::from_bytes(&key), &value)
                    .map_err(|e| ImageError::io(format!("layer entry {name}: set xattr"), e))?;
            }
        }
        EntryType::Fifo => {
            clear(&target, false, &name)?;
            fifo(entry.header(), &target).map_err(|e| write_error(&name, e))?;
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse | EntryType::Symlink => {
            clear(&target, false, &name)?;
            let overlay_keys: Vec<Vec<u8>> = overlay_xattr_keys(entry, &name)?;
            entry.unpack(&target).map_err(|e| write_error(&name, e))?;
            for key in overlay_keys {
                let _ = xattr::remove(&target, OsStr::from_bytes(&key));
            }
        }
        other => {
            return Err(ImageError::Invalid(format!(
                "layer entry {name}: unsupported tar entry type {other:?}"
            )));
        }
    }
    stats.entries += 1;
    Ok(())
}

/// The entry's path as plain components; `..` and absolute paths refused.
fn clean_path(raw: &[u8], name: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ImageError::Invalid(format!(
                    "layer entry {name}: a `..` component would leave the layer"
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ImageError::Invalid(format!(
                    "layer entry {name}: absolute path would leave the layer"
                )));
            }
        }
    }
    Ok(out)
}

/// Make sure every parent of `rel` under `dest` is a real directory (created
/// 0755 when missing; a layer may omit them), never a symlink.
fn ensure_parents(dest: &Path, rel: &Path, name: &str) -> Result<()> {
    let mut cur = dest.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for part in parent.components() {
        cur.push(part);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ImageError::Invalid(format!(
                    "layer entry {name}: parent {} is a symlink (the entry could land outside the layer)",
                    cur.strip_prefix(dest).unwrap_or(&cur).display()
                )));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ImageError::Invalid(format!(
                    "layer entry {name}: parent {} is not a directory",
                    cur.strip_prefix(dest).unwrap_or(&cur).display()
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| write_error(name, e))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(|e| write_error(name, e))?;
            }
            Err(e) => return Err(write_error(name, e)),
        }
    }
    Ok(())
}

/// Remove what an earlier entry left at `target` (later entries win, as in
/// tar), keeping an existing directory when a directory replaces it.
fn clear(target: &Path, keep_dir: bool, name: &str) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() && keep_dir => Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(target).map_err(|e| write_error(name, e)),
        Ok(_) => fs::remove_file(target).map_err(|e| write_error(name, e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(write_error(name, e)),
    }
}

fn whiteout(dest: &Path, rel: &Path, name: &str, stats: &mut UnpackStats) -> Result<()> {
    let file_name = rel.file_name().unwrap_or_default().to_string_lossy();
    let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
    if file_name == OPAQUE_MARKER {
        xattr::set(&parent, OPAQUE_XATTR, b"y")
            .map_err(|e| ImageError::io(format!("layer entry {name}: mark directory opaque"), e))?;
    } else if file_name.starts_with(".wh..wh.") {
        return Ok(()); // aufs bookkeeping (.wh..wh.plnk, ...): nothing for overlayfs
    } else {
        let hidden = &file_name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(ImageError::Invalid(format!(
                "layer entry {name}: malformed whiteout"
            )));
        }
        let target = parent.join(hidden);
        clear(&target, false, name)?;
        mknod(
            &target,
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(|e| ImageError::io(format!("layer entry {name}: create whiteout"), e.into()))?;
    }
    stats.entries += 1;
    Ok(())
}

fn hard_link<R: Read>(entry: &Entry<'_, R>, dest: &Path, target: &Path, name: &str) -> Result<()> {
    let raw = entry
        .link_name_bytes()
        .ok_or_else(|| {
            ImageError::Invalid(format!("layer entry {name}: hard link without a target"))
        })?
        .into_owned();
    let link_name = String::from_utf8_lossy(&raw).into_owned();
    let what = format!("{name} (hard link to {link_name})");
    let rel = clean_path(&raw, &what)?;
    if rel.as_os_str().is_empty() {
        return Err(ImageError::Invalid(format!(
            "layer entry {what}: empty hard link target"
        )));
    }
    let mut cur = dest.to_path_buf();
    for part in rel.parent().unwrap_or(Path::new("")).components() {
        cur.push(part);
        let m = fs::symlink_metadata(&cur).map_err(|_| missing_target(&what))?;
        if !m.is_dir() {
            return Err(ImageError::Invalid(format!(
                "layer entry {what}: target goes through a symlink or non-directory"
            )));
        }
    }
    let source = dest.join(&rel);
    match fs::symlink_metadata(&source) {
        Ok(m) if m.is_dir() => {
            return Err(ImageError::Invalid(format!(
                "layer entry {what}: target is a directory"
            )));
        }
        Ok(_) => {}
        Err(_) => return Err(missing_target(&what)),
    }
    if source == target {
        return Ok(());
    }
    clear(target, false, name)?;
    fs::hard_link(&source, target).map_err(|e| write_error(name, e))
}

/// A fifo with the entry's mode, owner and mtime (the tar crate would write
/// a regular file).
fn fifo(header: &tar::Header, target: &Path) -> io::Result<()> {
    let mode = header.mode()? & 0o7777;
    mknod(target, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)?;
    std::os::unix::fs::lchown(
        target,
        Some(header.uid()? as u32),
        Some(header.gid()? as u32),
    )?;
    fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
    let mtime = TimeSpec::new(header.mtime()? as i64, 0);
    utimensat(
        AT_FDCWD,
        target,
        &mtime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

fn missing_target(what: &str) -> ImageError {
    ImageError::Invalid(format!(
        "layer entry {what}: target is not an earlier entry of the layer"
    ))
}

/// The entry's PAX xattrs, minus overlayfs's own.
fn pax_xattrs<R: Read>(entry: &mut Entry<'_, R>, name: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(|e| stream_error(name, e))? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| stream_error(name, e))?;
        if let Some(key) = ext.key_bytes().strip_prefix(PAX_XATTR_PREFIX)
            && !key.starts_with(OVERLAY_XATTR_PREFIX)
        {
            out.push((key.to_vec(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

/// The overlayfs xattrs a file entry carries (the tar crate sets every
/// xattr; these are removed again right after).
fn overlay_xattr_keys<R: Read>(entry: &mut Entry<'_, R>, name: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(|e| stream_error(name, e))? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| stream_error(name, e))?;
        if let Some(key) = ext.key_bytes().strip_prefix(PAX_XATTR_PREFIX)
            && key.starts_with(OVERLAY_XATTR_PREFIX)
        {
            out.push(key.to_vec());
        }
    }
    Ok(out)
}

/// A failure reading the layer: malformed or truncated data is the image's
/// fault (Invalid), anything else the host's.
fn stream_error(what: &str, e: io::Error) -> ImageError {
    match e.kind() {
        ErrorKind::InvalidData
        | ErrorKind::InvalidInput
        | ErrorKind::UnexpectedEof
        | ErrorKind::Other => ImageError::Invalid(format!("{what}: {e}")),
        _ => ImageError::io(what.to_string(), e),
    }
}

fn write_error(name: &str, e: io::Error) -> ImageError {
    match e.kind() {
        ErrorKind::InvalidData | ErrorKind::UnexpectedEof => {
            ImageError::Invalid(format!("layer entry {name}: {e}"))
        }
        _ => ImageError::io(format!("unpack layer entry {name}"), e),
    }
}
