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
//!
//! Here: planning, the sandbox backend, the launch loop, recording and the
//! summary; `attempt` runs one rollout and its attempts, `policy` starts
//! the policy and the gateway in front of it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arbor_image::backend::ImageBackend;
use arbor_sandbox::Backend;
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_sandbox::pool::{Pool, PoolBackend};
use arbor_task::Task;
use arbor_task::run::{PrepareOptions, sandbox_spec};
use arbor_task::verify::GradeOptions;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::backend::BackendSpec;
use crate::error::{Result, RolloutError};
use crate::experiment::{DatasetSpec, Experiment};
use crate::live::{CountingBackend, LiveCount};
use crate::record::{RolloutKey, RolloutResult, Status};
use crate::store::{RunStore, done_keys};
use crate::summary::{Summary, fill_counts, quantile};

mod attempt;
pub mod blackbox;
mod policy;
mod usage;

pub use attempt::GATEWAY_BRIDGE_PORT;
use attempt::{Ctx, used_attempts};
use policy::{ModelSettings, start_gateway, start_policy};

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

/// A planned rollout: (task index, scaffold index, key).
type Planned = (usize, usize, RolloutKey);

/// Run (or resume) an experiment. `exp_text` is the experiment file's text,
/// kept in the run directory.
pub async fn run(exp: &Experiment, exp_text: &str, opts: RunOptions) -> Result<Summary> {
    let started = Instant::now();
    let dir = opts.out.clone().unwrap_or_else(|| exp.output.clone());
    let tasks = load_tasks(exp)?;
    let (store, loaded) = RunStore::open(&dir, exp, exp_text, opts.resume)?;
    let (plan, requested) = plan_rollouts(exp, &tasks, &done_keys(&loaded.results));
    // Results of rollouts that are no longer requested (should not happen
    // with a matching experiment) do not count.
    let all: Vec<RolloutResult> = loaded.results;

    let agents = blackbox::resolve_agents(exp)?;
    let (_policy, upstreams) = start_policy(exp, &tasks).await?;
    let (gateway, settings) = start_gateway(exp, &dir, upstreams).await?;
    let sandboxes = Sandboxes::start(exp, &opts, &tasks).await?;
    let ctx = Arc::new(new_ctx(exp, &sandboxes, &gateway, settings, agents, &dir));

    let mut rec = Recorder::new(&store, &opts, sandboxes.live.clone(), requested, all);
    let new_before = rec.all.len();
    let concurrency = opts.concurrency.unwrap_or(exp.concurrency).max(1);
    let stop = opts.stop.clone().unwrap_or_default();
    let write_error = drive(ctx.clone(), tasks, plan, concurrency, &stop, &mut rec).await;
    if let Some(p) = &sandboxes.pool {
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
        new_rollouts: rec.all.len() - new_before,
        seconds,
        peak_live_sandboxes: sandboxes.live.peak(),
        infra_retries: ctx.retries.load(Ordering::Relaxed),
        ..Default::default()
    };
    finish_summary(&mut s, &ctx, &rec.all);
    store.write_summary(&s)?;
    Ok(s)
}

/// Every (task, scaffold, sample) of the experiment not yet recorded in
/// `done`, and the number requested in total.
fn plan_rollouts(
    exp: &Experiment,
    tasks: &[Task],
    done: &HashSet<RolloutKey>,
) -> (Vec<Planned>, usize) {
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
    (plan, requested)
}

/// The sandbox backend rollouts use: the given or local backend, counted
/// (live and peak), behind a warm pool when the experiment asks for one.
struct Sandboxes {
    backend: Arc<dyn Backend>,
    /// The backend resolves images (tasks that need one get it).
    images: bool,
    live: Arc<LiveCount>,
    pool: Option<Arc<Pool>>,
}

