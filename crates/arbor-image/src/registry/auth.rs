//! Registry credentials from Docker's client config (`~/.docker/config.json`
//! or `$DOCKER_CONFIG/config.json`), so a host logged into with `docker login`
//! pulls with the same credentials.
//!
//! Only credentials stored inline (`auths.<host>.auth`, base64 `user:pass`, or
//! `username`/`password`) are used. Credentials kept by a helper program
//! (`credsStore`, `credHelpers`) would mean running that program; arbor does
//! not, and pulls anonymously with a warning instead, so that a machine with
//! Docker Desktop's global `credsStore` can still pull public images. An
//! authentication failure then names the helper (see [`Credentials::hint`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::error::{ImageError, Result};

/// The parts of Docker's `config.json` that hold credentials.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DockerConfig {
    /// Inline credentials by registry key (a host, or a URL such as
    /// `https://index.docker.io/v1/`).
    #[serde(default)]
    pub auths: BTreeMap<String, AuthEntry>,
    /// Helper that stores all credentials (`docker-credential-<name>`).
    #[serde(default)]
    pub creds_store: Option<String>,
    /// Per-host helpers.
    #[serde(default)]
    pub cred_helpers: BTreeMap<String, String>,
}

/// One `auths` entry.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct AuthEntry {
    /// base64 of `user:password`.
    #[serde(default)]
    pub auth: Option<String>,
    /// Plain user name (older configs).
    #[serde(default)]
    pub username: Option<String>,
    /// Plain password (older configs).
    #[serde(default)]
    pub password: Option<String>,
    /// An identity token (OAuth refresh token); not supported, see [`Credentials`].
    #[serde(default, rename = "identitytoken")]
    pub identity_token: Option<String>,
}

/// What to authenticate to one registry host with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials known: pull anonymously.
    Anonymous,
    /// HTTP basic (and the token flow's basic step) with user and password.
    Basic(String, String),
    /// The credentials live in helper `docker-credential-<name>`, which arbor
    /// does not run: pulls go anonymous.
    Helper(String),
}

impl Credentials {
    /// The oci-client auth these credentials give.
    pub fn registry_auth(&self) -> RegistryAuth {
        match self {
            Credentials::Basic(user, pass) => RegistryAuth::Basic(user.clone(), pass.clone()),
            Credentials::Anonymous | Credentials::Helper(_) => RegistryAuth::Anonymous,
        }
    }

    /// A sentence to add to an authentication failure, saying where the
    /// credentials were looked for.
    pub fn hint(&self, host: &str) -> String {
        match self {
            Credentials::Anonymous => format!(
                "no credentials for {host} in the Docker config (auths.\"{host}\"); pulled anonymously"
            ),
            Credentials::Basic(user, _) => {
                format!("the Docker config's credentials for {host} (user {user}) were refused")
            }
            Credentials::Helper(helper) => format!(
                "the credentials for {host} are kept by docker-credential-{helper}, which arbor \
                 does not run; put them inline in the Docker config's auths (base64 user:pass)"
            ),
        }
    }
}

impl DockerConfig {
    /// Read `path`; a missing file is an empty config (anonymous pulls), a
    /// malformed one is an error (it would silently drop credentials).
    pub fn load(path: &Path) -> Result<DockerConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig::default());
            }
            Err(e) => return Err(ImageError::io(format!("read {}", path.display()), e)),
        };
        serde_json::from_str(&text).map_err(|e| {
            ImageError::Registry(format!(
                "Docker config {} is not valid: {e}",
                path.display()
            ))
        })
    }

    /// The default location: `$DOCKER_CONFIG/config.json`, else
    /// `$HOME/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
    }

    /// The credentials for registry `host` (as a reference names it, e.g.
    /// `docker.io` or `registry.local:5000`).
    pub fn credentials(&self, host: &str) -> Result<Credentials> {
        let entry = self.auths.iter().find(|(key, _)| key_matches(key, host));
        if let Some(creds) = entry.map(|(_, e)| e.basic(host)).transpose()?.flatten() {
            return Ok(creds);
        }
        let helper = self
            .cred_helpers
            .iter()
            .find(|(key, _)| key_matches(key, host))
            .map(|(_, helper)| helper.clone())
            .or_else(|| self.creds_store.clone());
        Ok(match helper {
            Some(helper) => {
                tracing::warn!(
                    host,
                    helper = %helper,
                    "registry credentials are kept by docker-credential-{helper}, which arbor \
                     does not run; pulling anonymously"
                );
                Credentials::Helper(helper)
            }
            None => Credentials::Anonymous,
        })
    }
}

