//! Counting live sandboxes: a [`Backend`] wrapper that tracks how many
//! sandboxes it (and forks of them) has created and not yet destroyed, and
//! the peak. Reported as `peak_live_sandboxes`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use arbor_sandbox::{Backend, ExecRequest, ExecResult, Result, Sandbox, SandboxSpec};
use async_trait::async_trait;

/// Live and peak counts, shared by every sandbox of a [`CountingBackend`].
#[derive(Debug, Default)]
pub struct LiveCount {
    live: AtomicI64,
    peak: AtomicI64,
}

impl LiveCount {
    fn up(&self) {
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
    fn down(&self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
    /// Sandboxes alive now.
    pub fn live(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }
    /// The most alive at once so far.
    pub fn peak(&self) -> i64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Wraps a backend; every sandbox it hands out is counted until destroyed.
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    count: Arc<LiveCount>,
}

impl CountingBackend {
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        CountingBackend {
            inner,
            count: Arc::default(),
        }
    }
    /// The shared counters.
    pub fn count(&self) -> Arc<LiveCount> {
        self.count.clone()
    }
}

#[async_trait]
impl Backend for CountingBackend {
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        let sb = self.inner.create(spec).await?;
        Ok(Box::new(Counted::new(sb, self.count.clone())))
    }
}

struct Counted {
    inner: Box<dyn Sandbox>,
    count: Arc<LiveCount>,
    destroyed: AtomicBool,
}

impl Counted {
    fn new(inner: Box<dyn Sandbox>, count: Arc<LiveCount>) -> Self {
        count.up();
        Counted {
            inner,
            count,
            destroyed: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Sandbox for Counted {
    fn id(&self) -> &str {
        self.inner.id()
    }
    async fn exec(&self, req: ExecRequest) -> Result<ExecResult> {
        self.inner.exec(req).await
    }
    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.inner.write_file(path, data, mode).await
    }
    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.inner.read_file(path).await
    }
    async fn write_tar(&self, dest: &str, archive: Vec<u8>) -> Result<()> {
        self.inner.write_tar(dest, archive).await
    }
    async fn read_tar(&self, path: &str) -> Result<Vec<u8>> {
        self.inner.read_tar(path).await
    }
    async fn fork(&self) -> Result<Box<dyn Sandbox>> {
        let child = self.inner.fork().await?;
        Ok(Box::new(Counted::new(child, self.count.clone())))
    }
    async fn destroy(&self) -> Result<()> {
        let r = self.inner.destroy().await;
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            self.count.down();
        }
        r
    }
}
