//! The local backend: sandboxes on this Linux machine, from namespaces,
//! overlayfs, cgroups and seccomp. Requires root (see ARCHITECTURE.md for the
//! rootless plan).
//!
//! Per sandbox the host holds: one init process (PID 1 of its namespaces),
//! one directory `<state_root>/sb/<id>/` with a `state.json` for gc and an
//! empty `fs/` mount point (the sandbox's private tmpfs is mounted there only
//! inside its own mount namespace), and its cgroups. Mounts never appear in
//! the host namespace, so a dead sandbox cannot leave one behind.
//!
//! Modules: `backend` (settings, [`LocalBackend`] and its constructor),
//! `sandbox` (creating a sandbox, the [`LocalSandbox`] handle, teardown),
//! `control` (the control channel to init), `exec` (running one child of
//! init: cgroup, pipes, timeout, capped output), `validate` (refusing bad
//! specs), [`limits`] (refusing a start at the host's limits), and the host-side helpers `spawn` and `spawner` (starting inits), `mask`, [`cgroup`], `bridge`
//! and [`gc`].

mod backend;
mod bridge;
pub mod cgroup;
mod control;
mod exec;
pub mod gc;
pub mod limits;
mod mask;
mod sandbox;
pub(crate) mod spawn;
mod spawner;
mod validate;

pub use backend::{LocalBackend, LocalConfig, allow_self_as_init, find_init};
pub use sandbox::LocalSandbox;
