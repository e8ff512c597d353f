//! Black-box scaffold acceptance test with a real third-party agent:
//! mini-swe-agent (from PyPI, pinned in `scripts/agent-requirements.txt`)
//! runs inside a sandbox with no network, talks non-streaming Chat
//! Completions through litellm's `openai/` provider to the recording
//! gateway (bridged into the sandbox over TCP), and the gateway forwards to
//! the scripted-oracle policy. The task needs real work (a bug fix), the
//! task's own verifier must pass afterwards (and fail before), and every
//! call must be recorded under the session with token ids.
//!
//! Both of mini-swe-agent's protocols are exercised: its default (`mini.yaml`,
//! a `bash` tool call per step) and its text mode (`mini_textbased.yaml`,
//! exactly one fenced ` ```mswea_bash_command ` block per reply). Either way
//! it finishes when a command's output starts with
//! `COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`.
//!
//! A misbehaving client cannot hang the suite: mini's own step limit, no
//! model-call retries, a global call cap (`MSWEA_GLOBAL_CALL_LIMIT`), a
//! per-command timeout, the scaffold's hard process timeout (the whole
//! process tree is killed), and an outer `tokio::time::timeout` around the
//! episode and grading, after which the sandbox is destroyed regardless.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbor_agent::policy::scripted::{Script, ScriptedPolicy};
use arbor_agent::scaffold::blackbox::{BlackBoxConfig, BlackBoxScaffold};
use arbor_agent::{ChatClient, Scaffold, StopReason};
use arbor_gateway::GatewayConfig;
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_sandbox::{Bind, BindMode, Sandbox, TcpBridge};
use arbor_task::verify::CommandSpec;
use arbor_task::{Environment, FileSpec, GradeOptions, Task, VerifierResult, VerifierSpec};

/// mini-swe-agent's end-of-episode sentinel (checked in
/// `minisweagent/environments/local.py` of the pinned version: the first
/// line of a successful command's output).
const SUBMIT: &str = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT";
/// The gateway's port inside the sandbox.
const BRIDGE_PORT: u16 = 18000;
/// mini's step limit; the script needs 4 steps.
const STEP_LIMIT: u32 = 8;
/// Hard limit of the agent process.
const AGENT_TIMEOUT_S: f64 = 240.0;
/// Outer limit of episode + grading.
const OUTER_TIMEOUT: Duration = Duration::from_secs(420);

const INSTRUCTION: &str = "The function `add` in /workspace/calc.py returns wrong results \
    (calc.add(2, 3) should be 5). Fix calc.py.";

const CALC: &str = "def add(a, b):\n    return a - b\n";

const TEST_CALC: &str = "import sys\nsys.path.insert(0, '/workspace')\nimport calc\n\
    assert calc.add(2, 3) == 5, calc.add(2, 3)\nassert calc.add(-4, 1) == -3\nprint('ok')\n";

/// The virtualenv holding mini-swe-agent, or `None` (after a loud message)
/// when it is missing outside CI. Under `CI=true` a missing install is a
/// failure: the test command (`scripts/test.sh`) must have installed it.
fn mini_venv() -> Option<PathBuf> {
    let p = std::env::var_os("ARBOR_AGENT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/agent-venv")
        });
    let p = p.canonicalize().unwrap_or(p);
    let have =
        p.join("bin/mini").exists() && p.join("lib/python3.11/site-packages/minisweagent").exists();
    if have {
        return Some(p);
    }
    let msg = format!(
        "mini-swe-agent is not installed in {} (no bin/mini or minisweagent package): \
         run scripts/test.sh, which builds target/agent-venv and installs \
         scripts/agent-requirements.txt into it",
        p.display()
    );
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!!!!\nSKIPPING mini-swe-agent test: {msg}\n!!!!!!!!!!\n");
    None
}

/// The task: fix a small script; graded by its own hidden test.
fn task(id: &str) -> Task {
    Task {
        id: id.into(),
        domain: "swe".into(),
        instruction: INSTRUCTION.into(),
        environment: Environment {
            files: vec![FileSpec::text("calc.py", CALC)],
            ..Default::default()
        },
        verifier: VerifierSpec::ExitStatus(CommandSpec {
            command: "python3 /tests/test_calc.py".into(),
            files: vec![FileSpec::text("/tests/test_calc.py", TEST_CALC)],
            timeout_s: Some(60.0),
        }),
        oracle: None,
        grade_mode: None,
        metadata: Default::default(),
    }
}

