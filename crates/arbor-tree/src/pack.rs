//! Packing a tree into micro-batches ("packs") of at most `budget` tokens that keep as much prefix reuse
//! as possible.
//!
//! A pack is defined by the set of paths (leaves) it trains: it is the flattening of those paths and all
//! their ancestors ([`TrajectoryTree::flatten_leaves`]), so shared prefixes inside a pack are laid out
//! once, and an ancestor needed by several packs is re-materialised in each. Every path is in exactly one
//! pack, so with the batch's global normalizer the per-pack weights `w_t` (which count only the pack's
//! own paths, `g_t^(p)`) add up over packs to the unpacked weights.
//!
//! Strategies:
//! - [`PackStrategy::Greedy`] (general case): trees that fit the budget are whole items; larger trees are
//!   split by a greedy DFS that visits the deepest subtrees first and opens a new pack when the next
//!   path's missing tokens would exceed the budget. All items are then bin-packed first-fit decreasing.
//! - [`PackStrategy::SinglePathDp`]: the exact dynamic programme of the single-shared-path model
//!   ([`single_path_dp`]); chosen groups and the remaining single paths are then bin-packed likewise.
//!
//! Paths longer than the budget cannot share a pack with anything: by default
//! ([`OversizePolicy::Dedicated`]) each gets a pack of its own flagged `oversized` (so no data is silently
//! dropped and the trainer decides); [`OversizePolicy::Error`] refuses them instead.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TreeError};
use crate::flat::{FlatTree, Scratch};
use crate::metrics::{reuse_ratio, speedup};
use crate::tree::TrajectoryTree;
use crate::weights::{LossNormalization, Normalizer};

mod first_fit;
mod greedy;
mod single_path;

pub use first_fit::first_fit_decreasing;
use greedy::greedy_items;
use single_path::single_path_items;
pub use single_path::{SinglePathDp, single_path_dp};

/// Which packer to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackStrategy {
    /// General greedy multi-path packer (default).
    #[default]
    Greedy,
    /// Exact DP of the single-shared-path model, then bin packing.
    SinglePathDp,
}

/// What to do with a path longer than the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OversizePolicy {
    /// Put it alone in a pack flagged `oversized` (default).
    #[default]
    Dedicated,
    /// Fail with [`TreeError::PathTooLong`].
    Error,
}

impl std::str::FromStr for PackStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "greedy" => Ok(PackStrategy::Greedy),
            "single_path_dp" | "dp" => Ok(PackStrategy::SinglePathDp),
            _ => Err(format!(
                "unknown packing strategy {s:?} (expected greedy or single_path_dp)"
            )),
        }
    }
}

impl std::str::FromStr for OversizePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dedicated" => Ok(OversizePolicy::Dedicated),
            "error" => Ok(OversizePolicy::Error),
            _ => Err(format!(
                "unknown oversize policy {s:?} (expected dedicated or error)"
            )),
        }
    }
}

/// Packing options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackOptions {
    /// Token budget `C` per pack.
    pub budget: usize,
    /// Packer.
    pub strategy: PackStrategy,
    /// Handling of paths longer than the budget.
    pub oversize: OversizePolicy,
    /// The loss normalization of the `loss_weight` written into packs.
    pub normalization: LossNormalization,
}

impl PackOptions {
    /// Default options with the given budget.
    pub fn new(budget: usize) -> Self {
        PackOptions {
            budget,
            strategy: PackStrategy::default(),
            oversize: OversizePolicy::default(),
            normalization: LossNormalization::default(),
        }
    }
}

/// One planned pack: the paths it trains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackPlan {
    /// Leaf indices (ascending).
    pub leaves: Vec<u32>,
    /// Number of tokens of the pack's flattening (`N_packed` of this pack).
    pub tokens: u64,
    /// `true` for a dedicated pack holding a single path longer than the budget.
    pub oversized: bool,
}

/// The result of packing a tree: every path in exactly one pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packing {
    /// The budget `C`.
    pub budget: usize,
    /// The packs.
    pub packs: Vec<PackPlan>,
}

/// Reuse achieved by a packing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackStats {
    /// The budget `C`.
    pub budget: u64,
    /// Number of packs.
    pub packs: u64,
    /// Packs holding one path longer than the budget.
    pub oversized_packs: u64,
    /// Number of paths.
    pub paths: u64,
    /// `N_flat`.
    pub flat_tokens: u64,
    /// `N_unique` of the whole tree.
    pub unique_tokens: u64,
    /// `N_packed`: tokens summed over packs (re-materialised ancestors count again).
    pub packed_tokens: u64,
    /// Potential overlap ratio `1 - N_unique / N_flat`.
    pub por: f64,
    /// Effective reuse `ERR = 1 - N_packed / N_flat` (`<= POR`).
    pub err: f64,
    /// `N_flat / N_unique`.
    pub ideal_speedup: f64,
    /// `N_flat / N_packed`: the token-linear speedup the packing actually allows.
    pub effective_speedup: f64,
    /// Largest pack, in tokens.
    pub max_pack_tokens: u64,
    /// `N_packed / (packs * C)`: how full packs are on average.
    pub fill: f64,
}

