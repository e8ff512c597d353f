//! Synthetic trajectory sets with a chosen potential overlap ratio (POR), for benchmarks and tests.
//!
//! Two shapes from agentic RL:
//! - [`group_sampling`]: `G` tasks, each sampled `K` times; the samples of a task share its prompt and
//!   diverge at the first response token (a tree of depth one per task).
//! - [`multi_turn_branching`]: episodes whose turns branch: after a shared prompt every turn is an
//!   observation (tool output, not trained) followed by a response (trained), and each turn has
//!   `branching` alternatives, `turns` levels deep (a full `branching`-ary tree per episode).
//!
//! Both are deterministic given their seed. `for_por` constructors solve the shape's closed-form POR for
//! the prompt length, so realised POR matches the target up to integer rounding (and the rare random
//! merge of two trees' roots when there are more trees than vocabulary entries).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TreeError};
use crate::sequence::Sequence;

/// Parameters of [`group_sampling`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupSampling {
    /// Number of tasks (trees).
    pub groups: usize,
    /// Samples per task (`K` leaves per tree).
    pub samples_per_group: usize,
    /// Shared prompt length.
    pub prompt_len: usize,
    /// Response length of every sample.
    pub response_len: usize,
    /// Token ids are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    /// RNG seed.
    pub seed: u64,
}

impl GroupSampling {
    /// A configuration whose POR is `target_por` (up to rounding), with about `flat_tokens` tokens in
    /// total, `samples_per_group` samples per task and sequences of `seq_len` tokens.
    ///
    /// POR of this shape is `(K - 1) P / (K (P + R))`, so `target_por` must be below `(K - 1) / K`.
    pub fn for_por(
        target_por: f64,
        flat_tokens: usize,
        samples_per_group: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Self> {
        let k = samples_per_group as f64;
        let bad = |r: String| TreeError::invalid("synthetic group sampling", r);
        if samples_per_group < 2 || seq_len < 2 {
            return Err(bad(
                "need at least 2 samples per group and 2 tokens per sequence".into(),
            ));
        }
        let prompt = (target_por * k * seq_len as f64 / (k - 1.0)).round();
        if !(0.0..seq_len as f64).contains(&prompt) || !(0.0..1.0).contains(&target_por) {
            return Err(bad(format!(
                "POR {target_por} is not reachable with {samples_per_group} samples of {seq_len} tokens \
                 (max {:.3})",
                (k - 1.0) / k * (seq_len as f64 - 1.0) / seq_len as f64
            )));
        }
        let prompt_len = prompt as usize;
        Ok(GroupSampling {
            groups: (flat_tokens / (samples_per_group * seq_len)).max(1),
            samples_per_group,
            prompt_len,
            response_len: seq_len - prompt_len,
            vocab_size: 32_000,
            seed,
        })
    }

    /// The POR of the generated set (exact, barring accidental merges across groups).
    pub fn expected_por(&self) -> f64 {
        let (k, p, r) = (
            self.samples_per_group as f64,
            self.prompt_len as f64,
            self.response_len as f64,
        );
        1.0 - (p + k * r) / (k * (p + r))
    }
}

/// Parameters of [`multi_turn_branching`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MultiTurnBranching {
    /// Number of episodes (trees).
    pub trees: usize,
    /// Shared prompt length.
    pub prompt_len: usize,
    /// Depth: turns per path.
    pub turns: usize,
    /// Alternatives per turn.
    pub branching: usize,
    /// Observation tokens at the start of each turn (not trained).
    pub observation_len: usize,
    /// Response tokens of each turn (trained).
    pub response_len: usize,
    /// Token ids are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    /// RNG seed.
    pub seed: u64,
}

impl MultiTurnBranching {
    /// A configuration whose POR is `target_por` (up to rounding), with paths of about `path_len` tokens
    /// and at least `flat_tokens` tokens in total. Picks, among a few (branching, turns) shapes with at
    /// least one whole tree within `flat_tokens`, the one that needs the shortest shared prompt relative
    /// to a turn. POR of this shape is `1 - (P + S sum_{i=1..d} b^i) / (b^d (P + d S))`.
    pub fn for_por(
        target_por: f64,
        flat_tokens: usize,
        path_len: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut best: Option<(f64, MultiTurnBranching)> = None;
        for (b, d) in [
            (2usize, 1usize),
            (2, 2),
            (3, 1),
            (2, 3),
            (3, 2),
            (4, 1),
            (2, 4),
            (4, 2),
            (3, 3),
            (2, 5),
            (4, 3),
            (3, 4),
            (8, 1),
            (16, 1),
        ] {
            let k = b.pow(d as u32) as f64;
            let sigma: f64 = (1..=d).map(|i| b.pow(i as u32) as f64).sum();
            let q = (1.0 - target_por) * k;
            // unique/flat = 1 - POR  <=>  P (1 - q) = S (q d - sigma), with P/S = r.
            if (1.0 - q).abs() < 1e-9 {
                continue;
            }
            let r = (q * d as f64 - sigma) / (1.0 - q);
            if !(r.is_finite() && r >= 0.0) {
                continue;
            }
            let s = (path_len as f64 / (r + d as f64)).floor();
            if s < 2.0 || k as usize * path_len > flat_tokens {
                continue;
            }
            let seg = s as usize;
            let prompt_len = (r * s).round() as usize;
            let cfg = MultiTurnBranching {
                trees: 1,
                prompt_len,
                turns: d,
                branching: b,
                observation_len: seg / 2,
                response_len: seg - seg / 2,
                vocab_size: 32_000,
                seed,
            };
            let flat_per_tree = k as usize * (prompt_len + d * seg);
            let cfg = MultiTurnBranching {
                trees: flat_tokens.div_ceil(flat_per_tree).max(1),
                ..cfg
            };
            if best.as_ref().is_none_or(|(br, _)| r < *br) {
                best = Some((r, cfg));
            }
        }
        best.map(|(_, c)| c).ok_or_else(|| {
            TreeError::invalid(
                "synthetic multi-turn branching",
                format!(
                    "no shape reaches POR {target_por} with paths of {path_len} tokens within \
                     {flat_tokens} flat tokens"
                ),
            )
        })
    }

