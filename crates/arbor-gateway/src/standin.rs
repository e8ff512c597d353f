//! A deterministic OpenAI-compatible upstream, for tests and `arbor gateway bench`.
//!
//! It "tokenizes" byte-wise (token id = byte value; `<|im_start|>` = 256, `<|im_end|>` = 257),
//! renders prompts ChatML-style, and answers instantly (or with a delay between stream chunks)
//! with fixed replies: a call of the first tool when tools are offered and the last message is
//! from the user, text otherwise. It returns `prompt_token_ids` / `token_ids` when asked
//! (`return_token_ids`, like vLLM) and logprobs when asked. Markers in the last user message
//! control failures: `[[fail]]` answers 500, `[[die]]` cuts the connection after two chunks.
//! It is not part of what the gateway proves; it only plays an upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde_json::{Map, Value, json};

use crate::sse;

/// `<|im_start|>` in the stand-in's byte-level vocabulary.
pub const IM_START: u32 = 256;
/// `<|im_end|>` in the stand-in's byte-level vocabulary (also its end-of-turn token).
pub const IM_END: u32 = 257;

/// Stand-in configuration.
#[derive(Debug, Clone)]
pub struct StandinConfig {
    /// Name reported as `system_fingerprint` (tells tests which upstream answered).
    pub name: String,
    /// When > 0, text replies are exactly this many tokens (end-of-turn token included).
    pub reply_tokens: usize,
    /// Delay between stream chunks.
    pub chunk_delay: Duration,
    /// Honour `return_token_ids` (otherwise never return token ids).
    pub token_ids: bool,
    /// Answer every request with this HTTP status (an upstream that is down).
    pub fail_status: Option<u16>,
    /// Answer with plain JSON even when a stream is asked for.
    pub ignore_stream: bool,
}

impl Default for StandinConfig {
    fn default() -> Self {
        Self {
            name: "standin".into(),
            reply_tokens: 0,
            chunk_delay: Duration::ZERO,
            token_ids: true,
            fail_status: None,
            ignore_stream: false,
        }
    }
}

struct Inner {
    cfg: StandinConfig,
    counter: AtomicU64,
}

/// A running stand-in.
pub struct Standin {
    /// Address it listens on.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Standin {
    /// Base URL (`http://addr/v1`).
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Chat completions requests received.
    pub fn requests(&self) -> u64 {
        self.inner.counter.load(Ordering::Relaxed)
    }

