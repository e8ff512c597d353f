//! Tree Training exactness: the loss and every parameter gradient computed on one flattened tree
//! equal those of training every root-to-leaf path separately (fp32, rel. error <= 1e-4), for SFT
//! token-mean, SFT sequence-mean and a clipped policy-gradient loss with a different advantage per
//! leaf; dense and MoE models (MoE: deterministic routing, load-balancing loss weighted by g_t).

mod common;

use arbor_model::train::{PgPath, clipped_pg_loss, weighted_nll};
use arbor_model::{AuxStats, ForwardOptions, Qwen3Config, Qwen3Model, TreeBatch};
use arbor_tree::{FlatTree, LossNormalization, PackOptions, Sequence, TrajectoryTree, pack_tree};
use candle::{Tensor, backprop::GradStore};
use common::rel_err;
use rand::{Rng, SeedableRng, rngs::StdRng};

const TOL: f32 = 1e-4;
const VOCAB: usize = 48;

/// `k` sequences forming a random tree: each new sequence copies a prefix of an earlier one (cut
/// anywhere, so branch points fall at many depths) and appends a random tail; prompt tokens are
/// not trained, some tail tokens are masked (tool output), behaviour logprobs and advantages are
/// random. `forest` also starts a second root.
fn random_sequences(
    k: usize,
    prompt: usize,
    tail: (usize, usize),
    forest: bool,
    seed: u64,
) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(seed);
    let tok = |rng: &mut StdRng| rng.gen_range(0..VOCAB as u32);
    let mut seqs: Vec<Sequence> = Vec::new();
    for i in 0..k {
        let (mut tokens, mut mask) = if i == 0 || (forest && i == k / 2) {
            let p: Vec<u32> = (0..prompt).map(|_| tok(&mut rng)).collect();
            (p, vec![false; prompt])
        } else {
            let j = rng.gen_range(0..seqs.len());
            let cut = rng.gen_range(1..=seqs[j].tokens.len());
            (
                seqs[j].tokens[..cut].to_vec(),
                seqs[j].loss_mask[..cut].to_vec(),
            )
        };
        let n = rng.gen_range(tail.0..=tail.1);
        for _ in 0..n {
            tokens.push(tok(&mut rng));
            mask.push(rng.gen_bool(0.8));
        }
        let len = tokens.len();
        let mut s = Sequence::new(format!("s{i}"), tokens);
        s.loss_mask = mask;
        s.logprobs = (0..len).map(|_| -rng.gen_range(0.0f32..3.0)).collect();
        s.advantage = Some(rng.gen_range(-1.0..1.0));
        seqs.push(s);
    }
    seqs
}

fn tree_batch(flat: &FlatTree) -> TreeBatch {
    TreeBatch::new(
        flat.input_ids.clone(),
        flat.position_ids.clone(),
        flat.parent.clone(),
        flat.subtree_end.clone(),
    )
    .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    TokenMean,
    SequenceMean,
    ClippedPg,
}

/// Old logprobs near the current policy (so the PG ratio is sometimes clipped, both sides).
fn pg_old_logprobs(model: &Qwen3Model, flat: &FlatTree, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_leaf: Vec<usize> = (0..flat.paths.len()).collect();
    by_leaf.sort_by_key(|&k| flat.paths[k].leaf);
    by_leaf
        .into_iter()
        .map(|k| {
            let seq = flat.path_sequence(k);
            let b = TreeBatch::forest(&[&seq.tokens]);
            let (lp, _) = model
                .token_logprobs(&b, &ForwardOptions::default())
                .unwrap();
            lp.to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|x| x + rng.gen_range(-0.4..0.4))
                .collect()
        })
        .collect()
}

fn aux_term(model: &Qwen3Model, aux: &AuxStats) -> Option<Tensor> {
    aux.loss()
        .unwrap()
        .map(|a| (a * model.config().router_aux_loss_coef).unwrap())
}

/// Loss on the flattened tree.
fn tree_loss(model: &Qwen3Model, flat: &FlatTree, loss: Loss, old: &[Vec<f32>]) -> Tensor {
    let batch = tree_batch(flat);
    let opts = ForwardOptions {
        aux_token_weights: Some(flat.leaf_count.iter().map(|&g| g as f32).collect()),
        ..ForwardOptions::default()
    };
    let (lp, aux) = model.token_logprobs(&batch, &opts).unwrap();
    let main = match loss {
        Loss::TokenMean | Loss::SequenceMean => {
            let norm = if matches!(loss, Loss::TokenMean) {
                LossNormalization::TokenMean
            } else {
                LossNormalization::SequenceMean
            };
            let w: Vec<f32> = flat
                .loss_weights(norm)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            weighted_nll(&lp, &w).unwrap()
        }
        Loss::ClippedPg => {
            let paths: Vec<PgPath> = (0..flat.paths.len())
                .map(|k| PgPath {
                    indices: flat.paths[k].indices(),
                    loss_mask: flat.path_loss_mask(k),
                    old_logprobs: old[flat.paths[k].leaf as usize].clone(),
                    advantage: flat.paths[k].advantage.unwrap_or(0.0) as f32,
                })
                .collect();
            clipped_pg_loss(&lp, &paths, 0.2).unwrap()
        }
    };
    match aux_term(model, &aux) {
        Some(a) => (main + a).unwrap(),
        None => main,
    }
}

