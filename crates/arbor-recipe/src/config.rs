//! The pipeline file (TOML): which domains, how big a model, how much of each stage.
//!
//! Every section has defaults, so a file only says what differs. See
//! `examples/pipeline-small.toml` for a commented example.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arbor_agent::ScaffoldConfig;
use arbor_model::Qwen3Config;
use arbor_train::{IcePop, LengthNorm, Mcla, RlConfig, SftConfig};
use serde::{Deserialize, Serialize};

use crate::{RecipeError, Result};

/// A whole pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name in reports.
    pub name: String,
    /// Output directory (every stage's data, checkpoints, the report). `--out` overrides.
    pub output: PathBuf,
    /// Built-in domains, each gets its own expert.
    #[serde(default = "all_domains")]
    pub domains: Vec<String>,
    /// Task difficulty 1..=5 of every generated task.
    #[serde(default = "one")]
    pub difficulty: u32,
    /// Seed of task generation and of the fresh model.
    #[serde(default)]
    pub seed: u64,
    /// The model trained.
    #[serde(default)]
    pub model: ModelSpec,
    /// How rollouts are run (scaffold, limits, concurrency).
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Pretraining of the fresh model on a generated copy corpus (`arbor_train::pretrain`):
    /// the stand-in for a pretrained base model. When set, `base/` is the pretrained model (the
    /// `base` row) and every later stage starts from it.
    #[serde(default)]
    pub pretrain: Option<arbor_train::pretrain::PretrainConfig>,
    /// Demonstrations: scripted-oracle rollouts on training tasks.
    #[serde(default)]
    pub oracle: OracleSpec,
    /// SFT of each expert (and of the student's starting point).
    #[serde(default)]
    pub sft: SftConfig,
    /// Generalist-then-specialist SFT: when set, the SFT on all domains (`[sft]`) runs first and
    /// each expert's SFT continues from it with these settings. Skills every domain needs (the
    /// chat and command format, copying names and numbers from the instruction) are learned once
    /// on all the demonstrations instead of five times on a fifth of them.
    #[serde(default)]
    pub sft_expert: Option<SftConfig>,
    /// RL of each expert.
    #[serde(default)]
    pub rl: RlSpec,
    /// On-policy distillation of the unified student (fields left out take the distillation
    /// defaults, [`DistillSpec::default_distill`], not the RL ones).
    #[serde(
        default = "DistillSpec::default_distill",
        deserialize_with = "DistillSpec::deserialize"
    )]
    pub distill: RlSpec,
    /// Held-out evaluation.
    #[serde(default)]
    pub eval: EvalSpec,
}

fn all_domains() -> Vec<String> {
    arbor_task::domains::DOMAINS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn one() -> u32 {
    1
}

/// The fresh model every stage starts from: a byte-level (vocabulary 256) Qwen3-style decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// Width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key-value heads.
    pub kv_heads: usize,
    /// Routed experts per layer (0 = dense MLPs).
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Width of one expert.
    pub expert_width: usize,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            experts: 0,
            top_k: 2,
            expert_width: 64,
        }
    }
}

impl ModelSpec {
    /// The model configuration.
    pub fn config(&self) -> Qwen3Config {
        let c = Qwen3Config::tiny(256, self.hidden, self.layers, self.heads, self.kv_heads);
        if self.experts > 0 {
            c.with_moe(self.experts, self.top_k, self.expert_width)
        } else {
            c
        }
    }
}

/// How every rollout of the pipeline runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSpec {
    /// Model calls per episode (the bash scaffold).
    pub max_steps: u32,
    /// Completion tokens per call.
    pub max_tokens: u32,
    /// Characters of command output kept per observation (keeps byte-level prompts short).
    pub observation_chars: usize,
    /// Per-command timeout in the sandbox, seconds.
    pub command_timeout_s: f64,
    /// Rollouts in flight.
    pub concurrency: usize,
    /// Generations the embedded policy runs at once (default: CPUs).
    pub policy_concurrency: Option<usize>,
    /// Whole-episode time limit, seconds.
    pub agent_timeout_s: f64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_steps: 3,
            max_tokens: 160,
            observation_chars: 300,
            command_timeout_s: 10.0,
            concurrency: 8,
            policy_concurrency: None,
            agent_timeout_s: 120.0,
        }
    }
}

impl RolloutSpec {
    /// The bash scaffold every rollout uses.
    pub fn scaffold(&self) -> ScaffoldConfig {
        ScaffoldConfig {
            max_steps: self.max_steps,
            command_timeout_s: self.command_timeout_s,
            observation_chars: self.observation_chars,
            ..ScaffoldConfig::default()
        }
    }
}

