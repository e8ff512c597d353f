//! # arbor-rollout
//!
//! Puts the environment stack together: a task, a scaffold and a policy
//! become a scored, recorded rollout; thousands run at once; a run survives
//! crashes; external trainers ask for rollouts over HTTP.
//!
//! - [`experiment`]: the experiment file (TOML); [`backend`]: where its
//!   sandboxes live (this host or a cluster of nodes).
//! - [`runner`]: the orchestrator (`arbor run`): plan, bounded concurrency,
//!   retries, failure classes, resume.
//! - [`store`]: the run directory, written crash-safely.
//! - [`record`]: one finished rollout (a line of `results.jsonl`).
//! - [`oracle`]: the `scripted-oracle` policy's scripts from task oracles.
//! - [`live`]: counting live sandboxes.
//! - [`summary`]: the end-of-run JSON object.
//! - [`server`]: the env server (`arbor serve`) for external trainers.
//! - [`report`]: Markdown reports with plots from a run directory.

pub mod backend;
pub mod error;
pub mod experiment;
pub mod live;
pub mod oracle;
pub mod plot;
pub mod record;
pub mod report;
pub mod runner;
pub mod server;
pub mod store;
pub mod summary;

pub use error::RolloutError;
pub use experiment::Experiment;
pub use record::{Failure, RolloutKey, RolloutResult, Status};
pub use runner::{Progress, RunOptions, run};
pub use summary::Summary;
