//! The HTTP server: routes, session addressing, the call engine and stream driving.
//!
//! Every 4xx/5xx answer has a JSON body in the error shape of the API the caller speaks
//! (Anthropic's on `/messages` paths or with an `anthropic-version` header, OpenAI's
//! otherwise): the call engine builds [`ApiError`]s, and [`json_errors`] rewrites anything
//! else (axum's own rejections, such as a body over the size limit).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::caps::{CapHit, CapTracker};
use crate::chat::{self, Accumulator, NormOptions};
use crate::error::{Api, ApiError, ApiErrorKind};
use crate::metrics::Metrics;
use crate::recorder::{CallInput, Recorder, now_ms};
use crate::sink::{ChatSink, StreamSink};
use crate::upstream::{Opened, UpstreamFailure, UpstreamPool};
use crate::{anthropic, responses, tree};

/// Shared state of a running gateway.
pub struct AppState {
    /// Upstreams.
    pub pool: UpstreamPool,
    /// Recorder (and store).
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Request shaping options.
    pub norm: NormOptions,
    /// Models listed by `GET /v1/models` when no upstream answers.
    pub models: Vec<String>,
    /// Per-session caps and counts.
    pub caps: Arc<CapTracker>,
    /// Largest accepted request body, bytes.
    pub max_body: usize,
}

type St = State<Arc<AppState>>;

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.max_body;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|s: St, h: HeaderMap, b: Bytes| call(s, Api::Chat, None, h, b)),
        )
        .route(
            "/v1/messages",
            post(|s: St, h: HeaderMap, b: Bytes| call(s, Api::Messages, None, h, b)),
        )
        .route(
            "/v1/responses",
            post(|s: St, h: HeaderMap, b: Bytes| call(s, Api::Responses, None, h, b)),
        )
        .route(
            "/s/{session}/v1/chat/completions",
            post(|s: St, Path(p): Path<String>, h: HeaderMap, b: Bytes| {
                call(s, Api::Chat, Some(p), h, b)
            }),
        )
        .route(
            "/s/{session}/v1/messages",
            post(|s: St, Path(p): Path<String>, h: HeaderMap, b: Bytes| {
                call(s, Api::Messages, Some(p), h, b)
            }),
        )
        .route(
            "/s/{session}/v1/responses",
            post(|s: St, Path(p): Path<String>, h: HeaderMap, b: Bytes| {
                call(s, Api::Responses, Some(p), h, b)
            }),
        )
        .route(
            "/v1/messages/count_tokens",
            post(|s: St, b: Bytes| count_tokens(s, b)),
        )
        .route(
            "/s/{session}/v1/messages/count_tokens",
            post(|s: St, b: Bytes| count_tokens(s, b)),
        )
        .route("/v1/models", get(models))
        .route("/s/{session}/v1/models", get(models))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", get(get_session))
        .route("/sessions/{id}/tree", get(get_tree))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Largest accepted request body by default (long agent contexts with images exceed axum's
/// 2 MB default).
pub const DEFAULT_MAX_BODY: usize = 256 << 20;

/// The API whose error shape a request gets: Anthropic's on `/messages` paths or with an
/// `anthropic-version` header, OpenAI Responses' on `/responses` paths, else OpenAI Chat's.
fn api_of(path: &str, headers: &HeaderMap) -> Api {
    if path.contains("/messages") || headers.contains_key("anthropic-version") {
        Api::Messages
    } else if path.contains("/responses") {
        Api::Responses
    } else {
        Api::Chat
    }
}

/// Gives every 4xx/5xx answer that is not JSON yet a JSON body in the caller's error shape,
/// keeping the original text (e.g. axum's "length limit exceeded") as the message.
async fn json_errors(req: Request, next: Next) -> Response {
    let api = api_of(req.uri().path(), req.headers());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::from_status(api, status, message).into_response()
}

/// Longest accepted session id.
const MAX_SESSION_LEN: usize = 256;

fn session_from(path: Option<String>, headers: &HeaderMap) -> String {
    let from_key = || {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        key.or(bearer).filter(|k| !k.is_empty()).map(String::from)
    };
    let s = path.or_else(from_key).unwrap_or_else(|| "default".into());
    s.chars().take(MAX_SESSION_LEN).collect()
}

fn api_index(api: Api) -> usize {
    match api {
        Api::Chat => 0,
        Api::Messages => 1,
        Api::Responses => 2,
    }
}

fn upstream_error(api: Api, f: UpstreamFailure) -> ApiError {
    match f {
        UpstreamFailure::Client { status, message } => ApiError::new(
            api,
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            ApiErrorKind::InvalidRequest,
            format!("upstream refused the request: {message}"),
        ),
        UpstreamFailure::Unavailable(m) => ApiError::new(
            api,
            StatusCode::BAD_GATEWAY,
            ApiErrorKind::Upstream,
            format!("no upstream could serve the request: {m}"),
        ),
        UpstreamFailure::Timeout(m) => ApiError::new(
            api,
            StatusCode::GATEWAY_TIMEOUT,
            ApiErrorKind::Upstream,
            format!("upstream timed out: {m}"),
        ),
    }
}

/// Response header of non-streaming calls: milliseconds spent waiting for
/// the upstream's complete answer.
pub const UPSTREAM_MS_HEADER: &str = "x-arbor-upstream-ms";

async fn call(
    State(state): St,
    api: Api,
    path_session: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let t0 = Instant::now();
    let idx = api_index(api);
    state.metrics.requests[idx].inc();
    let session = session_from(path_session, &headers);
    let res = run_call(&state, api, session, body, t0).await;
    match res {
        Ok(r) => r,
        Err(e) => {
            state.metrics.errors[idx].inc();
            if e.status.is_server_error() {
                tracing::warn!(api = api.as_str(), status = %e.status, error = %e.message, "call failed");
            }
            e.into_response()
        }
    }
}

/// One call: admit the request, translate it to Chat Completions, open the upstream, then
/// answer at once (recorded first) or relay a stream (recorded when it ends).
async fn run_call(
    state: &Arc<AppState>,
    api: Api,
    session: String,
    body: Bytes,
    t0: Instant,
) -> Result<Response, ApiError> {
    let started_ms = now_ms();
    let request = admit(api, &body)?;
    let (upstream_request, info) = upstream_request(state, api, &request)?;
    state
        .caps
        .admit(&session)
        .map_err(|hit| cap_error(api, hit))?;
    let t_upstream = Instant::now();
    let opened = state
        .pool
        .open(&session, &upstream_request, info.stream, &state.metrics)
        .await
        .map_err(|f| upstream_error(api, f))?;
    let input = CallInput {
        session,
        api,
        stream: info.stream,
        started_ms,
        upstream: String::new(),
        request,
        upstream_request,
        full: Value::Null,
        response: Value::Null,
    };
    if info.stream {
        start_stream(state, input, opened, &info, t0)
    } else {
        answer_full(state, input, opened, &info, t_upstream, t0).await
    }
}

/// The answer to a call past a session cap (429; see [`crate::caps`]).
fn cap_error(api: Api, hit: CapHit) -> ApiError {
    ApiError::new(
        api,
        StatusCode::TOO_MANY_REQUESTS,
        ApiErrorKind::RateLimited,
        format!("{hit}; this session can make no more model calls"),
    )
    .with_code(hit.cap.code())
}

/// Parses the body; it must be a JSON object.
fn admit(api: Api, body: &[u8]) -> Result<Value, ApiError> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(api, format!("the request body is not valid JSON: {e}")))?;
    if !request.is_object() {
        return Err(ApiError::invalid(
            api,
            "the request body must be a JSON object",
        ));
    }
    Ok(request)
}

