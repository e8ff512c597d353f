//! The [`Dataset`] trait, source auto-detection, and arbor's native format
//! (a folder of TOML/JSON task files, one file, or JSONL).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, TaskError};
use crate::model::{FileSpec, Task, TaskSummary};
use crate::verify::{MatchMode, VerifierSpec};

/// A source of tasks. Adding a format means implementing this trait.
pub trait Dataset: Send + Sync {
    /// A short description (format and path).
    fn name(&self) -> String;
    /// Load and validate every task. Errors name the file and field at fault.
    fn load(&self) -> Result<Vec<Task>>;
}

/// Options for opening a task source.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// SWE-bench config (repo → mirror/bundle map, install and test specs).
    /// Default: `swebench.toml` next to the JSONL file.
    pub swebench_config: Option<PathBuf>,
}

/// Open a task source, detecting its format:
/// - a Harbor task folder (`task.toml` + `instruction.md`), or a folder of them;
/// - a SWE-bench JSONL file (first record has `instance_id` and `FAIL_TO_PASS`);
/// - otherwise arbor's native format: a `.toml`/`.json` file, a `.jsonl`
///   file, or a folder of task files (`*.toml`, `*.json`, `*/task.toml`, `*/task.json`).
pub fn open(source: &Path, opts: &OpenOptions) -> Result<Box<dyn Dataset>> {
    if !source.exists() {
        return Err(TaskError::invalid(
            source.display().to_string(),
            "-",
            "no such file or directory",
        ));
    }
    if source.is_dir() {
        if crate::harbor::is_task_dir(source) || crate::harbor::is_task_set(source) {
            return Ok(Box::new(crate::harbor::HarborDataset::new(source)));
        }
        return Ok(Box::new(NativeDataset::new(source)));
    }
    if source.extension().is_some_and(|e| e == "jsonl")
        && crate::swebench::looks_like_swebench(source)
    {
        let cfg = opts.swebench_config.clone().unwrap_or_else(|| {
            source
                .parent()
                .unwrap_or(Path::new("."))
                .join("swebench.toml")
        });
        return Ok(Box::new(crate::swebench::SweBenchDataset::new(
            source, &cfg,
        )));
    }
    Ok(Box::new(NativeDataset::new(source)))
}

/// Open and load a source.
pub fn load(source: &Path, opts: &OpenOptions) -> Result<Vec<Task>> {
    open(source, opts)?.load()
}

/// Summaries of every task in a source (for `arbor task list`).
pub fn list(source: &Path, opts: &OpenOptions) -> Result<Vec<TaskSummary>> {
    Ok(load(source, opts)?.iter().map(TaskSummary::from).collect())
}

/// Native tasks: one file, a JSONL file, or a folder of task files.
pub struct NativeDataset {
    path: PathBuf,
}

impl NativeDataset {
    /// A native source at `path`.
    pub fn new(path: &Path) -> Self {
        NativeDataset {
            path: path.to_path_buf(),
        }
    }
}

impl Dataset for NativeDataset {
    fn name(&self) -> String {
        format!("native:{}", self.path.display())
    }

    fn load(&self) -> Result<Vec<Task>> {
        let mut tasks = Vec::new();
        if self.path.is_dir() {
            for f in native_files(&self.path)? {
                tasks.push(load_task_file(&f)?);
            }
        } else if self.path.extension().is_some_and(|e| e == "jsonl") {
            let text = read_text(&self.path)?;
            let base = self.path.parent().unwrap_or(Path::new("."));
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let file = format!("{}:{}", self.path.display(), i + 1);
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| TaskError::invalid(&file, "-", format!("invalid JSON: {e}")))?;
                tasks.push(task_from_value(v, &file, base)?);
            }
        } else {
            tasks.push(load_task_file(&self.path)?);
        }
        check_unique(&tasks, &self.path)?;
        Ok(tasks)
    }
}

fn native_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .map_err(|e| TaskError::io(format!("reading {}", dir.display()), e))?;
    for entry in rd {
        let p = entry
            .map_err(|e| TaskError::io(format!("reading {}", dir.display()), e))?
            .path();
        if p.is_dir() {
            for name in ["task.toml", "task.json"] {
                if p.join(name).is_file() {
                    out.push(p.join(name));
                }
            }
        } else if p.extension().is_some_and(|e| e == "toml" || e == "json") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| TaskError::io(format!("reading {}", p.display()), e))
}

/// Parse TOML text into a JSON value (errors name the file).
pub(crate) fn toml_to_value(text: &str, file: &str) -> Result<Value> {
    let t: toml::Value = toml::from_str(text).map_err(|e| {
        TaskError::invalid(file, "-", format!("invalid TOML: {}", e.to_string().trim()))
    })?;
    serde_json::to_value(t).map_err(|e| TaskError::invalid(file, "-", e.to_string()))
}

