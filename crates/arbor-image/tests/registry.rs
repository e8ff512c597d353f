//! Pulling from a real `docker-registry` on loopback (Debian packages
//! `docker-registry`, `busybox-static`, `apache2-utils`): platform choice in
//! multi-arch indexes, digest verification, plain HTTP only when asked,
//! mirrors and Docker-config credentials.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arbor_image::registry::download::lock_blob;
use arbor_image::{
    Digest, ImageError, NoProgress, PullProgress, Registry, RegistryConfig, Store, StoreOptions,
};
use support::images::{ImageSpec, Layer, Pushed, busybox_layer, host_arch, push_image, push_index};
use support::{TEST_PASSWORD, TEST_USER, TestRegistry};

/// A config that speaks plain HTTP to `reg` and reads credentials from an
/// (empty unless written) Docker config in `dir`.
fn config_for(reg: &TestRegistry, dir: &Path) -> RegistryConfig {
    RegistryConfig {
        insecure: vec![reg.host.clone()],
        mirrors: BTreeMap::new(),
        docker_config: Some(dir.join("config.json")),
    }
}

fn arch_layer(arch: &str) -> Layer {
    Layer::files(&[("etc/arch", arch.as_bytes())])
}

/// Push `<repo>:<arch>` for amd64 and arm64 (layers differ in /etc/arch) and
/// an index `<repo>:multi` listing the non-host one first, so a resolver
/// taking the first entry would pick the wrong one on either host.
async fn push_multi_arch(reg: &TestRegistry, repo: &str) -> Vec<Pushed> {
    let mut pushed = Vec::new();
    for arch in ["amd64", "arm64"] {
        let spec = ImageSpec {
            architecture: arch.into(),
            ..Default::default()
        };
        let layer = arch_layer(arch);
        pushed.push(push_image(reg, repo, arch, &[busybox_layer(), &layer], &spec).await);
    }
    pushed.sort_by_key(|p| p.architecture == host_arch());
    push_index(reg, repo, "multi", &pushed).await;
    pushed
}

#[tokio::test]
async fn multi_arch_index_resolves_to_the_host_platform() {
    let reg = TestRegistry::start();
    let pushed = push_multi_arch(&reg, "multi/busybox").await;
    let host = pushed
        .iter()
        .find(|p| p.architecture == host_arch())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let resolved = registry
        .resolve(&reg.reference("multi/busybox", "multi"))
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, host.manifest_digest);
    assert_eq!(resolved.config_digest, host.config_digest);
    let top = resolved.layers.last().unwrap();
    assert_eq!(top.digest, arch_layer(host_arch()).digest);
    assert_eq!(resolved.diff_ids[0], busybox_layer().diff_id);
}

#[tokio::test]
async fn config_fields_come_from_the_pushed_config() {
    let reg = TestRegistry::start();
    let spec = ImageSpec {
        env: vec!["PATH=/bin".into(), "GREETING=hello world".into()],
        working_dir: "/home/app".into(),
        user: "1000:1000".into(),
        cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
        ..Default::default()
    };
    push_image(&reg, "cfg/busybox", "v1", &[busybox_layer()], &spec).await;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let resolved = registry
        .resolve(&reg.reference("cfg/busybox", "v1"))
        .await
        .unwrap();
    assert_eq!(resolved.config.env, spec.env);
    assert_eq!(resolved.config.working_dir, "/home/app");
    assert_eq!(resolved.config.user, "1000:1000");
    assert_eq!(resolved.config.cmd, Some(spec.cmd.clone()));
    assert_eq!(resolved.name, reg.reference("cfg/busybox", "v1"));
}