/// The Chat Completions request sent upstream (translated from the caller's dialect and
/// normalized), and what the caller asked for.
fn upstream_request(
    state: &AppState,
    api: Api,
    request: &Value,
) -> Result<(Value, chat::NormInfo), ApiError> {
    let mut upstream_request = match api {
        Api::Chat => request.clone(),
        Api::Messages => {
            anthropic::to_chat(request, &state.norm).map_err(|e| ApiError::invalid(api, e))?
        }
        Api::Responses => {
            responses::to_chat(request, &state.norm).map_err(|e| ApiError::invalid(api, e))?
        }
    };
    let info = match upstream_request.as_object_mut() {
        Some(o) => chat::normalize(o, &state.norm).map_err(|e| ApiError::invalid(api, e))?,
        None => {
            return Err(ApiError::invalid(
                api,
                "the request body must be a JSON object",
            ));
        }
    };
    Ok((upstream_request, info))
}

/// Non-streaming call: collect the upstream answer, shape it for the caller, record it, and
/// answer with the upstream's time in [`UPSTREAM_MS_HEADER`].
async fn answer_full(
    state: &Arc<AppState>,
    mut input: CallInput,
    opened: Opened,
    info: &chat::NormInfo,
    t_upstream: Instant,
    t0: Instant,
) -> Result<Response, ApiError> {
    let api = input.api;
    let full = collect_full(api, opened, &mut input).await?;
    let upstream_ms = t_upstream.elapsed().as_secs_f64() * 1e3;
    let caller = match api {
        Api::Chat => {
            let mut r = full.clone();
            chat::strip_for_caller(&mut r, info.wants_logprobs);
            r
        }
        Api::Messages => anthropic::from_chat(&full, &input.request),
        Api::Responses => responses::from_chat(&full, &input.request),
    };
    input.response = caller.clone();
    if api == Api::Chat {
        chat::strip_for_caller(&mut input.response, false);
    }
    input.full = full;
    let session = input.session.clone();
    let record = state
        .recorder
        .record(input, &state.metrics)
        .await
        .map_err(|e| {
            ApiError::new(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                ApiErrorKind::Internal,
                format!("recording the call failed: {e}"),
            )
        })?;
    let (p, c) = record.token_counts();
    state.caps.add_tokens(&session, p + c);
    state.metrics.request_seconds[api_index(api)].observe(t0.elapsed());
    let mut resp = axum::Json(caller).into_response();
    // How long the upstream (the policy) took, so callers can tell the
    // policy's time from the gateway's own (parsing, recording, fsync).
    if let Ok(v) = HeaderValue::from_str(&format!("{upstream_ms:.3}")) {
        resp.headers_mut().insert(UPSTREAM_MS_HEADER, v);
    }
    Ok(resp)
}

