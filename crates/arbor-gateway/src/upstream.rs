//! Upstream OpenAI-compatible servers: routing with session affinity, load spreading,
//! retry before the first byte, timeouts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::chat::synth_chunks;
use crate::metrics::Metrics;
use crate::sse::SseParser;

/// How long a failed upstream is avoided for new requests.
const COOLDOWN: Duration = Duration::from_secs(5);

struct Upstream {
    base: String,
    inflight: Arc<AtomicUsize>,
    down_until_ms: AtomicU64,
    /// Sessions bound to this upstream.
    sessions: AtomicUsize,
}

/// A pool of upstreams.
pub struct UpstreamPool {
    ups: Vec<Upstream>,
    affinity: Mutex<HashMap<String, usize>>,
    client: reqwest::Client,
    rr: AtomicUsize,
    api_key: Option<String>,
    request_timeout: Duration,
    idle_timeout: Duration,
    epoch: Instant,
}

/// Why a request could not be served by any upstream.
#[derive(Debug)]
pub enum UpstreamFailure {
    /// The upstream refused the request itself (4xx): not retried.
    Client {
        /// HTTP status.
        status: u16,
        /// The upstream's error message.
        message: String,
    },
    /// Every upstream tried failed (connection, timeout, 5xx).
    Unavailable(String),
    /// The upstream timed out.
    Timeout(String),
}

/// An answer from an upstream, before any byte went to the caller.
pub enum Opened {
    /// A complete `chat.completion`.
    Full {
        /// Base URL of the upstream.
        upstream: String,
        /// The body.
        body: Value,
    },
    /// A stream whose first chunk(s) already arrived.
    Stream {
        /// Base URL of the upstream.
        upstream: String,
        /// The chunk stream (first chunks buffered).
        stream: ChunkStream,
    },
}

/// Decrements an upstream's in-flight count on drop.
struct InflightGuard {
    counter: Option<Arc<AtomicUsize>>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(c) = self.counter.take() {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A stream of `chat.completion.chunk` values from an upstream.
pub struct ChunkStream {
    body: Option<futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    parser: SseParser,
    pending: VecDeque<Value>,
    done: bool,
    idle: Duration,
    inflight: Option<Arc<AtomicUsize>>,
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        if let Some(c) = self.inflight.take() {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ChunkStream {
    fn from_chunks(chunks: Vec<Value>) -> Self {
        Self {
            body: None,
            parser: SseParser::new(),
            pending: chunks.into(),
            done: true,
            idle: Duration::from_secs(1),
            inflight: None,
        }
    }

    /// The next chunk; `Ok(None)` at the end of the stream (`[DONE]` or end of body).
    pub async fn next(&mut self) -> Result<Option<Value>, String> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Ok(Some(v));
            }
            if self.done {
                return Ok(None);
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            match tokio::time::timeout(self.idle, body.next()).await {
                Err(_) => {
                    return Err(format!(
                        "upstream stream idle for more than {:?}",
                        self.idle
                    ));
                }
                Ok(None) => {
                    self.done = true;
                    if let Some(ev) = self.parser.finish() {
                        self.take_event(&ev.data)?;
                    }
                    if !self.saw_done() {
                        // Ended without [DONE]: accept only if a finish_reason was seen.
                        return Err("upstream stream ended before [DONE]".into());
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("upstream stream failed: {e}")),
                Ok(Some(Ok(bytes))) => {
                    for ev in self.parser.push(&bytes) {
                        self.take_event(&ev.data)?;
                    }
                }
            }
        }
    }

    fn saw_done(&self) -> bool {
        self.body.is_none()
    }

    fn take_event(&mut self, data: &str) -> Result<(), String> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(());
        }
        if data == "[DONE]" {
            self.done = true;
            self.body = None;
            return Ok(());
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("bad upstream chunk: {e}"))?;
        if let Some(err) = v.get("error") {
            return Err(format!("upstream error in stream: {err}"));
        }
        self.pending.push_back(v);
        Ok(())
    }
}

/// Normalizes an upstream base URL so that it ends with `/v1` and no slash.
pub fn normalize_base(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/v1") {
        u.to_string()
    } else {
        format!("{u}/v1")
    }
}

