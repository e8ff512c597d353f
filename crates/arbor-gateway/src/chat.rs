//! OpenAI Chat Completions: request normalization, stream accumulation, stream synthesis,
//! and extraction of upstream token ids / logprobs.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::record::CompletionTokens;

/// What the gateway remembers about the caller's wishes after normalizing a request.
#[derive(Debug, Clone, Default)]
pub struct NormInfo {
    /// The caller asked for a stream.
    pub stream: bool,
    /// The caller asked for logprobs (otherwise they are removed from its answer).
    pub wants_logprobs: bool,
    /// The caller asked for a final usage chunk (`stream_options.include_usage`).
    pub wants_usage_chunk: bool,
}

/// How to treat tools that are not functions (web search, custom, built-in tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolPolicy {
    /// Answer 400 with a clear message.
    #[default]
    Refuse,
    /// Drop them from the request sent upstream (they stay in the record).
    Drop,
}

/// Options that shape the request sent upstream.
#[derive(Debug, Clone, Default)]
pub struct NormOptions {
    /// Ask the upstream for token ids (`return_token_ids`, vLLM) and logprobs.
    pub upstream_token_ids: bool,
    /// Non-function tools.
    pub tool_policy: ToolPolicy,
    /// Model to use when the request names none.
    pub default_model: Option<String>,
}

/// Normalizes a Chat Completions request in place for an OpenAI-compatible upstream.
///
/// Keeps unknown fields; maps `developer` to `system`; gives assistant messages without
/// `content` a content; filters non-function tools by policy; asks for logprobs, token ids and
/// a usage chunk. Returns what the caller asked for, to shape its answer.
pub fn normalize(body: &mut Map<String, Value>, opts: &NormOptions) -> Result<NormInfo, String> {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let wants_logprobs = body
        .get("logprobs")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let wants_usage_chunk = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
        return Err("`messages` must be an array".into());
    };
    if messages.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    for (i, m) in messages.iter_mut().enumerate() {
        let Some(m) = m.as_object_mut() else {
            return Err(format!("messages[{i}] must be an object"));
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        match role {
            "developer" => {
                m.insert("role".into(), json!("system"));
            }
            "system" | "user" | "tool" | "function" => {}
            "assistant" => {
                let has_tools = m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
                if !has_tools {
                    m.remove("tool_calls");
                }
                let missing = m.get("content").is_none_or(Value::is_null);
                if missing {
                    m.insert(
                        "content".into(),
                        if has_tools { Value::Null } else { json!("") },
                    );
                }
            }
            "" => return Err(format!("messages[{i}].role is missing")),
            other => return Err(format!("messages[{i}].role `{other}` is not supported")),
        }
    }
    if let Some(tools) = body.get_mut("tools") {
        if tools.is_null() {
            body.remove("tools");
        } else {
            let Some(list) = tools.as_array_mut() else {
                return Err("`tools` must be an array".into());
            };
            let mut refused = Vec::new();
            list.retain(|t| {
                let ty = t.get("type").and_then(Value::as_str).unwrap_or("function");
                let ok = ty == "function" && t.get("function").is_some_and(Value::is_object);
                if !ok {
                    refused.push(ty.to_string());
                }
                ok
            });
            if !refused.is_empty() && opts.tool_policy == ToolPolicy::Refuse {
                return Err(format!(
                    "tools of type {refused:?} are not supported by this gateway (only function tools); \
                     start it with --drop-unsupported-tools to drop them"
                ));
            }
            if list.is_empty() {
                body.remove("tools");
                body.remove("tool_choice");
                body.remove("parallel_tool_calls");
            }
        }
    }
    if body.get("model").is_none_or(|m| !m.is_string()) {
        body.insert(
            "model".into(),
            json!(
                opts.default_model
                    .clone()
                    .unwrap_or_else(|| "default".into())
            ),
        );
    }
    if stream {
        let so = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Some(so) = so.as_object_mut() {
            so.insert("include_usage".into(), json!(true));
        } else {
            *so = json!({"include_usage": true});
        }
    } else {
        body.remove("stream_options");
    }
    body.insert("logprobs".into(), json!(true));
    if opts.upstream_token_ids {
        body.insert("return_token_ids".into(), json!(true));
    }
    Ok(NormInfo {
        stream,
        wants_logprobs,
        wants_usage_chunk,
    })
}

/// Removes token-level fields the caller did not ask for from a completion or a chunk.
pub fn strip_for_caller(v: &mut Value, keep_logprobs: bool) {
    let Some(o) = v.as_object_mut() else { return };
    o.remove("prompt_token_ids");
    o.remove("prompt_logprobs");
    if let Some(choices) = o.get_mut("choices").and_then(Value::as_array_mut) {
        for c in choices {
            if let Some(c) = c.as_object_mut() {
                c.remove("token_ids");
                c.remove("prompt_token_ids");
                if !keep_logprobs && c.contains_key("logprobs") {
                    c.insert("logprobs".into(), Value::Null);
                }
            }
        }
    }
}

