//! The RL losses on a flattened tree, and on the packs of a packing, equal (value and every
//! parameter gradient, fp32, rel. error <= 1e-4) the same losses computed on every root-to-leaf
//! path run through the model on its own: turn-level GSPO with IcePop masking plus on-policy
//! distillation, multi-turn paths with per-path behaviour logprobs (shared tokens carry
//! different old logprobs in different paths, i.e. tree overrides), dense and MoE models
//! (deterministic routing; MoE load-balancing statistics weighted by `g_t`).
//!
//! The per-path side does not use `RlBatch` or `arbor-tree`'s per-path accessors: it builds
//! each path's inputs from the input `Sequence` directly.

use arbor_model::{AuxStats, ForwardOptions, Qwen3Config, Qwen3Model, TreeBatch};
use arbor_train::{
    ExpertDistribution, ExpertTarget, GspoConfig, GspoStats, IcePop, RlBatch, RlConfig, RlPath,
    rl_loss, rl_objective_with,
};
use arbor_tree::{PackOptions, Sequence, TrajectoryTree, pack_tree};
use candle::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

const TOL: f32 = 1e-4;
const VOCAB: usize = 48;
const DISTILL: f32 = 0.5;

/// How the distillation term is computed, and the sampling temperature of the log-probabilities.
#[derive(Clone, Copy)]
struct Mode {
    /// The exact reverse KL over the vocabulary instead of the sampled-token estimator.
    full_kl: bool,
    temperature: f32,
}

const SAMPLED: Mode = Mode {
    full_kl: false,
    temperature: 1.0,
};
const FULL_TEMPERED: Mode = Mode {
    full_kl: true,
    temperature: 0.7,
};

fn cfg(mode: Mode) -> RlConfig {
    RlConfig {
        clip_eps: 0.2,
        icepop: Some(IcePop::default()),
        distill_coef: DISTILL,
        temperature: mode.temperature,
        ..RlConfig::default()
    }
}

/// `k` sequences forming a random tree: each new sequence copies a prefix of an earlier one
/// (cut anywhere) and appends a tail of 1-3 turns; prompt tokens are not trained and some tail
/// tokens are masked (tool output). Old logprobs are set later from the model.
fn random_sequences(k: usize, prompt: usize, tail: (usize, usize), seed: u64) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seqs: Vec<Sequence> = Vec::new();
    for i in 0..k {
        let (mut tokens, mut mask, mut turns) = if i == 0 {
            let p: Vec<u32> = (0..prompt)
                .map(|_| rng.gen_range(0..VOCAB as u32))
                .collect();
            (p, vec![false; prompt], vec![0; prompt])
        } else {
            let j = rng.gen_range(0..seqs.len());
            let cut = rng.gen_range(1..=seqs[j].tokens.len());
            (
                seqs[j].tokens[..cut].to_vec(),
                seqs[j].loss_mask[..cut].to_vec(),
                seqs[j].turns[..cut].to_vec(),
            )
        };
        let mut turn = turns.last().copied().unwrap_or(0) + 1;
        let n = rng.gen_range(tail.0..=tail.1);
        for j in 0..n {
            if j > 0 && rng.gen_bool(0.25) {
                turn += 1;
            }
            tokens.push(rng.gen_range(0..VOCAB as u32));
            mask.push(rng.gen_bool(0.8));
            turns.push(turn);
        }
        let mut s = Sequence::new(format!("s{i}"), tokens);
        s.loss_mask = mask;
        s.turns = turns;
        s.advantage = Some(rng.gen_range(-1.0..1.0));
        seqs.push(s);
    }
    seqs
}

/// Behaviour logprobs: the model's own value on each path plus noise in [-0.9, 0.9], so IcePop
/// masks some tokens (|noise| > ln 2) and some turn ratios are clipped, on both sides. The
/// noise is drawn per path, so a shared token has a different old logprob in each path.
fn set_old_logprobs(model: &Qwen3Model, seqs: &mut [Sequence], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for s in seqs {
        let b = TreeBatch::forest(&[&s.tokens]);
        let (lp, _) = model
            .token_logprobs(&b, &ForwardOptions::default())
            .unwrap();
        s.logprobs = lp
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| x + rng.gen_range(-0.9..0.9))
            .collect();
    }
}

