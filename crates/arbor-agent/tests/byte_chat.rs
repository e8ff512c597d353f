//! The scripted oracle answers in the byte-level chat format (`arbor_trace::byte_chat`) that the
//! embedded policy (`arbor-policy`) is served with: over HTTP, each reply's token ids are its
//! message's bytes, parse back into the same tool calls, and every prompt extends the previous
//! prompt + completion, so an oracle session is one token-level tree of training data.

use anyhow::{Context, Result, ensure};
use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_trace::byte_chat;
use serde_json::{Value, json};

#[tokio::test]
async fn scripted_replies_are_byte_chat_tokens_that_parse_back() -> Result<()> {
    let policy = ScriptedPolicy::start("127.0.0.1:0".parse()?).await?;
    policy.register("Fix the bug", vec!["ls -la".into(), "cat x.py".into()]);
    let client = reqwest::Client::new();
    let tools = json!([{"type": "function", "function": {"name": "bash", "parameters": {}}}]);
    let mut history = vec![
        json!({"role": "system", "content": "sys"}),
        json!({"role": "user", "content": [{"type": "text", "text": "Fix the bug"}]}),
    ];
    let mut previous: Vec<u32> = Vec::new();
    for (step, with_tools) in [(0, true), (1, true), (2, false)] {
        let mut body = json!({"model": "m", "messages": history});
        if with_tools {
            body["tools"] = tools.clone();
        }
        let r: Value = client
            .post(format!("{}/chat/completions", policy.base_url()))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let prompt: Vec<u32> = serde_json::from_value(r["prompt_token_ids"].clone())?;
        let text = String::from_utf8(byte_chat::decode_bytes(&prompt))?;
        if step == 0 {
            assert_eq!(
                text,
                "<|system|>\nsys<|end|>\n<|user|>\nFix the bug<|end|>\n<|assistant|>\n"
            );
        }
        ensure!(text.ends_with("<|assistant|>\n"), "step {step}: {text}");
        ensure!(
            prompt.starts_with(&previous),
            "step {step}: the prompt does not extend the previous prompt + completion"
        );
        let msg = r["choices"][0]["message"].clone();
        let ids: Vec<u32> = serde_json::from_value(r["choices"][0]["token_ids"].clone())?;
        assert_eq!(ids, byte_chat::encode(&byte_chat::message_text(&msg)));
        previous = prompt.iter().chain(&ids).copied().collect();
        // What the embedded policy would parse from these bytes is the same message.
        let text = String::from_utf8(byte_chat::decode_bytes(&ids))?;
        let parsed =
            byte_chat::parse_completion(&text, if with_tools { &["bash", "submit"] } else { &[] });
        assert!(parsed.ended);
        let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
        assert_eq!(parsed.tool_calls.len(), calls.len());
        for (p, c) in parsed.tool_calls.iter().zip(&calls) {
            assert_eq!(Some(p.name.as_str()), c["function"]["name"].as_str());
            assert_eq!(
                Some(p.arguments.as_str()),
                c["function"]["arguments"].as_str()
            );
        }
        history.push(msg);
        let call_id = calls
            .first()
            .and_then(|c| c["id"].as_str())
            .map(String::from);
        match call_id {
            Some(id) => history.push(json!({"role": "tool", "tool_call_id": id, "content": "out"})),
            None => history.push(json!({"role": "user", "content": "out"})),
        }
    }
    let last = history.iter().rev().nth(1).context("history")?;
    assert!(
        last["content"]
            .as_str()
            .is_some_and(|c| c.contains("cat x.py") || c.contains("submit"))
    );
    Ok(())
}
