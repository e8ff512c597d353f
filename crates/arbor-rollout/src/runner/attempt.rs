//! One rollout: its attempts (prepare → scaffold under the agent time limit → grade → destroy),
//! the classification of their failures, and the retries of infrastructure failures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_agent::scaffold::bash::BashScaffold;
use arbor_agent::scaffold::blackbox::BlackBoxScaffold;
use arbor_agent::scaffold::tools::ToolsScaffold;
use arbor_agent::{AgentError, ChatClient, EpisodeOutcome, Scaffold};
use arbor_sandbox::{Backend, NetworkSpec, Sandbox, SandboxSpec, TcpBridge};
use arbor_task::run::{PrepareOptions, prepare_with_spec, sandbox_spec};
use arbor_task::verify::{self, GradeMode, GradeOptions, VerifierResult};
use arbor_task::{Task, TaskError};
use tracing::warn;

use super::blackbox::{self, ResolvedAgent};
use crate::experiment::{Experiment, ScaffoldSpec};
use crate::record::{Failure, RolloutKey, RolloutResult, Status, StepTiming};
use crate::summary::quantile;

use super::usage;

/// Port on a black-box agent's sandbox loopback that reaches the gateway.
pub const GATEWAY_BRIDGE_PORT: u16 = 18000;

/// Everything a rollout needs, shared by all of them.
pub(super) struct Ctx {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) gateway: SocketAddr,
    pub(super) policy_label: String,
    pub(super) model: String,
    pub(super) max_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
    pub(super) exp: Experiment,
    pub(super) prepare: PrepareOptions,
    pub(super) grade: GradeOptions,
    pub(super) retries: AtomicU64,
    /// Per-step figures of this invocation: (overhead, model call, action), ms.
    pub(super) steps: Mutex<Vec<(f64, f64, f64)>>,
    /// The gateway's store (black-box rollouts count their calls there).
    pub(super) store: arbor_gateway::Store,
    /// Highest attempt number whose gateway session already exists, per
    /// session prefix (attempts of a killed invocation): new attempts
    /// number after them, so no session mixes two attempts.
    pub(super) used_attempts: HashMap<String, u32>,
    /// Black-box scaffolds by name, resolved at the start of the run.
    pub(super) agents: HashMap<String, ResolvedAgent>,
    /// The run directory (black-box run records go to `agents/`).
    pub(super) run_dir: PathBuf,
    /// The gateway's per-session caps (a capped session is the agent's failure).
    pub(super) caps: Arc<arbor_gateway::caps::CapTracker>,
}

/// The outcome of one attempt.
struct Attempt {
    result: RolloutResult,
    /// Set when the infrastructure failed (the attempt may be retried).
    infra: bool,
}

