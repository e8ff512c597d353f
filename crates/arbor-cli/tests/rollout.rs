//! `arbor run` and `arbor serve` end to end, as separate processes: the
//! shipped oracle experiment, kill -9 and --resume, and the env server
//! driven over HTTP by a Python client. Real sandboxes (needs root).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arbor_gateway::CallRecord;
use arbor_rollout::record::{RolloutResult, Status};
use arbor_tree::TrajectoryTree;
use serde_json::Value;

mod common;
use common::{Guard, ReclaimOnPanic, arbor, reclaim_after_kill};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn results(dir: &Path) -> Vec<RolloutResult> {
    let text = std::fs::read_to_string(dir.join("results.jsonl")).expect("results.jsonl");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("every line is a whole result"))
        .collect()
}

fn last_json_line(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary JSON ({e}): {text}"))
}

fn all_calls(dir: &Path) -> HashMap<String, Vec<CallRecord>> {
    let text = std::fs::read_to_string(dir.join("gateway/calls.jsonl")).expect("gateway store");
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

/// The shipped `examples/oracle-all.toml`: scripted-oracle, bash and tools
/// scaffolds, all five domains. Every rollout passes, and each rollout's
/// recorded session forms a tree whose paths reproduce its calls exactly.
#[test]
fn oracle_all_example_passes_and_trees_reproduce_calls() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut g = Guard(None);
    let o = arbor()
        .arg("run")
        .arg(repo_root().join("examples/oracle-all.toml"))
        .arg("--out")
        .arg(out.path())
        .arg("--json")
        .output()
        .expect("arbor run");
    g.0 = None;
    assert!(
        o.status.success(),
        "arbor run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = last_json_line(&o.stdout);
    assert_eq!(s["requested"], 100, "{s}");
    assert_eq!(s["rollouts"], 100, "{s}");
    assert_eq!(s["passed"], 100, "{s}");
    assert_eq!(s["lost"], 0, "{s}");
    assert_eq!(s["infra_errors"], 0, "{s}");

    let rs = results(out.path());
    let domains: BTreeSet<&str> = rs.iter().map(|r| r.domain.as_str()).collect();
    assert_eq!(domains.len(), 5, "{domains:?}");
    let scaffolds: BTreeSet<&str> = rs.iter().map(|r| r.key.scaffold.as_str()).collect();
    assert_eq!(scaffolds, BTreeSet::from(["bash", "tools"]));

    let calls = all_calls(out.path());
    for r in &rs {
        assert_eq!(r.status, Status::Passed, "{r:?}");
        let session = calls
            .get(&r.session)
            .unwrap_or_else(|| panic!("no calls recorded for {}", r.session));
        assert_eq!(
            session.len() as u32,
            r.turns,
            "one call per turn: {}",
            r.session
        );
        let (seqs, skipped) = arbor_gateway::tree::session_sequences(session);
        assert!(skipped.is_empty(), "{skipped:?}");
        let tree = TrajectoryTree::from_sequences(&seqs).expect("tree");
        let paths = tree.paths();
        for (call, seq) in session.iter().zip(&seqs) {
            let path = paths
                .iter()
                .find(|p| p.id == seq.id)
                .expect("path per call");
            let mut expected = call.tokens.prompt.clone();
            expected.extend_from_slice(&call.tokens.completions[0].ids);
            assert_eq!(
                path.tokens, expected,
                "path of {} reproduces its call",
                call.id
            );
        }
    }
    assert!(out.path().join("report.md").exists(), "report written");
}

fn write_experiment(dir: &Path, n: usize) -> PathBuf {
    let exp = format!(
        r#"name = "resume-test"
output = "{out}"
samples = 1
concurrency = 4

[[datasets]]
domain = "terminal"
n = {n}
seed = 5

[[scaffolds]]
kind = "bash"
max_steps = 40

[policy]
kind = "scripted-oracle"
"#,
        out = dir.join("run").display()
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, exp).expect("write experiment");
    p
}

/// `kill -9` of `arbor run` midway, then `--resume`: the run completes with
/// every requested rollout recorded exactly once, even after a torn write.
#[test]
fn kill_9_then_resume_completes_without_loss_or_duplicates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = 40;
    let exp = write_experiment(tmp.path(), n);
    let run_dir = tmp.path().join("run");
    let child = arbor()
        .arg("run")
        .arg(&exp)
        .arg("--no-report")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn arbor run");
    let mut g = Guard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = std::fs::read_to_string(run_dir.join("results.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 8 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the deadline");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut child = g.0.take().expect("child");
    // SIGKILL: no chance to clean up or flush anything.
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let killed_at = Instant::now();
    let _reclaim = ReclaimOnPanic(killed_at);
    let before = std::fs::read_to_string(run_dir.join("results.jsonl")).expect("results");
    let recorded_before = before.lines().count();
    assert!(recorded_before < n, "killed too late to test resume");
    // Reclaim the dead run's sandboxes, as an operator would.
    let gc = arbor().args(["sandbox", "gc"]).output().expect("gc");
    assert!(
        gc.status.success(),
        "{} {}",
        String::from_utf8_lossy(&gc.stdout),
        String::from_utf8_lossy(&gc.stderr)
    );
    // A torn write: half a line at the end, as a crash mid-write leaves.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(run_dir.join("results.jsonl"))
        .expect("open results");
    f.write_all(br#"{"task_id":"terminal-tr"#)
        .expect("torn line");
    drop(f);

    // Without --resume the directory is refused, untouched.
    let refused = arbor().arg("run").arg(&exp).output().expect("arbor run");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--resume"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let o = arbor()
        .arg("run")
        .arg(&exp)
        .args(["--resume", "--json", "--no-report"])
        .output()
        .expect("resume");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = last_json_line(&o.stdout);
    assert_eq!(s["requested"], n, "{s}");
    assert_eq!(s["rollouts"], n, "{s}");
    assert_eq!(s["lost"], 0, "{s}");
    assert_eq!(s["infra_errors"], 0, "{s}");
    assert_eq!(s["passed"], n, "{s}");
    assert!(
        s["new_rollouts"].as_u64().expect("new") as usize <= n - recorded_before,
        "{s}"
    );
    let rs = results(&run_dir);
    assert_eq!(rs.len(), n, "one line per rollout, torn line cut");
    let keys: BTreeSet<_> = rs.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), n, "no duplicates");
    // No session mixes two attempts: each passed rollout's session holds
    // exactly its own turns.
    let calls = all_calls(&run_dir);
    for r in &rs {
        assert_eq!(
            calls.get(&r.session).map_or(0, Vec::len) as u32,
            r.turns,
            "{}",
            r.session
        );
    }
    reclaim_after_kill(killed_at);
}

