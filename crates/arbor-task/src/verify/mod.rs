//! Verifiers: score a finished sandbox, hardened against agents that try to
//! plant a reward.
//!
//! [`grade`] never touches the agent's sandbox: it grades a fork of its final
//! state (or a fresh sandbox holding a copy of the workdir), first empties
//! `/tests` and `/logs/verifier` there, then uploads the verifier's files,
//! runs its commands with timeouts and reads the outcome. Every result says
//! whose fault a failure is ([`VerifierResult::fault`]).

pub mod answer;
pub mod judge;
pub mod parse;
mod result;

use std::time::{Duration, Instant};

use arbor_sandbox::{Backend, ExecRequest, ExecResult, Sandbox, SandboxError};
use serde_json::json;
use tracing::{debug, warn};

pub use result::{Fault, JudgeCall, VerifierResult};

pub use crate::model::{
    AnswerMatchSpec, CommandSpec, CompositeSpec, GradeMode, JudgeSpec, LogParser, MatchMode,
    TestSuiteSpec, VerifierSpec, WeightedVerifier,
};

use crate::model::Task;
use crate::sandbox::{abs_path, sandbox_spec, upload_files};

/// Default timeout of grading commands, seconds.
pub const DEFAULT_VERIFIER_TIMEOUT_S: f64 = 600.0;
/// How much of a command's output is kept in result details.
const TAIL: usize = 4000;

/// Options of [`grade`].
#[derive(Debug, Clone, Default)]
pub struct GradeOptions {
    /// Fork or fresh sandbox, overriding the task's `grade_mode` when set.
    pub mode: Option<GradeMode>,
    /// Overrides every verifier timeout (seconds) when set.
    pub timeout_override_s: Option<f64>,
}

/// Grade `task` on the final state of the agent's sandbox. The agent's
/// sandbox is left untouched; the grading sandbox is destroyed.
/// `backend` is needed only for [`GradeMode::Fresh`].
pub async fn grade(
    task: &Task,
    final_state: &dyn Sandbox,
    backend: Option<&dyn Backend>,
    opts: &GradeOptions,
) -> VerifierResult {
    let start = Instant::now();
    let sb = match mode_of(task, opts) {
        GradeMode::Fork => final_state.fork().await.map_err(|e| e.to_string()),
        GradeMode::Fresh => match backend {
            None => Err("fresh grading needs a backend".to_string()),
            Some(b) => match capture_workdir(task, final_state).await {
                Ok(archive) => fresh_sandbox(task, archive, b).await,
                Err(e) => Err(e),
            },
        },
    };
    graded_in(task, sb, opts, start).await
}

/// The grading mode `grade` uses for `task`.
pub fn mode_of(task: &Task, opts: &GradeOptions) -> GradeMode {
    opts.mode.or(task.grade_mode).unwrap_or_default()
}

/// What [`GradeMode::Fresh`] keeps of the final state: its workdir, as a tar
/// archive. With it captured, the caller can destroy the agent's sandbox
/// before [`grade_workdir`] asks for the grading one, so a rollout never
/// holds a sandbox while it waits for another (on a cluster with no free
/// room, rollouts that all did would wait for each other forever).
pub async fn capture_workdir(task: &Task, final_state: &dyn Sandbox) -> Result<Vec<u8>, String> {
    let workdir = &task.environment.workdir;
    final_state
        .read_tar(workdir)
        .await
        .map_err(|e| format!("reading {workdir}: {e}"))
}

/// Grades a workdir captured by [`capture_workdir`] in a fresh sandbox made
/// from the task's spec (destroyed after).
pub async fn grade_workdir(
    task: &Task,
    archive: Vec<u8>,
    backend: &dyn Backend,
    opts: &GradeOptions,
) -> VerifierResult {
    let start = Instant::now();
    let sb = fresh_sandbox(task, archive, backend).await;
    graded_in(task, sb, opts, start).await
}

