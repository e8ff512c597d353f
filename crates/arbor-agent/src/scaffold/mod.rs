//! The scaffold contract and what the built-in scaffolds share: limits,
//! context management, and the record of each turn.

pub mod bash;
pub mod blackbox;
mod editor;
pub mod presets;
pub mod tools;

use std::time::{Duration, Instant};

use arbor_sandbox::{ExecRequest, Sandbox};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::client::{ChatClient, ChatMessage};
use crate::error::AgentError;

/// Limits and prompts of a scaffold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaffoldConfig {
    /// Replaces the scaffold's default system prompt.
    pub system_prompt: Option<String>,
    /// Most model calls per episode.
    pub max_steps: u32,
    /// Stop once prompt + completion tokens reported by the endpoint pass this.
    pub max_total_tokens: Option<u64>,
    /// Per-command timeout in the sandbox, seconds.
    pub command_timeout_s: f64,
    /// Characters of command output kept per observation (head and tail).
    pub observation_chars: usize,
    /// What to do when the history grows past a budget.
    pub context: ContextPolicy,
}

impl Default for ScaffoldConfig {
    fn default() -> Self {
        ScaffoldConfig {
            system_prompt: None,
            max_steps: 30,
            max_total_tokens: None,
            command_timeout_s: 120.0,
            observation_chars: 10_000,
            context: ContextPolicy::None,
        }
    }
}

/// Context management. Rewriting old observations changes earlier prompt
/// text, so later calls no longer extend earlier ones: the trajectory
/// branches, exactly as real agents with compaction do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ContextPolicy {
    /// Keep everything.
    #[default]
    None,
    /// When the history passes `budget_chars`, replace all but the last
    /// `keep_last` observations with a one-line stub.
    TruncateObservations {
        budget_chars: usize,
        keep_last: usize,
    },
}

impl ContextPolicy {
    /// Apply to a history in place; returns true if anything changed.
    pub fn apply(&self, history: &mut [ChatMessage]) -> bool {
        let ContextPolicy::TruncateObservations {
            budget_chars,
            keep_last,
        } = self
        else {
            return false;
        };
        let size: usize = history
            .iter()
            .map(|m| m.content.as_deref().map_or(0, str::len))
            .sum();
        if size <= *budget_chars {
            return false;
        }
        let observations: Vec<usize> = history
            .iter()
            .enumerate()
            .filter(|(_, m)| is_observation(m))
            .map(|(i, _)| i)
            .collect();
        let cut = observations.len().saturating_sub(*keep_last);
        let mut changed = false;
        for &i in &observations[..cut] {
            let m = &mut history[i];
            if let Some(c) = &m.content
                && !c.starts_with(ELIDED)
            {
                m.content = Some(format!("{ELIDED} ({} characters)]", c.len()));
                changed = true;
            }
        }
        changed
    }
}

const ELIDED: &str = "[earlier output elided";
const OBSERVATION_TAG: &str = "<returncode>";

fn is_observation(m: &ChatMessage) -> bool {
    (m.role == "tool" || m.role == "user")
        && m.content
            .as_deref()
            .is_some_and(|c| c.starts_with(OBSERVATION_TAG) || c.starts_with(ELIDED))
}

/// Why an episode ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The agent submitted.
    Submitted,
    /// `max_steps` model calls were made.
    StepLimit,
    /// The token budget ran out.
    TokenLimit,
    /// A black-box agent process ended by itself with this exit code.
    Exited { code: i32 },
    /// A black-box agent process was killed at its time limit.
    TimedOut,
}

/// One turn: a model call and the action it led to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Turn {
    pub index: u32,
    /// What the agent did (command, tool and path, or a format error).
    pub action: String,
    /// Time in the model call.
    pub model_ms: f64,
    /// Time in the sandbox executing the action.
    pub action_ms: f64,
    /// Time in neither (scaffold overhead).
    pub overhead_ms: f64,
    /// Of `model_ms`, the part the gateway reports as spent in the policy
    /// itself (the rest is HTTP, gateway work and durable recording).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_ms: Option<f64>,
    /// The context policy rewrote history before this call.
    pub context_rewritten: bool,
}

/// The result of an episode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpisodeOutcome {
    pub stop: StopReason,
    pub turns: Vec<Turn>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Replies that broke the protocol (no command, bad tool call).
    pub format_errors: u32,
    /// The end of a black-box agent's output (stdout then stderr), to say
    /// why it stopped; `None` for arbor's own scaffolds.
    pub output_tail: Option<String>,
}

