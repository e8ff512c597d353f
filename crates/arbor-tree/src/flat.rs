//! Depth-first flattening of a tree (or of a subset of its paths) into token-level arrays.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TreeError};
use crate::sequence::Sequence;
use crate::tree::TrajectoryTree;

/// One node of the source tree laid out contiguously in a [`FlatTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlatSegment {
    /// The node id in the source [`TrajectoryTree`].
    pub node: u32,
    /// First flat index of the node's tokens.
    pub start: u32,
    /// One past the last flat index of the node's tokens.
    pub end: u32,
    /// Index (into [`FlatTree::segments`]) of the parent segment, `-1` for a root.
    pub parent: i32,
    /// One past the last flat index of the node's subtree (within this flattening).
    pub subtree_end: u32,
}

/// A per-path value that differs from the canonical per-token value, located by flat index.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlatOverride {
    /// Flat index of the token.
    pub index: u32,
    /// This path's loss mask there.
    pub loss_mask: bool,
    /// This path's behaviour logprob there.
    pub logprob: f32,
    /// This path's turn there.
    pub turn: u32,
}

/// One root-to-leaf path of a [`FlatTree`], located by its DFS ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatPath {
    /// Leaf index in the source [`TrajectoryTree`] (= index of the input sequence).
    pub leaf: u32,
    /// The sequence id.
    pub id: String,
    /// Root node id (in the source tree) of the tree this path belongs to.
    pub tree: u32,
    /// Path length in tokens.
    pub len: u32,
    /// Half-open flat index ranges, ascending, whose concatenation is the path in order (adjacent
    /// ranges are merged).
    pub ranges: Vec<(u32, u32)>,
    /// Index of the segment holding the path's last token.
    pub end_segment: u32,
    /// Reward of the trajectory.
    pub reward: Option<f64>,
    /// Advantage of the trajectory.
    pub advantage: Option<f64>,
    /// Sampling group.
    pub group: Option<String>,
    /// Where this path's loss mask / logprob / turn differ from the canonical per-token arrays,
    /// ascending by flat index.
    pub overrides: Vec<FlatOverride>,
}

impl FlatPath {
    /// Flat indices of the path's tokens, in path order (the gather index for this path).
    pub fn indices(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.len as usize);
        for &(a, b) in &self.ranges {
            v.extend(a..b);
        }
        v
    }
}

/// Gather indices of all paths of a [`FlatTree`] in CSR form: path `k`'s tokens are
/// `indices[offsets[k]..offsets[k + 1]]` (flat indices, in path order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathGather {
    /// `K + 1` offsets into `indices`.
    pub offsets: Vec<u32>,
    /// Concatenated flat indices of every path (`N_flat` entries).
    pub indices: Vec<u32>,
}

/// For every query token, the contiguous key ranges it may attend to, in CSR form: token `i` sees the
/// half-open ranges `ranges[offsets[i]..offsets[i + 1]]` (ascending, disjoint, non-adjacent; the last one
/// ends at `i + 1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AncestorRanges {
    /// `T + 1` offsets into `ranges`.
    pub offsets: Vec<u32>,
    /// Half-open `(start, end)` key ranges.
    pub ranges: Vec<(u32, u32)>,
}

/// A depth-first (pre-order) flattening of a tree or of a subset of its paths.
///
/// Every ancestor of a token is to its left. Token `j` is visible to token `i` iff
/// `j <= i < subtree_end[j]`; equivalently `j` is on the parent chain of `i`. Per-token arrays have one
/// entry per flat index (`len()` entries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatTree {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Position of each token on its path (depth); siblings reuse positions. RoPE must use these.
    pub position_ids: Vec<u32>,
    /// Flat index of the previous token on the path, `-1` for the first token of a tree.
    pub parent: Vec<i32>,
    /// Exclusive end of each token's subtree in DFS order.
    pub subtree_end: Vec<u32>,
    /// Canonical loss mask over this flattening's paths: `true` iff some path of the flattening trains
    /// the token. Each path's own mask is this one corrected by its [`FlatPath::overrides`].
    pub loss_mask: Vec<bool>,
    /// Canonical behaviour logprobs: the value of one of this flattening's paths that trains the token
    /// (else of one through it); each path's own values are these corrected by its overrides.
    pub logprobs: Vec<f32>,
    /// Canonical turn indices (taken from the same path as `logprobs`).
    pub turns: Vec<u32>,
    /// `g_t`: number of this flattening's paths passing through each token.
    pub leaf_count: Vec<u32>,
    /// One entry per laid-out node, in DFS order.
    pub segments: Vec<FlatSegment>,
    /// The paths of this flattening.
    pub paths: Vec<FlatPath>,
}

