//! [`ImageBackend`]: the local sandbox backend with images. A spec that
//! names an image (`SandboxSpec::image`) is resolved here, pulled or built
//! on first use, into the spec the local backend understands: the image's
//! cached layers as overlay lower directories, its environment under the
//! spec's, its user and (when the spec leaves it empty) its working
//! directory. The sandbox holds a [`Lease`] on the layers for as long as it
//! (or any fork of it) lives, so eviction never pulls a layer from under it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arbor_sandbox::local::LocalBackend;
use arbor_sandbox::{
    Backend, ExecRequest, ExecResult, ImageSource, Result as SbResult, Sandbox, SandboxError,
    SandboxSpec,
};
use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::build::{BuildOptions, Builder, QuietBuild};
use crate::config::ImageRecord;
use crate::error::{ImageError, Result};
use crate::registry::{NoProgress, Registry, RegistryConfig};
use crate::store::{Lease, Store, StoreOptions};

/// Where images live and how they are fetched.
#[derive(Debug, Clone, Default)]
pub struct ImagesConfig {
    /// Store root (default [`Store::default_root`]).
    pub root: Option<PathBuf>,
    /// Disk budget of unpacked layers, bytes (None: unbounded).
    pub max_bytes: Option<u64>,
    /// Registries: insecure hosts, mirrors, credentials.
    pub registry: RegistryConfig,
    /// Give Dockerfile RUN steps the host's network (`docker build` has it).
    pub build_network_host: bool,
}

/// The local backend plus an image store: `Backend::create` accepts specs
/// with an image.
pub struct ImageBackend {
    local: LocalBackend,
    store: Arc<Store>,
    registry: Arc<Registry>,
    build_network_host: bool,
    /// One resolution per source at a time; Dockerfile builds are resolved
    /// once per process (a rebuild would find every step cached anyway).
    resolving: Mutex<HashMap<ImageSource, Arc<Mutex<Option<ImageRecord>>>>>,
}

impl ImageBackend {
    /// Open the store and registry client over a local backend.
    pub fn new(local: LocalBackend, cfg: &ImagesConfig) -> Result<Self> {
        let root = cfg.root.clone().unwrap_or_else(Store::default_root);
        let store = Store::open(
            root,
            StoreOptions {
                max_bytes: cfg.max_bytes,
            },
        )?;
        Ok(ImageBackend {
            local,
            store: Arc::new(store),
            registry: Arc::new(Registry::new(cfg.registry.clone())?),
            build_network_host: cfg.build_network_host,
            resolving: Mutex::new(HashMap::new()),
        })
    }

    /// The image store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The registry client.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The local backend underneath.
    pub fn local(&self) -> &LocalBackend {
        &self.local
    }

