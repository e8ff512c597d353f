//! The loop the embedded policy exists for: a completion in the scripted oracle's byte format
//! is SFT data for the model, token for token, and the trained model, served, answers with a
//! real tool call (parsed into OpenAI `tool_calls`, plain and streamed).

use anyhow::{Context, Result, ensure};
use arbor_model::train::{AdamWTrainer, weighted_nll};
use arbor_model::{ForwardOptions, Qwen3Config, Qwen3Model, TreeBatch};
use arbor_policy::{EmbeddedPolicy, PolicyOptions};
use arbor_trace::byte_chat;
use serde_json::{Value, json};

#[tokio::test]
async fn a_model_trained_on_oracle_bytes_emits_parsed_tool_calls() -> Result<()> {
    let messages = json!([{"role": "system", "content": "Use tools."},
                          {"role": "user", "content": "List the files."}]);
    let msgs = messages.as_array().context("array")?;
    // What the scripted oracle answers with tools: a bash call, no content.
    let oracle = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_0", "type": "function",
         "function": {"name": "bash", "arguments": "{\"command\":\"ls\"}"}}]});
    let prompt = byte_chat::render_prompt(msgs);
    let target = byte_chat::encode(&byte_chat::message_text(&oracle));
    let seq: Vec<u32> = prompt.iter().chain(&target).copied().collect();
    let weights: Vec<f32> = (0..seq.len())
        .map(|i| if i >= prompt.len() { 1.0 } else { 0.0 })
        .collect();

    let model = Qwen3Model::new(Qwen3Config::tiny(256, 32, 2, 2, 1), 11)?;
    let batch = TreeBatch::forest(&[&seq]);
    let mut opt = AdamWTrainer::new(model.vars(), 1e-2, 0.0)?;
    let mut loss_value = f32::INFINITY;
    for _ in 0..300 {
        let (lp, _) = model.token_logprobs(&batch, &ForwardOptions::default())?;
        let loss = weighted_nll(&lp, &weights)?;
        loss_value = loss.to_scalar::<f32>()?;
        if loss_value < 0.05 {
            break;
        }
        opt.backward_step(&loss)?;
    }
    ensure!(loss_value < 0.5, "SFT did not fit: loss {loss_value}");

    let policy =
        EmbeddedPolicy::start(([127, 0, 0, 1], 0).into(), model, PolicyOptions::default()).await?;
    let tools = json!([{"type": "function", "function": {"name": "bash", "parameters": {}}}]);
    let body = json!({"messages": messages, "tools": tools, "temperature": 0, "max_tokens": 80});
    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", policy.base_url());
    let r: Value = client.post(&url).json(&body).send().await?.json().await?;
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "bash"
    );
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"command\":\"ls\"}"
    );
    // Generation stopped at the end marker; the ids are the oracle's bytes up to it.
    let ids: Vec<u32> = serde_json::from_value(choice["token_ids"].clone())?;
    assert_eq!(ids[..], target[..target.len() - 1]);

    // Streamed: the tool call arrives as a delta, no stray content.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let text = client.post(&url).json(&sbody).send().await?.text().await?;
    let (mut content, mut calls, mut streamed_ids) = (String::new(), Vec::new(), Vec::new());
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line)?;
        for c in v["choices"].as_array().into_iter().flatten() {
            content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            calls.extend(
                c["delta"]["tool_calls"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
            streamed_ids.extend(c["token_ids"].as_array().cloned().unwrap_or_default());
        }
    }
    assert!(text.trim_end().ends_with("[DONE]"));
    assert_eq!(content, "");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "bash");
    assert_eq!(streamed_ids.len(), ids.len());

    // Without tools offered the same bytes are plain text.
    let r: Value = client
        .post(&url)
        .json(&json!({"messages": messages, "temperature": 0, "max_tokens": 80}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        r["choices"][0]["message"]["content"],
        "<tool_call>bash {\"command\":\"ls\"}</tool_call>"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    policy.shutdown().await?;
    Ok(())
}