/// Reusable per-node scratch space for flattening many subsets of one tree (packing).
pub(crate) struct Scratch {
    count: Vec<u32>,
    seg: Vec<u32>,
}

impl Scratch {
    pub(crate) fn new(n: usize) -> Self {
        Scratch {
            count: vec![0; n],
            seg: vec![u32::MAX; n],
        }
    }
}

impl TrajectoryTree {
    /// Flattens the whole forest (every path, in input order).
    pub fn flatten(&self) -> FlatTree {
        let leaves: Vec<u32> = (0..self.num_paths() as u32).collect();
        let mut scratch = Scratch::new(self.nodes().len());
        self.flatten_with(&leaves, &mut scratch)
    }

    /// Flattens the sub-forest made of the given paths and their ancestors (a pack). `leaf_count` then
    /// counts only these paths. Paths keep the given order. Fails on an unknown or repeated leaf.
    pub fn flatten_leaves(&self, leaves: &[u32]) -> Result<FlatTree> {
        let mut seen = vec![false; self.num_paths()];
        for &k in leaves {
            match seen.get_mut(k as usize) {
                None => {
                    return Err(TreeError::invalid(
                        "leaf selection",
                        format!("unknown leaf {k}"),
                    ));
                }
                Some(s) if *s => {
                    return Err(TreeError::invalid(
                        "leaf selection",
                        format!("leaf {k} selected twice"),
                    ));
                }
                Some(s) => *s = true,
            }
        }
        let mut scratch = Scratch::new(self.nodes().len());
        Ok(self.flatten_with(leaves, &mut scratch))
    }

    /// Flattening with caller-provided scratch (left clean afterwards). `leaves` must be valid and distinct.
    pub(crate) fn flatten_with(&self, leaves: &[u32], scratch: &mut Scratch) -> FlatTree {
        let touched = self.count_paths(leaves, scratch);
        let mut f = self.lay_out(&touched, leaves.len(), scratch);
        let mut chain: Vec<u32> = Vec::new();
        for &k in leaves {
            let path = self.flat_path(k, &f, scratch, &mut chain);
            f.paths.push(path);
        }
        f.recanonicalize();
        for &u in &touched {
            scratch.count[u as usize] = 0;
            scratch.seg[u as usize] = u32::MAX;
        }
        f
    }

    /// Counts in `scratch.count` the selected paths through each node; returns the nodes reached
    /// (ascending, i.e. in pre-order).
    fn count_paths(&self, leaves: &[u32], scratch: &mut Scratch) -> Vec<u32> {
        let nodes = self.nodes();
        let mut touched: Vec<u32> = Vec::new();
        for &k in leaves {
            let mut u = Some(self.leaves()[k as usize].node);
            while let Some(x) = u {
                let c = &mut scratch.count[x as usize];
                if *c == 0 {
                    touched.push(x);
                }
                *c += 1;
                u = nodes[x as usize].parent;
            }
        }
        touched.sort_unstable();
        touched
    }

    /// Lays the `touched` nodes out in pre-order: the per-token arrays and the segments with their
    /// subtree ends (no paths yet); records each node's segment in `scratch.seg`.
    fn lay_out(&self, touched: &[u32], num_paths: usize, scratch: &mut Scratch) -> FlatTree {
        let nodes = self.nodes();
        let total: usize = touched.iter().map(|&u| nodes[u as usize].len()).sum();
        let mut f = FlatTree {
            input_ids: Vec::with_capacity(total),
            position_ids: Vec::with_capacity(total),
            parent: Vec::with_capacity(total),
            subtree_end: Vec::with_capacity(total),
            loss_mask: Vec::with_capacity(total),
            logprobs: Vec::with_capacity(total),
            turns: Vec::with_capacity(total),
            leaf_count: Vec::with_capacity(total),
            segments: Vec::with_capacity(touched.len()),
            paths: Vec::with_capacity(num_paths),
        };
        let mut stack: Vec<u32> = Vec::new();
        for (si, &u) in touched.iter().enumerate() {
            let node = &nodes[u as usize];
            let start = f.input_ids.len() as u32;
            let pseg = node.parent.map(|p| scratch.seg[p as usize]);
            // Close the segments that are not ancestors of this one.
            while let Some(&top) = stack.last() {
                if Some(top) == pseg {
                    break;
                }
                f.segments[top as usize].subtree_end = start;
                stack.pop();
            }
            stack.push(si as u32);
            scratch.seg[u as usize] = si as u32;
            let first_parent: i32 = match pseg {
                Some(ps) => f.segments[ps as usize].end as i32 - 1,
                None => -1,
            };
            let n = node.len() as u32;
            f.input_ids.extend_from_slice(&node.tokens);
            f.position_ids.extend(node.depth..node.depth + n);
            f.parent.push(first_parent);
            f.parent.extend(start as i32..(start + n - 1) as i32);
            f.loss_mask.extend_from_slice(&node.loss_mask);
            f.logprobs.extend_from_slice(&node.logprobs);
            f.turns.extend_from_slice(&node.turns);
            let g = scratch.count[u as usize];
            f.leaf_count.extend(std::iter::repeat_n(g, n as usize));
            f.segments.push(FlatSegment {
                node: u,
                start,
                end: start + n,
                parent: pseg.map_or(-1, |s| s as i32),
                subtree_end: 0,
            });
        }
        let end = f.input_ids.len() as u32;
        for &s in &stack {
            f.segments[s as usize].subtree_end = end;
        }
        for s in &f.segments {
            f.subtree_end.extend(std::iter::repeat_n(
                s.subtree_end,
                (s.end - s.start) as usize,
            ));
        }
        f
    }

