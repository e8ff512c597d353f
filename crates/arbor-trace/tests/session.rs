//! A session's calls as sequences and as a tree: a branching session gives one path per call,
//! sharing what the calls share.

mod common;

use arbor_trace::session::{session_sequences, session_tree, store_sequences};
use arbor_tree::TrajectoryTree;

#[test]
fn a_branching_session_becomes_one_path_per_call() {
    let calls = common::branching_session("s");
    let (seqs, skipped) = session_sequences(&calls);
    assert!(skipped.is_empty());
    let ids: Vec<&str> = seqs.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s/0", "s/1", "s/2"]);

    // Prompt without loss (logprob 0), completion with loss and the recorded logprobs; every
    // token's turn is the call index; the group is the session.
    let s1 = &seqs[1];
    assert_eq!(s1.tokens, [1, 2, 3, 10, 11, 4, 12]);
    assert_eq!(
        s1.loss_mask,
        [false, false, false, false, false, false, true]
    );
    assert_eq!(s1.logprobs, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.5]);
    assert_eq!(s1.turns, [1; 7]);
    assert_eq!(s1.group.as_deref(), Some("s"));
    assert_eq!(s1.reward, None);

    // The tree: call 1 continues call 0's path, call 2 branches after [1, 2].
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    assert_eq!(tree.num_paths(), 3);
    assert_eq!(tree.flat_tokens(), 5 + 7 + 5);
    assert_eq!(tree.unique_tokens(), 7 + 3);
    let paths = tree.paths();
    assert_eq!(paths.len(), 3);
    for (p, s) in paths.iter().zip(&seqs) {
        assert_eq!(p.tokens, s.tokens);
        assert_eq!(p.loss_mask, s.loss_mask, "masks survive the shared prefix");
    }
}

#[test]
fn calls_without_tokens_are_skipped_and_extra_choices_get_their_own_path() {
    let mut calls = common::branching_session("s");
    calls[0].tokens.prompt.clear();
    let mut second = calls[1].tokens.completions[0].clone();
    second.index = 1;
    second.ids = vec![20, 21];
    second.logprobs = Some(vec![-1.0]); // wrong length: unknown, so 0
    calls[1].tokens.completions.push(second);
    let (seqs, skipped) = session_sequences(&calls);
    assert_eq!(
        skipped,
        [("s/0".to_string(), "no token ids recorded".to_string())]
    );
    let ids: Vec<&str> = seqs.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s/1", "s/1.1", "s/2"]);
    assert_eq!(&seqs[1].logprobs[6..], [0.0, 0.0]);
}

#[test]
fn the_session_tree_answer_names_the_branch() {
    let mut calls = common::branching_session("s");
    calls[2].branch = Some(arbor_trace::record::Branch {
        previous: 1,
        extends_previous: false,
        shared_prefix: 2,
        parent: None,
    });
    let v = session_tree("s", &calls);
    assert_eq!(v["paths"], 3);
    assert_eq!(v["unique_tokens"], 10);
    assert_eq!(v["path_ids"], serde_json::json!(["s/0", "s/1", "s/2"]));
    assert_eq!(v["branches"].as_array().unwrap().len(), 1);
    assert_eq!(v["branches"][0]["call"], 2);
    let tree: TrajectoryTree = serde_json::from_value(v["tree"].clone()).unwrap();
    assert_eq!(tree.num_paths(), 3);
}

#[test]
fn a_store_gives_every_session_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = common::branching_session("b");
    records.reverse(); // calls are sorted by index, whatever the log order
    records.extend(common::branching_session("a"));
    common::write_store(dir.path(), &records);
    let seqs = store_sequences(dir.path()).unwrap();
    let ids: Vec<&str> = seqs.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["b/0", "b/1", "b/2", "a/0", "a/1", "a/2"]);
}
