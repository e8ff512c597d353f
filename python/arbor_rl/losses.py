"""`arbor-train`'s objectives in torch, over the `[T]` per-token log-probabilities of one pack.

Each path *gathers* its tokens from the shared vector (`path_index`), the unchanged per-path loss
is applied, and the gather's backward sums the duplicates: value and gradient equal those of
training every path separately (docs/tree-training.md). The formulas and weights are those of
`crates/arbor-train/src/loss.rs`; `tests/test_golden.py` checks them against a fixture
that `arbor-train` itself computes.

- `gspo_loss`: turn-level GSPO with IcePop masking, mean over each path's turns, `c_k` per path;
- `distill_loss`: on-policy distillation, `-(c_k/M_k) sum rho_t r_t`;
- `kl_penalty`: k3 KL toward a reference policy, `(c_k/M_k) sum (e^d - d - 1)`;
- `sft_loss`: `-sum_t w_t logp_t` with the pack's `loss_weight`;
- `rl_objective`: `gspo + distill_coef * distill + kl_coef * kl`, one IcePop decision for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .tensors import PackTensors


@dataclass(frozen=True)
class IcePop:
    """Tokens whose ratio `exp(logp - logp_old)` is outside `[alpha, beta]` get no gradient."""

    alpha: float = 0.5
    beta: float = 2.0


def next_token_logprobs(
    logits_at: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    parent: torch.Tensor,
    wanted: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`[T]` log-probabilities: token `i` is predicted from its predecessor on its path,
    `parent[i]`, at `temperature`. `logits_at(rows)` returns the `[len(rows), V]` logits of the
    given flat positions, so only wanted rows pay for the vocabulary projection. Roots and
    unwanted tokens get 0 (no gradient)."""
    has_pred = parent >= 0
    if wanted is not None:
        has_pred = has_pred & wanted
    rows = has_pred.nonzero().squeeze(1)
    logits = logits_at(parent[rows])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax over the vocabulary in at least float32
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[rows, None]).squeeze(-1)
    out = torch.zeros(input_ids.shape[0], dtype=lp.dtype, device=lp.device)
    return out.index_put((rows,), lp)


def trained_tokens(pt: PackTensors) -> torch.Tensor:
    """`[T]` bool: tokens some path of the pack trains (the only log-probabilities needed)."""
    w = torch.zeros(pt.num_tokens, dtype=torch.bool, device=pt.input_ids.device)
    return w.index_fill(0, pt.path_index[pt.path_loss_mask], True)


@dataclass
class _Selection:
    """Loss entries (path positions with the path's loss mask), their turn slots, IcePop."""

    tok: torch.Tensor  # flat token of each entry
    path: torch.Tensor  # path of each entry
    old: torch.Tensor  # behaviour logprob of each entry
    slot: torch.Tensor  # turn slot of each entry
    slot_path: torch.Tensor  # path of each slot
    keep: torch.Tensor  # IcePop decision of each entry
    turns_per_path: torch.Tensor  # N_k (before masking)
    tokens_per_path: torch.Tensor  # M_k (before masking)


def _select(logp: torch.Tensor, pt: PackTensors, icepop: IcePop | None) -> _Selection:
    if logp.shape != (pt.num_tokens,):
        raise ValueError(f"log-probabilities of shape {tuple(logp.shape)} for {pt.num_tokens} tokens")
    e = pt.path_loss_mask.nonzero().squeeze(1)
    tok, path = pt.path_index[e], pt.path_of[e]
    old, turn = pt.path_logprobs[e], pt.path_turns[e]
    span = int(turn.max()) + 1 if turn.numel() else 1
    keys, slot = torch.unique(path * span + turn, return_inverse=True)
    slot_path = torch.div(keys, span, rounding_mode="floor")
    k = pt.num_paths
    if icepop is None:
        keep = torch.ones_like(tok, dtype=torch.bool)
    else:
        # float32, as arbor-train decides; a NaN ratio is masked.
        r = torch.exp(logp.detach().float()[tok] - old)
        keep = (r >= icepop.alpha) & (r <= icepop.beta)
    return _Selection(
        tok=tok,
        path=path,
        old=old,
        slot=slot,
        slot_path=slot_path,
        keep=keep,
        turns_per_path=torch.bincount(slot_path, minlength=k),
        tokens_per_path=torch.bincount(path, minlength=k),
    )


def _zero(logp: torch.Tensor) -> torch.Tensor:
    """A zero that depends on `logp`, so an empty loss still has a (zero) gradient."""
    return logp.sum() * 0.0


def _check_advantages(pt: PackTensors) -> None:
    bad = torch.isnan(pt.path_advantage).nonzero().squeeze(1).tolist()
    if bad:
        ids = [pt.meta["path_ids"][k] for k in bad[:3]]
        raise ValueError(f"paths without an advantage: {ids} ({len(bad)} in all)")


