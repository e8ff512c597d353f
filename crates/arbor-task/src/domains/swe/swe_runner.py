# arbor swe-domain grader, run as `python3 -I -S /tests/run_tests.py`.
#
# The agent's code never runs in this process: a child interpreter imports
# the package and evaluates each call; this process compares the results
# with the expected values, which the child cannot see (the case file is
# deleted before the child starts and this process is made non-dumpable,
# so /proc/<pid>/mem and /proc/<pid>/fd are closed to it). Monkeypatching
# unittest, builtins or the comparison from inside the package is useless.
# Output is in `python -m unittest -v` format.
import ast
import json
import os
import subprocess
import sys

try:
    import ctypes

    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
except Exception:
    pass

with open("/tests/cases.json", encoding="utf-8") as f:
    spec = json.load(f)
os.remove("/tests/cases.json")

CHILD = r"""
import ast, importlib, json, sys
sys.path.insert(0, '/workspace')
req = json.loads(sys.stdin.read())
out = []
err = None
try:
    m = importlib.import_module(req['module'])
except BaseException as e:
    m = None
    err = 'import failed: %s: %s' % (type(e).__name__, e)
for f, a in req['calls']:
    if m is None:
        out.append(['error', err])
        continue
    try:
        out.append(['ok', repr(getattr(m, f)(ast.literal_eval(a)))])
    except BaseException as e:
        out.append(['error', '%s: %s' % (type(e).__name__, e)])
sys.stdout.write('\n@@ARBOR-RESULTS@@' + json.dumps(out) + '\n')
sys.stdout.flush()
"""

req = {"module": spec["module"], "calls": [[c["func"], c["args"]] for c in spec["cases"]]}
out = ""
try:
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD],
        input=json.dumps(req),
        capture_output=True,
        text=True,
        timeout=spec.get("timeout", 30),
        cwd="/workspace",
    )
    out = r.stdout
except subprocess.TimeoutExpired:
    print("child timed out")
except Exception as e:
    print("child failed: %s" % e)

results = []
if "@@ARBOR-RESULTS@@" in out:
    try:
        results = json.loads(out.rsplit("@@ARBOR-RESULTS@@", 1)[1].strip().splitlines()[0])
    except Exception:
        results = []

for i, c in enumerate(spec["cases"]):
    status = "ERROR"
    res = results[i] if i < len(results) else None
    if isinstance(res, list) and len(res) == 2 and res[0] == "ok" and isinstance(res[1], str):
        try:
            got = ast.literal_eval(res[1])
            want = ast.literal_eval(c["expected"])
            status = "ok" if got == want and isinstance(got, bool) == isinstance(want, bool) else "FAIL"
        except Exception:
            status = "FAIL"
    print("%s (%s) ... %s" % (c["name"], c["id"], status))
