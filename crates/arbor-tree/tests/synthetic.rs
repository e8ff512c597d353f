//! Synthetic generators reach their target POR and are deterministic.

use arbor_tree::synthetic::{
    GroupSampling, MultiTurnBranching, group_sampling, multi_turn_branching,
};
use arbor_tree::{PackOptions, TrajectoryTree, plan_packing};

#[test]
fn group_sampling_reaches_target_por() {
    for target in [0.5, 0.75, 0.85] {
        let cfg = GroupSampling::for_por(target, 65_536, 16, 512, 7).unwrap();
        let seqs = group_sampling(&cfg);
        assert_eq!(seqs.len(), cfg.groups * 16);
        assert!(seqs.iter().all(|s| s.tokens.len() == 512));
        let stats = TrajectoryTree::from_sequences(&seqs).unwrap().stats();
        assert!((stats.por - target).abs() < 0.01, "{target}: {}", stats.por);
        assert!((stats.por - cfg.expected_por()).abs() < 1e-9);
        assert!((stats.flat_tokens as f64 - 65_536.0).abs() <= 8192.0);
        // Advantages are group-relative.
        let g0: f64 = seqs[..16].iter().map(|s| s.advantage.unwrap()).sum();
        assert!(g0.abs() < 1e-9);
    }
    assert!(GroupSampling::for_por(0.97, 65_536, 16, 512, 7).is_err());
}

#[test]
fn multi_turn_branching_reaches_target_por() {
    for target in [0.5, 0.75, 0.85] {
        let cfg = MultiTurnBranching::for_por(target, 32_768, 512, 11).unwrap();
        let seqs = multi_turn_branching(&cfg);
        assert_eq!(seqs.len(), cfg.trees * cfg.leaves_per_tree());
        let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
        let stats = tree.stats();
        assert!(
            (stats.por - target).abs() < 0.02,
            "{target}: {} ({cfg:?})",
            stats.por
        );
        assert!((stats.por - cfg.expected_por()).abs() < 1e-9);
        assert!(stats.flat_tokens >= 32_768);
        assert!(stats.max_path_len <= 512);
        // Branching happens at every turn: a tree has sum_i b^i + 1 nodes.
        let b = cfg.branching as u64;
        let per_tree: u64 = 1 + (1..=cfg.turns as u32).map(|i| b.pow(i)).sum::<u64>();
        assert_eq!(stats.nodes, per_tree * cfg.trees as u64);
        let packing = plan_packing(&tree, &PackOptions::new(4096)).unwrap();
        let ps = packing.stats(&tree);
        assert!(ps.err <= ps.por && ps.err > 0.0);
    }
}

#[test]
fn generators_are_deterministic() {
    let g = GroupSampling::for_por(0.75, 8192, 8, 256, 3).unwrap();
    assert_eq!(group_sampling(&g), group_sampling(&g));
    let other = GroupSampling { seed: 4, ..g };
    assert_ne!(group_sampling(&g), group_sampling(&other));
    let m = MultiTurnBranching::for_por(0.75, 16_384, 256, 3).unwrap();
    assert_eq!(multi_turn_branching(&m), multi_turn_branching(&m));
}

#[test]
fn larger_trees_pack_exactly() {
    use arbor_tree::{LossNormalization, PackStrategy, build_packs};
    let mut seqs = group_sampling(&GroupSampling::for_por(0.8, 40_000, 12, 300, 5).unwrap());
    let mut m = multi_turn_branching(&MultiTurnBranching::for_por(0.75, 40_000, 400, 6).unwrap());
    seqs.append(&mut m);
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    let whole_loss_tokens: u64 = tree.stats().flat_loss_tokens;
    for budget in [350, 1024, 4096, 20_000] {
        for strategy in [PackStrategy::Greedy, PackStrategy::SinglePathDp] {
            let mut opts = PackOptions::new(budget);
            opts.strategy = strategy;
            let packing = plan_packing(&tree, &opts).unwrap();
            let packs = build_packs(&tree, &packing, LossNormalization::TokenMean).unwrap();
            let mut seen = vec![0u8; seqs.len()];
            let mut weight = 0.0f64;
            for (pack, plan) in packs.iter().zip(&packing.packs) {
                assert!(plan.oversized || pack.flat.len() <= budget);
                assert_eq!(pack.flat.len() as u64, plan.tokens);
                assert_eq!(pack.normalizer.loss_tokens, whole_loss_tokens);
                for p in &pack.flat.paths {
                    seen[p.leaf as usize] += 1;
                }
                weight += pack
                    .flat
                    .loss_weights_with(LossNormalization::TokenMean, &pack.normalizer)
                    .iter()
                    .sum::<f64>();
            }
            assert!(seen.iter().all(|&c| c == 1), "{budget} {strategy:?}");
            assert!((weight - 1.0).abs() < 1e-9, "{weight}");
            let s = packing.stats(&tree);
            assert!(s.err <= s.por + 1e-12);
            if budget == 20_000 && strategy == PackStrategy::Greedy {
                // Every tree fits: packing loses no reuse at all.
                assert_eq!(s.packed_tokens, s.unique_tokens);
            }
        }
    }
}
