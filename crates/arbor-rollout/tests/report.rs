//! Run reports from hand-built `results.jsonl` files: the statistics against
//! hand-computed values, the tolerated crash artefacts, and the files written.

use std::io::Write as _;
use std::path::Path;

use arbor_rollout::record::StepTiming;
use arbor_rollout::report::{self, ReportError, Stats};
use arbor_rollout::{Failure, RolloutKey, RolloutResult, Status};

fn result(task: &str, scaffold: &str, sample: u32, domain: &str, status: Status) -> RolloutResult {
    let passed = status == Status::Passed;
    RolloutResult {
        key: RolloutKey {
            task_id: task.into(),
            scaffold: scaffold.into(),
            sample,
        },
        domain: domain.into(),
        policy: "upstream:test-model".into(),
        status,
        reward: if passed { 1.0 } else { 0.0 },
        passed,
        attempts: 1,
        session: format!("{task}.{scaffold}.s{sample}.a0"),
        stop: Some(serde_json::json!("submitted")),
        turns: 2,
        prompt_tokens: 100,
        completion_tokens: 10,
        format_errors: 0,
        timing: StepTiming {
            p50_overhead_ms: 1.0,
            overhead_ms: vec![1.0, 3.0],
            model_ms: 500.0,
            action_ms: 200.0,
        },
        agent_s: 1.0,
        verify_s: 0.5,
        total_s: 2.0,
        failure: None,
        verifier: serde_json::Value::Null,
        finished_at: 1_700_000_000.0 + f64::from(sample),
    }
}

/// Task `a` (domain code): 4 samples, 1 passed. Task `b` (domain math): 4
/// scored samples, none passed (one an agent timeout), plus one
/// infrastructure error whose bogus reward must not count.
fn two_tasks() -> Vec<RolloutResult> {
    let mut v = vec![
        result("a", "bash", 0, "code", Status::Passed),
        result("a", "bash", 1, "code", Status::Failed),
        result("a", "bash", 2, "code", Status::Failed),
        result("a", "bash", 3, "code", Status::Failed),
        result("b", "bash", 0, "math", Status::Failed),
        result("b", "bash", 1, "math", Status::Failed),
        result("b", "bash", 2, "math", Status::Failed),
    ];
    let mut timeout = result("b", "bash", 3, "math", Status::AgentFailure);
    timeout.failure = Some(Failure {
        class: "agent_timeout".into(),
        message: "agent exceeded 600 s".into(),
    });
    v.push(timeout);
    let mut infra = result("b", "bash", 4, "math", Status::InfraError);
    infra.reward = 0.7;
    infra.attempts = 3;
    infra.prompt_tokens = 0;
    infra.completion_tokens = 0;
    infra.failure = Some(Failure {
        class: "sandbox".into(),
        message: "create: no space left on device\nmore detail".into(),
    });
    v.push(infra);
    v
}

