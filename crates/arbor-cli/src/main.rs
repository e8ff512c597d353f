//! The `arbor` binary: thin commands over the library crates.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "arbor",
    version,
    about = "Agentic-coding RL infrastructure: isolated sandboxes, a recording model gateway, tree training",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on the embedded defaults: a reduced Specialize-then-Unify pipeline on the
    /// built-in domains (about 15 minutes on 2 cores); prints the report path and pass rates.
    Quickstart(cmd::quickstart::Args),
    /// Run an experiment (tasks x scaffolds x samples against a policy), or resume one.
    Run(cmd::run::RunArgs),
    /// Write a run directory's Markdown report (pass@k, per-domain tables, failures, plots).
    Report(cmd::report::ReportArgs),
    /// The env server: external trainers submit rollout batches and stream results over HTTP.
    Serve(cmd::serve::ServeArgs),
    /// Node agent: serve this host's sandboxes to orchestrators on other machines.
    #[command(subcommand)]
    Node(cmd::node::Command),
    /// Isolated sandboxes: run a command, clean up after crashes, benchmark.
    #[command(subcommand)]
    Sandbox(cmd::sandbox::Command),
    /// Container images: pull, load, build, list, prune, bench.
    #[command(subcommand)]
    Image(cmd::image::Command),
    /// Task sets: generate built-in domains, list sources, validate oracles and verifiers.
    #[command(subcommand)]
    Task(cmd::task::Command),
    /// The model gateway: OpenAI/Anthropic-compatible endpoints that record every call as tokens.
    #[command(subcommand)]
    Gateway(arbor_gateway::cli::Cmd),
    /// The embedded policy: serve an arbor-model checkpoint as an OpenAI-compatible upstream.
    #[command(subcommand)]
    Policy(cmd::policy::Command),
    /// Trajectory trees: prefix-sharing statistics and packing into training micro-batches.
    #[command(subcommand)]
    Tree(cmd::tree::Command),
    /// Training: SFT, RL, on-policy distillation, held-out evaluation, the whole pipeline.
    #[command(subcommand)]
    Train(cmd::train::Command),
}

fn main() {
    // Sandboxes start this same binary as their init when no dedicated
    // arbor-sandbox-init is installed beside it; that must win over argument parsing.
    if arbor_sandbox::init::is_init_invocation() {
        arbor_sandbox::init::run();
    }
    arbor_sandbox::local::allow_self_as_init();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARBOR_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One readable chain of causes, not a debug dump.
            eprintln!("error: {e:#}");
            std::process::exit(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.command {
            Command::Quickstart(a) => cmd::quickstart::run(a).await,
            Command::Run(a) => cmd::run::run(a).await,
            Command::Serve(a) => cmd::serve::run(a).await,
            Command::Report(a) => cmd::report::run(a),
            Command::Node(c) => cmd::node::run(c).await,
            Command::Sandbox(c) => cmd::sandbox::run(c).await,
            Command::Image(c) => cmd::image::run(c).await,
            Command::Tree(c) => cmd::tree::run(c),
            Command::Train(c) => cmd::train::run(c).await,
            Command::Task(c) => cmd::task::run(c).await,
            Command::Gateway(c) => arbor_gateway::cli::run(c).await.map(|()| 0),
            Command::Policy(c) => cmd::policy::run(c).await,
        }
    })
}