def _gspo(logp, pt, sel: _Selection, clip_eps: float) -> tuple[torch.Tensor, dict[str, Any]]:
    _check_advantages(pt)
    n_slots = sel.slot_path.shape[0]
    slot_len = torch.bincount(sel.slot[sel.keep], minlength=n_slots)
    stats = {
        "loss_tokens": int(sel.tok.shape[0]),
        "masked_tokens": int((~sel.keep).sum()),
        "turns": n_slots,
        "empty_turns": int((slot_len == 0).sum()),
        "clipped_turns": 0,
        "ratio_sum": 0.0,
    }
    if not bool(sel.keep.any()):
        return _zero(logp), stats
    kslot = sel.slot[sel.keep]
    scale = 1.0 / slot_len[kslot].to(logp.dtype)
    diff = (logp[sel.tok[sel.keep]] - sel.old[sel.keep].to(logp.dtype)) * scale
    turn_mean = torch.zeros(n_slots, dtype=logp.dtype, device=logp.device).index_add(0, kslot, diff)
    live = slot_len > 0
    s = torch.exp(turn_mean[live])
    adv = pt.path_advantage[sel.slot_path[live]].to(logp.dtype)
    coef = (pt.path_weight / sel.turns_per_path.clamp(min=1))[sel.slot_path[live]].to(logp.dtype)
    lo, hi = 1.0 - clip_eps, 1.0 + clip_eps
    obj = torch.minimum(s * adv, s.clamp(lo, hi) * adv)
    r = torch.exp(turn_mean[live].detach().double())
    a = adv.detach().double()
    stats["ratio_sum"] = float(r.sum())
    stats["clipped_turns"] = int((((a > 0) & (r > hi)) | ((a < 0) & (r < lo))).sum())
    return -(obj * coef).sum(), stats


def gspo_loss(
    logp: torch.Tensor,
    pt: PackTensors,
    clip_eps: float = 0.2,
    icepop: IcePop | None = IcePop(),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Turn-level GSPO with IcePop (arbor-train's `gspo_loss`):

    `s_n = exp(mean_{kept i in turn n}(logp_i - logp_old_i))`,
    `L = -sum_k c_k/N_k sum_n min(s_n A_k, clip(s_n, 1-eps, 1+eps) A_k)`.
    A turn whose tokens IcePop all masked contributes nothing but still counts in `N_k`.
    Returns the loss and GSPO statistics (counts, as `GspoStats`).
    """
    return _gspo(logp, pt, _select(logp, pt, icepop), clip_eps)


def _distill(logp, pt, sel: _Selection, expert: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    if expert.shape != logp.shape:
        raise ValueError(f"{expert.shape[0]} expert log-probabilities for {logp.shape[0]} tokens")
    if not bool(sel.keep.any()):
        return _zero(logp), {"tokens": 0, "neg_r_sum": 0.0}
    tok, path = sel.tok[sel.keep], sel.path[sel.keep]
    r = expert.float()[tok] - logp.detach().float()[tok]
    coef = -(pt.path_weight[path] / sel.tokens_per_path[path]) * r
    rho = torch.exp(logp[tok] - sel.old[sel.keep].to(logp.dtype))
    stats = {"tokens": int(tok.shape[0]), "neg_r_sum": float(-r.double().sum())}
    return (rho * coef.to(logp.dtype)).sum(), stats


def distill_loss(
    logp: torch.Tensor,
    expert_logprobs: torch.Tensor,
    pt: PackTensors,
    icepop: IcePop | None = IcePop(),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """On-policy distillation (arbor-train's `distill_loss`): `r_t = log pi_expert - logp`
    (detached), `rho_t = exp(logp - logp_old)`, `L = -sum_k c_k/M_k sum_{kept t} rho_t r_t`.
    `expert_logprobs` is `[T]`, one per flat token."""
    return _distill(logp, pt, _select(logp, pt, icepop), expert_logprobs)


def kl_penalty(
    logp: torch.Tensor, reference: torch.Tensor, pt: PackTensors
) -> tuple[torch.Tensor, float]:
    """k3 KL toward a reference (arbor-train's `kl_penalty`): `d = log pi_ref - logp`,
    `L = sum_k c_k/M_k sum_{loss t} (e^d - d - 1)` over every loss token (no IcePop).
    Returns the term and the per-token mean estimate."""
    if reference.shape != logp.shape:
        raise ValueError(f"{reference.shape[0]} reference log-probabilities for {logp.shape[0]} tokens")
    e = pt.path_loss_mask.nonzero().squeeze(1)
    if e.numel() == 0:
        return _zero(logp), 0.0
    tok, path = pt.path_index[e], pt.path_of[e]
    m = torch.bincount(path, minlength=pt.num_paths)
    d = reference.to(logp.dtype)[tok] - logp[tok]
    terms = torch.exp(d) - d - 1.0
    dd = d.detach().double()
    mean = float((torch.exp(dd) - dd - 1.0).mean())
    return (terms * (pt.path_weight[path] / m[path]).to(logp.dtype)).sum(), mean


def sft_loss(logp: torch.Tensor, pt: PackTensors) -> torch.Tensor:
    """`-sum_t w_t logp_t` with the pack's exact loss weights (its `normalization`)."""
    return -(pt.loss_weight.to(logp.dtype) * logp).sum()


def rl_objective(
    logp: torch.Tensor,
    pt: PackTensors,
    *,
    clip_eps: float = 0.2,
    icepop: IcePop | None = IcePop(),
    expert_logprobs: torch.Tensor | None = None,
    distill_coef: float = 0.0,
    reference_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`gspo + distill_coef * distill + kl_coef * kl` (arbor-train's `rl_loss` without MCLA and
    the MoE balance term), with one IcePop decision for GSPO and distillation. Returns the total
    and a dict of the terms' values and statistics."""
    sel = _select(logp, pt, icepop)
    gspo, gstats = _gspo(logp, pt, sel, clip_eps)
    total = gspo
    out: dict[str, Any] = {"gspo": float(gspo.detach()), "gspo_stats": gstats}
    if expert_logprobs is not None and distill_coef != 0.0:
        d, dstats = _distill(logp, pt, sel, expert_logprobs)
        total = total + distill_coef * d
        out.update(distill=float(d.detach()), distill_stats=dstats)
    if reference_logprobs is not None and kl_coef != 0.0:
        kl, est = kl_penalty(logp, reference_logprobs, pt)
        total = total + kl_coef * kl
        out.update(kl_penalty=float(kl.detach()), kl_estimate=est)
    return total, out
