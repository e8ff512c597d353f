//! `check`: validate a task set the way a dataset builder does: for every
//! task, the oracle must score 1 and the null solution (do nothing) must
//! score 0, each graded in sandboxes with the full hardening.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arbor_sandbox::Backend;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::model::Task;
use crate::run::{PrepareOptions, apply_solution, prepare};
use crate::verify::{self, GradeOptions, VerifierResult};

/// Options of [`check`].
#[derive(Clone, Default)]
pub struct CheckOptions {
    /// Tasks checked at once (0 = twice the number of CPUs).
    pub concurrency: usize,
    /// How environments are prepared.
    pub prepare: PrepareOptions,
    /// How grading runs.
    pub grade: GradeOptions,
    /// Called after each task with (done, total).
    pub progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
}

/// One task that did not check out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckError {
    /// Task id.
    pub task: String,
    /// What went wrong.
    pub reason: String,
}

/// The report of [`check`] (printed as one JSON object by `arbor task check`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Tasks checked.
    pub tasks: usize,
    /// Tasks whose oracle scored 1.
    pub oracle_pass: usize,
    /// Tasks whose null solution scored 0.
    pub null_fail: usize,
    /// Tasks where the infrastructure failed (setup, sandbox, judge...).
    pub infra_errors: usize,
    /// Every task that is not (oracle pass and null fail), with the reason.
    pub errors: Vec<CheckError>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

struct Outcome {
    oracle_pass: bool,
    null_fail: bool,
    infra: bool,
    reasons: Vec<String>,
}

/// Check every task: oracle → must pass with reward 1; null → must score 0.
/// Per task one sandbox is prepared; the null solution is graded on a fork
/// of it, then the oracle is applied to it and graded on another fork.
pub async fn check(
    backend: Arc<dyn Backend>,
    tasks: Vec<Task>,
    opts: &CheckOptions,
) -> CheckReport {
    let start = Instant::now();
    let total = tasks.len();
    let conc = if opts.concurrency == 0 {
        2 * std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.concurrency
    };
    let sem = Arc::new(Semaphore::new(conc.max(1)));
    let done = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let sem = sem.clone();
        let backend = backend.clone();
        let opts = opts.clone();
        let done = done.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let out = check_one(backend.as_ref(), &task, &opts).await;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(p) = &opts.progress {
                p(n, total);
            }
            (i, task.id, out)
        });
    }
    let mut results = Vec::with_capacity(total);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(v) => results.push(v),
            Err(e) => warn!("check worker failed: {e}"),
        }
    }
    results.sort_by_key(|(i, _, _)| *i);
    let mut report = CheckReport {
        tasks: total,
        oracle_pass: 0,
        null_fail: 0,
        infra_errors: 0,
        errors: Vec::new(),
        seconds: 0.0,
    };
    if results.len() != total {
        report.errors.push(CheckError {
            task: "-".into(),
            reason: format!("{} task checks did not complete", total - results.len()),
        });
    }
    for (_, id, o) in results {
        report.oracle_pass += usize::from(o.oracle_pass);
        report.null_fail += usize::from(o.null_fail);
        report.infra_errors += usize::from(o.infra);
        if !o.reasons.is_empty() {
            report.errors.push(CheckError {
                task: id,
                reason: o.reasons.join("; "),
            });
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

fn describe(r: &VerifierResult) -> String {
    let reason = r
        .details
        .get("reason")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            let s = r.details.to_string();
            s.chars().take(600).collect()
        });
    format!("reward {} ({reason})", r.reward)
}

async fn check_one(backend: &dyn Backend, task: &Task, opts: &CheckOptions) -> Outcome {
    let mut o = Outcome {
        oracle_pass: false,
        null_fail: false,
        infra: false,
        reasons: Vec::new(),
    };
    let sb = match prepare(backend, task, &opts.prepare).await {
        Ok(sb) => sb,
        Err(e) => {
            o.infra = e.is_infrastructure();
            o.reasons.push(format!("prepare: {e}"));
            return o;
        }
    };
    // Null solution: grade the untouched environment.
    let null = verify::grade(task, sb.as_ref(), Some(backend), &opts.grade).await;
    if null.infra_error.is_some() {
        o.infra = true;
        o.reasons.push(format!(
            "null solution: infrastructure error: {}",
            describe(&null)
        ));
    } else if null.reward == 0.0 && !null.passed {
        o.null_fail = true;
    } else {
        o.reasons
            .push(format!("null solution scored {}", describe(&null)));
    }
    match &task.oracle {
        None => o.reasons.push("no oracle solution".into()),
        Some(sol) => match apply_solution(sb.as_ref(), task, sol).await {
            Err(e) => {
                o.infra |= e.is_infrastructure();
                o.reasons.push(format!("oracle: {e}"));
            }
            Ok(applied) => {
                let r = verify::grade(task, sb.as_ref(), Some(backend), &opts.grade).await;
                if r.infra_error.is_some() {
                    o.infra = true;
                    o.reasons
                        .push(format!("oracle: infrastructure error: {}", describe(&r)));
                } else if r.passed && r.reward >= 1.0 {
                    o.oracle_pass = true;
                } else {
                    let mut msg = format!("oracle scored {}", describe(&r));
                    if !applied.patch_applied || applied.script_exit_code != 0 {
                        msg.push_str(&format!(
                            " [oracle script exit {}, patch applied: {}: {}]",
                            applied.script_exit_code, applied.patch_applied, applied.output
                        ));
                    }
                    o.reasons.push(msg);
                }
            }
        },
    }
    if let Err(e) = sb.destroy().await {
        warn!(task = %task.id, "destroy: {e}");
    }
    debug!(task = %task.id, oracle = o.oracle_pass, null = o.null_fail, "checked");
    o
}
