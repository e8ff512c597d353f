//! Errors of the image layer. Each says whose fault it is, so a task that
//! needs an image can report a failed pull or build as infrastructure and a
//! malformed image or Dockerfile as the input's.

/// Result with [`ImageError`].
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An image reference, archive, manifest, config or layer is malformed or
    /// hostile (a path escaping the layer, a digest mismatch).
    #[error("invalid image: {0}")]
    Invalid(String),
    /// No such image in the store (and it was not asked to be pulled).
    #[error("image {0} is not in the store (pull, load or build it first)")]
    NotFound(String),
    /// A registry refused or failed a request.
    #[error("registry: {0}")]
    Registry(String),
    /// A Dockerfile cannot be built: `file:line: message`.
    #[error("{file}:{line}: {message}")]
    Build {
        file: String,
        line: usize,
        message: String,
    },
    /// A host-side file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A sandbox operation (builds, image sandboxes) failed.
    #[error(transparent)]
    Sandbox(#[from] arbor_sandbox::SandboxError),
}

impl ImageError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the fault lies with the environment (network, registry, disk)
    /// rather than the image or Dockerfile given: such failures are
    /// infrastructure errors for a rollout and may be retried.
    pub fn is_infrastructure(&self) -> bool {
        matches!(
            self,
            ImageError::Registry(_) | ImageError::Io { .. } | ImageError::Sandbox(_)
        )
    }
}