#[derive(Default, Debug)]
struct ToolAcc {
    id: Option<String>,
    ty: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Default, Debug)]
struct ChoiceAcc {
    content: String,
    has_content: bool,
    reasoning: String,
    tool_calls: BTreeMap<u64, ToolAcc>,
    logprobs: Vec<Value>,
    has_logprobs: bool,
    token_ids: Vec<Value>,
    has_token_ids: bool,
    finish_reason: Value,
}

/// Assembles a stream of `chat.completion.chunk`s into one `chat.completion`.
#[derive(Default, Debug)]
pub struct Accumulator {
    id: Option<Value>,
    model: Option<Value>,
    created: Option<Value>,
    fingerprint: Option<Value>,
    prompt_token_ids: Option<Value>,
    choices: BTreeMap<u64, ChoiceAcc>,
    usage: Option<Value>,
    chunks: usize,
}

impl Accumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of chunks seen.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Adds one chunk.
    pub fn push(&mut self, chunk: &Value) {
        self.chunks += 1;
        let set = |slot: &mut Option<Value>, v: Option<&Value>| {
            if slot.is_none()
                && let Some(v) = v
                && !v.is_null()
            {
                *slot = Some(v.clone());
            }
        };
        set(&mut self.id, chunk.get("id"));
        set(&mut self.model, chunk.get("model"));
        set(&mut self.created, chunk.get("created"));
        set(&mut self.fingerprint, chunk.get("system_fingerprint"));
        set(&mut self.prompt_token_ids, chunk.get("prompt_token_ids"));
        if let Some(u) = chunk.get("usage")
            && !u.is_null()
        {
            self.usage = Some(u.clone());
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        for (pos, c) in choices.iter().enumerate() {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            if self.prompt_token_ids.is_none() {
                set(&mut self.prompt_token_ids, c.get("prompt_token_ids"));
            }
            let acc = self.choices.entry(idx).or_default();
            if let Some(d) = c.get("delta") {
                if let Some(t) = d.get("content").and_then(Value::as_str) {
                    acc.content.push_str(t);
                    acc.has_content = true;
                }
                for key in ["reasoning_content", "reasoning"] {
                    if let Some(t) = d.get(key).and_then(Value::as_str) {
                        acc.reasoning.push_str(t);
                    }
                }
                if let Some(tcs) = d.get("tool_calls").and_then(Value::as_array) {
                    for (tpos, tc) in tcs.iter().enumerate() {
                        let tidx = tc.get("index").and_then(Value::as_u64).unwrap_or_else(|| {
                            if tc.get("id").is_some_and(|i| !i.is_null()) {
                                acc.tool_calls.len() as u64 + tpos as u64
                            } else {
                                acc.tool_calls.len().saturating_sub(1) as u64
                            }
                        });
                        let t = acc.tool_calls.entry(tidx).or_default();
                        if let Some(id) = tc.get("id").and_then(Value::as_str) {
                            t.id = Some(id.to_string());
                        }
                        if let Some(ty) = tc.get("type").and_then(Value::as_str) {
                            t.ty = Some(ty.to_string());
                        }
                        if let Some(f) = tc.get("function") {
                            if let Some(n) = f.get("name").and_then(Value::as_str) {
                                t.name.push_str(n);
                            }
                            if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                                t.arguments.push_str(a);
                            }
                        }
                    }
                }
            }
            if let Some(lp) = c
                .get("logprobs")
                .and_then(|l| l.get("content"))
                .and_then(Value::as_array)
            {
                acc.logprobs.extend(lp.iter().cloned());
                acc.has_logprobs = true;
            }
            if let Some(ids) = c.get("token_ids").and_then(Value::as_array) {
                acc.token_ids.extend(ids.iter().cloned());
                acc.has_token_ids = true;
            }
            if let Some(fr) = c.get("finish_reason")
                && !fr.is_null()
            {
                acc.finish_reason = fr.clone();
            }
        }
    }

    /// The assembled `chat.completion`.
    pub fn finish(&self) -> Value {
        let mut choices = Vec::new();
        for (idx, c) in &self.choices {
            let mut msg = Map::new();
            msg.insert("role".into(), json!("assistant"));
            msg.insert(
                "content".into(),
                if c.has_content || c.tool_calls.is_empty() {
                    json!(c.content)
                } else {
                    Value::Null
                },
            );
            if !c.reasoning.is_empty() {
                msg.insert("reasoning_content".into(), json!(c.reasoning));
            }
            if !c.tool_calls.is_empty() {
                let tcs: Vec<Value> = c
                    .tool_calls
                    .iter()
                    .map(|(ti, t)| {
                        json!({
                            "id": t.id.clone().unwrap_or_else(|| format!("call_{idx}_{ti}")),
                            "type": t.ty.clone().unwrap_or_else(|| "function".into()),
                            "function": {"name": t.name, "arguments": t.arguments},
                        })
                    })
                    .collect();
                msg.insert("tool_calls".into(), Value::Array(tcs));
            }
            let mut choice = Map::new();
            choice.insert("index".into(), json!(idx));
            choice.insert("message".into(), Value::Object(msg));
            choice.insert(
                "logprobs".into(),
                if c.has_logprobs {
                    json!({"content": c.logprobs})
                } else {
                    Value::Null
                },
            );
            choice.insert("finish_reason".into(), c.finish_reason.clone());
            if c.has_token_ids {
                choice.insert("token_ids".into(), Value::Array(c.token_ids.clone()));
            }
            choices.push(Value::Object(choice));
        }
        let mut out = Map::new();
        out.insert(
            "id".into(),
            self.id.clone().unwrap_or_else(|| json!("chatcmpl-arbor")),
        );
        out.insert("object".into(), json!("chat.completion"));
        out.insert("created".into(), self.created.clone().unwrap_or(json!(0)));
        out.insert("model".into(), self.model.clone().unwrap_or(json!("")));
        if let Some(f) = &self.fingerprint {
            out.insert("system_fingerprint".into(), f.clone());
        }
        out.insert("choices".into(), Value::Array(choices));
        out.insert("usage".into(), self.usage.clone().unwrap_or(Value::Null));
        if let Some(p) = &self.prompt_token_ids {
            out.insert("prompt_token_ids".into(), p.clone());
        }
        Value::Object(out)
    }
}

