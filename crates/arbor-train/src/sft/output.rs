//! The SFT stage's output directory (module docs of [`super`], "Output" and "Resume"): the
//! fingerprint that binds it to one config and data, the report of a finished stage, the
//! learning curve, the periodic checkpoint and the final model.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use arbor_model::Qwen3Model;
use serde::{Deserialize, Serialize};

use super::data::SftSession;
use super::{CHECKPOINT_DIR, LOG_FILE, REPORT_FILE, SftConfig, SftInit, SftReport, SftStepLog, io};
use crate::checkpoint;
use crate::{Result, TrainError};

/// Trainer state stored with the periodic checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SftState {
    step: usize,
    fingerprint: String,
    eval_loss_before: Option<f64>,
}

/// FNV-1a: a hash that is stable across builds (the std hasher is not).
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The hash of the config, the start and the sessions' tokens and masks that a resume must match.
pub(super) fn fingerprint(cfg: &SftConfig, init: &str, sessions: &[SftSession]) -> Result<String> {
    // Checkpoint cadence does not change the trained model; leave it out so it can change on
    // resume.
    let mut c = cfg.clone();
    c.save_every = 0;
    c.eval_every = 0;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    h = fnv(
        &serde_json::to_vec(&c).map_err(|e| TrainError::Input(e.to_string()))?,
        h,
    );
    h = fnv(init.as_bytes(), h);
    for s in sessions {
        for q in &s.sequences {
            h = fnv(q.id.as_bytes(), h);
            for t in &q.tokens {
                h = fnv(&t.to_le_bytes(), h);
            }
            for &m in &q.loss_mask {
                h = fnv(&[m as u8], h);
            }
        }
    }
    Ok(format!("{h:016x}"))
}

/// The stored report when `out` holds a finished stage with fingerprint `fp` (`resumed =
/// "finished"`), `None` when it holds no finished stage; a finished stage of another config or
/// data is an error.
pub(super) fn finished_report(out: &Path, fp: &str) -> Result<Option<SftReport>> {
    let report_path = out.join(REPORT_FILE);
    if !report_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&report_path).map_err(|e| io(&report_path, e))?;
    let mut rep: SftReport = serde_json::from_str(&text)
        .map_err(|e| TrainError::Input(format!("{}: {e}", report_path.display())))?;
    if rep.fingerprint != fp {
        return Err(TrainError::Input(format!(
            "{} holds a finished SFT stage with another config or data (fingerprint {} != {fp}); use another output directory",
            out.display(),
            rep.fingerprint
        )));
    }
    rep.resumed = "finished".into();
    Ok(Some(rep))
}

/// Reads `sft_log.jsonl` (unparsable lines, e.g. a torn last line, are skipped).
pub fn read_log(path: &Path) -> Vec<SftStepLog> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Replaces the log with `lines`, atomically.
fn write_log(path: &Path, lines: &[SftStepLog]) -> Result<()> {
    let mut buf = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut buf, l).map_err(|e| TrainError::Input(e.to_string()))?;
        buf.push(b'\n');
    }
    checkpoint::write_atomic(path, &buf)
}

/// Where training starts.
pub(super) struct Start {
    /// The model: loaded from the periodic checkpoint, or built from `init`.
    pub model: Qwen3Model,
    /// Steps already done.
    pub step: usize,
    /// Held-out loss before training, as stored with the checkpoint.
    pub eval_before: Option<f64>,
    /// `checkpoint` or `fresh`.
    pub resumed: &'static str,
}

/// The output directory of a stage being trained: the learning curve (on disk and in memory)
/// and the periodic checkpoint.
pub(super) struct StageDir {
    out: PathBuf,
    ckpt_dir: PathBuf,
    log_path: PathBuf,
    logf: File,
    fp: String,
    /// Log lines up to the last step done.
    pub log: Vec<SftStepLog>,
}

