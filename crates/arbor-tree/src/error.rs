//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, flattening, packing or storing trajectory trees.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A sequence has no tokens: an empty path cannot be a leaf of a tree.
    #[error("sequence {id:?} has no tokens")]
    EmptySequence {
        /// The sequence id.
        id: String,
    },
    /// A per-token field of a sequence does not have one entry per token.
    #[error(
        "sequence {id:?}: field `{field}` has {actual} entries but the sequence has {expected} tokens"
    )]
    LengthMismatch {
        /// The sequence id.
        id: String,
        /// The field name (`loss_mask`, `logprobs` or `turns`).
        field: &'static str,
        /// The number of tokens.
        expected: usize,
        /// The number of entries the field has.
        actual: usize,
    },
    /// More tokens, nodes or paths than the `u32`/`i32` indices of the flat layout can address.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A root-to-leaf path is longer than the packing budget and the packing policy forbids oversized packs.
    #[error("path {id:?} has {len} tokens, more than the packing budget of {budget} tokens")]
    PathTooLong {
        /// The path (sequence) id.
        id: String,
        /// Its length in tokens.
        len: usize,
        /// The budget per pack.
        budget: usize,
    },
    /// The packing budget is zero.
    #[error("the packing budget must be at least one token")]
    ZeroBudget,
    /// A serialized tree or pack is inconsistent (bad parent, wrong lengths, unknown leaf, ...).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being read (`tree`, `pack file`, ...).
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A line of a JSONL file is not a valid [`Sequence`](crate::Sequence).
    #[error("{path}:{line}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Encoding or decoding a safetensors pack file failed.
    #[error("safetensors: {0}")]
    Safetensors(String),
}

impl TreeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TreeError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        TreeError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = TreeError> = std::result::Result<T, E>;
