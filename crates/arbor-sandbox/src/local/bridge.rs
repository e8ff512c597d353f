//! Unix-socket bridges: a host Unix socket reachable inside a sandbox as TCP
//! on its loopback. The listening socket is created inside the sandbox's
//! network namespace (by a short-lived thread that joins it), but served by
//! the supervisor, so the sandbox gets no new process and no route out.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};
use tokio::task::JoinHandle;

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

/// Start forwarding connections to `127.0.0.1:port` inside the sandbox to `host_socket`.
pub fn start(init_pid: i32, port: u16, host_socket: PathBuf) -> io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::from_std(listen_in_netns(init_pid, port)?)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let path = host_socket.clone();
            tokio::spawn(async move {
                match tokio::net::UnixStream::connect(&path).await {
                    Ok(mut outbound) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    Err(e) => tracing::warn!("bridge to {}: {e}", path.display()),
                }
            });
        }
    }))
}
