//! The embedded policy behind the real gateway: recorded token ids are the byte rendering,
//! recorded logprobs are the model's, streams work, weights swap without restarting anything.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use arbor_gateway::{CallRecord, GatewayConfig, RunningGateway};
use arbor_model::{ForwardOptions, Qwen3Config, Qwen3Model, TreeBatch};
use arbor_policy::{EmbeddedPolicy, PolicyOptions, VERSION_HEADER};
use arbor_trace::byte_chat;
use serde_json::{Value, json};

fn tiny(seed: u64) -> Result<Qwen3Model> {
    Ok(Qwen3Model::new(Qwen3Config::tiny(256, 32, 2, 2, 1), seed)?)
}

struct Env {
    policy: EmbeddedPolicy,
    gw: RunningGateway,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn new(model: Qwen3Model, opts: PolicyOptions) -> Result<Env> {
        let policy = EmbeddedPolicy::start(([127, 0, 0, 1], 0).into(), model, opts).await?;
        let dir = tempfile::tempdir()?;
        let cfg = GatewayConfig::new(
            ([127, 0, 0, 1], 0).into(),
            vec![policy.base_url()],
            dir.path().join("store"),
        );
        let gw = arbor_gateway::start(cfg).await?;
        Ok(Env {
            policy,
            gw,
            client: reqwest::Client::new(),
            _dir: dir,
        })
    }

    async fn chat(
        &self,
        session: &str,
        body: &Value,
    ) -> Result<(Value, reqwest::header::HeaderMap)> {
        // Headers are the gateway's; the policy's version header is checked directly.
        let r = self
            .client
            .post(format!("{}/s/{session}/v1/chat/completions", self.gw.url()))
            .json(body)
            .send()
            .await?;
        ensure!(r.status().is_success(), "status {}", r.status());
        let headers = r.headers().clone();
        Ok((r.json().await?, headers))
    }

    /// A streamed call; returns the content and tool calls assembled from the deltas.
    async fn chat_stream(
        &self,
        session: &str,
        body: &Value,
    ) -> Result<(String, Vec<Value>, String)> {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let r = self
            .client
            .post(format!("{}/s/{session}/v1/chat/completions", self.gw.url()))
            .json(&body)
            .send()
            .await?;
        ensure!(r.status().is_success(), "status {}", r.status());
        let text = r.text().await?;
        ensure!(
            text.trim_end().ends_with("data: [DONE]"),
            "stream not finished: {text}"
        );
        let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), String::new());
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(line)?;
            for c in v["choices"].as_array().into_iter().flatten() {
                if let Some(t) = c["delta"]["content"].as_str() {
                    content.push_str(t);
                }
                if let Some(tc) = c["delta"]["tool_calls"].as_array() {
                    calls.extend(tc.iter().cloned());
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
        Ok((content, calls, finish))
    }

    fn calls(&self, session: &str) -> Result<Vec<CallRecord>> {
        self.gw
            .store()
            .session(session)?
            .context("session not recorded")
    }

    async fn stop(self) -> Result<()> {
        self.gw.shutdown().await?;
        self.policy.shutdown().await?;
        Ok(())
    }
}

fn messages() -> Value {
    json!([
        {"role": "system", "content": "You are a careful engineer."},
        {"role": "user", "content": "List the files, then submit."}
    ])
}

/// Log-probability of each completion token given everything before it, from one forward
/// pass of the whole sequence (no KV cache, tree attention path).
fn recompute(model: &Qwen3Model, prompt: &[u32], completion: &[u32]) -> Result<Vec<f32>> {
    let seq: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let logits = model
        .logits(&TreeBatch::forest(&[&seq]))?
        .to_vec2::<f32>()?;
    Ok(completion
        .iter()
        .enumerate()
        .map(|(i, &tok)| {
            let row = &logits[prompt.len() - 1 + i];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            row[tok as usize] - lse
        })
        .collect())
}

