//! The pipeline's Markdown report (`report.md`) with SVG learning curves in `plots/`:
//! held-out pass rates of every row, the acceptance comparisons (RL vs SFT, unified vs
//! expert), SFT loss, and per RL iteration the training pass rate, reward, KL to the start
//! checkpoint, importance-weight variance with and without MCLA, and throughput.

use std::fmt::Write as _;
use std::path::Path;

use arbor_rollout::plot::{BarChart, BarGroup, Chart, LineChart, Series};

use crate::config::{DistillEstimator, PipelineConfig};
use crate::results::{Cell, PipelineResults, ROWS};
use crate::rl::{IterationLog, read_log};
use crate::{RecipeError, Result};

/// A value read from one iteration's log line.
type Metric = Box<dyn Fn(&IterationLog) -> Option<f64>>;

fn plot_err(e: impl std::fmt::Display) -> RecipeError {
    RecipeError::Io(format!("plot: {e}"))
}

/// A line chart of `f` over the iterations of each series.
fn curves(
    title: &str,
    y: &str,
    logs: &[(String, Vec<IterationLog>)],
    f: impl Fn(&IterationLog) -> Option<f64>,
) -> LineChart {
    LineChart {
        title: title.into(),
        x_label: "iteration".into(),
        y_label: y.into(),
        series: logs
            .iter()
            .map(|(name, log)| {
                Series::new(
                    name.clone(),
                    log.iter()
                        .filter_map(|l| f(l).map(|v| (l.iteration as f64, v)))
                        .filter(|(_, v)| v.is_finite())
                        .collect(),
                )
            })
            .collect(),
        ..LineChart::default()
    }
}

/// `(rl - sft) / sqrt(se_rl^2 + se_sft^2)`: how many standard errors RL is above SFT.
pub fn z_score(rl: &Cell, sft: &Cell) -> f64 {
    z_of(rl.pass_rate, rl.std_err, sft.pass_rate, sft.std_err)
}

/// [`z_score`] of the sampled pass rates (`None` without a sampled evaluation).
pub fn sampled_z_score(rl: &Cell, sft: &Cell) -> Option<f64> {
    let (r, s) = (rl.sampled?, sft.sampled?);
    Some(z_of(r.pass_rate, r.std_err, s.pass_rate, s.std_err))
}

fn z_of(a: f64, se_a: f64, b: f64, se_b: f64) -> f64 {
    let se = (se_a.powi(2) + se_b.powi(2)).sqrt();
    let diff = a - b;
    if se == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            diff.signum() * f64::INFINITY
        }
    } else {
        diff / se
    }
}

/// Writes `out/report.md` and `out/plots/*.svg`.
pub fn write(cfg: &PipelineConfig, out: &Path, res: &PipelineResults) -> Result<()> {
    let plots = out.join("plots");
    let mut md = String::new();
    intro(&mut md, cfg, res);
    heldout(&mut md, out, res, &plots)?;
    pretraining(&mut md, out, &plots)?;
    sft(&mut md, cfg, out, &plots)?;
    let mut logs: Vec<(String, Vec<IterationLog>)> = cfg
        .domains
        .iter()
        .map(|d| {
            (
                d.clone(),
                read_log(&out.join("rl").join(d).join(crate::rl::LOG_FILE)),
            )
        })
        .collect();
    let distill_log = read_log(&out.join("distill").join(crate::rl::LOG_FILE));
    rl_curves(&mut md, &logs, &plots)?;
    // Every stage on one chart and in one table.
    logs.push(("distill".into(), distill_log.clone()));
    iw_variance(&mut md, &logs, &plots)?;
    iteration_table(&mut md, &logs);
    distillation(&mut md, distill_log, &plots)?;
    arbor_train::checkpoint::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(())
}

