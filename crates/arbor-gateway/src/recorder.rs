//! Turning a finished call into a [`CallRecord`]: call index, token ids, branch detection,
//! durable write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};

use crate::chat::{choice_logprobs, message_text, upstream_tokens};
use crate::error::{Api, GatewayError};
use crate::metrics::Metrics;
use crate::record::{Branch, CallRecord, CompletionTokens, RECORD_VERSION, TokenSource, Tokens};
use crate::store::Store;
use crate::tokenize::ChatTokenizer;

#[derive(Default)]
struct SessionState {
    next_index: u32,
    /// Prompt + completion (choice 0) of each call, by index.
    seqs: Vec<Vec<u32>>,
}

/// Everything known about a finished call, before recording.
pub struct CallInput {
    /// Session id.
    pub session: String,
    /// Caller-facing API.
    pub api: Api,
    /// Whether the caller asked for a stream.
    pub stream: bool,
    /// Start time (ms since epoch).
    pub started_ms: u64,
    /// Upstream base URL.
    pub upstream: String,
    /// The caller's request.
    pub request: Value,
    /// The Chat Completions request sent upstream.
    pub upstream_request: Value,
    /// The assembled `chat.completion` from the upstream.
    pub full: Value,
    /// The caller-facing response.
    pub response: Value,
}

/// Assigns call indices, computes tokens and branch info, and writes records durably.
pub struct Recorder {
    store: Store,
    tokenizer: Option<Arc<ChatTokenizer>>,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<SessionState>>>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Computes token ids for a call: from the upstream if it returned them, else with the
/// tokenizer and chat template, else none.
pub fn compute_tokens(
    upstream_request: &Value,
    full: &Value,
    tokenizer: Option<&ChatTokenizer>,
) -> Tokens {
    if let Some((prompt, completions)) = upstream_tokens(full) {
        return Tokens {
            source: TokenSource::Upstream,
            prompt,
            completions,
        };
    }
    let empty = Vec::new();
    let choices = full
        .get("choices")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let bare = |c: &Value, pos: usize| CompletionTokens {
        index: c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64) as u32,
        ids: Vec::new(),
        logprobs: None,
        text: message_text(c),
        finish_reason: c
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(String::from),
    };
    let none = || Tokens {
        source: TokenSource::None,
        prompt: Vec::new(),
        completions: choices
            .iter()
            .enumerate()
            .map(|(i, c)| bare(c, i))
            .collect(),
    };
    let Some(tok) = tokenizer else {
        return none();
    };
    match tokenize_with_template(tok, upstream_request, choices, &bare) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "could not tokenize a call with the chat template");
            none()
        }
    }
}

fn tokenize_with_template(
    tok: &ChatTokenizer,
    req: &Value,
    choices: &[Value],
    bare: &dyn Fn(&Value, usize) -> CompletionTokens,
) -> Result<Tokens, GatewayError> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice);
    let prepared = ChatTokenizer::prepare_messages(&messages);
    let prompt_text = tok.render(&prepared, tools, true)?;
    let prompt = tok.encode(&prompt_text)?;
    let mut completions = Vec::new();
    for (pos, c) in choices.iter().enumerate() {
        let mut comp = bare(c, pos);
        let mut msg = c.get("message").cloned().unwrap_or_else(|| json!({}));
        if let Some(o) = msg.as_object_mut() {
            o.insert("role".into(), json!("assistant"));
            o.remove("reasoning_content");
            if o.get("content").is_none_or(Value::is_null) && o.get("tool_calls").is_none() {
                o.insert("content".into(), json!(""));
            }
        }
        let mut with = messages.clone();
        with.push(msg);
        let full_text = tok.render(&ChatTokenizer::prepare_messages(&with), tools, false)?;
        let completion_text = match full_text.strip_prefix(&prompt_text) {
            Some(s) => s.to_string(),
            None => comp.text.clone(),
        };
        comp.ids = tok.encode(&completion_text)?;
        comp.logprobs = choice_logprobs(c).filter(|l| l.len() == comp.ids.len());
        completions.push(comp);
    }
    Ok(Tokens {
        source: TokenSource::Tokenizer,
        prompt,
        completions,
    })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Branch information of a prompt against the earlier calls of its session.
