"""The torch objectives equal arbor-train's on the same packs (the fixture is written and kept
current by crates/arbor-train/tests/golden.rs)."""

import json
import os

import pytest
import torch

from arbor_rl import read_pack
from arbor_rl.losses import IcePop, distill_loss, gspo_loss, kl_penalty, rl_objective, sft_loss
from arbor_rl.tensors import pack_tensors

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
GOLDEN = os.path.join(ROOT, "crates", "arbor-train", "tests", "data", "golden")
DOC = json.load(open(os.path.join(GOLDEN, "golden.json")))
CFG = DOC["config"]
ICEPOP = IcePop(**CFG["icepop"])


def close(got, want, what):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-6)
    assert err <= 1e-4 * scale, f"{what}: max error {err} (scale {scale})\n{got}\n{want}"


def terms(case):
    pt = pack_tensors(read_pack(os.path.join(GOLDEN, case["file"])))
    expert = torch.tensor(case["expert_logprobs"])
    ref = torch.tensor(case["reference_logprobs"])
    return pt, {
        "gspo": lambda lp: gspo_loss(lp, pt, CFG["clip_eps"], ICEPOP),
        "distill": lambda lp: distill_loss(lp, expert, pt, ICEPOP),
        "kl": lambda lp: kl_penalty(lp, ref, pt),
        "sft": lambda lp: (sft_loss(lp, pt), None),
        "total": lambda lp: rl_objective(
            lp, pt, clip_eps=CFG["clip_eps"], icepop=ICEPOP, expert_logprobs=expert,
            distill_coef=CFG["distill_coef"], reference_logprobs=ref, kl_coef=CFG["kl_coef"],
        ),
    }


CASES = [(i, name) for i in range(len(DOC["packs"])) for name in ("gspo", "distill", "kl", "sft", "total")]


@pytest.mark.parametrize("pack,term", CASES)
def test_loss_and_gradient_equal_arbor_train(pack, term):
    case = DOC["packs"][pack]
    _, fns = terms(case)
    lp = torch.tensor(case["logprobs"], requires_grad=True)
    loss, stats = fns[term](lp)
    loss.backward()
    close(loss.item(), case[term]["loss"], f"pack {pack} {term} loss")
    close(lp.grad, case[term]["grad"], f"pack {pack} {term} gradient")
    if term == "gspo":
        want = case[term]["stats"]
        for key in ("loss_tokens", "masked_tokens", "turns", "empty_turns", "clipped_turns"):
            assert stats[key] == want[key], key
        assert abs(stats["ratio_sum"] - want["ratio_sum"]) <= 1e-4 * max(1.0, abs(want["ratio_sum"]))


def test_fixture_exercises_icepop_and_clipping():
    stats = [c["gspo"]["stats"] for c in DOC["packs"]]
    assert sum(s["masked_tokens"] for s in stats) > 0
    assert sum(s["clipped_turns"] for s in stats) > 0


def test_packs_of_a_step_add_up_to_the_step_loss():
    """The packs' weights use the step's normalizer: rebuilding the same sequences into one
    pack gives the sum of the packs' SFT losses."""
    from arbor_rl import build_packs

    one = build_packs(DOC["sequences"], 10_000)
    assert len(one.packs) == 1
    assert one.stats["paths"] == sum(len(read_pack(os.path.join(GOLDEN, c["file"])).meta["path_ids"]) for c in DOC["packs"])
