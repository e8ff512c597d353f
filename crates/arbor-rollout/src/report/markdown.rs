//! The Markdown text of a run report.

use std::fmt::Write as _;

use super::stats::{GroupStats, MeanSe, ORACLE_POLICY, Spread, Stats};

/// What the report shows besides the numbers.
pub struct Input<'a> {
    /// Experiment name, or the run directory's name.
    pub title: &'a str,
    pub stats: &'a Stats,
    /// (file name inside `plots_dir`, title) of each plot drawn.
    pub plots: &'a [(&'a str, String)],
    /// Plots folder relative to the report (links must stay relative so the
    /// run directory can be moved or published as is).
    pub plots_dir: &'a str,
    /// The experiment file's text, quoted at the end.
    pub experiment: Option<&'a str>,
}

/// Escapes text for a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('\n', " ")
}

fn opt3(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.3}"))
}

fn mean_se(m: Option<MeanSe>) -> String {
    match m {
        None => "–".into(),
        Some(MeanSe {
            mean, se: Some(se), ..
        }) => format!("{mean:.3} ± {se:.3}"),
        Some(MeanSe { mean, se: None, .. }) => format!("{mean:.3}"),
    }
}

/// 1234567 → "1.23M": token counts are read for magnitude.
fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}

fn seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.2} h", s / 3600.0)
    } else if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.2} s")
    }
}

fn plot_link(out: &mut String, input: &Input<'_>, file: &str) {
    if let Some((f, title)) = input.plots.iter().find(|(f, _)| *f == file) {
        let _ = writeln!(out, "\n![{}]({}/{})", cell(title), input.plots_dir, f);
    }
}

fn group_table(out: &mut String, what: &str, rows: &[GroupStats]) {
    let _ = writeln!(
        out,
        "| {what} | rollouts | scored | passed | tasks | pass@1 | mean reward ± se | infra errors | agent failures | mean turns | prompt tokens | completion tokens |"
    );
    out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for g in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&g.name),
            g.rollouts,
            g.scored,
            g.passed,
            g.tasks,
            opt3(g.pass_at_1),
            mean_se(g.mean_reward),
            g.infra_errors,
            g.agent_failures,
            g.mean_turns
                .map_or_else(|| "–".to_string(), |t| format!("{t:.1}")),
            count(g.prompt_tokens),
            count(g.completion_tokens),
        );
    }
}

fn spread_row(out: &mut String, name: &str, s: &Spread) {
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} | {} |",
        seconds(s.total),
        seconds(s.p50),
        seconds(s.p90),
        seconds(s.max)
    );
}

/// Renders the report.
pub fn render(input: &Input<'_>) -> String {
    let s = input.stats;
    let mut out = String::new();
    let _ = writeln!(out, "# Run report: {}\n", input.title);
    oracle_banner(&mut out, s);
    if s.rollouts == 0 {
        out.push_str("No results yet: `results.jsonl` is empty.\n");
        return out;
    }
    overview(&mut out, s);
    summary(&mut out, s);
    out.push_str("\n## By domain\n\n");
    group_table(&mut out, "domain", &s.by_domain);
    out.push_str("\n## By scaffold\n\n");
    group_table(&mut out, "scaffold", &s.by_scaffold);
    plot_link(&mut out, input, "pass_rate.svg");
    out.push_str("\n## Rewards\n");
    plot_link(&mut out, input, "reward_hist.svg");
    failures(&mut out, input);
    tokens_and_time(&mut out, input);
    if let Some(exp) = input.experiment {
        let fence = if exp.contains("```") { "~~~~" } else { "```" };
        let _ = writeln!(
            out,
            "\n## Experiment\n\n{fence}toml\n{}\n{fence}",
            exp.trim_end()
        );
    }
    out
}

/// The warning that some or all rollouts replayed reference solutions.
fn oracle_banner(out: &mut String, s: &Stats) {
    if s.infrastructure_test {
        let _ = writeln!(
            out,
            "> **Infrastructure test.** Every rollout used the `{ORACLE_POLICY}` policy, which \
             replays each task's reference solution. These numbers check the sandboxes, gateway, \
             scaffolds and verifiers; they say nothing about a model.\n"
        );
    } else if s.oracle_rollouts > 0 {
        let _ = writeln!(
            out,
            "> **Partly an infrastructure test.** {} of {} rollouts used the `{ORACLE_POLICY}` \
             policy (replayed reference solutions); the numbers below mix them with model \
             rollouts, and those rollouts say nothing about a model.\n",
            s.oracle_rollouts, s.rollouts
        );
    }
}

