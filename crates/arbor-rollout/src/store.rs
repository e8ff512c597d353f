//! The run directory: what a run leaves on disk, written so that a crash at
//! any instant (even `kill -9`) loses at most the rollouts in flight.
//!
//! ```text
//! RUN/experiment.toml   the experiment as given (a resumed run must match it)
//! RUN/results.jsonl     one RolloutResult per line, appended and fsynced as each finishes
//! RUN/gateway/          the gateway's durable call store: every model call, as tokens
//! RUN/summary.json      the final summary (rewritten at the end of each invocation)
//! RUN/report.md, plots/ the report
//! ```
//!
//! Resuming reads `results.jsonl`; a torn last line (the process died in
//! the middle of a write) is cut off; every key already recorded is skipped.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Result, RolloutError};
use crate::experiment::Experiment;
use crate::record::{RolloutKey, RolloutResult};

pub const RESULTS: &str = "results.jsonl";
pub const EXPERIMENT: &str = "experiment.toml";
pub const SUMMARY: &str = "summary.json";
pub const GATEWAY: &str = "gateway";

/// An open run directory.
pub struct RunStore {
    dir: PathBuf,
    results: Arc<Mutex<File>>,
}

/// Results read back from a run directory.
pub struct Loaded {
    pub results: Vec<RolloutResult>,
    /// Bytes of a torn last line that were cut off.
    pub torn_bytes: usize,
}

fn run_dir_err(dir: &Path, message: impl Into<String>) -> RolloutError {
    RolloutError::RunDir {
        dir: dir.display().to_string(),
        message: message.into(),
    }
}

/// Whether a run started with `old` may be resumed with `new`: they agree on what
/// is run (concurrency, timeouts and the output may change).
pub fn same_work(old: &Experiment, new: &Experiment) -> bool {
    identity(old) == identity(new)
}

/// The parts of an experiment that decide *what* is run; a resumed run must
/// agree on these (concurrency, timeouts and the output may change).
fn identity(e: &Experiment) -> serde_json::Value {
    serde_json::json!({
        "datasets": e.datasets,
        "scaffolds": e.scaffolds,
        "policy": e.policy,
        "samples": e.samples,
    })
}

impl RunStore {
    /// Open `dir` for a new run (`resume = false`: it must not hold results
    /// yet) or to continue one (`resume = true`: its experiment must match).
    /// Returns the store and the results already recorded.
    pub fn open(
        dir: &Path,
        exp: &Experiment,
        exp_text: &str,
        resume: bool,
    ) -> Result<(Self, Loaded)> {
        let results_path = dir.join(RESULTS);
        let exp_path = dir.join(EXPERIMENT);
        let loaded = if results_path.exists() {
            if !resume {
                return Err(run_dir_err(
                    dir,
                    "already holds results; pass --resume to continue that run, or choose another output",
                ));
            }
            let old_text = std::fs::read_to_string(&exp_path)
                .map_err(|e| RolloutError::io(format!("reading {}", exp_path.display()), e))?;
            let old = Experiment::parse(&old_text)
                .map_err(|m| run_dir_err(dir, format!("its {EXPERIMENT} is unreadable: {m}")))?;
            if identity(&old) != identity(exp) {
                return Err(run_dir_err(
                    dir,
                    "was started with a different experiment (datasets, scaffolds, policy or samples differ); \
                     resume it with its own experiment.toml",
                ));
            }
            load_results(&results_path, true)?
        } else {
            std::fs::create_dir_all(dir)
                .map_err(|e| RolloutError::io(format!("creating {}", dir.display()), e))?;
            write_durably(&exp_path, exp_text.as_bytes())?;
            Loaded {
                results: Vec::new(),
                torn_bytes: 0,
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .map_err(|e| RolloutError::io(format!("opening {}", results_path.display()), e))?;
        Ok((
            RunStore {
                dir: dir.to_path_buf(),
                results: Arc::new(Mutex::new(file)),
            },
            loaded,
        ))
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append one result and make it durable before returning.
    pub async fn append(&self, r: &RolloutResult) -> Result<()> {
        let mut line = serde_json::to_vec(r)
            .map_err(|e| RolloutError::Other(format!("serializing a result: {e}")))?;
        line.push(b'\n');
        let file = self.results.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = file
                .lock()
                .map_err(|_| std::io::Error::other("results file lock poisoned"))?;
            // One write of the whole line: with O_APPEND it lands contiguously.
            f.write_all(&line)?;
            f.sync_data()
        })
        .await
        .map_err(|e| RolloutError::Other(format!("results writer: {e}")))?
        .map_err(|e| RolloutError::io("appending to results.jsonl", e))
    }

    /// Write `summary.json`.
    pub fn write_summary(&self, summary: &impl serde::Serialize) -> Result<()> {
        let text = serde_json::to_vec_pretty(summary)
            .map_err(|e| RolloutError::Other(format!("serializing the summary: {e}")))?;
        write_durably(&self.dir.join(SUMMARY), &text)
    }
}

/// Write a file via a temporary and a rename, so readers never see half of it.
fn write_durably(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)
        .map_err(|e| RolloutError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| RolloutError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| RolloutError::io(format!("renaming to {}", path.display()), e))
}

/// Read `results.jsonl`. A torn last line is dropped (and, with `repair`,
/// cut from the file so later appends start on a fresh line); any other bad
/// line is an error naming its line number. Duplicate keys keep the first.
pub fn load_results(path: &Path, repair: bool) -> Result<Loaded> {
    let data = std::fs::read(path)
        .map_err(|e| RolloutError::io(format!("reading {}", path.display()), e))?;
    let mut results = Vec::new();
    let mut seen = HashSet::new();
    let mut good_end = 0usize;
    let mut torn_bytes = 0usize;
    let mut pos = 0usize;
    let mut line_no = 0usize;
    while pos < data.len() {
        line_no += 1;
        let end = data[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i);
        let (line, next) = match end {
            Some(e) => (&data[pos..e], e + 1),
            None => (&data[pos..], data.len()),
        };
        let is_last = next >= data.len();
        if line.iter().all(u8::is_ascii_whitespace) {
            pos = next;
            good_end = next;
            continue;
        }
        match serde_json::from_slice::<RolloutResult>(line) {
            Ok(r) if end.is_some() => {
                if seen.insert(r.key.clone()) {
                    results.push(r);
                }
                good_end = next;
            }
            // A complete record without its newline: the write was cut
            // before the newline reached the disk; treat as torn.
            Ok(_) | Err(_) if is_last => {
                torn_bytes = data.len() - pos;
                break;
            }
            Err(e) => {
                return Err(RolloutError::RunDir {
                    dir: path.display().to_string(),
                    message: format!("line {line_no} is not a rollout result: {e}"),
                });
            }
            // (Only a last line lacks its newline; kept for exhaustiveness.)
            Ok(_) => {
                torn_bytes = data.len() - pos;
                break;
            }
        }
        pos = next;
    }
    if repair && torn_bytes > 0 {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| RolloutError::io(format!("opening {}", path.display()), e))?;
        f.set_len(good_end as u64)
            .and_then(|()| f.sync_all())
            .map_err(|e| {
                RolloutError::io(format!("cutting the torn line of {}", path.display()), e)
            })?;
        tracing::warn!(
            bytes = torn_bytes,
            "cut a torn last line from {}",
            path.display()
        );
    }
    Ok(Loaded {
        results,
        torn_bytes,
    })
}

/// The keys already recorded.
pub fn done_keys(results: &[RolloutResult]) -> HashSet<RolloutKey> {
    results.iter().map(|r| r.key.clone()).collect()
}
