//! Responses tools for a Chat Completions upstream: function tools take the Chat shape,
//! other tools are refused or dropped by policy, and `namespace` tools are flattened.
//!
//! Codex groups tools into namespaces (`{"type": "namespace", "name": "mcp__fs__",
//! "tools": [{"type": "function", "name": "read", ...}]}`) and expects the model's calls back as
//! `{"type": "function_call", "namespace": "mcp__fs__", "name": "read", ...}`. Chat Completions
//! has no namespaces, so each nested function is offered upstream under one flat name and the
//! model's calls of that name are split back into (namespace, name).
//!
//! The flat name is the namespace joined to the tool's name (`mcp__fs__` + `read` =
//! `mcp__fs__read`, the name such tools had before namespaces existed; a namespace that does
//! not end in `_` is joined with `__`), with characters outside `[A-Za-z0-9_-]` replaced by
//! `_`. A name longer than 64 characters, or one that clashes with another tool, is cut and
//! given a hash of (namespace, name) instead, so every name is unique and valid upstream. The
//! mapping is computed from the request's own tool list, so the same tools give the same
//! names on every call of a session (prompts keep extending each other).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};

use crate::chat::{NormOptions, ToolPolicy};

/// Longest function name OpenAI-compatible upstreams accept.
pub const MAX_NAME_LEN: usize = 64;

/// The flat names of a request's namespaced function tools, both ways.
#[derive(Debug, Default, Clone)]
pub struct ToolNames {
    flat: HashMap<(String, String), String>,
    split: HashMap<String, (String, String)>,
}

impl ToolNames {
    /// The names of every function tool nested in a `namespace` tool of `req["tools"]`.
    pub fn from_request(req: &Value) -> Self {
        let empty = Vec::new();
        let tools = req.get("tools").and_then(Value::as_array).unwrap_or(&empty);
        // Plain function tools keep their names; namespaced names must avoid them.
        let mut taken: HashSet<String> = tools
            .iter()
            .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
            .filter_map(|t| t.get("name").and_then(Value::as_str).map(String::from))
            .collect();
        let mut names = ToolNames::default();
        for (ns, name) in tools.iter().flat_map(nested_functions) {
            let key = (ns.to_string(), name.to_string());
            if names.flat.contains_key(&key) {
                continue;
            }
            let mut flat = flat_name(ns, name);
            if flat.len() > MAX_NAME_LEN || taken.contains(&flat) {
                flat = hashed_name(&flat, ns, name);
            }
            taken.insert(flat.clone());
            names.split.insert(flat.clone(), key.clone());
            names.flat.insert(key, flat);
        }
        names
    }

    /// Whether the request has no namespaced tools.
    pub fn is_empty(&self) -> bool {
        self.flat.is_empty()
    }

    /// The upstream name of tool `name` in namespace `ns`. A pair the request's tools do not
    /// list (a call in the history whose tool is gone) gets the plain joined name.
    pub fn flat(&self, ns: &str, name: &str) -> String {
        self.flat
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_else(|| flat_name(ns, name))
    }

    /// The (namespace, name) an upstream tool name stands for, if it is a namespaced tool.
    pub fn split(&self, flat: &str) -> Option<(&str, &str)> {
        self.split
            .get(flat)
            .map(|(ns, name)| (ns.as_str(), name.as_str()))
    }
}

/// Function tools keep their fields, and so do the function tools of a namespace, under their
/// flat names (other tools are refused or dropped by policy); the tool choice and
/// `parallel_tool_calls` follow when any tool is left.
pub(super) fn insert_tools(
    obj: &Map<String, Value>,
    opts: &NormOptions,
    names: &ToolNames,
    body: &mut Map<String, Value>,
) -> Result<(), String> {
    let Some(tools) = obj.get("tools").and_then(Value::as_array) else {
        return Ok(());
    };
    let mut out = Vec::new();
    for t in tools {
        match t.get("type").and_then(Value::as_str).unwrap_or("") {
            "function" => out.push(function_tool(t, None)),
            "namespace" => {
                let ns = t.get("name").and_then(Value::as_str).unwrap_or("");
                for inner in t
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match inner.get("type").and_then(Value::as_str).unwrap_or("") {
                        "function" => {
                            let name = inner.get("name").and_then(Value::as_str).unwrap_or("");
                            out.push(function_tool(inner, Some(names.flat(ns, name))));
                        }
                        ty => refuse_by_policy(
                            opts,
                            &format!("tool type `{ty}` in namespace `{ns}`"),
                        )?,
                    }
                }
            }
            ty => refuse_by_policy(opts, &format!("tool type `{ty}`"))?,
        }
    }
    if !out.is_empty() {
        body.insert("tools".into(), Value::Array(out));
        if let Some(tc) = obj.get("tool_choice") {
            body.insert("tool_choice".into(), tool_choice(tc, names));
        }
        if let Some(p) = obj.get("parallel_tool_calls") {
            body.insert("parallel_tool_calls".into(), p.clone());
        }
    }
    Ok(())
}

