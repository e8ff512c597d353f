//! Incremental decoding: the key/value cache, prefill of one sequence and one batched decode
//! step over many sequences of different lengths.
//!
//! At the sizes the embedded policy serves (width 64, two layers), a decode step costs little
//! arithmetic; what dominated was per-token overhead: candle op dispatch and copying the whole
//! cache every token. So the cache is plain `Vec<f32>` (appending a token is a push, attention
//! reads it in place), and a step over B sequences runs every row-wise operation (embedding,
//! norms, projections, MLP or MoE, LM head) once for all B rows; only attention, which reads each
//! sequence's own cache, is per sequence.
//!
//! Exactness: every row goes through the same operations as in [`Qwen3Model::forward_hidden`]
//! (the training forward) and attention is a plain softmax over the same keys, so logits agree
//! with the training forward to float rounding (tests check <= 1e-4; typically ~1e-6).

use candle::Tensor;
use rayon::prelude::*;

use super::{Ffn, ForwardOptions, Qwen3Model, linear, mlp_forward};
use crate::ops::{self, RopeTables};
use crate::{ModelError, Result};

/// Key/value cache of one sequence for incremental decoding.
///
/// Per layer, keys and values are stored position-major, `[L, Hkv, D]` flattened, so that
/// appending a position is a push and nothing is copied per token.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the cache fit `layers` layers of `row` floats per position: an empty cache is set
    /// up, a filled one must already match (it belongs to this model's shape).
    fn prepare(&mut self, layers: usize, row: usize) -> Result<()> {
        if self.len == 0 && self.layers.len() != layers {
            self.layers = vec![LayerCache::default(); layers];
        }
        let ok = self.layers.len() == layers
            && self
                .layers
                .iter()
                .all(|l| l.k.len() == self.len * row && l.v.len() == self.len * row);
        if !ok {
            return Err(ModelError::Input(format!(
                "KV cache of {} positions does not fit this model ({layers} layers, {row} floats \
                 per position)",
                self.len
            )));
        }
        Ok(())
    }

    /// Drops anything appended beyond `len` (undoes a step that failed half-way).
    fn rollback(&mut self, row: usize) {
        for l in &mut self.layers {
            l.k.truncate(self.len * row);
            l.v.truncate(self.len * row);
        }
    }
}

/// Shapes of one attention layer.
#[derive(Clone, Copy)]
struct Heads {
    hq: usize,
    hkv: usize,
    d: usize,
    scale: f32,
}

impl Qwen3Model {
    /// Runs `tokens` (positions `cache.len()..`) through the model against the cache, appends their
    /// keys and values, and returns the logits of the last token `[vocab]`. Inference only.
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to decode".into()));
        }
        let n = tokens.len();
        let hidden = self.extend(tokens, &mut [cache], &[n])?;
        let last = hidden.narrow(0, n - 1, 1)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let last = ops::rms_norm(&last, &self.norm, eps)?;
        Ok(linear(&last, &self.lm_head)?.squeeze(0)?.detach())
    }

    /// One decode step for B sequences at once: `tokens[b]` is appended to `caches[b]` (at
    /// position `caches[b].len()`, lengths may differ) and the next-token logits of every
    /// sequence are returned, `[B, vocab]`. Row `b` equals what
    /// `forward_cached(&[tokens[b]], caches[b])` returns, up to float rounding. On an error no
    /// cache is changed. Inference only.
    pub fn forward_decode_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(ModelError::Input(format!(
                "{} tokens for {} caches (one each, at least one)",
                tokens.len(),
                caches.len()
            )));
        }
        let counts = vec![1; tokens.len()];
        let hidden = self.extend(tokens, caches, &counts)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let hidden = ops::rms_norm(&hidden, &self.norm, eps)?;
        Ok(linear(&hidden, &self.lm_head)?.detach())
    }

    /// Appends `counts[i]` consecutive tokens of `tokens` to `caches[i]` and returns the last
    /// layer's hidden states of all rows `[T, hidden]` (before the final norm). Rows of all
    /// sequences share every row-wise operation; attention is per sequence. Either every cache
    /// is extended or (on an error) none.
    fn extend(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        counts: &[usize],
    ) -> Result<Tensor> {
        debug_assert_eq!(caches.len(), counts.len());
        if counts.contains(&0) || counts.iter().sum::<usize>() != tokens.len() {
            return Err(ModelError::Input("inconsistent token counts".into()));
        }
        self.check_ids(tokens)?;
        let heads = Heads {
            hq: self.cfg.num_attention_heads,
            hkv: self.cfg.num_key_value_heads,
            d: self.cfg.head_dim(),
            scale: 1.0 / (self.cfg.head_dim() as f32).sqrt(),
        };
        let row = heads.hkv * heads.d;
        for c in caches.iter_mut() {
            c.prepare(self.layers.len(), row)?;
        }
        match self.extend_unchecked(tokens, caches, counts, heads) {
            Ok(x) => {
                for (c, &n) in caches.iter_mut().zip(counts) {
                    c.len += n;
                }
                Ok(x)
            }
            Err(e) => {
                for c in caches.iter_mut() {
                    c.rollback(row);
                }
                Err(e)
            }
        }
    }

    fn extend_unchecked(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        counts: &[usize],
        heads: Heads,
    ) -> Result<Tensor> {
        let t = tokens.len();
        let positions: Vec<u32> = caches
            .iter()
            .zip(counts)
            .flat_map(|(c, &n)| c.len as u32..(c.len + n) as u32)
            .collect();
        let tables = RopeTables::new(&positions, heads.d, self.cfg.rope_theta);
        let ids = Tensor::from_slice(tokens, t, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.detach();
        let eps = self.cfg.rms_norm_eps as f32;
        let opts = ForwardOptions::default();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, eps)?;
            let (q, k, v) = self.qkv(&layer.attn, &h, &tables)?;
            let q = q.flatten_all()?.to_vec1::<f32>()?;
            let k = k.flatten_all()?.to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            let o = attend_all(&q, &k, &v, caches, counts, li, heads);
            let o = Tensor::from_vec(o, (t, heads.hq * heads.d), &self.device)?;
            x = (x + linear(&o, &layer.attn.o)?)?;
            let h = ops::rms_norm(&x, &layer.post_norm, eps)?;
            let f = match &layer.ffn {
                Ffn::Dense(m) => mlp_forward(m, &h)?,
                Ffn::Moe(m) => self.moe_forward(m, &h, &opts, li)?.0,
            };
            x = (x + f)?.detach();
        }
        Ok(x)
    }
}

