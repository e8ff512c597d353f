//! The client side of a node: [`RemoteBackend`] (every sandbox on one node)
//! and [`RemoteSandbox`], over one reqwest client per node (rustls,
//! keep-alive connection reuse, `TCP_NODELAY`).
//!
//! Failures: a node that cannot be reached, resets the connection, stops
//! sending (no byte, not even a heartbeat, for the read timeout) or closes
//! a reply early becomes [`SandboxError::Io`] naming the node: an
//! infrastructure error, so the orchestrator retries the rollout. The
//! node's own errors keep their kind ([`ErrorBody::into_sandbox_error`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arbor_sandbox::{Backend, ExecRequest, ExecResult, Result, Sandbox, SandboxError, SandboxSpec};
use async_trait::async_trait;
use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, Response};

use crate::protocol::{Capacity, ErrorBody, ErrorKind, ExecAssembler, Line, WireExec};

/// How to reach nodes.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The nodes' bearer token.
    pub token: String,
    /// Speak TLS to addresses given without a scheme.
    pub tls: bool,
    /// PEM CA bundle that signs the nodes' certificates (implies `tls`).
    pub ca_pem: Option<Vec<u8>>,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Longest silence within a reply (nodes send heartbeats every second
    /// during long operations, so this detects a cut link, not a slow command).
    pub read_timeout: Duration,
}

impl ClientOptions {
    /// Plaintext, default timeouts.
    pub fn new(token: impl Into<String>) -> Self {
        ClientOptions {
            token: token.into(),
            tls: false,
            ca_pem: None,
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a node call failed, as the cluster needs to know it.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The node could not be reached or stopped answering.
    Transport(SandboxError),
    /// The node refused for capacity or because it is draining.
    Refused(ErrorBody),
    /// The node answered with an error.
    Node(SandboxError),
}

impl Fail {
    pub(crate) fn into_error(self, node: &str) -> SandboxError {
        match self {
            Fail::Transport(e) | Fail::Node(e) => e,
            Fail::Refused(b) => b.into_sandbox_error(node),
        }
    }
}

/// One node's client: its address, its HTTP connection pool, whether it
/// answered last time, and how many sandboxes this process holds there.
pub(crate) struct NodeClient {
    pub(crate) name: String,
    base: String,
    http: reqwest::Client,
    auth: String,
    up: AtomicBool,
    held: AtomicUsize,
}

impl NodeClient {
    /// A client for `addr` (`host:port`, or a URL with a scheme). With
    /// `pin`, connections go to that socket address while TLS and the URL
    /// keep the host name (nodes found through DNS share one certificate).
    pub(crate) fn new(
        addr: &str,
        pin: Option<std::net::SocketAddr>,
        opts: &ClientOptions,
    ) -> Result<NodeClient> {
        let tls = opts.tls || opts.ca_pem.is_some();
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("{}://{addr}", if tls { "https" } else { "http" })
        };
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(15))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(pem) = &opts.ca_pem {
            for c in crate::tls::ca_certificates(pem).map_err(SandboxError::Invalid)? {
                b = b.add_root_certificate(c);
            }
        }
        let name = match pin {
            Some(sa) => {
                let host = reqwest::Url::parse(&base)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .ok_or_else(|| SandboxError::Invalid(format!("bad node address `{addr}`")))?;
                b = b.resolve(&host, sa);
                format!("{addr} ({sa})")
            }
            None => addr.to_string(),
        };
        let http = b
            .build()
            .map_err(|e| SandboxError::Invalid(format!("HTTP client for node {addr}: {e}")))?;
        Ok(NodeClient {
            name,
            base,
            http,
            auth: format!("Bearer {}", opts.token),
            up: AtomicBool::new(true),
            held: AtomicUsize::new(0),
        })
    }

