//! The call record format: a line as the gateway writes it parses, and a store file written the
//! gateway's way reads back record for record, a torn last line skipped.

mod common;

use arbor_trace::record::{Api, CallRecord, TokenSource};
use arbor_trace::store::{read_calls, read_sessions};

/// One line of a gateway's `calls.jsonl` (format version 1), verbatim.
const LINE: &str = r#"{"v":1,"id":"s/0","session":"s","index":0,"api":"messages","stream":true,"started_ms":5,"finished_ms":9,"upstream":"http://u","upstream_id":null,"model":"m","request":{"b":1,"a":2},"upstream_request":{},"response":{},"usage":{"prompt_tokens":2},"tokens":{"source":"tokenizer","prompt":[7,8],"completions":[{"index":0,"ids":[9],"logprobs":null,"text":"hi","finish_reason":"length"}]},"branch":{"previous":0,"extends_previous":false,"shared_prefix":1,"parent":null}}"#;

#[test]
fn a_recorded_line_parses_and_serializes_back_unchanged() {
    let rec: CallRecord = serde_json::from_str(LINE).unwrap();
    assert_eq!(rec.api, Api::Messages);
    assert_eq!(rec.api.as_str(), "messages");
    assert_eq!(rec.tokens.source, TokenSource::Tokenizer);
    assert_eq!(rec.sequence(0), vec![7, 8, 9]);
    assert_eq!(rec.sequence(1), vec![7, 8], "a missing choice adds nothing");
    let branch = rec.branch.as_ref().unwrap();
    assert!(!branch.extends_previous);
    assert_eq!(branch.shared_prefix, 1);
    // The request keeps the caller's key order, so the line is reproduced byte for byte.
    assert_eq!(serde_json::to_string(&rec).unwrap(), LINE);
}

#[test]
fn a_store_written_the_gateway_way_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = common::branching_session("a");
    records.insert(1, common::call("b", 0, &[1], &[2]));
    common::write_store(dir.path(), &records);
    assert_eq!(read_calls(dir.path()).unwrap(), records);

    // A crash cut the last write: the torn line is skipped, nothing else is lost.
    let path = dir.path().join(arbor_trace::store::LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let extra = serde_json::to_vec(&common::call("b", 1, &[1, 2], &[3])).unwrap();
    bytes.extend(&extra[..extra.len() / 2]);
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(read_calls(dir.path()).unwrap(), records);

    // Grouped by session, in order of first appearance, calls by index.
    let sessions = read_sessions(dir.path()).unwrap();
    let names: Vec<&str> = sessions.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let indices: Vec<u32> = sessions[0].1.iter().map(|c| c.index).collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[test]
fn a_missing_store_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_calls(dir.path()).unwrap_err().to_string();
    assert!(err.contains("calls.jsonl"), "{err}");
}
