//! `arbor image ...`, `arbor sandbox exec --image` and a Harbor task built
//! from its `environment/Dockerfile`, end to end as separate processes: a
//! real busybox userland (Debian's busybox-static), a store on disk, real
//! sandboxes (needs root).

use std::path::Path;
use std::process::Output;

mod common;
use common::arbor;

const APPLETS: [&str; 12] = [
    "sh", "ls", "cat", "echo", "mkdir", "rm", "test", "true", "false", "pwd", "id", "grep",
];

/// A build context whose Dockerfile makes a busybox base image from scratch.
/// `/bin/bash` runs busybox's shell, for Harbor scripts that ask for bash.
fn base_context(dir: &Path) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("bin/bash"), "#!/bin/sh\nexec /bin/sh \"$@\"\n").unwrap();
    std::fs::set_permissions(
        root.join("bin/bash"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin GREETING=hi\nWORKDIR /srv\n",
    )
    .unwrap();
}

/// A Harbor task whose environment is built FROM the base image with a setup RUN step.
fn harbor_task(dir: &Path) {
    let w = |p: &str, s: &str| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    };
    w(
        "task.toml",
        "version = \"1.0\"\n[verifier]\ntimeout_sec = 60.0\n[agent]\ntimeout_sec = 60.0\n",
    );
    w("instruction.md", "Write `hello` to /app/hello.txt.\n");
    w(
        "environment/Dockerfile",
        "FROM test/base:1\nWORKDIR /app\nRUN echo ready > /app/setup.txt\n",
    );
    w(
        "tests/test.sh",
        "#!/bin/bash\nif [ \"$(cat /app/setup.txt)\" = ready ] && [ \"$(cat /app/hello.txt 2>/dev/null)\" = hello ]; \
         then echo 1 > /logs/verifier/reward.txt; else echo 0 > /logs/verifier/reward.txt; fi\n",
    );
    w(
        "solution/solve.sh",
        "#!/bin/bash\necho hello > /app/hello.txt\n",
    );
}

fn run(args: &[&str], root: &Path) -> Output {
    let o = arbor()
        .args(args)
        .env("ARBOR_IMAGE_ROOT", root)
        .output()
        .expect("run arbor");
    assert!(o.status.success(), "arbor {args:?}: {}", describe(&o));
    o
}

fn describe(o: &Output) -> String {
    format!(
        "{} stdout: {} stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(o)))
}

#[test]
fn harbor_dockerfile_task_builds_checks_and_rebuilds_from_cache() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let base = dir.path().join("base");
    base_context(&base);
    run(
        &[
            "image",
            "build",
            base.to_str().unwrap(),
            "-t",
            "test/base:1",
        ],
        &root,
    );

    let out = run(
        &[
            "sandbox",
            "exec",
            "--image",
            "test/base:1",
            "--",
            "sh",
            "-c",
            "pwd; echo $GREETING",
        ],
        &root,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/srv\nhi\n");

    let task = dir.path().join("tasks/hello");
    harbor_task(&task);
    let set = dir.path().join("tasks");
    let report = json(&run(
        &["task", "check", set.to_str().unwrap(), "--json"],
        &root,
    ));
    assert_eq!(report["tasks"], 1, "{report}");
    assert_eq!(report["oracle_pass"], 1, "{report}");
    assert_eq!(report["null_fail"], 1, "{report}");
    assert_eq!(report["infra_errors"], 0, "{report}");

    // The task's image is in the build cache: building it again runs nothing.
    let env = task.join("environment");
    let rebuilt = json(&run(
        &[
            "image",
            "build",
            env.to_str().unwrap(),
            "-t",
            "test/again:1",
            "--json",
        ],
        &root,
    ));
    assert_eq!(rebuilt["cached_steps"], 2, "{rebuilt}");
    assert_eq!(rebuilt["steps"], 3, "{rebuilt}");

    let listed = json(&run(&["image", "ls", "--json"], &root));
    let refs: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reference"].as_str())
        .collect();
    assert!(refs.contains(&"docker.io/test/base:1"), "{refs:?}");
    run(&["image", "rm", "test/again:1"], &root);
    let pruned = json(&run(&["image", "prune", "--max-gb", "0", "--json"], &root));
    assert!(pruned["bytes_after"].as_u64() == Some(0), "{pruned}");
}

#[test]
fn unknown_image_and_bad_dockerfile_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nONBUILD RUN true\n").unwrap();
    let o = arbor()
        .args([
            "image",
            "build",
            ctx.to_str().unwrap(),
            "-t",
            "x:1",
            "--image-root",
        ])
        .arg(&root)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Dockerfile:2: ONBUILD is not supported"),
        "{err}"
    );

    let o = arbor()
        .args(["image", "inspect", "nothing/here:1", "--image-root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not in the store"),
        "{}",
        describe(&o)
    );
}
