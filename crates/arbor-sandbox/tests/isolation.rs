//! Isolation and lifecycle tests of the local backend, with real namespaces.
//!
//! A custom harness (libtest-mimic) so that, after every test has run, the
//! binary checks that no sandbox process, mount or cgroup is left on the
//! host — and fails if one is. Needs root, as CI runs it; without root every
//! test fails with a message saying so (they cannot pass vacuously).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_sandbox::local::{LocalBackend, LocalConfig, LocalSandbox, gc};
use arbor_sandbox::pool::Pool;
use arbor_sandbox::{
    Backend, Bind, BindMode, ExecRequest, Sandbox, SandboxError, SandboxSpec, UnixBridge,
};
use libtest_mimic::{Arguments, Failed, Trial};

type TestResult = Result<(), Failed>;

fn backend() -> Result<LocalBackend, Failed> {
    LocalBackend::new(LocalConfig {
        init_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_arbor-sandbox-init"))),
        ..Default::default()
    })
    .map_err(|e| {
        Failed::from(format!(
            "local backend unavailable (these tests need root): {e}"
        ))
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Run an async test body with a sandbox that is destroyed whatever happens.
fn with_sandbox<F, Fut>(spec: SandboxSpec, body: F) -> TestResult
where
    F: FnOnce(LocalSandbox) -> Fut,
    Fut: std::future::Future<Output = TestResult>,
{
    rt().block_on(async {
        let b = backend()?;
        let sb = b
            .create_local(&spec)
            .await
            .map_err(|e| format!("create: {e}"))?;
        let res = body(sb.clone()).await;
        sb.destroy().await.map_err(|e| format!("destroy: {e}"))?;
        res
    })
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failed::from(format!($($msg)+)));
        }
    };
}

async fn sh(sb: &dyn Sandbox, script: &str) -> Result<arbor_sandbox::ExecResult, Failed> {
    sb.exec(ExecRequest::shell(script))
        .await
        .map_err(|e| Failed::from(format!("exec {script:?}: {e}")))
}

fn marker_dir(base: &str) -> PathBuf {
    let d = PathBuf::from(base).join(format!("arbor-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("marker dir");
    d
}

// --- isolation -----------------------------------------------------------

fn host_processes_invisible() -> TestResult {
    let mut host = Command::new("sleep").arg("60").spawn()?;
    let pid = host.id();
    let res = with_sandbox(SandboxSpec::default(), |sb| async move {
        let r = sh(&sb, &format!("kill -0 {pid}; echo kill=$?; test -e /proc/{pid} && echo visible; ps -e -o pid= | wc -l")).await?;
        let out = r.stdout_str();
        ensure!(
            out.contains("kill=1"),
            "signal to host pid {pid} must fail: {out} {}",
            r.stderr_str()
        );
        ensure!(!out.contains("visible"), "host /proc/{pid} visible inside");
        let n: usize = out
            .lines()
            .last()
            .unwrap_or("99")
            .trim()
            .parse()
            .unwrap_or(99);
        ensure!(n <= 4, "expected only the sandbox's own processes, saw {n}");
        Ok(())
    });
    let alive = host.try_wait()?.is_none();
    host.kill()?;
    host.wait()?;
    res?;
    ensure!(alive, "host process was affected");
    Ok(())
}

fn host_files_invisible() -> TestResult {
    let mut markers = Vec::new();
    for base in ["/var/tmp", "/root", "/work", "/opt", "/srv"] {
        if Path::new(base).is_dir() {
            let f = marker_dir(base).join("secret.txt");
            std::fs::write(&f, "host secret")?;
            markers.push(f);
        }
    }
    let list = markers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let res = with_sandbox(SandboxSpec::default(), |sb| async move {
        let r = sh(&sb, &format!("for f in {list} /etc/shadow /etc/gshadow; do cat $f 2>/dev/null && echo LEAK:$f; done; find /root /home /tmp /var -mindepth 1 -not -path /var/tmp | wc -l")).await?;
        ensure!(
            !r.stdout_str().contains("LEAK"),
            "host files readable: {}",
            r.stdout_str()
        );
        ensure!(
            !r.stdout_str().contains("host secret"),
            "marker content leaked"
        );
        ensure!(
            r.stdout_str().trim() == "0",
            "fresh dirs not empty: {}",
            r.stdout_str()
        );
        // The allow-listed system dirs are there.
        let r = sh(
            &sb,
            "test -x /usr/bin/env && test -f /etc/passwd && echo ok",
        )
        .await?;
        ensure!(r.stdout_str().trim() == "ok", "system dirs missing");
        Ok(())
    });
    for m in &markers {
        let _ = std::fs::remove_dir_all(m.parent().unwrap_or(Path::new("/nonexistent")));
    }
    res
}

fn system_writes_stay_inside() -> TestResult {
    let name = format!("arbor-test-{}", std::process::id());
    let n2 = name.clone();
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let r = sh(&sb, &format!("echo x > /usr/{n2} && echo y > /etc/{n2} && rm -f /etc/hostname && cat /usr/{n2} /etc/{n2}")).await?;
        ensure!(
            r.stdout_str() == "x\ny\n",
            "writes inside failed: {} {}",
            r.stdout_str(),
            r.stderr_str()
        );
        Ok(())
    })?;
    ensure!(
        !Path::new(&format!("/usr/{name}")).exists(),
        "write reached host /usr"
    );
    ensure!(
        !Path::new(&format!("/etc/{name}")).exists(),
        "write reached host /etc"
    );
    ensure!(
        Path::new("/etc/hostname").exists() || !Path::new("/etc/hostname.arbor-check").exists(),
        "delete reached host"
    );
    Ok(())
}

