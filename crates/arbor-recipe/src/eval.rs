//! Held-out evaluation: a checkpoint served by the embedded policy on a domain's held-out
//! tasks (never equal to a training task), one rollout per task, under the same scaffold and
//! limits as training.

use std::path::Path;

use arbor_rollout::runner::ProgressFn;

use crate::Result;
use crate::config::{EvalSpec, RolloutSpec};
use crate::rollouts::{self, PassRate, SampledRate, TaskSet};

/// The held-out tasks of `domain`.
pub fn heldout(domain: &str, eval: &EvalSpec, difficulty: u32) -> TaskSet {
    TaskSet {
        domain: domain.to_string(),
        n: eval.heldout_tasks,
        seed: eval.seed,
        split: "heldout",
        difficulty,
    }
}

/// Evaluates `checkpoint` on `domain`'s held-out tasks into `out` (resumable: an interrupted
/// evaluation continues where it stopped).
pub async fn evaluate(
    checkpoint: &Path,
    domain: &str,
    eval: &EvalSpec,
    difficulty: u32,
    spec: &RolloutSpec,
    out: &Path,
    on_progress: Option<ProgressFn>,
) -> Result<PassRate> {
    let exp = rollouts::experiment(
        &format!("eval-{domain}"),
        out,
        vec![heldout(domain, eval, difficulty).dataset()],
        1,
        rollouts::embedded(checkpoint, spec, eval.temperature),
        spec,
    );
    rollouts::run(&exp, out, on_progress).await?;
    PassRate::of_run(out)
}

/// Evaluates `checkpoint` on `tasks` (e.g. [`heldout`]) with `samples` samples per task at
/// `temperature` into `out` (resumable).
pub async fn evaluate_sampled(
    checkpoint: &Path,
    tasks: TaskSet,
    samples: u32,
    temperature: f32,
    spec: &RolloutSpec,
    out: &Path,
    on_progress: Option<ProgressFn>,
) -> Result<SampledRate> {
    let exp = rollouts::experiment(
        &format!("eval-sampled-{}", tasks.domain),
        out,
        vec![tasks.dataset()],
        samples.max(1),
        rollouts::embedded(checkpoint, spec, Some(temperature)),
        spec,
    );
    rollouts::run(&exp, out, on_progress).await?;
    SampledRate::of_run(out)
}
