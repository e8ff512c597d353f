//! Dockerfile builds and image sandboxes, end to end: real sandboxes, a real
//! busybox userland (Debian's busybox-static), a store on disk.
//!
//! A custom harness (libtest-mimic): this binary is its own sandbox init, and
//! after all tests it checks that no sandbox was left behind. Needs root.

use std::path::{Path, PathBuf};

use arbor_image::backend::{ImageBackend, ImagesConfig};
use arbor_image::build::{BuildOptions, BuildReport, Builder, QuietBuild};
use arbor_image::{ImageError, Store};
use arbor_sandbox::local::{LocalBackend, gc};
use arbor_sandbox::{Backend, ExecRequest, ImageSource, Sandbox, SandboxSpec};
use libtest_mimic::{Arguments, Failed, Trial};

type TestResult = Result<(), Failed>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        let ok: bool = $cond;
        if !ok {
            return Err(Failed::from(format!($($msg)+)));
        }
    };
}

const APPLETS: [&str; 16] = [
    "sh", "ls", "cat", "echo", "mkdir", "rm", "chown", "chmod", "id", "grep", "awk", "test",
    "true", "false", "pwd", "env",
];

/// A build context whose `rootfs/` is a busybox userland with a user `app`.
fn base_context(dir: &Path) -> std::io::Result<()> {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n")?;
    std::fs::write(root.join("etc/doomed"), "removed by a later layer\n")?;
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nWORKDIR /app\n",
    )
}

const APP_DOCKERFILE: &str = r#"FROM test/base:1
ARG GREETING=hello
ENV NAME=arbor HOME_DIR="/home/app"
RUN echo "$GREETING $NAME" > /app/greeting && rm /etc/doomed
RUN ["/bin/sh", "-c", "mkdir -p /home/app && chown app:app /home/app"]
COPY --chown=app:app conf/ /app/conf/
COPY note.txt /app
LABEL org.example.role=test
EXPOSE 8080
USER app
WORKDIR sub
CMD ["sh"]
"#;

struct Env {
    dir: tempfile::TempDir,
    backend: ImageBackend,
}

impl Env {
    fn new(max_bytes: Option<u64>) -> Result<Env, Failed> {
        let dir = tempfile::tempdir()?;
        let local = LocalBackend::with_defaults()
            .map_err(|e| Failed::from(format!("local backend (needs root): {e}")))?;
        let cfg = ImagesConfig {
            root: Some(dir.path().join("store")),
            max_bytes,
            ..Default::default()
        };
        let backend = ImageBackend::new(local, &cfg).map_err(|e| Failed::from(e.to_string()))?;
        base_context(&dir.path().join("base"))?;
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join("conf"))?;
        std::fs::write(app.join("Dockerfile"), APP_DOCKERFILE)?;
        std::fs::write(app.join("conf/a.conf"), "a=1\n")?;
        std::fs::write(app.join("note.txt"), "note\n")?;
        Ok(Env { dir, backend })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn store(&self) -> &Store {
        self.backend.store()
    }

    async fn build(&self, ctx: &str, tag: &str) -> Result<BuildReport, ImageError> {
        let opts = BuildOptions {
            context: self.path(ctx),
            dockerfile: PathBuf::from("Dockerfile"),
            tag: tag.into(),
            network_host: false,
            build_args: Default::default(),
            no_cache: false,
        };
        let b = &self.backend;
        Builder::new(b.store(), b.registry(), b.local(), &QuietBuild)
            .build(&opts)
            .await
    }

    async fn base_and_app(&self) -> Result<BuildReport, Failed> {
        self.build("base", "test/base:1").await?;
        Ok(self.build("app", "test/app:1").await?)
    }

    async fn sandbox(&self, image: &str) -> Result<Box<dyn Sandbox>, Failed> {
        let spec = SandboxSpec {
            image: Some(ImageSource::Reference(image.into())),
            workdir: String::new(),
            ..Default::default()
        };
        Ok(self.backend.create(&spec).await?)
    }
}

