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

use super::pick;
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

fn family(rng: &mut StdRng, which: usize) -> Func {
    match which {
        0 => {
            let k = rng.gen_range(2..=9);
            let c = rng.gen_range(-20..=20);
            let name = pick(
                rng,
                &["scaled_total", "weighted_sum", "sum_scaled", "total_weight"],
            )
            .to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let n = r.gen_range(0..=5);
                    let xs = ints(r, n, -5, 20);
                    let good: i64 = xs.iter().map(|x| x * k).sum::<i64>() + c;
                    let bad: i64 = xs.iter().map(|x| x + k).sum::<i64>() + c;
                    (py_list(&xs), good.to_string(), bad.to_string())
                },
                3,
                1,
            );
            Func {
                name,
                params: "xs",
                doc: format!("Return the sum of every element of xs multiplied by {k}, plus {c}."),
                correct: vec![format!("    return sum(x * {k} for x in xs) + {c}")],
                buggy: vec![format!("    return sum(x + {k} for x in xs) + {c}")],
                exposing,
                agreeing,
            }
        }
        1 => {
            let lo = rng.gen_range(-10..=10);
            let hi = lo + rng.gen_range(5..=40);
            let name = pick(rng, &["clamp", "bound", "limit_value", "clip"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let x = r.gen_range(lo - 20..=hi + 20);
                    let good = x.min(hi).max(lo);
                    let bad = x.min(hi - 1).max(lo);
                    (x.to_string(), good.to_string(), bad.to_string())
                },
                2,
                2,
            );
            Func {
                name,
                params: "x",
                doc: format!("Return x limited to the closed range [{lo}, {hi}]."),
                correct: vec![format!("    return max({lo}, min(x, {hi}))")],
                buggy: vec![format!("    return max({lo}, min(x, {}))", hi - 1)],
                exposing,
                agreeing,
            }
        }
        2 => {
            let p = pick(rng, &["re", "un", "pre", "de", "in", "ex", "sub", "over"]).to_string();
            let name =
                pick(rng, &["count_prefixed", "prefix_count", "num_with_prefix"]).to_string();
            let pool: Vec<String> = [
                "do", "play", "build", "mark", "set", "load", "turn", "write", "view", "cast",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let pp = p.clone();
            let (exposing, agreeing) = cases(
                rng,
                move |r| {
                    let n = r.gen_range(1..=5);
                    let mut ws = Vec::new();
                    for _ in 0..n {
                        let stem = pick(r, &pool).clone();
                        let w = match r.gen_range(0..3) {
                            0 => stem,
                            1 => format!("{pp}{stem}"),
                            _ => {
                                let mut c = pp.chars();
                                let cap = c
                                    .next()
                                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                                    .unwrap_or_default();
                                format!("{cap}{stem}")
                            }
                        };
                        ws.push(w);
                    }
                    let good = ws
                        .iter()
                        .filter(|w| w.to_lowercase().starts_with(&pp))
                        .count();
                    let bad = ws.iter().filter(|w| w.starts_with(&pp)).count();
                    (py_str_list(&ws), good.to_string(), bad.to_string())
                },
                3,
                1,
            );
            Func {
                name,
                params: "words",
                doc: format!("Return how many words start with '{p}', ignoring case."),
                correct: vec![format!(
                    "    return sum(1 for w in words if w.lower().startswith('{p}'))"
                )],
                buggy: vec![format!(
                    "    return sum(1 for w in words if w.startswith('{p}'))"
                )],
                exposing,
                agreeing,
            }
        }
        3 => {
            let name = pick(rng, &["running_total", "prefix_sums", "cumulative"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let n = r.gen_range(0..=5);
                    let xs = ints(r, n, -9, 30);
                    let mut t = 0;
                    let good: Vec<i64> = xs
                        .iter()
                        .map(|x| {
                            t += x;
                            t
                        })
                        .collect();
                    let mut t2 = 0;
                    let bad: Vec<i64> = xs
                        .iter()
                        .skip(1)
                        .map(|x| {
                            t2 += x;
                            t2
                        })
                        .collect();
                    (py_list(&xs), py_list(&good), py_list(&bad))
                },
                3,
                1,
            );
            Func {
                name,
                params: "xs",
                doc: "Return the list of running totals of xs.".into(),
                correct: vec![
                    "    out = []".into(),
                    "    total = 0".into(),
                    "    for x in xs:".into(),
                    "        total += x".into(),
                    "        out.append(total)".into(),
                    "    return out".into(),
                ],
                buggy: vec![
                    "    out = []".into(),
                    "    total = 0".into(),
                    "    for x in xs[1:]:".into(),
                    "        total += x".into(),
                    "        out.append(total)".into(),
                    "    return out".into(),
                ],
                exposing,
                agreeing,
            }
        }
        4 => {
            let a = rng.gen_range(2..=7);
            let mut b = rng.gen_range(2..=9);
            if b == a {
                b += 1;
            }
            let name =
                pick(rng, &["sum_multiples", "multiples_total", "sum_divisible"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let limit: i64 = if r.gen_bool(0.2) {
                        r.gen_range(0..=1)
                    } else {
                        r.gen_range(2..=60)
                    };
                    let good: i64 = (0..limit).filter(|n| n % a == 0 || n % b == 0).sum();
                    let bad: i64 = (0..limit).filter(|n| n % a == 0 && n % b == 0).sum();
                    (limit.to_string(), good.to_string(), bad.to_string())
                },
                3,
                1,
            );
            Func {
                name,
                params: "limit",
                doc: format!(
                    "Return the sum of the numbers below limit divisible by {a} or by {b}."
                ),
                correct: vec![format!(
                    "    return sum(n for n in range(limit) if n % {a} == 0 or n % {b} == 0)"
                )],
                buggy: vec![format!(
                    "    return sum(n for n in range(limit) if n % {a} == 0 and n % {b} == 0)"
                )],
                exposing,
                agreeing,
            }
        }
        5 => {
            let name = pick(rng, &["dedupe", "unique_in_order", "distinct"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let n = r.gen_range(0..=6);
                    let xs = ints(r, n, 1, 6);
                    let mut good: Vec<i64> = Vec::new();
                    for x in &xs {
                        if !good.contains(x) {
                            good.push(*x);
                        }
                    }
                    let bad: Vec<i64> = good.iter().rev().copied().collect();
                    (py_list(&xs), py_list(&good), py_list(&bad))
                },
                3,
                1,
            );
            Func {
                name,
                params: "items",
                doc: "Return the distinct items in order of first appearance.".into(),
                correct: vec![
                    "    seen = set()".into(),
                    "    out = []".into(),
                    "    for x in items:".into(),
                    "        if x not in seen:".into(),
                    "            seen.add(x)".into(),
                    "            out.append(x)".into(),
                    "    return out".into(),
                ],
                buggy: vec![
                    "    seen = set()".into(),
                    "    out = []".into(),
                    "    for x in items:".into(),
                    "        if x not in seen:".into(),
                    "            seen.add(x)".into(),
                    "            out.insert(0, x)".into(),
                    "    return out".into(),
                ],
                exposing,
                agreeing,
            }
        }
        6 => {
            let name = pick(rng, &["median", "middle_value", "median_of"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let n = r.gen_range(1..=6);
                    let xs = ints(r, n, 0, 50);
                    let mut s = xs.clone();
                    s.sort();
                    let mid = s.len() / 2;
                    let (good, bad) = if s.len() % 2 == 1 {
                        (s[mid].to_string(), s[mid].to_string())
                    } else {
                        let g = (s[mid - 1] + s[mid]) as f64 / 2.0;
                        (format!("{g:?}"), s[mid].to_string())
                    };
                    let bad_cmp =
                        if s.len().is_multiple_of(2) && (s[mid - 1] + s[mid]) == 2 * s[mid] {
                            good.clone()
                        } else {
                            bad
                        };
                    (py_list(&xs), good, bad_cmp)
                },
                3,
                1,
            );
            Func {
                name,
                params: "xs",
                doc: "Return the median of a non-empty list (the mean of the two middle values for even lengths).".into(),
                correct: vec![
                    "    s = sorted(xs)".into(),
                    "    mid = len(s) // 2".into(),
                    "    if len(s) % 2 == 1:".into(),
                    "        return s[mid]".into(),
                    "    return (s[mid - 1] + s[mid]) / 2".into(),
                ],
                buggy: vec![
                    "    s = sorted(xs)".into(),
                    "    mid = len(s) // 2".into(),
                    "    if len(s) % 2 == 1:".into(),
                    "        return s[mid]".into(),
                    "    return s[mid]".into(),
                ],
                exposing,
                agreeing,
            }
        }
        7 => {
            let k: usize = rng.gen_range(2..=4);
            let name = pick(rng, &["chunked", "batches", "split_every"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let n = r.gen_range(0..=9);
                    let xs = ints(r, n, 0, 9);
                    let good: Vec<String> = xs.chunks(k).map(py_list).collect();
                    let bad: Vec<String> =
                        xs.chunks(k).filter(|c| c.len() == k).map(py_list).collect();
                    (
                        py_list(&xs),
                        format!("[{}]", good.join(", ")),
                        format!("[{}]", bad.join(", ")),
                    )
                },
                3,
                1,
            );
            Func {
                name,
                params: "xs",
                doc: format!(
                    "Split xs into consecutive lists of {k} elements (the last may be shorter)."
                ),
                correct: vec![
                    "    out = []".into(),
                    format!("    for i in range(0, len(xs), {k}):"),
                    format!("        out.append(xs[i:i + {k}])"),
                    "    return out".into(),
                ],
                buggy: vec![
                    "    out = []".into(),
                    format!("    for i in range(0, len(xs) - {k} + 1, {k}):"),
                    format!("        out.append(xs[i:i + {k}])"),
                    "    return out".into(),
                ],
                exposing,
                agreeing,
            }
        }
        8 => {
            let k: u8 = rng.gen_range(1..=12);
            let name = pick(rng, &["rotate_letters", "caesar", "shift_text"]).to_string();
            let shift = |s: &str, m: u8| -> String {
                s.chars()
                    .map(|c| {
                        if c.is_ascii_lowercase() {
                            (((c as u8 - b'a' + k) % m) + b'a') as char
                        } else {
                            c
                        }
                    })
                    .collect()
            };
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let n = r.gen_range(1..=2);
                    let text: Vec<String> = (0..n).map(|_| super::word(r, 2)).collect();
                    let text = text.join(" ");
                    (
                        py_str(&text),
                        py_str(&shift(&text, 26)),
                        py_str(&shift(&text, 25)),
                    )
                },
                3,
                1,
            );
            Func {
                name,
                params: "text",
                doc: format!(
                    "Shift every lowercase letter {k} places forward in the alphabet, wrapping around."
                ),
                correct: vec![
                    "    out = []".into(),
                    "    for ch in text:".into(),
                    "        if 'a' <= ch <= 'z':".into(),
                    format!("            out.append(chr((ord(ch) - 97 + {k}) % 26 + 97))"),
                    "        else:".into(),
                    "            out.append(ch)".into(),
                    "    return ''.join(out)".into(),
                ],
                buggy: vec![
                    "    out = []".into(),
                    "    for ch in text:".into(),
                    "        if 'a' <= ch <= 'z':".into(),
                    format!("            out.append(chr((ord(ch) - 97 + {k}) % 25 + 97))"),
                    "        else:".into(),
                    "            out.append(ch)".into(),
                    "    return ''.join(out)".into(),
                ],
                exposing,
                agreeing,
            }
        }
        _ => {
            let t2 = rng.gen_range(30..=60);
            let t1 = t2 + rng.gen_range(10..=30);
            let name = pick(rng, &["letter_grade", "grade", "rank_score"]).to_string();
            let (exposing, agreeing) = cases(
                rng,
                |r| {
                    let s = if r.gen_bool(0.4) {
                        t1
                    } else {
                        r.gen_range(0..=100)
                    };
                    let g = |strict: bool| {
                        if (strict && s > t1) || (!strict && s >= t1) {
                            "'A'"
                        } else if s >= t2 {
                            "'B'"
                        } else {
                            "'C'"
                        }
                    };
                    (s.to_string(), g(false).to_string(), g(true).to_string())
                },
                1,
                3,
            );
            Func {
                name,
                params: "score",
                doc: format!(
                    "Return 'A' for scores of at least {t1}, 'B' for at least {t2}, else 'C'."
                ),
                correct: vec![
                    format!("    if score >= {t1}:"),
                    "        return 'A'".into(),
                    format!("    if score >= {t2}:"),
                    "        return 'B'".into(),
                    "    return 'C'".into(),
                ],
                buggy: vec![
                    format!("    if score > {t1}:"),
                    "        return 'A'".into(),
                    format!("    if score >= {t2}:"),
                    "        return 'B'".into(),
                    "    return 'C'".into(),
                ],
                exposing,
                agreeing,
            }
        }
    }
}

