//! [`PackStrategy::SinglePathDp`](super::PackStrategy::SinglePathDp): the exact dynamic programme of the
//! single-shared-path model, and the bin-packing items it yields.

use serde::{Deserialize, Serialize};

use super::{Info, Item};
use crate::tree::TrajectoryTree;

/// Items of the DP's packing: one per chosen node (its shared prefix plus every path through it), one
/// per remaining path; paths longer than the budget go to `oversized`.
pub(super) fn single_path_items(
    tree: &TrajectoryTree,
    info: &Info,
    budget: usize,
    items: &mut Vec<Item>,
    oversized: &mut Vec<u32>,
) {
    let dp = single_path_dp(tree, budget);
    for &u in &dp.chosen {
        let node = &tree.nodes()[u as usize];
        items.push(Item {
            leaves: node.leaves.clone(),
            tokens: node.depth as u64 + info.size[u as usize],
        });
    }
    for &k in &dp.uncovered {
        let len = tree.leaves()[k as usize].len as u64;
        if len > budget as u64 {
            oversized.push(k);
        } else {
            items.push(Item {
                leaves: vec![k],
                tokens: len,
            });
        }
    }
}

/// Result of [`single_path_dp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinglePathDp {
    /// Chosen nodes (an antichain): each is the shared prefix of one pack holding every path through it.
    pub chosen: Vec<u32>,
    /// Paths through no chosen node (packed alone, no sharing in the model).
    pub uncovered: Vec<u32>,
    /// Optimal objective: tokens saved, `sum over chosen u of (n_u - 1) * L(u)`.
    pub saved: u64,
}

/// The exact linear-time DP of the single-shared-path model (docs/recipe.md §2).
///
/// A pack shares one prefix, the path to node `u`, among the `n_u` paths through `u`; it holds
/// `L(u) + R(u)` tokens, `L(u)` the prefix length and `R(u) = sum over those paths of (len - L(u))` their
/// suffix tokens. `u` is feasible iff `L(u) + R(u) <= C`; choosing it saves `(n_u - 1) * L(u)`, and
/// `DP(u) = max(feasible(u) * (n_u - 1) * L(u), sum over children v of DP(v))`, with ties going to `u`
/// (fewer packs). Splitting inside a node never helps (deeper is both cheaper and saves more), so nodes
/// are the only candidates.
pub fn single_path_dp(tree: &TrajectoryTree, budget: usize) -> SinglePathDp {
    let nodes = tree.nodes();
    let n = nodes.len();
    let c = budget as u64;
    // S(u): sum of path lengths through u.
    let mut s = vec![0u64; n];
    for l in tree.leaves() {
        s[l.node as usize] += l.len as u64;
    }
    for i in (0..n).rev() {
        if let Some(p) = nodes[i].parent {
            let v = s[i];
            s[p as usize] += v;
        }
    }
    let mut dp = vec![0u64; n];
    let mut take = vec![false; n];
    for i in (0..n).rev() {
        let node = &nodes[i];
        let nu = node.leaves.len() as u64;
        let l = node.end_depth() as u64;
        let r = s[i] - nu * l;
        let children: u64 = node.children.iter().map(|&v| dp[v as usize]).sum();
        let gain = (nu - 1) * l;
        if l + r <= c && gain >= children {
            take[i] = true;
            dp[i] = gain;
        } else {
            dp[i] = children;
        }
    }
    let mut chosen = Vec::new();
    let mut uncovered = Vec::new();
    let mut saved = 0;
    let mut ends: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (k, l) in tree.leaves().iter().enumerate() {
        ends[l.node as usize].push(k as u32);
    }
    let mut stack: Vec<u32> = tree.roots();
    stack.reverse();
    while let Some(u) = stack.pop() {
        if take[u as usize] {
            chosen.push(u);
        } else {
            uncovered.extend_from_slice(&ends[u as usize]);
            stack.extend(nodes[u as usize].children.iter().rev());
        }
    }
    for r in tree.roots() {
        saved += dp[r as usize];
    }
    uncovered.sort_unstable();
    SinglePathDp {
        chosen,
        uncovered,
        saved,
    }
}
