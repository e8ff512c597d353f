//! A pool of warm sandboxes: creation is served from sandboxes built ahead
//! of time for the same spec, and the pool refills itself in the background.
//! The pool is a [`Backend`], so it drops in wherever one is expected.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{Backend, Result, Sandbox, SandboxSpec};

/// Warm sandboxes per spec, bounded in total.
pub struct Pool {
    backend: Arc<dyn Backend>,
    per_spec: usize,
    max_total: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    warm: HashMap<String, VecDeque<Box<dyn Sandbox>>>,
    /// Warm plus being built.
    total: usize,
    closed: bool,
}

impl Pool {
    /// Keep up to `per_spec` warm sandboxes for each spec seen, and at most
    /// `max_total` across all specs.
    pub fn new(backend: Arc<dyn Backend>, per_spec: usize, max_total: usize) -> Arc<Self> {
        Arc::new(Pool {
            backend,
            per_spec,
            max_total,
            state: Mutex::new(State::default()),
        })
    }

    /// Warm sandboxes ready now for `spec`.
    pub fn warm(&self, spec: &SandboxSpec) -> usize {
        self.state
            .lock()
            .map(|s| s.warm.get(&spec.pool_key()).map_or(0, |q| q.len()))
            .unwrap_or(0)
    }

    /// Build warm sandboxes for `spec` now (up to the bounds) and wait for them.
    pub async fn prefill(self: &Arc<Self>, spec: &SandboxSpec) -> Result<()> {
        while let Some(key) = self.reserve(spec) {
            match self.backend.create(spec).await {
                Ok(sb) => self.put(key, sb).await,
                Err(e) => {
                    self.release_reservation();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A sandbox for `spec`: a warm one if available, else a new one. Either
    /// way the pool starts refilling in the background.
    pub async fn get(self: &Arc<Self>, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        let key = spec.pool_key();
        let warm = self.state.lock().ok().and_then(|mut s| {
            let sb = s.warm.get_mut(&key)?.pop_front()?;
            s.total -= 1;
            Some(sb)
        });
        self.refill(spec);
        match warm {
            Some(sb) => Ok(sb),
            None => self.backend.create(spec).await,
        }
    }

    fn reserve(&self, spec: &SandboxSpec) -> Option<String> {
        let key = spec.pool_key();
        let mut s = self.state.lock().ok()?;
        let have = s.warm.get(&key).map_or(0, |q| q.len());
        if s.closed || have >= self.per_spec || s.total >= self.max_total {
            return None;
        }
        s.total += 1;
        Some(key)
    }

    fn release_reservation(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.total = s.total.saturating_sub(1);
        }
    }

    async fn put(&self, key: String, sb: Box<dyn Sandbox>) {
        let rejected = match self.state.lock() {
            Ok(mut s) if !s.closed => {
                s.warm.entry(key).or_default().push_back(sb);
                None
            }
            Ok(mut s) => {
                s.total = s.total.saturating_sub(1);
                Some(sb)
            }
            Err(_) => Some(sb),
        };
        if let Some(sb) = rejected {
            let _ = sb.destroy().await;
        }
    }

    fn refill(self: &Arc<Self>, spec: &SandboxSpec) {
        let Some(key) = self.reserve(spec) else {
            return;
        };
        let pool = self.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            let mut key = Some(key);
            while let Some(k) = key.take() {
                match pool.backend.create(&spec).await {
                    Ok(sb) => pool.put(k, sb).await,
                    Err(e) => {
                        tracing::warn!("pool refill failed: {e}");
                        pool.release_reservation();
                        return;
                    }
                }
                key = pool.reserve(&spec);
            }
        });
    }

    /// Destroy every warm sandbox and stop refilling.
    pub async fn close(&self) {
        let all: Vec<Box<dyn Sandbox>> = match self.state.lock() {
            Ok(mut s) => {
                s.closed = true;
                let v: Vec<_> = s.warm.drain().flat_map(|(_, q)| q).collect();
                s.total = s.total.saturating_sub(v.len());
                v
            }
            Err(_) => Vec::new(),
        };
        for sb in all {
            let _ = sb.destroy().await;
        }
        // Refills in flight destroy what they build once they see `closed`.
        for _ in 0..6000 {
            if self.state.lock().map(|s| s.total == 0).unwrap_or(true) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// A pool is itself a backend. `create` needs an `Arc<Pool>` to refill, so
/// the trait is implemented for the shared handle.
pub struct PoolBackend(pub Arc<Pool>);

#[async_trait]
impl Backend for PoolBackend {
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        self.0.get(spec).await
    }
}
