//! The official Python SDKs (`openai`, `anthropic`) and `transformers` against the gateway.
//! The scripts live in tests/py; a missing pip package makes the test fail with its name.

mod common;

use arbor_gateway::standin::StandinConfig;
use arbor_gateway::tokenize::ChatTokenizer;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_chat_completions() {
    let env = Env::new().await;
    run_python("openai_chat.py", &[("GATEWAY_URL", env.gw.url())]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_responses() {
    let env = Env::new().await;
    run_python("openai_responses.py", &[("GATEWAY_URL", env.gw.url())]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_sdk_messages() {
    let env = Env::new().await;
    run_python("anthropic_messages.py", &[("GATEWAY_URL", env.gw.url())]).await;
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "search_code", "description": "Search the repository",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "text to find"},
        "max_results": {"type": "integer"}}, "required": ["query"]}}},
        {"type": "function", "function": {"name": "run", "description": "Run a shell command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_template_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let tok_dir = write_tokenizer(&tmp.path().join("model"));
    let tok = ChatTokenizer::from_dir(&tok_dir).unwrap();
    let convo = json!([
        {"role": "system", "content": "You are a coding agent.\nBe careful with \"quotes\"."},
        {"role": "user", "content": "Find the bug in parse() — café 日本"},
        {"role": "assistant", "content": "Let me search.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search_code", "arguments": "{\"query\": \"fn parse\", \"max_results\": 3}"}},
            {"id": "c2", "type": "function", "function": {"name": "run", "arguments": "{\"cmd\":\"cargo test -- --nocapture\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "src/lib.rs:10: fn parse(x: &str)"},
        {"role": "tool", "tool_call_id": "c2", "content": "test result: FAILED"},
        {"role": "assistant", "content": "The test fails."},
        {"role": "user", "content": "fix it"}
    ]);
    let msgs = convo.as_array().unwrap();
    let t = tools();
    let tl = t.as_array().unwrap();
    let mut cases = Vec::new();
    for (messages, tools, agp) in [
        (&msgs[..2], None, true),
        (&msgs[1..2], Some(tl), true),
        (&msgs[..], Some(tl), true),
        (&msgs[..], Some(tl), false),
        (&msgs[..6], None, false),
    ] {
        let ids = tok
            .apply_chat_template(messages, tools.map(|v| v.as_slice()), agp)
            .unwrap();
        cases.push(
            json!({"messages": messages, "tools": tools, "add_generation_prompt": agp, "ids": ids}),
        );
    }
    let cases_file = tmp.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec(&cases).unwrap()).unwrap();

    // End to end: an upstream without token ids, so the gateway tokenizes with the template.
    let no_ids = StandinConfig {
        token_ids: false,
        ..Default::default()
    };
    let dir = tok_dir.clone();
    let env = Env::with(vec![no_ids], move |c| c.tokenizer = Some(dir)).await;
    let mut messages = vec![
        msgs[0].clone(),
        json!({"role": "user", "content": "search for parse"}),
    ];
    let (s, r) = env
        .post(
            "/s/tpl/v1/chat/completions",
            &json!({"messages": messages, "tools": t}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let m = r["choices"][0]["message"].clone();
    let tc = m["tool_calls"][0].clone();
    messages.push(m);
    messages.push(json!({"role": "tool", "tool_call_id": tc["id"], "content": "found it"}));
    let (s, r) = env
        .post(
            "/s/tpl/v1/chat/completions",
            &json!({"messages": messages, "tools": t, "stream": true}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let calls = env.calls("tpl").await;
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1]["branch"]["extends_previous"], true,
        "{}",
        calls[1]["branch"]
    );
    run_python(
        "chat_template.py",
        &[
            ("GATEWAY_URL", env.gw.url()),
            ("TOKENIZER_DIR", tok_dir.display().to_string()),
            ("CASES_FILE", cases_file.display().to_string()),
            ("SESSION", "tpl".into()),
        ],
    )
    .await;
}
