//! `arbor tree bench`: train the same model on the same trajectories both ways, every path
//! separately ("linear") and as packed prefix trees ("tree"), and report the speedup against the
//! ideal `N_flat / N_unique`.
//!
//! Both modes run the identical full training step (forward, backward, AdamW update) with the same
//! kernels (the tree-attention op handles a forest of independent paths as well as a tree), the
//! same SFT token-mean loss and the same micro-batch size in tokens, so the measured ratio isolates
//! the effect of computing shared prefixes once. Human-readable progress goes to stderr; the
//! function returns the one JSON object the CLI prints.

use std::time::Instant;

use arbor_tree::synthetic::{
    GroupSampling, MultiTurnBranching, group_sampling, multi_turn_branching,
};
use arbor_tree::{FlatTree, LossNormalization, Sequence, TrajectoryTree};
use candle::backprop::GradStore;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::Qwen3Config;
use crate::model::{ForwardOptions, Qwen3Model, TreeBatch};
use crate::train::{AdamWTrainer, weighted_nll};

/// Trajectory shape of a benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchShape {
    /// `K` samples of one prompt per task (a depth-one tree per task).
    GroupSampling,
    /// Episodes whose turns branch (a full b-ary tree of turns per episode).
    MultiTurnBranching,
}

/// Options of [`tree_bench`]. `Default` is the standard run (a few minutes on 2 cores).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeBenchOptions {
    /// Target POR values (one result per POR and shape).
    pub pors: Vec<f64>,
    /// Trajectory shapes.
    pub shapes: Vec<BenchShape>,
    /// Unique tokens per tree batch (one optimiser step in tree mode); the linear mode trains
    /// the same paths, `unique / (1 - POR)` flat tokens, in micro-batches of this many tokens.
    pub unique_tokens: usize,
    /// Tokens per root-to-leaf path.
    pub path_len: usize,
    /// Samples per task for the group-sampling shape.
    pub samples_per_group: usize,
    /// Timed optimiser steps per mode (the median is reported).
    pub steps: usize,
    /// Untimed warm-up steps per mode.
    pub warmup: usize,
    /// The model (its `vocab_size` also bounds the synthetic token ids).
    pub model: Qwen3Config,
    /// Seed of the data and of the initial weights.
    pub seed: u64,
    /// AdamW learning rate.
    pub lr: f64,
}

impl Default for TreeBenchOptions {
    fn default() -> Self {
        let mut model = Qwen3Config::tiny(2048, 256, 4, 4, 2);
        model.intermediate_size = 768;
        Self {
            pors: vec![0.5, 0.75, 0.85],
            shapes: vec![BenchShape::GroupSampling, BenchShape::MultiTurnBranching],
            unique_tokens: 2048,
            path_len: 512,
            samples_per_group: 8,
            steps: 2,
            warmup: 1,
            model,
            seed: 0,
            lr: 1e-4,
        }
    }
}

/// Errors are reported through `anyhow` (this is an application-level entry point).
fn sequences_for(
    opts: &TreeBenchOptions,
    shape: BenchShape,
    por: f64,
) -> anyhow::Result<Vec<Sequence>> {
    let flat = (opts.unique_tokens as f64 / (1.0 - por)).round() as usize;
    let vocab = opts.model.vocab_size as u32;
    Ok(match shape {
        BenchShape::GroupSampling => {
            let mut c = GroupSampling::for_por(
                por,
                flat,
                opts.samples_per_group,
                opts.path_len,
                opts.seed,
            )?;
            c.vocab_size = vocab;
            group_sampling(&c)
        }
        BenchShape::MultiTurnBranching => {
            let mut c = MultiTurnBranching::for_por(por, flat, opts.path_len, opts.seed)?;
            c.vocab_size = vocab;
            multi_turn_branching(&c)
        }
    })
}

