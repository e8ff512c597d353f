//! The depth-first layout, the ancestor relation and the loss weights on hand-computed examples.

use arbor_tree::{LossNormalization, Sequence, TrajectoryTree};

fn example() -> TrajectoryTree {
    TrajectoryTree::from_sequences(&[
        Sequence::new("a", vec![1, 2, 3, 4, 5]),
        Sequence::new("b", vec![1, 2, 3, 6]),
        Sequence::new("c", vec![1, 2, 7]),
    ])
    .unwrap()
}

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-12, "{a:?} != {b:?}");
    }
}

#[test]
fn layout_arrays() {
    let f = example().flatten();
    assert_eq!(f.input_ids, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(f.position_ids, vec![0, 1, 2, 3, 4, 3, 2]);
    assert_eq!(f.parent, vec![-1, 0, 1, 2, 3, 2, 1]);
    assert_eq!(f.subtree_end, vec![7, 7, 6, 5, 5, 6, 7]);
    assert_eq!(f.leaf_count, vec![3, 3, 2, 1, 1, 1, 1]);
    assert_eq!(f.paths[0].ranges, vec![(0, 5)]);
    assert_eq!(f.paths[1].ranges, vec![(0, 3), (5, 6)]);
    assert_eq!(f.paths[2].ranges, vec![(0, 2), (6, 7)]);
    assert_eq!(f.ancestor_ranges(5), vec![(0, 3), (5, 6)]);
    assert_eq!(f.ancestor_ranges(6), vec![(0, 2), (6, 7)]);
    assert_eq!(f.ancestor_ranges(4), vec![(0, 5)]);
    assert_eq!(f.ancestor_ranges(0), vec![(0, 1)]);
    let g = f.path_gather();
    assert_eq!(g.offsets, vec![0, 5, 9, 12]);
    assert_eq!(g.indices, vec![0, 1, 2, 3, 4, 0, 1, 2, 5, 0, 1, 6]);
    assert_eq!(f.visible_pairs(), 1 + 2 + 3 + 4 + 5 + 4 + 3);
}

#[test]
fn mask_is_exactly_the_parent_chain() {
    let f = example().flatten();
    let t = f.len();
    let dense = f.dense_mask();
    let ranges = f.all_ancestor_ranges();
    for i in 0..t {
        let mut anc = vec![false; t];
        let mut j = i as i32;
        while j >= 0 {
            anc[j as usize] = true;
            j = f.parent[j as usize];
        }
        let mut from_ranges = vec![false; t];
        for &(a, b) in &ranges.ranges[ranges.offsets[i] as usize..ranges.offsets[i + 1] as usize] {
            for x in a..b {
                from_ranges[x as usize] = true;
            }
        }
        for j in 0..t {
            assert_eq!(dense[i * t + j], anc[j], "({i},{j})");
            assert_eq!(f.visible(i, j), anc[j]);
            assert_eq!(from_ranges[j], anc[j]);
        }
    }
    // A plain causal mask would leak the left sibling [4, 5] into [6]:
    assert!(!f.visible(5, 3));
}

#[test]
fn weights_hand_computed() {
    let f = example().flatten();
    let g = [3.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0];
    let w = f.loss_weights(LossNormalization::PathSum);
    close(&w, &g.map(|x| x / 3.0));
    let w = f.loss_weights(LossNormalization::TokenMean);
    close(&w, &g.map(|x| x / 12.0));
    let w = f.loss_weights(LossNormalization::SequenceMean);
    let (a, b, c) = (1.0 / 5.0, 1.0 / 4.0, 1.0 / 3.0);
    close(
        &w,
        &[
            (a + b + c) / 3.0,
            (a + b + c) / 3.0,
            (a + b) / 3.0,
            a / 3.0,
            a / 3.0,
            b / 3.0,
            c / 3.0,
        ],
    );
}

#[test]
fn per_path_masks_are_used() {
    // Token 2 is prompt for "a" and generated for "b": b's weight must count, a's must not.
    let mut a = Sequence::new("a", vec![1, 2, 3]);
    a.loss_mask = vec![false, false, true];
    let mut b = Sequence::new("b", vec![1, 2, 4]);
    b.loss_mask = vec![false, true, true];
    b.logprobs = vec![0.0, -0.3, -0.2];
    let tree = TrajectoryTree::from_sequences(&[a.clone(), b.clone()]).unwrap();
    let f = tree.flatten();
    assert_eq!(f.loss_mask, vec![false, true, true, true]);
    assert_eq!(f.path_loss_tokens(), vec![1, 2]);
    assert_eq!(f.path_loss_mask(0), a.loss_mask);
    assert_eq!(f.path_logprobs(0), vec![0.0, 0.0, 0.0]);
    assert_eq!(f.path_logprobs(1), b.logprobs);
    assert_eq!(f.path_sequence(0), a);
    assert_eq!(f.path_sequence(1), b);
    // Token mean: M = 3; token 1 is trained by b only.
    close(
        &f.loss_weights(LossNormalization::TokenMean),
        &[0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
    );
    // Sequence mean: a has 1 loss token, b has 2.
    close(
        &f.loss_weights(LossNormalization::SequenceMean),
        &[0.0, 0.25, 0.5, 0.25],
    );
}

#[test]
fn token_advantage_is_nan_when_ambiguous() {
    let mut a = Sequence::new("a", vec![1, 2, 3]);
    a.advantage = Some(1.0);
    let mut b = Sequence::new("b", vec![1, 2, 4]);
    b.advantage = Some(-1.0);
    let mut c = Sequence::new("c", vec![9, 9]);
    c.advantage = Some(0.5);
    let f = TrajectoryTree::from_sequences(&[a, b, c])
        .unwrap()
        .flatten();
    let adv = f.token_advantage();
    assert!(adv[0].is_nan() && adv[1].is_nan());
    assert_eq!(&adv[2..], &[1.0, -1.0, 0.5, 0.5]);
}

#[test]
fn flatten_subset_counts_only_selected_paths() {
    let t = example();
    let f = t.flatten_leaves(&[2, 0]).unwrap();
    assert_eq!(f.input_ids, vec![1, 2, 3, 4, 5, 7]);
    assert_eq!(f.leaf_count, vec![2, 2, 1, 1, 1, 1]);
    assert_eq!(f.paths[0].leaf, 2);
    assert_eq!(f.paths[0].ranges, vec![(0, 2), (5, 6)]);
    assert_eq!(f.subtree_end, vec![6, 6, 5, 5, 5, 6]);
    assert!(t.flatten_leaves(&[0, 0]).is_err());
    assert!(t.flatten_leaves(&[3]).is_err());
}

/// A clipped, per-leaf-advantage policy-gradient loss (PPO-style, token mean within each path, mean over
/// paths) computed on gathered tree log-probs equals, in value and gradient, the same loss on the
/// separate paths. Gradients are checked against central finite differences of the per-path loss.
#[test]
fn rl_gather_and_scatter_are_exact_for_clipped_losses() {
    let mut seqs = vec![
        Sequence::new("a", vec![1, 2, 3, 4, 5]),
        Sequence::new("b", vec![1, 2, 3, 6]),
        Sequence::new("c", vec![1, 2, 7, 8]),
    ];
    for (s, adv) in seqs.iter_mut().zip([1.0, -0.5, 2.0]) {
        s.loss_mask[0] = false;
        s.advantage = Some(adv);
        s.logprobs = (0..s.tokens.len()).map(|i| -0.3 - 0.1 * i as f32).collect();
    }
    let f = TrajectoryTree::from_sequences(&seqs).unwrap().flatten();
    let eps = 0.2;
    // Per-path loss given the per-position current log-probs of that path.
    let path_loss = |k: usize, logp: &[f64]| -> f64 {
        let s = &seqs[k];
        let a = s.advantage.unwrap();
        let n = s.loss_mask.iter().filter(|&&m| m).count() as f64;
        let mut l = 0.0;
        for (i, &lp) in logp.iter().enumerate() {
            if s.loss_mask[i] {
                let r = (lp - s.logprobs[i] as f64).exp();
                l -= (r * a).min(r.clamp(1.0 - eps, 1.0 + eps) * a);
            }
        }
        l / n / seqs.len() as f64
    };
    // Current log-probs per tree token (what one forward on the tree gives).
    let logp_tree: Vec<f64> = (0..f.len()).map(|t| -0.2 - 0.05 * t as f64).collect();
    let total = |lp: &[f64]| -> f64 {
        (0..f.paths.len())
            .map(|k| path_loss(k, &f.gather_path(lp, k)))
            .sum()
    };
    // Reference: each path alone, with its own copy of the log-probs.
    let mut per_path_grads = Vec::new();
    let h = 1e-6;
    for k in 0..f.paths.len() {
        let lp = f.gather_path(&logp_tree, k);
        let g: Vec<f64> = (0..lp.len())
            .map(|i| {
                let (mut up, mut down) = (lp.clone(), lp.clone());
                up[i] += h;
                down[i] -= h;
                (path_loss(k, &up) - path_loss(k, &down)) / (2.0 * h)
            })
            .collect();
        per_path_grads.push(g);
    }
    let scattered = f.scatter_add_paths(&per_path_grads);
    // Finite differences of the tree loss w.r.t. each tree token's log-prob.
    for t in 0..f.len() {
        let (mut up, mut down) = (logp_tree.clone(), logp_tree.clone());
        up[t] += h;
        down[t] -= h;
        let fd = (total(&up) - total(&down)) / (2.0 * h);
        assert!(
            (fd - scattered[t]).abs() < 1e-6,
            "token {t}: {fd} vs {}",
            scattered[t]
        );
    }
    // Clipping is active on some trained tokens (zero gradient) and not on others: the test covers both.
    let trained: Vec<f64> = (0..f.len())
        .filter(|&t| f.loss_mask[t])
        .map(|t| scattered[t])
        .collect();
    assert!(trained.iter().any(|g| g.abs() < 1e-9));
    assert!(trained.iter().any(|g| g.abs() > 1e-3));
}

#[test]
fn subsets_recompute_canonical_values_from_their_own_paths() {
    let mut a = Sequence::new("a", vec![1, 2, 3]);
    a.loss_mask = vec![false, true, true];
    a.logprobs = vec![0.0, -0.4, -0.5];
    let mut b = Sequence::new("b", vec![1, 2, 4]);
    b.loss_mask = vec![false, false, true];
    let tree = TrajectoryTree::from_sequences(&[a.clone(), b.clone()]).unwrap();
    // Over the whole tree token 2 is trained (by a), and b overrides it.
    let whole = tree.flatten();
    assert_eq!(whole.loss_mask, vec![false, true, true, true]);
    assert_eq!(whole.paths[1].overrides.len(), 1);
    // A pack holding only b: nobody trains token 2 there, and b needs no override.
    let only_b = tree.flatten_leaves(&[1]).unwrap();
    assert_eq!(only_b.loss_mask, vec![false, false, true]);
    assert_eq!(only_b.logprobs, vec![0.0, 0.0, 0.0]);
    assert!(only_b.paths[0].overrides.is_empty());
    assert_eq!(only_b.path_sequence(0), b);
    assert_eq!(
        only_b.loss_weights(LossNormalization::TokenMean),
        vec![0.0, 0.0, 1.0]
    );
}
