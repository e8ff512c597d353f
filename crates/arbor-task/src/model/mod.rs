//! The task model: what every dataset adapter produces and every runner
//! consumes. It is plain serde data; arbor's native task format is exactly
//! its serialization (TOML or JSON, see `docs/tasks.md`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use arbor_sandbox::Bind;
use serde::{Deserialize, Serialize};

mod verifier;

pub use verifier::*;

/// Default working directory of a task's sandbox.
pub const DEFAULT_WORKDIR: &str = "/workspace";

fn default_workdir() -> String {
    DEFAULT_WORKDIR.to_string()
}

fn default_domain() -> String {
    "general".to_string()
}

/// One task: an instruction to an agent, the environment it acts in, how
/// the result is scored, and a reference solution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Unique id within its dataset.
    pub id: String,
    /// Domain (`swe`, `terminal`, `webcoding`, `websearch`, `general`, or any label).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// What the agent is asked to do.
    pub instruction: String,
    /// The sandbox the agent acts in.
    #[serde(default)]
    pub environment: Environment,
    /// How the final state is scored.
    pub verifier: VerifierSpec,
    /// A reference solution (must score 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle: Option<Solution>,
    /// Where this task must be graded (`fork` of the final state, or a
    /// `fresh` sandbox holding a copy of the workdir); `None` = the
    /// grader's default (fork).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade_mode: Option<GradeMode>,
    /// Free-form metadata (`split`, `difficulty`, source fields...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl Task {
    /// A metadata value as a string, if present and a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.as_str())
    }
}

/// The sandbox a task runs in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// A container image the task runs in (pulled into the image store on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A Dockerfile (host path) that must be built into the task's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<PathBuf>,
    /// Root filesystem directory on the host (default: the sandbox backend's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// Working directory of the agent (and of setup, solutions and graders).
    #[serde(default = "default_workdir")]
    pub workdir: String,
    /// Files put in place before the agent starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// A git checkout placed in `workdir` (from a host mirror or bundle)
    /// before the files and setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitCheckout>,
    /// Shell script (`/bin/sh -c`, in `workdir`) run after the files are in
    /// place and before the agent starts. A failure is a broken task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<String>,
    /// Environment variables of every command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Host paths made visible inside (read-only by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<Bind>,
    /// Resource requests.
    #[serde(default)]
    pub resources: Resources,
    /// Whether the task expects internet access (the local backend has none;
    /// a warning is logged).
    #[serde(default)]
    pub allow_internet: bool,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            image: None,
            dockerfile: None,
            rootfs: None,
            workdir: default_workdir(),
            files: Vec::new(),
            git: None,
            setup: None,
            env: BTreeMap::new(),
            binds: Vec::new(),
            resources: Resources::default(),
            allow_internet: false,
        }
    }
}

/// Resource requests of a task. Unset values use the backend's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Writable storage, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_mb: Option<u64>,
    /// Time the agent is given, seconds (enforced by the rollout layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_timeout_s: Option<f64>,
}

/// A file placed in a sandbox: inline text, or a host file or directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Destination inside the sandbox: absolute, or relative to the workdir.
    pub path: String,
    /// Inline content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Host file or directory copied instead of `content` (relative paths in
    /// native task files are resolved against the file's folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// Permission bits (default 0o644; 0o755 for `.sh` files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl FileSpec {
    /// An inline text file.
    pub fn text(path: impl Into<String>, content: impl Into<String>) -> Self {
        FileSpec {
            path: path.into(),
            content: Some(content.into()),
            source: None,
            mode: None,
        }
    }

    /// An inline executable file.
    pub fn executable(path: impl Into<String>, content: impl Into<String>) -> Self {
        FileSpec {
            mode: Some(0o755),
            ..FileSpec::text(path, content)
        }
    }

    /// A host file or directory.
    pub fn host(path: impl Into<String>, source: impl Into<PathBuf>) -> Self {
        FileSpec {
            path: path.into(),
            content: None,
            source: Some(source.into()),
            mode: None,
        }
    }
}

/// A git tree placed in the workdir: the files of `commit` from a host
/// repository (a mirror directory or a bundle file), committed as a fresh
/// single-commit repository so the agent sees no future history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCheckout {
    /// Host path of a git repository (bare or not) or a `.bundle` file.
    pub repo: PathBuf,
    /// Commit to check out.
    pub commit: String,
}

/// A solution applied to a prepared sandbox: files, then a patch, then a script.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Solution {
    /// Files written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// A unified diff applied in the workdir (`git apply`, falling back to `patch -p1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// A shell script run by `/bin/bash` (or `/bin/sh`) in the workdir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Timeout of the script, seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

/// A short description of a task, for listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// Task id.
    pub id: String,
    /// Domain.
    pub domain: String,
    /// Verifier kind.
    pub verifier: String,
    /// Whether an oracle solution exists.
    pub has_oracle: bool,
    /// `train` / `heldout` when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Difficulty when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<u64>,
    /// The first line of the instruction (at most 100 characters).
    pub instruction: String,
}

impl From<&Task> for TaskSummary {
    fn from(t: &Task) -> Self {
        let first = t
            .instruction
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        TaskSummary {
            id: t.id.clone(),
            domain: t.domain.clone(),
            verifier: t.verifier.kind().to_string(),
            has_oracle: t.oracle.is_some(),
            split: t.meta_str("split").map(str::to_string),
            difficulty: t.metadata.get("difficulty").and_then(|v| v.as_u64()),
            instruction: first.trim().chars().take(100).collect(),
        }
    }
}
