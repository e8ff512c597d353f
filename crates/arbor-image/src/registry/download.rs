//! Blob downloads: streamed into a temp file with the sha256 checked on the
//! way, so a blob whose bytes do not match its digest never reaches the store;
//! and the per-digest locks that make concurrent pulls of one blob download it
//! once (in-process: an async mutex per digest; across processes: a flock on
//! `<tmp>/<hex>.lock`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use futures_util::StreamExt;
use nix::fcntl::{Flock, FlockArg};
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedMutexGuard;

use super::{PullProgress, oci_error};
use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// Config blobs larger than this are refused (real ones are a few KiB).
pub const MAX_CONFIG_BYTES: i64 = 16 << 20;

/// Holds the right to fetch one blob into one scratch dir: other tasks of
/// this process and other processes wait until it drops.
pub struct BlobLock {
    _local: OwnedMutexGuard<()>,
    _file: Flock<File>,
}

type LockMap = Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>;

/// One async mutex per lock file in this process. Entries are a few bytes
/// each and a process pulls a bounded set of blobs, so they are never removed.
static LOCAL_LOCKS: LazyLock<LockMap> = LazyLock::new(Default::default);

/// Take the lock for blob `digest` in scratch dir `dir` (created if missing).
pub async fn lock_blob(dir: &Path, digest: &str) -> Result<BlobLock> {
    let path = dir.join(format!("{}.lock", Digest::parse(digest)?.hex()));
    let local = {
        let mut map = LOCAL_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(path.clone()).or_default().clone()
    };
    // In-process first, so only one task of this process blocks in flock.
    let local = local.lock_owned().await;
    std::fs::create_dir_all(dir)
        .map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let flock = tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
        .await
        .map_err(|e| ImageError::io("flock task", std::io::Error::other(e)))?
        .map_err(|(_, errno)| ImageError::io(format!("flock {}", path.display()), errno.into()))?;
    Ok(BlobLock {
        _local: local,
        _file: flock,
    })
}

/// A downloaded, verified blob; the file is removed on drop.
pub struct TempBlob {
    path: PathBuf,
}

impl TempBlob {
    /// Where the blob's bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Download blob `desc` of `reference` into `dir` (hold [`lock_blob`] for it
/// first), verifying its size and sha256 while streaming. A mismatch is
/// [`ImageError::Invalid`] and leaves no file behind.
pub async fn download_blob(
    client: &Client,
    reference: &Reference,
    desc: &OciDescriptor,
    dir: &Path,
    progress: &dyn PullProgress,
) -> Result<TempBlob> {
    let blob = TempBlob {
        path: dir.join(format!("{}.download", Digest::parse(&desc.digest)?.hex())),
    };
    let mut file = tokio::fs::File::create(&blob.path)
        .await
        .map_err(|e| ImageError::io(format!("create {}", blob.path.display()), e))?;
    let mut stream = client
        .pull_blob_stream(reference, desc)
        .await
        .map_err(|e| oci_error(&reference.whole(), e))?;
    progress.layer_started(&desc.digest, desc.size.max(0) as u64);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| stream_error(reference, &desc.digest, e))?;
        hasher.update(&chunk);
        total += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| ImageError::io(format!("write {}", blob.path.display()), e))?;
        progress.layer_bytes(&desc.digest, chunk.len() as u64);
    }
    file.flush()
        .await
        .map_err(|e| ImageError::io(format!("write {}", blob.path.display()), e))?;
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != desc.digest {
        return Err(ImageError::Invalid(format!(
            "{}: blob {} has digest {actual} ({total} bytes): corrupted in the registry or \
             in transit; refused",
            reference.whole(),
            desc.digest
        )));
    }
    if desc.size >= 0 && total != desc.size as u64 {
        return Err(ImageError::Invalid(format!(
            "{}: blob {} is {total} bytes, the manifest says {}",
            reference.whole(),
            desc.digest,
            desc.size
        )));
    }
    Ok(blob)
}

/// Fetch a small blob (an image config) into memory, verified.
pub async fn fetch_small_blob(
    client: &Client,
    reference: &Reference,
    desc: &OciDescriptor,
) -> Result<Vec<u8>> {
    Digest::parse(&desc.digest)?;
    if desc.size > MAX_CONFIG_BYTES {
        return Err(ImageError::Invalid(format!(
            "{}: config blob {} is {} bytes (more than {MAX_CONFIG_BYTES})",
            reference.whole(),
            desc.digest,
            desc.size
        )));
    }
    let mut out = Vec::new();
    client
        .pull_blob(reference, desc, &mut out)
        .await
        .map_err(|e| oci_error(&reference.whole(), e))?;
    // oci-client checks the digest too; checking here keeps the guarantee
    // independent of its version.
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&out)));
    if actual != desc.digest {
        return Err(ImageError::Invalid(format!(
            "{}: config blob {} has digest {actual}; refused",
            reference.whole(),
            desc.digest
        )));
    }
    Ok(out)
}

/// A failed read of a blob stream: oci-client's own digest check surfaces as
/// an io error wrapping a `DigestError` (Invalid); anything else is the
/// network's or the registry's (Registry).
fn stream_error(reference: &Reference, digest: &str, e: std::io::Error) -> ImageError {
    let is_digest = e
        .get_ref()
        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
    if is_digest {
        ImageError::Invalid(format!(
            "{}: blob {digest}: {e}; refused",
            reference.whole()
        ))
    } else {
        ImageError::Registry(format!(
            "{}: download of blob {digest} failed: {}",
            reference.whole(),
            super::error_chain(&e)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blob_lock_serializes_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let digest = format!("sha256:{}", "cd".repeat(32));
        let held = lock_blob(dir.path(), &digest).await.unwrap();
        let (dir2, digest2) = (dir.path().to_path_buf(), digest.clone());
        let waiter = tokio::spawn(async move { lock_blob(&dir2, &digest2).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "second lock taken while the first is held"
        );
        drop(held);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn blob_lock_waits_for_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let digest = format!("sha256:{}", "ef".repeat(32));
        let lock_file = dir.path().join(format!("{}.lock", "ef".repeat(32)));
        let ready = dir.path().join("ready");
        // util-linux flock(1) holds the same lock file from another process.
        let mut holder = std::process::Command::new("flock")
            .arg(&lock_file)
            .arg("-c")
            .arg(format!("touch {} && sleep 0.6", ready.display()))
            .spawn()
            .expect("run flock(1)");
        while !ready.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let start = std::time::Instant::now();
        let lock = lock_blob(dir.path(), &digest).await.unwrap();
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(300),
            "lock taken while another process held it"
        );
        drop(lock);
        holder.wait().unwrap();
    }
}
