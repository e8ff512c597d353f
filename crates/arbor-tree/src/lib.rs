//! # arbor-tree: trajectory trees for Tree Training
//!
//! Agentic trajectories share long prefixes (the samples of one task share the prompt; turns of one
//! episode share earlier context). This crate merges token sequences into a prefix tree so that every
//! shared token is stored, and computed by a trainer, once, while the loss and its gradient stay exactly
//! those of training on every root-to-leaf path separately. It has no ML framework dependency.
//!
//! - [`Sequence`]: one linear trajectory (also the JSONL interchange format; [`load_sequences`]).
//! - [`TrajectoryTree`]: the compressed trie (a forest), [`TrajectoryTree::from_sequences`],
//!   [`TrajectoryTree::paths`] (gives the inputs back), [`TreeStats`] (POR, ideal speedup).
//! - [`FlatTree`]: depth-first flattening with position ids, token-level parent pointers and subtree ends
//!   (the ancestor relation as an interval test), per-path gather ranges, sparse ancestor ranges for
//!   attention kernels and a dense mask on request.
//! - [`LossNormalization`] and [`FlatTree::loss_weights`]: the weights that make the flattened loss equal
//!   the per-path loss; [`FlatTree::path_gather`] / [`FlatTree::scatter_add_paths`] for RL losses whose
//!   per-token term depends on the path (per-leaf advantages, clipping).
//! - [`plan_packing`] / [`build_packs`] / [`pack_tree`]: packs of at most `C` tokens (greedy splitter,
//!   exact single-shared-path DP [`single_path_dp`], first-fit-decreasing bin packing), [`PackStats`]
//!   with the effective reuse `ERR`.
//! - [`write_pack`] / [`read_pack`]: safetensors pack files (format in [`packfile`]).
//! - [`stats`], [`pack_to_dir`]: the entry points of `arbor tree stats` and `arbor tree pack`.
//! - [`synthetic`]: generators of trajectory sets with a target POR, for benchmarks.
//!
//! ```
//! use arbor_tree::{LossNormalization, PackOptions, Sequence, TrajectoryTree, pack_tree};
//!
//! let mut a = Sequence::new("a", vec![1, 2, 3, 4]);
//! a.loss_mask = vec![false, false, true, true];
//! let mut b = Sequence::new("b", vec![1, 2, 5]);
//! b.loss_mask = vec![false, false, true];
//! let tree = TrajectoryTree::from_sequences(&[a.clone(), b.clone()])?;
//! assert_eq!(tree.paths(), vec![a, b]);
//! assert_eq!(tree.stats().unique_tokens, 5); // [1, 2] is shared; 7 flat tokens
//!
//! let flat = tree.flatten();
//! assert_eq!(flat.position_ids, vec![0, 1, 2, 3, 2]);
//! assert!(!flat.visible(4, 3)); // [5] does not see its left sibling [3, 4]
//! // Token mean over the 3 loss tokens of both paths:
//! let w = flat.loss_weights(LossNormalization::TokenMean);
//! assert_eq!(w, vec![0.0, 0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
//!
//! let (packing, packs) = pack_tree(&tree, &PackOptions::new(4))?;
//! assert_eq!(packs.len(), 2); // the 5-token tree does not fit in 4 tokens
//! assert_eq!(packing.stats(&tree).packed_tokens, 7);
//! # Ok::<(), arbor_tree::TreeError>(())
//! ```
//!
//! ## Merging rule
//!
//! Sequences are merged on **token ids only**. A token's hidden states depend only on the tokens before
//! it on its path and on its position, which are the same for every path through a tree node; so sharing
//! the node is exact for the forward and backward pass whatever the loss masks say. Loss mask, behaviour
//! logprob and turn are *per-path* data:
//!
//! - the node arrays hold a **canonical** value per token: `loss_mask` is the OR over the paths through
//!   the token ("some path trains it"), `logprobs` and `turns` come from the first path (in input order)
//!   that trains the token, or else from the first path through it;
//! - each [`Leaf`] lists [`overrides`](Leaf::overrides): the positions where its own value differs from
//!   the canonical one (for example a token that one sequence generated and another one saw as prompt).
//!
//! Loss weights, per-path gathers and [`TrajectoryTree::paths`] use each path's own values, so nothing is
//! approximated and every input sequence is reproduced exactly. Keying nodes on `(token, loss_mask)`
//! instead would also be exact but would stop sharing at such tokens (e.g. call 2 of an episode, whose
//! prompt contains call 1's generated answer), losing reuse for no gain.
//!
//! A sequence that is a strict prefix of another ends at an inner node; duplicate sequences end at the
//! same node. Both are ordinary paths (leaves) here: "leaf" means "path end", not "node without
//! children".
//!
//! ## Tree JSON (stable, version 1)
//!
//! `serde_json::to_string(&tree)` gives (and the model gateway returns from `GET /sessions/{id}/tree`):
//!
//! ```json
//! {"version": 1,
//!  "nodes": [
//!    {"id": 0, "parent": null, "depth": 0, "tokens": [1, 2], "loss_mask": [false, true],
//!     "logprobs": [0.0, -0.1], "turns": [0, 0], "leaves": [0, 1]},
//!    {"id": 1, "parent": 0, "depth": 2, "tokens": [3], "loss_mask": [true],
//!     "logprobs": [-0.5], "turns": [0], "leaves": [0]},
//!    {"id": 2, "parent": 0, "depth": 2, "tokens": [4], "loss_mask": [true],
//!     "logprobs": [-0.7], "turns": [0], "leaves": [1]}],
//!  "leaves": [
//!    {"id": "a", "node": 1, "len": 3, "reward": 1.0, "advantage": 0.5,
//!     "overrides": [{"pos": 1, "loss_mask": false, "logprob": 0.0, "turn": 0}]},
//!    {"id": "b", "node": 2, "len": 3, "reward": 0.0, "advantage": -0.5}]}
//! ```
//!
//! Here sequence `a` = `[1, 2, 3]` trains only token 3, and `b` = `[1, 2, 4]` trains tokens 2 and 4, so
//! the shared token 2 is canonically trained (with `b`'s logprob) and `a` records an override.
//!
//! - `nodes` are in depth-first pre-order, `id` is the index, `parent` is `null` for a root, `depth` is the
//!   position of the node's first token, `leaves` lists (ascending) the indices into `leaves` of the paths
//!   passing through the node: its length is `g_t` for every token of the node.
//! - `leaves[k]` is input sequence `k`: `node` holds its last token, `len` is its length; `reward`,
//!   `advantage`, `group` and `overrides` are omitted when absent/empty.
//!
//! Deserializing validates everything (pre-order, depths, leaf lists, lengths).
//!
//! ## Flat layout
//!
//! [`TrajectoryTree::flatten`] lays nodes out in pre-order. Token `j` is visible to token `i` iff
//! `j <= i < subtree_end[j]`; `position_ids` are depths on the path (RoPE must use them); `parent` is the
//! previous token on the path (`-1` at a root). [`FlatTree::ancestor_ranges`] lists the contiguous key
//! ranges a query sees; [`FlatTree::dense_mask`] builds the `T x T` mask for tests.

