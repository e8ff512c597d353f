//! Pack files: one [`Pack`] per safetensors file, readable from NumPy/PyTorch without arbor.
//!
//! Tensors (all one-dimensional, little-endian; `T` = pack tokens, `S` = segments (tree nodes laid out),
//! `K` = paths, `N` = sum of path lengths):
//!
//! | name | dtype | shape | meaning |
//! |---|---|---|---|
//! | `input_ids` | I32 | T | token ids |
//! | `position_ids` | I32 | T | depth on the path (RoPE positions) |
//! | `parent` | I32 | T | previous token on the path, `-1` at a root |
//! | `subtree_end` | I32 | T | `j` visible to `i` iff `j <= i < subtree_end[j]` |
//! | `loss_weight` | F32 | T | `w_t` (see metadata `normalization`): `loss = sum(w * token_loss)` |
//! | `loss_mask` | BOOL | T | canonical loss mask: some path of the pack trains the token |
//! | `logprobs` | F32 | T | canonical behaviour logprobs (of a pack path that trains the token) |
//! | `turns` | I32 | T | canonical turn index |
//! | `leaf_count` | I32 | T | `g_t`: paths of this pack through the token |
//! | `advantage` | F32 | T | advantage shared by every path through the token, `NaN` if they differ |
//! | `segment_start` | I32 | S | first token of each laid-out node |
//! | `segment_node` | I32 | S | node id of each segment in the source tree |
//! | `path_offsets` | I32 | K+1 | path `k` is `path_index[path_offsets[k]:path_offsets[k+1]]` |
//! | `path_index` | I32 | N | gather indices: flat token index of each path position |
//! | `path_loss_mask` | BOOL | N | each path's own loss mask, aligned with `path_index` |
//! | `path_logprobs` | F32 | N | each path's own behaviour logprobs |
//! | `path_turns` | I32 | N | each path's own turn indices |
//! | `path_advantage` | F32 | K | advantage of each path (`NaN` if none) |
//! | `path_reward` | F32 | K | reward of each path (`NaN` if none) |
//!
//! The header metadata holds `"format": "pt"` and `"arbor"`: the JSON of [`PackMeta`].

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TreeError};
use crate::flat::{FlatOverride, FlatPath, FlatSegment, FlatTree};
use crate::pack::Pack;
use crate::weights::{LossNormalization, Normalizer};

/// The `format` string of [`PackMeta`].
pub const PACK_FORMAT: &str = "arbor-pack/1";

/// One path of a pack, in the pack metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackPathMeta {
    /// Sequence id.
    pub id: String,
    /// Leaf index in the source tree (= index of the input sequence).
    pub leaf: u32,
    /// Tree id (root node id in the source tree).
    pub tree: u32,
    /// Reward.
    pub reward: Option<f64>,
    /// Advantage.
    pub advantage: Option<f64>,
    /// Sampling group.
    pub group: Option<String>,
}

/// The JSON metadata stored under the `arbor` key of a pack file's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackMeta {
    /// Always [`PACK_FORMAT`].
    pub format: String,
    /// Pack index in its packing.
    pub index: u32,
    /// Token budget per pack.
    pub budget: u64,
    /// `true` if this pack holds a single path longer than the budget.
    pub oversized: bool,
    /// Loss normalization of `loss_weight`.
    pub normalization: LossNormalization,
    /// `K` of the whole packing (all packs), used for `loss_weight`.
    pub num_paths_total: u64,
    /// `M` (flat loss tokens) of the whole packing, used for `loss_weight`.
    pub loss_tokens_total: u64,
    /// Tree ids present in the pack.
    pub tree_ids: Vec<u32>,
    /// Path ids, in pack order.
    pub path_ids: Vec<String>,
    /// Per-path details, in pack order.
    pub paths: Vec<PackPathMeta>,
}

impl Pack {
    /// The metadata written to this pack's file.
    pub fn meta(&self) -> PackMeta {
        PackMeta {
            format: PACK_FORMAT.to_string(),
            index: self.index,
            budget: self.budget,
            oversized: self.oversized,
            normalization: self.normalization,
            num_paths_total: self.normalizer.num_paths,
            loss_tokens_total: self.normalizer.loss_tokens,
            tree_ids: self.tree_ids(),
            path_ids: self.path_ids(),
            paths: self
                .flat
                .paths
                .iter()
                .map(|p| PackPathMeta {
                    id: p.id.clone(),
                    leaf: p.leaf,
                    tree: p.tree,
                    reward: p.reward,
                    advantage: p.advantage,
                    group: p.group.clone(),
                })
                .collect(),
        }
    }
}

