//! Black-box scaffolds: any agent program (a CLI, an SDK loop) run inside
//! the sandbox, its OpenAI/Anthropic base URL pointed at the model endpoint.
//! arbor does not see its loop; the gateway sees (and records) its calls.
//!
//! The sandbox has no network. The endpoint must be reachable inside, which
//! the caller arranges with a sandbox bridge (`NetworkSpec::tcp_bridges` or
//! `unix_bridges`) and passes as the client's base URL *as seen inside*.
//! The agent program itself usually lives on the host (an npm prefix, a
//! virtualenv): [`BlackBoxConfig::binds`] names what the caller binds
//! read-only into the sandbox. Presets for known CLIs are in
//! [`super::presets`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use arbor_sandbox::{Bind, BindMode, ExecRequest, Sandbox};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{EpisodeOutcome, Scaffold, StopReason, Turn};
use crate::client::ChatClient;
use crate::error::AgentError;

/// Where the instruction is written inside the sandbox.
pub const INSTRUCTION_FILE: &str = "/tmp/arbor-instruction.md";

/// How to install and run an agent program.
///
/// Placeholders in `run`, `env` values and `files` contents: `{base_url}`
/// (ends in `/v1`), `{base_url_root}` (the same without `/v1`, for clients
/// that append `/v1/messages` themselves, e.g. Anthropic's), `{api_key}`,
/// `{model}`, `{instruction}` (shell-quoted) and `{instruction_file}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackBoxConfig {
    /// Name in reports (e.g. `mini-swe-agent`).
    pub name: String,
    /// Shell commands run first, in order; any failure is an infrastructure error.
    #[serde(default)]
    pub install: Vec<String>,
    /// The shell command that runs the agent.
    pub run: String,
    /// Extra environment, e.g. `OPENAI_BASE_URL = "{base_url}"`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files written into the sandbox before `install` (absolute path ->
    /// contents), e.g. the agent's own configuration file.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Host paths bound read-only into the sandbox (the agent's binary or
    /// package folder); the caller adds them to the sandbox spec.
    #[serde(default)]
    pub binds: Vec<AgentBind>,
    /// Hard limit for the agent process (its whole process tree is killed).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Time limit of each install command.
    #[serde(default = "default_install_timeout")]
    pub install_timeout_s: f64,
}

/// A host path bound read-only into the agent's sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBind {
    /// Host path (file or folder); it must exist.
    pub source: PathBuf,
    /// Path inside the sandbox (default: the same as `source`, which keeps
    /// absolute paths inside a virtualenv or npm prefix valid).
    #[serde(default)]
    pub target: Option<String>,
}

impl AgentBind {
    /// `source` bound at its own path.
    pub fn same_path(source: impl Into<PathBuf>) -> Self {
        AgentBind {
            source: source.into(),
            target: None,
        }
    }
}

impl BlackBoxConfig {
    /// The sandbox binds of [`Self::binds`], or a message naming the first
    /// host path that is missing.
    pub fn sandbox_binds(&self) -> Result<Vec<Bind>, String> {
        self.binds
            .iter()
            .map(|b| {
                if !b.source.exists() {
                    return Err(format!(
                        "scaffold `{}`: {} does not exist on the host (is the agent installed? \
                         scripts/install-agents.sh installs the presets' CLIs)",
                        self.name,
                        b.source.display()
                    ));
                }
                Ok(Bind {
                    source: b.source.clone(),
                    target: b
                        .target
                        .clone()
                        .unwrap_or_else(|| b.source.to_string_lossy().into_owned()),
                    mode: BindMode::ReadOnly,
                })
            })
            .collect()
    }
}

fn default_timeout() -> f64 {
    1800.0
}

fn default_install_timeout() -> f64 {
    600.0
}

/// Runs a [`BlackBoxConfig`].
#[derive(Debug, Clone)]
pub struct BlackBoxScaffold {
    pub config: BlackBoxConfig,
}

/// Single-quote for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `base_url` without its trailing `/v1`.
fn url_root(base_url: &str) -> &str {
    let u = base_url.trim_end_matches('/');
    u.strip_suffix("/v1").unwrap_or(u)
}