#[tokio::test]
async fn recorded_tokens_are_the_byte_rendering_and_the_models_logprobs() -> Result<()> {
    let env = Env::new(tiny(1)?, PolicyOptions::default()).await?;
    let body = json!({"model": "arbor-embedded", "messages": messages(),
                      "temperature": 1.0, "seed": 7, "max_tokens": 24});
    let (resp, _) = env.chat("a", &body).await?;
    let choice = &resp["choices"][0];
    ensure!(choice["message"]["content"].is_string(), "{resp}");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(resp["system_fingerprint"], "weights-v1");
    assert_eq!(resp["usage"]["completion_tokens"], 24);

    let calls = env.calls("a")?;
    assert_eq!(calls.len(), 1);
    let t = &calls[0].tokens;
    let msgs = messages();
    let expected = byte_chat::render_prompt(msgs.as_array().context("array")?);
    assert_eq!(t.prompt, expected);
    assert!(
        String::from_utf8_lossy(&byte_chat::decode_bytes(&t.prompt)).ends_with("<|assistant|>\n")
    );
    let comp = &t.completions[0];
    assert_eq!(comp.ids.len(), 24);
    assert!(comp.ids.iter().all(|&i| i < 256));
    let lps = comp.logprobs.clone().context("no logprobs recorded")?;
    let model = env.policy.model()?;
    let again = recompute(&model, &t.prompt, &comp.ids)?;
    for (i, (a, b)) in lps.iter().zip(&again).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "token {i}: served {a}, recomputed {b}"
        );
    }
    // The returned text is the completion's bytes.
    assert_eq!(
        comp.text,
        String::from_utf8_lossy(&byte_chat::decode_bytes(&comp.ids))
    );

    // The same request streamed: same tokens (same seed), content assembled from deltas.
    let (content, calls_streamed, finish) = env.chat_stream("b", &body).await?;
    assert!(calls_streamed.is_empty());
    assert_eq!(finish, "length");
    let rec = &env.calls("b")?[0];
    assert!(rec.stream);
    assert_eq!(rec.tokens.prompt, expected);
    assert_eq!(rec.tokens.completions[0].ids, comp.ids);
    assert_eq!(rec.tokens.completions[0].logprobs.as_ref(), Some(&lps));
    assert_eq!(
        content,
        resp["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("?")
    );
    env.stop().await
}

/// RL at a sampling temperature below 1 trains against the recorded logprobs: they must be
/// what the trainer's forward gives with the same temperature (`logits / T`), or every
/// importance ratio is off by the difference between the two distributions.
#[tokio::test]
async fn tempered_logprobs_are_the_trainers_at_the_same_temperature() -> Result<()> {
    let env = Env::new(tiny(3)?, PolicyOptions::default()).await?;
    let body = json!({"messages": messages(), "temperature": 0.5, "seed": 11, "max_tokens": 24});
    env.chat("t", &body).await?;
    let rec = &env.calls("t")?[0].tokens;
    let comp = &rec.completions[0];
    let served = comp.logprobs.clone().context("no logprobs recorded")?;
    let seq: Vec<u32> = rec.prompt.iter().chain(&comp.ids).copied().collect();
    let batch = TreeBatch::forest(&[&seq]);
    let model = env.policy.model()?;
    let trainer = |temperature: f32| -> Result<Vec<f32>> {
        let opts = ForwardOptions {
            temperature,
            ..ForwardOptions::default()
        };
        let lp = model.token_logprobs(&batch, &opts)?.0.to_vec1::<f32>()?;
        Ok(lp[rec.prompt.len()..].to_vec())
    };
    let tempered = trainer(0.5)?;
    for (i, (a, b)) in served.iter().zip(&tempered).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "token {i}: served {a}, trainer at T=0.5 {b}"
        );
    }
    let untempered = trainer(1.0)?;
    let gap: f32 = served
        .iter()
        .zip(&untempered)
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(
        gap > 1e-2,
        "T=1 logprobs should differ from the tempered ones"
    );
    // Greedy decoding has no distribution to train on.
    let opts = ForwardOptions {
        temperature: 0.0,
        ..ForwardOptions::default()
    };
    assert!(model.token_logprobs(&batch, &opts).is_err());
    env.stop().await
}

