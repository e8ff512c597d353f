//! `swe`: a small Python package with planted bugs and hidden tests that
//! expose them. The fix is an edit; the oracle is the patch.
//!
//! Self-contained: visible tests use only the standard library's `unittest`,
//! and everything runs under the host's `/usr/bin/python3` in the default
//! rootfs (pytest is not needed and nothing is installed at task time).
//! Hidden cases are evaluated out of process by `swe_runner.py`, which
//! reports them in `unittest -v` format for the `test_suite` verifier.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

mod families;

use families::FAMILIES;

use super::{pick, word};
use crate::model::{Environment, FileSpec, Solution, Task};
use crate::verify::{LogParser, TestSuiteSpec, VerifierSpec};

/// A function of the package, correct and with its bug.
struct Func {
    name: String,
    params: &'static str,
    doc: String,
    correct: Vec<String>,
    buggy: Vec<String>,
    /// (call arguments, expected, buggy result) where the bug shows.
    exposing: Vec<(String, String, String)>,
    /// (call arguments, expected) where the bug does not show.
    agreeing: Vec<(String, String)>,
}

fn py_list(xs: &[i64]) -> String {
    format!(
        "[{}]",
        xs.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn py_str(s: &str) -> String {
    format!("'{s}'")
}

fn py_str_list(xs: &[String]) -> String {
    format!(
        "[{}]",
        xs.iter().map(|x| py_str(x)).collect::<Vec<_>>().join(", ")
    )
}

fn ints(rng: &mut StdRng, n: usize, lo: i64, hi: i64) -> Vec<i64> {
    (0..n).map(|_| rng.gen_range(lo..=hi)).collect()
}

/// (exposing cases, agreeing cases).
type Cases = (Vec<(String, String, String)>, Vec<(String, String)>);

/// Collect cases until there are enough of each kind (bounded).
fn cases(
    rng: &mut StdRng,
    mut sample: impl FnMut(&mut StdRng) -> (String, String, String),
    want_exposing: usize,
    want_agreeing: usize,
) -> Cases {
    let mut ex: Vec<(String, String, String)> = Vec::new();
    let mut ag: Vec<(String, String)> = Vec::new();
    for _ in 0..400 {
        let (args, good, bad) = sample(rng);
        if good != bad {
            if ex.len() < want_exposing && !ex.iter().any(|e| e.0 == args) {
                ex.push((args, good, bad));
            }
        } else if ag.len() < want_agreeing && !ag.iter().any(|a| a.0 == args) {
            ag.push((args, good));
        }
        if ex.len() >= want_exposing && ag.len() >= want_agreeing {
            break;
        }
    }
    (ex, ag)
}

fn module_source(title: &str, funcs: &[Func], buggy: &[bool]) -> String {
    let mut s = format!("\"\"\"{title}\"\"\"\n");
    for (f, b) in funcs.iter().zip(buggy) {
        s.push_str(&format!(
            "\n\ndef {}({}):\n    \"\"\"{}\"\"\"\n",
            f.name, f.params, f.doc
        ));
        for l in if *b { &f.buggy } else { &f.correct } {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// A unified diff replacing `old` by `new` (same number of lines) as one hunk.
fn full_diff(path: &str, old: &str, new: &str) -> String {
    let o: Vec<&str> = old.lines().collect();
    let n: Vec<&str> = new.lines().collect();
    let mut d = format!(
        "diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n@@ -1,{} +1,{} @@\n",
        o.len(),
        n.len()
    );
    for (a, b) in o.iter().zip(&n) {
        if a == b {
            d.push_str(&format!(" {a}\n"));
        } else {
            d.push_str(&format!("-{a}\n+{b}\n"));
        }
    }
    d
}

fn camel(s: &str) -> String {
    s.split('_')
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

const RUNNER: &str = include_str!("swe_runner.py");

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let d = difficulty as usize;
    let pkg = word(rng, 2);
    let module = pick(rng, &["utils", "core", "helpers", "ops", "calc", "tools"]).to_string();
    let funcs = draw_funcs(rng, d);
    let buggy = plant_bugs(rng, &funcs, d);
    let title = format!("Small helpers of the {pkg} project.");
    let src_bug = module_source(&title, &funcs, &buggy);
    let src_ok = module_source(&title, &funcs, &vec![false; funcs.len()]);
    let rel = format!("{pkg}/{module}.py");
    let tests = tests(&pkg, &module, &funcs, &buggy, d);
    let bugs: Vec<&Func> = funcs
        .iter()
        .zip(&buggy)
        .filter(|(_, b)| **b)
        .map(|(f, _)| f)
        .collect();
    let environment = Environment {
        files: vec![
            FileSpec::text(
                format!("{pkg}/__init__.py"),
                format!("\"\"\"The {pkg} package.\"\"\"\n"),
            ),
            FileSpec::text(rel.clone(), src_bug.clone()),
            FileSpec::text("tests/__init__.py", ""),
            FileSpec::text(format!("tests/test_{module}.py"), tests.visible),
            FileSpec::text(
                "README.md",
                format!("# {pkg}\n\n{title}\n\nRun the tests: `python3 -m unittest -v`\n"),
            ),
        ],
        ..Environment::default()
    };
    let verifier = VerifierSpec::TestSuite(TestSuiteSpec {
        command: "python3 -I -S /tests/run_tests.py".into(),
        pre_command: None,
        patch: None,
        files: vec![
            FileSpec::text("/tests/run_tests.py", RUNNER),
            FileSpec::text(
                "/tests/cases.json",
                json!({"module": format!("{pkg}.{module}"), "cases": tests.hidden, "timeout": 30})
                    .to_string(),
            ),
        ],
        parser: LogParser::Unittest,
        junit_path: None,
        fail_to_pass: tests.fail_to_pass,
        pass_to_pass: tests.pass_to_pass,
        timeout_s: Some(60.0),
    });
    let mut task = Task {
        id: String::new(),
        domain: "swe".into(),
        instruction: instruction(&pkg, &module, &bugs, d),
        environment,
        verifier,
        oracle: Some(Solution {
            patch: Some(full_diff(&rel, &src_bug, &src_ok)),
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: Default::default(),
    };
    task.metadata.insert(
        "bugs".into(),
        json!(bugs.iter().map(|f| f.name.clone()).collect::<Vec<_>>()),
    );
    task
}

/// `1 + d` functions from distinct families, with names unique in the module.
fn draw_funcs(rng: &mut StdRng, d: usize) -> Vec<Func> {
    let n_funcs = (1 + d).min(FAMILIES.len());
    let mut fams: Vec<usize> = (0..FAMILIES.len()).collect();
    // Partial Fisher-Yates for the chosen families.
    for i in 0..n_funcs {
        let j = rng.gen_range(i..FAMILIES.len());
        fams.swap(i, j);
    }
    let mut funcs: Vec<Func> = fams[..n_funcs].iter().map(|&w| FAMILIES[w](rng)).collect();
    for i in 0..funcs.len() {
        while funcs[..i].iter().any(|f| f.name == funcs[i].name) {
            funcs[i].name.push_str("_v2");
        }
    }
    funcs
}

/// Which functions carry their bug: one, or two from difficulty 4, among
/// those with an exposing case.
fn plant_bugs(rng: &mut StdRng, funcs: &[Func], d: usize) -> Vec<bool> {
    let n_bugs = if d >= 4 { 2 } else { 1 };
    let mut buggy = vec![false; funcs.len()];
    let mut order: Vec<usize> = (0..funcs.len())
        .filter(|&i| !funcs[i].exposing.is_empty())
        .collect();
    for i in 0..order.len() {
        let j = rng.gen_range(i..order.len());
        order.swap(i, j);
    }
    for &i in order.iter().take(n_bugs) {
        buggy[i] = true;
    }
    buggy
}

/// The visible test file and the hidden cases with their FAIL_TO_PASS /
/// PASS_TO_PASS split.
struct Tests {
    visible: String,
    /// Every case of every function, as data for the runner.
    hidden: Vec<serde_json::Value>,
    fail_to_pass: Vec<String>,
    pass_to_pass: Vec<String>,
}

fn tests(pkg: &str, module: &str, funcs: &[Func], buggy: &[bool], d: usize) -> Tests {
    let names: Vec<String> = funcs.iter().map(|f| f.name.clone()).collect();
    let mut visible = format!(
        "import unittest\n\nfrom {pkg}.{module} import {}\n",
        names.join(", ")
    );
    let mut cases = Vec::new();
    let (mut f2p, mut p2p) = (Vec::new(), Vec::new());
    for (fi, f) in funcs.iter().enumerate() {
        let class = format!("Test{}", camel(&f.name));
        visible.push_str(&format!("\n\nclass {class}(unittest.TestCase):\n"));
        let mut k = 0;
        let all = f
            .exposing
            .iter()
            .map(|(a, w, _)| (a, w, true))
            .chain(f.agreeing.iter().map(|(a, w)| (a, w, false)));
        for (args, want, exposes) in all {
            k += 1;
            let t = format!("test_{}_{k}", f.name);
            let id = format!("test_hidden.{class}.{t}");
            cases
                .push(json!({"id": id, "name": t, "func": f.name, "args": args, "expected": want}));
            if exposes && buggy[fi] {
                f2p.push(id)
            } else {
                p2p.push(id)
            }
        }
        visible_tests(&mut visible, f, d);
    }
    Tests {
        visible,
        hidden: cases,
        fail_to_pass: f2p,
        pass_to_pass: p2p,
    }
}

/// Visible tests of one function: its agreeing cases, plus (easy levels)
/// one exposing case.
fn visible_tests(visible: &mut String, f: &Func, d: usize) {
    let mut shown = 0;
    for (args, want) in &f.agreeing {
        shown += 1;
        visible.push_str(&format!(
            "    def test_{}_{shown}(self):\n        self.assertEqual({}({args}), {want})\n\n",
            f.name, f.name
        ));
    }
    if d <= 2
        && let Some((args, want, _)) = f.exposing.last()
    {
        shown += 1;
        visible.push_str(&format!(
            "    def test_{}_{shown}(self):\n        self.assertEqual({}({args}), {want})\n\n",
            f.name, f.name
        ));
    }
    if shown == 0 {
        visible.push_str("    pass\n");
    }
}

/// The bug report; harder levels say less about each symptom.
fn instruction(pkg: &str, module: &str, bugs: &[&Func], d: usize) -> String {
    let mut symptoms = Vec::new();
    for f in bugs {
        if let Some((args, want, got)) = f.exposing.first() {
            symptoms.push(match d {
                1 | 2 => format!(
                    "- `{pkg}.{module}.{}({args})` returns `{got}`, but it should return `{want}`.",
                    f.name
                ),
                3 | 4 => format!(
                    "- `{}({args})` returns `{got}`, which contradicts its docstring.",
                    f.name
                ),
                _ => format!("- `{}` gives wrong results for some inputs.", f.name),
            });
        }
    }
    format!(
        "The Python project in /workspace (package `{pkg}`) has {} bug{} reported by users:\n\n{}\n\n\
         Fix the source code so that every function behaves as its docstring says. Do not edit the \
         tests; hidden tests will be run. You can run the visible tests with \
         `cd /workspace && python3 -m unittest -v`.",
        bugs.len(),
        if bugs.len() == 1 { "" } else { "s" },
        symptoms.join("\n"),
    )
}
