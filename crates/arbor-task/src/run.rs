//! Preparing a task's sandbox, applying solutions, and running a solution
//! end to end (prepare → apply → grade → destroy).

use std::path::{Path, PathBuf};
use std::time::Duration;

use arbor_sandbox::{Backend, ExecRequest, Sandbox, SandboxSpec};
use tracing::warn;

use crate::error::{Result, TaskError};
use crate::model::{GitCheckout, Solution, Task};
pub use crate::sandbox::{abs_path, sandbox_spec, upload_files};
use crate::verify::{self, GradeOptions, VerifierResult, tail};

/// Options of [`prepare`].
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Run tasks that need a container image on the default rootfs instead
    /// of refusing them (a warning is logged per task).
    pub allow_default_rootfs: bool,
    /// The backend resolves `SandboxSpec::image` (it is an
    /// `arbor_image::ImageBackend`): tasks that need an image get it.
    pub images: bool,
}

/// Create the task's sandbox and put its environment in place (git tree,
/// files, setup script). The caller owns (and must destroy) the sandbox.
pub async fn prepare(
    backend: &dyn Backend,
    task: &Task,
    opts: &PrepareOptions,
) -> Result<Box<dyn Sandbox>> {
    prepare_with_spec(backend, task, &sandbox_spec(task), opts).await
}

/// [`prepare`] with a caller-adjusted spec (e.g. [`sandbox_spec`] plus a
/// network bridge to the model gateway for a black-box agent).
pub async fn prepare_with_spec(
    backend: &dyn Backend,
    task: &Task,
    spec: &SandboxSpec,
    opts: &PrepareOptions,
) -> Result<Box<dyn Sandbox>> {
    let mut spec = std::borrow::Cow::Borrowed(spec);
    if let Some(source) = &spec.image
        && !opts.images
    {
        if !opts.allow_default_rootfs {
            return Err(TaskError::NeedsOci {
                task: task.id.clone(),
                reason: source.to_string(),
            });
        }
        warn!(task = %task.id, "task needs {source}; running it on the default rootfs as asked");
        spec.to_mut().image = None;
    }
    if task.environment.allow_internet {
        tracing::debug!(task = %task.id, "task asks for internet access; local sandboxes have none");
    }
    let sb = backend.create(&spec).await?;
    match populate(sb.as_ref(), task).await {
        Ok(()) => Ok(sb),
        Err(e) => {
            let _ = sb.destroy().await;
            Err(e)
        }
    }
}

async fn populate(sb: &dyn Sandbox, task: &Task) -> Result<()> {
    let env = &task.environment;
    if let Some(git) = &env.git {
        let archive = git_archive(git)?;
        sb.write_tar(&env.workdir, archive).await?;
        let r = sb
            .exec(
                ExecRequest::shell(
                    "git init -q . && git add -A && git -c user.name=arbor -c user.email=arbor@localhost \
                     commit -q --no-verify -m base && git tag -f arbor-base >/dev/null",
                )
                .cwd(env.workdir.clone())
                .timeout(Duration::from_secs(300)),
            )
            .await?;
        if !r.success() {
            return Err(TaskError::Setup {
                task: task.id.clone(),
                message: format!("git init of the checkout failed: {}", tail(&r.stderr_str())),
            });
        }
    }
    upload_files(sb, &env.workdir, &env.files).await?;
    if let Some(setup) = &env.setup {
        let r = sb
            .exec(
                ExecRequest::shell(setup.clone())
                    .cwd(env.workdir.clone())
                    .timeout(Duration::from_secs(1800)),
            )
            .await?;
        if !r.success() {
            return Err(TaskError::Setup {
                task: task.id.clone(),
                message: format!(
                    "setup script exited {}{}: {}{}",
                    r.exit_code,
                    if r.timed_out { " (timed out)" } else { "" },
                    tail(&r.stdout_str()),
                    tail(&r.stderr_str())
                ),
            });
        }
    }
    Ok(())
}

