//! Tests of the RL stage: stopping, task draws, stage identity, and updates on tiny models.

use std::path::Path;

use super::*;
use crate::config::{DistillEstimator, RolloutSpec};
use arbor_model::{ForwardOptions, Qwen3Config, TreeBatch};
use arbor_train::RlStats;
use arbor_tree::Sequence;

/// What one iteration's update did, flattened for the assertions.
struct UpdateStats {
    paths: usize,
    unique_tokens: u64,
    flat_tokens: u64,
    first: RlStats,
    steps: usize,
    kl_to_init: Option<f64>,
    reverse_kl: BTreeMap<String, (f64, u64)>,
}

#[test]
fn a_stage_stops_only_after_enough_iterations_without_signal_in_a_row() {
    let it = |signal| IterationLog {
        groups_with_signal: signal,
        ..IterationLog::default()
    };
    let log = vec![it(0), it(0), it(2), it(0), it(0)];
    assert!(!without_signal(&log, 0), "0 means never");
    assert!(without_signal(&log, 2));
    assert!(!without_signal(&log, 3), "iteration 2 had signal");
    assert!(!without_signal(&log[..1], 2), "too few iterations yet");
}

/// A terminal RL stage with `spec` (nothing is run: identity and task-draw tests).
fn terminal_stage(spec: RlSpec) -> RlStage {
    RlStage {
        label: "rl/terminal".into(),
        spec,
        rollout: RolloutSpec::default(),
        domains: vec!["terminal".into()],
        difficulty: 1,
        seed: 7,
        init: "ckpt/sft".into(),
        teachers: BTreeMap::new(),
        out: "out".into(),
    }
}

/// A fixed pool is walked `tasks_per_iteration` at a time, wrapping at its end, and its
/// first window is the fresh draw of iteration 0.
#[test]
fn a_task_pool_is_revisited_in_windows_and_fresh_draws_never_repeat() {
    let stage = |pool: usize| {
        terminal_stage(RlSpec {
            tasks_per_iteration: 4,
            task_pool: pool,
            ..RlSpec::default()
        })
    };
    let ids = |s: &RlStage, it: usize| -> Vec<String> {
        let exp = rollouts::experiment(
            "t",
            Path::new("out"),
            s.tasks(it),
            2,
            rollouts::served("http://127.0.0.1:1".into(), &s.rollout, 1.0),
            &s.rollout,
        );
        arbor_rollout::runner::load_tasks(&exp)
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect()
    };
    let fresh = stage(0);
    let (f0, f1) = (ids(&fresh, 0), ids(&fresh, 1));
    assert_eq!(f0.len(), 4);
    assert!(f0.iter().all(|id| !f1.contains(id)), "{f0:?} {f1:?}");

    let pooled = stage(6);
    let all: Vec<String> = (0..3).flat_map(|it| ids(&pooled, it)).collect();
    assert_eq!(all.len(), 12);
    // Iterations 0..3 take pool tasks 0-3, 4 5 0 1, 2-5: every task twice.
    assert_eq!(all[..4], f0[..]);
    assert_eq!(all[4..6], all[10..12]);
    assert_eq!(all[6..8], all[..2]);
    assert_eq!(all[8..10], all[2..4]);
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 6);

    let same = stage(4);
    assert_eq!(
        ids(&same, 0),
        ids(&same, 5),
        "a pool of one window repeats it"
    );
    assert!(
        RlSpec {
            task_pool: 3,
            tasks_per_iteration: 4,
            ..RlSpec::default()
        }
        .validate("rl")
        .is_err()
    );
}

