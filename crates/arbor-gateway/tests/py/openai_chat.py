"""OpenAI Python SDK against the gateway: Chat Completions, plain and streaming, tool round trips."""
import json

from _common import check, gateway, need, session_calls

openai = need("openai")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# Session in the path.
client = openai.OpenAI(base_url=f"{gateway()}/s/py-chat/v1", api_key="sk-unused", max_retries=0)

r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], logprobs=True)
check(r.choices[0].message.content, "plain reply has text")
check(r.choices[0].logprobs and len(r.choices[0].logprobs.content) > 0, "logprobs returned when asked")

# Tool round trip, not streaming.
msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]
r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
choice = r.choices[0]
check(choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason}")
tc = choice.message.tool_calls[0]
check(tc.function.name == "get_weather", "tool name")
args = json.loads(tc.function.arguments)
msgs.append(choice.message.model_dump(exclude_none=True))
msgs.append({"role": "tool", "tool_call_id": tc.id, "content": json.dumps({"city": args["city"], "sky": "sunny"})})
r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
check("sunny" in r.choices[0].message.content, f"tool result used: {r.choices[0].message.content}")

# Session as the API key; tool round trip, streaming.
client2 = openai.OpenAI(base_url=f"{gateway()}/v1", api_key="py-chat-stream", max_retries=0)
msgs = [{"role": "user", "content": "Weather in Rome?"}]
stream = client2.chat.completions.create(model="m", messages=msgs, tools=TOOLS, stream=True,
                                         stream_options={"include_usage": True})
calls = {}
finish = None
usage = None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.finish_reason:
            finish = c.finish_reason
        for d in c.delta.tool_calls or []:
            e = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                e["id"] = d.id
            if d.function and d.function.name:
                e["name"] += d.function.name
            if d.function and d.function.arguments:
                e["arguments"] += d.function.arguments
check(finish == "tool_calls", f"stream finish {finish}")
check(usage is not None and usage.completion_tokens > 0, "usage chunk")
tc = calls[0]
json.loads(tc["arguments"])
msgs.append({"role": "assistant", "tool_calls": [{"id": tc["id"], "type": "function",
             "function": {"name": tc["name"], "arguments": tc["arguments"]}}]})
msgs.append({"role": "tool", "tool_call_id": tc["id"], "content": "foggy"})
text = ""
with client2.chat.completions.stream(model="m", messages=msgs, tools=TOOLS) as s:
    for ev in s:
        if ev.type == "content.delta":
            text += ev.delta
    final = s.get_final_completion()
check("foggy" in text and final.choices[0].message.content == text, f"streamed text {text!r}")

# What was recorded.
for session, n in (("py-chat", 3), ("py-chat-stream", 2)):
    rec = session_calls(session)
    check(len(rec) == n, f"{session}: {len(rec)} calls recorded")
    for c in rec:
        comp = c["tokens"]["completions"][0]
        check(c["tokens"]["source"] == "upstream", "token source")
        check(comp["logprobs"] is not None and len(comp["logprobs"]) == len(comp["ids"]), "completion logprobs")
        raw = bytes(i for i in comp["ids"] if i < 256).decode()
        check(comp["text"] in raw, f"ids line up with text: {raw!r} vs {comp['text']!r}")
    check(rec[-1]["branch"]["extends_previous"], f"{session}: round trip extends the previous call")
print(json.dumps({"ok": True}))
