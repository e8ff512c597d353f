"""Tree attention for PyTorch: key `j` is visible to query `i` iff `j <= i < subtree_end[j]`.

Nodes are laid out depth-first, so a token's ancestors are to its left and a key's subtree is
the contiguous range `[j, subtree_end[j])`. Two forms of the same mask:

- `tree_block_mask`: a FlexAttention `BlockMask` (sparse: fully masked blocks are skipped), for
  real pack sizes on GPU;
- `dense_tree_mask`: a `[T, T]` bool mask for `scaled_dot_product_attention`, for small packs
  and CPU tests (it costs `T^2` bytes).

Position ids (each token's depth on its path) must go to RoPE; see `PackTensors.position_ids`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_tree_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """`[T, T]` bool mask, `True` where query `i` (row) may attend to key `j` (column)."""
    t = subtree_end.shape[0]
    i = torch.arange(t, device=subtree_end.device)
    return (i[None, :] <= i[:, None]) & (i[:, None] < subtree_end[None, :])


def tree_mask_mod(subtree_end: torch.Tensor):
    """The FlexAttention `mask_mod` of a tree (batch and head independent)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < subtree_end[kv_idx])

    return mask_mod


def tree_block_mask(subtree_end: torch.Tensor, block_size: int = 128, compile: bool = False):
    """A FlexAttention `BlockMask` for one packed tree (`B = H = 1`, broadcast over heads).

    `compile=True` builds it with a compiled kernel (faster for long packs on GPU).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    t = subtree_end.shape[0]
    return create_block_mask(
        tree_mask_mod(subtree_end),
        B=None,
        H=None,
        Q_LEN=t,
        KV_LEN=t,
        device=subtree_end.device,
        BLOCK_SIZE=block_size,
        _compile=compile,
    )


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    *,
    backend: str = "sdpa",
    block_mask=None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of `[B, H, T, D]` queries/keys/values over one packed tree.

    `backend="sdpa"` uses the dense mask; `"flex"` uses FlexAttention with `block_mask` (built
    from `subtree_end` when not given). Grouped-query attention: `k`/`v` may have fewer heads.
    """
    if backend == "sdpa":
        mask = dense_tree_mask(subtree_end)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        bm = block_mask if block_mask is not None else tree_block_mask(subtree_end)
        return flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    raise ValueError(f"unknown attention backend {backend!r} (expected sdpa or flex)")