/// Load one native task file (`.toml` or `.json`).
pub fn load_task_file(path: &Path) -> Result<Task> {
    let text = read_text(path)?;
    let file = path.display().to_string();
    let v = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| TaskError::invalid(&file, "-", format!("invalid JSON: {e}")))?
    } else {
        toml_to_value(&text, &file)?
    };
    task_from_value(v, &file, path.parent().unwrap_or(Path::new(".")))
}

/// Deserialize a task from a JSON value, naming the field at fault, then
/// resolve relative host paths against `base` and validate.
pub fn task_from_value(v: Value, file: &str, base: &Path) -> Result<Task> {
    if let Some(ver) = v.get("verifier") {
        precheck_verifier(ver, file, "verifier")?;
    }
    let mut task: Task = deserialize_at(v, file)?;
    resolve_paths(&mut task, base);
    validate(&task, file)?;
    Ok(task)
}

/// serde with the path of the failing field.
pub(crate) fn deserialize_at<T: serde::de::DeserializeOwned>(v: Value, file: &str) -> Result<T> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // "missing field `x`" is reported at the parent; name the field itself.
        let field = match msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            Some(f) if path == "." => f.to_string(),
            Some(f) => format!("{path}.{f}"),
            None if msg.starts_with("unknown variant") && !path.ends_with("kind") => {
                format!("{path}.kind")
            }
            None => path,
        };
        TaskError::invalid(file, field, msg)
    })
}

/// Internally tagged enums lose the path of a bad field inside them, so
/// each verifier is checked on its own first: its `kind`, then its fields
/// against the variant's struct.
fn precheck_verifier(v: &Value, file: &str, field: &str) -> Result<()> {
    use crate::verify::{AnswerMatchSpec, CommandSpec, CompositeSpec, JudgeSpec, TestSuiteSpec};
    let Some(obj) = v.as_object() else {
        return Err(TaskError::invalid(file, field, "must be a table/object"));
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(_) => {
            return Err(TaskError::invalid(
                file,
                format!("{field}.kind"),
                "must be a string",
            ));
        }
        None => return Err(TaskError::invalid(file, format!("{field}.kind"), "missing")),
    };
    let mut inner = obj.clone();
    inner.remove("kind");
    let inner = Value::Object(inner);
    let prefix = |e: TaskError| match e {
        TaskError::Invalid {
            file,
            field: f,
            message,
        } => TaskError::Invalid {
            file,
            field: if f == "." {
                field.to_string()
            } else {
                format!("{field}.{f}")
            },
            message,
        },
        other => other,
    };
    match kind {
        "exit_status" | "reward_file" => deserialize_at::<CommandSpec>(inner, file)
            .map(|_| ())
            .map_err(prefix),
        "test_suite" => deserialize_at::<TestSuiteSpec>(inner, file)
            .map(|_| ())
            .map_err(prefix),
        "answer_match" => deserialize_at::<AnswerMatchSpec>(inner, file)
            .map(|_| ())
            .map_err(prefix),
        "llm_judge" => deserialize_at::<JudgeSpec>(inner, file)
            .map(|_| ())
            .map_err(prefix),
        "composite" => {
            if let Some(Value::Array(parts)) = obj.get("parts") {
                for (i, p) in parts.iter().enumerate() {
                    if let Some(pv) = p.get("verifier") {
                        precheck_verifier(pv, file, &format!("{field}.parts[{i}].verifier"))?;
                    }
                }
            }
            deserialize_at::<CompositeSpec>(inner, file)
                .map(|_| ())
                .map_err(prefix)
        }
        other => Err(TaskError::invalid(
            file,
            format!("{field}.kind"),
            format!(
                "unknown verifier kind `{other}` (exit_status, reward_file, test_suite, answer_match, llm_judge, composite)"
            ),
        )),
    }
}

fn resolve_paths(task: &mut Task, base: &Path) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    let fix_files = |files: Vec<&mut FileSpec>| {
        for f in files {
            if let Some(s) = f.source.as_mut()
                && s.is_relative()
            {
                *s = base.join(&*s);
            }
        }
    };
    let env = &mut task.environment;
    if let Some(p) = env.rootfs.as_mut() {
        fix(p);
    }
    if let Some(p) = env.dockerfile.as_mut() {
        fix(p);
    }
    if let Some(g) = env.git.as_mut() {
        fix(&mut g.repo);
    }
    fix_files(env.files.iter_mut().collect());
    if let Some(o) = task.oracle.as_mut() {
        fix_files(o.files.iter_mut().collect());
    }
    fix_files(task.verifier.files_mut());
}

