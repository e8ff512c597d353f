//! Adding layers: one unpack per diff_id (flock), into `staging/`, verified,
//! then renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Store, fsutil};
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::unpack::{self, Compression};

/// A layer in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Its diff_id (digest of the uncompressed tar, or a built layer's id).
    pub diff_id: Digest,
    /// Bytes it occupies on disk (measured once, when it was added).
    pub bytes: u64,
    /// Its directory (an overlayfs lower directory).
    pub dir: PathBuf,
}

/// `meta/<short>.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LayerMeta {
    pub diff_id: Digest,
    pub bytes: u64,
}

/// The short on-disk name of a layer.
pub(super) fn short(diff_id: &Digest) -> &str {
    &diff_id.hex()[..24]
}

impl Store {
    /// Unpack a layer blob into the cache unless `diff_id` is already there.
    /// `media_type` picks the decompressor (tar or tar+gzip; zstd is refused
    /// as Invalid). Verifies the blob's digest when `blob_digest` is given and
    /// that the uncompressed stream hashes to `diff_id`; a mismatch or a
    /// hostile entry is Invalid and leaves nothing behind. Concurrent callers
    /// for one diff_id, in any process, unpack it once.
    pub fn add_layer(
        &self,
        blob: &mut dyn Read,
        media_type: &str,
        blob_digest: Option<&Digest>,
        diff_id: &Digest,
    ) -> Result<LayerInfo> {
        let compression = Compression::from_media_type(media_type)?;
        let info = self.add_with(diff_id, |staging| {
            unpack::unpack_blob(blob, compression, blob_digest, diff_id, staging).map(|_| ())
        })?;
        self.evict_after_add(diff_id)?;
        Ok(info)
    }

    /// Add an already-built overlay-format directory (a build step's result)
    /// as layer `id`, copying it with its modes, owners, xattrs, hard links
    /// and whiteouts. `src` is left as it is.
    pub fn add_layer_dir(&self, id: &Digest, src: &Path) -> Result<LayerInfo> {
        if !src.is_dir() {
            return Err(ImageError::io(
                format!("layer directory {}", src.display()),
                std::io::Error::from(ErrorKind::NotFound),
            ));
        }
        let info = self.add_with(id, |staging| {
            fsutil::copy_tree(src, staging)
                .map_err(|e| ImageError::io(format!("copy layer {}", src.display()), e))
        })?;
        self.evict_after_add(id)?;
        Ok(info)
    }

    /// Whether layer `diff_id` is in the cache.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        matches!(self.layer_info(diff_id), Ok(Some(_)))
    }

    /// Where layer `diff_id` lives (whether or not it is there yet).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("l").join(short(diff_id))
    }

    /// How many layers this `Store` value unpacked or copied in (cache hits
    /// and other processes' work excluded): what "unpacked once" is measured by.
    pub fn unpack_count(&self) -> u64 {
        self.unpacked.load(Ordering::Relaxed)
    }

    /// The layer if it is complete in the cache. A short name whose metadata
    /// names another digest (a 96-bit prefix collision) is Invalid.
    pub fn layer_info(&self, diff_id: &Digest) -> Result<Option<LayerInfo>> {
        let Some(meta) = self.read_meta(short(diff_id))? else {
            return Ok(None);
        };
        if &meta.diff_id != diff_id {
            return Err(ImageError::Invalid(format!(
                "layer {diff_id} collides with cached layer {} on its short name",
                meta.diff_id
            )));
        }
        let dir = self.layer_dir(diff_id);
        Ok(dir.is_dir().then_some(LayerInfo {
            diff_id: meta.diff_id,
            bytes: meta.bytes,
            dir,
        }))
    }

    pub(super) fn read_meta(&self, short: &str) -> Result<Option<LayerMeta>> {
        let path = self.meta_path(short, "json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ImageError::Invalid(format!("layer metadata {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io(format!("read {}", path.display()), e)),
        }
    }

    pub(super) fn meta_path(&self, short: &str, ext: &str) -> PathBuf {
        self.root.join("meta").join(format!("{short}.{ext}"))
    }

    /// Take a layer's `add` or `pin` flock. `None` when a non-blocking
    /// attempt finds it held.
    pub(super) fn lock(
        &self,
        short: &str,
        kind: &str,
        arg: FlockArg,
    ) -> Result<Option<Flock<File>>> {
        let path = self.root.join("locks").join(format!("{short}.{kind}"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(ImageError::io(
                format!("flock {}", path.display()),
                e.into(),
            )),
        }
    }

    /// Record a use of the layer now (LRU order).
    pub(super) fn touch(&self, short: &str) -> Result<()> {
        let path = self.meta_path(short, "used");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()).map(|()| f));
        file.map(drop)
            .map_err(|e| ImageError::io(format!("touch {}", path.display()), e))
    }

    /// Make layer `id` exist, filling a fresh staging directory with `fill`
    /// unless another caller already did (under the layer's `add` flock).
    fn add_with(&self, id: &Digest, fill: impl FnOnce(&Path) -> Result<()>) -> Result<LayerInfo> {
        let short = short(id);
        let _guard = self.lock(short, "add", FlockArg::LockExclusive)?;
        if let Some(info) = self.layer_info(id)? {
            self.touch(short)?;
            return Ok(info);
        }
        let staging = self.root.join("staging").join(fsutil::unique_name(short));
        fs::create_dir(&staging)
            .and_then(|()| fs::set_permissions(&staging, fs::Permissions::from_mode(0o755)))
            .map_err(|e| ImageError::io(format!("create {}", staging.display()), e))?;
        let result = fill(&staging).and_then(|()| self.commit(id, &staging));
        if result.is_err() {
            let _ = fsutil::remove_tree(&staging);
        }
        let info = result?;
        self.unpacked.fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }

    /// Move a filled staging directory into place as layer `id`: metadata
    /// first, then the rename that makes the layer exist.
    fn commit(&self, id: &Digest, staging: &Path) -> Result<LayerInfo> {
        let short = short(id);
        let bytes = fsutil::disk_usage(staging)
            .map_err(|e| ImageError::io(format!("measure {}", staging.display()), e))?;
        let dir = self.layer_dir(id);
        // A directory without valid metadata is a crashed add's: discard it.
        if dir.exists() {
            self.trash(&dir)?;
        }
        let meta = serde_json::to_vec(&LayerMeta {
            diff_id: id.clone(),
            bytes,
        })
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
        let meta_path = self.meta_path(short, "json");
        fsutil::write_atomic(&meta_path, &meta)
            .map_err(|e| ImageError::io(format!("write {}", meta_path.display()), e))?;
        self.touch(short)?;
        fs::rename(staging, &dir)
            .map_err(|e| ImageError::io(format!("rename into {}", dir.display()), e))?;
        Ok(LayerInfo {
            diff_id: id.clone(),
            bytes,
            dir,
        })
    }

    /// Rename `path` into `trash/` (atomic: it is gone from its place), then delete it.
    pub(super) fn trash(&self, path: &Path) -> Result<()> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let bin = self.root.join("trash").join(fsutil::unique_name(&name));
        match fs::rename(path, &bin) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ImageError::io(
                    format!("move {} to trash", path.display()),
                    e,
                ));
            }
        }
        fsutil::remove_tree(&bin)
            .map_err(|e| ImageError::io(format!("delete {}", bin.display()), e))
    }
}