const FAMILIES: usize = 10;

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
    let pkg = super::word(rng, 2);
    let module = pick(rng, &["utils", "core", "helpers", "ops", "calc", "tools"]).to_string();
    let n_funcs = (1 + d).min(FAMILIES);
    let mut fams: Vec<usize> = (0..FAMILIES).collect();
    // Partial Fisher-Yates for the chosen families.
    for i in 0..n_funcs {
        let j = rng.gen_range(i..FAMILIES);
        fams.swap(i, j);
    }
    let mut funcs: Vec<Func> = fams[..n_funcs].iter().map(|&w| family(rng, w)).collect();
    // Unique names within the module.
    for i in 0..funcs.len() {
        while funcs[..i].iter().any(|f| f.name == funcs[i].name) {
            funcs[i].name.push_str("_v2");
        }
    }
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
    let title = format!("Small helpers of the {pkg} project.");
    let src_bug = module_source(&title, &funcs, &buggy);
    let src_ok = module_source(&title, &funcs, &vec![false; funcs.len()]);
    let rel = format!("{pkg}/{module}.py");

    // Hidden tests: every case of every function, as data for the runner.
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
        // Visible tests: the agreeing cases, plus (easy levels) one exposing case.
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

    let bugs: Vec<&Func> = funcs
        .iter()
        .zip(&buggy)
        .filter(|(_, b)| **b)
        .map(|(f, _)| f)
        .collect();
    let mut symptoms = Vec::new();
    for f in &bugs {
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
    let instruction = format!(
        "The Python project in /workspace (package `{pkg}`) has {} bug{} reported by users:\n\n{}\n\n\
         Fix the source code so that every function behaves as its docstring says. Do not edit the \
         tests; hidden tests will be run. You can run the visible tests with \
         `cd /workspace && python3 -m unittest -v`.",
        bugs.len(),
        if bugs.len() == 1 { "" } else { "s" },
        symptoms.join("\n"),
    );
    let environment = Environment {
        files: vec![
            FileSpec::text(
                format!("{pkg}/__init__.py"),
                format!("\"\"\"The {pkg} package.\"\"\"\n"),
            ),
            FileSpec::text(rel.clone(), src_bug.clone()),
            FileSpec::text("tests/__init__.py", ""),
            FileSpec::text(format!("tests/test_{module}.py"), visible),
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
                json!({"module": format!("{pkg}.{module}"), "cases": cases, "timeout": 30})
                    .to_string(),
            ),
        ],
        parser: LogParser::Unittest,
        junit_path: None,
        fail_to_pass: f2p,
        pass_to_pass: p2p,
        timeout_s: Some(60.0),
    });
    let mut task = Task {
        id: String::new(),
        domain: "swe".into(),
        instruction,
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
