"""Helpers shared by the SDK test scripts (run by the Rust integration tests)."""
import importlib
import json
import os
import sys
import urllib.request

PIP_NAMES = {"openai": "openai", "anthropic": "anthropic", "transformers": "transformers",
             "jinja2": "jinja2", "tokenizers": "tokenizers"}


def need(module):
    """Import a module or fail loudly naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - the message is the point
        print(f"MISSING pip package: {PIP_NAMES.get(module, module)} "
              f"(pip install {PIP_NAMES.get(module, module)}): {e}", file=sys.stderr)
        sys.exit(3)


def gateway():
    return os.environ["GATEWAY_URL"].rstrip("/")


def session_calls(session):
    with urllib.request.urlopen(f"{gateway()}/sessions/{session}") as r:
        return json.load(r)["calls"]


def check(cond, msg):
    if not cond:
        print(f"CHECK FAILED: {msg}", file=sys.stderr)
        sys.exit(1)
