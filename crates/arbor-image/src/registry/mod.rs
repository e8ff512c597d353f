//! Talking to OCI registries: client settings (plain HTTP only for hosts
//! listed as insecure, mirrors, Docker-config credentials), resolving a
//! reference to the host platform's manifest and its config, and verified
//! blob downloads.

pub mod auth;
pub mod download;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::{Client, Reference};
use serde::Deserialize;

use crate::config::ImageConfig;
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use auth::{Credentials, DockerConfig};

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Hosts (`host:port`, as references name them) spoken to over plain
    /// HTTP. Every other host is HTTPS only: a registry is never downgraded
    /// to HTTP unless listed here.
    pub insecure: Vec<String>,
    /// Registry host -> mirror host (e.g. `docker.io` -> `mirror.local:5000`).
    /// A pull tries the mirror first and falls back to the registry itself
    /// when the mirror fails.
    pub mirrors: BTreeMap<String, String>,
    /// Docker client config holding credentials; `None` reads
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

/// Told about each layer of a pull (for progress bars and tests).
pub trait PullProgress: Send + Sync {
    /// A layer download starts; `bytes` is its size per the manifest.
    fn layer_started(&self, digest: &str, bytes: u64);
    /// `n` more bytes of the layer arrived.
    fn layer_bytes(&self, digest: &str, n: u64);
    /// The layer is in the store; `cached` when it was there already and
    /// nothing was downloaded.
    fn layer_done(&self, digest: &str, cached: bool);
}

/// A [`PullProgress`] that ignores everything.
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn layer_started(&self, _: &str, _: u64) {}
    fn layer_bytes(&self, _: &str, _: u64) {}
    fn layer_done(&self, _: &str, _: bool) {}
}

/// A registry client (wraps `oci_client::Client`, which does the bearer
/// token flow). Cheap to share by reference across concurrent pulls.
pub struct Registry {
    pub(crate) client: Client,
    cfg: RegistryConfig,
    docker: DockerConfig,
}

/// A reference resolved to one platform's image: where it was found, its
/// manifest and its parsed config.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The reference as the user gave it, normalized
    /// (`docker.io/library/busybox:latest`): what the store records.
    pub name: String,
    /// Where the manifest came from (a mirror or the registry itself);
    /// blobs are fetched from the same place.
    pub source: Reference,
    /// Whether `source` is a mirror (a failed layer download then falls
    /// back to the registry itself).
    pub via_mirror: bool,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// Digest of the config blob (the image id).
    pub config_digest: String,
    /// Layer blobs, bottom first.
    pub layers: Vec<OciDescriptor>,
    /// `rootfs.diff_ids`, bottom first, one per layer.
    pub diff_ids: Vec<String>,
    /// The runtime config.
    pub config: ImageConfig,
}

/// The parts of a config blob a pull needs.
#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl Registry {
    /// A client for `cfg`; reads the Docker config now (a malformed one is an
    /// error, a missing one means anonymous pulls).
    pub fn new(cfg: RegistryConfig) -> Result<Registry> {
        let docker = match cfg
            .docker_config
            .clone()
            .or_else(DockerConfig::default_path)
        {
            Some(path) => DockerConfig::load(&path)?,
            None => DockerConfig::default(),
        };
        let client = Client::try_from(client_config(&cfg))
            .map_err(|e| ImageError::Registry(format!("cannot build the HTTP client: {e}")))?;
        Ok(Registry {
            client,
            cfg,
            docker,
        })
    }

    /// The settings this client was made with.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Parse and normalize a reference (`busybox` ->
    /// `docker.io/library/busybox:latest`).
    pub fn parse_reference(reference: &str) -> Result<Reference> {
        reference
            .parse()
            .map_err(|e| ImageError::Invalid(format!("bad image reference {reference:?}: {e}")))
    }

    /// Resolve `reference` to the host platform's manifest and config,
    /// trying its mirror first when one is configured.
    pub async fn resolve(&self, reference: &str) -> Result<Resolved> {
        let original = Self::parse_reference(reference)?;
        let name = original.whole();
        if let Some(mirror) = self.cfg.mirrors.get(original.registry()) {
            let via = mirrored(&original, mirror);
            match self.resolve_from(&name, via, true).await {
                Ok(resolved) => return Ok(resolved),
                Err(e) => tracing::warn!(
                    reference = %name,
                    mirror = %mirror,
                    error = %e,
                    "mirror failed; pulling from the registry itself"
                ),
            }
        }
        self.resolve_from(&name, original, false).await
    }

    /// Resolve `name` at `source` only (no mirror logic); `via_mirror` is
    /// recorded in the result.
    pub(crate) async fn resolve_from(
        &self,
        name: &str,
        source: Reference,
        via_mirror: bool,
    ) -> Result<Resolved> {
        let creds = self.credentials(&source)?;
        let auth = creds.registry_auth();
        let host = source.registry().to_string();
        let (manifest, manifest_digest) = self
            .client
            .pull_image_manifest(&source, &auth)
            .await
            .map_err(|e| with_hint(oci_error(&source.whole(), e), &creds, &host))?;
        let blob = download::fetch_small_blob(&self.client, &source, &manifest.config).await?;
        let parsed: ConfigBlob = serde_json::from_slice(&blob).map_err(|e| {
            ImageError::Invalid(format!(
                "{}: config blob {} is not an OCI image config: {e}",
                source.whole(),
                manifest.config.digest
            ))
        })?;
        if parsed.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Invalid(format!(
                "{}: manifest has {} layers but the config lists {} diff_ids",
                source.whole(),
                manifest.layers.len(),
                parsed.rootfs.diff_ids.len()
            )));
        }
        for id in &parsed.rootfs.diff_ids {
            Digest::parse(id)?;
        }
        Ok(Resolved {
            name: name.to_string(),
            source,
            via_mirror,
            manifest_digest,
            config_digest: manifest.config.digest.clone(),
            layers: manifest.layers,
            diff_ids: parsed.rootfs.diff_ids,
            config: parsed.config.unwrap_or_default(),
        })
    }

    /// Download blob `desc` of a resolved image into scratch dir `dir`,
    /// verified (see [`download::download_blob`]). Callers that may race for
    /// the same blob hold [`download::lock_blob`] around it.
    pub async fn download(
        &self,
        resolved: &Resolved,
        desc: &OciDescriptor,
        dir: &std::path::Path,
        progress: &dyn PullProgress,
    ) -> Result<download::TempBlob> {
        download::download_blob(&self.client, &resolved.source, desc, dir, progress).await
    }

    /// The credentials for the host `source` is fetched from.
    fn credentials(&self, source: &Reference) -> Result<Credentials> {
        self.docker.credentials(source.registry())
    }
}