async fn sh(sb: &dyn Sandbox, script: &str) -> Result<String, Failed> {
    let r = sb.exec(ExecRequest::shell(script)).await?;
    ensure!(
        r.success(),
        "`{script}` failed: {}{}",
        r.stdout_str(),
        r.stderr_str()
    );
    Ok(r.stdout_str().trim().to_string())
}

fn rt() -> Result<tokio::runtime::Runtime, Failed> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn built_image_applies_config_and_layers() -> TestResult {
    let env = Env::new(None)?;
    rt()?.block_on(async {
        let report = env.base_and_app().await?;
        ensure!(
            report.cached_steps == 0,
            "first build ran from cache: {report:?}"
        );
        let sb = env.sandbox("test/app:1").await?;
        let out = async {
            ensure!(
                sh(sb.as_ref(), "id -u").await? == "1000",
                "USER app not applied"
            );
            ensure!(
                sh(sb.as_ref(), "pwd").await? == "/app/sub",
                "WORKDIR not applied"
            );
            ensure!(
                sh(sb.as_ref(), "echo $NAME:$HOME_DIR").await? == "arbor:/home/app",
                "ENV"
            );
            ensure!(
                sh(sb.as_ref(), "cat /app/greeting").await? == "hello arbor",
                "RUN with ARG"
            );
            ensure!(
                sh(sb.as_ref(), "cat /app/note.txt").await? == "note",
                "COPY file to dir"
            );
            let owner = sh(
                sb.as_ref(),
                "ls -ln /app/conf/a.conf | awk '{print $3\":\"$4}'",
            )
            .await?;
            ensure!(owner == "1000:1000", "COPY --chown: owner {owner}");
            let gone = sb.exec(ExecRequest::shell("test -e /etc/doomed")).await?;
            ensure!(
                gone.exit_code == 1,
                "a file removed by RUN is still visible"
            );
            Ok(())
        }
        .await;
        sb.destroy().await?;
        let rec = env.store().image("test/app:1")?.ok_or("not stored")?;
        ensure!(rec.layers.len() == 5, "layers: {:?}", rec.layers);
        ensure!(
            rec.config.cmd == Some(vec!["sh".into()]),
            "CMD: {:?}",
            rec.config.cmd
        );
        let labels = rec.config.labels.unwrap_or_default();
        ensure!(
            labels.get("org.example.role").map(String::as_str) == Some("test"),
            "LABEL"
        );
        out
    })
}

fn unchanged_rebuild_is_cached_and_a_change_reruns_from_there() -> TestResult {
    let env = Env::new(None)?;
    rt()?.block_on(async {
        env.base_and_app().await?;
        let again = env.build("app", "test/app:1").await?;
        ensure!(
            again.cached_steps + 1 == again.steps,
            "rebuild ran steps again: {again:?}"
        );
        ensure!(
            again.seconds < 1.0,
            "cached rebuild took {} s",
            again.seconds
        );
        std::fs::write(env.path("app/conf/a.conf"), "a=2\n")?;
        let changed = env.build("app", "test/app:1").await?;
        // FROM, ARG, ENV and both RUNs come from the cache; COPY conf and after run.
        ensure!(changed.cached_steps == 4, "after a change: {changed:?}");
        let sb = env.sandbox("test/app:1").await?;
        let conf = sh(sb.as_ref(), "cat /app/conf/a.conf").await;
        sb.destroy().await?;
        ensure!(conf? == "a=2", "the rebuilt image has the old file");
        Ok(())
    })
}

