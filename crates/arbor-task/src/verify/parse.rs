//! Per-test status from test-runner output: pytest `-rA`, `unittest -v`, JUnit XML.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Status of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TestStatus {
    /// Passed.
    Passed,
    /// Failed an assertion.
    Failed,
    /// Errored (setup, import, exception).
    Error,
    /// Skipped.
    Skipped,
    /// Expected failure that failed (counts as passing, as in SWE-bench).
    Xfail,
    /// Expected failure that passed.
    Xpass,
}

impl TestStatus {
    /// Counts as passing for FAIL_TO_PASS / PASS_TO_PASS (SWE-bench: PASSED or XFAIL).
    pub fn is_pass(self) -> bool {
        matches!(self, TestStatus::Passed | TestStatus::Xfail)
    }

    fn from_word(w: &str) -> Option<Self> {
        Some(match w {
            "PASSED" => TestStatus::Passed,
            "FAILED" => TestStatus::Failed,
            "ERROR" => TestStatus::Error,
            "SKIPPED" => TestStatus::Skipped,
            "XFAIL" => TestStatus::Xfail,
            "XPASS" => TestStatus::Xpass,
            _ => return None,
        })
    }
}

/// Test statuses by id, with aliases (other spellings of the same test).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestReport {
    /// Status by canonical id.
    pub tests: BTreeMap<String, TestStatus>,
    /// Alternative spelling → canonical id.
    #[serde(skip)]
    pub aliases: BTreeMap<String, String>,
}

impl TestReport {
    fn insert(&mut self, id: String, status: TestStatus, aliases: Vec<String>) {
        // A test reported twice (e.g. by pytest's verbose line and its
        // summary) keeps the worse status.
        let entry = self.tests.entry(id.clone()).or_insert(status);
        if !status.is_pass() {
            *entry = status;
        }
        for a in aliases {
            if a != id {
                self.aliases.insert(a, id.clone());
            }
        }
    }

    /// The status of a test named `name` (canonical id or an alias).
    pub fn status(&self, name: &str) -> Option<TestStatus> {
        let name = name.trim();
        self.tests.get(name).copied().or_else(|| {
            self.aliases
                .get(name)
                .and_then(|id| self.tests.get(id).copied())
        })
    }

    /// Whether `name` ran and passed.
    pub fn passed(&self, name: &str) -> bool {
        self.status(name).is_some_and(TestStatus::is_pass)
    }
}

/// Parse pytest output run with `-rA` (the short test summary; verbose
/// `path::test PASSED` lines are read too).
pub fn parse_pytest(log: &str) -> TestReport {
    let mut r = TestReport::default();
    for raw in log.lines() {
        let line = strip_ansi(raw);
        let line = line.trim();
        let mut words = line.splitn(2, ' ');
        let first = words.next().unwrap_or("");
        if let Some(status) = TestStatus::from_word(first) {
            let rest = words.next().unwrap_or("").trim();
            // `FAILED path::test - message`; SKIPPED lines are `[n] path:line: reason`.
            if status == TestStatus::Skipped && rest.starts_with('[') {
                continue;
            }
            let name = rest.split(" - ").next().unwrap_or("").trim();
            if !name.is_empty() && name.contains("::") {
                r.insert(name.to_string(), status, Vec::new());
            }
            continue;
        }
        // Verbose form: `tests/test_x.py::test_a PASSED    [ 50%]`.
        if first.contains("::")
            && let Some(w) = line.split_whitespace().nth(1)
            && let Some(status) = TestStatus::from_word(w)
        {
            r.insert(first.to_string(), status, Vec::new());
        }
    }
    r
}

