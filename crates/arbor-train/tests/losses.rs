//! GSPO, IcePop and distillation against values worked out by hand. The log-probabilities are a
//! plain variable (no model), so the gradient of the loss with respect to each token's
//! log-probability can be checked entry by entry.

// Expected values are written with the digits of the worked examples.
#![allow(clippy::excessive_precision)]

use arbor_train::{
    ExpertDistribution, ExpertTarget, GspoConfig, IcePop, LengthNorm, RlPath, distill_full_loss,
    distill_loss, gspo_loss, kl_penalty, rl_objective, rl_objective_with,
};
use candle::{Device, Tensor, Var};

const TOL: f32 = 1e-5;

fn var(v: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

fn grad_of(loss: &Tensor, lp: &Var) -> Vec<f32> {
    let g = loss.backward().unwrap();
    g.get(lp).unwrap().to_vec1::<f32>().unwrap()
}

fn close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() <= TOL, "{what}: got {a}, expected {b}");
}

fn close_all(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        close(*x, *y, &format!("{what}[{i}]"));
    }
}

fn path(
    indices: &[u32],
    mask: &[bool],
    old: &[f32],
    turns: &[u32],
    adv: f32,
    weight: f32,
) -> RlPath {
    RlPath {
        id: format!("p{adv}"),
        indices: indices.to_vec(),
        loss_mask: mask.to_vec(),
        old_logprobs: old.to_vec(),
        turns: turns.to_vec(),
        advantage: adv,
        weight,
    }
}

/// The length bias of the turn mean, and the constant normalizer that removes it. Two failing
/// replies (A = -1, weight 1 each, on policy: d = 0 so every s_n = 1, no clipping), one of 1
/// token and one of 4 tokens, each the only turn of its path.
///
/// Mean: each token's gradient is -w * A * s / |T| = 1/|T|: the short reply's token gets 1, the
/// long reply's tokens 0.25 each (a long wrong reply is pushed down 4x less per token).
/// Constant {tokens: 8, turns: 2}: every token gets -w * A * s / (8 * 2) = 1/16, whatever the
/// length. The value is -sum_k w_k A_k s / 2 = 1 in both (s = exp(0 / 8) = 1).
#[test]
fn constant_length_norm_weighs_every_token_the_same() {
    let lp = var(&[-1.0, -1.0, -1.0, -1.0, -1.0]);
    let short = path(&[0], &[true], &[-1.0], &[1], -1.0, 1.0);
    let long = RlPath {
        id: "long".into(),
        ..path(&[1, 2, 3, 4], &[true; 4], &[-1.0; 4], &[1; 4], -1.0, 1.0)
    };
    let grad = |norm: LengthNorm| {
        let cfg = GspoConfig {
            icepop: None,
            length_norm: norm,
            ..GspoConfig::default()
        };
        let (loss, _) = gspo_loss(lp.as_tensor(), &[short.clone(), long.clone()], &cfg).unwrap();
        (loss.to_scalar::<f32>().unwrap(), grad_of(&loss, &lp))
    };
    let (value, g) = grad(LengthNorm::Mean);
    close(value, 2.0, "mean: value");
    close_all(&g, &[1.0, 0.25, 0.25, 0.25, 0.25], "mean: grad");
    let (value, g) = grad(LengthNorm::Constant {
        tokens: 8,
        turns: 2,
    });
    close(value, 1.0, "constant: value");
    close_all(&g, &[0.0625; 5], "constant: grad");
}

