//! SWE-bench JSONL instances and predictions.
//!
//! Each instance becomes a task whose environment is the repository's files
//! at `base_commit` (from a local git mirror directory or bundle, mapped per
//! `repo` in a config file) in `/testbed`, plus the install commands of its
//! repo/version spec. Grading restores the files `test_patch` touches,
//! applies `test_patch` after the agent has finished, runs the spec's test
//! command on those files, parses per-test status and requires every
//! FAIL_TO_PASS and PASS_TO_PASS test to pass.
//!
//! Config (`swebench.toml` next to the JSONL by default):
//!
//! ```toml
//! [repos]
//! "owner/name" = "/mirrors/name.git"     # a git directory, or a .bundle file
//!
//! [specs."owner/name"."1.0"]             # version, or "*" for any
//! install = "pip install -e ."
//! test_cmd = "pytest -rA"
//! parser = "pytest"                       # pytest | unittest | junit
//! ```
//!
//! Specs may also live in a separate file (`specs = "specs.json"`), in the
//! shape of SWE-bench's `MAP_REPO_VERSION_TO_SPECS`.
//!
//! With an `[images]` table ([`SweImages`]) every instance instead runs in
//! its own prebuilt image (`{registry}/{prefix}{instance_id}:{tag}`, named
//! as SWE-bench's harness names them) whose `/testbed` already holds the
//! repository and its environment: no `[repos]` entry, no checkout, no
//! install; grading enters the environment (`activate`) before the tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TaskError};
use crate::model::{Environment, GitCheckout, Solution, Task};
use crate::run::{PrepareOptions, run_solution};
use crate::source::{Dataset, check_unique, deserialize_at, read_text, toml_to_value, validate};
use crate::verify::{GradeOptions, LogParser, TestSuiteSpec, VerifierResult, VerifierSpec};

mod images;

pub use images::{DEFAULT_ACTIVATE, DEFAULT_PREFIX, DEFAULT_REGISTRY, DEFAULT_TAG, SweImages};

/// Workdir of SWE-bench tasks (as in SWE-bench's images).
pub const SWE_WORKDIR: &str = "/testbed";

/// Whether a JSONL file's first record looks like a SWE-bench instance.
pub fn looks_like_swebench(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v.get("instance_id").is_some() && v.get("FAIL_TO_PASS").is_some())
}

/// One SWE-bench instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct SweInstance {
    /// `owner__repo-number`.
    pub instance_id: String,
    /// `owner/repo`.
    pub repo: String,
    /// Commit the agent starts from.
    pub base_commit: String,
    /// The gold patch (the oracle).
    pub patch: String,
    /// The patch adding/changing tests, applied at grading.
    pub test_patch: String,
    /// The issue text.
    pub problem_statement: String,
    /// Hints (not shown to agents by default).
    #[serde(default)]
    pub hints_text: String,
    /// Creation time.
    #[serde(default)]
    pub created_at: Value,
    /// Repository version (selects the spec).
    #[serde(default)]
    pub version: Value,
    /// Tests that must go from failing to passing (a JSON-encoded list in a string).
    pub FAIL_TO_PASS: Value,
    /// Tests that must keep passing (a JSON-encoded list in a string).
    pub PASS_TO_PASS: Value,
    /// Commit used to build the environment.
    #[serde(default)]
    pub environment_setup_commit: Option<String>,
}

/// Install and test commands of one repo/version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RepoSpec {
    /// Commands run before `install`.
    pub pre_install: StringOrList,
    /// Install command.
    pub install: StringOrList,
    /// Test command; the test files touched by `test_patch` are appended.
    pub test_cmd: StringOrList,
    /// Commands run before the tests at grading time.
    pub eval_commands: StringOrList,
    /// Log format of the test command.
    pub parser: Option<LogParser>,
    /// JUnit report path (with `parser = "junit"`).
    pub junit_path: Option<String>,
    /// Append the test files to `test_cmd` (default true).
    pub test_files_as_args: Option<bool>,
    /// Root filesystem to run on (default: the backend's).
    pub rootfs: Option<PathBuf>,
    /// Container image (needs an OCI backend).
    pub image: Option<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Test timeout, seconds.
    pub timeout_s: Option<f64>,
    /// Other SWE-bench spec keys (python version, packages...), kept as metadata.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A string or a list of strings (SWE-bench specs use both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// Unset.
    #[default]
    None,
    /// One command.
    One(String),
    /// Several commands.
    Many(Vec<String>),
}

