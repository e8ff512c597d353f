//! A black-box agent: a real program using the official `openai` Python SDK
//! (streaming chat completions with tool calls) runs inside a sandbox with
//! no network; its endpoint on the host is bridged in. The endpoint is the
//! scripted-oracle policy, so a correct run must solve the task.
//!
//! The SDK comes from a virtual environment the test command creates
//! (`scripts/test.sh`: `target/agent-venv`, built on Debian's /usr/bin/python3
//! so its standard library is visible inside the default rootfs).

use std::path::PathBuf;

use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_agent::scaffold::blackbox::{BlackBoxConfig, BlackBoxScaffold};
use arbor_agent::{ChatClient, Scaffold, StopReason};
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_sandbox::{Bind, BindMode, NetworkSpec, Sandbox, SandboxSpec, TcpBridge};

const AGENT: &str = r#"
import json, os, subprocess, sys
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"],
                max_retries=1, timeout=30)
tools = [
    {"type": "function", "function": {"name": "bash", "description": "Run a command.",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
    {"type": "function", "function": {"name": "submit", "description": "Finish.",
     "parameters": {"type": "object", "properties": {}}}},
]
messages = [{"role": "system", "content": "Solve the task with the tools."},
            {"role": "user", "content": open(sys.argv[1]).read()}]
for step in range(20):
    stream = client.chat.completions.create(model="scripted-oracle", messages=messages, tools=tools, stream=True)
    content, calls = "", {}
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            if tc.function:
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
    messages.append({"role": "assistant", "content": content or None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]})
    if not calls:
        messages.append({"role": "user", "content": "Use a tool."})
        continue
    for c in calls.values():
        if c["name"] == "submit":
            print("submitted after", step, "steps")
            sys.exit(0)
        cmd = json.loads(c["arguments"] or "{}").get("command", "")
        p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": f"exit {p.returncode}\n{p.stdout}{p.stderr}"})
sys.exit(3)
"#;

fn venv() -> PathBuf {
    let p = std::env::var_os("ARBOR_AGENT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/agent-venv")
        });
    let p = p.canonicalize().unwrap_or(p);
    assert!(
        p.join("bin/python").exists(),
        "no agent virtualenv at {} (scripts/test.sh creates it: /usr/bin/python3 -m venv target/agent-venv && target/agent-venv/bin/pip install openai)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_agent_solves_task_through_bridge() {
    let venv = venv();
    let policy = ScriptedPolicy::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("policy");
    let task = "Write 'done' into /workspace/result.txt.";
    policy.register(
        task,
        vec![
            "cd /workspace && ls".into(),
            "echo done > /workspace/result.txt".into(),
        ],
    );
    let host_addr = policy
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .parse()
        .expect("policy addr");

    let init = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("arbor-sandbox-init")));
    let backend = LocalBackend::new(LocalConfig {
        init_program: init,
        ..Default::default()
    })
    .expect("backend (root)");
    let venv_str = venv.to_string_lossy().into_owned();
    let spec = SandboxSpec {
        binds: vec![Bind {
            source: venv.clone(),
            target: venv_str.clone(),
            mode: BindMode::ReadOnly,
        }],
        network: NetworkSpec {
            tcp_bridges: vec![TcpBridge {
                host_addr,
                port: 18000,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let sb = backend.create_local(&spec).await.expect("sandbox");
    let scaffold = BlackBoxScaffold {
        config: BlackBoxConfig {
            name: "openai-sdk-loop".into(),
            files: Default::default(),
            binds: vec![],
            install: vec![format!("cat > /tmp/agent.py <<'PYEOF'\n{AGENT}\nPYEOF")],
            run: format!("{venv_str}/bin/python /tmp/agent.py {{instruction_file}}"),
            env: [
                ("OPENAI_BASE_URL".to_string(), "{base_url}".to_string()),
                ("OPENAI_API_KEY".to_string(), "{api_key}".to_string()),
            ]
            .into(),
            timeout_s: 60.0,
            install_timeout_s: 10.0,
        },
    };
    // The endpoint as the agent sees it, inside the sandbox.
    let inside = ChatClient::new("http://127.0.0.1:18000/v1", "session-1", "scripted-oracle");
    let out = scaffold.run(&sb, task, &inside).await;
    let result = sb.read_file("/workspace/result.txt").await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::Exited { code: 0 }, "{:?}", out.turns);
    assert_eq!(result.expect("result file"), b"done\n");
}
