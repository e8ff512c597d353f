//! `arbor train rl-check --reduced`: RL through the production loop (sandboxed rollouts, the
//! gateway, the embedded policy with weight swaps, turn-level GSPO + IcePop on packed trees)
//! lifts the sampled held-out pass rate of an imperfect SFT model by a significant margin.
//! Real sandboxes (needs root).

use std::process::Stdio;

use serde_json::Value;

mod common;
use common::{arbor, assert_nothing_left};

#[test]
fn reduced_rl_check_gains_significantly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("check");
    let res = arbor()
        .args(["train", "rl-check", "--reduced", "--json", "--out"])
        .arg(&out)
        .stderr(Stdio::inherit())
        .output()
        .expect("run arbor train rl-check");
    assert!(res.status.success(), "rl-check failed");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("JSON ({e}): {stdout}"));
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    let (sft, rl, z) = (num("sft_pass"), num("rl_pass"), num("gain_z"));
    // The SFT start has the command format but picks the right command only part of the time:
    // RL has room, and a signal in most groups.
    assert!((0.05..=0.6).contains(&sft), "SFT start out of range: {r}");
    assert!(rl > sft, "RL did not improve on SFT: {r}");
    assert!(z >= 2.0, "gain not significant (z = {z}): {r}");
    assert_eq!(
        r["iterations"],
        r["train_pass_rates"].as_array().map_or(0, |a| a.len()),
        "{r}"
    );
    assert!(num("sft_pass_se") > 0.0 && num("rl_pass_se") > 0.0, "{r}");
    // The report on disk is the one printed.
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rl_check.json")).unwrap()).unwrap();
    assert_eq!(saved, r);
    assert_nothing_left();
}
