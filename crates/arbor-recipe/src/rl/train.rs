//! Step 3 of an iteration (update): the scored episodes become the trained paths of one
//! trajectory tree per domain, packed, and [`arbor_train::rl_update`] trains on them (the
//! start checkpoint as reference, each domain's teacher when distilling). No loss is formed
//! here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arbor_model::{Qwen3Model, train::AdamWTrainer};
use arbor_train::{RlUpdate, UpdatePack, UpdateStats, rl_update};
use arbor_tree::{PackOptions, Sequence, TrajectoryTree, pack_tree};

use crate::Result;
use crate::config::{RlSpec, RolloutSpec};
use crate::rollouts::Episode;

/// The trained model and its optimizer (moved to a blocking thread for each update).
pub(super) struct Trainer {
    pub(super) model: Qwen3Model,
    pub(super) opt: AdamWTrainer,
}

impl Trainer {
    /// `model` with a fresh AdamW at learning rate `lr` (no weight decay).
    pub(super) fn new(model: Qwen3Model, lr: f64) -> Result<Self> {
        Ok(Self {
            opt: AdamWTrainer::new(model.vars(), lr, 0.0)?,
            model,
        })
    }
}

/// The paths one iteration trains, per domain, with their advantages set.
#[derive(Debug, Default)]
pub(super) struct TrainingSet {
    pub(super) by_domain: BTreeMap<String, Vec<Sequence>>,
    /// Weight `c_k` of each path (sequence id).
    pub(super) weights: HashMap<String, f32>,
}

impl TrainingSet {
    /// The calls of the episodes that get a gradient: scored (an advantage), with calls, and
    /// with a non-zero advantage unless `distilling` (distillation trains every sample). Every
    /// trained episode weighs the same, however many calls it made: a path (one call) gets
    /// `1 / (episodes * calls of its episode)`.
    pub(super) fn new(
        episodes: Vec<Episode>,
        advantages: Vec<Option<f64>>,
        distilling: bool,
    ) -> Self {
        let trained: Vec<(Episode, f64)> = episodes
            .into_iter()
            .zip(advantages)
            .filter_map(|(e, a)| a.map(|a| (e, a)))
            .filter(|(e, a)| (*a != 0.0 || distilling) && !e.sequences.is_empty())
            .collect();
        let mut set = Self::default();
        let n_episodes = trained.len() as f32;
        for (e, a) in trained {
            let w = 1.0 / (n_episodes * e.sequences.len() as f32);
            for mut s in e.sequences {
                s.advantage = Some(a);
                set.weights.insert(s.id.clone(), w);
                set.by_domain.entry(e.domain.clone()).or_default().push(s);
            }
        }
        set
    }
}

/// What an iteration's update did: the sizes of its trees and what the update measured.
#[derive(Debug, Default)]
pub(super) struct Trained {
    pub(super) paths: usize,
    pub(super) unique_tokens: u64,
    pub(super) flat_tokens: u64,
    pub(super) update: UpdateStats,
}

/// The models an update reads besides the trained one.
#[derive(Clone)]
pub(super) struct Targets {
    /// The stage's start checkpoint: KL statistic and the KL penalty's reference.
    pub(super) reference: Arc<Qwen3Model>,
    /// Teacher per domain (distillation); empty for RL.
    pub(super) teachers: HashMap<String, Arc<Qwen3Model>>,
}

/// Iteration `iteration`'s update of `t` on `set`: one tree per domain (a pack must see one
/// teacher), packed once, then [`rl_update`].
pub(super) fn update(
    spec: &RlSpec,
    rollout: &RolloutSpec,
    iteration: usize,
    set: TrainingSet,
    targets: &Targets,
    t: &mut Trainer,
) -> Result<Trained> {
    let mut tr = Trained::default();
    let mut packs = Vec::new();
    for (domain, seqs) in &set.by_domain {
        if seqs.is_empty() {
            continue;
        }
        let tree = TrajectoryTree::from_sequences(seqs)?;
        tr.paths += tree.num_paths();
        tr.unique_tokens += tree.unique_tokens();
        tr.flat_tokens += tree.flat_tokens();
        let (_, p) = pack_tree(&tree, &PackOptions::new(spec.max_tokens_per_pack))?;
        packs.extend(p.into_iter().map(|pack| UpdatePack {
            label: domain.clone(),
            pack,
            teacher: targets.teachers.get(domain).cloned(),
        }));
    }
    if tr.paths == 0 {
        return Ok(tr);
    }
    let job = RlUpdate {
        packs,
        total_paths: tr.paths,
        weights: set.weights,
        reference: targets.reference.clone(),
        // Step s of iteration i draws MCLA routing from seed (1024 i + s) * 1000.
        config: spec.rl_config((iteration * 1024) as u64, rollout),
        estimator: spec.distill_estimator,
        passes: spec.updates_per_iteration,
        minibatches: spec.minibatches,
    };
    tr.update = rl_update(&t.model, &mut t.opt, &job)?;
    Ok(tr)
}