/// Demonstration data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OracleSpec {
    /// Training tasks per domain rolled out by the scripted oracle.
    pub tasks_per_domain: usize,
    /// Per-domain overrides of `tasks_per_domain` (e.g. fewer of the long, slow swe tasks).
    pub per_domain: BTreeMap<String, usize>,
}

impl Default for OracleSpec {
    fn default() -> Self {
        Self {
            tasks_per_domain: 200,
            per_domain: BTreeMap::new(),
        }
    }
}

impl OracleSpec {
    /// Demonstration tasks of `domain`.
    pub fn tasks(&self, domain: &str) -> usize {
        self.per_domain
            .get(domain)
            .copied()
            .unwrap_or(self.tasks_per_domain)
    }
}

/// An RL (or distillation) stage: iterations of group sampling on fresh training tasks, then
/// updates on the sampled trees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlSpec {
    /// Sample-then-update iterations.
    pub iterations: usize,
    /// Training tasks per iteration (per domain for distillation).
    pub tasks_per_iteration: usize,
    /// Where the tasks come from. 0: fresh generated tasks every iteration (no task is seen
    /// twice). N > 0: a fixed training set of N tasks per domain, taken `tasks_per_iteration`
    /// at a time in order and revisited in epochs, as a recipe with a finite task dataset
    /// trains (and the check that RL can fit a set it sees repeatedly: N =
    /// `tasks_per_iteration` samples the same tasks every iteration).
    pub task_pool: usize,
    /// Rollouts per task (the group).
    pub group_size: u32,
    /// Passes (epochs) over each iteration's samples.
    pub updates_per_iteration: usize,
    /// Optimizer steps per pass: the packs are dealt into this many minibatches (PPO-style), so
    /// an iteration takes `updates_per_iteration x minibatches` steps. More, smaller steps let
    /// Adam's moment estimates average out sampling noise; the clip and IcePop keep the later
    /// steps of an iteration near its samples.
    pub minibatches: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Divide advantages by the group's reward standard deviation.
    pub normalize_std: bool,
    /// GSPO clip range of the turn ratio.
    pub clip_eps: f32,
    /// Coefficient `beta` of a KL penalty toward the stage's start checkpoint (k3 estimator on
    /// the sampled tokens, per-path mean; 0 = off). Holds a small model near its SFT policy at
    /// a step size that still moves it.
    pub kl_coef: f32,
    /// IcePop bounds `[alpha, beta]` on the training/behaviour probability ratio (`None` = off).
    pub icepop: Option<IcePop>,
    /// MCLA forward passes `K` (1 = off).
    pub mcla_passes: usize,
    /// Router-logit noise of the training forward (MoE models; 0 = deterministic routing).
    pub router_noise: f32,
    /// Coefficient of the per-token reverse-KL term toward the domain's expert (distillation).
    pub distill_coef: f32,
    /// How the reverse KL to the expert is measured per token (distillation).
    pub distill_estimator: DistillEstimator,
    /// Token budget of one pack.
    pub max_tokens_per_pack: usize,
    /// Stop the stage after this many iterations in a row in which no group had reward variance
    /// (no gradient: every sample passed or every sample failed); 0 = never. RL only: distillation
    /// trains every sample.
    pub stop_without_signal: usize,
    /// Sampling temperature of the stage's rollouts (> 0). The trainer's log-probabilities are
    /// those of `logits / temperature`, so the importance ratios, IcePop, the KL to the start
    /// and the distillation term all compare like with like. Below 1 the samples are closer to
    /// the greedy answer (a small model passes more of them) but also more alike within a
    /// group, so fewer groups carry a reward signal.
    pub temperature: f32,
    /// How GSPO divides a turn's log-ratios and a path's turns: `"mean"` (GSPO as published:
    /// the turn's token count and the path's turn count) or `"constant"` (the rollout's
    /// `max_tokens` and `max_steps` for every turn and path, as Dr. GRPO does). The mean pushes
    /// each token of a long failing reply down less than a short one's, a bias toward replies
    /// that run to the limit (docs/recipe.md §3).
    pub length_norm: LengthNormSpec,
    /// Replies cut at the rollout's `max_tokens` (overlong): `"keep"` trains them like any
    /// other; `"filter"` leaves the episodes that have one out of the update, as DAPO's
    /// overlong filtering does (they still count in their group's mean reward), so a
    /// truncated reply is neither rewarded nor pushed down for its length alone.
    pub overlong: Overlong,
}

