//! Model configuration in the Hugging Face `config.json` format (Qwen3 / Qwen3-MoE field names),
//! so a real checkpoint's config loads unchanged and ours can be read by `transformers`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_max_pos() -> usize {
    32_768
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_aux() -> f64 {
    0.001
}

/// Qwen3 (dense) and Qwen3-MoE configuration. `num_experts == 0` means a dense model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the dense SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Per-head width (Qwen3 sets it explicitly; it need not be hidden/heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest position the model is meant for (informational; RoPE is computed on the fly).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Number of routed experts; 0 for a dense model.
    #[serde(default)]
    pub num_experts: usize,
    /// Experts per token (top-k).
    #[serde(default = "default_one")]
    pub num_experts_per_tok: usize,
    /// Width of each expert's SwiGLU MLP.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k routing probabilities to sum to one.
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// Coefficient of the load-balancing auxiliary loss.
    #[serde(default = "default_aux")]
    pub router_aux_loss_coef: f64,
    /// Every `decoder_sparse_step`-th layer is MoE (Qwen3-MoE semantics).
    #[serde(default = "default_one")]
    pub decoder_sparse_step: usize,
    /// Layers forced to a dense MLP.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Hugging Face architecture name, kept for round-tripping.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Hugging Face model type.
    #[serde(default)]
    pub model_type: Option<String>,
}

impl Qwen3Config {
    /// A small dense model, convenient for tests and the CPU quickstart.
    pub fn tiny(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: hidden * 3,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: Some(hidden / heads),
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 32_768,
            tie_word_embeddings: false,
            num_experts: 0,
            num_experts_per_tok: 1,
            moe_intermediate_size: 0,
            norm_topk_prob: true,
            router_aux_loss_coef: 0.001,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
            architectures: vec!["Qwen3ForCausalLM".into()],
            model_type: Some("qwen3".into()),
        }
    }

    /// The same model with every layer's MLP replaced by `experts` experts, `top_k` per token.
    pub fn with_moe(mut self, experts: usize, top_k: usize, expert_width: usize) -> Self {
        self.num_experts = experts;
        self.num_experts_per_tok = top_k;
        self.moe_intermediate_size = expert_width;
        self.architectures = vec!["Qwen3MoeForCausalLM".into()];
        self.model_type = Some("qwen3_moe".into());
        self
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `i` uses the mixture-of-experts MLP.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.num_experts > 0
            && !self.mlp_only_layers.contains(&i)
            && (i + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return bad(format!("head_dim must be even and positive, got {hd}"));
        }
        if self.num_experts > 0
            && (self.num_experts_per_tok == 0
                || self.num_experts_per_tok > self.num_experts
                || self.moe_intermediate_size == 0)
        {
            return bad(
                "MoE needs 0 < num_experts_per_tok <= num_experts and moe_intermediate_size > 0"
                    .into(),
            );
        }
        if self.num_experts == 0 && self.intermediate_size == 0 {
            return bad("intermediate_size must be positive".into());
        }
        Ok(())
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes `config.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ModelError::Config(e.to_string()))?;
        std::fs::write(path, text).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}