impl AuthEntry {
    fn basic(&self, host: &str) -> Result<Option<Credentials>> {
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let bad = |why: String| {
                ImageError::Registry(format!(
                    "Docker config: auths.\"{host}\".auth is not base64 of user:password ({why})"
                ))
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| bad(e.to_string()))?;
            let text = String::from_utf8(raw).map_err(|e| bad(e.to_string()))?;
            let (user, pass) = text.split_once(':').ok_or_else(|| bad("no ':'".into()))?;
            return Ok(Some(Credentials::Basic(user.into(), pass.into())));
        }
        match (&self.username, &self.password) {
            (Some(user), Some(pass)) => Ok(Some(Credentials::Basic(user.clone(), pass.clone()))),
            _ => Ok(None),
        }
    }
}

/// Whether an `auths`/`credHelpers` key names `host`. Keys may be a bare host
/// or a URL (`https://host/v1/`); Docker Hub is known under several names.
fn key_matches(key: &str, host: &str) -> bool {
    let key_host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    key_host == host || (is_docker_hub(key_host) && is_docker_hub(host))
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> DockerConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn inline_auth_is_decoded() {
        // base64("alice:pa:ss") — a password may itself contain ':'.
        let cfg = config(r#"{"auths":{"reg.local:5000":{"auth":"YWxpY2U6cGE6c3M="}}}"#);
        assert_eq!(
            cfg.credentials("reg.local:5000").unwrap(),
            Credentials::Basic("alice".into(), "pa:ss".into())
        );
        assert_eq!(
            cfg.credentials("other:5000").unwrap(),
            Credentials::Anonymous
        );
    }

    #[test]
    fn username_password_and_url_keys() {
        let cfg = config(
            r#"{"auths":{"https://index.docker.io/v1/":{"username":"bob","password":"pw"}}}"#,
        );
        assert_eq!(
            cfg.credentials("docker.io").unwrap(),
            Credentials::Basic("bob".into(), "pw".into())
        );
    }

    #[test]
    fn helpers_go_anonymous_with_a_named_helper() {
        let cfg = config(r#"{"credsStore":"desktop","credHelpers":{"gcr.io":"gcloud"}}"#);
        assert_eq!(
            cfg.credentials("gcr.io").unwrap(),
            Credentials::Helper("gcloud".into())
        );
        let other = cfg.credentials("quay.io").unwrap();
        assert_eq!(other, Credentials::Helper("desktop".into()));
        assert!(other.hint("quay.io").contains("docker-credential-desktop"));
        assert_eq!(other.registry_auth(), RegistryAuth::Anonymous);
    }

    #[test]
    fn bad_base64_is_a_clear_error() {
        let cfg = config(r#"{"auths":{"h:1":{"auth":"!!!"}}}"#);
        let err = cfg.credentials("h:1").unwrap_err().to_string();
        assert!(err.contains("auths.\"h:1\".auth"), "{err}");
    }

    #[test]
    fn missing_file_is_empty_and_malformed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert!(DockerConfig::load(&path).unwrap().auths.is_empty());
        std::fs::write(&path, "{not json").unwrap();
        assert!(DockerConfig::load(&path).is_err());
    }
}