fn loopback_only_network() -> TestResult {
    // A host listener on 127.0.0.1 must be unreachable from inside.
    let host = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = host.local_addr()?.port();
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let r = sh(
            &sb,
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
        )
        .await?;
        ensure!(
            r.stdout_str().trim() == "lo",
            "interfaces: {}",
            r.stdout_str()
        );
        let py = format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1); print('host-reached')\nexcept OSError as e: print('refused')\n\
             s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); c=socket.create_connection(s.getsockname()); print('loopback-ok')\n\
             try:\n    socket.create_connection(('1.1.1.1', 80), timeout=1); print('internet')\nexcept OSError: print('no-route')"
        );
        let r = sb
            .exec(ExecRequest::new(["/usr/bin/python3", "-c", &py]))
            .await
            .map_err(|e| e.to_string())?;
        let out = r.stdout_str();
        ensure!(
            out.contains("refused") && out.contains("loopback-ok") && out.contains("no-route"),
            "network: {out} {}",
            r.stderr_str()
        );
        Ok(())
    })
}

fn mount_and_unshare_refused() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        for cmd in [
            "mount -t tmpfs none /mnt",
            "unshare -r true",
            "unshare -n true",
            "umount /proc",
            "mount --bind /usr /mnt",
        ] {
            let r = sh(&sb, cmd).await?;
            ensure!(r.exit_code != 0, "{cmd:?} succeeded inside the sandbox");
        }
        // Commands inherit only their standard streams (no control socket).
        let r = sb
            .exec(ExecRequest::new([
                "/usr/bin/python3",
                "-c",
                "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))",
            ]))
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            r.stdout_str().trim() == "[0, 1, 2, 3]",
            "inherited descriptors: {}",
            r.stdout_str()
        );
        let r = sh(
            &sb,
            "ls -l /proc/1/fd 2>&1; cat /proc/1/environ 2>&1 | head -c 100",
        )
        .await?;
        ensure!(
            r.stdout_str().contains("Permission denied") || r.stdout_str().trim().is_empty(),
            "init's descriptors readable: {}",
            r.stdout_str()
        );
        // Kernel-wide knobs are read-only even for root inside.
        let r = sh(&sb, "echo 1 > /proc/sys/kernel/sysrq").await?;
        ensure!(r.exit_code != 0, "/proc/sys writable");
        Ok(())
    })
}

