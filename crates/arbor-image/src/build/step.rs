//! Executing one step: config-only instructions change the state; RUN and
//! COPY/ADD run in a sandbox over the stage's layers and commit the
//! sandbox's writable layer as a new layer.

use std::collections::BTreeMap;
use std::time::Duration;

use arbor_sandbox::local::LocalSandbox;
use arbor_sandbox::{ExecRequest, Limits, NetworkSpec, Sandbox, SandboxSpec};

use super::context::{is_archive, pack_source, read_archive, resolve};
use super::{Builder, Run, State, build_err};
use crate::digest::Digest;
use crate::dockerfile::{self, CommandForm, Op, Step};
use crate::error::{ImageError, Result};

/// Longest a RUN step may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
/// Output kept of a failing RUN step, for its error message.
const ERROR_TAIL: usize = 2000;

/// Apply `step` to `state` for real; `key` is the step's cache key.
pub(crate) async fn execute(
    b: &Builder<'_>,
    run: &mut Run<'_>,
    mut state: State,
    step: &Step,
    key: Digest,
) -> Result<State> {
    let err = |m: String| build_err(run, step.line, m);
    let vars = state.vars();
    let x = |s: &str| dockerfile::expand(s, &vars).map_err(err);
    match &step.op {
        Op::Env(pairs) => {
            for (k, v) in pairs {
                let v = dockerfile::expand(v, &state.vars()).map_err(err)?;
                state
                    .config
                    .env
                    .retain(|kv| kv.split_once('=').map(|p| p.0) != Some(k));
                state.config.env.push(format!("{k}={v}"));
            }
        }
        Op::Arg(name, default) => {
            let value = match run.opts.build_args.get(name) {
                Some(v) => Some(v.clone()),
                None => default.as_deref().map(x).transpose()?,
            };
            if let Some(v) = value {
                state.args.insert(name.clone(), v);
            }
        }
        Op::Workdir(dir) => {
            let dir = x(dir)?;
            state.config.working_dir = join_dir(&state.config.working_dir, &dir);
        }
        Op::User(user) => state.config.user = x(user)?,
        Op::Entrypoint(cmd) => state.config.entrypoint = Some(argv(&state, cmd)),
        Op::Cmd(cmd) => state.config.cmd = Some(argv(&state, cmd)),
        Op::Label(pairs) => {
            let labels = state.config.labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in pairs {
                labels.insert(x(k)?, x(v)?);
            }
        }
        Op::Shell(shell) => state.shell = shell.clone(),
        Op::Ignored(_) => {}
        Op::Run { command, network } => {
            let host = network_host(run, network.as_deref()).map_err(err)?;
            let argv = argv(&state, command);
            let layer = in_sandbox(b, run, &state, &key, host, false, async |sb| {
                run_command(sb, argv, &vars).await
            })
            .await
            .map_err(|e| step_error(run, step, e))?;
            state.layers.push(layer);
        }
        Op::Copy { .. } => {
            let layer = copy(b, run, &state, step, &key).await?;
            state.layers.push(layer);
        }
    }
    state.key = key;
    Ok(state)
}

/// A step failure names the Dockerfile line; sandbox and I/O failures keep
/// their kind (they are the machine's, not the Dockerfile's).
fn step_error(run: &Run<'_>, step: &Step, e: ImageError) -> ImageError {
    match e {
        ImageError::Invalid(m) => build_err(run, step.line, m),
        other => other,
    }
}

/// Whether a RUN step gets the host's network.
fn network_host(run: &Run<'_>, flag: Option<&str>) -> std::result::Result<bool, String> {
    match flag {
        None | Some("default") => Ok(run.opts.network_host),
        Some("none") => Ok(false),
        Some("host") if run.opts.network_host => Ok(true),
        Some("host") => Err("RUN --network=host needs `arbor image build --network host`".into()),
        Some(other) => Err(format!(
            "RUN --network={other} is not supported (host or none)"
        )),
    }
}

