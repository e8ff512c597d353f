//! Turning a stream of upstream `chat.completion.chunk`s into the caller's stream format.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::chat::strip_for_caller;
use crate::sse;

/// Translates upstream chunks into SSE frames of one caller-facing API.
///
/// The driver calls [`chunk`](StreamSink::chunk) for each upstream chunk,
/// [`finish`](StreamSink::finish) with the assembled completion, records the call, and only
/// then sends [`terminal`](StreamSink::terminal): the caller's stream is complete only once the
/// call is on disk.
pub trait StreamSink: Send {
    /// Frames for one upstream chunk.
    fn chunk(&mut self, chunk: &Value) -> Vec<Bytes>;
    /// Frames sent after the last chunk, before recording.
    fn finish(&mut self, full: &Value) -> Vec<Bytes>;
    /// The caller-facing full response to record (assembled from `full`).
    fn response(&self, full: &Value) -> Value;
    /// Frames that end the stream, sent after the call is recorded.
    fn terminal(&mut self, full: &Value) -> Vec<Bytes>;
    /// A frame reporting an error after the stream started.
    fn error(&mut self, message: &str) -> Vec<Bytes>;
}

/// Chat Completions pass-through.
pub struct ChatSink {
    /// Keep logprobs in the chunks.
    pub wants_logprobs: bool,
    /// Forward the usage chunk.
    pub wants_usage_chunk: bool,
}

impl StreamSink for ChatSink {
    fn chunk(&mut self, chunk: &Value) -> Vec<Bytes> {
        let usage_only = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.is_empty());
        if usage_only && !self.wants_usage_chunk {
            return Vec::new();
        }
        let mut c = chunk.clone();
        strip_for_caller(&mut c, self.wants_logprobs);
        if !self.wants_usage_chunk
            && let Some(o) = c.as_object_mut()
        {
            o.remove("usage");
        }
        vec![sse::data_frame(&c)]
    }

    fn finish(&mut self, _full: &Value) -> Vec<Bytes> {
        Vec::new()
    }

    fn response(&self, full: &Value) -> Value {
        let mut r = full.clone();
        strip_for_caller(&mut r, false);
        r
    }

    fn terminal(&mut self, _full: &Value) -> Vec<Bytes> {
        vec![sse::done_frame()]
    }

    fn error(&mut self, message: &str) -> Vec<Bytes> {
        vec![sse::data_frame(
            &json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": null}}),
        )]
    }
}
