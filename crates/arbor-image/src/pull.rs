//! Pulling an image into the [`Store`]: resolve the reference (the host
//! platform's manifest, its verified config), then for each layer the store
//! lacks download the blob (verified), unpack it with [`Store::add_layer`],
//! and record the image. A layer already in the store is not downloaded.
//!
//! Concurrent pulls of one blob download it once: a pull takes the blob's
//! lock ([`lock_blob`]: in-process mutex + flock in the store's scratch dir),
//! then checks the store again, so whoever waited finds the layer unpacked.

use std::fs::File;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::manifest::OciDescriptor;

use crate::config::ImageRecord;
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::registry::download::lock_blob;
use crate::registry::{PullProgress, Registry, Resolved};
use crate::store::Store;

/// Layers of one image fetched at once.
const PARALLEL_LAYERS: usize = 4;

impl Registry {
    /// Resolve `reference` (a multi-arch index to the host platform's
    /// manifest), download and verify its config and the layers the store
    /// lacks, unpack them with [`Store::add_layer`], then record the image
    /// with [`Store::put_image`] and return the record.
    pub async fn pull(
        &self,
        store: &Store,
        reference: &str,
        progress: &dyn PullProgress,
    ) -> Result<ImageRecord> {
        let mut resolved = self.resolve(reference).await?;
        match self.fetch_layers(store, &resolved, progress).await {
            Ok(()) => {}
            // A mirror that served the manifest may still fail on a blob:
            // the registry itself is the fallback, as for the manifest.
            Err(e) if resolved.via_mirror && !matches!(e, ImageError::Io { .. }) => {
                tracing::warn!(
                    reference = %resolved.name,
                    mirror = %resolved.source.registry(),
                    error = %e,
                    "mirror failed on a layer; pulling from the registry itself"
                );
                let original = Self::parse_reference(&resolved.name)?;
                resolved = self.resolve_from(&resolved.name, original, false).await?;
                self.fetch_layers(store, &resolved, progress).await?;
            }
            Err(e) => return Err(e),
        }
        let record = ImageRecord {
            reference: resolved.name.clone(),
            id: resolved.config_digest.clone(),
            manifest_digest: Some(resolved.manifest_digest.clone()),
            layers: resolved.diff_ids.clone(),
            config: resolved.config.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        store.put_image(&record)?;
        Ok(record)
    }

    /// Bring every layer of `resolved` into the store, a few at a time.
    async fn fetch_layers(
        &self,
        store: &Store,
        resolved: &Resolved,
        progress: &dyn PullProgress,
    ) -> Result<()> {
        let diff_ids = resolved
            .diff_ids
            .iter()
            .map(|d| Digest::parse(d))
            .collect::<Result<Vec<_>>>()?;
        // Futures built in a plain loop: a closure here would make the pull
        // future lose `Send` (higher-ranked lifetime inference).
        let mut fetches = Vec::with_capacity(diff_ids.len());
        for (desc, diff_id) in resolved.layers.iter().zip(&diff_ids) {
            fetches.push(self.fetch_layer(store, resolved, desc, diff_id, progress));
        }
        futures_util::stream::iter(fetches)
            .buffer_unordered(PARALLEL_LAYERS)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// The image `reference` names in the store when all its layers are
    /// there; otherwise pull it (again: a prune may have evicted layers).
    pub async fn ensure(
        &self,
        store: &Store,
        reference: &str,
        progress: &dyn PullProgress,
    ) -> Result<ImageRecord> {
        if let Some(record) = store.image(reference)? {
            let complete = record
                .layers
                .iter()
                .all(|l| Digest::parse(l).is_ok_and(|d| store.has_layer(&d)));
            if complete {
                return Ok(record);
            }
            return self.pull(store, &record.reference, progress).await;
        }
        self.pull(store, reference, progress).await
    }

    /// Bring one layer into the store unless it is there already.
    async fn fetch_layer(
        &self,
        store: &Store,
        resolved: &Resolved,
        desc: &OciDescriptor,
        diff_id: &Digest,
        progress: &dyn PullProgress,
    ) -> Result<()> {
        if store.has_layer(diff_id) {
            progress.layer_done(&desc.digest, true);
            return Ok(());
        }
        let blob_digest = Digest::parse(&desc.digest)?;
        let scratch = store.tmp_dir();
        let _lock = lock_blob(&scratch, &desc.digest).await?;
        // Whoever held the lock before may have unpacked it meanwhile.
        if store.has_layer(diff_id) {
            progress.layer_done(&desc.digest, true);
            return Ok(());
        }
        let blob = self.download(resolved, desc, &scratch, progress).await?;
        let mut file = File::open(blob.path())
            .map_err(|e| ImageError::io(format!("open {}", blob.path().display()), e))?;
        // Unpacking is blocking disk work; it runs on this task's thread,
        // which a multi-threaded runtime tolerates and a pull needs anyway.
        store.add_layer(&mut file, &desc.media_type, Some(&blob_digest), diff_id)?;
        progress.layer_done(&desc.digest, false);
        Ok(())
    }
}
