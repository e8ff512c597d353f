//! `arbor serve`: the env server for external trainers.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: the API runs code in sandboxes
    /// on request, so do not expose it to untrusted networks).
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: SocketAddr,
    /// Directory for batch run directories (ROOT/<batch id>).
    #[arg(long, default_value = "runs/serve")]
    root: PathBuf,
}

pub async fn run(a: ServeArgs) -> Result<i32> {
    let server = arbor_rollout::server::start(arbor_rollout::server::ServerConfig {
        listen: a.listen,
        root: a.root.clone(),
        backend: None,
    })
    .await
    .with_context(|| format!("starting the env server on {}", a.listen))?;
    // The first stdout line names the address (useful with port 0).
    println!("listening on http://{}", server.addr);
    eprintln!(
        "arbor env server: batches in {}; API: POST /v1/batches, GET /v1/batches/{{id}}/results (see docs/env-server.md)",
        a.root.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.wait().await.context("env server")?;
    Ok(0)
}
