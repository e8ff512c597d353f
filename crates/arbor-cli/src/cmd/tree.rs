//! `arbor tree ...`: trajectory trees, their reuse, and pack files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use arbor_tree::{LossNormalization, OversizePolicy, PackOptions, PackStrategy};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum Command {
    /// Prefix sharing of a set of trajectories: POR, ideal speedup, sizes.
    Stats(StatsArgs),
    /// Pack trajectories into safetensors micro-batches of at most BUDGET tokens.
    Pack(PackArgs),
}

#[derive(Args)]
pub struct StatsArgs {
    /// A JSONL file of sequences, a directory of them, or a tree JSON (e.g. a gateway session tree).
    source: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PackArgs {
    /// A JSONL file of sequences, a directory of them, or a tree JSON.
    source: PathBuf,
    /// Token budget per pack (micro-batch).
    #[arg(long)]
    budget: usize,
    /// Output directory (created; must not already hold packs).
    #[arg(long)]
    out: PathBuf,
    /// Packer: greedy (general trees) or single_path_dp (exact for one shared prefix per pack).
    #[arg(long, default_value = "greedy")]
    strategy: PackStrategy,
    /// Loss normalization baked into loss_weight: path_sum, token_mean or sequence_mean.
    #[arg(long, default_value = "token_mean")]
    normalization: LossNormalization,
    /// Paths longer than the budget: dedicated (own pack, flagged) or error.
    #[arg(long, default_value = "dedicated")]
    oversize: OversizePolicy,
}

pub fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Stats(a) => {
            let stats = arbor_tree::stats(&a.source)
                .with_context(|| format!("reading {}", a.source.display()))?;
            if a.json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!("{stats}");
            }
        }
        Command::Pack(a) => {
            let mut opts = PackOptions::new(a.budget);
            opts.strategy = a.strategy;
            opts.normalization = a.normalization;
            opts.oversize = a.oversize;
            let summary = arbor_tree::pack_to_dir_with(&a.source, &opts, &a.out)
                .with_context(|| format!("packing {}", a.source.display()))?;
            eprintln!("{}", summary.stats);
            eprintln!("wrote {} packs to {}", summary.files.len(), a.out.display());
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(0)
}
