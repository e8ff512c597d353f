//! How a task maps onto a sandbox: its spec (rootfs, binds, env, workdir,
//! resources), absolute sandbox paths, and putting files in place. Shared by
//! preparing a task (`crate::run`) and grading it (`crate::verify`).

use arbor_sandbox::{ImageSource, Sandbox, SandboxSpec};

use crate::error::{Result, TaskError};
use crate::model::{FileSpec, Task};

/// The sandbox spec of a task (image, rootfs, binds, env, workdir, resources).
pub fn sandbox_spec(task: &Task) -> SandboxSpec {
    let env = &task.environment;
    let mut spec = SandboxSpec {
        image: image_source(task),
        rootfs: env.rootfs.clone(),
        binds: env.binds.clone(),
        env: env.env.clone(),
        workdir: env.workdir.clone(),
        ..SandboxSpec::default()
    };
    if let Some(m) = env.resources.memory_mb {
        spec.limits.memory_mb = m.max(64);
    }
    if let Some(c) = env.resources.cpus
        && c.is_finite()
        && c > 0.0
    {
        spec.limits.cpus = c;
    }
    if let Some(s) = env.resources.storage_mb {
        spec.limits.workspace_mb = s.max(64);
    }
    spec
}

/// The image a task's environment names: a reference, or a Dockerfile built
/// with its own directory as the context.
pub fn image_source(task: &Task) -> Option<ImageSource> {
    let env = &task.environment;
    if let Some(reference) = &env.image {
        return Some(ImageSource::Reference(reference.clone()));
    }
    let file = env.dockerfile.as_ref()?;
    let context = file
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| ".".into());
    let name = file
        .file_name()
        .map(Into::into)
        .unwrap_or_else(|| "Dockerfile".into());
    Some(ImageSource::Dockerfile {
        context,
        file: name,
    })
}

/// An absolute sandbox path: `p` if absolute, else under `workdir`.
pub fn abs_path(workdir: &str, p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!(
            "{}/{}",
            workdir.trim_end_matches('/'),
            p.trim_start_matches("./")
        )
    }
}

/// Write files into a sandbox (relative paths under `workdir`).
pub async fn upload_files(sb: &dyn Sandbox, workdir: &str, files: &[FileSpec]) -> Result<()> {
    for f in files {
        let dest = abs_path(workdir, &f.path);
        let default_mode = if dest.ends_with(".sh") { 0o755 } else { 0o644 };
        match (&f.content, &f.source) {
            (Some(text), _) => {
                sb.write_file(&dest, text.as_bytes(), f.mode.unwrap_or(default_mode))
                    .await?;
            }
            (None, Some(src)) if src.is_dir() => {
                let tar = arbor_sandbox::tar_directory(src)
                    .map_err(|e| TaskError::io(format!("packing {}", src.display()), e))?;
                sb.write_tar(&dest, tar).await?;
            }
            (None, Some(src)) => {
                let data = std::fs::read(src)
                    .map_err(|e| TaskError::io(format!("reading {}", src.display()), e))?;
                let mode = f.mode.unwrap_or_else(|| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::metadata(src)
                        .map(|m| m.permissions().mode() & 0o7777)
                        .unwrap_or(default_mode)
                });
                sb.write_file(&dest, &data, mode).await?;
            }
            (None, None) => {
                sb.write_file(&dest, b"", f.mode.unwrap_or(default_mode))
                    .await?
            }
        }
    }
    Ok(())
}