/// The title and the paragraph of settings: model, task counts, temperatures, wall time.
fn intro(md: &mut String, cfg: &PipelineConfig, res: &PipelineResults) {
    let _ = writeln!(md, "# Pipeline `{}`\n", cfg.name);
    let _ = writeln!(
        md,
        "Model: byte-level Qwen3-style decoder, {} parameters (hidden {}, {} layers{}). \
         Difficulty {}; {} oracle tasks per domain; RL {} iterations x {} tasks x {} samples \
         at temperature {}; distillation {} iterations at temperature {} ({} reverse KL); {} \
         held-out tasks per domain, sampled at temperature {}. \
         Wall time of the last invocation: {:.0} s.\n",
        res.params,
        cfg.model.hidden,
        cfg.model.layers,
        if cfg.model.experts > 0 {
            format!(", {} experts top-{}", cfg.model.experts, cfg.model.top_k)
        } else {
            String::new()
        },
        cfg.difficulty,
        {
            let o = &cfg.oracle;
            let overrides: Vec<String> = o
                .per_domain
                .iter()
                .map(|(d, n)| format!("{d} {n}"))
                .collect();
            match overrides.is_empty() {
                true => o.tasks_per_domain.to_string(),
                false => format!("{} ({})", o.tasks_per_domain, overrides.join(", ")),
            }
        },
        cfg.rl.iterations,
        cfg.rl.tasks_per_iteration,
        cfg.rl.group_size,
        cfg.rl.temperature,
        cfg.distill.iterations,
        cfg.distill.temperature,
        match cfg.distill.distill_estimator {
            DistillEstimator::Sampled => "sampled-token",
            DistillEstimator::Full => "exact",
        },
        cfg.eval.heldout_tasks,
        match cfg.eval.temperature {
            Some(0.0) => "0 (greedy)".to_string(),
            Some(t) => t.to_string(),
            None => "1".to_string(),
        },
        res.seconds
    );
}

/// The sampled pass@1 table (when the evaluation sampled).
fn sampled_table(md: &mut String, res: &PipelineResults) {
    let first = res
        .domains
        .values()
        .flat_map(|c| c.values())
        .find_map(|c| c.sampled);
    let Some(first) = first else {
        return;
    };
    let k = first.samples / first.tasks.max(1);
    let _ = writeln!(
        md,
        "\nThe same tasks sampled {k} times each at temperature {} (the RL temperature): \
         pass@1 as the mean over tasks of each task's passing share, ± its standard error \
         across tasks.\n",
        first.temperature
    );
    rows_table(md, res, |c| {
        c.sampled
            .map(|s| format!("{:.3} ± {:.3} (n={})", s.pass_rate, s.std_err, s.tasks))
    });
}

/// A domain x row table of `cell`'s text (`-` where a cell or its value is missing).
fn rows_table(md: &mut String, res: &PipelineResults, cell: impl Fn(&Cell) -> Option<String>) {
    let _ = writeln!(md, "| domain | {} |", ROWS.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(ROWS.len()));
    for (d, cells) in &res.domains {
        let row: Vec<String> = ROWS
            .iter()
            .map(|r| cells.get(*r).and_then(&cell).unwrap_or_else(|| "-".into()))
            .collect();
        let _ = writeln!(md, "| {d} | {} |", row.join(" | "));
    }
}

/// The held-out table, the acceptance comparisons per domain, and the bar chart.
fn heldout(md: &mut String, out: &Path, res: &PipelineResults, plots: &Path) -> Result<()> {
    let _ = writeln!(md, "## Held-out pass rates\n");
    rows_table(md, res, |c| {
        Some(format!("{:.3} ± {:.3} (n={})", c.pass_rate, c.std_err, c.n))
    });
    sampled_table(md, res);
    let _ = writeln!(
        md,
        "\n`rl` is the last RL checkpoint, `expert` the RL checkpoint whose samples had the \
         best training pass rate (the teacher of distillation), `unified` the distilled \
         student. ± is the binomial standard error. A group (one task's samples) with equal \
         rewards gives GSPO no gradient: a domain whose SFT model never passes a training task \
         gets no RL signal at all.\n"
    );
    let _ = writeln!(
        md,
        "| domain | RL - SFT in standard errors | sampled: RL - SFT in standard errors | unified / expert | RL groups with reward variance |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for (d, cells) in &res.domains {
        let log = read_log(&out.join("rl").join(d).join(crate::rl::LOG_FILE));
        let signal = format!(
            "{} of {}",
            log.iter().map(|l| l.groups_with_signal).sum::<usize>(),
            log.iter().map(|l| l.groups).sum::<usize>()
        );
        let z = match (cells.get("rl"), cells.get("sft")) {
            (Some(r), Some(s)) => format!("{:.2}", z_score(r, s)),
            _ => "-".into(),
        };
        let zs = match (cells.get("rl"), cells.get("sft")) {
            (Some(r), Some(s)) => sampled_z_score(r, s).map_or("-".into(), |z| format!("{z:.2}")),
            _ => "-".into(),
        };
        let u = match (cells.get("unified"), cells.get("expert")) {
            (Some(u), Some(e)) if e.pass_rate > 0.0 => format!("{:.2}", u.pass_rate / e.pass_rate),
            _ => "- (expert at 0)".into(),
        };
        let _ = writeln!(md, "| {d} | {z} | {zs} | {u} | {signal} |");
    }
    let bars = BarChart {
        title: "Held-out pass rate".into(),
        x_label: "domain".into(),
        y_label: "pass rate".into(),
        categories: res.domains.keys().cloned().collect(),
        groups: ROWS
            .iter()
            .map(|r| BarGroup {
                name: r.to_string(),
                values: res
                    .domains
                    .values()
                    .map(|c| c.get(*r).map_or(f64::NAN, |c| c.pass_rate))
                    .collect(),
            })
            .collect(),
        value_labels: Some(2),
        ..BarChart::default()
    };
    bars.save(&plots.join("heldout.svg")).map_err(plot_err)?;
    let _ = writeln!(md, "\n![held-out pass rates](plots/heldout.svg)\n");
    Ok(())
}