pub mod error;
pub mod flat;
pub mod metrics;
pub mod pack;
pub mod packfile;
pub mod sequence;
pub mod synthetic;
pub mod tree;
pub mod weights;

pub use error::{Result, TreeError};
pub use flat::{AncestorRanges, FlatOverride, FlatPath, FlatSegment, FlatTree, PathGather};
pub use metrics::TreeStats;
pub use pack::{
    OversizePolicy, Pack, PackOptions, PackPlan, PackStats, PackStrategy, Packing, SinglePathDp,
    build_packs, first_fit_decreasing, pack_tree, plan_packing, single_path_dp,
};
pub use packfile::{
    PACK_FORMAT, PackMeta, PackPathMeta, pack_from_bytes, pack_to_bytes, read_pack, write_pack,
};
pub use sequence::{Sequence, load_sequences, read_jsonl, write_jsonl};
pub use tree::{Leaf, Node, TREE_FORMAT_VERSION, TokenOverride, TrajectoryTree};
pub use weights::{LossNormalization, Normalizer};

use std::path::Path;

/// Statistics (POR, ideal speedup, sizes) of the tree built from a JSONL file of [`Sequence`]s or a
/// directory of such files (see [`load_sequences`]). All sequences go into one forest, so sequences from
/// different files that share a prefix share nodes.
///
/// Sources in another format (e.g. a gateway store's call log) are converted to [`Sequence`]s by their
/// owner; then use `TrajectoryTree::from_sequences(&seqs)?.stats()` and [`write_packs`].
pub fn stats(source: &Path) -> Result<TreeStats> {
    let seqs = load_sequences(source)?;
    Ok(TrajectoryTree::from_sequences(&seqs)?.stats())
}

