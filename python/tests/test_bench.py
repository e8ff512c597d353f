"""The benchmark runs end to end on a tiny model and reports consistent figures."""

import json

from arbor_rl import bench


def test_bench_json(capsys):
    assert bench.main([
        "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--unique-tokens", "128",
        "--seq-len", "64", "--samples", "8", "--steps", "1", "--por", "0.5,0.85", "--json",
    ]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [round(r["por_target"], 2) for r in out["results"]] == [0.5, 0.85]
    for r in out["results"]:
        assert abs(r["por"] - r["por_target"]) < 0.05
        assert r["ideal_speedup"] == r["flat_tokens"] / r["unique_tokens"]
        # the per-path mode computes every path token, the tree each distinct token once
        assert r["per_path"]["computed_tokens"] == r["flat_tokens"]
        assert r["tree"]["computed_tokens"] == r["packed_tokens"]
        assert r["loss_rel_diff"] < 1e-4
        for mode in ("tree", "per_path"):
            assert r[mode]["step_s"] > 0 and r[mode]["tokens_per_s"] > 0 and r[mode]["peak_mem_mb"] > 0
