//! The trajectory tree: a compressed trie of token segments built from [`Sequence`]s.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TreeError};
use crate::sequence::Sequence;

/// Version of the serialized tree format (the `version` field of the JSON form).
pub const TREE_FORMAT_VERSION: u32 = 1;

/// One node of a [`TrajectoryTree`]: a maximal run of tokens shared by the same set of paths.
///
/// The per-token arrays hold the node's *canonical* values; see the crate docs ("Merging rule") for how
/// they are chosen when paths disagree and how each path's own values are kept exactly
/// ([`Leaf::overrides`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Index of this node in [`TrajectoryTree::nodes`]. Nodes are numbered in depth-first pre-order, so
    /// every ancestor has a smaller id and a subtree is a contiguous id range.
    pub id: u32,
    /// Parent node id, `None` for the root of a tree (a [`TrajectoryTree`] is a forest).
    pub parent: Option<u32>,
    /// Position (on any path through this node) of the node's first token = number of tokens on its
    /// ancestors.
    pub depth: u32,
    /// The token ids of this segment (never empty).
    pub tokens: Vec<u32>,
    /// Canonical loss mask: `true` if at least one path through the token trains it.
    pub loss_mask: Vec<bool>,
    /// Canonical behaviour logprob (from the first path, in input order, that trains the token; else
    /// from the first path through it).
    pub logprobs: Vec<f32>,
    /// Canonical turn index (chosen like `logprobs`).
    pub turns: Vec<u32>,
    /// Indices (into [`TrajectoryTree::leaves`], ascending) of the paths passing through this node. Its
    /// length is `g_t` for every token of the node.
    pub leaves: Vec<u32>,
    /// Child node ids, in order of first appearance in the input (derived; not serialized).
    #[serde(skip)]
    pub children: Vec<u32>,
    /// One past the last node id of this node's subtree (derived; not serialized).
    #[serde(skip)]
    pub subtree_end: u32,
}

impl Node {
    /// Number of tokens in this node.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always `false`: nodes hold at least one token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Position one past the node's last token = length of the prefix ending with this node (`L(u)`).
    pub fn end_depth(&self) -> u32 {
        self.depth + self.tokens.len() as u32
    }
}

/// A per-path value that differs from the canonical value stored on the node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenOverride {
    /// Position of the token on the path (0-based; equals its position id).
    pub pos: u32,
    /// This path's loss mask at `pos`.
    pub loss_mask: bool,
    /// This path's behaviour logprob at `pos`.
    pub logprob: f32,
    /// This path's turn at `pos`.
    pub turn: u32,
}

/// One root-to-leaf path of the tree, i.e. one input [`Sequence`], with its RL fields.
///
/// A path ends at the last token of [`Leaf::node`]. That node may have children (when the sequence is a
/// strict prefix of another one) and several paths may end at the same node (duplicate sequences).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaf {
    /// The sequence id.
    pub id: String,
    /// The node holding the path's last token.
    pub node: u32,
    /// Path length in tokens.
    pub len: u32,
    /// Scalar reward of the trajectory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Advantage of the trajectory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantage: Option<f64>,
    /// Sampling group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Positions where this path's loss mask, logprob or turn differ from the node's canonical values,
    /// ascending by `pos`. Empty in the common case where all paths agree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<TokenOverride>,
}

/// A prefix tree (forest) of token sequences: shared prefixes are stored, and computed, once.
///
/// Built with [`TrajectoryTree::from_sequences`]; [`TrajectoryTree::paths`] gives every input sequence back.
/// Serializes to the stable JSON form documented in the crate docs (`{"version":1,"nodes":[...],
/// "leaves":[...]}`), and deserializes from it with full validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TreeRepr")]
pub struct TrajectoryTree {
    version: u32,
    nodes: Vec<Node>,
    leaves: Vec<Leaf>,
}

#[derive(Deserialize)]
struct TreeRepr {
    #[serde(default = "default_version")]
    version: u32,
    nodes: Vec<Node>,
    leaves: Vec<Leaf>,
}

fn default_version() -> u32 {
    TREE_FORMAT_VERSION
}

