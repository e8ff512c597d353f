//! A 32k-token sparse tree: tree attention forward + backward runs without `T x T` memory.
//! A counting global allocator bounds the peak bytes allocated during the op (this test binary
//! holds only this test, so nothing else allocates concurrently).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arbor_model::ops::{TreeMask, tree_attention};
use candle::{Device, Tensor, Var};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` above with the same layout (the caller's contract).
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A binary tree of 16-token segments under a 64-token prompt, DFS-flattened: 2^10 leaves,
/// 32 800 tokens, each token seeing at most 64 + 10 * 16 ancestors.
fn binary_tree_parent() -> Vec<i32> {
    fn rec(parent: &mut Vec<i32>, attach: i32, depth: usize) {
        let mut p = attach;
        for _ in 0..16 {
            parent.push(p);
            p = parent.len() as i32 - 1;
        }
        if depth > 0 {
            rec(parent, p, depth - 1);
            rec(parent, p, depth - 1);
        }
    }
    let mut parent = Vec::new();
    let mut p = -1;
    for _ in 0..64 {
        parent.push(p);
        p = parent.len() as i32 - 1;
    }
    rec(&mut parent, p, 9);
    rec(&mut parent, p, 9);
    parent
}

#[test]
fn sparse_32k_tree_fwd_bwd_without_quadratic_memory() {
    let parent = binary_tree_parent();
    let t = parent.len();
    assert!(t >= 32_000);
    let mask = Arc::new(TreeMask::from_parent(parent).unwrap());
    let (hq, hkv, d) = (2, 1, 16);
    let mk = |h: usize, seed: f32| {
        let v: Vec<f32> = (0..h * t * d)
            .map(|i| ((i as f32 * 0.618 + seed).sin()) * 0.5)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, (h, t, d), &Device::Cpu).unwrap()).unwrap()
    };
    let (q, k, v) = (mk(hq, 0.1), mk(hkv, 0.2), mk(hkv, 0.3));
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = tree_attention(&q, &k, &v, &mask, 0.25).unwrap();
    let loss = out.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let dq = grads
        .get(&q)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(dq.is_finite() && dq > 0.0);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let dense = t * t * 4; // one f32 T x T matrix for a single head
    let tensor = hq * t * d * 4;
    eprintln!(
        "T = {t}, visible pairs {} ({:.3}% of T^2), peak extra {:.1} MB, one T x T f32 matrix {:.0} MB",
        mask.visible_pairs(),
        100.0 * mask.visible_pairs() as f64 / (t as f64 * t as f64),
        peak as f64 / 1e6,
        dense as f64 / 1e6
    );
    // Linear in T: a few dozen [H, T, D]-sized buffers at most, almost two orders of magnitude
    // below a single dense score matrix for one head.
    assert!(peak < 40 * tensor, "peak {peak} bytes");
    assert!(peak * 50 < dense, "peak {peak} vs dense {dense}");
}
