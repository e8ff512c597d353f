//! The build cache: for each step's key, the stage state it produced
//! (`<store>/build-cache/<key hex>.json`, written atomically). An entry whose
//! layers were evicted from the store is a miss, so the step runs again.

use std::path::{Path, PathBuf};

use super::State;
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::store::Store;

/// Step results by cache key.
pub struct BuildCache {
    dir: PathBuf,
}

impl BuildCache {
    /// The cache of the store at `store_root`.
    pub fn new(store_root: &Path) -> Self {
        BuildCache {
            dir: store_root.join("build-cache"),
        }
    }

    fn path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", key.hex()))
    }

    /// The state stored under `key`, if every one of its layers is still in the store.
    pub(crate) fn get(&self, key: &Digest, store: &Store) -> Result<Option<State>> {
        let path = self.path(key);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        // A torn or foreign file is a miss, not an error: the step just runs.
        let Ok(state) = serde_json::from_slice::<State>(&bytes) else {
            return Ok(None);
        };
        Ok(state
            .layers
            .iter()
            .all(|l| store.has_layer(l))
            .then_some(state))
    }

    /// Record a step's result.
    pub(crate) fn put(&self, state: &State) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| ImageError::io(format!("create {}", self.dir.display()), e))?;
        let path = self.path(&state.key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let bytes = serde_json::to_vec(state)
            .map_err(|e| ImageError::Invalid(format!("build cache entry: {e}")))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ImageError::io(format!("write {}", path.display()), e))
    }
}
