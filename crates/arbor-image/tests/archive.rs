//! Loading real archives built here: `docker save` (old and blobs forms) and
//! OCI layouts (directory, tar, gzipped tar) with a multi-platform index.

mod layers;

use std::fs;
use std::io::Write;
use std::path::Path;

use arbor_image::{Digest, ImageError, Store, StoreOptions, archive, platform};
use layers::{Layer, LayerBuilder, busybox_layer};
use serde_json::json;

fn config_blob(arch: &str, layers: &[&Layer]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/tmp"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn upper() -> Layer {
    LayerBuilder::new()
        .file("etc/.wh.motd", b"", 0o644)
        .file("etc/hello", b"hi\n", 0o644)
        .finish()
}

/// A tar of `files` (name, bytes) plus symlinks (name, target).
fn tar_of(files: &[(String, Vec<u8>)], symlinks: &[(String, String)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    for (name, target) in symlinks {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, name, target).unwrap();
    }
    b.into_inner().unwrap()
}

fn fresh_store(tmp: &Path, name: &str) -> Store {
    Store::open(tmp.join(name), StoreOptions::default()).unwrap()
}

#[test]
fn docker_save_old_and_blob_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (busybox_layer(), upper());
    let config = config_blob("amd64", &[&base, &top]);
    let id = Digest::sha256(&config);

    // Old form: <id>/layer.tar and <config hex>.json.
    let manifest = json!([{"Config": format!("{}.json", id.hex()), "RepoTags": ["busybox:1.0", "example.com/team/bb:v2"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]);
    let old = tar_of(
        &[
            (
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap(),
            ),
            (format!("{}.json", id.hex()), config.clone()),
            ("aaa/layer.tar".into(), base.tar.clone()),
            ("bbb/layer.tar".into(), top.tar.clone()),
        ],
        &[],
    );
    let path = tmp.path().join("old.tar");
    fs::write(&path, &old).unwrap();
    let store = fresh_store(tmp.path(), "s1");
    let records = archive::load(&store, &path).unwrap();
    let refs: Vec<&str> = records.iter().map(|r| r.reference.as_str()).collect();
    assert_eq!(
        refs,
        ["docker.io/library/busybox:1.0", "example.com/team/bb:v2"]
    );
    let rec = store.image("busybox:1.0").unwrap().unwrap();
    assert_eq!(rec.id, id.to_string());
    assert_eq!(
        rec.layers,
        [base.diff_id.to_string(), top.diff_id.to_string()]
    );
    assert_eq!(
        rec.config.cmd.as_deref(),
        Some(&["/bin/sh".to_string()][..])
    );
    assert_eq!(rec.config.working_dir, "/tmp");
    let lease = store.lease(&rec).unwrap();
    assert!(lease.layer_dirs()[1].join("bin/busybox").is_file());

    // Blobs form (docker 25+): gzipped layer under blobs/, `<id>/layer.tar`
    // a symlink to it, no RepoTags (so the id is the reference).
    let (gz, gz_digest) = top.gzip();
    let manifest = json!([{"Config": format!("blobs/sha256/{}", id.hex()),
        "Layers": [format!("blobs/sha256/{}", base.diff_id.hex()), "ccc/layer.tar"]}]);
    let new = tar_of(
        &[
            (
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap(),
            ),
            (format!("blobs/sha256/{}", id.hex()), config.clone()),
            (
                format!("blobs/sha256/{}", base.diff_id.hex()),
                base.tar.clone(),
            ),
            (format!("blobs/sha256/{}", gz_digest.hex()), gz),
        ],
        &[(
            "ccc/layer.tar".into(),
            format!("../blobs/sha256/{}", gz_digest.hex()),
        )],
    );
    let path = tmp.path().join("new.tar");
    fs::write(&path, &new).unwrap();
    let store = fresh_store(tmp.path(), "s2");
    let records = archive::load(&store, &path).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].reference, id.to_string());
    assert!(store.has_layer(&top.diff_id) && store.has_layer(&base.diff_id));

    // A corrupted layer is refused and nothing of it is cached.
    let mut bad = old.clone();
    let at = find(&bad, b"hi\n").unwrap();
    bad[at] = b'H';
    let path = tmp.path().join("bad.tar");
    fs::write(&path, &bad).unwrap();
    let store = fresh_store(tmp.path(), "s3");
    let err = archive::load(&store, &path).unwrap_err();
    assert!(
        matches!(&err, ImageError::Invalid(m) if m.contains("bbb/layer.tar")),
        "{err}"
    );
    assert!(!store.has_layer(&top.diff_id));
    assert!(store.images().unwrap().is_empty());
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An OCI layout: index.json -> nested index -> amd64 and arm64 manifests.
fn write_oci_layout(dir: &Path, host_layers: (&Layer, &Layer), other: &Layer) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (Digest, usize) {
        let d = Digest::sha256(bytes);
        fs::write(blobs.join(d.hex()), bytes).unwrap();
        (d, bytes.len())
    };
    let host = platform::host().architecture;
    let other_arch = if host == "arm64" { "amd64" } else { "arm64" };
    let mut manifests = Vec::new();
    for (arch, layers) in [
        (host.as_str(), vec![host_layers.0, host_layers.1]),
        (other_arch, vec![other]),
    ] {
        let (cfg, cfg_len) = put(&config_blob(arch, &layers));
        let descs: Vec<_> = layers
            .iter()
            .map(|l| {
                let (gz, _) = l.gzip();
                let (d, n) = put(&gz);
                json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n})
            })
            .collect();
        let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg.to_string(), "size": cfg_len},
            "layers": descs});
        let (m, n) = put(&serde_json::to_vec(&manifest).unwrap());
        let mut platform = json!({"os": "linux", "architecture": arch});
        if arch == "arm64" {
            platform["variant"] = json!("v8");
        }
        manifests.push(
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m.to_string(), "size": n, "platform": platform}),
        );
    }
    let nested = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    let (idx, n) = put(&serde_json::to_vec(&nested).unwrap());
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": idx.to_string(), "size": n, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn oci_layout_dir_and_tars_pick_the_host_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (busybox_layer(), upper());
    let foreign = LayerBuilder::new()
        .file("foreign", b"other arch", 0o644)
        .finish();
    let layout = tmp.path().join("myimg");
    write_oci_layout(&layout, (&base, &top), &foreign);

    let check = |store: &Store, path: &Path| {
        let records = archive::load(store, path).unwrap();
        assert_eq!(records.len(), 1, "one image: the host's");
        let rec = &records[0];
        assert_eq!(rec.reference, "docker.io/library/myimg:v1");
        assert_eq!(
            rec.layers,
            [base.diff_id.to_string(), top.diff_id.to_string()]
        );
        assert!(rec.manifest_digest.is_some());
        assert_eq!(rec.config.env, ["PATH=/bin"]);
        assert!(
            !store.has_layer(&foreign.diff_id),
            "the other platform's layers are not loaded"
        );
        assert_eq!(store.image("myimg:v1").unwrap().unwrap().id, rec.id);
    };
    check(&fresh_store(tmp.path(), "dir"), &layout);
    // A budget below one layer: the load still ends with all its layers.
    let tight = Store::open(
        tmp.path().join("tight"),
        StoreOptions { max_bytes: Some(1) },
    )
    .unwrap();
    check(&tight, &layout);
    assert!(tight.has_layer(&base.diff_id) && tight.has_layer(&top.diff_id));

    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &layout).unwrap();
    let plain = b.into_inner().unwrap();
    let tar_path = tmp.path().join("myimg.tar");
    fs::write(&tar_path, &plain).unwrap();
    check(&fresh_store(tmp.path(), "tar"), &tar_path);

    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&plain).unwrap();
    let gz_path = tmp.path().join("myimg.tar.gz");
    fs::write(&gz_path, enc.finish().unwrap()).unwrap();
    let store = fresh_store(tmp.path(), "gz");
    check(&store, &gz_path);
    assert_eq!(
        fs::read_dir(store.tmp_dir()).unwrap().count(),
        0,
        "scratch copy removed"
    );
}