/// The opening paragraph: policies and rollouts by status.
fn overview(out: &mut String, s: &Stats) {
    let policies: Vec<String> = s.policies.iter().map(|p| format!("`{p}`")).collect();
    let _ = writeln!(
        out,
        "Policy {}. {} rollouts: {} passed, {} failed, {} agent failures, {} infrastructure \
         errors. {} scored rollouts over {} tasks (a task is a task id under one scaffold); \
         infrastructure errors are left out of every rate and reward.\n",
        policies.join(", "),
        s.rollouts,
        s.status.passed,
        s.status.failed,
        s.status.agent_failure,
        s.status.infra_error,
        s.scored,
        s.scored_tasks,
    );
}

/// The summary table and, when there are enough samples, pass@k.
fn summary(out: &mut String, s: &Stats) {
    out.push_str("## Summary\n\n| metric | value |\n|---|--:|\n");
    let _ = writeln!(out, "| pass@1 | {} |", opt3(s.pass_at_1));
    let _ = writeln!(out, "| mean reward ± se | {} |", mean_se(s.mean_reward));
    let _ = writeln!(out, "| rollouts | {} |", s.rollouts);
    let _ = writeln!(out, "| scored | {} |", s.scored);
    let _ = writeln!(out, "| tasks | {} |", s.scored_tasks);
    let _ = writeln!(out, "| max samples per task | {} |", s.max_samples);
    let _ = writeln!(out, "| infrastructure errors | {} |", s.status.infra_error);
    let _ = writeln!(out, "| agent failures | {} |", s.status.agent_failure);
    let _ = writeln!(
        out,
        "| retried rollouts (extra attempts) | {} ({}) |",
        s.retried_rollouts, s.extra_attempts
    );
    let _ = writeln!(out, "| tokens | {} |", count(s.tokens.total));
    let _ = writeln!(out, "| wall time | {} |", seconds(s.time.wall_s));

    if !s.pass_at_k.is_empty() {
        out.push_str(
            "\n### pass@k\n\nUnbiased estimator 1 − C(n−c, k) / C(n, k) per task (n scored \
             samples, c passed), averaged over the tasks with at least k scored samples.\n\n\
             | k | pass@k | tasks |\n|--:|--:|--:|\n",
        );
        for p in &s.pass_at_k {
            let _ = writeln!(out, "| {} | {:.3} | {} |", p.k, p.value, p.tasks);
        }
    }
}

/// Failures by class, with an example message each.
fn failures(out: &mut String, input: &Input<'_>) {
    let s = input.stats;
    out.push_str("\n## Failures by class\n\n");
    if s.failures.is_empty() {
        out.push_str("No failures recorded.\n");
        return;
    }
    out.push_str(
        "| class | rollouts | infra errors | agent failures | example |\n|---|--:|--:|--:|---|\n",
    );
    for f in &s.failures {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(&f.class),
            f.count,
            f.infra_errors,
            f.agent_failures,
            cell(&f.example)
        );
    }
    plot_link(out, input, "failures.svg");
}

/// Token totals, time per rollout and per-step overhead.
fn tokens_and_time(out: &mut String, input: &Input<'_>) {
    let s = input.stats;
    out.push_str("\n## Tokens and time\n\n");
    let t = &s.tokens;
    let _ = writeln!(
        out,
        "Tokens: {} prompt + {} completion = {} ({} per rollout); {} format errors.\n",
        count(t.prompt),
        count(t.completion),
        count(t.total),
        t.mean_per_rollout
            .map_or_else(|| "–".to_string(), |m| count(m.round() as u64)),
        t.format_errors,
    );
    out.push_str("| time per rollout | total | p50 | p90 | max |\n|---|--:|--:|--:|--:|\n");
    spread_row(out, "whole rollout", &s.time.total_s);
    spread_row(out, "agent", &s.time.agent_s);
    spread_row(out, "verify", &s.time.verify_s);
    let _ = writeln!(
        out,
        "\nModel calls {} and commands {} in total. Per-step overhead (time in a step that is \
         neither the model call nor the command): p50 {:.3} ms, p99 {:.3} ms over {} steps.",
        seconds(s.time.model_s),
        seconds(s.time.action_s),
        s.time.overhead_p50_ms,
        s.time.overhead_p99_ms,
        s.time.overhead_steps,
    );
    plot_link(out, input, "duration_cdf.svg");
}
