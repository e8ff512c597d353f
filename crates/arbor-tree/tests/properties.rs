//! Property tests: random trees, exact reproduction, exact loss weights, and packings that cover every
//! path exactly once within the budget and whose weights add back up to the unpacked weights.

use arbor_tree::{
    FlatTree, LossNormalization, OversizePolicy, PackOptions, PackStrategy, Sequence,
    TrajectoryTree, build_packs, plan_packing, single_path_dp,
};
use proptest::prelude::*;

/// Random sequences that share prefixes: each one extends a random prefix of an earlier one with random
/// tokens from a tiny vocabulary (so further accidental sharing happens too). Masks, logprobs, turns and
/// advantages are random, so shared tokens often disagree on them.
fn sequences() -> impl Strategy<Value = Vec<Sequence>> {
    prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            0.0f64..1.0,
            prop::collection::vec((0u32..4, any::<bool>(), 0u8..3), 1..12),
            prop::option::of(-2.0f64..2.0),
        ),
        1..14,
    )
    .prop_map(|specs| {
        let mut out: Vec<Sequence> = Vec::new();
        for (i, (base, frac, suffix, adv)) in specs.into_iter().enumerate() {
            let mut s = Sequence::new(format!("s{i}"), vec![]);
            if !out.is_empty() {
                let b = &out[base.index(out.len())];
                let keep = (b.tokens.len() as f64 * frac) as usize;
                s.tokens.extend_from_slice(&b.tokens[..keep]);
                for j in 0..keep {
                    // Same token, but sometimes a different mask (prompt here, generated there).
                    let flip = (i + j) % 5 == 0;
                    s.loss_mask.push(b.loss_mask[j] ^ flip);
                    s.logprobs.push(if flip {
                        -0.25 * i as f32
                    } else {
                        b.logprobs[j]
                    });
                    s.turns.push(b.turns[j]);
                }
            }
            for (tok, m, turn) in suffix {
                s.tokens.push(tok);
                s.loss_mask.push(m);
                s.logprobs
                    .push(if m { -(tok as f32) * 0.5 - 0.1 } else { 0.0 });
                s.turns.push(turn as u32);
            }
            s.advantage = adv;
            s.reward = adv.map(|a| a + 1.0);
            out.push(s);
        }
        out
    })
}

/// Per-path reference: the loss of every path computed separately from per-position losses `l`.
fn per_path_loss(
    paths: &[Sequence],
    l: &dyn Fn(usize, usize) -> f64,
    norm: LossNormalization,
) -> f64 {
    let k = paths.len() as f64;
    let m_total: usize = paths
        .iter()
        .map(|p| p.loss_mask.iter().filter(|&&m| m).count())
        .sum();
    let mut total = 0.0;
    for (pi, p) in paths.iter().enumerate() {
        let sum: f64 = (0..p.tokens.len())
            .filter(|&i| p.loss_mask[i])
            .map(|i| l(pi, i))
            .sum();
        let n = p.loss_mask.iter().filter(|&&m| m).count() as f64;
        total += match norm {
            LossNormalization::PathSum => sum / k,
            LossNormalization::TokenMean if m_total == 0 => 0.0,
            LossNormalization::TokenMean => sum / m_total as f64,
            LossNormalization::SequenceMean => {
                if n > 0.0 {
                    sum / n / k
                } else {
                    0.0
                }
            }
        };
    }
    total
}

const NORMS: [LossNormalization; 3] = [
    LossNormalization::PathSum,
    LossNormalization::TokenMean,
    LossNormalization::SequenceMean,
];

/// A per-token loss that depends only on the tree token (as the model's does under the tree mask).
fn token_loss(f: &FlatTree, t: usize) -> f64 {
    ((f.input_ids[t] as f64 + 1.0) * 0.37 + f.position_ids[t] as f64 * 0.11).sin() + 1.5
}

