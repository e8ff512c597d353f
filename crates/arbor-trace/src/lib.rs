//! `arbor-trace`: arbor's recorded data, for everything that reads it.
//!
//! The gateway (`arbor-gateway`) records every model call of a session durably, at token level.
//! This crate is that record and what is read from it, with none of the serving stack (no HTTP,
//! no tokenizer, no async runtime), so the crates that consume recorded tokens (the trainer,
//! the embedded policy, the recipe, the scripted oracle) do not depend on the gateway:
//!
//! - [`record`]: the call record format ([`CallRecord`]: the request, the upstream's answer,
//!   token ids and behaviour logprobs per choice, branch detection), one JSON line per call.
//! - [`store`]: a gateway store directory (`calls.jsonl`) read back, read-only.
//! - [`session`]: a session's calls as `arbor_tree::Sequence`s (prompt without loss, completion
//!   with loss) and as a prefix tree; [`store_sequences`] for a whole store.
//! - [`run`]: a rollout run directory (`results.jsonl` + `gateway/`) read back: each rollout
//!   result joined with its session's sequences ([`read_run`]). The SFT stage
//!   (`arbor-train`) and the recipe's RL episodes (`arbor-recipe`) both read runs through it.
//! - [`byte_chat`]: the byte-level chat format (token id = byte) that the scripted oracle
//!   (`arbor-agent`) answers in and the embedded policy (`arbor-policy`) is served with, so an
//!   oracle trajectory is token for token training data for the embedded model.
//!
//! The gateway re-exports these modules under their old paths (`arbor_gateway::record`,
//! `arbor_gateway::tree`, `arbor_gateway::tokenize::byte_chat`).

pub mod byte_chat;
pub mod record;
pub mod run;
pub mod session;
pub mod store;

use std::path::PathBuf;

pub use record::{Api, CallRecord};
pub use run::{RunData, RunRollout, read_run};
pub use session::{session_sequences, store_sequences};

/// Errors reading recorded data.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a log is not what it should be (and is not a torn last line).
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the parser said.
        message: String,
    },
}
