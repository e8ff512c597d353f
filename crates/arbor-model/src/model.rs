//! The Qwen3-style decoder: weights (Hugging Face names), forward over a packed tree, per-token
//! log-probabilities, mixture-of-experts routing with load-balancing statistics, save and load.
//! Submodules: `moe` (the MoE layers and their statistics), `decode` (incremental decoding).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::Qwen3Config;
use crate::ops::{self, RopeTables, TreeMask};
use crate::{ModelError, Result};

mod decode;
mod moe;

pub use decode::KvCache;
pub use moe::AuxStats;
use moe::Moe;

/// A packed tree (or forest) ready for the model: DFS-ordered tokens, their depth on their own
/// path (RoPE positions) and the ancestor relation.
#[derive(Debug, Clone)]
pub struct TreeBatch {
    /// Token ids in DFS pre-order.
    pub input_ids: Vec<u32>,
    /// Depth of each token on its root-to-leaf path (siblings share positions).
    pub position_ids: Vec<u32>,
    /// Ancestor relation used by attention.
    pub mask: Arc<TreeMask>,
}

impl TreeBatch {
    /// Builds a batch from the flattened arrays (as produced by `arbor-tree`), validating them.
    pub fn new(
        input_ids: Vec<u32>,
        position_ids: Vec<u32>,
        parent: Vec<i32>,
        subtree_end: Vec<u32>,
    ) -> Result<Self> {
        let mask = TreeMask::new(parent, subtree_end)?;
        Self::with_mask(input_ids, position_ids, Arc::new(mask))
    }

    /// Builds a batch from ids, positions and an existing mask.
    pub fn with_mask(
        input_ids: Vec<u32>,
        position_ids: Vec<u32>,
        mask: Arc<TreeMask>,
    ) -> Result<Self> {
        if input_ids.len() != mask.len() || position_ids.len() != mask.len() {
            return Err(ModelError::Input(format!(
                "{} ids, {} positions, {} mask entries",
                input_ids.len(),
                position_ids.len(),
                mask.len()
            )));
        }
        Ok(Self {
            input_ids,
            position_ids,
            mask,
        })
    }

    /// Independent sequences packed back to back, each with positions 0.. (the per-path layout).
    pub fn forest(seqs: &[&[u32]]) -> Self {
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let input_ids = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let position_ids = seqs.iter().flat_map(|s| 0..s.len() as u32).collect();
        Self {
            input_ids,
            position_ids,
            mask: Arc::new(TreeMask::forest(&lens)),
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Options of one forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Training mode (enables router noise when `router_noise > 0`).
    pub train: bool,
    /// Standard deviation of Gaussian noise added to router logits in training mode: stochastic
    /// routing, used by MCLA to average log-probabilities over routing draws.
    pub router_noise: f32,
    /// Seed of the router noise (a fixed seed makes a noisy forward reproducible).
    pub noise_seed: u64,
    /// Per-token weights of the MoE load-balancing statistics. On a tree, pass `g_t` (the number
    /// of leaves whose path contains token `t`) so the statistics equal those of the flat batch
    /// of all paths. `None` means weight 1 per token.
    pub aux_token_weights: Option<Vec<f32>>,
    /// Softmax temperature of the token log-probabilities (`logits / temperature`; must be
    /// positive). A policy that samples at temperature `T` draws from this distribution, so
    /// training against its recorded log-probabilities needs the same `T`. Default 1.
    pub temperature: f32,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            train: false,
            router_noise: 0.0,
            noise_seed: 0,
            aux_token_weights: None,
            temperature: 1.0,
        }
    }
}

struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
}

struct Mlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    ffn: Ffn,
}

/// A Qwen3-style decoder whose parameters are candle [`Var`]s (trainable).
pub struct Qwen3Model {
    cfg: Qwen3Config,
    device: Device,
    vars: Vec<(String, Var)>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// `x @ w^T` for a weight stored `[out, in]` as in Hugging Face checkpoints.
fn linear(x: &Tensor, w: &Tensor) -> candle::Result<Tensor> {
    x.matmul(&w.t()?)
}

struct Init {
    rng: StdRng,
    vars: Vec<(String, Var)>,
    device: Device,
}

impl Init {
    fn normal(&mut self, name: String, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller: two normals per pair of uniforms.
            let u1: f32 = self.rng.r#gen::<f32>().max(1e-12);
            let u2: f32 = self.rng.r#gen::<f32>();
            let r = (-2.0 * u1.ln()).sqrt();
            v.push(r * (2.0 * std::f32::consts::PI * u2).cos() * std);
            v.push(r * (2.0 * std::f32::consts::PI * u2).sin() * std);
        }
        v.truncate(n);
        self.add(name, Tensor::from_vec(v, shape, &self.device)?)
    }

