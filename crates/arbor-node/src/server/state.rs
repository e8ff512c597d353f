//! The node's sandboxes: the registry by id, capacity reservations, which
//! sandboxes are busy, idle leases, and draining.
//!
//! A create reserves a slot before any work starts, so concurrent creates
//! can never overshoot `capacity`; the slot becomes the sandbox or is
//! released when dropped. A created sandbox's first fork (a rollout's
//! grading copy) is admitted even past `capacity`: a node full of rollouts
//! that each need one fork to finish would otherwise refuse every one of
//! them, and no rollout could free its room (at most twice `capacity`
//! live). An operation checks a sandbox out for its duration (busy
//! sandboxes are never reaped) and touches its lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arbor_sandbox::{Backend, Sandbox};

use crate::protocol::{Capacity, ErrorBody, ErrorKind};

/// Image references the node has cached, asked for on every `/v1/capacity`.
pub type ImagesFn = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

struct Entry {
    sb: Arc<dyn Sandbox>,
    last_used: Instant,
    busy: usize,
    /// The sandbox it is a fork of.
    parent: Option<String>,
    /// Its forks, alive or being made.
    forks: usize,
}

#[derive(Default)]
struct Registry {
    sandboxes: HashMap<String, Entry>,
    reserved: usize,
}

impl Registry {
    /// Whether a fork of `parent` is admitted past capacity: the first
    /// fork of a sandbox that is not itself a fork.
    fn first_fork(&self, parent: &str) -> bool {
        self.sandboxes
            .get(parent)
            .is_some_and(|e| e.parent.is_none() && e.forks == 0)
    }

    fn add_fork(&mut self, parent: Option<&str>, delta: isize) {
        if let Some(e) = parent.and_then(|p| self.sandboxes.get_mut(p)) {
            e.forks = e.forks.saturating_add_signed(delta);
        }
    }

    /// Takes `id` out, releasing its place among its parent's forks.
    fn take(&mut self, id: &str) -> Option<Arc<dyn Sandbox>> {
        let e = self.sandboxes.remove(id)?;
        self.add_fork(e.parent.as_deref(), -1);
        Some(e.sb)
    }
}

/// Everything the routes share.
pub(crate) struct State {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) token: String,
    pub(crate) heartbeat: Duration,
    capacity: usize,
    images: Option<ImagesFn>,
    registry: Mutex<Registry>,
    draining: AtomicBool,
    created: AtomicU64,
    refused: AtomicU64,
}

impl State {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        token: String,
        capacity: usize,
        heartbeat: Duration,
        images: Option<ImagesFn>,
    ) -> Self {
        State {
            backend,
            token,
            heartbeat,
            capacity,
            images,
            registry: Mutex::new(Registry::default()),
            draining: AtomicBool::new(false),
            created: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the map consistent (every
        // update is one insert or remove), so a poisoned lock is usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves room for one more sandbox, a fork of `fork_of` if given. A
    /// fork is allowed while draining so rollouts already running can still
    /// be graded, and past capacity if it is its parent's first (module docs).
    pub(crate) fn reserve(self: &Arc<Self>, fork_of: Option<&str>) -> Result<Slot, ErrorBody> {
        if fork_of.is_none() && self.draining.load(Ordering::SeqCst) {
            return Err(ErrorBody::new(
                ErrorKind::Draining,
                "the node is draining (shutting down) and takes no new sandboxes",
            ));
        }
        let mut r = self.registry();
        let live = r.sandboxes.len() + r.reserved;
        if live >= self.capacity && !fork_of.is_some_and(|p| r.first_fork(p)) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ErrorBody::new(
                ErrorKind::Capacity,
                format!(
                    "the node is at capacity: {live} live sandboxes of {}",
                    self.capacity
                ),
            ));
        }
        r.reserved += 1;
        r.add_fork(fork_of, 1);
        Ok(Slot {
            state: self.clone(),
            parent: fork_of.map(str::to_string),
            used: false,
        })
    }

    /// Checks a sandbox out for one operation.
    pub(crate) fn checkout(self: &Arc<Self>, id: &str) -> Result<Busy, ErrorBody> {
        let mut r = self.registry();
        let Some(e) = r.sandboxes.get_mut(id) else {
            let mut b = ErrorBody::new(ErrorKind::Gone, "no such sandbox on this node");
            b.id = Some(id.to_string());
            return Err(b);
        };
        e.busy += 1;
        e.last_used = Instant::now();
        Ok(Busy {
            state: self.clone(),
            id: id.to_string(),
            sb: e.sb.clone(),
        })
    }

    /// Takes a sandbox out of the registry (to destroy it).
    pub(crate) fn remove(&self, id: &str) -> Option<Arc<dyn Sandbox>> {
        self.registry().take(id)
    }

    /// Takes out every sandbox idle (and not busy) for longer than `ttl`.
    pub(crate) fn take_idle(&self, ttl: Duration) -> Vec<Arc<dyn Sandbox>> {
        let mut r = self.registry();
        let idle: Vec<String> = r
            .sandboxes
            .iter()
            .filter(|(_, e)| e.busy == 0 && e.last_used.elapsed() > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        idle.iter().filter_map(|id| r.take(id)).collect()
    }

    /// Takes out every sandbox.
    pub(crate) fn take_all(&self) -> Vec<Arc<dyn Sandbox>> {
        self.registry()
            .sandboxes
            .drain()
            .map(|(_, e)| e.sb)
            .collect()
    }

    /// Sandboxes alive or being created.
    pub(crate) fn live(&self) -> usize {
        let r = self.registry();
        r.sandboxes.len() + r.reserved
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The `/v1/capacity` answer.
    pub(crate) fn capacity(&self) -> Capacity {
        Capacity {
            live: self.live(),
            capacity: self.capacity,
            draining: self.draining(),
            created: self.created.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            images: self.images.as_ref().map(|f| f()).unwrap_or_default(),
        }
    }
}

/// Room for one sandbox; released unless [`Slot::fill`]ed.
pub(crate) struct Slot {
    state: Arc<State>,
    /// The sandbox this slot is a fork of.
    parent: Option<String>,
    used: bool,
}

impl Slot {
    /// The reserved room now holds `sb`; returns its id.
    pub(crate) fn fill(mut self, sb: Box<dyn Sandbox>) -> String {
        let id = sb.id().to_string();
        let mut r = self.state.registry();
        r.reserved -= 1;
        r.sandboxes.insert(
            id.clone(),
            Entry {
                sb: Arc::from(sb),
                last_used: Instant::now(),
                busy: 0,
                parent: self.parent.clone(),
                forks: 0,
            },
        );
        self.used = true;
        self.state.created.fetch_add(1, Ordering::Relaxed);
        id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.used {
            let mut r = self.state.registry();
            r.reserved -= 1;
            r.add_fork(self.parent.as_deref(), -1);
        }
    }
}

/// A sandbox checked out for one operation.
pub(crate) struct Busy {
    state: Arc<State>,
    id: String,
    pub(crate) sb: Arc<dyn Sandbox>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.state.registry().sandboxes.get_mut(&self.id) {
            e.busy -= 1;
            e.last_used = Instant::now();
        }
    }
}
