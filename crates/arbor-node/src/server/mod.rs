//! `arbor node serve`: this host's sandbox backend over HTTP/1.1 (keep-alive),
//! behind a bearer token, over TLS unless on loopback.
//!
//! Lifecycle: [`start`] binds and serves; sandboxes idle past the lease
//! (`idle_ttl`, no operation running) are destroyed, so one whose client
//! vanished does not live forever; [`RunningNode::drain`] refuses new
//! sandboxes, lets running work finish up to a grace period and destroys
//! what is left, which is what SIGTERM does in the CLI.

mod routes;
mod state;
mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_sandbox::{Backend, Sandbox};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use state::ImagesFn;
use state::State;

/// How a node serves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The bearer token every request but `/health` must carry.
    pub token: String,
    /// TLS certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Allow plaintext on a non-loopback address (a test network namespace
    /// with no one else on the link); without it such a listen is refused.
    pub insecure_plaintext: bool,
    /// Most sandboxes alive at once; creates past it are refused (503).
    pub capacity: usize,
    /// A sandbox with no operation for this long is destroyed (zero: never).
    pub idle_ttl: Duration,
    /// Interval of heartbeat lines in streamed replies.
    pub heartbeat: Duration,
}

impl NodeConfig {
    /// Loopback, plaintext, the given token: for tests and one-host use.
    pub fn loopback(token: impl Into<String>) -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: token.into(),
            tls: None,
            insecure_plaintext: false,
            capacity: 1000,
            idle_ttl: Duration::from_secs(1800),
            heartbeat: Duration::from_secs(1),
        }
    }

    fn check(&self) -> Result<(), NodeError> {
        if self.token.trim().is_empty() {
            return Err(NodeError::Config("the node needs a non-empty token".into()));
        }
        if self.capacity == 0 {
            return Err(NodeError::Config("capacity must be at least 1".into()));
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.insecure_plaintext {
            return Err(NodeError::Config(format!(
                "refusing to serve plaintext on the non-loopback address {}: give --tls-cert \
                 and --tls-key (or --insecure-plaintext on a private test network)",
                self.listen
            )));
        }
        if self.heartbeat.is_zero() {
            return Err(NodeError::Config("the heartbeat must be positive".into()));
        }
        Ok(())
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// A serving node.
pub struct RunningNode {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// `https` or `http`.
    pub scheme: &'static str,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts serving `backend` as configured. `images` lists the image
/// references the node has cached (reported to placement).
pub async fn start(
    cfg: NodeConfig,
    backend: Arc<dyn Backend>,
    images: Option<ImagesFn>,
) -> Result<RunningNode, NodeError> {
    cfg.check()?;
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(crate::tls::acceptor(cert, key).map_err(NodeError::Config)?),
        None => None,
    };
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NodeError::Io {
            context: format!("listening on {}", cfg.listen),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Io {
        context: "the listening address".into(),
        source,
    })?;
    let state = Arc::new(State::new(
        backend,
        cfg.token.clone(),
        cfg.capacity,
        cfg.heartbeat,
        images,
    ));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let router = routes::router(state.clone());
    let mut tasks = vec![tokio::spawn(accept_loop(listener, router, tls))];
    if !cfg.idle_ttl.is_zero() {
        tasks.push(tokio::spawn(reap_idle(state.clone(), cfg.idle_ttl)));
    }
    info!(%addr, scheme, capacity = cfg.capacity, "node serving");
    Ok(RunningNode {
        addr,
        scheme,
        state,
        tasks,
    })
}

impl RunningNode {
    /// `scheme://addr`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Sandboxes alive (or being created) now.
    pub fn live(&self) -> usize {
        self.state.live()
    }

    /// Stops taking new sandboxes, waits up to `grace` for the live ones to
    /// be destroyed by their clients (running rollouts finish), then
    /// destroys the rest. Returns how many it destroyed itself. The node
    /// keeps serving the sandboxes it still holds until then.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.state.start_draining();
        info!(live = self.state.live(), ?grace, "draining");
        let until = Instant::now() + grace;
        while self.state.live() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.state.take_all();
        let n = left.len();
        if n > 0 {
            warn!(sandboxes = n, "grace period over; destroying what is left");
        }
        destroy_all(left).await;
        n
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn destroy_all(sandboxes: Vec<Arc<dyn Sandbox>>) {
    let all = sandboxes.into_iter().map(|sb| async move {
        if let Err(e) = sb.destroy().await {
            warn!(sandbox = %sb.id(), "destroying: {e}");
        }
    });
    futures_util::future::join_all(all).await;
}

async fn reap_idle(state: Arc<State>, ttl: Duration) {
    let every = (ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let idle = state.take_idle(ttl);
        if !idle.is_empty() {
            warn!(
                sandboxes = idle.len(),
                ?ttl,
                "destroying sandboxes idle past their lease"
            );
            destroy_all(idle).await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and similar: back off, keep serving.
                warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small request/response messages: do not wait to coalesce them.
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, router).await,
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, router).await,
                        Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<I>(io: I, router: axum::Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        debug!("connection ended: {e}");
    }
}
