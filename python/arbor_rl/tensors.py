"""A pack as torch tensors: the model inputs, the tree relation and the per-path RL fields."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .data import Pack


@dataclass
class PackTensors:
    """The tensors of one pack (`T` tokens, `K` paths, `N` path positions), on one device.

    Index tensors are int64 (what torch's indexing wants); the pack file stores int32.
    """

    input_ids: torch.Tensor  # [T] token ids
    position_ids: torch.Tensor  # [T] depth on the path (RoPE positions)
    parent: torch.Tensor  # [T] predecessor on the path, -1 at a root
    subtree_end: torch.Tensor  # [T] key j visible to query i iff j <= i < subtree_end[j]
    loss_weight: torch.Tensor  # [T] w_t (SFT / token-linear losses), float32
    leaf_count: torch.Tensor  # [T] g_t, paths of the pack through the token
    path_index: torch.Tensor  # [N] flat index of each path position
    path_offsets: torch.Tensor  # [K+1] path k is path_index[off[k]:off[k+1]]
    path_of: torch.Tensor  # [N] path of each position
    path_loss_mask: torch.Tensor  # [N] bool, each path's own loss mask
    path_logprobs: torch.Tensor  # [N] float32, behaviour log-probabilities
    path_turns: torch.Tensor  # [N] turn ids
    path_advantage: torch.Tensor  # [K] float32, NaN when absent
    path_weight: torch.Tensor  # [K] c_k = 1 / num_paths_total (the step's mean over paths)
    meta: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_paths(self) -> int:
        return int(self.path_offsets.shape[0]) - 1

    def path(self, k: int) -> torch.Tensor:
        """Flat indices of path `k`, in path order."""
        return self.path_index[self.path_offsets[k] : self.path_offsets[k + 1]]

    def to(self, device: torch.device | str) -> "PackTensors":
        """A copy on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return PackTensors(**moved, meta=self.meta)


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))


def pack_tensors(pack: Pack, device: torch.device | str = "cpu") -> PackTensors:
    """Turns a pack (from `build_packs` / `read_pack`) into torch tensors on `device`.

    Paths get weight `1 / num_paths_total`, the `c_k` of `arbor-train`'s `RlBatch::from_pack`:
    the losses of all packs of a step add up to the mean over the step's paths.
    """
    a = pack.arrays
    off = _long(a["path_offsets"])
    k = off.shape[0] - 1
    lengths = off[1:] - off[:-1]
    total = int(pack.meta["num_paths_total"])
    if total < k or total == 0:
        raise ValueError(f"pack has {k} paths but num_paths_total = {total}")
    t = PackTensors(
        input_ids=_long(a["input_ids"]),
        position_ids=_long(a["position_ids"]),
        parent=_long(a["parent"]),
        subtree_end=_long(a["subtree_end"]),
        loss_weight=torch.from_numpy(a["loss_weight"].astype(np.float32)),
        leaf_count=_long(a["leaf_count"]),
        path_index=_long(a["path_index"]),
        path_offsets=off,
        path_of=torch.repeat_interleave(torch.arange(k), lengths),
        path_loss_mask=torch.from_numpy(a["path_loss_mask"].astype(bool)),
        path_logprobs=torch.from_numpy(a["path_logprobs"].astype(np.float32)),
        path_turns=_long(a["path_turns"]),
        path_advantage=torch.from_numpy(a["path_advantage"].astype(np.float32)),
        path_weight=torch.full((k,), 1.0 / total, dtype=torch.float32),
        meta=pack.meta,
    )
    return t.to(device) if str(device) != "cpu" else t


def path_tensors(pt: PackTensors, k: int) -> PackTensors:
    """Path `k` of a pack laid out alone (a plain causal sequence), with its own RL fields and
    weight: the per-path computation the tree must equal (tests and the benchmark's baseline).
    `loss_weight` is path `k`'s share of the pack's token-mean SFT weights: `c = 1/M`."""
    idx = pt.path(k)
    n = idx.shape[0]
    dev = idx.device
    lo, hi = int(pt.path_offsets[k]), int(pt.path_offsets[k + 1])
    mask = pt.path_loss_mask[lo:hi]
    m_total = int(pt.meta["loss_tokens_total"])
    return PackTensors(
        input_ids=pt.input_ids[idx],
        position_ids=torch.arange(n, device=dev),
        parent=torch.arange(n, device=dev) - 1,
        subtree_end=torch.full((n,), n, device=dev),
        loss_weight=mask.float() / max(m_total, 1),
        leaf_count=torch.ones(n, dtype=torch.long, device=dev),
        path_index=torch.arange(n, device=dev),
        path_offsets=torch.tensor([0, n], device=dev),
        path_of=torch.zeros(n, dtype=torch.long, device=dev),
        path_loss_mask=mask,
        path_logprobs=pt.path_logprobs[lo:hi],
        path_turns=pt.path_turns[lo:hi],
        path_advantage=pt.path_advantage[k : k + 1],
        path_weight=pt.path_weight[k : k + 1],
        meta={**pt.meta, "path_ids": [pt.meta["path_ids"][k]]},
    )


def unshared(pt: PackTensors, paths: list[int]) -> PackTensors:
    """`paths` of a pack laid out one after another with no prefix shared (each a causal run of
    its own): what training without a tree computes, through the same model call. The
    per-path baseline of the benchmark."""
    idx = torch.cat([pt.path(k) for k in paths])
    lens = torch.tensor([int(pt.path_offsets[k + 1] - pt.path_offsets[k]) for k in paths])
    starts = torch.cumsum(lens, 0) - lens
    n = int(lens.sum())
    path_of = torch.repeat_interleave(torch.arange(len(paths)), lens)
    pos = torch.arange(n) - starts[path_of]
    ends = (starts + lens)[path_of]
    entries = torch.cat([torch.arange(int(pt.path_offsets[k]), int(pt.path_offsets[k + 1])) for k in paths])
    dev = pt.input_ids.device
    sel = torch.tensor(paths)
    return PackTensors(
        input_ids=pt.input_ids[idx],
        position_ids=pos.to(dev),
        parent=torch.where(pos == 0, -1, torch.arange(n) - 1).to(dev),
        subtree_end=ends.to(dev),
        loss_weight=torch.zeros(n, device=dev),
        leaf_count=torch.ones(n, dtype=torch.long, device=dev),
        path_index=torch.arange(n, device=dev),
        path_offsets=torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)]).to(dev),
        path_of=path_of.to(dev),
        path_loss_mask=pt.path_loss_mask[entries.to(dev)],
        path_logprobs=pt.path_logprobs[entries.to(dev)],
        path_turns=pt.path_turns[entries.to(dev)],
        path_advantage=pt.path_advantage[sel.to(dev)],
        path_weight=pt.path_weight[sel.to(dev)],
        meta={**pt.meta, "path_ids": [pt.meta["path_ids"][k] for k in paths]},
    )