fn fill(template: &str, model: &ChatClient, instruction: &str) -> String {
    template
        .replace("{base_url_root}", url_root(model.base_url()))
        .replace("{base_url}", model.base_url())
        .replace("{api_key}", model.api_key())
        .replace("{model}", model.model())
        .replace("{instruction_file}", INSTRUCTION_FILE)
        .replace("{instruction}", &shell_quote(instruction))
}

#[async_trait]
impl Scaffold for BlackBoxScaffold {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn run(
        &self,
        sandbox: &dyn Sandbox,
        instruction: &str,
        model: &ChatClient,
    ) -> Result<EpisodeOutcome, AgentError> {
        let cfg = &self.config;
        sandbox
            .write_file(INSTRUCTION_FILE, instruction.as_bytes(), 0o644)
            .await?;
        for (path, contents) in &cfg.files {
            let text = fill(contents, model, instruction);
            sandbox.write_file(path, text.as_bytes(), 0o644).await?;
        }
        for cmd in &cfg.install {
            let r = sandbox
                .exec(
                    ExecRequest::new(["sh", "-c", cmd])
                        .timeout(Duration::from_secs_f64(cfg.install_timeout_s)),
                )
                .await?;
            if r.exit_code != 0 || r.timed_out {
                return Err(AgentError::Sandbox(arbor_sandbox::SandboxError::Setup(
                    format!(
                        "{}: install step {cmd:?} failed (exit {}{}): {}",
                        cfg.name,
                        r.exit_code,
                        if r.timed_out { ", timed out" } else { "" },
                        r.stderr_str().chars().take(2000).collect::<String>()
                    ),
                )));
            }
        }
        let mut req = ExecRequest::new(["sh", "-c", &fill(&cfg.run, model, instruction)])
            .timeout(Duration::from_secs_f64(cfg.timeout_s));
        for (k, v) in &cfg.env {
            req = req.env(k.clone(), fill(v, model, instruction));
        }
        let t = Instant::now();
        let r = sandbox.exec(req).await?;
        let elapsed = t.elapsed();
        let stop = if r.timed_out {
            StopReason::TimedOut
        } else {
            StopReason::Exited { code: r.exit_code }
        };
        let tail = output_tail(&format!("{}{}", r.stdout_str(), r.stderr_str()));
        Ok(EpisodeOutcome {
            stop,
            turns: vec![Turn {
                index: 0,
                action: cfg.name.clone(),
                model_ms: 0.0,
                action_ms: elapsed.as_secs_f64() * 1e3,
                overhead_ms: 0.0,
                context_rewritten: false,
                policy_ms: None,
            }],
            prompt_tokens: 0,
            completion_tokens: 0,
            format_errors: 0,
            output_tail: Some(tail),
        })
    }
}

/// Characters of an agent's output kept to say why it stopped.
pub const OUTPUT_TAIL_CHARS: usize = 4000;

/// The last [`OUTPUT_TAIL_CHARS`] bytes of `out`, cut at a character boundary.
fn output_tail(out: &str) -> String {
    let mut start = out.len().saturating_sub(OUTPUT_TAIL_CHARS);
    while !out.is_char_boundary(start) {
        start += 1;
    }
    out[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_include_the_url_without_v1() {
        let m = ChatClient::new("http://127.0.0.1:18000/s/x.a1/v1", "k", "m");
        assert_eq!(
            fill("{base_url_root} {base_url} {model} {api_key}", &m, "hi"),
            "http://127.0.0.1:18000/s/x.a1 http://127.0.0.1:18000/s/x.a1/v1 m k"
        );
        assert_eq!(fill("{instruction}", &m, "it's"), r"'it'\''s'");
    }

    #[test]
    fn missing_bind_sources_are_named() {
        let cfg = BlackBoxConfig {
            name: "agent".into(),
            install: vec![],
            run: "true".into(),
            env: BTreeMap::new(),
            files: BTreeMap::new(),
            binds: vec![AgentBind::same_path("/nonexistent/arbor-agent-bin")],
            timeout_s: 1.0,
            install_timeout_s: 1.0,
        };
        let e = cfg.sandbox_binds().expect_err("missing");
        assert!(e.contains("/nonexistent/arbor-agent-bin") && e.contains("install-agents.sh"));
        assert_eq!(output_tail("héllo"), "héllo");
        assert!(output_tail(&"é".repeat(3000)).len() <= OUTPUT_TAIL_CHARS);
    }
}
