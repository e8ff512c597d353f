//! Leases: an image's layers pinned for as long as a sandbox or build uses
//! them, across processes (shared flocks that eviction's exclusive,
//! non-blocking flock cannot take).

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use nix::fcntl::{Flock, FlockArg};

use super::Store;
use super::layers::short;
use crate::config::ImageRecord;
use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// One shared flock on a layer's pin file, shared by every lease of this
/// process on that layer (500 sandboxes of one image hold one fd per layer).
pub(super) struct Pin {
    _lock: Flock<File>,
}

/// An image's layers, pinned until the last clone of the lease drops.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<LeaseInner>,
}

struct LeaseInner {
    _pins: Vec<Arc<Pin>>,
    /// Uppermost first.
    dirs: Vec<PathBuf>,
}

impl Lease {
    /// The layer directories, uppermost first (the order of overlayfs's
    /// `lowerdir=` and of `SandboxSpec.layers`).
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        self.inner.dirs.clone()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("layer_dirs", &self.inner.dirs)
            .finish()
    }
}

impl Store {
    /// Pin `record`'s layers for as long as the returned lease (or a clone)
    /// lives, and mark them used now. NotFound if a layer is not in the
    /// cache (evicted: pulling the image again brings it back).
    pub fn lease(&self, record: &ImageRecord) -> Result<Lease> {
        let layers = record
            .layers
            .iter()
            .map(|l| Digest::parse(l))
            .collect::<Result<Vec<_>>>()?;
        self.lease_as(&layers, &record.reference)
    }

    /// Pin layers by diff_id (bottom first, as in [`ImageRecord::layers`]):
    /// what a pull or build holds while it adds an image's layers one by one,
    /// so the automatic eviction after each add cannot take the earlier ones.
    pub fn lease_layers(&self, layers: &[Digest]) -> Result<Lease> {
        self.lease_as(layers, "layers")
    }

    fn lease_as(&self, layers: &[Digest], what: &str) -> Result<Lease> {
        let mut pins = Vec::with_capacity(layers.len());
        let mut dirs = Vec::with_capacity(layers.len());
        for diff_id in layers {
            pins.push(self.pin(diff_id)?);
            // Checked under the pin: an eviction racing this one finished first.
            let Some(info) = self.layer_info(diff_id)? else {
                return Err(ImageError::NotFound(format!(
                    "{what} (its layer {diff_id} is not in the cache: evicted or never added)"
                )));
            };
            self.touch(short(diff_id))?;
            dirs.push(info.dir);
        }
        dirs.reverse();
        Ok(Lease {
            inner: Arc::new(LeaseInner { _pins: pins, dirs }),
        })
    }

    fn pin(&self, diff_id: &Digest) -> Result<Arc<Pin>> {
        let short = short(diff_id);
        let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pin) = pins.get(short).and_then(|w| w.upgrade()) {
            return Ok(pin);
        }
        pins.retain(|_, w| w.strong_count() > 0);
        // Blocks only while an eviction of this very layer is in progress.
        let lock = self
            .lock(short, "pin", FlockArg::LockShared)?
            .ok_or_else(|| {
                ImageError::io(
                    "pin layer",
                    std::io::Error::from(std::io::ErrorKind::WouldBlock),
                )
            })?;
        let pin = Arc::new(Pin { _lock: lock });
        pins.insert(short.to_string(), Arc::downgrade(&pin));
        Ok(pin)
    }
}
