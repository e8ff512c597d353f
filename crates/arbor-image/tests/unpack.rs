//! Unpacking real layers into the store: overlay format, metadata kept,
//! hostile entries and bad digests refused with nothing left behind.

mod layers;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use arbor_image::{Digest, ImageError, Store, StoreOptions};
use layers::{Layer, LayerBuilder, busybox_layer};

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions::default()).unwrap();
    (dir, store)
}

fn add(store: &Store, layer: &Layer) -> arbor_image::Result<arbor_image::LayerInfo> {
    store.add_layer(&mut &layer.tar[..], TAR, None, &layer.diff_id)
}

fn upper_layer() -> Layer {
    LayerBuilder::new()
        .dir("etc/", 0o755)
        .file(".wh.gone", b"", 0o644)
        .file("etc/.wh.motd", b"", 0o644)
        .dir("etc/keep/", 0o755)
        .file("etc/keep/.wh..wh..opq", b"", 0o644)
        .file("etc/keep/c", b"c\n", 0o644)
        .file_owned("usr/bin/su", b"#!/bin/sh\n", 0o4755, 1000)
        .file_with_xattrs("usr/share/noted", b"n\n", &[("user.note", "kept")])
        .dir_with_xattrs("usr/share/attrdir/", &[("user.dirnote", "dir")])
        .file_with_xattrs(
            "usr/share/redirected",
            b"r\n",
            &[("trusted.overlay.metacopy", "x")],
        )
        .dir_with_xattrs("usr/share/redir/", &[("trusted.overlay.redirect", "/etc")])
        .file("usr/lib/libx.so.1", b"library", 0o644)
        .hardlink("usr/lib/libx.so.1.0", "usr/lib/libx.so.1")
        .symlink("usr/lib/libx.so", "libx.so.1")
        .symlink("usr/abs", "/etc/passwd")
        .char_device("dev/null", 1, 3)
        .fifo("run/fifo")
        .finish()
}