/// oci-client settings for `cfg`: HTTPS except the listed insecure hosts, the
/// host platform's manifest out of an index, bounded connect/read waits.
fn client_config(cfg: &RegistryConfig) -> ClientConfig {
    ClientConfig {
        protocol: ClientProtocol::HttpsExcept(cfg.insecure.clone()),
        platform_resolver: Some(Box::new(host_platform_resolver)),
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    }
}

/// Pick the index entry that best fits this host ([`crate::platform::choose`]:
/// os, GOARCH name and CPU variant), not merely the first linux/amd64 one.
fn host_platform_resolver(entries: &[ImageIndexEntry]) -> Option<String> {
    crate::platform::choose(entries).map(|i| entries[i].digest.clone())
}

/// `reference` with its registry replaced by `mirror`.
fn mirrored(reference: &Reference, mirror: &str) -> Reference {
    let repo = reference.repository().to_string();
    match (reference.digest(), reference.tag()) {
        (Some(digest), _) => Reference::with_digest(mirror.into(), repo, digest.into()),
        (None, tag) => {
            Reference::with_tag(mirror.into(), repo, tag.unwrap_or("latest").to_string())
        }
    }
}

/// An oci-client error as an [`ImageError`], naming `what` (the reference)
/// and the HTTP status when there is one: a digest mismatch or malformed
/// manifest is the image's fault (Invalid), the rest is the registry's or the
/// network's (Registry).
pub(crate) fn oci_error(what: &str, e: OciDistributionError) -> ImageError {
    use OciDistributionError as E;
    match e {
        E::DigestError(d) => ImageError::Invalid(format!("{what}: {d}; refused")),
        E::ManifestParsingError(m) | E::VersionedParsingError(m) => {
            ImageError::Invalid(format!("{what}: malformed manifest: {m}"))
        }
        E::UnsupportedMediaTypeError(m) => {
            ImageError::Invalid(format!("{what}: unsupported manifest media type {m}"))
        }
        E::ImageManifestNotFoundError(m) => {
            ImageError::Invalid(format!("{what}: no usable manifest: {m}"))
        }
        E::ServerError { code, url, message } => ImageError::Registry(format!(
            "{what}: HTTP {code} from {url}: {}",
            message.trim()
        )),
        E::RegistryError { envelope, url } => {
            // The registry's error codes (MANIFEST_UNKNOWN, DENIED, ...) say
            // more than oci-client's rendering, which drops them.
            let errors: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| {
                    let code = serde_json::to_value(&e.code).ok();
                    let code = code.as_ref().and_then(|c| c.as_str()).unwrap_or("ERROR");
                    format!("{code}: {}", e.message)
                })
                .collect();
            ImageError::Registry(format!(
                "{what}: registry refused {url}: {}",
                errors.join("; ")
            ))
        }
        E::UnauthorizedError { url } => {
            ImageError::Registry(format!("{what}: HTTP 401 unauthorized at {url}"))
        }
        E::AuthenticationFailure(m) => {
            ImageError::Registry(format!("{what}: authentication failed: {}", m.trim()))
        }
        E::RequestError(r) => {
            // reqwest's own text names the status ("HTTP status client
            // error (404 Not Found) for url ...") when there is one.
            let hint = match r.url() {
                Some(url) if url.scheme() == "https" && r.status().is_none() => format!(
                    " (spoken to over HTTPS; if {} serves plain HTTP, list it in insecure)",
                    url.host_str()
                        .map(|h| url.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
                        .unwrap_or_default()
                ),
                _ => String::new(),
            };
            ImageError::Registry(format!("{what}: {}{hint}", error_chain(&r)))
        }
        other => ImageError::Registry(format!("{what}: {}", error_chain(&other))),
    }
}

/// Add where credentials came from to an authentication failure.
fn with_hint(err: ImageError, creds: &Credentials, host: &str) -> ImageError {
    match err {
        ImageError::Registry(m) if m.contains("401") || m.contains("authentication") => {
            ImageError::Registry(format!("{m}; {}", creds.hint(host)))
        }
        other => other,
    }
}

/// An error and its sources, `: `-joined (reqwest hides the cause, e.g. the
/// TLS failure, in its source chain).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_keeps_repository_and_tag() {
        let r = Registry::parse_reference("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        let m = mirrored(&r, "mirror.local:5000");
        assert_eq!(m.whole(), "mirror.local:5000/library/busybox:latest");
    }

    #[test]
    fn bad_reference_is_invalid() {
        assert!(matches!(
            Registry::parse_reference("Not A Reference"),
            Err(ImageError::Invalid(_))
        ));
    }
}