fn write_results(dir: &Path, results: &[RolloutResult]) {
    let mut f = std::fs::File::create(dir.join("results.jsonl")).unwrap();
    for r in results {
        writeln!(f, "{}", serde_json::to_string(r).unwrap()).unwrap();
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn pass_at_k_matches_hand_computed_values() {
    // n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert_eq!(report::pass_at_k(4, 1, 2), Some(0.5));
    assert_eq!(report::pass_at_k(4, 1, 4), Some(1.0));
    assert_eq!(report::pass_at_k(4, 0, 2), Some(0.0));
    // n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10.
    assert!(close(report::pass_at_k(5, 2, 3).unwrap(), 0.9));

    let s = report::compute(&two_tasks());
    assert_eq!(s.tasks, 2);
    assert_eq!(s.max_samples, 4, "the infrastructure error is not a sample");
    assert!(close(s.pass_at_1.unwrap(), (0.25 + 0.0) / 2.0));
    let ks: Vec<(u32, f64, usize)> = s
        .pass_at_k
        .iter()
        .map(|p| (p.k, p.value, p.tasks))
        .collect();
    assert_eq!(ks.len(), 3);
    assert_eq!((ks[0].0, ks[1].0, ks[2].0), (1, 2, 4));
    assert!(close(ks[0].1, 0.125));
    assert!(close(ks[1].1, 0.25), "(0.5 + 0) / 2, got {}", ks[1].1);
    assert!(close(ks[2].1, 0.5));
    assert!(ks.iter().all(|k| k.2 == 2));
}

#[test]
fn pass_at_k_skips_tasks_with_too_few_samples() {
    let mut v = two_tasks();
    // A third task with 2 samples, both passed: in pass@1 and pass@2, not pass@4.
    v.push(result("c", "bash", 0, "code", Status::Passed));
    v.push(result("c", "bash", 1, "code", Status::Passed));
    let s = report::compute(&v);
    let p = |k| s.pass_at_k.iter().find(|p| p.k == k).copied().unwrap();
    assert!(close(p(1).value, (0.25 + 0.0 + 1.0) / 3.0));
    assert_eq!(p(2).tasks, 3);
    assert!(close(p(2).value, (0.5 + 0.0 + 1.0) / 3.0));
    assert_eq!(p(4).tasks, 2);
    assert!(close(p(4).value, 0.5));
}

#[test]
fn infrastructure_errors_stay_out_of_rewards() {
    let s = report::compute(&two_tasks());
    assert_eq!(s.rollouts, 9);
    assert_eq!(s.scored, 8);
    assert_eq!(s.status.infra_error, 1);
    assert_eq!(s.status.agent_failure, 1);
    let m = s.mean_reward.unwrap();
    assert_eq!(m.n, 8);
    assert!(
        close(m.mean, 1.0 / 8.0),
        "0.7 of the infra error leaked: {}",
        m.mean
    );
    // One 1 and seven 0s: sample variance = (1/8 * 7/8 * 8) / 7 = 1/8.
    assert!(close(m.se.unwrap(), (1.0f64 / 8.0 / 8.0).sqrt()));
    assert_eq!((s.retried_rollouts, s.extra_attempts), (1, 2));
}

#[test]
fn per_domain_and_scaffold_numbers() {
    let mut v = two_tasks();
    // The same task id under another scaffold is another task.
    v.push(result("a", "tools", 0, "code", Status::Passed));
    let s = report::compute(&v);
    assert_eq!(s.tasks, 3);

    let code = s.by_domain.iter().find(|g| g.name == "code").unwrap();
    assert_eq!((code.rollouts, code.scored, code.passed), (5, 5, 2));
    assert_eq!(code.tasks, 2);
    assert!(close(code.pass_at_1.unwrap(), (0.25 + 1.0) / 2.0));
    assert!(close(code.mean_reward.unwrap().mean, 2.0 / 5.0));
    assert_eq!((code.infra_errors, code.agent_failures), (0, 0));
    assert_eq!(code.prompt_tokens, 500);

    let math = s.by_domain.iter().find(|g| g.name == "math").unwrap();
    assert_eq!((math.rollouts, math.scored, math.passed), (5, 4, 0));
    assert_eq!((math.infra_errors, math.agent_failures), (1, 1));
    assert_eq!(math.pass_at_1, Some(0.0));
    assert_eq!(math.mean_reward.unwrap().mean, 0.0);
    assert_eq!(math.mean_turns, Some(2.0));
    assert_eq!((math.prompt_tokens, math.completion_tokens), (400, 40));

    let tools = s.by_scaffold.iter().find(|g| g.name == "tools").unwrap();
    assert_eq!(
        (tools.rollouts, tools.passed, tools.pass_at_1),
        (1, 1, Some(1.0))
    );
    let bash = s.by_scaffold.iter().find(|g| g.name == "bash").unwrap();
    assert!(close(bash.pass_at_1.unwrap(), 0.125));

    let classes: Vec<(&str, usize, usize, usize)> = s
        .failures
        .iter()
        .map(|f| (f.class.as_str(), f.count, f.infra_errors, f.agent_failures))
        .collect();
    assert_eq!(
        classes,
        vec![("agent_timeout", 1, 0, 1), ("sandbox", 1, 1, 0)]
    );
    let sandbox = s.failures.iter().find(|f| f.class == "sandbox").unwrap();
    assert_eq!(sandbox.example, "create: no space left on device");

    assert_eq!(s.tokens.prompt, 900);
    assert_eq!(s.tokens.total, 990);
    assert_eq!(s.time.overhead_steps, 20);
    assert_eq!((s.time.overhead_p50_ms, s.time.overhead_p99_ms), (1.0, 3.0));
    assert_eq!(s.time.total_s.p50, 2.0);
    assert!(close(s.time.total_s.total, 20.0));
    assert!(close(s.time.model_s, 5.0));
}

#[test]
fn truncated_last_line_is_tolerated_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let v = two_tasks();
    write_results(dir.path(), &v);
    let path = dir.path().join("results.jsonl");
    // A crash mid-append: half a line, cut inside a multi-byte character.
    let line = serde_json::to_string(&result("é", "bash", 0, "code", Status::Passed)).unwrap();
    let cut = line.find('é').unwrap() + 1;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&line.as_bytes()[..cut]).unwrap();
    drop(f);
    let loaded = report::load_results(&path).unwrap();
    assert_eq!(loaded, v);

    // The same damage in the middle is an error that names the line.
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(b"\n\n");
    text.extend_from_slice(serde_json::to_string(&v[0]).unwrap().as_bytes());
    text.push(b'\n');
    std::fs::write(&path, &text).unwrap();
    match report::load_results(&path) {
        Err(ReportError::Parse { line, .. }) => assert_eq!(line, v.len() + 1),
        other => panic!("expected a parse error, got {other:?}"),
    }

    let missing = report::load_results(dir.path().join("nope.jsonl"));
    assert!(matches!(missing, Err(ReportError::Io { .. })));
}

