//! Streamed replies: heartbeat lines while the work runs, then its result
//! lines (see [`crate::protocol`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::protocol::Line;

/// Cleanup to run when a reply could not be delivered (the client left).
pub(crate) type Undelivered = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the work produced.
pub(crate) struct Reply {
    pub(crate) lines: Vec<Line>,
    pub(crate) undelivered: Option<Undelivered>,
}

impl Reply {
    pub(crate) fn lines(lines: Vec<Line>) -> Self {
        Reply {
            lines,
            undelivered: None,
        }
    }
}

/// Runs `work` in its own task (it finishes even if the client leaves) and
/// answers 200 with NDJSON: a heartbeat every `every`, then the reply.
pub(crate) fn streamed<F>(every: Duration, work: F) -> Response
where
    F: Future<Output = Reply> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let reply = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => {
                    // A closed channel means the client left; the work
                    // still runs to its end so nothing is half done.
                    let _ = tx.send(Line::Hb(1).to_bytes()).await;
                }
            }
        };
        let mut delivered = true;
        for line in &reply.lines {
            delivered &= tx.send(line.to_bytes()).await.is_ok();
        }
        if !delivered && let Some(cleanup) = reply.undelivered {
            cleanup.await;
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [(CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response()
}
