//! SWE-bench instances in their own images: an image named as SWE-bench's
//! harness names instance images (`swebench/sweb.eval.x86_64.<id with
//! __ → _1776_>`) is pushed to a real `docker-registry` on loopback; the
//! adapter's image mode (`[images]` in `swebench.toml`) runs the instance in
//! it through [`ImageBackend`], and `arbor_task::check` must find that the
//! gold patch resolves the instance and the empty patch does not.
//!
//! The image is busybox (Debian `busybox-static`) with a tiny shell
//! "repository" in `/testbed` (a bug in `calc.sh`), and a test runner that
//! prints pytest `-rA` summary lines, reachable only after the image's
//! activation script has run (as SWE-bench's conda env is). Needs root (real
//! sandboxes) and the Debian packages `docker-registry` and `busybox-static`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arbor_image::RegistryConfig;
use arbor_image::backend::{ImageBackend, ImagesConfig};
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_task::{CheckOptions, OpenOptions, PrepareOptions};
use support::TestRegistry;
use support::images::{Entry, ImageSpec, Layer, busybox_layer, push_image};

/// The instance (mixed case: image names are lower-cased as the harness does).
const INSTANCE_ID: &str = "Acme__Calc-1";
/// The repository its image is pushed to.
const IMAGE_REPO: &str = "swebench/sweb.eval.x86_64.acme_1776_calc-1";

const CALC: &str = "add() { echo $(($1 - $2)); }\nmul() { echo $(($1 * $2)); }\n";
const TESTS: &str = "test_mul() { [ \"$(mul 3 4)\" = 12 ]; }\n";

/// The fix, applied by busybox `patch -p1` (the image has no git).
const GOLD_PATCH: &str = "\
diff --git a/calc.sh b/calc.sh
--- a/calc.sh
+++ b/calc.sh
@@ -1,2 +1,2 @@
-add() { echo $(($1 - $2)); }
+add() { echo $(($1 + $2)); }
 mul() { echo $(($1 * $2)); }
";

