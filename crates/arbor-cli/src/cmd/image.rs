//! `arbor image ...`: the image store from the command line, and the store
//! options every command that runs images shares ([`StoreArgs`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use arbor_image::backend::{ImageBackend, ImagesConfig};
use arbor_image::build::{BuildOptions, BuildProgress, Builder};
use arbor_image::registry::{PullProgress, RegistryConfig};
use arbor_image::{ImageRecord, Store, StoreOptions};
use arbor_sandbox::local::LocalBackend;
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where images are kept and how registries are reached.
#[derive(Args, Clone, Default)]
pub struct StoreArgs {
    /// Image store directory [default: $ARBOR_IMAGE_ROOT or /var/lib/arbor/images].
    #[arg(long, value_name = "DIR")]
    pub image_root: Option<PathBuf>,
    /// Disk budget of the image cache in GB; least recently used layers that
    /// no sandbox or build uses are evicted past it.
    #[arg(long, value_name = "GB")]
    pub image_max_gb: Option<f64>,
    /// A registry (`host:port`) spoken to over plain HTTP, e.g. a local one.
    /// Repeatable; every other registry is HTTPS only.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure: Vec<String>,
    /// A registry mirror, `REGISTRY=MIRROR` (e.g. `docker.io=mirror.local:5000`).
    #[arg(long = "registry-mirror", value_name = "REGISTRY=MIRROR")]
    pub mirrors: Vec<String>,
}

impl StoreArgs {
    /// The image configuration these flags describe.
    pub fn config(&self, build_network_host: bool) -> Result<ImagesConfig> {
        let mut mirrors = BTreeMap::new();
        for m in &self.mirrors {
            let (from, to) = m
                .split_once('=')
                .with_context(|| format!("--registry-mirror {m}: expected REGISTRY=MIRROR"))?;
            mirrors.insert(from.to_string(), to.to_string());
        }
        Ok(ImagesConfig {
            root: self.image_root.clone(),
            max_bytes: self.image_max_gb.map(gb_to_bytes),
            registry: RegistryConfig {
                insecure: self.insecure.clone(),
                mirrors,
                docker_config: None,
            },
            build_network_host,
        })
    }

    /// The local sandbox backend with these images.
    pub fn backend(&self, build_network_host: bool) -> Result<ImageBackend> {
        let local = LocalBackend::with_defaults().context("starting the local sandbox backend")?;
        Ok(ImageBackend::new(local, &self.config(build_network_host)?)?)
    }
}

fn gb_to_bytes(gb: f64) -> u64 {
    (gb.max(0.0) * 1e9) as u64
}

#[derive(Subcommand)]
pub enum Command {
    /// Pull an image from a registry into the store.
    Pull(PullArgs),
    /// Load `docker save` tarballs or OCI image layouts (directory or tar).
    Load(LoadArgs),
    /// Build a Dockerfile; RUN steps run in arbor sandboxes.
    Build(BuildArgs),
    /// List stored images.
    Ls(JsonArgs),
    /// Show one image's record (layers, config) as JSON.
    Inspect(RefArgs),
    /// Remove an image's tag (its layers go at the next prune).
    Rm(RefArgs),
    /// Evict unused layers until the cache fits a budget.
    Prune(PruneArgs),
    /// Measure image sandboxes, unpacking and cached rebuilds; one JSON object.
    Bench(crate::cmd::image_bench::BenchArgs),
}

#[derive(Args)]
pub struct PullArgs {
    /// Image reference (`busybox`, `ghcr.io/org/img:tag`, `name@sha256:...`).
    reference: String,
    /// Print the image record as JSON instead of progress and a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct LoadArgs {
    /// The archive or OCI layout directory.
    path: PathBuf,
    /// Print the loaded records as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct BuildArgs {
    /// The build context directory.
    context: PathBuf,
    /// The Dockerfile [default: CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Name (reference) of the built image.
    #[arg(short = 't', long = "tag")]
    tag: String,
    /// `host` gives RUN steps the host's network (as `docker build` has by
    /// default); `none` (the default) gives them none.
    #[arg(long, default_value = "none", value_parser = ["none", "host"])]
    network: String,
    /// A build argument, `KEY=VALUE` (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// Run every step even if its result is cached.
    #[arg(long)]
    no_cache: bool,
    /// Print a JSON report (steps, cached steps, seconds, image) instead of progress.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct JsonArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct RefArgs {
    /// Image reference or id.
    reference: String,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct PruneArgs {
    /// Budget in GB [default: the store's --image-max-gb, else 0: every unused layer].
    #[arg(long)]
    max_gb: Option<f64>,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

pub async fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Pull(a) => pull(a).await,
        Command::Load(a) => load(a),
        Command::Build(a) => build(a).await,
        Command::Ls(a) => ls(a),
        Command::Inspect(a) => inspect(a),
        Command::Rm(a) => {
            open_store(&a.store)?.remove_image(&a.reference)?;
            Ok(0)
        }
        Command::Prune(a) => prune(a),
        Command::Bench(a) => crate::cmd::image_bench::run(a).await,
    }
}

fn open_store(a: &StoreArgs) -> Result<Store> {
    let root = a.image_root.clone().unwrap_or_else(Store::default_root);
    Store::open(
        &root,
        StoreOptions {
            max_bytes: a.image_max_gb.map(gb_to_bytes),
        },
    )
    .with_context(|| format!("opening the image store {}", root.display()))
}

