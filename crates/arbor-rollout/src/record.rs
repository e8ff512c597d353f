//! The record of one finished rollout: one JSON line in a run's
//! `results.jsonl`. Reports, resume and the env server all read this.

use serde::{Deserialize, Serialize};

/// How a rollout ended. Only `passed`/`failed`/`agent_failure` enter reward
/// statistics; `infra_error` is the infrastructure's fault and is kept out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Graded, and the verifier says passed.
    Passed,
    /// Graded, not passed (reward may still be partial).
    Failed,
    /// The agent broke (its time limit, a fault of its own making in the
    /// sandbox): scored 0 without grading.
    AgentFailure,
    /// Sandbox, upstream or verifier infrastructure failed on every attempt.
    InfraError,
}

impl Status {
    /// Whether the rollout counts in reward statistics.
    pub fn is_scored(self) -> bool {
        self != Status::InfraError
    }
}

/// Why a rollout was not a clean pass or fail (the failure class in reports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// `sandbox`, `upstream`, `verifier`, `setup`, `agent_timeout`, `agent_error`;
    /// `call_cap` and `token_cap` (agent failures: the gateway refused a call past a
    /// per-session cap, `[gateway] max_calls_per_session` / `max_tokens_per_session`).
    pub class: String,
    /// Human-readable cause (tail).
    pub message: String,
}

/// The identity of a requested rollout: one sample of one task under one
/// scaffold. A run records exactly one result per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RolloutKey {
    pub task_id: String,
    pub scaffold: String,
    pub sample: u32,
}

impl RolloutKey {
    /// The gateway session id of attempt `attempt` (URL-safe, unique per
    /// attempt, so a retried or resumed rollout never appends to a dead
    /// attempt's session).
    pub fn session(&self, attempt: u32) -> String {
        format!("{}{attempt}", self.session_prefix())
    }

    /// Every attempt's session id is this prefix and the attempt number.
    pub fn session_prefix(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!(
            "{}.{}.s{}.a",
            clean(&self.task_id),
            clean(&self.scaffold),
            self.sample
        )
    }
}

/// Per-step timing of the agent loop, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    /// Median time per step not spent in the policy call or in the command.
    pub p50_overhead_ms: f64,
    /// Every step's overhead (for run-wide percentiles).
    pub overhead_ms: Vec<f64>,
    /// Total time in model calls (gateway + policy).
    pub model_ms: f64,
    /// Total time executing commands in the sandbox.
    pub action_ms: f64,
}

/// One finished rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutResult {
    #[serde(flatten)]
    pub key: RolloutKey,
    pub domain: String,
    /// Policy label (`scripted-oracle`, `upstream:<model>`, `embedded`).
    pub policy: String,
    pub status: Status,
    /// Verifier reward (0 for agent failures and infrastructure errors).
    pub reward: f64,
    pub passed: bool,
    /// Number of the final attempt: 1 + infrastructure retries + attempts
    /// lost with a killed invocation (those left a gateway session).
    pub attempts: u32,
    /// Gateway session of the final attempt: its calls are the trajectory.
    pub session: String,
    /// Why the episode ended (`submitted`, `step_limit`, ...), if it ended.
    pub stop: Option<serde_json::Value>,
    pub turns: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub format_errors: u32,
    pub timing: StepTiming,
    /// Wall seconds: agent episode, grading, whole rollout (final attempt).
    pub agent_s: f64,
    pub verify_s: f64,
    pub total_s: f64,
    pub failure: Option<Failure>,
    /// Verifier details (test statuses, answer comparison...).
    #[serde(default)]
    pub verifier: serde_json::Value,
    /// Unix seconds when the result was recorded.
    pub finished_at: f64,
}
