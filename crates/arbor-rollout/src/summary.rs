//! The one JSON object `arbor run --json` prints at the end.

use serde::{Deserialize, Serialize};

use crate::record::{RolloutResult, Status};

/// Run-wide figures. Counts cover the whole run directory (earlier
/// invocations included, so a resumed run reports the complete run); rates
/// and timings cover this invocation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    /// Policy label; `scripted-oracle` runs test the infrastructure only.
    pub policy: String,
    pub run_dir: String,
    /// Rollouts the experiment asks for.
    pub requested: usize,
    /// Results recorded (one per requested rollout when complete).
    pub rollouts: usize,
    pub passed: usize,
    pub failed: usize,
    pub agent_failures: usize,
    pub infra_errors: usize,
    /// Mean reward over scored rollouts (infrastructure errors excluded).
    pub mean_reward: f64,
    /// Passed / scored.
    pub pass_rate: f64,
    /// Rollouts finished by this invocation.
    pub new_rollouts: usize,
    /// Rollouts finished per minute of this invocation's wall time.
    pub rollouts_per_min: f64,
    /// Per agent step: time spent neither in the policy nor executing the
    /// action: the scaffold's own work plus the model call's HTTP, gateway
    /// and durable-recording time (the gateway reports the policy's part),
    /// median and p99. White-box scaffolds only.
    pub p50_step_overhead_ms: f64,
    pub p99_step_overhead_ms: f64,
    /// Per agent step: the model call as the scaffold sees it (gateway,
    /// recording and policy), median.
    pub p50_model_call_ms: f64,
    /// Per agent step: executing the action in the sandbox (exec round
    /// trip included), median.
    pub p50_action_ms: f64,
    /// Most sandboxes alive at once (agent sandboxes, grading sandboxes and
    /// warm pool).
    pub peak_live_sandboxes: i64,
    /// Attempts beyond the first, caused by infrastructure failures.
    pub infra_retries: u64,
    /// Requested minus recorded.
    pub lost: usize,
    /// Wall seconds of this invocation.
    pub seconds: f64,
}

/// The `q`-quantile of `v` (nearest rank; 0 for an empty slice).
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Counts over `results` (the whole run).
pub fn fill_counts(s: &mut Summary, results: &[RolloutResult]) {
    s.rollouts = results.len();
    s.passed = results
        .iter()
        .filter(|r| r.status == Status::Passed)
        .count();
    s.failed = results
        .iter()
        .filter(|r| r.status == Status::Failed)
        .count();
    s.agent_failures = results
        .iter()
        .filter(|r| r.status == Status::AgentFailure)
        .count();
    s.infra_errors = results
        .iter()
        .filter(|r| r.status == Status::InfraError)
        .count();
    let scored: Vec<&RolloutResult> = results.iter().filter(|r| r.status.is_scored()).collect();
    if !scored.is_empty() {
        s.mean_reward = scored.iter().map(|r| r.reward).sum::<f64>() / scored.len() as f64;
        s.pass_rate = s.passed as f64 / scored.len() as f64;
    }
    s.lost = s.requested.saturating_sub(s.rollouts);
}
