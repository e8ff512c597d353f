//! Integration tests of arbor-task with real sandboxes, real git
//! repositories and a real HTTP judge on loopback.
//!
//! A custom harness (libtest-mimic): this binary is its own sandbox init,
//! and after all tests it checks that no sandbox was left behind. Needs root.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_sandbox::Backend;
use arbor_sandbox::local::{LocalBackend, gc};
use arbor_task::check::{CheckOptions, check};
use arbor_task::domains::{DOMAINS, GenOptions, Split, generate};
use arbor_task::model::{FileSpec, Solution, Task};
use arbor_task::run::{PrepareOptions, run_solution};
use arbor_task::swebench::{self, Prediction};
use arbor_task::verify::{
    AnswerMatchSpec, CommandSpec, CompositeSpec, GradeMode, GradeOptions, JudgeSpec, MatchMode,
    VerifierResult, VerifierSpec, WeightedVerifier,
};
use arbor_task::{OpenOptions, TaskError};
use libtest_mimic::{Arguments, Failed, Trial};

type TestResult = Result<(), Failed>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failed::from(format!($($msg)+)));
        }
    };
}

fn backend() -> Result<Arc<dyn Backend>, Failed> {
    LocalBackend::with_defaults()
        .map(|b| Arc::new(b) as Arc<dyn Backend>)
        .map_err(|e| {
            Failed::from(format!(
                "local backend unavailable (these tests need root): {e}"
            ))
        })
}

fn rt() -> Result<tokio::runtime::Runtime, Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("runtime: {e}")))
}

fn tmp() -> Result<tempfile::TempDir, Failed> {
    tempfile::tempdir().map_err(|e| Failed::from(format!("tempdir: {e}")))
}

fn write(p: &Path, s: &str) -> Result<(), Failed> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, s)?;
    Ok(())
}

fn run(b: &dyn Backend, t: &Task, sol: Option<&Solution>) -> Result<VerifierResult, Failed> {
    run_with(
        b,
        t,
        sol,
        &PrepareOptions::default(),
        &GradeOptions::default(),
    )
}

fn run_with(
    b: &dyn Backend,
    t: &Task,
    sol: Option<&Solution>,
    p: &PrepareOptions,
    g: &GradeOptions,
) -> Result<VerifierResult, Failed> {
    rt()?
        .block_on(run_solution(b, t, sol, p, g))
        .map_err(|e| Failed::from(format!("run: {e}")))
}

fn script(s: &str) -> Solution {
    Solution {
        script: Some(s.to_string()),
        ..Solution::default()
    }
}

// --- malformed input: errors name file and field, never panic -------------

fn expect_invalid(r: Result<Vec<Task>, TaskError>, file_part: &str, field: &str) -> TestResult {
    match r {
        Err(TaskError::Invalid {
            file,
            field: f,
            message,
        }) => {
            ensure!(
                file.contains(file_part),
                "file {file:?} should name {file_part:?} ({message})"
            );
            ensure!(f == field, "field {f:?} should be {field:?} ({message})");
            Ok(())
        }
        Err(e) => Err(format!("expected an Invalid error for {field}, got: {e}").into()),
        Ok(_) => Err(format!("expected an error for {field}, got tasks").into()),
    }
}

