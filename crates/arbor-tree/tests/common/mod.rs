//! Helpers shared by the integration tests.
#![allow(dead_code)]

use arbor_tree::{Pack, Sequence};

/// Three groups of four samples sharing a prompt, with per-leaf rewards/advantages and one override.
pub fn sample_sequences() -> Vec<Sequence> {
    let mut out = Vec::new();
    for g in 0..3u32 {
        let prompt: Vec<u32> = (0..6).map(|i| 1000 + g * 10 + i).collect();
        for s in 0..4u32 {
            let mut seq = Sequence::new(format!("g{g}/s{s}"), prompt.clone());
            seq.loss_mask = vec![false; prompt.len()];
            seq.logprobs = vec![0.0; prompt.len()];
            // Two samples of each group share the first response token.
            let resp: Vec<u32> = (0..3 + s)
                .map(|i| if i == 0 { 7 + s / 2 } else { 100 * s + i })
                .collect();
            for (i, &t) in resp.iter().enumerate() {
                seq.tokens.push(t);
                seq.loss_mask.push(true);
                seq.logprobs.push(-0.1 * (i as f32 + 1.0) - s as f32);
                seq.turns.push(1);
            }
            seq.reward = Some(s as f64);
            seq.advantage = Some(s as f64 - 1.5);
            seq.group = Some(format!("g{g}"));
            out.push(seq);
        }
    }
    // A token that is prompt in one path and generated in another (an override).
    out[1].loss_mask[5] = true;
    out[1].logprobs[5] = -2.5;
    out
}

pub fn assert_same_pack(a: &Pack, b: &Pack) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.advantage), bits(&b.advantage));
    assert_eq!(bits(&a.loss_weight), bits(&b.loss_weight));
    let strip = |p: &Pack| {
        let mut p = p.clone();
        p.advantage.clear();
        p
    };
    assert_eq!(strip(a), strip(b));
}
