//! The golden fixture of the Python package (`python/tests/test_golden.py`): small packs, the
//! per-token log-probabilities a model would give, and the losses and gradients `arbor-train`
//! computes on them. The Python objectives must reproduce these numbers; this test fails when
//! the committed fixture is not what `arbor-train` computes now, so the two cannot drift apart.
//! `ARBOR_BLESS_GOLDEN=1 cargo test -p arbor-train --test golden` rewrites it.

use std::path::PathBuf;

use arbor_train::{
    GspoConfig, IcePop, RlBatch, RlPath, distill_loss, gspo_loss, kl_penalty, rl_objective,
};
use arbor_tree::{LossNormalization, Pack, PackOptions, Sequence, TrajectoryTree};
use candle::{Device, Tensor, Var};
use serde_json::{Value, json};

const CLIP_EPS: f32 = 0.2;
const DISTILL_COEF: f32 = 0.5;
const KL_COEF: f32 = 0.1;
const BUDGET: usize = 40;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

/// A behaviour log-probability that depends only on the token and its position, so shared
/// prefixes agree; a few paths override it below.
fn old_logprob(tok: u32, pos: usize) -> f32 {
    -(0.05 + ((tok as usize * 31 + pos) % 17) as f32 * 0.07)
}

/// Three tasks, three samples each, two turns (response, tool output, response). Samples 0 and
/// 1 share their first response; sample 2 shares it too but does not train on it (a per-path
/// mask override) and has its own behaviour log-probabilities there.
fn sequences() -> Vec<Sequence> {
    let mut out = Vec::new();
    for g in 0..3u32 {
        let prompt: Vec<u32> = (0..5).map(|i| 1 + g * 10 + i).collect();
        for s in 0..3u32 {
            let first: Vec<u32> = (0..4).map(|i| 100 + g * 10 + i).collect();
            let obs: Vec<u32> = (0..3).map(|i| 200 + g * 10 + s * 3 + i).collect();
            let second: Vec<u32> = (0..3 + s).map(|i| 300 + g * 20 + s * 5 + i).collect();
            let mut seq = Sequence::new(format!("task{g}/s{s}"), Vec::new());
            for (part, mask, turn) in [
                (&prompt, false, 0),
                (&first, s != 2, 1),
                (&obs, false, 0),
                (&second, true, 2),
            ] {
                for &tok in part {
                    let pos = seq.tokens.len();
                    seq.tokens.push(tok);
                    seq.loss_mask.push(mask);
                    let lp = old_logprob(tok, pos) - if s == 2 { 0.2 } else { 0.0 };
                    seq.logprobs.push(if mask || s == 2 { lp } else { 0.0 });
                    seq.turns.push(turn);
                }
            }
            seq.group = Some(format!("task{g}"));
            seq.reward = Some(f64::from(s % 2));
            seq.advantage = Some([1.0, -0.5, 0.25][s as usize] * if g == 1 { -1.0 } else { 1.0 });
            out.push(seq);
        }
    }
    out
}

/// The current log-probabilities: the canonical behaviour values moved by offsets, some far
/// enough for IcePop (ratio outside [0.5, 2]) and the clip to act.
fn current_logprobs(pack: &Pack) -> Vec<f32> {
    const DELTA: [f32; 11] = [-1.0, -0.3, -0.1, 0.0, 0.05, 0.15, 0.25, 0.4, 1.2, -0.2, 0.1];
    (0..pack.flat.len())
        .map(|t| {
            if pack.flat.parent[t] < 0 {
                0.0
            } else {
                pack.flat.logprobs[t] - 0.25 + DELTA[(t * 3) % 11]
            }
        })
        .collect()
}

fn round(v: f32) -> f64 {
    // Six significant digits are what f32 arithmetic in two frameworks can agree on.
    format!("{v:.6e}").parse().unwrap()
}

fn term(logp: &[f32], f: impl FnOnce(&Tensor) -> (Tensor, Value)) -> Value {
    let var = Var::from_tensor(&Tensor::new(logp, &Device::Cpu).unwrap()).unwrap();
    let (loss, stats) = f(var.as_tensor());
    let grad = loss
        .backward()
        .unwrap()
        .get(&var)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    json!({
        "loss": round(loss.to_scalar::<f32>().unwrap()),
        "grad": grad.into_iter().map(round).collect::<Vec<_>>(),
        "stats": stats,
    })
}

