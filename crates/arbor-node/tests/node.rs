//! The node agent in-process with real local sandboxes: the remote backend
//! against it (exec, files, fork, destroy), the token, TLS, capacity,
//! draining, idle leases, and the cluster backend's placement and failover.
//!
//! A custom harness: this binary is its own sandbox init. Needs root.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_node::protocol::{ErrorBody, ErrorKind};
use arbor_node::server::{self, RunningNode};
use arbor_node::{ClientOptions, ClusterBackend, ClusterConfig, NodeConfig, RemoteBackend};
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_sandbox::{Backend, ExecRequest, SandboxError, SandboxSpec};
use libtest_mimic::{Arguments, Failed, Trial};

const TOKEN: &str = "test-token-0123456789abcdef";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn local() -> Arc<dyn Backend> {
    Arc::new(LocalBackend::new(LocalConfig::default()).expect("local backend (needs root)"))
}

async fn node(cfg: NodeConfig) -> RunningNode {
    server::start(cfg, local(), None)
        .await
        .expect("node starts")
}

fn opts() -> ClientOptions {
    ClientOptions::new(TOKEN)
}

fn check(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(msg.into().into()) }
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<(), Failed> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn remote_sandbox_does_what_a_local_one_does() -> Result<(), Failed> {
    rt().block_on(async {
        let n = node(NodeConfig::loopback(TOKEN)).await;
        let b = RemoteBackend::new(&n.addr.to_string(), &opts())?;
        let sb = b.create(&SandboxSpec::default()).await?;
        // Output on both streams, exit code, stdin, and output larger than one chunk.
        let r = sb
            .exec(
                ExecRequest::shell(
                    "cat; echo out; echo err >&2; head -c 200000 /dev/zero | tr '\\0' x; exit 3",
                )
                .stdin("in\n"),
            )
            .await?;
        check(r.exit_code == 3, format!("exit code {}", r.exit_code))?;
        check(
            r.stdout.starts_with(b"in\nout\n") && r.stdout.len() == 7 + 200_000,
            "stdout",
        )?;
        check(
            r.stderr_str() == "err\n",
            format!("stderr {:?}", r.stderr_str()),
        )?;
        let t = sb
            .exec(ExecRequest::shell("sleep 5").timeout(Duration::from_millis(300)))
            .await?;
        check(t.timed_out, "timeout crosses the wire")?;
        // Files: binary content, mode, missing file is the caller's error.
        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        sb.write_file("/workspace/d/bin", &data, 0o755).await?;
        check(
            sb.read_file("/workspace/d/bin").await? == data,
            "file round trip",
        )?;
        let mode = sb
            .exec(ExecRequest::shell("stat -c %a /workspace/d/bin"))
            .await?;
        check(
            mode.stdout_str().trim() == "755",
            format!("mode {}", mode.stdout_str()),
        )?;
        match sb.read_file("/nope").await {
            Err(e @ SandboxError::File { .. }) => {
                check(!e.is_infrastructure(), "file error is the caller's")?
            }
            other => return Err(format!("missing file: {other:?}").into()),
        }
        // Tar both ways.
        let tar = sb.read_tar("/workspace/d").await?;
        sb.write_tar("/workspace/e", tar).await?;
        check(
            sb.read_file("/workspace/e/bin").await? == data,
            "tar round trip",
        )?;
        // Fork: same node, sees the parent's files, independent afterwards.
        let child = sb.fork().await?;
        check(n.live() == 2, format!("live after fork {}", n.live()))?;
        child
            .write_file("/workspace/only-child", b"c", 0o644)
            .await?;
        check(
            child.read_file("/workspace/d/bin").await? == data,
            "fork copies state",
        )?;
        check(
            sb.read_file("/workspace/only-child").await.is_err(),
            "fork is independent",
        )?;
        child.destroy().await?;
        sb.destroy().await?;
        sb.destroy().await?; // idempotent
        check(n.live() == 0, format!("live after destroy {}", n.live()))?;
        match sb.exec(ExecRequest::shell("true")).await {
            Err(SandboxError::Gone { .. }) => Ok(()),
            other => Err(format!("exec after destroy: {other:?}").into()),
        }
    })
}

