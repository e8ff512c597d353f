//! `arbor run` and `arbor serve` end to end, as separate processes: the
//! shipped oracle experiment, kill -9 and --resume, and the env server
//! driven over HTTP by a Python client, with its token, allowed directories
//! and the operator's backend. Real sandboxes (needs root).

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

/// Starts `arbor serve` on a free loopback port with `args`; its URL.
fn start_server(root: &Path, args: &[&std::ffi::OsStr]) -> (Guard, String) {
    let mut child = arbor()
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(root)
        .args(args)
        .env_remove("ARBOR_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("arbor serve");
    let stdout = child.stdout.take().expect("stdout");
    let g = Guard(Some(child));
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (g, url)
}

/// One HTTP/1.1 request on a fresh connection: the status and the body as JSON.
fn http(url: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let addr = url.strip_prefix("http://").expect("http URL");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n{auth}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).expect("reply");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let text = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(text).unwrap_or(Value::String(text.to_string()));
    (status, json)
}

/// The env server, driven over HTTP by a separate Python process (a
/// trainer's point of view) that passes the server's token from
/// `ARBOR_TOKEN`: submit, stream results, fetch a trajectory and its tree.
#[test]
fn env_server_over_http_from_python() {
    let root = tempfile::tempdir().expect("tempdir");
    let token_file = root.path().join("token");
    std::fs::write(&token_file, "py-client-token\n").expect("token file");
    let runs = root.path().join("runs");
    let (_g, url) = start_server(&runs, &["--token-file".as_ref(), token_file.as_ref()]);

    let o = Command::new("python3")
        .arg(repo_root().join("examples/env_client.py"))
        .arg(&url)
        .env("ARBOR_TOKEN", "py-client-token")
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

    let token = Some("py-client-token");
    // A malformed batch gets a clear 400, not a crash.
    let (code, body) = http(&url, "POST", "/v1/batches", token, r#"{"datasets":[]}"#);
    assert_eq!(code, 400, "{body}");

    // A batch may not choose the sandbox backend: a cluster backend would send the contents
    // of a host file it names (the node token) to addresses the client lists.
    let batch = r#"{"datasets":[{"domain":"terminal","n":1}],"scaffolds":[{"kind":"bash"}],"policy":{"kind":"scripted-oracle"},"backend":{"kind":"cluster","nodes":["127.0.0.1:9"],"token_file":"/etc/hostname"}}"#;
    let (code, body) = http(&url, "POST", "/v1/batches", token, batch);
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 400 && msg.contains("`backend` cannot be set"),
        "{code} {body}"
    );
}

/// A batch of one path dataset (and whatever else `extra` adds), scripted oracle, bash.
fn path_batch(dataset: &Path, extra: &str) -> String {
    let d = serde_json::to_string(dataset).expect("path");
    format!(
        r#"{{"datasets":[{{"path":{d}}}],"scaffolds":[{{"kind":"bash"}}],"policy":{{"kind":"scripted-oracle"}}{extra}}}"#
    )
}

/// The one variable `env_server_token_and_allowed_dirs` allows (`--allow-env`), never set.
const ALLOWED_VAR: &str = "ARBOR_TEST_UPSTREAM_KEY_UNSET";

/// A batch of the tasks in `dataset` against an upstream whose key is read from `$var`.
fn upstream_batch(dataset: &Path, var: &str) -> String {
    path_batch(dataset, "").replace(
        r#""policy":{"kind":"scripted-oracle"}"#,
        &format!(
            r#""policy":{{"kind":"upstream","base_urls":["http://127.0.0.1:9/v1"],"model":"m","api_key_env":"{var}"}}"#
        ),
    )
}