fn fork_bomb_contained() -> TestResult {
    let mut spec = SandboxSpec::default();
    spec.limits.pids = 64;
    with_sandbox(spec, |sb| async move {
        let bomb = tokio::spawn({
            let sb = sb.clone();
            async move {
                sb.exec(
                    ExecRequest::new(["/bin/bash", "-c", "f(){ f|f& }; f; sleep 100"])
                        .timeout(Duration::from_secs(3)),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        // The host can still start processes promptly while the bomb runs.
        let t = Instant::now();
        let ok = Command::new("true").status()?.success();
        let host_ms = t.elapsed().as_millis();
        ensure!(
            ok && host_ms < 1000,
            "host unresponsive during fork bomb ({host_ms} ms)"
        );
        let r = bomb
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        ensure!(
            r.timed_out && r.duration < Duration::from_secs(5),
            "bomb not stopped: {r:?}"
        );
        // The sandbox is usable again afterwards.
        let r = sh(&sb, "echo alive").await?;
        ensure!(
            r.stdout_str().trim() == "alive",
            "sandbox unusable after bomb"
        );
        Ok(())
    })
}

fn memory_hog_is_oom_killed() -> TestResult {
    let mut spec = SandboxSpec::default();
    spec.limits.memory_mb = 64;
    with_sandbox(spec, |sb| async move {
        let r = sb
            .exec(ExecRequest::new([
                "/usr/bin/python3",
                "-c",
                "x = bytearray(400 * 1024 * 1024); print(len(x))",
            ]))
            .await
            .map_err(|e| e.to_string())?;
        ensure!(r.oom_killed, "hog not reported as OOM: {r:?}");
        ensure!(
            r.exit_code != 0 && r.signal == Some(9),
            "hog not killed: {:?}",
            (r.exit_code, r.signal)
        );
        let r = sh(&sb, "echo survived").await?;
        ensure!(
            r.stdout_str().trim() == "survived" && !r.oom_killed,
            "sandbox broken after OOM"
        );
        Ok(())
    })
}

fn cpu_quota_enforced() -> TestResult {
    let mut spec = SandboxSpec::default();
    spec.limits.cpus = 0.2;
    with_sandbox(spec, |sb| async move {
        let py = "import os, time\nt = time.time()\nwhile time.time() - t < 1.5: pass\nprint(os.times().user + os.times().system)";
        let r = sb
            .exec(ExecRequest::new(["/usr/bin/python3", "-c", py]))
            .await
            .map_err(|e| e.to_string())?;
        let used: f64 = r
            .stdout_str()
            .trim()
            .parse()
            .map_err(|_| format!("cpu time: {:?} {}", r.stdout_str(), r.stderr_str()))?;
        // 1.5 s of wall time at 0.2 cores is ~0.3 s of CPU; unthrottled it would be ~1.5 s.
        let throttled = used < 0.7;
        ensure!(
            throttled,
            "busy loop used {used:.2} s of CPU under a 0.2-core quota"
        );
        Ok(())
    })
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn output_is_capped() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let before = rss_kb();
        let r = sb
            .exec(
                ExecRequest::new(["yes"])
                    .output_cap(1 << 20)
                    .timeout(Duration::from_secs(3)),
            )
            .await
            .map_err(|e| e.to_string())?;
        let grown_mb = rss_kb().saturating_sub(before) / 1024;
        ensure!(
            r.truncated && r.stdout.len() == 1 << 20,
            "not truncated at cap: {} bytes",
            r.stdout.len()
        );
        ensure!(r.timed_out, "yes should run until its timeout");
        ensure!(grown_mb < 32, "supervisor memory grew by {grown_mb} MiB");
        Ok(())
    })
}

fn timeout_kills_process_tree() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let t = Instant::now();
        let r = sb
            .exec(
                ExecRequest::shell("sleep 1000 & setsid sleep 1001 & sleep 1000")
                    .timeout(Duration::from_secs(1)),
            )
            .await
            .map_err(|e| e.to_string())?;
        let took = t.elapsed();
        ensure!(r.timed_out, "not reported as timed out");
        ensure!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1800),
            "took {took:?}"
        );
        let r = sh(&sb, "pgrep -c sleep || true").await?;
        ensure!(
            r.stdout_str().trim() == "0",
            "sleepers survived: {}",
            r.stdout_str()
        );
        // A background process started normally is left running.
        sh(&sb, "sleep 1000 >/dev/null 2>&1 &").await?;
        let r = sh(&sb, "pgrep -c sleep").await?;
        ensure!(
            r.stdout_str().trim() == "1",
            "background process did not survive its command"
        );
        Ok(())
    })
}

