//! The `scripted-oracle` policy's scripts: a task's reference solution
//! (files, patch, script) turned into the shell commands an agent would type.
//!
//! Everything is carried inside the command text, so the commands go through
//! the model protocol (a fenced block or a `bash` tool call) and the gateway
//! records them like any model's output. Text files are written with heredocs
//! and short scripts are typed as they are (readable, and learnable by a model
//! trained on these trajectories); binary or long payloads travel in base64,
//! split across several commands: one argument to `bash -c` may not exceed
//! the kernel's 128 KiB per-string limit.

use std::path::Path;

use arbor_task::run::abs_path;
use arbor_task::{FileSpec, Solution, Task};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::error::{Result, RolloutError};

/// Base64 characters per command (well under the 128 KiB argument limit).
const CHUNK: usize = 48 * 1024;

/// Single-quote for the shell.
fn q(s: &str) -> String {
    arbor_agent::scaffold::blackbox::shell_quote(s)
}

/// Heredoc delimiter for text files.
const EOF_MARK: &str = "ARBOR_EOF";

/// Text a quoted heredoc reproduces byte for byte: UTF-8 ending in a
/// newline, no delimiter line, no NUL, and no fence that would cut the
/// bash scaffold's ```bash block short.
fn heredoc_safe(data: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(data).ok()?;
    let ok = text.ends_with('\n')
        && text.len() <= CHUNK
        && !text.contains('\0')
        && !text.contains("```")
        && !text.lines().any(|l| l == EOF_MARK);
    ok.then_some(text)
}

/// Commands that write `data` to `dest`. Text goes in a heredoc, readable
/// as an agent would type it (and learnable by a model trained on these
/// trajectories); anything else in base64 chunks (the first truncates,
/// the rest append).
fn write_bytes(dest: &str, data: &[u8], mode: u32, out: &mut Vec<String>) {
    let dir = Path::new(dest)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    if let Some(text) = heredoc_safe(data) {
        out.push(format!(
            "mkdir -p {d} && cat > {f} <<'{EOF_MARK}' && chmod {mode:o} {f}\n{text}{EOF_MARK}",
            d = q(&dir),
            f = q(dest)
        ));
        return;
    }
    let b64 = STANDARD.encode(data);
    if b64.is_empty() {
        out.push(format!(
            "mkdir -p {} && : > {} && chmod {mode:o} {}",
            q(&dir),
            q(dest),
            q(dest)
        ));
        return;
    }
    let chunks: Vec<&str> = b64
        .as_bytes()
        .chunks(CHUNK)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        // Each chunk is a whole number of 4-character groups (CHUNK is a
        // multiple of 4), so chunks decode independently.
        let redirect = if i == 0 { ">" } else { ">>" };
        let mut cmd = String::new();
        if i == 0 {
            cmd.push_str(&format!("mkdir -p {} && ", q(&dir)));
        }
        cmd.push_str(&format!("echo {chunk} | base64 -d {redirect} {}", q(dest)));
        if i == last {
            cmd.push_str(&format!(" && chmod {mode:o} {}", q(dest)));
        }
        out.push(cmd);
    }
}

fn file_commands(workdir: &str, f: &FileSpec, out: &mut Vec<String>) -> Result<()> {
    let dest = abs_path(workdir, &f.path);
    let default_mode = if dest.ends_with(".sh") { 0o755 } else { 0o644 };
    match (&f.content, &f.source) {
        (Some(text), _) => write_bytes(&dest, text.as_bytes(), f.mode.unwrap_or(default_mode), out),
        (None, Some(src)) if src.is_dir() => {
            let tar = arbor_sandbox::tar_directory(src)
                .map_err(|e| RolloutError::io(format!("packing {}", src.display()), e))?;
            let tmp = "/tmp/arbor-oracle.tar";
            write_bytes(tmp, &tar, 0o600, out);
            out.push(format!(
                "mkdir -p {d} && tar -xf {tmp} -C {d} && rm -f {tmp}",
                d = q(&dest)
            ));
        }
        (None, Some(src)) => {
            let data = std::fs::read(src)
                .map_err(|e| RolloutError::io(format!("reading {}", src.display()), e))?;
            let mode = f.mode.unwrap_or_else(|| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(src)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(default_mode)
            });
            write_bytes(&dest, &data, mode, out);
        }
        (None, None) => write_bytes(&dest, b"", f.mode.unwrap_or(default_mode), out),
    }
    Ok(())
}

/// Longest script typed inline rather than run from a file.
const INLINE_SCRIPT_MAX: usize = 4096;

/// `script` when it can be typed as one command: short, no NUL, no fence that would cut the
/// bash scaffold's block, and no explicit timeout (the file form enforces it).
fn inline_script(script: &str) -> Option<&str> {
    let text = script.trim_end();
    let ok = !text.is_empty()
        && text.len() <= INLINE_SCRIPT_MAX
        && !text.contains('\0')
        && !text.contains("```");
    ok.then_some(text)
}

/// The commands that apply `solution` in the task's workdir, in the order
/// `arbor_task::run::apply_solution` uses: files, patch, script.
pub fn solution_commands(task: &Task, solution: &Solution) -> Result<Vec<String>> {
    let workdir = &task.environment.workdir;
    let mut out = Vec::new();
    for f in &solution.files {
        file_commands(workdir, f, &mut out)?;
    }
    if let Some(p) = solution.patch.as_deref().filter(|p| !p.trim().is_empty()) {
        let tmp = "/tmp/arbor-oracle.patch";
        write_bytes(tmp, p.as_bytes(), 0o644, &mut out);
        out.push(format!(
            "cd {} && {{ {}; }}",
            q(workdir),
            arbor_task::verify::apply_patch_script(tmp)
        ));
    }
    if let Some(script) = &solution.script {
        // A short readable script is typed as it is (the scaffolds run commands with
        // `bash -c`), so trajectories show the commands a model can learn; anything else
        // goes through a script file.
        if solution.timeout_s.is_none()
            && let Some(text) = inline_script(script)
        {
            out.push(format!("cd {}\n{text}", q(workdir)));
            return Ok(out);
        }
        let tmp = "/tmp/arbor-oracle.sh";
        write_bytes(tmp, script.as_bytes(), 0o755, &mut out);
        let timeout = solution
            .timeout_s
            .unwrap_or(600.0)
            .clamp(1.0, 86400.0)
            .ceil() as u64;
        out.push(format!(
            "cd {} && if [ -x /bin/bash ]; then timeout {timeout} /bin/bash {tmp}; else timeout {timeout} /bin/sh {tmp}; fi",
            q(workdir)
        ));
    }
    Ok(out)
}

/// The oracle's commands for `task`, or an error naming a task without one.
pub fn oracle_commands(task: &Task) -> Result<Vec<String>> {
    let sol = task.oracle.as_ref().ok_or_else(|| {
        RolloutError::Other(format!(
            "task `{}` has no oracle solution; the scripted-oracle policy needs one",
            task.id
        ))
    })?;
    solution_commands(task, sol)
}