/// A checkpoint written before `temperature` and `distill_estimator` existed (its identity
/// has neither) resumes under today's defaults, and not under other values of them.
#[test]
fn an_identity_without_newer_settings_matches_their_defaults_only() {
    let stage = terminal_stage(RlSpec::default());
    let mut old: serde_json::Value = serde_json::to_value(stage.identity()).unwrap();
    let spec = old["spec"].as_object_mut().unwrap();
    assert!(spec.remove("temperature").is_some());
    assert!(spec.remove("distill_estimator").is_some());
    let old = old.to_string();
    assert!(stage.identity().matches(&old));
    assert!(
        stage
            .identity()
            .matches(&json_line(&stage.identity()).unwrap())
    );

    let mut hotter = stage.identity();
    hotter.spec.temperature = 0.5;
    assert!(
        !hotter.matches(&old),
        "another temperature is another stage"
    );
    let mut reseeded = stage.identity();
    reseeded.seed = 8;
    assert!(!reseeded.matches(&old));
    assert!(!stage.identity().matches("not json"));
    let unknown = old.replacen("\"seed\"", "\"extra\":1,\"seed\"", 1);
    assert!(
        !stage.identity().matches(&unknown),
        "a setting this build does not know"
    );
}

/// Log-probability of `completion` after `prompt` under `model` (sum over its tokens).
fn completion_logprob(model: &Qwen3Model, prompt: &[u32], completion: &[u32]) -> f32 {
    let toks: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let (lp, _) = model
        .token_logprobs(&TreeBatch::forest(&[&toks]), &ForwardOptions::default())
        .unwrap();
    lp.to_vec1::<f32>().unwrap()[prompt.len()..].iter().sum()
}

/// A recorded call: prompt without loss, completion with loss and the model's own
/// (behaviour) logprobs, one turn.
fn call(model: &Qwen3Model, id: &str, prompt: &[u32], completion: &[u32], adv: f64) -> Sequence {
    let toks: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let (lp, _) = model
        .token_logprobs(&TreeBatch::forest(&[&toks]), &ForwardOptions::default())
        .unwrap();
    let mut s = Sequence::new(id, toks.clone());
    s.loss_mask = (0..toks.len()).map(|i| i >= prompt.len()).collect();
    s.logprobs = lp.to_vec1::<f32>().unwrap();
    s.advantage = Some(adv);
    s
}

/// One iteration's updates of `model` on `seqs` of `domain`; returns the updated model and
/// what the updates measured.
fn update(
    model: Qwen3Model,
    spec: RlSpec,
    domain: &str,
    seqs: Vec<Sequence>,
    reference: Arc<Qwen3Model>,
    teachers: HashMap<String, Arc<Qwen3Model>>,
) -> (Qwen3Model, UpdateStats) {
    let mut t = Trainer::new(model, spec.lr).unwrap();
    let set = TrainingSet {
        by_domain: BTreeMap::from([(domain.to_string(), seqs)]),
        weights: HashMap::new(),
    };
    let targets = Targets {
        reference,
        teachers,
    };
    let trained = train::update(&spec, &RolloutSpec::default(), 0, set, &targets, &mut t).unwrap();
    let st = UpdateStats {
        paths: trained.paths,
        unique_tokens: trained.unique_tokens,
        flat_tokens: trained.flat_tokens,
        first: trained.update.first,
        steps: trained.update.steps,
        kl_to_init: trained.update.kl_to_reference,
        reverse_kl: trained.update.reverse_kl,
    };
    (t.model, st)
}

#[test]
fn an_update_moves_probability_toward_the_positive_advantage_sample() {
    let cfg = Qwen3Config::tiny(256, 32, 1, 2, 1);
    let model = Qwen3Model::new(cfg, 3).unwrap();
    let prompt = b"<|user|>\nsay it<|end|>\n".map(u32::from).to_vec();
    let good = b"yes!".map(u32::from).to_vec();
    let bad = b"no..".map(u32::from).to_vec();
    let before = (
        completion_logprob(&model, &prompt, &good),
        completion_logprob(&model, &prompt, &bad),
    );
    // Group of 2: rewards 1 and 0 -> advantages +0.5 and -0.5.
    let seqs = vec![
        call(&model, "g0", &prompt, &good, 0.5),
        call(&model, "g1", &prompt, &bad, -0.5),
    ];
    let reference = Arc::new(Qwen3Model::new(model.config().clone(), 3).unwrap());
    let spec = RlSpec {
        lr: 1e-2,
        updates_per_iteration: 3,
        // One pack: one minibatch, whatever is asked for.
        minibatches: 4,
        ..RlSpec::default()
    };
    let (model, st) = update(model, spec, "terminal", seqs, reference, HashMap::new());
    // The two calls share the prompt: one tree, two paths, the prompt stored once.
    assert_eq!(st.paths, 2);
    assert_eq!(
        st.unique_tokens as usize,
        prompt.len() + good.len() + bad.len()
    );
    assert_eq!(st.flat_tokens as usize, 2 * (prompt.len() + 4));
    assert_eq!(st.steps, 3, "3 passes over 1 pack");
    // On-policy first update: ratios 1, nothing masked, KL to the (identical) start 0.
    assert_eq!(st.first.gspo.loss_tokens, 8);
    assert_eq!(st.first.gspo.masked_tokens, 0);
    assert!(st.kl_to_init.unwrap().abs() < 1e-6, "{:?}", st.kl_to_init);
    assert!(st.first.iw_single.variance() < 1e-9);
    let after = (
        completion_logprob(&model, &prompt, &good),
        completion_logprob(&model, &prompt, &bad),
    );
    assert!(after.0 > before.0 + 0.05, "good: {before:?} -> {after:?}");
    assert!(after.1 < before.1 - 0.05, "bad: {before:?} -> {after:?}");
}

