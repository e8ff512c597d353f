//! `scripted-oracle`: an OpenAI-compatible endpoint that replays a fixed list
//! of shell commands per task through whichever protocol the scaffold uses
//! (a fenced ```bash block, or a `bash` tool call), then submits.
//!
//! It is stateless: the task is recognised by the conversation's first user
//! message (the instruction) and the step by the number of assistant
//! messages so far, so retries and resumed runs replay identically. It
//! exists to test and load the infrastructure; results produced with it say
//! nothing about a model.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Name used in reports.
pub const NAME: &str = "scripted-oracle";

type Scripts = Arc<RwLock<HashMap<String, Vec<String>>>>;

/// A running scripted policy server.
pub struct ScriptedPolicy {
    scripts: Scripts,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl ScriptedPolicy {
    /// Serve on `addr` (use port 0 for any free port on loopback).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let scripts: Scripts = Arc::default();
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .route("/v1/models", get(models))
            .with_state(scripts.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("scripted policy server: {e}");
            }
        });
        Ok(ScriptedPolicy {
            scripts,
            addr,
            server,
        })
    }

    /// Base URL including `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Replay `commands` (then submit) for conversations whose first user
    /// message is `instruction`.
    pub fn register(&self, instruction: &str, commands: Vec<String>) {
        if let Ok(mut s) = self.scripts.write() {
            s.insert(instruction.to_string(), commands);
        }
    }
}

impl Drop for ScriptedPolicy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": NAME, "object": "model", "owned_by": "arbor"}]}))
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

async fn complete(State(scripts): State<Scripts>, Json(req): Json<Value>) -> Response {
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`messages` must be an array".into(),
        );
    };
    let instruction = messages
        .iter()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .and_then(content_text);
    let Some(instruction) = instruction else {
        return error(StatusCode::BAD_REQUEST, "no user message".into());
    };
    let step = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .count();
    let command = match scripts.read() {
        Ok(s) => match s.get(&instruction) {
            Some(cmds) => cmds.get(step).cloned(),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "scripted-oracle has no script for this task".into(),
                );
            }
        },
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "script table poisoned".into(),
            );
        }
    };
    let with_tools = req
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let (message, finish) = if with_tools {
        let (name, args) = match &command {
            Some(c) => ("bash", json!({"command": c})),
            None => ("submit", json!({})),
        };
        let call = json!({"id": format!("call_{step}"), "type": "function",
                          "function": {"name": name, "arguments": args.to_string()}});
        (
            json!({"role": "assistant", "content": null, "tool_calls": [call]}),
            "tool_calls",
        )
    } else {
        let c = command.as_deref().unwrap_or("submit");
        (
            json!({"role": "assistant", "content": format!("```bash\n{c}\n```")}),
            "stop",
        )
    };
    // Token ids: bytes of a ChatML-like rendering, so each call's prompt
    // extends the previous prompt + completion exactly as with a real
    // tokenizer; a scripted reply is certain, so every logprob is 0.
    let prompt_ids = render_prompt(messages);
    let completion_ids: Vec<u32> = completion_text(&message).bytes().map(u32::from).collect();
    let logprobs: Vec<Value> = completion_ids
        .iter()
        .map(|&b| json!({"token": format!("<0x{b:02X}>"), "logprob": 0.0, "bytes": [b], "top_logprobs": []}))
        .collect();
    let usage = json!({"prompt_tokens": prompt_ids.len(), "completion_tokens": completion_ids.len(),
                       "total_tokens": prompt_ids.len() + completion_ids.len()});
    let tokens = TokenInfo {
        prompt_ids,
        completion_ids,
        logprobs,
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or(NAME);
    let id = format!("chatcmpl-scripted-{step}");
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream(&id, model, message, finish, usage, tokens);
    }
    Json(json!({
        "id": id, "object": "chat.completion", "created": 0, "model": model,
        "prompt_token_ids": tokens.prompt_ids,
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "token_ids": tokens.completion_ids, "logprobs": {"content": tokens.logprobs}}],
        "usage": usage,
    }))
    .into_response()
}

/// Token ids and logprobs of one reply.
struct TokenInfo {
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    logprobs: Vec<Value>,
}

/// The text of a message as the byte "tokenizer" sees it: content, then
/// each tool call as `<tool_call>name arguments</tool_call>`, then an end marker.
fn completion_text(m: &Value) -> String {
    let mut out = m.get("content").and_then(content_text).unwrap_or_default();
    for c in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = &c["function"];
        out.push_str(&format!(
            "<tool_call>{} {}</tool_call>",
            f["name"].as_str().unwrap_or_default(),
            f["arguments"].as_str().unwrap_or_default()
        ));
    }
    out.push_str("<|end|>\n");
    out
}

/// Bytes of every message with a role header, then the assistant header.
fn render_prompt(messages: &[Value]) -> Vec<u32> {
    let mut text = String::new();
    for m in messages {
        text.push_str(&format!(
            "<|{}|>\n",
            m.get("role").and_then(Value::as_str).unwrap_or("user")
        ));
        text.push_str(&completion_text(m));
    }
    text.push_str("<|assistant|>\n");
    text.bytes().map(u32::from).collect()
}

/// The same reply as a stream: one delta with the whole message, then the
/// finish chunk, a usage chunk and `[DONE]`.
fn stream(
    id: &str,
    model: &str,
    message: Value,
    finish: &str,
    usage: Value,
    tokens: TokenInfo,
) -> Response {
    let mut delta = message.clone();
    if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
        for (i, c) in calls.iter_mut().enumerate() {
            c["index"] = json!(i);
        }
    }
    let chunk = |choices: Value, usage: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": choices, "usage": usage})
    };
    let mut first = chunk(
        json!([{"index": 0, "delta": delta, "finish_reason": null,
                "token_ids": tokens.completion_ids, "logprobs": {"content": tokens.logprobs}}]),
        Value::Null,
    );
    first["prompt_token_ids"] = json!(tokens.prompt_ids);
    let events = [
        first,
        chunk(
            json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
            Value::Null,
        ),
        chunk(json!([]), usage),
    ];
    let mut body = String::new();
    for e in events {
        body.push_str(&format!("data: {e}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        body,
    )
        .into_response()
}

fn content_text(c: &Value) -> Option<String> {
    match c {
        Value::String(s) => Some(s.clone()),
        // Content parts: concatenate the text parts.
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}