fn wrong_or_missing_token_is_refused() -> Result<(), Failed> {
    rt().block_on(async {
        let n = node(NodeConfig::loopback(TOKEN)).await;
        let b = RemoteBackend::new(&n.addr.to_string(), &ClientOptions::new("wrong"))?;
        let e = match b.create(&SandboxSpec::default()).await {
            Err(e) => e,
            Ok(_) => return Err("a wrong token created a sandbox".into()),
        };
        check(e.to_string().contains("wrong bearer token"), format!("{e}"))?;
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/v1/sandboxes", n.url()))
            .body("{}")
            .send()
            .await?;
        check(r.status() == 401, format!("no token: {}", r.status()))?;
        let body: ErrorBody = r.json().await?;
        check(body.kind == ErrorKind::Unauthorized, format!("{body:?}"))?;
        let h = http.get(format!("{}/health", n.url())).send().await?;
        check(h.status() == 200, "health needs no token")?;
        check(n.live() == 0, "nothing created")
    })
}

fn capacity_refusal_and_cluster_places_elsewhere() -> Result<(), Failed> {
    rt().block_on(async {
        let small = node(NodeConfig {
            capacity: 1,
            ..NodeConfig::loopback(TOKEN)
        })
        .await;
        let big = node(NodeConfig {
            capacity: 8,
            ..NodeConfig::loopback(TOKEN)
        })
        .await;
        let one = RemoteBackend::new(&small.addr.to_string(), &opts())?;
        let a = one.create(&SandboxSpec::default()).await?;
        // Past capacity: HTTP 503 with a JSON reason, and still healthy.
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/v1/sandboxes", small.url()))
            .bearer_auth(TOKEN)
            .json(&SandboxSpec::default())
            .send()
            .await?;
        check(r.status() == 503, format!("status {}", r.status()))?;
        let body: ErrorBody = r.json().await?;
        check(
            body.kind == ErrorKind::Capacity && body.message.contains("1 live"),
            format!("{body:?}"),
        )?;
        let e = one
            .create(&SandboxSpec::default())
            .await
            .err()
            .ok_or("second create succeeded")?;
        check(e.is_infrastructure(), "a capacity refusal is retryable")?;
        let h = http.get(format!("{}/health", small.url())).send().await?;
        check(h.status() == 200, "healthy at capacity")?;
        // A full node still admits a sandbox's first fork (its grading copy),
        // not a second one nor a fork of the fork; the room comes back.
        let f = a.fork().await?;
        check(
            small.live() == 2,
            format!("live {} after a first fork", small.live()),
        )?;
        let again = a.fork().await.err().ok_or("a second fork past capacity")?;
        check(again.is_infrastructure(), format!("{again}"))?;
        check(f.fork().await.is_err(), "a fork of a fork past capacity")?;
        f.destroy().await?;
        a.fork().await?.destroy().await?;
        let cap: serde_json::Value = http
            .get(format!("{}/v1/capacity", small.url()))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        check(cap["refused"] == 4, format!("{cap}"))?;
        // The cluster puts the rest on the node with room.
        let cfg = ClusterConfig::new(vec![small.addr.to_string(), big.addr.to_string()], opts());
        let cluster = ClusterBackend::new(cfg).await?;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(cluster.create(&SandboxSpec::default()).await?);
        }
        check(
            small.live() == 1 && big.live() == 4,
            format!("live {} / {}", small.live(), big.live()),
        )?;
        for sb in held {
            sb.destroy().await?;
        }
        a.destroy().await?;
        check(small.live() + big.live() == 0, "all destroyed")
    })
}

fn self_signed(
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf, Vec<u8>), Failed> {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.key_pair.serialize_pem())?;
    Ok((cert, key, ck.cert.pem().into_bytes()))
}

