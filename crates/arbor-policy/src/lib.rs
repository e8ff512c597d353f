//! `arbor-policy`: the embedded policy. An `arbor-model` checkpoint served as an
//! OpenAI-compatible Chat Completions endpoint, so the gateway can use it as an upstream and
//! every scaffold (white-box or black-box) runs against it unchanged.
//!
//! - Tokenization is the byte-level chat format of
//!   [`arbor_trace::byte_chat`], the one the scripted oracle speaks, so recorded
//!   oracle trajectories are supervised data for this model token for token.
//! - Replies carry `prompt_token_ids`, per-choice `token_ids` and `logprobs.content` (the
//!   behaviour log-probabilities), vLLM style, which the gateway records.
//! - Weights are swapped atomically between requests ([`EmbeddedPolicy::swap`],
//!   `POST /admin/load`): a request samples from the weights current when its generation
//!   starts, so in-flight requests finish on the old ones. Every reply names the weights
//!   version (`weights_version`, `system_fingerprint` = `weights-vN`, header
//!   `x-arbor-weights-version`).
//! - Generation runs on one engine thread that decodes all active requests together, one
//!   batched model step per token ([`engine`](crate::engine)); at most `max_concurrency`
//!   requests are active, others wait in a FIFO queue (a waiting request holds only its
//!   prompt, not a KV cache).
//!
//! This is its own crate rather than a module of `arbor-model` so that the model crate, which
//! trainers link, stays free of HTTP.

pub mod bench;
mod engine;
pub mod sample;
mod server;
pub mod text;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use arbor_model::{Qwen3Config, Qwen3Model};
use arbor_trace::byte_chat::BYTE_VOCAB;

pub use sample::{Finish, Sampling};

/// Header carrying the weights version of a reply.
pub const VERSION_HEADER: &str = "x-arbor-weights-version";

/// Errors of the embedded policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The model failed (loading, or a tensor operation).
    #[error(transparent)]
    Model(#[from] arbor_model::ModelError),
    /// The checkpoint cannot serve the byte format.
    #[error("unusable checkpoint: {0}")]
    Checkpoint(String),
    /// Binding or serving failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// Internal state is unusable (a thread panicked while holding it).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, PolicyError>;

/// Serving options.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// Model name reported by `/v1/models` and in replies.
    pub name: String,
    /// Generations decoded at once, as one batch (each holds a KV cache); more requests queue.
    pub max_concurrency: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Upper bound on a request's `max_tokens`.
    pub max_tokens_cap: usize,
    /// Longest prompt + completion, in tokens; longer prompts are refused with a 400.
    pub max_context: usize,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            name: "arbor-embedded".into(),
            // A batch step costs little more for 64 rows than for one at the sizes served here;
            // RL keeps 8-64 requests in flight.
            max_concurrency: 64,
            default_max_tokens: 256,
            max_tokens_cap: 2048,
            max_context: 32_768,
        }
    }
}

/// One set of weights and its version.
pub(crate) struct Weights {
    pub(crate) model: Arc<Qwen3Model>,
    pub(crate) version: u64,
}

/// The current weights, swapped atomically.
pub(crate) struct WeightsSlot(RwLock<Arc<Weights>>);

impl WeightsSlot {
    /// The current weights (a cheap snapshot; later swaps do not affect it).
    pub(crate) fn current(&self) -> Result<Arc<Weights>> {
        self.0
            .read()
            .map(|w| w.clone())
            .map_err(|_| PolicyError::Internal("weights lock poisoned".into()))
    }

    /// Installs `model` as the next version; returns that version.
    fn swap(&self, model: Qwen3Model) -> Result<u64> {
        check_model(&model)?;
        let mut w = self
            .0
            .write()
            .map_err(|_| PolicyError::Internal("weights lock poisoned".into()))?;
        let version = w.version + 1;
        *w = Arc::new(Weights {
            model: Arc::new(model),
            version,
        });
        tracing::info!(version, "policy weights swapped");
        Ok(version)
    }
}

/// State shared by the handlers and the handle.
pub(crate) struct Shared {
    pub(crate) opts: PolicyOptions,
    weights: Arc<WeightsSlot>,
    pub(crate) engine: engine::Engine,
    pub(crate) counter: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The current weights (a cheap snapshot; later swaps do not affect it).
    pub(crate) fn current(&self) -> Result<Arc<Weights>> {
        self.weights.current()
    }

