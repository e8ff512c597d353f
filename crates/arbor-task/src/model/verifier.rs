//! Verifier specifications and where grading happens: plain data, part of
//! the task model (graded by `crate::verify`).

use serde::{Deserialize, Serialize};

use super::FileSpec;

/// How a finished sandbox is scored. Tagged by `kind` in task files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VerifierSpec {
    /// A command's exit status: 0 scores 1, anything else 0.
    ExitStatus(CommandSpec),
    /// The Harbor contract: a command writes `/logs/verifier/reward.txt`
    /// (a number) or `/logs/verifier/reward.json` (`{"reward": x, ...}`).
    RewardFile(CommandSpec),
    /// Run a test suite, parse per-test status, grade FAIL_TO_PASS / PASS_TO_PASS.
    TestSuite(TestSuiteSpec),
    /// Compare an answer file with the expected answer.
    AnswerMatch(AnswerMatchSpec),
    /// Ask a model, over an OpenAI-compatible endpoint, to score against a rubric.
    LlmJudge(JudgeSpec),
    /// A weighted combination of verifiers.
    Composite(CompositeSpec),
}

impl VerifierSpec {
    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            VerifierSpec::ExitStatus(_) => "exit_status",
            VerifierSpec::RewardFile(_) => "reward_file",
            VerifierSpec::TestSuite(_) => "test_suite",
            VerifierSpec::AnswerMatch(_) => "answer_match",
            VerifierSpec::LlmJudge(_) => "llm_judge",
            VerifierSpec::Composite(_) => "composite",
        }
    }

    /// Every file this verifier (and its parts) uploads at grading time.
    pub fn files(&self) -> Vec<&FileSpec> {
        match self {
            VerifierSpec::ExitStatus(c) | VerifierSpec::RewardFile(c) => c.files.iter().collect(),
            VerifierSpec::TestSuite(t) => t.files.iter().collect(),
            VerifierSpec::AnswerMatch(_) | VerifierSpec::LlmJudge(_) => Vec::new(),
            VerifierSpec::Composite(c) => c.parts.iter().flat_map(|p| p.verifier.files()).collect(),
        }
    }

    /// Every file in the spec, mutably (for resolving relative sources).
    pub fn files_mut(&mut self) -> Vec<&mut FileSpec> {
        match self {
            VerifierSpec::ExitStatus(c) | VerifierSpec::RewardFile(c) => {
                c.files.iter_mut().collect()
            }
            VerifierSpec::TestSuite(t) => t.files.iter_mut().collect(),
            VerifierSpec::AnswerMatch(_) | VerifierSpec::LlmJudge(_) => Vec::new(),
            VerifierSpec::Composite(c) => c
                .parts
                .iter_mut()
                .flat_map(|p| p.verifier.files_mut())
                .collect(),
        }
    }
}

/// A grading command with the files it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Shell command (`/bin/sh -c`), run in the workdir.
    pub command: String,
    /// Files uploaded after the agent has finished (typically under `/tests`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// Timeout, seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

/// How per-test status is read from a test run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogParser {
    /// pytest's `-rA` short test summary (`PASSED tests/x.py::test_y`).
    #[default]
    Pytest,
    /// `python -m unittest -v` (`test_y (pkg.mod.Class.test_y) ... ok`).
    Unittest,
    /// A JUnit XML report at `junit_path`.
    Junit,
}

/// A test-suite verifier (SWE-bench style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSuiteSpec {
    /// The test command (`/bin/sh -c`, in the workdir).
    pub command: String,
    /// Run before the test patch is applied (e.g. restore test files the agent touched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_command: Option<String>,
    /// Unified diff applied in the workdir after the agent has finished (the `test_patch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Files uploaded after the agent has finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// Output format.
    #[serde(default)]
    pub parser: LogParser,
    /// Where the JUnit XML report is written (with `parser = "junit"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub junit_path: Option<String>,
    /// Tests that must pass after the change (and failed before).
    #[serde(default)]
    pub fail_to_pass: Vec<String>,
    /// Tests that must still pass.
    #[serde(default)]
    pub pass_to_pass: Vec<String>,
    /// Timeout, seconds (default 1800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

/// How an answer is compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchMode {
    /// Byte-for-byte after trimming surrounding whitespace.
    Exact,
    /// Case-folded, punctuation dropped, whitespace collapsed.
    #[default]
    Normalized,
    /// `expected` is a regular expression that must match the whole answer.
    Regex,
    /// Both parse as numbers within `tolerance` (absolute, or relative to
    /// the expected value, whichever is larger).
    Numeric,
}

fn default_answer_path() -> String {
    "/workspace/answer.txt".to_string()
}

/// An answer-match verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerMatchSpec {
    /// File holding the agent's answer.
    #[serde(default = "default_answer_path")]
    pub path: String,
    /// Expected answer (or pattern).
    pub expected: String,
    /// Further accepted answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<String>,
    /// Comparison.
    #[serde(default)]
    pub mode: MatchMode,
    /// Numeric tolerance (with `mode = "numeric"`), default 1e-6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
}

fn default_retries() -> u32 {
    3
}

/// An LLM-as-judge verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// Base URL of an OpenAI-compatible API (`http://host:port/v1`).
    pub endpoint: String,
    /// Model name sent in requests.
    pub model: String,
    /// Environment variable holding the API key (sent as a bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The rubric: what a good answer is, how to score.
    pub rubric: String,
    /// File holding the response to judge.
    #[serde(default = "default_answer_path")]
    pub path: String,
    /// A reference answer shown to the judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Retries after a failed or unparseable reply (so at most `1 + max_retries` calls).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Per-call timeout, seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Score (0..=1) at or above which the task counts as passed (default 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_threshold: Option<f64>,
}

/// A weighted part of a composite verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedVerifier {
    /// Weight (non-negative).
    #[serde(default = "one")]
    pub weight: f64,
    /// The part.
    pub verifier: VerifierSpec,
}

fn one() -> f64 {
    1.0
}

/// A weighted composite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeSpec {
    /// Parts; reward = Σ wᵢ·rᵢ / Σ wᵢ.
    pub parts: Vec<WeightedVerifier>,
    /// Reward at or above which the composite passes (default: every part passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_threshold: Option<f64>,
}

/// Where grading happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradeMode {
    /// In a fork of the agent's final state (processes are not copied).
    #[default]
    Fork,
    /// In a fresh sandbox built from the task's spec, into which only the
    /// workdir of the final state is copied. Stricter (nothing the agent did
    /// outside the workdir survives), but only for tasks whose outcome lives
    /// in the workdir.
    Fresh,
}
