//! `arbor-gateway`: run the gateway, the stand-in upstream, or the bench as a process.

use clap::Parser;

#[derive(Parser)]
#[command(name = "arbor-gateway", about = "arbor's model gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: arbor_gateway::cli::Cmd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    arbor_gateway::cli::run(Cli::parse().cmd).await
}