fn malformed_inputs_name_file_and_field() -> TestResult {
    let dir = tmp()?;
    let d = dir.path();
    let load = |p: &Path| arbor_task::load(p, &OpenOptions::default());

    let good = "id = \"t1\"\ninstruction = \"do it\"\n[verifier]\nkind = \"exit_status\"\ncommand = \"true\"\n";
    write(&d.join("ok/t1.toml"), good)?;
    let tasks = load(&d.join("ok")).map_err(|e| format!("{e}"))?;
    ensure!(tasks.len() == 1 && tasks[0].id == "t1", "good task loads");

    write(&d.join("bad_toml.toml"), "id = \"x\"\ninstruction = \n")?;
    match load(&d.join("bad_toml.toml")) {
        Err(TaskError::Invalid { file, message, .. }) => {
            ensure!(
                file.contains("bad_toml.toml") && message.contains("TOML"),
                "bad TOML: {file} {message}"
            )
        }
        other => return Err(format!("bad TOML: {other:?}").into()),
    }

    write(
        &d.join("no_instr.toml"),
        "id = \"x\"\n[verifier]\nkind = \"exit_status\"\ncommand = \"true\"\n",
    )?;
    expect_invalid(
        load(&d.join("no_instr.toml")),
        "no_instr.toml",
        "instruction",
    )?;

    write(
        &d.join("blank_instr.json"),
        r#"{"id": "x", "instruction": "  ", "verifier": {"kind": "exit_status", "command": "true"}}"#,
    )?;
    expect_invalid(
        load(&d.join("blank_instr.json")),
        "blank_instr.json",
        "instruction",
    )?;

    write(
        &d.join("kind.toml"),
        "id = \"x\"\ninstruction = \"i\"\n[verifier]\nkind = \"vibes\"\n",
    )?;
    expect_invalid(load(&d.join("kind.toml")), "kind.toml", "verifier.kind")?;

    write(
        &d.join("regex.toml"),
        "id = \"x\"\ninstruction = \"i\"\n[verifier]\nkind = \"answer_match\"\nmode = \"regex\"\nexpected = \"(\"\n",
    )?;
    expect_invalid(
        load(&d.join("regex.toml")),
        "regex.toml",
        "verifier.expected",
    )?;

    write(
        &d.join("typo.toml"),
        "id = \"x\"\ninstruction = \"i\"\n[verifier]\nkind = \"exit_status\"\ncommand = \"true\"\ntimeout_s = \"soon\"\n",
    )?;
    expect_invalid(
        load(&d.join("typo.toml")),
        "typo.toml",
        "verifier.timeout_s",
    )?;

    write(
        &d.join("tasks.jsonl"),
        &format!(
            "{}\n{}\n",
            r#"{"id": "a", "instruction": "i", "verifier": {"kind": "exit_status", "command": "true"}}"#,
            r#"{"id": "b", "instruction": "i", "verifier": {"kind": "composite", "parts": []}}"#
        ),
    )?;
    expect_invalid(
        load(&d.join("tasks.jsonl")),
        "tasks.jsonl:2",
        "verifier.parts",
    )?;

    // SWE-bench: FAIL_TO_PASS that is not JSON.
    let inst = serde_json::json!({
        "instance_id": "o__r-1", "repo": "o/r", "base_commit": "abc", "patch": "", "test_patch": "",
        "problem_statement": "p", "hints_text": "", "version": "1.0",
        "FAIL_TO_PASS": "[tests.test_a", "PASS_TO_PASS": "[]", "environment_setup_commit": "abc"
    });
    write(&d.join("swe/instances.jsonl"), &format!("{inst}\n"))?;
    write(
        &d.join("swe/swebench.toml"),
        "[repos]\n\"o/r\" = \"repo\"\n[specs.\"o/r\".\"*\"]\ntest_cmd = \"true\"\n",
    )?;
    expect_invalid(
        load(&d.join("swe/instances.jsonl")),
        "instances.jsonl:1",
        "FAIL_TO_PASS",
    )?;

    // Harbor: missing instruction.md, and a badly typed field.
    write(
        &d.join("h1/task.toml"),
        "[verifier]\ntimeout_sec = \"soon\"\n",
    )?;
    write(&d.join("h1/instruction.md"), "do it\n")?;
    write(
        &d.join("h1/tests/test.sh"),
        "echo 1 > /logs/verifier/reward.txt\n",
    )?;
    expect_invalid(load(&d.join("h1")), "h1/task.toml", "verifier.timeout_sec")?;
    write(&d.join("h2/task.toml"), "\n")?;
    write(
        &d.join("h2/tests/test.sh"),
        "echo 1 > /logs/verifier/reward.txt\n",
    )?;
    expect_invalid(
        arbor_task::harbor::load_task_dir(&d.join("h2")).map(|t| vec![t]),
        "instruction.md",
        "instruction",
    )?;
    Ok(())
}

// --- built-in domains ---------------------------------------------------------

fn builtin_domains_check() -> TestResult {
    let b = backend()?;
    let mut tasks = Vec::new();
    for domain in DOMAINS {
        for d in 1..=5 {
            let opts = GenOptions {
                difficulty: d,
                split: Split::Train,
            };
            tasks.extend(generate(domain, 2, 42, &opts).map_err(|e| format!("{e}"))?);
        }
    }
    let n = tasks.len();
    let report = rt()?.block_on(check(
        b,
        tasks,
        &CheckOptions {
            concurrency: 4,
            ..Default::default()
        },
    ));
    ensure!(
        report.tasks == n
            && report.oracle_pass == n
            && report.null_fail == n
            && report.infra_errors == 0,
        "check report: {}",
        serde_json::to_string(&report).unwrap_or_default()
    );
    Ok(())
}

