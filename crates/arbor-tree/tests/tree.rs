//! Building, reproducing and serializing trajectory trees.

use arbor_tree::{Sequence, TrajectoryTree, TreeError};

fn seq(id: &str, tokens: &[u32], mask: &[bool], lp: &[f32]) -> Sequence {
    Sequence {
        id: id.into(),
        tokens: tokens.to_vec(),
        loss_mask: mask.to_vec(),
        logprobs: lp.to_vec(),
        turns: vec![0; tokens.len()],
        reward: None,
        advantage: None,
        group: None,
    }
}

#[test]
fn doc_example_json_is_what_the_tree_serializes_to() {
    let mut a = seq("a", &[1, 2, 3], &[false, false, true], &[0.0, 0.0, -0.5]);
    a.reward = Some(1.0);
    a.advantage = Some(0.5);
    let mut b = seq("b", &[1, 2, 4], &[false, true, true], &[0.0, -0.1, -0.7]);
    b.reward = Some(0.0);
    b.advantage = Some(-0.5);
    let tree = TrajectoryTree::from_sequences(&[a.clone(), b.clone()]).unwrap();
    let expected = r#"{"version": 1,
 "nodes": [
   {"id": 0, "parent": null, "depth": 0, "tokens": [1, 2], "loss_mask": [false, true],
    "logprobs": [0.0, -0.1], "turns": [0, 0], "leaves": [0, 1]},
   {"id": 1, "parent": 0, "depth": 2, "tokens": [3], "loss_mask": [true],
    "logprobs": [-0.5], "turns": [0], "leaves": [0]},
   {"id": 2, "parent": 0, "depth": 2, "tokens": [4], "loss_mask": [true],
    "logprobs": [-0.7], "turns": [0], "leaves": [1]}],
 "leaves": [
   {"id": "a", "node": 1, "len": 3, "reward": 1.0, "advantage": 0.5,
    "overrides": [{"pos": 1, "loss_mask": false, "logprob": 0.0, "turn": 0}]},
   {"id": "b", "node": 2, "len": 3, "reward": 0.0, "advantage": -0.5}]}"#;
    let parsed: TrajectoryTree = serde_json::from_str(expected).unwrap();
    assert_eq!(parsed, tree);
    // The serialized text is the documented one, up to whitespace.
    let compact: String = expected.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(serde_json::to_string(&tree).unwrap(), compact);
    assert_eq!(tree.paths(), vec![a, b]);
}

#[test]
fn shared_prefix_is_stored_once() {
    let seqs = vec![
        Sequence::new("a", vec![1, 2, 3, 4, 5]),
        Sequence::new("b", vec![1, 2, 3, 6]),
        Sequence::new("c", vec![1, 2, 7]),
        Sequence::new("d", vec![9]),
    ];
    let t = TrajectoryTree::from_sequences(&seqs).unwrap();
    assert_eq!(t.flat_tokens(), 5 + 4 + 3 + 1);
    assert_eq!(t.unique_tokens(), 2 + 1 + 2 + 1 + 1 + 1);
    let nodes = t.nodes();
    // Pre-order: [1,2] -> [3] -> [4,5], [6]; [7]; then the second tree [9].
    let toks: Vec<Vec<u32>> = nodes.iter().map(|n| n.tokens.clone()).collect();
    assert_eq!(
        toks,
        vec![vec![1, 2], vec![3], vec![4, 5], vec![6], vec![7], vec![9]]
    );
    assert_eq!(nodes[0].leaves, vec![0, 1, 2]);
    assert_eq!(nodes[1].leaves, vec![0, 1]);
    assert_eq!(nodes[2].depth, 3);
    assert_eq!(t.roots(), vec![0, 5]);
    assert_eq!(nodes[0].subtree_end, 5);
    assert_eq!(t.paths(), seqs);
    let s = t.stats();
    assert_eq!(s.trees, 2);
    assert!((s.por - (1.0 - 8.0 / 13.0)).abs() < 1e-12);
    assert!((s.ideal_speedup - 13.0 / 8.0).abs() < 1e-12);
}

#[test]
fn prefix_and_duplicate_sequences_are_paths() {
    let seqs = vec![
        Sequence::new("long", vec![1, 2, 3, 4]),
        Sequence::new("prefix", vec![1, 2]),
        Sequence::new("dup", vec![1, 2, 3, 4]),
        Sequence::new("mid", vec![1, 2, 3, 5]),
    ];
    let t = TrajectoryTree::from_sequences(&seqs).unwrap();
    assert_eq!(t.paths(), seqs);
    assert_eq!(t.unique_tokens(), 5);
    assert_eq!(t.leaves()[0].node, t.leaves()[2].node);
    let prefix_node = &t.nodes()[t.leaves()[1].node as usize];
    assert_eq!(prefix_node.tokens, vec![1, 2]);
    assert!(!prefix_node.children.is_empty());
}