    /// Path `k` in the layout `f`: its gather ranges and its overrides at flat indices (`chain` is
    /// reused scratch).
    fn flat_path(&self, k: u32, f: &FlatTree, scratch: &Scratch, chain: &mut Vec<u32>) -> FlatPath {
        let nodes = self.nodes();
        let leaf = &self.leaves()[k as usize];
        let end_seg = scratch.seg[leaf.node as usize];
        chain.clear();
        let mut s = end_seg as i32;
        while s >= 0 {
            chain.push(s as u32);
            s = f.segments[s as usize].parent;
        }
        chain.reverse();
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let mut overrides = Vec::with_capacity(leaf.overrides.len());
        let mut oi = 0;
        for &s in chain.iter() {
            let seg = f.segments[s as usize];
            match ranges.last_mut() {
                Some(r) if r.1 == seg.start => r.1 = seg.end,
                _ => ranges.push((seg.start, seg.end)),
            }
            let depth = nodes[seg.node as usize].depth;
            let n = seg.end - seg.start;
            while let Some(o) = leaf.overrides.get(oi) {
                if o.pos >= depth + n {
                    break;
                }
                overrides.push(FlatOverride {
                    index: seg.start + (o.pos - depth),
                    loss_mask: o.loss_mask,
                    logprob: o.logprob,
                    turn: o.turn,
                });
                oi += 1;
            }
        }
        FlatPath {
            leaf: k,
            id: leaf.id.clone(),
            tree: self.root_of(leaf.node),
            len: leaf.len,
            ranges,
            end_segment: end_seg,
            reward: leaf.reward,
            advantage: leaf.advantage,
            group: leaf.group.clone(),
            overrides,
        }
    }
}

impl FlatTree {
    /// Makes the canonical per-token values those of this flattening's paths (see the field docs).
    ///
    /// The node values copied from the tree are canonical over *all* the tree's paths. They are already
    /// right wherever some selected path has no override (that path has the node value, and the tree's
    /// mask is an OR over a superset). Only tokens where every selected path overrides need a new value;
    /// overrides equal to it are then dropped.
    fn recanonicalize(&mut self) {
        let mut ov: Vec<(u32, u32, usize)> = Vec::new(); // (flat index, leaf, path position)
        for (pi, p) in self.paths.iter().enumerate() {
            for o in &p.overrides {
                ov.push((o.index, p.leaf, pi));
            }
        }
        if ov.is_empty() {
            return;
        }
        ov.sort_unstable();
        let mut remove: Vec<(usize, u32)> = Vec::new(); // (path position, flat index)
        for group in ov.chunk_by(|a, b| a.0 == b.0) {
            let t = group[0].0 as usize;
            if group.len() < self.leaf_count[t] as usize {
                continue;
            }
            let value = |pi: usize| {
                let p = &self.paths[pi];
                let i = p.overrides.partition_point(|o| (o.index as usize) < t);
                p.overrides[i]
            };
            // Sorted by leaf: the first trained value, else the first value.
            let chosen = group
                .iter()
                .map(|&(_, _, pi)| value(pi))
                .find(|o| o.loss_mask)
                .unwrap_or_else(|| value(group[0].2));
            self.loss_mask[t] = chosen.loss_mask;
            self.logprobs[t] = chosen.logprob;
            self.turns[t] = chosen.turn;
            for &(_, _, pi) in group {
                let o = value(pi);
                if o.loss_mask == chosen.loss_mask
                    && o.logprob.to_bits() == chosen.logprob.to_bits()
                    && o.turn == chosen.turn
                {
                    remove.push((pi, t as u32));
                }
            }
        }
        remove.sort_unstable();
        for group in remove.chunk_by(|a, b| a.0 == b.0) {
            let p = &mut self.paths[group[0].0];
            let drop: Vec<u32> = group.iter().map(|&(_, t)| t).collect();
            p.overrides
                .retain(|o| drop.binary_search(&o.index).is_err());
        }
    }