impl StringOrList {
    fn lines(&self) -> Vec<String> {
        match self {
            StringOrList::None => Vec::new(),
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        }
    }
}

/// The SWE-bench adapter's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweBenchConfig {
    /// `owner/name` → host git directory or bundle.
    pub repos: BTreeMap<String, PathBuf>,
    /// `owner/name` → version (or `*`) → spec.
    pub specs: BTreeMap<String, BTreeMap<String, RepoSpec>>,
    /// A JSON or TOML file with more specs (same shape as `specs`).
    pub specs_file: Option<PathBuf>,
    /// Show `hints_text` to the agent (default false).
    pub include_hints: bool,
    /// Run every instance in its own prebuilt image instead of a mirror
    /// checkout plus install (image mode).
    pub images: Option<SweImages>,
}

impl SweBenchConfig {
    /// Load a config file; relative paths are resolved against its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let v = toml_to_value(&read_text(path)?, &file)?;
        let mut cfg: SweBenchConfig = deserialize_at(v, &file)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in cfg.repos.values_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(sf) = cfg.specs_file.clone() {
            let sf = if sf.is_relative() { base.join(sf) } else { sf };
            let sfile = sf.display().to_string();
            let text = read_text(&sf)?;
            let v = if sf.extension().is_some_and(|e| e == "toml") {
                toml_to_value(&text, &sfile)?
            } else {
                serde_json::from_str(&text)
                    .map_err(|e| TaskError::invalid(&sfile, "-", format!("invalid JSON: {e}")))?
            };
            let more: BTreeMap<String, BTreeMap<String, RepoSpec>> = deserialize_at(v, &sfile)?;
            for (repo, versions) in more {
                cfg.specs.entry(repo).or_default().extend(versions);
            }
        }
        Ok(cfg)
    }

    fn spec_for(&self, repo: &str, version: &str) -> Option<&RepoSpec> {
        let m = self.specs.get(repo)?;
        m.get(version).or_else(|| m.get("*"))
    }
}

/// A SWE-bench JSONL file with its config.
pub struct SweBenchDataset {
    path: PathBuf,
    config_path: PathBuf,
}

impl SweBenchDataset {
    /// Instances in `path`, config at `config`.
    pub fn new(path: &Path, config: &Path) -> Self {
        SweBenchDataset {
            path: path.to_path_buf(),
            config_path: config.to_path_buf(),
        }
    }
}

impl Dataset for SweBenchDataset {
    fn name(&self) -> String {
        format!("swebench:{}", self.path.display())
    }

    fn load(&self) -> Result<Vec<Task>> {
        let cfg = if self.config_path.is_file() {
            SweBenchConfig::load(&self.config_path)?
        } else {
            return Err(TaskError::invalid(
                self.config_path.display().to_string(),
                "-",
                "SWE-bench config not found (it maps each `repo` to a local git mirror or bundle, \
                 or names instance images in [images], and gives each repo's test command)",
            ));
        };
        let instances = read_instances(&self.path)?;
        let mut tasks = Vec::new();
        for (line, inst) in instances {
            let file = format!("{}:{line}", self.path.display());
            tasks.push(instance_to_task(&inst, &cfg, &file)?);
        }
        check_unique(&tasks, &self.path)?;
        Ok(tasks)
    }
}

/// Read instances (with their 1-based line numbers), validating each field.
pub fn read_instances(path: &Path) -> Result<Vec<(usize, SweInstance)>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let file = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| TaskError::invalid(&file, "-", format!("invalid JSON: {e}")))?;
        let inst: SweInstance = deserialize_at(v, &file)?;
        test_list(&inst.FAIL_TO_PASS, &file, "FAIL_TO_PASS")?;
        test_list(&inst.PASS_TO_PASS, &file, "PASS_TO_PASS")?;
        out.push((i + 1, inst));
    }
    Ok(out)
}

