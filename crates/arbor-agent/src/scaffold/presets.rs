//! Agent presets: known agent CLIs as black-box scaffolds that need only
//! configuration (`kind = "claude-code" | "codex" | "opencode" |
//! "mini-swe-agent"` in an experiment file).
//!
//! A preset knows its CLI's API (which the gateway serves at the bridged
//! session URL), its base-URL and key variables, its non-interactive and
//! permission-skipping flags, the configuration files it reads (written
//! into the sandbox before the run, under a writable `HOME` in `/tmp`), and
//! where its binary is: `path` is an npm prefix or virtualenv folder
//! (default: where `scripts/install-agents.sh` puts it) or the binary
//! itself, bound read-only into the sandbox at the same path. Each preset
//! becomes a [`BlackBoxConfig`], so anything it sets can be overridden
//! (`env`, extra `args`) and the generic `blackbox` kind remains for CLIs
//! without a preset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::blackbox::{AgentBind, BlackBoxConfig, shell_quote};

/// Where every preset keeps its state inside the sandbox (a writable HOME).
pub const AGENT_HOME: &str = "/tmp/agent-home";

/// The settings of a preset scaffold (all optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresetConfig {
    /// Name in results and reports (default: the kind).
    pub name: Option<String>,
    /// The installed CLI: an npm prefix or virtualenv folder (its `bin/`
    /// holds the binary) or the binary itself. Default: `$ARBOR_AGENTS_NPM`
    /// or `target/agents/npm` (npm CLIs), `$ARBOR_AGENT_VENV` or
    /// `target/agent-venv` (mini-swe-agent), relative to the current folder.
    pub path: Option<PathBuf>,
    /// Extra command-line arguments, appended (each shell-quoted).
    pub args: Vec<String>,
    /// Extra environment; overrides the preset's own variables.
    pub env: BTreeMap<String, String>,
    /// More host paths bound read-only into the sandbox.
    pub binds: Vec<AgentBind>,
    /// Hard limit of the agent process, seconds (default 1800).
    pub timeout_s: Option<f64>,
}

/// The API a CLI speaks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Anthropic Messages (`/v1/messages`).
    AnthropicMessages,
    /// OpenAI Responses (`/v1/responses`).
    Responses,
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    ChatCompletions,
}

/// A known agent CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    /// Claude Code (npm `@anthropic-ai/claude-code`), `claude -p`.
    ClaudeCode,
    /// Codex CLI (npm `@openai/codex`), `codex exec`.
    Codex,
    /// OpenCode (npm `opencode-ai`), `opencode run`.
    OpenCode,
    /// mini-swe-agent (PyPI `mini-swe-agent`), `mini -y --exit-immediately`.
    MiniSweAgent,
}

impl Agent {
    /// The `kind` in experiment files.
    pub fn kind(self) -> &'static str {
        match self {
            Agent::ClaudeCode => "claude-code",
            Agent::Codex => "codex",
            Agent::OpenCode => "opencode",
            Agent::MiniSweAgent => "mini-swe-agent",
        }
    }

    /// The API its calls use.
    pub fn api(self) -> Api {
        match self {
            Agent::ClaudeCode => Api::AnthropicMessages,
            Agent::Codex => Api::Responses,
            Agent::OpenCode | Agent::MiniSweAgent => Api::ChatCompletions,
        }
    }

    /// The binary's path below an install folder.
    fn binary_in(self, dir: &Path) -> PathBuf {
        dir.join("bin").join(match self {
            Agent::ClaudeCode => "claude",
            Agent::Codex => "codex",
            Agent::OpenCode => "opencode",
            Agent::MiniSweAgent => "mini",
        })
    }

    /// The install folder when `path` is not set.
    fn default_path(self) -> PathBuf {
        let (var, dir) = match self {
            Agent::MiniSweAgent => ("ARBOR_AGENT_VENV", "target/agent-venv"),
            _ => ("ARBOR_AGENTS_NPM", "target/agents/npm"),
        };
        std::env::var_os(var).map_or_else(|| PathBuf::from(dir), PathBuf::from)
    }

    /// The black-box scaffold this preset runs, or why the CLI cannot be
    /// found on the host.
    pub fn blackbox(self, p: &PresetConfig) -> Result<BlackBoxConfig, String> {
        let name = p.name.clone().unwrap_or_else(|| self.kind().to_string());
        let (bind, binary) = self.locate(p.path.as_deref(), &name)?;
        let bin = shell_quote(&binary.to_string_lossy());
        let mut args: String = p
            .args
            .iter()
            .map(|a| format!(" {}", shell_quote(a)))
            .collect();
        args.push_str(" </dev/null");
        let mut env = common_env();
        let mut files = BTreeMap::new();
        let command = match self {
            Agent::ClaudeCode => claude_code(&bin, &mut env),
            Agent::Codex => codex(&bin, &mut env, &mut files),
            Agent::OpenCode => opencode(&bin, &mut env, &mut files),
            Agent::MiniSweAgent => mini_swe_agent(&bin, &mut env),
        };
        env.extend(p.env.clone());
        let mut binds = vec![AgentBind::same_path(bind)];
        binds.extend(p.binds.iter().cloned());
        Ok(BlackBoxConfig {
            name,
            install: vec![],
            run: format!("mkdir -p {AGENT_HOME} && exec {command}{args}"),
            env,
            files,
            binds,
            timeout_s: p.timeout_s.unwrap_or(1800.0),
            install_timeout_s: 60.0,
        })
    }

    /// (host path to bind, binary) for `path`: a folder holding `bin/<cli>`,
    /// or the binary itself (symlinks resolved, so the bound file is real).
    fn locate(self, path: Option<&Path>, name: &str) -> Result<(PathBuf, PathBuf), String> {
        let given = path.map_or_else(|| self.default_path(), Path::to_path_buf);
        let missing = |what: String| {
            format!(
                "scaffold `{name}` ({}): {what}; install it with scripts/install-agents.sh \
                 or set `path` to its install folder or binary",
                self.kind()
            )
        };
        let abs = given
            .canonicalize()
            .map_err(|e| missing(format!("{} not found ({e})", given.display())))?;
        if abs.is_file() {
            return Ok((abs.clone(), abs));
        }
        let binary = self.binary_in(&abs);
        if !binary.exists() {
            return Err(missing(format!(
                "no {} in {}",
                binary.display(),
                abs.display()
            )));
        }
        Ok((abs, binary))
    }
}

