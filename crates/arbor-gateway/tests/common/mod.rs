//! Shared test support: a stand-in upstream plus an in-process gateway on loopback, and a small
//! byte-level BPE tokenizer with a ChatML template (written to a directory the test owns).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use arbor_gateway::standin::{self, Standin, StandinConfig};
use arbor_gateway::{GatewayConfig, RunningGateway, start};
use serde_json::{Value, json};

pub struct Env {
    pub gw: RunningGateway,
    pub standins: Vec<Standin>,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

impl Env {
    pub async fn new() -> Env {
        Self::with(vec![StandinConfig::default()], |_| {}).await
    }

    pub async fn with(cfgs: Vec<StandinConfig>, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
        let mut standins = Vec::new();
        for c in cfgs {
            standins.push(
                standin::spawn(([127, 0, 0, 1], 0).into(), c)
                    .await
                    .expect("stand-in"),
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = GatewayConfig::new(
            ([127, 0, 0, 1], 0).into(),
            standins.iter().map(|s| s.url()).collect(),
            dir.path().join("store"),
        );
        tweak(&mut cfg);
        let gw = start(cfg).await.expect("gateway");
        Env {
            gw,
            standins,
            dir,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.gw.url(), path)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POST and return the raw SSE text.
    pub async fn post_stream(&self, path: &str, body: &Value) -> (u16, String) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("get");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn calls(&self, session: &str) -> Vec<Value> {
        let (s, v) = self.get(&format!("/sessions/{session}")).await;
        assert_eq!(s, 200, "session {session}: {v}");
        v["calls"].as_array().cloned().unwrap_or_default()
    }
}

/// Data payloads (and event names) of an SSE text.
pub fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    let mut p = arbor_gateway::sse::SseParser::new();
    p.push(text.as_bytes())
        .into_iter()
        .map(|e| (e.event, e.data))
        .collect()
}

/// Decodes stand-in token ids (bytes; 256/257 are the ChatML markers).
pub fn standin_decode(ids: &[u64]) -> String {
    let mut bytes = Vec::new();
    for &i in ids {
        match i {
            256 => bytes.extend_from_slice(b"<|im_start|>"),
            257 => bytes.extend_from_slice(b"<|im_end|>"),
            b => bytes.push(b as u8),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Checks a recorded call's tokens against its response text (stand-in ids are bytes).
pub fn check_standin_tokens(call: &Value) {
    let t = &call["tokens"];
    assert_eq!(t["source"], "upstream", "{call}");
    let c = &t["completions"][0];
    let cids = ids(&c["ids"]);
    assert!(!cids.is_empty());
    assert_eq!(
        *cids.last().unwrap(),
        257,
        "completion ends with <|im_end|>"
    );
    let decoded = standin_decode(&cids[..cids.len() - 1]);
    let text = c["text"].as_str().unwrap_or("");
    assert!(
        decoded.contains(text),
        "completion ids {decoded:?} vs text {text:?}"
    );
    let lps = c["logprobs"]
        .as_array()
        .expect("completion logprobs present");
    assert_eq!(lps.len(), cids.len());
    assert!(lps.iter().all(|l| l.as_f64().is_some_and(|x| x < 0.0)));
    let prompt = standin_decode(&ids(&t["prompt"]));
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
}

const BYTE_RANGES: [(u32, u32); 3] = [(33, 126), (161, 172), (174, 255)];

fn bytes_to_unicode() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut printable = vec![false; 256];
    for (a, b) in BYTE_RANGES {
        for x in a..=b {
            printable[x as usize] = true;
            map[x as usize] = char::from_u32(x).unwrap();
        }
    }
    let mut n = 0;
    for b in 0..256usize {
        if !printable[b] {
            map[b] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    map
}

pub const CHATML_TOOLS_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Writes tokenizer.json (byte-level BPE with a few merges and ChatML special tokens) and
/// tokenizer_config.json (with the ChatML + tools template) into `dir`.
pub fn write_tokenizer(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let b2u = bytes_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (b, c) in b2u.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let sp = b2u[b' ' as usize].to_string();
    let nl = b2u[b'\n' as usize].to_string();
    let pairs: Vec<(String, String)> = [
        (sp.as_str(), "t"),
        ("h", "e"),
        ("i", "n"),
        ("e", "r"),
        ("o", "n"),
        ("r", "e"),
        ("a", "t"),
        (sp.as_str(), "a"),
        (sp.as_str(), "s"),
        (sp.as_str(), "w"),
        ("o", "u"),
        ("e", "n"),
        ("s", "t"),
        ("o", "r"),
        ("a", "n"),
        ("in", "g"),
        ("a", "l"),
        ("\"", ":"),
        ("o", "l"),
        ("t", "o"),
        (nl.as_str(), nl.as_str()),
        ("u", "s"),
        ("e", "d"),
        ("l", "e"),
        ("a", "r"),
        ("i", "s"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let mut merges = Vec::new();
    let mut next = 256u32;
    for (a, b) in pairs {
        let m = format!("{a}{b}");
        if vocab.contains_key(&m) {
            continue;
        }
        vocab.insert(m, json!(next));
        merges.push(json!(format!("{a} {b}")));
        next += 1;
    }
    // A second-level merge ("Ġt" + "he").
    let the = format!("{sp}t");
    vocab.insert(format!("{the}he"), json!(next));
    merges.push(json!(format!("{the} he")));
    next += 1;
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": next + i as u32, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec_pretty(&tok).unwrap(),
    )
    .unwrap();
    let mut decoder = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        decoder.insert(
            (next + i as u32).to_string(),
            json!({"content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHATML_TOOLS_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// Runs a Python script from tests/py with env vars; panics with its output on failure.
/// A missing SDK makes the script exit with a message naming the pip package: the test fails.
pub async fn run_python(script: &str, envs: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(&path).env("PYTHONDONTWRITEBYTECODE", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run python3 (install Python 3): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}