/// Two paths sharing tokens 0..=2 of a 7-token tree, eps = 0.2, no IcePop, weights 1/2.
///
/// logp_theta = [0, -1, -1, -1, -1, -1, -1]; every old value is chosen by its difference
/// d = logp_theta - logp_old.
///
/// Path A (indices 0..=5, A = +1): token 0 prompt, tokens 1, 2 turn 1 (d = 0.1, 0.3), token 3
/// tool output (mask off), tokens 4, 5 turn 2 (d = -0.1, 0.0).
///   s_1 = exp(0.2) = 1.2214028 > 1.2 -> min(1.2214, 1.2) = 1.2 (clipped, no gradient)
///   s_2 = exp(-0.05) = 0.9512294, inside the clip range -> 0.9512294
///   L_A = -(1/2)(1.2 + 0.9512294) = -1.0756147
/// Path B (indices 0, 1, 2, 6, A = -0.5): tokens 1, 2 turn 1 with the same d, token 6 turn 3
/// (d = -0.4).
///   turn 1: s = 1.2214028, s A = -0.6107014, clip(s) A = -0.6 -> min = -0.6107014 (unclipped)
///   turn 3: s = exp(-0.4) = 0.6703200, s A = -0.3351600, clip(s) A = 0.8 * -0.5 = -0.4
///           -> min = -0.4 (clipped)
///   L_B = -(1/2)(-0.6107014 - 0.4) = 0.5053507
/// L = (L_A + L_B) / 2 = -0.2851320
///
/// Gradient dL/dlogp_t (only unclipped turns; d s_n / d logp_t = s_n / |T_n|):
///   tokens 1, 2: from B turn 1 only: (1/2) * -(1/2) * A_B * s / 2 = 0.25 * 0.5 * 1.2214028 / 2
///                = 0.0763377
///   tokens 4, 5: (1/2) * -(1/2) * 1 * 0.9512294 / 2 = -0.1189037
///   tokens 0, 3, 6: 0
#[test]
fn turn_level_gspo_by_hand() {
    let lp = var(&[0.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]);
    let a = path(
        &[0, 1, 2, 3, 4, 5],
        &[false, true, true, false, true, true],
        &[0.0, -1.1, -1.3, -0.2, -0.9, -1.0],
        &[1, 1, 1, 1, 2, 2],
        1.0,
        0.5,
    );
    let b = path(
        &[0, 1, 2, 6],
        &[false, true, true, true],
        &[0.0, -1.1, -1.3, -0.6],
        &[1, 1, 1, 3],
        -0.5,
        0.5,
    );
    let cfg = GspoConfig {
        clip_eps: 0.2,
        icepop: None,
        ..GspoConfig::default()
    };
    let (loss, stats) = gspo_loss(lp.as_tensor(), &[a.clone(), b.clone()], &cfg).unwrap();
    close(loss.to_scalar::<f32>().unwrap(), -0.2851320, "loss");
    let g = grad_of(&loss, &lp);
    close_all(
        &g,
        &[0.0, 0.0763377, 0.0763377, 0.0, -0.1189037, -0.1189037, 0.0],
        "grad",
    );
    assert_eq!(stats.loss_tokens, 7);
    assert_eq!(stats.turns, 4);
    assert_eq!(stats.masked_tokens, 0);
    assert_eq!(stats.clipped_turns, 2, "A turn 1 and B turn 3");

    // Each path alone, weight 1: L_A and L_B.
    let alone = |p: &RlPath| {
        let p = RlPath {
            weight: 1.0,
            ..p.clone()
        };
        gspo_loss(lp.as_tensor(), &[p], &cfg)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap()
    };
    close(alone(&a), -1.0756147, "L_A");
    close(alone(&b), 0.5053507, "L_B");
}

