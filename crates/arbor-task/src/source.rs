//! What every task source shares: the [`Dataset`] trait adapters implement,
//! and the reading steps they have in common (TOML to JSON, serde errors that
//! name the failing field, the checks serde cannot make, unique ids).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Result, TaskError};
use crate::model::{FileSpec, MatchMode, Task, VerifierSpec};

/// A source of tasks. Adding a format means implementing this trait.
pub trait Dataset: Send + Sync {
    /// A short description (format and path).
    fn name(&self) -> String;
    /// Load and validate every task. Errors name the file and field at fault.
    fn load(&self) -> Result<Vec<Task>>;
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
