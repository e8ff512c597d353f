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
mod swebench_image;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arbor_image::RegistryConfig;
use arbor_image::backend::{ImageBackend, ImagesConfig};
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_task::{CheckOptions, OpenOptions, PrepareOptions};
use support::TestRegistry;
use swebench_image::{IMAGE_REPO, INSTANCE_ID, push_instance_image, write_dataset};

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