pub fn detect_branch(seqs: &[Vec<u32>], prompt: &[u32]) -> Option<Branch> {
    let prev = seqs.last()?;
    let shared = common_prefix(prev, prompt);
    let parent = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty() && s.len() <= prompt.len() && prompt.starts_with(s))
        .max_by_key(|(i, s)| (s.len(), *i))
        .map(|(i, _)| i as u32);
    Some(Branch {
        previous: (seqs.len() - 1) as u32,
        extends_previous: shared == prev.len() && !prev.is_empty(),
        shared_prefix: shared,
        parent,
    })
}

impl Recorder {
    /// A recorder over a store, restoring session state from recovered records.
    pub fn new(
        store: Store,
        tokenizer: Option<Arc<ChatTokenizer>>,
        recovered: &[CallRecord],
    ) -> Self {
        let mut map: HashMap<String, SessionState> = HashMap::new();
        for r in recovered {
            let st = map.entry(r.session.clone()).or_default();
            st.next_index = st.next_index.max(r.index + 1);
            let i = r.index as usize;
            if st.seqs.len() <= i {
                st.seqs.resize(i + 1, Vec::new());
            }
            st.seqs[i] = r.sequence(0);
        }
        Self {
            store,
            tokenizer,
            sessions: Mutex::new(
                map.into_iter()
                    .map(|(k, v)| (k, Arc::new(tokio::sync::Mutex::new(v))))
                    .collect(),
            ),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The tokenizer, if configured.
    pub fn tokenizer(&self) -> Option<&Arc<ChatTokenizer>> {
        self.tokenizer.as_ref()
    }

    /// Records a call durably; returns once it is on disk.
    pub async fn record(
        &self,
        input: CallInput,
        metrics: &Metrics,
    ) -> Result<CallRecord, GatewayError> {
        let finished_ms = now_ms();
        let tokens = match &self.tokenizer {
            Some(tok) if upstream_tokens(&input.full).is_none() => {
                let tok = tok.clone();
                let req = input.upstream_request.clone();
                let full = input.full.clone();
                tokio::task::spawn_blocking(move || compute_tokens(&req, &full, Some(&tok)))
                    .await
                    .map_err(|e| GatewayError::Tokenizer(format!("tokenizer task failed: {e}")))?
            }
            _ => compute_tokens(&input.upstream_request, &input.full, None),
        };
        let state = {
            let mut map = self
                .sessions
                .lock()
                .map_err(|_| GatewayError::StoreClosed)?;
            map.entry(input.session.clone()).or_default().clone()
        };
        let mut st = state.lock().await;
        let index = st.next_index;
        let branch = if tokens.prompt.is_empty() {
            None
        } else {
            detect_branch(&st.seqs, &tokens.prompt)
        };
        let mut response = input.response;
        if let Some(choices) = response.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices {
                if let Some(o) = c.as_object_mut() {
                    o.remove("logprobs");
                }
            }
        }
        let record = CallRecord {
            v: RECORD_VERSION,
            id: format!("{}/{}", input.session, index),
            session: input.session,
            index,
            api: input.api,
            stream: input.stream,
            started_ms: input.started_ms,
            finished_ms,
            upstream: input.upstream,
            upstream_id: input
                .full
                .get("id")
                .and_then(Value::as_str)
                .map(String::from),
            model: input
                .full
                .get("model")
                .and_then(Value::as_str)
                .map(String::from),
            request: input.request,
            upstream_request: input.upstream_request,
            response,
            usage: input.full.get("usage").filter(|u| !u.is_null()).cloned(),
            tokens,
            branch,
        };
        let t0 = Instant::now();
        if let Err(e) = self.store.append(&record).await {
            metrics.record_errors.inc();
            return Err(e);
        }
        metrics.record_seconds.observe(t0.elapsed());
        metrics.recorded.inc();
        st.next_index = index + 1;
        let i = index as usize;
        if st.seqs.len() <= i {
            st.seqs.resize(i + 1, Vec::new());
        }
        st.seqs[i] = record.sequence(0);
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_detection() {
        assert!(detect_branch(&[], &[1, 2]).is_none());
        let seqs = vec![vec![1, 2, 3], vec![1, 2, 3, 4, 5]];
        let b = detect_branch(&seqs, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert!(b.extends_previous);
        assert_eq!(b.parent, Some(1));
        let b = detect_branch(&seqs, &[1, 2, 3, 9]).unwrap();
        assert!(!b.extends_previous);
        assert_eq!(b.shared_prefix, 3);
        assert_eq!(b.parent, Some(0));
        let b = detect_branch(&seqs, &[7]).unwrap();
        assert_eq!(b.parent, None);
    }
}
