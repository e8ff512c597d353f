//! `arbor train pipeline` end to end as a separate process, on a pipeline small enough for
//! CI: oracle rollouts, SFT per domain, RL per domain with the embedded policy in real
//! sandboxes, distillation, held-out evaluation, the report. SIGKILLed in the middle of RL and
//! rerun: it must continue from the last finished iteration, without redoing or losing one.
//! Needs root (sandboxes).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Guard, ReclaimOnPanic, arbor, reclaim_after_kill};

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn write_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"name = "ci"
output = "{out}"
domains = ["terminal", "general"]
difficulty = 1
seed = 3

[rollout]
max_steps = 2
max_tokens = 48
concurrency = 4

[pretrain]
induction_steps = 2
steps = 3
max_tokens_per_pack = 1024

[oracle]
tasks_per_domain = 6

[sft]
steps = 4

[sft_expert]
steps = 2

[rl]
iterations = 3
tasks_per_iteration = 2
group_size = 2
updates_per_iteration = 1

[distill]
iterations = 2
tasks_per_iteration = 1
group_size = 2

[eval]
heldout_tasks = 3
samples = 2
"#,
        out = dir.join("out").display()
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn pipeline_runs_end_to_end_and_continues_after_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(tmp.path());
    let out = tmp.path().join("out");

    // First invocation: SIGKILL once the first RL stage has finished an iteration.
    let child = arbor()
        .args(["train", "pipeline"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn arbor train pipeline");
    let mut g = Guard(Some(child));
    let rl_log = out.join("rl/general/rl_log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(600);
    while lines(&rl_log).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no RL iteration before the deadline"
        );
        if let Some(c) = &mut g.0
            && let Ok(Some(st)) = c.try_wait()
        {
            panic!("pipeline exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = g.0.take().expect("child");
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let killed_at = Instant::now();
    let _reclaim = ReclaimOnPanic(killed_at);
    let done_before = lines(&rl_log).len();
    assert!(done_before < 3, "killed too late to test resume");
    let gc = arbor().args(["sandbox", "gc"]).output().expect("gc");
    assert!(gc.status.success());

    // Second invocation: continues and finishes.
    let res = arbor()
        .args(["train", "pipeline", "--json"])
        .arg(&cfg)
        .stderr(Stdio::inherit())
        .output()
        .expect("rerun");
    assert!(res.status.success(), "rerun failed");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("JSON ({e}): {stdout}"));
    for d in ["terminal", "general"] {
        for row in ["base", "sft", "rl", "expert", "unified"] {
            let cell = &v["domains"][d][row];
            assert_eq!(cell["n"], 3, "{d}/{row}: {cell}");
            let p = cell["pass_rate"].as_f64().expect("pass_rate");
            assert!((0.0..=1.0).contains(&p));
            assert_eq!(cell["infra_errors"], 0, "{d}/{row}: {cell}");
            // The same tasks sampled twice each at the RL temperature.
            let s = &cell["sampled"];
            assert_eq!(s["tasks"], 3, "{d}/{row}: {cell}");
            assert_eq!(s["samples"], 6, "{d}/{row}: {cell}");
            assert_eq!(s["temperature"], 1.0, "{d}/{row}: {cell}");
            let p = s["pass_rate"].as_f64().expect("sampled pass_rate");
            assert!((0.0..=1.0).contains(&p) && s["std_err"].as_f64().unwrap() >= 0.0);
        }
    }

    // Pretraining: the fresh init/ through the induction phase (base/induction/), then the
    // mixed copy corpus (base/); SFT starts from base/.
    let read = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(p)).unwrap()).unwrap()
    };
    let induction = read("base/induction/sft_report.json");
    assert_eq!(induction["steps"], 2, "{induction}");
    assert!(
        induction["init"].as_str().unwrap().ends_with("init"),
        "{induction}"
    );
    let pre = read("base/sft_report.json");
    assert_eq!(pre["steps"], 3, "{pre}");
    assert!(
        pre["init"].as_str().unwrap().ends_with("induction"),
        "{pre}"
    );
    let copy = read("base/copy_loss.json");
    let before = copy["before"].as_f64().unwrap();
    assert!(copy["after_induction"].as_f64().unwrap() < before, "{copy}");
    assert!(copy["after"].as_f64().unwrap() < before, "{copy}");
    let all: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("sft/all/sft_report.json")).unwrap(),
    )
    .unwrap();
    assert!(all["init"].as_str().unwrap().ends_with("base"), "{all}");

    // Generalist-then-specialist SFT: each expert's SFT continued from the all-domain one.
    for d in ["terminal", "general"] {
        let r: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("sft/{d}/sft_report.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(r["steps"], 2, "{r}");
        assert!(r["init"].as_str().unwrap().ends_with("sft/all"), "{r}");
    }

    // Every RL iteration exactly once, in order, each swapping a new policy version in.
    for d in ["terminal", "general"] {
        let log = lines(&out.join(format!("rl/{d}/rl_log.jsonl")));
        let its: Vec<u64> = log
            .iter()
            .map(|l| l["iteration"].as_u64().unwrap())
            .collect();
        assert_eq!(its, vec![0, 1, 2], "{d}");
        for l in &log {
            assert_eq!(l["rollouts"], 4, "{l}");
            assert_eq!(l["infra_errors"], 0, "{l}");
        }
        assert!(
            out.join(format!("rl/{d}/final/model.safetensors"))
                .is_file()
        );
        assert!(out.join(format!("rl/{d}/best/model.safetensors")).is_file());
    }
    // Distillation trains every scored sample (the reverse-KL term needs no reward signal):
    // the student (SFT on all domains) and the experts differ, so the estimate is non-zero,
    // and after the first update the student has moved away from its start.
    let dlog = lines(&out.join("distill/rl_log.jsonl"));
    assert_eq!(dlog.len(), 2);
    assert!(dlog[0]["paths"].as_u64().unwrap() > 0, "{}", dlog[0]);
    assert!(dlog[0]["reverse_kl_to_teacher"].as_f64().unwrap().abs() > 0.0);
    assert!(dlog[1]["kl_to_init"].as_f64().unwrap() > 0.0, "{}", dlog[1]);
    assert_eq!(dlog[0]["policy_version"], 2);
    assert_eq!(dlog[1]["policy_version"], 3);

    // The report and its plots.
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    for line in report.lines().filter(|l| l.starts_with("![")) {
        let path = line.split("](").nth(1).unwrap().trim_end_matches(')');
        let svg = std::fs::read_to_string(out.join(path)).expect(path);
        assert!(svg.starts_with("<svg"), "{path}");
    }
    assert!(report.contains("| terminal |"));
    assert!(
        report.contains("sampled 2 times each at temperature 1"),
        "{report}"
    );

    reclaim_after_kill(killed_at);
}
