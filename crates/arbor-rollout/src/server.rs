//! The env server (`arbor serve`): the orchestrator over HTTP, for external
//! trainers. A trainer submits a batch (tasks x scaffolds x samples against
//! its policy endpoint), streams results as they finish, and fetches each
//! rollout's trajectory (the gateway's recorded calls) or prefix tree.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/batches` | submit; the body is an experiment as JSON (no `output`) |
//! | `GET /v1/batches` | every batch with its state |
//! | `GET /v1/batches/{id}` | state, counts, and the summary once done |
//! | `GET /v1/batches/{id}/results?from=N` | results as NDJSON, streamed until the batch ends |
//! | `DELETE /v1/batches/{id}` | stop launching rollouts (those in flight finish) |
//! | `GET /v1/batches/{id}/rollouts/{session}/trajectory` | the session's recorded calls |
//! | `GET /v1/batches/{id}/rollouts/{session}/tree` | the session's trajectory tree |
//!
//! `GET /health` answers `ok` to anyone (for probes); every other route needs
//! `Authorization: Bearer <token>` when the server has a token ([`auth`]).
//! A batch may name host paths only inside the allowed directories ([`allow`]),
//! and variables of the server's environment only among the allowed ones ([`allow_env`]).
//!
//! See `docs/env-server.md` for request and response examples.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbor_gateway::CallRecord;
use arbor_sandbox::Backend;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::backend::BackendSpec;
use crate::experiment::Experiment;
use crate::record::{RolloutResult, Status};
use crate::runner::{RunOptions, load_tasks};
use crate::summary::Summary;

mod allow;
mod allow_env;
mod auth;

pub use allow::AllowedDirs;
pub use allow_env::AllowedEnv;
pub use auth::TOKEN_ENV;

/// Configuration of the env server.
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Where batch run directories go (`ROOT/<batch id>`).
    pub root: PathBuf,
    /// Sandbox backend object (tests); overrides `backend_spec`.
    pub backend: Option<Arc<dyn Backend>>,
    /// Where every batch's sandboxes live, as the operator configured it
    /// (`arbor serve --backend-file`); a batch cannot choose.
    pub backend_spec: BackendSpec,
    /// The bearer token every API route requires (`None`: no token, loopback only).
    pub token: Option<String>,
    /// Directories a batch may name host paths in.
    pub allowed: AllowedDirs,
    /// Variables of the server's environment a batch may name (sent to its endpoints).
    pub allowed_env: AllowedEnv,
}

impl ServerConfig {
    /// Listening on `listen`, batches under `root`, local sandboxes, no token, no host paths,
    /// no environment variables.
    pub fn new(listen: SocketAddr, root: PathBuf) -> Self {
        ServerConfig {
            listen,
            root,
            backend: None,
            backend_spec: BackendSpec::Local,
            token: None,
            allowed: AllowedDirs::default(),
            allowed_env: AllowedEnv::default(),
        }
    }
}

/// A running env server.
pub struct EnvServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl EnvServer {
    /// Wait until the server stops (it runs until the process ends).
    pub async fn wait(self) -> std::io::Result<()> {
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum BatchState {
    Running,
    Done,
    Failed,
}

struct Batch {
    id: String,
    name: String,
    dir: PathBuf,
    requested: usize,
    results: Mutex<Vec<RolloutResult>>,
    /// (results recorded, finished): wakes result streams.
    events: watch::Sender<(usize, bool)>,
    state: Mutex<(BatchState, Option<Summary>, Option<String>)>,
    stop: Arc<AtomicBool>,
}

impl Batch {
    fn status(&self) -> Value {
        let (state, summary, error) = self.state.lock().map(|s| s.clone()).unwrap_or((
            BatchState::Failed,
            None,
            Some("state lock poisoned".into()),
        ));
        let mut counts = BTreeMap::new();
        if let Ok(rs) = self.results.lock() {
            for r in rs.iter() {
                *counts.entry(status_name(r.status)).or_insert(0usize) += 1;
            }
        }
        let done: usize = counts.values().sum();
        json!({
            "id": self.id, "name": self.name, "state": state, "requested": self.requested,
            "done": done,
            "passed": counts.get("passed").copied().unwrap_or(0),
            "failed": counts.get("failed").copied().unwrap_or(0),
            "agent_failures": counts.get("agent_failure").copied().unwrap_or(0),
            "infra_errors": counts.get("infra_error").copied().unwrap_or(0),
            "run_dir": self.dir.display().to_string(),
            "summary": summary, "error": error,
        })
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Passed => "passed",
        Status::Failed => "failed",
        Status::AgentFailure => "agent_failure",
        Status::InfraError => "infra_error",
    }
}

struct AppState {
    config: ServerConfig,
    batches: Mutex<BTreeMap<String, Arc<Batch>>>,
    next_id: AtomicU64,
}

/// Start serving.
pub async fn start(config: ServerConfig) -> std::io::Result<EnvServer> {
    auth::check_listen(config.listen, config.token.as_deref())?;
    std::fs::create_dir_all(&config.root)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    // Batch ids continue after the ones already on disk, so a restarted
    // server never reuses a run directory.
    let first_id = std::fs::read_dir(&config.root)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("b")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .map_or(1, |m| m + 1);
    let state = Arc::new(AppState {
        config,
        batches: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(first_id),
    });
    let api = Router::new()
        .route("/v1/batches", post(submit).get(list))
        .route("/v1/batches/{id}", get(status).delete(cancel))
        .route("/v1/batches/{id}/results", get(results))
        .route(
            "/v1/batches/{id}/rollouts/{session}/trajectory",
            get(trajectory),
        )
        .route("/v1/batches/{id}/rollouts/{session}/tree", get(tree))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(api)
        .with_state(state);
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(EnvServer { addr, task })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"message": message.into()}}))).into_response()
}