fn workspace_size_limited() -> TestResult {
    let mut spec = SandboxSpec::default();
    spec.limits.workspace_mb = 32;
    with_sandbox(spec, |sb| async move {
        let r = sh(&sb, "dd if=/dev/zero of=/workspace/big bs=1M count=100 2>&1; echo rc=$?; du -m /workspace/big | cut -f1").await?;
        let out = r.stdout_str();
        ensure!(
            out.contains("No space left"),
            "dd did not hit the limit: {out}"
        );
        let mb: u64 = out
            .lines()
            .last()
            .unwrap_or("999")
            .trim()
            .parse()
            .unwrap_or(999);
        ensure!(mb <= 32, "wrote {mb} MiB past a 32 MiB limit");
        // /tmp counts against the same limit.
        let r = sh(&sb, "rm /workspace/big; dd if=/dev/zero of=/tmp/big bs=1M count=100 2>/dev/null; du -m /tmp/big | cut -f1").await?;
        let mb: u64 = r.stdout_str().trim().parse().unwrap_or(999);
        ensure!(mb <= 32, "/tmp escaped the limit ({mb} MiB)");
        Ok(())
    })
}

// --- filesystem API and fork -----------------------------------------------

fn files_roundtrip() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        sb.write_file("/workspace/deep/dir/blob.bin", &binary, 0o640)
            .await
            .map_err(|e| e.to_string())?;
        let back = sb
            .read_file("/workspace/deep/dir/blob.bin")
            .await
            .map_err(|e| e.to_string())?;
        ensure!(back == binary, "binary file changed in transit");
        let r = sh(&sb, "stat -c %a /workspace/deep/dir/blob.bin").await?;
        ensure!(
            r.stdout_str().trim() == "640",
            "mode not kept: {}",
            r.stdout_str()
        );
        match sb.read_file("/workspace/missing").await {
            Err(SandboxError::File { .. }) => {}
            other => return Err(format!("missing file: expected File error, got {other:?}").into()),
        }
        // Directories travel as tar archives.
        let host = tempfile::tempdir()?;
        std::fs::create_dir_all(host.path().join("pkg/sub"))?;
        std::fs::write(host.path().join("pkg/sub/a.py"), "print('a')\n")?;
        std::fs::write(host.path().join("pkg/b.txt"), "b")?;
        let archive = arbor_sandbox::tar_directory(&host.path().join("pkg"))?;
        sb.write_tar("/workspace/pkg", archive)
            .await
            .map_err(|e| e.to_string())?;
        let r = sh(&sb, "cat /workspace/pkg/sub/a.py /workspace/pkg/b.txt").await?;
        ensure!(
            r.stdout_str() == "print('a')\nb",
            "tar upload: {:?}",
            r.stdout_str()
        );
        let out = sb
            .read_tar("/workspace/pkg")
            .await
            .map_err(|e| e.to_string())?;
        let back = tempfile::tempdir()?;
        arbor_sandbox::untar_into(&out, back.path())?;
        ensure!(
            std::fs::read_to_string(back.path().join("sub/a.py"))? == "print('a')\n",
            "tar download"
        );
        // A symlink planted inside cannot redirect a write to the host.
        sh(&sb, "ln -s /proc/sys/kernel /workspace/trap").await?;
        let res = sb
            .write_file("/workspace/trap/core_pattern", b"|/bin/false", 0o644)
            .await;
        ensure!(
            res.is_err(),
            "write through planted symlink into /proc/sys succeeded"
        );
        Ok(())
    })
}

