//! The orchestrator: plans the rollouts of an experiment, runs them with
//! bounded concurrency, retries infrastructure failures, records each result
//! durably as it finishes, and resumes a killed run.
//!
//! One rollout attempt: prepare the task's sandbox → run the scaffold
//! against the gateway session `{key}.a{attempt}` (under the agent time
//! limit) → grade the final state (a fork or a fresh sandbox; the agent's
//! sandbox is never graded in place) → destroy. Failures are classified:
//! - infrastructure (sandbox died, upstream unreachable, verifier
//!   infrastructure error, setup failed): retried up to `infra_retries`
//!   times, then recorded as `infra_error`, kept out of reward statistics;
//! - the agent's (time limit, a fault it caused in the sandbox): recorded as
//!   `agent_failure`, reward 0;
//! - otherwise the verifier's verdict: `passed` or `failed`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_agent::scaffold::bash::BashScaffold;
use arbor_agent::scaffold::blackbox::BlackBoxScaffold;
use arbor_agent::scaffold::tools::ToolsScaffold;
use arbor_agent::{AgentError, ChatClient, EpisodeOutcome, Scaffold};
use arbor_gateway::{GatewayConfig, RunningGateway};
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_sandbox::pool::{Pool, PoolBackend};
use arbor_sandbox::{Backend, NetworkSpec, Sandbox, TcpBridge};
use arbor_task::run::{PrepareOptions, prepare_with_spec, sandbox_spec};
use arbor_task::verify::{self, GradeOptions};
use arbor_task::{Task, TaskError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::error::{Result, RolloutError};
use crate::experiment::{DatasetSpec, Experiment, PolicySpec, ScaffoldSpec};
use crate::live::{CountingBackend, LiveCount};
use crate::record::{Failure, RolloutKey, RolloutResult, Status, StepTiming};
use crate::store::{RunStore, done_keys};
use crate::summary::{Summary, fill_counts, quantile};

/// Port on a black-box agent's sandbox loopback that reaches the gateway.
pub const GATEWAY_BRIDGE_PORT: u16 = 18000;

/// Live counts for a progress display.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Rollouts requested in total, and recorded before this invocation.
    pub total: usize,
    pub already_done: usize,
    /// Recorded so far (including `already_done`).
    pub done: usize,
    pub passed: usize,
    pub failed: usize,
    pub agent_failures: usize,
    pub infra_errors: usize,
    pub live_sandboxes: i64,
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A callback receiving each recorded result.
pub type ResultFn = Arc<dyn Fn(&RolloutResult) + Send + Sync>;

/// How to run an experiment.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Run directory (default: the experiment's `output`).
    pub out: Option<PathBuf>,
    /// Continue the run recorded in the run directory.
    pub resume: bool,
    /// Overrides the experiment's concurrency.
    pub concurrency: Option<usize>,
    /// Called after every recorded result.
    pub on_progress: Option<ProgressFn>,
    /// Called with every result right after it is recorded.
    pub on_result: Option<ResultFn>,
    /// Set to stop launching rollouts (those in flight finish and are recorded).
    pub stop: Option<Arc<AtomicBool>>,
    /// Sandbox backend (default: the local namespace backend).
    pub backend: Option<Arc<dyn Backend>>,
}

/// Load every task of the experiment, in order; task ids must be unique.
pub fn load_tasks(exp: &Experiment) -> Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for d in &exp.datasets {
        let mut got = match d {
            DatasetSpec { path: Some(p), .. } => {
                arbor_task::load(p, &arbor_task::OpenOptions::default())?
            }
            DatasetSpec {
                domain: Some(domain),
                n: Some(n),
                seed,
                split,
                difficulty,
                ..
            } => {
                let split = match split {
                    Some(s) => s.parse().map_err(RolloutError::Other)?,
                    None => arbor_task::Split::Any,
                };
                let opts = arbor_task::GenOptions {
                    difficulty: difficulty.unwrap_or(2),
                    split,
                };
                arbor_task::generate(domain, *n, *seed, &opts)?
            }
            _ => {
                return Err(RolloutError::Other(
                    "a dataset needs `path` or `domain` + `n`".into(),
                ));
            }
        };
        got.drain(..d.skip.min(got.len()));
        if let Some(l) = d.limit {
            got.truncate(l);
        }
        tasks.extend(got);
    }
    let mut seen = HashMap::new();
    for (i, t) in tasks.iter().enumerate() {
        if let Some(j) = seen.insert(t.id.clone(), i) {
            return Err(RolloutError::Other(format!(
                "task id `{}` appears twice (tasks {j} and {i}); task ids must be unique in an experiment",
                t.id
            )));
        }
    }
    Ok(tasks)
}