#[tokio::test]
async fn corrupted_blob_is_refused_and_leaves_no_file() {
    let reg = TestRegistry::start();
    let layer = Layer::files(&[("etc/motd", b"the real bytes\n")]);
    push_image(
        &reg,
        "bad/blob",
        "v1",
        &[busybox_layer(), &layer],
        &ImageSpec::default(),
    )
    .await;
    // Same length, other bytes: only the digest can tell.
    let data = reg.blob_data_path(&layer.digest);
    let len = std::fs::metadata(&data).unwrap().len() as usize;
    std::fs::write(&data, vec![b'x'; len]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let resolved = registry
        .resolve(&reg.reference("bad/blob", "v1"))
        .await
        .unwrap();
    let scratch = dir.path().join("tmp");
    let desc = resolved.layers.last().unwrap();
    let _lock = lock_blob(&scratch, &desc.digest).await.unwrap();
    let err = registry
        .download(&resolved, desc, &scratch, &NoProgress)
        .await
        .err()
        .expect("a corrupted blob must be refused");
    assert!(matches!(err, ImageError::Invalid(_)), "{err}");
    assert!(err.to_string().contains(&layer.digest), "{err}");
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "downloads left behind: {left:?}");
    // The intact base layer still downloads and verifies.
    let base = registry
        .download(&resolved, &resolved.layers[0], &scratch, &NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(base.path()).unwrap(), busybox_layer().gz);
}

#[tokio::test]
async fn plain_http_registry_not_listed_insecure_is_not_spoken_to_over_http() {
    let reg = TestRegistry::start();
    push_image(
        &reg,
        "tls/busybox",
        "v1",
        &[busybox_layer()],
        &ImageSpec::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        insecure: vec![],
        ..config_for(&reg, dir.path())
    };
    let registry = Registry::new(cfg).unwrap();
    let err = registry
        .resolve(&reg.reference("tls/busybox", "v1"))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("insecure") && msg.contains(&reg.host), "{msg}");
}

#[tokio::test]
async fn unknown_tag_is_a_registry_error_naming_the_reference() {
    let reg = TestRegistry::start();
    push_image(
        &reg,
        "known/img",
        "v1",
        &[busybox_layer()],
        &ImageSpec::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let reference = reg.reference("known/img", "nope");
    let err = registry.resolve(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&reference) && msg.contains("MANIFEST_UNKNOWN"),
        "{msg}"
    );
}

#[tokio::test]
async fn mirror_is_used_and_a_dead_mirror_falls_back() {
    let origin = TestRegistry::start();
    let mirror = TestRegistry::start();
    let layer = Layer::files(&[("etc/where", b"mirror\n")]);
    let spec = ImageSpec::default();
    push_image(&origin, "m/busybox", "v1", &[busybox_layer()], &spec).await;
    let on_mirror = push_image(
        &mirror,
        "m/busybox",
        "v1",
        &[busybox_layer(), &layer],
        &spec,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let reference = origin.reference("m/busybox", "v1");

    let mut cfg = config_for(&origin, dir.path());
    cfg.insecure.push(mirror.host.clone());
    cfg.mirrors.insert(origin.host.clone(), mirror.host.clone());
    let resolved = Registry::new(cfg.clone())
        .unwrap()
        .resolve(&reference)
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, on_mirror.manifest_digest);
    assert_eq!(resolved.source.registry(), mirror.host);
    assert_eq!(
        resolved.name, reference,
        "the store records the original name"
    );

    let dead = mirror.host.clone();
    drop(mirror);
    cfg.mirrors.insert(origin.host.clone(), dead);
    let resolved = Registry::new(cfg)
        .unwrap()
        .resolve(&reference)
        .await
        .unwrap();
    assert_eq!(resolved.source.registry(), origin.host);
    assert_eq!(resolved.layers.len(), 1);
}

