#!/usr/bin/env bash
# arbor's test command (the README's second command; .ci/run calls it).
# Installs what the tests need, fails on a formatting, lint or layout problem,
# runs the whole suite, then checks that no sandbox process, mount or cgroup
# was left on the host.
# Sandbox tests need root (real namespaces, cgroups, overlayfs).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: the sandbox tests need root (namespaces, cgroups); run with sudo" >&2
    exit 1
fi

echo "==> formatting, layout and doc paths"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi
cargo fmt --all --check
python3 scripts/check-layout.py
python3 scripts/check-doc-paths.py

echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> Debian packages the image tests use"
# busybox-static: the real minimal userland test images are made of;
# docker-registry: the reference OCI registry, served on loopback by the tests;
# apache2-utils: htpasswd, for the registry-credentials test.
need_pkgs=()
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || need_pkgs+=(apache2-utils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi
# Debian's package starts a registry service where an init system runs; the
# tests start their own on free loopback ports.
systemctl stop docker-registry >/dev/null 2>&1 || true

echo "==> installing Python packages used by client-compatibility tests"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -r scripts/test-requirements.txt

# --- arbor_rl (python/): the PyTorch tree-training package. ---
# Its pyo3 crate is its own cargo project (excluded from the workspace, so `cargo test
# --workspace` never builds pyo3 or needs libpython); it is linted here and built by maturin
# through `pip install ./python`. torch/transformers/maturin/pytest come from
# test-requirements.txt above. pytest runs from the repository root so that the installed
# package (with its compiled `_native` module) is the one imported, not the source folder.
echo "==> arbor_rl: fmt, clippy, build, tests (CPU)"
cargo fmt --manifest-path python/Cargo.toml --check
cargo clippy --manifest-path python/Cargo.toml --all-targets --quiet -- -D warnings
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-build-isolation ./python
python3 -m pytest -q -p no:cacheprovider python/tests

echo "==> agent CLIs for black-box scaffold tests (scripts/install-agents.sh)"
# mini-swe-agent and the openai SDK in target/agent-venv (built on Debian's /usr/bin/python3 so
# its standard library is visible inside sandboxes, whose default rootfs shows the host's /usr),
# and Claude Code in target/agents/npm: crates/arbor-cli/tests/agents.rs runs both end to end.
# Codex and OpenCode are left to scripts/agents-check.sh (two more ~400 MB downloads).
scripts/install-agents.sh claude-code mini-swe-agent

echo "==> cargo test --workspace"
cargo test --workspace

echo "==> checking that no sandbox was left behind"
cargo run --quiet -p arbor-cli -- sandbox gc --check
