//! arbor's model gateway.
//!
//! An HTTP server that speaks OpenAI Chat Completions, OpenAI Responses and Anthropic Messages
//! to agents, forwards every call to OpenAI-compatible upstreams (with session affinity and
//! retry before the first byte), and records every call durably, with token ids and logprobs,
//! in a per-call write-ahead log ([`store`]). Recorded sessions are served back as calls and as
//! prefix trees of token segments (`GET /sessions/{id}` and `GET /sessions/{id}/tree`).
//!
//! Entry points: [`serve`] (run until Ctrl-C / SIGTERM), [`start`] (run in the background and
//! get a handle), [`bench::bench`], and [`standin`] (a deterministic OpenAI-compatible upstream
//! for tests and benchmarks). See `docs/gateway.md`.

pub mod anthropic;
pub mod bench;
pub mod caps;
pub mod chat;
pub mod cli;
pub mod error;
pub mod metrics;
pub mod recorder;
pub mod responses;
pub mod server;
pub mod sink;
pub mod sse;
pub mod standin;
pub mod store;
pub mod tokenize;
pub mod upstream;

// The record format, its session-to-sequence conversion and the byte chat format live in
// `arbor-trace` (no crate that only reads recorded data needs the gateway); these are their
// paths here.
pub use arbor_trace::record;
pub use arbor_trace::session as tree;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use caps::{CapHit, CapKind, SessionCaps};
pub use chat::ToolPolicy;
pub use error::{Api, GatewayError};
pub use record::CallRecord;
pub use store::Store;

use crate::caps::CapTracker;
use crate::chat::NormOptions;
use crate::metrics::Metrics;
use crate::recorder::Recorder;
use crate::server::AppState;
use crate::tokenize::ChatTokenizer;
use crate::upstream::UpstreamPool;

/// Configuration of a gateway.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// OpenAI-compatible upstream base URLs (`http://host:port` or `http://host:port/v1`).
    pub upstreams: Vec<String>,
    /// Store directory (created if missing).
    pub store: PathBuf,
    /// Model directory with `tokenizer.json` and a chat template, used when an upstream does
    /// not return token ids.
    pub tokenizer: Option<PathBuf>,
    /// Bearer key sent to the upstreams.
    pub upstream_api_key: Option<String>,
    /// Ask upstreams for token ids (`"return_token_ids": true`, vLLM) besides logprobs.
    pub upstream_token_ids: bool,
    /// What to do with tools that are not functions.
    pub tool_policy: ToolPolicy,
    /// Model name used when a request names none; also listed by `/v1/models` when no
    /// upstream answers.
    pub default_model: Option<String>,
    /// Time limit for an upstream to answer (for a stream: to send its first chunk).
    pub request_timeout: Duration,
    /// Longest silence allowed inside an upstream stream.
    pub idle_stream_timeout: Duration,
    /// Per-session caps on calls and tokens (none by default).
    pub caps: SessionCaps,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("listen", &self.listen)
            .field("upstreams", &self.upstreams)
            .field("store", &self.store)
            .field("tokenizer", &self.tokenizer)
            .field(
                "upstream_api_key",
                &self.upstream_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("upstream_token_ids", &self.upstream_token_ids)
            .field("tool_policy", &self.tool_policy)
            .field("default_model", &self.default_model)
            .field("request_timeout", &self.request_timeout)
            .field("idle_stream_timeout", &self.idle_stream_timeout)
            .field("caps", &self.caps)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl GatewayConfig {
    /// A configuration with defaults: one upstream, no tokenizer, token ids requested,
    /// non-function tools refused, 600 s request and 120 s idle-stream timeouts, no session
    /// caps, 256 MiB bodies.
    pub fn new(listen: SocketAddr, upstreams: Vec<String>, store: PathBuf) -> Self {
        Self {
            listen,
            upstreams,
            store,
            tokenizer: None,
            upstream_api_key: None,
            upstream_token_ids: true,
            tool_policy: ToolPolicy::Refuse,
            default_model: None,
            request_timeout: Duration::from_secs(600),
            idle_stream_timeout: Duration::from_secs(120),
            caps: SessionCaps::default(),
            max_body_bytes: server::DEFAULT_MAX_BODY,
        }
    }
}

/// A gateway running in the background.
pub struct RunningGateway {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningGateway {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.state.recorder.store()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// The first per-session cap `session` reached, if any (its calls past the cap were
    /// refused).
    pub fn cap_hit(&self, session: &str) -> Option<CapHit> {
        self.state.caps.hit(session)
    }

    /// The per-session caps and counts, to read cap hits after the gateway is gone.
    pub fn caps(&self) -> Arc<CapTracker> {
        self.state.caps.clone()
    }

    /// Stops accepting connections, waits for open requests to finish, and closes the store.
    pub async fn shutdown(mut self) -> Result<(), GatewayError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let res = (&mut self.task).await;
        self.state.recorder.store().close();
        match res {
            Ok(r) => r.map_err(GatewayError::Io),
            Err(e) => Err(GatewayError::Config(format!("server task failed: {e}"))),
        }
    }
}

fn build_state(config: &GatewayConfig) -> Result<Arc<AppState>, GatewayError> {
    if config.upstreams.is_empty() {
        return Err(GatewayError::Config(
            "at least one upstream is required".into(),
        ));
    }
    let tokenizer = match &config.tokenizer {
        Some(dir) => Some(Arc::new(ChatTokenizer::from_dir(dir)?)),
        None => None,
    };
    let (store, recovery) = Store::open(&config.store)?;
    tracing::info!(
        calls = recovery.records.len(),
        truncated_bytes = recovery.truncated_bytes,
        duplicates_skipped = recovery.duplicates_skipped,
        "store opened"
    );
    let caps = Arc::new(CapTracker::new(config.caps, &recovery.records));
    let recorder = Recorder::new(store, tokenizer, &recovery.records);
    let pool = UpstreamPool::new(
        &config.upstreams,
        config.upstream_api_key.clone(),
        config.request_timeout,
        config.idle_stream_timeout,
    )?;
    Ok(Arc::new(AppState {
        pool,
        recorder,
        metrics: Arc::new(Metrics::default()),
        norm: NormOptions {
            upstream_token_ids: config.upstream_token_ids,
            tool_policy: config.tool_policy,
            default_model: config.default_model.clone(),
        },
        models: config.default_model.iter().cloned().collect(),
        caps,
        max_body: config.max_body_bytes,
    }))
}

/// Starts a gateway in the background on the current Tokio runtime.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, GatewayError> {
    let state = build_state(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| {
            GatewayError::Config(format!("cannot listen on {}: {source}", config.listen))
        })?;
    let addr = listener.local_addr()?;
    let app = server::router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, upstreams = ?config.upstreams, store = %config.store.display(), "gateway listening");
    Ok(RunningGateway {
        addr,
        state,
        shutdown: Some(tx),
        task,
    })
}

/// Runs a gateway until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn serve(config: GatewayConfig) -> Result<(), GatewayError> {
    let gw = start(config).await?;
    eprintln!("arbor gateway listening on {}", gw.url());
    wait_for_signal().await;
    tracing::info!("shutting down");
    gw.shutdown().await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
