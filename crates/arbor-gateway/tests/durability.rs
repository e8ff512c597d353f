//! SIGKILL in the middle of a load: after a restart on the same store, every call whose
//! response completed is recorded exactly once, and new calls continue the sessions.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_gateway::bench::stream_call;
use arbor_gateway::standin::{self, StandinConfig};
use serde_json::{Value, json};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn spawn_gateway(port: u16, upstream: &str, store: &std::path::Path) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_arbor-gateway"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            upstream,
            "--store",
        ])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn gateway");
    let p = Proc(child);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            && r.status() == 200
        {
            return p;
        }
        assert!(Instant::now() < deadline, "gateway did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn last_user(call: &Value) -> String {
    call["request"]["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}

async fn recorded(client: &reqwest::Client, base: &str, session: &str) -> Vec<Value> {
    let r = client
        .get(format!("{base}/sessions/{session}"))
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return Vec::new();
    }
    let v: Value = r.json().await.unwrap();
    v["calls"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_and_duplicates_nothing() {
    let sa = standin::spawn(
        ([127, 0, 0, 1], 0).into(),
        StandinConfig {
            reply_tokens: 12,
            chunk_delay: Duration::from_millis(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut gw = spawn_gateway(port, &sa.url(), &store).await;

    let sessions = 40;
    let calls = 50;
    let completed: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let client = client.clone();
        let completed = completed.clone();
        let url = format!("{base}/s/k{s}/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let mut messages = vec![json!({"role": "system", "content": "durability"})];
            for c in 0..calls {
                let marker = format!("k{s}-c{c}");
                messages.push(json!({"role": "user", "content": marker}));
                let stream = c % 2 == 0;
                let body = json!({"messages": messages, "stream": stream});
                let text = if stream {
                    stream_call(&client, &url, &body).await.ok()
                } else {
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status() == 200 => r.json::<Value>().await.ok().and_then(|v| {
                            v["choices"][0]["message"]["content"]
                                .as_str()
                                .map(String::from)
                        }),
                        _ => None,
                    }
                };
                match text {
                    Some(t) => {
                        completed
                            .lock()
                            .unwrap()
                            .entry(format!("k{s}"))
                            .or_default()
                            .push(marker);
                        messages.push(json!({"role": "assistant", "content": t}));
                    }
                    // The gateway is gone: stop this session (bounded loop either way).
                    None => return,
                }
            }
        }));
    }
    // Kill once a good part of the load completed, while calls are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: usize = completed.lock().unwrap().values().map(Vec::len).sum();
        if n >= 300 {
            break;
        }
        assert!(Instant::now() < deadline, "load too slow: {n} calls");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.0.kill().expect("SIGKILL");
    let _ = gw.0.wait();
    for t in tasks {
        t.await.unwrap();
    }
    let done = completed.lock().unwrap().clone();
    let total: usize = done.values().map(Vec::len).sum();
    assert!(total < sessions * calls, "the kill happened mid-load");

    let _gw2 = spawn_gateway(port, &sa.url(), &store).await;
    let mut recorded_total = 0;
    for s in 0..sessions {
        let session = format!("k{s}");
        let recs = recorded(&client, &base, &session).await;
        let markers: Vec<String> = recs.iter().map(last_user).collect();
        let unique: HashSet<&String> = markers.iter().collect();
        assert_eq!(
            unique.len(),
            markers.len(),
            "{session}: duplicated calls {markers:?}"
        );
        let idx: Vec<u64> = recs.iter().map(|r| r["index"].as_u64().unwrap()).collect();
        assert_eq!(
            idx,
            (0..recs.len() as u64).collect::<Vec<_>>(),
            "{session}: indices"
        );
        for m in done.get(&session).into_iter().flatten() {
            assert!(unique.contains(m), "{session}: completed call {m} lost");
        }
        // At most the one call in flight at the kill may be recorded without having completed.
        let answered = done.get(&session).map_or(0, Vec::len);
        assert!(
            recs.len() == answered || recs.len() == answered + 1,
            "{session}: {} vs {answered}",
            recs.len()
        );
        recorded_total += recs.len();
    }
    assert!(recorded_total >= total);
    // The sessions go on after the restart with the next indices.
    let before = recorded(&client, &base, "k0").await.len();
    let r = client
        .post(format!("{base}/s/k0/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "after restart"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let recs = recorded(&client, &base, "k0").await;
    assert_eq!(recs.len(), before + 1);
    assert_eq!(
        recs.last().unwrap()["index"].as_u64().unwrap(),
        before as u64
    );
    sa.shutdown().await;
}