    /// Whether the last contact worked.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Sandboxes this process created on the node and has not destroyed.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::AUTHORIZATION, &self.auth)
    }

    fn transport(&self, what: &str, e: impl std::fmt::Display, kind: std::io::ErrorKind) -> Fail {
        self.set_up(false);
        Fail::Transport(SandboxError::Io {
            context: format!("node {}: {what}", self.name),
            source: std::io::Error::new(kind, e.to_string()),
        })
    }

    fn reqwest_fail(&self, what: &str, e: reqwest::Error) -> Fail {
        use std::io::ErrorKind as K;
        let kind = if e.is_timeout() {
            K::TimedOut
        } else if e.is_connect() {
            K::ConnectionRefused
        } else {
            K::ConnectionAborted
        };
        // The innermost cause says what happened (refused, reset, ...).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        self.transport(what, msg, kind)
    }

    /// Sends; a non-2xx reply becomes the node's error.
    async fn send(&self, what: &str, req: RequestBuilder) -> Result<Response, Fail> {
        let resp = req.send().await.map_err(|e| self.reqwest_fail(what, e))?;
        self.set_up(true);
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.reqwest_fail(what, e))?;
        let err: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|_| {
            ErrorBody::new(
                ErrorKind::Internal,
                format!("{what}: HTTP {status}: {}", String::from_utf8_lossy(&body)),
            )
        });
        Err(match err.kind {
            ErrorKind::Capacity | ErrorKind::Draining => Fail::Refused(err),
            _ => Fail::Node(err.into_sandbox_error(&self.name)),
        })
    }

    /// Reads a streamed reply until `on_line` returns a value.
    async fn read_stream<T>(
        &self,
        what: &str,
        resp: Response,
        mut on_line: impl FnMut(Line) -> Result<Option<T>, Fail>,
    ) -> Result<T, Fail> {
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.reqwest_fail(what, e))?;
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line: Line = serde_json::from_slice(&line).map_err(|e| {
                    Fail::Node(SandboxError::Setup(format!(
                        "node {}: {what}: malformed reply line: {e}",
                        self.name
                    )))
                })?;
                if let Line::Error(b) = line {
                    return Err(Fail::Node(b.into_sandbox_error(&self.name)));
                }
                if let Some(v) = on_line(line)? {
                    return Ok(v);
                }
            }
        }
        Err(self.transport(
            what,
            "the node closed the reply before the result",
            std::io::ErrorKind::UnexpectedEof,
        ))
    }

    async fn created(&self, what: &str, resp: Response) -> Result<String, Fail> {
        let id = self
            .read_stream(what, resp, |l| match l {
                Line::Created(c) => Ok(Some(c.id)),
                _ => Ok(None),
            })
            .await?;
        self.held.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    pub(crate) async fn create(&self, spec: &SandboxSpec) -> Result<String, Fail> {
        let req = self.request(Method::POST, "/v1/sandboxes").json(spec);
        let resp = self.send("create", req).await?;
        self.created("create", resp).await
    }

    pub(crate) async fn capacity(&self, timeout: Duration) -> Result<Capacity, Fail> {
        let req = self.request(Method::GET, "/v1/capacity").timeout(timeout);
        let resp = self.send("capacity", req).await?;
        resp.json()
            .await
            .map_err(|e| self.reqwest_fail("capacity", e))
    }
}

/// Every sandbox on one node.
pub struct RemoteBackend {
    node: Arc<NodeClient>,
}

impl RemoteBackend {
    /// A backend for the node at `addr` (`host:port` or a URL).
    pub fn new(addr: &str, opts: &ClientOptions) -> Result<Self> {
        Ok(RemoteBackend {
            node: Arc::new(NodeClient::new(addr, None, opts)?),
        })
    }
}

#[async_trait]
impl Backend for RemoteBackend {
    async fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>> {
        let id = self
            .node
            .create(spec)
            .await
            .map_err(|f| f.into_error(&self.node.name))?;
        Ok(Box::new(RemoteSandbox::new(self.node.clone(), id)))
    }
}

/// A sandbox living on a node. Dropped without [`Sandbox::destroy`], it
/// asks the node to destroy it in the background.
pub struct RemoteSandbox {
    node: Arc<NodeClient>,
    id: String,
    destroyed: AtomicBool,
}

