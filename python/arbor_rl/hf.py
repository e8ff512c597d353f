"""Hugging Face `transformers` drop-in: run a packed tree through a Qwen3 (or Qwen3-MoE, or any
Llama-style causal LM whose attention honours a prepared 4D mask / BlockMask) model.

The model is unchanged: the tree enters as `position_ids` (each token's depth, for RoPE) and a
prepared attention mask, which `transformers` passes to the attention kernel as is:

- `backend="sdpa"` (model loaded with `attn_implementation="sdpa"`): a dense `[1, 1, T, T]` bool
  mask, for small packs and CPU;
- `backend="flex"` (`attn_implementation="flex_attention"`): a FlexAttention `BlockMask`, whose
  sparsity skips the blocks no query sees (GPU, real pack sizes; torch has no FlexAttention
  backward on CPU).

Only the rows whose next token is trained go through the vocabulary projection. MoE routing is
per token, so it is exact too; the router's load-balancing loss counts tokens, so
`moe_balance_loss` weights token `t` by `leaf_count[t]` to keep its per-path meaning.
"""

from __future__ import annotations

import torch

from .attention import dense_tree_mask, tree_block_mask
from .losses import next_token_logprobs, trained_tokens
from .tensors import PackTensors


def tree_attention_mask(pt: PackTensors, backend: str = "sdpa", block_size: int = 128):
    """The prepared attention mask of a pack for `backend` (`sdpa` or `flex`)."""
    if backend == "sdpa":
        return dense_tree_mask(pt.subtree_end)[None, None]
    if backend == "flex":
        return tree_block_mask(pt.subtree_end, block_size=block_size, compile=pt.input_ids.is_cuda)
    raise ValueError(f"unknown attention backend {backend!r} (expected sdpa or flex)")


def tree_forward(model, pt: PackTensors, backend: str = "sdpa", mask=None, router_logits=False):
    """A pack through `model.model` (the decoder stack): the model output, with the MoE routers'
    logits (`.router_logits`, one `[T, experts]` tensor per layer) when `router_logits`."""
    if mask is None:
        mask = tree_attention_mask(pt, backend)
    extra = {"output_router_logits": True} if router_logits else {}
    return model.model(
        input_ids=pt.input_ids[None],
        position_ids=pt.position_ids[None],
        attention_mask=mask,
        use_cache=False,
        **extra,
    )


def tree_hidden_states(model, pt: PackTensors, backend: str = "sdpa", mask=None) -> torch.Tensor:
    """`[T, hidden]` last hidden states of a pack through `model.model` (the decoder stack)."""
    return tree_forward(model, pt, backend, mask).last_hidden_state[0]


def moe_balance_loss(model, router_logits, pt: PackTensors) -> torch.Tensor:
    """The MoE load-balancing loss of a pack with its per-path meaning: token `t` counts
    `leaf_count[t]` times (once per path through it), as if every path had been run alone.
    `router_logits` come from `tree_forward(..., router_logits=True)`. Like arbor-train's
    `AuxStats`, it is a product of means, not additive over packs: for a step of several packs,
    weight and average the router statistics over all of them."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    cfg = model.config
    weights = pt.leaf_count.to(torch.float32)[None]
    return load_balancing_loss_func(
        tuple(router_logits), cfg.num_experts, cfg.num_experts_per_tok, attention_mask=weights
    )


def tree_logprobs(
    model,
    pt: PackTensors,
    *,
    temperature: float = 1.0,
    backend: str = "sdpa",
    mask=None,
    wanted: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[T]` log-probabilities of a pack's tokens under `model` (0 where not `wanted`; by
    default the tokens some path trains). Differentiable: feed them to `arbor_rl.losses`."""
    h = tree_hidden_states(model, pt, backend, mask)
    want = trained_tokens(pt) if wanted is None else wanted
    return next_token_logprobs(
        lambda rows: model.lm_head(h[rows]), pt.input_ids, pt.parent, want, temperature
    )


def path_logprobs(model, pt: PackTensors, *, temperature: float = 1.0) -> torch.Tensor:
    """The same for a single-path layout (`tensors.path_tensors`), run causally without a tree
    mask: the per-path baseline."""
    out = model.model(input_ids=pt.input_ids[None], position_ids=pt.position_ids[None], use_cache=False)
    h = out.last_hidden_state[0]
    return next_token_logprobs(
        lambda rows: model.lm_head(h[rows]), pt.input_ids, pt.parent, trained_tokens(pt), temperature
    )


def tiny_config(kind: str = "qwen3", vocab_size: int = 512, **overrides):
    """A small random-init config (nothing is downloaded): `qwen3` or `qwen3_moe`."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
        moe.update({k: v for k, v in overrides.items() if k in moe})
        return Qwen3MoeConfig(**{**common, **moe})
    raise ValueError(f"unknown model kind {kind!r} (expected qwen3 or qwen3_moe)")


def qwen3_0_6b_config(vocab_size: int = 151_936):
    """Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128), random init."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
        rope_theta=1_000_000,
    )


def build_model(config, backend: str = "sdpa", dtype=torch.float32, device="cpu", seed: int = 0):
    """A randomly initialised causal LM for `config` with the attention kernel of `backend`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    impl = {"sdpa": "sdpa", "flex": "flex_attention"}[backend]
    extra = {}
    if getattr(config, "num_experts", None):
        # The grouped-GEMM expert kernel has no float64; the loop over experts is exact anywhere.
        extra["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=dtype, **extra)
    return model.to(device)