/// Splits path indices into micro-batches of at most `budget` tokens (at least one path each).
fn micro_batches(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for (k, &l) in lens.iter().enumerate() {
        if !cur.is_empty() && used + l > budget {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(k);
        used += l;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct LinearData {
    batches: Vec<(TreeBatch, Vec<f32>)>,
    pairs: u64,
}

fn linear_data(flat: &FlatTree, budget: usize) -> anyhow::Result<LinearData> {
    let norm = flat.normalizer();
    let coef = flat.path_coefficients(LossNormalization::TokenMean, &norm);
    let paths: Vec<Sequence> = (0..flat.paths.len())
        .map(|k| flat.path_sequence(k))
        .collect();
    let lens: Vec<usize> = paths.iter().map(|p| p.tokens.len()).collect();
    let mut batches = Vec::new();
    let mut pairs = 0;
    for mb in micro_batches(&lens, budget) {
        let seqs: Vec<&[u32]> = mb.iter().map(|&k| paths[k].tokens.as_slice()).collect();
        let batch = TreeBatch::forest(&seqs);
        pairs += batch.mask.visible_pairs();
        let w: Vec<f32> = mb
            .iter()
            .flat_map(|&k| {
                let c = coef[k] as f32;
                paths[k]
                    .loss_mask
                    .iter()
                    .map(move |&m| if m { c } else { 0.0 })
            })
            .collect();
        batches.push((batch, w));
    }
    Ok(LinearData { batches, pairs })
}

/// One optimiser step over micro-batches: per micro-batch forward + backward, gradients summed,
/// one AdamW update. Returns the loss.
fn train_step(
    model: &Qwen3Model,
    opt: &mut AdamWTrainer,
    batches: &[(TreeBatch, Vec<f32>)],
) -> anyhow::Result<f32> {
    let mut total: Option<GradStore> = None;
    let mut loss_sum = 0f32;
    for (b, w) in batches {
        // Only tokens with a loss weight need the LM head (same rule in both modes).
        let wanted: Vec<bool> = w.iter().map(|&x| x != 0.0).collect();
        let opts = ForwardOptions {
            train: true,
            ..ForwardOptions::default()
        };
        let (lp, _) = model.token_logprobs_where(b, &opts, Some(&wanted))?;
        let loss = weighted_nll(&lp, w)?;
        loss_sum += loss.to_scalar::<f32>()?;
        let g = loss.backward()?;
        match total.as_mut() {
            None => total = Some(g),
            Some(t) => t.extend(g)?,
        }
    }
    if let Some(g) = total {
        opt.step(&g)?;
    }
    Ok(loss_sum)
}

/// CPU time (user + system) of this process in seconds, from `/proc/self/stat` (Linux); `None`
/// elsewhere. Less sensitive than wall time to other processes competing for the cores.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every mainstream Linux configuration.
    Some((utime + stime) / 100.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The progress bar on stderr over all `steps` of the benchmark.
fn progress_bar(steps: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(steps),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// What one mode of one case measured.
struct ModeTiming {
    /// Wall time of each timed (post-warm-up) step.
    times: Vec<f64>,
    /// CPU seconds per timed step, when the platform reports process CPU time.
    cpu: Option<f64>,
    /// Loss of the first step (the same initial weights in both modes, so these must agree).
    first_loss: f32,
}

/// Trains a fresh model (the seed's initial weights) for `warmup + steps` optimiser steps over
/// `batches`, timing the steps after the warm-up.
fn time_mode(
    opts: &TreeBenchOptions,
    batches: &[(TreeBatch, Vec<f32>)],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<ModeTiming> {
    // Same initial weights in both modes: the first losses must agree.
    let model = Qwen3Model::new(opts.model.clone(), opts.seed)?;
    let mut opt = AdamWTrainer::new(model.vars(), opts.lr, 0.0)?;
    let mut times = Vec::new();
    let mut first_loss = 0f32;
    let mut cpu0 = None;
    for s in 0..opts.warmup + opts.steps {
        if s == opts.warmup {
            cpu0 = process_cpu_seconds();
        }
        let t0 = Instant::now();
        let loss = train_step(&model, &mut opt, batches)?;
        let dt = t0.elapsed().as_secs_f64();
        if s == 0 {
            first_loss = loss;
        }
        if s >= opts.warmup {
            times.push(dt);
        }
        bar.inc(1);
    }
    let cpu = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / opts.steps as f64),
        _ => None,
    };
    Ok(ModeTiming {
        times,
        cpu,
        first_loss,
    })
}

/// Runs the benchmark and returns `{"results": [...], "options": {...}}`, one result per (shape,
/// POR): `por` (realised), `flat_tokens`, `unique_tokens`, `ideal_speedup`, `measured_speedup`
/// (median linear step time / median tree step time, full training step), `efficiency`
/// (= measured / ideal), `tree_tokens_per_s` (flat tokens trained per second in tree mode),
/// attention work in both modes and the `model` config.
pub fn tree_bench(opts: TreeBenchOptions) -> anyhow::Result<serde_json::Value> {
    opts.model.validate()?;
    anyhow::ensure!(opts.steps > 0, "steps must be positive");
    let mut results = Vec::new();
    let cases: Vec<(BenchShape, f64)> = opts
        .shapes
        .iter()
        .flat_map(|&s| opts.pors.iter().map(move |&p| (s, p)))
        .collect();
    let bar = progress_bar((cases.len() * 2 * (opts.steps + opts.warmup)) as u64);
    for (shape, target) in cases {
        let seqs = sequences_for(&opts, shape, target)?;
        let tree = TrajectoryTree::from_sequences(&seqs)?;
        let flat = tree.flatten();
        let stats = tree.stats();
        let budget = flat.len().max(opts.path_len);
        let lin = linear_data(&flat, budget)?;
        let tree_w: Vec<f32> = flat
            .loss_weights(LossNormalization::TokenMean)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let tree_batch = TreeBatch::new(
            flat.input_ids.clone(),
            flat.position_ids.clone(),
            flat.parent.clone(),
            flat.subtree_end.clone(),
        )?;
        let tree_pairs = tree_batch.mask.visible_pairs();
        let tree_batches = vec![(tree_batch, tree_w)];

        let mut times = [Vec::new(), Vec::new()];
        let mut cpu = [0f64; 2];
        let mut first_loss = [0f32; 2];
        for (mode, batches) in [(0usize, &lin.batches), (1usize, &tree_batches)] {
            bar.set_message(format!(
                "{shape:?} POR {:.2} {}",
                stats.por,
                if mode == 0 { "linear" } else { "tree" }
            ));
            let timing = time_mode(&opts, batches, &bar)?;
            times[mode] = timing.times;
            first_loss[mode] = timing.first_loss;
            if let Some(c) = timing.cpu {
                cpu[mode] = c;
            }
        }
        let lin_t = median(&mut times[0]);
        let tree_t = median(&mut times[1]);
        let measured = lin_t / tree_t;
        let ideal = stats.ideal_speedup;
        let loss_rel =
            ((first_loss[0] - first_loss[1]).abs() / first_loss[0].abs().max(1e-12)) as f64;
        results.push(json!({
            "shape": shape,
            "target_por": target,
            "por": stats.por,
            "paths": stats.paths,
            "flat_tokens": stats.flat_tokens,
            "unique_tokens": stats.unique_tokens,
            "ideal_speedup": ideal,
            "measured_speedup": measured,
            "efficiency": measured / ideal,
            "tree_tokens_per_s": stats.flat_tokens as f64 / tree_t,
            "linear_tokens_per_s": stats.flat_tokens as f64 / lin_t,
            "tree_unique_tokens_per_s": stats.unique_tokens as f64 / tree_t,
            "tree_step_s": tree_t,
            "linear_step_s": lin_t,
            "linear_micro_batches": lin.batches.len(),
            "attention_pairs_tree": tree_pairs,
            "attention_pairs_linear": lin.pairs,
            "attention_pair_ratio": lin.pairs as f64 / tree_pairs as f64,
            "first_step_loss_rel_diff": loss_rel,
            // CPU-time based figures (process user+system time per step): robust to other
            // processes competing for the cores, but they include threads' spin-waiting.
            "tree_step_cpu_s": cpu[1],
            "linear_step_cpu_s": cpu[0],
            "cpu_measured_speedup": if cpu[1] > 0.0 { cpu[0] / cpu[1] } else { f64::NAN },
            "cpu_efficiency": if cpu[1] > 0.0 { cpu[0] / cpu[1] / ideal } else { f64::NAN },
            "model": opts.model,
        }));
        // Per-case summary on stderr even when the bar is hidden (not a terminal).
        bar.suspend(|| eprintln!(
            "{shape:?} POR {:.3}: flat {} unique {} ideal {:.2}x measured {:.2}x efficiency {:.2} (cpu-time {:.2}) ({:.0} tok/s tree, {:.0} tok/s linear)",
            stats.por,
            stats.flat_tokens,
            stats.unique_tokens,
            ideal,
            measured,
            measured / ideal,
            cpu[0] / cpu[1] / ideal,
            stats.flat_tokens as f64 / tree_t,
            stats.flat_tokens as f64 / lin_t
        ));
    }
    bar.finish_and_clear();
    Ok(json!({
        "results": results,
        "options": opts,
        "threads": rayon::current_num_threads(),
    }))
}
