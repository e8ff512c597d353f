#!/usr/bin/env python3
"""Structural checks the compiler and clippy do not make (run by scripts/test.sh).

- No source file under `crates/*/src` is longer than MAX_FILE_LINES, and no function in
  one is longer than MAX_FN_LINES (signature to closing brace, as written).
- No import circle inside a crate: for every module, the graph of its child modules
  (an arrow when code under one child names another through `crate::` or `super::`)
  has no cycle. A parent and its own children may name each other freely.
- The crate arrows listed in FORBIDDEN_DEPS do not exist.
- No phantom dependency: every crate in `[dependencies]` is named in the crate's `src/`, and
  every crate in `[dev-dependencies]` in its `src/`, `tests/`, `benches/` or `examples/`
  (a crate used only through a feature of another can be listed in UNNAMED_DEPS).

Test code (`#[cfg(test)]` modules, `tests/`, `benches/`) is not checked.
"""
import os
import re
import sys

MAX_FILE_LINES = 700
MAX_FN_LINES = 120
FORBIDDEN_DEPS = {
    "arbor-train": {"arbor-gateway"},
    "arbor-policy": {"arbor-gateway"},
    "arbor-agent": {"arbor-gateway"},
}

# Dependencies a crate needs without naming them in code: (crate, dependency).
UNNAMED_DEPS = set()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def module_path(src, path):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel[-1] in ("lib", "main") and len(rel) == 1:
        return []
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel


def non_test_text(path):
    text = open(path, encoding="utf-8").read()
    cut = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*mod\s", text, re.M)
    return text[: cut.start()] if cut else text


def expand_groups(text):
    """`use a::{b, c::d}` -> `a::b a::c::d` (one level of braces at a time)."""
    pattern = re.compile(r"((?:\w+::)+)\{([^{}]*)\}")
    while True:
        new = pattern.sub(
            lambda m: " ".join(
                m.group(1) + item.strip() for item in m.group(2).split(",") if item.strip()
            ),
            text,
        )
        if new == text:
            return text
        text = new


def referenced_paths(text, here):
    """Absolute module paths (lists of names) named in `text`, a file at module `here`."""
    text = expand_groups(re.sub(r"//[^\n]*", "", text))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", text):
        parts = m.group(1).split("::")
        base = list(here)
        if parts[0] == "crate":
            base, parts = [], parts[1:]
        elif parts[0] == "self":
            parts = parts[1:]
        while parts and parts[0] == "super":
            base, parts = base[:-1], parts[1:]
        yield base + parts


def crate_cycles(crate_dir):
    src = os.path.join(crate_dir, "src")
    files = {}
    for root, _, names in os.walk(src):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(root, name)
                files[path] = module_path(src, path)
    modules = {tuple(m) for m in files.values()}
    edges = {}
    for path, here in files.items():
        if here and os.path.basename(path) in ("main.rs",):
            continue
        for target in referenced_paths(non_test_text(path), here):
            # The longest prefix of `target` that is a module of this crate.
            while target and tuple(target) not in modules:
                target = target[:-1]
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common == len(here) or common == len(target):
                continue  # an ancestor or a descendant: not a sibling arrow
            parent = tuple(here[:common])
            a, b = here[common], target[common]
            edges.setdefault(parent, {}).setdefault(a, set()).add(b)
    problems = []
    for parent, graph in edges.items():
        for cycle in find_cycles(graph):
            where = "::".join(parent) or "crate root"
            problems.append(f"{crate_dir}: import circle under {where}: {' -> '.join(cycle)}")
    return problems


def find_cycles(graph):
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    return cycles


def long_files_and_functions(crate_dir):
    problems = []
    for root, _, names in os.walk(os.path.join(crate_dir, "src")):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, ROOT)
            if not name.endswith(".rs"):
                continue
            n = sum(1 for _ in open(path, encoding="utf-8"))
            if n > MAX_FILE_LINES:
                problems.append(f"{rel}: {n} lines (at most {MAX_FILE_LINES})")
            problems += long_functions(path, rel)
    return problems


FN_START = re.compile(r"^(\s*)(?:pub(?:\([^)]*\))?\s+)?(?:(?:async|const|unsafe|extern \"C\")\s+)*fn\s+(\w+)")


def long_functions(path, rel):
    """Functions outside test modules whose body runs past MAX_FN_LINES (rustfmt layout:
    the closing brace sits alone at the indentation of `fn`)."""
    lines = non_test_text(path).split("\n")
    problems = []
    for i, line in enumerate(lines):
        m = FN_START.match(line)
        if not m or line.rstrip().endswith(";"):
            continue
        close = m.group(1) + "}"
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == close), None)
        if end is not None and end - i + 1 > MAX_FN_LINES:
            problems.append(
                f"{rel}:{i + 1}: fn {m.group(2)} is {end - i + 1} lines (at most {MAX_FN_LINES})"
            )
    return problems


def forbidden_deps(crate_dir):
    crate = os.path.basename(crate_dir)
    manifest = open(os.path.join(crate_dir, "Cargo.toml"), encoding="utf-8").read()
    deps = manifest.split("[dependencies]", 1)[-1].split("\n[", 1)[0]
    return [
        f"{crate} must not depend on {bad}"
        for bad in sorted(FORBIDDEN_DEPS.get(crate, ()))
        if re.search(rf"^{re.escape(bad)}\s*=", deps, re.M)
    ]


def manifest_section(manifest, name):
    """The dependency names of one `[section]` of a Cargo.toml."""
    m = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", manifest, re.M | re.S)
    return re.findall(r"^([A-Za-z0-9_-]+)(?:\.workspace)?\s*=", m.group(1), re.M) if m else []


def rust_text(crate_dir, subdirs):
    parts = []
    for sub in subdirs:
        for dirpath, _, files in os.walk(os.path.join(crate_dir, sub)):
            parts += [open(os.path.join(dirpath, f), encoding="utf-8").read() for f in files if f.endswith(".rs")]
    return "\n".join(parts)


def phantom_deps(crate_dir):
    crate = os.path.basename(crate_dir)
    manifest = open(os.path.join(crate_dir, "Cargo.toml"), encoding="utf-8").read()
    problems = []
    for section, subdirs in (
        ("dependencies", ["src"]),
        ("dev-dependencies", ["src", "tests", "benches", "examples"]),
    ):
        text = rust_text(crate_dir, subdirs)
        for dep in manifest_section(manifest, section):
            ident = dep.replace("-", "_")
            if (crate, dep) not in UNNAMED_DEPS and not re.search(rf"\b{ident}\b", text):
                problems.append(f"{crate}: [{section}] {dep} is never named in {'/'.join(subdirs)}")
    return problems


def main():
    crates = sorted(
        os.path.join(ROOT, "crates", c) for c in os.listdir(os.path.join(ROOT, "crates"))
    )
    problems = []
    for crate_dir in crates:
        problems += long_files_and_functions(crate_dir) + crate_cycles(crate_dir) + forbidden_deps(crate_dir)
        problems += phantom_deps(crate_dir)
    for p in problems:
        print(os.path.relpath(p, ROOT) if p.startswith("/") else p, file=sys.stderr)
    if problems:
        print(f"check-layout: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("check-layout: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
