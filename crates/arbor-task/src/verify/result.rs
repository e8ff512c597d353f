//! What grading returns: the reward, whose fault a failure is, judge calls.

use serde::{Deserialize, Serialize};

/// One call to an LLM judge, kept with the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeCall {
    /// 0-based attempt number.
    pub attempt: u32,
    /// The request body sent.
    pub request: serde_json::Value,
    /// HTTP status, if a response arrived.
    pub status: Option<u16>,
    /// The response body (at most 64 KiB).
    pub response: Option<String>,
    /// Why this attempt did not produce a score.
    pub error: Option<String>,
    /// The score parsed, if any.
    pub score: Option<f64>,
    /// Milliseconds.
    pub ms: u64,
}

/// Whose fault a failed result is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Nobody's: the task was solved.
    None,
    /// The agent's: reward 0 (or partial), counts in training statistics.
    Agent,
    /// The infrastructure's: retry, keep out of training statistics.
    Infrastructure,
}

/// The outcome of grading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifierResult {
    /// Reward in [0, 1].
    pub reward: f64,
    /// Whether the task counts as solved.
    pub passed: bool,
    /// Verifier-specific details (per-test status, command output tails...).
    pub details: serde_json::Value,
    /// Set when the result is not the agent's doing (retry; do not train on it).
    pub infra_error: Option<String>,
    /// A grading command hit its timeout (the agent's fault unless `infra_error`).
    pub timed_out: bool,
    /// Calls made to an LLM judge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub judge_calls: Vec<JudgeCall>,
    /// Wall-clock seconds spent grading.
    pub seconds: f64,
}

impl VerifierResult {
    /// A pass/fail result.
    pub fn score(passed: bool, details: serde_json::Value) -> Self {
        VerifierResult {
            reward: if passed { 1.0 } else { 0.0 },
            passed,
            details,
            infra_error: None,
            timed_out: false,
            judge_calls: Vec::new(),
            seconds: 0.0,
        }
    }

    /// A result that is the infrastructure's fault.
    pub fn infra(message: impl Into<String>) -> Self {
        let message = message.into();
        VerifierResult {
            reward: 0.0,
            passed: false,
            details: serde_json::json!({ "reason": message }),
            infra_error: Some(message),
            timed_out: false,
            judge_calls: Vec::new(),
            seconds: 0.0,
        }
    }

    /// Whose fault a failure is.
    pub fn fault(&self) -> Fault {
        if self.infra_error.is_some() {
            Fault::Infrastructure
        } else if self.passed {
            Fault::None
        } else {
            Fault::Agent
        }
    }
}