    fn ones(&mut self, name: String, n: usize) -> Result<Tensor> {
        self.add(name, Tensor::ones(n, DType::F32, &self.device)?)
    }

    fn add(&mut self, name: String, t: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        self.vars.push((name, var));
        Ok(t)
    }
}

impl Qwen3Model {
    /// A freshly initialised model (normal(0, 0.02) matrices, unit norms), reproducible from
    /// `seed`.
    pub fn new(cfg: Qwen3Config, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let device = Device::Cpu;
        let mut init = Init {
            rng: StdRng::seed_from_u64(seed),
            vars: Vec::new(),
            device: device.clone(),
        };
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let std = 0.02;
        let embed = init.normal(
            "model.embed_tokens.weight".into(),
            &[cfg.vocab_size, d],
            std,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_norm = init.ones(format!("{p}.input_layernorm.weight"), d)?;
            let attn = Attention {
                q: init.normal(format!("{p}.self_attn.q_proj.weight"), &[hq * hd, d], std)?,
                k: init.normal(format!("{p}.self_attn.k_proj.weight"), &[hkv * hd, d], std)?,
                v: init.normal(format!("{p}.self_attn.v_proj.weight"), &[hkv * hd, d], std)?,
                o: init.normal(format!("{p}.self_attn.o_proj.weight"), &[d, hq * hd], std)?,
                q_norm: init.ones(format!("{p}.self_attn.q_norm.weight"), hd)?,
                k_norm: init.ones(format!("{p}.self_attn.k_norm.weight"), hd)?,
            };
            let post_norm = init.ones(format!("{p}.post_attention_layernorm.weight"), d)?;
            let mlp = |init: &mut Init, prefix: String, ff: usize| -> Result<Mlp> {
                Ok(Mlp {
                    gate: init.normal(format!("{prefix}.gate_proj.weight"), &[ff, d], std)?,
                    up: init.normal(format!("{prefix}.up_proj.weight"), &[ff, d], std)?,
                    down: init.normal(format!("{prefix}.down_proj.weight"), &[d, ff], std)?,
                })
            };
            let ffn = if cfg.is_moe_layer(i) {
                let router =
                    init.normal(format!("{p}.mlp.gate.weight"), &[cfg.num_experts, d], std)?;
                let mut experts = Vec::with_capacity(cfg.num_experts);
                for e in 0..cfg.num_experts {
                    experts.push(mlp(
                        &mut init,
                        format!("{p}.mlp.experts.{e}"),
                        cfg.moe_intermediate_size,
                    )?);
                }
                Ffn::Moe(Moe { router, experts })
            } else {
                Ffn::Dense(mlp(&mut init, format!("{p}.mlp"), cfg.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm,
                attn,
                post_norm,
                ffn,
            });
        }
        let norm = init.ones("model.norm.weight".into(), d)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            init.normal("lm_head.weight".into(), &[cfg.vocab_size, d], std)?
        };
        Ok(Self {
            cfg,
            device,
            vars: init.vars,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Loads `config.json` and `model.safetensors` (or the shards listed in
    /// `model.safetensors.index.json`) from a Hugging Face model directory. Weights of any float
    /// dtype are converted to f32.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = Qwen3Config::from_file(dir.join("config.json"))?;
        let model = Self::new(cfg, 0)?;
        let mut files = Vec::new();
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.display().to_string(),
                source,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Weights("index without weight_map".into()))?;
            let mut shard: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            shard.sort();
            shard.dedup();
            files.extend(shard.into_iter().map(|s| dir.join(s)));
        } else {
            files.push(dir.join("model.safetensors"));
        }
        let mut tensors = HashMap::new();
        for f in &files {
            let t = candle::safetensors::load(f, &Device::Cpu)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", f.display())))?;
            tensors.extend(t);
        }
        model.set_weights(&tensors)?;
        Ok(model)
    }

    /// Overwrites every parameter from `tensors` (Hugging Face names); errors on a missing tensor
    /// or a shape mismatch.
    pub fn set_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| ModelError::Weights(format!("missing tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(ModelError::Weights(format!(
                    "{name}: expected shape {:?}, found {:?}",
                    var.dims(),
                    t.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Saves `config.json` and `model.safetensors` into `dir` (created if needed).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        self.cfg.save(dir.join("config.json"))?;
        let map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let path = dir.join("model.safetensors");
        candle::safetensors::save(&map, &path)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    /// The device (always the CPU here).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Named trainable parameters, in a stable order.
    pub fn named_vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Trainable parameters (for the optimiser).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Final hidden states `[T, hidden]` of a packed tree, plus MoE load-balancing statistics.
    pub fn forward_hidden(
        &self,
        batch: &TreeBatch,
        opts: &ForwardOptions,
    ) -> Result<(Tensor, AuxStats)> {
        self.check_ids(&batch.input_ids)?;
        let t = batch.len();
        if let Some(w) = &opts.aux_token_weights
            && w.len() != t
        {
            return Err(ModelError::Input(format!(
                "{} aux weights for {t} tokens",
                w.len()
            )));
        }
        let ids = Tensor::from_slice(&batch.input_ids, t, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let tables = RopeTables::new(
            &batch.position_ids,
            self.cfg.head_dim(),
            self.cfg.rope_theta,
        );
        let mut aux = AuxStats::default();
        let eps = self.cfg.rms_norm_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, eps)?;
            let a = self.attention(&layer.attn, &h, &tables, &batch.mask)?;
            x = (x + a)?;
            let h = ops::rms_norm(&x, &layer.post_norm, eps)?;
            let f = match &layer.ffn {
                Ffn::Dense(m) => mlp_forward(m, &h)?,
                Ffn::Moe(m) => {
                    let (y, stats) = self.moe_forward(m, &h, opts, li)?;
                    aux.layers.push(stats);
                    y
                }
            };
            x = (x + f)?;
        }
        let x = ops::rms_norm(&x, &self.norm, eps)?;
        Ok((x, aux))
    }

    fn attention(
        &self,
        a: &Attention,
        h: &Tensor,
        tables: &RopeTables,
        mask: &Arc<TreeMask>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(a, h, tables)?;
        let hd = self.cfg.head_dim();
        let t = h.dim(0)?;
        let qh = q.transpose(0, 1)?.contiguous()?;
        let kh = k.transpose(0, 1)?.contiguous()?;
        let vh = v.transpose(0, 1)?.contiguous()?;
        let o = ops::tree_attention(&qh, &kh, &vh, mask, 1.0 / (hd as f32).sqrt())?;
        let o = o
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, self.cfg.num_attention_heads * hd))?;
        Ok(linear(&o, &a.o)?)
    }

