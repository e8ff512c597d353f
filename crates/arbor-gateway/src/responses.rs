//! OpenAI Responses, translated to and from Chat Completions.
//!
//! Function tools nested in `namespace` tools are offered upstream under flat names and the
//! model's calls of them come back with their `namespace` ([`tools`]).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::chat::NormOptions;
use crate::sink::StreamSink;
use crate::sse;

pub mod tools;

use tools::{ToolNames, insert_tools};

fn parts_text(content: &Value) -> Result<Value, String> {
    match content {
        Value::String(s) => Ok(json!(s)),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str).unwrap_or("input_text") {
                    "input_text" | "output_text" | "text" | "summary_text" | "refusal" => out.push(json!({
                        "type": "text",
                        "text": p.get("text").or_else(|| p.get("refusal")).and_then(Value::as_str).unwrap_or("")
                    })),
                    "input_image" => {
                        let url = p.get("image_url").and_then(Value::as_str).unwrap_or("");
                        out.push(json!({"type": "image_url", "image_url": {"url": url}}));
                    }
                    other => return Err(format!("content part type `{other}` is not supported")),
                }
            }
            if out.iter().all(|p| p["type"] == "text") {
                Ok(json!(
                    out.iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                ))
            } else {
                Ok(Value::Array(out))
            }
        }
        Value::Null => Ok(json!("")),
        _ => Err("message content must be a string or an array of parts".into()),
    }
}

/// Translates a Responses request into a Chat Completions request.
///
/// Steps: refuse server-side state, the instructions as system prompt, the input items
/// (messages, function calls and their outputs), the tools (namespaces flattened) and tool
/// choice, then the sampling parameters; keys keep this order on the wire.
pub fn to_chat(req: &Value, opts: &NormOptions) -> Result<Value, String> {
    let obj = req
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    if obj
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err("`previous_response_id` is not supported by this gateway: send the full input (store: false)".into());
    }
    let names = ToolNames::from_request(req);
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = obj.get("instructions").and_then(Value::as_str)
        && !i.is_empty()
    {
        messages.push(json!({"role": "system", "content": i}));
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                push_item(i, item, &names, &mut messages)?;
            }
        }
        _ => return Err("`input` must be a string or an array of items".into()),
    }
    let mut body = Map::new();
    body.insert(
        "model".into(),
        obj.get("model")
            .cloned()
            .unwrap_or_else(|| json!(opts.default_model.clone().unwrap_or_default())),
    );
    body.insert("messages".into(), Value::Array(messages));
    insert_tools(obj, opts, &names, &mut body)?;
    copy_sampling(obj, &mut body);
    Ok(Value::Object(body))
}

/// Translates `input[i]` into Chat messages (an item without a type but with a role is a
/// message).
fn push_item(
    i: usize,
    item: &Value,
    names: &ToolNames,
    messages: &mut Vec<Value>,
) -> Result<(), String> {
    let ty = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or(if item.get("role").is_some() {
            "message"
        } else {
            ""
        });
    match ty {
        "message" => {
            let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
            let role = if role == "developer" { "system" } else { role };
            let content = parts_text(item.get("content").unwrap_or(&Value::Null))
                .map_err(|e| format!("input[{i}]: {e}"))?;
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => push_function_call(item, names, messages),
        "function_call_output" => messages.push(function_output_message(item)),
        // Reasoning items (possibly encrypted) are kept in the record only.
        "reasoning" => {}
        other => {
            return Err(format!("input[{i}]: item type `{other}` is not supported"));
        }
    }
    Ok(())
}

/// A `function_call` item joins the previous assistant message's tool calls (parallel calls
/// are separate items), or starts an assistant message without content. A call of a
/// namespaced tool takes the tool's flat name.
fn push_function_call(item: &Value, names: &ToolNames, messages: &mut Vec<Value>) {
    let name = item.get("name").and_then(Value::as_str).unwrap_or("");
    let name = match item.get("namespace").and_then(Value::as_str) {
        Some(ns) => names.flat(ns, name),
        None => name.to_string(),
    };
    let tc = json!({
        "id": item.get("call_id").and_then(Value::as_str).unwrap_or(""),
        "type": "function",
        "function": {
            "name": name,
            "arguments": item.get("arguments").and_then(Value::as_str).unwrap_or("{}"),
        }
    });
    let last_is_assistant = messages
        .last()
        .is_some_and(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    if last_is_assistant {
        if let Some(m) = messages.last_mut().and_then(Value::as_object_mut) {
            let calls = m.entry("tool_calls").or_insert_with(|| json!([]));
            if let Some(a) = calls.as_array_mut() {
                a.push(tc);
            }
        }
    } else {
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [tc]}));
    }
}