impl Packing {
    /// `N_packed`.
    pub fn packed_tokens(&self) -> u64 {
        self.packs.iter().map(|p| p.tokens).sum()
    }

    /// Reuse statistics of this packing of `tree`.
    pub fn stats(&self, tree: &TrajectoryTree) -> PackStats {
        let flat = tree.flat_tokens();
        let unique = tree.unique_tokens();
        let packed = self.packed_tokens();
        let n = self.packs.len() as u64;
        PackStats {
            budget: self.budget as u64,
            packs: n,
            oversized_packs: self.packs.iter().filter(|p| p.oversized).count() as u64,
            paths: tree.num_paths() as u64,
            flat_tokens: flat,
            unique_tokens: unique,
            packed_tokens: packed,
            por: reuse_ratio(unique, flat),
            err: reuse_ratio(packed, flat),
            ideal_speedup: speedup(unique, flat),
            effective_speedup: speedup(packed, flat),
            max_pack_tokens: self.packs.iter().map(|p| p.tokens).max().unwrap_or(0),
            fill: if n == 0 {
                0.0
            } else {
                packed as f64 / (n as f64 * self.budget as f64)
            },
        }
    }
}

impl std::fmt::Display for PackStats {
    /// A short human-readable summary (for `arbor tree pack`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} packs of <= {} tokens ({} oversized), {} paths, fill {:.1}%",
            self.packs,
            self.budget,
            self.oversized_packs,
            self.paths,
            100.0 * self.fill
        )?;
        writeln!(
            f,
            "flat {}  unique {}  packed {} tokens",
            self.flat_tokens, self.unique_tokens, self.packed_tokens
        )?;
        write!(
            f,
            "POR {:.4}  ERR {:.4}  ideal speedup {:.2}x  effective {:.2}x",
            self.por, self.err, self.ideal_speedup, self.effective_speedup
        )
    }
}

/// Per-node facts the packers share.
struct Info {
    /// Tokens in the subtree of each node.
    size: Vec<u64>,
    /// Deepest path end in each subtree.
    max_depth: Vec<u32>,
    /// Leaves ending at each node (CSR).
    end_off: Vec<u32>,
    end_leaves: Vec<u32>,
}

impl Info {
    fn new(tree: &TrajectoryTree) -> Self {
        let nodes = tree.nodes();
        let n = nodes.len();
        let mut size: Vec<u64> = nodes.iter().map(|x| x.len() as u64).collect();
        let mut max_depth = vec![0u32; n];
        let mut cnt = vec![0u32; n + 1];
        for l in tree.leaves() {
            cnt[l.node as usize + 1] += 1;
            max_depth[l.node as usize] = l.len;
        }
        for i in 0..n {
            cnt[i + 1] += cnt[i];
        }
        let mut fill = cnt.clone();
        let mut end_leaves = vec![0u32; tree.num_paths()];
        for (k, l) in tree.leaves().iter().enumerate() {
            end_leaves[fill[l.node as usize] as usize] = k as u32;
            fill[l.node as usize] += 1;
        }
        for i in (0..n).rev() {
            if let Some(p) = nodes[i].parent {
                let (s, d) = (size[i], max_depth[i]);
                size[p as usize] += s;
                let pd = &mut max_depth[p as usize];
                *pd = (*pd).max(d);
            }
        }
        Info {
            size,
            max_depth,
            end_off: cnt,
            end_leaves,
        }
    }

    fn ends(&self, u: u32) -> &[u32] {
        &self.end_leaves[self.end_off[u as usize] as usize..self.end_off[u as usize + 1] as usize]
    }
}

/// An item to bin-pack: a set of paths and an upper bound of its size.
struct Item {
    leaves: Vec<u32>,
    tokens: u64,
}

/// Plans a packing of `tree` under `opts.budget` tokens per pack.
pub fn plan_packing(tree: &TrajectoryTree, opts: &PackOptions) -> Result<Packing> {
    let budget = opts.budget as u64;
    if budget == 0 {
        return Err(TreeError::ZeroBudget);
    }
    let info = Info::new(tree);
    let mut items: Vec<Item> = Vec::new();
    let mut oversized: Vec<u32> = Vec::new();
    match opts.strategy {
        PackStrategy::Greedy => greedy_items(tree, &info, budget, &mut items, &mut oversized),
        PackStrategy::SinglePathDp => {
            single_path_items(tree, &info, opts.budget, &mut items, &mut oversized)
        }
    }
    if opts.oversize == OversizePolicy::Error
        && let Some(&k) = oversized.first()
    {
        let l = &tree.leaves()[k as usize];
        return Err(TreeError::PathTooLong {
            id: l.id.clone(),
            len: l.len as usize,
            budget: opts.budget,
        });
    }
    let sizes: Vec<u64> = items.iter().map(|i| i.tokens).collect();
    let bins = first_fit_decreasing(&sizes, budget);
    let mut packs: Vec<PackPlan> = Vec::with_capacity(bins.len() + oversized.len());
    let mut mark = vec![false; tree.nodes().len()];
    let mut touched: Vec<u32> = Vec::new();
    for bin in bins {
        let mut leaves: Vec<u32> = bin
            .iter()
            .flat_map(|&i| items[i].leaves.iter().copied())
            .collect();
        leaves.sort_unstable();
        let tokens = union_size(tree, &leaves, &mut mark, &mut touched);
        packs.push(PackPlan {
            leaves,
            tokens,
            oversized: false,
        });
    }
    oversized.sort_unstable();
    for k in oversized {
        packs.push(PackPlan {
            leaves: vec![k],
            tokens: tree.leaves()[k as usize].len as u64,
            oversized: true,
        });
    }
    Ok(Packing {
        budget: opts.budget,
        packs,
    })
}

