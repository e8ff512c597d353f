//! # arbor-sandbox
//!
//! Isolated sandboxes for agent rollouts: create one from a [`SandboxSpec`],
//! run many commands in it ([`Sandbox::exec`]), move files in and out, fork
//! it, destroy it. Every later part of arbor (tasks, verifiers, scaffolds,
//! rollouts) executes code through the [`Sandbox`] and [`Backend`] traits.
//!
//! The [`local`] backend builds sandboxes from Linux primitives: fresh mount,
//! PID, network, UTS and IPC namespaces; an overlayfs root whose writable
//! layer is a private size-limited tmpfs; cgroups for memory, processes and
//! CPU (v1 or v2); dropped capabilities, `no_new_privs` and a seccomp filter
//! for every process inside. [`pool::Pool`] keeps warm sandboxes per spec.
//!
//! Container images stay outside this crate: a spec names their unpacked
//! layers as plain overlay lower directories ([`SandboxSpec::layers`]) and
//! the user to run as ([`SandboxSpec::user`]); an image build captures a
//! step through [`local::LocalSandbox::writable_layer`] and [`copy_layer`].
//!
//! ```no_run
//! # async fn demo() -> arbor_sandbox::Result<()> {
//! use arbor_sandbox::{Backend, ExecRequest, Sandbox, SandboxSpec, local::LocalBackend};
//! let backend = LocalBackend::with_defaults()?;
//! let sb = backend.create(&SandboxSpec::default()).await?;
//! let out = sb.exec(ExecRequest::shell("echo hi > f && cat f")).await?;
//! assert_eq!(out.stdout_str(), "hi\n");
//! sb.destroy().await?;
//! # Ok(()) }
//! ```
//!
//! Binaries that use the local backend should call
//! [`init::is_init_invocation`] first thing in `main` (see the `arbor` CLI),
//! or ship the `arbor-sandbox-init` program next to themselves.

pub mod bench;
mod error;
pub mod init;
pub mod local;
pub mod pool;
pub mod protocol;
mod spec;

use async_trait::async_trait;

pub use error::{Result, SandboxError};
pub use init::copy_layer;
pub use spec::{
    Bind, BindMode, ExecRequest, ExecResult, ImageSource, Limits, NetworkSpec, SandboxSpec,
    TcpBridge, UnixBridge,
};

/// A live sandbox. Safe to share between tasks; commands may run concurrently.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// Unique id.
    fn id(&self) -> &str;

    /// Run one command to completion (or its timeout, which kills its whole
    /// process tree). Processes it leaves in the background keep running.
    async fn exec(&self, req: ExecRequest) -> Result<ExecResult>;

    /// Write a file (parent directories created).
    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()>;

    /// Read a whole file.
    async fn read_file(&self, path: &str) -> Result<Vec<u8>>;

    /// Unpack a tar archive into directory `dest` (created).
    async fn write_tar(&self, dest: &str, archive: Vec<u8>) -> Result<()>;

    /// A tar archive of a file or directory (entries relative to it).
    async fn read_tar(&self, path: &str) -> Result<Vec<u8>>;

    /// A new sandbox starting from this one's current filesystem state.
    /// Processes are not copied; the two are independent afterwards.
    async fn fork(&self) -> Result<Box<dyn Sandbox>>;

    /// Kill everything and release every resource. Idempotent.
    async fn destroy(&self) -> Result<()>;
}

/// Something that creates sandboxes.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Create a sandbox from a spec.
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>>;
}

/// Pack a host directory into a tar archive (for [`Sandbox::write_tar`]).
pub fn tar_directory(dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)?;
    b.into_inner()
}

/// Unpack an archive from [`Sandbox::read_tar`] into a host directory.
pub fn untar_into(archive: &[u8], dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    tar::Archive::new(archive).unpack(dir)
}
