//! `arbor gateway bench`: gateway overhead and durability under load, against the stand-in.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::standin::{self, StandinConfig};
use crate::{GatewayConfig, RunningGateway, start};

/// Options of [`bench`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Concurrent sessions in the load phase (each one streaming call at a time).
    pub sessions: usize,
    /// Calls per session in the load phase (a multi-turn conversation).
    pub calls: usize,
    /// Tokens per stand-in reply.
    pub reply_tokens: usize,
    /// Delay between stand-in stream chunks (keeps streams open, so they overlap).
    pub chunk_delay: Duration,
    /// Sequential gateway/direct call pairs measured for the overhead.
    pub latency_samples: usize,
    /// Store directory (default: a temporary directory, removed afterwards).
    pub store: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            sessions: 1000,
            calls: 10,
            reply_tokens: 16,
            chunk_delay: Duration::from_millis(100),
            latency_samples: 500,
            store: None,
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Overhead of the gateway over calling the stand-in directly.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    /// Gateway p50 minus direct p50; gateway p99 minus direct p99.
    pub p50: f64,
    /// See `p50`.
    pub p99: f64,
    /// Latency through the gateway.
    pub gateway: Percentiles,
    /// Latency direct to the stand-in.
    pub direct: Percentiles,
    /// Pairs measured.
    pub samples: usize,
    /// Calls in flight while measuring (1: the overhead of one call, not queueing).
    pub concurrency: usize,
}

/// Result of [`bench`] (printed as one JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Sessions in the load phase.
    pub sessions: usize,
    /// Calls per session.
    pub calls: usize,
    /// Latency overhead of the gateway (non-streaming calls, recorded durably).
    pub overhead_ms: Overhead,
    /// Streaming calls completed per second in the load phase (through the gateway).
    pub calls_per_s: f64,
    /// Load-phase calls answered completely (stream ended with `[DONE]`).
    pub answered: u64,
    /// Load-phase calls found in the store.
    pub recorded: u64,
    /// Calls answered but not recorded (must be 0).
    pub lost: u64,
    /// Load-phase calls that failed.
    pub errors: u64,
    /// Most streams open at once in the gateway.
    pub streams: i64,
    /// Latency of a streaming call under load, through the gateway.
    pub load_latency_ms: Percentiles,
    /// Duration of the load phase.
    pub load_seconds: f64,
    /// Latency of one durable append (write + fdatasync of a 2 KiB line) in the store's
    /// directory, measured before the phases: the floor of the overhead of a recorded call.
    pub fsync_ms: Percentiles,
    /// Tokens per reply.
    pub reply_tokens: usize,
    /// Stand-in delay between chunks.
    pub chunk_delay_ms: f64,
}

