//! The ancestor relation of a DFS-flattened forest ([`TreeMask`]): validated parent pointers and
//! subtree ends, plus the contiguous ancestor runs the kernels walk instead of a `T x T` mask.

use candle::{Result, Tensor};

use crate::ModelError;

/// The ancestor relation of a DFS-flattened forest, in the compact forms the op needs.
///
/// Built from `parent` (token-level parent index, `-1` for a root) and `subtree_end` (exclusive end
/// of each token's subtree in DFS order). Both are validated against each other, because a causal
/// or otherwise inconsistent mask would silently break the equivalence with per-path training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    parent: Vec<i32>,
    subtree_end: Vec<u32>,
    /// First token of the contiguous parent-chain run that ends at each token.
    run_start: Vec<u32>,
    /// Number of visible (query, key) pairs, self included.
    pairs: u64,
}

impl TreeMask {
    /// Validates and wraps a DFS-ordered parent / subtree-end description.
    pub fn new(parent: Vec<i32>, subtree_end: Vec<u32>) -> std::result::Result<Self, ModelError> {
        let t = parent.len();
        if subtree_end.len() != t {
            return Err(ModelError::InvalidTree(format!(
                "parent has {t} entries but subtree_end has {}",
                subtree_end.len()
            )));
        }
        // A stack of open subtrees checks that the parent pointers and the intervals describe the
        // same DFS pre-order forest.
        let mut stack: Vec<usize> = Vec::new();
        for i in 0..t {
            let end = subtree_end[i] as usize;
            if end <= i || end > t {
                return Err(ModelError::InvalidTree(format!(
                    "subtree_end[{i}] = {end} outside ({i}, {t}]"
                )));
            }
            while let Some(&top) = stack.last() {
                if subtree_end[top] as usize <= i {
                    stack.pop();
                } else {
                    break;
                }
            }
            let expected = stack.last().map_or(-1, |&p| p as i64);
            if parent[i] as i64 != expected {
                return Err(ModelError::InvalidTree(format!(
                    "parent[{i}] = {} but the DFS intervals imply {expected}",
                    parent[i]
                )));
            }
            if let Some(&top) = stack.last()
                && end > subtree_end[top] as usize
            {
                return Err(ModelError::InvalidTree(format!(
                    "subtree of {i} ends after its parent's"
                )));
            }
            stack.push(i);
        }
        let mut run_start = vec![0u32; t];
        let mut depth = vec![0u64; t];
        let mut pairs = 0u64;
        for i in 0..t {
            let p = parent[i];
            run_start[i] = if i > 0 && p == i as i32 - 1 {
                run_start[i - 1]
            } else {
                i as u32
            };
            depth[i] = if p >= 0 { depth[p as usize] + 1 } else { 0 };
            pairs += depth[i] + 1;
        }
        Ok(Self {
            parent,
            subtree_end,
            run_start,
            pairs,
        })
    }

    /// Builds the mask from parent pointers alone (DFS order required), deriving `subtree_end`.
    pub fn from_parent(parent: Vec<i32>) -> std::result::Result<Self, ModelError> {
        let t = parent.len();
        let mut end: Vec<u32> = (1..=t as u32).collect();
        for i in (0..t).rev() {
            let p = parent[i];
            if p >= i as i32 {
                return Err(ModelError::InvalidTree(format!(
                    "parent[{i}] = {p} is not to the left"
                )));
            }
            if p >= 0 {
                let p = p as usize;
                end[p] = end[p].max(end[i]);
            }
        }
        Self::new(parent, end)
    }

    /// A single causal sequence of `len` tokens (a chain).
    pub fn causal(len: usize) -> Self {
        Self::forest(&[len])
    }

    /// Independent causal sequences packed back to back (the "linear" layout of several paths).
    pub fn forest(lengths: &[usize]) -> Self {
        let total: usize = lengths.iter().sum();
        let mut parent = Vec::with_capacity(total);
        let mut subtree_end = Vec::with_capacity(total);
        let mut off = 0usize;
        for &len in lengths {
            for k in 0..len {
                parent.push(if k == 0 { -1 } else { (off + k - 1) as i32 });
                subtree_end.push((off + len) as u32);
            }
            off += len;
        }
        let mut run_start = Vec::with_capacity(total);
        let mut pairs = 0u64;
        let mut off = 0usize;
        for &len in lengths {
            for k in 0..len {
                run_start.push(off as u32);
                pairs += k as u64 + 1;
            }
            off += len;
        }
        Self {
            parent,
            subtree_end,
            run_start,
            pairs,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// Whether the mask has no tokens.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// Token-level parent pointers (`-1` for roots).
    pub fn parent(&self) -> &[i32] {
        &self.parent
    }

    /// Exclusive DFS end of each token's subtree.
    pub fn subtree_end(&self) -> &[u32] {
        &self.subtree_end
    }

    /// Number of visible (query, key) pairs: the attention work, versus `T * T` for a dense mask.
    pub fn visible_pairs(&self) -> u64 {
        self.pairs
    }

    /// Whether key `j` is visible to query `i`.
    pub fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && i < self.subtree_end[j] as usize
    }

    /// Calls `f(start, end_inclusive)` for each contiguous run of ancestors-or-self of `i`.
    #[inline(always)]
    pub(super) fn for_each_run(&self, i: usize, mut f: impl FnMut(usize, usize)) {
        let mut e = i as i64;
        while e >= 0 {
            let s = self.run_start[e as usize] as usize;
            f(s, e as usize);
            e = self.parent[s] as i64;
        }
    }

    /// A dense `[T, T]` additive mask (0 visible, -inf hidden) for the reference implementation.
    /// Costs `T * T` memory: tests only.
    pub fn dense_bias(&self, device: &candle::Device) -> Result<Tensor> {
        let t = self.len();
        let mut m = vec![f32::NEG_INFINITY; t * t];
        for i in 0..t {
            self.for_each_run(i, |s, e| {
                for j in s..=e {
                    m[i * t + j] = 0.0;
                }
            });
        }
        Tensor::from_vec(m, (t, t), device)
    }
}