/// The test added with the fix.
const TEST_PATCH: &str = "\
diff --git a/tests/test_calc.sh b/tests/test_calc.sh
--- a/tests/test_calc.sh
+++ b/tests/test_calc.sh
@@ -1 +1,2 @@
 test_mul() { [ \"$(mul 3 4)\" = 12 ]; }
+test_add() { [ \"$(add 2 3)\" = 5 ]; }
";

/// Runs every `test_*` function of the given files against `calc.sh` and
/// prints one pytest `-rA` summary line per test.
const RUNNER: &str = r#"#!/bin/sh
. ./calc.sh
for f in "$@"; do
  for t in $(sed -n 's/^\(test_[a-z_0-9]*\)() *{.*/\1/p' "$f"); do
    if ( . "./$f"; "$t" ) >/dev/null 2>&1; then echo "PASSED $f::$t"; else echo "FAILED $f::$t"; fi
  done
done
"#;

/// The environment the tests run in, entered like SWE-bench's conda env.
const ACTIVATE: &str = "export PATH=/opt/testenv/bin:$PATH\n";

/// The instance's layer on top of busybox: `/testbed` at the buggy base,
/// the test environment under `/opt/testenv`.
fn testbed_layer() -> Layer {
    Layer::new(&[
        // busybox's sh runs its applets first, `patch` included.
        Entry::Symlink("bin/patch", "busybox"),
        Entry::Dir("testbed", 0o755),
        Entry::File("testbed/calc.sh", CALC.as_bytes(), 0o644),
        Entry::Dir("testbed/tests", 0o755),
        Entry::File("testbed/tests/test_calc.sh", TESTS.as_bytes(), 0o644),
        Entry::Dir("opt", 0o755),
        Entry::Dir("opt/testenv", 0o755),
        Entry::File("opt/testenv/activate", ACTIVATE.as_bytes(), 0o644),
        Entry::Dir("opt/testenv/bin", 0o755),
        Entry::File("opt/testenv/bin/run-tests", RUNNER.as_bytes(), 0o755),
    ])
}

async fn push_instance_image(reg: &TestRegistry) {
    let spec = ImageSpec {
        working_dir: "/testbed".into(),
        ..ImageSpec::default()
    };
    push_image(
        reg,
        IMAGE_REPO,
        "latest",
        &[busybox_layer(), &testbed_layer()],
        &spec,
    )
    .await;
}

/// `instances.jsonl` + `swebench.toml` (image mode, no `[repos]`) in `dir`.
fn write_dataset(dir: &Path, registry: &str, instance_id: &str) -> std::path::PathBuf {
    let inst = serde_json::json!({
        "instance_id": instance_id, "repo": "acme/calc", "base_commit": "0123abcd",
        "patch": GOLD_PATCH, "test_patch": TEST_PATCH,
        "problem_statement": "add() subtracts instead of adding.",
        "version": "1.0",
        "FAIL_TO_PASS": "[\"tests/test_calc.sh::test_add\"]",
        "PASS_TO_PASS": "[\"tests/test_calc.sh::test_mul\"]",
    });
    let jsonl = dir.join("instances.jsonl");
    std::fs::write(&jsonl, format!("{inst}\n")).unwrap();
    std::fs::write(
        dir.join("swebench.toml"),
        format!(
            "[images]\nregistry = \"{registry}\"\nactivate = \". /opt/testenv/activate\"\n\n\
             [specs.\"acme/calc\".\"*\"]\ntest_cmd = \"run-tests\"\nparser = \"pytest\"\n"
        ),
    )
    .unwrap();
    jsonl
}

fn image_backend(reg: &TestRegistry, dir: &Path) -> Arc<ImageBackend> {
    let local = LocalBackend::new(LocalConfig::default())
        .expect("local sandbox backend (needs root and the arbor-sandbox-init binary)");
    let cfg = ImagesConfig {
        root: Some(dir.join("store")),
        max_bytes: None,
        registry: RegistryConfig {
            insecure: vec![reg.host.clone()],
            mirrors: BTreeMap::new(),
            docker_config: Some(dir.join("docker-config.json")),
        },
        build_network_host: false,
    };
    Arc::new(ImageBackend::new(local, &cfg).expect("image backend"))
}

fn check_options() -> CheckOptions {
    CheckOptions {
        concurrency: 1,
        prepare: PrepareOptions {
            images: true,
            ..PrepareOptions::default()
        },
        ..CheckOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gold_patch_resolves_in_the_instance_image_and_empty_patch_does_not() {
    let reg = TestRegistry::start();
    push_instance_image(&reg).await;
    let dir = tempfile::tempdir().unwrap();
    let jsonl = write_dataset(dir.path(), &reg.host, INSTANCE_ID);
    let tasks = arbor_task::load(&jsonl, &OpenOptions::default()).expect("load instances");
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0].environment.image.as_deref(),
        Some(format!("{}/{IMAGE_REPO}:latest", reg.host).as_str())
    );
    assert!(tasks[0].environment.git.is_none());

    let backend = image_backend(&reg, dir.path());
    let report = arbor_task::check(backend, tasks, &check_options()).await;
    assert_eq!(
        (report.oracle_pass, report.null_fail, report.infra_errors),
        (1, 1, 0),
        "{report:#?}\nregistry log:\n{}",
        reg.log()
    );
    assert!(report.errors.is_empty(), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_an_image_is_an_infrastructure_error_naming_it() {
    let reg = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let jsonl = write_dataset(dir.path(), &reg.host, "acme__calc-404");
    let tasks = arbor_task::load(&jsonl, &OpenOptions::default()).expect("load instances");
    let backend = image_backend(&reg, dir.path());
    let report = arbor_task::check(backend, tasks, &check_options()).await;
    assert_eq!(
        (report.oracle_pass, report.null_fail),
        (0, 0),
        "{report:#?}"
    );
    let reason = &report.errors[0].reason;
    assert!(
        reason.contains("sweb.eval.x86_64.acme_1776_calc-404"),
        "{reason}"
    );
}
