//! `arbor image build`: Dockerfiles built in arbor sandboxes.
//!
//! Each stage starts from its FROM image's layers. A RUN or COPY/ADD step runs
//! in a sandbox whose lower layers are the stage's layers so far; the
//! sandbox's writable layer (overlay upper, already in the cache's format) is
//! then committed as the step's layer. Every step, including the ones that
//! only change the config, has a cache key: the hash of (the parent's key,
//! the instruction, its inputs: build arguments, and for COPY/ADD the content
//! of what is copied). A rebuild whose prefix is unchanged finds each key's
//! result in `<store>/build-cache/` and runs nothing.
//!
//! Network during RUN is off unless the caller asks for the host's network
//! (`--network host`), since sandboxes have none by default.

mod cache;
mod context;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use arbor_sandbox::local::LocalBackend;

use crate::config::{ImageConfig, ImageRecord};
use crate::digest::Digest;
use crate::dockerfile::{self, Dockerfile, Stage, Step};
use crate::error::{ImageError, Result};
use crate::registry::{NoProgress, Registry};
use crate::store::{Lease, Store};

pub use cache::BuildCache;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The build context directory (COPY/ADD sources are relative to it).
    pub context: PathBuf,
    /// The Dockerfile (relative paths are under the context).
    pub dockerfile: PathBuf,
    /// Reference the result is stored under.
    pub tag: String,
    /// Give RUN steps the host's network (`--network host`).
    pub network_host: bool,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// Ignore the build cache (results are still written to it).
    pub no_cache: bool,
}

/// Progress of a build, for a terminal or a log.
pub trait BuildProgress: Send + Sync {
    /// Step `n` of `total` starts (`cached`: its result came from the cache).
    fn step(&self, n: usize, total: usize, text: &str, cached: bool);
}

/// Prints nothing.
pub struct QuietBuild;

impl BuildProgress for QuietBuild {
    fn step(&self, _: usize, _: usize, _: &str, _: bool) {}
}

/// What a build did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    /// The stored image.
    pub image: ImageRecord,
    /// Steps in all stages.
    pub steps: usize,
    /// Steps whose result came from the cache.
    pub cached_steps: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The state of a stage after some steps: what the next step builds on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// Cache key of everything so far.
    pub key: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Digest>,
    /// Image config so far.
    pub config: ImageConfig,
    /// Build arguments in scope (ARG), with their values.
    pub args: BTreeMap<String, String>,
    /// SHELL.
    pub shell: Vec<String>,
}

impl State {
    /// Variables for expansion: ENV over ARG.
    pub fn vars(&self) -> BTreeMap<String, String> {
        let mut v = self.args.clone();
        v.extend(self.config.env_pairs());
        v
    }

    /// The state as an image record (for leases and the final result).
    pub fn record(&self, reference: &str) -> ImageRecord {
        ImageRecord {
            reference: reference.to_string(),
            id: self.key.to_string(),
            manifest_digest: None,
            layers: self.layers.iter().map(Digest::to_string).collect(),
            config: self.config.clone(),
            created: now_secs(),
        }
    }
}

/// Builds Dockerfiles into a store.
pub struct Builder<'a> {
    pub(crate) store: &'a Store,
    pub(crate) registry: &'a Registry,
    pub(crate) backend: &'a LocalBackend,
    pub(crate) progress: &'a dyn BuildProgress,
}

/// Everything a build holds while it runs.
pub(crate) struct Run<'o> {
    pub opts: &'o BuildOptions,
    pub file: String,
    pub cache: BuildCache,
    /// Finished stages by name and index, for `FROM stage` and `COPY --from`.
    pub stages: Vec<(Option<String>, State)>,
    /// Pins every layer the build has used until it ends.
    pub leases: Vec<Lease>,
    pub step_no: usize,
    pub total: usize,
    pub cached: usize,
}

impl<'a> Builder<'a> {
    /// A builder over a store, a registry (for FROM images not yet stored)
    /// and the local sandbox backend (RUN and COPY steps).
    pub fn new(
        store: &'a Store,
        registry: &'a Registry,
        backend: &'a LocalBackend,
        progress: &'a dyn BuildProgress,
    ) -> Self {
        Builder {
            store,
            registry,
            backend,
            progress,
        }
    }