fn assert_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let head = text.trim_start();
    assert!(
        head.starts_with("<svg") || head.starts_with("<?xml"),
        "{} is not SVG: {:?}",
        path.display(),
        &head[..head.len().min(60)]
    );
    assert!(
        text.trim_end().ends_with("</svg>"),
        "{} is cut short",
        path.display()
    );
}

#[test]
fn report_has_tables_and_linked_plots() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = two_tasks();
    v.push(result("a", "tools", 0, "code", Status::Passed));
    write_results(dir.path(), &v);
    std::fs::write(
        dir.path().join("experiment.toml"),
        "name = \"nightly-smoke\"\nsamples = 4\n",
    )
    .unwrap();

    let written = report::generate(dir.path()).unwrap();
    assert_eq!(written.path, dir.path().join("report.md"));
    assert_eq!(report::write_report(dir.path()).unwrap(), written.path);
    let md = std::fs::read_to_string(&written.path).unwrap();
    assert!(md.starts_with("# Run report: nightly-smoke"), "{md}");
    assert!(!md.contains("Infrastructure test"));
    assert!(md.contains("| domain | rollouts | scored | passed |"));
    assert!(md.contains("| scaffold | rollouts |"));
    assert!(
        md.contains("| code | 5 | 5 | 2 | 2 | 0.625 | 0.400 ± 0.245 | 0 | 0 |"),
        "{md}"
    );
    assert!(md.contains("| math | 5 | 4 | 0 | 1 | 0.000 |"), "{md}");
    assert!(md.contains("| k | pass@k | tasks |"));
    assert!(md.contains("| 2 | 0.250 | 2 |"), "{md}");
    assert!(md.contains("| sandbox | 1 | 1 | 0 | create: no space left on device |"));
    assert!(md.contains("```toml\nname = \"nightly-smoke\""));

    // Every plot exists, is SVG and is linked relatively from the report.
    let names: Vec<String> = written
        .plots
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "pass_rate.svg",
        "reward_hist.svg",
        "duration_cdf.svg",
        "failures.svg",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    for p in &written.plots {
        assert_svg(p);
        let rel = format!("](plots/{})", p.file_name().unwrap().to_string_lossy());
        assert!(md.contains(&rel), "{rel} not linked");
    }
    let pass = std::fs::read_to_string(dir.path().join("plots/pass_rate.svg")).unwrap();
    assert!(
        pass.contains("\ncode\n") && pass.contains("\nmath\n"),
        "category labels"
    );

    // The JSON form round-trips (what `arbor report --json` prints).
    let json = serde_json::to_string(&written.stats).unwrap();
    let back: Stats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, written.stats);
}

#[test]
fn oracle_runs_are_labelled_infrastructure_tests() {
    let dir = tempfile::tempdir().unwrap();
    let v: Vec<RolloutResult> = two_tasks()
        .into_iter()
        .map(|mut r| {
            r.policy = "scripted-oracle".into();
            r
        })
        .collect();
    write_results(dir.path(), &v);
    let path = report::write_report(dir.path()).unwrap();
    let md = std::fs::read_to_string(path).unwrap();
    assert!(md.contains("Infrastructure test"));
    assert!(md.contains("say nothing about a model"));

    // A mixed run says which part is the oracle's.
    let mut mixed = two_tasks();
    mixed[0].policy = "scripted-oracle".into();
    write_results(dir.path(), &mixed);
    let s = report::generate(dir.path()).unwrap();
    assert!(!s.stats.infrastructure_test);
    assert_eq!(s.stats.oracle_rollouts, 1);
    let md = std::fs::read_to_string(&s.path).unwrap();
    assert!(md.contains("1 of 9 rollouts used the `scripted-oracle`"));
}

#[test]
fn empty_run_gives_a_report_without_plots() {
    let dir = tempfile::tempdir().unwrap();
    // A stale plot from an earlier report of the same directory goes away.
    std::fs::create_dir_all(dir.path().join("plots")).unwrap();
    std::fs::write(dir.path().join("plots/failures.svg"), "<svg/>").unwrap();
    std::fs::write(dir.path().join("results.jsonl"), "").unwrap();
    let r = report::generate(dir.path()).unwrap();
    assert!(r.plots.is_empty());
    assert!(!dir.path().join("plots/failures.svg").exists());
    let md = std::fs::read_to_string(&r.path).unwrap();
    assert!(md.contains("No results yet"));
    assert_eq!(r.stats.pass_at_1, None);
    assert!(r.stats.pass_at_k.is_empty());

    // No results file at all is an error, not an empty report.
    let none = tempfile::tempdir().unwrap();
    assert!(matches!(
        report::write_report(none.path()),
        Err(ReportError::Io { .. })
    ));
}