/// Generates `n` terminal tasks into `dir` with `arbor task gen`.
fn gen_tasks(dir: &Path, seed: &str) {
    let o = arbor()
        .args([
            "task", "gen", "--domain", "terminal", "--n", "1", "--seed", seed,
        ])
        .arg("--out")
        .arg(dir)
        .output()
        .expect("arbor task gen");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The env server's token and allowed directories: missing and wrong tokens get a JSON 401
/// on every API route (health stays open); host paths outside `--allow-dir`, directly, by
/// `..`, through a symlink or in a loaded task's binds, get a 400 naming the path and the
/// allowed directories before anything runs; a path inside runs; an upstream key from a
/// variable not allowed with `--allow-env` gets a 400 naming it, an allowed one is accepted;
/// a non-loopback listen without a token is refused at start.
#[test]
fn env_server_token_and_allowed_dirs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (allowed, outside, runs) = (
        tmp.path().join("allowed"),
        tmp.path().join("outside"),
        tmp.path().join("runs"),
    );
    gen_tasks(&allowed.join("tasks"), "11");
    gen_tasks(&outside.join("tasks"), "12");
    std::os::unix::fs::symlink(outside.join("tasks"), allowed.join("link")).expect("symlink");
    // A task inside the allowed directory that binds a host path outside it.
    let file = std::fs::read_dir(allowed.join("tasks"))
        .expect("tasks")
        .next()
        .expect("one task")
        .expect("entry")
        .path();
    let mut task: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("task")).expect("json");
    task["environment"]["binds"] = serde_json::json!([{"source": outside, "target": "/mnt/o"}]);
    std::fs::create_dir_all(allowed.join("binds")).expect("mkdir");
    std::fs::write(allowed.join("binds/t.json"), task.to_string()).expect("write");
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "right-token\n").expect("token");
    let (_g, url) = start_server(
        &runs,
        &[
            "--token-file".as_ref(),
            token_file.as_ref(),
            "--allow-dir".as_ref(),
            allowed.as_ref(),
            "--allow-env".as_ref(),
            ALLOWED_VAR.as_ref(),
        ],
    );
    let inside = path_batch(&allowed.join("tasks"), "");

    assert_eq!(http(&url, "GET", "/health", None, "").0, 200);
    for (path, method, body) in [
        ("/v1/batches", "GET", ""),
        ("/v1/batches", "POST", inside.as_str()),
        ("/v1/batches/b000001", "GET", ""),
        ("/v1/batches/b000001/results", "GET", ""),
    ] {
        let (code, body) = http(&url, method, path, None, body);
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            code == 401 && msg.contains("required"),
            "{path}: {code} {body}"
        );
        let (code, body) = http(&url, method, path, Some("wrong-token"), "");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            code == 401 && msg.contains("wrong"),
            "{path}: {code} {body}"
        );
    }
    let token = Some("right-token");
    let (code, body) = http(&url, "GET", "/v1/batches", token, "");
    assert_eq!(
        (code, &body["batches"]),
        (200, &serde_json::json!([])),
        "{body}"
    );

    let allowed_c = std::fs::canonicalize(&allowed).expect("canonical");
    let outside_c = std::fs::canonicalize(outside.join("tasks")).expect("canonical");
    let refused = [
        (path_batch(&outside.join("tasks"), ""), "datasets[0].path"),
        (
            path_batch(&allowed.join("../outside/tasks"), ""),
            "datasets[0].path",
        ),
        (path_batch(&allowed.join("link"), ""), "datasets[0].path"),
        (
            path_batch(&allowed.join("binds"), ""),
            "environment.binds[0].source",
        ),
        (
            path_batch(&allowed.join("tasks"), r#","gateway":{"tokenizer":"/etc"}"#),
            "gateway.tokenizer",
        ),
    ];
    for (batch, field) in &refused {
        let (code, body) = http(&url, "POST", "/v1/batches", token, batch);
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(code, 400, "{batch}: {body}");
        assert!(msg.contains(field), "{field}: {msg}");
        assert!(msg.contains("outside the directories"), "{msg}");
        assert!(msg.contains(&allowed_c.display().to_string()), "{msg}");
    }
    let (_, body) = http(&url, "POST", "/v1/batches", token, &refused[2].0);
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&outside_c.display().to_string()),
        "names the target: {msg}"
    );
    // An upstream key from any variable but the allowed ones: refused, naming it.
    for var in ["AWS_SECRET_ACCESS_KEY", "ARBOR_NODE_TOKEN"] {
        let batch = upstream_batch(&allowed.join("tasks"), var);
        let (code, body) = http(&url, "POST", "/v1/batches", token, &batch);
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(code, 400, "{var}: {body}");
        assert!(
            msg.contains("policy.api_key_env") && msg.contains(&format!("`{var}`")),
            "{msg}"
        );
    }
    let (_, body) = http(
        &url,
        "POST",
        "/v1/batches",
        token,
        &upstream_batch(&allowed.join("tasks"), "AWS_SECRET_ACCESS_KEY"),
    );
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(ALLOWED_VAR) && msg.contains("arbor serve --allow-env VAR"),
        "names the allowed variables and how to allow one: {msg}"
    );
    // Nothing ran: no batch, no run directory.
    let (_, body) = http(&url, "GET", "/v1/batches", token, "");
    assert_eq!(body["batches"], serde_json::json!([]), "{body}");
    assert_eq!(std::fs::read_dir(&runs).expect("runs").count(), 0);

    // Inside the allowed directory: it runs.
    let (code, body) = http(&url, "POST", "/v1/batches", token, &inside);
    assert_eq!(code, 201, "{body}");
    let status = format!("/v1/batches/{}", body["id"].as_str().expect("id"));
    let until = Instant::now() + Duration::from_secs(180);
    let done = loop {
        let (_, s) = http(&url, "GET", &status, token, "");
        if s["state"] != "running" || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["passed"], 1, "{done}");

    // The allowed variable passes the check: the batch is accepted and reads it from the
    // server's environment (unset there, so the run stops before any rollout, naming it).
    let batch = upstream_batch(&allowed.join("tasks"), ALLOWED_VAR);
    let (code, body) = http(&url, "POST", "/v1/batches", token, &batch);
    assert_eq!(code, 201, "{body}");
    let status = format!("/v1/batches/{}", body["id"].as_str().expect("id"));
    let until = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let (_, s) = http(&url, "GET", &status, token, "");
        if s["state"] != "running" || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ended["state"], "failed", "{ended}");
    let err = ended["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(&format!("${ALLOWED_VAR} is not set")),
        "{ended}"
    );

    // Off loopback without a token: refused at start, with the reason.
    let mut child = arbor()
        .args(["serve", "--listen", "0.0.0.0:0", "--root"])
        .arg(&runs)
        .env_remove("ARBOR_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("arbor serve");
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let o = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("without a token"),
        "{err}"
    );
}

