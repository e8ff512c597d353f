//! Black-box scaffolds: any agent program (a CLI, an SDK loop) run inside
//! the sandbox, its OpenAI/Anthropic base URL pointed at the model endpoint.
//! arbor does not see its loop; the gateway sees (and records) its calls.
//!
//! The sandbox has no network. The endpoint must be reachable inside, which
//! the caller arranges with a sandbox bridge (`NetworkSpec::tcp_bridges` or
//! `unix_bridges`) and passes as the client's base URL *as seen inside*.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arbor_sandbox::{ExecRequest, Sandbox};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{EpisodeOutcome, Scaffold, StopReason, Turn};
use crate::client::ChatClient;
use crate::error::AgentError;

/// Where the instruction is written inside the sandbox.
pub const INSTRUCTION_FILE: &str = "/tmp/arbor-instruction.md";

/// How to install and run an agent program.
///
/// Placeholders in `run` and `env` values: `{base_url}` (ends in `/v1`),
/// `{api_key}`, `{model}`, `{instruction}` (shell-quoted) and
/// `{instruction_file}`.
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
    /// Hard limit for the agent process (its whole process tree is killed).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Time limit of each install command.
    #[serde(default = "default_install_timeout")]
    pub install_timeout_s: f64,
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

fn fill(template: &str, model: &ChatClient, instruction: &str) -> String {
    template
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
        let tail: String = {
            let out = format!("{}{}", r.stdout_str(), r.stderr_str());
            let start = out.len().saturating_sub(4000);
            out[out
                .char_indices()
                .map(|(i, _)| i)
                .find(|&i| i >= start)
                .unwrap_or(out.len())..]
                .to_string()
        };
        Ok(EpisodeOutcome {
            stop,
            turns: vec![Turn {
                index: 0,
                action: format!("{} (output tail: {tail})", cfg.name),
                model_ms: 0.0,
                action_ms: elapsed.as_secs_f64() * 1e3,
                overhead_ms: 0.0,
                context_rewritten: false,
                policy_ms: None,
            }],
            prompt_tokens: 0,
            completion_tokens: 0,
            format_errors: 0,
        })
    }
}
