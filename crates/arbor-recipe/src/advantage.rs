//! Group-relative advantages (docs/recipe.md §3): a rollout's reward minus the mean reward of the
//! rollouts of the same task, optionally divided by the group's standard deviation.
//! Infrastructure failures are not the policy's doing: they get no advantage and do not enter
//! their group's statistics.

use std::collections::HashMap;

use arbor_rollout::record::Status;

use crate::rollouts::Episode;

/// What the grouping found, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupStats {
    /// Groups (tasks) with at least one scored rollout.
    pub groups: usize,
    /// Groups whose rewards differ (the only ones that give a policy gradient).
    pub groups_with_signal: usize,
    /// Rollouts left out as infrastructure errors.
    pub excluded: usize,
}

/// The advantage of each episode (`None` for infrastructure errors), in input order.
pub fn group_advantages(
    episodes: &[Episode],
    normalize_std: bool,
) -> (Vec<Option<f64>>, GroupStats) {
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut stats = GroupStats::default();
    for (i, e) in episodes.iter().enumerate() {
        if e.status == Status::InfraError {
            stats.excluded += 1;
        } else {
            groups.entry(e.task_id.as_str()).or_default().push(i);
        }
    }
    let mut adv = vec![None; episodes.len()];
    for members in groups.values() {
        stats.groups += 1;
        let n = members.len() as f64;
        let mean = members.iter().map(|&i| episodes[i].reward).sum::<f64>() / n;
        let var = members
            .iter()
            .map(|&i| (episodes[i].reward - mean).powi(2))
            .sum::<f64>()
            / n;
        let std = var.sqrt();
        if std > 0.0 {
            stats.groups_with_signal += 1;
        }
        for &i in members {
            let a = episodes[i].reward - mean;
            adv[i] = Some(if normalize_std && std > 0.0 {
                a / (std + 1e-6)
            } else {
                a
            });
        }
    }
    (adv, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(task: &str, status: Status, reward: f64) -> Episode {
        Episode {
            task_id: task.into(),
            domain: "terminal".into(),
            status,
            reward,
            sequences: Vec::new(),
        }
    }

    #[test]
    fn advantages_are_relative_to_the_group_and_skip_infra_errors() {
        let eps = vec![
            ep("a", Status::Passed, 1.0),
            ep("a", Status::Failed, 0.0),
            ep("a", Status::InfraError, 0.0),
            ep("a", Status::Failed, 0.0),
            ep("b", Status::Failed, 0.0),
            ep("b", Status::AgentFailure, 0.0),
        ];
        let (adv, st) = group_advantages(&eps, false);
        // Group a: scored rewards 1, 0, 0 -> mean 1/3 (the infra error is not a 0).
        let third = 1.0 / 3.0;
        assert!((adv[0].unwrap() - (1.0 - third)).abs() < 1e-12);
        assert!((adv[1].unwrap() + third).abs() < 1e-12);
        assert_eq!(adv[2], None);
        assert!((adv[3].unwrap() + third).abs() < 1e-12);
        // Group b: all equal -> zero advantage, no signal.
        assert_eq!(adv[4], Some(0.0));
        assert_eq!(adv[5], Some(0.0));
        assert_eq!(
            st,
            GroupStats {
                groups: 2,
                groups_with_signal: 1,
                excluded: 1
            }
        );
        // Normalized: divided by the population std of {1, 0, 0} = sqrt(2)/3.
        let (adv, _) = group_advantages(&eps, true);
        let std = (2.0f64).sqrt() / 3.0;
        assert!((adv[0].unwrap() - (1.0 - third) / (std + 1e-6)).abs() < 1e-9);
        assert_eq!(adv[4], Some(0.0));
    }
}
