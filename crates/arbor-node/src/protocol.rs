//! The node's wire format: routes, JSON bodies, the streamed reply lines
//! and how [`SandboxError`]s cross the network.
//!
//! Routes (all under a bearer token except `GET /health`):
//!
//! | route | body | reply |
//! |---|---|---|
//! | `POST /v1/sandboxes` | a `SandboxSpec` (JSON) | streamed: `created` |
//! | `POST /v1/sandboxes/{id}/exec` | [`WireExec`] | streamed: `stdout`/`stderr` chunks, `exit` |
//! | `POST /v1/sandboxes/{id}/fork` | none | streamed: `created` |
//! | `PUT`/`GET /v1/sandboxes/{id}/file?path=&mode=` | raw bytes | raw bytes |
//! | `PUT /v1/sandboxes/{id}/tar?path=`, `GET .../tar?path=` | tar bytes | tar bytes |
//! | `DELETE /v1/sandboxes/{id}` | none | 204 |
//! | `GET /v1/capacity` | none | [`Capacity`] |
//! | `GET /health` | none | `{"ok": true, "draining": bool}` |
//!
//! Operations that may take long (create, fork, exec) answer 200 at once
//! with NDJSON [`Line`]s: a heartbeat every second while the work runs,
//! then the result or an error. The heartbeats let a client tell a slow
//! command from a node that is cut off (no bytes for its read timeout), and
//! let the node notice a client that went away. Refusals known before any
//! work starts (token, capacity, draining, unknown sandbox, a spec that
//! does not parse) are plain HTTP errors with an [`ErrorBody`].

use std::collections::BTreeMap;
use std::time::Duration;

use arbor_sandbox::{ExecRequest, ExecResult, SandboxError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// Output is sent in pieces of at most this many bytes (before base64).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// What kind of failure an [`ErrorBody`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request or spec is not valid (the caller's fault).
    Invalid,
    /// A file operation failed inside the sandbox (the caller's fault).
    File,
    /// A command could not be started (the sandbox's own limits).
    Spawn,
    /// The sandbox does not exist (any more) on this node.
    Gone,
    /// Building the sandbox failed on the node.
    Setup,
    /// The node cannot run this kind of sandbox.
    Unsupported,
    /// Another host-side failure on the node.
    Internal,
    /// The node holds as many sandboxes as it may (retry elsewhere or later).
    Capacity,
    /// The node is shutting down and takes no new sandboxes.
    Draining,
    /// Missing or wrong bearer token.
    Unauthorized,
}

