//! Fused RMSNorm, RoPE and token-logprob ops against candle's composed implementations:
//! forward values and gradients.

mod common;

use arbor_model::ops::{RopeTables, rms_norm, rope, swiglu, token_logprobs};
use candle::{D, Device, Tensor};
use common::{rand_var, rel_err};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[test]
fn rms_norm_matches_composed() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = rand_var(&[37, 3, 24], 2.0, &mut rng);
    let w = rand_var(&[24], 1.5, &mut rng);
    let r = rand_var(&[37, 3, 24], 1.0, &mut rng);
    let a = rms_norm(&x, &w, 1e-6).unwrap();
    let b = candle_nn::ops::rms_norm_slow(&x, &w, 1e-6).unwrap();
    assert!(rel_err(&a, &b) <= 1e-5);
    let ga = (a * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&x, &w] {
        let e = rel_err(ga.get(v).unwrap(), gb.get(v).unwrap());
        assert!(e <= 1e-4, "rms_norm grad rel err {e}");
    }
}

#[test]
fn rope_with_explicit_positions_matches_composed() {
    let mut rng = StdRng::seed_from_u64(2);
    let (t, h, d) = (29, 2, 16);
    let positions: Vec<u32> = (0..t).map(|_| rng.gen_range(0..500)).collect();
    let x = rand_var(&[t, h, d], 1.0, &mut rng);
    let r = rand_var(&[t, h, d], 1.0, &mut rng);
    let tables = RopeTables::new(&positions, d, 10_000.0);
    let a = rope(&x, &tables).unwrap();
    // Reference: the HF rotate-half formula with candle's composed rope_slow ([b, h, t, d]).
    let inv: Vec<f64> = (0..d / 2)
        .map(|i| 10_000f64.powf(-(2.0 * i as f64) / d as f64))
        .collect();
    let ang: Vec<f64> = positions
        .iter()
        .flat_map(|&p| inv.iter().map(move |f| p as f64 * f))
        .collect();
    let cos = Tensor::from_vec(
        ang.iter().map(|a| a.cos() as f32).collect::<Vec<_>>(),
        (t, d / 2),
        &Device::Cpu,
    )
    .unwrap();
    let sin = Tensor::from_vec(
        ang.iter().map(|a| a.sin() as f32).collect::<Vec<_>>(),
        (t, d / 2),
        &Device::Cpu,
    )
    .unwrap();
    let xr = x
        .as_tensor()
        .transpose(0, 1)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .contiguous()
        .unwrap();
    let b = candle_nn::rotary_emb::rope_slow(&xr, &cos, &sin)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    assert!(rel_err(&a, &b) <= 1e-5);
    let ga = (a * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = rel_err(ga.get(&x).unwrap(), gb.get(&x).unwrap());
    assert!(e <= 1e-4, "rope grad rel err {e}");
}

#[test]
fn token_logprobs_match_log_softmax_gather() {
    let mut rng = StdRng::seed_from_u64(3);
    let (n, v) = (41, 53);
    let x = rand_var(&[n, v], 4.0, &mut rng);
    let targets: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
    let g = rand_var(&[n], 1.0, &mut rng);
    let a = token_logprobs(&x, &targets).unwrap();
    let idx = Tensor::from_vec(targets.clone(), (n, 1), &Device::Cpu).unwrap();
    let b = candle_nn::ops::log_softmax(&x, D::Minus1)
        .unwrap()
        .gather(&idx, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert!(rel_err(&a, &b) <= 1e-5);
    let ga = (a * g.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * g.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = rel_err(ga.get(&x).unwrap(), gb.get(&x).unwrap());
    assert!(e <= 1e-4, "logprob grad rel err {e}");
    assert!(token_logprobs(&x, &[0]).is_err());
}

#[test]
fn swiglu_matches_composed() {
    let mut rng = StdRng::seed_from_u64(4);
    let g = rand_var(&[33, 70], 6.0, &mut rng);
    let u = rand_var(&[33, 70], 2.0, &mut rng);
    let r = rand_var(&[33, 70], 1.0, &mut rng);
    let a = swiglu(&g, &u).unwrap();
    let b = (candle_nn::ops::silu(&g).unwrap() * u.as_tensor()).unwrap();
    assert!(rel_err(&a, &b) <= 1e-5);
    let ga = (a * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * r.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&g, &u] {
        let e = rel_err(ga.get(v).unwrap(), gb.get(v).unwrap());
        assert!(e <= 1e-4, "swiglu grad rel err {e}");
    }
}