/// Runs the verifier in the grading sandbox `sb` (or reports why there is
/// none), then destroys it.
async fn graded_in(
    task: &Task,
    sb: Result<Box<dyn Sandbox>, String>,
    opts: &GradeOptions,
    start: Instant,
) -> VerifierResult {
    let sb = match sb {
        Ok(sb) => sb,
        Err(e) => {
            let mut r = VerifierResult::infra(format!("creating the grading sandbox: {e}"));
            r.seconds = start.elapsed().as_secs_f64();
            return r;
        }
    };
    let mut r = grade_in(task, sb.as_ref(), opts).await;
    if let Err(e) = sb.destroy().await {
        warn!(task = %task.id, "destroying grading sandbox: {e}");
    }
    r.seconds = start.elapsed().as_secs_f64();
    debug!(task = %task.id, reward = r.reward, passed = r.passed, infra = ?r.infra_error, "graded");
    r
}

async fn fresh_sandbox(
    task: &Task,
    archive: Vec<u8>,
    backend: &dyn Backend,
) -> Result<Box<dyn Sandbox>, String> {
    let workdir = &task.environment.workdir;
    let sb = backend
        .create(&sandbox_spec(task))
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = sb.write_tar(workdir, archive).await {
        let _ = sb.destroy().await;
        return Err(format!("copying {workdir}: {e}"));
    }
    Ok(sb)
}

/// The hardening step: whatever the agent left in `/tests` or
/// `/logs/verifier` (files, symlinks) is removed before anything is uploaded.
const CLEAN_SCRIPT: &str = "rm -rf /tests /logs/verifier; \
    if [ -e /logs ] && { [ -L /logs ] || [ ! -d /logs ]; }; then rm -f /logs; fi; \
    mkdir -p /tests /logs/verifier";

async fn grade_in(task: &Task, sb: &dyn Sandbox, opts: &GradeOptions) -> VerifierResult {
    match sb
        .exec(
            ExecRequest::shell(CLEAN_SCRIPT)
                .cwd("/")
                .timeout(Duration::from_secs(60)),
        )
        .await
    {
        Ok(r) if r.success() => {}
        // The final state cannot even run `rm`/`mkdir` (the agent broke
        // its own sandbox, or filled its storage): the agent's failure.
        Ok(r) => {
            return VerifierResult::score(
                false,
                json!({ "reason": format!(
                    "the final state is unusable for grading: emptying /tests and /logs/verifier failed: {}",
                    tail(&r.stderr_str())
                ) }),
            );
        }
        Err(e) => return exec_failure("emptying /tests", e),
    }
    let files: Vec<_> = task.verifier.files().into_iter().cloned().collect();
    if let Err(e) = upload_files(sb, &task.environment.workdir, &files).await {
        let msg = format!("uploading verifier files: {e}");
        return if e.is_infrastructure() {
            VerifierResult::infra(msg)
        } else {
            VerifierResult::score(false, json!({ "reason": msg }))
        };
    }
    let ctx = Ctx { task, sb, opts };
    Box::pin(ctx.run(&task.verifier)).await
}

struct Ctx<'a> {
    task: &'a Task,
    sb: &'a dyn Sandbox,
    opts: &'a GradeOptions,
}

enum Ran {
    Done(ExecResult),
    Failed(VerifierResult),
}