fn argv(state: &State, cmd: &CommandForm) -> Vec<String> {
    match cmd {
        CommandForm::Exec(v) => v.clone(),
        CommandForm::Shell(s) => {
            let mut v = state.shell.clone();
            v.push(s.clone());
            v
        }
    }
}

fn join_dir(current: &str, dir: &str) -> String {
    if dir.starts_with('/') {
        dir.to_string()
    } else {
        let base = if current.is_empty() { "/" } else { current };
        format!("{}/{dir}", base.trim_end_matches('/'))
    }
}

async fn run_command(
    sb: &LocalSandbox,
    argv: Vec<String>,
    vars: &BTreeMap<String, String>,
) -> Result<()> {
    let mut req = ExecRequest::new(argv).timeout(RUN_TIMEOUT);
    req.env = vars.clone();
    let r = sb.exec(req).await?;
    if r.success() {
        return Ok(());
    }
    let mut out = r.stdout_str();
    out.push_str(&r.stderr_str());
    let tail: String = {
        let chars: Vec<char> = out.chars().collect();
        chars[chars.len().saturating_sub(ERROR_TAIL)..]
            .iter()
            .collect()
    };
    let how = if r.timed_out {
        "timed out".to_string()
    } else {
        format!("exited with {}", r.exit_code)
    };
    Err(ImageError::Invalid(format!(
        "RUN {how}:\n{}",
        tail.trim_end()
    )))
}

/// COPY/ADD: unpack the sources into a sandbox over the stage, then chown/chmod.
async fn copy(
    b: &Builder<'_>,
    run: &mut Run<'_>,
    state: &State,
    step: &Step,
    key: &Digest,
) -> Result<Digest> {
    let Op::Copy {
        sources,
        dest,
        chown,
        chmod,
        from,
        add,
    } = &step.op
    else {
        return Err(build_err(run, step.line, "not a COPY step"));
    };
    let vars = state.vars();
    let (file, line) = (run.file.clone(), step.line);
    let berr = |m: String| ImageError::Build {
        file: file.clone(),
        line,
        message: m,
    };
    let x = |s: &str| dockerfile::expand(s, &vars).map_err(berr);
    let dest = join_dir(&state.config.working_dir, &x(dest)?);
    let many = sources.len() > 1 || dest.ends_with('/') || is_dir_in(b, state, &dest);
    let mut items: Vec<(String, Vec<u8>)> = Vec::new();
    for src in sources {
        let src = x(src)?;
        let tar = match from {
            Some(stage) => b.read_from_stage(run, stage, &src).await?,
            None => {
                let path = resolve(&run.opts.context, &src).map_err(berr)?;
                if *add && is_archive(&path) {
                    items.push((dest.clone(), read_archive(&path)?));
                    continue;
                }
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("file")
                    .to_string();
                let target = if path.is_dir() || many {
                    dest.clone()
                } else {
                    parent(&dest)
                };
                let file_name = if path.is_dir() || many {
                    name
                } else {
                    base(&dest)
                };
                items.push((target, pack_source(&path, &file_name)?));
                continue;
            }
        };
        items.push((dest.clone(), tar));
    }
    let fixups = ownership_script(chown.as_deref(), chmod.as_deref(), &dest);
    in_sandbox(b, run, state, key, false, true, async |sb| {
        for (target, tar) in items {
            sb.write_tar(&target, tar).await?;
        }
        if let Some(script) = fixups {
            run_command(
                sb,
                vec!["/bin/sh".into(), "-c".into(), script],
                &BTreeMap::new(),
            )
            .await?;
        }
        Ok(())
    })
    .await
    .map_err(|e| step_error(run, step, e))
}

/// Whether `path` is a directory in the stage's filesystem (the uppermost
/// layer that has it decides; a whiteout hides it), so `COPY file /dir`
/// copies into the directory as Docker does.
fn is_dir_in(b: &Builder<'_>, state: &State, path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return true;
    }
    for layer in state.layers.iter().rev() {
        if let Ok(meta) = std::fs::symlink_metadata(b.store.layer_dir(layer).join(rel)) {
            return meta.is_dir() && !meta.file_type().is_char_device();
        }
    }
    false
}