/// The highest attempt number per session prefix among the sessions the
/// gateway's store already holds (see [`Ctx::used_attempts`]).
pub(super) fn used_attempts(store: &arbor_gateway::Store) -> HashMap<String, u32> {
    let mut used: HashMap<String, u32> = HashMap::new();
    for (session, _) in store.sessions() {
        if let Some((prefix, n)) = session.rsplit_once(".a")
            && let Ok(n) = n.parse::<u32>()
        {
            let e = used.entry(format!("{prefix}.a")).or_insert(0);
            *e = (*e).max(n);
        }
    }
    used
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Ctx {
    fn scaffold_of(&self, spec: &ScaffoldSpec) -> std::result::Result<Arc<dyn Scaffold>, String> {
        Ok(match spec {
            ScaffoldSpec::Bash(c) => Arc::new(BashScaffold { config: c.clone() }),
            ScaffoldSpec::Tools(c) => Arc::new(ToolsScaffold { config: c.clone() }),
            _ => {
                let agent = self.agents.get(spec.name()).ok_or_else(|| {
                    format!("black-box scaffold `{}` was not resolved", spec.name())
                })?;
                Arc::new(BlackBoxScaffold {
                    config: agent.config.clone(),
                })
            }
        })
    }
}

/// The end of a failure message (the cause is usually last).
fn tail(s: &str) -> String {
    const MAX: usize = 2000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut i = s.len() - MAX;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    format!("…{}", &s[i..])
}

/// Finishes `r` as a failed attempt started at `start`.
fn failed(
    mut r: RolloutResult,
    start: Instant,
    status: Status,
    class: &str,
    msg: String,
) -> Attempt {
    r.status = status;
    r.failure = Some(Failure {
        class: class.into(),
        message: tail(&msg),
    });
    r.total_s = start.elapsed().as_secs_f64();
    r.finished_at = now_unix();
    Attempt {
        infra: status == Status::InfraError,
        result: r,
    }
}

impl Ctx {
    fn blank(&self, task: &Task, key: &RolloutKey, attempt: u32) -> RolloutResult {
        RolloutResult {
            key: key.clone(),
            domain: task.domain.clone(),
            policy: self.policy_label.clone(),
            status: Status::InfraError,
            reward: 0.0,
            passed: false,
            attempts: attempt,
            session: key.session(attempt),
            stop: None,
            turns: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            format_errors: 0,
            timing: StepTiming::default(),
            agent_s: 0.0,
            verify_s: 0.0,
            total_s: 0.0,
            failure: None,
            verifier: serde_json::Value::Null,
            finished_at: 0.0,
        }
    }

    /// One rollout with its retries.
    pub(super) async fn rollout(
        &self,
        task: &Task,
        scaffold: &ScaffoldSpec,
        key: RolloutKey,
    ) -> RolloutResult {
        let first = self
            .used_attempts
            .get(&key.session_prefix())
            .copied()
            .unwrap_or(0)
            + 1;
        let last = first + self.exp.infra_retries;
        let mut attempt = first;
        loop {
            let a = self.attempt(task, scaffold, &key, attempt).await;
            if !a.infra || attempt >= last {
                return a.result;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            warn!(
                session = %a.result.session,
                cause = ?a.result.failure,
                "infrastructure failure; retrying"
            );
            // Back off a little so a struggling host can recover.
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            attempt += 1;
        }
    }

    /// One attempt: prepare → scaffold → grade → destroy.
    async fn attempt(
        &self,
        task: &Task,
        scaffold_spec: &ScaffoldSpec,
        key: &RolloutKey,
        attempt: u32,
    ) -> Attempt {
        let start = Instant::now();
        let mut r = self.blank(task, key, attempt);
        let (spec, base_url) = self.sandbox_and_url(task, scaffold_spec, &key.session(attempt));
        let sb = match prepare_with_spec(self.backend.as_ref(), task, &spec, &self.prepare).await {
            Ok(sb) => sb,
            Err(e @ TaskError::NeedsOci { .. }) => {
                return failed(r, start, Status::InfraError, "setup", e.to_string());
            }
            Err(e) => {
                return failed(
                    r,
                    start,
                    Status::InfraError,
                    "setup",
                    format!("preparing the task: {e}"),
                );
            }
        };
        let episode = self
            .run_scaffold(task, scaffold_spec, sb.as_ref(), base_url, &mut r)
            .await;
        if let Ok(outcome) = &episode {
            self.fill_episode(&mut r, outcome, !scaffold_spec.is_blackbox());
        }
        // Tokens and model time as the gateway recorded them; a refused call past a session
        // cap makes the attempt the agent's failure, whatever the agent did next.
        usage::fill_from_records(&self.store, &mut r).await;
        let episode = usage::cap_failure(&self.caps, &r.session).map_or(episode, Err);
        let outcome = match episode {
            Ok(o) => o,
            Err((status, class, msg)) => {
                destroy(sb.as_ref(), task).await;
                return failed(r, start, status, class, msg);
            }
        };
        if scaffold_spec.is_blackbox()
            && let Some(msg) = self.check_agent_run(&r, scaffold_spec.name(), &outcome)
        {
            destroy(sb.as_ref(), task).await;
            // Not retried: the same setup fails the same way.
            let mut a = failed(r, start, Status::InfraError, blackbox::SETUP_CLASS, msg);
            a.infra = false;
            return a;
        }
        self.grade_and_destroy(task, sb.as_ref(), r, start).await
    }

    /// Keeps a black-box run's record in the run directory; returns why it
    /// is a setup failure, if it is one.
    fn check_agent_run(
        &self,
        r: &RolloutResult,
        scaffold: &str,
        outcome: &EpisodeOutcome,
    ) -> Option<String> {
        let calls = self.store.session_len(&r.session);
        blackbox::save_record(
            &self.run_dir,
            &r.session,
            scaffold,
            outcome,
            calls,
            r.agent_s,
        );
        blackbox::setup_failure(scaffold, outcome, calls)
    }

    /// The task's sandbox spec and the scaffold's model endpoint: the
    /// gateway session directly, or through a loopback bridge for a
    /// black-box agent (which runs inside the sandbox).
    fn sandbox_and_url(
        &self,
        task: &Task,
        scaffold_spec: &ScaffoldSpec,
        session: &str,
    ) -> (SandboxSpec, String) {
        let mut spec = sandbox_spec(task);
        let base_url = if scaffold_spec.is_blackbox() {
            if let Some(agent) = self.agents.get(scaffold_spec.name()) {
                spec.binds.extend(agent.binds.iter().cloned());
            }
            spec.network = NetworkSpec {
                tcp_bridges: vec![TcpBridge {
                    host_addr: self.gateway,
                    port: GATEWAY_BRIDGE_PORT,
                }],
                ..spec.network.clone()
            };
            format!("http://127.0.0.1:{GATEWAY_BRIDGE_PORT}/s/{session}/v1")
        } else {
            format!("http://{}/s/{session}/v1", self.gateway)
        };
        (spec, base_url)
    }

    /// Runs the scaffold under the agent time limit (recording its time in
    /// `r`); a failure comes back as (status, class, message).
    async fn run_scaffold(
        &self,
        task: &Task,
        scaffold_spec: &ScaffoldSpec,
        sb: &dyn Sandbox,
        base_url: String,
        r: &mut RolloutResult,
    ) -> std::result::Result<EpisodeOutcome, (Status, &'static str, String)> {
        let client = ChatClient::new(base_url, "arbor", self.model.clone())
            .with_max_tokens(self.max_tokens)
            .with_temperature(self.temperature)
            .with_timeout(Duration::from_secs_f64(self.exp.timeouts.model_call_s));
        let agent_limit = task
            .environment
            .resources
            .agent_timeout_s
            .unwrap_or(self.exp.timeouts.agent_s)
            .clamp(1.0, 7.0 * 86400.0);
        let scaffold = self
            .scaffold_of(scaffold_spec)
            .map_err(|m| (Status::InfraError, "setup", m))?;
        let t_agent = Instant::now();
        let episode = tokio::time::timeout(
            Duration::from_secs_f64(agent_limit),
            scaffold.run(sb, &task.instruction, &client),
        )
        .await;
        r.agent_s = t_agent.elapsed().as_secs_f64();
        match episode {
            Err(_) => Err((
                Status::AgentFailure,
                "agent_timeout",
                format!("the agent did not finish within {agent_limit} s"),
            )),
            Ok(Err(e)) => {
                let (status, class) = classify_agent_error(&e);
                Err((status, class, e.to_string()))
            }
            Ok(Ok(o)) => Ok(o),
        }
    }

    /// Grades the final state (a fork or a fresh sandbox, never `sb` in
    /// place), destroys `sb`, and finishes the attempt with the verdict.
    async fn grade_and_destroy(
        &self,
        task: &Task,
        sb: &dyn Sandbox,
        mut r: RolloutResult,
        start: Instant,
    ) -> Attempt {
        let t_grade = Instant::now();
        let graded = self.grade_then_destroy(task, sb).await;
        r.verify_s = t_grade.elapsed().as_secs_f64();
        r.verifier = graded.details.clone();
        if let Some(msg) = &graded.infra_error {
            return failed(r, start, Status::InfraError, "verifier", msg.clone());
        }
        r.reward = graded.reward;
        r.passed = graded.passed;
        r.status = if graded.passed {
            Status::Passed
        } else {
            Status::Failed
        };
        r.total_s = start.elapsed().as_secs_f64();
        r.finished_at = now_unix();
        Attempt {
            infra: false,
            result: r,
        }
    }

    /// The verdict on `sb`'s final state; `sb` is destroyed on the way. For
    /// a fresh grading sandbox, `sb` goes before the new one is asked for:
    /// holding one sandbox while waiting for another deadlocks a backend
    /// with bounded room (a full cluster) once every rollout does it.
    async fn grade_then_destroy(&self, task: &Task, sb: &dyn Sandbox) -> VerifierResult {
        if verify::mode_of(task, &self.grade) == GradeMode::Fork {
            let graded = verify::grade(task, sb, Some(self.backend.as_ref()), &self.grade).await;
            destroy(sb, task).await;
            return graded;
        }
        let captured = verify::capture_workdir(task, sb).await;
        destroy(sb, task).await;
        match captured {
            Ok(archive) => {
                verify::grade_workdir(task, archive, self.backend.as_ref(), &self.grade).await
            }
            Err(e) => VerifierResult::infra(format!("creating the grading sandbox: {e}")),
        }
    }

    fn fill_episode(&self, r: &mut RolloutResult, o: &EpisodeOutcome, white_box: bool) {
        r.stop = serde_json::to_value(&o.stop).ok();
        r.turns = o.turns.len() as u32;
        r.prompt_tokens = o.prompt_tokens;
        r.completion_tokens = o.completion_tokens;
        r.format_errors = o.format_errors;
        if !white_box {
            // A black-box agent's loop is opaque: its steps are the calls
            // the gateway recorded; there is no per-step timing.
            r.turns = self.store.session_len(&r.session) as u32;
            r.timing = StepTiming::default();
            return;
        }
        // Per step, the time not spent in the policy or the command: the
        // scaffold's own work plus the model call minus the policy's part
        // (HTTP, gateway parsing, tokenization, durable recording).
        let steps: Vec<(f64, f64, f64)> = o
            .turns
            .iter()
            .map(|t| {
                let gateway = t.policy_ms.map_or(0.0, |p| (t.model_ms - p).max(0.0));
                (t.overhead_ms + gateway, t.model_ms, t.action_ms)
            })
            .collect();
        let mut overhead: Vec<f64> = steps.iter().map(|s| s.0).collect();
        r.timing = StepTiming {
            p50_overhead_ms: quantile(&mut overhead.clone(), 0.5),
            overhead_ms: std::mem::take(&mut overhead),
            model_ms: o.turns.iter().map(|t| t.model_ms).sum(),
            action_ms: o.turns.iter().map(|t| t.action_ms).sum(),
        };
        if let Ok(mut all) = self.steps.lock() {
            all.extend(steps);
        }
    }
}

/// An agent error is the infrastructure's (retry) unless the sandbox says
/// the agent's own request was at fault.
fn classify_agent_error(e: &AgentError) -> (Status, &'static str) {
    match e {
        AgentError::Model(_) => (Status::InfraError, "upstream"),
        AgentError::Sandbox(s) if s.is_infrastructure() => (Status::InfraError, "sandbox"),
        AgentError::Sandbox(_) => (Status::AgentFailure, "agent_error"),
    }
}

async fn destroy(sb: &dyn Sandbox, task: &Task) {
    if let Err(e) = sb.destroy().await {
        warn!(task = %task.id, "destroying a rollout sandbox: {e}");
    }
}