fn aux_term(model: &Qwen3Model, aux: &AuxStats) -> Option<Tensor> {
    aux.loss()
        .unwrap()
        .map(|a| (a * model.config().router_aux_loss_coef).unwrap())
}

fn add(total: Option<Tensor>, t: Tensor) -> Option<Tensor> {
    Some(match total {
        None => t,
        Some(x) => (x + t).unwrap(),
    })
}

/// Every path alone: its own forward, its own expert scores, weight 1/K.
fn per_path_loss(
    model: &Qwen3Model,
    expert: &Qwen3Model,
    seqs: &[Sequence],
    mode: Mode,
) -> (Tensor, GspoStats) {
    let k = seqs.len() as f32;
    let c = cfg(mode);
    let opts = ForwardOptions {
        temperature: mode.temperature,
        ..ForwardOptions::default()
    };
    let gcfg = GspoConfig {
        clip_eps: c.clip_eps,
        icepop: c.icepop,
        length_norm: c.length_norm,
    };
    let mut total = None;
    let mut aux = AuxStats::default();
    let mut stats = GspoStats::default();
    for s in seqs {
        let b = TreeBatch::forest(&[&s.tokens]);
        let (lp, a) = model.token_logprobs(&b, &opts).unwrap();
        aux.merge(a).unwrap();
        let (e, _) = expert.token_logprobs(&b, &opts).unwrap();
        let e = e.to_vec1::<f32>().unwrap();
        let rows: Vec<u32> = (0..s.tokens.len() as u32)
            .filter(|&i| s.loss_mask[i as usize])
            .collect();
        let student_rows = model.next_token_log_softmax(&b, &opts, &rows).unwrap().0;
        let expert_rows = ExpertDistribution {
            log_probs: expert
                .next_token_log_softmax(&b, &opts, &rows)
                .unwrap()
                .0
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            tokens: rows,
            vocab: VOCAB,
        };
        let target = if mode.full_kl {
            ExpertTarget::Distribution {
                student: &student_rows,
                expert: &expert_rows,
            }
        } else {
            ExpertTarget::Tokens(&e)
        };
        let path = RlPath {
            id: s.id.clone(),
            indices: (0..s.tokens.len() as u32).collect(),
            loss_mask: s.loss_mask.clone(),
            old_logprobs: s.logprobs.clone(),
            turns: s.turns.clone(),
            advantage: s.advantage.unwrap() as f32,
            weight: 1.0 / k,
        };
        let terms = rl_objective_with(&lp, &[path], &gcfg, Some(target), c.distill_coef).unwrap();
        stats.merge(&terms.gspo_stats);
        total = add(total, terms.total);
    }
    let mut total = total.unwrap();
    if let Some(a) = aux_term(model, &aux) {
        total = (total + a).unwrap();
    }
    (total, stats)
}

/// The whole tree in one batch (`budget = None`) or the packs of a packing under `budget`.
fn tree_loss(
    model: &Qwen3Model,
    expert: &Qwen3Model,
    tree: &TrajectoryTree,
    budget: Option<usize>,
    mode: Mode,
) -> (Tensor, GspoStats) {
    let batches: Vec<RlBatch> = match budget {
        None => vec![RlBatch::from_flat(&tree.flatten(), tree.num_paths()).unwrap()],
        Some(b) => {
            let (_, packs) = pack_tree(tree, &PackOptions::new(b)).unwrap();
            assert!(packs.len() >= 2, "budget {b} should split the tree");
            packs
                .iter()
                .map(|p| RlBatch::from_pack(p).unwrap())
                .collect()
        }
    };
    let mut total = None;
    let mut aux = AuxStats::default();
    let mut stats = GspoStats::default();
    for mut batch in batches {
        if mode.full_kl {
            batch
                .set_expert_distribution(expert, mode.temperature)
                .unwrap();
        } else {
            batch.set_expert(expert, mode.temperature).unwrap();
        }
        let out = rl_loss(model, &batch, &cfg(mode)).unwrap();
        assert!(out.stats.distill.tokens > 0);
        stats.merge(&out.stats.gspo);
        aux.merge(out.aux).unwrap();
        total = add(total, out.loss);
    }
    let mut total = total.unwrap();
    if let Some(a) = aux_term(model, &aux) {
        total = (total + a).unwrap();
    }
    (total, stats)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    diff / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12)
}

