//! `arbor policy ...`: the embedded policy (an arbor-model checkpoint served as an
//! OpenAI-compatible upstream for the gateway).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use arbor_model::Qwen3Config;
use arbor_policy::{EmbeddedPolicy, PolicyOptions};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum Command {
    /// Serve a checkpoint at /v1/chat/completions (byte-level chat format, token ids and
    /// logprobs in every reply); POST /admin/load {"checkpoint": DIR} swaps weights live.
    Serve(ServeArgs),
    /// Write a freshly initialised (seeded) tiny byte-level checkpoint, for tests and quickstart.
    Init(InitArgs),
    /// Sampling throughput: a fresh tiny model served in-process, N concurrent chat requests
    /// over loopback HTTP, once per max-concurrency value; prints one JSON object.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long)]
    json: bool,
    /// Concurrent requests per run.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Bytes of each request's user message.
    #[arg(long, default_value_t = 500)]
    prompt_bytes: usize,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 160)]
    max_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// The policy's max-concurrency, one run per value (default: 1 and the serving default).
    #[arg(long, value_delimiter = ',')]
    max_concurrency: Vec<usize>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Model name reported by /v1/models and in replies.
    #[arg(long, default_value = "arbor-embedded")]
    name: String,
    /// Generations decoded at once as one batch; further requests queue (default: 64).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Upper bound on a request's max_tokens.
    #[arg(long, default_value_t = 2048)]
    max_tokens_cap: usize,
    /// max_tokens when a request gives none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
}

#[derive(Args)]
pub struct InitArgs {
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Initialisation seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
}

pub async fn run(c: Command) -> Result<i32> {
    match c {
        Command::Init(a) => {
            let cfg = Qwen3Config::tiny(256, a.hidden, a.layers, a.heads, a.kv_heads);
            let out = a.out.clone();
            let model = tokio::task::spawn_blocking(move || {
                arbor_policy::init_checkpoint(&a.out, cfg, a.seed)
            })
            .await??;
            println!(
                "wrote {} ({} parameters, byte vocabulary)",
                out.display(),
                model.num_params()
            );
            Ok(0)
        }
        Command::Bench(a) => {
            let mut opts = arbor_policy::bench::BenchOptions {
                requests: a.requests,
                prompt_bytes: a.prompt_bytes,
                max_tokens: a.max_tokens,
                temperature: a.temperature,
                ..Default::default()
            };
            if !a.max_concurrency.is_empty() {
                opts.max_concurrency = a.max_concurrency;
            }
            let _ = a.json;
            let report = arbor_policy::bench::bench(opts).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(0)
        }
        Command::Serve(a) => {
            let dir = a.checkpoint.clone();
            let model = tokio::task::spawn_blocking(move || arbor_policy::load_checkpoint(&dir))
                .await?
                .with_context(|| format!("loading {}", a.checkpoint.display()))?;
            let mut opts = PolicyOptions {
                name: a.name,
                max_tokens_cap: a.max_tokens_cap,
                default_max_tokens: a.default_max_tokens,
                max_context: model.config().max_position_embeddings,
                ..PolicyOptions::default()
            };
            if let Some(n) = a.max_concurrency {
                opts.max_concurrency = n;
            }
            let policy = EmbeddedPolicy::start(a.listen, model, opts).await?;
            eprintln!(
                "arbor policy serving {} at {} (weights v{})",
                a.checkpoint.display(),
                policy.base_url(),
                policy.version()
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            policy.shutdown().await?;
            Ok(0)
        }
    }
}