impl Ctx<'_> {
    fn timeout(&self, t: Option<f64>, default: f64) -> Duration {
        let s = self.opts.timeout_override_s.or(t).unwrap_or(default);
        Duration::from_secs_f64(s.clamp(0.001, 7.0 * 24.0 * 3600.0))
    }

    async fn sh(&self, what: &str, script: &str, timeout: Duration) -> Ran {
        let req = ExecRequest::shell(script)
            .cwd(self.task.environment.workdir.clone())
            .timeout(timeout);
        match self.sb.exec(req).await {
            Ok(r) if r.timed_out => {
                let mut v = VerifierResult::score(
                    false,
                    json!({
                        "reason": format!("{what} timed out after {:.1}s", timeout.as_secs_f64()),
                        "stdout": tail(&r.stdout_str()),
                        "stderr": tail(&r.stderr_str()),
                    }),
                );
                v.timed_out = true;
                Ran::Failed(v)
            }
            Ok(r) => Ran::Done(r),
            Err(e) => Ran::Failed(exec_failure(what, e)),
        }
    }

    async fn run(&self, spec: &VerifierSpec) -> VerifierResult {
        match spec {
            VerifierSpec::ExitStatus(c) => {
                let t = self.timeout(c.timeout_s, DEFAULT_VERIFIER_TIMEOUT_S);
                match self.sh("verifier command", &c.command, t).await {
                    Ran::Failed(v) => v,
                    Ran::Done(r) => VerifierResult::score(
                        r.exit_code == 0,
                        json!({
                            "exit_code": r.exit_code,
                            "stdout": tail(&r.stdout_str()),
                            "stderr": tail(&r.stderr_str()),
                        }),
                    ),
                }
            }
            VerifierSpec::RewardFile(c) => self.reward_file(c).await,
            VerifierSpec::TestSuite(t) => self.test_suite(t).await,
            VerifierSpec::AnswerMatch(a) => match self.read_answer(&a.path).await {
                Ok(text) => answer::grade_answer(a, &text),
                Err(v) => v,
            },
            VerifierSpec::LlmJudge(j) => match self.read_answer(&j.path).await {
                Ok(text) => judge::judge(j, &self.task.instruction, &text).await,
                Err(v) => v,
            },
            VerifierSpec::Composite(c) => self.composite(c).await,
        }
    }

    async fn read_answer(&self, path: &str) -> Result<String, VerifierResult> {
        let path = abs_path(&self.task.environment.workdir, path);
        match self.sb.read_file(&path).await {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(SandboxError::File { message, .. }) => Err(VerifierResult::score(
                false,
                json!({ "reason": format!("no answer at {path}: {message}") }),
            )),
            Err(e) => Err(exec_failure("reading the answer", e)),
        }
    }

    async fn reward_file(&self, c: &CommandSpec) -> VerifierResult {
        let t = self.timeout(c.timeout_s, DEFAULT_VERIFIER_TIMEOUT_S);
        let r = match self.sh("verifier command", &c.command, t).await {
            Ran::Failed(v) => return v,
            Ran::Done(r) => r,
        };
        let out = json!({
            "exit_code": r.exit_code,
            "stdout": tail(&r.stdout_str()),
            "stderr": tail(&r.stderr_str()),
        });
        let txt = self.sb.read_file("/logs/verifier/reward.txt").await;
        let js = self.sb.read_file("/logs/verifier/reward.json").await;
        let parsed = match (txt, js) {
            (Ok(b), _) => parse_reward_txt(&String::from_utf8_lossy(&b)).map(|x| (x, "reward.txt")),
            (_, Ok(b)) => {
                parse_reward_json(&String::from_utf8_lossy(&b)).map(|x| (x, "reward.json"))
            }
            (Err(e), _) if e.is_infrastructure() => {
                return exec_failure("reading the reward file", e);
            }
            (Err(_), Err(_)) => {
                Err("the verifier wrote no /logs/verifier/reward.txt or reward.json".into())
            }
        };
        match parsed {
            Ok((x, file)) => {
                let reward = if x.is_finite() {
                    x.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let mut v = VerifierResult::score(reward >= 1.0, out);
                v.reward = reward;
                v.details["reward_file"] = json!(file);
                v.details["raw_reward"] = json!(x);
                v
            }
            Err(reason) => {
                let mut v = VerifierResult::score(false, out);
                v.details["reason"] = json!(reason);
                v
            }
        }
    }

    async fn test_suite(&self, t: &TestSuiteSpec) -> VerifierResult {
        let short = Duration::from_secs(300);
        if let Some(pre) = &t.pre_command {
            match self.sh("pre-test command", pre, short).await {
                Ran::Failed(v) => return v,
                Ran::Done(_) => {}
            }
        }
        if let Some(patch) = &t.patch {
            match apply_patch(
                self.sb,
                &self.task.environment.workdir,
                patch,
                "/tmp/arbor-test.patch",
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => {
                    return VerifierResult::score(
                        false,
                        json!({ "reason": format!("the test patch does not apply to the final state: {msg}") }),
                    );
                }
                Err(v) => return v,
            }
        }
        let timeout = self.timeout(t.timeout_s, 1800.0);
        let r = match self.sh("test command", &t.command, timeout).await {
            Ran::Failed(v) => return v,
            Ran::Done(r) => r,
        };
        let log = format!("{}\n{}", r.stdout_str(), r.stderr_str());
        let report = match t.parser {
            LogParser::Pytest => parse::parse_pytest(&log),
            LogParser::Unittest => parse::parse_unittest(&log),
            LogParser::Junit => {
                let path = abs_path(
                    &self.task.environment.workdir,
                    t.junit_path.as_deref().unwrap_or("junit.xml"),
                );
                match self.sb.read_file(&path).await {
                    Ok(b) => match parse::parse_junit(&String::from_utf8_lossy(&b)) {
                        Ok(rep) => rep,
                        Err(e) => {
                            return VerifierResult::score(
                                false,
                                json!({ "reason": format!("unreadable JUnit report {path}: {e}"), "log": tail(&log) }),
                            );
                        }
                    },
                    Err(e) if e.is_infrastructure() => {
                        return exec_failure("reading the JUnit report", e);
                    }
                    Err(e) => {
                        return VerifierResult::score(
                            false,
                            json!({ "reason": format!("no JUnit report: {e}"), "log": tail(&log) }),
                        );
                    }
                }
            }
        };
        let split = |names: &[String]| -> (Vec<String>, Vec<String>) {
            names.iter().cloned().partition(|n| report.passed(n))
        };
        let (f2p_ok, f2p_bad) = split(&t.fail_to_pass);
        let (p2p_ok, p2p_bad) = split(&t.pass_to_pass);
        let resolved = if t.fail_to_pass.is_empty() && t.pass_to_pass.is_empty() {
            !report.tests.is_empty()
                && report
                    .tests
                    .values()
                    .all(|s| s.is_pass() || *s == parse::TestStatus::Skipped)
        } else {
            f2p_bad.is_empty() && p2p_bad.is_empty()
        };
        VerifierResult::score(
            resolved,
            json!({
                "resolved": resolved,
                "FAIL_TO_PASS": { "success": f2p_ok, "failure": f2p_bad },
                "PASS_TO_PASS": { "success": p2p_ok, "failure": p2p_bad },
                "tests": report.tests,
                "exit_code": r.exit_code,
                "log": tail(&log),
            }),
        )
    }

    async fn composite(&self, c: &CompositeSpec) -> VerifierResult {
        let mut total_w = 0.0;
        let mut sum = 0.0;
        let mut all_pass = true;
        let mut parts = Vec::new();
        let mut out = VerifierResult::score(false, json!({}));
        for p in &c.parts {
            let r = Box::pin(self.run(&p.verifier)).await;
            let w = if p.weight.is_finite() {
                p.weight.max(0.0)
            } else {
                0.0
            };
            total_w += w;
            sum += w * r.reward;
            all_pass &= r.passed;
            out.timed_out |= r.timed_out;
            if out.infra_error.is_none() {
                out.infra_error.clone_from(&r.infra_error);
            }
            out.judge_calls.extend(r.judge_calls.iter().cloned());
            parts.push(json!({
                "kind": p.verifier.kind(), "weight": w, "reward": r.reward,
                "passed": r.passed, "details": r.details,
            }));
        }
        out.reward = if total_w > 0.0 { sum / total_w } else { 0.0 };
        out.passed = out.infra_error.is_none()
            && match c.pass_threshold {
                Some(th) => out.reward >= th,
                None => all_pass && !c.parts.is_empty(),
            };
        out.details = json!({ "parts": parts });
        out
    }
}

