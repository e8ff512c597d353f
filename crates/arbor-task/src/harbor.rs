//! Harbor / Terminal-Bench 2 task folders:
//!
//! ```text
//! my-task/
//!   task.toml          [metadata] [verifier] timeout_sec, [agent] timeout_sec,
//!                      [environment] docker_image / cpus / memory_mb / storage_mb / allow_internet
//!   instruction.md     the instruction
//!   environment/       Dockerfile (needs an OCI backend) or plain files (copied to the workdir)
//!   tests/test.sh      writes /logs/verifier/reward.txt (a number) or reward.json
//!   solution/solve.sh  the oracle
//! ```
//!
//! Mapping: `tests/` is uploaded to `/tests` only at grading time and run as
//! `bash /tests/test.sh` (a `reward_file` verifier); `solution/` is uploaded
//! to `/solution` and run as `bash /solution/solve.sh`. The workdir is `/app`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Result, TaskError};
use crate::model::{Environment, FileSpec, Resources, Solution, Task};
use crate::source::{Dataset, check_unique, deserialize_at, read_text, toml_to_value, validate};
use crate::verify::{CommandSpec, VerifierSpec};

/// Workdir of Harbor tasks (Terminal-Bench convention).
pub const HARBOR_WORKDIR: &str = "/app";

/// Whether `dir` is one Harbor task folder.
pub fn is_task_dir(dir: &Path) -> bool {
    dir.join("task.toml").is_file() && dir.join("instruction.md").exists()
}

/// Whether `dir` holds Harbor task folders.
pub fn is_task_set(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| is_task_dir(&e.path())))
        .unwrap_or(false)
}

/// A Harbor task folder, or a folder of them.
pub struct HarborDataset {
    path: PathBuf,
}

impl HarborDataset {
    /// Harbor tasks at `path`.
    pub fn new(path: &Path) -> Self {
        HarborDataset {
            path: path.to_path_buf(),
        }
    }
}

impl Dataset for HarborDataset {
    fn name(&self) -> String {
        format!("harbor:{}", self.path.display())
    }