/// A `function_call_output` item as a `tool` message (text parts joined, other JSON as text).
fn function_output_message(item: &Value) -> Value {
    let out = match item.get("output") {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Array(_)) => parts_text(v)
            .ok()
            .and_then(|t| t.as_str().map(String::from))
            .unwrap_or_default(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    json!({"role": "tool",
        "tool_call_id": item.get("call_id").and_then(Value::as_str).unwrap_or(""),
        "content": out})
}

/// Copies the sampling parameters that are set, under their Chat names.
fn copy_sampling(obj: &Map<String, Value>, body: &mut Map<String, Value>) {
    for (from, to) in [
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
    ] {
        if let Some(v) = obj.get(from)
            && !v.is_null()
        {
            body.insert(to.into(), v.clone());
        }
    }
}

fn suffix(full: &Value) -> String {
    full.get("id")
        .and_then(Value::as_str)
        .unwrap_or("arbor")
        .trim_start_matches("chatcmpl-")
        .to_string()
}

/// A `function_call` output item; a flat name of a namespaced tool is split back into
/// `namespace` and `name`.
fn fc_item(names: &ToolNames, call_id: &str, flat: &str, args: &str, status: &str) -> Value {
    let mut item = json!({"type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
           "name": flat, "arguments": args, "status": status});
    if let Some((ns, name)) = names.split(flat) {
        item["name"] = json!(name);
        item["namespace"] = json!(ns);
    }
    item
}

fn msg_item(id: &str, text: Option<&str>, status: &str) -> Value {
    let content = match text {
        Some(t) => json!([{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]),
        None => json!([]),
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn response_object(req: &Value, full: &Value, status: &str, output: Vec<Value>) -> Value {
    let u = full.get("usage");
    let get = |k: &str| {
        u.and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let usage = if u.is_some_and(|u| !u.is_null()) {
        json!({"input_tokens": get("prompt_tokens"), "input_tokens_details": {"cached_tokens": 0},
               "output_tokens": get("completion_tokens"), "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": get("prompt_tokens") + get("completion_tokens")})
    } else {
        Value::Null
    };
    let finish = full
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str);
    let (status, incomplete) = if status == "completed" && finish == Some("length") {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        (status, Value::Null)
    };
    json!({
        "id": format!("resp_{}", suffix(full)),
        "object": "response",
        "created_at": full.get("created").cloned().unwrap_or(json!(0)),
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": req.get("instructions").cloned().unwrap_or(Value::Null),
        "max_output_tokens": req.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        "model": req.get("model").cloned().unwrap_or_else(|| full.get("model").cloned().unwrap_or(json!(""))),
        "output": output,
        "parallel_tool_calls": req.get("parallel_tool_calls").cloned().unwrap_or(json!(true)),
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "store": false,
        "temperature": req.get("temperature").cloned().unwrap_or(json!(1.0)),
        "text": {"format": {"type": "text"}},
        "tool_choice": req.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": req.get("tools").cloned().unwrap_or(json!([])),
        "top_p": req.get("top_p").cloned().unwrap_or(json!(1.0)),
        "truncation": "disabled",
        "usage": usage,
        "metadata": req.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// Translates an assembled `chat.completion` into a Responses response object.
pub fn from_chat(full: &Value, req: &Value) -> Value {
    let msg = full
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("message"));
    let names = ToolNames::from_request(req);
    let mut output = Vec::new();
    if let Some(t) = msg.and_then(|m| m.get("content")).and_then(Value::as_str)
        && !t.is_empty()
    {
        output.push(msg_item(
            &format!("msg_{}", suffix(full)),
            Some(t),
            "completed",
        ));
    }
    if let Some(tcs) = msg
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    {
        for tc in tcs {
            let f = tc.get("function");
            output.push(fc_item(
                &names,
                tc.get("id").and_then(Value::as_str).unwrap_or(""),
                f.and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                f.and_then(|f| f.get("arguments"))
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                "completed",
            ));
        }
    }
    response_object(req, full, "completed", output)
}

enum Item {
    None,
    Text {
        id: String,
        index: u64,
        text: String,
    },
    Call {
        tc: u64,
        index: u64,
        call_id: String,
        name: String,
        args: String,
    },
}

/// Streams Responses events (response.created ... response.completed).
pub struct ResponsesSink {
    req: Value,
    names: ToolNames,
    seq: u64,
    started: bool,
    item: Item,
    next_output: u64,
    first: Value,
}

impl ResponsesSink {
    /// A sink for a request.
    pub fn new(req: Value) -> Self {
        Self {
            names: ToolNames::from_request(&req),
            req,
            seq: 0,
            started: false,
            item: Item::None,
            next_output: 0,
            first: Value::Null,
        }
    }

    fn ev(&mut self, name: &str, mut body: Value) -> Bytes {
        if let Some(o) = body.as_object_mut() {
            o.insert("type".into(), json!(name));
            o.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        sse::event_frame(name, &body)
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        match std::mem::replace(&mut self.item, Item::None) {
            Item::None => {}
            Item::Text { id, index, text } => {
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                out.push(self.ev(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index,
                    "content_index": 0, "text": text, "logprobs": []}),
                ));
                out.push(self.ev(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index,
                    "content_index": 0, "part": part}),
                ));
                let item = msg_item(&id, Some(&text), "completed");
                out.push(self.ev(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
            }
            Item::Call {
                index,
                call_id,
                name,
                args,
                ..
            } => {
                let item_id = format!("fc_{call_id}");
                let item = fc_item(&self.names, &call_id, &name, &args, "completed");
                out.push(self.ev(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id,
                    "output_index": index, "name": item["name"], "arguments": args}),
                ));
                out.push(self.ev(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
            }
        }
    }
}

impl StreamSink for ResponsesSink {
    fn chunk(&mut self, chunk: &Value) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            self.first = json!({"id": chunk.get("id"), "created": chunk.get("created"), "model": chunk.get("model")});
            let r = response_object(&self.req, &self.first, "in_progress", Vec::new());
            out.push(self.ev("response.created", json!({"response": r.clone()})));
            out.push(self.ev("response.in_progress", json!({"response": r})));
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
            if !matches!(self.item, Item::Text { .. }) {
                self.close(&mut out);
                let id = format!("msg_{}", suffix(&self.first));
                let index = self.next_output;
                self.next_output += 1;
                out.push(self.ev(
                    "response.output_item.added",
                    json!({"output_index": index, "item": msg_item(&id, None, "in_progress")}),
                ));
                out.push(self.ev("response.content_part.added", json!({"item_id": id, "output_index": index,
                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})));
                self.item = Item::Text {
                    id,
                    index,
                    text: String::new(),
                };
            }
            if let Item::Text { id, index, text } = &mut self.item {
                text.push_str(t);
                let body = json!({"item_id": id, "output_index": index, "content_index": 0,
                    "delta": t, "logprobs": []});
                out.push(self.ev("response.output_text.delta", body));
            }
        }
        if let Some(tcs) = delta
            .and_then(|d| d.get("tool_calls"))
            .and_then(Value::as_array)
        {
            for tc in tcs {
                let ti = tc.get("index").and_then(Value::as_u64).unwrap_or(0);
                if !matches!(self.item, Item::Call { tc, .. } if tc == ti) {
                    self.close(&mut out);
                    let call_id = tc
                        .get("id")
                        .and_then(Value::as_str)
                        .map(String::from)
                        .unwrap_or_else(|| format!("call_0_{ti}"));
                    let name = tc
                        .get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let index = self.next_output;
                    self.next_output += 1;
                    out.push(self.ev("response.output_item.added",
                        json!({"output_index": index, "item": fc_item(&self.names, &call_id, &name, "", "in_progress")})));
                    self.item = Item::Call {
                        tc: ti,
                        index,
                        call_id,
                        name,
                        args: String::new(),
                    };
                }
                if let Some(a) = tc
                    .get("function")
                    .and_then(|f| f.get("arguments"))
                    .and_then(Value::as_str)
                    && !a.is_empty()
                    && let Item::Call {
                        index,
                        call_id,
                        args,
                        ..
                    } = &mut self.item
                {
                    args.push_str(a);
                    let body = json!({"item_id": format!("fc_{call_id}"), "output_index": index, "delta": a});
                    out.push(self.ev("response.function_call_arguments.delta", body));
                }
            }
        }
        out
    }

    fn finish(&mut self, full: &Value) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !self.started {
            out.extend(self.chunk(&json!({"id": full.get("id"), "created": full.get("created"), "model": full.get("model")})));
        }
        self.close(&mut out);
        out
    }

    fn response(&self, full: &Value) -> Value {
        from_chat(full, &self.req)
    }

    fn terminal(&mut self, full: &Value) -> Vec<Bytes> {
        let r = from_chat(full, &self.req);
        vec![self.ev("response.completed", json!({"response": r}))]
    }

    fn error(&mut self, message: &str) -> Vec<Bytes> {
        let r = response_object(&self.req, &self.first, "failed", Vec::new());
        let mut r = r;
        r["error"] = json!({"code": "server_error", "message": message});
        vec![self.ev("response.failed", json!({"response": r}))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolPolicy;

    #[test]
    fn translates_items() {
        let req = json!({"model":"m","instructions":"be brief","input":[
            {"role":"developer","content":"dev"},
            {"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]},
            {"type":"reasoning","id":"r","summary":[]},
            {"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},
            {"type":"function_call","call_id":"c2","name":"g","arguments":"{}"},
            {"type":"function_call_output","call_id":"c1","output":"one"},
            {"type":"function_call_output","call_id":"c2","output":"two"}],
            "tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],"max_output_tokens":5});
        let chat = to_chat(&req, &NormOptions::default()).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 6);
        assert_eq!(m[1]["role"], "system");
        assert_eq!(m[2]["content"], "hi");
        assert_eq!(m[3]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(m[5]["tool_call_id"], "c2");
        assert_eq!(chat["max_tokens"], 5);
        let bad = json!({"input":"x","tools":[{"type":"web_search"}]});
        assert!(to_chat(&bad, &NormOptions::default()).is_err());
    }

    #[test]
    fn translates_outputs_and_tool_choice() {
        let req = json!({"input":[
            {"role":"user","content":[{"type":"input_text","text":"a"},{"type":"input_image","image_url":"http://i"}]},
            {"type":"function_call_output","call_id":"c1","output":[{"type":"input_text","text":"p"},{"type":"output_text","text":"q"}]},
            {"type":"function_call_output","call_id":"c2","output":{"k":1}},
            {"type":"function_call_output","call_id":"c3"}],
            "tools":[{"type":"function","name":"f","description":null,"strict":true},{"type":"web_search"}],
            "tool_choice":{"type":"function","name":"f"},"parallel_tool_calls":false,"temperature":null,"top_p":0.5});
        assert!(to_chat(&req, &NormOptions::default()).is_err());
        let opts = NormOptions {
            tool_policy: ToolPolicy::Drop,
            default_model: Some("dflt".into()),
            ..NormOptions::default()
        };
        let chat = to_chat(&req, &opts).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(
            m[0]["content"],
            json!([{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"http://i"}}])
        );
        assert_eq!(m[1]["content"], "p\nq");
        assert_eq!(m[2]["content"], "{\"k\":1}");
        assert_eq!(m[3]["content"], "");
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
                "top_p"
            ]
        );
        assert_eq!(chat["model"], "dflt");
        assert_eq!(
            chat["tools"],
            json!([{"type":"function","function":{"name":"f","strict":true}}])
        );
        assert_eq!(
            chat["tool_choice"],
            json!({"type":"function","function":{"name":"f"}})
        );
        let unknown = json!({"input":[{"type":"item_reference","id":"x"}]});
        assert_eq!(
            to_chat(&unknown, &opts).unwrap_err(),
            "input[0]: item type `item_reference` is not supported"
        );
        let stateful = json!({"input":"x","previous_response_id":"r"});
        assert!(to_chat(&stateful, &opts).is_err());
    }
}
