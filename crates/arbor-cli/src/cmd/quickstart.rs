//! `arbor quickstart`: the main job on the embedded defaults. A reduced Specialize-then-Unify
//! pipeline (`examples/quickstart.toml`, compiled in) on the five built-in domains, with the
//! same code paths as a full run: scripted-oracle demonstrations, SFT per domain, RL per
//! domain in real sandboxes with the embedded policy, on-policy distillation into one student,
//! held-out evaluation. Ends with the report's path and the pass-rate table.

use std::path::PathBuf;

use anyhow::{Result, bail};
use arbor_recipe::PipelineConfig;

use super::pipeline::{QUICKSTART, print_results, run_with_progress};

#[derive(clap::Args)]
pub struct Args {
    /// Output directory. Rerun to continue an interrupted quickstart; delete it to start over.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Print one JSON object with the pass rates instead of the table.
    #[arg(long)]
    json: bool,
    /// Print the embedded pipeline configuration and exit.
    #[arg(long)]
    print_config: bool,
}

pub async fn run(a: Args) -> Result<i32> {
    if a.print_config {
        print!("{QUICKSTART}");
        return Ok(0);
    }
    ensure_python3()?;
    let cfg = PipelineConfig::parse(QUICKSTART)
        .map_err(|e| anyhow::anyhow!("built-in quickstart config: {e}"))?;
    eprintln!(
        "arbor quickstart: {} domains, output in {} (rerun to continue; `--print-config` shows the settings)",
        cfg.domains.len(),
        a.out.display()
    );
    let res = run_with_progress(&cfg, &a.out).await?;
    print_results(&res, a.json);
    Ok(0)
}

/// The built-in domains' verifiers run `python3` inside the sandboxes, which see the host's
/// `/usr`: install it when it is missing (Debian/Ubuntu, as root), so the README's one command
/// works on a fresh machine.
fn ensure_python3() -> Result<()> {
    let have = || {
        std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have() {
        return Ok(());
    }
    eprintln!("python3 is missing (the task verifiers need it): installing it with apt-get");
    let ok = std::process::Command::new("sh")
        .args(["-c", "apt-get update -qq && apt-get install -y -qq python3"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !have() {
        bail!(
            "python3 is not installed and `apt-get install python3` failed; install python3 and rerun"
        );
    }
    Ok(())
}
