//! Loss weights ("gradient restoration"): per-token weights on a flattened tree that make
//! `sum_t w_t * l_t` equal to the loss computed on every root-to-leaf path separately.

use serde::{Deserialize, Serialize};

use crate::flat::FlatTree;

/// How a per-token loss is reduced over paths (the per-path loss the tree loss must equal).
///
/// With `m_{k,t}` path `k`'s loss mask at token `t`, `K` paths, `|p_k|_m` the number of loss tokens of
/// path `k` and `M = sum_k |p_k|_m` (the *flat* loss-token count), the weight of tree token `t` is
/// `w_t = sum over paths k through t of c_k * m_{k,t}` with:
///
/// | variant | per-path loss | `c_k` | `w_t` without overrides |
/// |---|---|---|---|
/// | `PathSum` | sum over path tokens, mean over K paths | `1/K` | `m_t * g_t / K` |
/// | `TokenMean` | global token mean over all paths | `1/M` | `m_t * g_t / M` |
/// | `SequenceMean` | mean within each path, then mean over paths | `1/(K |p_k|_m)` | `m_t/K * sum_k 1/|p_k|_m` |
///
/// A path without loss tokens contributes nothing under `SequenceMean` (its mean is taken as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalization {
    /// Sum over each path's loss tokens, mean over the `K` paths.
    PathSum,
    /// Mean over all loss tokens of all paths (the flat count `M`).
    #[default]
    TokenMean,
    /// Mean over each path's loss tokens, then mean over the `K` paths.
    SequenceMean,
}

impl std::str::FromStr for LossNormalization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "path_sum" => Ok(LossNormalization::PathSum),
            "token_mean" => Ok(LossNormalization::TokenMean),
            "sequence_mean" => Ok(LossNormalization::SequenceMean),
            _ => Err(format!(
                "unknown loss normalization {s:?} (expected path_sum, token_mean or sequence_mean)"
            )),
        }
    }
}

/// The global normalizers of a loss: over the whole batch (all packs of an optimizer step), not one pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Normalizer {
    /// `K`: number of paths.
    pub num_paths: u64,
    /// `M`: number of loss tokens summed over paths (flat count: a shared token counts once per path
    /// that trains it).
    pub loss_tokens: u64,
}

impl Normalizer {
    /// Sum of two normalizers (the normalizer of the union of two disjoint path sets).
    pub fn merge(self, other: Normalizer) -> Normalizer {
        Normalizer {
            num_paths: self.num_paths + other.num_paths,
            loss_tokens: self.loss_tokens + other.loss_tokens,
        }
    }
}

impl FlatTree {
    /// `|p_k|_m` for every path: the number of tokens path `k` itself trains.
    pub fn path_loss_tokens(&self) -> Vec<u64> {
        let ns = self.segments.len();
        let mut cum = vec![0u64; ns];
        for (s, seg) in self.segments.iter().enumerate() {
            let own = self.loss_mask[seg.start as usize..seg.end as usize]
                .iter()
                .filter(|&&m| m)
                .count() as u64;
            cum[s] = own
                + if seg.parent >= 0 {
                    cum[seg.parent as usize]
                } else {
                    0
                };
        }
        self.paths
            .iter()
            .map(|p| {
                let mut n = cum[p.end_segment as usize] as i64;
                for o in &p.overrides {
                    n += o.loss_mask as i64 - self.loss_mask[o.index as usize] as i64;
                }
                n as u64
            })
            .collect()
    }

    /// The normalizer of this flattening's own paths.
    pub fn normalizer(&self) -> Normalizer {
        Normalizer {
            num_paths: self.paths.len() as u64,
            loss_tokens: self.path_loss_tokens().iter().sum(),
        }
    }

    /// The per-path coefficients `c_k` of `norm` under the global normalizer `global`.
    pub fn path_coefficients(&self, norm: LossNormalization, global: &Normalizer) -> Vec<f64> {
        let inv = |x: f64| if x > 0.0 { 1.0 / x } else { 0.0 };
        match norm {
            LossNormalization::PathSum => vec![inv(global.num_paths as f64); self.paths.len()],
            LossNormalization::TokenMean => {
                vec![inv(global.loss_tokens as f64); self.paths.len()]
            }
            LossNormalization::SequenceMean => {
                let k = global.num_paths as f64;
                self.path_loss_tokens()
                    .into_iter()
                    .map(|n| inv(k * n as f64))
                    .collect()
            }
        }
    }

    /// Loss weights for `norm`, normalized over this flattening's own paths.
    pub fn loss_weights(&self, norm: LossNormalization) -> Vec<f64> {
        self.loss_weights_with(norm, &self.normalizer())
    }

    /// Loss weights for `norm` under a global normalizer (use the batch's, so that the losses of its
    /// packs add up to the batch loss).
    pub fn loss_weights_with(&self, norm: LossNormalization, global: &Normalizer) -> Vec<f64> {
        self.weights_from_path_coefficients(&self.path_coefficients(norm, global))
    }

    /// `w_t = sum over paths k through t of coeff[k] * m_{k,t}`, with each path's own loss mask.
    ///
    /// Any loss of the form `sum_k c_k sum_{t in p_k} m_{k,t} l_t` equals `sum_t w_t l_t` on the tree.
    /// For example `coeff[k] = -A_k / K` gives the exact weights of an unclipped policy gradient
    /// `-(1/K) sum_k A_k sum_t m_{k,t} log pi(t)`. Costs `O(T + K + overrides)`.
    pub fn weights_from_path_coefficients(&self, coeff: &[f64]) -> Vec<f64> {
        assert_eq!(coeff.len(), self.paths.len(), "one coefficient per path");
        let ns = self.segments.len();
        let mut acc = vec![0f64; ns];
        for (p, &c) in self.paths.iter().zip(coeff) {
            acc[p.end_segment as usize] += c;
        }
        for s in (0..ns).rev() {
            let par = self.segments[s].parent;
            if par >= 0 {
                acc[par as usize] += acc[s];
            }
        }
        let mut w = vec![0f64; self.len()];
        for (s, seg) in self.segments.iter().enumerate() {
            let r = seg.start as usize..seg.end as usize;
            for (wt, &m) in w[r.clone()].iter_mut().zip(&self.loss_mask[r]) {
                if m {
                    *wt = acc[s];
                }
            }
        }
        for (p, &c) in self.paths.iter().zip(coeff) {
            for o in &p.overrides {
                let t = o.index as usize;
                w[t] += c * (o.loss_mask as i32 - self.loss_mask[t] as i32) as f64;
            }
        }
        w
    }
}