fn stdin_env_cwd() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let r = sb
            .exec(
                ExecRequest::new(["sh", "-c", "cat; echo \" $FOO $(pwd)\""])
                    .stdin("piped")
                    .env("FOO", "bar")
                    .cwd("/tmp"),
            )
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            r.stdout_str() == "piped bar /tmp\n",
            "got {:?}",
            r.stdout_str()
        );
        let r = sb
            .exec(ExecRequest::new(["no-such-program"]))
            .await
            .map_err(|e| e.to_string())?;
        ensure!(r.exit_code == 127, "missing program exit {}", r.exit_code);
        let r = sh(&sb, "exit 7").await?;
        ensure!(r.exit_code == 7, "exit code {}", r.exit_code);
        Ok(())
    })
}

fn fork_is_independent() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        sh(&sb, "echo parent > /workspace/a; echo keep > /workspace/k; rm /etc/passwd; mkdir -p /opt/x && echo o > /opt/x/f").await?;
        let child = sb.fork_local().await.map_err(|e| e.to_string())?;
        let res = async {
            let r = sh(
                &child,
                "cat /workspace/a /workspace/k /opt/x/f; test -e /etc/passwd && echo passwd-back",
            )
            .await?;
            ensure!(
                r.stdout_str() == "parent\nkeep\no\n",
                "child did not start from parent state: {:?}",
                r.stdout_str()
            );
            sh(&child, "echo child > /workspace/a; echo new > /workspace/c").await?;
            sh(&sb, "echo parent2 > /workspace/a").await?;
            let p = sh(&sb, "cat /workspace/a; test -e /workspace/c && echo leaked").await?;
            let c = sh(&child, "cat /workspace/a /workspace/c").await?;
            ensure!(
                p.stdout_str() == "parent2\n",
                "parent changed by child: {:?}",
                p.stdout_str()
            );
            ensure!(
                c.stdout_str() == "child\nnew\n",
                "child changed by parent: {:?}",
                c.stdout_str()
            );
            Ok(())
        }
        .await;
        child.destroy().await.map_err(|e| e.to_string())?;
        res
    })
}

fn binds_readonly_and_cow() -> TestResult {
    let host = tempfile::tempdir()?;
    std::fs::write(host.path().join("tool.txt"), "v1")?;
    let spec = SandboxSpec {
        binds: vec![
            Bind {
                source: host.path().to_path_buf(),
                target: "/opt/ro".into(),
                mode: BindMode::ReadOnly,
            },
            Bind {
                source: host.path().to_path_buf(),
                target: "/opt/cow".into(),
                mode: BindMode::CopyOnWrite,
            },
        ],
        ..Default::default()
    };
    with_sandbox(spec, |sb| async move {
        let r = sh(
            &sb,
            "cat /opt/ro/tool.txt; echo x > /opt/ro/tool.txt && echo ro-writable",
        )
        .await?;
        ensure!(r.stdout_str() == "v1", "ro bind: {:?}", r.stdout_str());
        let r = sh(&sb, "echo v2 > /opt/cow/tool.txt && cat /opt/cow/tool.txt").await?;
        ensure!(
            r.stdout_str() == "v2\n",
            "cow bind write: {:?}",
            r.stdout_str()
        );
        Ok(())
    })?;
    ensure!(
        std::fs::read_to_string(host.path().join("tool.txt"))? == "v1",
        "host file changed"
    );
    Ok(())
}

