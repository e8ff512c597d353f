//! `arbor train rl-check`: the check that RL through arbor's loop learns (see
//! `arbor_recipe::rlcheck`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use arbor_recipe::rlcheck::{RlCheckConfig, RlCheckReport, run_rl_check};
use clap::Args;

#[derive(Args)]
pub struct RlCheckArgs {
    /// A TOML file with any settings of the check (seed, [model], [rollout], demonstrations,
    /// demo_error_rate, [sft], [rl], eval_tasks, eval_samples); the rest keep their defaults.
    config: Option<PathBuf>,
    /// Output directory (rerun the same command to continue an interrupted check).
    #[arg(long, default_value = "runs/rl-check")]
    out: PathBuf,
    /// The reduced check of the test suite (fewer demonstrations, iterations and held-out
    /// tasks) instead of the full defaults; a config file overrides it.
    #[arg(long)]
    reduced: bool,
    /// Print one JSON object (the report) instead of a summary (progress goes to stderr).
    #[arg(long)]
    json: bool,
}

pub async fn rl_check(a: RlCheckArgs) -> Result<i32> {
    let base = if a.reduced {
        RlCheckConfig::reduced()
    } else {
        RlCheckConfig::default()
    };
    let cfg = match &a.config {
        None => base,
        Some(p) => overlay(base, p)?,
    };
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("rl-check settings")?;
    let b = super::pipeline::bar();
    let report = run_rl_check(&cfg, &a.out, super::pipeline::progress_display(&b))
        .await
        .with_context(|| format!("rl-check in {}", a.out.display()))?;
    b.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(0)
}

/// The settings of `path` laid over `base` (tables merge field by field).
fn overlay(base: RlCheckConfig, path: &PathBuf) -> Result<RlCheckConfig> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let given: toml::Table = toml::from_str(&text).with_context(|| path.display().to_string())?;
    let mut v = serde_json::to_value(base)?;
    merge(&mut v, serde_json::to_value(given)?);
    serde_json::from_value(v).with_context(|| path.display().to_string())
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn print_summary(r: &RlCheckReport) {
    println!(
        "held-out pass rate at temperature {} ({} tasks x {} samples):",
        r.temperature, r.eval_tasks, r.eval_samples
    );
    println!("  sft {:.3} +- {:.3}", r.sft_pass, r.sft_pass_se);
    println!(
        "  rl  {:.3} +- {:.3}   (gain {:+.3}, z = {:.1}; {} iterations, {:.0} s)",
        r.rl_pass,
        r.rl_pass_se,
        r.rl_pass - r.sft_pass,
        r.gain_z,
        r.iterations,
        r.seconds
    );
}