/// The shell commands that apply the unified diff in `patch_file` in the
/// current directory: `git apply`, else `patch -p1` (GNU patch with fuzz;
/// busybox's, as in Alpine and other small images, knows neither `--batch`
/// nor `--fuzz`, so it gets only `-N`). On failure `git apply`'s error is
/// printed and the status is 1. Shared with the scripted-oracle policy,
/// which types the same commands an agent would.
pub fn apply_patch_script(patch_file: &str) -> String {
    format!(
        "git apply --whitespace=nowarn {patch_file} 2>/tmp/arbor-git-apply.err || \
         case \"$(patch --version 2>/dev/null)\" in \
           *GNU*) patch -p1 --forward --batch --fuzz=3 < {patch_file} ;; \
           *) patch -p1 -N < {patch_file} ;; \
         esac || {{ cat /tmp/arbor-git-apply.err >&2; exit 1; }}"
    )
}

/// Apply a unified diff in `workdir` with [`apply_patch_script`].
/// `Ok(Err(msg))` = it does not apply; `Err` = the sandbox failed.
pub(crate) async fn apply_patch(
    sb: &dyn Sandbox,
    workdir: &str,
    patch: &str,
    tmp: &str,
) -> Result<Result<(), String>, VerifierResult> {
    if patch.trim().is_empty() {
        return Ok(Ok(()));
    }
    if let Err(e) = sb.write_file(tmp, patch.as_bytes(), 0o644).await {
        return Err(exec_failure("writing the patch", e));
    }
    let script = apply_patch_script(tmp);
    let req = ExecRequest::shell(script)
        .cwd(workdir.to_string())
        .timeout(Duration::from_secs(120));
    match sb.exec(req).await {
        Ok(r) if r.success() => Ok(Ok(())),
        Ok(r) => Ok(Err(tail(&format!("{}{}", r.stdout_str(), r.stderr_str())))),
        Err(e) => Err(exec_failure("applying the patch", e)),
    }
}

