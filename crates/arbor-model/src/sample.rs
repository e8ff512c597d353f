//! Drawing one token from next-token logits: temperature, optional top-k, greedy or a single
//! uniform draw. The one sampler of the workspace: [`crate::Qwen3Model::generate`] and the
//! embedded policy (`arbor-policy`, over byte logits only) both draw through [`sample`], so a seed
//! gives the same tokens and behaviour log-probabilities in both.

use rand::Rng;

/// `log(sum_i exp(x_i))`, stabilised by the maximum: `m + ln(sum_i exp(x_i - m))`.
/// `-inf` entries (masked logits) contribute nothing.
#[inline]
pub fn logsumexp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = x.iter().map(|v| (v - m).exp()).sum();
    m + s.ln()
}

/// Picks a token from `logits`; returns it with its log-probability under the distribution it was
/// drawn from (`logits / temperature`, top-k applied), the behaviour log-probability an RL trainer
/// needs.
///
/// `temperature <= 0` is greedy: the first maximum, with the plain log-softmax (temperature 1) as
/// its log-probability, and no random draw. Otherwise one `f32` uniform is drawn from `rng` and
/// the token is the first whose cumulative probability exceeds it (the last token if rounding
/// leaves the sum below the draw). `top_k = Some(k)` with `0 < k < logits.len()` masks every
/// logit below the `k`-th largest (ties at the threshold are kept).
pub fn sample(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    rng: &mut impl Rng,
) -> (u32, f32) {
    let greedy = temperature <= 0.0;
    let temp = if greedy { 1.0 } else { temperature };
    let mut z: Vec<f32> = logits.iter().map(|x| x / temp).collect();
    if let Some(k) = top_k {
        keep_top_k(&mut z, k);
    }
    let lse = logsumexp(&z);
    let tok = if greedy {
        argmax(&z)
    } else {
        draw(&z, lse, rng.r#gen::<f32>())
    };
    (tok as u32, z[tok] - lse)
}

/// Sets every entry below the `k`-th largest to `-inf` (no-op unless `0 < k < z.len()`).
fn keep_top_k(z: &mut [f32], k: usize) {
    if k == 0 || k >= z.len() {
        return;
    }
    let mut sorted = z.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let thr = sorted[k - 1];
    for x in z.iter_mut() {
        if *x < thr {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Index of the first maximum.
fn argmax(z: &[f32]) -> usize {
    z.iter()
        .enumerate()
        .fold(0, |best, (i, x)| if *x > z[best] { i } else { best })
}

/// Inverse-CDF draw: the first index whose cumulative probability `exp(z - lse)` exceeds `u`.
fn draw(z: &[f32], lse: f32, u: f32) -> usize {
    let mut acc = 0f32;
    for (i, x) in z.iter().enumerate() {
        acc += (x - lse).exp();
        if u < acc {
            return i;
        }
    }
    z.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn greedy_takes_the_first_maximum_without_drawing() {
        let mut rng = StdRng::seed_from_u64(3);
        let (tok, lp) = sample(&[1.0, 4.0, 4.0, 0.0], 0.0, None, &mut rng);
        assert_eq!(tok, 1);
        assert!((lp - (4.0 - logsumexp(&[1.0, 4.0, 4.0, 0.0]))).abs() < 1e-6);
        // No draw was consumed.
        let mut fresh = StdRng::seed_from_u64(3);
        assert_eq!(rng.r#gen::<u64>(), fresh.r#gen::<u64>());
    }

    #[test]
    fn top_k_restricts_the_draw() {
        let logits = [0.0, 3.0, 2.0, -1.0];
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (tok, lp) = sample(&logits, 1.0, Some(2), &mut rng);
            assert!(tok == 1 || tok == 2);
            let lse = logsumexp(&[3.0, 2.0]);
            assert!((lp - (logits[tok as usize] - lse)).abs() < 1e-6);
        }
    }
}
