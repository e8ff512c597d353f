//! Test support shared by arbor-image's integration tests: a real
//! `docker-registry` on loopback ([`TestRegistry`]) and real minimal images
//! built from Debian's `busybox-static` ([`images`]).
//!
//! Nothing here is a mock: the registry is the distribution project's own
//! server (Debian package `docker-registry`), the images are OCI images whose
//! layers are gzip tars of a static busybox, pushed with oci-client.

#![allow(dead_code)]

pub mod images;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry server binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "docker-registry";

/// User and password of a registry started with [`TestRegistry::with_auth`].
pub const TEST_USER: &str = "arbor";
/// See [`TEST_USER`].
pub const TEST_PASSWORD: &str = "s3cret-pass";

/// A `docker-registry serve` process on a free 127.0.0.1 port, storing blobs
/// in a temp dir; killed (by pid) and reaped on drop, also when a test panics.
pub struct TestRegistry {
    child: Child,
    dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`: the registry host as references name it.
    pub host: String,
    /// Whether the registry demands basic auth ([`TEST_USER`]/[`TEST_PASSWORD`]).
    pub auth: bool,
}

impl TestRegistry {
    /// Start an open (anonymous) registry.
    pub fn start() -> TestRegistry {
        Self::spawn(false)
    }

    /// Start a registry that demands basic auth with [`TEST_USER`] /
    /// [`TEST_PASSWORD`] (htpasswd file made with apache2-utils' `htpasswd`).
    pub fn with_auth() -> TestRegistry {
        Self::spawn(true)
    }

    fn spawn(auth: bool) -> TestRegistry {
        require_tool(REGISTRY_BIN, "docker-registry");
        let dir = tempfile::tempdir().expect("registry temp dir");
        if auth {
            write_htpasswd(dir.path());
        }
        // A port probed free can be taken before the server binds it: a server
        // that exits at once is retried on another port.
        for _ in 0..5 {
            let host = format!("127.0.0.1:{}", free_port());
            write_config(dir.path(), &host, auth);
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            match wait_ready(&mut child, &host) {
                Ready::Yes => {
                    return TestRegistry {
                        child,
                        dir,
                        host,
                        auth,
                    };
                }
                Ready::Exited => continue,
                Ready::TimedOut => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "docker-registry on {host} did not answer GET /v2/; log:\n{}",
                        read_log(dir.path())
                    );
                }
            }
        }
        panic!(
            "docker-registry kept exiting at start; log:\n{}",
            read_log(dir.path())
        );
    }

    /// The registry's storage root (`docker/registry/v2/...` below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file holding blob `digest` (`sha256:<hex>`) in the registry's storage.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// `<host>/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host)
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panic with the Debian package to install when `bin` is missing.
pub fn require_tool(bin: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(bin).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{bin}` not found: these tests need the Debian package `{package}` \
         (apt-get install -y {package}; scripts/test.sh installs it)"
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn write_config(dir: &Path, host: &str, auth: bool) {
    let mut cfg = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {host}\n  secret: arbor-test-secret\n",
        dir.join("data").display()
    );
    if auth {
        cfg.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: arbor-test\n    path: {}\n",
            dir.join("htpasswd").display()
        ));
    }
    std::fs::write(dir.join("config.yml"), cfg).expect("write registry config");
}

fn write_htpasswd(dir: &Path) {
    require_tool("htpasswd", "apache2-utils");
    let out = Command::new("htpasswd")
        .args(["-Bbn", TEST_USER, TEST_PASSWORD])
        .output()
        .expect("run htpasswd");
    assert!(out.status.success(), "htpasswd failed: {out:?}");
    std::fs::write(dir.join("htpasswd"), out.stdout).expect("write htpasswd");
}

enum Ready {
    Yes,
    Exited,
    TimedOut,
}

/// Poll `GET /v2/` until the server answers with any HTTP status (401 counts:
/// an auth registry is up when it challenges).
fn wait_ready(child: &mut Child, host: &str) -> Ready {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return Ready::Exited;
        }
        if http_status(host, "/v2/").is_some() {
            return Ready::Yes;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ready::TimedOut
}

/// The status code of a plain HTTP/1.0 GET, or None when nothing answers.
pub fn http_status(host: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    let line = std::str::from_utf8(&head).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
}
