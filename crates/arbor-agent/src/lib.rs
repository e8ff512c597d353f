//! # arbor-agent
//!
//! Agent scaffolds: the loop that turns a task instruction into model calls
//! and sandbox actions. Scaffolds never talk to a model directly: they call
//! an OpenAI-compatible endpoint (in arbor, the gateway's session URL), so
//! every call is recorded.
//!
//! - [`scaffold::bash::BashScaffold`]: one shell command per turn in a fenced
//!   block (in the spirit of mini-swe-agent); output comes back as the next
//!   user message; ends on `submit` or the step limit.
//! - [`scaffold::tools::ToolsScaffold`]: OpenAI function calling with `bash`,
//!   a file editor and `submit`.
//! - [`policy::scripted::ScriptedPolicy`]: an OpenAI-compatible server that
//!   replays a fixed list of actions per task through either protocol; it
//!   exists to test and load the infrastructure (reports must label it).

pub mod client;
pub mod error;
pub mod policy;
pub mod scaffold;

pub use client::{ChatClient, ChatMessage, ChatResponse, ToolCall};
pub use error::AgentError;
pub use scaffold::{ContextPolicy, EpisodeOutcome, Scaffold, ScaffoldConfig, StopReason};