impl UpstreamPool {
    /// A pool over `urls` (OpenAI-compatible base URLs).
    pub fn new(
        urls: &[String],
        api_key: Option<String>,
        request_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(4096)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            ups: urls
                .iter()
                .map(|u| Upstream {
                    base: normalize_base(u),
                    inflight: Arc::new(AtomicUsize::new(0)),
                    down_until_ms: AtomicU64::new(0),
                    sessions: AtomicUsize::new(0),
                })
                .collect(),
            affinity: Mutex::new(HashMap::new()),
            client,
            rr: AtomicUsize::new(0),
            api_key,
            request_timeout,
            idle_timeout,
            epoch: Instant::now(),
        })
    }

    /// Base URLs of the upstreams.
    pub fn bases(&self) -> Vec<String> {
        self.ups.iter().map(|u| u.base.clone()).collect()
    }

    /// The HTTP client (shared connection pool).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_up(&self, i: usize) -> bool {
        self.ups[i].down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    fn mark_down(&self, i: usize) {
        self.ups[i].down_until_ms.store(
            self.now_ms() + COOLDOWN.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// Order in which to try upstreams for a session: its affine upstream first (if up), then
    /// the others by load.
    fn order(&self, session: &str) -> Vec<usize> {
        let n = self.ups.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut others: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        others.sort_by_key(|&i| {
            (
                !self.is_up(i),
                self.ups[i].inflight.load(Ordering::Relaxed),
                self.ups[i].sessions.load(Ordering::Relaxed),
            )
        });
        let affine = self
            .affinity
            .lock()
            .ok()
            .and_then(|a| a.get(session).copied());
        if let Some(a) = affine
            && a < n
            && self.is_up(a)
        {
            others.retain(|&i| i != a);
            others.insert(0, a);
        }
        others
    }

    fn set_affinity(&self, session: &str, i: usize) {
        if let Ok(mut a) = self.affinity.lock()
            && a.get(session) != Some(&i)
        {
            if let Some(old) = a.insert(session.to_string(), i) {
                self.ups[old].sessions.fetch_sub(1, Ordering::Relaxed);
            }
            self.ups[i].sessions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Index of the upstream a session is bound to, if any.
    pub fn affinity_of(&self, session: &str) -> Option<usize> {
        self.affinity
            .lock()
            .ok()
            .and_then(|a| a.get(session).copied())
    }

    /// Sends a Chat Completions request, retrying on other upstreams until one answers
    /// (for a stream: until its first chunk arrived).
    pub async fn open(
        &self,
        session: &str,
        body: &Value,
        stream: bool,
        metrics: &Metrics,
    ) -> Result<Opened, UpstreamFailure> {
        if self.ups.is_empty() {
            return Err(UpstreamFailure::Unavailable(
                "no upstream configured".into(),
            ));
        }
        let mut last = String::new();
        let mut timed_out = false;
        for (attempt, i) in self.order(session).into_iter().enumerate() {
            if attempt > 0 {
                metrics.retries.inc();
            }
            let up = &self.ups[i];
            up.inflight.fetch_add(1, Ordering::Relaxed);
            let mut guard = InflightGuard {
                counter: Some(up.inflight.clone()),
            };
            match self.try_one(i, body, stream).await {
                Ok(opened) => {
                    self.set_affinity(session, i);
                    match opened {
                        Opened::Stream {
                            mut stream,
                            upstream,
                        } => {
                            // The stream keeps the in-flight count until it is dropped.
                            stream.inflight = guard.counter.take();
                            return Ok(Opened::Stream { upstream, stream });
                        }
                        full => return Ok(full),
                    }
                }
                Err(TryError::Client(status, message)) => {
                    return Err(UpstreamFailure::Client { status, message });
                }
                Err(TryError::Retry(msg, timeout)) => {
                    tracing::warn!(upstream = %up.base, error = %msg, "upstream failed; trying another");
                    metrics.upstream_errors.inc();
                    self.mark_down(i);
                    timed_out = timeout;
                    last = format!("{}: {msg}", up.base);
                }
            }
        }
        if timed_out {
            Err(UpstreamFailure::Timeout(last))
        } else {
            Err(UpstreamFailure::Unavailable(last))
        }
    }

    async fn try_one(&self, i: usize, body: &Value, stream: bool) -> Result<Opened, TryError> {
        let up = &self.ups[i];
        let url = format!("{}/chat/completions", up.base);
        let mut rb = self.client.post(&url).json(body);
        if let Some(k) = &self.api_key {
            rb = rb.bearer_auth(k);
        }
        let fut = rb.send();
        let resp = match tokio::time::timeout(self.request_timeout, fut).await {
            Err(_) => {
                return Err(TryError::Retry(
                    "timed out waiting for the upstream".into(),
                    true,
                ));
            }
            Ok(Err(e)) => {
                return Err(TryError::Retry(
                    format!("request failed: {e}"),
                    e.is_timeout(),
                ));
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let text = tokio::time::timeout(self.request_timeout, resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.get("error")
                        .and_then(|e| e.get("message").or(Some(e)))
                        .map(|m| {
                            m.as_str()
                                .map(String::from)
                                .unwrap_or_else(|| m.to_string())
                        })
                })
                .unwrap_or(text);
            if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                return Err(TryError::Retry(
                    format!("status {status}: {message}"),
                    false,
                ));
            }
            return Err(TryError::Client(status.as_u16(), message));
        }
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        if !stream || is_json {
            let bytes = match tokio::time::timeout(self.request_timeout, resp.bytes()).await {
                Err(_) => {
                    return Err(TryError::Retry(
                        "timed out reading the upstream body".into(),
                        true,
                    ));
                }
                Ok(Err(e)) => {
                    return Err(TryError::Retry(
                        format!("reading the body failed: {e}"),
                        false,
                    ));
                }
                Ok(Ok(b)) => b,
            };
            let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
                TryError::Retry(format!("the upstream answered invalid JSON: {e}"), false)
            })?;
            if body.get("choices").and_then(Value::as_array).is_none() {
                return Err(TryError::Retry(
                    "the upstream answer has no `choices`".into(),
                    false,
                ));
            }
            if stream {
                return Ok(Opened::Stream {
                    upstream: up.base.clone(),
                    stream: ChunkStream::from_chunks(synth_chunks(&body)),
                });
            }
            return Ok(Opened::Full {
                upstream: up.base.clone(),
                body,
            });
        }
        let mut cs = ChunkStream {
            body: Some(resp.bytes_stream().boxed()),
            parser: SseParser::new(),
            pending: VecDeque::new(),
            done: false,
            idle: self.idle_timeout,
            inflight: None,
        };
        // Wait for the first chunk so that a failure before it can still be retried.
        match cs.next().await {
            Ok(Some(first)) => {
                cs.pending.push_front(first);
                Ok(Opened::Stream {
                    upstream: up.base.clone(),
                    stream: cs,
                })
            }
            Ok(None) => Err(TryError::Retry(
                "the upstream stream was empty".into(),
                false,
            )),
            Err(e) => Err(TryError::Retry(e, false)),
        }
    }

    /// `GET /models` on the first upstream that answers.
    pub async fn models(&self) -> Option<Value> {
        for up in &self.ups {
            let mut rb = self.client.get(format!("{}/models", up.base));
            if let Some(k) = &self.api_key {
                rb = rb.bearer_auth(k);
            }
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), rb.send()).await
                && r.status().is_success()
                && let Ok(v) = r.json::<Value>().await
            {
                return Some(v);
            }
        }
        None
    }

    /// Current in-flight requests per upstream.
    pub fn inflight(&self) -> Vec<(String, usize)> {
        self.ups
            .iter()
            .map(|u| (u.base.clone(), u.inflight.load(Ordering::Relaxed)))
            .collect()
    }
}

enum TryError {
    Retry(String, bool),
    Client(u16, String),
}
