//! # arbor-rollout
//!
//! Puts the environment stack together: a task, a scaffold and a policy
//! become a scored, recorded rollout; thousands run at once; a run survives
//! crashes; external trainers ask for rollouts over HTTP.
//!
//! - [`record`]: one finished rollout (a line of `results.jsonl`).
//! - [`report`]: Markdown reports with plots from a run directory.

pub mod record;
pub mod report;

pub use record::{Failure, RolloutKey, RolloutResult, Status};