fn pack_case(pack: &Pack, file: &str) -> Value {
    let batch = RlBatch::from_pack(pack).unwrap();
    let paths: &[RlPath] = &batch.paths;
    let logp = current_logprobs(pack);
    let expert: Vec<f32> = logp
        .iter()
        .enumerate()
        .map(|(t, l)| l - 0.3 + 0.1 * (t % 5) as f32)
        .collect();
    let reference: Vec<f32> = logp
        .iter()
        .enumerate()
        .map(|(t, l)| l + 0.05 * ((t % 3) as f32 - 1.0))
        .collect();
    let cfg = GspoConfig {
        clip_eps: CLIP_EPS,
        icepop: Some(IcePop::default()),
        ..GspoConfig::default()
    };
    let weights = pack.loss_weight.clone();
    json!({
        "file": file,
        "logprobs": logp.iter().copied().map(round).collect::<Vec<_>>(),
        "expert_logprobs": expert.iter().copied().map(round).collect::<Vec<_>>(),
        "reference_logprobs": reference.iter().copied().map(round).collect::<Vec<_>>(),
        "gspo": term(&logp, |lp| {
            let (l, s) = gspo_loss(lp, paths, &cfg).unwrap();
            (l, serde_json::to_value(s).unwrap())
        }),
        "distill": term(&logp, |lp| {
            let (l, s) = distill_loss(lp, &expert, paths, cfg.icepop).unwrap();
            (l, serde_json::to_value(s).unwrap())
        }),
        "kl": term(&logp, |lp| {
            let (l, est) = kl_penalty(lp, &reference, paths).unwrap();
            (l, json!({ "estimate": est }))
        }),
        "total": term(&logp, |lp| {
            let terms = rl_objective(lp, paths, &cfg, Some(&expert), DISTILL_COEF).unwrap();
            let (kl, _) = kl_penalty(lp, &reference, paths).unwrap();
            ((terms.total + (kl * KL_COEF as f64).unwrap()).unwrap(), Value::Null)
        }),
        "sft": term(&logp, |lp| (arbor_train::loss::sft_loss(lp, &weights).unwrap(), Value::Null)),
    })
}

/// Everything the fixture holds: packs (file name, pack) and the JSON document.
fn fixture() -> (Vec<(String, Pack)>, String) {
    let tree = TrajectoryTree::from_sequences(&sequences()).unwrap();
    let mut opts = PackOptions::new(BUDGET);
    opts.normalization = LossNormalization::TokenMean;
    let (_, packs) = arbor_tree::pack_tree(&tree, &opts).unwrap();
    assert!(packs.len() >= 2, "the fixture must cover several packs");
    let mut files = Vec::new();
    let mut cases = Vec::new();
    for pack in &packs {
        let name = format!("pack-{:05}.safetensors", pack.index);
        files.push((name.clone(), pack.clone()));
        cases.push(pack_case(pack, &name));
    }
    let doc = json!({
        "config": {
            "clip_eps": CLIP_EPS,
            "icepop": { "alpha": 0.5, "beta": 2.0 },
            "distill_coef": DISTILL_COEF,
            "kl_coef": KL_COEF,
            "normalization": "token_mean",
        },
        "sequences": sequences(),
        "packs": cases,
    });
    (files, serde_json::to_string_pretty(&doc).unwrap() + "\n")
}

#[test]
fn golden_fixture_matches_arbor_train() {
    let dir = data_dir();
    let (files, doc) = fixture();
    if std::env::var_os("ARBOR_BLESS_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, pack) in &files {
            arbor_tree::write_pack(&dir.join(name), pack).unwrap();
        }
        std::fs::write(dir.join("golden.json"), &doc).unwrap();
    }
    let hint = "rerun with ARBOR_BLESS_GOLDEN=1 and commit the fixture";
    // Packs compare as read back: the header's key order is not part of the format.
    for (name, pack) in &files {
        // As JSON values, where the NaN of an absent advantage equals itself.
        let committed = arbor_tree::read_pack(&dir.join(name)).ok();
        assert!(
            committed.map(|p| serde_json::to_value(p).unwrap())
                == Some(serde_json::to_value(pack).unwrap()),
            "{name} differs from what arbor-tree packs now; {hint}"
        );
    }
    let committed = std::fs::read_to_string(dir.join("golden.json")).unwrap_or_default();
    assert!(
        committed == doc,
        "golden.json differs from what arbor-train computes now; {hint}"
    );
}
