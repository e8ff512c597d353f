//! Errors of a scaffold run, classified like everything else in arbor:
//! infrastructure (retry elsewhere) versus the agent's own failure.

use arbor_sandbox::SandboxError;

/// What stopped an episode abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The model endpoint failed (unreachable, HTTP error, unparseable reply).
    #[error("model call failed: {0}")]
    Model(String),
    /// The sandbox failed underneath the agent.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

impl AgentError {
    /// True when the fault is the infrastructure's, not the agent's.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            AgentError::Model(_) => true,
            AgentError::Sandbox(e) => e.is_infrastructure(),
        }
    }
}
