//! The gateway's command line, shared by the `arbor-gateway` binary and
//! `arbor gateway ...`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use crate::bench::{BenchOptions, bench};
use crate::standin::{self, StandinConfig};
use crate::{GatewayConfig, SessionCaps, ToolPolicy, serve};

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the gateway until Ctrl-C / SIGTERM.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// OpenAI-compatible upstream base URL (repeat for several).
        #[arg(long = "upstream", required = true)]
        upstreams: Vec<String>,
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        /// Model directory with tokenizer.json and a chat template.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Bearer key for the upstreams.
        #[arg(long, env = "ARBOR_UPSTREAM_API_KEY")]
        upstream_api_key: Option<String>,
        /// Do not ask upstreams for token ids (`return_token_ids`), e.g. for hosted APIs.
        #[arg(long)]
        no_upstream_token_ids: bool,
        /// Drop non-function tools instead of refusing the request.
        #[arg(long)]
        drop_unsupported_tools: bool,
        /// Model used when a request names none.
        #[arg(long)]
        default_model: Option<String>,
        /// Upstream request timeout (seconds).
        #[arg(long, default_value_t = 600)]
        request_timeout: u64,
        /// Upstream idle-stream timeout (seconds).
        #[arg(long, default_value_t = 120)]
        idle_timeout: u64,
        /// Refuse a session's calls (429, `session_call_cap`) after this many.
        #[arg(long)]
        max_calls_per_session: Option<u64>,
        /// Refuse a session's calls (429, `session_token_cap`) once its calls used this many
        /// prompt + completion tokens.
        #[arg(long)]
        max_tokens_per_session: Option<u64>,
        /// Largest accepted request body (MiB).
        #[arg(long, default_value_t = 256)]
        max_body_mb: usize,
    },
    /// Run the deterministic stand-in upstream.
    Standin {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Tokens per text reply (0: a short sentence).
        #[arg(long, default_value_t = 0)]
        reply_tokens: usize,
        /// Delay between stream chunks (ms).
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
    },
    /// Benchmark the gateway against the stand-in; prints one JSON object.
    Bench {
        /// Print JSON (the only output format; accepted for CLI compatibility).
        #[arg(long)]
        json: bool,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Calls per session.
        #[arg(long, default_value_t = 10)]
        calls: usize,
    },
}

/// Run one gateway command.
pub async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve {
            listen,
            upstreams,
            store,
            tokenizer,
            upstream_api_key,
            no_upstream_token_ids,
            drop_unsupported_tools,
            default_model,
            request_timeout,
            idle_timeout,
            max_calls_per_session,
            max_tokens_per_session,
            max_body_mb,
        } => {
            let mut cfg = GatewayConfig::new(listen, upstreams, store);
            cfg.tokenizer = tokenizer;
            cfg.upstream_api_key = upstream_api_key;
            cfg.upstream_token_ids = !no_upstream_token_ids;
            cfg.tool_policy = if drop_unsupported_tools {
                ToolPolicy::Drop
            } else {
                ToolPolicy::Refuse
            };
            cfg.default_model = default_model;
            cfg.request_timeout = Duration::from_secs(request_timeout);
            cfg.idle_stream_timeout = Duration::from_secs(idle_timeout);
            cfg.caps = SessionCaps {
                max_calls: max_calls_per_session,
                max_tokens: max_tokens_per_session,
            };
            cfg.max_body_bytes = max_body_mb.saturating_mul(1 << 20);
            serve(cfg).await.context("gateway failed")?;
        }
        Cmd::Standin {
            listen,
            reply_tokens,
            chunk_delay_ms,
        } => {
            let s = standin::spawn(
                listen,
                StandinConfig {
                    reply_tokens,
                    chunk_delay: Duration::from_millis(chunk_delay_ms),
                    ..Default::default()
                },
            )
            .await
            .context("starting the stand-in")?;
            eprintln!("stand-in listening on {}", s.url());
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            s.shutdown().await;
        }
        Cmd::Bench {
            json: _,
            sessions,
            calls,
        } => {
            let report = bench(BenchOptions {
                sessions,
                calls,
                ..Default::default()
            })
            .await?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}