fn pct(v: &mut [f64]) -> Percentiles {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn timed_post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<f64, GatewayError> {
    let t = Instant::now();
    let r = client.post(url).json(body).send().await?;
    let status = r.status();
    let b = r.bytes().await?;
    if !status.is_success() {
        return Err(GatewayError::Config(format!(
            "bench call failed: {status}: {}",
            String::from_utf8_lossy(&b)
        )));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// Runs the benchmark: a stand-in and a gateway on loopback, in this process.
///
/// Phase 1 measures the gateway's overhead with sequential non-streaming calls, alternating
/// gateway and direct. Phase 2 runs `sessions` concurrent multi-turn sessions of `calls`
/// streaming calls each through the gateway, then checks every answered call is in the store.
pub async fn bench(opts: BenchOptions) -> Result<BenchReport, GatewayError> {
    let sa = standin::spawn(
        ([127, 0, 0, 1], 0).into(),
        StandinConfig {
            name: "bench".into(),
            reply_tokens: opts.reply_tokens.max(1),
            chunk_delay: opts.chunk_delay,
            ..Default::default()
        },
    )
    .await?;
    let tmp;
    let store = match &opts.store {
        Some(p) => p.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let fsync_ms = {
        let dir = store.clone();
        tokio::task::spawn_blocking(move || fsync_probe(&dir, 200))
            .await
            .map_err(|e| GatewayError::Config(format!("fsync probe: {e}")))??
    };
    let gw = start(GatewayConfig::new(
        ([127, 0, 0, 1], 0).into(),
        vec![sa.url()],
        store,
    ))
    .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.sessions.max(16) * 2)
        .tcp_nodelay(true)
        .build()?;
    let direct_url = format!("{}/chat/completions", sa.url());
    let overhead = measure_overhead(&client, &direct_url, &gw.url(), opts.latency_samples).await?;
    tracing::info!(?overhead, "overhead measured");
    let load = run_load(&client, &gw, opts.sessions, opts.calls).await;
    let mut lat = load.latency_ms;
    let report = BenchReport {
        sessions: opts.sessions,
        calls: opts.calls,
        overhead_ms: overhead,
        calls_per_s: round3(load.answered as f64 / load.seconds.max(1e-9)),
        answered: load.answered,
        recorded: load.recorded,
        lost: load.lost,
        errors: load.errors,
        streams: gw.metrics().active_streams.max(),
        load_latency_ms: {
            let p = pct(&mut lat);
            Percentiles {
                p50: round3(p.p50),
                p99: round3(p.p99),
            }
        },
        load_seconds: round3(load.seconds),
        fsync_ms,
        reply_tokens: opts.reply_tokens,
        chunk_delay_ms: opts.chunk_delay.as_secs_f64() * 1000.0,
    };
    gw.shutdown().await?;
    sa.shutdown().await;
    Ok(report)
}

/// Phase 1: `samples` sequential pairs of the same call direct and through the gateway
/// (alternating which goes first), after a warm-up.
async fn measure_overhead(
    client: &reqwest::Client,
    direct_url: &str,
    gw_base: &str,
    samples: usize,
) -> Result<Overhead, GatewayError> {
    let mut direct = Vec::new();
    let mut through = Vec::new();
    let warmup = 20;
    for i in 0..(samples + warmup) {
        let body = json!({"model": "bench", "messages": [{"role": "user", "content": format!("hello {i}")}]});
        let gw_url = format!("{gw_base}/s/lat-{i}/v1/chat/completions");
        let (d, g) = if i % 2 == 0 {
            let d = timed_post(client, direct_url, &body).await?;
            (d, timed_post(client, &gw_url, &body).await?)
        } else {
            let g = timed_post(client, &gw_url, &body).await?;
            (timed_post(client, direct_url, &body).await?, g)
        };
        if i >= warmup {
            direct.push(d);
            through.push(g);
        }
    }
    let d = pct(&mut direct);
    let g = pct(&mut through);
    Ok(Overhead {
        p50: round3(g.p50 - d.p50),
        p99: round3(g.p99 - d.p99),
        gateway: Percentiles {
            p50: round3(g.p50),
            p99: round3(g.p99),
        },
        direct: Percentiles {
            p50: round3(d.p50),
            p99: round3(d.p99),
        },
        samples: direct.len(),
        concurrency: 1,
    })
}

/// What the load phase measured.
struct Load {
    answered: u64,
    recorded: u64,
    lost: u64,
    errors: u64,
    latency_ms: Vec<f64>,
    seconds: f64,
}

/// Phase 2: `sessions` concurrent sessions released together, then the store is checked for
/// every answered call.
async fn run_load(
    client: &reqwest::Client,
    gw: &RunningGateway,
    sessions: usize,
    calls: usize,
) -> Load {
    let answered = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start_gate = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let mut tasks = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let url = format!("{}/s/load-{s}/v1/chat/completions", gw.url());
        tasks.push(tokio::spawn(load_session(
            client.clone(),
            url,
            s,
            calls,
            answered.clone(),
            errors.clone(),
            start_gate.clone(),
        )));
    }
    start_gate.wait().await;
    let t0 = Instant::now();
    let mut per_session = Vec::with_capacity(sessions);
    let mut latency_ms = Vec::new();
    for t in tasks {
        if let Ok((s, n, l)) = t.await {
            per_session.push((s, n));
            latency_ms.extend(l);
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut recorded = 0u64;
    let mut lost = 0u64;
    for (s, n) in &per_session {
        let r = gw.store().session_len(&format!("load-{s}")) as u64;
        recorded += r;
        lost += n.saturating_sub(r);
    }
    Load {
        answered: answered.load(Ordering::Relaxed),
        recorded,
        lost,
        errors: errors.load(Ordering::Relaxed),
        latency_ms,
        seconds,
    }
}

/// One load session: waits at the gate, then makes `calls` streaming calls of a growing
/// conversation. Returns (session, calls answered, latencies in ms).
async fn load_session(
    client: reqwest::Client,
    url: String,
    s: usize,
    calls: usize,
    answered: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    gate: Arc<tokio::sync::Barrier>,
) -> (usize, u64, Vec<f64>) {
    let mut lat = Vec::with_capacity(calls);
    let mut answered_here = 0u64;
    let mut messages = vec![json!({"role": "system", "content": "You are a bench."})];
    gate.wait().await;
    for c in 0..calls {
        messages.push(json!({"role": "user", "content": format!("session {s} call {c}")}));
        let body = json!({"model": "bench", "messages": messages, "stream": true});
        let t = Instant::now();
        match stream_call(&client, &url, &body).await {
            Ok(text) => {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                answered.fetch_add(1, Ordering::Relaxed);
                answered_here += 1;
                messages.push(json!({"role": "assistant", "content": text}));
            }
            Err(e) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "bench call failed");
                messages.pop();
            }
        }
    }
    (s, answered_here, lat)
}

fn fsync_probe(dir: &std::path::Path, n: usize) -> Result<Percentiles, GatewayError> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let line = [b'x'; 2048];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&line)?;
        f.sync_data()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    let p = pct(&mut v);
    Ok(Percentiles {
        p50: round3(p.p50),
        p99: round3(p.p99),
    })
}

/// Makes one streaming Chat Completions call; returns the text once `[DONE]` arrived.
pub async fn stream_call(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<String, GatewayError> {
    let r = client.post(url).json(body).send().await?;
    if !r.status().is_success() {
        return Err(GatewayError::Config(format!("status {}", r.status())));
    }
    let mut parser = crate::sse::SseParser::new();
    let mut text = String::new();
    let mut done = false;
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        for ev in parser.push(&chunk?) {
            if ev.data == "[DONE]" {
                done = true;
            } else if let Ok(v) = serde_json::from_str::<Value>(&ev.data)
                && let Some(t) = v
                    .get("choices")
                    .and_then(|c| c.get(0))
                    .and_then(|c| c.get("delta"))
                    .and_then(|d| d.get("content"))
                    .and_then(Value::as_str)
            {
                text.push_str(t);
            }
        }
    }
    if !done {
        return Err(GatewayError::Config("stream ended without [DONE]".into()));
    }
    Ok(text)
}
