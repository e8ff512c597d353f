//! The built-in scaffolds against real sandboxes and real HTTP endpoints.
//! The endpoints are scripted (the scaffold is what is under test); the
//! sandboxes are real, so these tests need root like the sandbox suite.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_agent::scaffold::bash::BashScaffold;
use arbor_agent::scaffold::tools::ToolsScaffold;
use arbor_agent::{AgentError, ChatClient, ContextPolicy, Scaffold, ScaffoldConfig, StopReason};
use arbor_sandbox::local::{LocalBackend, LocalConfig, LocalSandbox};
use arbor_sandbox::{Sandbox, SandboxSpec};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};

fn backend() -> LocalBackend {
    // The init program is built with the workspace (arbor-sandbox's bin target).
    let init = std::env::var_os("ARBOR_SANDBOX_INIT_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let p = exe.parent()?.parent()?.join("arbor-sandbox-init");
            p.exists().then_some(p)
        });
    LocalBackend::new(LocalConfig {
        init_program: init,
        ..Default::default()
    })
    .expect("local sandbox backend (needs root and the arbor-sandbox-init binary)")
}

async fn sandbox() -> LocalSandbox {
    backend()
        .create_local(&SandboxSpec::default())
        .await
        .expect("create sandbox")
}

const LOOPBACK: &str = "127.0.0.1:0";

fn addr() -> SocketAddr {
    LOOPBACK.parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_scaffold_replays_oracle_and_submits() {
    let policy = ScriptedPolicy::start(addr()).await.expect("policy");
    let task = "Write the number 42 into /workspace/answer.txt.";
    policy.register(
        task,
        vec![
            "ls /workspace".into(),
            "echo 42 > /workspace/answer.txt".into(),
        ],
    );
    let sb = sandbox().await;
    let client = ChatClient::new(policy.base_url(), "key", "scripted-oracle");
    let out = BashScaffold::default().run(&sb, task, &client).await;
    let answer = sb.read_file("/workspace/answer.txt").await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::Submitted);
    assert_eq!(out.turns.len(), 3);
    assert_eq!(out.turns[1].action, "echo 42 > /workspace/answer.txt");
    assert_eq!(out.format_errors, 0);
    assert!(out.prompt_tokens > 0 && out.completion_tokens > 0);
    assert_eq!(answer.expect("answer file"), b"42\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_scaffold_replays_oracle_and_submits() {
    let policy = ScriptedPolicy::start(addr()).await.expect("policy");
    let task = "Create /workspace/out/x.txt containing hello.";
    policy.register(
        task,
        vec!["mkdir -p /workspace/out && printf hello > /workspace/out/x.txt".into()],
    );
    let sb = sandbox().await;
    let client = ChatClient::new(policy.base_url(), "key", "scripted-oracle");
    let out = ToolsScaffold::default().run(&sb, task, &client).await;
    let file = sb.read_file("/workspace/out/x.txt").await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::Submitted);
    assert_eq!(out.turns.len(), 2);
    assert_eq!(file.expect("file"), b"hello");
}

/// An endpoint that answers with a fixed list of assistant messages, one
/// per call, and keeps every request it saw.
#[derive(Clone, Default)]
struct Canned {
    replies: Arc<Vec<Value>>,
    seen: Arc<Mutex<Vec<Value>>>,
}

