//! An experiment: one TOML file that says which tasks, which scaffolds,
//! which policy, how many samples, how much at once, and where results go.
//!
//! ```toml
//! name = "oracle-all"
//! output = "runs/oracle-all"     # relative to the current directory
//! samples = 1                    # per task and scaffold
//! concurrency = 64
//! infra_retries = 2
//!
//! [[datasets]]                   # a task source (native, SWE-bench, Harbor) ...
//! path = "tasks/terminal"
//! [[datasets]]                   # ... or a built-in generator
//! domain = "terminal"
//! n = 20
//! seed = 7
//!
//! [[scaffolds]]
//! kind = "bash"
//! max_steps = 20
//! [[scaffolds]]
//! kind = "tools"
//! [[scaffolds]]                  # an agent CLI (docs/agents.md): "claude-code",
//! kind = "claude-code"           # "codex", "opencode", "mini-swe-agent", "blackbox"
//! path = "../target/agents/npm"  # its install folder (relative to this file)
//!
//! [policy]
//! kind = "scripted-oracle"       # or "upstream" with base_url/model
//!
//! [gateway]                      # optional: the run's gateway (see `gateway.rs`)
//! max_calls_per_session = 200
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use arbor_agent::ScaffoldConfig;
use arbor_agent::scaffold::blackbox::BlackBoxConfig;
use arbor_agent::scaffold::presets::{Agent, PresetConfig};
use arbor_task::verify::GradeMode;
use serde::{Deserialize, Serialize};

use crate::backend::BackendSpec;
use crate::error::{Result, RolloutError};

mod gateway;

pub use gateway::GatewaySpec;

/// A whole experiment file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name in reports.
    pub name: String,
    /// Run directory (results, trajectories, report). `arbor run --out` overrides.
    pub output: PathBuf,
    /// Where tasks come from.
    pub datasets: Vec<DatasetSpec>,
    /// Scaffolds; every task is rolled out under each.
    pub scaffolds: Vec<ScaffoldSpec>,
    /// The model behind the gateway.
    pub policy: PolicySpec,
    /// Samples per task and scaffold.
    #[serde(default = "one")]
    pub samples: u32,
    /// Rollouts in flight at once (each holds a sandbox).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra attempts after an infrastructure failure (sandbox died, upstream
    /// unreachable, verifier infrastructure error).
    #[serde(default = "two")]
    pub infra_retries: u32,
    /// Time limits.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Verifier overrides.
    #[serde(default)]
    pub verifier: VerifierOverrides,
    /// Sandboxes kept warm for tasks whose environment matches (0 = no pool).
    #[serde(default)]
    pub warm_pool: usize,
    /// Run tasks that ask for a container image on the default rootfs.
    #[serde(default)]
    pub allow_default_rootfs: bool,
    /// Where container images are kept and how registries are reached (for
    /// tasks that name an image or a Dockerfile).
    #[serde(default)]
    pub images: ImagesSpec,
    /// Where sandboxes live: this host (default) or a cluster of nodes.
    #[serde(default)]
    pub backend: BackendSpec,
    /// Options of the run's gateway (tool policy, token ids, session caps...).
    #[serde(default, skip_serializing_if = "is_default_gateway")]
    pub gateway: GatewaySpec,
}

fn is_default_gateway(g: &GatewaySpec) -> bool {
    *g == GatewaySpec::default()
}

/// `[images]`: the image store and registries of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesSpec {
    /// Store directory (default `$ARBOR_IMAGE_ROOT` or `/var/lib/arbor/images`).
    pub root: Option<PathBuf>,
    /// Disk budget of unpacked layers, GB (least recently used unused layers go first).
    pub max_gb: Option<f64>,
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Registry host -> mirror host.
    pub mirrors: std::collections::BTreeMap<String, String>,
    /// Give Dockerfile RUN steps the host's network (`docker build` does).
    pub build_network_host: bool,
}

