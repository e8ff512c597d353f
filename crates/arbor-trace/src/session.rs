//! A session's calls as trajectory sequences and as a prefix tree (via `arbor-tree`).
//!
//! Each call (and each choice of it) becomes one `arbor_tree::Sequence`: its prompt tokens
//! without loss, then its completion tokens with loss and the behaviour logprobs the upstream
//! returned. The turn id of every token is the call index and the sequence's group is the
//! session, so a session whose later prompts extend earlier prompt + completion forms one path
//! per call sharing their common prefixes, and a session that rewrote its history (a branch)
//! forms a tree.

use std::path::Path;

use arbor_tree::{Sequence, TrajectoryTree};
use serde_json::{Value, json};

use crate::TraceError;
use crate::record::CallRecord;
use crate::store::read_sessions;

/// The linear sequences of a session: one per call and choice with token ids. Prompt tokens
/// have `loss_mask` false and logprob 0; completion tokens have `loss_mask` true and the
/// upstream's logprobs (0 where unknown); every token's turn is the call index.
///
/// Returns the sequences and, for calls skipped, `(call id, reason)`.
pub fn session_sequences(calls: &[CallRecord]) -> (Vec<Sequence>, Vec<(String, String)>) {
    let mut seqs = Vec::new();
    let mut skipped = Vec::new();
    for c in calls {
        if c.tokens.prompt.is_empty() {
            skipped.push((c.id.clone(), "no token ids recorded".to_string()));
            continue;
        }
        for (k, comp) in c.tokens.completions.iter().enumerate() {
            let id = if k == 0 {
                c.id.clone()
            } else {
                format!("{}.{}", c.id, comp.index)
            };
            let p = c.tokens.prompt.len();
            let n = comp.ids.len();
            let mut tokens = c.tokens.prompt.clone();
            tokens.extend_from_slice(&comp.ids);
            let mut loss_mask = vec![false; p];
            loss_mask.extend(std::iter::repeat_n(true, n));
            let mut logprobs = vec![0.0f32; p];
            match &comp.logprobs {
                Some(l) if l.len() == n => logprobs.extend_from_slice(l),
                _ => logprobs.extend(std::iter::repeat_n(0.0, n)),
            }
            seqs.push(Sequence {
                id,
                turns: vec![c.index; tokens.len()],
                tokens,
                loss_mask,
                logprobs,
                reward: None,
                advantage: None,
                group: Some(c.session.clone()),
            });
        }
    }
    (seqs, skipped)
}

/// The JSON answer of `GET /sessions/{id}/tree`.
pub fn session_tree(session: &str, calls: &[CallRecord]) -> Value {
    let (seqs, skipped) = session_sequences(calls);
    let skipped: Vec<Value> = skipped
        .into_iter()
        .map(|(id, reason)| json!({"call": id, "reason": reason}))
        .collect();
    let branches: Vec<Value> = calls
        .iter()
        .filter_map(|c| {
            let b = c.branch.as_ref()?;
            (!b.extends_previous).then(|| {
                json!({"call": c.index, "previous": b.previous, "shared_prefix": b.shared_prefix, "parent": b.parent})
            })
        })
        .collect();
    match TrajectoryTree::from_sequences(&seqs) {
        Ok(tree) => json!({
            "session": session,
            "calls": calls.len(),
            "paths": tree.num_paths(),
            "path_ids": seqs.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            "unique_tokens": tree.unique_tokens(),
            "flat_tokens": tree.flat_tokens(),
            "branches": branches,
            "skipped": skipped,
            "tree": tree,
        }),
        Err(e) => json!({"session": session, "error": e.to_string(), "skipped": skipped}),
    }
}

/// Every session recorded in a store directory, as sequences (read-only; a torn last line from a
/// crash is skipped, as the store's recovery would): sessions in the order of their first call,
/// each session's calls by index. Used by `arbor tree stats|pack` on a gateway store.
pub fn store_sequences(dir: &Path) -> Result<Vec<Sequence>, TraceError> {
    Ok(read_sessions(dir)?
        .into_iter()
        .flat_map(|(_, calls)| session_sequences(&calls).0)
        .collect())
}
