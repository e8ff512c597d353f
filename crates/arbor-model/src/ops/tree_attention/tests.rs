//! The register-tile kernels against the dense reference, forward and gradients (the production
//! kernels are checked the same way in `tests/tree_attention.rs`).

use std::sync::Arc;

use candle::{Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::op::{Kernels, apply};
use super::{TreeMask, tree_attention_reference};

/// A random DFS-ordered forest of `t` tokens as parent pointers: each new token hangs under the
/// previous token or one of its ancestors (continue / branch), or starts a new root.
fn random_parent(t: usize, branch_p: f64, seed: u64) -> Vec<i32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut parent = Vec::with_capacity(t);
    let mut path: Vec<usize> = Vec::new();
    for i in 0..t {
        if i == 0 {
            parent.push(-1);
            path.push(0);
            continue;
        }
        let r: f64 = rng.r#gen();
        if r < branch_p && path.len() > 1 {
            let keep = rng.gen_range(1..path.len());
            path.truncate(keep);
        } else if r < branch_p + 0.01 {
            path.clear();
        }
        parent.push(path.last().map_or(-1, |&p| p as i32));
        path.push(i);
    }
    parent
}

/// A random tensor variable with entries in `[-a, a]`.
fn rand_var(shape: &[usize], a: f32, rng: &mut StdRng) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-a..a)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// `max |a - b| / max |b|` over all entries.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12);
    diff / scale
}

#[test]
fn tile_kernels_match_dense_reference() {
    for (seed, (t, bp)) in [(60usize, 0.1), (200, 0.03), (131, 0.4)]
        .into_iter()
        .enumerate()
    {
        let mask = Arc::new(TreeMask::from_parent(random_parent(t, bp, seed as u64)).unwrap());
        let mut rng = StdRng::seed_from_u64(seed as u64 + 7);
        let q = rand_var(&[4, t, 16], 2.0, &mut rng);
        let k = rand_var(&[2, t, 16], 2.0, &mut rng);
        let v = rand_var(&[2, t, 16], 1.0, &mut rng);
        let r = rand_var(&[4, t, 16], 1.0, &mut rng);
        let a = apply(&q, &k, &v, &mask, 0.25, Kernels::Tile).unwrap();
        let b = tree_attention_reference(&q, &k, &v, &mask, 0.25).unwrap();
        assert!(rel_err(&a, &b) <= 1e-4);
        let ga = (a * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (b * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for x in [&q, &k, &v] {
            let e = rel_err(ga.get(x).unwrap(), gb.get(x).unwrap());
            assert!(e <= 1e-4, "tile kernel grad rel err {e} (t={t})");
        }
    }
}
