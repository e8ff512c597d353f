//! What a sandbox is made from: the [`SandboxSpec`] and the per-command [`ExecRequest`].
//!
//! Specs are plain data (serde) so they can live in experiment TOML files and be
//! hashed to key the warm pool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything needed to create a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSpec {
    /// Root filesystem directory used as the read-only lower layer. `None`
    /// means the default: a read-only view of an allow-list of host system
    /// directories (`/usr`, `/bin`, `/sbin`, `/lib*`, `/etc` minus secrets).
    /// Exclusive with `layers`.
    pub rootfs: Option<PathBuf>,
    /// Read-only overlay lower directories forming the root filesystem,
    /// UPPERMOST FIRST (overlayfs's `lowerdir` order), each in overlayfs's own
    /// format (whiteouts are 0:0 character devices, opaque directories carry
    /// `trusted.overlay.opaque=y`). Used as they are, never copied, so any
    /// number of sandboxes can share them at once; they must not change while
    /// a sandbox uses them. Empty means `rootfs` (or the host view) is the
    /// root. Each must be an existing absolute directory.
    pub layers: Vec<PathBuf>,
    /// The user commands run as, in Docker's `USER` syntax: `name`, `uid`,
    /// `name:group` or `uid:gid`. Resolved inside the sandbox against its own
    /// `/etc/passwd` and `/etc/group` when it starts (an unknown name fails
    /// the start); a numeric uid without a passwd entry is allowed, with gid
    /// 0. `None` runs commands as root. Built-in file operations
    /// (`write_file`, `read_file`, tar) always run as root.
    pub user: Option<String>,
    /// The container image the sandbox is made from. Plain data here: an
    /// image-aware backend (`arbor_image::ImageBackend`) resolves it into
    /// `layers`, `user` and environment; the local backend alone refuses it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// Extra host paths made visible inside.
    pub binds: Vec<Bind>,
    /// Environment given to every command (on top of a minimal default).
    pub env: BTreeMap<String, String>,
    /// Working directory of commands; created empty if missing.
    pub workdir: String,
    /// Hostname inside the sandbox (its own UTS namespace).
    pub hostname: String,
    /// Resource limits.
    pub limits: Limits,
    /// Network configuration.
    pub network: NetworkSpec,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            rootfs: None,
            layers: Vec::new(),
            user: None,
            image: None,
            binds: Vec::new(),
            env: BTreeMap::new(),
            workdir: "/workspace".to_string(),
            hostname: "arbor".to_string(),
            limits: Limits::default(),
            network: NetworkSpec::default(),
        }
    }
}

impl SandboxSpec {
    /// A stable key for pooling: two specs with the same key are interchangeable.
    pub fn pool_key(&self) -> String {
        // serde_json of a struct with BTreeMaps is deterministic.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Where a sandbox's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSource {
    /// An image reference (`busybox`, `ghcr.io/org/img:tag`, `name@sha256:...`),
    /// pulled on first use.
    Reference(String),
    /// A Dockerfile built on first use (and cached by its content).
    Dockerfile {
        /// The build context directory.
        context: PathBuf,
        /// The Dockerfile (relative paths are under the context).
        file: PathBuf,
    },
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::Reference(r) => write!(f, "image `{r}`"),
            ImageSource::Dockerfile { context, file } => {
                write!(f, "Dockerfile {}", context.join(file).display())
            }
        }
    }
}

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// Absolute host path (file or directory).
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: String,
    /// How writes are handled.
    #[serde(default)]
    pub mode: BindMode,
}

/// How writes to a bind are handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindMode {
    /// Writes fail (EROFS).
    #[default]
    ReadOnly,
    /// Writes succeed but land in the sandbox's private layer (directories only).
    CopyOnWrite,
}