fn i32s(what: &str, v: impl IntoIterator<Item = u32>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for x in v {
        let x = i32::try_from(x)
            .map_err(|_| TreeError::TooLarge(format!("{what} value {x} does not fit in int32")))?;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

fn i32s_signed(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bools(v: impl IntoIterator<Item = bool>) -> Vec<u8> {
    v.into_iter().map(u8::from).collect()
}

fn st_err(e: impl std::fmt::Display) -> TreeError {
    TreeError::Safetensors(e.to_string())
}

/// Writes `pack` to `path` as a safetensors file (see the module docs for the layout).
pub fn write_pack(path: &Path, pack: &Pack) -> Result<()> {
    let bytes = pack_to_bytes(pack)?;
    std::fs::write(path, bytes).map_err(|e| TreeError::io(path, e))
}

/// A tensor to write: name, dtype, length, little-endian bytes.
type Tensor = (&'static str, Dtype, usize, Vec<u8>);

/// Encodes `pack` as the bytes of a safetensors file.
pub fn pack_to_bytes(pack: &Pack) -> Result<Vec<u8>> {
    let t = pack.flat.len();
    if pack.loss_weight.len() != t || pack.advantage.len() != t {
        return Err(TreeError::invalid(
            "pack",
            "loss_weight and advantage must have one entry per token",
        ));
    }
    let mut data = token_tensors(pack)?;
    data.extend(path_tensors(&pack.flat)?);
    let mut views = Vec::with_capacity(data.len());
    for (name, dtype, n, bytes) in &data {
        views.push((
            *name,
            TensorView::new(*dtype, vec![*n], bytes).map_err(st_err)?,
        ));
    }
    let meta_json = serde_json::to_string(&pack.meta())
        .map_err(|e| TreeError::invalid("pack metadata", e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("arbor".to_string(), meta_json);
    safetensors::serialize(views, Some(meta)).map_err(st_err)
}

/// The per-token tensors (length `T`) and the segment tensors (length `S`).
fn token_tensors(pack: &Pack) -> Result<Vec<Tensor>> {
    let f = &pack.flat;
    let t = f.len();
    Ok(vec![
        (
            "input_ids",
            Dtype::I32,
            t,
            i32s("token id", f.input_ids.iter().copied())?,
        ),
        (
            "position_ids",
            Dtype::I32,
            t,
            i32s("position", f.position_ids.iter().copied())?,
        ),
        ("parent", Dtype::I32, t, i32s_signed(&f.parent)),
        (
            "subtree_end",
            Dtype::I32,
            t,
            i32s("subtree end", f.subtree_end.iter().copied())?,
        ),
        (
            "loss_weight",
            Dtype::F32,
            t,
            f32s(pack.loss_weight.iter().copied()),
        ),
        (
            "loss_mask",
            Dtype::BOOL,
            t,
            bools(f.loss_mask.iter().copied()),
        ),
        ("logprobs", Dtype::F32, t, f32s(f.logprobs.iter().copied())),
        (
            "turns",
            Dtype::I32,
            t,
            i32s("turn", f.turns.iter().copied())?,
        ),
        (
            "leaf_count",
            Dtype::I32,
            t,
            i32s("leaf count", f.leaf_count.iter().copied())?,
        ),
        (
            "advantage",
            Dtype::F32,
            t,
            f32s(pack.advantage.iter().copied()),
        ),
        (
            "segment_start",
            Dtype::I32,
            f.segments.len(),
            i32s("segment", f.segments.iter().map(|s| s.start))?,
        ),
        (
            "segment_node",
            Dtype::I32,
            f.segments.len(),
            i32s("node id", f.segments.iter().map(|s| s.node))?,
        ),
    ])
}

/// The per-path tensors: gather offsets and indices, each path's own values, advantages and rewards.
fn path_tensors(f: &FlatTree) -> Result<Vec<Tensor>> {
    let gather = f.path_gather();
    let k = f.paths.len();
    let mut path_mask = Vec::with_capacity(gather.indices.len());
    let mut path_lp = Vec::with_capacity(gather.indices.len());
    let mut path_turns = Vec::with_capacity(gather.indices.len());
    for i in 0..k {
        path_mask.extend(f.path_loss_mask(i));
        path_lp.extend(f.path_logprobs(i));
        path_turns.extend(f.path_turns(i));
    }
    let opt = |x: Option<f64>| x.map_or(f32::NAN, |v| v as f32);
    Ok(vec![
        (
            "path_offsets",
            Dtype::I32,
            k + 1,
            i32s("path offset", gather.offsets.iter().copied())?,
        ),
        (
            "path_index",
            Dtype::I32,
            gather.indices.len(),
            i32s("path index", gather.indices.iter().copied())?,
        ),
        (
            "path_loss_mask",
            Dtype::BOOL,
            path_mask.len(),
            bools(path_mask),
        ),
        ("path_logprobs", Dtype::F32, path_lp.len(), f32s(path_lp)),
        (
            "path_turns",
            Dtype::I32,
            path_turns.len(),
            i32s("turn", path_turns)?,
        ),
        (
            "path_advantage",
            Dtype::F32,
            k,
            f32s(f.paths.iter().map(|p| opt(p.advantage))),
        ),
        (
            "path_reward",
            Dtype::F32,
            k,
            f32s(f.paths.iter().map(|p| opt(p.reward))),
        ),
    ])
}

/// Reads a pack file written by [`write_pack`], validating its structure.
pub fn read_pack(path: &Path) -> Result<Pack> {
    let bytes = std::fs::read(path).map_err(|e| TreeError::io(path, e))?;
    pack_from_bytes(&bytes)
}

struct Reader<'a> {
    st: SafeTensors<'a>,
}

impl Reader<'_> {
    fn raw(&self, name: &str, dtype: Dtype) -> Result<Vec<u8>> {
        let t = self
            .st
            .tensor(name)
            .map_err(|e| TreeError::invalid("pack file", format!("tensor {name}: {e}")))?;
        if t.dtype() != dtype || t.shape().len() != 1 {
            return Err(TreeError::invalid(
                "pack file",
                format!(
                    "tensor {name} must be a 1-D {dtype:?} tensor, found {:?} {:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        Ok(t.data().to_vec())
    }
    fn i32(&self, name: &str) -> Result<Vec<i32>> {
        Ok(self
            .raw(name, Dtype::I32)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn u32(&self, name: &str) -> Result<Vec<u32>> {
        self.i32(name)?
            .into_iter()
            .map(|x| {
                u32::try_from(x).map_err(|_| {
                    TreeError::invalid("pack file", format!("tensor {name} has a negative entry"))
                })
            })
            .collect()
    }
    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self
            .raw(name, Dtype::F32)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn bool(&self, name: &str) -> Result<Vec<bool>> {
        Ok(self
            .raw(name, Dtype::BOOL)?
            .into_iter()
            .map(|b| b != 0)
            .collect())
    }
}

/// A structural error in a pack file.
fn bad(reason: impl Into<String>) -> TreeError {
    TreeError::invalid("pack file", reason.into())
}

/// Decodes a pack from the bytes of a safetensors file.
pub fn pack_from_bytes(bytes: &[u8]) -> Result<Pack> {
    let meta = read_meta(bytes)?;
    let r = Reader {
        st: SafeTensors::deserialize(bytes).map_err(st_err)?,
    };
    let tok = read_token_tensors(&r)?;
    check_layout(&tok.position_ids, &tok.parent, &tok.subtree_end)?;
    let segments = read_segments(&r, &tok.parent, &tok.subtree_end)?;
    let mut flat = FlatTree {
        input_ids: tok.input_ids,
        position_ids: tok.position_ids,
        parent: tok.parent,
        subtree_end: tok.subtree_end,
        loss_mask: tok.loss_mask,
        logprobs: tok.logprobs,
        turns: tok.turns,
        leaf_count: tok.leaf_count,
        segments,
        paths: Vec::new(),
    };
    let index = read_paths(&r, &meta, &mut flat)?;
    check_leaf_count(&flat, &index)?;
    Ok(Pack {
        index: meta.index,
        budget: meta.budget,
        oversized: meta.oversized,
        flat,
        loss_weight: tok.loss_weight,
        advantage: tok.advantage,
        normalization: meta.normalization,
        normalizer: Normalizer {
            num_paths: meta.num_paths_total,
            loss_tokens: meta.loss_tokens_total,
        },
    })
}

/// The header's `arbor` metadata, of a supported format.
fn read_meta(bytes: &[u8]) -> Result<PackMeta> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("arbor"))
        .ok_or_else(|| bad("no `arbor` metadata in the header"))?;
    let meta: PackMeta =
        serde_json::from_str(meta_json).map_err(|e| bad(format!("metadata: {e}")))?;
    if meta.format != PACK_FORMAT {
        return Err(bad(format!("unsupported format {:?}", meta.format)));
    }
    Ok(meta)
}

/// The per-token tensors of a pack file.
struct TokenTensors {
    input_ids: Vec<u32>,
    position_ids: Vec<u32>,
    parent: Vec<i32>,
    subtree_end: Vec<u32>,
    loss_weight: Vec<f32>,
    loss_mask: Vec<bool>,
    logprobs: Vec<f32>,
    turns: Vec<u32>,
    leaf_count: Vec<u32>,
    advantage: Vec<f32>,
}

/// Reads the per-token tensors and checks they all have one entry per token.
fn read_token_tensors(r: &Reader<'_>) -> Result<TokenTensors> {
    let tok = TokenTensors {
        input_ids: r.u32("input_ids")?,
        position_ids: r.u32("position_ids")?,
        parent: r.i32("parent")?,
        subtree_end: r.u32("subtree_end")?,
        loss_weight: r.f32("loss_weight")?,
        loss_mask: r.bool("loss_mask")?,
        logprobs: r.f32("logprobs")?,
        turns: r.u32("turns")?,
        leaf_count: r.u32("leaf_count")?,
        advantage: r.f32("advantage")?,
    };
    let t = tok.input_ids.len();
    for (name, n) in [
        ("position_ids", tok.position_ids.len()),
        ("parent", tok.parent.len()),
        ("subtree_end", tok.subtree_end.len()),
        ("loss_weight", tok.loss_weight.len()),
        ("loss_mask", tok.loss_mask.len()),
        ("logprobs", tok.logprobs.len()),
        ("turns", tok.turns.len()),
        ("leaf_count", tok.leaf_count.len()),
        ("advantage", tok.advantage.len()),
    ] {
        if n != t {
            return Err(bad(format!("{name} has {n} entries, input_ids has {t}")));
        }
    }
    Ok(tok)
}

/// Parents point left, positions are depths, and `subtree_end` is exactly what the parent pointers
/// imply.
fn check_layout(position_ids: &[u32], parent: &[i32], subtree_end: &[u32]) -> Result<()> {
    let t = parent.len();
    for i in 0..t {
        let p = parent[i];
        if p < -1 || p >= i as i32 {
            return Err(bad(format!("parent[{i}] = {p} is not to the left")));
        }
        if (subtree_end[i] as usize) <= i || subtree_end[i] as usize > t {
            return Err(bad(format!(
                "subtree_end[{i}] = {} out of range",
                subtree_end[i]
            )));
        }
        let expected_pos = if p < 0 {
            0
        } else {
            position_ids[p as usize] + 1
        };
        if position_ids[i] != expected_pos {
            return Err(bad(format!("position_ids[{i}] is not its parent's + 1")));
        }
    }
    let mut implied: Vec<u32> = (1..=t as u32).collect();
    for i in (0..t).rev() {
        let p = parent[i];
        if p >= 0 {
            let e = implied[i];
            let pe = &mut implied[p as usize];
            *pe = (*pe).max(e);
        }
    }
    if implied != subtree_end {
        return Err(bad("subtree_end does not match the parent pointers"));
    }
    Ok(())
}

/// Reads the segments: strictly ascending starts from 0, each a run of parent-linked tokens; their
/// parent segments and subtree ends follow from the token layout.
fn read_segments(r: &Reader<'_>, parent: &[i32], subtree_end: &[u32]) -> Result<Vec<FlatSegment>> {
    let t = parent.len();
    let seg_start = r.u32("segment_start")?;
    let seg_node = r.u32("segment_node")?;
    if seg_start.len() != seg_node.len()
        || seg_start.first().is_some_and(|&s| s != 0)
        || (t > 0 && seg_start.is_empty())
        || seg_start.windows(2).any(|w| w[0] >= w[1])
        || seg_start.last().is_some_and(|&s| s as usize >= t)
    {
        return Err(bad("segment_start must be strictly ascending from 0"));
    }
    let mut segments: Vec<FlatSegment> = Vec::with_capacity(seg_start.len());
    for (s, (&start, &node)) in seg_start.iter().zip(&seg_node).enumerate() {
        let end = seg_start.get(s + 1).copied().unwrap_or(t as u32);
        for i in start + 1..end {
            if parent[i as usize] != i as i32 - 1 {
                return Err(bad(format!(
                    "token {i} is not its predecessor's child inside segment {s}"
                )));
            }
        }
        let p = parent[start as usize];
        let pseg = if p < 0 {
            -1
        } else {
            seg_start.partition_point(|&x| x as i32 <= p) as i32 - 1
        };
        segments.push(FlatSegment {
            node,
            start,
            end,
            parent: pseg,
            subtree_end: subtree_end[start as usize],
        });
    }
    Ok(segments)
}

/// Reads the path tensors into `flat.paths` (with the metadata's per-path details); returns the
/// gather indices of all paths.
fn read_paths(r: &Reader<'_>, meta: &PackMeta, flat: &mut FlatTree) -> Result<Vec<u32>> {
    let offsets = r.u32("path_offsets")?;
    let index = r.u32("path_index")?;
    let pmask = r.bool("path_loss_mask")?;
    let plp = r.f32("path_logprobs")?;
    let pturns = r.u32("path_turns")?;
    let k = meta.paths.len();
    if offsets.len() != k + 1
        || offsets[0] != 0
        || offsets.windows(2).any(|w| w[0] >= w[1])
        || offsets[k] as usize != index.len()
        || pmask.len() != index.len()
        || plp.len() != index.len()
        || pturns.len() != index.len()
    {
        return Err(bad(
            "path_offsets / path_* tensors are inconsistent with the metadata",
        ));
    }
    for (pi, pm) in meta.paths.iter().enumerate() {
        let (a, b) = (offsets[pi] as usize, offsets[pi + 1] as usize);
        let own = PathValues {
            mask: &pmask[a..b],
            logprobs: &plp[a..b],
            turns: &pturns[a..b],
        };
        let path = read_path(flat, pi, pm, &index[a..b], &own)?;
        flat.paths.push(path);
    }
    Ok(index)
}

/// One path's own per-position values, aligned with its gather indices.
struct PathValues<'a> {
    mask: &'a [bool],
    logprobs: &'a [f32],
    turns: &'a [u32],
}

/// Path `pi` from its gather indices `idx`: checks it is a root-to-token parent chain, then derives
/// its ranges and its overrides of the canonical values.
fn read_path(
    flat: &FlatTree,
    pi: usize,
    pm: &PackPathMeta,
    idx: &[u32],
    own: &PathValues<'_>,
) -> Result<FlatPath> {
    let t = flat.len();
    let mut j = idx[idx.len() - 1] as i64;
    for &x in idx.iter().rev() {
        if j != x as i64 || x as usize >= t {
            return Err(bad(format!(
                "path {pi} is not a root-to-token parent chain"
            )));
        }
        j = flat.parent[x as usize] as i64;
    }
    if j != -1 {
        return Err(bad(format!("path {pi} does not start at a root")));
    }
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &x in idx {
        match ranges.last_mut() {
            Some(r) if r.1 == x => r.1 = x + 1,
            _ => ranges.push((x, x + 1)),
        }
    }
    let mut overrides = Vec::new();
    for (q, &x) in idx.iter().enumerate() {
        let x = x as usize;
        let (m, l, tu) = (own.mask[q], own.logprobs[q], own.turns[q]);
        if m != flat.loss_mask[x]
            || l.to_bits() != flat.logprobs[x].to_bits()
            || tu != flat.turns[x]
        {
            overrides.push(FlatOverride {
                index: x as u32,
                loss_mask: m,
                logprob: l,
                turn: tu,
            });
        }
    }
    overrides.sort_by_key(|o| o.index);
    let end_segment = flat.segment_of(idx[idx.len() - 1] as usize) as u32;
    Ok(FlatPath {
        leaf: pm.leaf,
        id: pm.id.clone(),
        tree: pm.tree,
        len: idx.len() as u32,
        ranges,
        end_segment,
        reward: pm.reward,
        advantage: pm.advantage,
        group: pm.group.clone(),
        overrides,
    })
}

/// `leaf_count` must count the paths through each token.
fn check_leaf_count(flat: &FlatTree, index: &[u32]) -> Result<()> {
    let mut counts = vec![0u32; flat.len()];
    for &x in index {
        counts[x as usize] += 1;
    }
    if counts != flat.leaf_count {
        return Err(bad("leaf_count does not match the paths"));
    }
    Ok(())
}