/// IcePop on one path (A = +1, eps = 0.2, [alpha, beta] = [0.5, 2]), logp_theta all -1:
///   turn 1: d = 0.1 (ratio 1.105, kept), d = 1.0 (ratio e = 2.718 > 2, masked)
///   turn 2: d = -0.8 (ratio 0.449 < 0.5, masked): the turn has no token left
///   turn 3: d = 0.05 (kept)
/// N = 3 (every turn with a loss token counts, masked or not).
///   s_1 = exp(0.1) = 1.1051709 (mean over the kept token only), inside the clip range
///   s_3 = exp(0.05) = 1.0512711
///   L = -(1/3)(1.1051709 + 1.0512711) = -0.7188140; masked fraction 2/4.
/// Gradient: kept tokens -(1/3) s_n (a one-token turn): -0.3683903 and -0.3504237; masked 0.
/// Without IcePop: s_1 = exp(0.55) = 1.7332530 -> clipped to 1.2; s_2 = exp(-0.8) = 0.4493290
/// -> min(0.4493, 0.8) = 0.4493290; s_3 = 1.0512711; L = -(1/3)(2.7006001) = -0.9002000.
#[test]
fn icepop_masks_tokens_out_of_their_turn_mean() {
    let lp = var(&[-1.0, -1.0, -1.0, -1.0]);
    let p = path(
        &[0, 1, 2, 3],
        &[true, true, true, true],
        &[-1.1, -2.0, -0.2, -1.05],
        &[1, 1, 2, 3],
        1.0,
        1.0,
    );
    let cfg = GspoConfig::default();
    assert_eq!(cfg.icepop, Some(IcePop::default()));
    assert_eq!(
        (IcePop::default().alpha, IcePop::default().beta),
        (0.5, 2.0)
    );
    let (loss, stats) = gspo_loss(lp.as_tensor(), std::slice::from_ref(&p), &cfg).unwrap();
    close(loss.to_scalar::<f32>().unwrap(), -0.7188140, "loss");
    assert_eq!((stats.loss_tokens, stats.masked_tokens), (4, 2));
    assert_eq!(stats.masked_fraction(), 0.5);
    assert_eq!((stats.turns, stats.empty_turns), (3, 1));
    close_all(
        &grad_of(&loss, &lp),
        &[-0.3683903, 0.0, 0.0, -0.3504237],
        "grad",
    );

    let off = GspoConfig {
        icepop: None,
        ..cfg
    };
    let (loss, stats) = gspo_loss(lp.as_tensor(), &[p], &off).unwrap();
    close(
        loss.to_scalar::<f32>().unwrap(),
        -0.9002000,
        "loss without IcePop",
    );
    assert_eq!(stats.masked_tokens, 0);
}

/// Distillation on one path (weight 1, IcePop default):
///   t0: prompt (mask off)
///   t1: logp = -1.0, old = -1.0 (rho = 1),          expert = -0.5 -> r =  0.5
///   t2: logp = -2.0, old = -2.2 (rho = e^0.2 = 1.2214028), expert = -3.0 -> r = -1.0
///   t3: logp = -1.0, old = -2.0 (rho = e = 2.718 > 2: IcePop-masked), expert = 0.0
/// M = 3 loss tokens.
///   L = -(1/3)(1 * 0.5 + 1.2214028 * -1.0) = 0.2404676
///   dL/dlogp: t1 -(1/3) r rho = -0.1666667; t2 -(1/3)(-1)(1.2214028) = 0.4071343; t0, t3: 0
///   reverse-KL estimate: mean of -r over the kept tokens = (-0.5 + 1.0) / 2 = 0.25
/// Combined with GSPO (A = 0, so the GSPO term is 0 with zero gradient) at coefficient 2:
/// value 0.4809352, gradient twice the above.
#[test]
fn distillation_by_hand() {
    let lp = var(&[0.0, -1.0, -2.0, -1.0]);
    let expert = [0.0, -0.5, -3.0, 0.0];
    let p = path(
        &[0, 1, 2, 3],
        &[false, true, true, true],
        &[0.0, -1.0, -2.2, -2.0],
        &[0, 0, 0, 0],
        0.0,
        1.0,
    );
    let ip = Some(IcePop::default());
    let (loss, stats) =
        distill_loss(lp.as_tensor(), &expert, std::slice::from_ref(&p), ip).unwrap();
    close(loss.to_scalar::<f32>().unwrap(), 0.2404676, "loss");
    assert_eq!(stats.tokens, 2);
    close(stats.reverse_kl() as f32, 0.25, "reverse kl");
    close_all(
        &grad_of(&loss, &lp),
        &[0.0, -0.1666667, 0.4071343, 0.0],
        "grad",
    );

    let cfg = GspoConfig::default();
    let terms = rl_objective(lp.as_tensor(), &[p], &cfg, Some(&expert), 2.0).unwrap();
    close(
        terms.gspo.to_scalar::<f32>().unwrap(),
        0.0,
        "gspo with A = 0",
    );
    assert!(terms.distill.is_some());
    assert_eq!(terms.gspo_stats.masked_tokens, 1);
    let total = terms.total;
    close(total.to_scalar::<f32>().unwrap(), 0.4809352, "combined");
    close_all(
        &grad_of(&total, &lp),
        &[0.0, -0.3333333, 0.8142686, 0.0],
        "combined grad",
    );
}