fn tls_and_plaintext_rules() -> Result<(), Failed> {
    rt().block_on(async {
        let tmp = tempfile::tempdir()?;
        let (cert, key, ca) = self_signed(tmp.path())?;
        let n = node(NodeConfig {
            tls: Some((cert, key)),
            ..NodeConfig::loopback(TOKEN)
        })
        .await;
        check(n.url().starts_with("https://"), n.url())?;
        let mut o = opts();
        o.ca_pem = Some(ca);
        let b = RemoteBackend::new(&n.addr.to_string(), &o)?;
        let sb = b.create(&SandboxSpec::default()).await?;
        let r = sb.exec(ExecRequest::shell("echo tls")).await?;
        check(r.stdout_str() == "tls\n", r.stdout_str())?;
        sb.destroy().await?;
        // A client that does not trust the certificate gets a transport (infrastructure) error.
        let mut untrusting = opts();
        untrusting.tls = true;
        let e = RemoteBackend::new(&n.addr.to_string(), &untrusting)?
            .create(&SandboxSpec::default())
            .await
            .err()
            .ok_or("an untrusted certificate was accepted")?;
        check(
            matches!(e, SandboxError::Io { .. }) && e.is_infrastructure(),
            format!("{e}"),
        )?;
        // Plaintext off loopback is refused unless asked for explicitly.
        let open = NodeConfig {
            listen: "0.0.0.0:0".parse()?,
            ..NodeConfig::loopback(TOKEN)
        };
        let e = server::start(open.clone(), local(), None)
            .await
            .err()
            .ok_or("plaintext on 0.0.0.0 accepted")?;
        check(
            e.to_string().contains("--insecure-plaintext"),
            e.to_string(),
        )?;
        let ok = server::start(
            NodeConfig {
                insecure_plaintext: true,
                ..open
            },
            local(),
            None,
        )
        .await;
        check(ok.is_ok(), "--insecure-plaintext allows it")?;
        check(n.live() == 0, "all destroyed")
    })
}

