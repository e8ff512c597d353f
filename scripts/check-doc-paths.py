#!/usr/bin/env python3
"""Every repository file a doc or a code comment names must exist (run by scripts/test.sh).

Checked: Markdown files and `//` comments in Rust sources. A name counts when it starts with a
top-level folder of the repository (crates/ docs/ examples/ scripts/), is a Rust source
(`*.rs`), or is an upper-case Markdown name (`ARCHITECTURE.md`); it must match the end of a
tracked path. A section citation (`NAME §N`) must cite a tracked file by its path.
Names of files that arbor reads or writes at run time (`results.jsonl`,
`instruction.md`, a task's `tests/test.sh`) are not checked.
"""
import os
import re
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# The word before a section sign: it must be a tracked file (`docs/recipe.md §3`).
SECTION_CITE = re.compile(r"([\w./-]+\.md|\b[A-Z][A-Z_]+) §\s*\d")
TOP_DIRS = ("crates/", "docs/", "examples/", "scripts/")
NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.(?:rs|md|sh|py|toml|json|jsonl|svg))(?![\w/])")


def tracked_files():
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [line for line in out.splitlines() if line]


def texts(files):
    for path in files:
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue
        if path.endswith(".md"):
            yield path, open(full, encoding="utf-8").read()
        elif path.endswith(".rs"):
            lines = open(full, encoding="utf-8").read().split("\n")
            yield path, "\n".join(l.split("//", 1)[1] if "//" in l else "" for l in lines)


def wanted(name):
    if name.startswith(TOP_DIRS):
        return True
    return name.endswith(".rs") or re.fullmatch(r"[A-Z_]+\.md", name) is not None


def main():
    files = tracked_files()
    suffixes = set()
    for f in files:
        parts = f.split("/")
        for i in range(len(parts)):
            suffixes.add("/".join(parts[i:]))
    missing = []
    for path, text in texts(files):
        for lineno, line in enumerate(text.split("\n"), 1):
            for m in NAME.finditer(line):
                name = m.group(1).lstrip("./")
                if wanted(name) and name not in suffixes:
                    missing.append(f"{path}:{lineno}: names `{name}`, which is not in the repository")
            for m in SECTION_CITE.finditer(line):
                if m.group(1).lstrip("./") not in suffixes:
                    missing.append(f"{path}:{lineno}: cites a section of `{m.group(1)}`, not a file in the repository")
    for line in missing:
        print(line, file=sys.stderr)
    if missing:
        print(f"check-doc-paths: {len(missing)} missing file(s)", file=sys.stderr)
        return 1
    print("check-doc-paths: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
