//! Run reports: `report.md` plus `plots/*.svg` in a run directory.
//!
//! Everything is computed from `results.jsonl` (one [`RolloutResult`] per
//! line), so a report can be regenerated at any time, for a finished run, a
//! running one or one that crashed: `arbor run` writes it at the end and
//! `arbor report DIR` on demand. `summary.json` is not read: it covers one
//! invocation, the report covers the whole directory.
//!
//! - [`stats`]: the numbers ([`Stats`], serializable for `--json`).
//! - [`markdown`]: the Markdown text.
//! - [`load_results`], [`generate`], [`write_report`]: files in, files out.

pub mod markdown;
pub mod stats;

use std::path::{Path, PathBuf};

use crate::plot::{self, BarChart, BarGroup, Chart, Histogram, LineChart, PlotError, Series};
use crate::record::RolloutResult;

pub use stats::{
    FailureClass, GroupStats, MeanSe, ORACLE_POLICY, PassAtK, Spread, Stats, StatusCounts, TimeUse,
    TokenUse, compute, pass_at_k,
};

/// The results file inside a run directory.
pub const RESULTS_FILE: &str = "results.jsonl";
/// The report file written into a run directory.
pub const REPORT_FILE: &str = "report.md";
/// The experiment copy inside a run directory (shown in the report if present).
pub const EXPERIMENT_FILE: &str = "experiment.toml";
/// Folder of the report's plots, relative to the run directory.
pub const PLOTS_DIR: &str = "plots";

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    // The cause is in the message and deliberately not a `source`: callers
    // print these both plainly and as anyhow chains, and neither should lose
    // or repeat it.
    #[error("reading {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A line other than the last is not a valid result: the file is
    /// damaged in a way a crash cannot explain, so no report is made from it.
    #[error("{path}:{line}: not a rollout result: {error}")]
    Parse {
        path: PathBuf,
        line: usize,
        error: serde_json::Error,
    },
    #[error(transparent)]
    Plot(#[from] PlotError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |error| ReportError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Reads a `results.jsonl`. Blank lines are skipped. An unparseable *last*
/// line is what a crash mid-append leaves behind, so it is dropped with a
/// warning; an unparseable line anywhere else is an error naming the line.
/// Lines are parsed as bytes, so a multi-byte character cut by a crash does
/// not make the whole file unreadable.
pub fn load_results(path: impl AsRef<Path>) -> Result<Vec<RolloutResult>, ReportError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let last = lines.last().map(|&(n, _)| n);
    let mut out = Vec::with_capacity(lines.len());
    for (n, line) in lines {
        match serde_json::from_slice::<RolloutResult>(line) {
            Ok(r) => out.push(r),
            Err(e) if Some(n) == last => {
                tracing::warn!(
                    path = %path.display(),
                    line = n,
                    error = %e,
                    "skipping a truncated last line (a crash mid-write)"
                );
            }
            Err(error) => {
                return Err(ReportError::Parse {
                    path: path.to_path_buf(),
                    line: n,
                    error,
                });
            }
        }
    }
    Ok(out)
}

/// A written report.
#[derive(Debug, Clone)]
pub struct Report {
    /// `report.md`.
    pub path: PathBuf,
    pub stats: Stats,
    /// The SVG files written (absolute or as joined onto the run directory).
    pub plots: Vec<PathBuf>,
}

/// The plots a report can have: (file name, alt text). Which are drawn
/// depends on the data (no failures, no failure plot).
const PLOT_FILES: [&str; 4] = [
    "pass_rate.svg",
    "reward_hist.svg",
    "duration_cdf.svg",
    "failures.svg",
];

/// Writes `report.md` and `plots/*.svg` into `run_dir`; returns the report's path.
pub fn write_report(run_dir: impl AsRef<Path>) -> Result<PathBuf, ReportError> {
    generate(run_dir.as_ref()).map(|r| r.path)
}

