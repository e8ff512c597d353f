//! `arbor node serve` processes driven by `arbor run` with a cluster
//! backend: a run spread over nodes survives a node killed with SIGKILL; a
//! run on a node with less room than the run's concurrency completes (the
//! node refuses, nothing hangs); three nodes in their own network
//! namespaces take a run of 300 rollouts, one of them cut off mid-run.
//! Every rollout is recorded exactly once. Real sandboxes, namespaces and
//! veth links (needs root).
//!
//! The tests run one at a time: each ends by checking that the host holds
//! no sandbox at all, which another test's live sandboxes would fail.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arbor_rollout::record::{RolloutResult, Status};
use serde_json::Value;

mod common;
use common::{ReclaimOnPanic, arbor, assert_nothing_left, reclaim_after_kill};

const TOKEN: &str = "cluster-test-token-5f1c2a9e";

static SERIAL: Mutex<()> = Mutex::new(());

/// Held for a whole test (see the module docs). A test that failed only
/// poisons the lock; the next one still runs.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `arbor node serve`; killed (SIGKILL) when dropped.
struct NodeProc {
    child: Option<Child>,
    addr: String,
}

impl NodeProc {
    /// Starts a node, inside network namespace `netns` if given.
    fn start(netns: Option<&str>, listen: &str, token_file: &Path, extra: &[&str]) -> NodeProc {
        let exe = env!("CARGO_BIN_EXE_arbor");
        let mut c = match netns {
            Some(ns) => {
                // Only the network namespace: the node shares the host's
                // mounts and cgroups like any local sandbox supervisor.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        c.env("ARBOR_LOG", "warn")
            .args(["node", "serve", "--listen", listen, "--token-file"])
            .arg(token_file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawn arbor node serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        NodeProc {
            child: Some(child),
            addr,
        }
    }

    /// One request over a plain socket (HTTP/1.0: the reply body, streamed
    /// or not, ends when the node closes); the status and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).expect("connect to node");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .expect("request");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok());
        (status.unwrap_or(0), body.to_string())
    }

    /// `GET /v1/capacity`.
    fn capacity(&self) -> Value {
        let (_, body) = self.request("GET", "/v1/capacity", "");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("capacity reply {body:?}: {e}"))
    }

    /// Creates a sandbox with the default spec: its id, or the refusal (status, body).
    fn create(&self) -> Result<String, (u16, String)> {
        let (status, body) = self.request("POST", "/v1/sandboxes", "{}");
        let created = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|l| l["created"]["id"].as_str().map(str::to_string));
        created.ok_or((status, body))
    }

    fn destroy(&self, id: &str) {
        let (status, _) = self.request("DELETE", &format!("/v1/sandboxes/{id}"), "");
        assert_eq!(status, 204, "destroying {id}");
    }

    /// SIGTERM and wait: a node drains and exits 0.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        child.wait().expect("wait for the node")
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Declared before a test's nodes, so dropped after them: when the test
/// fails, the nodes are SIGKILLed (their drop) first, then this waits out
/// `gc`'s grace for sandboxes being created and collects what they left.
struct ReclaimKilledNodes;

impl Drop for ReclaimKilledNodes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            drop(ReclaimOnPanic(Instant::now()));
        }
    }
}

fn token_file(dir: &Path) -> PathBuf {
    let f = dir.join("token");
    std::fs::write(&f, format!("{TOKEN}\n")).expect("token file");
    f
}

/// An experiment's shape: `n` tasks of each of the five built-in domains x
/// both white-box scaffolds, `concurrency` in flight, grading mode (the
/// built-in tasks grade in a fresh sandbox unless `fork`).
struct Shape {
    n: u32,
    concurrency: u32,
    fork_grading: bool,
}

impl Shape {
    fn requested(&self) -> usize {
        self.n as usize * 5 * 2
    }
}

/// Writes the experiment for `shape` on `nodes`.
fn experiment(dir: &Path, shape: &Shape, nodes: &[&str], token: &Path) -> PathBuf {
    let mut text = format!(
        "name = \"cluster\"\noutput = \"{out}\"\nconcurrency = {c}\ninfra_retries = 4\n\
         backend = {{ kind = \"cluster\", nodes = {nodes:?}, token_file = \"{token}\", placement_wait_s = 120 }}\n\
         [policy]\nkind = \"scripted-oracle\"\n[timeouts]\nagent_s = 120\n\
         [[scaffolds]]\nkind = \"bash\"\nmax_steps = 40\n[[scaffolds]]\nkind = \"tools\"\nmax_steps = 40\n",
        out = dir.join("run").display(),
        c = shape.concurrency,
        token = token.display(),
    );
    if shape.fork_grading {
        text.push_str("[verifier]\nmode = \"fork\"\n");
    }
    for domain in ["swe", "terminal", "webcoding", "websearch", "general"] {
        text.push_str(&format!(
            "[[datasets]]\ndomain = \"{domain}\"\nn = {}\nseed = 5\n",
            shape.n
        ));
    }
    let f = dir.join("exp.toml");
    std::fs::write(&f, text).expect("experiment");
    f
}