impl StageDir {
    /// Opens `out` for the stage with fingerprint `fp`: continues from the periodic checkpoint
    /// when it has this fingerprint (another one is refused), else starts from `init`; log lines
    /// past the start step (steps that will be redone) are dropped.
    pub(super) fn open(out: &Path, init: &SftInit, fp: &str) -> Result<(StageDir, Start)> {
        let ckpt_dir = out.join(CHECKPOINT_DIR);
        let log_path = out.join(LOG_FILE);
        let start = match checkpoint::load_latest::<SftState>(&ckpt_dir)? {
            Some((model, st)) if st.fingerprint == fp => Start {
                model,
                step: st.step,
                eval_before: st.eval_loss_before,
                resumed: "checkpoint",
            },
            Some((_, st)) => {
                return Err(TrainError::ForeignCheckpoint {
                    dir: ckpt_dir.clone(),
                    found: st.fingerprint.to_string(),
                    expected: fp.to_string(),
                });
            }
            None => Start {
                model: init.build()?,
                step: 0,
                eval_before: None,
                resumed: "fresh",
            },
        };
        let log: Vec<SftStepLog> = read_log(&log_path)
            .into_iter()
            .filter(|l| l.step <= start.step)
            .collect();
        write_log(&log_path, &log)?;
        let logf = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(|e| io(&log_path, e))?;
        let dir = StageDir {
            out: out.to_path_buf(),
            ckpt_dir,
            log_path,
            logf,
            fp: fp.to_string(),
            log,
        };
        Ok((dir, start))
    }

    /// Appends a step's line to the log (flushed; synced before a checkpoint claims it) and
    /// returns it.
    pub(super) fn append(&mut self, line: SftStepLog) -> Result<&SftStepLog> {
        let mut bytes = serde_json::to_vec(&line).map_err(|e| TrainError::Input(e.to_string()))?;
        bytes.push(b'\n');
        self.logf
            .write_all(&bytes)
            .map_err(|e| io(&self.log_path, e))?;
        self.logf.flush().map_err(|e| io(&self.log_path, e))?;
        self.log.push(line);
        Ok(&self.log[self.log.len() - 1])
    }

    /// Replaces the periodic checkpoint with `model` after `step` steps.
    pub(super) fn save_checkpoint(
        &self,
        model: &Qwen3Model,
        step: usize,
        eval_before: Option<f64>,
    ) -> Result<()> {
        // The log must be on disk up to `step` before a checkpoint claims it.
        self.logf.sync_data().map_err(|e| io(&self.log_path, e))?;
        checkpoint::save(
            &self.ckpt_dir,
            model,
            &SftState {
                step,
                fingerprint: self.fp.clone(),
                eval_loss_before: eval_before,
            },
        )
    }

    /// Saves the final model into the output directory as `config.json` + `model.safetensors`
    /// (each moved in by an atomic rename; the report written after them marks the stage
    /// complete).
    pub(super) fn install_final(&self, model: &Qwen3Model) -> Result<()> {
        let (tmp, out) = (self.out.join(".final.tmp"), &self.out);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        model.save(&tmp)?;
        for f in ["config.json", "model.safetensors"] {
            std::fs::rename(tmp.join(f), out.join(f)).map_err(|e| io(&out.join(f), e))?;
        }
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))
    }

    /// Writes the report (its presence marks the stage finished) and removes the periodic
    /// checkpoint.
    pub(super) fn finish(self, report: &SftReport) -> Result<()> {
        drop(self.logf);
        let json =
            serde_json::to_vec_pretty(report).map_err(|e| TrainError::Input(e.to_string()))?;
        checkpoint::write_atomic(&self.out.join(REPORT_FILE), &json)?;
        if self.ckpt_dir.exists() {
            std::fs::remove_dir_all(&self.ckpt_dir).map_err(|e| io(&self.ckpt_dir, e))?;
        }
        Ok(())
    }
}
