//! Tree attention: exact softmax attention restricted to a token's ancestors in a DFS-flattened
//! prefix tree, as a candle custom op with a CPU forward and backward.
//!
//! A flattened trajectory tree puts every ancestor of a token to its left. Token `j` is visible to
//! token `i` iff `j <= i < subtree_end[j]` (equivalently, `j` is on the parent chain of `i`, or is
//! `i`). The ancestors of `i` form a handful of contiguous runs (one per tree node on its path), so
//! the op walks those runs instead of a `T x T` mask: work and memory are proportional to the
//! number of visible (query, key) pairs plus `O(T * heads * head_dim)`.
//!
//! The forward uses a blocked, numerically stable online softmax (flash-attention style) and keeps
//! the per-(head, query) logsumexp for the backward, which recomputes probabilities from it instead
//! of storing them.
//!
//! Modules: `mask` (the ancestor relation, [`TreeMask`]), `op` (the candle op: shape checks,
//! forward / backward dispatch), `kernel` (the production gemm-blocked kernels), `reference` (the
//! dense ground truth, [`tree_attention_reference`]); in tests, `tile` (an independent
//! register-tile implementation of the kernels, cross-checked against the reference).

mod kernel;
mod mask;
mod op;
mod reference;

pub use mask::TreeMask;
pub use op::tree_attention;
pub use reference::tree_attention_reference;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tile;