/// What the scripted policy replays: look, fix, check, then mini's submit.
fn script() -> Vec<String> {
    vec![
        "cat calc.py".into(),
        "sed -i 's/return a - b/return a + b/' calc.py".into(),
        "python3 -c 'import calc; print(calc.add(2, 3))'".into(),
    ]
}

/// How mini-swe-agent is run: which config, and the extra `mini` flags it needs.
struct Mode {
    name: &'static str,
    config: &'static str,
    extra_args: &'static str,
    fence: &'static str,
}

const TOOLCALLS: Mode = Mode {
    name: "mini-swe-agent",
    config: "mini.yaml",
    extra_args: "",
    fence: "bash",
};

const TEXTBASED: Mode = Mode {
    name: "mini-swe-agent-textbased",
    config: "mini_textbased.yaml",
    extra_args: "--model-class litellm_textbased",
    fence: "mswea_bash_command",
};

fn mini_config(venv: &str, mode: &Mode) -> BlackBoxConfig {
    let env: [(&str, &str); 12] = [
        // Writable home and config dirs; no first-run setup prompt, no banner.
        ("HOME", "/tmp/mini-home"),
        ("XDG_CONFIG_HOME", "/tmp/mini-home/.config"),
        ("MSWEA_GLOBAL_CONFIG_DIR", "/tmp/mini-home/mini-swe-agent"),
        ("MSWEA_CONFIGURED", "true"),
        ("MSWEA_SILENT_STARTUP", "1"),
        // The scripted model has no price: do not fail on cost tracking,
        // and never fetch litellm's model-cost map (no network here).
        ("MSWEA_COST_TRACKING", "ignore_errors"),
        ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
        // Request caps: no retries of failed model calls, and a hard cap
        // on calls over the whole process.
        ("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1"),
        ("MSWEA_GLOBAL_CALL_LIMIT", "12"),
        ("NO_COLOR", "1"),
        ("TERM", "dumb"),
        ("PYTHONUNBUFFERED", "1"),
    ];
    let run = format!(
        "mkdir -p /tmp/mini-home && cd /workspace && exec {venv}/bin/mini -y --exit-immediately \
         {extra} -m openai/{{model}} -t {{instruction}} -o /tmp/mini.traj.json \
         -c {config} -c agent.step_limit={STEP_LIMIT} -c agent.cost_limit=0 \
         -c agent.wall_time_limit_seconds=200 \
         -c environment.cwd=/workspace -c environment.timeout=30 \
         -c model.model_kwargs.api_base={{base_url}} -c model.model_kwargs.api_key={{api_key}} \
         -c model.model_kwargs.timeout=30 -c model.model_kwargs.num_retries=0 </dev/null",
        extra = mode.extra_args,
        config = mode.config,
    );
    BlackBoxConfig {
        name: mode.name.into(),
        files: Default::default(),
        binds: vec![],
        install: vec![],
        run,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_s: AGENT_TIMEOUT_S,
        install_timeout_s: 10.0,
    }
}