    /// Stops the server.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Starts a stand-in on `listen` (use port 0 for a free port).
pub async fn spawn(listen: SocketAddr, cfg: StandinConfig) -> std::io::Result<Standin> {
    let inner = Arc::new(Inner {
        cfg,
        counter: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .with_state(inner.clone());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    Ok(Standin {
        addr,
        inner,
        shutdown: Some(tx),
        task,
    })
}

async fn models(State(inner): State<Arc<Inner>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": inner.cfg.name, "object": "model", "created": 0, "owned_by": "standin"}]}))
        .into_response()
}

/// Text of a message's content (string or parts).
fn content_text(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn tool_call_text(name: &str, args: &str) -> String {
    format!("<tool_call>{name} {args}</tool_call>")
}

/// The stand-in's rendering of a prompt as token ids.
pub fn render_prompt(messages: &[Value], tools: Option<&Vec<Value>>) -> Vec<u32> {
    let mut ids = Vec::new();
    let turn = |role: &str, text: &str, ids: &mut Vec<u32>| {
        ids.push(IM_START);
        ids.extend(role.bytes().map(u32::from));
        ids.push(u32::from(b'\n'));
        ids.extend(text.bytes().map(u32::from));
        ids.push(IM_END);
        ids.push(u32::from(b'\n'));
    };
    if let Some(tools) = tools {
        let names: Vec<&str> = tools
            .iter()
            .filter_map(|t| t.get("function")?.get("name")?.as_str())
            .collect();
        turn("tools", &names.join(","), &mut ids);
    }
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let mut text = content_text(m);
        if let Some(tcs) = m.get("tool_calls").and_then(Value::as_array) {
            for tc in tcs {
                let f = tc.get("function");
                text.push_str(&tool_call_text(
                    f.and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    f.and_then(|f| f.get("arguments"))
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                ));
            }
        }
        turn(role, &text, &mut ids);
    }
    ids.push(IM_START);
    ids.extend(b"assistant\n".iter().map(|&b| u32::from(b)));
    ids
}

fn token_str(id: u32) -> String {
    match id {
        IM_START => "<|im_start|>".into(),
        IM_END => "<|im_end|>".into(),
        b => char::from_u32(b).map(String::from).unwrap_or_default(),
    }
}

fn logprob_of(i: usize) -> f64 {
    -(((i % 5) as f64) + 1.0) / 10.0
}

fn args_for(tool: &Value) -> String {
    let mut args = Map::new();
    if let Some(props) = tool
        .get("function")
        .and_then(|f| f.get("parameters"))
        .and_then(|p| p.get("properties"))
        .and_then(Value::as_object)
    {
        for (k, schema) in props {
            let v = match schema.get("type").and_then(Value::as_str) {
                Some("integer") | Some("number") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("standin"),
            };
            args.insert(k.clone(), v);
        }
    }
    serde_json::to_string(&Value::Object(args)).unwrap_or_else(|_| "{}".into())
}

const LOREM: &[u8] = b"the quick brown fox jumps over the lazy dog ";

/// One planned choice.
struct Plan {
    text: String,
    tool: Option<(String, String, String)>, // id, name, args
}

fn plan(inner: &Inner, req: &Value, n_call: u64, choice: usize) -> Plan {
    let messages = req.get("messages").and_then(Value::as_array);
    let last = messages.and_then(|m| m.last());
    let last_role = last
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty());
    let choice_none = req.get("tool_choice").and_then(Value::as_str) == Some("none");
    if let Some(tools) = tools
        && last_role == "user"
        && !choice_none
    {
        let named = req
            .get("tool_choice")
            .and_then(|c| c.get("function"))
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str);
        let tool = tools
            .iter()
            .find(|t| {
                named.is_some()
                    && t.get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        == named
            })
            .unwrap_or(&tools[0]);
        let name = tool
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("tool")
            .to_string();
        return Plan {
            text: String::new(),
            tool: Some((
                format!("call_{}_{n_call}_{choice}", inner.cfg.name),
                name,
                args_for(tool),
            )),
        };
    }
    let text = if inner.cfg.reply_tokens > 0 {
        let n = inner.cfg.reply_tokens - 1;
        (0..n).map(|i| LOREM[i % LOREM.len()] as char).collect()
    } else {
        let turns = messages.map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
        if last_role == "tool" {
            format!(
                "Tool said: {}",
                last.map(content_text)
                    .unwrap_or_default()
                    .chars()
                    .take(40)
                    .collect::<String>()
            )
        } else {
            format!("Reply {turns}.{choice} from the stand-in.")
        }
    };
    Plan { text, tool: None }
}

/// (text piece, token ids) segments of a choice, end-of-turn last.
fn segments(p: &Plan) -> Vec<(Option<String>, Vec<u32>)> {
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
    let mut out = Vec::new();
    match &p.tool {
        Some((_, name, args)) => {
            let mid = args.len() / 2;
            let mid = (0..=mid)
                .rev()
                .find(|&i| args.is_char_boundary(i))
                .unwrap_or(0);
            let mut first = bytes(&format!("<tool_call>{name} "));
            first.extend(bytes(&args[..mid]));
            out.push((Some(args[..mid].to_string()), first));
            let mut second = bytes(&args[mid..]);
            second.extend(bytes("</tool_call>"));
            out.push((Some(args[mid..].to_string()), second));
        }
        None => {
            for ch in p.text.chars() {
                let mut b = [0u8; 4];
                let s = ch.encode_utf8(&mut b);
                out.push((Some(s.to_string()), bytes(s)));
            }
        }
    }
    out.push((None, vec![IM_END]));
    out
}

fn logprob_entries(ids: &[u32], start: usize) -> Vec<Value> {
    ids.iter()
        .enumerate()
        .map(|(k, &id)| json!({"token": token_str(id), "logprob": logprob_of(start + k), "bytes": [], "top_logprobs": []}))
        .collect()
}

fn last_user_text(req: &Value) -> String {
    req.get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(content_text)
        .unwrap_or_default()
}

/// A JSON error answer.
fn error_response(status: StatusCode, error: Value) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

/// What one call answers, shared by the plain and the streamed shape.
struct Answer<'a> {
    inner: &'a Inner,
    id: String,
    model: Value,
    prompt: Vec<u32>,
    plans: Vec<Plan>,
    want_ids: bool,
    want_lp: bool,
    usage: Value,
}