/// The complete upstream answer: as sent, or accumulated from a stream the upstream sent
/// anyway. Notes which upstream answered in `input`.
async fn collect_full(api: Api, opened: Opened, input: &mut CallInput) -> Result<Value, ApiError> {
    match opened {
        Opened::Full { upstream, body } => {
            input.upstream = upstream;
            Ok(body)
        }
        Opened::Stream {
            upstream,
            mut stream,
        } => {
            input.upstream = upstream;
            let mut acc = Accumulator::new();
            loop {
                match stream.next().await {
                    Ok(Some(c)) => acc.push(&c),
                    Ok(None) => break,
                    Err(e) => {
                        return Err(ApiError::new(
                            api,
                            StatusCode::BAD_GATEWAY,
                            ApiErrorKind::Upstream,
                            e,
                        ));
                    }
                }
            }
            Ok(acc.finish())
        }
    }
}

/// Streaming call: relays the upstream stream through the caller's dialect from a task
/// ([`drive_stream`], which records the call at the end) and answers with an SSE body.
fn start_stream(
    state: &Arc<AppState>,
    mut input: CallInput,
    opened: Opened,
    info: &chat::NormInfo,
    t0: Instant,
) -> Result<Response, ApiError> {
    let api = input.api;
    let sink: Box<dyn StreamSink> = match api {
        Api::Chat => Box::new(ChatSink {
            wants_logprobs: info.wants_logprobs,
            wants_usage_chunk: info.wants_usage_chunk,
        }),
        Api::Messages => Box::new(anthropic::MessagesSink::new(input.request.clone())),
        Api::Responses => Box::new(responses::ResponsesSink::new(input.request.clone())),
    };
    let (upstream, chunks) = match opened {
        Opened::Stream { upstream, stream } => (upstream, stream),
        Opened::Full { .. } => {
            return Err(ApiError::new(
                api,
                StatusCode::BAD_GATEWAY,
                ApiErrorKind::Upstream,
                "unexpected upstream answer",
            ));
        }
    };
    input.upstream = upstream;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let st = state.clone();
    state.metrics.active_streams.inc();
    tokio::spawn(drive_stream(st, input, sink, chunks, tx, t0));
    let body = Body::from_stream(stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    }));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.dec();
    }
}

async fn drive_stream(
    state: Arc<AppState>,
    mut input: CallInput,
    mut sink: Box<dyn StreamSink>,
    mut chunks: crate::upstream::ChunkStream,
    tx: mpsc::Sender<Bytes>,
    t0: Instant,
) {
    let _guard = StreamGuard(state.metrics.clone());
    let mut acc = Accumulator::new();
    macro_rules! send_all {
        ($frames:expr) => {
            for f in $frames {
                if tx.send(f).await.is_err() {
                    state.metrics.client_disconnects.inc();
                    return;
                }
            }
        };
    }
    loop {
        match chunks.next().await {
            Ok(Some(c)) => {
                acc.push(&c);
                send_all!(sink.chunk(&c));
            }
            Ok(None) => break,
            Err(e) => {
                state.metrics.stream_errors.inc();
                state.metrics.errors[api_index(input.api)].inc();
                tracing::warn!(session = %input.session, error = %e, "upstream stream failed after the first byte");
                send_all!(sink.error(&e));
                return;
            }
        }
    }
    drop(chunks);
    let full = acc.finish();
    send_all!(sink.finish(&full));
    input.response = sink.response(&full);
    input.full = full;
    let full_for_terminal = input.full.clone();
    let api = input.api;
    let session = input.session.clone();
    match state.recorder.record(input, &state.metrics).await {
        Ok(record) => {
            let (p, c) = record.token_counts();
            state.caps.add_tokens(&session, p + c);
            send_all!(sink.terminal(&full_for_terminal));
            state.metrics.request_seconds[api_index(api)].observe(t0.elapsed());
        }
        Err(e) => {
            state.metrics.errors[api_index(api)].inc();
            tracing::error!(error = %e, "recording a streamed call failed");
            send_all!(sink.error(&format!("recording the call failed: {e}")));
        }
    }
}