/// [`RlSpec::length_norm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthNormSpec {
    #[default]
    Mean,
    Constant,
}

/// [`RlSpec::overlong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    #[default]
    Keep,
    Filter,
}

impl Default for RlSpec {
    fn default() -> Self {
        Self {
            iterations: 6,
            tasks_per_iteration: 16,
            task_pool: 0,
            group_size: 4,
            updates_per_iteration: 2,
            minibatches: 1,
            lr: 1e-3,
            normalize_std: false,
            clip_eps: 0.2,
            kl_coef: 0.0,
            icepop: Some(IcePop::default()),
            mcla_passes: 1,
            router_noise: 0.0,
            distill_coef: 0.0,
            distill_estimator: DistillEstimator::Sampled,
            max_tokens_per_pack: 16_384,
            stop_without_signal: 0,
            temperature: 1.0,
            length_norm: LengthNormSpec::Mean,
            overlong: Overlong::Keep,
        }
    }
}

/// The per-token reverse-KL term of distillation (`arbor-train` owns it: it picks the loss).
pub use arbor_train::DistillEstimator;

/// Namespace for the distillation stage's defaults.
pub struct DistillSpec;

impl DistillSpec {
    /// Distillation defaults: the RL defaults with the reverse-KL term on.
    pub fn default_distill() -> RlSpec {
        RlSpec {
            iterations: 4,
            tasks_per_iteration: 4,
            distill_coef: 1.0,
            ..RlSpec::default()
        }
    }
}

impl DistillSpec {
    /// Reads a `[distill]` table over [`DistillSpec::default_distill`].
    fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<RlSpec, D::Error> {
        use serde::de::Error;
        let given = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let mut v = serde_json::to_value(Self::default_distill()).map_err(D::Error::custom)?;
        if let Some(m) = v.as_object_mut() {
            for (k, x) in given {
                m.insert(k, x);
            }
        }
        serde_json::from_value(v).map_err(D::Error::custom)
    }
}

impl RlSpec {
    /// The loss settings of one update (`step` varies MCLA's routing draws).
    /// The loss settings of an update; `rollout` gives the constant normalizer's divisors.
    pub fn rl_config(&self, step: u64, rollout: &RolloutSpec) -> RlConfig {
        let length_norm = match self.length_norm {
            LengthNormSpec::Mean => LengthNorm::Mean,
            LengthNormSpec::Constant => LengthNorm::Constant {
                tokens: rollout.max_tokens,
                turns: rollout.max_steps,
            },
        };
        RlConfig {
            length_norm,
            clip_eps: self.clip_eps,
            icepop: self.icepop,
            distill_coef: self.distill_coef,
            mcla: Mcla::new(self.mcla_passes.max(1), self.router_noise, step * 1000),
            temperature: self.temperature,
            kl_coef: self.kl_coef,
        }
    }

    pub(crate) fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if self.group_size < 2 {
            return Err(format!(
                "{what}.group_size must be at least 2 (advantages are relative to the group)"
            ));
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return Err(format!(
                "{what}.kl_coef must be a finite number >= 0, not {}",
                self.kl_coef
            ));
        }
        if self.task_pool != 0 && self.task_pool < self.tasks_per_iteration {
            return Err(format!(
                "{what}.task_pool ({}) must be 0 (fresh tasks) or at least tasks_per_iteration ({}): an iteration samples each task once",
                self.task_pool, self.tasks_per_iteration
            ));
        }
        if self.tasks_per_iteration == 0 || self.max_tokens_per_pack == 0 || self.lr <= 0.0 {
            return Err(format!(
                "{what}: tasks_per_iteration, max_tokens_per_pack and lr must be positive"
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "{what}.temperature must be a positive number (training needs the sampled \
                 distribution's log-probabilities; greedy decoding has none), got {}",
                self.temperature
            ));
        }
        Ok(())
    }
}

/// Held-out evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSpec {
    /// Held-out tasks per domain (never equal to a training task).
    pub heldout_tasks: usize,
    /// Seed of the held-out tasks.
    pub seed: u64,
    /// Sampling temperature of the evaluated policy (default 1.0; 0 = greedy). Independent of
    /// the RL and distillation stages' `temperature`, which is what they train at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Samples per held-out task at the RL temperature (`[rl] temperature`): the sampled
    /// pass@1 (mean over tasks of each task's passing share, with its standard error across
    /// tasks) reported beside the evaluation above. RL sharpens the distribution it samples
    /// from, which a greedy evaluation can hide. 0 = off.
    pub samples: u32,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            heldout_tasks: 100,
            seed: 1_000_003,
            temperature: None,
            samples: 4,
        }
    }
}

