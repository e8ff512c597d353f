//! `backend = { kind = ... }` in an experiment: where a run's sandboxes
//! live. `local` (the default) is this host; `cluster` is arbor nodes
//! (`arbor node serve`) reached over the network, placed by free capacity
//! (`arbor_node::ClusterBackend`, docs/cluster.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use arbor_node::{ClientOptions, ClusterBackend, ClusterConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RolloutError};

/// Environment variable holding the node token when no `token_file` is given.
pub const TOKEN_ENV: &str = "ARBOR_NODE_TOKEN";

/// Where sandboxes are created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendSpec {
    /// This host's namespaces (images resolved locally when tasks need them).
    #[default]
    Local,
    /// arbor nodes over the network.
    Cluster(ClusterSpec),
}

/// `backend = { kind = "cluster", nodes = [...], token_file = "...", ca = "..." }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// `HOST:PORT`, a URL, or `dns:NAME:PORT` (every address the name
    /// resolves to is a node; re-resolved every `resolve_s`).
    pub nodes: Vec<String>,
    /// File holding the nodes' bearer token (default: `$ARBOR_NODE_TOKEN`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that signs the nodes' certificates; turns TLS on.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// TLS with the system's roots (implied by `ca`).
    #[serde(default)]
    pub tls: bool,
    /// Longest a sandbox waits for a node with room, seconds.
    #[serde(default = "default_wait")]
    pub placement_wait_s: f64,
    /// DNS re-resolution interval, seconds.
    #[serde(default = "default_resolve")]
    pub resolve_s: f64,
}

fn default_wait() -> f64 {
    60.0
}

fn default_resolve() -> f64 {
    10.0
}

impl ClusterSpec {
    /// Checks the fields that need no I/O.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.nodes.is_empty() {
            return Err("backend `cluster` needs at least one entry in `nodes`".into());
        }
        if !(self.placement_wait_s >= 0.0 && self.resolve_s > 0.0) {
            return Err(
                "backend `cluster`: placement_wait_s and resolve_s must be positive".into(),
            );
        }
        Ok(())
    }

    /// Relative `token_file` and `ca` are taken from `base` (the experiment's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.token_file, &mut self.ca].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn token(&self) -> Result<String> {
        let token = match &self.token_file {
            Some(f) => std::fs::read_to_string(f).map_err(|e| {
                RolloutError::io(format!("reading the node token {}", f.display()), e)
            })?,
            None => std::env::var(TOKEN_ENV).map_err(|_| {
                RolloutError::Other(format!(
                    "backend `cluster` needs the node token: set `token_file` or ${TOKEN_ENV}"
                ))
            })?,
        };
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(RolloutError::Other("the node token is empty".into()));
        }
        Ok(token)
    }

    /// Connects: resolves the nodes and asks each for its capacity.
    pub async fn connect(&self) -> Result<ClusterBackend> {
        let mut client = ClientOptions::new(self.token()?);
        client.tls = self.tls;
        if let Some(ca) = &self.ca {
            client.ca_pem =
                Some(std::fs::read(ca).map_err(|e| {
                    RolloutError::io(format!("reading the CA {}", ca.display()), e)
                })?);
        }
        let mut cfg = ClusterConfig::new(self.nodes.clone(), client);
        cfg.placement_wait = Duration::from_secs_f64(self.placement_wait_s);
        cfg.resolve_every = Duration::from_secs_f64(self.resolve_s);
        Ok(ClusterBackend::new(cfg).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        backend: BackendSpec,
    }

    #[test]
    fn parses_the_cluster_table_and_refuses_unknown_fields() {
        let w: Wrap = toml::from_str(
            r#"backend = { kind = "cluster", nodes = ["10.0.0.2:7070", "dns:arbor-node.ns.svc:7070"], token_file = "t", ca = "ca.pem" }"#,
        )
        .unwrap();
        let BackendSpec::Cluster(mut c) = w.backend else {
            panic!("cluster expected");
        };
        assert_eq!(c.nodes.len(), 2);
        c.resolve_paths(Path::new("/exp"));
        assert_eq!(c.token_file.as_deref(), Some(Path::new("/exp/t")));
        assert_eq!(c.placement_wait_s, 60.0);
        let bad =
            toml::from_str::<Wrap>(r#"backend = { kind = "cluster", nodes = [], tokn = "x" }"#);
        assert!(bad.is_err());
        let local: Wrap = toml::from_str(r#"backend = { kind = "local" }"#).unwrap();
        assert_eq!(local.backend, BackendSpec::Local);
    }
}
