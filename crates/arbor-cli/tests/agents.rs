//! Agent CLIs as scaffolds through `arbor run`, end to end: real sandboxes,
//! the run's gateway bridged in, the scripted-oracle policy driving each
//! CLI's own shell tool (docs/agents.md). Needs root.
//!
//! - Setup failures (a missing binary, a wrong base URL) are recorded with
//!   their reason, kept out of reward statistics, not retried, and shown by
//!   `arbor report`; a preset whose CLI is not installed stops the run with
//!   a message saying how to install it.
//! - Claude Code and mini-swe-agent (installed by `scripts/install-agents.sh`,
//!   which `scripts/test.sh` runs) solve built-in terminal tasks, every
//!   session recorded with token ids and forming a tree; Claude Code given
//!   the `/v1` URL it must not have is a setup failure. Without the CLIs the
//!   test is skipped with a loud message, except under `CI`, where it fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arbor_gateway::CallRecord;
use arbor_rollout::record::{RolloutResult, Status};
use arbor_tree::TrajectoryTree;
use serde_json::Value;

mod common;
use common::{Guard, arbor};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn results(dir: &Path) -> Vec<RolloutResult> {
    let text = std::fs::read_to_string(dir.join("results.jsonl")).expect("results.jsonl");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("result line"))
        .collect()
}

fn calls_by_session(dir: &Path) -> HashMap<String, Vec<CallRecord>> {
    let text = std::fs::read_to_string(dir.join("gateway/calls.jsonl")).unwrap_or_default();
    let mut by: HashMap<String, Vec<CallRecord>> = HashMap::new();
    for l in text.lines().filter(|l| !l.is_empty()) {
        let c: CallRecord = serde_json::from_str(l).expect("call record");
        by.entry(c.session.clone()).or_default().push(c);
    }
    for v in by.values_mut() {
        v.sort_by_key(|c| c.index);
    }
    by
}

/// Writes `body` (scaffolds and overrides) into an experiment over `n`
/// terminal tasks and runs it; returns (run dir, `arbor run` output).
fn run_experiment(dir: &Path, n: usize, body: &str) -> (PathBuf, std::process::Output) {
    let out = dir.join("run");
    let exp = format!(
        r#"name = "agents-test"
output = "{out}"
samples = 1
concurrency = 2
infra_retries = 2

[[datasets]]
domain = "terminal"
n = {n}
seed = 3

[policy]
kind = "scripted-oracle"

[timeouts]
agent_s = 300
model_call_s = 60

{body}"#,
        out = out.display()
    );
    std::fs::create_dir_all(dir).expect("experiment folder");
    let path = dir.join("agents.toml");
    std::fs::write(&path, exp).expect("write experiment");
    let g = Guard(None);
    let o = arbor()
        .arg("run")
        .arg(&path)
        .arg("--json")
        .output()
        .expect("arbor run");
    drop(g);
    (out, o)
}