impl TryFrom<TreeRepr> for TrajectoryTree {
    type Error = TreeError;
    fn try_from(r: TreeRepr) -> Result<Self> {
        if r.version != TREE_FORMAT_VERSION {
            return Err(TreeError::invalid(
                "tree",
                format!("unsupported version {}", r.version),
            ));
        }
        let mut t = TrajectoryTree {
            version: r.version,
            nodes: r.nodes,
            leaves: r.leaves,
        };
        t.validate_and_link()?;
        Ok(t)
    }
}

/// A tiny multiplicative hasher for `(u32, u32)` keys (FxHash); the std SipHash dominates build time.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

const NONE: u32 = u32::MAX;

/// A node during construction: a slice `[start, start + len)` of sequence `seq`'s tokens.
#[derive(Clone, Copy)]
struct BuildNode {
    seq: u32,
    start: u32,
    len: u32,
    parent: u32,
}

impl TrajectoryTree {
    /// Builds the prefix tree of `sequences`.
    ///
    /// Sequences are merged on token ids only (see the crate docs, "Merging rule"); leaf `k` is
    /// `sequences[k]`. Fails if a sequence is empty, if a per-token field has the wrong length, or if the
    /// tree would not fit the `u32`/`i32` indices of the flat layout.
    pub fn from_sequences(sequences: &[Sequence]) -> Result<TrajectoryTree> {
        check_sizes(sequences)?;
        let (bnodes, leaf_end) = insert_all(sequences);
        if bnodes.len() >= i32::MAX as usize {
            return Err(TreeError::TooLarge(format!("{} nodes", bnodes.len())));
        }
        let pre = preorder(&bnodes, &leaf_end);
        let (mut nodes, mut leaves) = materialize(sequences, &bnodes, &leaf_end, &pre);
        canonicalize(sequences, &mut nodes, &mut leaves);
        let mut tree = TrajectoryTree {
            version: TREE_FORMAT_VERSION,
            nodes,
            leaves,
        };
        tree.compute_subtree_ends();
        Ok(tree)
    }

    fn compute_subtree_ends(&mut self) {
        let n = self.nodes.len();
        let mut end: Vec<u32> = (1..=n as u32).collect();
        for i in (0..n).rev() {
            if let Some(p) = self.nodes[i].parent {
                let e = end[i];
                let pe = &mut end[p as usize];
                *pe = (*pe).max(e);
            }
        }
        for (node, e) in self.nodes.iter_mut().zip(end) {
            node.subtree_end = e;
        }
    }

