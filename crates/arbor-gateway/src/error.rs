//! Error types: [`GatewayError`] for the library, [`ApiError`] for answers to callers.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Errors of the gateway library (configuration, store, tokenizer, server).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Path {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another I/O error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A JSON (de)serialization error.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// Loading or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    Template(String),
    /// An invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The HTTP client could not be built or a request failed.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The store's writer thread is gone (the gateway is shutting down or the disk failed).
    #[error("store writer stopped")]
    StoreClosed,
}

/// Which caller-facing API a request came in on; decides the error shape (recorded with each
/// call, so defined with the record format).
pub use arbor_trace::record::Api;

/// Kind of an error answered to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// The request is malformed or asks for something unsupported (400).
    InvalidRequest,
    /// Not found (404).
    NotFound,
    /// A per-session cap is reached (429; the body's `code` says which).
    RateLimited,
    /// The upstream failed (502) or timed out (504).
    Upstream,
    /// No upstream could take the request (503).
    Overloaded,
    /// The gateway itself failed (500), e.g. the store could not be written.
    Internal,
}

/// An error answered to a caller, rendered in the shape of the API it called.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Kind of error.
    pub kind: ApiErrorKind,
    /// Human-readable message.
    pub message: String,
    /// API whose error shape to use.
    pub api: Api,
    /// Machine-readable code (e.g. `session_call_cap`), if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 invalid-request error.
    pub fn invalid(api: Api, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: ApiErrorKind::InvalidRequest,
            message: message.into(),
            api,
            code: None,
        }
    }

    /// An error with an explicit status and kind.
    pub fn new(
        api: Api,
        status: StatusCode,
        kind: ApiErrorKind,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            api,
            code: None,
        }
    }

    /// An error for a status the gateway did not produce itself (a rejected body, a path
    /// that could not be decoded), its kind derived from the status.
    pub fn from_status(api: Api, status: StatusCode, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            404 => ApiErrorKind::NotFound,
            429 => ApiErrorKind::RateLimited,
            502 | 504 => ApiErrorKind::Upstream,
            503 => ApiErrorKind::Overloaded,
            s if s >= 500 => ApiErrorKind::Internal,
            _ => ApiErrorKind::InvalidRequest,
        };
        Self::new(api, status, kind, message)
    }

    /// Sets the machine-readable `code` (OpenAI shape; the Anthropic shape has none, so there
    /// it prefixes the message).
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body of this error in its API's shape.
    pub fn body(&self) -> serde_json::Value {
        match self.api {
            Api::Chat | Api::Responses => {
                let ty = match self.kind {
                    ApiErrorKind::InvalidRequest => "invalid_request_error",
                    ApiErrorKind::NotFound => "not_found_error",
                    ApiErrorKind::RateLimited => "rate_limit_error",
                    ApiErrorKind::Upstream => "upstream_error",
                    ApiErrorKind::Overloaded => "server_overloaded",
                    ApiErrorKind::Internal => "server_error",
                };
                json!({"error": {"message": self.message, "type": ty, "param": null, "code": self.code}})
            }
            Api::Messages => {
                let ty = match self.kind {
                    ApiErrorKind::InvalidRequest => "invalid_request_error",
                    ApiErrorKind::NotFound => "not_found_error",
                    ApiErrorKind::RateLimited => "rate_limit_error",
                    ApiErrorKind::Upstream | ApiErrorKind::Internal => "api_error",
                    ApiErrorKind::Overloaded => "overloaded_error",
                };
                let message = match self.code {
                    Some(c) => format!("{c}: {}", self.message),
                    None => self.message.clone(),
                };
                json!({"type": "error", "error": {"type": ty, "message": message}})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.kind == ApiErrorKind::RateLimited {
            // A cap does not lift by waiting: tell the OpenAI and Anthropic SDKs not to retry.
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}