#[test]
fn omitted_fields_default_and_lengths_are_checked() {
    let s: Sequence = serde_json::from_str(r#"{"id":"x","tokens":[5,6]}"#).unwrap();
    assert!(s.loss_mask.is_empty());
    let t = TrajectoryTree::from_sequences(std::slice::from_ref(&s)).unwrap();
    assert_eq!(t.paths(), vec![s.normalized().unwrap()]);
    assert_eq!(t.paths()[0].loss_mask, vec![true, true]);

    let bad: Sequence =
        serde_json::from_str(r#"{"id":"y","tokens":[5,6],"loss_mask":[true]}"#).unwrap();
    let err = TrajectoryTree::from_sequences(&[bad]).unwrap_err();
    assert!(matches!(
        err,
        TreeError::LengthMismatch {
            field: "loss_mask",
            expected: 2,
            actual: 1,
            ..
        }
    ));
    assert!(err.to_string().contains("loss_mask"));
    let empty = Sequence::new("e", vec![]);
    assert!(matches!(
        TrajectoryTree::from_sequences(&[empty]),
        Err(TreeError::EmptySequence { .. })
    ));
}

#[test]
fn invalid_tree_json_is_rejected() {
    let t = TrajectoryTree::from_sequences(&[
        Sequence::new("a", vec![1, 2, 3]),
        Sequence::new("b", vec![1, 2, 4]),
    ])
    .unwrap();
    let good = serde_json::to_value(&t).unwrap();
    let mut v = good.clone();
    v["nodes"][1]["depth"] = 7.into();
    assert!(serde_json::from_value::<TrajectoryTree>(v).is_err());
    let mut v = good.clone();
    v["leaves"][0]["len"] = 2.into();
    assert!(serde_json::from_value::<TrajectoryTree>(v).is_err());
    let mut v = good.clone();
    v["nodes"][2]["leaves"] = serde_json::json!([0, 1]);
    assert!(serde_json::from_value::<TrajectoryTree>(v).is_err());
    let mut v = good;
    v["nodes"][1]["loss_mask"] = serde_json::json!([]);
    assert!(serde_json::from_value::<TrajectoryTree>(v).is_err());
}

#[test]
fn jsonl_files_and_directories_load() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("run/group-1");
    std::fs::create_dir_all(&sub).unwrap();
    let a = vec![Sequence::new("a", vec![1, 2, 3])];
    let b = vec![
        Sequence::new("b", vec![1, 2, 4]),
        Sequence::new("c", vec![8]),
    ];
    arbor_tree::write_jsonl(&dir.path().join("run/a.jsonl"), &a).unwrap();
    arbor_tree::write_jsonl(&sub.join("b.jsonl"), &b).unwrap();
    std::fs::write(dir.path().join("run/notes.txt"), "ignored").unwrap();
    let all = arbor_tree::load_sequences(&dir.path().join("run")).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].id, "a");
    let stats = arbor_tree::stats(&dir.path().join("run")).unwrap();
    assert_eq!(stats.flat_tokens, 7);
    assert_eq!(stats.unique_tokens, 5);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\":\"a\",\"tokens\":[1]}\n\nnot json\n").unwrap();
    let err = arbor_tree::load_sequences(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:3"), "{err}");
}

#[test]
fn json_documents_load_as_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = vec![
        Sequence::new("a", vec![1, 2, 3]),
        Sequence::new("b", vec![1, 2, 4]),
    ];
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    // A bare tree, a gateway-style answer with the tree under "tree", and an array of sequences.
    let bare = dir.path().join("tree.json");
    std::fs::write(&bare, serde_json::to_string(&tree).unwrap()).unwrap();
    let wrapped = dir.path().join("session.json");
    let answer = serde_json::json!({"session": "s1", "paths": 2, "tree": tree});
    std::fs::write(&wrapped, answer.to_string()).unwrap();
    let array = dir.path().join("seqs.json");
    std::fs::write(&array, serde_json::to_string(&seqs).unwrap()).unwrap();
    for p in [&bare, &wrapped, &array] {
        assert_eq!(
            arbor_tree::load_sequences(p).unwrap(),
            seqs,
            "{}",
            p.display()
        );
    }
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"hello": 1}"#).unwrap();
    assert!(arbor_tree::load_sequences(&other).is_err());
}

#[test]
fn empty_input_is_an_empty_forest() {
    let t = TrajectoryTree::from_sequences(&[]).unwrap();
    let s = t.stats();
    assert_eq!((s.paths, s.flat_tokens, s.unique_tokens), (0, 0, 0));
    assert_eq!(s.por, 0.0);
    assert_eq!(s.ideal_speedup, 1.0);
    assert!(t.flatten().is_empty());
    let (packing, packs) = arbor_tree::pack_tree(&t, &arbor_tree::PackOptions::new(8)).unwrap();
    assert!(packing.packs.is_empty() && packs.is_empty());
}

#[test]
fn stats_print_for_humans() {
    let t = TrajectoryTree::from_sequences(&[
        Sequence::new("a", vec![1, 2, 3]),
        Sequence::new("b", vec![1, 2, 4]),
    ])
    .unwrap();
    let text = t.stats().to_string();
    assert!(text.contains("flat tokens 6  unique tokens 4"), "{text}");
    assert!(text.contains("POR 0.3333  ideal speedup 1.50x"), "{text}");
    let packing = arbor_tree::plan_packing(&t, &arbor_tree::PackOptions::new(3)).unwrap();
    let text = packing.stats(&t).to_string();
    assert!(text.contains("2 packs of <= 3 tokens"), "{text}");
    assert!(text.contains("ERR 0.0000"), "{text}");
}