fn drain_refuses_new_and_destroys_the_rest() -> Result<(), Failed> {
    rt().block_on(async {
        let n = Arc::new(node(NodeConfig::loopback(TOKEN)).await);
        let b = RemoteBackend::new(&n.addr.to_string(), &opts())?;
        let kept = b.create(&SandboxSpec::default()).await?;
        let running = b.create(&SandboxSpec::default()).await?;
        let exec = tokio::spawn(async move {
            let r = running
                .exec(ExecRequest::shell("sleep 1.5; echo finished"))
                .await;
            let _ = running.destroy().await;
            r
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let drainer = n.clone();
        let drain = tokio::spawn(async move { drainer.drain(Duration::from_secs(3)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let e = b
            .create(&SandboxSpec::default())
            .await
            .err()
            .ok_or("created while draining")?;
        check(e.to_string().contains("draining"), e.to_string())?;
        // The running command finishes during the grace period.
        let r = exec.await??;
        check(r.stdout_str() == "finished\n", r.stdout_str())?;
        let destroyed = drain.await?;
        check(destroyed == 1, format!("destroyed {destroyed}"))?;
        check(n.live() == 0, "nothing left")?;
        match kept.exec(ExecRequest::shell("true")).await {
            Err(SandboxError::Gone { .. }) => Ok(()),
            other => Err(format!("a drained sandbox answered: {other:?}").into()),
        }
    })
}

fn idle_lease_reclaims_an_abandoned_sandbox() -> Result<(), Failed> {
    rt().block_on(async {
        let cfg = NodeConfig {
            idle_ttl: Duration::from_millis(800),
            ..NodeConfig::loopback(TOKEN)
        };
        let n = node(cfg).await;
        let b = RemoteBackend::new(&n.addr.to_string(), &opts())?;
        let sb = b.create(&SandboxSpec::default()).await?;
        // A command longer than the lease keeps it alive (busy sandboxes are not reaped).
        let r = sb.exec(ExecRequest::shell("sleep 1.5; echo alive")).await?;
        check(r.stdout_str() == "alive\n", r.stdout_str())?;
        // Abandoned (the client keeps the handle but stops talking): reclaimed.
        wait_until("the lease to expire", Duration::from_secs(5), || {
            n.live() == 0
        })
        .await?;
        std::mem::forget(sb); // its Drop would ask the node again; nothing is left to ask for
        Ok(())
    })
}

/// A node in its own runtime, so the test can make it vanish (every
/// connection dropped at once).
fn node_in_own_runtime(
    cfg: NodeConfig,
) -> (
    std::net::SocketAddr,
    tokio::runtime::Runtime,
    Arc<RunningNode>,
) {
    let own = rt();
    let n = Arc::new(own.block_on(node(cfg)));
    (n.addr, own, n)
}

fn cluster_fails_over_from_a_vanished_node() -> Result<(), Failed> {
    let (dying_addr, dying_rt, dying) = node_in_own_runtime(NodeConfig::loopback(TOKEN));
    rt().block_on(async {
        let stay = node(NodeConfig::loopback(TOKEN)).await;
        // An address where nothing listens is simply down.
        let nobody = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut cfg = ClusterConfig::new(
            vec![
                dying_addr.to_string(),
                stay.addr.to_string(),
                nobody.to_string(),
            ],
            opts(),
        );
        cfg.refresh = Duration::from_millis(200);
        let cluster = ClusterBackend::new(cfg).await?;
        let status = cluster.nodes();
        check(
            status.iter().filter(|s| s.up).count() == 2,
            format!("{status:?}"),
        )?;
        // Spread: both live nodes get sandboxes.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(cluster.create(&SandboxSpec::default()).await?);
        }
        check(
            dying.live() == 2 && stay.live() == 2,
            format!("{} / {}", dying.live(), stay.live()),
        )?;
        // The node goes away: its sandboxes are destroyed, its connections cut.
        let d = dying.clone();
        std::thread::spawn(move || {
            dying_rt.block_on(d.drain(Duration::ZERO));
            dying_rt.shutdown_timeout(Duration::from_secs(1));
        })
        .join()
        .map_err(|_| "the node thread panicked")?;
        let mut infra = 0;
        for sb in &held {
            match sb.exec(ExecRequest::shell("echo hi")).await {
                Ok(_) => {}
                Err(e) => {
                    check(e.is_infrastructure(), format!("not retryable: {e}"))?;
                    infra += 1;
                }
            }
        }
        check(
            infra == 2,
            format!("{infra} sandboxes failed, expected the vanished node's 2"),
        )?;
        let down = cluster
            .nodes()
            .into_iter()
            .find(|s| s.node == dying_addr.to_string());
        check(
            down.is_some_and(|s| !s.up),
            "the vanished node is marked down",
        )?;
        for _ in 0..3 {
            held.push(cluster.create(&SandboxSpec::default()).await?);
        }
        check(
            stay.live() == 5,
            format!("new sandboxes on the live node: {}", stay.live()),
        )?;
        for sb in held {
            let _ = sb.destroy().await;
        }
        check(stay.live() == 0, "all destroyed")
    })
}

fn main() {
    if arbor_sandbox::init::is_init_invocation() {
        arbor_sandbox::init::run();
    }
    arbor_sandbox::local::allow_self_as_init();
    let args = Arguments::from_args();
    let tests = vec![
        Trial::test(
            "remote_sandbox_does_what_a_local_one_does",
            remote_sandbox_does_what_a_local_one_does,
        ),
        Trial::test(
            "wrong_or_missing_token_is_refused",
            wrong_or_missing_token_is_refused,
        ),
        Trial::test(
            "capacity_refusal_and_cluster_places_elsewhere",
            capacity_refusal_and_cluster_places_elsewhere,
        ),
        Trial::test("tls_and_plaintext_rules", tls_and_plaintext_rules),
        Trial::test(
            "drain_refuses_new_and_destroys_the_rest",
            drain_refuses_new_and_destroys_the_rest,
        ),
        Trial::test(
            "idle_lease_reclaims_an_abandoned_sandbox",
            idle_lease_reclaims_an_abandoned_sandbox,
        ),
        Trial::test(
            "cluster_fails_over_from_a_vanished_node",
            cluster_fails_over_from_a_vanished_node,
        ),
    ];
    libtest_mimic::run(&args, tests).exit();
}