/// Exact number of tokens of the flattening of `leaves` and their ancestors.
fn union_size(
    tree: &TrajectoryTree,
    leaves: &[u32],
    mark: &mut [bool],
    touched: &mut Vec<u32>,
) -> u64 {
    let nodes = tree.nodes();
    let mut total = 0u64;
    for &k in leaves {
        let mut u = Some(tree.leaves()[k as usize].node);
        while let Some(x) = u {
            if mark[x as usize] {
                break;
            }
            mark[x as usize] = true;
            touched.push(x);
            total += nodes[x as usize].len() as u64;
            u = nodes[x as usize].parent;
        }
    }
    for &x in touched.iter() {
        mark[x as usize] = false;
    }
    touched.clear();
    total
}

/// A materialised pack: a flattened forest plus its weights and metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pack {
    /// Position of this pack in its packing.
    pub index: u32,
    /// The budget it was packed under.
    pub budget: u64,
    /// `true` for a dedicated pack holding one path longer than the budget.
    pub oversized: bool,
    /// The pack's tokens: same arrays as a [`FlatTree`]; `leaf_count` counts this pack's paths only.
    pub flat: FlatTree,
    /// `w_t` for `normalization` under the batch's global `normalizer`.
    pub loss_weight: Vec<f32>,
    /// Per-token advantage when unambiguous, `NaN` otherwise ([`FlatTree::token_advantage`]).
    pub advantage: Vec<f32>,
    /// The loss normalization of `loss_weight`.
    pub normalization: LossNormalization,
    /// The global normalizer of the whole packing (all packs), used for `loss_weight`.
    pub normalizer: Normalizer,
}

impl Pack {
    /// Tree ids (root node ids in the source tree) present in this pack, ascending.
    pub fn tree_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.flat.paths.iter().map(|p| p.tree).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Path ids (sequence ids) in this pack, in pack order.
    pub fn path_ids(&self) -> Vec<String> {
        self.flat.paths.iter().map(|p| p.id.clone()).collect()
    }
}

/// Materialises every pack of `packing`, weighting losses with `norm` over the whole tree's normalizer
/// (so the losses of all packs add up to the loss of all paths).
pub fn build_packs(
    tree: &TrajectoryTree,
    packing: &Packing,
    norm: LossNormalization,
) -> Result<Vec<Pack>> {
    let whole = global_normalizer(tree);
    let mut scratch = Scratch::new(tree.nodes().len());
    let mut seen = vec![false; tree.num_paths()];
    let mut out = Vec::with_capacity(packing.packs.len());
    for (i, plan) in packing.packs.iter().enumerate() {
        for &k in &plan.leaves {
            match seen.get_mut(k as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(TreeError::invalid(
                        "packing",
                        format!("leaf {k} is unknown or in two packs"),
                    ));
                }
            }
        }
        out.push(build_pack(
            tree,
            plan,
            i as u32,
            packing.budget as u64,
            norm,
            &whole,
            &mut scratch,
        ));
    }
    Ok(out)
}

fn build_pack(
    tree: &TrajectoryTree,
    plan: &PackPlan,
    index: u32,
    budget: u64,
    norm: LossNormalization,
    whole: &Normalizer,
    scratch: &mut Scratch,
) -> Pack {
    let flat = tree.flatten_with(&plan.leaves, scratch);
    let loss_weight = flat
        .loss_weights_with(norm, whole)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let advantage = flat.token_advantage();
    Pack {
        index,
        budget,
        oversized: plan.oversized,
        flat,
        loss_weight,
        advantage,
        normalization: norm,
        normalizer: *whole,
    }
}

/// The normalizer of all paths of `tree`.
pub fn global_normalizer(tree: &TrajectoryTree) -> Normalizer {
    Normalizer {
        num_paths: tree.num_paths() as u64,
        loss_tokens: tree.stats().flat_loss_tokens,
    }
}

/// Plans and materialises the packs of `tree` (see [`plan_packing`] and [`build_packs`]).
pub fn pack_tree(tree: &TrajectoryTree, opts: &PackOptions) -> Result<(Packing, Vec<Pack>)> {
    let packing = plan_packing(tree, opts)?;
    let packs = build_packs(tree, &packing, opts.normalization)?;
    Ok((packing, packs))
}
