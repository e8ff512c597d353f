//! Container images for arbor sandboxes, without a container daemon.
//!
//! An image is a stack of layers plus a config (Env, WorkingDir, User,
//! Entrypoint, Cmd). The [`store`] keeps each layer unpacked exactly once in a
//! content-addressed cache, in overlayfs's own format (whiteouts as 0:0
//! character devices, opaque directories as `trusted.overlay.opaque=y`), so a
//! sandbox from an image is an overlay whose lower directories are the cached
//! layers: nothing is copied per sandbox.
//!
//! Layering: this crate depends on `arbor-sandbox` (builds run in sandboxes,
//! image sandboxes are local sandboxes with layers); the sandbox crate knows
//! nothing of images.

pub mod config;
pub mod dockerfile;
pub mod error;

pub mod archive;
pub mod digest;
pub mod platform;
pub mod store;
pub mod unpack;

pub mod pull;
pub mod registry;

pub mod backend;
pub mod bench;
pub mod build;

pub use config::{ImageConfig, ImageRecord};
pub use error::{ImageError, Result};

pub use digest::Digest;
pub use registry::{NoProgress, PullProgress, Registry, RegistryConfig};
pub use store::{LayerInfo, Lease, PruneReport, Store, StoreOptions, Usage};
