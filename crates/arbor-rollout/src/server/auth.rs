//! Who may use the env server: a bearer token on every API route when the
//! operator set one (`arbor serve --token-file`), and no listening beyond
//! loopback without one, since the API runs code in sandboxes on request.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::{AppState, error};

/// The environment variable clients (and `arbor serve`, without `--token-file`) read the
/// env server's token from.
pub const TOKEN_ENV: &str = "ARBOR_TOKEN";

/// Refuses a configuration that would open the API to the network without a token.
pub(super) fn check_listen(listen: SocketAddr, token: Option<&str>) -> std::io::Result<()> {
    if token.is_none() && !listen.ip().is_loopback() {
        return Err(std::io::Error::other(format!(
            "refusing to serve on the non-loopback address {listen} without a token: the API \
             runs code in sandboxes on request; give --token-file (or set ${TOKEN_ENV})"
        )));
    }
    Ok(())
}

/// Middleware: 401 with a JSON error unless the request carries the token.
pub(super) async fn require_token(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.config.token {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(msg) = arbor_node::token::refusal(given, expected) {
            tracing::warn!(path = %req.uri().path(), "refused a request without the token");
            return error(StatusCode::UNAUTHORIZED, msg);
        }
    }
    next.run(req).await
}
