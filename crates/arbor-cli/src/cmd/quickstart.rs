//! `arbor quickstart`: the main job on embedded defaults. Until the training
//! pipeline lands, it demonstrates the sandbox runtime end to end.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use arbor_sandbox::local::LocalBackend;
use arbor_sandbox::{Backend, ExecRequest, SandboxSpec};

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_a: Args) -> Result<i32> {
    let backend =
        LocalBackend::with_defaults().context("starting the local sandbox backend (needs root)")?;
    let t = Instant::now();
    let sb = backend.create(&SandboxSpec::default()).await?;
    println!(
        "created sandbox {} in {:.1} ms",
        sb.id(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let steps: [(&str, &str); 4] = [
        (
            "whoami and where",
            "echo \"$(id -un)@$(hostname) in $(pwd)\"",
        ),
        ("processes visible inside", "ps -e --no-headers | wc -l"),
        (
            "network interfaces",
            "ls /sys/class/net 2>/dev/null || cat /proc/net/dev | tail -n +3 | cut -d: -f1",
        ),
        (
            "write a project",
            "mkdir -p src && printf 'def add(a, b):\\n    return a + b\\n' > src/calc.py && ls -R",
        ),
    ];
    for (what, cmd) in steps {
        let r = sb.exec(ExecRequest::shell(cmd)).await?;
        println!("- {what}: {}", r.stdout_str().trim().replace('\n', " "));
    }
    let t = Instant::now();
    let child = sb.fork().await?;
    println!(
        "forked into {} in {:.1} ms",
        child.id(),
        t.elapsed().as_secs_f64() * 1e3
    );
    child
        .exec(ExecRequest::shell(
            "echo 'def sub(a, b): return a - b' >> src/calc.py",
        ))
        .await?;
    let parent_len = sb.read_file("/workspace/src/calc.py").await?.len();
    let child_len = child.read_file("/workspace/src/calc.py").await?.len();
    println!("parent file {parent_len} bytes, child file {child_len} bytes (independent copies)");
    ensure!(
        child_len > parent_len,
        "fork did not give independent files"
    );
    let r = sb
        .exec(ExecRequest::shell("sleep 100").timeout(std::time::Duration::from_millis(300)))
        .await?;
    println!(
        "timeout: `sleep 100` with a 0.3 s limit returned after {:.2} s (timed_out={})",
        r.duration.as_secs_f64(),
        r.timed_out
    );
    child.destroy().await?;
    sb.destroy().await?;
    println!("destroyed both; nothing left behind.");
    Ok(0)
}
