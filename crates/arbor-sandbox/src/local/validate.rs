//! Checking a [`SandboxSpec`] before anything is built: every refusal is
//! [`SandboxError::Invalid`] (the caller's fault) and names what is wrong.

use crate::error::{Result, SandboxError};
use crate::spec::SandboxSpec;

fn invalid<T>(msg: String) -> Result<T> {
    Err(SandboxError::Invalid(msg))
}

/// Refuse a spec this backend cannot build safely.
pub(super) fn validate(spec: &SandboxSpec) -> Result<()> {
    if !spec.workdir.starts_with('/') {
        return invalid(format!("workdir {:?} must be absolute", spec.workdir));
    }
    root_filesystem(spec)?;
    for b in &spec.binds {
        if !b.source.is_absolute() || !b.source.exists() {
            return invalid(format!(
                "bind source {} must be an existing absolute path",
                b.source.display()
            ));
        }
        if !b.target.starts_with('/') {
            return invalid(format!("bind target {:?} must be absolute", b.target));
        }
    }
    network(spec)?;
    if let Some(user) = &spec.user {
        user_syntax(user)?;
    }
    if spec.limits.memory_mb < 16 || spec.limits.pids < 4 || spec.limits.workspace_mb < 1 {
        return invalid("limits too small (memory_mb >= 16, pids >= 4, workspace_mb >= 1)".into());
    }
    Ok(())
}

/// `rootfs` or `layers`, not both; each an existing (absolute) directory.
fn root_filesystem(spec: &SandboxSpec) -> Result<()> {
    if let Some(image) = &spec.image {
        return invalid(format!(
            "the sandbox needs {image}, but this backend has no image store \
             (use an image-aware backend: arbor_image::ImageBackend)"
        ));
    }
    if let Some(r) = &spec.rootfs {
        if !spec.layers.is_empty() {
            return invalid(format!(
                "rootfs {} and layers are exclusive: give one root filesystem",
                r.display()
            ));
        }
        if !r.is_dir() {
            return invalid(format!("rootfs {} is not a directory", r.display()));
        }
    }
    for layer in &spec.layers {
        if !layer.is_absolute() || !layer.is_dir() {
            return invalid(format!(
                "layer {} must be an existing absolute directory",
                layer.display()
            ));
        }
    }
    Ok(())
}

/// Bridges reach host services from an isolated namespace: loopback targets
/// only, and none at all when the host's network is shared.
fn network(spec: &SandboxSpec) -> Result<()> {
    let net = &spec.network;
    if net.host && !(net.tcp_bridges.is_empty() && net.unix_bridges.is_empty()) {
        return invalid(
            "network.host shares the host's network; bridges make no sense with it".into(),
        );
    }
    for b in &net.tcp_bridges {
        if !b.host_addr.ip().is_loopback() {
            return invalid(format!(
                "tcp bridge target {} is not a loopback address",
                b.host_addr
            ));
        }
    }
    Ok(())
}

/// Docker's `USER` syntax: `user` or `user:group`, neither part empty.
fn user_syntax(user: &str) -> Result<()> {
    let mut parts = user.split(':');
    let name = parts.next().unwrap_or_default();
    let group = parts.next();
    let bad = name.is_empty()
        || group.is_some_and(str::is_empty)
        || parts.next().is_some()
        || user.contains(['\0', '\n']);
    if bad {
        return invalid(format!(
            "user {user:?} is not valid: expected name, uid, name:group or uid:gid"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_syntax_follows_docker() {
        for ok in ["app", "1000", "app:staff", "1000:1000", "app:0"] {
            assert!(user_syntax(ok).is_ok(), "{ok}");
        }
        for bad in ["", ":", "app:", ":g", "a:b:c", "a\nb"] {
            assert!(
                matches!(user_syntax(bad), Err(SandboxError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rootfs_and_layers_are_exclusive() {
        let dir = std::env::temp_dir();
        let spec = SandboxSpec {
            rootfs: Some(dir.clone()),
            layers: vec![dir.clone()],
            ..Default::default()
        };
        assert!(matches!(validate(&spec), Err(SandboxError::Invalid(_))));
        let relative = SandboxSpec {
            layers: vec!["relative/layer".into()],
            ..Default::default()
        };
        let err = validate(&relative).unwrap_err().to_string();
        assert!(err.contains("relative/layer"), "{err}");
        let ok = SandboxSpec {
            layers: vec![dir],
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
    }

    #[test]
    fn host_network_refuses_bridges() {
        let mut spec = SandboxSpec::default();
        spec.network.host = true;
        assert!(validate(&spec).is_ok());
        spec.network.tcp_bridges.push(crate::spec::TcpBridge {
            host_addr: "127.0.0.1:80".parse().unwrap(),
            port: 80,
        });
        assert!(matches!(validate(&spec), Err(SandboxError::Invalid(_))));
    }

    #[test]
    fn old_specs_still_parse() {
        let spec: SandboxSpec = serde_json::from_str(r#"{"workdir": "/w"}"#).unwrap();
        assert!(spec.layers.is_empty() && spec.user.is_none() && !spec.network.host);
    }
}