impl Sandboxes {
    async fn start(exp: &Experiment, opts: &RunOptions, tasks: &[Task]) -> Result<Sandboxes> {
        let needs_images = tasks.iter().any(|t| sandbox_spec(t).image.is_some());
        let (base, images): (Arc<dyn Backend>, bool) = match (opts.backend.clone(), &exp.backend) {
            (Some(b), _) => (b, false),
            // Nodes resolve images themselves (when started with an image store).
            (None, BackendSpec::Cluster(c)) => (Arc::new(c.connect().await?), true),
            (None, BackendSpec::Local) => {
                let local = LocalBackend::new(LocalConfig::default())?;
                if needs_images {
                    let images = ImageBackend::new(local, &exp.images.config()).map_err(|e| {
                        RolloutError::Other(format!("opening the image store: {e}"))
                    })?;
                    (Arc::new(images), true)
                } else {
                    (Arc::new(local), false)
                }
            }
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
        Ok(Sandboxes {
            backend,
            images,
            live,
            pool,
        })
    }
}

/// The context every rollout of this invocation shares.
fn new_ctx(
    exp: &Experiment,
    sandboxes: &Sandboxes,
    gateway: &arbor_gateway::RunningGateway,
    settings: ModelSettings,
    agents: HashMap<String, blackbox::ResolvedAgent>,
    dir: &std::path::Path,
) -> Ctx {
    Ctx {
        backend: sandboxes.backend.clone(),
        gateway: gateway.addr,
        policy_label: exp.policy.label(),
        model: settings.model,
        max_tokens: settings.max_tokens,
        temperature: settings.temperature,
        exp: exp.clone(),
        prepare: PrepareOptions {
            allow_default_rootfs: exp.allow_default_rootfs,
            images: sandboxes.images,
        },
        grade: GradeOptions {
            mode: exp.verifier.mode,
            timeout_override_s: exp.verifier.timeout_s,
        },
        retries: AtomicU64::new(0),
        steps: Mutex::new(Vec::new()),
        store: gateway.store().clone(),
        used_attempts: used_attempts(gateway.store()),
        agents,
        run_dir: dir.to_path_buf(),
        caps: gateway.caps(),
    }
}

/// Records finished rollouts durably, counts them and calls the callbacks.
struct Recorder<'a> {
    store: &'a RunStore,
    opts: &'a RunOptions,
    live: Arc<LiveCount>,
    progress: Progress,
    /// Every recorded result, earlier invocations' first.
    all: Vec<RolloutResult>,
}

impl<'a> Recorder<'a> {
    /// Counts the results already recorded and reports the starting progress.
    fn new(
        store: &'a RunStore,
        opts: &'a RunOptions,
        live: Arc<LiveCount>,
        requested: usize,
        all: Vec<RolloutResult>,
    ) -> Self {
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
        Recorder {
            store,
            opts,
            live,
            progress,
            all,
        }
    }

    /// Appends `r` to the run store, then counts it and reports it.
    async fn record(&mut self, r: RolloutResult) -> Result<()> {
        self.store.append(&r).await?;
        count(&mut self.progress, &r);
        self.progress.done += 1;
        self.progress.live_sandboxes = self.live.live();
        if let Some(cb) = &self.opts.on_result {
            cb(&r);
        }
        self.all.push(r);
        if let Some(cb) = &self.opts.on_progress {
            cb(&self.progress);
        }
        Ok(())
    }
}

/// Runs the plan with at most `concurrency` rollouts in flight, recording
/// each as it finishes, until the plan is done or `stop` is set. Returns
/// the first error recording a result (which stops the run).
async fn drive(
    ctx: Arc<Ctx>,
    tasks: Vec<Task>,
    plan: Vec<Planned>,
    concurrency: usize,
    stop: &AtomicBool,
    rec: &mut Recorder<'_>,
) -> Option<RolloutError> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let tasks = Arc::new(tasks);
    let mut running = JoinSet::new();
    let mut plan = plan.into_iter();
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
        if let Err(e) = rec.record(r).await {
            // Without durable results the run cannot continue safely.
            warn!("recording a result failed: {e}; stopping");
            stop.store(true, Ordering::Relaxed);
            write_error.get_or_insert(e);
            continue;
        }
    }
    write_error
}

/// Throughput and per-step figures of this invocation, and the counts over
/// every recorded result.
fn finish_summary(s: &mut Summary, ctx: &Ctx, all: &[RolloutResult]) {
    s.rollouts_per_min = if s.seconds > 0.0 {
        s.new_rollouts as f64 * 60.0 / s.seconds
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
    fill_counts(s, all);
}

fn count(p: &mut Progress, r: &RolloutResult) {
    match r.status {
        Status::Passed => p.passed += 1,
        Status::Failed => p.failed += 1,
        Status::AgentFailure => p.agent_failures += 1,
        Status::InfraError => p.infra_errors += 1,
    }
}