/// Resource limits. All are enforced by the kernel (cgroups, tmpfs size, rlimits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory limit of the whole sandbox (processes and its private files), MiB.
    pub memory_mb: u64,
    /// Maximum number of processes/threads alive at once.
    pub pids: u64,
    /// CPU quota in cores (e.g. 0.5 = half a core); 0 = unlimited.
    pub cpus: f64,
    /// Default wall-clock timeout of one command, seconds.
    pub exec_timeout_s: f64,
    /// Default cap per output stream (stdout, stderr) of one command, bytes.
    pub output_cap_bytes: usize,
    /// Size of the sandbox's private writable layer (all writes anywhere), MiB.
    pub workspace_mb: u64,
    /// RLIMIT_NOFILE for commands.
    pub nofile: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: 2048,
            pids: 512,
            cpus: 0.0,
            exec_timeout_s: 600.0,
            output_cap_bytes: 1 << 20,
            workspace_mb: 4096,
            nofile: 65536,
        }
    }
}

/// Network configuration. By default the sandbox has its own network
/// namespace with only a loopback interface; nothing routes out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    /// Share the host's network namespace instead (no loopback-only
    /// namespace). This GIVES UP NETWORK ISOLATION: commands reach whatever
    /// the host reaches, including its loopback services. Meant only for
    /// image builds whose steps download packages (`docker build --network
    /// host`), never for agent rollouts. Bridges are meaningless with it
    /// and are refused.
    pub host: bool,
    /// Host Unix sockets made reachable inside as TCP ports on 127.0.0.1
    /// (used to reach the model gateway from agents that only speak TCP).
    pub unix_bridges: Vec<UnixBridge>,
    /// Host loopback TCP services (e.g. a gateway on `127.0.0.1:8080`) made
    /// reachable inside as TCP ports on 127.0.0.1. Only loopback targets are
    /// accepted, so a sandbox can never be used to reach the network.
    pub tcp_bridges: Vec<TcpBridge>,
}

/// A host loopback TCP service exposed inside the sandbox on `127.0.0.1:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpBridge {
    /// Loopback address of the service on the host.
    pub host_addr: std::net::SocketAddr,
    /// TCP port on the sandbox's loopback.
    pub port: u16,
}

/// A host Unix socket exposed inside the sandbox on `127.0.0.1:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixBridge {
    /// Path of a listening Unix stream socket on the host.
    pub host_socket: PathBuf,
    /// TCP port on the sandbox's loopback.
    pub port: u16,
}

/// One command to run in a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment for this command only.
    pub env: BTreeMap<String, String>,
    /// Working directory; defaults to the spec's `workdir`.
    pub cwd: Option<String>,
    /// Bytes fed to standard input (then closed). `None` = `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// Wall-clock timeout; defaults to the spec's `exec_timeout_s`.
    pub timeout: Option<Duration>,
    /// Cap per output stream; defaults to the spec's `output_cap_bytes`.
    pub output_cap: Option<usize>,
}

impl ExecRequest {
    /// A command from its argument vector.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// A shell script run by `/bin/sh -c`.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new(["/bin/sh".to_string(), "-c".to_string(), script.into()])
    }

    /// Set the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Set the output cap per stream.
    pub fn output_cap(mut self, bytes: usize) -> Self {
        self.output_cap = Some(bytes);
        self
    }

    /// Set standard input.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Set the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Add an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
}

/// What a command did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code; `128 + signal` when killed by a signal (shell convention).
    pub exit_code: i32,
    /// The signal that ended the command, if any.
    pub signal: Option<i32>,
    /// Standard output, at most the cap.
    #[serde(with = "lossy_bytes")]
    pub stdout: Vec<u8>,
    /// Standard error, at most the cap.
    #[serde(with = "lossy_bytes")]
    pub stderr: Vec<u8>,
    /// Some output was dropped because a stream passed its cap.
    pub truncated: bool,
    /// The command was killed (with its whole process tree) at its timeout.
    pub timed_out: bool,
    /// The kernel's OOM killer acted in the sandbox while the command ran.
    pub oom_killed: bool,
    /// Wall-clock duration.
    pub duration: Duration,
}

impl ExecResult {
    /// Exit code 0, no timeout.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.timed_out
    }

    /// Standard output as text (lossy).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (lossy).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Output bytes are usually text; store them as a string in JSON for readability.
mod lossy_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(d)?.into_bytes())
    }
}