fn compare(
    model: &Qwen3Model,
    expert: &Qwen3Model,
    seqs: &[Sequence],
    what: &str,
    mode: Mode,
) -> GspoStats {
    let tree = TrajectoryTree::from_sequences(seqs).unwrap();
    let flat = tree.flatten();
    assert!(
        (flat.len() as u64) < flat.flat_tokens(),
        "{what}: the tree should share tokens"
    );
    assert!(
        flat.paths.iter().any(|p| !p.overrides.is_empty()),
        "{what}: shared tokens should carry per-path old logprobs"
    );
    let (lp, sp) = per_path_loss(model, expert, seqs, mode);
    let longest = seqs.iter().map(|s| s.tokens.len()).max().unwrap();
    for budget in [None, Some(longest.max(flat.len() / 2))] {
        let (lt, st) = tree_loss(model, expert, &tree, budget, mode);
        let label = format!(
            "{what} {}",
            if budget.is_some() { "packed" } else { "tree" }
        );
        let counts = |s: &GspoStats| {
            (
                s.loss_tokens,
                s.masked_tokens,
                s.turns,
                s.empty_turns,
                s.clipped_turns,
            )
        };
        assert_eq!(
            counts(&st),
            counts(&sp),
            "{label}: same masking and clipping decisions"
        );
        assert!((st.ratio_sum - sp.ratio_sum).abs() <= 1e-4 * sp.ratio_sum.abs());
        let (vt, vl) = (
            lt.to_scalar::<f32>().unwrap(),
            lp.to_scalar::<f32>().unwrap(),
        );
        let e = (vt - vl).abs() / vl.abs().max(1e-12);
        assert!(
            e <= TOL,
            "{label}: loss tree {vt} vs per path {vl} (rel {e})"
        );
        let gt = lt.backward().unwrap();
        let gl = lp.backward().unwrap();
        let mut worst = 0f32;
        for (name, var) in model.named_vars() {
            match (gt.get(var), gl.get(var)) {
                (Some(a), Some(b)) => {
                    let e = rel_err(a, b);
                    worst = worst.max(e);
                    assert!(e <= TOL, "{label}: grad of {name} rel err {e}");
                }
                (None, None) => {}
                _ => panic!("{label}: {name} has a gradient in only one mode"),
            }
        }
        eprintln!(
            "{label}: T={} flat={} loss {vt:.5} rel {e:.1e}, worst grad {worst:.1e}, masked {}/{} tokens, {}/{} turns clipped, {} empty",
            flat.len(),
            flat.flat_tokens(),
            st.masked_tokens,
            st.loss_tokens,
            st.clipped_turns,
            st.turns,
            st.empty_turns
        );
    }
    assert!(sp.masked_tokens > 0, "{what}: IcePop should mask something");
    sp
}

fn dense(seed: u64) -> Qwen3Model {
    Qwen3Model::new(Qwen3Config::tiny(VOCAB, 32, 2, 4, 2), seed).unwrap()
}

fn moe() -> Qwen3Model {
    let mut cfg = Qwen3Config::tiny(VOCAB, 32, 2, 4, 2).with_moe(4, 2, 24);
    cfg.router_aux_loss_coef = 0.05;
    Qwen3Model::new(cfg, 8).unwrap()
}

fn shapes(model: &Qwen3Model) -> Vec<(&'static str, Vec<Sequence>)> {
    let mut v = vec![
        ("group-sampling", random_sequences(5, 10, (6, 12), 1)),
        ("deep-branching", random_sequences(8, 6, (3, 9), 2)),
    ];
    for (i, (_, s)) in v.iter_mut().enumerate() {
        set_old_logprobs(model, s, 50 + i as u64);
    }
    v
}

#[test]
fn gspo_icepop_distill_dense_tree_and_packs_equal_per_path() {
    let (m, expert) = (dense(7), dense(11));
    for (name, s) in shapes(&m) {
        let st = compare(&m, &expert, &s, &format!("{name} dense"), SAMPLED);
        assert!(st.turns > s.len() as u64, "{name}: multi-turn paths");
        assert!(st.clipped_turns > 0, "{name}: some turn should be clipped");
    }
}