/// Environment every preset gets: a writable home, no colour, no pager.
fn common_env() -> BTreeMap<String, String> {
    [
        ("HOME", AGENT_HOME.to_string()),
        ("XDG_CONFIG_HOME", format!("{AGENT_HOME}/.config")),
        ("XDG_DATA_HOME", format!("{AGENT_HOME}/.local/share")),
        ("XDG_STATE_HOME", format!("{AGENT_HOME}/.local/state")),
        ("XDG_CACHE_HOME", format!("{AGENT_HOME}/.cache")),
        ("NO_COLOR", "1".to_string()),
        ("TERM", "dumb".to_string()),
        ("PAGER", "cat".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn set(env: &mut BTreeMap<String, String>, vars: &[(&str, &str)]) {
    for (k, v) in vars {
        env.insert(k.to_string(), v.to_string());
    }
}

/// Claude Code: Anthropic Messages at `{base_url_root}` (it appends
/// `/v1/messages` itself); every model alias mapped to the served model;
/// permission prompts skipped (allowed as root only with `IS_SANDBOX=1`).
fn claude_code(bin: &str, env: &mut BTreeMap<String, String>) -> String {
    set(
        env,
        &[
            ("ANTHROPIC_BASE_URL", "{base_url_root}"),
            ("ANTHROPIC_API_KEY", "{api_key}"),
            ("ANTHROPIC_MODEL", "{model}"),
            ("ANTHROPIC_SMALL_FAST_MODEL", "{model}"),
            ("ANTHROPIC_DEFAULT_HAIKU_MODEL", "{model}"),
            ("ANTHROPIC_DEFAULT_SONNET_MODEL", "{model}"),
            ("ANTHROPIC_DEFAULT_OPUS_MODEL", "{model}"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("DISABLE_TELEMETRY", "1"),
            ("DISABLE_ERROR_REPORTING", "1"),
            ("IS_SANDBOX", "1"),
        ],
    );
    format!(
        "{bin} -p {{instruction}} --dangerously-skip-permissions --model {{model}} --output-format text"
    )
}

/// Codex's configuration: the gateway as a Responses provider, no retries
/// (the gateway already retries its upstream), no approvals, no sandbox of
/// its own (arbor's sandbox is the boundary). Codex's default tools stay on:
/// its hosted web search is a tool no Chat Completions upstream can serve, so
/// a run with Codex sets the gateway's `drop_unsupported_tools` (docs/agents.md).
const CODEX_CONFIG: &str = r#"model = "{model}"
model_provider = "arbor"
approval_policy = "never"
sandbox_mode = "danger-full-access"

[model_providers.arbor]
name = "arbor gateway"
base_url = "{base_url}"
env_key = "ARBOR_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"#;

fn codex(
    bin: &str,
    env: &mut BTreeMap<String, String>,
    files: &mut BTreeMap<String, String>,
) -> String {
    let home = format!("{AGENT_HOME}/.codex");
    files.insert(format!("{home}/config.toml"), CODEX_CONFIG.to_string());
    set(env, &[("ARBOR_API_KEY", "{api_key}")]);
    env.insert("CODEX_HOME".into(), home);
    format!(
        "{bin} exec --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox \
         --model {{model}} {{instruction}}"
    )
}

/// OpenCode's configuration: the gateway as an OpenAI-compatible (Chat
/// Completions) provider; every permission granted; no sharing, no updates.
const OPENCODE_CONFIG: &str = r#"{
  "$schema": "https://opencode.ai/config.json",
  "provider": {
    "arbor": {
      "npm": "@ai-sdk/openai-compatible",
      "name": "arbor gateway",
      "options": {"baseURL": "{base_url}", "apiKey": "{api_key}"},
      "models": {"{model}": {"name": "{model}", "tool_call": true}}
    }
  },
  "model": "arbor/{model}",
  "small_model": "arbor/{model}",
  "permission": {"edit": "allow", "bash": "allow", "webfetch": "deny"},
  "share": "disabled",
  "autoupdate": false
}
"#;

fn opencode(
    bin: &str,
    env: &mut BTreeMap<String, String>,
    files: &mut BTreeMap<String, String>,
) -> String {
    let config = format!("{AGENT_HOME}/opencode.json");
    files.insert(config.clone(), OPENCODE_CONFIG.to_string());
    env.insert("OPENCODE_CONFIG".into(), config);
    set(
        env,
        &[
            ("OPENCODE_DISABLE_AUTOUPDATE", "1"),
            ("OPENCODE_DISABLE_MODELS_FETCH", "1"),
            ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1"),
            ("OPENCODE_DISABLE_DEFAULT_PLUGINS", "1"),
        ],
    );
    format!("{bin} run --model arbor/{{model}} {{instruction}}")
}

/// mini-swe-agent: litellm's `openai/` provider (Chat Completions), its
/// default tool-calling config, no cost tracking (the served model has no
/// price), no retries, a cap on calls.
fn mini_swe_agent(bin: &str, env: &mut BTreeMap<String, String>) -> String {
    set(
        env,
        &[
            ("MSWEA_GLOBAL_CONFIG_DIR", "/tmp/agent-home/mini-swe-agent"),
            ("MSWEA_CONFIGURED", "true"),
            ("MSWEA_SILENT_STARTUP", "1"),
            ("MSWEA_COST_TRACKING", "ignore_errors"),
            ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
            ("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1"),
            ("MSWEA_GLOBAL_CALL_LIMIT", "100"),
            ("PYTHONUNBUFFERED", "1"),
        ],
    );
    format!(
        "{bin} -y --exit-immediately -m openai/{{model}} -t {{instruction}} \
         -o {AGENT_HOME}/mini.traj.json -c mini.yaml -c agent.cost_limit=0 \
         -c environment.timeout=120 \
         -c model.model_kwargs.api_base={{base_url}} -c model.model_kwargs.api_key={{api_key}} \
         -c model.model_kwargs.num_retries=0"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preset_finds_its_binary_in_an_install_folder_or_as_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("npm");
        std::fs::create_dir_all(prefix.join("bin")).expect("mkdir");
        std::fs::write(prefix.join("bin/claude"), "#!/bin/sh\n").expect("write");
        let p = PresetConfig {
            path: Some(prefix.clone()),
            args: vec!["--max-turns".into(), "5".into()],
            ..Default::default()
        };
        let cfg = Agent::ClaudeCode.blackbox(&p).expect("found");
        let prefix = prefix.canonicalize().expect("canonical");
        assert_eq!(cfg.name, "claude-code");
        assert_eq!(cfg.binds, vec![AgentBind::same_path(&prefix)]);
        assert!(
            cfg.run
                .contains(&prefix.join("bin/claude").display().to_string())
        );
        assert!(
            cfg.run.ends_with(" '--max-turns' '5' </dev/null"),
            "{}",
            cfg.run
        );
        assert_eq!(cfg.env["ANTHROPIC_BASE_URL"], "{base_url_root}");

        let file = Agent::ClaudeCode
            .blackbox(&PresetConfig {
                path: Some(prefix.join("bin/claude")),
                ..Default::default()
            })
            .expect("binary path");
        assert!(
            cfg.run
                .starts_with(file.run.trim_end_matches(" </dev/null"))
        );
        assert_eq!(file.binds[0].source, prefix.join("bin/claude"));

        let e = Agent::Codex.blackbox(&p).expect_err("no codex there");
        assert!(
            e.contains("bin/codex") && e.contains("install-agents.sh"),
            "{e}"
        );
        let e = Agent::OpenCode
            .blackbox(&PresetConfig {
                path: Some(dir.path().join("nowhere")),
                ..Default::default()
            })
            .expect_err("missing folder");
        assert!(e.contains("nowhere") && e.contains("not found"), "{e}");
    }

    #[test]
    fn config_files_point_the_cli_at_the_gateway() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        for b in ["codex", "opencode"] {
            std::fs::write(dir.path().join("bin").join(b), "").expect("write");
        }
        let p = PresetConfig {
            path: Some(dir.path().into()),
            ..Default::default()
        };
        let codex = Agent::Codex.blackbox(&p).expect("codex");
        let toml = &codex.files["/tmp/agent-home/.codex/config.toml"];
        assert!(
            toml.contains("base_url = \"{base_url}\"") && toml.contains("wire_api = \"responses\"")
        );
        let oc = Agent::OpenCode.blackbox(&p).expect("opencode");
        let json: serde_json::Value =
            serde_json::from_str(&oc.files["/tmp/agent-home/opencode.json"]).expect("json");
        assert_eq!(
            json["provider"]["arbor"]["options"]["baseURL"],
            "{base_url}"
        );
    }
}