/// The same loss with every path run through the model on its own.
fn linear_loss(model: &Qwen3Model, flat: &FlatTree, loss: Loss, old: &[Vec<f32>]) -> Tensor {
    let norm = flat.normalizer();
    let mut total: Option<Tensor> = None;
    let mut aux = AuxStats::default();
    for k in 0..flat.paths.len() {
        let seq = flat.path_sequence(k);
        let batch = TreeBatch::forest(&[&seq.tokens]);
        let (lp, a) = model
            .token_logprobs(&batch, &ForwardOptions::default())
            .unwrap();
        aux.merge(a).unwrap();
        let term = match loss {
            Loss::TokenMean | Loss::SequenceMean => {
                let n = if matches!(loss, Loss::TokenMean) {
                    LossNormalization::TokenMean
                } else {
                    LossNormalization::SequenceMean
                };
                let c = flat.path_coefficients(n, &norm)[k] as f32;
                let w: Vec<f32> = seq
                    .loss_mask
                    .iter()
                    .map(|&m| if m { c } else { 0.0 })
                    .collect();
                weighted_nll(&lp, &w).unwrap()
            }
            Loss::ClippedPg => {
                // The PG loss is a mean over paths: evaluate each path alone, scaled by 1/K.
                let p = PgPath {
                    indices: (0..seq.tokens.len() as u32).collect(),
                    loss_mask: seq.loss_mask.clone(),
                    old_logprobs: old[flat.paths[k].leaf as usize].clone(),
                    advantage: seq.advantage.unwrap_or(0.0) as f32,
                };
                let l = clipped_pg_loss(&lp, &[p], 0.2).unwrap();
                (l / flat.paths.len() as f64).unwrap()
            }
        };
        total = Some(match total {
            None => term,
            Some(t) => (t + term).unwrap(),
        });
    }
    let total = total.unwrap();
    match aux_term(model, &aux) {
        Some(a) => (total + a).unwrap(),
        None => total,
    }
}

fn compare(model: &Qwen3Model, seqs: &[Sequence], loss: Loss, what: &str) {
    compare_with(model, seqs, loss, what, None)
}

/// Loss over the packs of a packing under `budget` tokens: each pack is a flattened sub-forest
/// whose weights use the global normalizer, so pack losses (and MoE statistics) add up.
fn packed_loss(
    model: &Qwen3Model,
    tree: &TrajectoryTree,
    loss: Loss,
    old: &[Vec<f32>],
    budget: usize,
) -> Tensor {
    let norm = match loss {
        Loss::SequenceMean => LossNormalization::SequenceMean,
        _ => LossNormalization::TokenMean,
    };
    let opts = PackOptions {
        normalization: norm,
        ..PackOptions::new(budget)
    };
    let (_, packs) = pack_tree(tree, &opts).unwrap();
    assert!(packs.len() >= 2, "budget {budget} should split the tree");
    let k_total = tree.num_paths() as f64;
    let mut total: Option<Tensor> = None;
    let mut aux = AuxStats::default();
    for pack in &packs {
        let flat = &pack.flat;
        let batch = tree_batch(flat);
        let fo = ForwardOptions {
            aux_token_weights: Some(flat.leaf_count.iter().map(|&g| g as f32).collect()),
            ..ForwardOptions::default()
        };
        let (lp, a) = model.token_logprobs(&batch, &fo).unwrap();
        aux.merge(a).unwrap();
        let term = match loss {
            Loss::TokenMean | Loss::SequenceMean => weighted_nll(&lp, &pack.loss_weight).unwrap(),
            Loss::ClippedPg => {
                let paths: Vec<PgPath> = (0..flat.paths.len())
                    .map(|k| PgPath {
                        indices: flat.paths[k].indices(),
                        loss_mask: flat.path_loss_mask(k),
                        old_logprobs: old[flat.paths[k].leaf as usize].clone(),
                        advantage: flat.paths[k].advantage.unwrap_or(0.0) as f32,
                    })
                    .collect();
                // clipped_pg_loss averages over the pack's paths; rescale to the global K.
                let l = clipped_pg_loss(&lp, &paths, 0.2).unwrap();
                (l * (flat.paths.len() as f64 / k_total)).unwrap()
            }
        };
        total = Some(match total {
            None => term,
            Some(t) => (t + term).unwrap(),
        });
    }
    let total = total.unwrap();
    match aux_term(model, &aux) {
        Some(a) => (total + a).unwrap(),
        None => total,
    }
}

