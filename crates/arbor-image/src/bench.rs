//! `arbor image bench`: what images cost. Builds its own 5-layer image from
//! the host's static busybox (no registry, no network) in a temporary store,
//! then measures sandboxes from it, density, unpacking and a cached rebuild.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arbor_sandbox::bench::{self as sb_bench, BenchOptions, Percentiles, percentiles};
use arbor_sandbox::local::{LocalBackend, gc};
use arbor_sandbox::{ImageSource, SandboxSpec};
use serde::Serialize;

use crate::backend::{ImageBackend, ImagesConfig};
use crate::build::{BuildOptions, Builder, QuietBuild};
use crate::config::{ImageConfig, ImageRecord};
use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// Where the static busybox the bench image is made of lives (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";
const BENCH_REF: &str = "arbor-bench/base:5";

/// Sizes of the benchmark.
#[derive(Debug, Clone)]
pub struct ImageBenchOptions {
    /// Iterations of the latency measurement.
    pub n: usize,
    /// Live sandboxes of one image for the density measurement.
    pub live: usize,
    /// Concurrency while creating them.
    pub concurrency: usize,
    /// Size of the layer unpacked for the throughput figure, MB.
    pub unpack_mb: usize,
}

impl Default for ImageBenchOptions {
    fn default() -> Self {
        ImageBenchOptions {
            n: 50,
            live: 500,
            concurrency: 8,
            unpack_mb: 64,
        }
    }
}

/// The benchmark's result (one JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct ImageBenchReport {
    /// Create + `true` + destroy of a sandbox from a cached 5-layer image.
    pub create_exec_destroy_ms: Percentiles,
    /// The same on the default host-view root, in the same run.
    pub host_view_create_exec_destroy_ms: Percentiles,
    pub image_layers: usize,
    pub live_sandboxes: usize,
    pub live_requested: usize,
    pub live_create_s: f64,
    pub host_mb_per_live_sandbox: f64,
    /// Uncompressed MB per second through gzip, digest checks and unpacking.
    pub unpack_mb_per_s: f64,
    /// First build of the 10-step Dockerfile (sandboxed RUN/COPY steps).
    pub build_s: f64,
    /// Rebuild of the unchanged Dockerfile (every step from the cache).
    pub build_cached_s: f64,
    pub build_steps: usize,
    pub leaked: usize,
    pub n: usize,
}

/// Run the benchmark with a temporary store under `scratch`. Progress goes to stderr.
pub async fn run(
    local: LocalBackend,
    scratch: &Path,
    opts: &ImageBenchOptions,
) -> Result<ImageBenchReport> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(ImageError::Invalid(format!(
            "{BUSYBOX} not found: the bench image is made from Debian's busybox-static \
             (apt-get install busybox-static)"
        )));
    }
    let cfg = ImagesConfig {
        root: Some(scratch.join("store")),
        ..Default::default()
    };
    let backend = ImageBackend::new(local.clone(), &cfg)?;
    eprintln!("image bench: making a 5-layer busybox image");
    let image = make_image(&backend)?;
    let unpack_mb_per_s = unpack_throughput(&backend, opts.unpack_mb)?;
    let spec = SandboxSpec {
        image: Some(ImageSource::Reference(BENCH_REF.into())),
        workdir: String::new(),
        ..Default::default()
    };
    let n = opts.n.max(1);
    sb_bench::warm_up(&backend, &spec).await?;
    let image_ms = sb_bench::create_exec_destroy(&backend, &spec, n).await?;
    let host_ms = sb_bench::create_exec_destroy(&local, &SandboxSpec::default(), n).await?;
    let (concrete, lease) = backend.image_spec(&image, &spec)?;
    let live = sb_bench::live_phase(
        &local,
        &concrete,
        &BenchOptions {
            n,
            live: opts.live,
            concurrency: opts.concurrency,
        },
    )
    .await;
    drop(lease);
    let (build_s, build_cached_s, build_steps) = builds(&backend, scratch).await?;
    // Only what this process left: other supervisors may share the host.
    let leaks = gc::leaks_of(
        local.state_root(),
        local.cgroups(),
        std::process::id() as i32,
    );
    Ok(ImageBenchReport {
        create_exec_destroy_ms: percentiles(image_ms),
        host_view_create_exec_destroy_ms: percentiles(host_ms),
        image_layers: image.layers.len(),
        live_sandboxes: live.alive,
        live_requested: opts.live,
        live_create_s: live.create_s,
        host_mb_per_live_sandbox: live.host_mb_per_sandbox(),
        unpack_mb_per_s,
        build_s,
        build_cached_s,
        build_steps,
        leaked: leaks.total(),
        n,
    })
}

/// A tar layer from `(path, mode, content)` entries (directories end in `/`,
/// symlinks are `-> target` contents with mode 0).
pub fn layer_tar<S: AsRef<str>>(entries: &[(S, u32, Vec<u8>)]) -> Result<Vec<u8>> {
    let io = |e| ImageError::io("build a layer", e);
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, data) in entries {
        let path = path.as_ref();
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        if let Some(target) = data.strip_prefix(b"-> ") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            let target = String::from_utf8_lossy(target).to_string();
            b.append_link(&mut h, path, target).map_err(io)?;
        } else if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, path, std::io::empty()).map_err(io)?;
        } else {
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data.as_slice()).map_err(io)?;
        }
    }
    b.into_inner().map_err(io)
}