impl Answer<'_> {
    /// A chunk (`chat.completion.chunk`) carrying `choices`.
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": self.model,
               "system_fingerprint": self.inner.cfg.name, "choices": choices})
    }

    /// Logprobs of `ids` starting at position `start`, or null when not asked for.
    fn logprobs(&self, ids: &[u32], start: usize) -> Value {
        if self.want_lp {
            json!({"content": logprob_entries(ids, start)})
        } else {
            Value::Null
        }
    }
}

fn finish_reason(p: &Plan) -> &'static str {
    if p.tool.is_some() {
        "tool_calls"
    } else {
        "stop"
    }
}

/// Steps: configured or marker-driven failures, parsing, planning the choices, then the plain
/// answer or the stream frames.
async fn completions(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let n_call = inner.counter.fetch_add(1, Ordering::Relaxed);
    if let Some(s) = inner.cfg.fail_status {
        let status = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error_response(
            status,
            json!({"message": "stand-in configured to fail", "type": "server_error"}),
        );
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, json!({"message": e.to_string()}));
        }
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            json!({"message": "messages required"}),
        );
    };
    let marker = last_user_text(&req);
    if marker.contains("[[fail]]") {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"message": "asked to fail"}),
        );
    }
    let die = marker.contains("[[die]]");
    let answer = plan_answer(&inner, &req, messages, n_call);
    let stream =
        !inner.cfg.ignore_stream && req.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream {
        if die {
            let body = Body::from_stream(stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("stand-in died"))
            }));
            return Response::new(body);
        }
        return axum::Json(full_answer(&answer)).into_response();
    }
    let include_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let frames = stream_frames(&answer, include_usage);
    sse_response(frames, die, inner.cfg.chunk_delay)
}

/// Renders the prompt and plans the `n` choices (at most 8) with their usage.
fn plan_answer<'a>(inner: &'a Inner, req: &Value, messages: &[Value], n_call: u64) -> Answer<'a> {
    let tools = req.get("tools").and_then(Value::as_array);
    let prompt = render_prompt(messages, tools);
    let want_ids =
        inner.cfg.token_ids && req.get("return_token_ids").and_then(Value::as_bool) == Some(true);
    let want_lp = req.get("logprobs").and_then(Value::as_bool) == Some(true);
    let n = req
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 8) as usize;
    let model = req.get("model").cloned().unwrap_or(json!("standin"));
    let id = format!("chatcmpl-{}-{n_call}", inner.cfg.name);
    let plans: Vec<Plan> = (0..n).map(|c| plan(inner, req, n_call, c)).collect();
    let completion_tokens: usize = plans
        .iter()
        .map(|p| segments(p).iter().map(|s| s.1.len()).sum::<usize>())
        .sum();
    let usage = json!({"prompt_tokens": prompt.len(), "completion_tokens": completion_tokens,
                       "total_tokens": prompt.len() + completion_tokens});
    Answer {
        inner,
        id,
        model,
        prompt,
        plans,
        want_ids,
        want_lp,
        usage,
    }
}

