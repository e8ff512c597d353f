//! [`ClusterBackend`]: sandboxes placed across many nodes.
//!
//! - Nodes come from static addresses and `dns:NAME:PORT` entries,
//!   re-resolved every `resolve_every` (nodes join and leave).
//! - Every `refresh` a background task asks each node for its capacity;
//!   that is also the health check that brings a down node back.
//! - Placement: among nodes that are up and not draining, the one with the
//!   most free room (its reported live count, or what this process holds
//!   there if more, plus creates in flight), preferring nodes that report
//!   the spec's image as cached. A node that refuses for capacity counts as
//!   full until its next report; a node that cannot be reached is marked
//!   down. When no node has room the create waits (up to `placement_wait`)
//!   instead of failing at once.
//! - A sandbox lives on one node, and so do its forks.

mod discovery;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use arbor_sandbox::{Backend, ImageSource, Result, Sandbox, SandboxError, SandboxSpec};
use async_trait::async_trait;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::protocol::Capacity;
use crate::remote::{ClientOptions, Fail, NodeClient, RemoteSandbox};

/// How to reach and use the nodes.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `HOST:PORT`, a URL, or `dns:NAME:PORT` (every address it resolves to).
    pub nodes: Vec<String>,
    /// Token, TLS and timeouts.
    pub client: ClientOptions,
    /// Interval of capacity reports (the health check).
    pub refresh: Duration,
    /// Interval of DNS re-resolution.
    pub resolve_every: Duration,
    /// Longest a create waits for a node with room.
    pub placement_wait: Duration,
}

impl ClusterConfig {
    /// Default intervals.
    pub fn new(nodes: Vec<String>, client: ClientOptions) -> Self {
        ClusterConfig {
            nodes,
            client,
            refresh: Duration::from_secs(1),
            resolve_every: Duration::from_secs(10),
            placement_wait: Duration::from_secs(60),
        }
    }
}

/// One node as placement sees it.
pub(crate) struct Node {
    pub(crate) key: String,
    pub(crate) pin: Option<SocketAddr>,
    client: Arc<NodeClient>,
    /// Its last capacity report.
    report: Mutex<Option<Capacity>>,
    /// Creates this process has in flight there.
    pending: AtomicUsize,
    /// Sandboxes this process created there.
    created: AtomicU64,
}

impl Node {
    fn new(key: String, pin: Option<SocketAddr>, client: NodeClient) -> Self {
        Node {
            key,
            pin,
            client: Arc::new(client),
            report: Mutex::new(None),
            pending: AtomicUsize::new(0),
            created: AtomicU64::new(0),
        }
    }

    fn report(&self) -> Option<Capacity> {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_report(&self, c: Option<Capacity>) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// (prefers the image, free room), or `None` if it takes nothing now.
    fn score(&self, image: Option<&str>) -> Option<(bool, usize)> {
        let r = self.report()?;
        if !self.client.is_up() || r.draining {
            return None;
        }
        let live = r.live.max(self.client.held()) + self.pending.load(Ordering::SeqCst);
        let free = r.capacity.saturating_sub(live);
        let cached = image.is_some_and(|i| r.images.iter().any(|c| c == i));
        (free > 0).then_some((cached, free))
    }

    /// Refused for capacity: full until its next report.
    fn mark_full(&self) {
        let mut g = self.report.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = g.as_mut() {
            r.live = r.capacity;
        }
    }

    async fn poll(&self, timeout: Duration) {
        let was_up = self.client.is_up() && self.report().is_some();
        match self.client.capacity(timeout).await {
            Ok(c) => {
                self.client.set_up(true);
                if !was_up {
                    info!(node = %self.key, live = c.live, capacity = c.capacity, "node up");
                }
                self.set_report(Some(c));
            }
            Err(f) => {
                self.client.set_up(false);
                if was_up {
                    warn!(node = %self.key, "node down: {}", f.into_error(&self.key));
                }
            }
        }
    }
}

/// What a node looks like from this process (for logs, tests, benchmarks).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    pub up: bool,
    /// Its last report (zeros before any).
    pub live: usize,
    pub capacity: usize,
    pub draining: bool,
    /// Sandboxes this process holds there now, and created there in all.
    pub held: usize,
    pub created: u64,
}

struct Inner {
    cfg: ClusterConfig,
    nodes: RwLock<Vec<Arc<Node>>>,
}