/// `chown`/`chmod` of what was copied (run inside, so names resolve against
/// the image's own /etc/passwd and /etc/group).
fn ownership_script(chown: Option<&str>, chmod: Option<&str>, dest: &str) -> Option<String> {
    let q = shell_quote(dest);
    let mut parts = Vec::new();
    if let Some(owner) = chown {
        parts.push(format!("chown -R -h {} {q}", shell_quote(owner)));
    }
    if let Some(mode) = chmod {
        parts.push(format!("chmod -R {} {q}", shell_quote(mode)));
    }
    (!parts.is_empty()).then(|| parts.join(" && "))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn parent(path: &str) -> String {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/".to_string(),
        Some((p, _)) => p.to_string(),
    }
}

fn base(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// Run `body` in a sandbox over the stage's layers, then commit the sandbox's
/// writable layer as layer `sha256(key)`. The sandbox is destroyed on every path.
async fn in_sandbox<F>(
    b: &Builder<'_>,
    run: &mut Run<'_>,
    state: &State,
    key: &Digest,
    network_host: bool,
    as_root: bool,
    body: F,
) -> Result<Digest>
where
    F: AsyncFnOnce(&LocalSandbox) -> Result<()>,
{
    if state.layers.is_empty() && !as_root {
        return Err(ImageError::Invalid(
            "RUN needs a base image (FROM scratch has no shell to run it)".into(),
        ));
    }
    let lease = b.store.lease(&state.record("build"))?;
    let mut layers = lease.layer_dirs();
    if layers.is_empty() {
        // COPY onto `scratch`: an overlay needs one lower directory.
        let empty = b.store.tmp_dir().join("empty-layer");
        std::fs::create_dir_all(&empty)
            .map_err(|e| ImageError::io(format!("create {}", empty.display()), e))?;
        layers.push(empty);
    }
    let spec = SandboxSpec {
        layers,
        workdir: if state.config.working_dir.is_empty() {
            "/".to_string()
        } else {
            state.config.working_dir.clone()
        },
        user: (!as_root && !state.config.user.is_empty()).then(|| state.config.user.clone()),
        env: state.config.env_pairs().into_iter().collect(),
        network: NetworkSpec {
            host: network_host,
            ..NetworkSpec::default()
        },
        limits: build_limits(),
        ..SandboxSpec::default()
    };
    let sb = b.backend.create_local(&spec).await?;
    let result = match body(&sb).await {
        Ok(()) => {
            let layer = Digest::sha256(format!("layer {key}").as_bytes());
            b.store
                .add_layer_dir(&layer, &sb.writable_layer())
                .map(|_| layer)
        }
        Err(e) => Err(e),
    };
    let _ = sb.destroy().await;
    run.leases.push(lease);
    result
}

/// Builds install toolchains: more room than an agent's sandbox.
fn build_limits() -> Limits {
    Limits {
        memory_mb: 8192,
        pids: 4096,
        exec_timeout_s: RUN_TIMEOUT.as_secs_f64(),
        workspace_mb: 8192,
        ..Limits::default()
    }
}

impl Builder<'_> {
    /// A tar of `path` in an earlier stage (or an image) for `COPY --from`.
    async fn read_from_stage(&self, run: &mut Run<'_>, stage: &str, path: &str) -> Result<Vec<u8>> {
        let state = match run
            .stages
            .iter()
            .find(|(n, _)| n.as_deref() == Some(stage))
            .or_else(|| stage.parse::<usize>().ok().and_then(|i| run.stages.get(i)))
        {
            Some((_, s)) => s.clone(),
            None => {
                return Err(ImageError::Invalid(format!(
                    "COPY --from={stage}: no such stage"
                )));
            }
        };
        let lease = self.store.lease(&state.record("build"))?;
        let spec = SandboxSpec {
            layers: lease.layer_dirs(),
            limits: build_limits(),
            ..SandboxSpec::default()
        };
        let sb = self.backend.create_local(&spec).await?;
        let tar = sb.read_tar(path).await;
        let _ = sb.destroy().await;
        run.leases.push(lease);
        Ok(tar?)
    }
}