    /// Projected, normalised and rotated q `[T, Hq, D]`, k and v `[T, Hkv, D]`.
    fn qkv(
        &self,
        a: &Attention,
        h: &Tensor,
        tables: &RopeTables,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let (hq, hkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let t = h.dim(0)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let q = linear(h, &a.q)?.reshape((t, hq, hd))?;
        let k = linear(h, &a.k)?.reshape((t, hkv, hd))?;
        let v = linear(h, &a.v)?.reshape((t, hkv, hd))?;
        let q = ops::rope(&ops::rms_norm(&q, &a.q_norm, eps)?, tables)?;
        let k = ops::rope(&ops::rms_norm(&k, &a.k_norm, eps)?, tables)?;
        Ok((q, k, v))
    }

    /// Log-probability of every token given its ancestors, `[T]`: token `t` is scored from the
    /// hidden state of its parent (so siblings after a branch point are each scored from the
    /// shared prefix). Roots have no context and get 0.
    pub fn token_logprobs(
        &self,
        batch: &TreeBatch,
        opts: &ForwardOptions,
    ) -> Result<(Tensor, AuxStats)> {
        self.token_logprobs_where(batch, opts, None)
    }

    /// [`Self::token_logprobs`] computing the LM head only for tokens with `wanted[t]` (e.g. a
    /// non-zero loss weight); the others get 0. Prompt tokens usually carry no loss, and on a
    /// `[T, vocab]` head skipping them is a large share of the step.
    pub fn token_logprobs_where(
        &self,
        batch: &TreeBatch,
        opts: &ForwardOptions,
        wanted: Option<&[bool]>,
    ) -> Result<(Tensor, AuxStats)> {
        let t = batch.len();
        check_temperature(opts.temperature)?;
        if let Some(w) = wanted
            && w.len() != t
        {
            return Err(ModelError::Input(format!(
                "{} wanted flags for {t} tokens",
                w.len()
            )));
        }
        let (hidden, aux) = self.forward_hidden(batch, opts)?;
        let parent = batch.mask.parent();
        let rows: Vec<u32> = (0..t as u32)
            .filter(|&i| parent[i as usize] >= 0 && wanted.is_none_or(|w| w[i as usize]))
            .collect();
        if rows.is_empty() {
            return Ok((Tensor::zeros(t, DType::F32, &self.device)?, aux));
        }
        let n = rows.len();
        let src: Vec<u32> = rows.iter().map(|&i| parent[i as usize] as u32).collect();
        let targets: Vec<u32> = rows.iter().map(|&i| batch.input_ids[i as usize]).collect();
        let h = hidden.index_select(&Tensor::from_vec(src, n, &self.device)?, 0)?;
        let lp = ops::token_logprobs(&self.tempered_logits(&h, opts.temperature)?, &targets)?;
        if n == t {
            return Ok((lp, aux));
        }
        let idx = Tensor::from_vec(rows, n, &self.device)?;
        let full = Tensor::zeros(t, DType::F32, &self.device)?.index_add(&idx, &lp, 0)?;
        Ok((full, aux))
    }

    /// The whole distribution behind each token of `rows`: row `j` is `log_softmax(logits / T)`
    /// at the parent of token `rows[j]`, the distribution that token was drawn from;
    /// `[rows.len(), vocab]`, differentiable. Full-vocabulary objectives (the exact per-token
    /// reverse KL of distillation) need it. A root token (no parent) has no such row: an error.
    pub fn next_token_log_softmax(
        &self,
        batch: &TreeBatch,
        opts: &ForwardOptions,
        rows: &[u32],
    ) -> Result<(Tensor, AuxStats)> {
        check_temperature(opts.temperature)?;
        let parent = batch.mask.parent();
        let mut src = Vec::with_capacity(rows.len());
        for &r in rows {
            match parent.get(r as usize) {
                Some(&p) if p >= 0 => src.push(p as u32),
                Some(_) => {
                    return Err(ModelError::Input(format!(
                        "token {r} is a root: no distribution was sampled for it"
                    )));
                }
                None => {
                    return Err(ModelError::Input(format!(
                        "row {r} of a batch of {} tokens",
                        batch.len()
                    )));
                }
            }
        }
        let (hidden, aux) = self.forward_hidden(batch, opts)?;
        let n = src.len();
        let h = hidden.index_select(&Tensor::from_vec(src, n, &self.device)?, 0)?;
        let logits = self.tempered_logits(&h, opts.temperature)?;
        Ok((candle_nn::ops::log_softmax(&logits, 1)?, aux))
    }

    /// The LM head on hidden states `h`, divided by `temperature` (unchanged at 1).
    fn tempered_logits(&self, h: &Tensor, temperature: f32) -> Result<Tensor> {
        let logits = linear(h, &self.lm_head)?;
        if temperature == 1.0 {
            return Ok(logits);
        }
        Ok((logits / temperature as f64)?)
    }

    /// Next-token logits `[T, vocab]` at every token of a packed tree (no gradient needed).
    pub fn logits(&self, batch: &TreeBatch) -> Result<Tensor> {
        let (hidden, _) = self.forward_hidden(batch, &ForwardOptions::default())?;
        Ok(linear(&hidden, &self.lm_head)?)
    }
}

/// Log-probabilities exist only for a positive, finite temperature (0 is greedy decoding).
fn check_temperature(temperature: f32) -> Result<()> {
    if temperature > 0.0 && temperature.is_finite() {
        Ok(())
    } else {
        Err(ModelError::Input(format!(
            "log-probabilities at temperature {temperature}: it must be a positive number"
        )))
    }
}

fn mlp_forward(m: &Mlp, x: &Tensor) -> Result<Tensor> {
    let g = linear(x, &m.gate)?;
    let u = linear(x, &m.up)?;
    Ok(linear(&ops::swiglu(&g, &u)?, &m.down)?)
}