/// Check what serde cannot: non-empty id and instruction, files with one
/// content source, valid regexes, sane weights.
pub fn validate(task: &Task, file: &str) -> Result<()> {
    if task.id.trim().is_empty() {
        return Err(TaskError::invalid(file, "id", "must not be empty"));
    }
    if task.id.contains('/') || task.id.contains('\0') {
        return Err(TaskError::invalid(file, "id", "must not contain `/`"));
    }
    if task.instruction.trim().is_empty() {
        return Err(TaskError::invalid(file, "instruction", "must not be empty"));
    }
    if !task.environment.workdir.starts_with('/') {
        return Err(TaskError::invalid(
            file,
            "environment.workdir",
            "must be an absolute path",
        ));
    }
    let check_files = |files: &[FileSpec], field: &str| -> Result<()> {
        for (i, f) in files.iter().enumerate() {
            if f.path.trim().is_empty() {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}[{i}].path"),
                    "must not be empty",
                ));
            }
            if f.content.is_some() && f.source.is_some() {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}[{i}]"),
                    "give either `content` or `source`, not both",
                ));
            }
        }
        Ok(())
    };
    check_files(&task.environment.files, "environment.files")?;
    if let Some(o) = &task.oracle {
        check_files(&o.files, "oracle.files")?;
    }
    validate_verifier(&task.verifier, file, "verifier")
}

fn validate_verifier(v: &VerifierSpec, file: &str, field: &str) -> Result<()> {
    match v {
        VerifierSpec::ExitStatus(c) | VerifierSpec::RewardFile(c) => {
            if c.command.trim().is_empty() {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}.command"),
                    "must not be empty",
                ));
            }
        }
        VerifierSpec::TestSuite(t) => {
            if t.command.trim().is_empty() {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}.command"),
                    "must not be empty",
                ));
            }
        }
        VerifierSpec::AnswerMatch(a) => {
            if a.mode == MatchMode::Regex {
                for (i, p) in std::iter::once(&a.expected)
                    .chain(&a.alternatives)
                    .enumerate()
                {
                    if let Err(e) = regex::Regex::new(p) {
                        let f = if i == 0 {
                            "expected".to_string()
                        } else {
                            format!("alternatives[{}]", i - 1)
                        };
                        return Err(TaskError::invalid(
                            file,
                            format!("{field}.{f}"),
                            format!("invalid regex: {e}"),
                        ));
                    }
                }
            }
            if a.mode == MatchMode::Numeric
                && crate::verify::answer::parse_number(&a.expected).is_none()
            {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}.expected"),
                    "not a number",
                ));
            }
        }
        VerifierSpec::LlmJudge(j) => {
            if !(j.endpoint.starts_with("http://") || j.endpoint.starts_with("https://")) {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}.endpoint"),
                    "must be an http(s) URL",
                ));
            }
        }
        VerifierSpec::Composite(c) => {
            if c.parts.is_empty() {
                return Err(TaskError::invalid(
                    file,
                    format!("{field}.parts"),
                    "must not be empty",
                ));
            }
            for (i, p) in c.parts.iter().enumerate() {
                if !p.weight.is_finite() || p.weight < 0.0 {
                    return Err(TaskError::invalid(
                        file,
                        format!("{field}.parts[{i}].weight"),
                        "must be a non-negative number",
                    ));
                }
                validate_verifier(&p.verifier, file, &format!("{field}.parts[{i}].verifier"))?;
            }
        }
    }
    Ok(())
}

pub(crate) fn check_unique(tasks: &[Task], source: &Path) -> Result<()> {
    let mut seen = BTreeSet::new();
    for t in tasks {
        if !seen.insert(t.id.as_str()) {
            return Err(TaskError::invalid(
                source.display().to_string(),
                "id",
                format!("duplicate task id `{}`", t.id),
            ));
        }
    }
    Ok(())
}

/// Write a task as pretty JSON to `dir/<id>.json`.
pub fn write_task_json(dir: &Path, task: &Task) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| TaskError::io(format!("creating {}", dir.display()), e))?;
    let p = dir.join(format!("{}.json", task.id));
    let text = serde_json::to_string_pretty(task).map_err(|e| TaskError::Other(e.to_string()))?;
    std::fs::write(&p, text + "\n")
        .map_err(|e| TaskError::io(format!("writing {}", p.display()), e))?;
    Ok(p)
}

/// Write tasks as JSONL.
pub fn write_jsonl(path: &Path, tasks: &[Task]) -> Result<()> {
    let mut out = String::new();
    for t in tasks {
        out.push_str(&serde_json::to_string(t).map_err(|e| TaskError::Other(e.to_string()))?);
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| TaskError::io(format!("writing {}", path.display()), e))
}
