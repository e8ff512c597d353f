#!/usr/bin/env bash
# Cluster benchmark: three `arbor node serve` processes, each in its own
# network namespace reached over a veth pair (own address, own loopback),
# then `arbor node bench`: remote minus local exec round trip, and a run of
# scripted-oracle rollouts across the nodes with one node SIGKILLed mid-run.
# Prints the bench's one JSON object on stdout (everything else on stderr).
# Namespaces, links and node processes are removed on exit, also on failure.
#
#   scripts/cluster-bench.sh --json [extra `arbor node bench` options]
#
# ARBOR (default target/release/arbor) is the binary; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

ARBOR=${ARBOR:-target/release/arbor}
[ "${1:-}" = --json ] && shift
if [ "$(id -u)" != 0 ]; then
    echo "cluster-bench.sh: needs root (network namespaces, sandboxes)" >&2
    exit 1
fi
[ -x "$ARBOR" ] || { echo "cluster-bench.sh: no $ARBOR (cargo build --release -p arbor-cli)" >&2; exit 1; }

tag=$$
octet=$((tag % 250))
scratch=$(mktemp -d /tmp/arbor-cluster-bench.XXXXXX)
pids=()
namespaces=()

cleanup() {
    # Nodes first (SIGTERM drains them: their sandboxes are destroyed), then the links.
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    for n in "${namespaces[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    # The SIGKILLed node's sandboxes died with it; gc removes their cgroups
    # and state once its grace period for sandboxes being created is over.
    sleep 2
    "$ARBOR" sandbox gc >/dev/null 2>&1 || true
    rm -rf "$scratch"
}
trap cleanup EXIT

head -c 24 /dev/urandom | base64 >"$scratch/token"
addrs=()
for i in 0 1 2; do
    ns="arbb${tag}n$i" host="arbb${tag}h$i" peer="arbb${tag}p$i"
    ip netns add "$ns"
    namespaces+=("$ns")
    ip link add "$host" type veth peer name "$peer"
    ip link set "$peer" netns "$ns"
    ip addr add "10.214.$octet.$((4 * i + 1))/30" dev "$host"
    ip link set "$host" up
    ip -n "$ns" addr add "10.214.$octet.$((4 * i + 2))/30" dev "$peer"
    ip -n "$ns" link set "$peer" up
    ip -n "$ns" link set lo up
    addr="10.214.$octet.$((4 * i + 2)):7070"
    # Only the network namespace: the node shares the host's mounts and cgroups.
    ARBOR_LOG=error nsenter --net="/run/netns/$ns" "$ARBOR" node serve --listen "$addr" \
        --token-file "$scratch/token" --insecure-plaintext --drain-grace-s 2 \
        >"$scratch/node$i.out" 2>"$scratch/node$i.err" &
    pids+=($!)
    addrs+=("$addr")
done
for i in 0 1 2; do
    for _ in $(seq 100); do
        grep -q "listening on" "$scratch/node$i.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "listening on" "$scratch/node$i.out" || {
        echo "node $i did not start:" >&2
        cat "$scratch/node$i.err" >&2
        exit 1
    }
done

nodes=$(IFS=,; echo "${addrs[*]}")
# Node 2 is killed mid-run (node 0 serves the exec measurement).
"$ARBOR" node bench --json --nodes "$nodes" --token-file "$scratch/token" \
    --kill-pid "${pids[2]}" "$@"
