//! The store's records, leases and disk budget, on real unpacked layers.

mod layers;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use arbor_image::{Digest, ImageConfig, ImageError, ImageRecord, Store, StoreOptions};
use layers::{Layer, LayerBuilder, blob_layer, busybox_layer};

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

fn record(reference: &str, layers: &[&Layer]) -> ImageRecord {
    let ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    ImageRecord {
        reference: reference.to_string(),
        id: Digest::sha256(ids.join(",").as_bytes()).to_string(),
        manifest_digest: None,
        layers: ids,
        config: ImageConfig::default(),
        created: 1,
    }
}

fn add(store: &Store, layer: &Layer) {
    store
        .add_layer(&mut &layer.tar[..], TAR, None, &layer.diff_id)
        .unwrap();
}

#[test]
fn store_and_lease_are_shareable() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Store>();
    shareable::<arbor_image::Lease>();
}

#[test]
fn records_resolve_by_normalized_reference_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    let base = busybox_layer();
    add(&store, &base);
    let rec = record("busybox", &[&base]);
    store.put_image(&rec).unwrap();
    let got = store
        .image("docker.io/library/busybox:latest")
        .unwrap()
        .unwrap();
    assert_eq!(got.reference, "docker.io/library/busybox:latest");
    assert_eq!(
        store.image("busybox:latest").unwrap().unwrap().layers,
        rec.layers
    );
    assert_eq!(store.image(&rec.id[7..19]).unwrap().unwrap().id, rec.id);
    assert_eq!(store.image(&rec.id).unwrap().unwrap().id, rec.id);
    assert!(store.image("alpine").unwrap().is_none());
    assert!(matches!(store.image("Not A Reference!"), Ok(None)));
    let pinned = format!("busybox@sha256:{}", "a".repeat(64));
    store.put_image(&record(&pinned, &[&base])).unwrap();
    assert!(store.image(&pinned).unwrap().is_some());
    assert_eq!(store.images().unwrap().len(), 2);
    store.remove_image("busybox").unwrap();
    assert!(store.image("busybox").unwrap().is_none());
    assert!(matches!(
        store.remove_image("busybox"),
        Err(ImageError::NotFound(_))
    ));
    assert!(
        store.has_layer(&base.diff_id),
        "untagging keeps layers until a prune"
    );
    let mut bad = rec.clone();
    bad.layers.push("sha256:nothex".into());
    assert!(matches!(store.put_image(&bad), Err(ImageError::Invalid(_))));
}

#[test]
fn lease_gives_layer_dirs_uppermost_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    let (base, top) = (busybox_layer(), blob_layer("top", 1000, 1));
    add(&store, &base);
    add(&store, &top);
    let lease = store.lease(&record("img", &[&base, &top])).unwrap();
    assert_eq!(
        lease.layer_dirs(),
        vec![
            store.layer_dir(&top.diff_id),
            store.layer_dir(&base.diff_id)
        ]
    );
    let usage = store.usage().unwrap();
    assert_eq!((usage.layers, usage.pinned), (2, 2));
    drop(lease);
    assert_eq!(store.usage().unwrap().pinned, 0);
}

/// Three images, a budget far below their size, a lease on one: eviction
/// takes only unleased layers, also when it runs from another "process"
/// (a second Store on the same root), and the budget holds once the lease goes.
#[test]
fn budget_evicts_only_unleased_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let budget = 1024;
    let opts = StoreOptions {
        max_bytes: Some(budget),
    };
    let store = Store::open(tmp.path(), opts).unwrap();
    let layers: Vec<Layer> = (0..3).map(|i| blob_layer("data", 200_000, i)).collect();
    let images: Vec<ImageRecord> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| record(&format!("img{i}"), &[l]))
        .collect();

    add(&store, &layers[0]);
    store.put_image(&images[0]).unwrap();
    let lease = store.lease(&images[0]).unwrap();
    add(&store, &layers[1]);
    store.put_image(&images[1]).unwrap();
    assert!(
        store.has_layer(&layers[0].diff_id),
        "leased layer survives the add's eviction"
    );
    add(&store, &layers[2]);
    store.put_image(&images[2]).unwrap();
    assert!(store.has_layer(&layers[0].diff_id));
    assert!(
        !store.has_layer(&layers[1].diff_id),
        "unleased LRU layer evicted"
    );
    assert!(
        store.has_layer(&layers[2].diff_id),
        "the layer just added is spared"
    );
    assert!(matches!(
        store.lease(&images[1]),
        Err(ImageError::NotFound(_))
    ));
    assert!(
        store.image("img1").unwrap().is_some(),
        "records outlive their layers"
    );

    let other = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    let report = other.prune(0).unwrap();
    assert_eq!(report.removed, vec![layers[2].diff_id.clone()]);
    assert_eq!(report.skipped_busy, 1);
    assert!(
        other.has_layer(&layers[0].diff_id),
        "a lease held elsewhere pins"
    );

    drop(lease);
    store.prune(budget).unwrap();
    let usage = store.usage().unwrap();
    assert!(usage.bytes <= budget, "{usage:?}");
    assert_eq!(usage.layers, 0);
    assert!(matches!(
        store.lease(&images[0]),
        Err(ImageError::NotFound(_))
    ));
    assert_eq!(fs::read_dir(tmp.path().join("trash")).unwrap().count(), 0);

    // A pull holding its earlier layers while adding the next keeps them all.
    add(&store, &layers[0]);
    let held = store
        .lease_layers(std::slice::from_ref(&layers[0].diff_id))
        .unwrap();
    add(&store, &layers[1]);
    add(&store, &layers[2]);
    assert!(store.has_layer(&layers[0].diff_id));
    assert!(!store.has_layer(&layers[1].diff_id));
    drop(held);
}