fn swe_domain_resists_test_tampering() -> TestResult {
    let b = backend()?;
    let opts = GenOptions {
        difficulty: 2,
        split: Split::Train,
    };
    let task = generate("swe", 1, 5, &opts)
        .map_err(|e| format!("{e}"))?
        .remove(0);
    let pkg = task
        .environment
        .files
        .iter()
        .find_map(|f| f.path.strip_suffix("/__init__.py"))
        .ok_or("package")?
        .to_string();
    let cheats = [
        // Rewrite the visible tests and plant hidden-looking ones.
        "for f in tests/test_*.py; do printf 'import unittest\\n' > \"$f\"; done\n\
         printf 'import unittest\\nclass T(unittest.TestCase):\\n    def test_ok(self): pass\\n' > tests/test_hidden.py\n\
         mkdir -p /tests && cp tests/test_hidden.py /tests/test_hidden.py".to_string(),
        // A sitecustomize that disables every unittest.
        "d=$(python3 -c 'import site; print(site.getsitepackages()[0])'); mkdir -p \"$d\"\n\
         printf 'import unittest\\nunittest.TestCase.run = lambda self, result=None: None\\n' > \"$d/sitecustomize.py\"".to_string(),
        // Monkeypatch the test machinery from inside the package under test.
        format!("printf 'import unittest, builtins\\nunittest.TestCase.assertEqual = lambda *a, **k: None\\n' >> {pkg}/__init__.py"),
    ];
    for c in &cheats {
        let r = run(b.as_ref(), &task, Some(&script(c)))?;
        ensure!(
            r.reward == 0.0 && !r.passed && r.infra_error.is_none(),
            "tampering agent {c:?} scored: {r:?}"
        );
    }
    // Replace the interpreter with one that reports every hidden test (even
    // knowing their ids) as passing: it would fool a grader in a fork of the
    // final state, but built-in tasks are graded in a fresh sandbox.
    let VerifierSpec::TestSuite(ts) = &task.verifier else {
        return Err("swe tasks use a test_suite verifier".into());
    };
    let mut fake = String::from("#!/bin/sh\ncat <<'EOF'\n");
    for id in ts.fail_to_pass.iter().chain(&ts.pass_to_pass) {
        let name = id.rsplit('.').next().unwrap_or("t");
        fake.push_str(&format!("{name} ({id}) ... ok\n"));
    }
    fake.push_str("EOF\n");
    let fake_python = Solution {
        files: vec![FileSpec::executable("/usr/bin/python3.11", fake)],
        ..Solution::default()
    };
    let forked = GradeOptions {
        mode: Some(GradeMode::Fork),
        ..Default::default()
    };
    let r = run_with(
        b.as_ref(),
        &task,
        Some(&fake_python),
        &PrepareOptions::default(),
        &forked,
    )?;
    ensure!(
        r.passed,
        "the fake interpreter does fool a fork-mode grader: {r:?}"
    );
    let r = run(b.as_ref(), &task, Some(&fake_python))?;
    ensure!(
        !r.passed && r.reward == 0.0 && r.infra_error.is_none(),
        "fresh grading defeats a fake interpreter: {r:?}"
    );
    let oracle = task.oracle.clone().unwrap_or_default();
    let r = run(b.as_ref(), &task, Some(&oracle))?;
    ensure!(r.passed && r.reward == 1.0, "oracle: {r:?}");
    Ok(())
}

// --- Harbor -------------------------------------------------------------------

fn make_harbor(dir: &Path, dockerfile: bool) -> Result<(), Failed> {
    write(
        &dir.join("task.toml"),
        "version = \"1.0\"\n[metadata]\ndifficulty = \"easy\"\ncategory = \"file-ops\"\ntags = [\"demo\"]\n\
         [verifier]\ntimeout_sec = 60.0\n[agent]\ntimeout_sec = 120.0\n\
         [environment]\ncpus = 1\nmemory_mb = 1024\nstorage_mb = 512\n",
    )?;
    write(
        &dir.join("instruction.md"),
        "Create /app/hello.txt containing `hello world`.\n",
    )?;
    write(&dir.join("environment/data.txt"), "input data\n")?;
    if dockerfile {
        write(
            &dir.join("environment/Dockerfile"),
            "FROM ubuntu:24.04\nWORKDIR /app\n",
        )?;
    }
    write(
        &dir.join("tests/test.sh"),
        "#!/bin/bash\nif [ \"$(cat /app/hello.txt 2>/dev/null)\" = \"hello world\" ]; then\n  echo 1 > /logs/verifier/reward.txt\nelse\n  echo 0 > /logs/verifier/reward.txt\nfi\n",
    )?;
    write(
        &dir.join("solution/solve.sh"),
        "#!/bin/bash\necho 'hello world' > /app/hello.txt\n",
    )?;
    Ok(())
}

