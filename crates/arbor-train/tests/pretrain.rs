//! The pretraining stage end to end on a tiny budget: both phases run from a fresh model, the
//! copy loss falls, the outputs chain (base <- induction <- fresh), and a rerun finds the stage
//! finished without training again.

use arbor_train::pretrain::{Phase, PretrainConfig, train_pretrain};
use arbor_train::sft::{SftEvent, SftInit, tiny_byte_config};

#[test]
fn pretraining_runs_both_phases_lowers_the_copy_loss_and_resumes_finished() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("base");
    let cfg = PretrainConfig {
        induction_steps: 6,
        steps: 4,
        warmup_steps: 2,
        max_tokens_per_pack: 1024,
        seed: 5,
        ..PretrainConfig::default()
    };
    let init = SftInit::Fresh {
        config: tiny_byte_config(),
        seed: 5,
    };
    let mut steps = Vec::new();
    let (report, copy) = train_pretrain(&init, &out, &cfg, &mut |phase, ev| {
        if let SftEvent::Step(l) = ev {
            steps.push((phase, l.step));
        }
    })
    .expect("pretraining");
    let phase_steps = |p| steps.iter().filter(|(q, _)| *q == p).count();
    assert_eq!(phase_steps(Phase::Induction), 6);
    assert_eq!(phase_steps(Phase::Mixed), 4);
    assert_eq!(report.steps, 4);
    assert!(report.init.ends_with("induction"), "{}", report.init);
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("induction/model.safetensors").is_file());
    let (after_induction, after) = (copy.after_induction.unwrap(), copy.after.unwrap());
    assert!(after_induction < copy.before, "{copy:?}");
    assert!(after < copy.before, "{copy:?}");

    // A rerun trains nothing and reports the same measurements.
    let mut trained = 0;
    let (again, copy2) = train_pretrain(&init, &out, &cfg, &mut |_, ev| {
        if matches!(ev, SftEvent::Step(_)) {
            trained += 1;
        }
    })
    .expect("rerun");
    assert_eq!(trained, 0);
    assert_eq!(again.resumed, "finished");
    assert_eq!(copy2, copy);
}

#[test]
fn every_letters_document_is_a_line_and_its_copies() {
    let docs = arbor_train::pretrain::letters_corpus(1, 5_000);
    assert!(docs.iter().map(|d| d.text.len()).sum::<usize>() >= 5_000);
    for d in &docs {
        let lines: Vec<&str> = d.text.lines().collect();
        assert_eq!(lines.len() % 4, 0, "{}", d.text);
        for group in lines.chunks(4) {
            assert!(group.iter().all(|l| *l == group[0]), "{}", d.text);
            assert!((8..=48).contains(&group[0].len()));
        }
        // The copies (after their first byte) are the copy bytes; the first line is not.
        let copies = d.copy_mask.iter().filter(|&&m| m).count();
        let expected: usize = lines.chunks(4).map(|g| 3 * (g[0].len() - 1)).sum();
        assert_eq!(copies, expected);
    }
}