impl PipelineConfig {
    /// Reads and checks a pipeline file.
    pub fn load(path: &Path) -> Result<(Self, String)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RecipeError::Io(format!("{}: {e}", path.display())))?;
        let cfg = Self::parse(&text)
            .map_err(|e| RecipeError::Config(format!("{}: {e}", path.display())))?;
        Ok((cfg, text))
    }

    /// Parses and checks pipeline TOML.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.domains.is_empty() {
            return Err("`domains` is empty".into());
        }
        for d in &self.domains {
            if !arbor_task::domains::DOMAINS.contains(&d.as_str()) {
                return Err(format!(
                    "unknown domain `{d}` (one of: {})",
                    arbor_task::domains::DOMAINS.join(", ")
                ));
            }
        }
        if !(1..=5).contains(&self.difficulty) {
            return Err("`difficulty` must be 1..=5".into());
        }
        if let Some(d) = self
            .oracle
            .per_domain
            .keys()
            .find(|d| !self.domains.contains(d))
        {
            return Err(format!(
                "oracle.per_domain names `{d}`, which is not in `domains`"
            ));
        }
        if self.domains.iter().any(|d| self.oracle.tasks(d) == 0) || self.eval.heldout_tasks == 0 {
            return Err(
                "oracle.tasks_per_domain (and per_domain) and eval.heldout_tasks must be positive"
                    .into(),
            );
        }
        if self.rollout.max_steps == 0 || self.rollout.max_tokens == 0 {
            return Err("rollout.max_steps and rollout.max_tokens must be positive".into());
        }
        self.rl.validate("rl")?;
        self.distill.validate("distill")?;
        if let Some(t) = self.eval.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!("eval.temperature must be a number >= 0, got {t}"));
        }
        if let Some(p) = &self.pretrain
            && (p.steps == 0 || p.max_tokens_per_pack == 0 || p.lr <= 0.0)
        {
            return Err("pretrain: steps, max_tokens_per_pack and lr must be positive".into());
        }
        self.model
            .config()
            .validate()
            .map_err(|e| format!("model: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "name = \"x\"\noutput = \"out\"\n";

    #[test]
    fn a_partial_distill_table_keeps_the_distillation_defaults() {
        let cfg = PipelineConfig::parse(&format!("{MIN}[distill]\niterations = 7\n")).unwrap();
        assert_eq!(cfg.distill.iterations, 7);
        assert_eq!(cfg.distill.distill_coef, 1.0);
        assert_eq!(cfg.rl.distill_coef, 0.0);
        let cfg = PipelineConfig::parse(MIN).unwrap();
        assert_eq!(cfg.distill, DistillSpec::default_distill());
        assert_eq!(cfg.domains.len(), 5);
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let e = PipelineConfig::parse(&format!("{MIN}domains = [\"chess\"]\n")).unwrap_err();
        assert!(e.contains("unknown domain `chess`"), "{e}");
        let e = PipelineConfig::parse(&format!("{MIN}[distill]\nitertions = 7\n")).unwrap_err();
        assert!(e.contains("itertions"), "{e}");
        let e = PipelineConfig::parse(&format!("{MIN}[rl]\ngroup_size = 1\n")).unwrap_err();
        assert!(e.contains("group_size"), "{e}");
        let e =
            PipelineConfig::parse(&format!("{MIN}[model]\nhidden = 30\nheads = 4\n")).unwrap_err();
        assert!(e.contains("model"), "{e}");
        let e = PipelineConfig::parse(&format!("{MIN}[eval]\ntemperature = -1\n")).unwrap_err();
        assert!(e.contains("eval.temperature"), "{e}");
        // Greedy has no distribution to train on: RL temperatures must be positive.
        let e = PipelineConfig::parse(&format!("{MIN}[distill]\ntemperature = 0\n")).unwrap_err();
        assert!(e.contains("distill.temperature"), "{e}");
        let cfg = PipelineConfig::parse(&format!("{MIN}[rl]\ntemperature = 0.5\n")).unwrap();
        assert_eq!(cfg.rl.rl_config(0, &cfg.rollout).temperature, 0.5);
        assert_eq!(cfg.distill.temperature, 1.0);
        let e = PipelineConfig::parse(&format!("{MIN}[pretrain]\nsteps = 0\n")).unwrap_err();
        assert!(e.contains("pretrain"), "{e}");
    }

    #[test]
    fn the_shipped_pipelines_parse() {
        for f in ["quickstart.toml", "pipeline-small.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../examples")
                .join(f);
            PipelineConfig::load(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