fn compare_with(
    model: &Qwen3Model,
    seqs: &[Sequence],
    loss: Loss,
    what: &str,
    budget: Option<usize>,
) {
    let tree = TrajectoryTree::from_sequences(seqs).unwrap();
    let flat = tree.flatten();
    assert!(
        flat.len() < flat.flat_tokens() as usize,
        "{what}: the tree should share tokens"
    );
    let old = pg_old_logprobs(model, &flat, 99);
    let lt = match budget {
        None => tree_loss(model, &flat, loss, &old),
        Some(b) => packed_loss(model, &tree, loss, &old, b),
    };
    let ll = linear_loss(model, &flat, loss, &old);
    let (vt, vl) = (
        lt.to_scalar::<f32>().unwrap(),
        ll.to_scalar::<f32>().unwrap(),
    );
    let e = (vt - vl).abs() / vl.abs().max(1e-12);
    assert!(
        e <= TOL,
        "{what} {loss:?}: loss tree {vt} vs linear {vl} (rel {e})"
    );
    let gt: GradStore = lt.backward().unwrap();
    let gl: GradStore = ll.backward().unwrap();
    let mut worst = (0f32, String::new());
    for (name, var) in model.named_vars() {
        let (a, b) = (gt.get(var), gl.get(var));
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel_err(a, b);
                if e > worst.0 {
                    worst = (e, name.clone());
                }
                assert!(e <= TOL, "{what} {loss:?}: grad of {name} rel err {e}");
            }
            (None, None) => {}
            _ => panic!("{what} {loss:?}: {name} has a gradient in only one mode"),
        }
    }
    eprintln!(
        "{what} {loss:?}: T={} flat={} loss rel {e:.2e}, worst grad {} {:.2e}",
        flat.len(),
        flat.flat_tokens(),
        worst.1,
        worst.0
    );
}

fn shapes() -> Vec<(&'static str, Vec<Sequence>)> {
    vec![
        ("group-sampling", random_sequences(5, 12, (4, 10), false, 1)),
        ("deep-branching", random_sequences(8, 6, (2, 8), false, 2)),
        ("forest", random_sequences(6, 5, (3, 9), true, 3)),
    ]
}

fn dense() -> Qwen3Model {
    Qwen3Model::new(Qwen3Config::tiny(VOCAB, 32, 2, 4, 2), 7).unwrap()
}

fn moe() -> Qwen3Model {
    let mut cfg = Qwen3Config::tiny(VOCAB, 32, 2, 4, 2).with_moe(4, 2, 24);
    cfg.router_aux_loss_coef = 0.05;
    Qwen3Model::new(cfg, 8).unwrap()
}

#[test]
fn dense_sft_token_mean() {
    let m = dense();
    for (name, s) in shapes() {
        compare(&m, &s, Loss::TokenMean, name);
    }
}

#[test]
fn dense_sft_sequence_mean() {
    let m = dense();
    for (name, s) in shapes() {
        compare(&m, &s, Loss::SequenceMean, name);
    }
}

#[test]
fn dense_clipped_pg_per_leaf_advantage() {
    let m = dense();
    for (name, s) in shapes() {
        compare(&m, &s, Loss::ClippedPg, name);
    }
}

#[test]
fn moe_all_losses_with_aux() {
    let m = moe();
    for (name, s) in shapes() {
        for loss in [Loss::TokenMean, Loss::SequenceMean, Loss::ClippedPg] {
            compare(&m, &s, loss, name);
        }
    }
}

#[test]
fn split_across_packs_dense_and_moe() {
    let (d, m) = (dense(), moe());
    for (name, s) in shapes() {
        let longest = s.iter().map(|x| x.tokens.len()).max().unwrap();
        let unique = TrajectoryTree::from_sequences(&s).unwrap().flatten().len();
        let budget = longest.max(unique / 2);
        for loss in [Loss::TokenMean, Loss::SequenceMean, Loss::ClippedPg] {
            compare_with(&d, &s, loss, &format!("{name} packed dense"), Some(budget));
            compare_with(&m, &s, loss, &format!("{name} packed moe"), Some(budget));
        }
    }
}

/// A real recorded session: an agent (the `bash` scaffold in a sandbox, through the gateway,
/// scripted-oracle policy, history truncation) whose calls branch where the history was
/// rewritten. Produced by `cargo run -p arbor-agent --example record_session`; token ids are
/// bytes, folded into the test vocabulary (the folding is applied to every path alike, so the
/// tree and the paths see the same sequences).
fn recorded_session() -> Vec<Sequence> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/recorded_session.jsonl");
    let mut seqs = arbor_tree::read_jsonl(&path).unwrap();
    assert!(seqs.len() >= 3, "fixture has {} calls", seqs.len());
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    assert!(tree.stats().nodes > 1, "the recorded session must branch");
    for (i, s) in seqs.iter_mut().enumerate() {
        for t in &mut s.tokens {
            *t %= VOCAB as u32;
        }
        s.advantage = Some([0.7, -0.4, 1.0, -0.9, 0.2][i % 5]);
    }
    seqs
}

#[test]
fn recorded_session_tree_dense_and_moe() {
    let seqs = recorded_session();
    let (d, m) = (dense(), moe());
    for loss in [Loss::TokenMean, Loss::SequenceMean, Loss::ClippedPg] {
        compare(&d, &seqs, loss, "recorded session dense");
        compare(&m, &seqs, loss, "recorded session moe");
    }
    compare_with(
        &d,
        &seqs,
        Loss::ClippedPg,
        "recorded session packed",
        Some(600),
    );
}
