//! `results.json`: the held-out pass rate of every row of every domain, which the pipeline
//! writes and its report reads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::rollouts::{PassRate, SampledRate};

/// The rows of the results table, in order.
pub const ROWS: [&str; 5] = ["base", "sft", "rl", "expert", "unified"];

/// One cell of the results table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Held-out pass rate.
    pub pass_rate: f64,
    /// Held-out tasks scored (infrastructure errors excluded).
    pub n: usize,
    pub passed: usize,
    /// Binomial standard error of `pass_rate`.
    pub std_err: f64,
    pub infra_errors: usize,
    /// The same tasks sampled `[eval] samples` times each at the RL temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<SampledCell>,
}

/// The sampled pass@1 of a cell: per task the share of passing samples, averaged over tasks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampledCell {
    pub pass_rate: f64,
    /// Standard error across tasks.
    pub std_err: f64,
    pub tasks: usize,
    /// Scored samples, of which passed.
    pub samples: usize,
    pub passed: usize,
    pub temperature: f32,
}

impl SampledCell {
    pub fn new(r: &SampledRate, temperature: f32) -> Self {
        SampledCell {
            pass_rate: r.rate,
            std_err: r.std_err,
            tasks: r.tasks,
            samples: r.samples,
            passed: r.passed,
            temperature,
        }
    }
}

impl From<PassRate> for Cell {
    fn from(r: PassRate) -> Self {
        Cell {
            pass_rate: r.rate(),
            n: r.n,
            passed: r.passed,
            std_err: r.std_err(),
            infra_errors: r.infra_errors,
            sampled: None,
        }
    }
}

/// `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineResults {
    pub name: String,
    /// domain -> row -> held-out pass rate.
    pub domains: BTreeMap<String, BTreeMap<String, Cell>>,
    /// Parameters of the model.
    pub params: usize,
    /// Output directory and report.
    pub output: PathBuf,
    pub report: PathBuf,
    /// Wall seconds of this invocation.
    pub seconds: f64,
}
