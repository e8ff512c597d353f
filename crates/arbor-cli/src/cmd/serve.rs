//! `arbor serve`: the env server for external trainers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arbor_rollout::backend::BackendSpec;
use arbor_rollout::server::{AllowedDirs, AllowedEnv, ServerConfig, TOKEN_ENV};
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: the API runs code in sandboxes
    /// on request). A non-loopback address needs a token (--token-file or $ARBOR_TOKEN).
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: SocketAddr,
    /// Directory for batch run directories (ROOT/<batch id>).
    #[arg(long, default_value = "runs/serve")]
    root: PathBuf,
    /// File holding the bearer token every API route then requires (default: $ARBOR_TOKEN;
    /// neither: no token, loopback only). Never given on the command line, where `ps` shows it.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A directory whose contents submitted batches may name as host paths (datasets, binds,
    /// rootfs, checkpoints...), symlinks and `..` resolved first. Repeatable. Without any,
    /// batches may name no host path (built-in task generators need none).
    #[arg(long = "allow-dir", value_name = "DIR")]
    allow_dirs: Vec<PathBuf>,
    /// A variable of this server's environment that submitted batches may name as an API key
    /// (`policy.api_key_env`, a task's LLM judge `api_key_env`); its value is sent to the
    /// endpoint the batch names. Repeatable. Without any, batches may name none.
    #[arg(long = "allow-env", value_name = "VAR")]
    allow_env: Vec<String>,
    /// TOML file with where every batch's sandboxes live, the schema of an experiment's
    /// `backend = {...}` table (e.g. kind = "cluster", nodes = [...], token_file = ...;
    /// relative paths from the file's folder). Default: this host (kind = "local").
    #[arg(long, value_name = "FILE")]
    backend_file: Option<PathBuf>,
}

/// The operator's backend table: parsed and checked now, connected per batch.
fn read_backend(file: &Path) -> Result<BackendSpec> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the backend file {}", file.display()))?;
    let mut spec: BackendSpec =
        toml::from_str(&text).with_context(|| format!("backend file {}", file.display()))?;
    if let BackendSpec::Cluster(c) = &mut spec {
        c.validate()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("backend file {}", file.display()))?;
        c.resolve_paths(file.parent().unwrap_or(Path::new(".")));
    }
    Ok(spec)
}

pub async fn run(a: ServeArgs) -> Result<i32> {
    let token =
        arbor_node::token::read(a.token_file.as_deref(), TOKEN_ENV).map_err(anyhow::Error::msg)?;
    let allowed = AllowedDirs::new(&a.allow_dirs).context("--allow-dir")?;
    let allowed_env = AllowedEnv::new(&a.allow_env)
        .map_err(anyhow::Error::msg)
        .context("--allow-env")?;
    let mut config = ServerConfig::new(a.listen, a.root.clone());
    config.token = token;
    config.allowed = allowed;
    config.allowed_env = allowed_env;
    if let Some(f) = &a.backend_file {
        config.backend_spec = read_backend(f)?;
    }
    let with_token = config.token.is_some();
    let dirs: Vec<String> = config
        .allowed
        .dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let vars = config.allowed_env.vars().join(", ");
    let server = arbor_rollout::server::start(config)
        .await
        .with_context(|| format!("starting the env server on {}", a.listen))?;
    // The first stdout line names the address (useful with port 0).
    println!("listening on http://{}", server.addr);
    eprintln!(
        "arbor env server: batches in {}; token {}; host paths allowed in: {}; environment \
         variables allowed: {}; API: POST /v1/batches, GET /v1/batches/{{id}}/results (see \
         docs/env-server.md)",
        a.root.display(),
        if with_token {
            "required"
        } else {
            "not required"
        },
        if dirs.is_empty() {
            "none".to_string()
        } else {
            dirs.join(", ")
        },
        if vars.is_empty() { "none" } else { &vars },
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.wait().await.context("env server")?;
    Ok(0)
}
