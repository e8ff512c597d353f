//! The SWE-bench fixture shared by arbor-image's `swebench` test and the
//! CLI's: an image named as SWE-bench's harness names instance images
//! (`swebench/sweb.eval.x86_64.<id with __ → _1776_>`), busybox (Debian
//! `busybox-static`) plus a tiny shell "repository" in `/testbed` with a bug
//! in `calc.sh`, and a test runner that prints pytest `-rA` summary lines,
//! reachable only after the image's activation script has run (as
//! SWE-bench's conda env is); and the instances JSONL + `swebench.toml`
//! (image mode) that run it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crate::support::TestRegistry;
use crate::support::images::{Entry, ImageSpec, Layer, busybox_layer, push_image};

/// The instance (mixed case: image names are lower-cased as the harness does).
pub const INSTANCE_ID: &str = "Acme__Calc-1";
/// The repository its image is pushed to.
pub const IMAGE_REPO: &str = "swebench/sweb.eval.x86_64.acme_1776_calc-1";

/// `/testbed/calc.sh` at the base commit: `add` subtracts.
pub const CALC: &str = "add() { echo $(($1 - $2)); }\nmul() { echo $(($1 * $2)); }\n";
/// `/testbed/tests/test_calc.sh` at the base commit.
pub const TESTS: &str = "test_mul() { [ \"$(mul 3 4)\" = 12 ]; }\n";

/// The fix, applied by busybox `patch -p1` (the image has no git).
pub const GOLD_PATCH: &str = "\
diff --git a/calc.sh b/calc.sh
--- a/calc.sh
+++ b/calc.sh
@@ -1,2 +1,2 @@
-add() { echo $(($1 - $2)); }
+add() { echo $(($1 + $2)); }
 mul() { echo $(($1 * $2)); }
";

/// The test added with the fix.
pub const TEST_PATCH: &str = "\
diff --git a/tests/test_calc.sh b/tests/test_calc.sh
--- a/tests/test_calc.sh
+++ b/tests/test_calc.sh
@@ -1 +1,2 @@
 test_mul() { [ \"$(mul 3 4)\" = 12 ]; }
+test_add() { [ \"$(add 2 3)\" = 5 ]; }
";

/// Runs every `test_*` function of the given files against `calc.sh` and
/// prints one pytest `-rA` summary line per test.
pub const RUNNER: &str = r#"#!/bin/sh
. ./calc.sh
for f in "$@"; do
  for t in $(sed -n 's/^\(test_[a-z_0-9]*\)() *{.*/\1/p' "$f"); do
    if ( . "./$f"; "$t" ) >/dev/null 2>&1; then echo "PASSED $f::$t"; else echo "FAILED $f::$t"; fi
  done
done
"#;

/// `/bin/bash`: busybox's sh.
pub const BASH: &str = "#!/bin/sh\nexec /bin/sh \"$@\"\n";

/// The environment the tests run in, entered like SWE-bench's conda env.
pub const ACTIVATE: &str = "export PATH=/opt/testenv/bin:$PATH\n";

/// The instance's layer on top of busybox: `/testbed` at the buggy base,
/// the test environment under `/opt/testenv`, `patch` and `bash`.
pub fn testbed_layer() -> Layer {
    Layer::new(&[
        // busybox's sh runs its applets first, `patch` included.
        Entry::Symlink("bin/patch", "busybox"),
        // Scaffolds run commands with `bash -c`; SWE-bench images have bash,
        // busybox has none, so its sh answers to the name.
        Entry::File("bin/bash", BASH.as_bytes(), 0o755),
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

/// Push the instance image as `<IMAGE_REPO>:latest`.
pub async fn push_instance_image(reg: &TestRegistry) {
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
pub fn write_dataset(dir: &Path, registry: &str, instance_id: &str) -> PathBuf {
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