    fn load(&self) -> Result<Vec<Task>> {
        if is_task_dir(&self.path) {
            return Ok(vec![load_task_dir(&self.path)?]);
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .map_err(|e| TaskError::io(format!("reading {}", self.path.display()), e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("task.toml").is_file())
            .collect();
        dirs.sort();
        let tasks = dirs
            .iter()
            .map(|d| load_task_dir(d))
            .collect::<Result<Vec<_>>>()?;
        check_unique(&tasks, &self.path)?;
        Ok(tasks)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TaskToml {
    version: Option<Value>,
    metadata: BTreeMap<String, Value>,
    verifier: Section,
    agent: Section,
    environment: EnvSection,
    solution: BTreeMap<String, Value>,
    #[serde(flatten)]
    extra: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Section {
    timeout_sec: Option<f64>,
    env: BTreeMap<String, String>,
    #[serde(flatten)]
    extra: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EnvSection {
    docker_image: Option<String>,
    build_timeout_sec: Option<f64>,
    cpus: Option<f64>,
    memory_mb: Option<u64>,
    memory: Option<String>,
    storage_mb: Option<u64>,
    storage: Option<String>,
    allow_internet: Option<bool>,
    gpus: Option<u64>,
    env: BTreeMap<String, String>,
    #[serde(flatten)]
    extra: BTreeMap<String, Value>,
}

/// `"2G"`, `"512M"`, `"1024"` (MiB) → MiB.
fn parse_size_mb(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches('B').trim_end_matches('I');
    let (num, mult) = match t.chars().last()? {
        'G' => (&t[..t.len() - 1], 1024.0),
        'M' => (&t[..t.len() - 1], 1.0),
        'K' => (&t[..t.len() - 1], 1.0 / 1024.0),
        _ => (t, 1.0),
    };
    let x: f64 = num.trim().parse().ok()?;
    (x.is_finite() && x > 0.0).then(|| (x * mult).ceil() as u64)
}

/// Load and validate one Harbor task folder.
pub fn load_task_dir(dir: &Path) -> Result<Task> {
    let toml_path = dir.join("task.toml");
    let file = toml_path.display().to_string();
    let raw = toml_to_value(&read_text(&toml_path)?, &file)?;
    let t: TaskToml = deserialize_at(raw, &file)?;
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| TaskError::invalid(&file, "-", "task folder has no name"))?;
    let instruction = read_instruction(dir)?;
    let tests = dir.join("tests");
    check_fields(&t, &tests, &file)?;
    let environment = environment(dir, &t, &file, &id)?;
    let verifier = VerifierSpec::RewardFile(CommandSpec {
        command: verifier_command(&t.verifier.env),
        files: vec![FileSpec::host("/tests", &tests)],
        timeout_s: t.verifier.timeout_sec,
    });
    let sol_dir = dir.join("solution");
    let oracle = sol_dir.join("solve.sh").is_file().then(|| Solution {
        files: vec![FileSpec::host("/solution", &sol_dir)],
        script: Some("bash /solution/solve.sh".into()),
        timeout_s: t.agent.timeout_sec,
        ..Solution::default()
    });
    let metadata = metadata(dir, t, &id);
    let task = Task {
        id,
        domain: "terminal".into(),
        instruction,
        environment,
        verifier,
        oracle,
        grade_mode: None,
        metadata,
    };
    validate(&task, &file)?;
    Ok(task)
}

/// `instruction.md`, which must exist and not be blank.
fn read_instruction(dir: &Path) -> Result<String> {
    let instr_path = dir.join("instruction.md");
    let instruction = std::fs::read_to_string(&instr_path).map_err(|e| {
        TaskError::invalid(
            instr_path.display().to_string(),
            "instruction",
            format!("cannot read: {e}"),
        )
    })?;
    if instruction.trim().is_empty() {
        return Err(TaskError::invalid(
            instr_path.display().to_string(),
            "instruction",
            "is empty",
        ));
    }
    Ok(instruction)
}

/// What serde cannot check: the verifier script exists, timeouts and CPUs are positive.
fn check_fields(t: &TaskToml, tests: &Path, file: &str) -> Result<()> {
    if !tests.join("test.sh").is_file() {
        return Err(TaskError::invalid(
            tests.join("test.sh").display().to_string(),
            "tests/test.sh",
            "missing: the verifier script must write /logs/verifier/reward.txt or reward.json",
        ));
    }
    for (field, v) in [
        ("verifier.timeout_sec", t.verifier.timeout_sec),
        ("agent.timeout_sec", t.agent.timeout_sec),
    ] {
        if let Some(x) = v
            && (!x.is_finite() || x <= 0.0)
        {
            return Err(TaskError::invalid(file, field, "must be a positive number"));
        }
    }
    if let Some(c) = t.environment.cpus
        && (!c.is_finite() || c <= 0.0)
    {
        return Err(TaskError::invalid(
            file,
            "environment.cpus",
            "must be a positive number",
        ));
    }
    Ok(())
}

/// A size in MiB, given as a number (`mb`) or as text (`"2G"`) in `field`.
fn size_mb(mb: Option<u64>, text: &Option<String>, file: &str, field: &str) -> Result<Option<u64>> {
    match (mb, text) {
        (Some(m), _) => Ok(Some(m)),
        (None, Some(s)) => Ok(Some(parse_size_mb(s).ok_or_else(|| {
            TaskError::invalid(file, field, format!("not a size: {s:?}"))
        })?)),
        _ => Ok(None),
    }
}

/// The sandbox: `/app` holding `environment/` unless it is built from a Dockerfile.
fn environment(dir: &Path, t: &TaskToml, file: &str, id: &str) -> Result<Environment> {
    let e = &t.environment;
    let memory_mb = size_mb(e.memory_mb, &e.memory, file, "environment.memory")?;
    let storage_mb = size_mb(e.storage_mb, &e.storage, file, "environment.storage")?;
    if e.gpus.unwrap_or(0) > 0 {
        tracing::warn!(task = %id, "task asks for GPUs; the local backend gives none");
    }
    let env_dir = dir.join("environment");
    let dockerfile = ["Dockerfile", "docker-compose.yaml", "docker-compose.yml"]
        .iter()
        .map(|n| env_dir.join(n))
        .find(|p| p.is_file());
    let mut files = Vec::new();
    if env_dir.is_dir() && dockerfile.is_none() {
        files.push(FileSpec::host(HARBOR_WORKDIR, &env_dir));
    }
    let mut env_vars = e.env.clone();
    env_vars.extend(t.agent.env.clone());
    Ok(Environment {
        image: e.docker_image.clone().filter(|s| !s.trim().is_empty()),
        dockerfile,
        workdir: HARBOR_WORKDIR.to_string(),
        files,
        env: env_vars,
        resources: Resources {
            cpus: e.cpus,
            memory_mb,
            storage_mb,
            agent_timeout_s: t.agent.timeout_sec,
        },
        allow_internet: e.allow_internet.unwrap_or(false),
        ..Environment::default()
    })
}

/// Source, path, version and `[metadata]`, plus the keys arbor does not use
/// (kept so nothing in `task.toml` is silently lost).
fn metadata(dir: &Path, t: TaskToml, id: &str) -> BTreeMap<String, Value> {
    let e = &t.environment;
    let mut metadata: BTreeMap<String, Value> = BTreeMap::new();
    metadata.insert("source".into(), Value::String("harbor".into()));
    metadata.insert("path".into(), Value::String(dir.display().to_string()));
    if let Some(v) = t.version {
        metadata.insert("version".into(), v);
    }
    for (k, v) in t.metadata {
        metadata.insert(k, v);
    }
    let mut ignored: Vec<String> = t.extra.keys().cloned().collect();
    ignored.extend(t.verifier.extra.keys().map(|k| format!("verifier.{k}")));
    ignored.extend(t.agent.extra.keys().map(|k| format!("agent.{k}")));
    ignored.extend(e.extra.keys().map(|k| format!("environment.{k}")));
    ignored.extend(t.solution.keys().map(|k| format!("solution.{k}")));
    if let Some(b) = e.build_timeout_sec {
        metadata.insert("build_timeout_sec".into(), serde_json::json!(b));
    }
    if !ignored.is_empty() {
        tracing::debug!(task = %id, ?ignored, "task.toml keys arbor does not use");
        metadata.insert("unused_keys".into(), serde_json::json!(ignored));
    }
    metadata
}

fn verifier_command(env: &BTreeMap<String, String>) -> String {
    let mut cmd = String::new();
    for (k, v) in env {
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            cmd.push_str(&format!("{k}='{}' ", v.replace('\'', "'\\''")));
        }
    }
    if !cmd.is_empty() {
        cmd.insert_str(0, "env ");
    }
    cmd.push_str("bash /tests/test.sh");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mb("2G"), Some(2048));
        assert_eq!(parse_size_mb("512M"), Some(512));
        assert_eq!(parse_size_mb("1GiB"), Some(1024));
        assert_eq!(parse_size_mb("lots"), None);
    }
}
