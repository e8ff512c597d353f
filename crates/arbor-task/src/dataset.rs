//! Source auto-detection ([`open`]) and arbor's native format (a folder of
//! TOML/JSON task files, one file, or JSONL). The [`Dataset`] trait and the
//! reading steps every adapter shares live in `crate::source`, so that the
//! adapters ([`crate::swebench`], [`crate::harbor`]) need nothing from here.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, TaskError};
use crate::model::{FileSpec, Task, TaskSummary};
pub use crate::source::{Dataset, validate};
use crate::source::{check_unique, deserialize_at, read_text, toml_to_value};

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