/// A test list: a JSON-encoded list inside a string (or a plain list).
pub fn test_list(v: &Value, file: &str, field: &str) -> Result<Vec<String>> {
    let list: Value = match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            TaskError::invalid(
                file,
                field,
                format!("not a JSON-encoded list of test names: {e}"),
            )
        })?,
        other => other.clone(),
    };
    let arr = list
        .as_array()
        .ok_or_else(|| TaskError::invalid(file, field, "not a list of test names"))?;
    arr.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| TaskError::invalid(file, field, format!("not a test name: {x}")))
        })
        .collect()
}

/// Files a unified diff touches (`diff --git a/X b/X`, or `+++ b/X`), and
/// whether each existed before (not `new file mode` / `--- /dev/null`).
pub fn diff_files(patch: &str) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in patch.lines() {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            let b = rest.split(" b/").last().unwrap_or("").to_string();
            if !b.is_empty() {
                out.push((b, true));
                current = Some(out.len() - 1);
            }
        } else if line.starts_with("new file mode") || line == "--- /dev/null" {
            if let Some(i) = current {
                out[i].1 = false;
            }
        } else if let Some(p) = line.strip_prefix("+++ b/")
            && current.is_none()
            && !out.iter().any(|(f, _)| f == p)
        {
            out.push((p.trim().to_string(), true));
        }
    }
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Turn an instance into a task: in image mode (the config has `[images]`)
/// it runs in the instance's image as it is; otherwise in a checkout of
/// `base_commit` from the repo's mirror, after the spec's install.
pub fn instance_to_task(inst: &SweInstance, cfg: &SweBenchConfig, file: &str) -> Result<Task> {
    let version = match &inst.version {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    };
    let spec = cfg.spec_for(&inst.repo, &version).ok_or_else(|| {
        TaskError::invalid(
            file,
            "version",
            format!(
                "no spec for {} version {version:?} (nor \"*\") in the config",
                inst.repo
            ),
        )
    })?;
    let mut environment = match &cfg.images {
        Some(images) => image_environment(inst, spec, images, file)?,
        None => mirror_environment(inst, spec, cfg, file)?,
    };
    environment.env = spec.env.clone();
    let activate = cfg.images.as_ref().map_or("", |i| i.activate.trim());
    let mut instruction = inst.problem_statement.clone();
    if cfg.include_hints && !inst.hints_text.trim().is_empty() {
        instruction.push_str("\n\nHints:\n");
        instruction.push_str(&inst.hints_text);
    }
    let task = Task {
        id: inst.instance_id.clone(),
        domain: "swe".into(),
        instruction,
        environment,
        verifier: VerifierSpec::TestSuite(test_suite(inst, spec, activate, file)?),
        oracle: Some(Solution {
            patch: Some(inst.patch.clone()),
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: metadata(inst, spec, version),
    };
    validate(&task, file)?;
    Ok(task)
}

/// Mirror mode: the files of `base_commit` from the repo's local mirror,
/// then the spec's `pre_install` and `install`.
fn mirror_environment(
    inst: &SweInstance,
    spec: &RepoSpec,
    cfg: &SweBenchConfig,
    file: &str,
) -> Result<Environment> {
    let repo_path = cfg.repos.get(&inst.repo).ok_or_else(|| {
        TaskError::invalid(
            file,
            "repo",
            format!(
                "`{}` has no local mirror in the config's [repos] (or give the config an \
                 [images] table to run instances in their images)",
                inst.repo
            ),
        )
    })?;
    let mut setup = spec.pre_install.lines();
    setup.extend(spec.install.lines());
    Ok(Environment {
        image: spec.image.clone(),
        rootfs: spec.rootfs.clone(),
        workdir: SWE_WORKDIR.into(),
        git: Some(GitCheckout {
            repo: repo_path.clone(),
            commit: inst.base_commit.clone(),
        }),
        setup: Some(format!("set -e\n{}", setup.join("\n"))),
        ..Environment::default()
    })
}

/// Image mode: the instance's image (the spec's own `image` wins) as it
/// is; setup only tags the base state for the test-file restore.
fn image_environment(
    inst: &SweInstance,
    spec: &RepoSpec,
    images: &SweImages,
    file: &str,
) -> Result<Environment> {
    let image = match &spec.image {
        Some(image) => image.clone(),
        None => images.checked_image_name(&inst.instance_id, file)?,
    };
    Ok(Environment {
        image: Some(image),
        workdir: SWE_WORKDIR.into(),
        setup: Some(images.setup_script()),
        ..Environment::default()
    })
}

/// The grading: restore the files `test_patch` touches, apply it, run
/// `activate`, the eval commands and the test command on those files.
fn test_suite(
    inst: &SweInstance,
    spec: &RepoSpec,
    activate: &str,
    file: &str,
) -> Result<TestSuiteSpec> {
    let test_cmd = spec.test_cmd.lines().join(" && ");
    if test_cmd.trim().is_empty() {
        return Err(TaskError::invalid(
            file,
            "version",
            format!("the spec of {} has no test_cmd", inst.repo),
        ));
    }
    let touched = diff_files(&inst.test_patch);
    let restore: Vec<String> = touched
        .iter()
        .map(|(f, existed)| {
            if *existed {
                format!(
                    "git checkout -q arbor-base -- {} 2>/dev/null || true",
                    shell_quote(f)
                )
            } else {
                format!("rm -f {}", shell_quote(f))
            }
        })
        .collect();
    let mut command: Vec<String> = Vec::new();
    if !activate.is_empty() {
        command.push(activate.to_string());
    }
    command.extend(spec.eval_commands.lines());
    let mut tc = test_cmd;
    if spec.test_files_as_args.unwrap_or(true) {
        for (f, _) in &touched {
            tc.push(' ');
            tc.push_str(&shell_quote(f));
        }
    }
    command.push(tc);
    Ok(TestSuiteSpec {
        command: command.join(" && "),
        pre_command: (!restore.is_empty()).then(|| restore.join("\n")),
        patch: Some(inst.test_patch.clone()),
        files: Vec::new(),
        parser: spec.parser.unwrap_or_default(),
        junit_path: spec.junit_path.clone(),
        fail_to_pass: test_list(&inst.FAIL_TO_PASS, file, "FAIL_TO_PASS")?,
        pass_to_pass: test_list(&inst.PASS_TO_PASS, file, "PASS_TO_PASS")?,
        timeout_s: spec.timeout_s,
    })
}

fn metadata(inst: &SweInstance, spec: &RepoSpec, version: String) -> BTreeMap<String, Value> {
    let mut metadata = BTreeMap::new();
    metadata.insert("source".into(), Value::String("swebench".into()));
    metadata.insert("repo".into(), Value::String(inst.repo.clone()));
    metadata.insert("version".into(), Value::String(version));
    metadata.insert(
        "base_commit".into(),
        Value::String(inst.base_commit.clone()),
    );
    if let Some(c) = &inst.environment_setup_commit {
        metadata.insert("environment_setup_commit".into(), Value::String(c.clone()));
    }
    if !inst.created_at.is_null() {
        metadata.insert("created_at".into(), inst.created_at.clone());
    }
    for (k, v) in &spec.extra {
        metadata.insert(format!("spec.{k}"), v.clone());
    }
    metadata
}

/// One line of a SWE-bench predictions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Instance.
    pub instance_id: String,
    /// Who produced the patch.
    pub model_name_or_path: String,
    /// The patch (may be empty).
    #[serde(default)]
    pub model_patch: String,
}

/// Read a predictions JSONL file.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let file = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| TaskError::invalid(&file, "-", format!("invalid JSON: {e}")))?;
        // `model_patch` may be null in the wild (no patch produced).
        let v = match v {
            Value::Object(mut m) => {
                if m.get("model_patch").is_some_and(Value::is_null) {
                    m.insert("model_patch".into(), Value::String(String::new()));
                }
                Value::Object(m)
            }
            other => other,
        };
        out.push(deserialize_at(v, &file)?);
    }
    Ok(out)
}