/// The exact reverse KL over a 2-token vocabulary. Flat tokens: t0 prompt, t1 shared by both
/// paths, t2 only in path A, t3 only in path B (a tool output, not trained). Weights 1/2 each;
/// M_A = 2 loss tokens, M_B = 1.
///   t1: student p = (.5, .5) (logits 0, 0), expert q = (.8, .2)
///       KL_1 = .5 ln(.5/.8) + .5 ln(.5/.2) = .5 ln 1.5625 = 0.2231436
///   t2: student p = (.75, .25) (logits ln 3, 0), expert q = (.5, .5)
///       KL_2 = .75 ln 1.5 + .25 ln .5 = 0.1308120
///   row weights: t1 .5/2 + .5/1 = .75; t2 .5/2 = .25
///   L = .75 KL_1 + .25 KL_2 = 0.2000607
///   dKL/dlogits = p (ln p - ln q - KL): t1 (-0.3465736, 0.3465736), t2 (0.2059898, -0.2059898),
///   times the row weights: t1 (-0.2599302, 0.2599302), t2 (0.0514975, -0.0514975)
///   reverse KL per (path, token) entry: (2 KL_1 + KL_2) / 3 = 0.1923664
/// With t2 IcePop-masked in path A (old logprob far below): L = .75 KL_1 = 0.1673577.
#[test]
fn full_distillation_by_hand() {
    let logits =
        Var::from_tensor(&Tensor::new(&[[0.0f32, 0.0], [3f32.ln(), 0.0]], &Device::Cpu).unwrap())
            .unwrap();
    let lse = logits
        .as_tensor()
        .log_sum_exp(1)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let student = logits.as_tensor().broadcast_sub(&lse).unwrap();
    let expert = ExpertDistribution {
        tokens: vec![1, 2],
        log_probs: [0.8f32, 0.2, 0.5, 0.5].iter().map(|p| p.ln()).collect(),
        vocab: 2,
    };
    let values = [0.0, 0.5f32.ln(), 0.75f32.ln(), -1.0];
    let lp = var(&values);
    let paths = |old_t2: f32| {
        [
            path(
                &[0, 1, 2],
                &[false, true, true],
                &[0.0, values[1], old_t2],
                &[0, 0, 1],
                0.0,
                0.5,
            ),
            path(
                &[0, 1, 3],
                &[false, true, false],
                &[0.0, values[1], values[3]],
                &[0, 0, 0],
                0.0,
                0.5,
            ),
        ]
    };
    let ip = Some(IcePop::default());
    let (loss, stats) =
        distill_full_loss(lp.as_tensor(), &student, &expert, &paths(values[2]), ip).unwrap();
    close(loss.to_scalar::<f32>().unwrap(), 0.2000607, "loss");
    assert_eq!(stats.tokens, 3);
    close(stats.reverse_kl() as f32, 0.1923664, "reverse kl");
    let g = loss.backward().unwrap();
    let g = g.get(&logits).unwrap().to_vec2::<f32>().unwrap();
    close_all(&g[0], &[-0.2599302, 0.2599302], "grad t1");
    close_all(&g[1], &[0.0514975, -0.0514975], "grad t2");

    let (masked, stats) = distill_full_loss(
        lp.as_tensor(),
        &student,
        &expert,
        &paths(values[2] - 2.0),
        ip,
    )
    .unwrap();
    close(masked.to_scalar::<f32>().unwrap(), 0.1673577, "t2 masked");
    assert_eq!(stats.tokens, 2);

    // Through the combined objective at coefficient 2 (advantages 0: no GSPO term).
    let target = ExpertTarget::Distribution {
        student: &student,
        expert: &expert,
    };
    let cfg = GspoConfig::default();
    let terms =
        rl_objective_with(lp.as_tensor(), &paths(values[2]), &cfg, Some(target), 2.0).unwrap();
    close(
        terms.total.to_scalar::<f32>().unwrap(),
        0.4001214,
        "combined",
    );

    // A loss token without an expert row, or rows out of order, are errors.
    let short = ExpertDistribution {
        tokens: vec![1],
        log_probs: vec![0.8f32.ln(), 0.2f32.ln()],
        vocab: 2,
    };
    let one_row = student.narrow(0, 0, 1).unwrap();
    assert!(distill_full_loss(lp.as_tensor(), &one_row, &short, &paths(values[2]), ip).is_err());
    let unordered = ExpertDistribution {
        tokens: vec![2, 1],
        ..expert.clone()
    };
    assert!(
        distill_full_loss(lp.as_tensor(), &student, &unordered, &paths(values[2]), ip).is_err()
    );
}

