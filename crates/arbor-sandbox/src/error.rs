//! Errors of the sandbox layer. Each says whose fault it is: `Invalid` is the
//! caller's; everything else is infrastructure (retry elsewhere).

use crate::protocol::ProtocolError;

/// Result with [`SandboxError`].
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request or spec is not valid.
    #[error("invalid sandbox request: {0}")]
    Invalid(String),
    /// This machine or user cannot run this backend.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Building the sandbox failed.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The host is at one of its limits (open descriptors, processes, memory,
    /// the backend's maximum of live sandboxes): the sandbox was refused
    /// before anything was started. Retry later or on another host.
    #[error("host at its {limit} limit, sandbox refused before starting: {detail}")]
    AtLimit {
        /// Which limit: `open files`, `pids`, `threads`, `cgroup pids`, `memory`, `max live`.
        limit: &'static str,
        /// The numbers: what is in use, the limit, and what raises it.
        detail: String,
    },
    /// The sandbox no longer exists (destroyed, or its init died).
    #[error("sandbox {id} is gone: {reason}")]
    Gone { id: String, reason: String },
    /// A command could not be started inside (e.g. the sandbox's process
    /// limit is exhausted by what earlier commands left running).
    #[error("sandbox {id} could not start the command: {reason}")]
    Spawn { id: String, reason: String },
    /// A file operation inside the sandbox failed (missing file, permissions...).
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// A host-side system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The control channel to init failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the fault is the infrastructure's (retry may help), not the request's.
    pub fn is_infrastructure(&self) -> bool {
        !matches!(
            self,
            SandboxError::Invalid(_) | SandboxError::File { .. } | SandboxError::Spawn { .. }
        )
    }
}