    /// Checks a deserialized tree and recomputes the derived fields (`children`, `subtree_end`).
    fn validate_and_link(&mut self) -> Result<()> {
        let bad = |r: String| TreeError::invalid("tree", r);
        let n = self.nodes.len();
        let k = self.leaves.len();
        if n >= i32::MAX as usize || k >= u32::MAX as usize {
            return Err(TreeError::TooLarge(format!("{n} nodes, {k} leaves")));
        }
        let mut leaf_count = vec![0u32; n];
        for (i, node) in self.nodes.iter().enumerate() {
            if node.id as usize != i {
                return Err(bad(format!("node at index {i} has id {}", node.id)));
            }
            let len = node.tokens.len();
            if len == 0 {
                return Err(bad(format!("node {i} has no tokens")));
            }
            if node.loss_mask.len() != len || node.logprobs.len() != len || node.turns.len() != len
            {
                return Err(bad(format!(
                    "node {i}: per-token arrays must have {len} entries"
                )));
            }
            let expected_depth = match node.parent {
                None => 0,
                Some(p) if (p as usize) < i => self.nodes[p as usize].end_depth(),
                Some(p) => {
                    return Err(bad(format!(
                        "node {i}: parent {p} does not precede it (nodes must be in pre-order)"
                    )));
                }
            };
            if node.depth != expected_depth {
                return Err(bad(format!(
                    "node {i}: depth {} but its ancestors hold {expected_depth} tokens",
                    node.depth
                )));
            }
            if node.leaves.is_empty() {
                return Err(bad(format!("node {i} has no leaves")));
            }
            if node.leaves.windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad(format!("node {i}: leaves must be strictly ascending")));
            }
            if let Some(&l) = node.leaves.last()
                && l as usize >= k
            {
                return Err(bad(format!("node {i}: unknown leaf {l}")));
            }
            leaf_count[i] = node.leaves.len() as u32;
        }
        // Pre-order: a node's parent must be the previous node or one of its ancestors.
        let mut stack: Vec<u32> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            match node.parent {
                None => stack.clear(),
                Some(p) => {
                    while stack.last().is_some_and(|&s| s != p) {
                        stack.pop();
                    }
                    if stack.is_empty() {
                        return Err(bad(format!("node {i}: nodes are not in pre-order")));
                    }
                }
            }
            stack.push(i as u32);
        }
        // Every leaf's path must be exactly the nodes listing it.
        let mut seen = vec![0u32; n];
        for (li, leaf) in self.leaves.iter().enumerate() {
            let end = leaf.node as usize;
            if end >= n {
                return Err(bad(format!("leaf {li}: unknown node {}", leaf.node)));
            }
            if self.nodes[end].end_depth() != leaf.len {
                return Err(bad(format!(
                    "leaf {li}: len {} but its path holds {} tokens",
                    leaf.len,
                    self.nodes[end].end_depth()
                )));
            }
            let mut u = Some(leaf.node);
            while let Some(x) = u {
                let node = &self.nodes[x as usize];
                if node.leaves.binary_search(&(li as u32)).is_err() {
                    return Err(bad(format!(
                        "leaf {li} passes through node {x}, which does not list it"
                    )));
                }
                seen[x as usize] += 1;
                u = node.parent;
            }
            if leaf.overrides.windows(2).any(|w| w[0].pos >= w[1].pos)
                || leaf.overrides.last().is_some_and(|o| o.pos >= leaf.len)
            {
                return Err(bad(format!(
                    "leaf {li}: overrides must be ascending and inside the path"
                )));
            }
        }
        if seen != leaf_count {
            return Err(bad(
                "a node lists a leaf whose path does not pass through it".into(),
            ));
        }
        for node in self.nodes.iter_mut() {
            node.children.clear();
        }
        for i in 0..n {
            if let Some(p) = self.nodes[i].parent {
                self.nodes[p as usize].children.push(i as u32);
            }
        }
        self.compute_subtree_ends();
        Ok(())
    }

    /// All nodes, in depth-first pre-order (`nodes()[i].id == i`).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All leaves (paths), in input order: leaf `k` is the `k`-th input sequence.
    pub fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    /// Number of root-to-leaf paths (`K`).
    pub fn num_paths(&self) -> usize {
        self.leaves.len()
    }

    /// Root node ids (one per tree of the forest), in pre-order.
    pub fn roots(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.parent.is_none())
            .map(|n| n.id)
            .collect()
    }

    /// The root node id of the tree containing `node`.
    pub fn root_of(&self, node: u32) -> u32 {
        let mut u = node;
        while let Some(p) = self.nodes[u as usize].parent {
            u = p;
        }
        u
    }

    /// `N_flat`: sum over paths of the path length.
    pub fn flat_tokens(&self) -> u64 {
        self.leaves.iter().map(|l| l.len as u64).sum()
    }

    /// `N_unique`: number of tokens stored in the tree.
    pub fn unique_tokens(&self) -> u64 {
        self.nodes.iter().map(|n| n.tokens.len() as u64).sum()
    }

    /// Node ids on the path of leaf `k`, root first.
    pub fn path_nodes(&self, k: usize) -> Vec<u32> {
        let mut v = Vec::new();
        let mut u = Some(self.leaves[k].node);
        while let Some(x) = u {
            v.push(x);
            u = self.nodes[x as usize].parent;
        }
        v.reverse();
        v
    }

    /// Reconstructs input sequence `k` (with omitted per-token fields filled with their defaults, i.e.
    /// equal to `sequences[k].normalized()`).
    pub fn path(&self, k: usize) -> Sequence {
        let leaf = &self.leaves[k];
        let n = leaf.len as usize;
        let mut s = Sequence {
            id: leaf.id.clone(),
            tokens: Vec::with_capacity(n),
            loss_mask: Vec::with_capacity(n),
            logprobs: Vec::with_capacity(n),
            turns: Vec::with_capacity(n),
            reward: leaf.reward,
            advantage: leaf.advantage,
            group: leaf.group.clone(),
        };
        for u in self.path_nodes(k) {
            let node = &self.nodes[u as usize];
            s.tokens.extend_from_slice(&node.tokens);
            s.loss_mask.extend_from_slice(&node.loss_mask);
            s.logprobs.extend_from_slice(&node.logprobs);
            s.turns.extend_from_slice(&node.turns);
        }
        for o in &leaf.overrides {
            let p = o.pos as usize;
            s.loss_mask[p] = o.loss_mask;
            s.logprobs[p] = o.logprob;
            s.turns[p] = o.turn;
        }
        s
    }

    /// Reconstructs every input sequence, in input order (see [`TrajectoryTree::path`]).
    pub fn paths(&self) -> Vec<Sequence> {
        (0..self.leaves.len()).map(|k| self.path(k)).collect()
    }
}