    /// Installs `model` as the next version; returns that version.
    pub(crate) fn swap(&self, model: Qwen3Model) -> Result<u64> {
        self.weights.swap(model)
    }
}

/// The byte format needs every byte to be a token.
fn check_model(model: &Qwen3Model) -> Result<()> {
    let vocab = model.config().vocab_size;
    if vocab < BYTE_VOCAB {
        return Err(PolicyError::Checkpoint(format!(
            "vocab_size {vocab} < {BYTE_VOCAB}: the byte-level chat format needs every byte"
        )));
    }
    Ok(())
}

/// Loads a checkpoint directory (`config.json` + `model.safetensors`) and checks it can serve.
pub fn load_checkpoint(dir: impl AsRef<Path>) -> Result<Qwen3Model> {
    let model = Qwen3Model::load(dir)?;
    check_model(&model)?;
    Ok(model)
}

/// The configuration `arbor policy init` writes: a small dense byte-level model (vocabulary 256,
/// width 64, 2 layers, 4 query / 2 key-value heads, 131 k parameters) that decodes hundreds of
/// tokens per second on one CPU core.
pub fn tiny_byte_config() -> Qwen3Config {
    Qwen3Config::tiny(BYTE_VOCAB, 64, 2, 4, 2)
}

/// Writes a freshly initialised (seeded) model with `cfg` into `dir`.
pub fn init_checkpoint(dir: impl AsRef<Path>, cfg: Qwen3Config, seed: u64) -> Result<Qwen3Model> {
    if cfg.vocab_size < BYTE_VOCAB {
        return Err(PolicyError::Checkpoint(format!(
            "vocab_size {} < {BYTE_VOCAB}",
            cfg.vocab_size
        )));
    }
    let model = Qwen3Model::new(cfg, seed)?;
    model.save(dir)?;
    Ok(model)
}

/// An embedded policy serving in the background.
pub struct EmbeddedPolicy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl EmbeddedPolicy {
    /// Serves `model` on `addr` (port 0 picks a free one) on the current Tokio runtime.
    pub async fn start(addr: SocketAddr, model: Qwen3Model, opts: PolicyOptions) -> Result<Self> {
        check_model(&model)?;
        let weights = Arc::new(WeightsSlot(RwLock::new(Arc::new(Weights {
            model: Arc::new(model),
            version: 1,
        }))));
        let shared = Arc::new(Shared {
            engine: engine::Engine::start(weights.clone(), opts.max_concurrency)?,
            opts,
            weights,
            counter: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = server::router(shared.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        tracing::info!(%addr, name = %shared.opts.name, "embedded policy listening");
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL including `/v1` (what the gateway takes as an upstream).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Replaces the weights; requests that already started finish on the old ones. Returns the
    /// new weights version (versions start at 1 and count swaps).
    pub fn swap(&self, model: Qwen3Model) -> Result<u64> {
        self.shared.swap(model)
    }

    /// Loads a checkpoint (off the async runtime) and swaps it in; returns the new version.
    pub async fn load(&self, dir: impl AsRef<Path>) -> Result<u64> {
        let dir = dir.as_ref().to_path_buf();
        let model = tokio::task::spawn_blocking(move || load_checkpoint(dir))
            .await
            .map_err(|e| PolicyError::Internal(format!("loader thread: {e}")))??;
        self.swap(model)
    }

    /// The current weights version.
    pub fn version(&self) -> u64 {
        self.shared.current().map_or(0, |w| w.version)
    }

    /// The current model (shared; swapping later does not change it).
    pub fn model(&self) -> Result<Arc<Qwen3Model>> {
        Ok(self.shared.current()?.model.clone())
    }

    /// Stops accepting connections and waits for open requests to finish.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(r) => Ok(r?),
            Err(e) => Err(PolicyError::Internal(format!("server task: {e}"))),
        }
    }
}

impl Drop for EmbeddedPolicy {
    fn drop(&mut self) {
        // A handle dropped without shutdown() must not leave a server running.
        if self.shutdown.is_some() {
            self.task.abort();
        }
    }
}