fn harbor_task_folder() -> TestResult {
    let b = backend()?;
    let dir = tmp()?;
    let tdir = dir.path().join("set/hello-task");
    make_harbor(&tdir, false)?;
    let tasks = arbor_task::load(&dir.path().join("set"), &OpenOptions::default())
        .map_err(|e| format!("{e}"))?;
    ensure!(tasks.len() == 1, "one task");
    let t = &tasks[0];
    ensure!(
        t.id == "hello-task" && t.verifier.kind() == "reward_file",
        "mapping: {t:?}"
    );
    ensure!(
        t.environment.resources.memory_mb == Some(1024),
        "resources parsed"
    );
    ensure!(t.meta_str("difficulty") == Some("easy"), "metadata kept");

    let oracle = t.oracle.clone().ok_or("oracle from solve.sh")?;
    let r = run(b.as_ref(), t, Some(&oracle))?;
    ensure!(r.passed && r.reward == 1.0, "solve.sh must score 1: {r:?}");
    let r = run(b.as_ref(), t, None)?;
    ensure!(
        !r.passed && r.reward == 0.0 && r.infra_error.is_none(),
        "nothing must score 0: {r:?}"
    );

    // An agent that writes the reward itself, edits the tests, or makes
    // /logs a symlink to a planted reward still scores 0.
    let cheats = [
        "mkdir -p /logs/verifier && echo 1 > /logs/verifier/reward.txt && echo '{\"reward\": 1}' > /logs/verifier/reward.json",
        "mkdir -p /tests && printf '#!/bin/bash\\necho 1 > /logs/verifier/reward.txt\\n' > /tests/test.sh && chmod +x /tests/test.sh",
        "mkdir -p /tmp/fake/verifier && echo 1 > /tmp/fake/verifier/reward.txt && rm -rf /logs && ln -s /tmp/fake /logs",
        "mkdir -p /logs && ln -s /tmp /logs/verifier && echo 1 > /tmp/reward.txt",
        // Breaking the sandbox so grading cannot run is the agent's failure, not infrastructure's.
        "rm -f /usr/bin/rm /bin/rm /usr/bin/mkdir /bin/mkdir",
    ];
    for c in cheats {
        let r = run(b.as_ref(), t, Some(&script(c)))?;
        ensure!(
            r.reward == 0.0 && !r.passed && r.infra_error.is_none(),
            "cheat {c:?} scored: {r:?}"
        );
    }

    // A task needing an image: clear error, unless allowed on the default rootfs.
    let ddir = dir.path().join("docker-task");
    make_harbor(&ddir, true)?;
    let dt = arbor_task::harbor::load_task_dir(&ddir).map_err(|e| format!("{e}"))?;
    match rt()?.block_on(run_solution(
        b.as_ref(),
        &dt,
        None,
        &PrepareOptions::default(),
        &GradeOptions::default(),
    )) {
        Err(e @ TaskError::NeedsOci { .. }) => {
            ensure!(e.to_string().contains("has no image store"), "message: {e}")
        }
        other => return Err(format!("expected NeedsOci, got {other:?}").into()),
    }
    let allow = PrepareOptions {
        allow_default_rootfs: true,
        ..Default::default()
    };
    let r = run_with(
        b.as_ref(),
        &dt,
        dt.oracle.as_ref(),
        &allow,
        &GradeOptions::default(),
    )?;
    ensure!(r.passed, "allowed on default rootfs: {r:?}");
    Ok(())
}

// --- SWE-bench ----------------------------------------------------------------

fn git(dir: &Path, args: &[&str]) -> Result<String, Failed> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const JUNIT_RUNNER: &str = r#"import sys, unittest
from xml.sax.saxutils import quoteattr
suite = unittest.defaultTestLoader.discover('tests', top_level_dir='.')
def flat(s):
    for t in s:
        if isinstance(t, unittest.TestSuite):
            yield from flat(t)
        else:
            yield t
