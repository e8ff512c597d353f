//! Which nodes exist: static addresses, and `dns:NAME:PORT` entries that
//! resolve to one node per address (a Kubernetes headless Service), merged
//! into the current node list so known nodes keep their state.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{info, warn};

use super::Node;
use crate::remote::{ClientOptions, NodeClient};

/// One node to reach: its key, the address as written, the pinned socket address.
pub(super) struct Target {
    pub(super) key: String,
    addr: String,
    pin: Option<SocketAddr>,
}

/// `dns:NAME:PORT` → (`NAME:PORT`), or `None` for a static address.
fn dns_name(entry: &str) -> Option<&str> {
    entry.strip_prefix("dns:")
}

/// Checks the entries' syntax (at configuration time).
pub(super) fn check(entries: &[String]) -> Result<(), String> {
    if entries.is_empty() {
        return Err("a cluster backend needs at least one node".into());
    }
    for e in entries {
        let hostport = dns_name(e).unwrap_or(e);
        let hostport = hostport
            .strip_prefix("https://")
            .or_else(|| hostport.strip_prefix("http://"))
            .unwrap_or(hostport)
            .trim_end_matches('/');
        let ok = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(format!(
                "node `{e}` is not HOST:PORT, a URL, or dns:NAME:PORT"
            ));
        }
    }
    Ok(())
}

/// The targets the entries name now. An entry whose name does not resolve
/// keeps the nodes it had (`known`), so a DNS hiccup drops no node.
pub(super) async fn resolve(entries: &[String], known: &[Arc<Node>]) -> Vec<Target> {
    let mut out = Vec::new();
    for e in entries {
        let Some(name) = dns_name(e) else {
            out.push(Target {
                key: e.clone(),
                addr: e.clone(),
                pin: None,
            });
            continue;
        };
        match tokio::net::lookup_host(name).await {
            Ok(addrs) => {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                addrs.sort();
                addrs.dedup();
                out.extend(addrs.into_iter().map(|sa| Target {
                    key: format!("{name}@{sa}"),
                    addr: name.to_string(),
                    pin: Some(sa),
                }));
            }
            Err(err) => {
                warn!(entry = %e, "resolving nodes: {err}; keeping the nodes it had");
                let prefix = format!("{name}@");
                out.extend(
                    known
                        .iter()
                        .filter(|n| n.key.starts_with(&prefix))
                        .map(|n| Target {
                            key: n.key.clone(),
                            addr: name.to_string(),
                            pin: n.pin,
                        }),
                );
            }
        }
    }
    out
}

/// The new node list: known nodes that are still named keep their state,
/// new ones are added, the rest leave placement (their sandboxes keep
/// their own handle on them).
pub(super) fn merge(
    known: &[Arc<Node>],
    targets: Vec<Target>,
    opts: &ClientOptions,
) -> Vec<Arc<Node>> {
    let mut nodes = Vec::new();
    for t in targets {
        if nodes.iter().any(|n: &Arc<Node>| n.key == t.key) {
            continue;
        }
        if let Some(n) = known.iter().find(|n| n.key == t.key) {
            nodes.push(n.clone());
            continue;
        }
        match NodeClient::new(&t.addr, t.pin, opts) {
            Ok(client) => {
                info!(node = %t.key, "node joined");
                nodes.push(Arc::new(Node::new(t.key, t.pin, client)));
            }
            Err(e) => warn!(node = %t.key, "cannot use node: {e}"),
        }
    }
    for n in known
        .iter()
        .filter(|n| !nodes.iter().any(|m| m.key == n.key))
    {
        info!(node = %n.key, "node left");
    }
    nodes
}
