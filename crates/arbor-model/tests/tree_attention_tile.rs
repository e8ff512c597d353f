//! The alternative register-tile kernels (`ARBOR_TREE_ATTENTION=tile`) against the dense reference.
//! Separate test binary: the kernel choice is read once per process.

mod common;

use std::sync::Arc;

use arbor_model::ops::{TreeMask, tree_attention, tree_attention_reference};
use common::{rand_var, random_parent, rel_err};
use rand::{SeedableRng, rngs::StdRng};

#[test]
fn tile_kernels_match_dense_reference() {
    // SAFETY: the only test of this binary sets the variable before any kernel runs and before
    // this process reads the environment from another thread.
    unsafe { std::env::set_var("ARBOR_TREE_ATTENTION", "tile") };
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
        let a = tree_attention(&q, &k, &v, &mask, 0.25).unwrap();
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