impl ImagesSpec {
    /// The image backend's configuration.
    pub fn config(&self) -> arbor_image::backend::ImagesConfig {
        arbor_image::backend::ImagesConfig {
            root: self.root.clone(),
            max_bytes: self.max_gb.map(|gb| (gb.max(0.0) * 1e9) as u64),
            registry: arbor_image::RegistryConfig {
                insecure: self.insecure.clone(),
                mirrors: self.mirrors.clone(),
                docker_config: None,
            },
            build_network_host: self.build_network_host,
        }
    }
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn default_concurrency() -> usize {
    16
}

/// A task source: either `path` (native task files or JSONL, a SWE-bench
/// JSONL, a Harbor folder) or `domain` + `n` (a built-in generator, as
/// `arbor task gen`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetSpec {
    /// A task source on disk.
    pub path: Option<PathBuf>,
    /// A built-in domain (`swe`, `terminal`, `webcoding`, `websearch`, `general`).
    pub domain: Option<String>,
    /// Tasks to generate (with `domain`).
    pub n: Option<usize>,
    /// Generator seed (with `domain`).
    pub seed: u64,
    /// `train`, `heldout` or `any` (with `domain`; default `any`).
    pub split: Option<String>,
    /// 1..=5 (with `domain`; default 2).
    pub difficulty: Option<u32>,
    /// Leave out the first `skip` tasks of the source (before `limit`): with `limit`, a window
    /// of a larger task pool.
    pub skip: usize,
    /// Keep only the first `limit` tasks of the source (after `skip`).
    pub limit: Option<usize>,
}

impl DatasetSpec {
    fn validate(&self) -> std::result::Result<(), String> {
        match (&self.path, &self.domain) {
            (Some(_), Some(_)) => Err("a dataset has both `path` and `domain`; use one".into()),
            (None, None) => Err("a dataset needs `path` or `domain`".into()),
            (Some(_), None) => {
                if self.n.is_some() || self.split.is_some() || self.difficulty.is_some() {
                    Err("`n`, `split` and `difficulty` go with `domain`, not `path`".into())
                } else {
                    Ok(())
                }
            }
            (None, Some(d)) => {
                if !arbor_task::domains::is_generated(d) {
                    return Err(format!(
                        "unknown domain `{d}` (one of: {}, {})",
                        arbor_task::domains::DOMAINS.join(", "),
                        arbor_task::domains::CHECK_FAMILIES.join(", ")
                    ));
                }
                match self.n {
                    Some(n) if n > 0 => Ok(()),
                    _ => Err(format!("dataset `{d}` needs `n` (tasks to generate) > 0")),
                }
            }
        }
    }
}

/// A scaffold, by kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScaffoldSpec {
    /// One shell command per turn in a fenced block.
    Bash(ScaffoldConfig),
    /// OpenAI function calling: bash, editor, submit.
    Tools(ScaffoldConfig),
    /// Any agent program inside the sandbox.
    Blackbox(BlackBoxConfig),
    /// Claude Code (`claude -p`, Anthropic Messages).
    #[serde(rename = "claude-code")]
    ClaudeCode(PresetConfig),
    /// Codex CLI (`codex exec`, Responses).
    Codex(PresetConfig),
    /// OpenCode (`opencode run`, Chat Completions).
    Opencode(PresetConfig),
    /// mini-swe-agent (`mini`, Chat Completions through litellm).
    #[serde(rename = "mini-swe-agent")]
    MiniSweAgent(PresetConfig),
}

impl ScaffoldSpec {
    /// The name used in results and reports.
    pub fn name(&self) -> &str {
        match self {
            ScaffoldSpec::Bash(_) => "bash",
            ScaffoldSpec::Tools(_) => "tools",
            ScaffoldSpec::Blackbox(b) => &b.name,
            ScaffoldSpec::ClaudeCode(p)
            | ScaffoldSpec::Codex(p)
            | ScaffoldSpec::Opencode(p)
            | ScaffoldSpec::MiniSweAgent(p) => p.name.as_deref().unwrap_or(self.kind()),
        }
    }