    /// Paths per tree.
    pub fn leaves_per_tree(&self) -> usize {
        self.branching.pow(self.turns as u32)
    }

    /// The POR of the generated set (exact, barring accidental merges across trees).
    pub fn expected_por(&self) -> f64 {
        let b = self.branching as f64;
        let k = self.leaves_per_tree() as f64;
        let s = (self.observation_len + self.response_len) as f64;
        let sigma: f64 = (1..=self.turns).map(|i| b.powi(i as i32)).sum();
        let p = self.prompt_len as f64;
        1.0 - (p + s * sigma) / (k * (p + self.turns as f64 * s))
    }
}

fn random_tokens(rng: &mut StdRng, n: usize, vocab: u32, out: &mut Vec<u32>) {
    out.extend((0..n).map(|_| rng.gen_range(0..vocab.max(1))));
}

/// Group-relative advantages: reward minus the group mean.
fn set_advantages(seqs: &mut [Sequence]) {
    let n = seqs.len() as f64;
    let mean = seqs.iter().filter_map(|s| s.reward).sum::<f64>() / n;
    for s in seqs {
        s.advantage = s.reward.map(|r| r - mean);
    }
}

/// Generates `cfg.groups * cfg.samples_per_group` sequences (see [`GroupSampling`]).
pub fn group_sampling(cfg: &GroupSampling) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let vocab = cfg.vocab_size.max(2);
    let mut out = Vec::with_capacity(cfg.groups * cfg.samples_per_group);
    for g in 0..cfg.groups {
        let mut prompt = Vec::with_capacity(cfg.prompt_len);
        if cfg.prompt_len > 0 {
            // Distinct first tokens keep groups apart (while there are fewer groups than tokens).
            prompt.push(g as u32 % vocab);
            random_tokens(&mut rng, cfg.prompt_len - 1, vocab, &mut prompt);
        }
        let start = out.len();
        for s in 0..cfg.samples_per_group {
            let mut seq = Sequence::new(format!("group-{g}/sample-{s}"), prompt.clone());
            seq.loss_mask = vec![false; cfg.prompt_len];
            seq.logprobs = vec![0.0; cfg.prompt_len];
            seq.turns = vec![0; cfg.prompt_len];
            if cfg.response_len > 0 {
                // Distinct first response tokens: the samples diverge right after the prompt.
                seq.tokens
                    .push((g * cfg.samples_per_group + s) as u32 % vocab);
                random_tokens(&mut rng, cfg.response_len - 1, vocab, &mut seq.tokens);
            }
            for _ in 0..cfg.response_len {
                seq.loss_mask.push(true);
                seq.logprobs.push(-rng.gen_range(0.01f32..3.0));
                seq.turns.push(1);
            }
            seq.reward = Some(f64::from(rng.gen_range(0u8..2)));
            seq.group = Some(format!("group-{g}"));
            out.push(seq);
        }
        set_advantages(&mut out[start..]);
    }
    out
}

/// Generates `cfg.trees * branching^turns` sequences (see [`MultiTurnBranching`]).
pub fn multi_turn_branching(cfg: &MultiTurnBranching) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let vocab = cfg.vocab_size.max(2);
    let seg = cfg.observation_len + cfg.response_len;
    let mut out = Vec::with_capacity(cfg.trees * cfg.leaves_per_tree());
    for tree in 0..cfg.trees {
        let start = out.len();
        // Depth-first over the full tree; `stack` holds (prefix sequence, depth, name).
        let mut root = Sequence::new(format!("episode-{tree}"), Vec::new());
        if cfg.prompt_len > 0 {
            root.tokens.push(tree as u32 % vocab);
            random_tokens(&mut rng, cfg.prompt_len - 1, vocab, &mut root.tokens);
        }
        root.loss_mask = vec![false; cfg.prompt_len];
        root.logprobs = vec![0.0; cfg.prompt_len];
        root.turns = vec![0; cfg.prompt_len];
        let mut stack = vec![(root, 0usize)];
        while let Some((prefix, depth)) = stack.pop() {
            if depth == cfg.turns {
                let mut leaf = prefix;
                leaf.reward = Some(f64::from(rng.gen_range(0u8..2)));
                leaf.group = Some(format!("episode-{tree}"));
                out.push(leaf);
                continue;
            }
            for c in (0..cfg.branching).rev() {
                let mut s = prefix.clone();
                s.id = format!("{}/{c}", s.id);
                if seg > 0 {
                    // Distinct first tokens: the alternatives of a turn diverge immediately.
                    s.tokens.push(c as u32 % vocab);
                    random_tokens(&mut rng, seg - 1, vocab, &mut s.tokens);
                }
                for i in 0..seg {
                    let generated = i >= cfg.observation_len;
                    s.loss_mask.push(generated);
                    s.logprobs.push(if generated {
                        -rng.gen_range(0.01f32..3.0)
                    } else {
                        0.0
                    });
                    s.turns.push(depth as u32 + 1);
                }
                stack.push((s, depth + 1));
            }
        }
        set_advantages(&mut out[start..]);
    }
    out
}
