//! `arbor node serve` processes driven by `arbor run` with a cluster
//! backend: a run spread over nodes survives a node killed with SIGKILL and
//! a node at capacity; three nodes in their own network namespaces take a
//! run of 300 rollouts, one of them cut off mid-run. Every rollout is
//! recorded exactly once. Real sandboxes, namespaces and veth links (needs root).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbor_rollout::record::{RolloutResult, Status};
use serde_json::Value;

mod common;
use common::{ReclaimOnPanic, arbor, assert_nothing_left, reclaim_after_kill};

const TOKEN: &str = "cluster-test-token-5f1c2a9e";

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

    /// `GET /v1/capacity`, over a plain socket.
    fn capacity(&self) -> Value {
        let mut s = TcpStream::connect(&self.addr).expect("connect to node");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(
            s,
            "GET /v1/capacity HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .expect("request");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|e| panic!("capacity reply {reply:?}: {e}"))
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

fn token_file(dir: &Path) -> PathBuf {
    let f = dir.join("token");
    std::fs::write(&f, format!("{TOKEN}\n")).expect("token file");
    f
}

/// An experiment over `domains` x `n` tasks x both white-box scaffolds on the given nodes.
fn experiment(dir: &Path, n: u32, concurrency: u32, nodes: &[&str], token: &Path) -> PathBuf {
    let mut text = format!(
        "name = \"cluster\"\noutput = \"{out}\"\nconcurrency = {concurrency}\ninfra_retries = 4\n\
         backend = {{ kind = \"cluster\", nodes = {nodes:?}, token_file = \"{token}\", placement_wait_s = 30 }}\n\
         [policy]\nkind = \"scripted-oracle\"\n[timeouts]\nagent_s = 120\n\
         [[scaffolds]]\nkind = \"bash\"\nmax_steps = 40\n[[scaffolds]]\nkind = \"tools\"\nmax_steps = 40\n",
        out = dir.join("run").display(),
        token = token.display(),
    );
    for domain in ["swe", "terminal", "webcoding", "websearch", "general"] {
        text.push_str(&format!(
            "[[datasets]]\ndomain = \"{domain}\"\nn = {n}\nseed = 5\n"
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
        "not passed: {:?}",
        failed.first().map(|r| (&r.status, &r.failure))
    );
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["rollouts"], requested, "{summary}");
}

fn run_to_end(child: Child) -> Value {
    let o = child.wait_with_output().expect("arbor run");
    assert!(o.status.success(), "arbor run failed");
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary ({e}): {text}"))
}

fn spawn_run(exp: &Path) -> Child {
    arbor()
        .args(["run", "--json", "--no-report"])
        .arg(exp)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn arbor run")
}

/// Three loopback nodes, one with room for only 2 sandboxes; one is killed
/// with SIGKILL mid-run. Its rollouts are retried on the others.
#[test]
#[ignore = "not yet passing end to end; run with --ignored (issue 23)"]
fn run_survives_a_killed_node_and_a_full_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path());
    let lo = "127.0.0.1:0";
    let mut small = NodeProc::start(None, lo, &token, &["--capacity", "2"]);
    let mut doomed = NodeProc::start(None, lo, &token, &[]);
    let mut other = NodeProc::start(None, lo, &token, &[]);
    let nodes = [
        small.addr.as_str(),
        doomed.addr.as_str(),
        other.addr.as_str(),
    ];
    let (n, requested) = (8, 8 * 5 * 2);
    let exp = experiment(tmp.path(), n, 8, &nodes, &token);
    let run = tmp.path().join("run");
    let child = spawn_run(&exp);
    wait_for_results(&run, 15, Duration::from_secs(120));
    let in_flight = doomed.capacity()["live"].as_u64().unwrap_or(0);
    doomed.kill9();
    let _reclaim = ReclaimOnPanic(Instant::now());
    let killed_at = Instant::now();
    let summary = run_to_end(child);
    assert_exactly_once(&run, requested, &summary);
    let retried = recorded(&run).iter().filter(|r| r.attempts > 1).count();
    assert!(
        in_flight == 0 || retried > 0,
        "{in_flight} in flight on the killed node, none retried"
    );
    assert!(small.capacity()["live"].as_u64() <= Some(2));
    assert!(other.capacity()["created"].as_u64() > Some(0));
    // SIGTERM drains: exit 0, nothing left.
    assert!(small.terminate().success());
    assert!(other.terminate().success());
    // The killed node's sandboxes died with it; gc removes what it left.
    reclaim_after_kill(killed_at);
}

/// `ip netns` + a veth pair per node: its own address in 198.51.100.0/24,
/// its own loopback. Removed on drop, also when the test fails.
struct Netns {
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
    /// Node `i` is `198.51.100.(4i+2)` in namespace `names[i]`; the host end is `.(4i+1)`.
    fn create(count: usize) -> Netns {
        let tag = std::process::id() % 100_000;
        let mut ns = Netns { names: Vec::new() };
        for i in 0..count {
            let name = format!("arbt{tag}n{i}");
            ip(&["netns", "add", &name]);
            ns.names.push(name.clone());
            let (host, peer) = (format!("arbt{tag}h{i}"), format!("arbt{tag}p{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &name]);
            ip(&[
                "addr",
                "add",
                &format!("198.51.100.{}/30", 4 * i + 1),
                "dev",
                &host,
            ]);
            ip(&["link", "set", &host, "up"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("198.51.100.{}/30", 4 * i + 2),
                "dev",
                &peer,
            ]);
            ip(&["-n", &name, "link", "set", &peer, "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ns
    }

    fn host_link(&self, i: usize) -> String {
        self.names[i].replace(&format!("n{i}"), &format!("h{i}"))
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
#[ignore = "never run yet; run with --ignored (issue 23)"]
fn three_nodes_in_network_namespaces_take_300_rollouts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path());
    let net = Netns::create(3);
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|i| {
            let listen = format!("198.51.100.{}:7070", 4 * i + 2);
            let extra = ["--insecure-plaintext", "--drain-grace-s", "2"];
            NodeProc::start(Some(&net.names[i]), &listen, &token, &extra)
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (n, requested) = (30, 30 * 5 * 2);
    let exp = experiment(tmp.path(), n, 16, &addrs, &token);
    let run = tmp.path().join("run");
    let child = spawn_run(&exp);
    wait_for_results(&run, 90, Duration::from_secs(300));
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| n.capacity()["created"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        before.iter().all(|&c| c > 0),
        "work on all three nodes: {before:?}"
    );
    ip(&["link", "set", &net.host_link(1), "down"]);
    let summary = run_to_end(child);
    assert_exactly_once(&run, requested, &summary);
    let after0 = nodes[0].capacity()["created"].as_u64().unwrap_or(0);
    let after2 = nodes[2].capacity()["created"].as_u64().unwrap_or(0);
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