/// Pretraining (when configured): both phases' corpus loss and the held-out copy loss.
fn pretraining(md: &mut String, out: &Path, plots: &Path) -> Result<()> {
    let pre = out.join("base");
    let induction = arbor_train::sft::read_log(&pre.join("induction").join("sft_log.jsonl"));
    let mixed = arbor_train::sft::read_log(&pre.join("sft_log.jsonl"));
    if !induction.is_empty() || !mixed.is_empty() {
        let offset = induction.len() as f64;
        LineChart {
            title: "Pretraining loss (every byte)".into(),
            x_label: "step".into(),
            y_label: "mean NLL".into(),
            series: vec![
                Series::new(
                    "induction (letters)",
                    induction.iter().map(|l| (l.step as f64, l.loss)).collect(),
                ),
                Series::new(
                    "mixed corpus",
                    mixed
                        .iter()
                        .map(|l| (offset + l.step as f64, l.loss))
                        .collect(),
                ),
            ],
            ..LineChart::default()
        }
        .save(&plots.join("pretrain_loss.svg"))
        .map_err(plot_err)?;
        let _ = writeln!(
            md,
            "## Pretraining\n\n![pretraining loss](plots/pretrain_loss.svg)\n"
        );
        let copy = std::fs::read(pre.join(arbor_train::pretrain::COPY_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<arbor_train::pretrain::CopyLoss>(&b).ok());
        if let Some(c) = copy {
            let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
            let _ = writeln!(
                md,
                "Held-out copy loss (bytes of the mixed corpus predictable only by copying from \
                 the context; {} bytes in {} documents): {:.3} fresh -> {} after the induction \
                 phase -> {} after pretraining, nats/byte.\n",
                c.copy_bytes,
                c.documents,
                c.before,
                f(c.after_induction),
                f(c.after)
            );
        }
    }
    Ok(())
}

/// The SFT loss curves of every domain and of `all`.
fn sft(md: &mut String, cfg: &PipelineConfig, out: &Path, plots: &Path) -> Result<()> {
    let mut sft_series = Vec::new();
    let mut names: Vec<String> = cfg.domains.clone();
    names.push("all".into());
    for n in &names {
        let log = arbor_train::sft::read_log(&out.join("sft").join(n).join("sft_log.jsonl"));
        sft_series.push(Series::new(
            n.clone(),
            log.iter().map(|l| (l.step as f64, l.loss)).collect(),
        ));
    }
    LineChart {
        title: "SFT loss (generated tokens)".into(),
        x_label: "step".into(),
        y_label: "mean NLL".into(),
        series: sft_series,
        ..LineChart::default()
    }
    .save(&plots.join("sft_loss.svg"))
    .map_err(plot_err)?;
    let _ = writeln!(md, "## SFT\n\n![SFT loss](plots/sft_loss.svg)\n");
    Ok(())
}

/// The RL curves of every domain: pass rate, reward, KL to the start, throughput.
fn rl_curves(md: &mut String, logs: &[(String, Vec<IterationLog>)], plots: &Path) -> Result<()> {
    let charts: [(&str, &str, &str, Metric); 5] = [
        (
            "rl_pass_rate",
            "RL: training pass rate (on-policy samples)",
            "pass rate",
            Box::new(|l| Some(l.pass_rate)),
        ),
        (
            "rl_reward",
            "RL: mean reward",
            "reward",
            Box::new(|l| Some(l.mean_reward)),
        ),
        (
            "rl_kl",
            "RL: KL(policy || SFT start) on sampled tokens",
            "KL (nats/token)",
            Box::new(|l| l.kl_to_init),
        ),
        (
            "rl_tokens_per_s",
            "RL: training throughput (unique tree tokens/s)",
            "tokens/s",
            Box::new(|l| Some(l.train_tokens_per_s)),
        ),
        (
            "rl_sample_tokens_per_s",
            "RL: sampling throughput (generated tokens/s)",
            "tokens/s",
            Box::new(|l| Some(l.sample_tokens_per_s)),
        ),
    ];
    let _ = writeln!(md, "## RL (one expert per domain)\n");
    for (file, title, y, f) in &charts {
        curves(title, y, logs, f)
            .save(&plots.join(format!("{file}.svg")))
            .map_err(plot_err)?;
        let _ = writeln!(md, "![{title}](plots/{file}.svg)\n");
    }
    Ok(())
}

/// Importance-weight variance, one pass vs the MCLA mean, of every stage in `logs`.
fn iw_variance(md: &mut String, logs: &[(String, Vec<IterationLog>)], plots: &Path) -> Result<()> {
    let mut iw = Vec::new();
    for (name, log) in logs {
        iw.push(Series::new(
            format!("{name} K=1"),
            log.iter()
                .map(|l| (l.iteration as f64, l.iw_var_single))
                .collect(),
        ));
        iw.push(Series::new(
            format!("{name} MCLA K={}", log.first().map_or(1, |l| l.mcla_passes)),
            log.iter()
                .map(|l| (l.iteration as f64, l.iw_var_mcla))
                .collect(),
        ));
    }
    LineChart {
        title: "Importance-weight variance, one pass vs MCLA".into(),
        x_label: "iteration".into(),
        y_label: "var exp(logp_rollout - logp_train)".into(),
        series: iw,
        ..LineChart::default()
    }
    .save(&plots.join("iw_variance.svg"))
    .map_err(plot_err)?;
    let _ = writeln!(md, "![importance-weight variance](plots/iw_variance.svg)\n");
    Ok(())
}

/// One table row per iteration of every stage in `logs`.
fn iteration_table(md: &mut String, logs: &[(String, Vec<IterationLog>)]) {
    let _ = writeln!(
        md,
        "| stage | iter | pass rate | reward | groups with signal | IcePop masked | IW var K=1 | IW var MCLA | KL to start | reverse KL to teacher |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for (name, log) in logs {
        for l in log {
            let _ = writeln!(
                md,
                "| {name} | {} | {:.3} | {:.3} | {}/{} | {:.3} | {:.3e} | {:.3e} | {} | {} |",
                l.iteration,
                l.pass_rate,
                l.mean_reward,
                l.groups_with_signal,
                l.groups,
                l.masked_fraction,
                l.iw_var_single,
                l.iw_var_mcla,
                l.kl_to_init.map_or("-".into(), |k| format!("{k:.4}")),
                l.reverse_kl_to_teacher
                    .map_or("-".into(), |k| format!("{k:.4}"))
            );
        }
    }
}

/// The distillation curves: reverse KL to the expert and training pass rate.
fn distillation(md: &mut String, distill_log: Vec<IterationLog>, plots: &Path) -> Result<()> {
    let dl = vec![("distill".to_string(), distill_log)];
    curves(
        "Distillation: reverse KL(student || expert) per token",
        "nats/token",
        &dl,
        |l| l.reverse_kl_to_teacher,
    )
    .save(&plots.join("distill_kl.svg"))
    .map_err(plot_err)?;
    curves("Distillation: training pass rate", "pass rate", &dl, |l| {
        Some(l.pass_rate)
    })
    .save(&plots.join("distill_pass_rate.svg"))
    .map_err(plot_err)?;
    let _ = writeln!(
        md,
        "## On-policy distillation\n\n![reverse KL](plots/distill_kl.svg)\n\n![pass rate](plots/distill_pass_rate.svg)\n"
    );
    Ok(())
}