#[test]
fn open_cleans_crash_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    let layer = blob_layer("f", 100, 7);
    add(&store, &layer);
    // A dead process's unpack, a layer dir without metadata, metadata without a dir.
    let dead = tmp.path().join("staging/abc.999999999.0");
    let dead_scratch = tmp.path().join("tmp/download.999999999.3");
    fs::write(&dead_scratch, b"partial").unwrap();
    let live_scratch = store.scratch_path("download");
    fs::write(&live_scratch, b"in use").unwrap();
    let foreign = tmp.path().join("tmp/someone-elses-file");
    fs::write(&foreign, b"kept").unwrap();
    fs::create_dir_all(dead.join("half")).unwrap();
    fs::create_dir_all(tmp.path().join("l/0123456789abcdef01234567/usr")).unwrap();
    fs::write(tmp.path().join("meta/fedcba9876543210fedcba98.json"), br#"{"diff_id":"sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210","bytes":1}"#).unwrap();
    drop(store);
    let store = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    assert!(!dead.exists());
    assert!(!dead_scratch.exists(), "a dead process's scratch file goes");
    assert!(
        live_scratch.exists() && foreign.exists(),
        "live and unknown scratch stays"
    );
    assert!(!tmp.path().join("l/0123456789abcdef01234567").exists());
    assert!(
        !tmp.path()
            .join("meta/fedcba9876543210fedcba98.json")
            .exists()
    );
    assert!(store.has_layer(&layer.diff_id), "complete layers stay");
    assert_eq!(store.usage().unwrap().layers, 1);
}

#[test]
fn built_directories_are_added_with_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store"), StoreOptions::default()).unwrap();
    let upper = LayerBuilder::new()
        .file("etc/.wh.motd", b"", 0o644)
        .file("etc/keep/.wh..wh..opq", b"", 0o644)
        .file_owned("bin/su", b"x", 0o4755, 1000)
        .file_with_xattrs("bin/noted", b"n", &[("user.note", "kept")])
        .hardlink("bin/su2", "bin/su")
        .symlink("bin/link", "su")
        .finish();
    let src = store
        .add_layer(&mut &upper.tar[..], TAR, None, &upper.diff_id)
        .unwrap()
        .dir;
    let id = Digest::sha256(b"built step");
    let info = store.add_layer_dir(&id, &src).unwrap();
    let d = &info.dir;
    assert_ne!(d, &src);
    assert!(
        fs::symlink_metadata(d.join("etc/motd"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        xattr::get(d.join("etc/keep"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    let su = fs::metadata(d.join("bin/su")).unwrap();
    assert_eq!(
        (su.mode() & 0o7777, su.uid(), su.mtime()),
        (0o4755, 1000, 1_600_000_000)
    );
    assert_eq!(su.ino(), fs::metadata(d.join("bin/su2")).unwrap().ino());
    assert_eq!(
        fs::read_link(d.join("bin/link")).unwrap().to_str(),
        Some("su")
    );
    assert_eq!(
        xattr::get(d.join("bin/noted"), "user.note")
            .unwrap()
            .as_deref(),
        Some(&b"kept"[..])
    );
    assert_eq!(
        store.add_layer_dir(&id, &src).unwrap().dir,
        *d,
        "added once"
    );
    assert_eq!(store.unpack_count(), 2);
}
