//! A run directory read back: rollout results joined with their recorded calls.
//!
//! A rollout run (`arbor run --out RUN`, and every rollout stage of the recipe) leaves two logs:
//!
//! - `RUN/results.jsonl` ([`RESULTS_FILE`]): one rollout result per line, appended and fsynced
//!   by `arbor-rollout`, which owns the record. Each names the gateway session of its final
//!   attempt.
//! - `RUN/gateway/calls.jsonl` ([`GATEWAY_DIR`], [`crate::store::LOG_FILE`]): every model call
//!   of the run, recorded by the run's gateway.
//!
//! [`read_run`] reads both and joins them by session: each kept result with its session's calls
//! as `arbor_tree::Sequence`s ([`crate::session::session_sequences`]). It is generic over the
//! result type so each reader deserializes only what it needs (the SFT stage a few fields, the
//! recipe `arbor-rollout`'s full record) without this crate knowing the rollout stack.
//!
//! Results come back sorted by session id: results are appended in completion order, which
//! varies between runs of the same experiment, while session ids do not, so one run directory
//! always gives the same data in the same order.

use std::collections::HashMap;
use std::path::Path;

use arbor_tree::Sequence;
use serde::de::DeserializeOwned;

use crate::TraceError;
use crate::session::store_sequences;
use crate::store::LOG_FILE;

/// The results log inside a run directory.
pub const RESULTS_FILE: &str = "results.jsonl";
/// The run's gateway store directory inside a run directory.
pub const GATEWAY_DIR: &str = "gateway";

/// One kept rollout result with its session's recorded calls.
#[derive(Debug, Clone)]
pub struct RunRollout<R> {
    /// The result line, as deserialized.
    pub result: R,
    /// One sequence per call (and choice) of the session in call order, ids prefixed and group
    /// `{prefix}{session}`; `None` when the session recorded no call with token ids.
    pub sequences: Option<Vec<Sequence>>,
}

/// What [`read_run`] found in one run directory.
#[derive(Debug, Clone)]
pub struct RunData<R> {
    /// Kept results with their calls, sorted by session id.
    pub rollouts: Vec<RunRollout<R>>,
    /// Results the `keep` filter left out.
    pub filtered: usize,
}

/// Reads `run`'s results (deserialized as `R`), keeps those `keep` accepts and joins each with
/// the calls of its gateway session (`session` names it), prefixing sequence ids and groups
/// with `prefix` (session ids are deterministic and repeat across runs; a prefix such as `r0/`
/// keeps several runs apart). A run without a gateway store has no recorded calls.
pub fn read_run<R: DeserializeOwned>(
    run: &Path,
    prefix: &str,
    session: impl Fn(&R) -> &str,
    mut keep: impl FnMut(&R) -> bool,
) -> Result<RunData<R>, TraceError> {
    let (mut kept, mut filtered) = (Vec::new(), 0);
    for r in read_results::<R>(&run.join(RESULTS_FILE))? {
        if keep(&r) {
            kept.push(r);
        } else {
            filtered += 1;
        }
    }
    let mut by_session = calls_by_session(&run.join(GATEWAY_DIR))?;
    kept.sort_by(|a, b| session(a).cmp(session(b)));
    let rollouts = kept
        .into_iter()
        .map(|result| {
            let sequences = by_session
                .remove(session(&result))
                .map(|seqs| prefixed(seqs, prefix, session(&result)));
            RunRollout { result, sequences }
        })
        .collect();
    Ok(RunData { rollouts, filtered })
}

/// A session's sequences with ids `{prefix}{id}` and group `{prefix}{session}`.
fn prefixed(mut seqs: Vec<Sequence>, prefix: &str, session: &str) -> Vec<Sequence> {
    for s in &mut seqs {
        s.id = format!("{prefix}{}", s.id);
        s.group = Some(format!("{prefix}{session}"));
    }
    seqs
}

/// The sequences of a gateway store by session (empty when the store has no call log).
pub fn calls_by_session(gateway: &Path) -> Result<HashMap<String, Vec<Sequence>>, TraceError> {
    let mut by_session: HashMap<String, Vec<Sequence>> = HashMap::new();
    if !gateway.join(LOG_FILE).is_file() {
        return Ok(by_session);
    }
    for s in store_sequences(gateway)? {
        if let Some(g) = s.group.clone() {
            by_session.entry(g).or_default().push(s);
        }
    }
    Ok(by_session)
}

/// Every result line of a results log, as `arbor-rollout`'s store reads it: blank lines are
/// skipped; a last line that does not parse or lacks its newline is a write cut by a crash and
/// is skipped (the run's resume redoes that rollout); any other line that does not parse is an
/// error.
pub fn read_results<R: DeserializeOwned>(path: &Path) -> Result<Vec<R>, TraceError> {
    let data = std::fs::read(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    let mut lines = data.split_inclusive(|&b| b == b'\n').enumerate().peekable();
    while let Some((n, raw)) = lines.next() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let is_last = lines.peek().is_none();
        let (line, complete) = match raw.strip_suffix(b"\n") {
            Some(line) => (line, true),
            None => (raw, false),
        };
        match serde_json::from_slice::<R>(line) {
            Ok(r) if complete => out.push(r),
            Err(e) if !is_last => {
                return Err(TraceError::Parse {
                    path: path.to_path_buf(),
                    line: n + 1,
                    message: e.to_string(),
                });
            }
            // Only the last line can lack its newline.
            _ => tracing::warn!("{}: skipping a torn last line", path.display()),
        }
    }
    Ok(out)
}
