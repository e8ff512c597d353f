//! A minimal OpenAI Chat Completions client: what a scaffold needs, and
//! tolerant of what real servers send back.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::AgentError;

/// One chat message (request or reply).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with text content.
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(content.into()),
            ..Default::default()
        }
    }

    /// A tool result.
    pub fn tool(call_id: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: "tool".into(),
            content: Some(content.into()),
            tool_call_id: Some(call_id.into()),
            ..Default::default()
        }
    }
}

/// An assistant's function call; `arguments` is a JSON string, as on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

/// Name and JSON-string arguments of a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// What the scaffold keeps of a reply.
#[derive(Debug, Clone)]
pub struct ChatResponse {
    pub message: ChatMessage,
    pub finish_reason: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Time the policy behind the gateway took, as the gateway reports it
    /// (`x-arbor-upstream-ms`); `None` when the endpoint is not an arbor gateway.
    pub upstream_ms: Option<f64>,
}

/// Client for one endpoint (in arbor, a gateway session URL).
#[derive(Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
}

impl ChatClient {
    /// `base_url` ends with `/v1` (e.g. `http://127.0.0.1:8080/s/<session>/v1`).
    pub fn new(
        base_url: impl Into<String>,
        api_key: impl Into<String>,
        model: impl Into<String>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap_or_default();
        ChatClient {
            http,
            base_url: base_url.into().trim_end_matches('/').to_string(),
            api_key: api_key.into(),
            model: model.into(),
            max_tokens: None,
            temperature: None,
        }
    }

    /// The endpoint's base URL (ends with `/v1`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The key sent as bearer token (in arbor, the gateway session).
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// The model name sent with requests.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Cap completion length per call.
    pub fn with_max_tokens(mut self, n: Option<u32>) -> Self {
        self.max_tokens = n;
        self
    }

    /// Sampling temperature sent with every request (`None`: the server's default).
    pub fn with_temperature(mut self, t: Option<f32>) -> Self {
        self.temperature = t;
        self
    }

    /// Per-request timeout.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.http = reqwest::Client::builder()
            .timeout(t)
            .build()
            .unwrap_or_default();
        self
    }

    /// One non-streaming completion. `turn` is sent as request metadata so
    /// the gateway's records carry the scaffold's turn index.
    pub async fn complete(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
        turn: u32,
    ) -> Result<ChatResponse, AgentError> {
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "metadata": {"arbor_turn": turn.to_string()},
        });
        if let Some(t) = tools {
            body["tools"] = t.clone();
        }
        if let Some(n) = self.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        let resp = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .map_err(|e| AgentError::Model(format!("request: {e}")))?;
        let status = resp.status();
        let upstream_ms = resp
            .headers()
            .get("x-arbor-upstream-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let text = resp
            .text()
            .await
            .map_err(|e| AgentError::Model(format!("reading reply: {e}")))?;
        if !status.is_success() {
            return Err(AgentError::Model(format!(
                "HTTP {status}: {}",
                truncate(&text, 500)
            )));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            AgentError::Model(format!("reply is not JSON ({e}): {}", truncate(&text, 200)))
        })?;
        let choice = v.get("choices").and_then(|c| c.get(0)).ok_or_else(|| {
            AgentError::Model(format!("reply has no choices: {}", truncate(&text, 200)))
        })?;
        let mut message: ChatMessage =
            serde_json::from_value(choice.get("message").cloned().unwrap_or(Value::Null))
                .map_err(|e| AgentError::Model(format!("reply message: {e}")))?;
        message.role = "assistant".into();
        let usage = v.get("usage");
        let n = |k: &str| {
            usage
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Ok(ChatResponse {
            message,
            finish_reason: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(String::from),
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
            upstream_ms,
        })
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
