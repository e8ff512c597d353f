//! Errors of the task layer. Loading errors name the file and the field at
//! fault; run errors say whether the fault is the infrastructure's.

use arbor_sandbox::SandboxError;

/// Result with [`TaskError`].
pub type Result<T, E = TaskError> = std::result::Result<T, E>;

/// What went wrong while loading, preparing or grading a task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A task file is malformed: `file` and `field` say where.
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        /// The file (or `file:line` for JSONL) at fault.
        file: String,
        /// Dotted path of the field at fault (`-` when the file as a whole is).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The task needs a container image and the backend has no image store.
    #[error(
        "task {task}: needs {reason}, but the sandbox backend has no image store \
         (use the image backend, or pass the allow-default-rootfs option to run it on the \
         default rootfs anyway)"
    )]
    NeedsOci {
        /// Task id.
        task: String,
        /// Which image or Dockerfile it needs.
        reason: String,
    },
    /// Preparing the task's environment failed (setup script, uploads).
    #[error("task {task}: environment setup failed: {message}")]
    Setup {
        /// Task id.
        task: String,
        /// What failed.
        message: String,
    },
    /// A sandbox operation failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Anything else (bad option, unknown domain...).
    #[error("{0}")]
    Other(String),
}

impl TaskError {
    /// Shorthand for [`TaskError::Invalid`].
    pub fn invalid(
        file: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        TaskError::Invalid {
            file: file.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`TaskError::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TaskError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the fault is the infrastructure's (a retry elsewhere may
    /// succeed), not the task's or the caller's.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            TaskError::Sandbox(e) => e.is_infrastructure(),
            TaskError::Io { .. } | TaskError::Setup { .. } => true,
            _ => false,
        }
    }
}
