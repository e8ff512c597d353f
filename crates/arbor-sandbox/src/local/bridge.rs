//! Bridges: a host Unix socket, or a host loopback TCP service, reachable
//! inside a sandbox as TCP on its loopback. The listening socket is created
//! inside the sandbox's network namespace (by a short-lived thread that joins
//! it), but served by the supervisor, so the sandbox gets no new process and
//! no route out.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};
use tokio::task::JoinHandle;

/// Where a bridge's connections go on the host.
#[derive(Debug, Clone)]
pub enum Target {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP service on the host's loopback.
    Tcp(SocketAddr),
}

/// Bind `127.0.0.1:port` in the network namespace of `init_pid`.
fn listen_in_netns(init_pid: i32, port: u16) -> io::Result<std::net::TcpListener> {
    let ns = File::open(format!("/proc/{init_pid}/ns/net"))?;
    // A thread's network namespace is its own; this thread ends right after.
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| io::Error::other("bridge thread panicked"))?
}

/// Start forwarding connections to `127.0.0.1:port` inside the sandbox to `target`.
pub fn start(init_pid: i32, port: u16, target: Target) -> io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::from_std(listen_in_netns(init_pid, port)?)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let target = target.clone();
            tokio::spawn(async move {
                let res = match &target {
                    Target::Unix(path) => match tokio::net::UnixStream::connect(path).await {
                        Ok(mut out) => tokio::io::copy_bidirectional(&mut inbound, &mut out)
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    },
                    Target::Tcp(addr) => match tokio::net::TcpStream::connect(addr).await {
                        Ok(mut out) => tokio::io::copy_bidirectional(&mut inbound, &mut out)
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = res {
                    tracing::debug!("bridge to {target:?}: {e}");
                }
            });
        }
    }))
}
