//! Reuse metrics of trees and packings.

use serde::{Deserialize, Serialize};

use crate::tree::TrajectoryTree;

/// Size and reuse statistics of a trajectory tree (forest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeStats {
    /// Number of paths (input sequences), `K`.
    pub paths: u64,
    /// Number of trees (roots) in the forest.
    pub trees: u64,
    /// Number of nodes (token segments).
    pub nodes: u64,
    /// `N_flat`: sum of path lengths.
    pub flat_tokens: u64,
    /// `N_unique`: tokens stored in the tree.
    pub unique_tokens: u64,
    /// Loss tokens summed over paths (flat count `M`).
    pub flat_loss_tokens: u64,
    /// Potential overlap ratio `1 - N_unique / N_flat` (0 for an empty tree).
    pub por: f64,
    /// Ideal speedup of token-linear work, `1 / (1 - POR) = N_flat / N_unique`.
    pub ideal_speedup: f64,
    /// Longest path, in tokens.
    pub max_path_len: u64,
    /// Mean path length, in tokens.
    pub mean_path_len: f64,
}

/// `1 - a / b`, or 0 when `b` is 0.
pub fn reuse_ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        1.0 - a as f64 / b as f64
    }
}

/// `b / a`, or 1 when `a` is 0.
pub fn speedup(a: u64, b: u64) -> f64 {
    if a == 0 { 1.0 } else { b as f64 / a as f64 }
}

impl TrajectoryTree {
    /// Statistics of this tree.
    pub fn stats(&self) -> TreeStats {
        let flat = self.flat_tokens();
        let unique = self.unique_tokens();
        let k = self.num_paths() as u64;
        let mut flat_loss = 0u64;
        // Loss tokens per path = canonical mask count along the path + override corrections.
        let nodes = self.nodes();
        let mut cum = vec![0u64; nodes.len()];
        for n in nodes {
            let own = n.loss_mask.iter().filter(|&&m| m).count() as u64;
            cum[n.id as usize] = own + n.parent.map_or(0, |p| cum[p as usize]);
        }
        for leaf in self.leaves() {
            let mut c = cum[leaf.node as usize] as i64;
            for o in &leaf.overrides {
                // Find the canonical value at o.pos: walk the path to the node containing it.
                let canon = self.canonical_mask_at(leaf.node, o.pos);
                c += o.loss_mask as i64 - canon as i64;
            }
            flat_loss += c as u64;
        }
        TreeStats {
            paths: k,
            trees: self.roots().len() as u64,
            nodes: nodes.len() as u64,
            flat_tokens: flat,
            unique_tokens: unique,
            flat_loss_tokens: flat_loss,
            por: reuse_ratio(unique, flat),
            ideal_speedup: speedup(unique, flat),
            max_path_len: self
                .leaves()
                .iter()
                .map(|l| l.len as u64)
                .max()
                .unwrap_or(0),
            mean_path_len: if k == 0 { 0.0 } else { flat as f64 / k as f64 },
        }
    }

    /// Canonical loss mask at position `pos` on the path ending at `node`.
    fn canonical_mask_at(&self, node: u32, pos: u32) -> bool {
        let nodes = self.nodes();
        let mut u = node;
        loop {
            let n = &nodes[u as usize];
            if pos >= n.depth {
                return n.loss_mask[(pos - n.depth) as usize];
            }
            match n.parent {
                Some(p) => u = p,
                None => return false,
            }
        }
    }
}

impl std::fmt::Display for TreeStats {
    /// A short human-readable summary (for `arbor tree stats` without `--json`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "paths {}  trees {}  nodes {}",
            self.paths, self.trees, self.nodes
        )?;
        writeln!(
            f,
            "flat tokens {}  unique tokens {}  loss tokens (flat) {}",
            self.flat_tokens, self.unique_tokens, self.flat_loss_tokens
        )?;
        writeln!(
            f,
            "path length max {}  mean {:.1}",
            self.max_path_len, self.mean_path_len
        )?;
        write!(
            f,
            "POR {:.4}  ideal speedup {:.2}x",
            self.por, self.ideal_speedup
        )
    }
}
