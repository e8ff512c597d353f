//! Anthropic Messages, translated to and from Chat Completions.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::chat::{NormOptions, ToolPolicy};
use crate::sink::StreamSink;
use crate::sse;

fn block_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Translates a Messages request into a Chat Completions request.
///
/// Steps: the system prompt, the messages (with their content blocks and tool results), the
/// tools and tool choice, then the sampling parameters; keys keep this order on the wire.
pub fn to_chat(req: &Value, opts: &NormOptions) -> Result<Value, String> {
    let obj = req
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    let mut messages: Vec<Value> = Vec::new();
    push_system(obj, &mut messages);
    let msgs = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` must be an array")?;
    for (i, m) in msgs.iter().enumerate() {
        push_message(i, m, &mut messages)?;
    }
    let mut body = Map::new();
    body.insert(
        "model".into(),
        obj.get("model")
            .cloned()
            .unwrap_or_else(|| json!(opts.default_model.clone().unwrap_or_default())),
    );
    body.insert("messages".into(), Value::Array(messages));
    insert_tools(obj, opts, &mut body)?;
    copy_sampling(obj, &mut body);
    Ok(Value::Object(body))
}

/// The top-level `system` (a string or text blocks) becomes a leading system message.
fn push_system(obj: &Map<String, Value>, messages: &mut Vec<Value>) {
    if let Some(system) = obj.get("system") {
        let text = block_text(system);
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
}

/// Translates `messages[i]` into zero or more Chat messages.
fn push_message(i: usize, m: &Value, messages: &mut Vec<Value>) -> Result<(), String> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
    let content = m.get("content").cloned().unwrap_or(Value::Null);
    match (role, content) {
        ("user" | "assistant" | "system", Value::String(s)) => {
            messages.push(json!({"role": role, "content": s}));
        }
        ("user" | "system", Value::Array(blocks)) => push_user_blocks(role, &blocks, messages),
        ("assistant", Value::Array(blocks)) => messages.push(assistant_message(&blocks)),
        ("user" | "assistant", Value::Null) => {
            messages.push(json!({"role": role, "content": ""}));
        }
        _ => return Err(format!("messages[{i}]: unsupported role or content")),
    }
    Ok(())
}

/// User (or system) content blocks: tool results become `tool` messages, sent first; text and
/// images become one message (plain text when there is no image).
fn push_user_blocks(role: &str, blocks: &[Value], messages: &mut Vec<Value>) {
    let mut parts: Vec<Value> = Vec::new();
    let mut tool_msgs: Vec<Value> = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str).unwrap_or("text") {
            "text" => parts.push(json!({"type": "text",
                "text": b.get("text").and_then(Value::as_str).unwrap_or("")})),
            "image" => parts.push(json!({"type": "image_url", "image_url": {"url": image_url(b)}})),
            "tool_result" => tool_msgs.push(tool_result_message(b)),
            // Thinking, documents, server tool results and the like are kept in the
            // record but not sent upstream.
            _ => {}
        }
    }
    messages.extend(tool_msgs);
    if !parts.is_empty() {
        let all_text = parts.iter().all(|p| p["type"] == "text");
        let content = if all_text {
            json!(
                parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        } else {
            Value::Array(parts)
        };
        messages.push(json!({"role": role, "content": content}));
    }
}

/// The URL of an image block: a data URL for base64 sources, the source URL otherwise.
fn image_url(block: &Value) -> String {
    let src = block.get("source");
    match src.and_then(|s| s.get("type")).and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            src.and_then(|s| s.get("media_type"))
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            src.and_then(|s| s.get("data"))
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        _ => src
            .and_then(|s| s.get("url"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

/// A `tool_result` block as a `tool` message; errors are prefixed `Error: ` so the model sees
/// them as such.
fn tool_result_message(block: &Value) -> Value {
    let mut text = block_text(block.get("content").unwrap_or(&Value::Null));
    if block
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && !text.starts_with("Error")
    {
        text = format!("Error: {text}");
    }
    json!({"role": "tool",
        "tool_call_id": block.get("tool_use_id").and_then(Value::as_str).unwrap_or(""),
        "content": text})
}

/// Assistant content blocks: text is concatenated, `tool_use` blocks become tool calls.
fn assistant_message(blocks: &[Value]) -> Value {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str).unwrap_or("text") {
            "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            "tool_use" => tool_calls.push(json!({
                "id": b.get("id").and_then(Value::as_str).unwrap_or(""),
                "type": "function",
                "function": {
                    "name": b.get("name").and_then(Value::as_str).unwrap_or(""),
                    "arguments": serde_json::to_string(b.get("input").unwrap_or(&json!({})))
                        .unwrap_or_else(|_| "{}".into()),
                }
            })),
            _ => {}
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    if tool_calls.is_empty() {
        m.insert("content".into(), json!(text));
    } else {
        m.insert(
            "content".into(),
            if text.is_empty() {
                Value::Null
            } else {
                json!(text)
            },
        );
        m.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    Value::Object(m)
}

/// Custom tools with an `input_schema` become functions (others are refused or dropped by
/// policy); the tool choice follows when any tool is left.
fn insert_tools(
    obj: &Map<String, Value>,
    opts: &NormOptions,
    body: &mut Map<String, Value>,
) -> Result<(), String> {
    let Some(tools) = obj.get("tools").and_then(Value::as_array) else {
        return Ok(());
    };
    let mut out = Vec::new();
    for t in tools {
        let ty = t.get("type").and_then(Value::as_str).unwrap_or("custom");
        if ty == "custom" && t.get("input_schema").is_some() {
            out.push(function_tool(t));
        } else if opts.tool_policy == ToolPolicy::Refuse {
            return Err(format!(
                "tool type `{ty}` is not supported by this gateway (only custom tools with an input_schema); \
                 start it with --drop-unsupported-tools to drop such tools"
            ));
        }
    }
    if !out.is_empty() {
        body.insert("tools".into(), Value::Array(out));
        if let Some(tc) = obj.get("tool_choice") {
            insert_tool_choice(tc, body);
        }
    }
    Ok(())
}

/// A custom tool as a Chat function tool.
fn function_tool(t: &Value) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), t.get("name").cloned().unwrap_or(json!("")));
    if let Some(d) = t.get("description") {
        f.insert("description".into(), d.clone());
    }
    f.insert(
        "parameters".into(),
        t.get("input_schema").cloned().unwrap_or(json!({})),
    );
    json!({"type": "function", "function": Value::Object(f)})
}

/// Maps `tool_choice` (`any`, `none`, `tool`, `auto`) and `disable_parallel_tool_use`.
fn insert_tool_choice(tc: &Value, body: &mut Map<String, Value>) {
    let choice = match tc.get("type").and_then(Value::as_str) {
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            json!({"type": "function", "function": {"name": tc.get("name")}})
        }
        _ => json!("auto"),
    };
    body.insert("tool_choice".into(), choice);
    if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
        body.insert("parallel_tool_calls".into(), json!(false));
    }
}

/// Copies the sampling parameters that are set, under their Chat names.
fn copy_sampling(obj: &Map<String, Value>, body: &mut Map<String, Value>) {
    for (from, to) in [
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("stop_sequences", "stop"),
        ("stream", "stream"),
    ] {
        if let Some(v) = obj.get(from)
            && !v.is_null()
        {
            body.insert(to.into(), v.clone());
        }
    }
}

fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        _ => "end_turn",
    }
}

fn msg_id(full: &Value) -> String {
    let id = full.get("id").and_then(Value::as_str).unwrap_or("arbor");
    format!("msg_{}", id.trim_start_matches("chatcmpl-"))
}

fn usage(full: &Value) -> (u64, u64) {
    let u = full.get("usage");
    let get = |k: &str| {
        u.and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    (get("prompt_tokens"), get("completion_tokens"))
}

/// Translates an assembled `chat.completion` into a Messages response.
pub fn from_chat(full: &Value, req: &Value) -> Value {
    let choice = full.get("choices").and_then(|c| c.get(0));
    let msg = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    if let Some(t) = msg.and_then(|m| m.get("content")).and_then(Value::as_str)
        && !t.is_empty()
    {
        content.push(json!({"type": "text", "text": t}));
    }
    if let Some(tcs) = msg
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    {
        for tc in tcs {
            let f = tc.get("function");
            let args = f
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .unwrap_or("{}");
            let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
            content.push(json!({"type": "tool_use",
                "id": tc.get("id").and_then(Value::as_str).unwrap_or(""),
                "name": f.and_then(|f| f.get("name")).and_then(Value::as_str).unwrap_or(""),
                "input": input}));
        }
    }
    let (inp, out) = usage(full);
    json!({
        "id": msg_id(full),
        "type": "message",
        "role": "assistant",
        "model": req.get("model").cloned().unwrap_or_else(|| full.get("model").cloned().unwrap_or(json!(""))),
        "content": content,
        "stop_reason": stop_reason(choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": {"input_tokens": inp, "output_tokens": out},
    })
}

#[derive(PartialEq, Clone, Copy)]
enum Block {
    None,
    Text,
    Tool(u64),
}

/// Streams Messages events (message_start, ping, content_block_*, message_delta, message_stop).
pub struct MessagesSink {
    req: Value,
    started: bool,
    block: Block,
    next_index: u64,
    finish: Option<String>,
}

impl MessagesSink {
    /// A sink for a request.
    pub fn new(req: Value) -> Self {
        Self {
            req,
            started: false,
            block: Block::None,
            next_index: 0,
            finish: None,
        }
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.block != Block::None {
            out.push(sse::event_frame(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.next_index - 1}),
            ));
            self.block = Block::None;
        }
    }

    fn open(&mut self, block: Block, content_block: Value, out: &mut Vec<Bytes>) {
        self.close(out);
        out.push(sse::event_frame(
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.next_index, "content_block": content_block}),
        ));
        self.next_index += 1;
        self.block = block;
    }
}

impl StreamSink for MessagesSink {
    fn chunk(&mut self, chunk: &Value) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let input = chunk
                .get("prompt_token_ids")
                .and_then(Value::as_array)
                .map_or(0, |a| a.len());
            out.push(sse::event_frame(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": msg_id(chunk), "type": "message", "role": "assistant",
                    "model": self.req.get("model").cloned().unwrap_or_else(|| chunk.get("model").cloned().unwrap_or(json!(""))),
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": input, "output_tokens": 0}}}),
            ));
            out.push(sse::event_frame("ping", &json!({"type": "ping"})));
        }
        let Some(c) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return out;
        };
        if c.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
            return out;
        }
        let delta = c.get("delta");
        if let Some(t) = delta.and_then(|d| d.get("content")).and_then(Value::as_str)
            && !t.is_empty()
        {
            if self.block != Block::Text {
                self.open(Block::Text, json!({"type": "text", "text": ""}), &mut out);
            }
            out.push(sse::event_frame(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": self.next_index - 1,
                        "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        if let Some(tcs) = delta
            .and_then(|d| d.get("tool_calls"))
            .and_then(Value::as_array)
        {
            for tc in tcs {
                let ti = tc.get("index").and_then(Value::as_u64).unwrap_or(0);
                if self.block != Block::Tool(ti) {
                    let id = tc
                        .get("id")
                        .and_then(Value::as_str)
                        .map(String::from)
                        .unwrap_or_else(|| format!("call_0_{ti}"));
                    let name = tc
                        .get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    self.open(
                        Block::Tool(ti),
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                        &mut out,
                    );
                }
                if let Some(a) = tc
                    .get("function")
                    .and_then(|f| f.get("arguments"))
                    .and_then(Value::as_str)
                    && !a.is_empty()
                {
                    out.push(sse::event_frame(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": self.next_index - 1,
                                "delta": {"type": "input_json_delta", "partial_json": a}}),
                    ));
                }
            }
        }
        if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(f.to_string());
        }
        out
    }

    fn finish(&mut self, full: &Value) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !self.started {
            out.extend(self.chunk(&json!({"id": full.get("id"), "model": full.get("model")})));
        }
        self.close(&mut out);
        let (_, output) = usage(full);
        out.push(sse::event_frame(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
                    "usage": {"output_tokens": output}}),
        ));
        out
    }

    fn response(&self, full: &Value) -> Value {
        from_chat(full, &self.req)
    }

    fn terminal(&mut self, _full: &Value) -> Vec<Bytes> {
        vec![sse::event_frame(
            "message_stop",
            &json!({"type": "message_stop"}),
        )]
    }

    fn error(&mut self, message: &str) -> Vec<Bytes> {
        vec![sse::event_frame(
            "error",
            &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_tool_round_trip() {
        let req = json!({"model":"m","max_tokens":10,"system":[{"type":"text","text":"sys"}],
            "tools":[{"name":"get","description":"d","input_schema":{"type":"object"}}],
            "tool_choice":{"type":"any"},
            "messages":[{"role":"user","content":"hi"},
              {"role":"assistant","content":[{"type":"text","text":"ok"},{"type":"tool_use","id":"t1","name":"get","input":{"a":1}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"42"}]},{"type":"text","text":"go on"}]}]});
        let chat = to_chat(&req, &NormOptions::default()).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role":"system","content":"sys"}));
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(
            m[3],
            json!({"role":"tool","tool_call_id":"t1","content":"42"})
        );
        assert_eq!(m[4], json!({"role":"user","content":"go on"}));
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(
            chat["tools"][0]["function"]["parameters"],
            json!({"type":"object"})
        );
        let full = json!({"id":"chatcmpl-x","choices":[{"index":0,"message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"t2","type":"function","function":{"name":"get","arguments":"{\"b\":2}"}}]},"finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":5,"completion_tokens":3}});
        let r = from_chat(&full, &req);
        assert_eq!(r["stop_reason"], "tool_use");
        assert_eq!(
            r["content"][0],
            json!({"type":"tool_use","id":"t2","name":"get","input":{"b":2}})
        );
    }

    #[test]
    fn translates_images_errors_and_tool_choice() {
        let req = json!({"model":"m","stream":true,"top_k":null,"stop_sequences":["x"],
            "tools":[{"name":"get","input_schema":{"type":"object"}},{"type":"web_search_20250305","name":"ws"}],
            "tool_choice":{"type":"tool","name":"get","disable_parallel_tool_use":true},
            "messages":[{"role":"user","content":[
                {"type":"tool_result","tool_use_id":"t1","content":"boom","is_error":true},
                {"type":"tool_result","tool_use_id":"t2","content":"Error: kept","is_error":true},
                {"type":"text","text":"see"},
                {"type":"image","source":{"type":"base64","media_type":"image/jpeg","data":"AAA"}},
                {"type":"image","source":{"type":"url","url":"http://x/y.png"}},
                {"type":"thinking","thinking":"dropped"}]},
              {"role":"assistant","content":[{"type":"tool_use","id":"t3","name":"get","input":{}}]},
              {"role":"assistant","content":null}]});
        let refused = to_chat(&req, &NormOptions::default()).unwrap_err();
        assert!(refused.contains("web_search_20250305"), "{refused}");
        let drop = NormOptions {
            tool_policy: ToolPolicy::Drop,
            ..NormOptions::default()
        };
        let chat = to_chat(&req, &drop).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(
            m[0],
            json!({"role":"tool","tool_call_id":"t1","content":"Error: boom"})
        );
        assert_eq!(
            m[1],
            json!({"role":"tool","tool_call_id":"t2","content":"Error: kept"})
        );
        assert_eq!(
            m[2]["content"],
            json!([{"type":"text","text":"see"},
                {"type":"image_url","image_url":{"url":"data:image/jpeg;base64,AAA"}},
                {"type":"image_url","image_url":{"url":"http://x/y.png"}}])
        );
        assert_eq!(m[3]["content"], Value::Null);
        assert_eq!(m[4], json!({"role":"assistant","content":""}));
        let keys: Vec<&str> = chat
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "model",
                "messages",
                "tools",
                "tool_choice",
                "parallel_tool_calls",
                "stop",
                "stream"
            ]
        );
        assert_eq!(chat["tools"].as_array().unwrap().len(), 1);
        assert_eq!(
            chat["tool_choice"],
            json!({"type":"function","function":{"name":"get"}})
        );
        assert_eq!(chat["parallel_tool_calls"], false);
        let bad = json!({"messages":[{"role":"tool","content":"x"}]});
        assert_eq!(
            to_chat(&bad, &NormOptions::default()).unwrap_err(),
            "messages[0]: unsupported role or content"
        );
    }
}