/// What [`pack_to_dir`] wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PackSummary {
    /// Reuse achieved by the packing (budget, packs, N_flat, N_unique, N_packed, POR, ERR, ...).
    #[serde(flatten)]
    pub stats: PackStats,
    /// Number of trees (roots) in the source forest.
    pub trees: u64,
    /// Packer used.
    pub strategy: PackStrategy,
    /// Loss normalization of the `loss_weight` tensors.
    pub normalization: LossNormalization,
    /// Pack file names (relative to the output directory), in pack order.
    pub files: Vec<String>,
}

/// Name of the summary file [`pack_to_dir`] writes next to the packs.
pub const SUMMARY_FILE: &str = "summary.json";

/// Packs the sequences of `source` (a JSONL file or a directory of them, see [`load_sequences`]) into
/// packs of at most `budget` tokens with the default [`PackOptions`] and writes them to `out` as
/// `pack-00000.safetensors`, ... plus `summary.json` (the returned [`PackSummary`]).
pub fn pack_to_dir(source: &Path, budget: usize, out: &Path) -> Result<PackSummary> {
    pack_to_dir_with(source, &PackOptions::new(budget), out)
}

/// [`pack_to_dir`] with explicit options. `out` is created if needed and must not already hold pack
/// files (so packs of two runs never mix).
pub fn pack_to_dir_with(source: &Path, opts: &PackOptions, out: &Path) -> Result<PackSummary> {
    let seqs = load_sequences(source)?;
    let tree = TrajectoryTree::from_sequences(&seqs)?;
    drop(seqs);
    write_packs(&tree, opts, out)
}

/// Packs `tree` and writes the packs and `summary.json` to `out` (see [`pack_to_dir_with`]).
pub fn write_packs(tree: &TrajectoryTree, opts: &PackOptions, out: &Path) -> Result<PackSummary> {
    std::fs::create_dir_all(out).map_err(|e| TreeError::io(out, e))?;
    let existing = std::fs::read_dir(out).map_err(|e| TreeError::io(out, e))?;
    for entry in existing {
        let entry = entry.map_err(|e| TreeError::io(out, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("pack-") && name.ends_with(".safetensors") {
            return Err(TreeError::invalid(
                "output directory",
                format!(
                    "{} already contains pack files ({name}); use an empty directory",
                    out.display()
                ),
            ));
        }
    }
    let (packing, packs) = pack_tree(tree, opts)?;
    let mut files = Vec::with_capacity(packs.len());
    for pack in &packs {
        let name = format!("pack-{:05}.safetensors", pack.index);
        write_pack(&out.join(&name), pack)?;
        files.push(name);
    }
    let summary = PackSummary {
        stats: packing.stats(tree),
        trees: tree.roots().len() as u64,
        strategy: opts.strategy,
        normalization: opts.normalization,
        files,
    };
    let path = out.join(SUMMARY_FILE);
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| TreeError::invalid("summary", e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| TreeError::io(&path, e))?;
    tracing::info!(
        packs = summary.stats.packs,
        por = summary.stats.por,
        err = summary.stats.err,
        "wrote packs to {}",
        out.display()
    );
    Ok(summary)
}
