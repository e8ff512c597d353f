"""arbor_rl: tree training for PyTorch trainers.

arbor merges trajectories that share prefixes into packed trees (`arbor-tree`, in Rust, called
through `arbor_rl._native`). This package turns those packs into torch tensors, builds the tree
attention mask (FlexAttention block mask or a dense SDPA mask), computes the per-path RL
objectives of `arbor-train` in torch, and runs a packed tree through Hugging Face Qwen3 /
Qwen3-MoE models. See docs/tree-training.md.

`torch` is imported lazily by the submodules that need it, so `arbor_rl.data` works with numpy
alone.
"""

from .data import (
    PACK_FORMAT,
    Pack,
    Packing,
    build_packs,
    gateway_sequences,
    load_sequences,
    read_pack,
    read_packs,
    sequences_to_jsonl,
    synthetic_sequences,
    tree_stats,
    with_advantages,
)

__all__ = [
    "PACK_FORMAT",
    "Pack",
    "Packing",
    "build_packs",
    "gateway_sequences",
    "load_sequences",
    "read_pack",
    "read_packs",
    "sequences_to_jsonl",
    "synthetic_sequences",
    "tree_stats",
    "with_advantages",
]
