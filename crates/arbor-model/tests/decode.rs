//! Batched decoding is exact: one `forward_decode_batch` step over sequences of different
//! lengths gives, row by row, the logits of single-sequence `forward_cached` decoding and of the
//! training forward (`logits`, `token_logprobs`) at the same positions. RL importance ratios
//! compare exactly these numbers, so they must agree to float rounding.

use arbor_model::model::KvCache;
use arbor_model::{ForwardOptions, Qwen3Config, Qwen3Model, TreeBatch};
use candle::{D, Tensor};

fn configs() -> Vec<(&'static str, Qwen3Config)> {
    let dense = Qwen3Config::tiny(40, 32, 2, 4, 2);
    vec![("dense", dense.clone()), ("moe", dense.with_moe(4, 2, 16))]
}

/// Deterministic pseudo-random ids in `0..40`.
fn seq(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(17).wrapping_add(salt * 7 + 3)) % 40)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let t = Tensor::from_slice(row, row.len(), &candle::Device::Cpu).unwrap();
    candle_nn::ops::log_softmax(&t, D::Minus1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn batched_decode_equals_single_sequence_decoding_and_the_training_forward() {
    const STEPS: usize = 5;
    for (name, cfg) in configs() {
        let m = Qwen3Model::new(cfg, 11).unwrap();
        // Prompt lengths differ (one sequence starts from an empty cache); each sequence is
        // prompt + STEPS decoded tokens.
        let prompts = [0usize, 1, 4, 9, 23];
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, &p)| seq(p + STEPS + 1, i as u32))
            .collect();
        let mut batched: Vec<KvCache> = vec![KvCache::default(); seqs.len()];
        let mut single: Vec<KvCache> = vec![KvCache::default(); seqs.len()];
        for ((s, &p), (b, c)) in seqs
            .iter()
            .zip(&prompts)
            .zip(batched.iter_mut().zip(&mut single))
        {
            if p > 0 {
                m.forward_cached(&s[..p], b).unwrap();
                m.forward_cached(&s[..p], c).unwrap();
            }
        }
        // Training forward over every full sequence, as one forest.
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let forest = TreeBatch::forest(&refs);
        let full = m.logits(&forest).unwrap().to_vec2::<f32>().unwrap();
        let (tl, _) = m
            .token_logprobs(&forest, &ForwardOptions::default())
            .unwrap();
        let tl = tl.to_vec1::<f32>().unwrap();
        let offsets: Vec<usize> = seqs
            .iter()
            .scan(0, |o, s| {
                let here = *o;
                *o += s.len();
                Some(here)
            })
            .collect();

        let (mut vs_single, mut vs_full, mut vs_lp) = (0f32, 0f32, 0f32);
        for step in 0..STEPS {
            let toks: Vec<u32> = seqs
                .iter()
                .zip(&prompts)
                .map(|(s, &p)| s[p + step])
                .collect();
            let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
            let logits = m.forward_decode_batch(&toks, &mut refs).unwrap();
            assert_eq!(logits.dims(), &[seqs.len(), 40]);
            let logits = logits.to_vec2::<f32>().unwrap();
            for (b, row) in logits.iter().enumerate() {
                let pos = prompts[b] + step;
                assert_eq!(batched[b].len(), pos + 1);
                let one = m
                    .forward_cached(&[toks[b]], &mut single[b])
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                vs_single = vs_single.max(max_diff(row, &one));
                vs_full = vs_full.max(max_diff(row, &full[offsets[b] + pos]));
                // The behaviour logprob of the next token vs the trainer's token_logprobs.
                let next = seqs[b][pos + 1] as usize;
                let lp = log_softmax(row)[next];
                vs_lp = vs_lp.max((lp - tl[offsets[b] + pos + 1]).abs());
            }
        }
        eprintln!(
            "{name}: max |diff| vs forward_cached {vs_single:e}, vs logits {vs_full:e}, vs token_logprobs {vs_lp:e}"
        );
        assert!(vs_single <= 1e-5, "{name}: vs forward_cached {vs_single}");
        assert!(vs_full <= 1e-4, "{name}: vs training logits {vs_full}");
        assert!(vs_lp <= 1e-4, "{name}: vs token_logprobs {vs_lp}");
    }
}

#[test]
fn prefill_through_the_vec_cache_matches_the_training_forward_at_every_chunking() {
    for (name, cfg) in configs() {
        let m = Qwen3Model::new(cfg, 4).unwrap();
        let s = seq(20, 3);
        let full = m
            .logits(&TreeBatch::forest(&[&s]))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Prefill in uneven chunks: each chunk's last logits equal the full forward's row.
        let mut cache = KvCache::default();
        let mut at = 0;
        for chunk in [7usize, 1, 5, 7] {
            let l = m
                .forward_cached(&s[at..at + chunk], &mut cache)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            at += chunk;
            assert_eq!(cache.len(), at);
            let d = max_diff(&l, &full[at - 1]);
            assert!(d <= 1e-4, "{name}: chunk ending at {at}: {d}");
        }
    }
}

#[test]
fn a_failed_step_changes_no_cache() {
    let m = Qwen3Model::new(Qwen3Config::tiny(40, 32, 2, 4, 2), 0).unwrap();
    let mut a = KvCache::default();
    let mut b = KvCache::default();
    m.forward_cached(&[1, 2, 3], &mut a).unwrap();
    m.forward_cached(&[4, 5], &mut b).unwrap();
    let before = m
        .forward_decode_batch(&[6, 7], &mut [&mut a.clone(), &mut b.clone()])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // An id outside the vocabulary, a token count that does not match: errors, caches intact.
    assert!(
        m.forward_decode_batch(&[6, 99], &mut [&mut a, &mut b])
            .is_err()
    );
    assert!(m.forward_decode_batch(&[6], &mut [&mut a, &mut b]).is_err());
    assert!(m.forward_decode_batch(&[], &mut []).is_err());
    assert_eq!((a.len(), b.len()), (3, 2));
    let after = m
        .forward_decode_batch(&[6, 7], &mut [&mut a, &mut b])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(before, after);
    // A cache filled by another model shape is refused, not misread.
    let other = Qwen3Model::new(Qwen3Config::tiny(40, 16, 2, 2, 1), 0).unwrap();
    assert!(other.forward_cached(&[1], &mut a).is_err());
    assert_eq!(a.len(), 4);
}