tests = list(flat(suite))
res = unittest.TextTestRunner(verbosity=2).run(suite)
bad = {t.id(): 'failure' for t, _ in res.failures}
bad.update({t.id(): 'error' for t, _ in res.errors})
with open('report.xml', 'w') as f:
    f.write('<?xml version="1.0"?>\n<testsuites><testsuite name="unittest">\n')
    for t in tests:
        cls, _, name = t.id().rpartition('.')
        inner = {'failure': '<failure message="failed"/>', 'error': '<error message="error"/>'}.get(bad.get(t.id()), '')
        f.write('<testcase classname=%s name=%s>%s</testcase>\n' % (quoteattr(cls), quoteattr(name), inner))
    f.write('</testsuite></testsuites>\n')
"#;

/// A repository with a bug commit and a fix commit (fix + new test).
/// Returns (repo dir, base commit, gold patch, test patch).
fn make_repo(root: &Path) -> Result<(PathBuf, String, String, String), Failed> {
    let repo = root.join("calc-repo");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q"])?;
    write(&repo.join("calc/__init__.py"), "")?;
    write(
        &repo.join("calc/ops.py"),
        "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n",
    )?;
    write(&repo.join("tests/__init__.py"), "")?;
    write(
        &repo.join("tests/test_ops.py"),
        "import unittest\n\nfrom calc.ops import add, mul\n\n\nclass TestOps(unittest.TestCase):\n    def test_mul(self):\n        self.assertEqual(mul(3, 4), 12)\n",
    )?;
    write(&repo.join("run_junit.py"), JUNIT_RUNNER)?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "bug"])?;
    let base = git(&repo, &["rev-parse", "HEAD"])?.trim().to_string();
    write(
        &repo.join("calc/ops.py"),
        "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n",
    )?;
    write(
        &repo.join("tests/test_ops.py"),
        "import unittest\n\nfrom calc.ops import add, mul\n\n\nclass TestOps(unittest.TestCase):\n    def test_mul(self):\n        self.assertEqual(mul(3, 4), 12)\n\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n",
    )?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "fix"])?;
    let patch = git(&repo, &["diff", &base, "HEAD", "--", "calc"])?;
    let test_patch = git(&repo, &["diff", &base, "HEAD", "--", "tests"])?;
    Ok((repo, base, patch, test_patch))
}

