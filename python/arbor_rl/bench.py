"""Tree vs per-path training steps on a Qwen3-shaped model: `python -m arbor_rl.bench --json`.

For each target POR, synthetic group-sampling trajectories (arbor-tree's generator) with about
`--unique-tokens` distinct tokens are packed two ways under the same token budget:

- `tree`: arbor's packs, every shared prefix computed once (tree attention mask);
- `per_path`: the same paths laid out one after another, nothing shared (the same model call
  with a block-causal mask), what training without trees computes.

A step is forward + backward + AdamW over all packs of the batch, with the turn-level GSPO +
IcePop objective. Both modes start from the same weights; their first-step losses must agree
(`loss_rel_diff`). The JSON reports, per POR and mode, the step time (fastest of `--steps`, and
the mean), the process CPU time per step, tokens/s (flat path tokens trained per second, the
same count for both modes), peak memory, and the measured vs ideal (`1 / (1 - POR)`) speedup.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import resource
import sys
import time

import torch

from .data import build_packs, synthetic_sequences
from .hf import build_model, qwen3_0_6b_config, tiny_config, tree_attention_mask, tree_logprobs
from .losses import rl_objective
from .tensors import PackTensors, pack_tensors, unshared

MODELS = {
    "0.6b": lambda: qwen3_0_6b_config(),
    # CPU-sized: Qwen3's shape scaled down (4 layers, hidden 256).
    "small": lambda: tiny_config(
        "qwen3", vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    ),
    "tiny": lambda: tiny_config("qwen3", vocab_size=512),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # Process peak RSS (kB on Linux): monotonic over the run, so a CPU figure is an upper bound.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _per_path_batches(pt: PackTensors, budget: int) -> list[PackTensors]:
    """The pack's paths, unshared, split greedily into batches of at most `budget` tokens."""
    out, cur, used = [], [], 0
    for k in range(pt.num_paths):
        n = int(pt.path_offsets[k + 1] - pt.path_offsets[k])
        if cur and used + n > budget:
            out.append(unshared(pt, cur))
            cur, used = [], 0
        cur.append(k)
        used += n
    if cur:
        out.append(unshared(pt, cur))
    return out


def _step(model, opt, batches, masks, backend) -> float:
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for pt, mask in zip(batches, masks):
        lp = tree_logprobs(model, pt, backend=backend, mask=mask)
        loss, _ = rl_objective(lp, pt)
        loss.backward()
        total += float(loss.detach())
    opt.step()
    return total


def _run_mode(model, state, batches, args, device, flat_tokens) -> dict:
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    masks = [tree_attention_mask(b, args.backend) for b in batches]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = _step(model, opt, batches, masks, args.backend)
    for _ in range(args.warmup - 1):
        _step(model, opt, batches, masks, args.backend)
    wall, cpu = [], []
    for _ in range(args.steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        _step(model, opt, batches, masks, args.backend)
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # The fastest step: other load on a shared machine only ever adds time.
    dt = min(wall)
    return {
        "step_s": dt,
        "step_s_mean": sum(wall) / len(wall),
        "cpu_s": min(cpu),
        "tokens_per_s": flat_tokens / dt,
        "computed_tokens": sum(b.num_tokens for b in batches),
        "batches": len(batches),
        "peak_mem_mb": _peak_mb(device),
        "first_loss": first,
    }


def _with_behaviour(model, pt: PackTensors, backend: str) -> PackTensors:
    """Behaviour log-probabilities = the model's own, so IcePop keeps the tokens (as on-policy)."""
    with torch.no_grad():
        lp = tree_logprobs(model, pt, backend=backend)
    pt.path_logprobs = lp[pt.path_index].float()
    return pt


def run_por(model, state, por: float, args, device) -> dict:
    """One POR: pack, then time both modes from the same weights."""
    flat = int(args.unique_tokens / (1.0 - por))
    seqs = synthetic_sequences(
        por, flat, samples_per_group=args.samples, seq_len=args.seq_len, seed=args.seed,
        vocab_size=model.config.vocab_size,
    )
    rng = random.Random(args.seed)
    for s in seqs:
        s["advantage"] = rng.choice([-1.0, 1.0])
        s["loss_mask"] = [i > 0 for i in range(len(s["tokens"]))]
    packing = build_packs(seqs, args.budget)
    model.load_state_dict(state)
    tree = [_with_behaviour(model, pack_tensors(p, device), args.backend) for p in packing.packs]
    per_path = [b for pt in tree for b in _per_path_batches(pt, args.budget)]
    st = packing.stats
    res_tree = _run_mode(model, state, tree, args, device, st["flat_tokens"])
    res_path = _run_mode(model, state, per_path, args, device, st["flat_tokens"])
    ideal = st["flat_tokens"] / st["unique_tokens"]
    speedup = res_path["step_s"] / res_tree["step_s"]
    speedup_cpu = res_path["cpu_s"] / res_tree["cpu_s"]
    diff = abs(res_tree["first_loss"] - res_path["first_loss"])
    return {
        "por_target": por,
        "por": st["por"],
        "paths": st["paths"],
        "unique_tokens": st["unique_tokens"],
        "flat_tokens": st["flat_tokens"],
        "packed_tokens": st["packed_tokens"],
        "ideal_speedup": ideal,
        "measured_speedup": speedup,
        "efficiency": speedup / ideal,
        # From the process's CPU time: steadier than wall time where other jobs share the cores.
        "measured_speedup_cpu": speedup_cpu,
        "efficiency_cpu": speedup_cpu / ideal,
        "loss_rel_diff": diff / max(abs(res_path["first_loss"]), 1e-12),
        "tree": res_tree,
        "per_path": res_path,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arbor_rl.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="0.6b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["sdpa", "flex"], default=None,
                   help="attention kernel (default: flex on CUDA, sdpa on CPU)")
    p.add_argument("--por", default="0.5,0.75,0.85", help="comma-separated target PORs")
    p.add_argument("--unique-tokens", type=int, default=8192, help="distinct tokens per step")
    p.add_argument("--budget", type=int, default=None, help="tokens per pack (default: unique tokens)")
    p.add_argument("--samples", type=int, default=8, help="samples per task")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per path")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args(argv)
    args.backend = args.backend or ("flex" if args.device.startswith("cuda") else "sdpa")
    args.budget = args.budget or args.unique_tokens
    args.warmup = max(1, args.warmup)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(MODELS[args.model](), args.backend, DTYPES[args.dtype], device, args.seed)
    state = copy.deepcopy(model.state_dict())
    results = []
    for por in [float(x) for x in args.por.split(",") if x]:
        r = run_por(model, state, por, args, device)
        results.append(r)
        if not args.json:
            print(f"POR {r['por']:.3f}: speedup {r['measured_speedup']:.2f}x of ideal "
                  f"{r['ideal_speedup']:.2f}x", file=sys.stderr)
    out = {
        "bench": "arbor_rl tree vs per-path training step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "backend": args.backend,
        "budget": args.budget,
        "unique_tokens_target": args.unique_tokens,
        "samples_per_group": args.samples,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "objective": "turn-level GSPO + IcePop, AdamW",
        "results": results,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
