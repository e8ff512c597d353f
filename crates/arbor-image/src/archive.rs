//! Loading images from archives: `docker save` tarballs (`manifest.json`,
//! in both the old `<id>/layer.tar` and the newer `blobs/sha256/` forms) and
//! OCI image layouts (`oci-layout` + `index.json`, as a directory or a tar,
//! plain or gzipped). Every blob is verified against its digest (config and
//! manifests by name, layers by blob digest where the archive names one and
//! always by the config's diff_ids); a corrupted archive is refused.
//!
//! References: docker's `RepoTags`; in an OCI layout the annotation
//! `io.containerd.image.name` or `org.opencontainers.image.ref.name` (a full
//! reference, or a tag added to the archive's file name), else the archive's
//! name. Images with no name get their id as reference.

mod source;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use oci_client::manifest::{ImageIndexEntry, OciImageIndex, OciImageManifest};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::{ImageConfig, ImageRecord};
use crate::digest::{Digest, HashingReader};
use crate::error::{ImageError, Result};
use crate::platform;
use crate::store::{Lease, Store, normalize_reference};
use crate::unpack::Compression;
use source::Source;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Nested indexes followed at most this deep.
const MAX_INDEX_DEPTH: usize = 4;

/// Load every image of the archive at `path` into `store` (layers unpacked,
/// records put) and return their records.
pub fn load(store: &Store, path: &Path) -> Result<Vec<ImageRecord>> {
    let source = Source::open(path, store)?;
    let name = archive_name(path);
    let loader = Loader {
        store,
        source: &source,
    };
    if source.exists("manifest.json") {
        loader.docker()
    } else if source.exists("index.json") {
        if !source.exists("oci-layout") {
            return Err(ImageError::Invalid(format!(
                "{}: index.json without oci-layout",
                path.display()
            )));
        }
        loader.oci(&name)
    } else {
        Err(ImageError::Invalid(format!(
            "{}: neither a docker save archive (manifest.json) nor an OCI image layout (index.json)",
            path.display()
        )))
    }
}

/// The archive's file name without `.tar`/`.tar.gz`/`.tgz`/`.oci` (a
/// default image name for OCI layouts that carry none).
fn archive_name(path: &Path) -> String {
    let mut name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    for ext in [".gz", ".tgz", ".tar", ".oci"] {
        if let Some(stripped) = name.strip_suffix(ext) {
            name = stripped.to_string();
        }
    }
    name
}

/// `manifest.json` of `docker save`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The parts of an image config blob the store needs.
#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: ImageConfig,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<Digest>,
}

struct Loader<'a> {
    store: &'a Store,
    source: &'a Source,
}

