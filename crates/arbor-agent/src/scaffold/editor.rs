//! The file editor behind the `tools` scaffold (`view`, `create`,
//! `str_replace`, `insert`, `undo_edit`), working through the sandbox's file
//! API. Mistakes (missing file, ambiguous match) are answers for the agent,
//! not errors of the episode.

use std::collections::HashMap;

use arbor_sandbox::{ExecRequest, Sandbox, SandboxError};
use serde::Deserialize;

use crate::error::AgentError;

/// Arguments of one editor call.
#[derive(Debug, Deserialize)]
pub struct EditArgs {
    pub command: String,
    pub path: String,
    #[serde(default)]
    pub file_text: Option<String>,
    #[serde(default)]
    pub old_str: Option<String>,
    #[serde(default)]
    pub new_str: Option<String>,
    #[serde(default)]
    pub insert_line: Option<usize>,
    #[serde(default)]
    pub view_range: Option<Vec<i64>>,
}

/// Editor state: previous contents per path, for `undo_edit`.
#[derive(Default)]
pub struct Editor {
    history: HashMap<String, Vec<Option<Vec<u8>>>>,
}

impl Editor {
    /// Perform one call; returns the text shown to the agent.
    pub async fn call(&mut self, sb: &dyn Sandbox, a: EditArgs) -> Result<String, AgentError> {
        if !a.path.starts_with('/') {
            return Ok(format!("Error: path {:?} must be absolute", a.path));
        }
        match a.command.as_str() {
            "view" => self.view(sb, &a).await,
            "create" => {
                let Some(text) = a.file_text.as_deref() else {
                    return Ok("Error: `create` needs `file_text`".into());
                };
                if read(sb, &a.path).await?.is_some() {
                    return Ok(format!(
                        "Error: {} already exists; edit it with `str_replace`",
                        a.path
                    ));
                }
                self.write(sb, &a.path, text.as_bytes(), None).await?;
                Ok(format!("Created {}", a.path))
            }
            "str_replace" => {
                let (Some(old), new) = (a.old_str.as_deref(), a.new_str.as_deref().unwrap_or(""))
                else {
                    return Ok("Error: `str_replace` needs `old_str`".into());
                };
                let Some(bytes) = read(sb, &a.path).await? else {
                    return Ok(format!("Error: {} does not exist", a.path));
                };
                let text = String::from_utf8_lossy(&bytes).into_owned();
                match text.matches(old).count() {
                    0 => Ok(format!("Error: `old_str` not found in {}", a.path)),
                    1 => {
                        let updated = text.replacen(old, new, 1);
                        self.write(sb, &a.path, updated.as_bytes(), Some(bytes))
                            .await?;
                        Ok(format!("Edited {}", a.path))
                    }
                    n => Ok(format!(
                        "Error: `old_str` occurs {n} times in {}; make it unique",
                        a.path
                    )),
                }
            }
            "insert" => {
                let (Some(line), Some(new)) = (a.insert_line, a.new_str.as_deref()) else {
                    return Ok("Error: `insert` needs `insert_line` and `new_str`".into());
                };
                let Some(bytes) = read(sb, &a.path).await? else {
                    return Ok(format!("Error: {} does not exist", a.path));
                };
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
                if line > lines.len() {
                    return Ok(format!(
                        "Error: insert_line {line} is past the end ({} lines)",
                        lines.len()
                    ));
                }
                let mut insert = new.to_string();
                if !insert.ends_with('\n') {
                    insert.push('\n');
                }
                lines.insert(line, &insert);
                self.write(sb, &a.path, lines.concat().as_bytes(), Some(bytes))
                    .await?;
                Ok(format!("Inserted after line {line} of {}", a.path))
            }
            "undo_edit" => match self.history.get_mut(&a.path).and_then(Vec::pop) {
                None => Ok(format!("Error: no edit of {} to undo", a.path)),
                Some(Some(prev)) => {
                    sb.write_file(&a.path, &prev, 0o644).await?;
                    Ok(format!("Reverted the last edit of {}", a.path))
                }
                Some(None) => {
                    sb.exec(ExecRequest::new(["rm", "-f", "--", &a.path]))
                        .await?;
                    Ok(format!("Removed {} (it did not exist before)", a.path))
                }
            },
            other => Ok(format!(
                "Error: unknown editor command {other:?} (use view, create, str_replace, insert, undo_edit)"
            )),
        }
    }

    async fn write(
        &mut self,
        sb: &dyn Sandbox,
        path: &str,
        data: &[u8],
        previous: Option<Vec<u8>>,
    ) -> Result<(), AgentError> {
        sb.write_file(path, data, 0o644).await?;
        self.history
            .entry(path.to_string())
            .or_default()
            .push(previous);
        Ok(())
    }

    async fn view(&self, sb: &dyn Sandbox, a: &EditArgs) -> Result<String, AgentError> {
        let r = sb
            .exec(ExecRequest::new([
                "sh",
                "-c",
                "test -d \"$1\" && find \"$1\" -maxdepth 2 -not -path '*/.*' | sort",
                "sh",
                &a.path,
            ]))
            .await?;
        if r.exit_code == 0 {
            return Ok(r.stdout_str());
        }
        let Some(bytes) = read(sb, &a.path).await? else {
            return Ok(format!("Error: {} does not exist", a.path));
        };
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let (from, to) = match a.view_range.as_deref() {
            Some([s, e]) => {
                let s = (*s).max(1) as usize;
                let e = if *e < 0 {
                    lines.len()
                } else {
                    (*e as usize).min(lines.len())
                };
                (s, e)
            }
            _ => (1, lines.len()),
        };
        let mut out = String::new();
        for (i, l) in lines
            .iter()
            .enumerate()
            .take(to)
            .skip(from.saturating_sub(1))
        {
            out.push_str(&format!("{:6}\t{l}\n", i + 1));
        }
        Ok(out)
    }
}

/// File contents, or `None` if it does not exist (or is not a regular file).
async fn read(sb: &dyn Sandbox, path: &str) -> Result<Option<Vec<u8>>, AgentError> {
    match sb.read_file(path).await {
        Ok(b) => Ok(Some(b)),
        Err(SandboxError::File { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