    /// The `kind` in the experiment file.
    pub fn kind(&self) -> &'static str {
        match self {
            ScaffoldSpec::Bash(_) => "bash",
            ScaffoldSpec::Tools(_) => "tools",
            ScaffoldSpec::Blackbox(_) => "blackbox",
            ScaffoldSpec::ClaudeCode(_) => Agent::ClaudeCode.kind(),
            ScaffoldSpec::Codex(_) => Agent::Codex.kind(),
            ScaffoldSpec::Opencode(_) => Agent::OpenCode.kind(),
            ScaffoldSpec::MiniSweAgent(_) => Agent::MiniSweAgent.kind(),
        }
    }

    /// Whether the scaffold runs an agent program inside the sandbox.
    pub fn is_blackbox(&self) -> bool {
        !matches!(self, ScaffoldSpec::Bash(_) | ScaffoldSpec::Tools(_))
    }

    /// The black-box configuration of a black-box or preset scaffold
    /// (`None` for arbor's own), or why its agent cannot be found.
    pub fn blackbox(&self) -> std::result::Result<Option<BlackBoxConfig>, String> {
        let (agent, preset) = match self {
            ScaffoldSpec::Bash(_) | ScaffoldSpec::Tools(_) => return Ok(None),
            ScaffoldSpec::Blackbox(b) => return Ok(Some(b.clone())),
            ScaffoldSpec::ClaudeCode(p) => (Agent::ClaudeCode, p),
            ScaffoldSpec::Codex(p) => (Agent::Codex, p),
            ScaffoldSpec::Opencode(p) => (Agent::OpenCode, p),
            ScaffoldSpec::MiniSweAgent(p) => (Agent::MiniSweAgent, p),
        };
        agent.blackbox(preset).map(Some)
    }

    /// Host paths in the scaffold's settings, resolved against `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match self {
            ScaffoldSpec::Bash(_) | ScaffoldSpec::Tools(_) => {}
            ScaffoldSpec::Blackbox(b) => b.binds.iter_mut().for_each(|b| resolve(&mut b.source)),
            ScaffoldSpec::ClaudeCode(p)
            | ScaffoldSpec::Codex(p)
            | ScaffoldSpec::Opencode(p)
            | ScaffoldSpec::MiniSweAgent(p) => {
                p.path.iter_mut().for_each(resolve);
                p.binds.iter_mut().for_each(|b| resolve(&mut b.source));
            }
        }
    }
}

/// The policy behind the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PolicySpec {
    /// Replays each task's oracle through the scaffold's protocol. Tests and
    /// loads the infrastructure; says nothing about a model.
    ScriptedOracle,
    /// OpenAI-compatible servers (vLLM, SGLang, a hosted API).
    Upstream {
        /// Base URLs including `/v1`; the gateway balances and fails over.
        base_urls: Vec<String>,
        /// Model name sent in requests.
        model: String,
        /// Environment variable holding the API key, if the upstream needs one.
        #[serde(default)]
        api_key_env: Option<String>,
        /// Cap on completion tokens per call.
        #[serde(default)]
        max_tokens: Option<u32>,
        /// Sampling temperature sent with every call (default: the server's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        temperature: Option<f32>,
    },
    /// An `arbor-model` checkpoint served in-process (`arbor policy serve`
    /// does the same standalone), sampling at the requests' temperature.
    Embedded {
        /// Checkpoint directory (`config.json` + `model.safetensors`).
        checkpoint: PathBuf,
        /// Cap on completion tokens per call (default 256).
        #[serde(default)]
        max_tokens: Option<u32>,
        /// Generations running at once (default: the number of CPUs).
        #[serde(default)]
        max_concurrency: Option<usize>,
        /// Sampling temperature sent with every call (default 1.0; 0 = greedy).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        temperature: Option<f32>,
    },
}

impl PolicySpec {
    /// The label in results and reports.
    pub fn label(&self) -> String {
        match self {
            PolicySpec::ScriptedOracle => arbor_agent::policy::scripted::NAME.to_string(),
            PolicySpec::Upstream { model, .. } => format!("upstream:{model}"),
            PolicySpec::Embedded { checkpoint, .. } => format!("embedded:{}", checkpoint.display()),
        }
    }
}

/// Time limits, seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Whole agent episode (a task's own `agent_timeout_s` wins when set).
    pub agent_s: f64,
    /// One model call.
    pub model_call_s: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            agent_s: 1800.0,
            model_call_s: 600.0,
        }
    }
}

/// Overrides of the tasks' verifier settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierOverrides {
    /// `fork` or `fresh`, for every task.
    pub mode: Option<GradeMode>,
    /// Timeout of every verifier command, seconds.
    pub timeout_s: Option<f64>,
}