#[tokio::test]
async fn greedy_is_deterministic_and_a_swap_changes_outputs_without_restarts() -> Result<()> {
    let env = Env::new(tiny(1)?, PolicyOptions::default()).await?;
    let body = |seed: u64| json!({"messages": messages(), "temperature": 0, "seed": seed, "max_tokens": 16});
    let (r1, _) = env.chat("g", &body(1)).await?;
    let (r2, _) = env.chat("g", &body(2)).await?;
    let calls = env.calls("g")?;
    assert_eq!(
        calls[0].tokens.completions[0].ids,
        calls[1].tokens.completions[0].ids
    );
    assert_eq!(r1["choices"][0]["message"], r2["choices"][0]["message"]);
    assert_eq!(r1["system_fingerprint"], "weights-v1");
    // The header is the policy's own (the gateway does not forward upstream headers).
    let direct = env
        .client
        .post(format!("{}/chat/completions", env.policy.base_url()))
        .json(&body(1))
        .send()
        .await?;
    assert_eq!(
        direct
            .headers()
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    // Greedy logprobs are the model's plain log-softmax.
    let model = env.policy.model()?;
    let t = &calls[0].tokens;
    let again = recompute(&model, &t.prompt, &t.completions[0].ids)?;
    let served = t.completions[0].logprobs.clone().context("logprobs")?;
    for (a, b) in served.iter().zip(&again) {
        assert!((a - b).abs() < 1e-4, "served {a}, recomputed {b}");
    }

    // Swap through the admin endpoint (a checkpoint on disk), then through the Rust API.
    let dir = tempfile::tempdir()?;
    tiny(2)?.save(dir.path())?;
    let r = env
        .client
        .post(format!("http://{}/admin/load", env.policy.addr()))
        .json(&json!({"checkpoint": dir.path()}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "load: {}", r.status());
    let v: Value = r.json().await?;
    assert_eq!(v["version"], 2);
    let (r3, _) = env.chat("g", &body(1)).await?;
    assert_eq!(r3["system_fingerprint"], "weights-v2");
    assert_eq!(r3["weights_version"], 2);
    let calls = env.calls("g")?;
    assert_ne!(
        calls[2].tokens.completions[0].ids,
        calls[0].tokens.completions[0].ids
    );

    assert_eq!(env.policy.swap(tiny(1)?)?, 3);
    let (r4, _) = env.chat("g", &body(1)).await?;
    assert_eq!(r4["system_fingerprint"], "weights-v3");
    let calls = env.calls("g")?;
    // Back to the first weights: back to the first output.
    assert_eq!(
        calls[3].tokens.completions[0].ids,
        calls[0].tokens.completions[0].ids
    );

    // A bad checkpoint is refused and the current weights stay.
    let r = env
        .client
        .post(format!("http://{}/admin/load", env.policy.addr()))
        .json(&json!({"checkpoint": "/nonexistent/ckpt"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(env.policy.version(), 3);
    env.stop().await
}

#[tokio::test]
async fn tools_offered_to_a_random_model_still_give_well_formed_replies() -> Result<()> {
    let opts = PolicyOptions {
        max_concurrency: 2,
        ..PolicyOptions::default()
    };
    let env = Arc::new(Env::new(tiny(3)?, opts).await?);
    let tools = json!([{"type": "function", "function": {"name": "bash", "description": "run",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]);
    // Several sessions at once through a queue of 2 generation slots.
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let env = env.clone();
        let tools = tools.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"messages": messages(), "tools": tools, "seed": i,
                              "max_tokens": 40, "temperature": 1.5});
            if i % 2 == 0 {
                env.chat(&format!("t{i}"), &body).await.map(|(r, _)| {
                    let m = &r["choices"][0]["message"];
                    (
                        m["content"].as_str().map(String::from),
                        m.get("tool_calls").cloned(),
                    )
                })
            } else {
                env.chat_stream(&format!("t{i}"), &body)
                    .await
                    .map(|(c, calls, _)| (Some(c), (!calls.is_empty()).then(|| json!(calls))))
            }
        }));
    }
    for t in tasks {
        let (content, calls) = t.await??;
        // Garbage from a random model: plain text content, no tool call.
        assert!(content.is_some());
        assert!(calls.is_none_or(|c| c.is_null()));
    }
    for i in 0..6 {
        let rec = &env.calls(&format!("t{i}"))?[0];
        assert_eq!(rec.tokens.completions[0].ids.len(), 40);
    }
    // A follow-up turn: the next prompt extends the previous prompt + completion.
    let first = &env.calls("t0")?[0];
    let reply = first.response["choices"][0]["message"].clone();
    let mut msgs = messages().as_array().cloned().context("array")?;
    msgs.push(reply);
    msgs.push(json!({"role": "user", "content": "go on"}));
    env.chat(
        "t0",
        &json!({"messages": msgs, "tools": tools, "max_tokens": 8}),
    )
    .await?;
    let second = &env.calls("t0")?[1];
    let prev = first.sequence(0);
    // Valid UTF-8 completions re-render to the same bytes (invalid bytes become U+FFFD).
    if std::str::from_utf8(&byte_chat::decode_bytes(&first.tokens.completions[0].ids)).is_ok() {
        assert!(second.tokens.prompt.starts_with(&prev));
        assert!(second.branch.as_ref().is_some_and(|b| b.extends_previous));
    }
    let env = Arc::try_unwrap(env).map_err(|_| anyhow::anyhow!("env still shared"))?;
    env.stop().await
}

#[tokio::test]
async fn bad_requests_get_openai_errors() -> Result<()> {
    let env = Env::new(tiny(1)?, PolicyOptions::default()).await?;
    let url = format!("{}/chat/completions", env.policy.base_url());
    for body in [
        json!({"messages": "x"}),
        json!({"messages": [], "temperature": -1}),
        json!({"messages": [], "n": 3}),
    ] {
        let r = env.client.post(&url).json(&body).send().await?;
        assert_eq!(r.status().as_u16(), 400);
        let v: Value = r.json().await?;
        assert!(v["error"]["message"].is_string());
    }
    let models: Value = env
        .client
        .get(format!("{}/models", env.policy.base_url()))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["id"], "arbor-embedded");
    env.stop().await
}