/// Everything a rollout needs, shared by all of them.
struct Ctx {
    backend: Arc<dyn Backend>,
    gateway: SocketAddr,
    policy_label: String,
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    exp: Experiment,
    prepare: PrepareOptions,
    grade: GradeOptions,
    retries: AtomicU64,
    /// Per-step figures of this invocation: (overhead, model call, action), ms.
    steps: Mutex<Vec<(f64, f64, f64)>>,
    /// The gateway's store (black-box rollouts count their calls there).
    store: arbor_gateway::Store,
    /// Highest attempt number whose gateway session already exists, per
    /// session prefix (attempts of a killed invocation): new attempts
    /// number after them, so no session mixes two attempts.
    used_attempts: HashMap<String, u32>,
}

/// The outcome of one attempt.
struct Attempt {
    result: RolloutResult,
    /// Set when the infrastructure failed (the attempt may be retried).
    infra: bool,
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn scaffold_of(spec: &ScaffoldSpec) -> Arc<dyn Scaffold> {
    match spec {
        ScaffoldSpec::Bash(c) => Arc::new(BashScaffold { config: c.clone() }),
        ScaffoldSpec::Tools(c) => Arc::new(ToolsScaffold { config: c.clone() }),
        ScaffoldSpec::Blackbox(c) => Arc::new(BlackBoxScaffold { config: c.clone() }),
    }
}

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
    async fn rollout(
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

    async fn attempt(
        &self,
        task: &Task,
        scaffold_spec: &ScaffoldSpec,
        key: &RolloutKey,
        attempt: u32,
    ) -> Attempt {
        let start = Instant::now();
        let mut r = self.blank(task, key, attempt);
        let fail = |mut r: RolloutResult, status: Status, class: &str, msg: String| {
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
        };

        let mut spec = sandbox_spec(task);
        let session = key.session(attempt);
        let base_url = if matches!(scaffold_spec, ScaffoldSpec::Blackbox(_)) {
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
        let sb = match prepare_with_spec(self.backend.as_ref(), task, &spec, &self.prepare).await {
            Ok(sb) => sb,
            Err(e @ TaskError::NeedsOci { .. }) => {
                return fail(r, Status::InfraError, "setup", e.to_string());
            }
            Err(e) => {
                return fail(
                    r,
                    Status::InfraError,
                    "setup",
                    format!("preparing the task: {e}"),
                );
            }
        };

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
        let scaffold = scaffold_of(scaffold_spec);
        let t_agent = Instant::now();
        let episode = tokio::time::timeout(
            Duration::from_secs_f64(agent_limit),
            scaffold.run(sb.as_ref(), &task.instruction, &client),
        )
        .await;
        r.agent_s = t_agent.elapsed().as_secs_f64();

        let outcome = match episode {
            Err(_) => {
                destroy(sb.as_ref(), task).await;
                return fail(
                    r,
                    Status::AgentFailure,
                    "agent_timeout",
                    format!("the agent did not finish within {agent_limit} s"),
                );
            }
            Ok(Err(e)) => {
                destroy(sb.as_ref(), task).await;
                let (status, class) = classify_agent_error(&e);
                return fail(r, status, class, e.to_string());
            }
            Ok(Ok(o)) => o,
        };
        self.fill_episode(
            &mut r,
            &outcome,
            !matches!(scaffold_spec, ScaffoldSpec::Blackbox(_)),
        );

        let graded =
            verify::grade(task, sb.as_ref(), Some(self.backend.as_ref()), &self.grade).await;
        destroy(sb.as_ref(), task).await;
        r.verify_s = graded.seconds;
        r.verifier = graded.details.clone();
        if let Some(msg) = &graded.infra_error {
            return fail(r, Status::InfraError, "verifier", msg.clone());
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

/// Start the policy behind the gateway. Returns the in-process server to
/// keep alive for the run (none for remote upstreams) and the upstream URLs.
async fn start_policy(
    exp: &Experiment,
    tasks: &[Task],
) -> Result<(Option<Box<dyn std::any::Any + Send>>, Vec<String>)> {
    match &exp.policy {
        PolicySpec::ScriptedOracle => {
            let policy = ScriptedPolicy::start(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| RolloutError::io("starting the scripted-oracle policy", e))?;
            // The policy recognises a task by its instruction: two tasks with
            // one instruction but different oracles would be ambiguous.
            let mut by_instruction: HashMap<&str, (&str, Vec<String>)> = HashMap::new();
            for t in tasks {
                let cmds = crate::oracle::oracle_commands(t)?;
                match by_instruction.get(t.instruction.as_str()) {
                    Some((other, c)) if *c != cmds => {
                        return Err(RolloutError::Other(format!(
                            "tasks `{other}` and `{}` share an instruction but not an oracle; \
                             the scripted-oracle policy cannot tell them apart",
                            t.id
                        )));
                    }
                    Some(_) => {}
                    None => {
                        policy.register(&t.instruction, cmds.clone());
                        by_instruction.insert(&t.instruction, (&t.id, cmds));
                    }
                }
            }
            let url = policy.base_url();
            Ok((Some(Box::new(policy)), vec![url]))
        }
        PolicySpec::Upstream { base_urls, .. } => Ok((None, base_urls.clone())),
        PolicySpec::Embedded {
            checkpoint,
            max_tokens,
            max_concurrency,
            ..
        } => {
            let dir = checkpoint.clone();
            let model = tokio::task::spawn_blocking(move || arbor_policy::load_checkpoint(&dir))
                .await
                .map_err(|e| RolloutError::Other(format!("loading the checkpoint: {e}")))?
                .map_err(|e| {
                    RolloutError::Other(format!("loading checkpoint {}: {e}", checkpoint.display()))
                })?;
            let mut opts = arbor_policy::PolicyOptions::default();
            if let Some(n) = max_tokens {
                opts.default_max_tokens = *n as usize;
            }
            if let Some(c) = max_concurrency {
                opts.max_concurrency = (*c).max(1);
            }
            let policy = arbor_policy::EmbeddedPolicy::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                model,
                opts,
            )
            .await
            .map_err(|e| RolloutError::Other(format!("starting the embedded policy: {e}")))?;
            let url = policy.base_url();
            Ok((Some(Box::new(policy)), vec![url]))
        }
    }
}

/// Run (or resume) an experiment. `exp_text` is the experiment file's text,
/// kept in the run directory.
pub async fn run(exp: &Experiment, exp_text: &str, opts: RunOptions) -> Result<Summary> {
    let started = Instant::now();
    let dir = opts.out.clone().unwrap_or_else(|| exp.output.clone());
    let tasks = load_tasks(exp)?;
    let (store, loaded) = RunStore::open(&dir, exp, exp_text, opts.resume)?;
    let done = done_keys(&loaded.results);

    let mut plan = Vec::new();
    let mut requested = 0usize;
    for (ti, t) in tasks.iter().enumerate() {
        for (si, s) in exp.scaffolds.iter().enumerate() {
            for sample in 0..exp.samples {
                requested += 1;
                let key = RolloutKey {
                    task_id: t.id.clone(),
                    scaffold: s.name().to_string(),
                    sample,
                };
                if !done.contains(&key) {
                    plan.push((ti, si, key));
                }
            }
        }
    }
    // Results of rollouts that are no longer requested (should not happen
    // with a matching experiment) do not count.
    let mut all: Vec<RolloutResult> = loaded.results;

    let (_policy, upstreams) = start_policy(exp, &tasks).await?;
    let mut gw_cfg = GatewayConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        upstreams,
        dir.join(crate::store::GATEWAY),
    );
    let (model, max_tokens, temperature) = match &exp.policy {
        PolicySpec::ScriptedOracle => (arbor_agent::policy::scripted::NAME.to_string(), None, None),
        PolicySpec::Upstream {
            model,
            api_key_env,
            max_tokens,
            temperature,
            ..
        } => {
            if let Some(var) = api_key_env {
                gw_cfg.upstream_api_key = Some(std::env::var(var).map_err(|_| {
                    RolloutError::Other(format!("policy.api_key_env: ${var} is not set"))
                })?);
            }
            (model.clone(), *max_tokens, *temperature)
        }
        PolicySpec::Embedded {
            max_tokens,
            temperature,
            ..
        } => ("arbor-embedded".to_string(), *max_tokens, *temperature),
    };
    if let Some(t) = temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(RolloutError::Other(format!(
            "policy.temperature must be a number >= 0, got {t}"
        )));
    }
    gw_cfg.request_timeout = Duration::from_secs_f64(exp.timeouts.model_call_s);
    let gateway: RunningGateway = arbor_gateway::start(gw_cfg).await?;

    let base: Arc<dyn Backend> = match opts.backend.clone() {
        Some(b) => b,
        None => Arc::new(LocalBackend::new(LocalConfig::default())?),
    };
    let counting = CountingBackend::new(base);
    let live: Arc<LiveCount> = counting.count();
    let counting: Arc<dyn Backend> = Arc::new(counting);
    let pool =
        (exp.warm_pool > 0).then(|| Pool::new(counting.clone(), exp.warm_pool, exp.warm_pool));
    let backend: Arc<dyn Backend> = match &pool {
        Some(p) => Arc::new(PoolBackend(p.clone())),
        None => counting.clone(),
    };
    if let Some(p) = &pool {
        // Warm the pool for the environment most tasks share.
        if let Some(t) = tasks.first()
            && let Err(e) = p.prefill(&sandbox_spec(t)).await
        {
            warn!("prefilling the warm pool: {e}");
        }
    }

    let mut used_attempts: HashMap<String, u32> = HashMap::new();
    for (session, _) in gateway.store().sessions() {
        if let Some((prefix, n)) = session.rsplit_once(".a")
            && let Ok(n) = n.parse::<u32>()
        {
            let e = used_attempts.entry(format!("{prefix}.a")).or_insert(0);
            *e = (*e).max(n);
        }
    }
    let ctx = Arc::new(Ctx {
        backend,
        gateway: gateway.addr,
        policy_label: exp.policy.label(),
        model,
        max_tokens,
        temperature,
        exp: exp.clone(),
        prepare: PrepareOptions {
            allow_default_rootfs: exp.allow_default_rootfs,
        },
        grade: GradeOptions {
            mode: exp.verifier.mode,
            timeout_override_s: exp.verifier.timeout_s,
        },
        retries: AtomicU64::new(0),
        steps: Mutex::new(Vec::new()),
        store: gateway.store().clone(),
        used_attempts,
    });

    let mut progress = Progress {
        total: requested,
        already_done: all.len(),
        done: all.len(),
        ..Default::default()
    };
    for r in &all {
        count(&mut progress, r);
    }
    if let Some(cb) = &opts.on_progress {
        cb(&progress);
    }

    let concurrency = opts.concurrency.unwrap_or(exp.concurrency).max(1);
    let sem = Arc::new(Semaphore::new(concurrency));
    let tasks = Arc::new(tasks);
    let mut running = JoinSet::new();
    let new_before = all.len();
    let mut plan = plan.into_iter();
    let stop = opts.stop.clone().unwrap_or_default();
    let mut write_error = None;
    loop {
        // Launch while permits are free; then wait for one to finish.
        while !stop.load(Ordering::Relaxed) {
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                break;
            };
            let Some((ti, si, key)) = plan.next() else {
                drop(permit);
                break;
            };
            let ctx = ctx.clone();
            let tasks = tasks.clone();
            running.spawn(async move {
                let task = &tasks[ti];
                let r = ctx.rollout(task, &ctx.exp.scaffolds[si], key).await;
                drop(permit);
                r
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let r = match joined {
            Ok(r) => r,
            Err(e) => {
                // A panicking rollout is a bug; its key stays unrecorded and
                // is counted as lost (a resume runs it again).
                warn!("a rollout task failed: {e}");
                continue;
            }
        };
        debug!(session = %r.session, status = ?r.status, "rollout finished");
        if let Err(e) = store.append(&r).await {
            // Without durable results the run cannot continue safely.
            warn!("recording a result failed: {e}; stopping");
            stop.store(true, Ordering::Relaxed);
            write_error.get_or_insert(e);
            continue;
        }
        count(&mut progress, &r);
        progress.done += 1;
        progress.live_sandboxes = live.live();
        if let Some(cb) = &opts.on_result {
            cb(&r);
        }
        all.push(r);
        if let Some(cb) = &opts.on_progress {
            cb(&progress);
        }
    }
    if let Some(p) = &pool {
        p.close().await;
    }
    gateway
        .shutdown()
        .await
        .map_err(|e| RolloutError::Other(format!("closing the gateway: {e}")))?;
    if let Some(e) = write_error {
        return Err(e);
    }

    let seconds = started.elapsed().as_secs_f64();
    let mut s = Summary {
        name: exp.name.clone(),
        policy: exp.policy.label(),
        run_dir: dir.display().to_string(),
        requested,
        new_rollouts: all.len() - new_before,
        seconds,
        peak_live_sandboxes: live.peak(),
        infra_retries: ctx.retries.load(Ordering::Relaxed),
        ..Default::default()
    };
    s.rollouts_per_min = if seconds > 0.0 {
        s.new_rollouts as f64 * 60.0 / seconds
    } else {
        0.0
    };
    if let Ok(steps) = ctx.steps.lock() {
        let mut o: Vec<f64> = steps.iter().map(|x| x.0).collect();
        let mut m: Vec<f64> = steps.iter().map(|x| x.1).collect();
        let mut a: Vec<f64> = steps.iter().map(|x| x.2).collect();
        s.p50_step_overhead_ms = quantile(&mut o, 0.5);
        s.p99_step_overhead_ms = quantile(&mut o, 0.99);
        s.p50_model_call_ms = quantile(&mut m, 0.5);
        s.p50_action_ms = quantile(&mut a, 0.5);
    }
    fill_counts(&mut s, &all);
    store.write_summary(&s)?;
    Ok(s)
}

fn count(p: &mut Progress, r: &RolloutResult) {
    match r.status {
        Status::Passed => p.passed += 1,
        Status::Failed => p.failed += 1,
        Status::AgentFailure => p.agent_failures += 1,
        Status::InfraError => p.infra_errors += 1,
    }
}
