//! Crash-safe checkpoint directories for training stages.
//!
//! A checkpoint is a Hugging Face-style model directory (`config.json` + `model.safetensors`,
//! what [`Qwen3Model::save`] writes and [`Qwen3Model::load`] reads, so `arbor policy` can serve
//! it) plus `state.json`, the trainer's position (a [`serde_json::Value`] owned by the stage).
//!
//! Writing replaces the directory atomically: the new checkpoint is written to a temporary
//! sibling, the old one is renamed aside, the new one renamed into place, then the old one is
//! removed. A crash at any point leaves either the old or the new checkpoint readable by
//! [`load_latest`] (which falls back to the aside copy when the main one is missing).

use std::path::{Path, PathBuf};

use arbor_model::Qwen3Model;
use serde::{Serialize, de::DeserializeOwned};

use crate::{Result, TrainError};

/// Name of the trainer-state file inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

/// Writes `bytes` to `path` through a temporary file and a rename (readers never see a torn
/// file), fsyncing the data first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Saves `model` and `state` into `dir`, replacing any previous checkpoint there atomically.
pub fn save(dir: &Path, model: &Qwen3Model, state: &impl Serialize) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    model.save(&tmp)?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Input(e.to_string()))?;
    write_atomic(&tmp.join(STATE_FILE), &json)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    Ok(())
}

/// Loads the checkpoint in `dir` (or the copy a crash left aside): the model and its state.
/// `None` when there is no complete checkpoint.
pub fn load_latest<S: DeserializeOwned>(dir: &Path) -> Result<Option<(Qwen3Model, S)>> {
    for d in [dir.to_path_buf(), sibling(dir, "old")] {
        let state_path = d.join(STATE_FILE);
        if !state_path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
        let state: S = serde_json::from_str(&text)
            .map_err(|e| TrainError::Input(format!("{}: {e}", state_path.display())))?;
        let model = Qwen3Model::load(&d)?;
        return Ok(Some((model, state)));
    }
    Ok(None)
}
