//! The host paths a submitted batch may name: only those inside the
//! directories the server's operator allowed (`arbor serve --allow-dir`),
//! judged after resolving symlinks and `..`, so neither can lead outside.
//! A batch names host paths in its experiment (datasets, agent folders and
//! binds, an embedded checkpoint, the image store, a tokenizer) and, through
//! the tasks it loads, in each task (rootfs, Dockerfile, binds, host files,
//! git mirrors). Every one is checked before anything runs.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use arbor_task::{FileSpec, Task};

use crate::experiment::{Experiment, PolicySpec, ScaffoldSpec};

/// The allowed directories, canonical.
#[derive(Debug, Clone, Default)]
pub struct AllowedDirs(Vec<PathBuf>);

impl AllowedDirs {
    /// Each directory must exist; it is kept canonical (symlinks resolved).
    pub fn new(dirs: &[PathBuf]) -> io::Result<Self> {
        let mut out = Vec::new();
        for d in dirs {
            let c = std::fs::canonicalize(d).map_err(|e| {
                io::Error::new(e.kind(), format!("allowed directory {}: {e}", d.display()))
            })?;
            if !c.is_dir() {
                return Err(io::Error::other(format!(
                    "allowed directory {} is not a directory",
                    d.display()
                )));
            }
            out.push(c);
        }
        Ok(AllowedDirs(out))
    }

    /// The canonical directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.0
    }

    /// `Ok` if `path` (named by `field`) resolves inside an allowed directory,
    /// else a message naming the path, where it leads and the allowed directories.
    pub fn check(&self, field: &str, path: &Path) -> Result<(), String> {
        let resolved = resolve(path).map_err(|e| {
            format!(
                "{field}: host path {} cannot be resolved: {e}",
                path.display()
            )
        })?;
        if self.0.iter().any(|d| resolved.starts_with(d)) {
            return Ok(());
        }
        let leads = if resolved == path {
            String::new()
        } else {
            format!(" (it resolves to {})", resolved.display())
        };
        let allowed = if self.0.is_empty() {
            "this server allows no host paths".to_string()
        } else {
            let list: Vec<String> = self.0.iter().map(|d| d.display().to_string()).collect();
            format!("the allowed directories are {}", list.join(", "))
        };
        Err(format!(
            "{field}: host path {} is outside the directories this server allows{leads}; \
             {allowed} (the operator adds one with `arbor serve --allow-dir DIR`)",
            path.display()
        ))
    }

    /// Checks every host path of a submitted experiment.
    pub fn check_experiment(&self, exp: &Experiment) -> Result<(), String> {
        experiment_paths(exp)
            .iter()
            .try_for_each(|(field, p)| self.check(field, p))
    }

    /// Checks every host path of the tasks a batch loaded.
    pub fn check_tasks(&self, tasks: &[Task]) -> Result<(), String> {
        tasks
            .iter()
            .flat_map(task_paths)
            .try_for_each(|(field, p)| self.check(&field, &p))
    }
}

/// The path with every symlink and `..` resolved. Trailing components that
/// do not exist yet are kept as they are, provided they are plain names (no
/// `..`) and not a dangling symlink (whose target could appear later).
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut missing: Vec<OsString> = Vec::new();
    let mut existing = abs.as_path();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut c) => {
                c.extend(missing.iter().rev());
                return Ok(c);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(existing).is_ok() {
                    return Err(io::Error::other(format!(
                        "{} is a symlink to nothing",
                        existing.display()
                    )));
                }
                // `file_name` is `None` for a path ending in `..`.
                let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                    return Err(io::Error::other("`..` after a path that does not exist"));
                };
                missing.push(name.to_os_string());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The host paths an experiment names, each with the field naming it.
