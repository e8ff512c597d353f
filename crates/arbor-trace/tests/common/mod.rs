//! Records built the way the gateway builds them, and written the way its store writes them.

#![allow(dead_code)]

use std::path::Path;

use arbor_trace::record::{Api, CallRecord, CompletionTokens, TokenSource, Tokens};
use serde_json::json;

/// A call of `session` with `prompt` and one completion `completion` (logprobs `-0.5` each).
pub fn call(session: &str, index: u32, prompt: &[u32], completion: &[u32]) -> CallRecord {
    CallRecord {
        v: arbor_trace::record::RECORD_VERSION,
        id: format!("{session}/{index}"),
        session: session.into(),
        index,
        api: Api::Chat,
        stream: false,
        started_ms: 1_000 + index as u64,
        finished_ms: 2_000 + index as u64,
        upstream: "http://127.0.0.1:1".into(),
        upstream_id: Some(format!("chatcmpl-{index}")),
        model: Some("m".into()),
        request: json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        upstream_request: json!({"model": "m"}),
        response: json!({"object": "chat.completion"}),
        usage: None,
        tokens: Tokens {
            source: TokenSource::Upstream,
            prompt: prompt.to_vec(),
            completions: vec![CompletionTokens {
                index: 0,
                ids: completion.to_vec(),
                logprobs: Some(vec![-0.5; completion.len()]),
                text: String::new(),
                finish_reason: Some("stop".into()),
            }],
        },
        branch: None,
    }
}

/// Appends `records` to `dir/calls.jsonl` as the gateway's store does: one
/// `serde_json::to_vec(record)` per line, each ended by a newline.
pub fn write_store(dir: &Path, records: &[CallRecord]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut bytes = Vec::new();
    for r in records {
        bytes.extend(serde_json::to_vec(r).unwrap());
        bytes.push(b'\n');
    }
    std::fs::write(dir.join(arbor_trace::store::LOG_FILE), bytes).unwrap();
}

/// A session that branches: call 1 extends call 0's prompt + completion; call 2 rewrote the
/// history (its prompt shares only `[1, 2]` with the earlier calls).
pub fn branching_session(session: &str) -> Vec<CallRecord> {
    vec![
        call(session, 0, &[1, 2, 3], &[10, 11]),
        call(session, 1, &[1, 2, 3, 10, 11, 4], &[12]),
        call(session, 2, &[1, 2, 5], &[13, 14]),
    ]
}
