//! MCLA on a tiny MoE with stochastic routing (router noise in training mode): averaging K
//! forward passes reduces the variance of the log-probability estimate, and with it the
//! variance of the importance weights `exp(logp_rollout - logp_train)` that `rl_loss` reports.

use arbor_model::{ForwardOptions, Qwen3Config, Qwen3Model, TreeBatch};
use arbor_train::{Mcla, RlBatch, RlConfig, mcla_logprobs, rl_loss};
use arbor_tree::{Sequence, TrajectoryTree};
use rand::{Rng, SeedableRng, rngs::StdRng};

const VOCAB: usize = 48;
const NOISE: f32 = 1.0;
const K: usize = 8;

fn moe() -> Qwen3Model {
    let cfg = Qwen3Config::tiny(VOCAB, 32, 2, 4, 2).with_moe(4, 2, 24);
    Qwen3Model::new(cfg, 5).unwrap()
}

fn sequences(seed: u64) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(seed);
    let prompt: Vec<u32> = (0..6).map(|_| rng.gen_range(0..VOCAB as u32)).collect();
    (0..4)
        .map(|i| {
            let mut tokens = prompt.clone();
            tokens.extend((0..20).map(|_| rng.gen_range(0..VOCAB as u32)));
            let mut s = Sequence::new(format!("s{i}"), tokens);
            s.loss_mask = (0..26).map(|j| j >= 6).collect();
            s.advantage = Some(if i % 2 == 0 { 1.0 } else { -1.0 });
            s
        })
        .collect()
}

/// Mean over tokens of the variance across `draws` independent estimates.
fn mean_token_variance(draws: &[Vec<f32>], wanted: &[bool]) -> f64 {
    let r = draws.len() as f64;
    let mut total = 0.0;
    let mut n = 0;
    for t in (0..wanted.len()).filter(|&t| wanted[t]) {
        let m = draws.iter().map(|d| d[t] as f64).sum::<f64>() / r;
        total += draws.iter().map(|d| (d[t] as f64 - m).powi(2)).sum::<f64>() / (r - 1.0);
        n += 1;
    }
    total / n as f64
}

#[test]
fn averaging_passes_reduces_logprob_variance() {
    let model = moe();
    let tree = TrajectoryTree::from_sequences(&sequences(1)).unwrap();
    let flat = tree.flatten();
    let batch = RlBatch::from_flat(&flat, tree.num_paths()).unwrap();
    let wanted = batch.wanted();
    let draws = |passes: usize| -> Vec<Vec<f32>> {
        (0..16u64)
            .map(|r| {
                let m = Mcla::new(passes, NOISE, 1_000 * (r + 1));
                let out = mcla_logprobs(&model, &batch.tree, Some(&wanted), None, &m, 1.0).unwrap();
                assert_eq!(out.passes, passes);
                out.mean_values
            })
            .collect()
    };
    let v1 = mean_token_variance(&draws(1), &wanted);
    let vk = mean_token_variance(&draws(K), &wanted);
    eprintln!(
        "logp estimator variance: K=1 {v1:.3e}, K={K} {vk:.3e}, ratio {:.2}",
        v1 / vk
    );
    assert!(
        v1 > 1e-6,
        "routing noise should make the estimate random ({v1})"
    );
    assert!(
        vk < v1 / 4.0,
        "K={K} should cut the variance about {K}x: {v1} -> {vk}"
    );

    // Without noise (or on a dense model) MCLA runs a single pass: every pass would be equal.
    let off = Mcla::new(K, 0.0, 3);
    assert_eq!(off.effective_passes(&model), 1);
    let dense = Qwen3Model::new(Qwen3Config::tiny(VOCAB, 32, 2, 4, 2), 5).unwrap();
    assert_eq!(Mcla::new(K, NOISE, 3).effective_passes(&dense), 1);
    let a = mcla_logprobs(&model, &batch.tree, Some(&wanted), None, &off, 1.0).unwrap();
    let b = model
        .token_logprobs_where(&batch.tree, &ForwardOptions::default(), Some(&wanted))
        .unwrap()
        .0
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.mean_values, b);
}

/// The rollout engine samples its own routing: behaviour logprobs are one noisy pass per
/// sequence. `rl_loss` reports the variance of `w = exp(logp_rollout - logp_train)` with one
/// training pass and with the MCLA mean; averaged over trials, MCLA's is clearly smaller
/// (theory for equal noise: (1 + 1/K) / 2 of the single-pass value).
#[test]
fn mcla_reduces_importance_weight_variance_in_rl_loss() {
    let model = moe();
    let (mut single, mut mcla) = (0.0, 0.0);
    for trial in 0..6u64 {
        let mut seqs = sequences(10 + trial);
        for (i, s) in seqs.iter_mut().enumerate() {
            let opts = ForwardOptions {
                train: true,
                router_noise: NOISE,
                noise_seed: 77_000 + 100 * trial + i as u64,
                aux_token_weights: None,
                temperature: 1.0,
            };
            let b = TreeBatch::forest(&[&s.tokens]);
            s.logprobs = model
                .token_logprobs(&b, &opts)
                .unwrap()
                .0
                .to_vec1()
                .unwrap();
        }
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        let batch = RlBatch::from_flat(&tree.flatten(), tree.num_paths()).unwrap();
        let cfg = RlConfig {
            mcla: Mcla::new(K, NOISE, 5_000 + 100 * trial),
            ..RlConfig::default()
        };
        let out = rl_loss(&model, &batch, &cfg).unwrap();
        assert_eq!(out.stats.mcla_passes, K);
        assert_eq!(out.stats.iw_single.tokens, 4 * 20);
        single += out.stats.iw_single.variance();
        mcla += out.stats.iw_mcla.variance();
        if trial == 0 {
            // The gradient flows through all K passes.
            let grads = out.with_aux(0.01).unwrap().backward().unwrap();
            let (_, router) = model
                .named_vars()
                .iter()
                .find(|(n, _)| n.ends_with("mlp.gate.weight"))
                .unwrap();
            assert!(grads.get(router).is_some());
        }
    }
    eprintln!(
        "importance-weight variance: K=1 {single:.3e}, K={K} {mcla:.3e}, ratio {:.2}",
        mcla / single
    );
    assert!(
        mcla < 0.8 * single,
        "MCLA should reduce the variance: {single} -> {mcla}"
    );
}
