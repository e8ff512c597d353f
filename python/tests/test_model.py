"""A packed tree through a Hugging Face Qwen3 / Qwen3-MoE model: loss and parameter gradients
equal the per-path computation (each path run alone, causally)."""

import json
import os

import pytest
import torch

from arbor_rl import build_packs
from arbor_rl.attention import dense_tree_mask, tree_attention
from arbor_rl.hf import build_model, path_logprobs, tiny_config, tree_logprobs
from arbor_rl.losses import rl_objective, sft_loss
from arbor_rl.tensors import pack_tensors, path_tensors

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "arbor-train", "tests", "data", "golden")
SEQUENCES = json.load(open(os.path.join(GOLDEN, "golden.json")))["sequences"]


def near_behaviour(pt, model):
    """Behaviour log-probabilities near the model's own, so IcePop keeps most tokens (and masks
    a few): per path entry, the current value plus a deterministic offset."""
    with torch.no_grad():
        lp = tree_logprobs(model, pt)
    n = pt.path_index.shape[0]
    offset = torch.tensor([[-1.0, -0.2, 0.0, 0.1, 0.3, 0.9][i % 6] for i in range(n)], dtype=lp.dtype)
    pt.path_logprobs = (lp[pt.path_index] + 0.4 * offset * (1 + pt.path_of)).float()
    return pt


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


MASKED = []


def objective(lp, pt, kind):
    if kind == "sft":
        return sft_loss(lp, pt)
    total, info = rl_objective(lp, pt, expert_logprobs=lp.detach() - 0.1, distill_coef=0.5,
                               reference_logprobs=lp.detach() + 0.05, kl_coef=0.1)
    MASKED.append(info["gspo_stats"]["masked_tokens"])
    return total


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("kind", ["rl", "sft"])
def test_tree_equals_per_path(arch, kind):
    # Larger initial weights than a pretrained init: peakier attention, so a wrong mask or
    # position shows well above the tolerance.
    model = build_model(tiny_config(arch, initializer_range=0.2), dtype=torch.float64)
    packing = build_packs(SEQUENCES, 40)
    assert len(packing.packs) > 1
    packs = [near_behaviour(pack_tensors(p), model) for p in packing.packs]

    model.zero_grad()
    tree = sum(objective(tree_logprobs(model, pt), pt, kind) for pt in packs)
    tree.backward()
    g_tree = grads(model)

    model.zero_grad()
    per_path = 0.0
    for pt in packs:
        for k in range(pt.num_paths):
            one = path_tensors(pt, k)
            per_path = per_path + objective(path_logprobs(model, one), one, kind)
    per_path.backward()
    g_path = grads(model)

    assert tree.item() != 0.0
    if kind == "rl":
        assert sum(MASKED) > 0, "IcePop should mask some tokens"
    assert abs(tree.item() - per_path.item()) <= 1e-4 * abs(per_path.item())
    assert g_tree.keys() == g_path.keys()
    for name, g in g_path.items():
        scale = g.abs().max().item()
        assert (g_tree[name] - g).abs().max().item() <= 1e-4 * max(scale, 1e-12), name


def test_flex_attention_matches_dense_mask():
    from arbor_rl.attention import tree_block_mask

    pt = pack_tensors(build_packs(SEQUENCES, 10_000).packs[0])
    t = pt.num_tokens
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, t, 16) for _ in range(3))
    dense = tree_attention(q, k, v, pt.subtree_end, backend="sdpa")
    flex = tree_attention(q, k, v, pt.subtree_end, backend="flex", block_mask=tree_block_mask(pt.subtree_end, block_size=16))
    assert torch.allclose(dense, flex, atol=1e-5)


def test_dense_mask_is_the_ancestor_relation():
    pt = pack_tensors(build_packs(SEQUENCES, 10_000).packs[0])
    mask = dense_tree_mask(pt.subtree_end)
    for i in range(pt.num_tokens):
        anc, j = {i}, int(pt.parent[i])
        while j >= 0:
            anc.add(j)
            j = int(pt.parent[j])
        assert set(mask[i].nonzero().squeeze(1).tolist()) == anc


def test_moe_balance_loss_counts_every_path():
    """The tree's load-balancing loss (tokens weighted by leaf_count) equals the loss of the
    same paths laid out unshared, where every path token is a row of its own."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from arbor_rl.hf import moe_balance_loss, tree_forward
    from arbor_rl.tensors import unshared

    model = build_model(tiny_config("qwen3_moe", initializer_range=0.2), dtype=torch.float32)
    pt = pack_tensors(build_packs(SEQUENCES, 10_000).packs[0])
    flat = unshared(pt, list(range(pt.num_paths)))
    with torch.no_grad():
        tree = moe_balance_loss(model, tree_forward(model, pt, router_logits=True).router_logits, pt)
        rows = tree_forward(model, flat, router_logits=True).router_logits
        want = load_balancing_loss_func(tuple(rows), 4, 2)
        unweighted = load_balancing_loss_func(
            tuple(tree_forward(model, pt, router_logits=True).router_logits), 4, 2)
    assert abs(tree.item() - want.item()) <= 1e-4 * want.item()
    assert abs(unweighted.item() - want.item()) > 1e-4 * want.item()
