//! What the gateway's store writes, `arbor-trace` reads back: the records as appended, and a
//! branching session (branch info computed as the recorder computes it) as one path per call.

use arbor_gateway::Store;
use arbor_gateway::recorder::detect_branch;
use arbor_trace::record::{Api, CallRecord, CompletionTokens, TokenSource, Tokens};
use serde_json::json;

fn call(index: u32, prompt: &[u32], completion: &[u32], earlier: &[Vec<u32>]) -> CallRecord {
    CallRecord {
        v: arbor_trace::record::RECORD_VERSION,
        id: format!("s/{index}"),
        session: "s".into(),
        index,
        api: Api::Responses,
        stream: true,
        started_ms: 1,
        finished_ms: 2,
        upstream: "http://u".into(),
        upstream_id: None,
        model: None,
        request: json!({"z": 1, "a": [1, 2]}),
        upstream_request: json!({}),
        response: json!({}),
        usage: None,
        tokens: Tokens {
            source: TokenSource::Upstream,
            prompt: prompt.to_vec(),
            completions: vec![CompletionTokens {
                index: 0,
                ids: completion.to_vec(),
                logprobs: Some(vec![-0.25; completion.len()]),
                text: "t".into(),
                finish_reason: None,
            }],
        },
        branch: detect_branch(earlier, prompt),
    }
}

#[tokio::test]
async fn a_store_the_gateway_wrote_reads_back_through_arbor_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let mut records = Vec::new();
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    for (prompt, completion) in [
        (vec![1, 2, 3], vec![4]),
        (vec![1, 2, 3, 4, 5], vec![6]),
        (vec![1, 2, 7], vec![8]), // history rewritten: a branch
    ] {
        let rec = call(records.len() as u32, &prompt, &completion, &seqs);
        store.append(&rec).await.unwrap();
        seqs.push(rec.sequence(0));
        records.push(rec);
    }
    store.close();
    assert!(records[1].branch.as_ref().unwrap().extends_previous);
    assert!(!records[2].branch.as_ref().unwrap().extends_previous);

    assert_eq!(arbor_trace::store::read_calls(dir.path()).unwrap(), records);
    let seqs = arbor_gateway::tree::store_sequences(dir.path()).unwrap();
    let tree = arbor_tree::TrajectoryTree::from_sequences(&seqs).unwrap();
    assert_eq!(tree.num_paths(), 3);
    assert_eq!(tree.unique_tokens(), 6 + 2);
    assert_eq!(seqs[2].loss_mask, [false, false, false, true]);
    assert_eq!(seqs[2].logprobs, [0.0, 0.0, 0.0, -0.25]);
}