fn check_flat_paths(f: &FlatTree, seqs: &[Sequence]) {
    let g = f.path_gather();
    for (k, p) in f.paths.iter().enumerate() {
        let s = &seqs[p.leaf as usize];
        let idx = &g.indices[g.offsets[k] as usize..g.offsets[k + 1] as usize];
        let toks: Vec<u32> = idx.iter().map(|&i| f.input_ids[i as usize]).collect();
        assert_eq!(toks, s.tokens);
        let pos: Vec<u32> = idx.iter().map(|&i| f.position_ids[i as usize]).collect();
        assert_eq!(pos, (0..s.tokens.len() as u32).collect::<Vec<_>>());
        // The path is exactly the parent chain of its last token.
        let mut chain = Vec::new();
        let mut j = *idx.last().unwrap() as i32;
        while j >= 0 {
            chain.push(j as u32);
            j = f.parent[j as usize];
        }
        chain.reverse();
        assert_eq!(chain, idx);
        assert_eq!(&f.path_sequence(k), s);
    }
    // Canonical values are those of the flattening's own paths.
    let mut any_trained = vec![false; f.len()];
    let mut matches = vec![false; f.len()];
    for (k, p) in f.paths.iter().enumerate() {
        let s = &seqs[p.leaf as usize];
        for (q, &i) in g.indices[g.offsets[k] as usize..g.offsets[k + 1] as usize]
            .iter()
            .enumerate()
        {
            let i = i as usize;
            any_trained[i] |= s.loss_mask[q];
            matches[i] |= s.loss_mask[q] == f.loss_mask[i]
                && s.logprobs[q].to_bits() == f.logprobs[i].to_bits()
                && s.turns[q] == f.turns[i];
        }
    }
    assert_eq!(any_trained, f.loss_mask);
    assert!(matches.iter().all(|&m| m));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tree_reproduces_paths_and_json_round_trips(seqs in sequences()) {
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        prop_assert_eq!(&tree.paths(), &seqs);
        let json = serde_json::to_string(&tree).unwrap();
        let back: TrajectoryTree = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &tree);
        let stats = tree.stats();
        prop_assert_eq!(stats.flat_tokens, seqs.iter().map(|s| s.tokens.len() as u64).sum::<u64>());
        let loss_tokens: usize = seqs.iter().map(|s| s.loss_mask.iter().filter(|&&m| m).count()).sum();
        prop_assert_eq!(stats.flat_loss_tokens, loss_tokens as u64);
        // Compressed: a node with one child and no path ending there would have been merged.
        for n in tree.nodes() {
            let ends = tree.leaves().iter().filter(|l| l.node == n.id).count();
            prop_assert!(n.children.len() != 1 || ends > 0);
        }
    }

    #[test]
    fn layout_and_visibility_are_exact(seqs in sequences()) {
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        let f = tree.flatten();
        prop_assert_eq!(f.len() as u64, tree.unique_tokens());
        check_flat_paths(&f, &seqs);
        let t = f.len();
        let dense = f.dense_mask();
        let all = f.all_ancestor_ranges();
        for i in 0..t {
            let mut anc = vec![false; t];
            let mut j = i as i32;
            while j >= 0 { anc[j as usize] = true; j = f.parent[j as usize]; }
            let mut from_ranges = vec![false; t];
            let rs = f.ancestor_ranges(i);
            prop_assert_eq!(&rs[..], &all.ranges[all.offsets[i] as usize..all.offsets[i + 1] as usize]);
            for w in rs.windows(2) { prop_assert!(w[0].1 < w[1].0); }
            for &(a, b) in &rs { for x in a..b { from_ranges[x as usize] = true; } }
            for j in 0..t {
                prop_assert_eq!(dense[i * t + j], anc[j]);
                prop_assert_eq!(from_ranges[j], anc[j]);
            }
            prop_assert_eq!(f.leaf_count[i] as usize,
                f.paths.iter().filter(|p| p.ranges.iter().any(|&(a, b)| (a as usize..b as usize).contains(&i))).count());
        }
    }

    #[test]
    fn weighted_tree_loss_equals_per_path_loss(seqs in sequences()) {
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        let f = tree.flatten();
        let g = f.path_gather();
        let l_tree: Vec<f64> = (0..f.len()).map(|t| token_loss(&f, t)).collect();
        let l_path = |k: usize, i: usize| l_tree[g.indices[(g.offsets[k] + i as u32) as usize] as usize];
        for norm in NORMS {
            let w = f.loss_weights(norm);
            let tree_loss: f64 = w.iter().zip(&l_tree).map(|(w, l)| w * l).sum();
            let reference = per_path_loss(&seqs, &l_path, norm);
            prop_assert!((tree_loss - reference).abs() <= 1e-9 * (1.0 + reference.abs()),
                "{:?}: tree {} vs paths {}", norm, tree_loss, reference);
        }
        // Arbitrary per-path coefficients (e.g. an unclipped policy gradient with per-leaf advantages).
        let coeff: Vec<f64> = seqs.iter().map(|s| -s.advantage.unwrap_or(0.3)).collect();
        let w = f.weights_from_path_coefficients(&coeff);
        let tree_loss: f64 = w.iter().zip(&l_tree).map(|(w, l)| w * l).sum();
        let reference: f64 = seqs.iter().enumerate().map(|(k, s)| {
            coeff[k] * (0..s.tokens.len()).filter(|&i| s.loss_mask[i]).map(|i| l_path(k, i)).sum::<f64>()
        }).sum();
        prop_assert!((tree_loss - reference).abs() <= 1e-9 * (1.0 + reference.abs()));
    }

    #[test]
    fn packings_cover_every_path_once_within_budget(
        seqs in sequences(),
        budget in 1usize..40,
        dp in any::<bool>(),
    ) {
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        let mut opts = PackOptions::new(budget);
        opts.strategy = if dp { PackStrategy::SinglePathDp } else { PackStrategy::Greedy };
        let packing = plan_packing(&tree, &opts).unwrap();
        let mut count = vec![0u32; seqs.len()];
        for p in &packing.packs {
            for &k in &p.leaves { count[k as usize] += 1; }
            if p.oversized {
                prop_assert_eq!(p.leaves.len(), 1);
                prop_assert!(seqs[p.leaves[0] as usize].tokens.len() > budget);
            } else {
                prop_assert!(p.tokens as usize <= budget);
            }
        }
        prop_assert!(count.iter().all(|&c| c == 1), "coverage {:?}", count);
        let stats = packing.stats(&tree);
        prop_assert!(stats.err <= stats.por + 1e-12);
        prop_assert!(stats.packed_tokens >= stats.unique_tokens);

        // Error policy refuses exactly when some path is longer than the budget.
        opts.oversize = OversizePolicy::Error;
        let too_long = seqs.iter().any(|s| s.tokens.len() > budget);
        prop_assert_eq!(plan_packing(&tree, &opts).is_err(), too_long);

        // Weights summed over packs equal the unpacked weights, token by token.
        let whole = tree.flatten();
        let mut gstart = vec![0u32; tree.nodes().len()];
        for s in &whole.segments { gstart[s.node as usize] = s.start; }
        for norm in NORMS {
            let packs = build_packs(&tree, &packing, norm).unwrap();
            let unpacked = whole.loss_weights(norm);
            let mut g_sum = vec![0u32; whole.len()];
            let mut summed = vec![0f64; whole.len()];
            let mut packed_loss = 0.0;
            for (pack, plan) in packs.iter().zip(&packing.packs) {
                prop_assert_eq!(pack.flat.len() as u64, plan.tokens);
                check_flat_paths(&pack.flat, &seqs);
                let w = pack.flat.loss_weights_with(norm, &pack.normalizer);
                for s in &pack.flat.segments {
                    for t in s.start..s.end {
                        let gt = (gstart[s.node as usize] + t - s.start) as usize;
                        summed[gt] += w[t as usize];
                        g_sum[gt] += pack.flat.leaf_count[t as usize];
                        prop_assert_eq!(pack.flat.input_ids[t as usize], whole.input_ids[gt]);
                        packed_loss += w[t as usize] * token_loss(&whole, gt);
                        prop_assert!((pack.loss_weight[t as usize] as f64 - w[t as usize]).abs() <= 1e-6 * (1.0 + w[t as usize].abs()));
                    }
                }
            }
            // Per-pack leaf counts add back up to g_t.
            prop_assert_eq!(&g_sum, &whole.leaf_count);
            for (a, b) in summed.iter().zip(&unpacked) {
                prop_assert!((a - b).abs() <= 1e-12, "{:?}: {:?} vs {:?}", norm, summed, unpacked);
            }
            let l_tree: Vec<f64> = (0..whole.len()).map(|t| token_loss(&whole, t)).collect();
            let unpacked_loss: f64 = unpacked.iter().zip(&l_tree).map(|(w, l)| w * l).sum();
            prop_assert!((packed_loss - unpacked_loss).abs() <= 1e-9 * (1.0 + unpacked_loss.abs()));
        }
    }

    #[test]
    fn single_path_dp_is_optimal(seqs in sequences(), budget in 1usize..40) {
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        let nodes = tree.nodes();
        prop_assume!(nodes.len() <= 14);
        let dp = single_path_dp(&tree, budget);
        // Brute force over all node subsets: antichains of feasible nodes.
        let feasible = |u: usize| {
            let n = &nodes[u];
            let l = n.end_depth() as u64;
            let r: u64 = n.leaves.iter().map(|&k| tree.leaves()[k as usize].len as u64 - l).sum();
            l + r <= budget as u64
        };
        let is_anc = |a: usize, b: usize| a < b && b < nodes[a].subtree_end as usize;
        let mut best = 0u64;
        for mask in 0u32..(1 << nodes.len()) {
            let set: Vec<usize> = (0..nodes.len()).filter(|&i| mask >> i & 1 == 1).collect();
            if !set.iter().all(|&u| feasible(u)) { continue; }
            if set.iter().any(|&a| set.iter().any(|&b| is_anc(a, b))) { continue; }
            let v: u64 = set.iter().map(|&u| (nodes[u].leaves.len() as u64 - 1) * nodes[u].end_depth() as u64).sum();
            best = best.max(v);
        }
        prop_assert_eq!(dp.saved, best);
        // The chosen set realises the objective and covers each path at most once.
        let v: u64 = dp.chosen.iter().map(|&u| { let n = &nodes[u as usize]; (n.leaves.len() as u64 - 1) * n.end_depth() as u64 }).sum();
        prop_assert_eq!(v, dp.saved);
        let mut cover = vec![0; seqs.len()];
        for &u in &dp.chosen { prop_assert!(feasible(u as usize)); for &k in &nodes[u as usize].leaves { cover[k as usize] += 1; } }
        for &k in &dp.uncovered { cover[k as usize] += 1; }
        prop_assert!(cover.iter().all(|&c| c == 1));
    }
}

