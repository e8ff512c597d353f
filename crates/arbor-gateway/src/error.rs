//! Error types: [`GatewayError`] for the library, [`ApiError`] for answers to callers.

use std::path::PathBuf;

use axum::http::StatusCode;
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
}

impl ApiError {
    /// A 400 invalid-request error.
    pub fn invalid(api: Api, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: ApiErrorKind::InvalidRequest,
            message: message.into(),
            api,
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
        }
    }

    /// The JSON body of this error in its API's shape.
    pub fn body(&self) -> serde_json::Value {
        match self.api {
            Api::Chat | Api::Responses => {
                let ty = match self.kind {
                    ApiErrorKind::InvalidRequest => "invalid_request_error",
                    ApiErrorKind::NotFound => "not_found_error",
                    ApiErrorKind::Upstream => "upstream_error",
                    ApiErrorKind::Overloaded => "server_overloaded",
                    ApiErrorKind::Internal => "server_error",
                };
                json!({"error": {"message": self.message, "type": ty, "param": null, "code": null}})
            }
            Api::Messages => {
                let ty = match self.kind {
                    ApiErrorKind::InvalidRequest => "invalid_request_error",
                    ApiErrorKind::NotFound => "not_found_error",
                    ApiErrorKind::Upstream | ApiErrorKind::Internal => "api_error",
                    ApiErrorKind::Overloaded => "overloaded_error",
                };
                json!({"type": "error", "error": {"type": ty, "message": self.message}})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