fn recorded(run: &Path) -> Vec<RolloutResult> {
    std::fs::read_to_string(run.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole result line"))
        .collect()
}

fn wait_for_results(run: &Path, at_least: usize, limit: Duration) {
    let t = Instant::now();
    while recorded(run).len() < at_least {
        assert!(
            t.elapsed() < limit,
            "fewer than {at_least} results after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every requested rollout recorded once, and passed (the oracle always passes).
fn assert_exactly_once(run: &Path, requested: usize, summary: &Value) {
    let rs = recorded(run);
    let keys: HashSet<_> = rs.iter().map(|r| r.key.clone()).collect();
    assert_eq!(rs.len(), requested, "recorded {} of {requested}", rs.len());
    assert_eq!(keys.len(), requested, "duplicates in results.jsonl");
    let failed: Vec<_> = rs.iter().filter(|r| r.status != Status::Passed).collect();
    assert!(
        failed.is_empty(),
        "{} not passed, first: {:?}",
        failed.len(),
        failed.first().map(|r| (&r.status, &r.failure))
    );
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["rollouts"], requested, "{summary}");
}

/// The `arbor run` under test, killed (by pid) if the test fails before it ends.
struct RunProc(Option<Child>);

impl RunProc {
    fn spawn(exp: &Path) -> RunProc {
        let child = arbor()
            .args(["run", "--json", "--no-report"])
            .arg(exp)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn arbor run");
        RunProc(Some(child))
    }

    /// Waits for the end (at most `limit`); the JSON summary.
    fn finish(mut self, limit: Duration) -> Value {
        let mut child = self.0.take().expect("running");
        let t = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("arbor run did not finish within {limit:?} (hung)");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let o = child.wait_with_output().expect("arbor run");
        assert!(o.status.success(), "arbor run failed");
        let text = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("summary ({e}): {text}"))
    }
}

impl Drop for RunProc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

/// Three loopback nodes; one is killed with SIGKILL mid-run. Its rollouts
/// are retried on the others: lost 0, duplicates 0.
#[test]
fn run_survives_a_killed_node() {
    let _serial = one_at_a_time();
    let _reclaim = ReclaimKilledNodes;
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path());
    let lo = "127.0.0.1:0";
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|_| NodeProc::start(None, lo, &token, &["--drain-grace-s", "2"]))
        .collect();
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let shape = Shape {
        n: 6,
        concurrency: 9,
        fork_grading: false,
    };
    let exp = experiment(tmp.path(), &shape, &addrs, &token);
    let run = tmp.path().join("run");
    let child = RunProc::spawn(&exp);
    wait_for_results(&run, 12, Duration::from_secs(120));
    // Kill it while it holds sandboxes of rollouts in flight.
    let t = Instant::now();
    while count(&nodes[1].capacity(), "live") == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let in_flight = count(&nodes[1].capacity(), "live");
    nodes[1].kill9();
    let killed_at = Instant::now();
    let before: Vec<u64> = [0, 2]
        .map(|i| count(&nodes[i].capacity(), "created"))
        .into();
    let summary = child.finish(Duration::from_secs(180));
    assert_exactly_once(&run, shape.requested(), &summary);
    let retried = recorded(&run).iter().filter(|r| r.attempts > 1).count();
    assert!(
        in_flight == 0 || retried > 0,
        "{in_flight} sandboxes on the killed node, no rollout retried"
    );
    let after: Vec<u64> = [0, 2]
        .map(|i| count(&nodes[i].capacity(), "created"))
        .into();
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "the survivors took the rest: {before:?} -> {after:?}"
    );
    // SIGTERM drains: exit 0.
    assert!(nodes[0].terminate().success());
    assert!(nodes[2].terminate().success());
    // The killed node's sandboxes died with it; gc removes what it left.
    reclaim_after_kill(killed_at);
}