/// Turns a complete `chat.completion` into the chunks a streaming upstream would have sent
/// (used when a caller asked for a stream and the upstream answered with plain JSON).
pub fn synth_chunks(full: &Value) -> Vec<Value> {
    let base = |choices: Value| {
        let mut o = Map::new();
        o.insert(
            "id".into(),
            full.get("id").cloned().unwrap_or(json!("chatcmpl-arbor")),
        );
        o.insert("object".into(), json!("chat.completion.chunk"));
        o.insert(
            "created".into(),
            full.get("created").cloned().unwrap_or(json!(0)),
        );
        o.insert(
            "model".into(),
            full.get("model").cloned().unwrap_or(json!("")),
        );
        o.insert("choices".into(), choices);
        o
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    let choices = full
        .get("choices")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (pos, c) in choices.iter().enumerate() {
        let idx = c.get("index").cloned().unwrap_or(json!(pos));
        let msg = c.get("message").cloned().unwrap_or(json!({}));
        let mut delta = Map::new();
        delta.insert("role".into(), json!("assistant"));
        delta.insert(
            "content".into(),
            msg.get("content").cloned().unwrap_or(json!("")),
        );
        if let Some(r) = msg.get("reasoning_content") {
            delta.insert("reasoning_content".into(), r.clone());
        }
        let mut first = Map::new();
        first.insert("index".into(), idx.clone());
        first.insert("delta".into(), Value::Object(delta));
        first.insert(
            "logprobs".into(),
            c.get("logprobs").cloned().unwrap_or(Value::Null),
        );
        first.insert("finish_reason".into(), Value::Null);
        if let Some(t) = c.get("token_ids") {
            first.insert("token_ids".into(), t.clone());
        }
        let mut o = base(json!([Value::Object(first)]));
        if pos == 0
            && let Some(p) = full.get("prompt_token_ids")
        {
            o.insert("prompt_token_ids".into(), p.clone());
        }
        out.push(Value::Object(o));
        if let Some(tcs) = msg.get("tool_calls").and_then(Value::as_array) {
            let deltas: Vec<Value> = tcs
                .iter()
                .enumerate()
                .map(|(i, tc)| {
                    json!({"index": i, "id": tc.get("id"), "type": "function",
                           "function": tc.get("function")})
                })
                .collect();
            out.push(Value::Object(base(
                json!([{"index": idx, "delta": {"tool_calls": deltas}, "logprobs": null, "finish_reason": null}]),
            )));
        }
        out.push(Value::Object(base(json!([{
            "index": idx, "delta": {}, "logprobs": null,
            "finish_reason": c.get("finish_reason").cloned().unwrap_or(json!("stop"))
        }]))));
    }
    if let Some(u) = full.get("usage")
        && !u.is_null()
    {
        let mut o = base(json!([]));
        o.insert("usage".into(), u.clone());
        out.push(Value::Object(o));
    }
    out
}

fn as_ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// Token ids and logprobs returned by the upstream, if it returned ids for the prompt and for
/// every choice (`prompt_token_ids` + `token_ids`, or logprob tokens of the form `token_id:N`).
pub fn upstream_tokens(full: &Value) -> Option<(Vec<u32>, Vec<CompletionTokens>)> {
    let choices = full.get("choices")?.as_array()?;
    let prompt = full
        .get("prompt_token_ids")
        .and_then(as_ids)
        .or_else(|| choices.first()?.get("prompt_token_ids").and_then(as_ids))?;
    let mut comps = Vec::new();
    for (pos, c) in choices.iter().enumerate() {
        let lp = c
            .get("logprobs")
            .and_then(|l| l.get("content"))
            .and_then(Value::as_array);
        let ids = match c.get("token_ids").and_then(as_ids) {
            Some(ids) => ids,
            None => lp?
                .iter()
                .map(|e| {
                    e.get("token")?
                        .as_str()?
                        .strip_prefix("token_id:")?
                        .parse::<u32>()
                        .ok()
                })
                .collect::<Option<Vec<u32>>>()?,
        };
        let logprobs = lp.and_then(|lp| {
            let v: Option<Vec<f32>> = lp
                .iter()
                .map(|e| e.get("logprob").and_then(Value::as_f64).map(|x| x as f32))
                .collect();
            v.filter(|v| v.len() == ids.len())
        });
        comps.push(CompletionTokens {
            index: c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64) as u32,
            ids,
            logprobs,
            text: message_text(c),
            finish_reason: c
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(String::from),
        });
    }
    Some((prompt, comps))
}