fn agent_record(run: &Path, session: &str) -> Value {
    let p = run.join("agents").join(format!("{session}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("agent record")
}

#[test]
fn agent_setup_failures_are_recorded_with_their_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The second agent posts to the gateway with `/v1` doubled (the mistake an
    // Anthropic client makes with `{base_url}`): a JSON 404, exit 1, no call.
    let body = r#"
[[scaffolds]]
kind = "blackbox"
name = "missing-binary"
run = "/nonexistent/arbor-agent {instruction_file}"
timeout_s = 60

[[scaffolds]]
kind = "blackbox"
name = "wrong-url"
run = """python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/v1/messages", data=b"{}")' {base_url}"""
timeout_s = 60
"#;
    let (run, o) = run_experiment(dir.path(), 1, body);
    assert!(
        o.status.success(),
        "arbor run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rs = results(&run);
    assert_eq!(rs.len(), 2, "{rs:?}");
    for r in &rs {
        assert_eq!(r.status, Status::InfraError, "{r:?}");
        assert_eq!(r.attempts, 1, "a setup failure is not retried: {r:?}");
        let f = r.failure.as_ref().expect("failure recorded");
        assert_eq!(f.class, "agent_setup", "{r:?}");
        let rec = agent_record(&run, &r.session);
        assert_eq!(rec["model_calls"], 0, "{rec}");
        match r.key.scaffold.as_str() {
            "missing-binary" => {
                assert!(f.message.contains("code 127"), "{f:?}");
                assert!(f.message.contains("/nonexistent/arbor-agent"), "{f:?}");
                assert_eq!(rec["exit_code"], 127, "{rec}");
            }
            "wrong-url" => {
                assert!(f.message.contains("no model call"), "{f:?}");
                assert!(f.message.contains("404"), "the output tail says why: {f:?}");
                assert_eq!(rec["exit_code"], 1, "{rec}");
            }
            other => panic!("unexpected scaffold {other}"),
        }
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let s: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary JSON ({e}): {stdout}"));
    assert_eq!(s["infra_errors"], 2, "{s}");

    let report = arbor()
        .arg("report")
        .arg(&run)
        .output()
        .expect("arbor report");
    assert!(report.status.success());
    let md = std::fs::read_to_string(run.join("report.md")).expect("report.md");
    assert!(md.contains("agent_setup"), "report shows the class:\n{md}");

    // A preset whose CLI is not installed stops the run before it starts.
    let missing = dir.path().join("no-such-prefix");
    let body = format!(
        "[[scaffolds]]\nkind = \"claude-code\"\npath = \"{}\"\n",
        missing.display()
    );
    let (_, o) = run_experiment(&dir.path().join("second"), 1, &body);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no-such-prefix") && err.contains("scripts/install-agents.sh"),
        "{err}"
    );
}

/// The installed CLIs under `target/`, or `None` after a loud message
/// (a failure under `CI`: `scripts/test.sh` installs them).
fn installed() -> Option<(PathBuf, PathBuf)> {
    let root = repo_root();
    let npm = std::env::var_os("ARBOR_AGENTS_NPM")
        .map_or_else(|| root.join("target/agents/npm"), PathBuf::from);
    let venv = std::env::var_os("ARBOR_AGENT_VENV")
        .map_or_else(|| root.join("target/agent-venv"), PathBuf::from);
    if npm.join("bin/claude").exists() && venv.join("bin/mini").exists() {
        return Some((npm, venv));
    }
    let msg = format!(
        "Claude Code ({}) or mini-swe-agent ({}) is not installed: run scripts/install-agents.sh",
        npm.join("bin/claude").display(),
        venv.join("bin/mini").display()
    );
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!!!!\nSKIPPING the agent CLI test: {msg}\n!!!!!!!!!!\n");
    None
}

#[test]
fn claude_code_and_mini_swe_agent_solve_terminal_tasks() {
    let Some((npm, venv)) = installed() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let body = format!(
        r#"
[[scaffolds]]
kind = "claude-code"
path = "{npm}"
timeout_s = 240

[[scaffolds]]
kind = "mini-swe-agent"
path = "{venv}"
timeout_s = 240

# Claude Code appends /v1/messages itself: given the /v1 URL it calls
# /v1/v1/messages, gets a 404 and stops without a model call.
[[scaffolds]]
kind = "claude-code"
name = "claude-code-wrong-url"
path = "{npm}"
timeout_s = 120
env = {{ ANTHROPIC_BASE_URL = "{{base_url}}", CLAUDE_CODE_MAX_RETRIES = "0" }}
"#,
        npm = npm.display(),
        venv = venv.display()
    );
    let (run, o) = run_experiment(dir.path(), 2, &body);
    assert!(
        o.status.success(),
        "arbor run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let calls = calls_by_session(&run);
    let rs = results(&run);
    assert_eq!(rs.len(), 6, "{rs:?}");
    for r in &rs {
        if r.key.scaffold == "claude-code-wrong-url" {
            assert_eq!(r.status, Status::InfraError, "{r:?}");
            let f = r.failure.as_ref().expect("failure");
            assert_eq!(f.class, "agent_setup", "{f:?}");
            assert!(f.message.contains("no model call"), "{f:?}");
            continue;
        }
        let rec = agent_record(&run, &r.session);
        assert_eq!(r.status, Status::Passed, "{r:?}\nagent record: {rec}");
        let session = calls.get(&r.session).expect("calls recorded");
        assert!(session.len() >= 2, "{}: {} calls", r.session, session.len());
        for c in session {
            assert!(
                !c.tokens.prompt.is_empty() && !c.tokens.completions[0].ids.is_empty(),
                "{}: call {} has no token ids",
                r.session,
                c.index
            );
        }
        let (seqs, skipped) = arbor_gateway::tree::session_sequences(session);
        assert!(skipped.is_empty(), "{skipped:?}");
        TrajectoryTree::from_sequences(&seqs).expect("tree");
        assert_eq!(rec["exit_code"], 0, "{rec}");
    }
}