/// Validates every sequence and checks that the forest fits the `u32` indices of the flat layout.
fn check_sizes(sequences: &[Sequence]) -> Result<()> {
    let mut flat: u64 = 0;
    for s in sequences {
        s.validate()?;
        flat += s.tokens.len() as u64;
    }
    if sequences.len() >= u32::MAX as usize || flat >= u32::MAX as u64 {
        return Err(TreeError::TooLarge(format!(
            "{} sequences with {flat} tokens (the flat layout indexes tokens and paths with u32)",
            sequences.len()
        )));
    }
    Ok(())
}

/// Step 1: inserts every sequence into a compressed trie whose nodes reference sequence slices.
/// Returns the nodes and, per sequence, the node holding its last token.
fn insert_all(sequences: &[Sequence]) -> (Vec<BuildNode>, Vec<u32>) {
    let mut bnodes: Vec<BuildNode> = Vec::new();
    let mut child: FxMap<(u32, u32), u32> = FxMap::default();
    let mut leaf_end: Vec<u32> = Vec::with_capacity(sequences.len());
    for (si, s) in sequences.iter().enumerate() {
        let t = &s.tokens;
        let n = t.len();
        let mut parent = NONE;
        let mut pos = 0usize;
        let end = loop {
            if pos == n {
                break parent;
            }
            let Some(&c) = child.get(&(parent, t[pos])) else {
                let id = bnodes.len() as u32;
                bnodes.push(BuildNode {
                    seq: si as u32,
                    start: pos as u32,
                    len: (n - pos) as u32,
                    parent,
                });
                child.insert((parent, t[pos]), id);
                break id;
            };
            let bn = bnodes[c as usize];
            let seg =
                &sequences[bn.seq as usize].tokens[bn.start as usize..(bn.start + bn.len) as usize];
            let k = seg
                .iter()
                .zip(&t[pos..])
                .take_while(|(a, b)| a == b)
                .count();
            if k < seg.len() {
                // Split: a new head node takes the first k tokens; `c` keeps the tail and its children.
                let head = bnodes.len() as u32;
                bnodes.push(BuildNode {
                    seq: bn.seq,
                    start: bn.start,
                    len: k as u32,
                    parent: bn.parent,
                });
                child.insert((bn.parent, seg[0]), head);
                child.insert((head, seg[k]), c);
                let cn = &mut bnodes[c as usize];
                cn.start += k as u32;
                cn.len -= k as u32;
                cn.parent = head;
                parent = head;
            } else {
                parent = c;
            }
            pos += k;
        };
        leaf_end.push(end);
    }
    (bnodes, leaf_end)
}

/// The build nodes in DFS pre-order.
struct Preorder {
    /// Build node ids in pre-order (the final node `i` is build node `order[i]`).
    order: Vec<u32>,
    /// Final id of each build node.
    new_id: Vec<u32>,
    /// Children of each build node, in order of first appearance.
    kids: Vec<Vec<u32>>,
}

/// Step 2: orders children by first appearance in the input, then numbers nodes in DFS pre-order.
fn preorder(bnodes: &[BuildNode], leaf_end: &[u32]) -> Preorder {
    let nb = bnodes.len();
    let mut first_leaf = vec![NONE; nb];
    let mut roots: Vec<u32> = Vec::new();
    let mut kids: Vec<Vec<u32>> = vec![Vec::new(); nb];
    for (k, &e) in leaf_end.iter().enumerate() {
        let mut u = e;
        while u != NONE && first_leaf[u as usize] == NONE {
            first_leaf[u as usize] = k as u32;
            let p = bnodes[u as usize].parent;
            if p == NONE {
                roots.push(u);
            } else {
                kids[p as usize].push(u);
            }
            u = p;
        }
    }
    // Leaves are visited in input order and a node is pushed to its parent's list when its first leaf
    // is seen, so every child list (and `roots`) is already in order of first appearance.

    let mut order: Vec<u32> = Vec::with_capacity(nb);
    let mut new_id = vec![NONE; nb];
    let mut stack: Vec<u32> = roots.iter().rev().copied().collect();
    while let Some(u) = stack.pop() {
        new_id[u as usize] = order.len() as u32;
        order.push(u);
        stack.extend(kids[u as usize].iter().rev());
    }
    Preorder {
        order,
        new_id,
        kids,
    }
}

