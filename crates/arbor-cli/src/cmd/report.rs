//! `arbor report DIR`: (re)write a run directory's Markdown report and plots.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct ReportArgs {
    /// Run directory (holds results.jsonl); works on finished, running and
    /// crashed runs alike.
    dir: PathBuf,
    /// Print the report's statistics as one JSON object on stdout (the
    /// report is still written; its path goes to stderr).
    #[arg(long)]
    json: bool,
}

pub fn run(a: ReportArgs) -> Result<i32> {
    let report = arbor_rollout::report::generate(&a.dir)
        .with_context(|| format!("reporting on {}", a.dir.display()))?;
    if a.json {
        eprintln!("report: {}", report.path.display());
        println!("{}", serde_json::to_string(&report.stats)?);
    } else {
        println!("{}", report.path.display());
    }
    Ok(0)
}
