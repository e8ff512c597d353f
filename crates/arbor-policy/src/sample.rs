//! Byte-level sampling with a KV cache: the embedded policy's decoding loop.
//!
//! `arbor_model::Qwen3Model::generate` stops on single stop tokens; the byte format's end marker
//! is several bytes, and a checkpoint's vocabulary may have ids beyond the 256 bytes that have no
//! text. This loop samples over the byte ids only, stops when the text ends with the marker, and
//! reports each token as it is drawn (streaming, cancellation).

use arbor_model::Qwen3Model;
use arbor_model::model::KvCache;
use arbor_trace::byte_chat::{BYTE_VOCAB, END_MARKER};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// How to sample one completion.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Softmax temperature; `<= 0` means greedy.
    pub temperature: f32,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// RNG seed: the same seed, prompt and weights give the same completion.
    pub seed: u64,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The end marker was generated.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The consumer stopped listening (client gone).
    Cancelled,
}

/// One sequence's sampling state: its RNG, how many tokens were drawn, the bytes that may be the
/// start of the end marker. [`generate`] and the batching engine both draw through it, so a
/// request's tokens depend only on its seed, prompt and weights, not on how it was scheduled.
pub(crate) struct Sampler {
    rng: StdRng,
    temperature: f32,
    max_tokens: usize,
    drawn: usize,
    tail: Vec<u8>,
}

impl Sampler {
    pub(crate) fn new(params: &Sampling) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            temperature: params.temperature,
            max_tokens: params.max_tokens,
            drawn: 0,
            tail: Vec::with_capacity(END_MARKER.len()),
        }
    }

    /// Whether no token may be drawn at all (`max_tokens` = 0): finish without running the model.
    pub(crate) fn is_empty(&self) -> bool {
        self.max_tokens == 0
    }

    /// Draws the next token from `logits`; returns it, its behaviour logprob, and why generation
    /// ends after it (if it does). The caller reports the token before acting on the finish.
    pub(crate) fn draw(&mut self, logits: &[f32]) -> (u32, f32, Option<Finish>) {
        let (tok, lp) = sample(logits, self.temperature, &mut self.rng);
        self.drawn += 1;
        // Keep the last marker-length bytes to detect the end marker.
        let marker = END_MARKER.as_bytes();
        if self.tail.len() == marker.len() {
            self.tail.remove(0);
        }
        self.tail.push(tok as u8);
        let finish = if self.tail == marker {
            Some(Finish::Stop)
        } else if self.drawn >= self.max_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        (tok, lp, finish)
    }
}

/// Generates after `prompt`, calling `on_token(id, logprob)` for each token as it is drawn; a
/// `false` return cancels. The logprob is the behaviour log-probability: the token's
/// log-probability under the distribution it was drawn from (byte logits, temperature applied;
/// the plain log-softmax for greedy decoding). When the vocabulary is exactly the 256 bytes this
/// equals what a forward pass of the model gives at temperature 1.
///
/// One sequence at a time; the server decodes through the batching engine (`engine.rs`), which
/// draws the same tokens for the same seed.
pub fn generate(
    model: &Qwen3Model,
    prompt: &[u32],
    params: &Sampling,
    mut on_token: impl FnMut(u32, f32) -> bool,
) -> arbor_model::Result<Finish> {
    let mut sampler = Sampler::new(params);
    if sampler.is_empty() {
        return Ok(Finish::Length);
    }
    let mut cache = KvCache::default();
    let mut logits = model.forward_cached(prompt, &mut cache)?.to_vec1::<f32>()?;
    loop {
        let (tok, lp, finish) = sampler.draw(&logits);
        if !on_token(tok, lp) {
            return Ok(Finish::Cancelled);
        }
        if let Some(f) = finish {
            return Ok(f);
        }
        logits = model.forward_cached(&[tok], &mut cache)?.to_vec1::<f32>()?;
    }
}

/// Draws a byte id: the shared sampler ([`arbor_model::sample::sample`], no top-k) over the first
/// 256 logits only; returns it with its log-probability under the sampling distribution.
fn sample(logits: &[f32], temperature: f32, rng: &mut StdRng) -> (u32, f32) {
    let bytes = &logits[..logits.len().min(BYTE_VOCAB)];
    arbor_model::sample::sample(bytes, temperature, None, rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_argmax_of_bytes_only() {
        let mut logits = vec![0f32; 300];
        logits[65] = 5.0;
        logits[280] = 50.0; // not a byte: never drawn
        let mut rng = StdRng::seed_from_u64(0);
        let (tok, lp) = sample(&logits, 0.0, &mut rng);
        assert_eq!(tok, 65);
        let lse = (5f32.exp() + 255.0).ln();
        assert!((lp - (5.0 - lse)).abs() < 1e-5);
    }
}
