//! `arbor policy bench`: sampling throughput of the embedded policy under concurrent requests.
//!
//! RL rollouts keep many generations in flight, so what matters is total generated tokens per
//! second with N concurrent requests, not single-request latency. The benchmark serves a fresh
//! seeded model in this process, on loopback, and fires `requests` concurrent non-streaming chat
//! requests over real HTTP, once per `max_concurrency` value (1 = one generation at a time).

use std::time::Instant;

use arbor_model::{Qwen3Config, Qwen3Model};
use serde::Serialize;
use serde_json::json;

use crate::{EmbeddedPolicy, PolicyError, PolicyOptions, Result, tiny_byte_config};

/// Options of [`bench`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Concurrent requests fired per run.
    pub requests: usize,
    /// Bytes of the user message (the prompt is this plus the chat template).
    pub prompt_bytes: usize,
    /// `max_tokens` of every request.
    pub max_tokens: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// One run per value: the policy's `max_concurrency`.
    pub max_concurrency: Vec<usize>,
    /// Model configuration (default: [`tiny_byte_config`], what `--init tiny` makes).
    pub config: Qwen3Config,
    /// Initialisation seed of the model.
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            requests: 32,
            prompt_bytes: 500,
            max_tokens: 160,
            temperature: 1.0,
            max_concurrency: vec![1, PolicyOptions::default().max_concurrency],
            config: tiny_byte_config(),
            seed: 0,
        }
    }
}

/// Seconds statistics of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median request latency.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Slowest request.
    pub max: f64,
}

/// One run (one `max_concurrency`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    /// The policy's `max_concurrency`.
    pub max_concurrency: usize,
    /// Wall time from the first request sent to the last reply received.
    pub seconds: f64,
    /// Completion tokens of all replies.
    pub generated_tokens: usize,
    /// Completion tokens per second of wall time, summed over requests.
    pub tokens_per_s: f64,
    /// Requests completed per second.
    pub requests_per_s: f64,
    /// Per-request latency in seconds (queueing included).
    pub latency_s: Latency,
}

/// What [`bench`] prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Concurrent requests per run.
    pub requests: usize,
    /// Prompt length in tokens (bytes), template included.
    pub prompt_tokens: usize,
    /// `max_tokens` per request.
    pub max_tokens: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Model parameters.
    pub params: usize,
    /// Hidden size, layers, query heads, key/value heads.
    pub model: String,
    /// One entry per `max_concurrency`.
    pub runs: Vec<BenchRun>,
}

/// A deterministic, roughly English user message of `n` bytes.
fn prompt_text(n: usize, i: usize) -> String {
    let words = [
        "list",
        "the",
        "files",
        "then",
        "fix",
        "failing",
        "test",
        "in",
        "module",
        "parser",
        "and",
        "submit",
        "patch",
        "carefully",
    ];
    let mut s = format!("task {i}: ");
    let mut k = i;
    while s.len() < n {
        s.push_str(words[k % words.len()]);
        s.push(' ');
        k = k.wrapping_mul(31).wrapping_add(7);
    }
    s.truncate(n);
    s
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Runs the benchmark (see the module documentation).
pub async fn bench(opts: BenchOptions) -> Result<BenchReport> {
    let cfg = &opts.config;
    let model_desc = format!(
        "hidden {}, layers {}, heads {}/{}",
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    );
    let mut runs = Vec::new();
    let mut params = 0;
    let mut prompt_tokens = 0;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.requests.max(1))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| PolicyError::Internal(format!("http client: {e}")))?;
    for &mc in &opts.max_concurrency {
        let model = Qwen3Model::new(opts.config.clone(), opts.seed)?;
        params = model.num_params();
        let policy = EmbeddedPolicy::start(
            ([127, 0, 0, 1], 0).into(),
            model,
            PolicyOptions {
                max_concurrency: mc.max(1),
                max_tokens_cap: opts.max_tokens.max(1),
                ..PolicyOptions::default()
            },
        )
        .await?;
        let url = format!("{}/chat/completions", policy.base_url());
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(opts.requests);
        for i in 0..opts.requests {
            let body = json!({"model": "arbor-embedded",
                "messages": [{"role": "user", "content": prompt_text(opts.prompt_bytes, i)}],
                "temperature": opts.temperature, "max_tokens": opts.max_tokens, "seed": i});
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = client.post(&url).json(&body).send().await?;
                let status = r.status();
                let v: serde_json::Value = r.json().await?;
                Ok::<_, reqwest::Error>((status, v, t.elapsed().as_secs_f64()))
            }));
        }
        let mut lat = Vec::with_capacity(opts.requests);
        let mut generated = 0;
        for t in tasks {
            let (status, v, secs) = t
                .await
                .map_err(|e| PolicyError::Internal(format!("request task: {e}")))?
                .map_err(|e| PolicyError::Internal(format!("request: {e}")))?;
            if !status.is_success() {
                return Err(PolicyError::Internal(format!("status {status}: {v}")));
            }
            generated += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
            prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            lat.push(secs);
        }
        let seconds = start.elapsed().as_secs_f64();
        policy.shutdown().await?;
        lat.sort_by(f64::total_cmp);
        runs.push(BenchRun {
            max_concurrency: mc,
            seconds,
            generated_tokens: generated,
            tokens_per_s: generated as f64 / seconds,
            requests_per_s: opts.requests as f64 / seconds,
            latency_s: Latency {
                p50: percentile(&lat, 0.5),
                p90: percentile(&lat, 0.9),
                max: lat.last().copied().unwrap_or(0.0),
            },
        });
    }
    Ok(BenchReport {
        requests: opts.requests,
        prompt_tokens,
        max_tokens: opts.max_tokens,
        temperature: opts.temperature,
        params,
        model: model_desc,
        runs,
    })
}
