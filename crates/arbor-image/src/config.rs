//! What the store records of an image: its layers and the parts of the OCI
//! image config a sandbox applies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The runtime parts of an OCI image config (`config` in the config blob).
/// Field names follow the OCI spec so the blob's JSON deserializes directly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// `KEY=value` entries, in order.
    #[serde(rename = "Env", skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Working directory of commands ("" = unset).
    #[serde(rename = "WorkingDir", skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid` ("" = root).
    #[serde(rename = "User", skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Entrypoint, exec form.
    #[serde(rename = "Entrypoint", skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default command, exec form.
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Labels.
    #[serde(rename = "Labels", skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

impl ImageConfig {
    /// `Env` as pairs (entries without `=` are skipped, as Docker does).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The command a sandbox runs "from the image": Entrypoint + (`args` or Cmd).
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        if args.is_empty() {
            argv.extend(self.cmd.clone().unwrap_or_default());
        } else {
            argv.extend(args.iter().cloned());
        }
        argv
    }
}

/// One image in the store: what a reference resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was pulled, loaded or built as (normalized, e.g.
    /// `docker.io/library/busybox:latest`).
    pub reference: String,
    /// Image id: the digest of its config blob (`sha256:...`).
    pub id: String,
    /// Manifest digest, when the image came from a registry or an archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// Layer digests (the uncompressed `diff_id`s), bottom layer first.
    pub layers: Vec<String>,
    /// The runtime config.
    pub config: ImageConfig,
    /// Unix seconds when it entered the store.
    pub created: u64,
}
