//! Disk accounting and LRU eviction, never of a pinned layer; and cleaning
//! what crashed processes left.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use nix::fcntl::FlockArg;

use super::{Store, fsutil};
use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// What the layer cache holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes of unpacked layers on disk.
    pub bytes: u64,
    /// Layers cached.
    pub layers: usize,
    /// Layers pinned by a lease (in any process).
    pub pinned: usize,
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Layers evicted, least recently used first.
    pub removed: Vec<Digest>,
    /// Bytes they occupied.
    pub freed_bytes: u64,
    /// Layers that would have gone but were pinned (or being added).
    pub skipped_busy: usize,
    /// Bytes of unpacked layers left.
    pub bytes_after: u64,
}

struct CachedLayer {
    short: String,
    diff_id: Digest,
    bytes: u64,
    last_used: SystemTime,
}

impl Store {
    /// Bytes, layers and pinned layers in the cache.
    pub fn usage(&self) -> Result<Usage> {
        let layers = self.cached_layers()?;
        let mut pinned = 0;
        for layer in &layers {
            if self
                .lock(&layer.short, "pin", FlockArg::LockExclusiveNonblock)?
                .is_none()
            {
                pinned += 1;
            }
        }
        Ok(Usage {
            bytes: layers.iter().map(|l| l.bytes).sum(),
            layers: layers.len(),
            pinned,
        })
    }

    /// Evict least-recently-used unpinned layers until the cache holds at
    /// most `max_bytes` (or only pinned layers are left). Image records stay;
    /// leasing one whose layer went is NotFound until it is pulled again.
    pub fn prune(&self, max_bytes: u64) -> Result<PruneReport> {
        self.prune_except(max_bytes, None)
    }

    /// The automatic eviction after an add, which spares the layer just added.
    pub(super) fn evict_after_add(&self, added: &Digest) -> Result<()> {
        if let Some(max) = self.opts.max_bytes {
            let report = self.prune_except(max, Some(added))?;
            if !report.removed.is_empty() {
                tracing::debug!(
                    evicted = report.removed.len(),
                    freed = report.freed_bytes,
                    "layer cache over budget"
                );
            }
        }
        Ok(())
    }

    fn prune_except(&self, max_bytes: u64, spare: Option<&Digest>) -> Result<PruneReport> {
        let mut layers = self.cached_layers()?;
        layers.sort_by_key(|l| l.last_used);
        let mut report = PruneReport {
            bytes_after: layers.iter().map(|l| l.bytes).sum(),
            ..PruneReport::default()
        };
        for layer in layers {
            if report.bytes_after <= max_bytes {
                break;
            }
            if Some(&layer.diff_id) == spare {
                continue;
            }
            if self.evict(&layer)? {
                report.bytes_after -= layer.bytes;
                report.freed_bytes += layer.bytes;
                report.removed.push(layer.diff_id);
            } else {
                report.skipped_busy += 1;
            }
        }
        Ok(report)
    }

    /// Remove one layer unless a lease pins it or an add holds it.
    fn evict(&self, layer: &CachedLayer) -> Result<bool> {
        let Some(_pin) = self.lock(&layer.short, "pin", FlockArg::LockExclusiveNonblock)? else {
            return Ok(false);
        };
        let Some(_add) = self.lock(&layer.short, "add", FlockArg::LockExclusiveNonblock)? else {
            return Ok(false);
        };
        // The directory goes first: without it the layer does not exist.
        self.trash(&self.layer_dir(&layer.diff_id))?;
        for ext in ["json", "used"] {
            let path = self.meta_path(&layer.short, ext);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(ImageError::io(format!("remove {}", path.display()), e));
            }
        }
        Ok(true)
    }

    fn cached_layers(&self) -> Result<Vec<CachedLayer>> {
        let dir = self.root.join("meta");
        let mut out = Vec::new();
        for name in list(&dir)? {
            let Some(short) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(meta) = self.read_meta(short)? else {
                continue;
            };
            if !self.layer_dir(&meta.diff_id).is_dir() {
                continue;
            }
            let last_used = fs::metadata(self.meta_path(short, "used"))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(CachedLayer {
                short: short.to_string(),
                diff_id: meta.diff_id,
                bytes: meta.bytes,
                last_used,
            });
        }
        Ok(out)
    }

    /// Remove what crashed processes left: staging, trash and tmp entries of
    /// dead pids (`name.<pid>.<n>`), and layers half made (metadata without directory or the reverse)
    /// whose `add` lock nobody holds.
    pub(super) fn clean_leftovers(&self) -> Result<()> {
        for sub in ["staging", "trash", "tmp"] {
            let dir = self.root.join(sub);
            for name in list(&dir)? {
                // tmp/ is shared with callers: only names made by
                // `unique_name` (with a pid) are known to be removable.
                let pid = fsutil::name_pid(&name);
                let dead = pid.map(|p| !fsutil::pid_alive(p));
                if dead.unwrap_or(sub != "tmp") {
                    let _ = fsutil::remove_tree(&dir.join(&name));
                }
            }
        }
        let mut shorts: Vec<String> = list(&self.root.join("l"))?;
        shorts.extend(
            list(&self.root.join("meta"))?
                .into_iter()
                .filter_map(|n| n.strip_suffix(".json").map(str::to_string)),
        );
        shorts.sort();
        shorts.dedup();
        for short in shorts {
            let dir = self.root.join("l").join(&short);
            let complete = || {
                let meta = self.read_meta(&short).ok().flatten();
                meta.is_some_and(|m| m.diff_id.hex().starts_with(&short)) && dir.is_dir()
            };
            if complete() {
                continue;
            }
            let Some(_add) = self.lock(&short, "add", FlockArg::LockExclusiveNonblock)? else {
                continue;
            };
            // Re-checked under the lock: an add may have finished meanwhile.
            if complete() {
                continue;
            }
            if dir.exists() {
                self.trash(&dir)?;
            }
            let _ = fs::remove_file(self.meta_path(&short, "json"));
        }
        Ok(())
    }
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let entries =
        fs::read_dir(dir).map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(out)
}