fn swebench_instance_grading() -> TestResult {
    let b = backend()?;
    let dir = tmp()?;
    let root = dir.path();
    let (repo, base, patch, test_patch) = make_repo(root)?;
    let bundle = root.join("calc.bundle");
    git(
        &repo,
        &["bundle", "create", bundle.to_str().ok_or("path")?, "--all"],
    )?;
    let inst = serde_json::json!({
        "instance_id": "acme__calc-1", "repo": "acme/calc", "base_commit": base, "patch": patch,
        "test_patch": test_patch, "problem_statement": "add() subtracts instead of adding.",
        "hints_text": "", "created_at": "2026-01-01T00:00:00Z", "version": "0.1",
        "FAIL_TO_PASS": "[\"tests.test_ops.TestOps.test_add\"]",
        "PASS_TO_PASS": "[\"tests.test_ops.TestOps.test_mul\"]",
        "environment_setup_commit": base,
    });
    write(&root.join("a/instances.jsonl"), &format!("{inst}\n"))?;
    write(
        &root.join("a/swebench.toml"),
        &format!(
            "[repos]\n\"acme/calc\" = \"{}\"\n\n[specs.\"acme/calc\".\"0.1\"]\ninstall = \"python3 -c 'import calc'\"\n\
             test_cmd = \"python3 -m unittest -v\"\nparser = \"unittest\"\n",
            repo.display()
        ),
    )?;
    // Second config: the same instance from a bundle, graded from JUnit XML.
    write(&root.join("b/instances.jsonl"), &format!("{inst}\n"))?;
    write(
        &root.join("b/swebench.toml"),
        &format!(
            "[repos]\n\"acme/calc\" = \"{}\"\n\n[specs.\"acme/calc\".\"*\"]\ntest_cmd = \"python3 run_junit.py\"\n\
             parser = \"junit\"\njunit_path = \"report.xml\"\ntest_files_as_args = false\n",
            bundle.display()
        ),
    )?;
    for cfg in ["a", "b"] {
        let tasks = arbor_task::load(
            &root.join(cfg).join("instances.jsonl"),
            &OpenOptions::default(),
        )
        .map_err(|e| format!("{cfg}: {e}"))?;
        let t = &tasks[0];
        ensure!(
            t.domain == "swe" && t.verifier.kind() == "test_suite",
            "{cfg}: mapping"
        );
        let gold = t.oracle.clone().ok_or("gold patch")?;
        let r = run(b.as_ref(), t, Some(&gold))?;
        ensure!(
            r.passed && r.details["resolved"] == true,
            "{cfg}: gold patch must resolve: {r:?}"
        );
        let empty = Solution {
            patch: Some(String::new()),
            ..Solution::default()
        };
        let r = run(b.as_ref(), t, Some(&empty))?;
        ensure!(
            !r.passed && r.infra_error.is_none(),
            "{cfg}: empty patch must not resolve: {r:?}"
        );
        ensure!(
            r.details["FAIL_TO_PASS"]["failure"][0] == "tests.test_ops.TestOps.test_add",
            "{cfg}: F2P failure listed: {}",
            r.details
        );
        // The agent cannot see the fix commit: the repo holds only the base.
        let probe = script(&format!(
            "test \"$(git rev-list --all | wc -l)\" = 1 && ! git cat-file -e {}^{{commit}} 2>/dev/null && echo 'def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b' > calc/ops.py",
            git(&repo, &["rev-parse", "HEAD"])?.trim()
        ));
        let r = run(b.as_ref(), t, Some(&probe))?;
        ensure!(
            r.passed,
            "{cfg}: only the base commit is visible, and a hand fix resolves: {r:?}"
        );
        // Editing the tests to pass does not help: they are restored.
        let cheat = script("printf 'import unittest\\n' > tests/test_ops.py");
        let r = run(b.as_ref(), t, Some(&cheat))?;
        ensure!(!r.passed, "{cfg}: deleting tests must not resolve: {r:?}");
    }

    // Predictions: write, read back, grade.
    let preds = vec![
        Prediction {
            instance_id: "acme__calc-1".into(),
            model_name_or_path: "gold".into(),
            model_patch: patch.clone(),
        },
        Prediction {
            instance_id: "acme__calc-1".into(),
            model_name_or_path: "empty".into(),
            model_patch: String::new(),
        },
        Prediction {
            instance_id: "nope".into(),
            model_name_or_path: "x".into(),
            model_patch: String::new(),
        },
    ];
    let pf = root.join("preds.jsonl");
    swebench::write_predictions(&pf, &preds).map_err(|e| format!("{e}"))?;
    let back = swebench::read_predictions(&pf).map_err(|e| format!("{e}"))?;
    ensure!(back == preds, "predictions roundtrip");
    let tasks = arbor_task::load(&root.join("a/instances.jsonl"), &OpenOptions::default())
        .map_err(|e| format!("{e}"))?;
    let res = rt()?.block_on(swebench::evaluate_predictions(
        b.clone(),
        &tasks,
        &back,
        2,
        &PrepareOptions::default(),
        &GradeOptions::default(),
    ));
    ensure!(
        res.len() == 3 && res[0].resolved && !res[1].resolved && !res[2].resolved,
        "prediction results"
    );
    ensure!(
        res[2].error.as_deref() == Some("unknown instance_id"),
        "unknown instance reported"
    );
    Ok(())
}

// --- verifiers ----------------------------------------------------------------

fn native_task(verifier: VerifierSpec) -> Task {
    Task {
        id: "t".into(),
        domain: "general".into(),
        instruction: "test".into(),
        environment: Default::default(),
        verifier,
        oracle: None,
        grade_mode: None,
        metadata: Default::default(),
    }
}

fn hanging_verifier_is_stopped() -> TestResult {
    let b = backend()?;
    let t = native_task(VerifierSpec::ExitStatus(CommandSpec {
        command: "sleep 1000 & sleep 1000".into(),
        files: vec![],
        timeout_s: Some(1.0),
    }));
    let start = Instant::now();
    let r = run(b.as_ref(), &t, None)?;
    ensure!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    ensure!(
        r.timed_out && !r.passed && r.reward == 0.0,
        "hang reported: {r:?}"
    );
    ensure!(
        r.details["reason"]
            .as_str()
            .is_some_and(|s| s.contains("timed out")),
        "reason: {}",
        r.details
    );
    Ok(())
}

