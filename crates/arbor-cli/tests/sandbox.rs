//! `arbor sandbox exec` end to end, as a separate process: `--net` reaches
//! the sandbox's spec, and `--help` explains its values. Real sandboxes (needs root).

use std::process::Output;

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
