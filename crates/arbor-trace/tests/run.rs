//! A run directory read back: results joined with their sessions' calls, filtered, sorted by
//! session and prefixed; torn and malformed result lines.

mod common;

use std::path::Path;

use arbor_trace::TraceError;
use arbor_trace::run::{GATEWAY_DIR, RESULTS_FILE, read_results, read_run};
use serde::Deserialize;

#[derive(Debug, Deserialize, PartialEq)]
struct Line {
    session: String,
    status: String,
}

fn line(session: &str, status: &str) -> String {
    format!(r#"{{"task_id":"t","session":"{session}","status":"{status}","reward":1.0}}"#)
}

fn write_run(dir: &Path, results: &str) {
    std::fs::write(dir.join(RESULTS_FILE), results).unwrap();
    let mut records = common::branching_session("t.bash.s1.a1");
    records.extend(common::branching_session("t.bash.s0.a1"));
    records.extend(common::branching_session("other"));
    common::write_store(&dir.join(GATEWAY_DIR), &records);
}

#[test]
fn results_are_joined_with_their_sessions_sorted_and_prefixed() {
    let dir = tempfile::tempdir().unwrap();
    let results = [
        line("t.bash.s1.a1", "passed"),
        line("t.bash.s2.a1", "passed"),
        line("t.bash.s0.a1", "passed"),
        line("t.bash.s3.a1", "failed"),
    ]
    .join("\n");
    // A blank line is nothing; the last line was cut by a crash.
    write_run(
        dir.path(),
        &format!("{results}\n\n{}", &line("x", "passed")[..20]),
    );

    let run = read_run(
        dir.path(),
        "r1/",
        |l: &Line| &l.session,
        |l| l.status == "passed",
    )
    .unwrap();
    assert_eq!(run.filtered, 1);
    let sessions: Vec<&str> = run
        .rollouts
        .iter()
        .map(|r| r.result.session.as_str())
        .collect();
    assert_eq!(sessions, ["t.bash.s0.a1", "t.bash.s1.a1", "t.bash.s2.a1"]);
    let seqs = run.rollouts[0].sequences.as_ref().unwrap();
    let ids: Vec<&str> = seqs.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "r1/t.bash.s0.a1/0",
            "r1/t.bash.s0.a1/1",
            "r1/t.bash.s0.a1/2"
        ]
    );
    assert!(
        seqs.iter()
            .all(|s| s.group.as_deref() == Some("r1/t.bash.s0.a1"))
    );
    assert_eq!(seqs[1].tokens, [1, 2, 3, 10, 11, 4, 12]);
    // A session that recorded no call.
    assert!(run.rollouts[2].sequences.is_none());
}

#[test]
fn a_run_without_a_gateway_store_has_no_calls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(RESULTS_FILE), line("s", "passed") + "\n").unwrap();
    let run = read_run(dir.path(), "", |l: &Line| &l.session, |_| true).unwrap();
    assert_eq!(run.rollouts.len(), 1);
    assert!(run.rollouts[0].sequences.is_none());
}

#[test]
fn a_malformed_line_before_the_last_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(RESULTS_FILE);
    std::fs::write(
        &path,
        format!("{}\nnot json\n{}\n", line("a", "p"), line("b", "p")),
    )
    .unwrap();
    match read_results::<Line>(&path) {
        Err(TraceError::Parse { line, .. }) => assert_eq!(line, 2),
        other => panic!("{other:?}"),
    }
    // The same line last is a torn write, as is a complete record without its newline.
    std::fs::write(&path, format!("{}\nnot json", line("a", "p"))).unwrap();
    assert_eq!(read_results::<Line>(&path).unwrap().len(), 1);
    std::fs::write(&path, format!("{}\n{}", line("a", "p"), line("b", "p"))).unwrap();
    assert_eq!(read_results::<Line>(&path).unwrap().len(), 1);
}