/// A loop that works a task in a sandbox through a model endpoint.
#[async_trait]
pub trait Scaffold: Send + Sync {
    /// Name used in reports and experiment files.
    fn name(&self) -> &str;

    /// Run one episode. Errors are infrastructure failures or sandbox faults;
    /// anything the agent does wrong ends in an [`EpisodeOutcome`].
    async fn run(
        &self,
        sandbox: &dyn Sandbox,
        instruction: &str,
        model: &ChatClient,
    ) -> Result<EpisodeOutcome, AgentError>;
}

/// Format command output for the model, keeping head and tail when long.
pub(crate) fn observation(
    exit_code: i32,
    timed_out: bool,
    stdout: &[u8],
    stderr: &[u8],
    max_chars: usize,
) -> String {
    let mut out = String::from_utf8_lossy(stdout).into_owned();
    let err = String::from_utf8_lossy(stderr);
    if !err.is_empty() {
        out.push_str(&err);
    }
    if out.len() > max_chars {
        let half = max_chars / 2;
        let head_end = floor_char(&out, half);
        let tail_start = floor_char(&out, out.len() - half);
        out = format!(
            "{}\n[... {} characters elided ...]\n{}",
            &out[..head_end],
            tail_start - head_end,
            &out[tail_start..]
        );
    }
    let note = if timed_out {
        "\n[command timed out and was killed]"
    } else {
        ""
    };
    format!("{OBSERVATION_TAG}{exit_code}</returncode>\n<output>\n{out}</output>{note}")
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Run a shell command for the agent and time it.
pub(crate) async fn run_command(
    sandbox: &dyn Sandbox,
    command: &str,
    cfg: &ScaffoldConfig,
) -> Result<(String, Duration), AgentError> {
    let t = Instant::now();
    let r = sandbox
        .exec(
            ExecRequest::new(["bash", "-c", command])
                .timeout(Duration::from_secs_f64(cfg.command_timeout_s)),
        )
        .await?;
    Ok((
        observation(
            r.exit_code,
            r.timed_out,
            &r.stdout,
            &r.stderr,
            cfg.observation_chars,
        ),
        t.elapsed(),
    ))
}

/// Book-keeping shared by the scaffolds' loops.
pub(crate) struct Tally {
    pub outcome: EpisodeOutcome,
    started: Instant,
    /// Policy time of the current turn's model call, if reported.
    policy_ms: Option<f64>,
}

impl Tally {
    pub fn new() -> Self {
        Tally {
            outcome: EpisodeOutcome {
                stop: StopReason::StepLimit,
                turns: Vec::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                format_errors: 0,
                output_tail: None,
            },
            started: Instant::now(),
            policy_ms: None,
        }
    }

    /// Start a turn: apply the context policy, call the model, count its
    /// tokens. Returns the reply, the time in the call, and whether the
    /// history was rewritten first.
    pub async fn call_model(
        &mut self,
        cfg: &ScaffoldConfig,
        model: &ChatClient,
        history: &mut [ChatMessage],
        tools: Option<&serde_json::Value>,
        turn: u32,
    ) -> Result<(crate::client::ChatResponse, Duration, bool), AgentError> {
        self.started = Instant::now();
        let rewritten = cfg.context.apply(history);
        let t = Instant::now();
        let reply = model.complete(history, tools, turn).await?;
        self.policy_ms = reply.upstream_ms;
        self.outcome.prompt_tokens += reply.prompt_tokens;
        self.outcome.completion_tokens += reply.completion_tokens;
        Ok((reply, t.elapsed(), rewritten))
    }

    pub fn record(&mut self, action: String, model: Duration, act: Duration, rewritten: bool) {
        let total = self.started.elapsed();
        let index = self.outcome.turns.len() as u32;
        self.outcome.turns.push(Turn {
            index,
            action,
            model_ms: model.as_secs_f64() * 1e3,
            action_ms: act.as_secs_f64() * 1e3,
            overhead_ms: total.saturating_sub(model + act).as_secs_f64() * 1e3,
            context_rewritten: rewritten,
            policy_ms: self.policy_ms.take(),
        });
    }

    pub fn over_budget(&self, cfg: &ScaffoldConfig) -> bool {
        cfg.max_total_tokens
            .is_some_and(|m| self.outcome.prompt_tokens + self.outcome.completion_tokens >= m)
    }
}