#[test]
fn gspo_icepop_distill_moe_tree_and_packs_equal_per_path() {
    let (m, expert) = (moe(), dense(11));
    for (name, s) in shapes(&m) {
        let st = compare(&m, &expert, &s, &format!("{name} moe"), SAMPLED);
        assert!(st.turns > s.len() as u64, "{name}: multi-turn paths");
        assert!(st.clipped_turns > 0, "{name}: some turn should be clipped");
    }
}

/// The exact-KL distillation term and a sampling temperature below 1 keep the tree exact: a
/// token's whole next-token distribution depends only on its prefix, like its log-probability.
#[test]
fn full_kl_distill_at_temperature_tree_and_packs_equal_per_path() {
    for (m, expert, kind) in [(dense(7), dense(11), "dense"), (moe(), dense(11), "moe")] {
        for (name, s) in shapes(&m) {
            let st = compare(
                &m,
                &expert,
                &s,
                &format!("{name} {kind} full-kl"),
                FULL_TEMPERED,
            );
            assert!(st.turns > s.len() as u64, "{name}: multi-turn paths");
        }
    }
}

/// The gateway layout: one path per recorded call (a single turn, the call index), later
/// calls' prompts containing earlier answers untrained. Uses arbor-model's recorded session
/// fixture (a bash-scaffold episode through the gateway, branching after history truncation).
#[test]
fn recorded_gateway_session_equals_per_path() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../arbor-model/tests/data/recorded_session.jsonl");
    let mut seqs = arbor_tree::read_jsonl(&path).unwrap();
    assert!(seqs.len() >= 3);
    for (i, s) in seqs.iter_mut().enumerate() {
        for t in &mut s.tokens {
            *t %= VOCAB as u32;
        }
        s.advantage = Some([0.7, -0.4, 1.0, -0.9, 0.2][i % 5]);
    }
    let (m, expert) = (moe(), dense(11));
    set_old_logprobs(&m, &mut seqs, 3);
    let st = compare(&m, &expert, &seqs, "recorded session moe", SAMPLED);
    assert_eq!(st.turns, seqs.len() as u64, "one turn per recorded call");
}

/// SFT through `sft_loss_on`: the token-mean NLL of the generated tokens on the tree equals
/// `-(1/M) sum_paths sum_{t generated} logp_t` computed path by path (value and gradient).
#[test]
fn sft_on_tree_equals_per_path_generated_tokens() {
    let m = moe();
    let seqs = random_sequences(6, 8, (4, 10), 4);
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    let flat = tree.flatten();
    let w = arbor_train::sft_weights(&flat, arbor_tree::LossNormalization::TokenMean);
    let (lt, aux_t) = arbor_train::sft_loss_on(&m, &flat, &w).unwrap();
    let lt = match aux_term(&m, &aux_t) {
        Some(a) => (lt + a).unwrap(),
        None => lt,
    };
    let loss_tokens: usize = seqs
        .iter()
        .map(|s| s.loss_mask.iter().filter(|&&x| x).count())
        .sum();
    let mut total = None;
    let mut aux = AuxStats::default();
    for s in &seqs {
        let b = TreeBatch::forest(&[&s.tokens]);
        let (lp, a) = m.token_logprobs(&b, &ForwardOptions::default()).unwrap();
        aux.merge(a).unwrap();
        let mask: Vec<f32> = s.loss_mask.iter().map(|&x| x as u8 as f32).collect();
        let mask = Tensor::new(mask.as_slice(), lp.device()).unwrap();
        let nll = (lp.mul(&mask).unwrap().sum_all().unwrap().neg().unwrap() / loss_tokens as f64)
            .unwrap();
        total = add(total, nll);
    }
    let mut ll = total.unwrap();
    if let Some(a) = aux_term(&m, &aux) {
        ll = (ll + a).unwrap();
    }
    let (vt, vl) = (
        lt.to_scalar::<f32>().unwrap(),
        ll.to_scalar::<f32>().unwrap(),
    );
    assert!((vt - vl).abs() <= TOL * vl.abs(), "sft {vt} vs {vl}");
    let (gt, gl) = (lt.backward().unwrap(), ll.backward().unwrap());
    for (name, var) in m.named_vars() {
        let e = rel_err(gt.get(var).unwrap(), gl.get(var).unwrap());
        assert!(e <= TOL, "sft grad of {name} rel err {e}");
    }
}