    /// Build and store the image; returns what happened.
    pub async fn build(&self, opts: &BuildOptions) -> Result<BuildReport> {
        let started = Instant::now();
        let path = if opts.dockerfile.is_absolute() {
            opts.dockerfile.clone()
        } else {
            opts.context.join(&opts.dockerfile)
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("docker-compose") || name.starts_with("compose.") {
            return Err(ImageError::Build {
                file: path.display().to_string(),
                line: 1,
                message: "docker compose environments (several services) are not supported: \
                          give the task a Dockerfile or an image"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        let df = dockerfile::parse(&text, &path.display().to_string())?;
        let mut run = Run {
            opts,
            file: df.file.clone(),
            cache: BuildCache::new(self.store.root()),
            stages: Vec::new(),
            leases: Vec::new(),
            step_no: 0,
            total: df.stages.iter().map(|s| s.steps.len() + 1).sum(),
            cached: 0,
        };
        for stage in &df.stages {
            let state = self.build_stage(&mut run, &df, stage).await?;
            run.stages.push((stage.name.clone(), state));
        }
        let last = run.stages.last().map(|(_, s)| s.clone());
        let last = last.ok_or_else(|| ImageError::Invalid("Dockerfile has no stage".into()))?;
        let reference = crate::store::normalize_reference(&opts.tag)?;
        let image = last.record(&reference);
        self.store.put_image(&image)?;
        Ok(BuildReport {
            image,
            steps: run.step_no,
            cached_steps: run.cached,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn build_stage(
        &self,
        run: &mut Run<'_>,
        df: &Dockerfile,
        stage: &Stage,
    ) -> Result<State> {
        let mut state = self.base_state(run, df, stage).await?;
        for step in &stage.steps {
            run.step_no += 1;
            state = self.apply(run, state, step).await?;
        }
        Ok(state)
    }

    /// The state a stage starts from: `scratch`, an earlier stage, or an image.
    async fn base_state(&self, run: &mut Run<'_>, df: &Dockerfile, stage: &Stage) -> Result<State> {
        run.step_no += 1;
        let mut global: BTreeMap<String, String> = BTreeMap::new();
        for (name, default) in &df.global_args {
            if let Some(v) = run.opts.build_args.get(name).or(default.as_ref()) {
                global.insert(name.clone(), v.clone());
            }
        }
        let from =
            dockerfile::expand(&stage.from, &global).map_err(|m| build_err(run, stage.line, m))?;
        self.progress
            .step(run.step_no, run.total, &format!("FROM {from}"), false);
        let shell = vec!["/bin/sh".to_string(), "-c".to_string()];
        if from == "scratch" {
            return Ok(State {
                key: Digest::sha256(b"scratch"),
                layers: Vec::new(),
                config: ImageConfig::default(),
                args: BTreeMap::new(),
                shell,
            });
        }
        if let Some((_, s)) = run
            .stages
            .iter()
            .rev()
            .find(|(n, _)| n.as_deref() == Some(from.as_str()))
        {
            let mut s = s.clone();
            s.args.clear();
            return Ok(s);
        }
        let image = self
            .registry
            .ensure(self.store, &from, &NoProgress)
            .await
            .map_err(|e| build_err(run, stage.line, format!("FROM {from}: {e}")))?;
        run.leases.push(self.store.lease(&image)?);
        let layers = image
            .layers
            .iter()
            .map(|d| Digest::parse(d))
            .collect::<Result<Vec<_>>>()?;
        Ok(State {
            key: Digest::sha256(format!("from {}", image.id).as_bytes()),
            layers,
            config: image.config.clone(),
            args: BTreeMap::new(),
            shell,
        })
    }

    /// Apply one step: from the cache when its key is there, else for real.
    async fn apply(&self, run: &mut Run<'_>, state: State, step: &Step) -> Result<State> {
        let inputs = context::step_inputs(run, &state, step)?;
        let key = Digest::sha256(format!("{}\n{}\n{}", state.key, step.text, inputs).as_bytes());
        let cached = if run.opts.no_cache {
            None
        } else {
            run.cache.get(&key, self.store)?
        };
        self.progress
            .step(run.step_no, run.total, &step.text, cached.is_some());
        let next = match cached {
            Some(mut done) => {
                run.cached += 1;
                done.key = key;
                done
            }
            None => {
                let next = step::execute(self, run, state, step, key).await?;
                run.cache.put(&next)?;
                next
            }
        };
        if !next.layers.is_empty() {
            run.leases.push(self.store.lease(&next.record("build"))?);
        }
        Ok(next)
    }
}

/// A build error at `line` of the file being built.
pub(crate) fn build_err(run: &Run<'_>, line: usize, message: impl Into<String>) -> ImageError {
    ImageError::Build {
        file: run.file.clone(),
        line,
        message: message.into(),
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