#[test]
fn corrupted_oci_blobs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (busybox_layer(), upper());
    let foreign = LayerBuilder::new().file("foreign", b"x", 0o644).finish();
    let layout = tmp.path().join("img");
    write_oci_layout(&layout, (&base, &top), &foreign);
    // Flip a byte in the top layer's gzip blob (the smallest layer blob).
    let blobs = layout.join("blobs/sha256");
    let (gz, gz_digest) = top.gzip();
    let mut bad = gz.clone();
    let last = bad.len() - 5;
    bad[last] ^= 0x55;
    fs::write(blobs.join(gz_digest.hex()), &bad).unwrap();
    let store = fresh_store(tmp.path(), "s");
    let err = archive::load(&store, &layout).unwrap_err();
    assert!(
        matches!(&err, ImageError::Invalid(m) if m.contains(gz_digest.hex())),
        "{err}"
    );
    assert!(!store.has_layer(&top.diff_id));
    assert!(store.images().unwrap().is_empty());

    // A tampered index blob fails its digest before anything is unpacked.
    fs::write(blobs.join(gz_digest.hex()), &gz).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let nested = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let mut bytes = fs::read(blobs.join(&nested)).unwrap();
    bytes.push(b' ');
    fs::write(blobs.join(&nested), &bytes).unwrap();
    let store = fresh_store(tmp.path(), "s2");
    let err = archive::load(&store, &layout).unwrap_err();
    assert!(
        matches!(&err, ImageError::Invalid(m) if m.contains("digest mismatch")),
        "{err}"
    );
    assert_eq!(store.usage().unwrap().layers, 0);

    let not_an_archive = tmp.path().join("junk.tar");
    fs::write(
        &not_an_archive,
        tar_of(&[("README".into(), b"hello".to_vec())], &[]),
    )
    .unwrap();
    assert!(matches!(
        archive::load(&store, &not_an_archive),
        Err(ImageError::Invalid(_))
    ));
}