/// A tar of the files of `commit` in a host repository (directory or bundle).
fn git_archive(g: &GitCheckout) -> Result<Vec<u8>> {
    let repo = resolve_git_repo(&g.repo)?;
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["archive", "--format=tar", &g.commit])
        .output()
        .map_err(|e| TaskError::io(format!("git archive in {}", repo.display()), e))?;
    if !out.status.success() {
        return Err(TaskError::Other(format!(
            "git archive {} in {}: {}",
            g.commit,
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// A bundle is cloned once into a cache next to the system temp dir.
fn resolve_git_repo(p: &Path) -> Result<PathBuf> {
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !p.is_file() {
        return Err(TaskError::Other(format!(
            "git source {} does not exist",
            p.display()
        )));
    }
    let meta = std::fs::metadata(p).map_err(|e| TaskError::io(p.display().to_string(), e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let key = crate::hash::hash_str(&format!("{}:{}:{mtime}", p.display(), meta.len()));
    let cache = std::env::temp_dir()
        .join("arbor-git-bundles")
        .join(format!("{key:016x}"));
    if cache.join("HEAD").is_file() {
        return Ok(cache);
    }
    let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let out = std::process::Command::new("git")
        .args(["clone", "--quiet", "--mirror"])
        .arg(p)
        .arg(&tmp)
        .output()
        .map_err(|e| TaskError::io("git clone of a bundle", e))?;
    if !out.status.success() {
        return Err(TaskError::Other(format!(
            "cloning bundle {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if std::fs::rename(&tmp, &cache).is_err() {
        // Another process won the race; use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(cache)
}

/// What applying a solution did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SolutionOutcome {
    /// The patch applied (or there was none).
    pub patch_applied: bool,
    /// Exit code of the script (0 when there was none).
    pub script_exit_code: i32,
    /// The script timed out.
    pub script_timed_out: bool,
    /// Tail of the script's output, or of the patch error.
    pub output: String,
}

/// Apply a solution to a prepared sandbox: files, then the patch, then the script.
pub async fn apply_solution(
    sb: &dyn Sandbox,
    task: &Task,
    sol: &Solution,
) -> Result<SolutionOutcome> {
    let workdir = &task.environment.workdir;
    upload_files(sb, workdir, &sol.files).await?;
    let mut out = SolutionOutcome {
        patch_applied: true,
        ..Default::default()
    };
    if let Some(p) = &sol.patch {
        match verify::apply_patch(sb, workdir, p, "/tmp/arbor-solution.patch").await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                out.patch_applied = false;
                out.output = msg;
            }
            Err(v) => {
                return Err(TaskError::Other(
                    v.infra_error
                        .unwrap_or_else(|| "applying the patch failed".into()),
                ));
            }
        }
    }
    if let Some(script) = &sol.script {
        sb.write_file("/tmp/arbor-solution.sh", script.as_bytes(), 0o755)
            .await?;
        let t = Duration::from_secs_f64(sol.timeout_s.unwrap_or(600.0).clamp(0.1, 86400.0));
        let r = sb
            .exec(
                ExecRequest::shell(
                    "if [ -x /bin/bash ]; then exec /bin/bash /tmp/arbor-solution.sh; else exec /bin/sh /tmp/arbor-solution.sh; fi",
                )
                .cwd(workdir.clone())
                .timeout(t),
            )
            .await?;
        out.script_exit_code = r.exit_code;
        out.script_timed_out = r.timed_out;
        out.output = tail(&format!("{}{}", r.stdout_str(), r.stderr_str()));
    }
    Ok(out)
}

/// Prepare the task, apply `solution` (`None` = the null solution: do
/// nothing), grade, destroy everything. Errors before grading become an
/// infrastructure result, except [`TaskError::NeedsOci`], which is returned.
pub async fn run_solution(
    backend: &dyn Backend,
    task: &Task,
    solution: Option<&Solution>,
    prepare_opts: &PrepareOptions,
    grade_opts: &GradeOptions,
) -> Result<VerifierResult> {
    let sb = match prepare(backend, task, prepare_opts).await {
        Ok(sb) => sb,
        Err(e @ TaskError::NeedsOci { .. }) => return Err(e),
        Err(e) => return Ok(VerifierResult::infra(format!("preparing the task: {e}"))),
    };
    let res = async {
        if let Some(sol) = solution
            && let Err(e) = apply_solution(sb.as_ref(), task, sol).await
        {
            return VerifierResult::infra(format!("applying the solution: {e}"));
        }
        verify::grade(task, sb.as_ref(), Some(backend), grade_opts).await
    }
    .await;
    if let Err(e) = sb.destroy().await {
        warn!(task = %task.id, "destroying the task sandbox: {e}");
    }
    Ok(res)
}
