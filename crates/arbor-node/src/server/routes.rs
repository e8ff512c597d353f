//! The node's HTTP routes (table in [`crate::protocol`]) and the bearer
//! token check in front of them.

use std::sync::Arc;

use arbor_sandbox::{SandboxError, SandboxSpec};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as Shared};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use tracing::{info, warn};

use super::state::State;
use super::stream::{Reply, streamed};
use crate::protocol::{Created, ErrorBody, ErrorKind, Line, WireExec, exec_lines};

/// Largest request body (file and tar uploads).
const MAX_BODY: usize = 1 << 30;

type St = Shared<Arc<State>>;

/// A refusal or failure as an HTTP reply.
pub(crate) struct ApiError(ErrorBody);

impl From<ErrorBody> for ApiError {
    fn from(b: ErrorBody) -> Self {
        ApiError(b)
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        ApiError(ErrorBody::from_sandbox(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.kind {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Gone => StatusCode::NOT_FOUND,
            ErrorKind::File | ErrorKind::Spawn => StatusCode::CONFLICT,
            ErrorKind::Capacity | ErrorKind::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Setup | ErrorKind::Unsupported | ErrorKind::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, axum::Json(self.0)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Every route; all but `/health` behind the token.
pub(crate) fn router(state: Arc<State>) -> Router {
    let api = Router::new()
        .route("/v1/sandboxes", post(create))
        .route("/v1/sandboxes/{id}", axum::routing::delete(destroy))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/fork", post(fork))
        .route("/v1/sandboxes/{id}/file", put(write_file).get(read_file))
        .route("/v1/sandboxes/{id}/tar", put(write_tar).get(read_tar))
        .route("/v1/capacity", get(capacity))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn auth(Shared(st): St, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(msg) = crate::token::refusal(given, &st.token) {
        warn!(path = %req.uri().path(), "refused a request without the node's token");
        return ApiError(ErrorBody::new(ErrorKind::Unauthorized, msg)).into_response();
    }
    next.run(req).await
}

async fn health(Shared(st): St) -> Response {
    axum::Json(serde_json::json!({"ok": true, "draining": st.draining()})).into_response()
}

async fn capacity(Shared(st): St) -> Response {
    axum::Json(st.capacity()).into_response()
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(ErrorBody::new(
            ErrorKind::Invalid,
            format!("{what} is not valid: {e}"),
        ))
    })
}

async fn create(Shared(st): St, body: Bytes) -> ApiResult<Response> {
    let spec: SandboxSpec = parse(&body, "the sandbox spec")?;
    let slot = st.reserve(None)?;
    let every = st.heartbeat;
    Ok(streamed(every, async move {
        match st.backend.create(&spec).await {
            Ok(sb) => created(&st, slot.fill(sb)),
            Err(e) => Reply::lines(vec![Line::Error(ErrorBody::from_sandbox(&e))]),
        }
    }))
}

/// The reply for a new sandbox: destroyed again if the client never hears of it.
fn created(st: &Arc<State>, id: String) -> Reply {
    info!(sandbox = %id, live = st.live(), "created");
    let st = st.clone();
    let undelivered_id = id.clone();
    Reply {
        lines: vec![Line::Created(Created { id })],
        undelivered: Some(Box::pin(async move {
            warn!(sandbox = %undelivered_id, "the client left before hearing of its sandbox; destroying it");
            destroy_now(&st, &undelivered_id).await;
        })),
    }
}

async fn fork(Shared(st): St, Path(id): Path<String>) -> ApiResult<Response> {
    let busy = st.checkout(&id)?;
    let slot = st.reserve(Some(&id))?;
    let every = st.heartbeat;
    Ok(streamed(every, async move {
        match busy.sb.fork().await {
            Ok(child) => created(&st, slot.fill(child)),
            Err(e) => Reply::lines(vec![Line::Error(ErrorBody::from_sandbox(&e))]),
        }
    }))
}

async fn exec(Shared(st): St, Path(id): Path<String>, body: Bytes) -> ApiResult<Response> {
    let wire: WireExec = parse(&body, "the command")?;
    let req = wire.into_request()?;
    let busy = st.checkout(&id)?;
    Ok(streamed(st.heartbeat, async move {
        match busy.sb.exec(req).await {
            Ok(r) => Reply::lines(exec_lines(&r)),
            Err(e) => Reply::lines(vec![Line::Error(ErrorBody::from_sandbox(&e))]),
        }
    }))
}

async fn destroy_now(st: &State, id: &str) {
    if let Some(sb) = st.remove(id)
        && let Err(e) = sb.destroy().await
    {
        warn!(sandbox = %id, "destroying: {e}");
    }
}

async fn destroy(Shared(st): St, Path(id): Path<String>) -> StatusCode {
    // Idempotent, like `Sandbox::destroy`: an unknown id is already gone.
    destroy_now(&st, &id).await;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct FileQuery {
    path: String,
    #[serde(default = "default_mode")]
    mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

async fn write_file(
    Shared(st): St,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let busy = st.checkout(&id)?;
    busy.sb.write_file(&q.path, &body, q.mode).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn read_file(
    Shared(st): St,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Vec<u8>> {
    let busy = st.checkout(&id)?;
    Ok(busy.sb.read_file(&q.path).await?)
}

async fn write_tar(
    Shared(st): St,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let busy = st.checkout(&id)?;
    busy.sb.write_tar(&q.path, body.to_vec()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn read_tar(
    Shared(st): St,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Vec<u8>> {
    let busy = st.checkout(&id)?;
    Ok(busy.sb.read_tar(&q.path).await?)
}
