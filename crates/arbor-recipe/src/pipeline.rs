//! The Specialize-then-Unify pipeline (docs/recipe.md §5), every stage checkpointed and resumable.
//!
//! ```text
//! base/                fresh byte-level model (the `base` row); with `[pretrain]`, the fresh
//!                      model init/ after pretraining on the copy corpus (copy_loss.json)
//! oracle-tasks/        the demonstration tasks (training split; repeated instructions left out)
//! oracle/              scripted-oracle rollouts on them
//! sft/<domain>/        SFT on that domain's oracle sessions (the `sft` row), from base/ or,
//!                      with `[sft_expert]`, continuing from sft/all/
//! sft/all/             SFT on every domain: the unified student's starting point
//! rl/<domain>/         RL from sft/<domain>: final/ (the `rl` row), best/ (the `expert` row:
//!                      the weights that sampled the best training pass rate)
//! distill/             on-policy distillation of sft/all toward each domain's expert
//!                      (final/ is the `unified` row)
//! eval/<row>/<domain>/ held-out rollouts of each row's checkpoint
//! results.json         {"domains": {D: {row: {"pass_rate", "n", ...}}}}
//! report.md, plots/    the report with learning curves
//! ```
//!
//! Rerunning the same command continues after the last finished piece: a finished stage is
//! recognized by its marker file (`sft_report.json`, `rl_report.json`, an evaluation's
//! complete `results.jsonl`), an unfinished RL stage continues from its last iteration's
//! checkpoint, an unfinished SFT stage from its periodic checkpoint, and unfinished rollouts
//! from their run directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arbor_rollout::Progress;
use arbor_rollout::experiment::PolicySpec;
use arbor_rollout::runner::ProgressFn;
use arbor_train::sft::{SftConfig, SftEvent, SftInit, train_sft};
use serde::Serialize;

use crate::config::PipelineConfig;
use crate::rl::{IterationLog, RlEvent, RlReport, RlStage};
use crate::rollouts::{self, PassRate, SampledRate, TaskSet};
use crate::{RecipeError, Result};

pub use crate::results::{Cell, PipelineResults, ROWS, SampledCell};

/// Progress of a pipeline, for a display.
#[derive(Debug, Clone)]
pub enum PipelineEvent {
    /// A stage starts (or is found finished: `skipped`).
    Stage { stage: String, skipped: bool },
    /// Rollouts of a stage.
    Rollouts {
        stage: String,
        done: usize,
        total: usize,
        passed: usize,
    },
    /// An SFT step.
    SftStep {
        stage: String,
        step: usize,
        total: usize,
        loss: f64,
    },
    /// An RL / distillation iteration finished.
    Iteration {
        stage: String,
        total: usize,
        log: Box<IterationLog>,
    },
    /// An RL stage stopped early: `patience` iterations in a row without reward variance.
    StoppedWithoutSignal { stage: String, iteration: usize },
    /// A held-out evaluation finished.
    Evaluated {
        row: String,
        domain: String,
        rate: PassRate,
    },
    /// A held-out evaluation with several samples per task finished.
    EvaluatedSampled {
        row: String,
        domain: String,
        rate: SampledRate,
    },
}

/// A progress callback.
pub type PipelineProgress = Arc<dyn Fn(PipelineEvent) + Send + Sync>;

fn io(path: &Path, e: std::io::Error) -> RecipeError {
    RecipeError::Io(format!("{}: {e}", path.display()))
}

/// Rollout progress of `stage` as pipeline events.
pub(crate) fn rollout_progress(stage: String, p: PipelineProgress) -> ProgressFn {
    Arc::new(move |pr: &Progress| {
        p(PipelineEvent::Rollouts {
            stage: stage.clone(),
            done: pr.done,
            total: pr.total,
            passed: pr.passed,
        })
    })
}