impl RemoteSandbox {
    pub(crate) fn new(node: Arc<NodeClient>, id: String) -> Self {
        RemoteSandbox {
            node,
            id,
            destroyed: AtomicBool::new(false),
        }
    }

    /// The node it lives on.
    pub fn node(&self) -> &str {
        &self.node.name
    }

    fn path(&self, op: &str) -> String {
        format!("/v1/sandboxes/{}/{op}", self.id)
    }

    fn err(&self, f: Fail) -> SandboxError {
        f.into_error(&self.node.name)
    }

    async fn delete(node: &NodeClient, id: &str) -> Result<(), Fail> {
        let req = node
            .request(Method::DELETE, &format!("/v1/sandboxes/{id}"))
            .timeout(Duration::from_secs(30));
        node.send("destroy", req).await?;
        Ok(())
    }
}

#[async_trait]
impl Sandbox for RemoteSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecResult> {
        let body = WireExec::from_request(req);
        let req = self
            .node
            .request(Method::POST, &self.path("exec"))
            .json(&body);
        let resp = self.node.send("exec", req).await.map_err(|f| self.err(f))?;
        let mut asm = ExecAssembler::default();
        self.node
            .read_stream("exec", resp, |l| {
                asm.push(l)
                    .map_err(|p| Fail::Node(SandboxError::Setup(p.to_string())))
            })
            .await
            .map_err(|f| self.err(f))
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let req = self
            .node
            .request(Method::PUT, &self.path("file"))
            .query(&[("path", path), ("mode", &mode.to_string())])
            .body(data.to_vec());
        self.node
            .send("write_file", req)
            .await
            .map_err(|f| self.err(f))?;
        Ok(())
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let req = self
            .node
            .request(Method::GET, &self.path("file"))
            .query(&[("path", path)]);
        let resp = self
            .node
            .send("read_file", req)
            .await
            .map_err(|f| self.err(f))?;
        let bytes = resp.bytes().await;
        let bytes = bytes.map_err(|e| self.err(self.node.reqwest_fail("read_file", e)))?;
        Ok(bytes.to_vec())
    }

    async fn write_tar(&self, dest: &str, archive: Vec<u8>) -> Result<()> {
        let req = self
            .node
            .request(Method::PUT, &self.path("tar"))
            .query(&[("path", dest)])
            .body(archive);
        self.node
            .send("write_tar", req)
            .await
            .map_err(|f| self.err(f))?;
        Ok(())
    }

    async fn read_tar(&self, path: &str) -> Result<Vec<u8>> {
        let req = self
            .node
            .request(Method::GET, &self.path("tar"))
            .query(&[("path", path)]);
        let resp = self
            .node
            .send("read_tar", req)
            .await
            .map_err(|f| self.err(f))?;
        let bytes = resp.bytes().await;
        let bytes = bytes.map_err(|e| self.err(self.node.reqwest_fail("read_tar", e)))?;
        Ok(bytes.to_vec())
    }

    async fn fork(&self) -> Result<Box<dyn Sandbox>> {
        let req = self.node.request(Method::POST, &self.path("fork"));
        let resp = self.node.send("fork", req).await.map_err(|f| self.err(f))?;
        let id = self
            .node
            .created("fork", resp)
            .await
            .map_err(|f| self.err(f))?;
        // The child lives on the parent's node: fork copies the parent's
        // writable layer there, which never crosses the network.
        Ok(Box::new(RemoteSandbox::new(self.node.clone(), id)))
    }

    async fn destroy(&self) -> Result<()> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.node.held.fetch_sub(1, Ordering::SeqCst);
        Self::delete(&self.node, &self.id)
            .await
            .map_err(|f| self.err(f))
    }
}

impl Drop for RemoteSandbox {
    fn drop(&mut self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.node.held.fetch_sub(1, Ordering::SeqCst);
        // Best effort; the node's idle lease reclaims it otherwise.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (node, id) = (self.node.clone(), std::mem::take(&mut self.id));
            rt.spawn(async move {
                let _ = RemoteSandbox::delete(&node, &id).await;
            });
        }
    }
}
