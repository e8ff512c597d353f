//! The tree-attention op against the dense-mask reference: forward and gradients.

mod common;

use std::sync::Arc;

use arbor_model::ops::{TreeMask, tree_attention, tree_attention_reference};
use candle::{Device, Tensor};
use common::{rand_var, random_parent, rel_err};
use rand::{SeedableRng, rngs::StdRng};

fn check(t: usize, hq: usize, hkv: usize, d: usize, branch_p: f64, seed: u64) {
    let mask = Arc::new(TreeMask::from_parent(random_parent(t, branch_p, seed)).unwrap());
    let mut rng = StdRng::seed_from_u64(seed + 1);
    // Large-ish scores so the softmax is far from uniform and the online rescaling matters.
    let q = rand_var(&[hq, t, d], 2.0, &mut rng);
    let k = rand_var(&[hkv, t, d], 2.0, &mut rng);
    let v = rand_var(&[hkv, t, d], 1.0, &mut rng);
    let r = rand_var(&[hq, t, d], 1.0, &mut rng);
    let scale = 1.0 / (d as f32).sqrt();

    let out = tree_attention(&q, &k, &v, &mask, scale).unwrap();
    let reference = tree_attention_reference(&q, &k, &v, &mask, scale).unwrap();
    let e = rel_err(&out, &reference);
    assert!(e <= 1e-4, "forward rel err {e} (t={t}, seed={seed})");

    let g1 = (out * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (reference * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let a = g1.get(x).unwrap();
        let b = g2.get(x).unwrap();
        let bmax = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if bmax < 1e-6 {
            // e.g. dQ of a lone token: mathematically zero, so compare absolutely.
            let amax = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(amax < 1e-5, "grad {name} should vanish, max {amax} (t={t})");
            continue;
        }
        let e = rel_err(a, b);
        assert!(e <= 1e-4, "grad {name} rel err {e} (t={t}, seed={seed})");
    }
}

#[test]
fn matches_dense_reference_on_random_trees() {
    for (i, &(t, bp)) in [
        (1, 0.0),
        (7, 0.3),
        (64, 0.05),
        (150, 0.1),
        (300, 0.02),
        (257, 0.5),
    ]
    .iter()
    .enumerate()
    {
        check(t, 4, 2, 16, bp, i as u64);
    }
}

#[test]
fn matches_dense_reference_mha_and_mqa() {
    check(120, 2, 2, 8, 0.1, 11);
    check(120, 4, 1, 32, 0.1, 12);
}

#[test]
fn causal_chain_equals_causal_attention() {
    // A single chain must be ordinary causal attention (positions matter only through RoPE).
    let mask = Arc::new(TreeMask::causal(70));
    let mut rng = StdRng::seed_from_u64(5);
    let q = rand_var(&[2, 70, 8], 1.0, &mut rng);
    let k = rand_var(&[2, 70, 8], 1.0, &mut rng);
    let v = rand_var(&[2, 70, 8], 1.0, &mut rng);
    let out = tree_attention(&q, &k, &v, &mask, 0.3).unwrap();
    let causal: Vec<i32> = (0..70).map(|i| i - 1).collect();
    let mask2 = TreeMask::from_parent(causal).unwrap();
    assert_eq!(&*mask, &mask2);
    let reference = tree_attention_reference(&q, &k, &v, &mask2, 0.3).unwrap();
    assert!(rel_err(&out, &reference) <= 1e-5);
    assert_eq!(mask.visible_pairs(), 70 * 71 / 2);
}

#[test]
fn rejects_inconsistent_trees() {
    // Parent pointers that contradict the intervals (a causal mask over a branching tree).
    assert!(TreeMask::new(vec![-1, 0, 0], vec![3, 3, 3]).is_err());
    assert!(TreeMask::new(vec![-1, 0, 0], vec![3, 2, 3]).is_ok());
    assert!(TreeMask::new(vec![-1, 1], vec![2, 2]).is_err());
    assert!(TreeMask::from_parent(vec![-1, 0, 2]).is_err());
    let _ = Tensor::zeros(1, candle::DType::F32, &Device::Cpu);
}