/// Runs (or continues) the pipeline into `out`.
pub async fn run_pipeline(
    cfg: &PipelineConfig,
    out: &Path,
    progress: PipelineProgress,
) -> Result<PipelineResults> {
    let wall = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    bind_config(cfg, out)?;
    let run = Run { cfg, out, progress };
    let base = run.base_model().await?;
    let params = arbor_model::Qwen3Model::load(&base)?.num_params();
    let oracle = run.demonstrations().await?;
    let sft_dirs = run.sft_stages(&base, &oracle).await?;
    let rl_reports = run.rl_experts(&sft_dirs).await?;
    let unified = run.distill(&sft_dirs, &rl_reports).await?;
    let mut domains: BTreeMap<String, BTreeMap<String, Cell>> = BTreeMap::new();
    for d in &cfg.domains {
        let rl = &rl_reports[d];
        let rows: [(&str, PathBuf); 5] = [
            ("base", base.clone()),
            ("sft", sft_dirs[d].clone()),
            ("rl", rl.final_checkpoint.clone()),
            ("expert", rl.best_checkpoint.clone()),
            ("unified", unified.final_checkpoint.clone()),
        ];
        domains.insert(d.clone(), run.evaluate(d, rows).await?);
    }
    let results = PipelineResults {
        name: cfg.name.clone(),
        domains,
        params,
        output: out.to_path_buf(),
        report: out.join("report.md"),
        seconds: wall.elapsed().as_secs_f64(),
    };
    arbor_train::checkpoint::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&results)
            .map_err(|e| RecipeError::Io(e.to_string()))?
            .as_bytes(),
    )?;
    crate::report::write(cfg, out, &results)?;
    Ok(results)
}

/// Binds `out` to `cfg`: the configuration a directory was started with is kept in
/// `pipeline.json`. Settings of stages that have not started yet may change (tune RL after
/// looking at the SFT models); a change to a stage that has started, or to one before it, is
/// refused (stages would silently mix).
fn bind_config(cfg: &PipelineConfig, out: &Path) -> Result<()> {
    let cfg_path = out.join("pipeline.json");
    let cfg_json =
        serde_json::to_string_pretty(cfg).map_err(|e| RecipeError::Config(e.to_string()))?;
    match std::fs::read_to_string(&cfg_path) {
        Ok(old) if old != cfg_json => {
            let old: PipelineConfig = serde_json::from_str(&old)
                .map_err(|e| RecipeError::Config(format!("{}: {e}", cfg_path.display())))?;
            if let Some((stage, dir)) = changed_started_stage(&old, cfg, out) {
                return Err(RecipeError::Config(format!(
                    "{} was started with another configuration of the {stage} stage, which has \
                     already run ({}; the configuration it started with is in {}); use \
                     another output directory",
                    out.display(),
                    dir.display(),
                    cfg_path.display()
                )));
            }
            arbor_train::checkpoint::write_atomic(&cfg_path, cfg_json.as_bytes())?;
        }
        Ok(_) => {}
        Err(_) => arbor_train::checkpoint::write_atomic(&cfg_path, cfg_json.as_bytes())?,
    }
    Ok(())
}

/// One invocation of the pipeline: what every stage reads.
struct Run<'a> {
    cfg: &'a PipelineConfig,
    out: &'a Path,
    progress: PipelineProgress,
}

