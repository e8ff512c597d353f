//! A pack file is readable from Python with `safetensors` + NumPy and no arbor code: runs the snippet of
//! docs/tree-training.md on a pack this test writes. Needs `pip install numpy safetensors`; skipped (with a
//! message) only when `python3` is absent.

use std::process::Command;

use arbor_tree::{PackOptions, TrajectoryTree, pack_tree, write_pack};

mod common;

fn doc_snippet() -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/tree-training.md"
    ))
    .expect("docs/tree-training.md exists");
    let start = doc.find("```python\n").expect("a python block") + "```python\n".len();
    let end = start + doc[start..].find("```").expect("closed block");
    doc[start..end].to_string()
}

#[test]
fn python_reads_pack_files() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIPPED python_reads_pack_files: python3 is not installed");
        return;
    }
    let seqs = common::sample_sequences();
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    let (_, packs) = pack_tree(&tree, &PackOptions::new(40)).unwrap();
    assert!(packs.len() > 1);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("read_pack.py");
    std::fs::write(&script, doc_snippet()).unwrap();
    for pack in &packs {
        let path = dir.path().join(format!("pack-{}.safetensors", pack.index));
        write_pack(&path, pack).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python failed (pip install numpy safetensors?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let f = &pack.flat;
        assert_eq!(v["path_ids"], serde_json::json!(pack.path_ids()));
        for (k, p) in f.paths.iter().enumerate() {
            assert_eq!(
                v["tokens"][k],
                serde_json::json!(seqs[p.leaf as usize].tokens)
            );
        }
        assert_eq!(v["visible_pairs"].as_u64().unwrap(), f.visible_pairs());
        let expected: f64 = pack
            .loss_weight
            .iter()
            .zip(&f.input_ids)
            .map(|(&w, &t)| w as f64 * (t as f64).ln_1p())
            .sum();
        let got = v["tree_loss"].as_f64().unwrap();
        assert!(
            (got - expected).abs() <= 1e-9 * (1.0 + expected.abs()),
            "{got} vs {expected}"
        );
        assert_eq!(v["normalization"], "token_mean");
    }
}