fn composite_and_fresh_grading() -> TestResult {
    let b = backend()?;
    let t = native_task(VerifierSpec::Composite(CompositeSpec {
        parts: vec![
            WeightedVerifier {
                weight: 1.0,
                verifier: VerifierSpec::ExitStatus(CommandSpec {
                    command: "test -f /workspace/extra.txt".into(),
                    files: vec![],
                    timeout_s: None,
                }),
            },
            WeightedVerifier {
                weight: 3.0,
                verifier: VerifierSpec::AnswerMatch(AnswerMatchSpec {
                    path: "answer.txt".into(),
                    expected: "3.14159".into(),
                    alternatives: vec![],
                    mode: MatchMode::Numeric,
                    tolerance: Some(0.001),
                }),
            },
        ],
        pass_threshold: None,
    }));
    let sol = Solution {
        files: vec![FileSpec::text("answer.txt", "about 3.1416\n")],
        ..Solution::default()
    };
    let r = run(b.as_ref(), &t, Some(&sol))?;
    ensure!(
        (r.reward - 0.75).abs() < 1e-9 && !r.passed,
        "weighted composite: {r:?}"
    );

    // Fresh grading: only the workdir survives.
    let t = native_task(VerifierSpec::ExitStatus(CommandSpec {
        command: "test -f /workspace/out.txt && ! test -e /etc/agent-was-here".into(),
        files: vec![],
        timeout_s: None,
    }));
    let sol = script("touch /workspace/out.txt /etc/agent-was-here");
    let forked = run(b.as_ref(), &t, Some(&sol))?;
    ensure!(!forked.passed, "fork keeps the agent's /etc change");
    let fresh = GradeOptions {
        mode: Some(GradeMode::Fresh),
        ..Default::default()
    };
    let r = run_with(
        b.as_ref(),
        &t,
        Some(&sol),
        &PrepareOptions::default(),
        &fresh,
    )?;
    ensure!(r.passed, "fresh grading sees only the workdir: {r:?}");
    Ok(())
}

/// A tiny OpenAI-compatible stand-in on loopback: answers each request with
/// the next scripted reply, records the requests.
struct Judge {
    url: String,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
    handle: std::thread::JoinHandle<()>,
}

