//! The image store: a content-addressed cache of unpacked layers, image
//! records by reference, leases that pin layers, and LRU eviction to a disk
//! budget. Safe to share between threads and between processes on one root.
//!
//! On disk (`<short>` = the first 24 hex digits of a layer's diff_id; short
//! paths keep overlayfs's page-limited `lowerdir=` option small, and the full
//! diff_id in the layer's metadata is checked on every lookup):
//!
//! ```text
//! <root>/l/<short>/           the unpacked layer, overlayfs format (a lowerdir)
//! <root>/meta/<short>.json    {diff_id, bytes}: written before the layer dir appears
//! <root>/meta/<short>.used    its mtime is the layer's last use (LRU)
//! <root>/locks/<short>.add    flock: one unpack of a layer at a time (threads and processes)
//! <root>/locks/<short>.pin    flock: shared by leases, exclusive (non-blocking) by eviction
//! <root>/images/<sha256 of reference>.json   an ImageRecord
//! <root>/staging/, trash/     unpacks in progress, layers being deleted (`name.<pid>.<n>`)
//! <root>/tmp/                 scratch for callers (downloads, builds)
//! ```
//!
//! A layer exists when its metadata names its diff_id and its directory is
//! there; it is created by unpacking into `staging/` then renaming into `l/`,
//! and removed by renaming into `trash/` first, so no reader ever sees half a
//! layer. Leftovers of crashed processes are cleaned at [`Store::open`].

mod evict;
mod fsutil;
mod layers;
mod lease;

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, Weak};

use oci_client::Reference;

pub use evict::{PruneReport, Usage};
pub use layers::LayerInfo;
pub use lease::Lease;

use crate::config::ImageRecord;
use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// How a store behaves.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Disk budget for unpacked layers: after each added layer, least recently
    /// used unpinned layers are evicted until the cache fits. `None`: no limit.
    pub max_bytes: Option<u64>,
}

/// An image store rooted at one directory (see the module doc).
pub struct Store {
    root: PathBuf,
    opts: StoreOptions,
    /// This process's pins: one shared flock per layer, however many leases.
    pins: Mutex<HashMap<String, Weak<lease::Pin>>>,
    /// Layers this instance unpacked or copied in (not cache hits).
    unpacked: AtomicU64,
}

const SUBDIRS: [&str; 7] = ["l", "meta", "locks", "images", "staging", "trash", "tmp"];

impl Store {
    /// Open (creating if needed) the store at `root`, cleaning what crashed
    /// processes left behind (half-made layers, unfinished deletions).
    pub fn open(root: impl Into<PathBuf>, opts: StoreOptions) -> Result<Store> {
        let root = root.into();
        for sub in SUBDIRS {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
        }
        let store = Store {
            root,
            opts,
            pins: Mutex::new(HashMap::new()),
            unpacked: AtomicU64::new(0),
        };
        store.clean_leftovers()?;
        Ok(store)
    }

    /// `$ARBOR_IMAGE_ROOT`, else `/var/lib/arbor/images`.
    pub fn default_root() -> PathBuf {
        std::env::var_os("ARBOR_IMAGE_ROOT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/arbor/images"))
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Scratch space on the store's filesystem (so results can be renamed in).
    /// Callers create uniquely named entries there (see [`Store::scratch_path`])
    /// and remove them.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh path under [`Store::tmp_dir`], `<stem>.<pid>.<n>`: unique
    /// across threads and processes, and removed by a later [`Store::open`]
    /// if this process dies before removing it.
    pub fn scratch_path(&self, stem: &str) -> PathBuf {
        self.tmp_dir().join(fsutil::unique_name(stem))
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Record `record` under its (normalized) reference, replacing any
    /// earlier image of that reference. Atomic.
    pub fn put_image(&self, record: &ImageRecord) -> Result<()> {
        let key = reference_key(&record.reference)?;
        Digest::parse(&record.id)?;
        for layer in &record.layers {
            Digest::parse(layer)?;
        }
        let mut record = record.clone();
        record.reference = key;
        let json =
            serde_json::to_vec_pretty(&record).map_err(|e| ImageError::Invalid(e.to_string()))?;
        let path = self.image_path(&record.reference);
        fsutil::write_atomic(&path, &json)
            .map_err(|e| ImageError::io(format!("write {}", path.display()), e))
    }

    /// The image recorded under `reference` (normalized: `busybox` is
    /// `docker.io/library/busybox:latest`), else the one whose id starts with
    /// `reference` (`sha256:` optional). An id prefix matching two images is Invalid.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>> {
        if let Ok(key) = reference_key(reference)
            && let Some(record) = self.read_image(&self.image_path(&key))?
        {
            return Ok(Some(record));
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let prefix = format!("sha256:{}", prefix.to_ascii_lowercase());
        let matches: Vec<ImageRecord> = self
            .images()?
            .into_iter()
            .filter(|r| r.id.starts_with(&prefix))
            .collect();
        if matches.iter().any(|r| r.id != matches[0].id) {
            return Err(ImageError::Invalid(format!(
                "image id prefix {reference} is ambiguous"
            )));
        }
        Ok(matches.into_iter().next())
    }

    /// Every recorded image, by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        let entries =
            fs::read_dir(&dir).map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?
                .path();
            if path.extension().is_some_and(|x| x == "json")
                && let Some(record) = self.read_image(&path)?
            {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Forget the image `reference` resolves to (its layers stay cached
    /// until a prune evicts them). NotFound if there is none.
    pub fn remove_image(&self, reference: &str) -> Result<()> {
        let record = self
            .image(reference)?
            .ok_or_else(|| ImageError::NotFound(reference.to_string()))?;
        let path = self.image_path(&record.reference);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(ImageError::io(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    fn image_path(&self, key: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", Digest::sha256(key.as_bytes()).hex()))
    }

    fn read_image(&self, path: &Path) -> Result<Option<ImageRecord>> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ImageError::Invalid(format!("image record {}: {e}", path.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io(format!("read {}", path.display()), e)),
        }
    }
}

/// The canonical form of an image reference: `busybox` ->
/// `docker.io/library/busybox:latest`, digests kept (`name@sha256:...`).
/// A bare image id (`sha256:<hex>`, what untagged images are recorded as)
/// is returned as is.
pub fn normalize_reference(reference: &str) -> Result<String> {
    reference_key(reference)
}

fn reference_key(reference: &str) -> Result<String> {
    if reference.starts_with("sha256:") {
        return Ok(Digest::parse(reference)?.to_string());
    }
    Reference::try_from(reference)
        .map(|r| r.whole())
        .map_err(|e| ImageError::Invalid(format!("image reference {reference:?}: {e}")))
}