impl Inner {
    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn resolve(&self) {
        let known = self.nodes();
        let targets = discovery::resolve(&self.cfg.nodes, &known).await;
        let merged = discovery::merge(&known, targets, &self.cfg.client);
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = merged;
    }

    async fn poll_all(&self) {
        let timeout =
            (self.cfg.refresh * 2).clamp(Duration::from_millis(500), Duration::from_secs(3));
        let nodes = self.nodes();
        futures_util::future::join_all(nodes.iter().map(|n| n.poll(timeout))).await;
    }

    /// Nodes that take a sandbox now, best first.
    fn candidates(&self, image: Option<&str>) -> Vec<Arc<Node>> {
        let mut scored: Vec<((bool, usize), Arc<Node>)> = self
            .nodes()
            .into_iter()
            .filter_map(|n| n.score(image).map(|s| (s, n)))
            .collect();
        scored.sort_by_key(|s| std::cmp::Reverse(s.0));
        scored.into_iter().map(|(_, n)| n).collect()
    }
}

/// Sandboxes across many nodes (see the module docs).
pub struct ClusterBackend {
    inner: Arc<Inner>,
    refresher: JoinHandle<()>,
}

impl ClusterBackend {
    /// Resolves the nodes, asks each for its capacity once, and keeps both
    /// current in the background until dropped.
    pub async fn new(cfg: ClusterConfig) -> Result<Self> {
        discovery::check(&cfg.nodes).map_err(SandboxError::Invalid)?;
        let inner = Arc::new(Inner {
            cfg,
            nodes: RwLock::new(Vec::new()),
        });
        inner.resolve().await;
        inner.poll_all().await;
        let up = inner.nodes().iter().filter(|n| n.client.is_up()).count();
        if up == 0 {
            warn!("no node is up yet; creates wait for one");
        }
        let refresher = tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        Ok(ClusterBackend { inner, refresher })
    }

    /// Every node as this process sees it.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.inner
            .nodes()
            .iter()
            .map(|n| {
                let r = n.report().unwrap_or_default();
                NodeStatus {
                    node: n.key.clone(),
                    up: n.client.is_up() && n.report().is_some(),
                    live: r.live,
                    capacity: r.capacity,
                    draining: r.draining,
                    held: n.client.held(),
                    created: n.created.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// One pass over the candidates. `Ok(None)`: every one refused for
    /// capacity or could not be reached (worth waiting); reasons collected.
    async fn try_place(
        &self,
        spec: &SandboxSpec,
        reasons: &mut Vec<String>,
    ) -> Result<Option<Box<dyn Sandbox>>> {
        let image = match &spec.image {
            Some(ImageSource::Reference(r)) => Some(r.as_str()),
            _ => None,
        };
        for node in self.inner.candidates(image) {
            node.pending.fetch_add(1, Ordering::SeqCst);
            let got = node.client.create(spec).await;
            node.pending.fetch_sub(1, Ordering::SeqCst);
            match got {
                Ok(id) => {
                    node.created.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(Box::new(RemoteSandbox::new(node.client.clone(), id))));
                }
                Err(Fail::Refused(b)) => {
                    node.mark_full();
                    reasons.push(format!("{}: {}", node.key, b.message));
                }
                Err(Fail::Transport(e)) => {
                    warn!(node = %node.key, "node unreachable; placing elsewhere: {e}");
                    reasons.push(e.to_string());
                }
                Err(Fail::Node(e)) => return Err(e),
            }
        }
        Ok(None)
    }
}

impl Drop for ClusterBackend {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

#[async_trait]
impl Backend for ClusterBackend {
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        let until = Instant::now() + self.inner.cfg.placement_wait;
        let mut reasons = Vec::new();
        loop {
            reasons.clear();
            if let Some(sb) = self.try_place(spec, &mut reasons).await? {
                return Ok(sb);
            }
            if Instant::now() >= until {
                let why = if reasons.is_empty() {
                    "no node is up with free capacity".to_string()
                } else {
                    reasons.join("; ")
                };
                return Err(SandboxError::Setup(format!(
                    "no node took the sandbox within {:?}: {why}",
                    self.inner.cfg.placement_wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn refresh_loop(inner: Weak<Inner>) {
    let mut resolved = Instant::now();
    loop {
        let Some(every) = inner.upgrade().map(|i| i.cfg.refresh) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if resolved.elapsed() >= inner.cfg.resolve_every {
            inner.resolve().await;
            resolved = Instant::now();
        }
        inner.poll_all().await;
    }
}
