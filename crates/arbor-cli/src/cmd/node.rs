//! `arbor node serve`: this host's sandboxes for orchestrators elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arbor_image::backend::{ImageBackend, ImagesConfig};
use arbor_node::NodeConfig;
use arbor_sandbox::Backend;
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use clap::{Args, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Subcommand)]
pub enum Command {
    /// Serve this host's sandbox backend over HTTP to orchestrators on other machines.
    ///
    /// Every request but GET /health needs the bearer token, read from --token-file or
    /// $ARBOR_NODE_TOKEN (never from the command line, where `ps` would show it). Off
    /// loopback the node speaks TLS (--tls-cert/--tls-key) and refuses plaintext unless
    /// --insecure-plaintext is given. Past --capacity live sandboxes, creates are refused
    /// (HTTP 503) and the orchestrator places them elsewhere. SIGTERM drains: no new
    /// sandboxes, running work continues up to --drain-grace-s, then everything left is
    /// destroyed and the process exits 0. Prints `listening on URL` as its first line.
    /// See docs/cluster.md.
    Serve(ServeArgs),
    /// Measure a cluster: remote minus local exec round trip, then a run of
    /// scripted-oracle rollouts over the nodes, optionally SIGKILLing one node
    /// (by pid) mid-run. Prints one JSON object; scripts/cluster-bench.sh
    /// builds the nodes in network namespaces and calls it.
    Bench(super::node_bench::BenchArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the bearer token (default: $ARBOR_NODE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address. Only for private links nobody else can
    /// reach (the test suite's network namespaces); the token travels in clear otherwise.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Most sandboxes created and alive at once. A sandbox's first fork (a rollout's grading
    /// copy) is admitted past it, so a full node can still finish the rollouts it holds.
    #[arg(long, default_value_t = 1000)]
    capacity: usize,
    /// Destroy a sandbox after this many seconds without any operation (0: never), so one
    /// whose orchestrator vanished does not live forever.
    #[arg(long, default_value_t = 1800.0)]
    idle_ttl_s: f64,
    /// On SIGTERM, how long running work may continue before the rest is destroyed.
    #[arg(long, default_value_t = 30.0)]
    drain_grace_s: f64,
    /// Image store directory: enables sandboxes from container images (pulled or built on
    /// this node) and reports the cached images for placement.
    #[arg(long)]
    image_root: Option<PathBuf>,
}

fn read_token(file: Option<&PathBuf>) -> Result<String> {
    arbor_node::token::read(file.map(PathBuf::as_path), "ARBOR_NODE_TOKEN")
        .map_err(anyhow::Error::msg)?
        .context("no token: give --token-file or set ARBOR_NODE_TOKEN")
}

fn seconds(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{what} must be a non-negative number"))
}

pub async fn run(c: Command) -> Result<i32> {
    match c {
        Command::Serve(a) => serve(a).await,
        Command::Bench(a) => {
            let token = read_token(a.token_file.as_ref())?;
            super::node_bench::run(a, token).await
        }
    }
}

async fn serve(a: ServeArgs) -> Result<i32> {
    let token = read_token(a.token_file.as_ref())?;
    let local = LocalBackend::new(LocalConfig::default()).context("the local sandbox backend")?;
    let (backend, images): (Arc<dyn Backend>, Option<arbor_node::server::ImagesFn>) =
        match &a.image_root {
            None => (Arc::new(local), None),
            Some(root) => {
                let cfg = ImagesConfig {
                    root: Some(root.clone()),
                    ..Default::default()
                };
                let ib = Arc::new(ImageBackend::new(local, &cfg).context("the image store")?);
                let lister = ib.clone();
                let list: arbor_node::server::ImagesFn = Arc::new(move || {
                    let records = lister.store().images().unwrap_or_default();
                    records.into_iter().map(|r| r.reference).collect()
                });
                (ib, Some(list))
            }
        };
    let cfg = NodeConfig {
        listen: a.listen,
        token,
        tls: a.tls_cert.clone().zip(a.tls_key.clone()),
        insecure_plaintext: a.insecure_plaintext,
        capacity: a.capacity,
        idle_ttl: seconds(a.idle_ttl_s, "--idle-ttl-s")?,
        heartbeat: Duration::from_secs(1),
    };
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let node = arbor_node::server::start(cfg, backend, images)
        .await
        .context("starting the node")?;
    // The first stdout line names the address (useful with port 0).
    println!("listening on {}", node.url());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let destroyed = node
        .drain(seconds(a.drain_grace_s, "--drain-grace-s")?)
        .await;
    eprintln!(
        "arbor node: drained ({destroyed} sandboxes destroyed at the end of the grace period)"
    );
    Ok(0)
}
