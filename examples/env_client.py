#!/usr/bin/env python3
"""A minimal trainer-side client of arbor's env server (standard library only).

Submits a batch, streams its results as they finish, fetches one rollout's
trajectory and prefix tree, and prints one JSON summary line.

    arbor serve --listen 127.0.0.1:8700 &
    python3 examples/env_client.py http://127.0.0.1:8700 [batch.json]

If the server has a token (`arbor serve --token-file F`), set ARBOR_TOKEN to it:
every request then carries `Authorization: Bearer $ARBOR_TOKEN`.

Without a batch file it asks for the scripted-oracle policy on four terminal
tasks, two samples each. A real trainer passes its own policy endpoint:
    "policy": {"kind": "upstream", "base_urls": ["http://127.0.0.1:8000/v1"], "model": "my-model"}
"""

import json
import os
import sys
import urllib.request

DEFAULT_BATCH = {
    "datasets": [{"domain": "terminal", "n": 4, "seed": 3}],
    "scaffolds": [{"kind": "bash", "max_steps": 20}],
    "policy": {"kind": "scripted-oracle"},
    "samples": 2,
    "concurrency": 4,
}


def headers():
    """JSON, plus the server's bearer token when ARBOR_TOKEN is set."""
    h = {"content-type": "application/json"}
    token = os.environ.get("ARBOR_TOKEN", "").strip()
    if token:
        h["authorization"] = f"Bearer {token}"
    return h


def request(method, url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers())
    return urllib.request.urlopen(req, timeout=timeout)


def main():
    base = sys.argv[1].rstrip("/")
    batch = DEFAULT_BATCH
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            batch = json.load(f)
    with request("POST", f"{base}/v1/batches", batch) as r:
        submitted = json.load(r)
    results = []
    # NDJSON: one result per line, as each rollout finishes; the stream ends
    # when the batch is done.
    with request("GET", f"{base}{submitted['results_url']}", timeout=600) as r:
        for line in r:
            if line.strip():
                results.append(json.loads(line))
    with request("GET", f"{base}{submitted['status_url']}") as r:
        status = json.load(r)
    first = results[0]["session"]
    bid = submitted["id"]
    with request("GET", f"{base}/v1/batches/{bid}/rollouts/{first}/trajectory") as r:
        traj = json.load(r)
    with request("GET", f"{base}/v1/batches/{bid}/rollouts/{first}/tree") as r:
        tree = json.load(r)
    print(json.dumps({
        "id": bid,
        "requested": submitted["requested"],
        "streamed": len(results),
        "distinct": len({(r["task_id"], r["scaffold"], r["sample"]) for r in results}),
        "passed": sum(1 for r in results if r["status"] == "passed"),
        "state": status["state"],
        "summary_lost": (status.get("summary") or {}).get("lost"),
        "trajectory_calls": len(traj["calls"]),
        "turns_of_first": results[0]["turns"],
        "tree_paths": tree.get("paths"),
        "tree_error": tree.get("error"),
    }))


if __name__ == "__main__":
    main()
