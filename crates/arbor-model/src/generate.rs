//! Autoregressive sampling with a KV cache, returning each sampled token's log-probability; each
//! token is drawn by [`crate::sample::sample`].

use rand::{SeedableRng, rngs::StdRng};

use crate::model::{KvCache, Qwen3Model};
use crate::sample::sample;
use crate::{ModelError, Result};

/// How to sample.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// Maximum number of generated tokens.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Generation stops after emitting one of these (it is included in the output).
    pub stop_tokens: Vec<u32>,
    /// RNG seed (sampling is reproducible for a given seed).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: None,
            stop_tokens: Vec::new(),
            seed: 0,
        }
    }
}

impl Qwen3Model {
    /// Generates up to `max_new_tokens` after `prompt`. Returns the new tokens and, for each, its
    /// log-probability under the distribution it was drawn from (temperature and top-k applied;
    /// for greedy decoding, the model's plain log-softmax), which is the behaviour log-probability
    /// an RL trainer needs.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        let mut rng = StdRng::seed_from_u64(params.seed);
        let mut cache = KvCache::default();
        let mut logits = self.forward_cached(prompt, &mut cache)?.to_vec1::<f32>()?;
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        for step in 0..params.max_new_tokens {
            let (tok, lp) = sample(&logits, params.temperature, params.top_k, &mut rng);
            tokens.push(tok);
            logprobs.push(lp);
            if params.stop_tokens.contains(&tok) || step + 1 == params.max_new_tokens {
                break;
            }
            logits = self.forward_cached(&[tok], &mut cache)?.to_vec1::<f32>()?;
        }
        Ok((tokens, logprobs))
    }
}
