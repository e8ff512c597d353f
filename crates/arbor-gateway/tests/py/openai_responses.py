"""OpenAI Python SDK against the gateway: Responses, plain and streaming, tool round trips."""
import json

from _common import check, gateway, need, session_calls

openai = need("openai")

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
          "strict": False}]

client = openai.OpenAI(base_url=f"{gateway()}/s/py-resp/v1", api_key="sk-unused", max_retries=0)
r = client.responses.create(model="gpt-test", instructions="Be brief.", input="hello", store=False)
check(r.status == "completed" and r.output_text, f"plain reply {r.output_text!r}")

# Tool round trip, not streaming.
inp = [{"role": "user", "content": "Weather in Cairo?"}]
r = client.responses.create(model="gpt-test", input=inp, tools=TOOLS, store=False)
fc = [o for o in r.output if o.type == "function_call"][0]
check(fc.name == "get_weather", fc.name)
json.loads(fc.arguments)
inp += [o.model_dump(exclude_none=True) for o in r.output]
inp.append({"type": "function_call_output", "call_id": fc.call_id, "output": "hot"})
r = client.responses.create(model="gpt-test", input=inp, tools=TOOLS, store=False)
check("hot" in r.output_text, r.output_text)

# Session as the API key; tool round trip, streaming.
client2 = openai.OpenAI(base_url=f"{gateway()}/v1", api_key="py-resp-stream", max_retries=0)
inp = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Quito?"}]}]
types = []
with client2.responses.stream(model="gpt-test", input=inp, tools=TOOLS, store=False) as s:
    for ev in s:
        types.append(ev.type)
    final = s.get_final_response()
check(types[0] == "response.created" and types[-1] == "response.completed", types)
check("response.function_call_arguments.delta" in types, types)
fc = [o for o in final.output if o.type == "function_call"][0]
json.loads(fc.arguments)
inp += [o.model_dump(exclude_none=True) for o in final.output]
inp.append({"type": "function_call_output", "call_id": fc.call_id, "output": "mild"})
text = ""
stream = client2.responses.create(model="gpt-test", input=inp, tools=TOOLS, stream=True, store=False)
kinds = []
for ev in stream:
    kinds.append(ev.type)
    if ev.type == "response.output_text.delta":
        text += ev.delta
check("mild" in text, text)
for k in ("response.output_item.added", "response.output_text.delta", "response.output_item.done", "response.completed"):
    check(k in kinds, f"{k} in {kinds}")

for session, n in (("py-resp", 3), ("py-resp-stream", 2)):
    rec = session_calls(session)
    check(len(rec) == n, f"{session}: {len(rec)} calls")
    for c in rec:
        check(c["api"] == "responses", c["api"])
        comp = c["tokens"]["completions"][0]
        check(comp["logprobs"] is not None and len(comp["logprobs"]) == len(comp["ids"]), "completion logprobs")
    check(rec[-1]["branch"]["extends_previous"], f"{session}: round trip extends the previous call")
print(json.dumps({"ok": True}))