fn custom_rootfs_replaces_default() -> TestResult {
    // A tiny rootfs: dash and cat with their libraries, plus a marker.
    let root = tempfile::tempdir()?;
    let mut files = vec![PathBuf::from("/bin/sh"), PathBuf::from("/bin/cat")];
    for bin in ["/bin/sh", "/bin/cat"] {
        let out = Command::new("ldd").arg(bin).output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
    }
    for f in files {
        let real = std::fs::canonicalize(&f)?;
        let dst = root.path().join(f.strip_prefix("/")?);
        std::fs::create_dir_all(dst.parent().ok_or("no parent")?)?;
        std::fs::copy(&real, &dst)?;
    }
    std::fs::write(root.path().join("marker"), "custom root")?;
    let spec = SandboxSpec {
        rootfs: Some(root.path().to_path_buf()),
        ..Default::default()
    };
    with_sandbox(spec, |sb| async move {
        let r = sb
            .exec(ExecRequest::new([
                "/bin/sh",
                "-c",
                "cat /marker; test -e /usr/bin/python3 && echo host-usr",
            ]))
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            r.stdout_str() == "custom root",
            "custom rootfs: {:?} {}",
            r.stdout_str(),
            r.stderr_str()
        );
        Ok(())
    })?;
    ensure!(
        !root.path().join("workspace").exists(),
        "writes reached the rootfs directory"
    );
    Ok(())
}