    /// Number of tokens (`T`, the unique tokens of this flattening).
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// `true` when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Sum of path lengths (`N_flat` of the paths in this flattening).
    pub fn flat_tokens(&self) -> u64 {
        self.paths.iter().map(|p| p.len as u64).sum()
    }

    /// Whether key `j` is visible to query `i` (`j` is `i` or an ancestor of `i`).
    pub fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && i < self.subtree_end[j] as usize
    }

    /// Index of the segment holding flat index `i`.
    pub fn segment_of(&self, i: usize) -> usize {
        self.segments.partition_point(|s| s.start as usize <= i) - 1
    }

    /// The keys visible to query `i`, as ascending, merged half-open ranges (the last ends at `i + 1`).
    /// Costs O(number of segments on the path).
    pub fn ancestor_ranges(&self, i: usize) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut s = self.segment_of(i) as i32;
        let mut end = i as u32 + 1;
        while s >= 0 {
            let seg = self.segments[s as usize];
            match out.last_mut() {
                Some(r) if r.0 == end => r.0 = seg.start,
                _ => out.push((seg.start, end)),
            }
            s = seg.parent;
            if s >= 0 {
                end = self.segments[s as usize].end;
            }
        }
        out.reverse();
        out
    }

    /// [`FlatTree::ancestor_ranges`] for every token, in CSR form (what a sparse tree-attention kernel
    /// consumes).
    pub fn all_ancestor_ranges(&self) -> AncestorRanges {
        let mut offsets = Vec::with_capacity(self.len() + 1);
        let mut ranges = Vec::new();
        offsets.push(0u32);
        // The ranges of a segment's tokens are those of the segment's first token with the last range
        // extended, so compute them once per segment.
        for seg in &self.segments {
            let base = self.ancestor_ranges(seg.start as usize);
            for i in seg.start..seg.end {
                let m = base.len();
                ranges.extend_from_slice(&base[..m - 1]);
                ranges.push((base[m - 1].0, i + 1));
                offsets.push(ranges.len() as u32);
            }
        }
        AncestorRanges { offsets, ranges }
    }

    /// Number of visible (query, key) pairs: the work of exact tree attention.
    pub fn visible_pairs(&self) -> u64 {
        // Each token sees its position + 1 keys (its ancestors on the path and itself).
        self.position_ids.iter().map(|&p| p as u64 + 1).sum()
    }

    /// The dense `T x T` boolean attention mask, row-major: `mask[i * T + j]` is `true` iff key `j` is
    /// visible to query `i`. Quadratic in memory: for tests and small trees only.
    pub fn dense_mask(&self) -> Vec<bool> {
        let t = self.len();
        let mut m = vec![false; t * t];
        for j in 0..t {
            for i in j..self.subtree_end[j] as usize {
                m[i * t + j] = true;
            }
        }
        m
    }

    /// Gather indices of every path (see [`PathGather`]).
    pub fn path_gather(&self) -> PathGather {
        let mut offsets = Vec::with_capacity(self.paths.len() + 1);
        let mut indices = Vec::with_capacity(self.flat_tokens() as usize);
        offsets.push(0);
        for p in &self.paths {
            for &(a, b) in &p.ranges {
                indices.extend(a..b);
            }
            offsets.push(indices.len() as u32);
        }
        PathGather { offsets, indices }
    }

    /// Gathers per-token `values` (one per flat token, e.g. log-probs computed once on the tree) into
    /// path `k`'s order: the forward of the RL gather.
    pub fn gather_path<T: Copy>(&self, values: &[T], k: usize) -> Vec<T> {
        let p = &self.paths[k];
        let mut v = Vec::with_capacity(p.len as usize);
        for &(a, b) in &p.ranges {
            v.extend_from_slice(&values[a as usize..b as usize]);
        }
        v
    }

    /// The backward of [`FlatTree::gather_path`] over all paths: adds each path's per-position gradient
    /// into its tokens, so a token shared by several paths receives the sum of their gradients (exactly
    /// the gradient of training those paths separately). `per_path[k]` has path `k`'s length.
    pub fn scatter_add_paths(&self, per_path: &[Vec<f64>]) -> Vec<f64> {
        assert_eq!(
            per_path.len(),
            self.paths.len(),
            "one gradient vector per path"
        );
        let mut out = vec![0f64; self.len()];
        for (p, g) in self.paths.iter().zip(per_path) {
            assert_eq!(
                g.len(),
                p.len as usize,
                "gradient length must equal the path length"
            );
            let mut q = 0;
            for &(a, b) in &p.ranges {
                let n = (b - a) as usize;
                for (o, x) in out[a as usize..b as usize].iter_mut().zip(&g[q..q + n]) {
                    *o += x;
                }
                q += n;
            }
        }
        out
    }

    /// Path `k`'s own loss mask, in path order.
    pub fn path_loss_mask(&self, k: usize) -> Vec<bool> {
        let p = &self.paths[k];
        let mut v: Vec<bool> = Vec::with_capacity(p.len as usize);
        for &(a, b) in &p.ranges {
            v.extend_from_slice(&self.loss_mask[a as usize..b as usize]);
        }
        self.apply_overrides(k, &mut v, |o| o.loss_mask);
        v
    }

    /// Path `k`'s own behaviour logprobs, in path order.
    pub fn path_logprobs(&self, k: usize) -> Vec<f32> {
        let p = &self.paths[k];
        let mut v: Vec<f32> = Vec::with_capacity(p.len as usize);
        for &(a, b) in &p.ranges {
            v.extend_from_slice(&self.logprobs[a as usize..b as usize]);
        }
        self.apply_overrides(k, &mut v, |o| o.logprob);
        v
    }

    /// Path `k`'s own turn indices, in path order.
    pub fn path_turns(&self, k: usize) -> Vec<u32> {
        let p = &self.paths[k];
        let mut v: Vec<u32> = Vec::with_capacity(p.len as usize);
        for &(a, b) in &p.ranges {
            v.extend_from_slice(&self.turns[a as usize..b as usize]);
        }
        self.apply_overrides(k, &mut v, |o| o.turn);
        v
    }

    /// Path `k` as a [`Sequence`] (equal to the normalized input sequence).
    pub fn path_sequence(&self, k: usize) -> Sequence {
        let p = &self.paths[k];
        let mut tokens = Vec::with_capacity(p.len as usize);
        for &(a, b) in &p.ranges {
            tokens.extend_from_slice(&self.input_ids[a as usize..b as usize]);
        }
        Sequence {
            id: p.id.clone(),
            tokens,
            loss_mask: self.path_loss_mask(k),
            logprobs: self.path_logprobs(k),
            turns: self.path_turns(k),
            reward: p.reward,
            advantage: p.advantage,
            group: p.group.clone(),
        }
    }

    fn apply_overrides<T>(&self, k: usize, v: &mut [T], get: impl Fn(&FlatOverride) -> T) {
        let p = &self.paths[k];
        if p.overrides.is_empty() {
            return;
        }
        // Map flat index -> path position through the ranges (both ascending).
        let mut ri = 0;
        let mut before = 0u32;
        for o in &p.overrides {
            while o.index >= p.ranges[ri].1 {
                before += p.ranges[ri].1 - p.ranges[ri].0;
                ri += 1;
            }
            v[(before + o.index - p.ranges[ri].0) as usize] = get(o);
        }
    }

    /// Per-token advantage when unambiguous: the common advantage of every path of this flattening that
    /// passes through the token; `NaN` where those paths disagree or one has no advantage.
    pub fn token_advantage(&self) -> Vec<f32> {
        #[derive(Clone, Copy, PartialEq)]
        enum St {
            Empty,
            Val(f64),
            Ambiguous,
        }
        fn merge(st: &mut St, v: St) {
            *st = match (*st, v) {
                (St::Empty, v) | (v, St::Empty) => v,
                (St::Val(a), St::Val(b)) if a == b => St::Val(a),
                _ => St::Ambiguous,
            }
        }
        let ns = self.segments.len();
        let mut state = vec![St::Empty; ns];
        for p in &self.paths {
            let v = p.advantage.map_or(St::Ambiguous, St::Val);
            merge(&mut state[p.end_segment as usize], v);
        }
        // Children come after their parent in DFS order: accumulate bottom-up.
        for s in (0..ns).rev() {
            let par = self.segments[s].parent;
            if par >= 0 {
                let v = state[s];
                merge(&mut state[par as usize], v);
            }
        }
        let mut out = Vec::with_capacity(self.len());
        for (s, seg) in self.segments.iter().enumerate() {
            let v = match state[s] {
                St::Val(a) => a as f32,
                _ => f32::NAN,
            };
            out.extend(std::iter::repeat_n(v, (seg.end - seg.start) as usize));
        }
        out
    }
}