/// Parse `python -m unittest -v` output (its stderr). Ids are the dotted
/// names (`pkg.module.Class.test_x`); `test_x (pkg.module.Class)` and
/// `test_x (pkg.module.Class.test_x)` spellings are aliases.
pub fn parse_unittest(log: &str) -> TestReport {
    let mut r = TestReport::default();
    let mut pending: Option<(String, String)> = None;
    for raw in log.lines() {
        let line = strip_ansi(raw);
        let line = line.trim_end();
        let (head, tail) = match line.rsplit_once(" ... ") {
            Some((h, t)) => (Some(h), t),
            None => (None, ""),
        };
        let named = |s: &str| -> Option<(String, String)> {
            let s = s.trim();
            let (name, rest) = s.split_once(" (")?;
            let inner = rest.strip_suffix(')')?;
            if name.is_empty() || name.contains(' ') || inner.contains(' ') {
                return None;
            }
            Some((name.to_string(), inner.to_string()))
        };
        let who = match head {
            Some(h) => named(h).or_else(|| pending.take()),
            None => {
                if let Some(n) = named(line) {
                    pending = Some(n);
                }
                continue;
            }
        };
        let Some((name, inner)) = who else { continue };
        let status = match tail.trim() {
            "ok" => TestStatus::Passed,
            "FAIL" => TestStatus::Failed,
            "ERROR" => TestStatus::Error,
            "expected failure" => TestStatus::Xfail,
            "unexpected success" => TestStatus::Xpass,
            t if t.starts_with("skipped") => TestStatus::Skipped,
            _ => continue,
        };
        let dotted = if inner.ends_with(&format!(".{name}")) {
            inner.clone()
        } else {
            format!("{inner}.{name}")
        };
        let aliases = vec![
            format!("{name} ({inner})"),
            format!("{name} ({})", dotted.trim_end_matches(&format!(".{name}"))),
            format!("{name} ({dotted})"),
        ];
        r.insert(dotted, status, aliases);
        pending = None;
    }
    r
}