#[test]
fn upper_layer_is_in_overlay_format_with_metadata_kept() {
    let (_tmp, store) = store();
    let layer = upper_layer();
    let info = add(&store, &layer).unwrap();
    let d = &info.dir;
    assert!(store.has_layer(&layer.diff_id));
    assert!(info.bytes > 0);

    let wh = fs::symlink_metadata(d.join("etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device(), "whiteout is a char device");
    assert_eq!((wh.rdev(), wh.uid(), wh.gid()), (0, 0, 0));
    assert!(!d.join("etc/.wh.motd").exists());
    assert!(
        d.join("gone")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_char_device(),
        "top-level whiteout"
    );
    assert_eq!(
        xattr::get(d.join("etc/keep"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!d.join("etc/keep/.wh..wh..opq").exists());

    let keep = fs::metadata(d.join("etc/keep")).unwrap();
    assert_eq!(
        keep.mtime(),
        1_600_000_000,
        "directory mtime kept despite its children"
    );
    assert_eq!(fs::metadata(d).unwrap().mode() & 0o7777, 0o755);
    let su = fs::metadata(d.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept after chown");
    assert_eq!((su.uid(), su.gid()), (1000, 1000));
    assert_eq!(su.mtime(), 1_600_000_000);
    assert_eq!(
        xattr::get(d.join("usr/share/noted"), "user.note")
            .unwrap()
            .as_deref(),
        Some(&b"kept"[..])
    );
    assert_eq!(
        xattr::get(d.join("usr/share/attrdir"), "user.dirnote")
            .unwrap()
            .as_deref(),
        Some(&b"dir"[..])
    );

    for path in ["usr/share/redirected", "usr/share/redir"] {
        let names: Vec<_> = xattr::list(d.join(path)).unwrap().collect();
        assert!(
            names.is_empty(),
            "a layer may not set overlay xattrs: {path} has {names:?}"
        );
    }
    let a = fs::metadata(d.join("usr/lib/libx.so.1")).unwrap();
    let b = fs::metadata(d.join("usr/lib/libx.so.1.0")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link is the same inode");
    assert_eq!(
        fs::read_link(d.join("usr/lib/libx.so")).unwrap(),
        Path::new("libx.so.1")
    );
    assert_eq!(
        fs::read_link(d.join("usr/abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(!d.join("dev/null").exists(), "device nodes are skipped");
    assert!(
        fs::symlink_metadata(d.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
}

/// Mount an overlay of the cached layers and read it: the whiteout hides
/// the lower file, the opaque directory hides the lower directory's entries.
#[test]
fn stacked_layers_mount_as_overlay() {
    let (tmp, store) = store();
    let (base, upper) = (busybox_layer(), upper_layer());
    let (gz, blob_digest) = base.gzip();
    let base_dir = store
        .add_layer(&mut &gz[..], TAR_GZ, Some(&blob_digest), &base.diff_id)
        .unwrap()
        .dir;
    let upper_dir = add(&store, &upper).unwrap().dir;
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let opts = format!("lowerdir={}:{}", upper_dir.display(), base_dir.display());
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount overlay");
    let check = || -> Vec<String> {
        let mut keep: Vec<String> = fs::read_dir(mnt.join("etc/keep"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        keep.sort();
        assert!(!mnt.join("etc/motd").exists(), "whiteout hides etc/motd");
        assert!(mnt.join("etc/passwd").exists());
        assert_eq!(
            fs::read_link(mnt.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        keep
    };
    let keep = std::panic::catch_unwind(check);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(
        keep.unwrap(),
        vec!["c".to_string()],
        "opaque dir hides a and b"
    );
    let out = Command::new(base_dir.join("bin/busybox"))
        .arg("true")
        .status()
        .unwrap();
    assert!(out.success(), "the unpacked busybox runs");
}

fn assert_refused(store: &Store, layer: &Layer, entry: &str) {
    match add(store, layer) {
        Err(ImageError::Invalid(msg)) => assert!(msg.contains(entry), "{msg} should name {entry}"),
        other => panic!("hostile layer with {entry} accepted: {other:?}"),
    }
    assert!(!store.has_layer(&layer.diff_id));
    for sub in ["l", "staging", "meta"] {
        let left: Vec<_> = fs::read_dir(store.root().join(sub)).unwrap().collect();
        assert!(
            left.is_empty(),
            "{sub}/ holds something of a refused layer: {left:?}"
        );
    }
}

#[test]
fn hostile_layers_are_refused_and_leave_nothing() {
    let (tmp, store) = store();
    let outside = tmp.path().join("x");
    let hostile = [
        (
            LayerBuilder::new()
                .file("ok", b"1", 0o644)
                .file("../x", b"escape", 0o644)
                .finish(),
            "../x",
        ),
        (
            LayerBuilder::new()
                .file("etc/../../x", b"escape", 0o644)
                .finish(),
            "etc/../../x",
        ),
        (
            LayerBuilder::new()
                .file("/etc/x", b"escape", 0o644)
                .finish(),
            "/etc/x",
        ),
        (
            LayerBuilder::new()
                .symlink("a", "/")
                .file("a/x", b"escape", 0o644)
                .finish(),
            "a/x",
        ),
        (
            LayerBuilder::new()
                .symlink("a", "..")
                .dir("a/d/", 0o755)
                .finish(),
            "a/d",
        ),
        (LayerBuilder::new().hardlink("h", "../x").finish(), "../x"),
        (
            LayerBuilder::new()
                .symlink("a", "/etc")
                .hardlink("h", "a/passwd")
                .finish(),
            "a/passwd",
        ),
        (
            LayerBuilder::new()
                .symlink("a", "/tmp")
                .file("a/.wh.x", b"", 0o644)
                .finish(),
            "a/.wh.x",
        ),
    ];
    for (layer, entry) in &hostile {
        assert_refused(&store, layer, entry);
    }
    assert!(!outside.exists());
    assert!(!tmp.path().join("d").exists());
}

#[test]
fn digests_are_verified() {
    let (_tmp, store) = store();
    let layer = LayerBuilder::new().file("f", b"content", 0o644).finish();
    let (gz, blob_digest) = layer.gzip();
    let wrong = Digest::sha256(b"something else");
    let err = store
        .add_layer(&mut &gz[..], TAR_GZ, Some(&wrong), &layer.diff_id)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Invalid(m) if m.contains("layer blob")),
        "{err}"
    );
    assert!(!store.has_layer(&layer.diff_id));
    let err = store
        .add_layer(&mut &gz[..], TAR_GZ, Some(&blob_digest), &wrong)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Invalid(m) if m.contains("diff_id")),
        "{err}"
    );
    assert!(!store.has_layer(&wrong));
    let mut corrupt = gz.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let err = store
        .add_layer(&mut &corrupt[..], TAR_GZ, None, &layer.diff_id)
        .unwrap_err();
    assert!(matches!(err, ImageError::Invalid(_)), "{err}");
    let err = store.add_layer(
        &mut &gz[..],
        "application/vnd.oci.image.layer.v1.tar+zstd",
        None,
        &layer.diff_id,
    );
    assert!(matches!(err, Err(ImageError::Invalid(m)) if m.contains("zstd")));
    assert_eq!(
        fs::read_dir(store.root().join("staging")).unwrap().count(),
        0
    );
    store
        .add_layer(&mut &gz[..], TAR_GZ, Some(&blob_digest), &layer.diff_id)
        .unwrap();
    assert_eq!(
        fs::read(store.layer_dir(&layer.diff_id).join("f")).unwrap(),
        b"content"
    );
}

#[test]
fn concurrent_adds_unpack_once() {
    let (tmp, store) = store();
    let store = std::sync::Arc::new(store);
    let layer = std::sync::Arc::new(busybox_layer());
    let root = store.root().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (store, layer, root) = (store.clone(), layer.clone(), root.clone());
            std::thread::spawn(move || {
                // Half share one Store; half open their own, as other
                // processes would (separate flock descriptions).
                let own;
                let s: &Store = if i % 2 == 0 {
                    &store
                } else {
                    own = Store::open(&root, StoreOptions::default()).unwrap();
                    &own
                };
                add(s, &layer).unwrap();
                s.unpack_count()
            })
        })
        .collect();
    let own_counts: u64 = threads
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, t)| t.join().unwrap())
        .sum();
    assert_eq!(
        own_counts + store.unpack_count(),
        1,
        "unpacked exactly once"
    );
    assert!(store.has_layer(&layer.diff_id));
    drop(tmp);
}

/// The child side of `concurrent_processes_unpack_once`: add the layer tar
/// named by the environment and print how many unpacks this process did.
#[test]
#[ignore = "run by concurrent_processes_unpack_once in child processes"]
fn child_adds_layer() {
    let root = std::env::var("ARBOR_TEST_STORE").unwrap();
    let tar = fs::read(std::env::var("ARBOR_TEST_LAYER").unwrap()).unwrap();
    let store = Store::open(root, StoreOptions::default()).unwrap();
    let diff_id = Digest::sha256(&tar);
    store.add_layer(&mut &tar[..], TAR, None, &diff_id).unwrap();
    println!("UNPACKS={}", store.unpack_count());
}

#[test]
fn concurrent_processes_unpack_once() {
    let (tmp, store) = store();
    let layer = busybox_layer();
    let tar_path = tmp.path().join("layer.tar");
    fs::write(&tar_path, &layer.tar).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_adds_layer",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("ARBOR_TEST_STORE", store.root())
                .env("ARBOR_TEST_LAYER", &tar_path)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut unpacks = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let n = text
            .lines()
            .find_map(|l| l.split("UNPACKS=").nth(1))
            .unwrap_or_else(|| panic!("child did not report: {text}"));
        unpacks += n.trim().parse::<u64>().unwrap();
    }
    assert_eq!(unpacks, 1, "four processes, one unpack");
    assert!(store.has_layer(&layer.diff_id));
}
