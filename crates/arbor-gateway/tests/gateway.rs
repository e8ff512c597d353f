//! The gateway over real HTTP against the stand-in upstream: Chat Completions (plain and
//! streaming), Messages and Responses translation, sessions, recording, errors, routing,
//! branch detection and trees.

mod common;

use std::time::Duration;

use arbor_gateway::standin::StandinConfig;
use common::*;
use serde_json::{Value, json};

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_plain_and_stream_are_recorded_with_tokens() {
    let env = Env::new().await;
    // Plain, with an unknown field and a query string; session from the path.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}],
                      "reasoning": {"effort": "low"}, "metadata": {"x": 1}});
    let (s, r) = env.post("/s/a/v1/chat/completions?beta=true", &body).await;
    assert_eq!(s, 200, "{r}");
    let text = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        r["choices"][0]["logprobs"].is_null(),
        "logprobs not asked, not returned"
    );
    assert!(r.get("prompt_token_ids").is_none() && r["choices"][0].get("token_ids").is_none());
    // Streaming, session from the bearer key, with logprobs and a usage chunk.
    let body2 = json!({"model": "m", "stream": true, "logprobs": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": text},
                     {"role": "user", "content": "again"}]});
    let r2 = env
        .client
        .post(env.url("/v1/chat/completions"))
        .bearer_auth("a")
        .json(&body2)
        .send()
        .await
        .unwrap();
    assert_eq!(r2.headers()["content-type"], "text/event-stream");
    let sse = r2.text().await.unwrap();
    let evs = sse_events(&sse);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = evs[..evs.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.1).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!streamed.is_empty());
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["logprobs"]["content"].is_array())
    );
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    // x-api-key addressing, third call.
    let body3 = json!({"messages": [{"role": "user", "content": "other"}]});
    let r3 = env
        .client
        .post(env.url("/v1/chat/completions"))
        .header("x-api-key", "b")
        .json(&body3)
        .send()
        .await
        .unwrap();
    assert_eq!(r3.status(), 200);

    let calls = env.calls("a").await;
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[1]["index"], 1);
    assert_eq!(
        calls[0]["request"]["reasoning"]["effort"], "low",
        "unknown fields kept"
    );
    assert_eq!(calls[1]["stream"], true);
    assert_eq!(
        calls[1]["response"]["choices"][0]["message"]["content"],
        streamed
    );
    for c in &calls {
        check_standin_tokens(c);
    }
    assert_eq!(calls[0]["tokens"]["completions"][0]["text"], text);
    assert_eq!(
        calls[1]["branch"]["extends_previous"], true,
        "{}",
        calls[1]["branch"]
    );
    assert_eq!(calls[1]["branch"]["parent"], 0);
    assert_eq!(env.calls("b").await.len(), 1);
    let (_, list) = env.get("/sessions").await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2);
    let (_, m) = env.get("/metrics").await;
    let m = m.as_str().unwrap();
    assert!(
        m.contains("arbor_gateway_requests_total{api=\"chat\"} 3"),
        "{m}"
    );
    assert!(m.contains("arbor_gateway_calls_recorded_total 3"));
    let (s, _) = env.get("/sessions/nope").await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_tool_call_round_trip_streaming() {
    let env = Env::new().await;
    let mut messages = vec![
        json!({"role": "developer", "content": "be useful"}),
        json!({"role": "user", "content": "weather in Paris?"}),
    ];
    let body =
        json!({"model": "m", "stream": true, "tools": [weather_tool()], "messages": messages});
    let (s, sse) = env.post_stream("/s/t/v1/chat/completions", &body).await;
    assert_eq!(s, 200);
    let evs = sse_events(&sse);
    let mut name = String::new();
    let mut args = String::new();
    let mut id = String::new();
    let mut finish = String::new();
    for (_, d) in &evs[..evs.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(tcs) = c["choices"][0]["delta"]["tool_calls"].as_array() {
            for tc in tcs {
                assert_eq!(tc["index"], 0);
                if let Some(i) = tc["id"].as_str() {
                    id = i.into();
                }
                if let Some(n) = tc["function"]["name"].as_str() {
                    name.push_str(n);
                }
                if let Some(a) = tc["function"]["arguments"].as_str() {
                    args.push_str(a);
                }
            }
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    assert_eq!(name, "get_weather");
    assert_eq!(finish, "tool_calls");
    let parsed: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(parsed["city"], "standin");
    // Assistant message without content, then the tool result.
    messages.push(
        json!({"role": "assistant", "tool_calls": [{"id": id, "type": "function",
        "function": {"name": name, "arguments": args}}]}),
    );
    messages.push(json!({"role": "tool", "tool_call_id": id, "content": "sunny"}));
    let body = json!({"model": "m", "tools": [weather_tool()], "messages": messages});
    let (s, r) = env.post("/s/t/v1/chat/completions", &body).await;
    assert_eq!(s, 200, "{r}");
    assert!(
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("sunny")
    );
    let calls = env.calls("t").await;
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        args
    );
    assert_eq!(
        calls[0]["upstream_request"]["messages"][0]["role"], "system",
        "developer mapped to system"
    );
    check_standin_tokens(&calls[0]);
    check_standin_tokens(&calls[1]);
    assert_eq!(
        calls[1]["branch"]["extends_previous"], true,
        "{}",
        calls[1]["branch"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_each_api_shape() {
    let env = Env::new().await;
    let r = env
        .client
        .post(env.url("/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (s, v) = env.post("/v1/messages", &json!({"model": "m"})).await;
    assert_eq!(s, 400);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // Non-function tools are refused clearly by default...
    let body = json!({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]});
    let (s, v) = env.post("/v1/responses", &body).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("web_search")
    );
    // ... and upstream failures become 502 in the caller's shape.
    let body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "[[fail]]"}]});
    let (s, v) = env.post("/v1/messages", &body).await;
    assert_eq!(s, 502, "{v}");
    assert_eq!(v["error"]["type"], "api_error");
    let (_, models) = env.get("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "standin");
    // Unknown paths and wrong methods answer in JSON; a doubled /v1 is named.
    let (s, v) = env
        .post("/s/abc/v1/v1/messages", &json!({"model": "m"}))
        .await;
    assert_eq!(s, 404, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("/v1 twice"), "{msg}");
    let (s, v) = env.get("/v1/chat/completions").await;
    assert_eq!(s, 405, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GET is not allowed"),
        "{v}"
    );
    // Nothing was recorded for failed calls.
    assert!(env.gw.store().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_tools_can_be_dropped() {
    let env = Env::with(vec![StandinConfig::default()], |c| {
        c.tool_policy = arbor_gateway::ToolPolicy::Drop
    })
    .await;
    let body = json!({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]});
    let (s, v) = env.post("/s/d/v1/responses", &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stream_event_sequence_and_tool_round_trip() {
    let env = Env::new().await;
    let tools = json!([{"name": "get_weather", "description": "w",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let mut messages =
        vec![json!({"role": "user", "content": [{"type": "text", "text": "weather?"}]})];
    let body = json!({"model": "claude-x", "max_tokens": 100, "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "tools": tools, "messages": messages, "stream": true});
    let (s, sse) = env.post_stream("/s/m/v1/messages", &body).await;
    assert_eq!(s, 200);
    let evs = sse_events(&sse);
    let names: Vec<&str> = evs.iter().map(|e| e.0.as_deref().unwrap_or("")).collect();
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let start: Value = serde_json::from_str(&evs[2].1).unwrap();
    assert_eq!(start["content_block"]["type"], "tool_use");
    let tool_id = start["content_block"]["id"].as_str().unwrap().to_string();
    let partial: String = evs
        .iter()
        .filter(|e| e.0.as_deref() == Some("content_block_delta"))
        .map(|e| {
            serde_json::from_str::<Value>(&e.1).unwrap()["delta"]["partial_json"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let input: Value = serde_json::from_str(&partial).unwrap();
    let delta: Value = serde_json::from_str(&evs[evs.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    messages.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "get_weather", "input": input}]}));
    messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "rainy"}]}));
    let body = json!({"model": "claude-x", "max_tokens": 100, "tools": tools, "messages": messages,
                      "system": [{"type": "text", "text": "sys"}]});
    let (s, r) = env.post("/s/m/v1/messages", &body).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["type"], "message");
    assert_eq!(r["stop_reason"], "end_turn");
    assert!(r["content"][0]["text"].as_str().unwrap().contains("rainy"));
    let calls = env.calls("m").await;
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["api"], "messages");
    assert_eq!(calls[0]["response"]["content"][0]["type"], "tool_use");
    check_standin_tokens(&calls[0]);
    check_standin_tokens(&calls[1]);
    assert_eq!(
        calls[1]["branch"]["extends_previous"], true,
        "{}",
        calls[1]["branch"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_event_sequence_and_tool_round_trip() {
    let env = Env::new().await;
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let mut input =
        vec![json!({"role": "user", "content": [{"type": "input_text", "text": "weather?"}]})];
    let body = json!({"model": "gpt-x", "instructions": "be brief", "tools": tools, "input": input, "stream": true, "store": false});
    let (s, sse) = env.post_stream("/s/r/v1/responses", &body).await;
    assert_eq!(s, 200);
    let evs = sse_events(&sse);
    let names: Vec<&str> = evs.iter().map(|e| e.0.as_deref().unwrap_or("")).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    assert!(names.contains(&"response.output_item.added"));
    assert!(names.contains(&"response.function_call_arguments.delta"));
    assert!(names.contains(&"response.output_item.done"));
    let seqs: Vec<u64> = evs
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.1).unwrap()["sequence_number"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    let done: Value = serde_json::from_str(&evs.last().unwrap().1).unwrap();
    let fc = done["response"]["output"][0].clone();
    assert_eq!(fc["type"], "function_call");
    input.push(fc.clone());
    input.push(
        json!({"type": "function_call_output", "call_id": fc["call_id"], "output": "cloudy"}),
    );
    let body =
        json!({"model": "gpt-x", "instructions": "be brief", "tools": tools, "input": input});
    let (s, r) = env.post("/s/r/v1/responses", &body).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["object"], "response");
    assert_eq!(r["output"][0]["type"], "message");
    assert!(
        r["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("cloudy")
    );
    let calls = env.calls("r").await;
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["response"]["output"][0]["call_id"], fc["call_id"]);
    check_standin_tokens(&calls[1]);
    assert_eq!(
        calls[1]["branch"]["extends_previous"], true,
        "{}",
        calls[1]["branch"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_retries_before_first_byte_and_keeps_sessions() {
    // Upstream 0 is down (503); 1 and 2 work.
    let down = StandinConfig {
        name: "down".into(),
        fail_status: Some(503),
        ..Default::default()
    };
    let a = StandinConfig {
        name: "a".into(),
        ..Default::default()
    };
    let b = StandinConfig {
        name: "b".into(),
        ..Default::default()
    };
    let env = Env::with(vec![down, a, b], |_| {}).await;
    for s in 0..6 {
        for c in 0..3 {
            let body = json!({"messages": [{"role": "user", "content": format!("s{s} c{c}")}], "stream": c % 2 == 1});
            let r = env
                .client
                .post(env.url(&format!("/s/sess{s}/v1/chat/completions")))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let _ = r.text().await.unwrap();
        }
    }
    let mut used = std::collections::HashSet::new();
    for s in 0..6 {
        let calls = env.calls(&format!("sess{s}")).await;
        assert_eq!(calls.len(), 3);
        let ups: std::collections::HashSet<&str> = calls
            .iter()
            .map(|c| c["upstream"].as_str().unwrap())
            .collect();
        assert_eq!(ups.len(), 1, "a session stays on one upstream: {ups:?}");
        let up = *ups.iter().next().unwrap();
        assert_ne!(
            up,
            env.standins[0].url(),
            "the failed upstream never answered"
        );
        used.insert(up.to_string());
    }
    assert_eq!(used.len(), 2, "sessions spread over the healthy upstreams");
    assert!(
        env.standins[0].requests() >= 1,
        "the failing upstream was tried"
    );
    let (_, m) = env.get("/metrics").await;
    assert!(
        !m.as_str()
            .unwrap()
            .contains("arbor_gateway_upstream_retries_total 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_stream_is_reported_and_not_recorded() {
    let env = Env::new().await;
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "[[die]]"}]});
    let (s, sse) = env.post_stream("/s/x/v1/chat/completions", &body).await;
    assert_eq!(s, 200, "the first chunk arrived, so the stream had started");
    let evs = sse_events(&sse);
    assert!(evs.iter().all(|e| e.1 != "[DONE]"));
    assert!(evs.last().unwrap().1.contains("\"error\""), "{sse}");
    // Same in the Messages shape.
    let body = json!({"model": "m", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "[[die]]"}]});
    let (_, sse) = env.post_stream("/s/x/v1/messages", &body).await;
    assert_eq!(sse_events(&sse).last().unwrap().0.as_deref(), Some("error"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(env.gw.store().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_makes_a_branch_and_tree_paths_reproduce_calls() {
    let env = Env::new().await;
    let sys = json!({"role": "system", "content": "You are an agent."});
    let mut messages = vec![sys.clone(), json!({"role": "user", "content": "step one"})];
    let mut texts = Vec::new();
    for k in 0..3 {
        let (s, r) = env
            .post("/s/c/v1/chat/completions", &json!({"messages": messages}))
            .await;
        assert_eq!(s, 200);
        let t = r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        texts.push(t.clone());
        messages.push(json!({"role": "assistant", "content": t}));
        messages.push(json!({"role": "user", "content": format!("step {}", k + 2)}));
    }
    // Compaction: keep the system prompt, replace the history by a summary.
    let compacted = vec![
        sys,
        json!({"role": "user", "content": "Summary of earlier work. Continue."}),
    ];
    let (s, _) = env
        .post("/s/c/v1/chat/completions", &json!({"messages": compacted}))
        .await;
    assert_eq!(s, 200);
    let calls = env.calls("c").await;
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[1]["branch"]["extends_previous"], true);
    assert_eq!(calls[2]["branch"]["extends_previous"], true);
    assert_eq!(calls[3]["branch"]["extends_previous"], false);
    assert!(calls[3]["branch"]["parent"].is_null());
    let (s, tree) = env.get("/sessions/c/tree").await;
    assert_eq!(s, 200, "{tree}");
    assert_eq!(tree["branches"].as_array().unwrap().len(), 1);
    assert_eq!(tree["branches"][0]["call"], 3);
    let t: arbor_tree::TrajectoryTree = serde_json::from_value(tree["tree"].clone()).unwrap();
    let paths = t.paths();
    assert_eq!(paths.len(), 4);
    // Two roots would mean no shared prefix; the shared system prompt makes one root with a branch.
    assert_eq!(t.roots().len(), 1);
    assert!(
        t.nodes().iter().any(|n| n.children.len() >= 2),
        "the tree branches"
    );
    assert!(t.unique_tokens() < t.flat_tokens());
    for (p, c) in paths.iter().zip(&calls) {
        let mut expect = ids(&c["tokens"]["prompt"]);
        let comp = ids(&c["tokens"]["completions"][0]["ids"]);
        let np = expect.len();
        expect.extend(&comp);
        assert_eq!(
            p.tokens.iter().map(|&x| x as u64).collect::<Vec<_>>(),
            expect,
            "path {}",
            p.id
        );
        assert_eq!(p.id, c["id"].as_str().unwrap());
        assert!(p.loss_mask[..np].iter().all(|m| !m) && p.loss_mask[np..].iter().all(|m| *m));
        let lps: Vec<f64> = c["tokens"]["completions"][0]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (a, b) in p.logprobs[np..].iter().zip(&lps) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_always_answered_with_a_stream() {
    let json_only = StandinConfig {
        ignore_stream: true,
        ..Default::default()
    };
    let env = Env::with(vec![json_only], |_| {}).await;
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = env
        .client
        .post(env.url("/s/j/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let evs = sse_events(&r.text().await.unwrap());
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let text: String = evs[..evs.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.1).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    let calls = env.calls("j").await;
    assert_eq!(
        calls[0]["response"]["choices"][0]["message"]["content"],
        text
    );
    check_standin_tokens(&calls[0]);
    let body = json!({"model": "m", "max_tokens": 9, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (_, sse) = env.post_stream("/s/j/v1/messages", &body).await;
    assert_eq!(
        sse_events(&sse).last().unwrap().0.as_deref(),
        Some("message_stop")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_timeout_ends_the_stream_with_an_error() {
    let slow = StandinConfig {
        chunk_delay: Duration::from_millis(400),
        ..Default::default()
    };
    let env = Env::with(vec![slow], |c| {
        c.idle_stream_timeout = Duration::from_millis(100)
    })
    .await;
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (s, sse) = env.post_stream("/s/i/v1/chat/completions", &body).await;
    assert_eq!(s, 200);
    let last = sse_events(&sse).pop().unwrap();
    assert!(last.1.contains("idle"), "{sse}");
    assert!(env.gw.store().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_recorded_per_choice_and_become_tree_paths() {
    let env = Env::new().await;
    let body = json!({"n": 2, "messages": [{"role": "user", "content": "two please"}]});
    let (s, r) = env.post("/s/n/v1/chat/completions", &body).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    let calls = env.calls("n").await;
    let comps = calls[0]["tokens"]["completions"].as_array().unwrap();
    assert_eq!(comps.len(), 2);
    assert_ne!(comps[0]["ids"], comps[1]["ids"]);
    let (_, tree) = env.get("/sessions/n/tree").await;
    assert_eq!(tree["path_ids"], json!(["n/0", "n/0.1"]));
    let t: arbor_tree::TrajectoryTree = serde_json::from_value(tree["tree"].clone()).unwrap();
    assert_eq!(t.roots().len(), 1, "the two choices share their prompt");
    // count_tokens answers (an estimate without a tokenizer).
    let (s, v) = env
        .post(
            "/s/n/v1/messages/count_tokens",
            &json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(v["input_tokens"].as_u64().unwrap() > 0);
    let r = env
        .client
        .get(env.url("/v1/models"))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["type"], "model");
}

/// Tools as Codex sends them: function tools grouped in a `namespace` tool (here an MCP
/// server's five tools), next to a plain function tool.
fn codex_tools() -> Value {
    let f = |name: &str, prop: &str| {
        json!({"type": "function", "name": name, "description": format!("{name} on the workspace"),
               "strict": false, "parameters": {"type": "object", "properties": {prop: {"type": "string"}},
               "required": [prop], "additionalProperties": false}})
    };
    json!([
        {"type": "namespace", "name": "mcp__fs__", "description": "Tools in the mcp__fs__ namespace.",
         "tools": [f("read_file", "path"), f("write_file", "path"), f("list_dir", "path"),
                   f("search", "query"), f("stat", "path")]},
        {"type": "function", "name": "exec_command", "description": "Run a command.", "strict": false,
         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}
    ])
}

/// The tool names the upstream saw: the stand-in renders them into its prompt ids.
fn upstream_tool_names(call: &Value) -> String {
    let prompt = standin_decode(&ids(&call["tokens"]["prompt"]));
    let start = prompt.find("<|im_start|>tools\n").expect("tools turn") + 18;
    let end = start
        + prompt[start..]
            .find("<|im_end|>")
            .expect("end of tools turn");
    prompt[start..end].to_string()
}

const FLAT_NAMES: &str = "mcp__fs__read_file,mcp__fs__write_file,mcp__fs__list_dir,mcp__fs__search,mcp__fs__stat,exec_command";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_tools_are_flattened_upstream_and_calls_mapped_back() {
    let env = Env::new().await;
    let tools = codex_tools();
    let mut input = vec![
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "read it"}]}),
    ];
    let body = json!({"model": "gpt-x", "instructions": "be brief", "tools": tools, "tool_choice": "auto",
        "parallel_tool_calls": false, "input": input, "stream": false, "store": false});
    let (s, r) = env.post("/s/ns/v1/responses", &body).await;
    assert_eq!(s, 200, "{r}");
    let fc = r["output"][0].clone();
    assert_eq!(fc["type"], "function_call", "{r}");
    assert_eq!(fc["namespace"], "mcp__fs__", "{fc}");
    assert_eq!(fc["name"], "read_file", "{fc}");
    assert_eq!(fc["arguments"], r#"{"path":"standin"}"#);
    // The client sends the call back in its history, with its namespace.
    input.push(fc.clone());
    input
        .push(json!({"type": "function_call_output", "call_id": fc["call_id"], "output": "hello"}));
    let body = json!({"model": "gpt-x", "instructions": "be brief", "tools": tools, "input": input,
        "stream": true, "store": false});
    let (s, sse) = env.post_stream("/s/ns/v1/responses", &body).await;
    assert_eq!(s, 200);
    let last: Value = serde_json::from_str(&sse_events(&sse).last().unwrap().1).unwrap();
    assert_eq!(last["type"], "response.completed", "{last}");
    assert!(
        last["response"]["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("hello")
    );
    let calls = env.calls("ns").await;
    assert_eq!(calls.len(), 2);
    for c in &calls {
        check_standin_tokens(c);
        assert_eq!(upstream_tool_names(c), FLAT_NAMES);
    }
    let up = &calls[1]["upstream_request"]["messages"];
    assert_eq!(
        up[2]["tool_calls"][0]["function"]["name"],
        "mcp__fs__read_file"
    );
    // The history was sent upstream under the name the model used: the second prompt extends
    // the first call's prompt + completion token for token.
    assert_eq!(
        calls[1]["branch"]["extends_previous"], true,
        "{}",
        calls[1]["branch"]
    );
    assert_eq!(calls[0]["response"]["output"][0]["namespace"], "mcp__fs__");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_calls_stream_back_namespaced_and_tool_choice_names_one() {
    let env = Env::new().await;
    let body = json!({"model": "gpt-x", "tools": codex_tools(), "stream": true,
        "tool_choice": {"type": "function", "namespace": "mcp__fs__", "name": "stat"},
        "input": [{"role": "user", "content": "stat it"}]});
    let (s, sse) = env.post_stream("/s/nss/v1/responses", &body).await;
    assert_eq!(s, 200);
    let evs: Vec<Value> = sse_events(&sse)
        .iter()
        .map(|e| serde_json::from_str(&e.1).unwrap())
        .collect();
    let of = |ty: &str| evs.iter().find(|e| e["type"] == ty).cloned().unwrap();
    let added = of("response.output_item.added");
    assert_eq!(added["item"]["namespace"], "mcp__fs__", "{added}");
    assert_eq!(added["item"]["name"], "stat");
    assert_eq!(of("response.function_call_arguments.done")["name"], "stat");
    let done = of("response.output_item.done");
    assert_eq!(done["item"]["namespace"], "mcp__fs__");
    assert_eq!(done["item"]["arguments"], r#"{"path":"standin"}"#);
    let completed = of("response.completed");
    let item = &completed["response"]["output"][0];
    assert_eq!(
        (item["namespace"].as_str(), item["name"].as_str()),
        (Some("mcp__fs__"), Some("stat"))
    );
    let calls = env.calls("nss").await;
    assert_eq!(upstream_tool_names(&calls[0]), FLAT_NAMES);
    assert_eq!(
        calls[0]["upstream_request"]["tool_choice"]["function"]["name"],
        "mcp__fs__stat"
    );
    assert_eq!(calls[0]["response"]["output"][0]["namespace"], "mcp__fs__");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_unsupported_tools_keeps_namespaced_functions() {
    let mut tools = codex_tools();
    tools[0]["tools"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}}));
    tools
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "web_search"}));
    let body = json!({"model": "gpt-x", "tools": tools, "input": "go"});
    // Refused by default, naming the tool that is not a function...
    let env = Env::new().await;
    let (s, v) = env.post("/s/d/v1/responses", &body).await;
    assert_eq!(s, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`custom` in namespace `mcp__fs__`"), "{msg}");
    // ... and dropped alone when asked: the namespace's functions stay.
    let env = Env::with(vec![StandinConfig::default()], |c| {
        c.tool_policy = arbor_gateway::ToolPolicy::Drop
    })
    .await;
    let (s, v) = env.post("/s/d/v1/responses", &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["output"][0]["namespace"], "mcp__fs__", "{v}");
    assert_eq!(upstream_tool_names(&env.calls("d").await[0]), FLAT_NAMES);
}

/// POSTs raw bytes; returns status, headers and the body as JSON (a string if it is not).
async fn post_raw(
    env: &Env,
    path: &str,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = env
        .client
        .post(env.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_anthropic_error(v: &Value, ty: &str, needle: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], ty, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "{needle:?} not in {v}");
}

fn assert_openai_error(v: &Value, ty: &str, needle: &str) {
    assert_eq!(v["error"]["type"], ty, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "{needle:?} not in {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_json_in_the_callers_shape() {
    let env = Env::with(vec![StandinConfig::default()], |c| c.max_body_bytes = 1024).await;
    // A body over the limit (axum's own rejection).
    let big = serde_json::to_vec(
        &json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(2000)}]}),
    )
    .unwrap();
    let (s, _, v) = post_raw(&env, "/s/a/v1/messages", big.clone()).await;
    assert_eq!(s, 413);
    assert_anthropic_error(&v, "invalid_request_error", "length limit");
    let (s, _, v) = post_raw(&env, "/v1/chat/completions", big).await;
    assert_eq!(s, 413);
    assert_openai_error(&v, "invalid_request_error", "length limit");
    // A session that is not valid UTF-8 once percent-decoded (axum's path rejection).
    let (s, _, v) = post_raw(&env, "/s/%FF/v1/messages", b"{}".to_vec()).await;
    assert_eq!(s, 400, "{v}");
    assert_anthropic_error(&v, "invalid_request_error", "UTF-8");
    // Bad JSON, unknown paths and wrong methods, each in the shape of its API.
    let (s, _, v) = post_raw(&env, "/v1/messages", b"{not json".to_vec()).await;
    assert_eq!(s, 400);
    assert_anthropic_error(&v, "invalid_request_error", "not valid JSON");
    let (s, _, v) = post_raw(&env, "/s/abc/v1/v1/messages", b"{}".to_vec()).await;
    assert_eq!(s, 404);
    assert_anthropic_error(&v, "not_found_error", "/v1 twice");
    let (s, v) = env.get("/v1/messages").await;
    assert_eq!(s, 405);
    assert_anthropic_error(&v, "invalid_request_error", "GET is not allowed");
    let (s, v) = env.get("/v1/responses").await;
    assert_eq!(s, 405);
    assert_openai_error(&v, "invalid_request_error", "GET is not allowed");
    let (s, v) = env.get("/sessions/nobody").await;
    assert_eq!(s, 404);
    assert_openai_error(&v, "not_found_error", "nobody");
    // An upstream's own refusal keeps its status and comes in the caller's shape.
    let refusing = Env::with(
        vec![StandinConfig {
            fail_status: Some(409),
            ..Default::default()
        }],
        |_| {},
    )
    .await;
    let body =
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let (s, v) = refusing.post("/v1/messages", &body).await;
    assert_eq!(s, 409, "{v}");
    assert_anthropic_error(&v, "invalid_request_error", "upstream refused");
    let (s, v) = refusing
        .post("/v1/responses", &json!({"model": "m", "input": "hi"}))
        .await;
    assert_eq!(s, 409, "{v}");
    assert_openai_error(&v, "invalid_request_error", "upstream refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_caps_refuse_calls_with_a_code_and_survive_a_restart() {
    let caps = arbor_gateway::SessionCaps {
        max_calls: Some(2),
        max_tokens: None,
    };
    let env = Env::with(vec![StandinConfig::default()], |c| c.caps = caps).await;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let (s, v) = env.post("/s/loop/v1/chat/completions", &chat).await;
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(env.gw.cap_hit("loop"), None);
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    let (s, headers, v) = post_raw(
        &env,
        "/s/loop/v1/chat/completions",
        serde_json::to_vec(&stream).unwrap(),
    )
    .await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(v["error"]["code"], "session_call_cap", "{v}");
    assert_openai_error(
        &v,
        "rate_limit_error",
        "call cap: the session made 2 model calls, the cap is 2",
    );
    let hit = env.gw.cap_hit("loop").expect("cap hit remembered");
    assert_eq!(
        (hit.cap, hit.limit, hit.used),
        (arbor_gateway::CapKind::Calls, 2, 2)
    );
    // Other sessions are not affected; refused calls are not recorded.
    let (s, _) = env.post("/s/other/v1/chat/completions", &chat).await;
    assert_eq!(s, 200);
    assert_eq!(env.calls("loop").await.len(), 2);
    // A gateway reopened on the same store counts the recorded calls.
    let store = env.dir.path().join("store");
    let upstream = env.standins[0].url();
    env.gw.shutdown().await.unwrap();
    let mut cfg =
        arbor_gateway::GatewayConfig::new(([127, 0, 0, 1], 0).into(), vec![upstream], store);
    cfg.caps = caps;
    let gw = arbor_gateway::start(cfg).await.unwrap();
    let r = env
        .client
        .post(format!("{}/s/loop/v1/messages", gw.url()))
        .json(&json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_anthropic_error(&v, "rate_limit_error", "session_call_cap: call cap");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cap_refuses_the_call_after_the_one_that_crossed_it() {
    let caps = arbor_gateway::SessionCaps {
        max_calls: None,
        max_tokens: Some(20),
    };
    let env = Env::with(vec![StandinConfig::default()], |c| c.caps = caps).await;
    let body = json!({"model": "m", "input": "hello there"});
    let (s, v) = env.post("/s/t/v1/responses", &body).await;
    assert_eq!(s, 200, "{v}");
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used >= 20, "{v}");
    let (s, v) = env.post("/s/t/v1/responses", &body).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "session_token_cap");
    let hit = env.gw.cap_hit("t").unwrap();
    assert_eq!((hit.cap, hit.used), (arbor_gateway::CapKind::Tokens, used));
}
