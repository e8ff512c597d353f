#!/usr/bin/env bash
# arbor's test command (the README's second command; .ci/run calls it).
# Installs what the tests need, runs the whole suite, then checks that no
# sandbox process, mount or cgroup was left on the host.
# Sandbox tests need root (real namespaces, cgroups, overlayfs).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: the sandbox tests need root (namespaces, cgroups); run with sudo" >&2
    exit 1
fi

echo "==> installing Python packages used by client-compatibility tests"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -r scripts/test-requirements.txt

echo "==> cargo test --workspace"
cargo test --workspace

echo "==> checking that no sandbox was left behind"
cargo run --quiet -p arbor-cli -- sandbox gc --check
