//! HTTP routes: OpenAI Chat Completions (plain and streamed), `/v1/models`, weight loading.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use arbor_trace::byte_chat::{self, parse_completion, token_name};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::engine::{Event, Request};
use crate::sample::{Finish, Sampling};
use crate::text::ContentStream;
use crate::{PolicyError, Shared, VERSION_HEADER, load_checkpoint};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(complete))
        .route("/v1/models", get(models))
        .route("/admin/load", post(load))
        .route("/admin/version", get(version))
        .route("/health", get(|| async { "ok" }))
        .with_state(shared)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (
        status,
        axum::Json(json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"object": "list", "data": [
        {"id": s.opts.name, "object": "model", "created": 0, "owned_by": "arbor"}]}))
    .into_response()
}

async fn version(State(s): State<Arc<Shared>>) -> Response {
    match s.current() {
        Ok(w) => axum::Json(json!({"version": w.version, "name": s.opts.name,
                                   "params": w.model.num_params()}))
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn load(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let dir = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("checkpoint")?.as_str().map(String::from));
    let Some(dir) = dir else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"checkpoint\": \"DIR\"}",
        );
    };
    let d = dir.clone();
    let loaded = match tokio::task::spawn_blocking(move || load_checkpoint(d)).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("loader: {e}")),
    };
    match loaded.and_then(|m| s.swap(m)) {
        Ok(v) => axum::Json(json!({"version": v, "checkpoint": dir})).into_response(),
        Err(e @ PolicyError::Internal(_)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// A parsed chat request.
struct Job {
    prompt: Vec<u32>,
    tools: Vec<String>,
    sampling: Sampling,
}

/// What every reply of one request says about itself.
struct Meta {
    id: String,
    created: u64,
    model: String,
    version: u64,
}

impl Meta {
    fn base(&self, object: &str) -> serde_json::Map<String, Value> {
        let mut o = serde_json::Map::new();
        o.insert("id".into(), json!(self.id));
        o.insert("object".into(), json!(object));
        o.insert("created".into(), json!(self.created));
        o.insert("model".into(), json!(self.model));
        o.insert(
            "system_fingerprint".into(),
            json!(format!("weights-v{}", self.version)),
        );
        o.insert("weights_version".into(), json!(self.version));
        o
    }
}

fn parse_job(req: &Value, s: &Shared) -> Result<Job, String> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` must be an array")?;
    if let Some(n) = req.get("n").filter(|n| !n.is_null())
        && n.as_u64() != Some(1)
    {
        return Err("only n = 1 is supported".into());
    }
    let temperature = match req.get("temperature").filter(|t| !t.is_null()) {
        None => 1.0,
        Some(t) => match t.as_f64() {
            Some(t) if t.is_finite() && t >= 0.0 => t as f32,
            _ => return Err("`temperature` must be a number >= 0".into()),
        },
    };
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| req.get(*k).filter(|v| !v.is_null()));
    let max_tokens = match max_tokens {
        None => s.opts.default_max_tokens,
        Some(v) => match v.as_u64() {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => return Err("`max_tokens` must be a non-negative integer".into()),
        },
    };
    let seed = match req.get("seed").filter(|v| !v.is_null()) {
        None => rand::random::<u64>(),
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err("`seed` must be an integer".into()),
        },
    };
    let tool_choice_none = req.get("tool_choice").and_then(Value::as_str) == Some("none");
    let tools = if tool_choice_none {
        Vec::new()
    } else {
        req.get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.get("function")?.get("name")?.as_str().map(String::from))
            .collect()
    };
    let prompt = byte_chat::render_prompt(messages);
    let context = s.opts.max_context;
    if prompt.len() >= context {
        return Err(format!(
            "the prompt has {} tokens; this model's context is {context}",
            prompt.len()
        ));
    }
    let max_tokens = max_tokens
        .min(s.opts.max_tokens_cap)
        .min(context - prompt.len());
    Ok(Job {
        prompt,
        tools,
        sampling: Sampling {
            temperature,
            max_tokens,
            seed,
        },
    })
}

async fn complete(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let job = match parse_job(&req, &s) {
        Ok(j) => j,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let submitted = s.engine.submit(Request {
        prompt: job.prompt.clone(),
        sampling: job.sampling.clone(),
        events: events_tx,
    });
    if let Err(e) = submitted {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    // Queue: the engine takes the weights when it starts the generation, so a request that
    // waited through a swap samples from the new weights. Dropping `events` (client gone)
    // withdraws the request.
    let version = match events.recv().await {
        Some(Event::Started { version }) => version,
        Some(Event::Failed(m)) => return error(StatusCode::INTERNAL_SERVER_ERROR, m),
        _ => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the decoding engine stopped",
            );
        }
    };
    let meta = Meta {
        id: format!(
            "chatcmpl-arbor-{}",
            s.counter.fetch_add(1, Ordering::Relaxed)
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: s.opts.name.clone(),
        version,
    };
    let version_header = HeaderValue::from(version);
    let mut resp = if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let (tx, mut rx) = mpsc::channel::<String>(64);
        tokio::spawn(async move { run_stream(events, &job, &meta, &tx).await });
        let body = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>))
        });
        let mut r = Response::new(Body::from_stream(body));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        match run_full(events, &job, &meta).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    };
    resp.headers_mut().insert(VERSION_HEADER, version_header);
    resp
}

/// The next generation event: a token, or how generation ended.
enum Next {
    Token(u32, f32),
    End(Result<Finish, String>),
}

async fn next_event(events: &mut UnboundedReceiver<Event>) -> Next {
    match events.recv().await {
        Some(Event::Token { id, logprob }) => Next::Token(id, logprob),
        Some(Event::Done(f)) => Next::End(Ok(f)),
        Some(Event::Failed(m)) => Next::End(Err(m)),
        Some(Event::Started { .. }) => Next::End(Err("generation restarted".into())),
        None => Next::End(Err("generation failed: the decoding engine stopped".into())),
    }
}

fn logprob_entry(id: u32, lp: f32) -> Value {
    json!({"token": token_name(id), "logprob": lp, "bytes": [id], "top_logprobs": []})
}

/// The assistant message and finish reason of a completion.
fn message(ids: &[u32], finish: Finish, tools: &[String], meta: &Meta) -> (Value, &'static str) {
    let text = String::from_utf8_lossy(&byte_chat::decode_bytes(ids)).into_owned();
    let names: Vec<&str> = tools.iter().map(String::as_str).collect();
    let parsed = parse_completion(&text, &names);
    let mut finish_reason = match finish {
        Finish::Stop => "stop",
        Finish::Length | Finish::Cancelled => "length",
    };
    let mut msg = json!({"role": "assistant", "content": parsed.content});
    if !parsed.tool_calls.is_empty() {
        if parsed.content.is_empty() {
            msg["content"] = Value::Null;
        }
        let calls: Vec<Value> = parsed
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"id": format!("call_{}_{i}", meta.id.trim_start_matches("chatcmpl-")),
                       "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        msg["tool_calls"] = json!(calls);
        finish_reason = "tool_calls";
    }
    (msg, finish_reason)
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// Collects a whole reply from the engine's events.
async fn run_full(
    mut events: UnboundedReceiver<Event>,
    job: &Job,
    meta: &Meta,
) -> Result<Value, String> {
    let mut ids = Vec::new();
    let mut lps = Vec::new();
    let finish = loop {
        match next_event(&mut events).await {
            Next::Token(id, lp) => {
                ids.push(id);
                lps.push(logprob_entry(id, lp));
            }
            Next::End(r) => break r?,
        }
    };
    let (msg, finish_reason) = message(&ids, finish, &job.tools, meta);
    let mut o = meta.base("chat.completion");
    o.insert("prompt_token_ids".into(), json!(job.prompt));
    o.insert(
        "choices".into(),
        json!([{"index": 0, "message": msg, "finish_reason": finish_reason,
                "token_ids": ids, "logprobs": {"content": lps}}]),
    );
    o.insert("usage".into(), usage(job.prompt.len(), ids.len()));
    Ok(Value::Object(o))
}

async fn send(tx: &mpsc::Sender<String>, v: Value) -> bool {
    tx.send(format!("data: {v}\n\n")).await.is_ok()
}

/// Turns the engine's events into server-sent events: a first chunk with the prompt ids, one
/// chunk per token (content delta when certain, token id, logprob), the rest of the content and
/// the tool calls, the finish chunk, usage, `[DONE]`. Returns early when the client is gone (the
/// body channel is closed); dropping `events` then cancels the generation.
async fn run_stream(
    mut events: UnboundedReceiver<Event>,
    job: &Job,
    meta: &Meta,
    tx: &mpsc::Sender<String>,
) {
    let chunk = |choice: Value| {
        let mut o = meta.base("chat.completion.chunk");
        o.insert("choices".into(), json!([choice]));
        Value::Object(o)
    };
    let mut first = chunk(json!({"index": 0, "delta": {"role": "assistant"},
                                 "logprobs": null, "finish_reason": null}));
    first["prompt_token_ids"] = json!(job.prompt);
    if !send(tx, first).await {
        return;
    }
    let mut text = ContentStream::new(!job.tools.is_empty());
    let mut ids = Vec::new();
    let finish = loop {
        match next_event(&mut events).await {
            Next::Token(id, lp) => {
                ids.push(id);
                let delta = match u8::try_from(id).ok().and_then(|b| text.push(b)) {
                    Some(piece) => json!({"content": piece}),
                    None => json!({}),
                };
                let c = chunk(json!({"index": 0, "delta": delta, "token_ids": [id],
                                     "logprobs": {"content": [logprob_entry(id, lp)]},
                                     "finish_reason": null}));
                if !send(tx, c).await {
                    return;
                }
            }
            Next::End(Ok(f)) => break f,
            Next::End(Err(e)) => {
                tracing::warn!("generation failed mid-stream: {e}");
                send(
                    tx,
                    json!({"error": {"message": e, "type": "server_error", "param": null,
                                     "code": null}}),
                )
                .await;
                return;
            }
        }
    };
    let (msg, finish_reason) = message(&ids, finish, &job.tools, meta);
    let content = msg.get("content").and_then(Value::as_str).unwrap_or("");
    if let Some(rest) = text.rest(content)
        && !send(
            tx,
            chunk(json!({"index": 0, "delta": {"content": rest},
                         "logprobs": null, "finish_reason": null})),
        )
        .await
    {
        return;
    }
    if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
        let deltas: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"index": i, "id": c["id"], "type": "function", "function": c["function"]})
            })
            .collect();
        if !send(
            tx,
            chunk(json!({"index": 0, "delta": {"tool_calls": deltas},
                         "logprobs": null, "finish_reason": null})),
        )
        .await
        {
            return;
        }
    }
    if !send(
        tx,
        chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason})),
    )
    .await
    {
        return;
    }
    let mut last = meta.base("chat.completion.chunk");
    last.insert("choices".into(), json!([]));
    last.insert("usage".into(), usage(job.prompt.len(), ids.len()));
    if send(tx, Value::Object(last)).await {
        let _ = tx.send("data: [DONE]\n\n".into()).await;
    }
}