/// Like [`write_report`], also returning the statistics and plot paths.
pub fn generate(run_dir: &Path) -> Result<Report, ReportError> {
    let results = load_results(run_dir.join(RESULTS_FILE))?;
    let stats = compute(&results);
    let plots_dir = run_dir.join(PLOTS_DIR);
    let charts = charts(&results, &stats);
    let mut plots = Vec::new();
    let mut links = Vec::new();
    for (file, chart) in &charts {
        let path = plots_dir.join(file);
        chart.save(&path)?;
        plots.push(path);
        links.push((*file, chart.title().to_string()));
    }
    // A plot from an earlier report whose data is gone (e.g. no failures any
    // more after a results file was replaced) would otherwise linger.
    for file in PLOT_FILES {
        if !charts.iter().any(|(f, _)| *f == file) {
            let stale = plots_dir.join(file);
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(io_err(&stale))?;
            }
        }
    }
    let experiment = read_experiment(&run_dir.join(EXPERIMENT_FILE));
    let title = experiment
        .as_deref()
        .and_then(experiment_name)
        .or_else(|| {
            run_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "run".to_string());
    let md = markdown::render(&markdown::Input {
        title: &title,
        stats: &stats,
        plots: &links,
        plots_dir: PLOTS_DIR,
        experiment: experiment.as_deref(),
    });
    let path = run_dir.join(REPORT_FILE);
    plot::write_atomic(&path, md.as_bytes()).map_err(io_err(&path))?;
    tracing::info!(path = %path.display(), rollouts = stats.rollouts, "wrote run report");
    Ok(Report { path, stats, plots })
}

/// The experiment file's text, if present and of a sane size (the report
/// quotes it; a huge file is left out rather than flooding the report).
fn read_experiment(path: &Path) -> Option<String> {
    const MAX: u64 = 64 * 1024;
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The experiment's `name`, if the file has a top-level string `name`.
fn experiment_name(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table.get("name")?.as_str().map(str::to_string)
}

/// pass@1 of the rollouts matching `keep`, for the domain × scaffold plot.
fn pass_at_1_where(results: &[RolloutResult], keep: impl Fn(&RolloutResult) -> bool) -> f64 {
    let subset: Vec<RolloutResult> = results.iter().filter(|r| keep(r)).cloned().collect();
    compute(&subset).pass_at_1.unwrap_or(f64::NAN)
}

/// The report's charts; none for an empty run.
fn charts(results: &[RolloutResult], stats: &Stats) -> Vec<(&'static str, Box<dyn Chart>)> {
    let mut out: Vec<(&'static str, Box<dyn Chart>)> = Vec::new();
    if results.is_empty() {
        return out;
    }
    let domains: Vec<String> = stats.by_domain.iter().map(|g| g.name.clone()).collect();
    let groups: Vec<BarGroup> = stats
        .by_scaffold
        .iter()
        .map(|sc| BarGroup {
            name: sc.name.clone(),
            values: domains
                .iter()
                .map(|d| pass_at_1_where(results, |r| &r.domain == d && r.key.scaffold == sc.name))
                .collect(),
        })
        .collect();
    out.push((
        "pass_rate.svg",
        Box::new(BarChart {
            // One bar group has no legend, so name the scaffold in the title.
            title: match stats.by_scaffold.as_slice() {
                [only] => format!("pass@1 by domain (scaffold {})", only.name),
                _ => "pass@1 by domain and scaffold".into(),
            },
            x_label: "domain".into(),
            y_label: "pass@1".into(),
            categories: domains,
            groups,
            y_range: Some((0.0, 1.1)),
            value_labels: Some(2),
            size: None,
        }),
    ));

    let rewards: Vec<f64> = results
        .iter()
        .filter(|r| r.status.is_scored())
        .map(|r| r.reward)
        .collect();
    let in_unit = rewards.iter().all(|r| (0.0..=1.0).contains(r));
    out.push((
        "reward_hist.svg",
        Box::new(Histogram {
            title: "Reward (scored rollouts)".into(),
            x_label: "reward".into(),
            y_label: "rollouts".into(),
            values: rewards,
            bins: 10,
            range: in_unit.then_some((0.0, 1.0)),
            size: None,
        }),
    ));

    let col = |f: fn(&RolloutResult) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
    out.push((
        "duration_cdf.svg",
        Box::new(LineChart {
            title: "Rollout duration (CDF)".into(),
            x_label: "seconds".into(),
            y_label: "fraction of rollouts".into(),
            series: vec![
                Series::new("total", plot::cdf_points(&col(|r| r.total_s))),
                Series::new("agent", plot::cdf_points(&col(|r| r.agent_s))),
                Series::new("verify", plot::cdf_points(&col(|r| r.verify_s))),
            ],
            x_range: None,
            y_range: Some((0.0, 1.0)),
            step: true,
            size: None,
        }),
    ));

    if !stats.failures.is_empty() {
        out.push((
            "failures.svg",
            Box::new(BarChart {
                title: "Failures by class".into(),
                x_label: "class".into(),
                y_label: "rollouts".into(),
                categories: stats.failures.iter().map(|f| f.class.clone()).collect(),
                groups: vec![BarGroup {
                    name: "rollouts".into(),
                    values: stats.failures.iter().map(|f| f.count as f64).collect(),
                }],
                y_range: None,
                value_labels: Some(0),
                size: None,
            }),
        ));
    }
    out
}
