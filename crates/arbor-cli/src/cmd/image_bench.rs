//! `arbor image bench`: prints one JSON object (see `arbor_image::bench`).

use anyhow::{Context, Result};
use arbor_image::bench::{self, ImageBenchOptions};
use arbor_sandbox::local::LocalBackend;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// Iterations of the create+exec+destroy measurement.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// Live sandboxes of one image for the density measurement.
    #[arg(long, default_value_t = 500)]
    live: usize,
    /// Parallel creations in the density phase.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Size of the layer unpacked for the throughput figure, MB.
    #[arg(long, default_value_t = 64)]
    unpack_mb: usize,
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long)]
    json: bool,
}

pub async fn run(a: BenchArgs) -> Result<i32> {
    let local = LocalBackend::with_defaults().context("starting the local sandbox backend")?;
    // A private store on disk (not tmpfs: layers are real files), removed after.
    let scratch = tempfile::Builder::new()
        .prefix("arbor-image-bench")
        .tempdir_in("/var/tmp")
        .context("creating the bench's scratch directory")?;
    let opts = ImageBenchOptions {
        n: a.n,
        live: a.live,
        concurrency: a.concurrency,
        unpack_mb: a.unpack_mb,
    };
    let report = bench::run(local, scratch.path(), &opts).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(if report.leaked == 0 { 0 } else { 1 })
}
