//! `arbor-recipe`: the Specialize-then-Unify recipe (docs/recipe.md §5) on arbor's parts.
//!
//! - [`config`]: the pipeline file.
//! - [`rollouts`]: experiments built from it, run into directories, read back as scored
//!   episodes with their token-level calls.
//! - [`advantage`]: group-relative advantages, infrastructure failures left out.
//! - [`rl`]: the RL loop (sample with the embedded policy, score, update on packed trees with
//!   turn-level GSPO + IcePop + MCLA, swap weights), and on-policy distillation as the same
//!   loop with a teacher per domain.
//! - [`eval`]: held-out pass rates of a checkpoint.
//! - [`pipeline`]: oracle rollouts -> SFT per domain -> RL per domain -> distillation ->
//!   held-out evaluation, each stage checkpointed and resumable; `arbor quickstart` is a
//!   small pipeline.
//! - [`results`]: `results.json`, the held-out table the pipeline writes and the report reads.
//! - [`report`]: the pipeline's Markdown report with learning curves.
//! - [`rlcheck`]: `arbor train rl-check`, the check that RL through this loop learns.
//!
//! The objectives themselves live in `arbor-train`, tree logic in `arbor-tree`, rollouts in
//! `arbor-rollout`: this crate only sequences them.

pub mod advantage;
pub mod config;
pub mod eval;
pub mod pipeline;
pub mod report;
pub mod results;
pub mod rl;
pub mod rlcheck;
pub mod rollouts;

pub use config::PipelineConfig;
pub use pipeline::{PipelineEvent, PipelineResults, run_pipeline};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// A bad pipeline file or stage setting.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing the output directory failed.
    #[error("i/o: {0}")]
    Io(String),
    /// Running rollouts failed (not a failed rollout: those are data).
    #[error("rollouts: {0}")]
    Rollout(String),
    /// A training step failed.
    #[error("training: {0}")]
    Train(String),
}

impl From<arbor_train::TrainError> for RecipeError {
    fn from(e: arbor_train::TrainError) -> Self {
        RecipeError::Train(e.to_string())
    }
}
impl From<arbor_model::ModelError> for RecipeError {
    fn from(e: arbor_model::ModelError) -> Self {
        RecipeError::Train(e.to_string())
    }
}
impl From<arbor_tree::TreeError> for RecipeError {
    fn from(e: arbor_tree::TreeError) -> Self {
        RecipeError::Train(format!("trajectory tree: {e}"))
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, RecipeError>;