impl Run<'_> {
    /// Reports that stage `name` starts (or is found finished: `skipped`).
    fn stage(&self, name: &str, skipped: bool) {
        (self.progress)(PipelineEvent::Stage {
            stage: name.to_string(),
            skipped,
        })
    }

    /// The base model `base/`: a fresh model, or with `[pretrain]` the fresh model `init/`
    /// after pretraining on the copy corpus.
    async fn base_model(&self) -> Result<PathBuf> {
        let (cfg, base) = (self.cfg, self.out.join("base"));
        let Some(pcfg) = &cfg.pretrain else {
            let base_done = base.join("model.safetensors").is_file();
            self.stage("base", base_done);
            if !base_done {
                arbor_policy::init_checkpoint(&base, cfg.model.config(), cfg.seed)
                    .map_err(|e| RecipeError::Train(format!("initializing the base model: {e}")))?;
            }
            return Ok(base);
        };
        let init = self.out.join("init");
        self.stage("init", init.join("model.safetensors").is_file());
        if !init.join("model.safetensors").is_file() {
            arbor_policy::init_checkpoint(&init, cfg.model.config(), cfg.seed)
                .map_err(|e| RecipeError::Train(format!("initializing the fresh model: {e}")))?;
        }
        self.stage(
            "pretrain",
            base.join(arbor_train::sft::REPORT_FILE).is_file(),
        );
        let (pcfg, base2, p) = (pcfg.clone(), base.clone(), self.progress.clone());
        tokio::task::spawn_blocking(move || {
            let mut total = 0;
            let mut on = |phase, ev: SftEvent<'_>| match ev {
                SftEvent::Start { total_steps, .. } => total = total_steps,
                SftEvent::Step(l) => p(PipelineEvent::SftStep {
                    stage: match phase {
                        arbor_train::pretrain::Phase::Induction => "pretrain/induction",
                        arbor_train::pretrain::Phase::Mixed => "pretrain",
                    }
                    .into(),
                    step: l.step,
                    total,
                    loss: l.loss,
                }),
                _ => {}
            };
            arbor_train::pretrain::train_pretrain(&SftInit::Dir(init), &base2, &pcfg, &mut on)
                .map_err(RecipeError::from)
        })
        .await
        .map_err(|e| RecipeError::Train(format!("pretraining task: {e}")))??;
        Ok(base)
    }

    /// The demonstrations: scripted-oracle rollouts on the training tasks in `oracle/`
    /// (refused when none passed: nothing to learn from).
    async fn demonstrations(&self) -> Result<PathBuf> {
        let cfg = self.cfg;
        let oracle = self.out.join("oracle");
        let oracle_tasks: Vec<TaskSet> = cfg
            .domains
            .iter()
            .map(|d| TaskSet {
                domain: d.clone(),
                n: cfg.oracle.tasks(d),
                seed: cfg.seed,
                split: "train",
                difficulty: cfg.difficulty,
            })
            .collect();
        let (dataset, dropped) =
            rollouts::write_demonstration_tasks(&oracle_tasks, &self.out.join("oracle-tasks"))?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                "demonstration tasks with a repeated instruction left out"
            );
        }
        let exp = rollouts::experiment(
            "oracle",
            &oracle,
            vec![dataset],
            1,
            PolicySpec::ScriptedOracle,
            &cfg.rollout,
        );
        self.stage("oracle", false);
        let s = rollouts::run(
            &exp,
            &oracle,
            Some(rollout_progress("oracle".into(), self.progress.clone())),
        )
        .await?;
        if s.passed == 0 {
            return Err(RecipeError::Rollout(format!(
                "no oracle rollout passed ({} infrastructure errors): nothing to learn from; see {}",
                s.infra_errors,
                oracle.display()
            )));
        }
        Ok(oracle)
    }

    /// SFT on all domains (the student's start) and per domain (the experts'), each in
    /// `sft/<name>`: from the base model, or with `[sft_expert]` each domain's continuing from
    /// the all-domain SFT (which then runs first). Returns the directory by name.
    async fn sft_stages(&self, base: &Path, oracle: &Path) -> Result<BTreeMap<String, PathBuf>> {
        let cfg = self.cfg;
        let all_dir = self.out.join("sft").join("all");
        let mut sft_targets: Vec<(String, Option<Vec<String>>, SftConfig, PathBuf)> = cfg
            .domains
            .iter()
            .map(|d| {
                let (c, init) = match &cfg.sft_expert {
                    Some(c) => (c.clone(), all_dir.clone()),
                    None => (cfg.sft.clone(), base.to_path_buf()),
                };
                (d.clone(), Some(vec![d.clone()]), c, init)
            })
            .collect();
        let all = ("all".to_string(), None, cfg.sft.clone(), base.to_path_buf());
        if cfg.sft_expert.is_some() {
            sft_targets.insert(0, all);
        } else {
            sft_targets.push(all);
        }
        let mut sft_dirs = BTreeMap::new();
        for (name, domains, mut scfg, init) in sft_targets {
            let dir = self.out.join("sft").join(&name);
            let label = format!("sft/{name}");
            self.stage(&label, dir.join(arbor_train::sft::REPORT_FILE).is_file());
            scfg.domains = domains;
            self.sft(label, init, oracle.to_path_buf(), dir.clone(), scfg)
                .await?;
            sft_dirs.insert(name, dir);
        }
        Ok(sft_dirs)
    }

    /// One SFT stage into `dir` from `init` on the `oracle` sessions, on a blocking thread.
    async fn sft(
        &self,
        label: String,
        init: PathBuf,
        oracle: PathBuf,
        dir: PathBuf,
        scfg: SftConfig,
    ) -> Result<()> {
        let p = self.progress.clone();
        tokio::task::spawn_blocking(move || {
            let mut total = 0;
            let mut on = |ev: SftEvent<'_>| match ev {
                SftEvent::Start { total_steps, .. } => total = total_steps,
                SftEvent::Step(l) => p(PipelineEvent::SftStep {
                    stage: label.clone(),
                    step: l.step,
                    total,
                    loss: l.loss,
                }),
                _ => {}
            };
            match train_sft(
                &SftInit::Dir(init.clone()),
                std::slice::from_ref(&oracle),
                &dir,
                &scfg,
                &mut on,
            ) {
                // An unfinished SFT whose demonstrations (or start) changed since, e.g. after
                // the demonstration rollouts were started over: the pipeline owns the
                // directory, and a partial training of other data is worthless. Start over.
                Err(arbor_train::TrainError::ForeignCheckpoint { .. }) => {
                    std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
                    train_sft(&SftInit::Dir(init), &[oracle], &dir, &scfg, &mut on)
                }
                r => r,
            }
            .map_err(RecipeError::from)
        })
        .await
        .map_err(|e| RecipeError::Train(format!("SFT task: {e}")))?
        .map(|_| ())
    }

    /// RL per domain from its SFT model: the experts, in `rl/<domain>`.
    async fn rl_experts(
        &self,
        sft_dirs: &BTreeMap<String, PathBuf>,
    ) -> Result<BTreeMap<String, RlReport>> {
        let cfg = self.cfg;
        let mut rl_reports = BTreeMap::new();
        for d in &cfg.domains {
            let label = format!("rl/{d}");
            let st = RlStage {
                label: label.clone(),
                spec: cfg.rl.clone(),
                rollout: cfg.rollout.clone(),
                domains: vec![d.clone()],
                difficulty: cfg.difficulty,
                seed: cfg.seed,
                init: sft_dirs[d].clone(),
                teachers: BTreeMap::new(),
                out: self.out.join("rl").join(d),
            };
            self.stage(&label, st.out.join(crate::rl::REPORT_FILE).is_file());
            let report = st
                .run(rl_progress(label, cfg.rl.iterations, self.progress.clone()))
                .await?;
            rl_reports.insert(d.clone(), report);
        }
        Ok(rl_reports)
    }

    /// On-policy distillation of the all-domain SFT student toward each domain's expert, in
    /// `distill/`.
    async fn distill(
        &self,
        sft_dirs: &BTreeMap<String, PathBuf>,
        rl_reports: &BTreeMap<String, RlReport>,
    ) -> Result<RlReport> {
        let cfg = self.cfg;
        let distill = RlStage {
            label: "distill".into(),
            spec: cfg.distill.clone(),
            rollout: cfg.rollout.clone(),
            domains: cfg.domains.clone(),
            difficulty: cfg.difficulty,
            seed: cfg.seed ^ 0xd157,
            init: sft_dirs["all"].clone(),
            teachers: rl_reports
                .iter()
                .map(|(d, r)| (d.clone(), r.best_checkpoint.clone()))
                .collect(),
            out: self.out.join("distill"),
        };
        self.stage(
            "distill",
            distill.out.join(crate::rl::REPORT_FILE).is_file(),
        );
        distill
            .run(rl_progress(
                "distill".into(),
                cfg.distill.iterations,
                self.progress.clone(),
            ))
            .await
    }

    /// Held-out evaluation of every row's checkpoint on domain `d`, in `eval/<row>/<d>`.
    /// Rows whose weights are byte-identical (an expert that is its SFT model when RL found
    /// no signal) share one evaluation: the same weights on the same tasks.
    async fn evaluate(
        &self,
        d: &str,
        rows: [(&str, PathBuf); 5],
    ) -> Result<BTreeMap<String, Cell>> {
        let cfg = self.cfg;
        let mut cells = BTreeMap::new();
        let mut evaluated: Vec<(&str, PathBuf, Cell)> = Vec::new();
        for (row, ckpt) in rows {
            let dir = self.out.join("eval").join(row).join(d);
            let shared = evaluated
                .iter()
                .find(|(_, c, _)| same_weights(c, &ckpt))
                .cloned();
            if let Some((same, _, cell)) = shared {
                self.stage(&format!("eval/{row}/{d} (the weights of `{same}`)"), true);
                cells.insert(row.to_string(), cell);
                continue;
            }
            let rate = {
                self.stage(&format!("eval/{row}/{d}"), false);
                crate::eval::evaluate(
                    &ckpt,
                    d,
                    &cfg.eval,
                    cfg.difficulty,
                    &cfg.rollout,
                    &dir,
                    Some(rollout_progress(
                        format!("eval/{row}/{d}"),
                        self.progress.clone(),
                    )),
                )
                .await?
            };
            (self.progress)(PipelineEvent::Evaluated {
                row: row.into(),
                domain: d.to_string(),
                rate,
            });
            let mut cell = Cell::from(rate);
            cell.sampled = self.evaluate_sampled(d, row, &ckpt).await?;
            cells.insert(row.to_string(), cell);
            evaluated.push((row, ckpt, cell));
        }
        Ok(cells)
    }

    /// The sampled evaluation of one row (`[eval] samples` per task at the RL temperature),
    /// `None` when it is off.
    async fn evaluate_sampled(
        &self,
        d: &str,
        row: &str,
        ckpt: &Path,
    ) -> Result<Option<SampledCell>> {
        let cfg = self.cfg;
        if cfg.eval.samples == 0 {
            return Ok(None);
        }
        let label = format!("eval-sampled/{row}/{d}");
        self.stage(&label, false);
        let rate = crate::eval::evaluate_sampled(
            ckpt,
            crate::eval::heldout(d, &cfg.eval, cfg.difficulty),
            cfg.eval.samples,
            cfg.rl.temperature,
            &cfg.rollout,
            &self.out.join("eval-sampled").join(row).join(d),
            Some(rollout_progress(label, self.progress.clone())),
        )
        .await?;
        (self.progress)(PipelineEvent::EvaluatedSampled {
            row: row.into(),
            domain: d.to_string(),
            rate: rate.clone(),
        });
        Ok(Some(SampledCell::new(&rate, cfg.rl.temperature)))
    }
}

