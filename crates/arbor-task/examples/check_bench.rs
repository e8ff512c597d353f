//! Benchmark of `check` over the five built-in domains: N tasks per domain
//! (difficulties 1..=5 in equal shares), oracle must pass, null must fail.
//! Prints ONE JSON object on stdout (progress on stderr). Needs root.
//!
//! `cargo run --release -p arbor-task --example check_bench -- [--n 200] [--concurrency 8] [--seed 1]`

use std::sync::Arc;
use std::time::Instant;

use arbor_task::check::{CheckOptions, check};
use arbor_task::domains::{DOMAINS, GenOptions, Split, generate};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if arbor_sandbox::init::is_init_invocation() {
        arbor_sandbox::init::run();
    }
    arbor_sandbox::local::allow_self_as_init();
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--n", 200) as usize;
    let conc = arg(&args, "--concurrency", 8) as usize;
    let seed = arg(&args, "--seed", 1);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio: {e}");
            std::process::exit(1);
        }
    };
    let backend = match arbor_sandbox::local::LocalBackend::with_defaults() {
        Ok(b) => Arc::new(b),
        Err(e) => {
            eprintln!("local backend: {e}");
            std::process::exit(1);
        }
    };
    let total_start = Instant::now();
    let mut per_domain = serde_json::Map::new();
    let (mut tasks_t, mut oracle_t, mut null_t, mut infra_t) = (0, 0, 0, 0);
    let mut errors = Vec::new();
    for domain in DOMAINS {
        let gen_start = Instant::now();
        let mut tasks = Vec::new();
        for d in 1..=5u32 {
            let share = n / 5 + usize::from((d as usize) <= n % 5);
            let opts = GenOptions {
                difficulty: d,
                split: Split::Train,
            };
            match generate(domain, share, seed * 10 + u64::from(d), &opts) {
                Ok(t) => tasks.extend(t),
                Err(e) => {
                    eprintln!("{domain}: {e}");
                    std::process::exit(1);
                }
            }
        }
        let gen_s = gen_start.elapsed().as_secs_f64();
        let opts = CheckOptions {
            concurrency: conc,
            progress: Some(Arc::new(move |done, total| {
                if done % 50 == 0 || done == total {
                    eprintln!("{domain}: {done}/{total}");
                }
            })),
            ..Default::default()
        };
        let report = rt.block_on(check(backend.clone(), tasks, &opts));
        tasks_t += report.tasks;
        oracle_t += report.oracle_pass;
        null_t += report.null_fail;
        infra_t += report.infra_errors;
        errors.extend(report.errors.iter().take(5).cloned());
        per_domain.insert(
            domain.to_string(),
            serde_json::json!({
                "tasks": report.tasks, "oracle_pass": report.oracle_pass, "null_fail": report.null_fail,
                "infra_errors": report.infra_errors, "errors": report.errors.len(),
                "seconds": report.seconds, "gen_seconds": gen_s,
            }),
        );
    }
    let leaks = arbor_sandbox::local::gc::leaks(backend.state_root(), backend.cgroups());
    let out = serde_json::json!({
        "leaked": leaks.total(),
        "tasks": tasks_t,
        "oracle_pass": oracle_t,
        "null_fail": null_t,
        "infra_errors": infra_t,
        "errors": errors,
        "seconds": total_start.elapsed().as_secs_f64(),
        "concurrency": conc,
        "per_task_per_domain": n,
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "domains": per_domain,
    });
    println!("{out}");
}
