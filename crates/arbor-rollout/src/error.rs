//! Errors of the orchestrator (a rollout's own failures are results, not errors).

/// What stops a run from starting or continuing.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The experiment file is malformed or inconsistent.
    #[error("experiment {file}: {message}")]
    Experiment { file: String, message: String },
    /// Loading tasks failed.
    #[error(transparent)]
    Task(#[from] arbor_task::TaskError),
    /// The run directory is unusable or belongs to another experiment.
    #[error("run directory {dir}: {message}")]
    RunDir { dir: String, message: String },
    /// A sandbox backend could not be set up.
    #[error(transparent)]
    Sandbox(#[from] arbor_sandbox::SandboxError),
    /// The gateway could not start.
    #[error(transparent)]
    Gateway(#[from] arbor_gateway::error::GatewayError),
    /// A file operation failed. (The cause is in the message, not exposed
    /// as `source`, so `{:#}` chains print it once.)
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    /// Anything else, with its cause.
    #[error("{0}")]
    Other(String),
}

impl RolloutError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RolloutError::Io {
            context: context.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = RolloutError> = std::result::Result<T, E>;
