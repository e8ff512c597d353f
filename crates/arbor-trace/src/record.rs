//! The record of one model call, as the gateway stores it: one JSON line per call in
//! `calls.jsonl` ([`crate::store::LOG_FILE`]).
//!
//! A record holds the call as the caller sent it and as the upstream answered, plus its
//! token-level view ([`Tokens`]: prompt ids, completion ids and behaviour logprobs per choice)
//! and how its prompt relates to the session's earlier calls ([`Branch`]). The gateway writes
//! records; everything downstream (trees, SFT, RL) reads only these token fields.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the record format written by this gateway.
pub const RECORD_VERSION: u32 = 1;

/// Which caller-facing API a request came in on (recorded with each call; the gateway also
/// picks its error shape by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    Chat,
    /// Anthropic Messages (`/v1/messages`).
    Messages,
    /// OpenAI Responses (`/v1/responses`).
    Responses,
}

impl Api {
    /// Short name used in metrics labels and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Messages => "messages",
            Api::Responses => "responses",
        }
    }
}

/// Everything recorded about one model call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub v: u32,
    /// Unique id: `{session}/{index}`.
    pub id: String,
    /// Session id.
    pub session: String,
    /// Index of the call in its session (0, 1, 2, ... in recording order).
    pub index: u32,
    /// Caller-facing API the call came in on.
    pub api: Api,
    /// Whether the caller asked for a stream.
    pub stream: bool,
    /// Wall-clock start (ms since the Unix epoch), when the request arrived.
    pub started_ms: u64,
    /// Wall-clock end (ms since the Unix epoch), when the upstream's answer was complete.
    pub finished_ms: u64,
    /// Base URL of the upstream that answered.
    pub upstream: String,
    /// The upstream's id of the completion (e.g. `chatcmpl-...`).
    pub upstream_id: Option<String>,
    /// Model name reported by the upstream.
    pub model: Option<String>,
    /// The request exactly as the caller sent it (unknown fields included).
    pub request: Value,
    /// The Chat Completions request sent to the upstream.
    pub upstream_request: Value,
    /// The full response in the caller's API shape (for streams: the assembled final object),
    /// without token-level fields (those are in `tokens`).
    pub response: Value,
    /// Token usage as reported by the upstream (Chat Completions shape).
    pub usage: Option<Value>,
    /// Token ids and logprobs.
    pub tokens: Tokens,
    /// Branch detection against earlier calls of the session; `None` for a session's first call
    /// or when no token ids are known.
    pub branch: Option<Branch>,
}

/// Where a record's token ids come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// Returned by the upstream (`prompt_token_ids`, `token_ids`, or `token_id:N` logprob tokens).
    Upstream,
    /// Computed by the gateway with the model's tokenizer and chat template.
    Tokenizer,
    /// Unknown: the upstream returned no ids and no tokenizer is configured.
    None,
}

/// Token-level view of a call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tokens {
    /// Where the ids come from.
    pub source: TokenSource,
    /// Prompt token ids (the rendered chat template, generation prompt included).
    pub prompt: Vec<u32>,
    /// One entry per choice.
    pub completions: Vec<CompletionTokens>,
}

/// Token-level view of one choice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionTokens {
    /// Choice index.
    pub index: u32,
    /// Completion token ids.
    pub ids: Vec<u32>,
    /// Behaviour-policy logprob of each completion token, when known (same length as `ids`).
    pub logprobs: Option<Vec<f32>>,
    /// The completion text (content only; tool calls are in the response).
    pub text: String,
    /// Finish reason (Chat Completions vocabulary).
    pub finish_reason: Option<String>,
}

/// How a call's prompt relates to the earlier calls of its session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Branch {
    /// The previous call (index - 1).
    pub previous: u32,
    /// True when this prompt starts with the previous call's prompt + completion (choice 0).
    pub extends_previous: bool,
    /// Length of the common token prefix with the previous call's prompt + completion.
    pub shared_prefix: usize,
    /// The earlier call whose prompt + completion is the longest prefix of this prompt, if any.
    pub parent: Option<u32>,
}

impl CallRecord {
    /// Prompt + completion tokens of choice `choice` (the linear trajectory of that choice).
    pub fn sequence(&self, choice: usize) -> Vec<u32> {
        let mut s = self.tokens.prompt.clone();
        if let Some(c) = self.tokens.completions.get(choice) {
            s.extend_from_slice(&c.ids);
        }
        s
    }

    /// (prompt, completion) token counts: the upstream's `usage` when it reported one, else the
    /// recorded ids (every choice's completion counted).
    pub fn token_counts(&self) -> (u64, u64) {
        let usage = |k: &str| {
            self.usage
                .as_ref()
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
        };
        match (usage("prompt_tokens"), usage("completion_tokens")) {
            (Some(p), Some(c)) => (p, c),
            _ => (
                self.tokens.prompt.len() as u64,
                self.tokens
                    .completions
                    .iter()
                    .map(|c| c.ids.len() as u64)
                    .sum(),
            ),
        }
    }

    /// Milliseconds from the request's arrival to the upstream's complete answer.
    pub fn duration_ms(&self) -> u64 {
        self.finished_ms.saturating_sub(self.started_ms)
    }
}
