//! A SWE-bench instance in its own image through `arbor run`: the image
//! (named as SWE-bench's harness names instance images) is pushed to a real
//! `docker-registry` on loopback, the instances are read in image mode
//! (`[images]` in `swebench.toml`), and the scripted-oracle policy drives the
//! bash scaffold to apply the gold patch in the image's `/testbed`; the
//! rollout must pass. Needs root (real sandboxes) and the Debian packages
//! `docker-registry` and `busybox-static`.

use std::path::Path;

use arbor_rollout::record::{RolloutResult, Status};
use serde_json::Value;

mod common;
// arbor-image's test support, compiled into this test: it builds layers with
// `tar`, `flate2`, `sha2` and `hex` and pushes them with `oci_client`
// (this crate's dev-dependencies for it).
#[path = "../../arbor-image/tests/support/mod.rs"]
mod support;
#[path = "../../arbor-image/tests/swebench_image/mod.rs"]
mod swebench_image;

use common::arbor;
use support::TestRegistry;
use swebench_image::{INSTANCE_ID, push_instance_image, write_dataset};

fn write_experiment(dir: &Path, jsonl: &Path, registry: &str) -> std::path::PathBuf {
    let exp = format!(
        r#"name = "swebench-image"
output = "{out}"
samples = 1
concurrency = 1

[[datasets]]
path = "{jsonl}"

[[scaffolds]]
kind = "bash"
max_steps = 10

[policy]
kind = "scripted-oracle"

[images]
root = "{root}"
insecure = ["{registry}"]
"#,
        out = dir.join("run").display(),
        jsonl = jsonl.display(),
        root = dir.join("images").display(),
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, exp).expect("write experiment");
    p
}

#[test]
fn oracle_rollout_passes_in_the_instance_image() {
    let reg = TestRegistry::start();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(push_instance_image(&reg));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let jsonl = write_dataset(&data, &reg.host, INSTANCE_ID);
    let exp = write_experiment(dir.path(), &jsonl, &reg.host);
    let out = dir.path().join("run");

    let o = arbor()
        .arg("run")
        .arg(&exp)
        .arg("--out")
        .arg(&out)
        .arg("--json")
        .output()
        .expect("arbor run");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "arbor run failed: {stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary JSON ({e}): {stdout}"));
    let text = std::fs::read_to_string(out.join("results.jsonl")).expect("results.jsonl");
    assert_eq!(summary["passed"], 1, "{summary}\n{text}\n{stderr}");
    assert_eq!(summary["infra_errors"], 0, "{summary}");
    let results: Vec<RolloutResult> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("result line"))
        .collect();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].key.task_id, INSTANCE_ID);
    assert_eq!(results[0].status, Status::Passed, "{:?}", results[0]);
}
