//! # arbor-node
//!
//! arbor's sandboxes beyond one machine. A *node* is one host running
//! `arbor node serve`: its sandbox [`Backend`](arbor_sandbox::Backend) over
//! HTTP ([`server`]), behind a mandatory bearer token and (off loopback)
//! TLS. The orchestrator reaches nodes through backends that implement the
//! same traits as the local one, so a run uses many machines with nothing
//! else changed:
//!
//! - [`remote::RemoteBackend`]: every sandbox on one node;
//! - [`cluster::ClusterBackend`]: many nodes (static addresses or a DNS name
//!   re-resolved periodically), placement by free capacity and cached
//!   images, forks on their parent's node, failed nodes marked down and
//!   health-checked back.
//!
//! Failures keep the sandbox layer's split: a node that cannot be reached
//! (refused, reset, timed out, cut off) or that refuses for capacity is an
//! *infrastructure* error ([`arbor_sandbox::SandboxError::is_infrastructure`]),
//! which the rollout orchestrator retries on another node; a request the
//! node judges invalid stays the caller's.
//!
//! The wire format is in [`protocol`].

pub mod bench;
pub mod cluster;
pub mod protocol;
pub mod remote;
pub mod server;
mod tls;
pub mod token;

pub use cluster::{ClusterBackend, ClusterConfig, NodeStatus};
pub use remote::{ClientOptions, RemoteBackend, RemoteSandbox};
pub use server::{NodeConfig, RunningNode};