    /// The image a source names, pulled or built if needed.
    pub async fn resolve(&self, source: &ImageSource) -> Result<ImageRecord> {
        let slot = {
            let mut map = self.resolving.lock().await;
            map.entry(source.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(record) = slot.as_ref()
            && self.store.lease(record).is_ok()
        {
            return Ok(record.clone());
        }
        let record = match source {
            ImageSource::Reference(r) => self.registry.ensure(&self.store, r, &NoProgress).await?,
            ImageSource::Dockerfile { context, file } => {
                self.build(context.clone(), file.clone()).await?
            }
        };
        *slot = Some(record.clone());
        Ok(record)
    }

    async fn build(&self, context: PathBuf, file: PathBuf) -> Result<ImageRecord> {
        let canonical = context
            .canonicalize()
            .map_err(|e| ImageError::io(format!("build context {}", context.display()), e))?;
        let name = crate::digest::Digest::sha256(
            format!("{}\n{}", canonical.display(), file.display()).as_bytes(),
        );
        let opts = BuildOptions {
            context: canonical,
            dockerfile: file,
            tag: format!("arbor-build/{}:latest", &name.hex()[..16]),
            network_host: self.build_network_host,
            build_args: Default::default(),
            no_cache: false,
        };
        let builder = Builder::new(&self.store, &self.registry, &self.local, &QuietBuild);
        Ok(builder.build(&opts).await?.image)
    }

    /// `spec` made concrete for `image`, and the lease that keeps its layers.
    pub fn image_spec(
        &self,
        image: &ImageRecord,
        spec: &SandboxSpec,
    ) -> Result<(SandboxSpec, Lease)> {
        let lease = self.store.lease(image)?;
        Ok((apply_image(image, &lease, spec), lease))
    }
}

/// The spec with the image applied: its layers, its Env under the spec's,
/// its User unless the spec names one, its WorkingDir when the spec's is empty.
pub fn apply_image(image: &ImageRecord, lease: &Lease, spec: &SandboxSpec) -> SandboxSpec {
    let mut out = spec.clone();
    out.image = None;
    out.rootfs = None;
    out.layers = lease.layer_dirs();
    let mut env: std::collections::BTreeMap<String, String> =
        image.config.env_pairs().into_iter().collect();
    env.extend(spec.env.clone());
    out.env = env;
    if out.user.is_none() && !image.config.user.is_empty() {
        out.user = Some(image.config.user.clone());
    }
    if out.workdir.is_empty() {
        out.workdir = match image.config.working_dir.as_str() {
            "" => "/".to_string(),
            w => w.to_string(),
        };
    }
    out
}

fn to_sandbox_error(e: ImageError) -> SandboxError {
    match e {
        ImageError::Sandbox(e) => e,
        e if e.is_infrastructure() => SandboxError::Setup(e.to_string()),
        e => SandboxError::Invalid(e.to_string()),
    }
}

#[async_trait]
impl Backend for ImageBackend {
    async fn create(&self, spec: &SandboxSpec) -> SbResult<Box<dyn Sandbox>> {
        let Some(source) = &spec.image else {
            return self.local.create(spec).await;
        };
        let image = self.resolve(source).await.map_err(to_sandbox_error)?;
        let (spec, lease) = self.image_spec(&image, spec).map_err(to_sandbox_error)?;
        let inner = self.local.create(&spec).await?;
        Ok(Box::new(ImageSandbox::new(inner, lease)))
    }
}

/// A sandbox over image layers; holds the lease that pins them until it is
/// destroyed.
pub struct ImageSandbox {
    inner: Box<dyn Sandbox>,
    lease: std::sync::Mutex<Option<Lease>>,
}

impl ImageSandbox {
    fn new(inner: Box<dyn Sandbox>, lease: Lease) -> Self {
        ImageSandbox {
            inner,
            lease: std::sync::Mutex::new(Some(lease)),
        }
    }
}

#[async_trait]
impl Sandbox for ImageSandbox {
    fn id(&self) -> &str {
        self.inner.id()
    }
    async fn exec(&self, req: ExecRequest) -> SbResult<ExecResult> {
        self.inner.exec(req).await
    }
    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> SbResult<()> {
        self.inner.write_file(path, data, mode).await
    }
    async fn read_file(&self, path: &str) -> SbResult<Vec<u8>> {
        self.inner.read_file(path).await
    }
    async fn write_tar(&self, dest: &str, archive: Vec<u8>) -> SbResult<()> {
        self.inner.write_tar(dest, archive).await
    }
    async fn read_tar(&self, path: &str) -> SbResult<Vec<u8>> {
        self.inner.read_tar(path).await
    }
    async fn fork(&self) -> SbResult<Box<dyn Sandbox>> {
        let lease = self.lease.lock().ok().and_then(|l| l.clone());
        let Some(lease) = lease else {
            return Err(SandboxError::Gone {
                id: self.id().to_string(),
                reason: "destroyed".into(),
            });
        };
        Ok(Box::new(ImageSandbox::new(self.inner.fork().await?, lease)))
    }
    async fn destroy(&self) -> SbResult<()> {
        let result = self.inner.destroy().await;
        if let Ok(mut lease) = self.lease.lock() {
            lease.take();
        }
        result
    }
}