fn failures_name_the_file_and_line() -> TestResult {
    let env = Env::new(None)?;
    rt()?.block_on(async {
        env.build("base", "test/base:1").await?;
        let cases = [
            (
                "FROM test/base:1\nRUN echo broken >&2; exit 3\n",
                "Dockerfile:2: RUN exited with 3",
            ),
            (
                "FROM test/base:1\nVOLUME /data\n",
                "Dockerfile:2: VOLUME is not supported",
            ),
            (
                "FROM test/base:1\nRUN --network=host true\n",
                "Dockerfile:2: RUN --network=host needs",
            ),
            (
                "FROM test/base:1\nCOPY ../secret /x\n",
                "Dockerfile:2: COPY source `../secret` is outside",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let ctx = format!("bad{i}");
            std::fs::create_dir_all(env.path(&ctx))?;
            std::fs::write(env.path(&ctx).join("Dockerfile"), text)?;
            let err = match env.build(&ctx, "test/bad:1").await {
                Ok(r) => return Err(format!("{text:?} built: {r:?}").into()),
                Err(e) => e.to_string(),
            };
            ensure!(err.contains(want), "{text:?}: error {err:?} lacks {want:?}");
            if i == 0 {
                ensure!(
                    err.contains("broken"),
                    "RUN failure without its output: {err}"
                );
            }
        }
        ensure!(
            env.store().image("test/bad:1")?.is_none(),
            "a failed build was tagged"
        );
        Ok(())
    })
}

fn eviction_spares_running_sandboxes_and_budget_holds_after() -> TestResult {
    let budget = 64 * 1024;
    let env = Env::new(Some(budget))?;
    rt()?.block_on(async {
        env.build("base", "test/base:1").await?;
        let sb = env.sandbox("test/base:1").await?;
        let result = async {
            // A second image past the budget: eviction runs while `sb` lives.
            std::fs::create_dir_all(env.path("big"))?;
            std::fs::write(env.path("big/blob"), vec![7u8; 1 << 20])?;
            std::fs::write(
                env.path("big/Dockerfile"),
                "FROM test/base:1\nCOPY blob /blob\n",
            )?;
            env.build("big", "test/big:1").await?;
            ensure!(
                sh(sb.as_ref(), "cat /etc/passwd | grep -c app").await? == "1",
                "base broke"
            );
            ensure!(
                sh(sb.as_ref(), "busybox true && echo ok").await? == "ok",
                "base binary"
            );
            Ok(())
        }
        .await;
        sb.destroy().await?;
        result?;
        let report = env.store().prune(budget)?;
        let usage = env.store().usage()?;
        ensure!(usage.bytes <= budget, "after prune {usage:?} ({report:?})");
        Ok(())
    })
}

fn main() {
    if arbor_sandbox::init::is_init_invocation() {
        arbor_sandbox::init::run();
    }
    arbor_sandbox::local::allow_self_as_init();
    let args = Arguments::from_args();
    let mut tests = vec![
        Trial::test(
            "built_image_applies_config_and_layers",
            built_image_applies_config_and_layers,
        ),
        Trial::test(
            "unchanged_rebuild_is_cached_and_a_change_reruns_from_there",
            unchanged_rebuild_is_cached_and_a_change_reruns_from_there,
        ),
        Trial::test(
            "failures_name_the_file_and_line",
            failures_name_the_file_and_line,
        ),
        Trial::test(
            "eviction_spares_running_sandboxes_and_budget_holds_after",
            eviction_spares_running_sandboxes_and_budget_holds_after,
        ),
    ];
    if !Path::new("/bin/busybox").is_file() {
        let why = "needs /bin/busybox (apt-get install busybox-static)";
        if std::env::var_os("CI").is_some() {
            eprintln!("{why}");
            std::process::exit(1);
        }
        eprintln!("skipping: {why}");
        tests = tests
            .into_iter()
            .map(|t| t.with_ignored_flag(true))
            .collect();
    }
    let conclusion = libtest_mimic::run(&args, tests);
    if let Ok(b) = LocalBackend::with_defaults() {
        let leaks = gc::leaks(b.state_root(), b.cgroups());
        if leaks.total() > 0 {
            eprintln!("leaked sandboxes: {leaks:?}");
            std::process::exit(1);
        }
    }
    conclusion.exit();
}