/// The content text of a choice.
pub fn message_text(choice: &Value) -> String {
    choice
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Logprobs of a choice, one per returned token, if present.
pub fn choice_logprobs(choice: &Value) -> Option<Vec<f32>> {
    choice
        .get("logprobs")?
        .get("content")?
        .as_array()?
        .iter()
        .map(|e| e.get("logprob").and_then(Value::as_f64).map(|x| x as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_text_and_tool_calls() {
        let mut acc = Accumulator::new();
        acc.push(
            &json!({"id":"c1","model":"m","created":1,"prompt_token_ids":[1,2],
            "choices":[{"index":0,"delta":{"role":"assistant","content":"He"},"token_ids":[5],
            "logprobs":{"content":[{"token":"He","logprob":-0.5}]}}]}),
        );
        acc.push(
            &json!({"id":"c1","choices":[{"index":0,"delta":{"content":"y"},"token_ids":[6],
            "logprobs":{"content":[{"token":"y","logprob":-0.25}]}}]}),
        );
        acc.push(&json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}));
        acc.push(&json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}));
        acc.push(
            &json!({"id":"c1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}),
        );
        let full = acc.finish();
        assert_eq!(full["choices"][0]["message"]["content"], "Hey");
        assert_eq!(
            full["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(full["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(full["usage"]["completion_tokens"], 2);
        let (p, c) = upstream_tokens(&full).unwrap();
        assert_eq!(p, vec![1, 2]);
        assert_eq!(c[0].ids, vec![5, 6]);
        assert_eq!(c[0].logprobs, Some(vec![-0.5, -0.25]));
        // Round trip through synthesized chunks.
        let mut acc2 = Accumulator::new();
        for ch in synth_chunks(&full) {
            acc2.push(&ch);
        }
        assert_eq!(acc2.finish(), full);
    }

    #[test]
    fn token_id_strings() {
        let full = json!({"prompt_token_ids":[3],"choices":[{"index":0,"message":{"content":"x"},
            "logprobs":{"content":[{"token":"token_id:42","logprob":-1.0}]},"finish_reason":"stop"}]});
        let (_, c) = upstream_tokens(&full).unwrap();
        assert_eq!(c[0].ids, vec![42]);
    }

    #[test]
    fn normalize_tolerates_agent_shapes() {
        let mut b = json!({"messages":[{"role":"developer","content":"d"},{"role":"assistant"},
            {"role":"assistant","tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{}"}}]}],
            "tools":[{"type":"function","function":{"name":"f"}},{"type":"web_search"}],"stream":true,"reasoning":{"effort":"high"}});
        let o = b.as_object_mut().unwrap();
        assert!(normalize(o, &NormOptions::default()).is_err());
        let opts = NormOptions {
            tool_policy: ToolPolicy::Drop,
            ..Default::default()
        };
        let info = normalize(o, &opts).unwrap();
        assert!(info.stream && !info.wants_logprobs && !info.wants_usage_chunk);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "");
        assert!(b["messages"][2]["content"].is_null());
        assert_eq!(b["tools"].as_array().unwrap().len(), 1);
        assert_eq!(b["reasoning"]["effort"], "high");
        assert_eq!(b["stream_options"]["include_usage"], true);
    }
}