/// Parse a JUnit XML report (pytest `--junitxml`, unittest-xml-reporting,
/// Maven/Gradle...). Ids are `classname.name`; `classname::name`,
/// `file::name` and `name` are aliases.
pub fn parse_junit(xml: &str) -> Result<TestReport, String> {
    use quick_xml::Reader;
    use quick_xml::events::Event;

    struct Case {
        classname: String,
        name: String,
        file: String,
        status: TestStatus,
    }
    fn attrs(e: &quick_xml::events::BytesStart<'_>) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for a in e.attributes().flatten() {
            let k = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let v = a
                .unescape_value()
                .map(|c| c.into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(&a.value).into_owned());
            m.insert(k, v);
        }
        m
    }
    fn finish(r: &mut TestReport, c: Case) {
        let id = if c.classname.is_empty() {
            c.name.clone()
        } else {
            format!("{}.{}", c.classname, c.name)
        };
        let mut aliases = vec![c.name.clone()];
        if !c.classname.is_empty() {
            aliases.push(format!("{}::{}", c.classname, c.name));
            aliases.push(format!("{} ({})", c.name, c.classname));
        }
        if !c.file.is_empty() {
            aliases.push(format!("{}::{}", c.file, c.name));
        }
        r.insert(id, c.status, aliases);
    }

    let mut reader = Reader::from_str(xml);
    let mut r = TestReport::default();
    let mut current: Option<Case> = None;
    let mut steps = 0usize;
    loop {
        steps += 1;
        if steps > 50_000_000 {
            return Err("JUnit XML too large".into());
        }
        let ev = reader
            .read_event()
            .map_err(|e| format!("JUnit XML at byte {}: {e}", reader.buffer_position()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) if e.name().as_ref() == b"testcase" => {
                if let Some(c) = current.take() {
                    finish(&mut r, c);
                }
                let a = attrs(e);
                let case = Case {
                    classname: a.get("classname").cloned().unwrap_or_default(),
                    name: a.get("name").cloned().unwrap_or_default(),
                    file: a.get("file").cloned().unwrap_or_default(),
                    status: TestStatus::Passed,
                };
                if matches!(ev, Event::Empty(_)) {
                    finish(&mut r, case);
                } else {
                    current = Some(case);
                }
            }
            Event::Start(e) | Event::Empty(e) => {
                if let Some(c) = current.as_mut() {
                    match e.name().as_ref() {
                        b"failure" => c.status = TestStatus::Failed,
                        b"error" if c.status != TestStatus::Failed => c.status = TestStatus::Error,
                        b"skipped" => c.status = TestStatus::Skipped,
                        _ => {}
                    }
                }
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                if let Some(c) = current.take() {
                    finish(&mut r, c);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if let Some(c) = current.take() {
        finish(&mut r, c);
    }
    Ok(r)
}

fn strip_ansi(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('\u{1b}') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytest_summary() {
        let log = "\
============================= test session starts ==============================
collected 4 items

tests/test_a.py .F.s                                                     [100%]

=================================== FAILURES ===================================
___________________________________ test_two ___________________________________
E       assert 1 == 2
=========================== short test summary info ============================
PASSED tests/test_a.py::test_one
PASSED tests/test_a.py::test_three[1-2]
FAILED tests/test_a.py::test_two - assert 1 == 2
SKIPPED [1] tests/test_a.py:12: no network
ERROR tests/test_b.py::test_setup - RuntimeError: boom
XFAIL tests/test_a.py::test_x - known bug
==================== 1 failed, 2 passed, 1 skipped in 0.03s ====================
";
        let r = parse_pytest(log);
        assert!(r.passed("tests/test_a.py::test_one"));
        assert!(r.passed("tests/test_a.py::test_three[1-2]"));
        assert_eq!(
            r.status("tests/test_a.py::test_two"),
            Some(TestStatus::Failed)
        );
        assert_eq!(
            r.status("tests/test_b.py::test_setup"),
            Some(TestStatus::Error)
        );
        assert!(r.passed("tests/test_a.py::test_x"));
        assert_eq!(r.tests.len(), 5);
    }

    #[test]
    fn pytest_verbose_lines() {
        let log = "tests/t.py::test_a PASSED                                   [ 50%]\n\
                   tests/t.py::test_b FAILED                                   [100%]\n";
        let r = parse_pytest(log);
        assert!(r.passed("tests/t.py::test_a"));
        assert!(!r.passed("tests/t.py::test_b"));
    }

    #[test]
    fn unittest_verbose() {
        let log = "\
test_add (tests.test_calc.TestCalc.test_add) ... ok
test_sub (tests.test_calc.TestCalc.test_sub) ... FAIL
test_old (tests.test_calc.TestCalc) ... ERROR
test_doc (tests.test_calc.TestCalc.test_doc)
Adds things. ... ok
test_skip (tests.test_calc.TestCalc.test_skip) ... skipped 'later'

======================================================================
FAIL: test_sub (tests.test_calc.TestCalc.test_sub)
----------------------------------------------------------------------
Ran 5 tests in 0.001s
";
        let r = parse_unittest(log);
        assert!(r.passed("tests.test_calc.TestCalc.test_add"));
        assert!(r.passed("test_add (tests.test_calc.TestCalc)"));
        assert!(!r.passed("tests.test_calc.TestCalc.test_sub"));
        assert_eq!(
            r.status("tests.test_calc.TestCalc.test_old"),
            Some(TestStatus::Error)
        );
        assert!(r.passed("tests.test_calc.TestCalc.test_doc"));
        assert_eq!(
            r.status("tests.test_calc.TestCalc.test_skip"),
            Some(TestStatus::Skipped)
        );
    }

    #[test]
    fn junit_xml() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" tests="4">
<testcase classname="tests.test_a" name="test_one" file="tests/test_a.py" time="0.001" />
<testcase classname="tests.test_a" name="test_two" time="0.001"><failure message="assert 1 == 2">trace &amp; more</failure></testcase>
<testcase classname="tests.test_a" name="test_three"><error message="boom"/></testcase>
<testcase classname="tests.test_a" name="test_four"><skipped message="later"/></testcase>
<testcase classname="tests.test_a" name="test_five"><system-out>hi</system-out></testcase>
</testsuite></testsuites>"#;
        let r = parse_junit(xml).unwrap_or_default();
        assert!(r.passed("tests.test_a.test_one"));
        assert!(r.passed("tests/test_a.py::test_one"));
        assert_eq!(r.status("tests.test_a.test_two"), Some(TestStatus::Failed));
        assert_eq!(
            r.status("tests.test_a::test_three"),
            Some(TestStatus::Error)
        );
        assert_eq!(
            r.status("tests.test_a.test_four"),
            Some(TestStatus::Skipped)
        );
        assert!(r.passed("tests.test_a.test_five"));
        assert_eq!(r.tests.len(), 5);
        assert!(parse_junit("<testsuite><testcase name='a'></testsuite>").is_err());
    }
}