/// Appends each sequence's new keys and values (rows of `k`, `v`, `[T, Hkv, D]`) to its cache of
/// layer `li` and returns attention outputs `[T, Hq * D]`. Sequences run in parallel.
fn attend_all(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    caches: &mut [&mut KvCache],
    counts: &[usize],
    li: usize,
    heads: Heads,
) -> Vec<f32> {
    let (qrow, kvrow) = (heads.hq * heads.d, heads.hkv * heads.d);
    let mut out = vec![0f32; counts.iter().sum::<usize>() * qrow];
    let mut jobs = Vec::with_capacity(caches.len());
    let (mut q, mut k, mut v, mut o) = (q, k, v, out.as_mut_slice());
    for (c, &n) in caches.iter_mut().zip(counts) {
        let (qs, qr) = q.split_at(n * qrow);
        let (ks, kr) = k.split_at(n * kvrow);
        let (vs, vr) = v.split_at(n * kvrow);
        let (os, or) = o.split_at_mut(n * qrow);
        (q, k, v, o) = (qr, kr, vr, or);
        jobs.push((&mut **c, qs, ks, vs, os));
    }
    let work = |(c, qs, ks, vs, os): (&mut KvCache, &[f32], &[f32], &[f32], &mut [f32])| {
        let start = c.len;
        let layer = &mut c.layers[li];
        layer.k.extend_from_slice(ks);
        layer.v.extend_from_slice(vs);
        cached_attention(qs, &layer.k, &layer.v, start, heads, os);
    };
    if jobs.len() == 1 {
        jobs.into_iter().for_each(work);
    } else {
        jobs.into_par_iter().for_each(work);
    }
    out
}

/// Causal attention of `n` new queries `q` (`[n, Hq, D]`, positions `start..start + n`) over a
/// position-major cache `k`, `v` (`[L, Hkv, D]`, `L >= start + n`), written into `out`
/// (`[n, Hq, D]`, zeroed). Plain loops: decoding needs no gradient.
fn cached_attention(q: &[f32], k: &[f32], v: &[f32], start: usize, h: Heads, out: &mut [f32]) {
    let Heads { hq, hkv, d, scale } = h;
    let group = hq / hkv;
    let n = q.len() / (hq * d);
    let mut s = vec![0f32; start + n];
    for r in 0..n {
        let upto = start + r + 1;
        for head in 0..hq {
            let kh = head / group;
            let qi = &q[(r * hq + head) * d..][..d];
            let mut m = f32::NEG_INFINITY;
            for (j, sj) in s[..upto].iter_mut().enumerate() {
                let kj = &k[(j * hkv + kh) * d..][..d];
                *sj = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                m = m.max(*sj);
            }
            let mut z = 0f32;
            for sj in s[..upto].iter_mut() {
                *sj = (*sj - m).exp();
                z += *sj;
            }
            let o = &mut out[(r * hq + head) * d..][..d];
            for (j, sj) in s[..upto].iter().enumerate() {
                let vj = &v[(j * hkv + kh) * d..][..d];
                for (oo, vx) in o.iter_mut().zip(vj) {
                    *oo += sj / z * vx;
                }
            }
        }
    }
}
