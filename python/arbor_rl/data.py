"""Sequences in, packs out: the Python side of `arbor-tree`.

Every tree, packing and loss-weight computation runs in Rust (`arbor_rl._native`, the same code
`arbor tree pack` and `arbor-train` use). Sequences cross as JSONL text (the `Sequence` format of
docs/tree-training.md), packs come back as `arbor-pack/1` pack-file bytes plus their metadata, so
a pack built here is byte for byte a pack file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence as Seq

import numpy as np
from safetensors.numpy import load as _load_numpy

from . import _native

PACK_FORMAT: str = _native.PACK_FORMAT

_INT_FIELDS = ("tokens", "turns")


@dataclass
class Pack:
    """One pack: its arrays (numpy, as stored in the pack file) and its `arbor` metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    raw: bytes = field(repr=False)

    @property
    def num_tokens(self) -> int:
        """`T`, the tokens laid out in this pack."""
        return int(self.arrays["input_ids"].shape[0])

    @property
    def num_paths(self) -> int:
        """`K` of this pack (paths it trains)."""
        return int(self.arrays["path_offsets"].shape[0]) - 1

    def save(self, path: str | os.PathLike) -> None:
        """Writes the pack file (readable by `arbor` and by `read_pack`)."""
        with open(path, "wb") as f:
            f.write(self.raw)


@dataclass
class Packing:
    """The packs of one optimizer step and the statistics of their packing (POR, ERR, ...)."""

    packs: list[Pack]
    stats: dict[str, Any]


def _pack(raw: bytes, meta: str) -> Pack:
    return Pack(arrays=_load_numpy(raw), meta=json.loads(meta), raw=raw)


def _check_sequence(n: int, s: Mapping[str, Any]) -> dict[str, Any]:
    if "id" not in s or "tokens" not in s:
        raise ValueError(f"sequence {n + 1}: needs at least 'id' and 'tokens'")
    out = dict(s)
    for key in _INT_FIELDS:
        if key in out and out[key] is not None:
            out[key] = [int(x) for x in out[key]]
    if out.get("loss_mask") is not None:
        out["loss_mask"] = [bool(x) for x in out["loss_mask"]]
    if out.get("logprobs") is not None:
        out["logprobs"] = [float(x) for x in out["logprobs"]]
    for key in ("reward", "advantage"):
        v = out.get(key)
        if v is not None and not math.isfinite(float(v)):
            raise ValueError(f"sequence {out['id']}: {key} must be finite, got {v}")
    return out


def sequences_to_jsonl(sequences: Iterable[Mapping[str, Any]]) -> str:
    """Serializes Python sequences (dicts with `id`, `tokens` and optionally `loss_mask`,
    `logprobs`, `turns`, `reward`, `advantage`, `group`) as JSONL. numpy/torch scalars are
    converted; Rust validates the result when it is packed."""
    lines = [json.dumps(_check_sequence(n, s)) for n, s in enumerate(sequences)]
    return "".join(line + "\n" for line in lines)


def load_sequences(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads sequences from a JSONL file, a directory of them, or a gateway tree document
    (`GET /sessions/{id}/tree`, a `.json` file), as Python dicts."""
    return [json.loads(line) for line in _native.load_sequences(os.fspath(path)).splitlines()]


def gateway_sequences(store: str | os.PathLike) -> list[dict[str, Any]]:
    """Every session of a gateway store directory, as sequences (one per recorded call)."""
    return [json.loads(line) for line in _native.gateway_sequences(os.fspath(store)).splitlines()]


def tree_stats(sequences: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """POR, ideal speedup and sizes of the tree of `sequences` (as `arbor tree stats`)."""
    return json.loads(_native.tree_stats(sequences_to_jsonl(sequences)))


def build_packs(
    sequences: Iterable[Mapping[str, Any]] | str | os.PathLike,
    budget: int,
    *,
    strategy: str = "greedy",
    normalization: str = "token_mean",
    oversize: str = "dedicated",
) -> Packing:
    """Builds the tree of `sequences` and packs it into packs of at most `budget` tokens.

    `sequences` is a list of sequence dicts, or a path accepted by `load_sequences`. `strategy`
    is `greedy` or `single_path_dp`; `normalization` (of each pack's `loss_weight`) is
    `token_mean`, `path_sum` or `sequence_mean`; `oversize` is `dedicated` or `error`. The
    weights use the normalizer of all packs together, so the packs' losses add up to the loss of
    the step.
    """
    if isinstance(sequences, (str, os.PathLike)):
        jsonl = _native.load_sequences(os.fspath(sequences))
    else:
        jsonl = sequences_to_jsonl(sequences)
    packs, stats = _native.pack_sequences(jsonl, int(budget), strategy, normalization, oversize)
    return Packing(packs=[_pack(raw, meta) for raw, meta in packs], stats=json.loads(stats))


def read_pack(path: str | os.PathLike) -> Pack:
    """Reads and validates a pack file written by `arbor tree pack` (or `Pack.save`)."""
    raw, meta = _native.read_pack(os.fspath(path))
    return _pack(raw, meta)


def read_packs(directory: str | os.PathLike) -> list[Pack]:
    """Every `pack-*.safetensors` of a directory written by `arbor tree pack`, in order."""
    names = sorted(
        n for n in os.listdir(directory) if n.startswith("pack-") and n.endswith(".safetensors")
    )
    if not names:
        raise FileNotFoundError(f"no pack-*.safetensors in {os.fspath(directory)}")
    return [read_pack(os.path.join(directory, n)) for n in names]


def synthetic_sequences(
    por: float,
    flat_tokens: int,
    *,
    shape: str = "group",
    samples_per_group: int = 8,
    seq_len: int = 512,
    seed: int = 0,
    vocab_size: int = 32_000,
) -> list[dict[str, Any]]:
    """Synthetic trajectories with a target POR (arbor-tree's generators): `shape="group"`
    (tasks sampled `samples_per_group` times) or `"multi_turn"` (branching episodes)."""
    if shape == "group":
        text = _native.synthetic_group_sampling(
            por, flat_tokens, samples_per_group, seq_len, seed, vocab_size
        )
    elif shape == "multi_turn":
        text = _native.synthetic_multi_turn(por, flat_tokens, seq_len, seed, vocab_size)
    else:
        raise ValueError(f"unknown synthetic shape {shape!r} (expected group or multi_turn)")
    return [json.loads(line) for line in text.splitlines()]


def with_advantages(
    sequences: Seq[Mapping[str, Any]], advantages: Seq[float]
) -> list[dict[str, Any]]:
    """Copies of `sequences` with their `advantage` set (one per sequence)."""
    if len(advantages) != len(sequences):
        raise ValueError(f"{len(advantages)} advantages for {len(sequences)} sequences")
    return [dict(s, advantage=float(a)) for s, a in zip(sequences, advantages)]