/// Write a predictions JSONL file.
pub fn write_predictions(path: &Path, preds: &[Prediction]) -> Result<()> {
    let mut s = String::new();
    for p in preds {
        s.push_str(&serde_json::to_string(p).map_err(|e| TaskError::Other(e.to_string()))?);
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| TaskError::io(format!("writing {}", path.display()), e))
}

/// The outcome of grading one prediction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictionResult {
    /// Instance.
    pub instance_id: String,
    /// All FAIL_TO_PASS and PASS_TO_PASS tests pass.
    pub resolved: bool,
    /// The full verifier result (`None` when the instance is unknown).
    pub result: Option<VerifierResult>,
    /// Why it could not be graded.
    pub error: Option<String>,
}

/// Grade predictions made elsewhere against their instances, `concurrency` at a time.
pub async fn evaluate_predictions(
    backend: Arc<dyn arbor_sandbox::Backend>,
    tasks: &[Task],
    preds: &[Prediction],
    concurrency: usize,
    prepare: &PrepareOptions,
    grade: &GradeOptions,
) -> Vec<PredictionResult> {
    let by_id: BTreeMap<&str, &Task> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (i, p) in preds.iter().enumerate() {
        let Some(task) = by_id.get(p.instance_id.as_str()).map(|t| (*t).clone()) else {
            continue;
        };
        let (backend, sem, prepare, grade, patch) = (
            backend.clone(),
            sem.clone(),
            prepare.clone(),
            grade.clone(),
            p.model_patch.clone(),
        );
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let sol = Solution {
                patch: Some(patch),
                ..Solution::default()
            };
            (
                i,
                run_solution(backend.as_ref(), &task, Some(&sol), &prepare, &grade).await,
            )
        });
    }
    let mut done: BTreeMap<usize, Result<VerifierResult>> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((i, res)) = r {
            done.insert(i, res);
        }
    }
    preds
        .iter()
        .enumerate()
        .map(|(i, p)| match done.remove(&i) {
            Some(Ok(r)) => PredictionResult {
                instance_id: p.instance_id.clone(),
                resolved: r.passed && r.infra_error.is_none(),
                result: Some(r),
                error: None,
            },
            Some(Err(e)) => PredictionResult {
                instance_id: p.instance_id.clone(),
                resolved: false,
                result: None,
                error: Some(e.to_string()),
            },
            None => PredictionResult {
                instance_id: p.instance_id.clone(),
                resolved: false,
                result: None,
                error: Some(if by_id.contains_key(p.instance_id.as_str()) {
                    "grading did not complete".into()
                } else {
                    "unknown instance_id".into()
                }),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_file_list() {
        let p = "diff --git a/tests/test_a.py b/tests/test_a.py\nindex 1..2 100644\n--- a/tests/test_a.py\n+++ b/tests/test_a.py\n@@ -1 +1 @@\n-x\n+y\n\
                 diff --git a/tests/test_new.py b/tests/test_new.py\nnew file mode 100644\n--- /dev/null\n+++ b/tests/test_new.py\n@@ -0,0 +1 @@\n+z\n";
        assert_eq!(
            diff_files(p),
            vec![
                ("tests/test_a.py".to_string(), true),
                ("tests/test_new.py".to_string(), false)
            ]
        );
    }

    #[test]
    fn test_lists() {
        assert_eq!(
            test_list(&Value::String(r#"["a", "b"]"#.into()), "f", "FAIL_TO_PASS").ok(),
            Some(vec!["a".into(), "b".into()])
        );
        let e = test_list(&Value::String("a, b".into()), "f.jsonl:3", "FAIL_TO_PASS");
        assert!(matches!(e, Err(TaskError::Invalid { ref field, .. }) if field == "FAIL_TO_PASS"));
    }
}
