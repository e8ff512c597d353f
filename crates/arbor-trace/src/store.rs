//! Reading a gateway store directory back, read-only.
//!
//! The gateway appends one [`CallRecord`] per line to `DIR/calls.jsonl` ([`LOG_FILE`]) and
//! fsyncs it before a call's response completes; its own recovery on restart cuts a torn last
//! line. A reader of a store that may still be written, or that a crash left behind, skips what
//! does not parse (a torn last line) instead, and never writes.

use std::collections::HashMap;
use std::path::Path;

use crate::TraceError;
use crate::record::CallRecord;

/// File name of the call log inside a store directory.
pub const LOG_FILE: &str = "calls.jsonl";

/// Every record of the store in `dir`, in log order; lines that do not parse (a torn last line
/// from a crash) are skipped.
pub fn read_calls(dir: &Path) -> Result<Vec<CallRecord>, TraceError> {
    let path = dir.join(LOG_FILE);
    let bytes = std::fs::read(&path).map_err(|source| TraceError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<CallRecord>(l).ok())
        .collect())
}

/// The store's calls grouped by session: sessions in the order of their first call in the log,
/// each session's calls sorted by call index.
pub fn read_sessions(dir: &Path) -> Result<Vec<(String, Vec<CallRecord>)>, TraceError> {
    let mut order: Vec<String> = Vec::new();
    let mut sessions: HashMap<String, Vec<CallRecord>> = HashMap::new();
    for rec in read_calls(dir)? {
        if !sessions.contains_key(&rec.session) {
            order.push(rec.session.clone());
        }
        sessions.entry(rec.session.clone()).or_default().push(rec);
    }
    Ok(order
        .into_iter()
        .filter_map(|s| {
            let mut calls = sessions.remove(&s)?;
            calls.sort_by_key(|c| c.index);
            Some((s, calls))
        })
        .collect())
}
