//! Tokenization with the model's `tokenizer.json` and its Jinja chat template, rendered the way
//! Hugging Face `transformers`' `apply_chat_template` renders it; [`byte_chat`] is arbor's own
//! byte-level format (scripted oracle, embedded policy).

pub use arbor_trace::byte_chat;

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value};

use crate::error::GatewayError;

/// A tokenizer plus chat template loaded from a model directory.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    env: Environment<'static>,
    has_tool_template: bool,
    special: Map<String, Value>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .finish()
    }
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// Serializes like Python's `json.dumps(x, ensure_ascii=False, indent=indent)`.
pub fn python_json(v: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    dump(v, indent, 0, &mut out);
    out
}

fn dump(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                sep(i, indent, depth + 1, out);
                dump(x, indent, depth + 1, out);
            }
            close(indent, depth, out);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                sep(i, indent, depth + 1, out);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                dump(x, indent, depth + 1, out);
            }
            close(indent, depth, out);
            out.push('}');
        }
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

fn sep(i: usize, indent: Option<usize>, depth: usize, out: &mut String) {
    match indent {
        None => {
            if i > 0 {
                out.push_str(", ");
            }
        }
        Some(n) => {
            if i > 0 {
                out.push(',');
            }
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }
}

fn close(indent: Option<usize>, depth: usize, out: &mut String) {
    if let Some(n) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
}

fn tojson(value: minijinja::Value, kwargs: Kwargs) -> Result<minijinja::Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<minijinja::Value> = kwargs.get("separators")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut v = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort == Some(true) {
        v = sort_keys(v);
    }
    Ok(minijinja::Value::from_safe_string(python_json(&v, indent)))
}

fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut items: Vec<(String, Value)> = o.into_iter().collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(items.into_iter().map(|(k, v)| (k, sort_keys(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

fn read_json(path: &Path) -> Result<Value, GatewayError> {
    let text = std::fs::read_to_string(path).map_err(|source| GatewayError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(serde_json::from_str(&text)?)
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and the chat template (`chat_template.jinja`, or `chat_template`
    /// in `tokenizer_config.json`, a string or a list of named templates) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, GatewayError> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| GatewayError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            Value::Object(Map::new())
        };
        let mut templates: Vec<(String, String)> = Vec::new();
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let t = std::fs::read_to_string(&jinja).map_err(|source| GatewayError::Path {
                path: jinja.clone(),
                source,
            })?;
            templates.push(("default".into(), t));
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => templates.push(("default".into(), s.clone())),
                Some(Value::Array(list)) => {
                    for t in list {
                        if let (Some(n), Some(s)) = (
                            t.get("name").and_then(Value::as_str),
                            t.get("template").and_then(Value::as_str),
                        ) {
                            templates.push((n.to_string(), s.to_string()));
                        }
                    }
                }
                _ => {}
            }
        }
        if !templates.iter().any(|(n, _)| n == "default") {
            return Err(GatewayError::Template(format!(
                "no chat template in {} (chat_template.jinja or tokenizer_config.json)",
                dir.display()
            )));
        }
        let mut special = Map::new();
        for key in [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ] {
            if let Some(c) = config.get(key).and_then(token_content) {
                special.insert(key.into(), Value::String(c));
            }
        }
        Self::new(tokenizer, templates, special)
    }

    fn new(
        tokenizer: tokenizers::Tokenizer,
        templates: Vec<(String, String)>,
        special: Map<String, Value>,
    ) -> Result<Self, GatewayError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date"; a fixed format keeps records reproducible.
            let _ = fmt;
            String::new()
        });
        let mut has_tool_template = false;
        for (name, src) in templates {
            has_tool_template |= name == "tool_use";
            env.add_template_owned(name.clone(), src)
                .map_err(|e| GatewayError::Template(format!("template `{name}`: {e:#}")))?;
        }
        Ok(Self {
            tokenizer,
            env,
            has_tool_template,
            special,
        })
    }

    /// Prepares OpenAI-shaped messages the way inference servers do before templating:
    /// tool-call arguments (JSON strings) become objects, text-part arrays become strings.
    pub fn prepare_messages(messages: &[Value]) -> Vec<Value> {
        messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(o) = m.as_object_mut() {
                    if let Some(Value::Array(parts)) = o.get("content")
                        && parts
                            .iter()
                            .all(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                    {
                        let text: Vec<&str> = parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect();
                        let joined = text.join("\n");
                        o.insert("content".into(), Value::String(joined));
                    }
                    if let Some(tcs) = o.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        for tc in tcs {
                            if let Some(f) = tc.get_mut("function").and_then(Value::as_object_mut)
                                && let Some(Value::String(a)) = f.get("arguments")
                                && let Ok(parsed @ Value::Object(_)) =
                                    serde_json::from_str::<Value>(a)
                            {
                                f.insert("arguments".into(), parsed);
                            }
                        }
                    }
                }
                m
            })
            .collect()
    }

    /// Renders the chat template (messages already prepared, see [`Self::prepare_messages`]).
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, GatewayError> {
        let name = if tools.is_some() && self.has_tool_template {
            "tool_use"
        } else {
            "default"
        };
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| GatewayError::Template(format!("{e:#}")))?;
        let mut ctx = self.special.clone();
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        ctx.insert(
            "tools".into(),
            tools.map_or(Value::Null, |t| Value::Array(t.to_vec())),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        tmpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| GatewayError::Template(format!("{e:#}")))
    }

    /// Encodes text without adding special tokens (as `apply_chat_template` does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, GatewayError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| GatewayError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, GatewayError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| GatewayError::Tokenizer(e.to_string()))
    }

    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=True)`
    /// for OpenAI-shaped messages.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, GatewayError> {
        let prepared = Self::prepare_messages(messages);
        let text = self.render(&prepared, tools, add_generation_prompt)?;
        self.encode(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_matches_json_dumps() {
        let v = json!({"b": 1, "a": [1, "x\n\"é", {}], "c": {"d": null, "e": true}});
        assert_eq!(
            python_json(&v, None),
            r#"{"b": 1, "a": [1, "x\n\"é", {}], "c": {"d": null, "e": true}}"#
        );
        assert_eq!(
            python_json(&json!({"a": [1, 2]}), Some(2)),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
    }
}
