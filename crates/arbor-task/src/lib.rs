//! # arbor-task
//!
//! Tasks, the datasets they come from, and the verifiers that score them.
//!
//! - [`model`]: the task model (`id`, `domain`, `instruction`, `environment`,
//!   `verifier`, `oracle`, `metadata`). arbor's native task format is its
//!   serialization (see `docs/tasks.md`).
//! - [`dataset`]: the [`Dataset`] trait and source detection; adapters for the
//!   native format, [`swebench`] JSONL (with predictions) and [`harbor`] task folders.
//! - [`verify`]: verifiers (exit status, reward file, test suite with
//!   FAIL_TO_PASS / PASS_TO_PASS, answer match, LLM judge, weighted
//!   composites) and the hardened [`grade`] step.
//! - [`run`]: preparing a task's sandbox and applying solutions.
//! - [`domains`]: five built-in task domains generated from a seed.
//! - [`check`]: oracle-must-pass / null-must-fail validation of a task set.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use arbor_task::{check, domains};
//! let tasks = domains::generate("terminal", 10, 1, &domains::GenOptions::default())?;
//! let backend = Arc::new(arbor_sandbox::local::LocalBackend::with_defaults()?);
//! let report = check::check(backend, tasks, &check::CheckOptions::default()).await;
//! assert_eq!(report.oracle_pass, report.tasks);
//! # Ok(()) }
//! ```

pub mod check;
pub mod dataset;
pub mod domains;
mod error;
pub mod harbor;
mod hash;
pub mod model;
pub mod run;
mod sandbox;
mod source;
pub mod swebench;
pub mod verify;

pub use check::{CheckOptions, CheckReport, check};
pub use dataset::{Dataset, OpenOptions, list, load, open};
pub use domains::{GenOptions, Split, gen_to_dir, generate};
pub use error::{Result, TaskError};
pub use model::{Environment, FileSpec, Solution, Task, TaskSummary};
pub use run::{PrepareOptions, prepare, run_solution};
pub use verify::{Fault, GradeMode, GradeOptions, VerifierResult, VerifierSpec, grade};
