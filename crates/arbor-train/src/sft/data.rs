//! The SFT stage's data: the kept rollouts of run directories as recorded sessions, and the
//! seeded held-out split.

use std::path::PathBuf;

use arbor_trace::{RunRollout, TraceError};
use arbor_tree::Sequence;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use super::SftConfig;
use crate::{Result, TrainError};

/// One kept rollout's recorded session.
#[derive(Debug, Clone)]
pub struct SftSession {
    /// Index of the run directory in the `runs` list.
    pub run: usize,
    /// Gateway session id (unprefixed).
    pub session: String,
    /// Task id, scaffold and domain of the rollout.
    pub task_id: String,
    /// Scaffold name.
    pub scaffold: String,
    /// Task domain.
    pub domain: String,
    /// One sequence per call (ids and group prefixed `r{run}/`).
    pub sequences: Vec<Sequence>,
}

/// What [`load_sessions`] found.
#[derive(Debug, Clone, Default)]
pub struct SftData {
    /// Kept sessions, in run then session-id order.
    pub sessions: Vec<SftSession>,
    /// Results filtered out by status or domain.
    pub filtered: usize,
    /// Kept results whose session has no token-level call in the gateway store.
    pub missing: usize,
}

/// The fields of a `results.jsonl` line this stage needs (the record is owned by
/// `arbor-rollout`; reading only these keeps this crate free of the rollout stack).
#[derive(Deserialize)]
struct ResultLine {
    task_id: String,
    scaffold: String,
    #[serde(default)]
    domain: String,
    status: String,
    session: String,
}

/// A run directory that cannot be read: an unreadable file is an I/O error, a malformed line
/// bad input.
fn trace_error(e: TraceError) -> TrainError {
    match e {
        TraceError::Io { .. } => TrainError::Io(e.to_string()),
        TraceError::Parse { .. } => TrainError::Input(e.to_string()),
    }
}

/// Gathers the sessions of the kept rollouts of every run directory (read with
/// `arbor_trace::read_run`: results sorted by session id, so one run directory always gives the
/// same data order, and the same SFT run).
pub fn load_sessions(runs: &[PathBuf], cfg: &SftConfig) -> Result<SftData> {
    let mut data = SftData::default();
    for (r, run) in runs.iter().enumerate() {
        let found = arbor_trace::read_run(
            run,
            &format!("r{r}/"),
            |l: &ResultLine| &l.session,
            |l| {
                cfg.statuses.contains(&l.status)
                    && cfg.domains.as_ref().is_none_or(|d| d.contains(&l.domain))
            },
        )
        .map_err(trace_error)?;
        data.filtered += found.filtered;
        for RunRollout { result, sequences } in found.rollouts {
            let Some(sequences) = sequences else {
                data.missing += 1;
                tracing::warn!(session = %result.session, "kept rollout has no recorded calls");
                continue;
            };
            data.sessions.push(SftSession {
                run: r,
                session: result.session,
                task_id: result.task_id,
                scaffold: result.scaffold,
                domain: result.domain,
                sequences,
            });
        }
    }
    Ok(data)
}

/// Splits session indices into (train, held-out), deterministically from `cfg.seed`.
pub fn split_sessions(n: usize, cfg: &SftConfig) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x5eed_e7a1);
    idx.shuffle(&mut rng);
    let mut n_eval = if n >= 2 && cfg.eval_fraction > 0.0 {
        ((n as f64 * cfg.eval_fraction).round() as usize).max(1)
    } else {
        0
    };
    n_eval = n_eval.min(cfg.max_eval_sessions).min(n.saturating_sub(1));
    let mut eval: Vec<usize> = idx[..n_eval].to_vec();
    let mut train: Vec<usize> = idx[n_eval..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}