#[tokio::test]
async fn docker_config_credentials_are_used_and_wrong_ones_fail() {
    let reg = TestRegistry::with_auth();
    push_image(
        &reg,
        "auth/busybox",
        "v1",
        &[busybox_layer()],
        &ImageSpec::default(),
    )
    .await;
    let reference = reg.reference("auth/busybox", "v1");
    let dir = tempfile::tempdir().unwrap();
    let write_auth = |user: &str, pass: &str| {
        let auth = base64_encode(format!("{user}:{pass}").as_bytes());
        let json = serde_json::json!({ "auths": { &reg.host: { "auth": auth } } });
        std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    };

    let anonymous = Registry::new(config_for(&reg, dir.path())).unwrap();
    let err = anonymous.resolve(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert!(err.to_string().contains("401"), "{err}");

    write_auth(TEST_USER, "wrong-password");
    let wrong = Registry::new(config_for(&reg, dir.path())).unwrap();
    let err = wrong.resolve(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert!(err.to_string().contains("were refused"), "{err}");

    write_auth(TEST_USER, TEST_PASSWORD);
    let right = Registry::new(config_for(&reg, dir.path())).unwrap();
    let resolved = right.resolve(&reference).await.unwrap();
    assert_eq!(resolved.diff_ids, vec![busybox_layer().diff_id.clone()]);
}

/// Standard base64 (the Docker config's `auth` encoding), written out so the
/// test checks the crate's decoder against an independent encoder.
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Counts what a pull reported per blob digest.
#[derive(Default)]
struct Counting {
    started: Mutex<BTreeMap<String, usize>>,
    done: Mutex<Vec<(String, bool)>>,
}

impl PullProgress for Counting {
    fn layer_started(&self, digest: &str, _bytes: u64) {
        *self
            .started
            .lock()
            .unwrap()
            .entry(digest.into())
            .or_default() += 1;
    }
    fn layer_bytes(&self, _digest: &str, _n: u64) {}
    fn layer_done(&self, digest: &str, cached: bool) {
        self.done.lock().unwrap().push((digest.into(), cached));
    }
}

impl Counting {
    fn downloads(&self, digest: &str) -> usize {
        self.started
            .lock()
            .unwrap()
            .get(digest)
            .copied()
            .unwrap_or(0)
    }
    fn cached(&self, digest: &str) -> usize {
        let done = self.done.lock().unwrap();
        done.iter().filter(|(d, c)| d == digest && *c).count()
    }
}

fn open_store(dir: &Path) -> Store {
    Store::open(dir.join("store"), StoreOptions::default()).unwrap()
}

fn layer_file(store: &Store, diff_id: &str, path: &str) -> Vec<u8> {
    let dir = store.layer_dir(&Digest::parse(diff_id).unwrap());
    std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{path} in layer {diff_id}: {e}"))
}

#[tokio::test]
async fn pull_through_an_index_unpacks_the_host_platform_layers() {
    let reg = TestRegistry::start();
    push_multi_arch(&reg, "pull/multi").await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let record = registry
        .pull(&store, &reg.reference("pull/multi", "multi"), &NoProgress)
        .await
        .unwrap();
    let top = record.layers.last().unwrap();
    assert_eq!(layer_file(&store, top, "etc/arch"), host_arch().as_bytes());
    let base = &record.layers[0];
    assert_eq!(
        layer_file(&store, base, "bin/busybox"),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(store.image(&record.reference).unwrap(), Some(record));
}

#[tokio::test]
async fn two_tags_sharing_a_layer_download_it_once() {
    let reg = TestRegistry::start();
    let (a, b) = (
        Layer::files(&[("etc/tag", b"a\n")]),
        Layer::files(&[("etc/tag", b"b\n")]),
    );
    let spec = ImageSpec::default();
    push_image(&reg, "shared/img", "a", &[busybox_layer(), &a], &spec).await;
    push_image(&reg, "shared/img", "b", &[busybox_layer(), &b], &spec).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let progress = Counting::default();
    for tag in ["a", "b"] {
        registry
            .pull(&store, &reg.reference("shared/img", tag), &progress)
            .await
            .unwrap();
    }
    let base = &busybox_layer().digest;
    assert_eq!(progress.downloads(base), 1);
    assert_eq!(progress.cached(base), 1);
    assert_eq!(progress.downloads(&a.digest), 1);
    assert_eq!(progress.downloads(&b.digest), 1);
    assert_eq!(layer_file(&store, &b.diff_id, "etc/tag"), b"b\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pulls_of_one_image_download_each_layer_once() {
    let reg = TestRegistry::start();
    let top = Layer::files(&[("etc/motd", b"eight at once\n")]);
    push_image(
        &reg,
        "conc/img",
        "v1",
        &[busybox_layer(), &top],
        &ImageSpec::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_store(dir.path()));
    let registry = Arc::new(Registry::new(config_for(&reg, dir.path())).unwrap());
    let progress = Arc::new(Counting::default());
    let reference = reg.reference("conc/img", "v1");
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let (store, registry, progress) = (store.clone(), registry.clone(), progress.clone());
            let reference = reference.clone();
            tokio::spawn(async move { registry.pull(&store, &reference, &*progress).await })
        })
        .collect();
    let mut records = Vec::new();
    for pull in pulls {
        records.push(pull.await.unwrap().unwrap());
    }
    assert!(
        records
            .iter()
            .all(|r| r.layers == records[0].layers && r.id == records[0].id)
    );
    assert_eq!(progress.downloads(&busybox_layer().digest), 1);
    assert_eq!(progress.downloads(&top.digest), 1);
    assert_eq!(progress.cached(&top.digest), 7);
    assert_eq!(
        layer_file(&store, &top.diff_id, "etc/motd"),
        b"eight at once\n"
    );
}

#[tokio::test]
async fn corrupted_layer_is_refused_and_nothing_of_it_stays() {
    let reg = TestRegistry::start();
    let layer = Layer::files(&[("etc/motd", b"the real bytes\n")]);
    push_image(
        &reg,
        "bad/pull",
        "v1",
        &[busybox_layer(), &layer],
        &ImageSpec::default(),
    )
    .await;
    let data = reg.blob_data_path(&layer.digest);
    let len = std::fs::metadata(&data).unwrap().len() as usize;
    std::fs::write(&data, vec![b'x'; len]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let reference = reg.reference("bad/pull", "v1");
    let err = registry
        .pull(&store, &reference, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Invalid(_)), "{err}");
    assert!(!store.has_layer(&Digest::parse(&layer.diff_id).unwrap()));
    assert_eq!(store.image(&reference).unwrap(), None);
    let left: Vec<_> = std::fs::read_dir(store.tmp_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "scratch files left behind: {left:?}");
}

#[tokio::test]
async fn record_carries_the_config_and_ensure_does_not_download_again() {
    let reg = TestRegistry::start();
    let spec = ImageSpec {
        env: vec!["PATH=/bin".into(), "MODE=test".into()],
        working_dir: "/home/app".into(),
        user: "app".into(),
        ..Default::default()
    };
    let pushed = push_image(&reg, "rec/img", "v1", &[busybox_layer()], &spec).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let registry = Registry::new(config_for(&reg, dir.path())).unwrap();
    let reference = reg.reference("rec/img", "v1");
    let progress = Counting::default();
    let record = registry
        .ensure(&store, &reference, &progress)
        .await
        .unwrap();
    assert_eq!(record.config.env, spec.env);
    assert_eq!(record.config.working_dir, "/home/app");
    assert_eq!(record.config.user, "app");
    assert_eq!(record.id, pushed.config_digest);
    assert_eq!(
        record.manifest_digest.as_deref(),
        Some(pushed.manifest_digest.as_str())
    );
    assert_eq!(record.layers, vec![busybox_layer().diff_id.clone()]);
    let again = registry
        .ensure(&store, &reference, &progress)
        .await
        .unwrap();
    assert_eq!(again, record);
    assert_eq!(progress.downloads(&busybox_layer().digest), 1);
    assert!(
        progress.done.lock().unwrap().len() == 1,
        "ensure of a stored image pulled"
    );
}

#[tokio::test]
async fn a_mirror_failing_on_a_layer_falls_back_to_the_registry() {
    let origin = TestRegistry::start();
    let mirror = TestRegistry::start();
    let top = Layer::files(&[("etc/motd", b"from wherever\n")]);
    let spec = ImageSpec::default();
    for reg in [&origin, &mirror] {
        push_image(reg, "fb/img", "v1", &[busybox_layer(), &top], &spec).await;
    }
    // The mirror lost the top layer's bytes: its manifest resolves, the blob fails.
    std::fs::remove_file(mirror.blob_data_path(&top.digest)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_for(&origin, dir.path());
    cfg.insecure.push(mirror.host.clone());
    cfg.mirrors.insert(origin.host.clone(), mirror.host.clone());
    let store = open_store(dir.path());
    let registry = Registry::new(cfg).unwrap();
    let record = registry
        .pull(&store, &origin.reference("fb/img", "v1"), &NoProgress)
        .await
        .unwrap();
    assert_eq!(record.reference, origin.reference("fb/img", "v1"));
    assert_eq!(
        layer_file(&store, &top.diff_id, "etc/motd"),
        b"from wherever\n"
    );
}