impl Loader<'_> {
    fn docker(&self) -> Result<Vec<ImageRecord>> {
        let entries: Vec<DockerEntry> =
            parse("manifest.json", &self.source.read_small("manifest.json")?)?;
        let mut records = Vec::new();
        for entry in entries {
            let config_bytes = self.source.read_small(&entry.config)?;
            let id = Digest::sha256(&config_bytes);
            if let Some(named) = digest_in_name(&entry.config) {
                named.verify(&id, &format!("image config {}", entry.config))?;
            }
            let config: ConfigBlob = parse(&entry.config, &config_bytes)?;
            check_layer_count(&id, entry.layers.len(), &config.rootfs.diff_ids)?;
            let mut held = Vec::new();
            for (name, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
                held.push(self.add_layer(name, None, digest_in_name(name).as_ref(), diff_id)?);
            }
            let references = entry.repo_tags.unwrap_or_default();
            records.extend(self.put(&id, None, &config, references)?);
        }
        Ok(records)
    }

    fn oci(&self, archive_name: &str) -> Result<Vec<ImageRecord>> {
        let index: OciImageIndex = parse("index.json", &self.source.read_small("index.json")?)?;
        // Entries naming the same image for several platforms: keep the host's.
        let mut groups: BTreeMap<Option<String>, Vec<ImageIndexEntry>> = BTreeMap::new();
        for entry in index.manifests {
            groups
                .entry(reference_annotation(&entry))
                .or_default()
                .push(entry);
        }
        let untagged = groups.get(&None).map_or(0, Vec::len);
        let mut records = Vec::new();
        for (name, entries) in groups {
            let chosen: Vec<ImageIndexEntry> = if entries.iter().any(|e| e.platform.is_some()) {
                let i = platform::choose(&entries).ok_or_else(|| no_platform(&name))?;
                vec![entries[i].clone()]
            } else {
                entries
            };
            for entry in chosen {
                let (manifest_digest, manifest) = self.resolve(&entry, 0)?;
                let reference = match &name {
                    Some(n) if n.contains('/') || n.contains(':') || n.contains('@') => n.clone(),
                    Some(tag) => format!("{archive_name}:{tag}"),
                    None if untagged == 1 && normalize_reference(archive_name).is_ok() => {
                        archive_name.to_string()
                    }
                    None => String::new(),
                };
                records.extend(self.oci_image(&manifest_digest, &manifest, reference)?);
            }
        }
        Ok(records)
    }

    /// Follow an index entry (through nested indexes) to a manifest for the host.
    fn resolve(&self, entry: &ImageIndexEntry, depth: usize) -> Result<(Digest, OciImageManifest)> {
        let digest = Digest::parse(&entry.digest)?;
        let bytes = self.blob_bytes(&digest)?;
        let value: serde_json::Value = parse(&entry.digest, &bytes)?;
        if value.get("manifests").is_none() {
            return Ok((digest, parse(&entry.digest, &bytes)?));
        }
        if depth >= MAX_INDEX_DEPTH {
            return Err(ImageError::Invalid(format!(
                "image index {digest}: nested too deep"
            )));
        }
        let nested: OciImageIndex = parse(&entry.digest, &bytes)?;
        let i = platform::choose(&nested.manifests)
            .ok_or_else(|| no_platform(&Some(digest.to_string())))?;
        self.resolve(&nested.manifests[i], depth + 1)
    }

    fn oci_image(
        &self,
        manifest_digest: &Digest,
        manifest: &OciImageManifest,
        reference: String,
    ) -> Result<Vec<ImageRecord>> {
        let id = Digest::parse(&manifest.config.digest)?;
        let config: ConfigBlob = parse(&manifest.config.digest, &self.blob_bytes(&id)?)?;
        check_layer_count(&id, manifest.layers.len(), &config.rootfs.diff_ids)?;
        let mut held = Vec::new();
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            let digest = Digest::parse(&layer.digest)?;
            held.push(self.add_layer(
                &blob_name(&digest),
                Some(&layer.media_type),
                Some(&digest),
                diff_id,
            )?);
        }
        let references = if reference.is_empty() {
            vec![]
        } else {
            vec![reference]
        };
        self.put(&id, Some(manifest_digest), &config, references)
    }

    /// Unpack one layer unless cached, and pin it until the image is
    /// recorded (a budgeted store's eviction after the next add must not
    /// take it). The compression comes from the media type when there is
    /// one, else from the blob's first bytes.
    fn add_layer(
        &self,
        name: &str,
        media_type: Option<&str>,
        blob: Option<&Digest>,
        diff_id: &Digest,
    ) -> Result<Lease> {
        let one = std::slice::from_ref(diff_id);
        if let Ok(lease) = self.store.lease_layers(one) {
            return Ok(lease);
        }
        let mut reader = BufReader::new(self.source.open_file(name)?);
        let media_type = match media_type {
            Some(mt) => mt,
            None => match Compression::sniff(
                reader
                    .fill_buf()
                    .map_err(|e| ImageError::io(format!("read {name}"), e))?,
            ) {
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
            },
        };
        self.store
            .add_layer(&mut reader, media_type, blob, diff_id)
            .map_err(|e| match e {
                ImageError::Invalid(m) => ImageError::Invalid(format!("archive layer {name}: {m}")),
                other => other,
            })?;
        self.store.lease_layers(one)
    }

    /// A JSON blob of `blobs/`, verified against its digest.
    fn blob_bytes(&self, digest: &Digest) -> Result<Vec<u8>> {
        let name = blob_name(digest);
        let mut hashing = HashingReader::new(self.source.open_file(&name)?);
        let mut bytes = Vec::new();
        hashing
            .by_ref()
            .take(16 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::io(format!("read {name} from archive"), e))?;
        digest.verify(&hashing.finish(), &format!("archive blob {name}"))?;
        Ok(bytes)
    }

    fn put(
        &self,
        id: &Digest,
        manifest: Option<&Digest>,
        config: &ConfigBlob,
        references: Vec<String>,
    ) -> Result<Vec<ImageRecord>> {
        let references = if references.is_empty() {
            vec![id.to_string()]
        } else {
            references
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = Vec::new();
        for reference in references {
            let record = ImageRecord {
                reference: normalize_reference(&reference)?,
                id: id.to_string(),
                manifest_digest: manifest.map(Digest::to_string),
                layers: config
                    .rootfs
                    .diff_ids
                    .iter()
                    .map(Digest::to_string)
                    .collect(),
                config: config.config.clone(),
                created,
            };
            self.store.put_image(&record)?;
            out.push(record);
        }
        Ok(out)
    }
}

fn reference_annotation(entry: &ImageIndexEntry) -> Option<String> {
    let annotations = entry.annotations.as_ref()?;
    annotations
        .get(CONTAINERD_NAME)
        .or_else(|| annotations.get(REF_NAME))
        .cloned()
}

fn no_platform(name: &Option<String>) -> ImageError {
    let host = platform::host();
    ImageError::Invalid(format!(
        "image {}: no manifest for {}/{} in the archive",
        name.as_deref().unwrap_or("(unnamed)"),
        host.os,
        host.architecture
    ))
}

fn check_layer_count(id: &Digest, layers: usize, diff_ids: &[Digest]) -> Result<()> {
    if layers == diff_ids.len() {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!(
            "image {id}: {layers} layers but {} diff_ids in its config",
            diff_ids.len()
        )))
    }
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm(), digest.hex())
}

/// The digest an archive file is named by: `blobs/sha256/<hex>` or `<hex>.json`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let clean = source::clean(name).ok()?;
    if let Some(hex) = clean.strip_prefix("blobs/sha256/") {
        return Digest::parse(&format!("sha256:{hex}")).ok();
    }
    clean
        .strip_suffix(".json")
        .filter(|hex| !hex.contains('/'))
        .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
}

fn parse<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid(format!("archive {what}: {e}")))
}