// The error is the handler's HTTP answer, built at most once per request.
#[allow(clippy::result_large_err)]
fn batch(state: &AppState, id: &str) -> Result<Arc<Batch>, Response> {
    state
        .batches
        .lock()
        .ok()
        .and_then(|b| b.get(id).cloned())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no batch `{id}`")))
}

async fn submit(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let mut v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let id = format!("b{:06}", state.next_id.fetch_add(1, Ordering::SeqCst));
    let dir = state.config.root.join(&id);
    if v.get("output").is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "`output` is chosen by the server; leave it out",
        );
    }
    v["output"] = json!(dir);
    if v.get("name").is_none() {
        v["name"] = json!(id);
    }
    let mut exp: Experiment = match serde_json::from_value(v) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a valid batch: {e}")),
    };
    if let Err(m) = exp
        .validate()
        .and_then(|()| check_submitted(&state.config, &exp))
    {
        return error(StatusCode::BAD_REQUEST, m);
    }
    exp.backend = state.config.backend_spec.clone();
    let exp_for_load = exp.clone();
    let tasks = match tokio::task::spawn_blocking(move || load_tasks(&exp_for_load)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("loading tasks: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if let Err(m) = (state.config.allowed.check_tasks(&tasks))
        .and_then(|()| state.config.allowed_env.check_tasks(&tasks))
    {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let requested = tasks.len() * exp.scaffolds.len() * exp.samples as usize;
    let text = match toml::to_string(&exp) {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("serializing the experiment: {e}"),
            );
        }
    };
    let (events, _) = watch::channel((0usize, false));
    let b = Arc::new(Batch {
        id: id.clone(),
        name: exp.name.clone(),
        dir: dir.clone(),
        requested,
        results: Mutex::new(Vec::new()),
        events,
        state: Mutex::new((BatchState::Running, None, None)),
        stop: Arc::new(AtomicBool::new(false)),
    });
    if let Ok(mut all) = state.batches.lock() {
        all.insert(id.clone(), b.clone());
    }
    let backend = state.config.backend.clone();
    let runner_batch = b.clone();
    tokio::spawn(async move {
        let b = runner_batch;
        let sink = b.clone();
        let on_result = Arc::new(move |r: &RolloutResult| {
            let n = match sink.results.lock() {
                Ok(mut rs) => {
                    rs.push(r.clone());
                    rs.len()
                }
                Err(_) => return,
            };
            sink.events.send_replace((n, false));
        });
        let outcome = crate::runner::run(
            &exp,
            &text,
            RunOptions {
                on_result: Some(on_result),
                stop: Some(b.stop.clone()),
                backend,
                ..Default::default()
            },
        )
        .await;
        if let Ok(mut s) = b.state.lock() {
            *s = match outcome {
                Ok(summary) => (BatchState::Done, Some(summary), None),
                Err(e) => (BatchState::Failed, None, Some(e.to_string())),
            };
        }
        let n = b.results.lock().map(|r| r.len()).unwrap_or(0);
        b.events.send_replace((n, true));
    });
    (
        StatusCode::CREATED,
        Json(json!({
            "id": id, "requested": requested,
            "status_url": format!("/v1/batches/{id}"),
            "results_url": format!("/v1/batches/{id}/results"),
        })),
    )
        .into_response()
}

