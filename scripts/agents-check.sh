#!/usr/bin/env bash
# Runs examples/agents.toml (Claude Code, Codex with its default tools, OpenCode and
# mini-swe-agent, each on 10 built-in terminal tasks, driven by the scripted-oracle policy)
# through `arbor run`, then prints ONE JSON object: per agent the rollouts, passes, setup
# failures, model calls (and how many carry token ids), sessions with calls, and agent
# seconds; the statistics of the trajectory tree built from every recorded call (`arbor tree
# stats`); the run's wall seconds. Installs the pinned CLIs first
# (scripts/install-agents.sh). Needs root (sandboxes). Progress goes to stderr.
#
# Usage: [ARBOR=path/to/arbor] scripts/agents-check.sh [RUN_DIR]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-agents.sh >&2
if [ -n "${ARBOR:-}" ]; then
    arbor="$ARBOR"    # an already built `arbor` binary
else
    cargo build --release --quiet -p arbor-cli >&2
    target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    arbor="$target_dir/release/arbor"
fi

run_dir="${1:-$(mktemp -d /tmp/arbor-agents-check.XXXXXX)/run}"
start=$(date +%s.%N)
ARBOR_LOG=warn "$arbor" run examples/agents.toml --out "$run_dir" --json --no-report >&2
end=$(date +%s.%N)
# Every recorded call as a path of one trajectory tree (arbor-tree), built from the store.
tree=$("$arbor" tree stats "$run_dir/gateway" --json)

python3 - "$run_dir" "$start" "$end" "$tree" <<'PY'
import json, statistics, sys
from collections import defaultdict

run, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
tree = json.loads(sys.argv[4])
results = [json.loads(l) for l in open(f"{run}/results.jsonl") if l.strip()]
calls = defaultdict(list)
for l in open(f"{run}/gateway/calls.jsonl"):
    if l.strip():
        c = json.loads(l)
        calls[c["session"]].append(c)

def has_ids(c):
    t = c.get("tokens") or {}
    comps = t.get("completions") or []
    return bool(t.get("prompt")) and bool(comps) and bool(comps[0].get("ids"))

agents = {}
for name in sorted({r["scaffold"] for r in results}):
    rs = [r for r in results if r["scaffold"] == name]
    sess = [calls.get(r["session"], []) for r in rs]
    n_calls = sum(len(s) for s in sess)
    agents[name] = {
        "rollouts": len(rs),
        "passed": sum(r["status"] == "passed" for r in rs),
        "setup_failures": sum((r.get("failure") or {}).get("class") == "agent_setup" for r in rs),
        "calls": n_calls,
        "calls_with_token_ids": sum(has_ids(c) for s in sess for c in s),
        "sessions_with_calls": sum(bool(s) for s in sess),
        "agent_s_median": round(statistics.median(r["agent_s"] for r in rs), 2) if rs else 0,
        "agent_s_total": round(sum(r["agent_s"] for r in rs), 1),
    }
out = {
    "run_dir": run,
    "agents": agents,
    "passed": sum(a["passed"] for a in agents.values()),
    "rollouts": len(results),
    "tree": tree,
    "seconds": round(end - start, 1),
}
print(json.dumps(out))
PY
