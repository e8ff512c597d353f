//! Packing benchmark: builds synthetic trees of about 1,000,000 flat tokens and times tree building,
//! pack planning and pack materialisation (arrays + loss weights). Prints ONE JSON object to stdout
//! (medians over the repetitions); human-readable progress goes to stderr.
//!
//! ```text
//! cargo run --release -p arbor-tree --example pack_bench [-- --flat-tokens N --budget C --reps R]
//! ```

use std::time::Instant;

use arbor_tree::synthetic::{
    GroupSampling, MultiTurnBranching, group_sampling, multi_turn_branching,
};
use arbor_tree::{
    LossNormalization, PackOptions, PackStrategy, Sequence, TrajectoryTree, build_packs,
    plan_packing,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flat = arg(&args, "--flat-tokens", 1_000_000)?;
    let budget = arg(&args, "--budget", 16_384)?;
    let reps = arg(&args, "--reps", 5)?.max(1);

    let shapes: Vec<(String, Vec<Sequence>)> = vec![
        (
            "group_sampling_por0.75".into(),
            group_sampling(&GroupSampling::for_por(0.75, flat, 16, 2048, 1)?),
        ),
        (
            "multi_turn_branching_por0.85".into(),
            multi_turn_branching(&MultiTurnBranching::for_por(0.85, flat, 4096, 2)?),
        ),
        ("many_small_nodes".into(), many_small_nodes(flat, 3)),
        ("wide_short_paths".into(), wide_short_paths(flat, 4)),
        ("prefix_chain".into(), prefix_chain(flat, 5)),
    ];
    let mut results = Vec::new();
    for (name, seqs) in shapes {
        let mut build = Vec::new();
        let mut tree = None;
        for _ in 0..reps {
            let t0 = Instant::now();
            let t = TrajectoryTree::from_sequences(&seqs)?;
            build.push(t0.elapsed().as_secs_f64());
            tree = Some(t);
        }
        let Some(tree) = tree else { continue };
        let stats = tree.stats();
        for strategy in [PackStrategy::Greedy, PackStrategy::SinglePathDp] {
            let mut opts = PackOptions::new(budget);
            opts.strategy = strategy;
            let (mut plan_s, mut build_s, mut total_s) = (Vec::new(), Vec::new(), Vec::new());
            let mut last = None;
            for _ in 0..reps {
                let t0 = Instant::now();
                let packing = plan_packing(&tree, &opts)?;
                let t1 = Instant::now();
                let packs = build_packs(&tree, &packing, LossNormalization::TokenMean)?;
                let t2 = Instant::now();
                plan_s.push((t1 - t0).as_secs_f64());
                build_s.push((t2 - t1).as_secs_f64());
                total_s.push((t2 - t0).as_secs_f64());
                assert_eq!(packs.len(), packing.packs.len());
                last = Some(packing);
            }
            let Some(packing) = last else { continue };
            let ps = packing.stats(&tree);
            eprintln!(
                "{name} {strategy:?}: {} flat tokens, POR {:.3}, {} packs, ERR {:.3}, pack {:.3}s",
                stats.flat_tokens,
                stats.por,
                ps.packs,
                ps.err,
                median(total_s.clone())
            );
            results.push(serde_json::json!({
                "shape": name,
                "strategy": strategy,
                "flat_tokens": stats.flat_tokens,
                "unique_tokens": stats.unique_tokens,
                "paths": stats.paths,
                "nodes": stats.nodes,
                "por": stats.por,
                "budget": budget,
                "packs": ps.packs,
                "packed_tokens": ps.packed_tokens,
                "err": ps.err,
                "oversized_packs": ps.oversized_packs,
                "build_tree_s": median(build.clone()),
                "plan_s": median(plan_s),
                "materialize_s": median(build_s),
                "pack_s": median(total_s),
            }));
        }
    }
    let max_pack_s = results
        .iter()
        .filter_map(|r| r["pack_s"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "arbor-tree pack_bench",
            "reps": reps,
            "max_pack_s": max_pack_s,
            "results": results,
        })
    );
    Ok(())
}

/// A bushy random tree: sequences that each extend a random prefix of an earlier one by a short random
/// suffix, so there are many short nodes and many paths (a worst case for per-node overheads).
fn many_small_nodes(flat: usize, seed: u64) -> Vec<Sequence> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<Sequence> = Vec::new();
    let mut total = 0usize;
    while total < flat {
        let mut tokens: Vec<u32> = if out.is_empty() || rng.gen_range(0..50) == 0 {
            (0..64).map(|_| rng.gen_range(0..32_000)).collect()
        } else {
            let base = &out[rng.gen_range(out.len().saturating_sub(64)..out.len())].tokens;
            let keep = rng.gen_range(1..=base.len());
            base[..keep].to_vec()
        };
        if tokens.len() > 3000 {
            tokens.truncate(1000);
        }
        let extra = rng.gen_range(8..64);
        tokens.extend((0..extra).map(|_| rng.gen_range(0..32_000)));
        total += tokens.len();
        out.push(Sequence::new(format!("s{}", out.len()), tokens));
    }
    out
}

/// Very many short paths (10 tokens) under a few shared 4-token prompts: a root with ~25k children.
fn wide_short_paths(flat: usize, seed: u64) -> Vec<Sequence> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..flat / 10)
        .map(|i| {
            let mut t = vec![(i % 4) as u32, 1, 2, 3];
            t.extend((0..6).map(|_| rng.gen_range(0..32_000)));
            Sequence::new(format!("w{i}"), t)
        })
        .collect()
}

/// Each sequence extends the previous one (calls of one long episode recorded one by one): every path
/// but the last ends at an inner node, and each ends deeper than the previous one.
fn prefix_chain(flat: usize, seed: u64) -> Vec<Sequence> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<Sequence> = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    let mut total = 0;
    while total < flat {
        if cur.len() > 6000 {
            cur.truncate(0);
            cur.push(out.len() as u32);
        }
        cur.extend((0..rng.gen_range(20..200)).map(|_| rng.gen_range(0..32_000)));
        total += cur.len();
        out.push(Sequence::new(format!("c{}", out.len()), cur.clone()));
    }
    out
}