/// `arbor serve --backend-file`: every batch runs on the operator's backend, here a cluster
/// of one `arbor node serve` on loopback, which creates the batch's sandboxes.
#[test]
fn env_server_runs_batches_on_the_operators_backend() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("node-token"), "node-secret\n").expect("token");
    let node_log = std::fs::File::create(tmp.path().join("node.log")).expect("log");
    let mut node = arbor()
        .args(["node", "serve", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(tmp.path().join("node-token"))
        .env("ARBOR_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(node_log)
        .spawn()
        .expect("arbor node serve");
    let stdout = node.stdout.take().expect("stdout");
    let _node = Guard(Some(node));
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("line");
    let node_url = line.trim().strip_prefix("listening on ").expect("node URL");
    // Relative paths in the file are taken from its folder.
    let backend =
        format!("kind = \"cluster\"\nnodes = [\"{node_url}\"]\ntoken_file = \"node-token\"\n");
    std::fs::write(tmp.path().join("backend.toml"), backend).expect("backend file");
    let backend_file = tmp.path().join("backend.toml");
    let (_g, url) = start_server(
        &tmp.path().join("runs"),
        &["--backend-file".as_ref(), backend_file.as_ref()],
    );
    let batch = r#"{"datasets":[{"domain":"terminal","n":2,"seed":4}],"scaffolds":[{"kind":"bash"}],"policy":{"kind":"scripted-oracle"}}"#;
    let (code, body) = http(&url, "POST", "/v1/batches", None, batch);
    assert_eq!(code, 201, "{body}");
    let status = format!("/v1/batches/{}", body["id"].as_str().expect("id"));
    let until = Instant::now() + Duration::from_secs(180);
    let done = loop {
        let (_, s) = http(&url, "GET", &status, None, "");
        if s["state"] != "running" || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["passed"], 2, "{done}");
    let log = std::fs::read_to_string(tmp.path().join("node.log")).expect("node log");
    let created = log.lines().filter(|l| l.contains("created")).count();
    assert!(created >= 2, "the node created the sandboxes: {log}");
}