/// The plain `chat.completion` answer.
fn full_answer(a: &Answer) -> Value {
    let choices: Vec<Value> = a
        .plans
        .iter()
        .enumerate()
        .map(|(c, p)| {
            let ids: Vec<u32> = segments(p).into_iter().flat_map(|s| s.1).collect();
            let mut msg = json!({"role": "assistant", "content": if p.tool.is_some() { Value::Null } else { json!(p.text) }});
            if let Some((tid, name, args)) = &p.tool {
                msg["tool_calls"] = json!([{"id": tid, "type": "function", "function": {"name": name, "arguments": args}}]);
            }
            let mut ch = json!({"index": c, "message": msg,
                "logprobs": a.logprobs(&ids, 0),
                "finish_reason": finish_reason(p)});
            if a.want_ids {
                ch["token_ids"] = json!(ids);
            }
            ch
        })
        .collect();
    let mut out = json!({"id": a.id, "object": "chat.completion", "created": 1_700_000_000u64, "model": a.model,
        "system_fingerprint": a.inner.cfg.name, "choices": choices, "usage": a.usage});
    if a.want_ids {
        out["prompt_token_ids"] = json!(a.prompt);
    }
    out
}

/// The SSE frames of a streamed answer: per choice a role chunk then one chunk per segment,
/// an optional usage chunk, and `[DONE]`.
fn stream_frames(a: &Answer, include_usage: bool) -> Vec<Bytes> {
    let mut frames: Vec<Bytes> = Vec::new();
    for (c, p) in a.plans.iter().enumerate() {
        let mut first = a.chunk(
            json!([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
        );
        if a.want_ids && c == 0 {
            first["prompt_token_ids"] = json!(a.prompt);
        }
        if a.want_ids {
            first["choices"][0]["token_ids"] = json!([]);
        }
        frames.push(sse::data_frame(&first));
        choice_frames(a, c, p, &mut frames);
    }
    if include_usage {
        let mut u = a.chunk(json!([]));
        u["usage"] = a.usage.clone();
        frames.push(sse::data_frame(&u));
    }
    frames.push(sse::done_frame());
    frames
}

/// One chunk per segment of choice `c`; the last one carries the finish reason.
fn choice_frames(a: &Answer, c: usize, p: &Plan, frames: &mut Vec<Bytes>) {
    let mut pos = 0usize;
    let segs = segments(p);
    let nseg = segs.len();
    for (k, (piece, ids)) in segs.into_iter().enumerate() {
        let last = k + 1 == nseg;
        let delta = match (&p.tool, piece) {
            (_, None) => json!({}),
            (Some((tid, name, _)), Some(piece)) if k == 0 => {
                json!({"tool_calls": [{"index": 0, "id": tid, "type": "function",
                "function": {"name": name, "arguments": piece}}]})
            }
            (Some(_), Some(piece)) => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            }
            (None, Some(piece)) => json!({"content": piece}),
        };
        let mut ch = json!({"index": c, "delta": delta,
            "logprobs": a.logprobs(&ids, pos),
            "finish_reason": if last { json!(finish_reason(p)) } else { Value::Null }});
        if a.want_ids {
            ch["token_ids"] = json!(ids);
        }
        pos += ids.len();
        frames.push(sse::data_frame(&a.chunk(json!([ch]))));
    }
}

/// An SSE body sending `frames` with `delay` between them; when `die`, the connection breaks
/// after two frames.
fn sse_response(frames: Vec<Bytes>, die: bool, delay: Duration) -> Response {
    let frames: Vec<Result<Bytes, std::io::Error>> = if die {
        let mut f: Vec<_> = frames.into_iter().take(2).map(Ok).collect();
        f.push(Err(std::io::Error::other("stand-in died mid-stream")));
        f
    } else {
        frames.into_iter().map(Ok).collect()
    };
    let body = Body::from_stream(stream::unfold(
        (frames.into_iter(), true),
        move |(mut it, first)| async move {
            let next = it.next()?;
            if next.is_err() {
                // Let the frames before the failure reach the wire first.
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((next, (it, false)))
        },
    ));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