/// What a client may not ask for, though an experiment file may: a backend (it names host
/// files, such as the node token, whose contents would go to the nodes it lists), host paths
/// outside the allowed directories, and an upstream API key read from a variable of the
/// server's environment the operator did not allow.
fn check_submitted(config: &ServerConfig, exp: &Experiment) -> Result<(), String> {
    if exp.backend != BackendSpec::Local {
        return Err(
            "`backend` cannot be set by a submitted batch (it names host files, such as the \
             node token, that would be sent to the nodes it lists); the server's operator \
             chooses where sandboxes run"
                .into(),
        );
    }
    config.allowed_env.check_experiment(exp)?;
    config.allowed.check_experiment(exp)
}

async fn list(State(state): State<Arc<AppState>>) -> Response {
    let all: Vec<Arc<Batch>> = state
        .batches
        .lock()
        .map(|b| b.values().cloned().collect())
        .unwrap_or_default();
    Json(json!({"batches": all.iter().map(|b| b.status()).collect::<Vec<_>>()})).into_response()
}

async fn status(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    match batch(&state, &id) {
        Ok(b) => Json(b.status()).into_response(),
        Err(r) => r,
    }
}

async fn cancel(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    match batch(&state, &id) {
        Ok(b) => {
            b.stop.store(true, Ordering::Relaxed);
            Json(b.status()).into_response()
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ResultsQuery {
    #[serde(default)]
    from: usize,
}

/// NDJSON: every result from index `from`, then each new one as it is
/// recorded; the stream ends when the batch has finished.
async fn results(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ResultsQuery>,
) -> Response {
    let b = match batch(&state, &id) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let rx = b.events.subscribe();
    let stream = futures_util::stream::unfold(
        (b, rx, q.from, false),
        |(b, mut rx, next, finished)| async move {
            if finished {
                return None;
            }
            loop {
                let (n, done) = *rx.borrow_and_update();
                if next < n {
                    let lines: Vec<u8> = match b.results.lock() {
                        Ok(rs) => rs[next..n]
                            .iter()
                            .filter_map(|r| serde_json::to_vec(r).ok())
                            .flat_map(|mut l| {
                                l.push(b'\n');
                                l
                            })
                            .collect(),
                        Err(_) => return None,
                    };
                    return Some((Ok::<_, std::io::Error>(lines), (b, rx, n, false)));
                }
                if done {
                    return None;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A session's calls, read from the batch's gateway store (read-only; a
/// torn last line is skipped).
fn session_calls(dir: &Path, session: &str) -> std::io::Result<Vec<CallRecord>> {
    let path = dir
        .join(crate::store::GATEWAY)
        .join(arbor_gateway::store::LOG_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut calls: Vec<CallRecord> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<CallRecord>(l).ok())
        .filter(|c| c.session == session)
        .collect();
    calls.sort_by_key(|c| c.index);
    Ok(calls)
}

async fn load_session(
    state: &AppState,
    id: &str,
    session: &str,
) -> Result<Vec<CallRecord>, Response> {
    let b = batch(state, id)?;
    let dir = b.dir.clone();
    let s = session.to_string();
    let calls = tokio::task::spawn_blocking(move || session_calls(&dir, &s))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the store: {e}"),
            )
        })?;
    if calls.is_empty() {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no calls recorded for session `{session}` in batch `{id}`"),
        ));
    }
    Ok(calls)
}

async fn trajectory(
    State(state): State<Arc<AppState>>,
    UrlPath((id, session)): UrlPath<(String, String)>,
) -> Response {
    match load_session(&state, &id, &session).await {
        Ok(calls) => Json(json!({"session": session, "calls": calls})).into_response(),
        Err(r) => r,
    }
}

async fn tree(
    State(state): State<Arc<AppState>>,
    UrlPath((id, session)): UrlPath<(String, String)>,
) -> Response {
    match load_session(&state, &id, &session).await {
        Ok(calls) => Json(arbor_gateway::tree::session_tree(&session, &calls)).into_response(),
        Err(r) => r,
    }
}
