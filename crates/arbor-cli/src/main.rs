//! The `arbor` binary: thin commands over the library crates.
use clap::Parser;

#[derive(Parser)]
#[command(name = "arbor", version, about = "Agentic RL infrastructure: sandboxes, gateway, tree training")]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