/// A sandbox error during grading: the infrastructure's unless the sandbox
/// says the request was at fault (then the agent's final state is).
fn exec_failure(what: &str, e: SandboxError) -> VerifierResult {
    if e.is_infrastructure() {
        VerifierResult::infra(format!("{what}: {e}"))
    } else {
        VerifierResult::score(false, json!({ "reason": format!("{what}: {e}") }))
    }
}

fn parse_reward_txt(s: &str) -> Result<f64, String> {
    let t = s.trim();
    t.parse::<f64>().map_err(|_| {
        format!(
            "reward.txt is not a number: {:?}",
            t.chars().take(80).collect::<String>()
        )
    })
}

fn parse_reward_json(s: &str) -> Result<f64, String> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("reward.json is not JSON: {e}"))?;
    if let Some(x) = v.as_f64() {
        return Ok(x);
    }
    let obj = v
        .as_object()
        .ok_or("reward.json is not an object or number")?;
    if let Some(x) = obj.get("reward") {
        return x
            .as_f64()
            .ok_or_else(|| "reward.json: `reward` is not a number".to_string());
    }
    let nums: Vec<f64> = obj.values().filter_map(|x| x.as_f64()).collect();
    if nums.is_empty() {
        return Err("reward.json has no numeric value".into());
    }
    Ok(nums.iter().sum::<f64>() / nums.len() as f64)
}

/// The last [`TAIL`] bytes of a text (on a char boundary).
pub(crate) fn tail(s: &str) -> String {
    if s.len() <= TAIL {
        return s.to_string();
    }
    let mut start = s.len() - TAIL;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_files() {
        assert_eq!(parse_reward_txt(" 1\n"), Ok(1.0));
        assert!(parse_reward_txt("yes").is_err());
        assert_eq!(parse_reward_json(r#"{"reward": 0.5, "x": 1}"#), Ok(0.5));
        assert_eq!(parse_reward_json(r#"{"a": 1, "b": 0}"#), Ok(0.5));
        assert!(parse_reward_json(r#"{"reward": "hi"}"#).is_err());
        assert!(parse_reward_json("[").is_err());
    }
}
