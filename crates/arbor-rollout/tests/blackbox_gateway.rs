//! `arbor_rollout::run` with a black-box agent: a real program (Python, standard library
//! only: urllib against the Chat Completions endpoint, a `bash` tool it runs itself) inside
//! each sandbox, the scripted-oracle policy behind the run's gateway. Checks what the gateway
//! gives the run: token counts and model-call time of black-box rollouts from its records,
//! the experiment's `[gateway]` options in effect, and a per-session call cap reported as the
//! agent's failure.
//!
//! A custom harness: this binary is its own sandbox init. Needs root.

use std::collections::HashMap;
use std::path::Path;

use arbor_gateway::CallRecord;
use arbor_rollout::record::{RolloutResult, Status};
use arbor_rollout::{Experiment, RunOptions};
use libtest_mimic::{Arguments, Failed, Trial};

/// The agent: offers `bash`, `submit` and a web-search tool (not a function: refused unless
/// the gateway drops such tools), runs each `bash` call, exits 0 on `submit` and 2 when a
/// model call is refused.
const AGENT: &str = r#"
import json, os, subprocess, sys, urllib.error, urllib.request
base = os.environ["OPENAI_BASE_URL"]
tools = [
    {"type": "function", "function": {"name": "bash", "description": "Run a command.",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
    {"type": "function", "function": {"name": "submit", "description": "Finish.",
     "parameters": {"type": "object", "properties": {}}}},
    {"type": "web_search"},
]
messages = [{"role": "user", "content": open(sys.argv[1]).read()}]
for step in range(30):
    body = json.dumps({"model": "m", "messages": messages, "tools": tools}).encode()
    req = urllib.request.Request(base + "/chat/completions", data=body,
                                 headers={"content-type": "application/json", "authorization": "Bearer k"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.load(r)["choices"][0]["message"]
    except urllib.error.HTTPError as e:
        print("model call refused:", e.code, e.read().decode(), file=sys.stderr)
        sys.exit(2)
    messages.append(reply)
    for tc in reply.get("tool_calls") or []:
        if tc["function"]["name"] == "submit":
            sys.exit(0)
        cmd = json.loads(tc["function"]["arguments"]).get("command", "")
        p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        messages.append({"role": "tool", "tool_call_id": tc["id"],
                         "content": "exit %d\n%s%s" % (p.returncode, p.stdout, p.stderr)})
sys.exit(3)
"#;

/// Runs 2 terminal tasks under the agent with `gateway` as the `[gateway]` table; returns the
/// run's temp dir (the run is in `run/`) and its results.
fn run_agent(gateway: &str) -> Result<(tempfile::TempDir, Vec<RolloutResult>), Failed> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let text = format!(
        r#"name = "blackbox-gateway"
output = "{out}"
concurrency = 2
infra_retries = 0

[[datasets]]
domain = "terminal"
n = 2
seed = 11

[[scaffolds]]
kind = "blackbox"
name = "py-agent"
install = ['''cat > /tmp/agent.py <<'PYEOF'
{AGENT}
PYEOF''']
run = "/usr/bin/python3 /tmp/agent.py {{instruction_file}}"
env = {{ OPENAI_BASE_URL = "{{base_url}}" }}
timeout_s = 60
install_timeout_s = 10

[policy]
kind = "scripted-oracle"

[gateway]
{gateway}
"#,
        out = tmp.path().join("run").display(),
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
    if summary.rollouts != 2 {
        return Err(format!("{summary:?}").into());
    }
    let results = arbor_rollout::report::load_results(tmp.path().join("run/results.jsonl"))
        .map_err(|e| format!("results: {e}"))?;
    Ok((tmp, results))
}

/// The gateway's records of a run, by session.
fn calls(run: &Path) -> Result<HashMap<String, Vec<CallRecord>>, Failed> {
    let log = std::fs::read_to_string(run.join("gateway/calls.jsonl"))
        .map_err(|e| format!("gateway store: {e}"))?;
    let mut by_session: HashMap<String, Vec<CallRecord>> = HashMap::new();
    for l in log.lines() {
        let c: CallRecord = serde_json::from_str(l).map_err(|e| format!("record: {e}"))?;
        by_session.entry(c.session.clone()).or_default().push(c);
    }
    Ok(by_session)
}

fn blackbox_results_carry_gateway_tokens_and_options_apply() -> Result<(), Failed> {
    let (tmp, results) = run_agent("drop_unsupported_tools = true\nupstream_token_ids = false")?;
    let run = tmp.path().join("run");
    let calls = calls(&run)?;
    for r in &results {
        if r.status != Status::Passed {
            return Err(format!("not passed: {r:?}").into());
        }
        let recs = calls.get(&r.session).ok_or("no calls recorded")?;
        let prompt: u64 = recs.iter().map(|c| c.token_counts().0).sum();
        let completion: u64 = recs.iter().map(|c| c.token_counts().1).sum();
        if prompt == 0 || completion == 0 {
            return Err(format!("no gateway usage in the result: {r:?}").into());
        }
        // Whole milliseconds per record: a scripted-oracle call can take less than one.
        let model_ms: u64 = recs.iter().map(|c| c.duration_ms()).sum();
        if r.timing.model_ms != model_ms as f64 {
            return Err(
                format!("model time {} vs recorded {model_ms} ms", r.timing.model_ms).into(),
            );
        }
        if (r.prompt_tokens, r.completion_tokens) != (prompt, completion) {
            return Err(format!(
                "result tokens {} + {} vs recorded {prompt} + {completion}",
                r.prompt_tokens, r.completion_tokens
            )
            .into());
        }
        if r.turns as usize != recs.len() || recs.len() < 2 {
            return Err(format!("{} turns, {} calls", r.turns, recs.len()).into());
        }
        for c in recs {
            // `upstream_token_ids = false`; the web-search tool was dropped, not refused.
            let up = &c.upstream_request;
            if up.get("return_token_ids").is_some()
                || up["tools"].as_array().map(Vec::len) != Some(2)
            {
                return Err(format!("{}: gateway options not applied: {up}", c.id).into());
            }
            if c.tokens.prompt.is_empty() {
                return Err(format!("{}: no token ids recorded", c.id).into());
            }
        }
    }
    let report = arbor_rollout::report::generate(&run).map_err(|e| format!("report: {e}"))?;
    let t = report.stats.tokens;
    if t.prompt == 0 || t.completion == 0 || report.stats.time.model_s <= 0.0 {
        return Err(format!("report without tokens or model time: {:?}", report.stats).into());
    }
    Ok(())
}

fn a_session_past_its_call_cap_is_an_agent_failure() -> Result<(), Failed> {
    let (tmp, results) = run_agent("drop_unsupported_tools = true\nmax_calls_per_session = 1")?;
    let calls = calls(&tmp.path().join("run"))?;
    for r in &results {
        let f = r
            .failure
            .as_ref()
            .ok_or_else(|| format!("no failure: {r:?}"))?;
        if r.status != Status::AgentFailure || f.class != "call_cap" || r.attempts != 1 {
            return Err(format!("expected a call-cap agent failure: {r:?}").into());
        }
        if !f
            .message
            .contains("call cap: the session made 1 model calls, the cap is 1")
        {
            return Err(format!("message: {}", f.message).into());
        }
        // The one admitted call is recorded and counted.
        let recs = calls.get(&r.session).ok_or("no calls recorded")?;
        if recs.len() != 1 || r.prompt_tokens != recs[0].token_counts().0 || r.prompt_tokens == 0 {
            return Err(format!("{} calls; result {r:?}", recs.len()).into());
        }
    }
    Ok(())
}

/// Without `drop_unsupported_tools` the gateway refuses the agent's web-search tool on its
/// first call; the agent exits non-zero having made no model call: a setup failure that says
/// why (the refusal is in the recorded output tail), not a reward-0 sample, and not retried.
fn a_refused_tool_is_a_setup_failure_with_its_reason() -> Result<(), Failed> {
    let (_tmp, results) = run_agent("")?;
    if results.len() != 2 {
        return Err(format!("{} results", results.len()).into());
    }
    for r in &results {
        let f = r
            .failure
            .as_ref()
            .ok_or_else(|| format!("no failure: {r:?}"))?;
        if r.status != Status::InfraError || f.class != "agent_setup" || r.attempts != 1 {
            return Err(format!("expected an agent_setup failure: {r:?}").into());
        }
        if !(f.message.contains("web_search") && f.message.contains("no model call")) {
            return Err(format!("message does not say why: {}", f.message).into());
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
            "blackbox_results_carry_gateway_tokens_and_options_apply",
            blackbox_results_carry_gateway_tokens_and_options_apply,
        ),
        Trial::test(
            "a_session_past_its_call_cap_is_an_agent_failure",
            a_session_past_its_call_cap_is_an_agent_failure,
        ),
        Trial::test(
            "a_refused_tool_is_a_setup_failure_with_its_reason",
            a_refused_tool_is_a_setup_failure_with_its_reason,
        ),
    ];
    libtest_mimic::run(&args, tests).exit();
}