/// The env server, driven over HTTP by a separate Python process (a
/// trainer's point of view): submit, stream results, fetch a trajectory and
/// its tree.
#[test]
fn env_server_over_http_from_python() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut child = arbor()
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("arbor serve");
    let stdout = child.stdout.take().expect("stdout");
    let _g = Guard(Some(child));
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();

    let o = Command::new("python3")
        .arg(repo_root().join("examples/env_client.py"))
        .arg(&url)
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = last_json_line(&o.stdout);
    assert_eq!(s["requested"], 8, "{s}");
    assert_eq!(s["streamed"], 8, "{s}");
    assert_eq!(s["distinct"], 8, "{s}");
    assert_eq!(s["passed"], 8, "{s}");
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["summary_lost"], 0, "{s}");
    assert_eq!(s["trajectory_calls"], s["turns_of_first"], "{s}");
    assert!(s["tree_paths"].as_u64().unwrap_or(0) >= 1, "{s}");
    assert!(s["tree_error"].is_null(), "{s}");

    // A malformed batch gets a clear 400, not a crash.
    let bad = Command::new("python3")
        .args([
            "-c",
            "import sys,urllib.request,urllib.error\n\
             r=urllib.request.Request(sys.argv[1]+'/v1/batches',data=b'{\"datasets\":[]}',method='POST')\n\
             try:\n  urllib.request.urlopen(r)\nexcept urllib.error.HTTPError as e:\n  print(e.code, e.read().decode())",
        ])
        .arg(&url)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.starts_with("400"), "{text}");

    // A batch may not choose the sandbox backend: a cluster backend would send the contents
    // of a host file it names (the node token) to addresses the client lists.
    let batch = r#"{"datasets":[{"domain":"terminal","n":1}],"scaffolds":[{"kind":"bash"}],"policy":{"kind":"scripted-oracle"},"backend":{"kind":"cluster","nodes":["127.0.0.1:9"],"token_file":"/etc/hostname"}}"#;
    let refused = Command::new("python3")
        .args([
            "-c",
            "import sys,urllib.request,urllib.error\n\
             r=urllib.request.Request(sys.argv[1]+'/v1/batches',data=sys.argv[2].encode(),method='POST')\n\
             try:\n  urllib.request.urlopen(r)\nexcept urllib.error.HTTPError as e:\n  print(e.code, e.read().decode())",
        ])
        .arg(&url)
        .arg(batch)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(
        text.starts_with("400") && text.contains("`backend` cannot be set"),
        "{text}"
    );
}
