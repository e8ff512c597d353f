//! `arbor tree ...`: trajectory trees, their reuse, and pack files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arbor_tree::{LossNormalization, OversizePolicy, PackOptions, PackStrategy, TrajectoryTree};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum Command {
    /// Prefix sharing of a set of trajectories: POR, ideal speedup, sizes.
    Stats(StatsArgs),
    /// Pack trajectories into safetensors micro-batches of at most BUDGET tokens.
    Pack(PackArgs),
    /// Train the same model on trees and on separate paths; prints one JSON object
    /// with measured vs ideal speedup per POR.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long)]
    json: bool,
    /// Target POR values.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.75,0.85")]
    pors: Vec<f64>,
    /// Timed optimiser steps per mode (median reported).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Unique tokens per tree batch.
    #[arg(long, default_value_t = 2048)]
    unique_tokens: usize,
}

#[derive(Args)]
pub struct StatsArgs {
    /// A JSONL file of sequences, a directory of them, a tree JSON (e.g. a gateway session tree),
    /// or a gateway store directory.
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

/// Sources are arbor-tree's own (sequence JSONL, directories of them, tree
/// JSON) or a gateway store directory (`calls.jsonl`), converted here.
fn load_tree(source: &Path) -> Result<TrajectoryTree> {
    let seqs = if source.join(arbor_gateway::store::LOG_FILE).is_file() {
        arbor_gateway::tree::store_sequences(source)?
    } else {
        arbor_tree::load_sequences(source)?
    };
    anyhow::ensure!(
        !seqs.is_empty(),
        "no trajectories with token ids in {}",
        source.display()
    );
    Ok(TrajectoryTree::from_sequences(&seqs)?)
}

pub fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Bench(a) => {
            let _ = a.json;
            let opts = arbor_model::bench::TreeBenchOptions {
                pors: a.pors,
                steps: a.steps,
                unique_tokens: a.unique_tokens,
                ..Default::default()
            };
            let report = arbor_model::bench::tree_bench(opts)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Stats(a) => {
            let stats = load_tree(&a.source)
                .with_context(|| format!("reading {}", a.source.display()))?
                .stats();
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
            let tree =
                load_tree(&a.source).with_context(|| format!("reading {}", a.source.display()))?;
            let summary = arbor_tree::write_packs(&tree, &opts, &a.out)
                .with_context(|| format!("packing into {}", a.out.display()))?;
            eprintln!("{}", summary.stats);
            eprintln!("wrote {} packs to {}", summary.files.len(), a.out.display());
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(0)
}
