//! Times the phases of one tree training step (forward, backward, AdamW) and the tree-attention op
//! alone, for the bench's default model on a ~2048-token group-sampling tree. Diagnostics only.

use std::time::Instant;

use arbor_model::bench::TreeBenchOptions;
use arbor_model::train::{AdamWTrainer, weighted_nll};
use arbor_model::{ForwardOptions, Qwen3Model, TreeBatch};
use arbor_tree::synthetic::{GroupSampling, group_sampling};
use arbor_tree::{LossNormalization, TrajectoryTree};

fn main() -> anyhow::Result<()> {
    let opts = TreeBenchOptions::default();
    let por: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.75);
    let mut c = GroupSampling::for_por(por, (2048.0 / (1.0 - por)) as usize, 8, 512, 0)?;
    c.vocab_size = opts.model.vocab_size as u32;
    let tree = TrajectoryTree::from_sequences(&group_sampling(&c))?;
    let flat = tree.flatten();
    let w: Vec<f32> = flat
        .loss_weights(LossNormalization::TokenMean)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let b = TreeBatch::new(
        flat.input_ids.clone(),
        flat.position_ids.clone(),
        flat.parent.clone(),
        flat.subtree_end.clone(),
    )?;
    let model = Qwen3Model::new(opts.model.clone(), 0)?;
    let mut opt = AdamWTrainer::new(model.vars(), 1e-4, 0.0)?;
    eprintln!("T = {}, pairs = {}", b.len(), b.mask.visible_pairs());
    let attn_only = std::env::args().any(|a| a == "attn");
    for _ in 0..if attn_only { 0 } else { 4 } {
        let t0 = Instant::now();
        let (lp, _) = model.token_logprobs(&b, &ForwardOptions::default())?;
        let loss = weighted_nll(&lp, &w)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let g = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&g)?;
        let t3 = Instant::now();
        eprintln!(
            "fwd {:.3}s bwd {:.3}s opt {:.3}s total {:.3}s -> {:.0} unique tok/s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t3 - t0).as_secs_f64(),
            b.len() as f64 / (t3 - t0).as_secs_f64()
        );
    }
    // Attention op alone, per layer-equivalent call.
    let cfg = &opts.model;
    let (hq, hkv, d, t) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
        b.len(),
    );
    let mk = |h: usize| {
        candle::Var::from_tensor(
            &candle::Tensor::randn(0f32, 1.0, (h, t, d), &candle::Device::Cpu).unwrap(),
        )
        .unwrap()
    };
    let (q, k, v) = (mk(hq), mk(hkv), mk(hkv));
    let iters: usize = std::env::var("ATTN_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if attn_only { 10 } else { 3 });
    for _ in 0..iters {
        let t0 = Instant::now();
        let o = arbor_model::ops::tree_attention(&q, &k, &v, &b.mask, 0.125)?;
        let s = o.sum_all()?;
        let t1 = Instant::now();
        let _g = s.backward()?;
        let t2 = Instant::now();
        eprintln!(
            "attention op: fwd {:.4}s bwd {:.4}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64()
        );
    }
    Ok(())
}