async fn run_mini(mode: Mode) {
    let Some(venv) = mini_venv() else { return };
    let venv_str = venv.to_string_lossy().into_owned();
    let task = task(mode.name);
    let session = format!("{}-1", mode.name);

    let policy = ScriptedPolicy::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("policy");
    policy.register_script(
        INSTRUCTION,
        Script::new(script())
            .with_submit_command(SUBMIT)
            .with_fence(mode.fence),
    );
    let store = tempfile::tempdir().expect("tempdir");
    let gw = arbor_gateway::start(GatewayConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        vec![policy.base_url()],
        store.path().to_path_buf(),
    ))
    .await
    .expect("gateway");

    let init = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("arbor-sandbox-init")));
    let backend = LocalBackend::new(LocalConfig {
        init_program: init.filter(|p: &PathBuf| p.exists()),
        ..Default::default()
    })
    .expect("backend (root)");
    let mut spec = arbor_task::run::sandbox_spec(&task);
    spec.binds.push(Bind {
        source: venv.clone(),
        target: venv_str.clone(),
        mode: BindMode::ReadOnly,
    });
    spec.network.tcp_bridges.push(TcpBridge {
        host_addr: gw.addr,
        port: BRIDGE_PORT,
    });
    let sb = backend.create_local(&spec).await.expect("sandbox");

    // Everything that could hang runs under the outer timeout; the sandbox
    // is destroyed whatever happened.
    let scaffold = BlackBoxScaffold {
        config: mini_config(&venv_str, &mode),
    };
    let inside = ChatClient::new(
        format!("http://127.0.0.1:{BRIDGE_PORT}/s/{session}/v1"),
        "arbor-test-key",
        arbor_agent::policy::scripted::NAME,
    );
    let t = Instant::now();
    let outcome = tokio::time::timeout(OUTER_TIMEOUT, async {
        arbor_task::run::upload_files(&sb, &task.environment.workdir, &task.environment.files)
            .await
            .expect("task files");
        let before = arbor_task::grade(&task, &sb, None, &GradeOptions::default()).await;
        let t_agent = Instant::now();
        let episode = scaffold.run(&sb, INSTRUCTION, &inside).await;
        let agent_s = t_agent.elapsed().as_secs_f64();
        let after = arbor_task::grade(&task, &sb, None, &GradeOptions::default()).await;
        (before, episode, agent_s, after)
    })
    .await;
    let traj = sb.read_file("/tmp/mini.traj.json").await.ok();
    sb.destroy().await.expect("destroy");
    let (before, episode, agent_s, after) = outcome.unwrap_or_else(|_| {
        panic!(
            "{}: episode + grading exceeded {OUTER_TIMEOUT:?}",
            mode.name
        )
    });
    let episode = episode.expect("episode");
    // mini's own account of the run: how it ended and what it executed.
    let traj: serde_json::Value = traj
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let exit_status = traj["info"]["exit_status"].as_str().unwrap_or_default();
    let last_output = traj["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] != "exit"))
        .map(|m| m["content"].to_string())
        .unwrap_or_default();
    eprintln!(
        "{}: agent {agent_s:.1}s, total {:.1}s",
        mode.name,
        t.elapsed().as_secs_f64()
    );

    assert_passed(&before, false, "before the agent ran");
    assert_eq!(
        episode.stop,
        StopReason::Exited { code: 0 },
        "{}: {:?}\nmini exit status {exit_status:?}, last message {last_output}",
        mode.name,
        episode.turns
    );
    assert_eq!(
        exit_status, "Submitted",
        "mini-swe-agent did not end by submitting; last message {last_output}"
    );
    assert_eq!(
        traj["info"]["model_stats"]["api_calls"].as_u64(),
        Some(script().len() as u64 + 1),
        "model calls counted by mini"
    );
    assert_passed(&after, true, "after the agent ran");

    // The gateway recorded every call of the session, with token ids.
    let calls = gw
        .store()
        .session(&session)
        .expect("read store")
        .expect("session recorded");
    assert_eq!(
        calls.len(),
        script().len() + 1,
        "one model call per scripted step plus the submit"
    );
    for (i, call) in calls.iter().enumerate() {
        assert!(!call.stream, "mini-swe-agent uses non-streaming calls");
        assert!(
            !call.tokens.prompt.is_empty() && !call.tokens.completions[0].ids.is_empty(),
            "call {i} has no token ids"
        );
        assert_eq!(
            call.tokens.completions[0].logprobs.as_ref().map(Vec::len),
            Some(call.tokens.completions[0].ids.len()),
            "call {i}: one logprob per completion token"
        );
        let first_user = call.request["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default();
        assert!(
            first_user.contains(INSTRUCTION) && first_user != INSTRUCTION,
            "call {i}: the first user message is mini's template around the instruction"
        );
    }
    // Each call extends the previous conversation: one growing trajectory.
    for w in calls.windows(2) {
        assert!(
            w[1].tokens.prompt.starts_with(&w[0].tokens.prompt),
            "call {} does not extend call {}",
            w[1].index,
            w[0].index
        );
    }
    gw.shutdown().await.expect("shutdown");
}

fn assert_passed(r: &VerifierResult, expect: bool, when: &str) {
    assert!(r.infra_error.is_none(), "{when}: grading failed: {r:?}");
    assert_eq!(r.passed, expect, "{when}: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mini_swe_agent_toolcalls_fixes_script_through_gateway() {
    run_mini(TOOLCALLS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mini_swe_agent_textbased_fixes_script_through_gateway() {
    run_mini(TEXTBASED).await;
}
