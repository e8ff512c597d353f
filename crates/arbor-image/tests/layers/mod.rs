//! Building real layer tars for the store tests (shared by tests/unpack.rs,
//! tests/store.rs and tests/archive.rs).
#![allow(dead_code)]

use std::io::Write;

use arbor_image::Digest;
use tar::{EntryType, Header};

/// A layer tar under construction.
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

/// A finished layer: its tar bytes and diff_id.
pub struct Layer {
    pub tar: Vec<u8>,
    pub diff_id: Digest,
}

impl Layer {
    /// The layer gzipped, with the blob's digest.
    pub fn gzip(&self) -> (Vec<u8>, Digest) {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&self.tar).unwrap();
        let gz = enc.finish().unwrap();
        let d = Digest::sha256(&gz);
        (gz, d)
    }
}

fn header(kind: EntryType, mode: u32, uid: u64, size: u64) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h
}

/// Put `name` into the header unchecked (the tar crate refuses `..` and
/// absolute names, which hostile-layer tests need).
fn set_raw_name(h: &mut Header, name: &str) {
    let field = &mut h.as_old_mut().name;
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

fn set_raw_link(h: &mut Header, target: &str) {
    let field = &mut h.as_old_mut().linkname;
    field.fill(0);
    field[..target.len()].copy_from_slice(target.as_bytes());
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn append(&mut self, mut h: Header, name: &str, data: &[u8]) -> &mut Self {
        set_raw_name(&mut h, name);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.append(header(EntryType::Directory, mode, 0, 0), name, &[])
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) -> &mut Self {
        self.file_owned(name, data, mode, 0)
    }

    pub fn file_owned(&mut self, name: &str, data: &[u8], mode: u32, uid: u64) -> &mut Self {
        self.append(
            header(EntryType::Regular, mode, uid, data.len() as u64),
            name,
            data,
        )
    }

    /// A file with PAX xattrs (`SCHILY.xattr.<key>`).
    pub fn file_with_xattrs(
        &mut self,
        name: &str,
        data: &[u8],
        xattrs: &[(&str, &str)],
    ) -> &mut Self {
        self.pax(name, xattrs);
        self.file(name, data, 0o644)
    }

    /// A directory with PAX xattrs.
    pub fn dir_with_xattrs(&mut self, name: &str, xattrs: &[(&str, &str)]) -> &mut Self {
        self.pax(name, xattrs);
        self.dir(name, 0o755)
    }

    fn pax(&mut self, name: &str, xattrs: &[(&str, &str)]) {
        let mut data = Vec::new();
        for (k, v) in xattrs {
            let body = format!(" SCHILY.xattr.{k}={v}\n");
            // The length prefix counts its own digits.
            let mut len = body.len() + 1;
            while body.len() + len.to_string().len() != len {
                len = body.len() + len.to_string().len();
            }
            data.extend_from_slice(format!("{len}{body}").as_bytes());
        }
        let h = header(EntryType::XHeader, 0o644, 0, data.len() as u64);
        self.append(
            h,
            &format!("PaxHeaders/{}", name.trim_end_matches('/')),
            &data,
        );
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut h = header(EntryType::Symlink, 0o777, 0, 0);
        set_raw_link(&mut h, target);
        self.append(h, name, &[])
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut h = header(EntryType::Link, 0o644, 0, 0);
        set_raw_link(&mut h, target);
        self.append(h, name, &[])
    }

    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header(EntryType::Char, 0o666, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.append(h, name, &[])
    }

    pub fn fifo(&mut self, name: &str) -> &mut Self {
        self.append(header(EntryType::Fifo, 0o600, 0, 0), name, &[])
    }

    pub fn finish(&mut self) -> Layer {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        let tar = builder.into_inner().unwrap();
        let diff_id = Digest::sha256(&tar);
        Layer { tar, diff_id }
    }
}

/// Debian's static busybox as a base layer: `bin/busybox`, applet symlinks,
/// and a few files upper layers hide or replace.
pub fn busybox_layer() -> Layer {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox missing: apt-get install -y busybox-static");
    let mut b = LayerBuilder::new();
    b.dir("bin/", 0o755).file("bin/busybox", &busybox, 0o755);
    for applet in ["sh", "ls", "cat", "echo"] {
        b.symlink(&format!("bin/{applet}"), "busybox");
    }
    b.dir("etc/", 0o755)
        .file("etc/motd", b"welcome\n", 0o644)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .dir("etc/keep/", 0o755)
        .file("etc/keep/a", b"a\n", 0o644)
        .file("etc/keep/b", b"b\n", 0o644)
        .dir("tmp/", 0o1777);
    b.finish()
}

/// A layer of `n` bytes of pseudo-random content in one file.
pub fn blob_layer(name: &str, n: usize, seed: u64) -> Layer {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let data: Vec<u8> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect();
    LayerBuilder::new().file(name, &data, 0o644).finish()
}