/// A Responses function tool in the Chat shape, under `name` when given.
fn function_tool(t: &Value, name: Option<String>) -> Value {
    let mut f = Map::new();
    for k in ["name", "description", "parameters", "strict"] {
        if let Some(v) = t.get(k)
            && !v.is_null()
        {
            f.insert(k.into(), v.clone());
        }
    }
    if let Some(n) = name {
        f.insert("name".into(), json!(n));
    }
    json!({"type": "function", "function": Value::Object(f)})
}

/// A tool that is not a function: an error unless the policy drops such tools.
fn refuse_by_policy(opts: &NormOptions, what: &str) -> Result<(), String> {
    if opts.tool_policy == ToolPolicy::Refuse {
        return Err(format!(
            "{what} is not supported by this gateway (only function tools, also \
             inside namespaces); start it with --drop-unsupported-tools to drop such tools"
        ));
    }
    Ok(())
}

/// A string tool choice passes through; `{"type": "function", "name"}` (with a `namespace`
/// for a namespaced tool) takes the Chat shape; anything else is `auto`.
fn tool_choice(tc: &Value, names: &ToolNames) -> Value {
    match tc {
        Value::String(_) => tc.clone(),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("name").and_then(Value::as_str).unwrap_or("");
            let name = match o.get("namespace").and_then(Value::as_str) {
                Some(ns) => names.flat(ns, name),
                None => name.to_string(),
            };
            json!({"type": "function", "function": {"name": name}})
        }
        _ => json!("auto"),
    }
}

/// (namespace, name) of each function tool nested in `tool` (none unless it is a namespace).
fn nested_functions(tool: &Value) -> Vec<(&str, &str)> {
    if tool.get("type").and_then(Value::as_str) != Some("namespace") {
        return Vec::new();
    }
    let ns = tool.get("name").and_then(Value::as_str).unwrap_or("");
    tool.get("tools")
        .and_then(Value::as_array)
        .map(|inner| {
            inner
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .map(|name| (ns, name))
                .collect()
        })
        .unwrap_or_default()
}

/// `ns` joined to `name` (directly when `ns` ends in `_`, else with `__`), characters outside
/// `[A-Za-z0-9_-]` replaced by `_`.
pub fn flat_name(ns: &str, name: &str) -> String {
    let joined = if ns.is_empty() || ns.ends_with('_') {
        format!("{ns}{name}")
    } else {
        format!("{ns}__{name}")
    };
    joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `flat` cut to fit [`MAX_NAME_LEN`] with `_` and 8 hex digits of a hash of (ns, name).
fn hashed_name(flat: &str, ns: &str, name: &str) -> String {
    let hash = fnv1a(ns.bytes().chain([0]).chain(name.bytes()));
    let keep = MAX_NAME_LEN - 9;
    // `flat` is ASCII (see `flat_name`), so any byte index is a char boundary.
    format!("{}_{:08x}", &flat[..flat.len().min(keep)], hash as u32)
}

/// 64-bit FNV-1a: stable across runs and platforms (names must not change between calls).
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_joined_valid_and_unique() {
        let long = "x".repeat(70);
        let req = json!({"tools": [
            {"type": "function", "name": "mcp__fs__read"},
            {"type": "namespace", "name": "mcp__fs__", "tools": [
                {"type": "function", "name": "read"},
                {"type": "function", "name": "write"},
                {"type": "custom", "name": "patch"}]},
            {"type": "namespace", "name": "web", "tools": [{"type": "function", "name": "run.v2"}]},
            {"type": "namespace", "name": "big", "tools": [{"type": "function", "name": long}]}]});
        let n = ToolNames::from_request(&req);
        assert_eq!(n.flat("mcp__fs__", "write"), "mcp__fs__write");
        assert_eq!(n.flat("web", "run.v2"), "web__run_v2");
        // Clashes with the plain `mcp__fs__read` tool: hashed, and still maps back.
        let read = n.flat("mcp__fs__", "read");
        assert_ne!(read, "mcp__fs__read");
        assert!(
            read.starts_with("mcp__fs__read_") && read.len() == 22,
            "{read}"
        );
        assert_eq!(n.split(&read), Some(("mcp__fs__", "read")));
        let big = n.flat("big", &long);
        assert_eq!(big.len(), MAX_NAME_LEN);
        assert_eq!(n.split(&big), Some(("big", long.as_str())));
        // Custom tools inside a namespace are not functions.
        assert_eq!(n.split("mcp__fs__patch"), None);
        assert_eq!(n.split("mcp__fs__read"), None);
        // The same tools give the same names.
        assert_eq!(ToolNames::from_request(&req).flat("big", &long), big);
        assert_eq!(n.flat("gone", "tool"), "gone__tool");
    }
}