/// Whether two checkpoint directories hold the same weights (byte-identical files; an
/// unreadable file counts as different). Files of different sizes are not read.
fn same_weights(a: &Path, b: &Path) -> bool {
    let file = |d: &Path| d.join("model.safetensors");
    let len = |d: &Path| std::fs::metadata(file(d)).ok().map(|m| m.len());
    let read = |d: &Path| std::fs::read(file(d)).ok();
    a == b
        || (len(a).is_some()
            && len(a) == len(b)
            && matches!((read(a), read(b)), (Some(x), Some(y)) if x == y))
}

/// The first stage whose settings differ between `old` and `new`, with its output directory,
/// if that directory exists (the stage has started; it and everything after it would mix two
/// configurations). Stages in order, with the settings each depends on; a stage also depends on
/// everything before it.
fn changed_started_stage(
    old: &PipelineConfig,
    new: &PipelineConfig,
    out: &Path,
) -> Option<(&'static str, PathBuf)> {
    fn v(x: &impl Serialize) -> serde_json::Value {
        serde_json::to_value(x).unwrap_or_default()
    }
    // How many rollouts and generations run at once changes speed, not results.
    let speed_free = |c: &PipelineConfig| {
        let mut r = c.rollout.clone();
        r.concurrency = 0;
        r.policy_concurrency = None;
        v(&r)
    };
    let base_old = vec![v(&old.model), v(&old.seed), v(&old.pretrain)];
    let base_new = vec![v(&new.model), v(&new.seed), v(&new.pretrain)];
    let stages: [(&str, &str, Vec<serde_json::Value>, Vec<serde_json::Value>); 7] = [
        // With `[pretrain]` the fresh model is init/ and base/ its pretrained form; either
        // existing means the base stage has started.
        ("base", "init", base_old.clone(), base_new.clone()),
        ("base", "base", base_old, base_new),
        (
            "demonstration",
            "oracle-tasks",
            vec![
                v(&old.domains),
                v(&old.difficulty),
                v(&old.oracle),
                speed_free(old),
            ],
            vec![
                v(&new.domains),
                v(&new.difficulty),
                v(&new.oracle),
                speed_free(new),
            ],
        ),
        (
            "SFT",
            "sft",
            vec![v(&old.sft), v(&old.sft_expert)],
            vec![v(&new.sft), v(&new.sft_expert)],
        ),
        ("RL", "rl", vec![v(&old.rl)], vec![v(&new.rl)]),
        (
            "distillation",
            "distill",
            vec![v(&old.distill)],
            vec![v(&new.distill)],
        ),
        ("evaluation", "eval", vec![v(&old.eval)], vec![v(&new.eval)]),
    ];
    let first = stages.iter().position(|(_, _, a, b)| a != b)?;
    // A change makes its stage and every later one stale: refused if any of them has started.
    stages[first..]
        .iter()
        .map(|(name, dir, _, _)| (*name, out.join(dir)))
        .find(|(_, dir)| dir.exists())
}

