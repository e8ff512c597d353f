//! Byte-level sampling with a KV cache: the embedded policy's decoding loop.
//!
//! `arbor_model::Qwen3Model::generate` stops on single stop tokens; the byte format's end marker
//! is several bytes, and a checkpoint's vocabulary may have ids beyond the 256 bytes that have no
//! text. This loop samples over the byte ids only, stops when the text ends with the marker, and
//! reports each token as it is drawn (streaming, cancellation).

use arbor_gateway::tokenize::byte_chat::{BYTE_VOCAB, END_MARKER};
use arbor_model::Qwen3Model;
use arbor_model::model::KvCache;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// Generates after `prompt`, calling `on_token(id, logprob)` for each token as it is drawn; a
/// `false` return cancels. The logprob is the behaviour log-probability: the token's
/// log-probability under the distribution it was drawn from (byte logits, temperature applied;
/// the plain log-softmax for greedy decoding). When the vocabulary is exactly the 256 bytes this
/// equals what a forward pass of the model gives at temperature 1.
pub fn generate(
    model: &Qwen3Model,
    prompt: &[u32],
    params: &Sampling,
    mut on_token: impl FnMut(u32, f32) -> bool,
) -> arbor_model::Result<Finish> {
    if params.max_tokens == 0 {
        return Ok(Finish::Length);
    }
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut cache = KvCache::default();
    let mut logits = model.forward_cached(prompt, &mut cache)?.to_vec1::<f32>()?;
    let marker = END_MARKER.as_bytes();
    let mut tail: Vec<u8> = Vec::with_capacity(marker.len());
    for step in 0..params.max_tokens {
        let (tok, lp) = sample(&logits, params.temperature, &mut rng);
        if !on_token(tok, lp) {
            return Ok(Finish::Cancelled);
        }
        // Keep the last marker-length bytes to detect the end marker.
        if tail.len() == marker.len() {
            tail.remove(0);
        }
        tail.push(tok as u8);
        if tail == marker {
            return Ok(Finish::Stop);
        }
        if step + 1 < params.max_tokens {
            logits = model.forward_cached(&[tok], &mut cache)?.to_vec1::<f32>()?;
        }
    }
    Ok(Finish::Length)
}

/// Draws a byte id from the first 256 logits; returns it with its log-probability under the
/// sampling distribution.
fn sample(logits: &[f32], temperature: f32, rng: &mut StdRng) -> (u32, f32) {
    let logits = &logits[..logits.len().min(BYTE_VOCAB)];
    let greedy = temperature <= 0.0;
    let t = if greedy { 1.0 } else { temperature };
    let z: Vec<f32> = logits.iter().map(|x| x / t).collect();
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    let tok = if greedy {
        z.iter()
            .enumerate()
            .fold(0, |best, (i, x)| if *x > z[best] { i } else { best })
    } else {
        let u: f32 = rng.r#gen::<f32>();
        let mut acc = 0f32;
        let mut pick = z.len() - 1;
        for (i, x) in z.iter().enumerate() {
            acc += (x - lse).exp();
            if u < acc {
                pick = i;
                break;
            }
        }
        pick
    };
    (tok as u32, z[tok] - lse)
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
