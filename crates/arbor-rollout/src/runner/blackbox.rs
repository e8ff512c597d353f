//! Black-box agents in a run: their configurations resolved once (a missing
//! CLI stops the run before it starts), each run's exit code and output
//! tail kept in `RUN/agents/<session>.json`, and the setup failures told
//! apart from the agent's own.
//!
//! An agent that could not start (exit 126/127: binary missing or not
//! executable) or that exited non-zero having made no model call (a wrong
//! base URL, a refused request, a broken configuration) never worked the
//! task: its reward-0 result would be a fake negative sample. Such an
//! attempt is recorded as `infra_error` with the class `agent_setup`, which
//! keeps it out of reward statistics and RL groups; it is not retried,
//! because a retry would fail the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arbor_agent::scaffold::blackbox::BlackBoxConfig;
use arbor_agent::{EpisodeOutcome, StopReason};
use arbor_sandbox::Bind;
use serde::Serialize;

use crate::error::{Result, RolloutError};
use crate::experiment::Experiment;

/// The run directory's folder of black-box run records.
pub const AGENTS_DIR: &str = "agents";

/// The failure class of an agent that never got to work.
pub const SETUP_CLASS: &str = "agent_setup";

/// A black-box scaffold ready to run: its configuration and sandbox binds.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedAgent {
    pub(crate) config: BlackBoxConfig,
    pub(crate) binds: Vec<Bind>,
}

/// Every black-box scaffold of `exp` by name, or an error naming the first
/// whose agent cannot be found on the host.
pub(crate) fn resolve_agents(exp: &Experiment) -> Result<HashMap<String, ResolvedAgent>> {
    let mut agents = HashMap::new();
    for s in &exp.scaffolds {
        let Some(config) = s.blackbox().map_err(RolloutError::Other)? else {
            continue;
        };
        let binds = config.sandbox_binds().map_err(RolloutError::Other)?;
        agents.insert(s.name().to_string(), ResolvedAgent { config, binds });
    }
    Ok(agents)
}

/// What `RUN/agents/<session>.json` holds.
#[derive(Debug, Serialize)]
struct AgentRecord<'a> {
    session: &'a str,
    scaffold: &'a str,
    exit_code: Option<i32>,
    timed_out: bool,
    model_calls: usize,
    seconds: f64,
    output_tail: &'a str,
}

/// Writes the record of one black-box run (best effort: a write failure is
/// logged, the rollout goes on).
pub(crate) fn save_record(
    run_dir: &Path,
    session: &str,
    scaffold: &str,
    outcome: &EpisodeOutcome,
    model_calls: usize,
    seconds: f64,
) {
    let rec = AgentRecord {
        session,
        scaffold,
        exit_code: exit_code(outcome),
        timed_out: outcome.stop == StopReason::TimedOut,
        model_calls,
        seconds,
        output_tail: outcome.output_tail.as_deref().unwrap_or_default(),
    };
    let path = record_path(run_dir, session);
    let written = std::fs::create_dir_all(run_dir.join(AGENTS_DIR)).and_then(|()| {
        let json = serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?;
        std::fs::write(&path, json)
    });
    if let Err(e) = written {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

/// Where the record of `session` is kept.
pub fn record_path(run_dir: &Path, session: &str) -> PathBuf {
    run_dir.join(AGENTS_DIR).join(format!("{session}.json"))
}

fn exit_code(o: &EpisodeOutcome) -> Option<i32> {
    match o.stop {
        StopReason::Exited { code } => Some(code),
        _ => None,
    }
}

/// Why a finished black-box run is a setup failure, or `None` when the
/// agent worked (its result is graded as usual).
pub(crate) fn setup_failure(
    scaffold: &str,
    outcome: &EpisodeOutcome,
    model_calls: usize,
) -> Option<String> {
    let code = exit_code(outcome)?;
    let cause = match code {
        127 => "exited with code 127: its command was not found (is the agent installed, and bound into the sandbox?)".to_string(),
        126 => "exited with code 126: its command is not executable".to_string(),
        0 => return None,
        c if model_calls == 0 => format!(
            "exited with code {c} having made no model call (check its base URL, API and configuration)"
        ),
        _ => return None,
    };
    let tail = outcome.output_tail.as_deref().unwrap_or_default();
    let tail = tail.trim();
    let last: String = {
        let start = tail.len().saturating_sub(1500);
        let start = (start..=tail.len())
            .find(|&i| tail.is_char_boundary(i))
            .unwrap_or(tail.len());
        tail[start..].to_string()
    };
    Some(format!(
        "agent `{scaffold}` {cause}; {model_calls} model calls; output tail: {last}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32, tail: &str) -> EpisodeOutcome {
        EpisodeOutcome {
            stop: StopReason::Exited { code },
            turns: vec![],
            prompt_tokens: 0,
            completion_tokens: 0,
            format_errors: 0,
            output_tail: Some(tail.into()),
        }
    }

    #[test]
    fn setup_failures_are_missing_commands_and_silent_non_zero_exits() {
        let m = setup_failure("cc", &exited(127, "sh: 1: claude: not found\n"), 0)
            .expect("127 is a setup failure");
        assert!(
            m.contains("code 127") && m.contains("claude: not found"),
            "{m}"
        );
        let m = setup_failure("cc", &exited(1, "Connection refused"), 0).expect("no call");
        assert!(
            m.contains("no model call") && m.contains("Connection refused"),
            "{m}"
        );
        // An agent that talked to the model and then failed is judged on its work.
        assert_eq!(setup_failure("cc", &exited(1, "error"), 3), None);
        assert_eq!(setup_failure("cc", &exited(0, ""), 0), None);
        let mut timed_out = exited(0, "");
        timed_out.stop = StopReason::TimedOut;
        assert_eq!(setup_failure("cc", &timed_out, 0), None);
    }
}