async fn pull(a: PullArgs) -> Result<i32> {
    let backend = a.store.backend(false)?;
    let bars = LayerBars::new(!a.json);
    let record = backend
        .registry()
        .pull(backend.store(), &a.reference, &bars)
        .await
        .with_context(|| format!("pulling {}", a.reference))?;
    bars.finish();
    print_record(&record, a.json)
}

fn load(a: LoadArgs) -> Result<i32> {
    let store = open_store(&a.store)?;
    let records = arbor_image::archive::load(&store, &a.path)
        .with_context(|| format!("loading {}", a.path.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&records)?);
    } else {
        for r in &records {
            println!(
                "loaded {} ({}, {} layers)",
                r.reference,
                short(&r.id),
                r.layers.len()
            );
        }
    }
    Ok(0)
}

async fn build(a: BuildArgs) -> Result<i32> {
    let mut build_args = BTreeMap::new();
    for kv in &a.build_args {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--build-arg {kv}: expected KEY=VALUE"))?;
        build_args.insert(k.to_string(), v.to_string());
    }
    let network_host = a.network == "host";
    let backend = a.store.backend(network_host)?;
    let opts = BuildOptions {
        dockerfile: a
            .file
            .clone()
            .unwrap_or_else(|| a.context.join("Dockerfile")),
        context: a.context.clone(),
        tag: a.tag.clone(),
        network_host,
        build_args,
        no_cache: a.no_cache,
    };
    let progress = StepPrinter { quiet: a.json };
    let builder = Builder::new(
        backend.store(),
        backend.registry(),
        backend.local(),
        &progress,
    );
    let report = builder.build(&opts).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "built {} ({}) in {:.2} s, {}/{} steps cached",
            report.image.reference,
            short(&report.image.id),
            report.seconds,
            report.cached_steps,
            report.steps
        );
    }
    Ok(0)
}

fn ls(a: JsonArgs) -> Result<i32> {
    let store = open_store(&a.store)?;
    let images = store.images()?;
    if a.json {
        println!("{}", serde_json::to_string(&images)?);
        return Ok(0);
    }
    println!("{:<60} {:<14} {:>6}", "REFERENCE", "ID", "LAYERS");
    for r in images {
        println!(
            "{:<60} {:<14} {:>6}",
            r.reference,
            short(&r.id),
            r.layers.len()
        );
    }
    Ok(0)
}

fn inspect(a: RefArgs) -> Result<i32> {
    let store = open_store(&a.store)?;
    match store.image(&a.reference)? {
        Some(r) => print_record(&r, true),
        None => bail!(
            "image {} is not in the store {}",
            a.reference,
            store.root().display()
        ),
    }
}

fn prune(a: PruneArgs) -> Result<i32> {
    let store = open_store(&a.store)?;
    let budget = a
        .max_gb
        .or(a.store.image_max_gb)
        .map(gb_to_bytes)
        .unwrap_or(0);
    let report = store.prune(budget)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "removed {} layers ({:.1} MB); {} in use were kept; {:.1} MB left",
            report.removed.len(),
            report.freed_bytes as f64 / 1e6,
            report.skipped_busy,
            report.bytes_after as f64 / 1e6
        );
    }
    Ok(0)
}

fn print_record(r: &ImageRecord, json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "{} ({}, {} layers)",
            r.reference,
            short(&r.id),
            r.layers.len()
        );
    }
    Ok(0)
}

fn short(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// One progress bar per layer of a pull.
struct LayerBars {
    multi: Option<MultiProgress>,
    bars: std::sync::Mutex<BTreeMap<String, ProgressBar>>,
}

impl LayerBars {
    fn new(show: bool) -> Self {
        LayerBars {
            multi: show.then(MultiProgress::new),
            bars: Default::default(),
        }
    }

    fn finish(&self) {
        if let Ok(bars) = self.bars.lock() {
            bars.values().for_each(ProgressBar::finish);
        }
    }
}

impl PullProgress for LayerBars {
    fn layer_started(&self, digest: &str, bytes: u64) {
        let Some(multi) = &self.multi else { return };
        let bar = multi.add(ProgressBar::new(bytes));
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(short(digest).to_string());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(digest.to_string(), bar);
        }
    }
    fn layer_bytes(&self, digest: &str, n: u64) {
        if let Ok(bars) = self.bars.lock()
            && let Some(b) = bars.get(digest)
        {
            b.inc(n);
        }
    }
    fn layer_done(&self, digest: &str, cached: bool) {
        if let Some(multi) = &self.multi
            && cached
        {
            let _ = multi.println(format!("{} already in the store", short(digest)));
        }
        if let Ok(bars) = self.bars.lock()
            && let Some(b) = bars.get(digest)
        {
            b.finish();
        }
    }
}

/// Prints `[n/total] STEP` lines on stderr.
struct StepPrinter {
    quiet: bool,
}

impl BuildProgress for StepPrinter {
    fn step(&self, n: usize, total: usize, text: &str, cached: bool) {
        if !self.quiet {
            let mark = if cached { " (cached)" } else { "" };
            eprintln!("[{n}/{total}] {text}{mark}");
        }
    }
}
