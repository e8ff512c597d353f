#!/usr/bin/env bash
# Installs the agent CLIs that arbor's agent presets run (docs/agents.md), at pinned
# versions, under target/ (idempotent: what is already installed at the pinned version is
# kept):
#   target/agents/npm         npm prefix: Claude Code, Codex, OpenCode (bin/ + lib/node_modules/)
#   target/agent-venv         Python virtualenv: mini-swe-agent (scripts/agent-requirements.txt)
# The virtualenv is built on Debian's /usr/bin/python3, and the npm CLIs run on /usr/bin/node,
# so both work inside sandboxes, whose default rootfs shows the host's /usr. The presets bind
# these folders read-only into the sandbox at the same path.
#
# Usage: scripts/install-agents.sh [all|npm|python|claude-code|codex|opencode|mini-swe-agent]...
set -euo pipefail
cd "$(dirname "$0")/.."

CLAUDE_CODE="@anthropic-ai/claude-code@2.1.332"
CODEX="@openai/codex@0.171.0"
OPENCODE="opencode-ai@1.18.33"
NPM_PREFIX="${ARBOR_AGENTS_NPM:-target/agents/npm}"
VENV="${ARBOR_AGENT_VENV:-target/agent-venv}"

npm_install() { # package@version
    local pkg="$1" name="${1%@*}" want="${1##*@}" have
    have=$(node -e "try{console.log(require(process.argv[1]+'/lib/node_modules/'+process.argv[2]+'/package.json').version)}catch(e){}" \
        "$(realpath -m "$NPM_PREFIX")" "$name")
    if [ "$have" = "$want" ]; then
        echo "install-agents: $name $want already installed in $NPM_PREFIX"
        return
    fi
    if ! command -v npm >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
        else
            echo "install-agents: npm not found; install Node.js >= 18 and npm (Debian: apt-get install nodejs npm)" >&2
            exit 1
        fi
    fi
    echo "install-agents: npm install $pkg into $NPM_PREFIX"
    mkdir -p "$NPM_PREFIX"
    npm install --global --prefix "$NPM_PREFIX" --no-fund --no-audit --loglevel=error "$pkg"
}

python_install() {
    if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-venv
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        /usr/bin/python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r scripts/agent-requirements.txt
    echo "install-agents: mini-swe-agent $("$VENV/bin/pip" show mini-swe-agent | sed -n 's/^Version: //p') in $VENV"
}

[ $# -eq 0 ] && set -- all
for what in "$@"; do
    case "$what" in
        all) npm_install "$CLAUDE_CODE"; npm_install "$CODEX"; npm_install "$OPENCODE"; python_install ;;
        npm) npm_install "$CLAUDE_CODE"; npm_install "$CODEX"; npm_install "$OPENCODE" ;;
        python | mini-swe-agent) python_install ;;
        claude-code) npm_install "$CLAUDE_CODE" ;;
        codex) npm_install "$CODEX" ;;
        opencode) npm_install "$OPENCODE" ;;
        *) echo "install-agents: unknown agent '$what' (all, npm, python, claude-code, codex, opencode, mini-swe-agent)" >&2; exit 2 ;;
    esac
done
