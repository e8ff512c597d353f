//! Pack files: safetensors round trips, corruption is rejected, and `pack_to_dir` end to end.

mod common;

use common::{assert_same_pack, sample_sequences};

use arbor_tree::{
    LossNormalization, PackOptions, TrajectoryTree, pack_from_bytes, pack_to_bytes, pack_tree,
    read_pack, write_pack,
};

#[test]
fn packs_round_trip_through_safetensors() {
    let seqs = sample_sequences();
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    for budget in [8, 16, 30, 1000] {
        for norm in [
            LossNormalization::TokenMean,
            LossNormalization::SequenceMean,
        ] {
            let mut opts = PackOptions::new(budget);
            opts.normalization = norm;
            let (_, packs) = pack_tree(&tree, &opts).unwrap();
            let dir = tempfile::tempdir().unwrap();
            for p in &packs {
                let path = dir.path().join("p.safetensors");
                write_pack(&path, p).unwrap();
                let back = read_pack(&path).unwrap();
                assert_same_pack(p, &back);
                for k in 0..back.flat.paths.len() {
                    assert_eq!(
                        back.flat.path_sequence(k),
                        seqs[back.flat.paths[k].leaf as usize]
                    );
                }
            }
        }
    }
}

#[test]
fn corrupted_pack_files_are_rejected() {
    let tree = TrajectoryTree::from_sequences(&sample_sequences()).unwrap();
    let (_, packs) = pack_tree(&tree, &PackOptions::new(1000)).unwrap();
    let bytes = pack_to_bytes(&packs[0]).unwrap();
    assert!(pack_from_bytes(&bytes[..bytes.len() - 3]).is_err());
    assert!(pack_from_bytes(b"not a pack").is_err());
    // Break the layout: a parent pointing to the right.
    let mut bad = packs[0].clone();
    bad.flat.parent[1] = 5;
    assert!(pack_from_bytes(&pack_to_bytes(&bad).unwrap()).is_err());
    let mut bad = packs[0].clone();
    bad.flat.subtree_end[0] -= 1;
    assert!(pack_from_bytes(&pack_to_bytes(&bad).unwrap()).is_err());
}

#[test]
fn pack_to_dir_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("seqs.jsonl");
    let seqs = sample_sequences();
    arbor_tree::write_jsonl(&src, &seqs).unwrap();
    let out = dir.path().join("packs");
    let summary = arbor_tree::pack_to_dir(&src, 24, &out).unwrap();
    let stats = arbor_tree::stats(&src).unwrap();
    assert_eq!(summary.stats.flat_tokens, stats.flat_tokens);
    assert_eq!(summary.stats.unique_tokens, stats.unique_tokens);
    assert_eq!(summary.files.len() as u64, summary.stats.packs);
    assert!(summary.stats.err <= summary.stats.por);
    assert!(summary.stats.err > 0.0);
    let mut seen = vec![0; seqs.len()];
    let mut total_w = 0.0f64;
    let mut packed = 0u64;
    for f in &summary.files {
        let p = read_pack(&out.join(f)).unwrap();
        assert!(p.flat.len() <= 24);
        packed += p.flat.len() as u64;
        for path in &p.flat.paths {
            seen[path.leaf as usize] += 1;
        }
        total_w += p.loss_weight.iter().map(|&w| w as f64).sum::<f64>();
    }
    assert!(seen.iter().all(|&c| c == 1));
    assert_eq!(packed, summary.stats.packed_tokens);
    // Token-mean weights sum to 1 over the whole packing.
    assert!((total_w - 1.0).abs() < 1e-5, "{total_w}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["packs"], summary.stats.packs);
    assert!(json["err"].as_f64().is_some());
    // A second run into the same directory is refused rather than mixing packs.
    assert!(arbor_tree::pack_to_dir(&src, 24, &out).is_err());
}

/// A pack whose file is pinned in `tests/data/pack-golden.safetensors`: shared prompts, an override,
/// rewards and advantages, and one path with neither (NaN in the file).
fn golden_pack() -> arbor_tree::Pack {
    let mut seqs = sample_sequences();
    seqs.push(arbor_tree::Sequence::new("bare", vec![1000, 1001, 5]));
    let tree = TrajectoryTree::from_sequences(&seqs).unwrap();
    let (_, packs) = pack_tree(&tree, &PackOptions::new(1000)).unwrap();
    assert_eq!(packs.len(), 1);
    packs.into_iter().next().unwrap()
}

/// The header length, the header as JSON and the tensor bytes of a safetensors file.
fn split_file(bytes: &[u8]) -> (usize, serde_json::Value, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (n, header, &bytes[8 + n..])
}

/// The pack file format stays byte-identical. safetensors keeps the two `__metadata__` keys in a
/// `HashMap`, so their order varies between processes; the header is compared as JSON (same length,
/// same content), the tensor bytes exactly. `ARBOR_BLESS=1` rewrites the golden file.
#[test]
fn pack_file_bytes_are_pinned() {
    let golden_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pack-golden.safetensors");
    let bytes = pack_to_bytes(&golden_pack()).unwrap();
    if std::env::var_os("ARBOR_BLESS").is_some() {
        std::fs::write(&golden_path, &bytes).unwrap();
    }
    let golden = std::fs::read(&golden_path).unwrap();
    assert_eq!(bytes.len(), golden.len());
    assert_eq!(split_file(&bytes), split_file(&golden));
    assert_same_pack(&pack_from_bytes(&golden).unwrap(), &golden_pack());
}