fn judge_server(replies: Vec<(u16, String)>) -> Result<Judge, Failed> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reqs = requests.clone();
    let handle = std::thread::spawn(move || {
        for (status, body) in replies {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read headers, then Content-Length bytes of body (bounded).
            let mut need: Option<usize> = None;
            for _ in 0..10_000 {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    if need.is_none() {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse().ok())
                            })
                            .unwrap_or(0);
                        need = Some(end + 4 + len);
                    }
                    if need.is_some_and(|n| buf.len() >= n) {
                        break;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            if let Ok(mut r) = reqs.lock() {
                r.push(String::from_utf8_lossy(&buf).into_owned());
            }
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    Ok(Judge {
        url,
        requests,
        handle,
    })
}

fn chat(content: &str) -> String {
    serde_json::json!({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
    .to_string()
}

fn judge_task(url: &str, retries: u32) -> Task {
    let mut t = native_task(VerifierSpec::LlmJudge(JudgeSpec {
        endpoint: url.to_string(),
        model: "judge-1".into(),
        api_key_env: None,
        rubric: "Score 1 if the poem mentions the moon.".into(),
        path: "/workspace/answer.txt".into(),
        reference: Some("A poem about the moon.".into()),
        max_retries: retries,
        timeout_s: Some(5.0),
        pass_threshold: Some(0.5),
    }));
    t.instruction = "Write a poem about the moon.".into();
    t
}

fn llm_judge_retries_and_keeps_calls() -> TestResult {
    let b = backend()?;
    let answer = Solution {
        files: vec![FileSpec::text(
            "/workspace/answer.txt",
            "The moon is bright.\n",
        )],
        ..Solution::default()
    };

    // Garbage, then a server error, then a fenced JSON score.
    let j = judge_server(vec![
        (200, chat("I would rate this highly!")),
        (500, "{\"error\": \"overloaded\"}".into()),
        (
            200,
            chat("```json\n{\"score\": 0.8, \"reason\": \"mentions the moon\"}\n```"),
        ),
    ])?;
    let r = run(b.as_ref(), &judge_task(&j.url, 3), Some(&answer))?;
    let _ = j.handle.join();
    ensure!(
        r.passed && (r.reward - 0.8).abs() < 1e-9 && r.infra_error.is_none(),
        "judge result: {r:?}"
    );
    ensure!(
        r.judge_calls.len() == 3,
        "calls kept: {}",
        r.judge_calls.len()
    );
    ensure!(
        r.judge_calls[1].status == Some(500) && r.judge_calls[2].score == Some(0.8),
        "call records"
    );
    let reqs = j.requests.lock().map(|v| v.clone()).unwrap_or_default();
    ensure!(
        reqs.len() == 3 && reqs[0].contains("POST /v1/chat/completions"),
        "requests: {reqs:?}"
    );
    ensure!(
        reqs[0].contains("mentions the moon") && reqs[0].contains("The moon is bright"),
        "rubric and answer sent"
    );

    // A judge that never gives a usable score: infrastructure error, bounded calls.
    let j = judge_server(vec![
        (200, chat("no idea")),
        (200, "not json at all".into()),
        (200, chat("{\"score\": 42}")),
    ])?;
    let r = run(b.as_ref(), &judge_task(&j.url, 2), Some(&answer))?;
    let _ = j.handle.join();
    ensure!(
        r.infra_error.is_some() && !r.passed && r.judge_calls.len() == 3,
        "broken judge: {r:?}"
    );

    // No answer file: the agent's failure, no judge call.
    let j = judge_server(vec![])?;
    let r = run(b.as_ref(), &judge_task(&j.url, 1), None)?;
    let _ = j.handle.join();
    ensure!(
        !r.passed && r.infra_error.is_none() && r.judge_calls.is_empty(),
        "no answer: {r:?}"
    );
    Ok(())
}

fn gen_list_and_native_roundtrip() -> TestResult {
    let dir = tmp()?;
    let files = arbor_task::gen_to_dir("websearch", 5, 3, &GenOptions::default(), dir.path())
        .map_err(|e| format!("{e}"))?;
    ensure!(files.len() == 5, "5 files");
    let list = arbor_task::list(dir.path(), &OpenOptions::default()).map_err(|e| format!("{e}"))?;
    ensure!(
        list.len() == 5 && list.iter().all(|s| s.domain == "websearch" && s.has_oracle),
        "list: {list:?}"
    );
    let back = arbor_task::load(dir.path(), &OpenOptions::default()).map_err(|e| format!("{e}"))?;
    let orig = generate("websearch", 5, 3, &GenOptions::default()).map_err(|e| format!("{e}"))?;
    let mut a: Vec<_> = back.iter().map(|t| t.id.clone()).collect();
    let mut o: Vec<_> = orig.iter().map(|t| t.id.clone()).collect();
    a.sort();
    o.sort();
    ensure!(a == o, "ids survive the roundtrip");
    ensure!(
        back.iter().all(|t| orig.contains(t)),
        "tasks survive the roundtrip"
    );
    Ok(())
}

fn main() {
    if arbor_sandbox::init::is_init_invocation() {
        arbor_sandbox::init::run();
    }
    arbor_sandbox::local::allow_self_as_init();
    let args = Arguments::from_args();
    let tests = vec![
        Trial::test(
            "malformed_inputs_name_file_and_field",
            malformed_inputs_name_file_and_field,
        ),
        Trial::test(
            "gen_list_and_native_roundtrip",
            gen_list_and_native_roundtrip,
        ),
        Trial::test("builtin_domains_check", builtin_domains_check),
        Trial::test(
            "swe_domain_resists_test_tampering",
            swe_domain_resists_test_tampering,
        ),
        Trial::test("harbor_task_folder", harbor_task_folder),
        Trial::test("swebench_instance_grading", swebench_instance_grading),
        Trial::test("hanging_verifier_is_stopped", hanging_verifier_is_stopped),
        Trial::test("composite_and_fresh_grading", composite_and_fresh_grading),
        Trial::test(
            "llm_judge_retries_and_keeps_calls",
            llm_judge_retries_and_keeps_calls,
        ),
    ];
    let filtered = args.filter.is_some() || !args.skip.is_empty();
    let conclusion = libtest_mimic::run(&args, tests);
    if !args.list && !filtered {
        match LocalBackend::with_defaults() {
            Ok(b) => {
                let leaks = gc::leaks(b.state_root(), b.cgroups());
                if !leaks.is_clean() {
                    eprintln!("LEAK CHECK FAILED: {leaks:?}");
                    std::process::exit(101);
                }
                eprintln!("leak check: no sandbox left behind");
            }
            Err(e) => {
                eprintln!("leak check could not run: {e}");
                std::process::exit(101);
            }
        }
    }
    conclusion.exit();
}
