"""Anthropic Python SDK against the gateway: Messages, plain and streaming, tool round trips."""
import json

from _common import check, gateway, need, session_calls

anthropic = need("anthropic")

TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

# Session in the path (base URL without /v1, as Anthropic clients use it).
client = anthropic.Anthropic(base_url=f"{gateway()}/s/py-msg", api_key="sk-unused", max_retries=0)
r = client.messages.create(model="claude-test", max_tokens=64, system="Be brief.",
                           messages=[{"role": "user", "content": "hello"}])
check(r.content[0].type == "text" and r.content[0].text, "plain reply")
check(r.stop_reason == "end_turn", r.stop_reason)

# Tool round trip, not streaming.
msgs = [{"role": "user", "content": "Weather in Oslo?"}]
r = client.messages.create(model="claude-test", max_tokens=64, tools=TOOLS, messages=msgs)
check(r.stop_reason == "tool_use", r.stop_reason)
tu = [b for b in r.content if b.type == "tool_use"][0]
check(tu.name == "get_weather" and "city" in tu.input, "tool_use block")
msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]})
msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu.id, "content": "snowy"}]})
r = client.messages.create(model="claude-test", max_tokens=64, tools=TOOLS, messages=msgs)
check("snowy" in r.content[0].text, r.content[0].text)

# Session as x-api-key; tool round trip, streaming (the SDK's stream helper accumulates events).
client2 = anthropic.Anthropic(base_url=gateway(), api_key="py-msg-stream", max_retries=0)
msgs = [{"role": "user", "content": "Weather in Lima?"}]
events = []
with client2.messages.stream(model="claude-test", max_tokens=64, tools=TOOLS, messages=msgs) as s:
    for ev in s:
        events.append(ev.type)
    final = s.get_final_message()
check(events[0] == "message_start", events[:3])
check("content_block_start" in events and "message_stop" in events, events)
check(final.stop_reason == "tool_use", final.stop_reason)
tu = [b for b in final.content if b.type == "tool_use"][0]
check(isinstance(tu.input, dict) and "city" in tu.input, f"streamed tool input {tu.input}")
msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]})
msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu.id, "content": [{"type": "text", "text": "windy"}]}]})
with client2.messages.stream(model="claude-test", max_tokens=64, tools=TOOLS, messages=msgs) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
check("windy" in text and final.stop_reason == "end_turn", text)

for session, n in (("py-msg", 3), ("py-msg-stream", 2)):
    rec = session_calls(session)
    check(len(rec) == n, f"{session}: {len(rec)} calls")
    for c in rec:
        check(c["api"] == "messages", c["api"])
        comp = c["tokens"]["completions"][0]
        check(comp["logprobs"] is not None and len(comp["logprobs"]) == len(comp["ids"]), "completion logprobs")
        raw = bytes(i for i in comp["ids"] if i < 256).decode()
        check(comp["text"] in raw, "ids line up with text")
    check(rec[-1]["branch"]["extends_previous"], f"{session}: round trip extends the previous call")
print(json.dumps({"ok": True}))