fn experiment_paths(exp: &Experiment) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for (i, d) in exp.datasets.iter().enumerate() {
        if let Some(p) = &d.path {
            out.push((format!("datasets[{i}].path"), p.clone()));
        }
    }
    for (i, s) in exp.scaffolds.iter().enumerate() {
        let binds = match s {
            ScaffoldSpec::Bash(_) | ScaffoldSpec::Tools(_) => continue,
            ScaffoldSpec::Blackbox(b) => &b.binds,
            ScaffoldSpec::ClaudeCode(p)
            | ScaffoldSpec::Codex(p)
            | ScaffoldSpec::Opencode(p)
            | ScaffoldSpec::MiniSweAgent(p) => {
                if let Some(path) = &p.path {
                    out.push((format!("scaffolds[{i}].path"), path.clone()));
                }
                &p.binds
            }
        };
        for (j, b) in binds.iter().enumerate() {
            out.push((
                format!("scaffolds[{i}].binds[{j}].source"),
                b.source.clone(),
            ));
        }
    }
    if let PolicySpec::Embedded { checkpoint, .. } = &exp.policy {
        out.push(("policy.checkpoint".into(), checkpoint.clone()));
    }
    if let Some(root) = &exp.images.root {
        out.push(("images.root".into(), root.clone()));
    }
    if let Some(t) = &exp.gateway.tokenizer {
        out.push(("gateway.tokenizer".into(), t.clone()));
    }
    out
}

/// The host paths a task names, each with the field naming it.
fn task_paths(t: &Task) -> Vec<(String, PathBuf)> {
    let field = |f: &str| format!("task `{}`: {f}", t.id);
    let env = &t.environment;
    let mut out = Vec::new();
    let mut files = |what: &str, files: Vec<&FileSpec>| {
        for f in files {
            if let Some(s) = &f.source {
                out.push((field(&format!("{what} `{}` source", f.path)), s.clone()));
            }
        }
    };
    files("environment.files", env.files.iter().collect());
    if let Some(o) = &t.oracle {
        files("oracle.files", o.files.iter().collect());
    }
    files("verifier.files", t.verifier.files());
    if let Some(r) = &env.rootfs {
        out.push((field("environment.rootfs"), r.clone()));
    }
    if let Some(d) = &env.dockerfile {
        out.push((field("environment.dockerfile"), d.clone()));
    }
    if let Some(g) = &env.git {
        out.push((field("environment.git.repo"), g.repo.clone()));
    }
    for (j, b) in env.binds.iter().enumerate() {
        out.push((
            field(&format!("environment.binds[{j}].source")),
            b.source.clone(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_and_dotdot_cannot_leave_an_allowed_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let allowed = tmp.path().join("data");
        let outside = tmp.path().join("secret");
        std::fs::create_dir_all(allowed.join("tasks")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        symlink(&outside, allowed.join("escape")).expect("symlink");
        symlink(allowed.join("tasks"), allowed.join("inner")).expect("symlink");
        symlink(tmp.path().join("nothing"), allowed.join("dangling")).expect("symlink");
        let a = AllowedDirs::new(std::slice::from_ref(&allowed)).expect("allowed");
        let ok = |p: PathBuf| a.check("f", &p);
        assert_eq!(ok(allowed.join("tasks")), Ok(()));
        assert_eq!(
            ok(allowed.join("inner/later/file.toml")),
            Ok(()),
            "not yet there"
        );
        let e = ok(allowed.join("tasks/../../secret")).unwrap_err();
        assert!(
            e.contains("outside") && e.contains(&outside.display().to_string()),
            "{e}"
        );
        assert!(ok(allowed.join("escape")).is_err());
        assert!(ok(allowed.join("escape/new")).is_err());
        assert!(
            ok(allowed.join("dangling"))
                .unwrap_err()
                .contains("symlink to nothing")
        );
        assert!(ok(allowed.join("nope/..")).is_err());
        // `/data2` is not inside `/data`.
        let sibling = PathBuf::from(format!("{}2", allowed.display()));
        assert!(ok(sibling).is_err());
        let none = AllowedDirs::default();
        let e = none.check("f", &allowed).unwrap_err();
        assert!(e.contains("allows no host paths"), "{e}");
    }
}