/// KL penalty, k3 on the sampled tokens, per-path mean. Two paths of weight 1/2 share token 1;
/// token 0 is a prompt token (no loss).
///
/// logp_theta = [0, -1, -2, -0.5], logp_ref = [0, -1.5, -1, -0.5]: d = ref - theta is -0.5 at
/// token 1, +1 at token 2, 0 at token 3, and k3 = e^d - d - 1 is 0.10653066, 0.71828183, 0.
/// Path A (tokens 1, 2): 0.5 / 2 * 0.82481249; path B (tokens 1, 3): 0.5 / 2 * 0.10653066;
/// L = 0.23283579. dL/dtheta_t = (sum of c_k / M_k over paths through t) * (1 - e^d):
/// token 1: 0.5 * 0.39346934, token 2: 0.25 * (1 - e) = -0.42957046, token 3: 0.
#[test]
fn kl_penalty_by_hand() {
    let lp = var(&[0.0, -1.0, -2.0, -0.5]);
    let reference = [0.0, -1.5, -1.0, -0.5];
    let paths = vec![
        path(
            &[0, 1, 2],
            &[false, true, true],
            &[0.0; 3],
            &[0, 1, 1],
            1.0,
            0.5,
        ),
        path(
            &[0, 1, 3],
            &[false, true, true],
            &[0.0; 3],
            &[0, 1, 1],
            -1.0,
            0.5,
        ),
    ];
    let (loss, mean) = kl_penalty(lp.as_tensor(), &reference, &paths).unwrap();
    close(loss.to_scalar::<f32>().unwrap(), 0.23283579, "loss");
    close(
        mean as f32,
        0.93134315 / 4.0,
        "mean k3 over the gathered tokens",
    );
    let g = grad_of(&loss, &lp);
    close_all(&g, &[0.0, 0.19673467, -0.42957046, 0.0], "gradient");
    // The advantage plays no part; a policy equal to its reference pays nothing.
    let (zero, _) = kl_penalty(lp.as_tensor(), &[0.0, -1.0, -2.0, -0.5], &paths).unwrap();
    close(zero.to_scalar::<f32>().unwrap(), 0.0, "at the reference");
    assert!(kl_penalty(lp.as_tensor(), &[0.0; 3], &paths).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let lp = var(&[0.0, -1.0]);
    let mut p = path(&[0, 1], &[false, true], &[0.0, -1.0], &[0, 0], 1.0, 1.0);
    p.indices = vec![0, 5];
    assert!(gspo_loss(lp.as_tensor(), &[p.clone()], &GspoConfig::default()).is_err());
    p.indices = vec![0, 1];
    p.turns = vec![0];
    assert!(gspo_loss(lp.as_tensor(), &[p.clone()], &GspoConfig::default()).is_err());
    p.turns = vec![0, 0];
    assert!(distill_loss(lp.as_tensor(), &[0.0], &[p], None).is_err());
}

/// `RlBatch` refuses a path without an advantage (an unscored rollout must not train as 0) and a
/// step size smaller than the batch.
#[test]
fn rl_batch_needs_advantages_and_a_step_size() {
    use arbor_train::{RlBatch, TrainError};
    use arbor_tree::{Sequence, TrajectoryTree};
    let mut a = Sequence::new("a", vec![1, 2, 3]);
    a.advantage = Some(0.5);
    let b = Sequence::new("b", vec![1, 2, 4]);
    let tree = TrajectoryTree::from_sequences(&[a.clone(), b]).unwrap();
    match RlBatch::from_flat(&tree.flatten(), 2) {
        Err(TrainError::MissingAdvantage { path }) => assert_eq!(path, "b"),
        other => panic!("expected a missing advantage, got {other:?}"),
    }
    let tree = TrajectoryTree::from_sequences(&[a]).unwrap();
    assert!(RlBatch::from_flat(&tree.flatten(), 0).is_err());
    let batch = RlBatch::from_flat(&tree.flatten(), 4).unwrap();
    assert_eq!(batch.paths[0].weight, 0.25);
    assert_eq!(batch.wanted(), vec![true, true, true]);
}