fn unix_socket_bridge() -> TestResult {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("gw.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock)?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf)?;
        c.write_all(b"pong:")?;
        c.write_all(&buf)?;
        Ok(())
    });
    // And a host loopback TCP service.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    let tcp_addr = tcp.local_addr()?;
    let tcp_server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = tcp.accept()?;
        c.write_all(b"tcp-ok")?;
        Ok(())
    });
    let spec = SandboxSpec {
        network: arbor_sandbox::NetworkSpec {
            unix_bridges: vec![UnixBridge {
                host_socket: sock.clone(),
                port: 18080,
            }],
            tcp_bridges: vec![arbor_sandbox::TcpBridge {
                host_addr: tcp_addr,
                port: 18081,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    with_sandbox(spec, |sb| async move {
        let py = "import socket\nc=socket.create_connection(('127.0.0.1',18080),timeout=5)\nc.sendall(b'hello')\nout=b''\nwhile (chunk := c.recv(100)):\n    out+=chunk\nprint(out.decode())";
        let r = sb
            .exec(ExecRequest::new(["/usr/bin/python3", "-c", py]))
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            r.stdout_str().trim() == "pong:hello",
            "bridge: {:?} {}",
            r.stdout_str(),
            r.stderr_str()
        );
        let r = sb
            .exec(ExecRequest::new(["/usr/bin/python3", "-c", "import socket\nc=socket.create_connection(('127.0.0.1',18081),timeout=5)\nprint(c.recv(100).decode())"]))
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            r.stdout_str().trim() == "tcp-ok",
            "tcp bridge: {:?} {}",
            r.stdout_str(),
            r.stderr_str()
        );
        Ok(())
    })?;
    server.join().map_err(|_| "server panicked")??;
    tcp_server.join().map_err(|_| "tcp server panicked")??;
    // Non-loopback targets are refused.
    rt().block_on(async {
        let spec = SandboxSpec {
            network: arbor_sandbox::NetworkSpec {
                tcp_bridges: vec![arbor_sandbox::TcpBridge {
                    host_addr: "10.0.0.1:80".parse().map_err(|_| "addr")?,
                    port: 80,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        match backend()?.create(&spec).await {
            Err(SandboxError::Invalid(_)) => Ok(()),
            Err(e) => Err(Failed::from(format!("expected Invalid, got {e}"))),
            Ok(sb) => {
                let _ = sb.destroy().await;
                Err("non-loopback bridge accepted".into())
            }
        }
    })?;
    Ok(())
}

// --- lifecycle ---------------------------------------------------------------

fn concurrent_execs_and_destroy() -> TestResult {
    with_sandbox(SandboxSpec::default(), |sb| async move {
        let mut hs = Vec::new();
        for i in 0..24 {
            let sb = sb.clone();
            hs.push(tokio::spawn(async move {
                sb.exec(ExecRequest::shell(format!("echo {i}"))).await
            }));
        }
        for (i, h) in hs.into_iter().enumerate() {
            let r = h
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            ensure!(
                r.stdout_str().trim() == i.to_string(),
                "exec {i} got {:?}",
                r.stdout_str()
            );
        }
        Ok(())
    })?;
    rt().block_on(async {
        let b = backend()?;
        let sb = b
            .create_local(&SandboxSpec::default())
            .await
            .map_err(|e| e.to_string())?;
        sb.destroy().await.map_err(|e| e.to_string())?;
        sb.destroy()
            .await
            .map_err(|e| format!("second destroy: {e}"))?;
        match sb.exec(ExecRequest::new(["true"])).await {
            Err(SandboxError::Gone { .. }) => {}
            other => return Err(format!("exec after destroy: {other:?}").into()),
        }
        // Init killed from outside: commands fail as infrastructure errors.
        let sb = b
            .create_local(&SandboxSpec::default())
            .await
            .map_err(|e| e.to_string())?;
        // SAFETY: kill(2) of the sandbox's own init.
        unsafe { libc::kill(sb.init_pid(), libc::SIGKILL) };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = sb.exec(ExecRequest::new(["true"])).await;
        let infra = matches!(&r, Err(e) if e.is_infrastructure());
        sb.destroy().await.map_err(|e| e.to_string())?;
        ensure!(infra, "exec in a dead sandbox: {r:?}");
        Ok(())
    })
}

fn invalid_specs_rejected() -> TestResult {
    rt().block_on(async {
        let b = backend()?;
        let bad = [
            SandboxSpec {
                workdir: "relative".into(),
                ..Default::default()
            },
            SandboxSpec {
                rootfs: Some("/nonexistent/rootfs".into()),
                ..Default::default()
            },
            SandboxSpec {
                binds: vec![Bind {
                    source: "/nonexistent".into(),
                    target: "/x".into(),
                    mode: BindMode::ReadOnly,
                }],
                ..Default::default()
            },
        ];
        for spec in bad {
            match b.create(&spec).await {
                Err(SandboxError::Invalid(_)) => {}
                Err(e) => return Err(format!("expected Invalid, got {e}").into()),
                Ok(sb) => {
                    let _ = sb.destroy().await;
                    return Err("invalid spec accepted".into());
                }
            }
        }
        let sb = b
            .create(&SandboxSpec::default())
            .await
            .map_err(|e| e.to_string())?;
        let r = sb.exec(ExecRequest::default()).await;
        sb.destroy().await.map_err(|e| e.to_string())?;
        ensure!(
            matches!(r, Err(SandboxError::Invalid(_))),
            "empty command accepted"
        );
        Ok(())
    })
}

fn pool_serves_warm_sandboxes() -> TestResult {
    rt().block_on(async {
        let b = backend()?;
        let pool = Pool::new(Arc::new(b), 2, 3);
        let spec = SandboxSpec::default();
        pool.prefill(&spec).await.map_err(|e| e.to_string())?;
        ensure!(pool.warm(&spec) == 2, "prefill made {}", pool.warm(&spec));
        let t = Instant::now();
        let sb = pool.get(&spec).await.map_err(|e| e.to_string())?;
        let got_ms = t.elapsed().as_millis();
        let r = sb
            .exec(ExecRequest::shell("echo warm"))
            .await
            .map_err(|e| e.to_string())?;
        sb.destroy().await.map_err(|e| e.to_string())?;
        pool.close().await;
        ensure!(r.stdout_str() == "warm\n", "pooled sandbox broken");
        ensure!(got_ms < 5, "warm get took {got_ms} ms");
        Ok(())
    })
}

/// A supervisor killed with SIGKILL leaves its sandbox; gc removes it.
fn gc_after_supervisor_sigkill() -> TestResult {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .env("ARBOR_TEST_ORPHAN_SUPERVISOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    {
        let out = child.stdout.as_mut().ok_or("no stdout")?;
        let mut byte = [0u8; 1];
        while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
    }
    let init_pid: i32 = line
        .trim()
        .parse()
        .map_err(|_| format!("orphan supervisor said {line:?}"))?;
    child.kill()?; // SIGKILL
    child.wait()?;
    let b = backend()?;
    // Init exits by itself when its control socket closes (taking every
    // sandbox process with it); the cgroups and state directory stay for gc.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{init_pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = gc::leaks(b.state_root(), b.cgroups());
    ensure!(
        before.state_dirs >= 1 && before.cgroups >= 1,
        "nothing left to collect: {before:?}"
    );
    let report = gc::gc(b.state_root(), b.cgroups(), false);
    ensure!(report.errors.is_empty(), "gc errors: {:?}", report.errors);
    ensure!(
        report.sandboxes_removed >= 1,
        "gc removed nothing: {report:?}"
    );
    ensure!(
        !Path::new(&format!("/proc/{init_pid}")).exists(),
        "orphan init still running"
    );
    Ok(())
}

fn orphan_supervisor_main() -> ! {
    let r = rt().block_on(async {
        let b = backend().map_err(|e| format!("{e:?}"))?;
        let sb = b
            .create_local(&SandboxSpec::default())
            .await
            .map_err(|e| e.to_string())?;
        sb.exec(ExecRequest::shell("sleep 1000 >/dev/null 2>&1 &"))
            .await
            .map_err(|e| e.to_string())?;
        println!("{}", sb.init_pid());
        std::mem::forget(sb);
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<(), String>(())
    });
    eprintln!("{r:?}");
    std::process::exit(1)
}

fn main() {
    if std::env::var_os("ARBOR_TEST_ORPHAN_SUPERVISOR").is_some() {
        orphan_supervisor_main();
    }
    let args = Arguments::from_args();
    let tests: Vec<Trial> = vec![
        Trial::test("host_processes_invisible", host_processes_invisible),
        Trial::test("host_files_invisible", host_files_invisible),
        Trial::test("system_writes_stay_inside", system_writes_stay_inside),
        Trial::test("loopback_only_network", loopback_only_network),
        Trial::test("mount_and_unshare_refused", mount_and_unshare_refused),
        Trial::test("fork_bomb_contained", fork_bomb_contained),
        Trial::test("memory_hog_is_oom_killed", memory_hog_is_oom_killed),
        Trial::test("output_is_capped", output_is_capped),
        Trial::test("cpu_quota_enforced", cpu_quota_enforced),
        Trial::test("timeout_kills_process_tree", timeout_kills_process_tree),
        Trial::test("workspace_size_limited", workspace_size_limited),
        Trial::test("files_roundtrip", files_roundtrip),
        Trial::test("stdin_env_cwd", stdin_env_cwd),
        Trial::test("fork_is_independent", fork_is_independent),
        Trial::test("binds_readonly_and_cow", binds_readonly_and_cow),
        Trial::test(
            "custom_rootfs_replaces_default",
            custom_rootfs_replaces_default,
        ),
        Trial::test("unix_socket_bridge", unix_socket_bridge),
        Trial::test("concurrent_execs_and_destroy", concurrent_execs_and_destroy),
        Trial::test("invalid_specs_rejected", invalid_specs_rejected),
        Trial::test("pool_serves_warm_sandboxes", pool_serves_warm_sandboxes),
        Trial::test("gc_after_supervisor_sigkill", gc_after_supervisor_sigkill),
    ];
    let filtered = args.filter.is_some() || !args.skip.is_empty();
    let conclusion = libtest_mimic::run(&args, tests);
    // After everything: nothing of any sandbox may remain on the host.
    if !args.list && !filtered {
        match backend() {
            Ok(b) => {
                let leaks = gc::leaks(b.state_root(), b.cgroups());
                if !leaks.is_clean() {
                    eprintln!("LEAK CHECK FAILED: {leaks:?}");
                    std::process::exit(101);
                }
                eprintln!("leak check: no sandbox process, mount, cgroup or state dir left");
            }
            Err(e) => {
                eprintln!("leak check could not run: {e:?}");
                std::process::exit(101);
            }
        }
    }
    conclusion.exit();
}
