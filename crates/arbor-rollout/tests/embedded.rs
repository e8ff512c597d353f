//! `arbor_rollout::run` with the embedded policy: a (random, untrained)
//! arbor-model checkpoint served in-process behind the gateway, rolled out
//! in real sandboxes. Proves the plumbing a training loop relies on: every
//! call is recorded with token ids and the model's own logprobs, a model
//! that emits garbage scores 0 without breaking anything, and nothing is
//! lost.
//!
//! A custom harness: this binary is its own sandbox init. Needs root.

use std::collections::HashMap;

use arbor_gateway::CallRecord;
use arbor_rollout::record::Status;
use arbor_rollout::{Experiment, RunOptions};
use libtest_mimic::{Arguments, Failed, Trial};

/// Runs 2 terminal tasks x 2 samples with a fresh tiny checkpoint as the embedded policy;
/// `policy_extra` is appended to the `[policy]` table. Returns the run's temp dir (the run is
/// in `run/`) and its summary.
fn run_two_terminal_tasks_twice(
    name: &str,
    max_steps: u32,
    policy_extra: &str,
) -> Result<(tempfile::TempDir, arbor_rollout::Summary), Failed> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let ckpt = tmp.path().join("ckpt");
    arbor_policy::init_checkpoint(&ckpt, arbor_policy::tiny_byte_config(), 7)
        .map_err(|e| format!("init checkpoint: {e}"))?;
    let text = format!(
        r#"name = "{name}"
output = "{out}"
samples = 2
concurrency = 4

[[datasets]]
domain = "terminal"
n = 2
seed = 3

[[scaffolds]]
kind = "bash"
max_steps = {max_steps}

[policy]
kind = "embedded"
checkpoint = "{ckpt}"
max_tokens = 24
{policy_extra}"#,
        out = tmp.path().join("run").display(),
        ckpt = ckpt.display()
    );
    let exp = Experiment::parse(&text).map_err(|e| format!("experiment: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let summary = rt
        .block_on(arbor_rollout::run(&exp, &text, RunOptions::default()))
        .map_err(|e| format!("run: {e:#}"))?;
    Ok((tmp, summary))
}

fn embedded_policy_rollouts_are_recorded_with_logprobs() -> Result<(), Failed> {
    let (tmp, summary) = run_two_terminal_tasks_twice("embedded-smoke", 2, "")?;
    if summary.requested != 4 || summary.rollouts != 4 || summary.lost != 0 {
        return Err(format!("{summary:?}").into());
    }
    if summary.infra_errors != 0 {
        return Err(format!("infrastructure errors with the embedded policy: {summary:?}").into());
    }
    if !summary.policy.starts_with("embedded:") {
        return Err(format!("policy label {}", summary.policy).into());
    }
    let results = std::fs::read_to_string(tmp.path().join("run/results.jsonl"))
        .map_err(|e| format!("results: {e}"))?;
    let log = std::fs::read_to_string(tmp.path().join("run/gateway/calls.jsonl"))
        .map_err(|e| format!("gateway store: {e}"))?;
    let mut by_session: HashMap<String, Vec<CallRecord>> = HashMap::new();
    for l in log.lines() {
        let c: CallRecord = serde_json::from_str(l).map_err(|e| format!("record: {e}"))?;
        by_session.entry(c.session.clone()).or_default().push(c);
    }
    for line in results.lines() {
        let r: arbor_rollout::RolloutResult =
            serde_json::from_str(line).map_err(|e| format!("result: {e}"))?;
        // An untrained model almost surely solves nothing; whatever it does
        // is the agent's outcome, never an infrastructure error.
        if !matches!(
            r.status,
            Status::Failed | Status::Passed | Status::AgentFailure
        ) {
            return Err(format!("unexpected status {:?}", r.status).into());
        }
        let calls = by_session
            .get(&r.session)
            .ok_or_else(|| format!("no calls for {}", r.session))?;
        if calls.len() as u32 != r.turns || calls.is_empty() {
            return Err(format!("{}: {} calls, {} turns", r.session, calls.len(), r.turns).into());
        }
        for c in calls {
            let comp = c
                .tokens
                .completions
                .first()
                .ok_or("no completion recorded")?;
            let lps = comp.logprobs.as_ref().ok_or("no logprobs recorded")?;
            if comp.ids.is_empty() || lps.len() != comp.ids.len() {
                return Err(
                    format!("{}: ids {} logprobs {}", c.id, comp.ids.len(), lps.len()).into(),
                );
            }
            // A sampled model has real (negative) logprobs, unlike the
            // scripted oracle's zeros; every id is a byte.
            if !lps.iter().all(|&l| l <= 0.0 && l.is_finite()) || lps.iter().all(|&l| l == 0.0) {
                return Err(format!("{}: implausible logprobs {lps:?}", c.id).into());
            }
            if c.tokens.prompt.iter().chain(&comp.ids).any(|&t| t > 255) {
                return Err(format!("{}: non-byte token", c.id).into());
            }
        }
    }
    Ok(())
}

/// `temperature = 0` in the policy reaches the model as greedy decoding: every request carries
/// it, and two samples of one task get the same first completion.
fn greedy_temperature_reaches_the_policy() -> Result<(), Failed> {
    let (tmp, summary) = run_two_terminal_tasks_twice("embedded-greedy", 1, "temperature = 0.0\n")?;
    if summary.rollouts != 4 || summary.infra_errors != 0 {
        return Err(format!("{summary:?}").into());
    }
    let log = std::fs::read_to_string(tmp.path().join("run/gateway/calls.jsonl"))
        .map_err(|e| format!("gateway store: {e}"))?;
    // Task id -> the first completions of its samples.
    let mut by_task: HashMap<String, Vec<Vec<u32>>> = HashMap::new();
    for l in log.lines() {
        let c: CallRecord = serde_json::from_str(l).map_err(|e| format!("record: {e}"))?;
        if c.request.get("temperature").and_then(|t| t.as_f64()) != Some(0.0) {
            return Err(format!("{}: request without temperature 0: {}", c.id, c.request).into());
        }
        if c.index == 0 {
            let task = c
                .session
                .split(".bash")
                .next()
                .unwrap_or_default()
                .to_string();
            let ids = c
                .tokens
                .completions
                .first()
                .ok_or("no completion")?
                .ids
                .clone();
            by_task.entry(task).or_default().push(ids);
        }
    }
    if by_task.len() != 2 {
        return Err(format!("tasks {:?}", by_task.keys()).into());
    }
    for (task, samples) in &by_task {
        if samples.len() != 2 || samples[0] != samples[1] {
            return Err(format!("{task}: greedy samples differ: {samples:?}").into());
        }
    }
    Ok(())
}

fn main() {
    if arbor_sandbox::init::is_init_invocation() {
        arbor_sandbox::init::run();
    }
    arbor_sandbox::local::allow_self_as_init();
    let args = Arguments::from_args();
    let tests = vec![
        Trial::test(
            "embedded_policy_rollouts_are_recorded_with_logprobs",
            embedded_policy_rollouts_are_recorded_with_logprobs,
        ),
        Trial::test(
            "greedy_temperature_reaches_the_policy",
            greedy_temperature_reaches_the_policy,
        ),
    ];
    libtest_mimic::run(&args, tests).exit();
}