/// A node with room for 3 sandboxes, full when two orchestrators (run
/// concurrency 4 each) start on it: a create past its room is refused
/// (HTTP 503, kind `capacity`), the runs wait for room, and once it frees up
/// both complete with every rollout passed. Neither orchestrator knows the
/// other's sandboxes, so their placement also meets the node's refusals.
/// No hold-and-wait deadlock between a rollout's sandbox and its grading
/// sandbox, whether grading forks or starts fresh.
fn run_completes_on_a_node_past_capacity(fork_grading: bool) {
    let _serial = one_at_a_time();
    let _reclaim = ReclaimKilledNodes;
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path());
    let mut node = NodeProc::start(None, "127.0.0.1:0", &token, &["--capacity", "3"]);
    let held: Vec<String> = (0..3).map(|_| node.create().expect("room")).collect();
    let (status, body) = node.create().expect_err("a 4th sandbox on a node of 3");
    assert!(
        status == 503 && body.contains("capacity"),
        "{status} {body}"
    );
    let shape = Shape {
        n: 2,
        concurrency: 4,
        fork_grading,
    };
    let runs: Vec<(PathBuf, RunProc)> = ["a", "b"]
        .iter()
        .map(|name| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).expect("run folder");
            let exp = experiment(&dir, &shape, &[node.addr.as_str()], &token);
            (dir.join("run"), RunProc::spawn(&exp))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    for id in &held {
        node.destroy(id);
    }
    for (run, child) in runs {
        let summary = child.finish(Duration::from_secs(300));
        assert_exactly_once(&run, shape.requested(), &summary);
    }
    let cap = node.capacity();
    assert!(count(&cap, "refused") > 0, "{cap}");
    assert!(node.terminate().success());
    assert_nothing_left();
}

#[test]
fn run_completes_on_a_full_node_grading_fresh() {
    run_completes_on_a_node_past_capacity(false);
}

#[test]
fn run_completes_on_a_full_node_grading_forks() {
    run_completes_on_a_node_past_capacity(true);
}

/// `ip netns` + a veth pair per node: node `i` is `10.213.T.(4i+2)` in its
/// own namespace (own loopback), the host end `.(4i+1)`, where `T` and the
/// names come from this process's pid so parallel test processes do not
/// collide. Removed on drop, also when the test fails.
struct Netns {
    tag: u32,
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Netns {
    fn create(count: usize) -> Netns {
        let tag = std::process::id() % 100_000;
        let mut ns = Netns {
            tag,
            names: Vec::new(),
        };
        for i in 0..count {
            let name = format!("arbt{tag}n{i}");
            ip(&["netns", "add", &name]);
            ns.names.push(name.clone());
            let (host, peer) = (ns.host_link(i), format!("arbt{tag}p{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &name]);
            ip(&[
                "addr",
                "add",
                &format!("{}/30", ns.addr(i, 1)),
                "dev",
                &host,
            ]);
            ip(&["link", "set", &host, "up"]);
            let peer_addr = format!("{}/30", ns.addr(i, 2));
            ip(&["-n", &name, "addr", "add", &peer_addr, "dev", &peer]);
            ip(&["-n", &name, "link", "set", &peer, "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// Address `end` (1: host, 2: node) of link `i`.
    fn addr(&self, i: usize, end: usize) -> String {
        format!("10.213.{}.{}", self.tag % 250, 4 * i + end)
    }

    fn host_link(&self, i: usize) -> String {
        format!("arbt{}h{i}", self.tag)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the pair.
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// The acceptance run: three nodes, each in its own network namespace, 300
/// rollouts of the scripted oracle across them; one node's link is cut mid-run.
#[test]
fn three_nodes_in_network_namespaces_take_300_rollouts() {
    let _serial = one_at_a_time();
    let _reclaim = ReclaimKilledNodes;
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path());
    let net = Netns::create(3);
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|i| {
            let listen = format!("{}:7070", net.addr(i, 2));
            let extra = ["--insecure-plaintext", "--drain-grace-s", "2"];
            NodeProc::start(Some(&net.names[i]), &listen, &token, &extra)
        })
        .collect();
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let shape = Shape {
        n: 30,
        concurrency: 16,
        fork_grading: false,
    };
    let exp = experiment(tmp.path(), &shape, &addrs, &token);
    let run = tmp.path().join("run");
    let child = RunProc::spawn(&exp);
    wait_for_results(&run, 90, Duration::from_secs(300));
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| count(&n.capacity(), "created"))
        .collect();
    assert!(
        before.iter().all(|&c| c > 0),
        "work on all three nodes: {before:?}"
    );
    ip(&["link", "set", &net.host_link(1), "down"]);
    let summary = child.finish(Duration::from_secs(300));
    assert_exactly_once(&run, shape.requested(), &summary);
    let after0 = count(&nodes[0].capacity(), "created");
    let after2 = count(&nodes[2].capacity(), "created");
    assert!(
        after0 > before[0] && after2 > before[2],
        "the others took the rest"
    );
    // Every node drains on SIGTERM (the cut-off one destroys what its lost client left).
    for node in &mut nodes {
        assert!(node.terminate().success());
    }
    assert_nothing_left();
}