async fn canned(State(c): State<Canned>, Json(req): Json<Value>) -> Json<Value> {
    let n = {
        let mut seen = c.seen.lock().expect("lock");
        seen.push(req);
        seen.len() - 1
    };
    let msg = c
        .replies
        .get(n)
        .cloned()
        .unwrap_or(json!({"role": "assistant", "content": "I am lost."}));
    Json(
        json!({"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5}}),
    )
}

async fn serve_canned(replies: Vec<Value>) -> (String, Canned) {
    let c = Canned {
        replies: Arc::new(replies),
        seen: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(canned))
        .with_state(c.clone());
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, c)
}

fn tool_call(id: &str, name: &str, args: Value) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editor_commands_work_and_report_mistakes() {
    let e = |id: &str, args: Value| tool_call(id, "str_replace_based_edit_tool", args);
    let replies = vec![
        e(
            "1",
            json!({"command": "create", "path": "/workspace/a.py", "file_text": "x = 1\ny = 2\n"}),
        ),
        e(
            "2",
            json!({"command": "str_replace", "path": "/workspace/a.py", "old_str": "y = 2", "new_str": "y = 3"}),
        ),
        e(
            "3",
            json!({"command": "insert", "path": "/workspace/a.py", "insert_line": 0, "new_str": "# header"}),
        ),
        e(
            "4",
            json!({"command": "str_replace", "path": "/workspace/a.py", "old_str": "nope", "new_str": ""}),
        ),
        e(
            "5",
            json!({"command": "undo_edit", "path": "/workspace/a.py"}),
        ),
        e("6", json!({"command": "view", "path": "/workspace/a.py"})),
        tool_call("7", "bash", json!({"cmd": "missing field"})),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "8", "type": "function", "function": {"name": "bash", "arguments": "{not json"}}]}),
        tool_call("9", "submit", json!({})),
    ];
    let (url, seen) = serve_canned(replies).await;
    let sb = sandbox().await;
    let out = ToolsScaffold::default()
        .run(&sb, "edit a file", &ChatClient::new(url, "k", "m"))
        .await;
    let file = sb.read_file("/workspace/a.py").await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::Submitted);
    assert_eq!(
        String::from_utf8(file.expect("file")).expect("utf8"),
        "x = 1\ny = 3\n"
    );
    assert_eq!(
        out.format_errors, 2,
        "missing argument and invalid JSON are format errors"
    );
    let reqs = seen.seen.lock().expect("lock");
    // Each answer is the last message of the next request.
    let answer = |i: usize| {
        reqs[i]["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(answer(4).contains("not found"), "{}", answer(4));
    assert!(answer(5).contains("Reverted"), "{}", answer(5));
    assert!(answer(6).contains("     1\tx = 1"), "{}", answer(6));
    assert_eq!(
        reqs[7]["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| m["tool_call_id"].clone()),
        Some(json!("7"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_errors_and_step_limit() {
    let (url, _seen) = serve_canned(vec![]).await;
    let sb = sandbox().await;
    let scaffold = BashScaffold {
        config: ScaffoldConfig {
            max_steps: 3,
            ..Default::default()
        },
    };
    let out = scaffold
        .run(&sb, "anything", &ChatClient::new(url, "k", "m"))
        .await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::StepLimit);
    assert_eq!(out.format_errors, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_policy_truncates_old_observations() {
    let policy = ScriptedPolicy::start(addr()).await.expect("policy");
    let task = "Produce some output.";
    let cmds: Vec<String> = (0..4)
        .map(|i| format!("head -c 3000 /dev/zero | tr '\\0' '{i}'"))
        .collect();
    policy.register(task, cmds);
    let sb = sandbox().await;
    let scaffold = BashScaffold {
        config: ScaffoldConfig {
            context: ContextPolicy::TruncateObservations {
                budget_chars: 5000,
                keep_last: 1,
            },
            ..Default::default()
        },
    };
    let out = scaffold
        .run(&sb, task, &ChatClient::new(policy.base_url(), "k", "m"))
        .await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::Submitted);
    let rewritten: Vec<bool> = out.turns.iter().map(|t| t.context_rewritten).collect();
    assert_eq!(
        rewritten,
        vec![false, false, true, true, true],
        "history rewritten once it passed the budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_model_is_an_infrastructure_error() {
    let sb = sandbox().await;
    // Nothing listens on this port (bound and released).
    let port = std::net::TcpListener::bind(LOOPBACK)
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let client = ChatClient::new(format!("http://127.0.0.1:{port}/v1"), "k", "m");
    let out = BashScaffold::default().run(&sb, "x", &client).await;
    sb.destroy().await.expect("destroy");
    match out {
        Err(e @ AgentError::Model(_)) => assert!(e.is_infrastructure()),
        other => panic!("expected a model error, got {other:?}"),
    }
}