#[test]
fn first_fit_decreasing_packs_tightly() {
    let bins = arbor_tree::first_fit_decreasing(&[5, 4, 3, 3, 2, 2, 1, 12], 10);
    // 12 alone (over capacity), then 5+4+1, 3+3+2+2.
    let sizes = [5u64, 4, 3, 3, 2, 2, 1, 12];
    let mut totals: Vec<u64> = bins
        .iter()
        .map(|b| b.iter().map(|&i| sizes[i]).sum())
        .collect();
    totals.sort_unstable();
    assert_eq!(totals, vec![10, 10, 12]);
}

#[test]
fn greedy_splits_a_large_tree_and_keeps_prefix_sharing() {
    // 8 paths sharing a 10-token prompt, 5-token responses: the whole tree has 50 tokens.
    let seqs: Vec<Sequence> = (0..8u32)
        .map(|i| {
            let mut t: Vec<u32> = (100..110).collect();
            t.extend((0..5).map(|j| i * 10 + j));
            Sequence::new(format!("p{i}"), t)
        })
        .collect();
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    let packing = plan_packing(&tree, &PackOptions::new(30)).unwrap();
    // Each pack holds the prompt plus 4 responses (10 + 4 * 5 = 30).
    assert_eq!(packing.packs.len(), 2);
    assert!(
        packing
            .packs
            .iter()
            .all(|p| p.tokens == 30 && p.leaves.len() == 4)
    );
    let s = packing.stats(&tree);
    assert_eq!(s.packed_tokens, 60);
    assert!((s.err - (1.0 - 60.0 / 120.0)).abs() < 1e-12);
    // The DP picks the prompt node only when everything fits: with C = 30 it cannot, so it saves 0
    // under the single-shared-path model; with C = 50 it takes the root.
    assert_eq!(single_path_dp(&tree, 30).saved, 0);
    assert_eq!(single_path_dp(&tree, 50).saved, 7 * 10);
}
