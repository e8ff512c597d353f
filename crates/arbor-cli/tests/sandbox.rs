//! `arbor sandbox exec` end to end, as a separate process: `--net` reaches
//! the sandbox's spec, and `--help` explains its values; `arbor sandbox bench`
//! at a host limit. Real sandboxes (needs root).

use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::arbor;

/// Run `arbor sandbox exec [flags] -- cat /proc/net/dev`: the interfaces the
/// sandbox's network namespace has.
fn interfaces_inside(flags: &[&str]) -> Vec<String> {
    let o = arbor()
        .args(["sandbox", "exec"])
        .args(flags)
        .args(["--", "cat", "/proc/net/dev"])
        .output()
        .expect("run arbor");
    assert!(
        o.status.success(),
        "sandbox exec {flags:?}: {}",
        describe(&o)
    );
    interfaces(&String::from_utf8_lossy(&o.stdout))
}

/// Interface names in a `/proc/net/dev` listing (two header lines, then `name: counters`).
fn interfaces(dev: &str) -> Vec<String> {
    let mut names: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
        .collect();
    names.sort();
    names
}

fn describe(o: &Output) -> String {
    format!(
        "{} stdout: {} stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn net_none_has_only_loopback() {
    assert_eq!(interfaces_inside(&["--net", "none"]), ["lo"]);
}

/// The default mode is `none`: the same single loopback interface, whatever the host has.
#[test]
fn default_net_is_loopback_only() {
    let host = std::fs::read_to_string("/proc/net/dev").expect("host /proc/net/dev");
    assert!(interfaces(&host).contains(&"lo".to_string()));
    assert_eq!(interfaces_inside(&[]), ["lo"]);
}

/// `host` shares the host's network namespace: the same interfaces as the host.
#[test]
fn net_host_shares_host_interfaces() {
    let host = std::fs::read_to_string("/proc/net/dev").expect("host /proc/net/dev");
    assert_eq!(interfaces_inside(&["--net", "host"]), interfaces(&host));
}

#[test]
fn unknown_net_mode_is_refused() {
    let o = arbor()
        .args(["sandbox", "exec", "--net", "bridge", "--", "true"])
        .output()
        .expect("run arbor");
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("possible values: none, host"), "{err}");
}

#[test]
fn help_explains_net_values() {
    let o = arbor()
        .args(["sandbox", "exec", "--help"])
        .output()
        .expect("run arbor");
    assert!(o.status.success(), "{}", describe(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    let net = &help[help.find("--net").expect("--net in help")..];
    assert!(net.contains("none:") && net.contains("loopback"), "{help}");
    assert!(
        net.contains("host:") && net.contains("NO network isolation"),
        "{help}"
    );
}

/// Runs `arbor sandbox bench --json --n 1 ARGS` through `wrapper` (a command prefix) and
/// returns its pid and JSON report.
fn bench(wrapper: &[&str], args: &[&str]) -> (u32, Value) {
    let exe = env!("CARGO_BIN_EXE_arbor");
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let child = cmd
        .args(["sandbox", "bench", "--json", "--n", "1"])
        .args(args)
        .env("ARBOR_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run arbor sandbox bench");
    let pid = child.id();
    let o = child.wait_with_output().expect("bench output");
    assert!(o.status.success(), "bench {args:?}: {}", describe(&o));
    let report = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("bench JSON ({e}): {}", describe(&o)));
    (pid, report)
}

/// Nothing of the supervisor `pid` is left (`gc --check --supervisor`: other
/// supervisors may run sandboxes on this host at the same time).
fn assert_nothing_left_by(pid: u32) {
    let o = arbor()
        .args(["sandbox", "gc", "--check", "--supervisor", &pid.to_string()])
        .output()
        .expect("gc --check");
    assert!(o.status.success(), "left behind: {}", describe(&o));
}

/// At its open-file limit a node refuses the next sandbox before starting it: the bench,
/// run with RLIMIT_NOFILE lowered to 256 and without CAP_SYS_RESOURCE (so it cannot raise
/// the limit back), stops its live phase with a refusal naming the limit and the numbers,
/// after creating what fit, and leaves nothing behind.
#[test]
fn bench_at_the_open_file_limit_is_refused_and_leaves_nothing() {
    let drop_resource = [
        "setpriv",
        "--inh-caps=-sys_resource",
        "--bounding-set=-sys_resource",
        "prlimit",
        "--nofile=256:256",
        "--",
    ];
    let (pid, r) = bench(&drop_resource, &["--live", "400", "--concurrency", "4"]);
    let err = r["live_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("open files limit") && err.contains("RLIMIT_NOFILE is 256"),
        "{r}"
    );
    assert!(err.contains("refused before starting"), "{r}");
    let live = r["live_sandboxes"].as_u64().unwrap_or(0);
    assert!(
        (10..256).contains(&live),
        "what fit under the limit ran: {r}"
    );
    assert_eq!(r["leaked"], 0, "{r}");
    assert_nothing_left_by(pid);
}

/// The backend's own maximum is checked the same way: the 9th of 12 is refused.
#[test]
fn bench_at_max_live_is_refused_and_leaves_nothing() {
    let (pid, r) = bench(&[], &["--live", "12", "--max-live", "8"]);
    let err = r["live_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("max live limit") && err.contains("the backend's maximum is 8"),
        "{r}"
    );
    assert_eq!(r["live_sandboxes"], 8, "{r}");
    assert_eq!(r["leaked"], 0, "{r}");
    assert_nothing_left_by(pid);
}