/// The busybox userland: the binary, the applets as symlinks, a passwd.
pub fn busybox_layer() -> Result<Vec<u8>> {
    let bin = std::fs::read(BUSYBOX).map_err(|e| ImageError::io(format!("read {BUSYBOX}"), e))?;
    let mut entries: Vec<(String, u32, Vec<u8>)> = vec![
        ("bin/".into(), 0o755, Vec::new()),
        ("etc/".into(), 0o755, Vec::new()),
        ("tmp/".into(), 0o1777, Vec::new()),
        ("bin/busybox".into(), 0o755, bin),
        (
            "etc/passwd".into(),
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n".to_vec(),
        ),
        (
            "etc/group".into(),
            0o644,
            b"root:x:0:\napp:x:1000:\n".to_vec(),
        ),
    ];
    for applet in [
        "sh", "true", "ls", "cat", "echo", "sleep", "pgrep", "mkdir", "rm", "chown", "chmod", "cp",
        "id", "env", "test", "grep", "sed", "wc",
    ] {
        entries.push((format!("bin/{applet}"), 0o777, b"-> busybox".to_vec()));
    }
    layer_tar(&entries)
}

/// Add an uncompressed tar as a layer; returns its diff_id.
pub fn add_tar_layer(store: &crate::store::Store, tar: &[u8]) -> Result<Digest> {
    let diff_id = Digest::sha256(tar);
    store.add_layer(
        &mut &tar[..],
        "application/vnd.oci.image.layer.v1.tar",
        None,
        &diff_id,
    )?;
    Ok(diff_id)
}

fn make_image(backend: &ImageBackend) -> Result<ImageRecord> {
    let store = backend.store();
    let mut layers = vec![add_tar_layer(store, &busybox_layer()?)?];
    for i in 1..5 {
        let file = format!("opt/layer{i}/data");
        let tar = layer_tar(&[
            ("opt/", 0o755, Vec::new()),
            (&file, 0o644, vec![b'x'; 4096 * i]),
        ])?;
        layers.push(add_tar_layer(store, &tar)?);
    }
    let record = ImageRecord {
        reference: crate::store::normalize_reference(BENCH_REF)?,
        id: Digest::sha256(format!("{layers:?}").as_bytes()).to_string(),
        manifest_digest: None,
        layers: layers.iter().map(Digest::to_string).collect(),
        config: ImageConfig {
            env: vec!["PATH=/bin".into()],
            working_dir: "/work".into(),
            ..Default::default()
        },
        created: crate::build::now_secs(),
    };
    store.put_image(&record)?;
    Ok(record)
}

/// Unpack a gzip layer of `mb` MB of files; uncompressed MB per second.
fn unpack_throughput(backend: &ImageBackend, mb: usize) -> Result<f64> {
    let files: Vec<(String, Vec<u8>)> = (0..mb.max(1) * 4)
        .map(|i| {
            let data: Vec<u8> = (0..256 * 1024u32)
                .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 13) as u8)
                .collect();
            (format!("data/f{i}"), data)
        })
        .collect();
    let mut entries: Vec<(&str, u32, Vec<u8>)> = vec![("data/", 0o755, Vec::new())];
    entries.extend(files.iter().map(|(p, d)| (p.as_str(), 0o644, d.clone())));
    let tar = layer_tar(&entries)?;
    let diff_id = Digest::sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).map_err(|e| ImageError::io("gzip", e))?;
    let blob = gz.finish().map_err(|e| ImageError::io("gzip", e))?;
    let blob_digest = Digest::sha256(&blob);
    eprintln!("image bench: unpacking a {} MB layer", tar.len() >> 20);
    let t = Instant::now();
    backend.store().add_layer(
        &mut blob.as_slice(),
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Some(&blob_digest),
        &diff_id,
    )?;
    Ok(tar.len() as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// The 10-step Dockerfile of the cached-rebuild figure.
const DOCKERFILE: &str = "\
FROM arbor-bench/base:5
ENV APP=/app
WORKDIR /app
COPY app.txt /app/app.txt
RUN echo one > /app/one
RUN mkdir -p /app/data && echo two > /app/data/two
COPY conf/ /app/conf/
ARG MODE=test
RUN echo $MODE > /app/mode
USER app
CMD [\"sh\"]
";

async fn builds(backend: &ImageBackend, scratch: &Path) -> Result<(f64, f64, usize)> {
    let ctx: PathBuf = scratch.join("context");
    let io = |e| ImageError::io("write the bench build context", e);
    std::fs::create_dir_all(ctx.join("conf")).map_err(io)?;
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).map_err(io)?;
    std::fs::write(ctx.join("app.txt"), "app\n").map_err(io)?;
    std::fs::write(ctx.join("conf/a.conf"), "a=1\n").map_err(io)?;
    let opts = BuildOptions {
        context: ctx.clone(),
        dockerfile: ctx.join("Dockerfile"),
        tag: "arbor-bench/built:latest".into(),
        network_host: false,
        build_args: Default::default(),
        no_cache: false,
    };
    let builder = Builder::new(
        backend.store(),
        backend.registry(),
        backend.local(),
        &QuietBuild,
    );
    eprintln!("image bench: building a 10-step Dockerfile, then rebuilding it");
    let first = builder.build(&opts).await?;
    let again = builder.build(&opts).await?;
    if again.cached_steps + 1 < again.steps {
        return Err(ImageError::Invalid(format!(
            "rebuild ran {} of {} steps again",
            again.steps - again.cached_steps,
            again.steps
        )));
    }
    Ok((first.seconds, again.seconds, first.steps))
}
