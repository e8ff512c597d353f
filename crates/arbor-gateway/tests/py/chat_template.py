"""Compare the gateway's chat-template token ids with transformers' apply_chat_template.

Reads CASES_FILE (cases rendered by the Rust ChatTokenizer) and the calls recorded by a gateway
running with --tokenizer (and an upstream that returns no token ids).
"""
import json
import os

from _common import check, need, session_calls

need("jinja2")
transformers = need("transformers")
tok_dir = os.environ["TOKENIZER_DIR"]
try:
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
except Exception:  # older/newer class names: load the fast tokenizer directly
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
    tok.chat_template = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))["chat_template"]


def prepare(messages):
    out = []
    for m in messages:
        m = dict(m)
        for tc in m.get("tool_calls") or []:
            f = tc.get("function", {})
            if isinstance(f.get("arguments"), str):
                f["arguments"] = json.loads(f["arguments"])
        out.append(m)
    return out


def hf_ids(messages, tools, add_generation_prompt):
    ids = tok.apply_chat_template(prepare(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


cases = json.load(open(os.environ["CASES_FILE"]))
for i, c in enumerate(cases):
    hf = hf_ids(c["messages"], c.get("tools"), c["add_generation_prompt"])
    check(hf == c["ids"], f"case {i}: transformers {hf} != gateway {c['ids']}\n{tok.decode(hf)!r}\n{tok.decode(c['ids'])!r}")

rec = session_calls(os.environ["SESSION"])
check(len(rec) >= 2, "calls recorded")
for c in rec:
    check(c["tokens"]["source"] == "tokenizer", c["tokens"]["source"])
    req = c["upstream_request"]
    hf = hf_ids(req["messages"], req.get("tools"), True)
    check(hf == c["tokens"]["prompt"], f"call {c['index']}: prompt ids differ")
    comp = c["tokens"]["completions"][0]
    decoded = tok.decode(comp["ids"])
    text = comp["text"] or ""
    check(text in decoded, f"completion ids decode to {decoded!r}, text {text!r}")
print(json.dumps({"ok": True, "cases": len(cases), "calls": len(rec)}))