/// RL stage progress as pipeline events.
pub(crate) fn rl_progress(
    stage: String,
    total: usize,
    p: PipelineProgress,
) -> crate::rl::ProgressFn {
    Arc::new(move |ev: RlEvent<'_>| match ev {
        RlEvent::Sampling {
            iteration,
            progress,
        } => p(PipelineEvent::Rollouts {
            stage: format!("{stage} iter {}/{total}", iteration + 1),
            done: progress.done,
            total: progress.total,
            passed: progress.passed,
        }),
        RlEvent::Iteration(l) => p(PipelineEvent::Iteration {
            stage: stage.clone(),
            total,
            log: Box::new(l.clone()),
        }),
        RlEvent::StoppedWithoutSignal { iteration } => p(PipelineEvent::StoppedWithoutSignal {
            stage: stage.clone(),
            iteration,
        }),
        _ => {}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> PipelineConfig {
        PipelineConfig::parse(&format!("name = \"x\"\noutput = \"out\"\n{extra}")).unwrap()
    }

    #[test]
    fn settings_of_stages_not_yet_started_may_change() {
        let out = std::env::temp_dir().join(format!("arbor-recipe-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(out.join("base")).unwrap();
        std::fs::create_dir_all(out.join("sft")).unwrap();
        let old = cfg("[rl]\nlr = 1e-4\n");

        // RL has not started: its settings may change; so may the name.
        let mut new = cfg("[rl]\nlr = 2e-5\n");
        new.name = "renamed".into();
        assert_eq!(changed_started_stage(&old, &new, &out), None);
        // A change to a stage that has run (or before it) is refused.
        let (stage, dir) =
            changed_started_stage(&old, &cfg("[rl]\nlr = 1e-4\n[sft]\nsteps = 9\n"), &out).unwrap();
        assert_eq!((stage, dir), ("SFT", out.join("sft")));
        let (stage, _) =
            changed_started_stage(&old, &cfg("seed = 9\n[rl]\nlr = 1e-4\n"), &out).unwrap();
        assert_eq!(stage, "base");
        let (stage, _) = changed_started_stage(
            &old,
            &cfg("[rl]\nlr = 1e-4\n[pretrain]\nsteps = 10\n"),
            &out,
        )
        .unwrap();
        assert_eq!(stage, "base", "pretraining is part of the base model");
        // Only init/ (the fresh model before pretraining) existing is a started base stage too.
        let only_init = out.join("only-init");
        std::fs::create_dir_all(only_init.join("init")).unwrap();
        let (stage, dir) =
            changed_started_stage(&old, &cfg("seed = 9\n[rl]\nlr = 1e-4\n"), &only_init).unwrap();
        assert_eq!((stage, dir), ("base", only_init.join("init")));
        // Concurrency is speed, not results: it may change whenever.
        let mut faster = old.clone();
        faster.rollout.concurrency = 32;
        faster.rollout.policy_concurrency = Some(64);
        assert_eq!(changed_started_stage(&old, &faster, &out), None);
        std::fs::create_dir_all(out.join("rl")).unwrap();
        assert_eq!(changed_started_stage(&old, &new, &out).unwrap().0, "RL");
        std::fs::remove_dir_all(&out).unwrap();
    }
}