async fn count_tokens(State(state): St, body: Bytes) -> Response {
    let api = Api::Messages;
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return ApiError::invalid(api, format!("invalid JSON: {e}")).into_response(),
    };
    let chat_req = match anthropic::to_chat(&req, &state.norm) {
        Ok(v) => v,
        Err(e) => return ApiError::invalid(api, e).into_response(),
    };
    let messages = chat_req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tools = chat_req.get("tools").and_then(Value::as_array).cloned();
    let n = match state.recorder.tokenizer() {
        Some(t) => t
            .apply_chat_template(&messages, tools.as_deref(), true)
            .map(|ids| ids.len())
            .ok(),
        None => None,
    };
    // Without a tokenizer: a rough estimate (4 bytes per token).
    let n = n.unwrap_or_else(|| chat_req.to_string().len().div_ceil(4));
    axum::Json(json!({"input_tokens": n})).into_response()
}

async fn models(State(state): St, headers: HeaderMap) -> Response {
    let anthropic = headers.contains_key("anthropic-version");
    let ids: Vec<String> = match state.pool.models().await {
        Some(v) => v
            .get("data")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        None => state.models.clone(),
    };
    let body = if anthropic {
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": ids.first(), "last_id": ids.last()})
    } else {
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "arbor"}))
            .collect();
        json!({"object": "list", "data": data})
    };
    axum::Json(body).into_response()
}

async fn list_sessions(State(state): St) -> Response {
    let list: Vec<Value> = state
        .recorder
        .store()
        .sessions()
        .into_iter()
        .map(|(id, calls)| json!({"id": id, "calls": calls}))
        .collect();
    axum::Json(json!({"sessions": list})).into_response()
}

/// Every unknown path gets a JSON error a client can show. The common
/// misconfiguration, a base URL that already ends in `/v1` given to a client
/// that appends `/v1/...` itself (Anthropic-style SDKs), is named.
async fn unknown_path(uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    let mut message = format!("no such endpoint: {path}");
    if path.contains("/v1/v1/") {
        message.push_str(
            " (the path has /v1 twice: this client appends /v1 itself, so give it the \
             base URL without the trailing /v1)",
        );
    }
    let api = api_of(path, &headers);
    ApiError::new(api, StatusCode::NOT_FOUND, ApiErrorKind::NotFound, message).into_response()
}

/// A known path called with the wrong method, answered in JSON too.
async fn wrong_method(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let message = format!("{method} is not allowed on {}", uri.path());
    let api = api_of(uri.path(), &headers);
    ApiError::from_status(api, StatusCode::METHOD_NOT_ALLOWED, message).into_response()
}

fn not_found(id: &str) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"message": format!("unknown session `{id}`"), "type": "not_found_error"}})))
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({"error": {"message": e.to_string(), "type": "server_error"}})),
    )
        .into_response()
}

async fn read_session(
    state: &Arc<AppState>,
    id: String,
) -> Result<Option<Vec<crate::record::CallRecord>>, Response> {
    let store = state.recorder.store().clone();
    match tokio::task::spawn_blocking(move || store.session(&id)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
}

async fn get_session(State(state): St, Path(id): Path<String>) -> Response {
    match read_session(&state, id.clone()).await {
        Ok(Some(calls)) => axum::Json(json!({"session": id, "calls": calls})).into_response(),
        Ok(None) => not_found(&id),
        Err(r) => r,
    }
}

async fn get_tree(State(state): St, Path(id): Path<String>) -> Response {
    match read_session(&state, id.clone()).await {
        Ok(Some(calls)) => axum::Json(tree::session_tree(&id, &calls)).into_response(),
        Ok(None) => not_found(&id),
        Err(r) => r,
    }
}

async fn metrics(State(state): St) -> Response {
    let text = state
        .metrics
        .render(&state.pool.inflight(), state.recorder.store().len());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