/// Step 3: the final nodes (tokens copied once, per-token values still empty) and leaves, with every
/// node's list of the paths through it.
fn materialize(
    sequences: &[Sequence],
    bnodes: &[BuildNode],
    leaf_end: &[u32],
    pre: &Preorder,
) -> (Vec<Node>, Vec<Leaf>) {
    let Preorder {
        order,
        new_id,
        kids,
    } = pre;
    let mut nodes: Vec<Node> = order
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let bn = bnodes[b as usize];
            let s = &sequences[bn.seq as usize];
            let r = bn.start as usize..(bn.start + bn.len) as usize;
            Node {
                id: i as u32,
                parent: (bn.parent != NONE).then(|| new_id[bn.parent as usize]),
                depth: bn.start,
                tokens: s.tokens[r].to_vec(),
                loss_mask: Vec::new(),
                logprobs: Vec::new(),
                turns: Vec::new(),
                leaves: Vec::new(),
                children: kids[b as usize]
                    .iter()
                    .map(|&c| new_id[c as usize])
                    .collect(),
                subtree_end: 0,
            }
        })
        .collect();
    let mut leaves: Vec<Leaf> = Vec::with_capacity(sequences.len());
    for (k, s) in sequences.iter().enumerate() {
        let node = new_id[leaf_end[k] as usize];
        let mut u = Some(node);
        while let Some(x) = u {
            nodes[x as usize].leaves.push(k as u32);
            u = nodes[x as usize].parent;
        }
        leaves.push(Leaf {
            id: s.id.clone(),
            node,
            len: s.tokens.len() as u32,
            reward: s.reward,
            advantage: s.advantage,
            group: s.group.clone(),
            overrides: Vec::new(),
        });
    }
    (nodes, leaves)
}

/// Step 4: each node's canonical mask/logprob/turn (see the crate docs, "Merging rule") and each
/// path's overrides where its own values differ.
fn canonicalize(sequences: &[Sequence], nodes: &mut [Node], leaves: &mut [Leaf]) {
    for node in nodes.iter_mut() {
        let d = node.depth as usize;
        let n = node.tokens.len();
        // Canonical values: mask = OR; logprob/turn from the first path that trains the token, else
        // from the first path through it.
        let first = &sequences[node.leaves[0] as usize];
        let mut mask: Vec<bool> = (0..n).map(|i| first.mask_at(d + i)).collect();
        let mut lp: Vec<f32> = (0..n).map(|i| first.logprob_at(d + i)).collect();
        let mut tu: Vec<u32> = (0..n).map(|i| first.turn_at(d + i)).collect();
        if node.leaves.len() > 1 && mask.iter().any(|m| !m) {
            for &k in &node.leaves[1..] {
                let s = &sequences[k as usize];
                for i in 0..n {
                    if !mask[i] && s.mask_at(d + i) {
                        mask[i] = true;
                        lp[i] = s.logprob_at(d + i);
                        tu[i] = s.turn_at(d + i);
                    }
                }
            }
        }
        for &k in &node.leaves {
            let s = &sequences[k as usize];
            for i in 0..n {
                let (m, l, t) = (s.mask_at(d + i), s.logprob_at(d + i), s.turn_at(d + i));
                if m != mask[i] || l.to_bits() != lp[i].to_bits() || t != tu[i] {
                    leaves[k as usize].overrides.push(TokenOverride {
                        pos: (d + i) as u32,
                        loss_mask: m,
                        logprob: l,
                        turn: t,
                    });
                }
            }
        }
        node.loss_mask = mask;
        node.logprobs = lp;
        node.turns = tu;
    }
    // Nodes are visited in pre-order (increasing depth along each path), so overrides come out sorted.
}