/// With either estimator, a zero-advantage update moves the student toward the teacher, and
/// the per-domain reverse KL logged before it is the mean sampled-token gap.
#[test]
fn zero_advantage_distillation_moves_the_student_toward_the_teacher() {
    for estimator in [DistillEstimator::Sampled, DistillEstimator::Full] {
        let cfg = Qwen3Config::tiny(256, 32, 1, 2, 1);
        let student = Qwen3Model::new(cfg.clone(), 5).unwrap();
        let teacher = Arc::new(Qwen3Model::new(cfg, 11).unwrap());
        let prompt = b"<|user|>\nhi<|end|>\n".map(u32::from).to_vec();
        let sample = b"abcdef".map(u32::from).to_vec();
        let seqs = vec![call(&student, "s0", &prompt, &sample, 0.0)];
        // Per-token gaps -r_t = log pi_s - log pi_t on the sample; their squares shrink as
        // the student moves toward the teacher.
        let token_lps = |m: &Qwen3Model| {
            let toks: Vec<u32> = prompt.iter().chain(&sample).copied().collect();
            let (lp, _) = m
                .token_logprobs(&TreeBatch::forest(&[&toks]), &ForwardOptions::default())
                .unwrap();
            lp.to_vec1::<f32>().unwrap()[prompt.len()..].to_vec()
        };
        let teacher_lp = token_lps(&teacher);
        let gap = |m: &Qwen3Model| -> (f32, f32) {
            let lp = token_lps(m);
            let d: Vec<f32> = lp.iter().zip(&teacher_lp).map(|(s, t)| s - t).collect();
            (d.iter().sum(), d.iter().map(|x| x * x).sum())
        };
        let before = gap(&student);
        let spec = RlSpec {
            lr: 2e-3,
            updates_per_iteration: 1,
            distill_coef: 1.0,
            distill_estimator: estimator,
            ..RlSpec::default()
        };
        let reference = Arc::new(Qwen3Model::new(student.config().clone(), 5).unwrap());
        let teachers = HashMap::from([("general".to_string(), teacher.clone())]);
        let (student, st) = update(student, spec, "general", seqs, reference, teachers);
        assert_eq!(st.first.distill.tokens, 6);
        let (sum, n) = st.reverse_kl["general"];
        assert_eq!(n, 6);
        assert!(
            (sum - before.0 as f64).abs() < 1e-3,
            "{sum} vs {}",
            before.0
        );
        if estimator == DistillEstimator::Sampled {
            let est = st.first.distill.reverse_kl();
            assert!((est - before.0 as f64 / 6.0).abs() < 1e-3);
        } else {
            // The exact KL is non-negative, unlike the sampled gaps.
            assert!(st.first.distill.reverse_kl() > 0.0);
        }
        // With a zero advantage only the distillation term acts: the student's log-probs
        // of its sample move toward the teacher's.
        let after = gap(&student);
        assert!(
            after.1 < before.1 * 0.9,
            "{estimator:?}: squared gap {before:?} -> {after:?}"
        );
    }
}
