#!/usr/bin/python3 -IS
"""search: full-text search over the task's document collection.

usage: search QUERY...        ranked results (id, title, snippet)
       search -n K QUERY...   at most K results (default 5)
       search --open ID       print one document in full
"""
import json
import math
import re
import sys

CORPUS = "/srv/corpus/docs.jsonl"


def load():
    docs = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                docs.append(json.loads(line))
    return docs


def tokens(s):
    return re.findall(r"[a-z0-9]+", s.lower())


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    docs = load()
    if argv[0] == "--open":
        for d in docs:
            if len(argv) > 1 and d["id"] == argv[1]:
                print("# " + d["title"])
                print(d["text"])
                return 0
        print("no document with id %r" % (argv[1] if len(argv) > 1 else ""))
        return 1
    k = 5
    if argv[0] == "-n" and len(argv) > 2:
        try:
            k = int(argv[1])
        except ValueError:
            pass
        argv = argv[2:]
    q = [t for t in tokens(" ".join(argv)) if len(t) > 1]
    df = {}
    toks = []
    for d in docs:
        ts = tokens(d["title"] + " " + d["text"])
        toks.append(ts)
        for t in set(ts):
            df[t] = df.get(t, 0) + 1
    n = len(docs)
    scored = []
    for d, ts in zip(docs, toks):
        s = 0.0
        for t in q:
            tf = ts.count(t)
            if tf:
                s += (1 + math.log(tf)) * math.log(1 + n / df[t])
        if s > 0:
            scored.append((s, d))
    scored.sort(key=lambda x: -x[0])
    if not scored:
        print("no results")
        return 0
    for s, d in scored[:k]:
        print("[%s] %s" % (d["id"], d["title"]))
        print("    " + d["text"][:240])
    return 0


sys.exit(main(sys.argv[1:]))