/// The JSON body of every refusal and failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
    /// The file, for [`ErrorKind::File`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The sandbox, for [`ErrorKind::Gone`] and [`ErrorKind::Spawn`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl ErrorBody {
    /// A body without path or id.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            kind,
            message: message.into(),
            path: None,
            id: None,
        }
    }

    /// The node's side: a sandbox error as it goes on the wire.
    pub fn from_sandbox(e: &SandboxError) -> Self {
        let mut b = ErrorBody::new(ErrorKind::Internal, e.to_string());
        match e {
            SandboxError::Invalid(m) => (b.kind, b.message) = (ErrorKind::Invalid, m.clone()),
            SandboxError::Unsupported(m) => {
                (b.kind, b.message) = (ErrorKind::Unsupported, m.clone());
            }
            SandboxError::Setup(m) => (b.kind, b.message) = (ErrorKind::Setup, m.clone()),
            // The host's own limits: like the node's capacity, another node may take it.
            SandboxError::AtLimit { .. } => b.kind = ErrorKind::Capacity,
            SandboxError::Gone { id, reason } => {
                (b.kind, b.message, b.id) = (ErrorKind::Gone, reason.clone(), Some(id.clone()));
            }
            SandboxError::Spawn { id, reason } => {
                (b.kind, b.message, b.id) = (ErrorKind::Spawn, reason.clone(), Some(id.clone()));
            }
            SandboxError::File { path, message } => {
                (b.kind, b.message, b.path) =
                    (ErrorKind::File, message.clone(), Some(path.clone()));
            }
            SandboxError::Io { .. } | SandboxError::Protocol(_) => {}
        }
        b
    }

    /// The client's side: the error the caller sees, with `node` named in
    /// infrastructure faults. Every kind but `invalid`, `file` and `spawn`
    /// stays an infrastructure error, so the orchestrator retries it.
    pub fn into_sandbox_error(self, node: &str) -> SandboxError {
        let id = self.id.unwrap_or_default();
        match self.kind {
            ErrorKind::Invalid => SandboxError::Invalid(self.message),
            ErrorKind::File => SandboxError::File {
                path: self.path.unwrap_or_default(),
                message: self.message,
            },
            ErrorKind::Spawn => SandboxError::Spawn {
                id,
                reason: self.message,
            },
            ErrorKind::Gone => SandboxError::Gone {
                id,
                reason: format!("{} (node {node})", self.message),
            },
            ErrorKind::Unsupported => {
                SandboxError::Unsupported(format!("node {node}: {}", self.message))
            }
            ErrorKind::Unauthorized => {
                SandboxError::Unsupported(format!("node {node} refused: {}", self.message))
            }
            ErrorKind::Setup | ErrorKind::Internal | ErrorKind::Capacity | ErrorKind::Draining => {
                SandboxError::Setup(format!("node {node}: {}", self.message))
            }
        }
    }
}

/// A node's live counts (`GET /v1/capacity`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Sandboxes alive (and being created) now.
    pub live: usize,
    /// The most it holds at once.
    pub capacity: usize,
    /// Shutting down: no new sandboxes.
    pub draining: bool,
    /// Sandboxes created since the node started (forks included).
    pub created: u64,
    /// Creates and forks refused for capacity since the node started.
    #[serde(default)]
    pub refused: u64,
    /// Image references the node has cached (placement prefers these nodes).
    #[serde(default)]
    pub images: Vec<String>,
}

/// A command as it travels (bytes in base64, times in milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WireExec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
    pub timeout_ms: Option<u64>,
    pub output_cap: Option<usize>,
}

impl WireExec {
    pub fn from_request(r: ExecRequest) -> Self {
        WireExec {
            argv: r.argv,
            env: r.env,
            cwd: r.cwd,
            stdin: r.stdin.map(|s| B64.encode(s)),
            timeout_ms: r.timeout.map(|t| t.as_millis().min(u64::MAX.into()) as u64),
            output_cap: r.output_cap,
        }
    }

    pub fn into_request(self) -> Result<ExecRequest, SandboxError> {
        let stdin = match self.stdin {
            Some(s) => Some(
                B64.decode(s)
                    .map_err(|e| SandboxError::Invalid(format!("stdin is not base64: {e}")))?,
            ),
            None => None,
        };
        Ok(ExecRequest {
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            stdin,
            timeout: self.timeout_ms.map(Duration::from_millis),
            output_cap: self.output_cap,
        })
    }
}

/// How a command ended (its output came before, in chunks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireExit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub truncated: bool,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub duration_ms: f64,
}

/// A new sandbox's id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub id: String,
}

/// One line of a streamed reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// The work is still running.
    Hb(u8),
    /// A piece of the command's standard output (base64).
    Stdout(String),
    /// A piece of the command's standard error (base64).
    Stderr(String),
    /// The command ended; its output is complete.
    Exit(WireExit),
    /// A sandbox was created (or forked).
    Created(Created),
    /// The operation failed.
    Error(ErrorBody),
}

impl Line {
    /// The line as NDJSON bytes.
    pub fn to_bytes(&self) -> bytes::Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v.into()
    }
}

