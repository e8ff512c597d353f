"""Sequences in, packs out, through arbor-tree (Rust): Python lists, JSONL, gateway stores and
pack files, and clear errors on bad input."""

import json

import numpy as np
import pytest
import torch

from arbor_rl import build_packs, gateway_sequences, load_sequences, read_pack, read_packs, tree_stats
from arbor_rl.tensors import pack_tensors

SEQS = [
    {"id": "a", "tokens": [1, 2, 3, 4, 5], "loss_mask": [False, False, True, True, True], "advantage": 1.0},
    {"id": "b", "tokens": [1, 2, 3, 6, 7], "loss_mask": [False, False, True, True, True], "advantage": -1.0},
    {"id": "c", "tokens": [8, 9, 10], "loss_mask": [False, True, True], "advantage": 0.5},
]


def test_lists_jsonl_and_pack_files_give_the_same_packs(tmp_path):
    from_list = build_packs(SEQS, 64)
    src = tmp_path / "seqs.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in SEQS))
    from_file = build_packs(src, 64)
    assert [p.meta for p in from_list.packs] == [p.meta for p in from_file.packs]
    out = tmp_path / "packs"
    out.mkdir()
    for p in from_list.packs:
        p.save(out / f"pack-{p.meta['index']:05d}.safetensors")
    back = read_packs(out)
    for a, b in zip(from_list.packs, back):
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    assert load_sequences(src)[1]["tokens"] == [1, 2, 3, 6, 7]


def test_pack_tensors_layout():
    packing = build_packs(SEQS, 64)
    assert packing.stats["unique_tokens"] == 10 and packing.stats["flat_tokens"] == 13
    assert abs(tree_stats(SEQS)["por"] - 3 / 13) < 1e-9
    pt = pack_tensors(packing.packs[0])
    for k, s in enumerate(pt.meta["path_ids"]):
        want = next(x for x in SEQS if x["id"] == s)
        idx = pt.path(k)
        assert pt.input_ids[idx].tolist() == want["tokens"]
        assert pt.position_ids[idx].tolist() == list(range(len(want["tokens"])))
        assert pt.path_advantage[k].item() == want["advantage"]
    # token mean over all 10 flat loss tokens: a shared trained token weighs 2/10
    assert torch.isclose(pt.loss_weight.sum(), torch.tensor(1.0))
    assert pt.path_weight.tolist() == [pytest.approx(1 / 3)] * 3


def test_several_packs_share_the_step_normalizer():
    packing = build_packs(SEQS, 5)
    assert len(packing.packs) >= 2
    total = sum(float(p.arrays["loss_weight"].sum()) for p in packing.packs)
    assert total == pytest.approx(1.0)
    assert all(p.meta["num_paths_total"] == 3 for p in packing.packs)


def gateway_call(session, index, prompt, completion):
    return {
        "v": 1, "id": f"{session}/{index}", "session": session, "index": index, "api": "chat",
        "stream": False, "started_ms": 1000 + index, "finished_ms": 2000 + index,
        "upstream": "http://127.0.0.1:1", "upstream_id": f"c-{index}", "model": "m",
        "request": {"model": "m", "messages": []}, "upstream_request": {"model": "m"},
        "response": {"object": "chat.completion"}, "usage": None,
        "tokens": {"source": "upstream", "prompt": prompt, "completions": [
            {"index": 0, "ids": completion, "logprobs": [-0.5] * len(completion), "text": "",
             "finish_reason": "stop"}]},
        "branch": None,
    }


def test_gateway_store_sessions(tmp_path):
    calls = [gateway_call("s", 0, [1, 2, 3], [10, 11]), gateway_call("s", 1, [1, 2, 3, 10, 11, 4], [12])]
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    seqs = gateway_sequences(tmp_path)
    assert [s["tokens"] for s in seqs] == [[1, 2, 3, 10, 11], [1, 2, 3, 10, 11, 4, 12]]
    assert seqs[0]["loss_mask"] == [False, False, False, True, True]
    assert build_packs(seqs, 64).stats["unique_tokens"] == 7


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="loss_mask"):
        build_packs([{"id": "x", "tokens": [1, 2], "loss_mask": [True]}], 8)
    with pytest.raises(ValueError, match="needs at least"):
        build_packs([{"tokens": [1]}], 8)
    with pytest.raises(ValueError, match="strategy"):
        build_packs(SEQS, 8, strategy="best")
    with pytest.raises(ValueError, match="budget"):
        build_packs(SEQS, 0)
    with pytest.raises(OSError):
        read_pack(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a pack")
    with pytest.raises(ValueError):
        read_pack(bad)
    with pytest.raises(ValueError, match="advantage"):
        from arbor_rl.losses import gspo_loss

        pt = pack_tensors(build_packs([{"id": "x", "tokens": [1, 2, 3]}], 8).packs[0])
        gspo_loss(torch.zeros(3), pt)
