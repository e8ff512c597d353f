//! `arbor-model`: a Qwen3-style decoder (dense or mixture-of-experts) on candle, CPU, built for
//! Tree Training.
//!
//! The model runs over a *packed tree*: tokens flattened depth-first, with position ids equal to
//! the depth on the token's own root-to-leaf path and an ancestor relation (`parent`,
//! `subtree_end`). Attention is computed by [`ops::tree_attention`], which only visits each
//! token's ancestors, so the computation restricted to any root-to-leaf path is the computation of
//! that path alone: losses and gradients equal those of training each path separately.
//!
//! Modules: [`config`] (Hugging Face `config.json`), [`model`] (weights, forward, save/load),
//! [`ops`] (custom ops with backward), [`train`] (losses and AdamW step), [`generate`] (KV-cache
//! sampling with logprobs), [`sample`] (drawing one token from logits), [`bench`] (the
//! linear-vs-tree training benchmark).

pub mod bench;
pub mod config;
pub mod generate;
pub mod model;
pub mod ops;
pub mod sample;
pub mod train;

pub use config::Qwen3Config;
pub use generate::SamplingParams;
pub use model::{AuxStats, ForwardOptions, Qwen3Model, TreeBatch};
pub use ops::TreeMask;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle::Error),
    /// Reading or writing a file failed.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` could not be parsed.
    #[error("invalid config: {0}")]
    Config(String),
    /// A checkpoint lacks a tensor or has one of the wrong shape.
    #[error("invalid weights: {0}")]
    Weights(String),
    /// The parent / subtree-end description is not a DFS-ordered forest.
    #[error("invalid tree: {0}")]
    InvalidTree(String),
    /// Inputs of a call are inconsistent (lengths, token ids, parameters).
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