impl Experiment {
    /// Parse and check an experiment file. Relative dataset paths and
    /// scaffolds' host paths (an agent's `path`, `binds`) are resolved
    /// against the file's folder; `output` against the current directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RolloutError::io(format!("reading {}", path.display()), e))?;
        let mut exp = Self::parse(&text).map_err(|m| RolloutError::Experiment {
            file: path.display().to_string(),
            message: m,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let PolicySpec::Embedded { checkpoint, .. } = &mut exp.policy
            && checkpoint.is_relative()
            && !checkpoint.exists()
        {
            *checkpoint = base.join(&*checkpoint);
        }
        for s in &mut exp.scaffolds {
            s.resolve_paths(base);
        }
        if let Some(t) = &mut exp.gateway.tokenizer
            && t.is_relative()
        {
            *t = base.join(&*t);
        }
        if let BackendSpec::Cluster(c) = &mut exp.backend {
            c.resolve_paths(base);
        }
        for d in &mut exp.datasets {
            if let Some(p) = &mut d.path
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        Ok(exp)
    }

    /// Parse TOML text and validate it; errors name the field at fault.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let exp: Experiment = toml::from_str(text).map_err(|e| e.to_string())?;
        exp.validate()?;
        Ok(exp)
    }

    /// Check consistency; errors name the field at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.datasets.is_empty() {
            return Err("`datasets` is empty: add at least one [[datasets]] table".into());
        }
        if self.scaffolds.is_empty() {
            return Err("`scaffolds` is empty: add at least one [[scaffolds]] table".into());
        }
        let mut names = BTreeSet::new();
        for s in &self.scaffolds {
            if !names.insert(s.name()) {
                return Err(format!(
                    "two scaffolds are named `{}`; give black-box scaffolds distinct names",
                    s.name()
                ));
            }
            if let ScaffoldSpec::Bash(c) | ScaffoldSpec::Tools(c) = s
                && c.max_steps == 0
            {
                return Err(format!("scaffold `{}`: max_steps must be > 0", s.name()));
            }
        }
        if self.samples == 0 {
            return Err("`samples` must be at least 1".into());
        }
        if self.concurrency == 0 {
            return Err("`concurrency` must be at least 1".into());
        }
        if !(self.timeouts.agent_s > 0.0 && self.timeouts.model_call_s > 0.0) {
            return Err("timeouts must be positive".into());
        }
        if let PolicySpec::Upstream { base_urls, .. } = &self.policy
            && base_urls.is_empty()
        {
            return Err("policy `upstream` needs at least one entry in `base_urls`".into());
        }
        for (i, d) in self.datasets.iter().enumerate() {
            d.validate().map_err(|m| format!("datasets[{i}]: {m}"))?;
        }
        if let BackendSpec::Cluster(c) = &self.backend {
            c.validate()?;
        }
        self.gateway.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_presets_parse_by_kind_and_their_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("exp.toml");
        let text = r#"
name = "agents"
output = "runs/agents"
[[datasets]]
domain = "terminal"
n = 1
[[scaffolds]]
kind = "claude-code"
path = "../npm"
[[scaffolds]]
kind = "mini-swe-agent"
name = "mini"
binds = [{ source = "tools" }]
[[scaffolds]]
kind = "codex"
[[scaffolds]]
kind = "opencode"
[policy]
kind = "scripted-oracle"
"#;
        std::fs::write(&file, text).expect("write");
        let exp = Experiment::load(&file).expect("parses");
        let names: Vec<&str> = exp.scaffolds.iter().map(ScaffoldSpec::name).collect();
        assert_eq!(names, ["claude-code", "mini", "codex", "opencode"]);
        assert!(exp.scaffolds.iter().all(ScaffoldSpec::is_blackbox));
        let ScaffoldSpec::ClaudeCode(p) = &exp.scaffolds[0] else {
            panic!("claude-code")
        };
        assert_eq!(p.path.as_deref(), Some(dir.path().join("../npm").as_path()));
        let ScaffoldSpec::MiniSweAgent(p) = &exp.scaffolds[1] else {
            panic!("mini-swe-agent")
        };
        assert_eq!(p.binds[0].source, dir.path().join("tools"));
        // Not installed there: resolving says so.
        let e = exp.scaffolds[0].blackbox().expect_err("no CLI in ../npm");
        assert!(e.contains("install-agents.sh"), "{e}");
        let bad = text.replace("kind = \"codex\"", "kind = \"codex\"\nflags = 1");
        assert!(
            Experiment::parse(&bad)
                .expect_err("unknown field")
                .contains("flags")
        );
    }
}