/// A command's result as reply lines: output chunks, then the exit.
pub fn exec_lines(r: &ExecResult) -> Vec<Line> {
    let mut lines = Vec::new();
    for c in r.stdout.chunks(CHUNK_BYTES) {
        lines.push(Line::Stdout(B64.encode(c)));
    }
    for c in r.stderr.chunks(CHUNK_BYTES) {
        lines.push(Line::Stderr(B64.encode(c)));
    }
    lines.push(Line::Exit(WireExit {
        exit_code: r.exit_code,
        signal: r.signal,
        truncated: r.truncated,
        timed_out: r.timed_out,
        oom_killed: r.oom_killed,
        duration_ms: r.duration.as_secs_f64() * 1e3,
    }));
    lines
}

/// Collects a command's reply lines back into its result.
#[derive(Debug, Default)]
pub struct ExecAssembler {
    result: ExecResult,
}

impl ExecAssembler {
    /// Takes one line; returns the result once the exit line arrives.
    pub fn push(&mut self, line: Line) -> Result<Option<ExecResult>, ProtocolFault> {
        match line {
            Line::Hb(_) => {}
            Line::Stdout(s) => self.result.stdout.extend(decode(&s)?),
            Line::Stderr(s) => self.result.stderr.extend(decode(&s)?),
            Line::Exit(x) => {
                let mut r = std::mem::take(&mut self.result);
                r.exit_code = x.exit_code;
                r.signal = x.signal;
                r.truncated = x.truncated;
                r.timed_out = x.timed_out;
                r.oom_killed = x.oom_killed;
                r.duration = Duration::from_secs_f64((x.duration_ms / 1e3).max(0.0));
                return Ok(Some(r));
            }
            Line::Created(_) => {
                return Err(ProtocolFault("a `created` line in an exec reply".into()));
            }
            Line::Error(_) => {
                return Err(ProtocolFault(
                    "error lines are handled by the caller".into(),
                ));
            }
        }
        Ok(None)
    }
}

/// A reply that does not follow this protocol.
#[derive(Debug, thiserror::Error)]
#[error("malformed node reply: {0}")]
pub struct ProtocolFault(pub String);

fn decode(s: &str) -> Result<Vec<u8>, ProtocolFault> {
    B64.decode(s)
        .map_err(|e| ProtocolFault(format!("output chunk is not base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_result_round_trips_through_lines() {
        let r = ExecResult {
            exit_code: 3,
            signal: None,
            stdout: (0..200_000u32).map(|i| (i % 251) as u8).collect(),
            stderr: vec![0xff, 0, 0xfe],
            truncated: true,
            timed_out: false,
            oom_killed: true,
            duration: Duration::from_millis(1500),
        };
        let lines = exec_lines(&r);
        assert!(lines.len() > 3, "output is chunked");
        let mut a = ExecAssembler::default();
        let mut got = None;
        for l in lines {
            let wire: Line = serde_json::from_slice(&l.to_bytes()).unwrap();
            got = a.push(wire).unwrap();
        }
        assert_eq!(got.unwrap(), r);
    }

    #[test]
    fn errors_keep_whose_fault_they_are() {
        let cases = [
            SandboxError::Invalid("bad".into()),
            SandboxError::File {
                path: "/x".into(),
                message: "missing".into(),
            },
            SandboxError::Spawn {
                id: "s".into(),
                reason: "pids".into(),
            },
            SandboxError::Gone {
                id: "s".into(),
                reason: "init died".into(),
            },
            SandboxError::Setup("mount".into()),
            SandboxError::AtLimit {
                limit: "pids",
                detail: "32700 of 32768".into(),
            },
        ];
        for e in cases {
            let back = ErrorBody::from_sandbox(&e).into_sandbox_error("n1");
            assert_eq!(back.is_infrastructure(), e.is_infrastructure(), "{e}");
        }
        for kind in [
            ErrorKind::Capacity,
            ErrorKind::Draining,
            ErrorKind::Unauthorized,
        ] {
            let e = ErrorBody::new(kind, "no").into_sandbox_error("n1");
            assert!(e.is_infrastructure(), "{kind:?}");
        }
    }
}
