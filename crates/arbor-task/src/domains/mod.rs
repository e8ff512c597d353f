//! Five built-in task domains generated from a seed, each task with an
//! oracle solution and a verifier: `swe`, `terminal`, `webcoding`,
//! `websearch`, `general`.
//!
//! - **Splits.** A task's id is a hash of its content; its split (`train` or
//!   `heldout`, 1 in 5) is a function of that hash, so the same task can
//!   never appear in both splits, whatever seeds generated them.
//! - **Difficulty** (1..=5) scales size and the number of reasoning steps.
//! - **Variety.** Names, constants, data and structure are drawn from the
//!   seed, so a memorized output does not solve another instance.
//! - **Hardening.** Everything that reveals the expected result (hidden
//!   tests, expected outputs) lives only in the verifier's files, uploaded
//!   to `/tests` after the agent has finished. Checks run with `python3 -I -S`
//!   (no site hooks from the agent's files).

mod general;
pub mod rlcheck;
mod swe;
mod terminal;
mod webcoding;
mod websearch;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Result, TaskError};
pub use crate::hash::hash_str;
use crate::model::{FileSpec, Task};
use crate::verify::{CommandSpec, VerifierSpec};

/// The built-in domains.
pub const DOMAINS: [&str; 5] = ["swe", "terminal", "webcoding", "websearch", "general"];

/// Generated task families that are not recipe domains: `rlcheck`, the family of
/// `arbor train rl-check` ([`rlcheck`]).
pub const CHECK_FAMILIES: [&str; 1] = ["rlcheck"];

/// Whether [`generate`] knows `name` (a domain or a check family).
pub fn is_generated(name: &str) -> bool {
    DOMAINS.contains(&name) || CHECK_FAMILIES.contains(&name)
}

/// Which split to generate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training tasks (4 in 5 of all instances).
    #[default]
    Train,
    /// Held-out tasks (1 in 5), never equal to a training task.
    Heldout,
    /// Both.
    Any,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "heldout" | "held-out" | "test" | "eval" => Ok(Split::Heldout),
            "any" | "all" => Ok(Split::Any),
            _ => Err(format!("unknown split `{s}` (train, heldout, any)")),
        }
    }
}

/// Options of [`generate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenOptions {
    /// 1 (easiest) ..= 5.
    pub difficulty: u32,
    /// Which split.
    pub split: Split,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            difficulty: 2,
            split: Split::Train,
        }
    }
}

fn split_of(hash: u64) -> &'static str {
    // Mix so the split is independent of the id's leading digits.
    if (hash.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15).is_multiple_of(5) {
        "heldout"
    } else {
        "train"
    }
}

/// Generate `n` tasks of `domain` from `seed`. Deterministic: the same
/// arguments give the same tasks.
pub fn generate(domain: &str, n: usize, seed: u64, opts: &GenOptions) -> Result<Vec<Task>> {
    let generator: fn(&mut StdRng, u32) -> Task = match domain {
        "swe" => swe::generate,
        "terminal" => terminal::generate,
        "webcoding" => webcoding::generate,
        "websearch" => websearch::generate,
        "general" => general::generate,
        "rlcheck" => rlcheck::generate,
        other => {
            return Err(TaskError::Other(format!(
                "unknown domain `{other}` (one of: {}, {})",
                DOMAINS.join(", "),
                CHECK_FAMILIES.join(", ")
            )));
        }
    };
    if !(1..=5).contains(&opts.difficulty) {
        return Err(TaskError::Other(format!(
            "difficulty must be 1..=5, not {}",
            opts.difficulty
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut seen = BTreeSet::new();
    let max_attempts = n.saturating_mul(50).saturating_add(1000);
    let mut attempt: u64 = 0;
    while out.len() < n && attempt < max_attempts as u64 {
        let mut rng = StdRng::seed_from_u64(
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ attempt.wrapping_mul(0xbf58_476d_1ce4_e5b9)
                ^ hash_str(domain),
        );
        attempt += 1;
        let mut task = generator(&mut rng, opts.difficulty);
        let key = serde_json::to_string(&(&task.instruction, &task.environment, &task.verifier))
            .unwrap_or_default();
        let h = hash_str(&format!("{domain}\n{key}"));
        let split = split_of(h);
        let wanted = match opts.split {
            Split::Train => split == "train",
            Split::Heldout => split == "heldout",
            Split::Any => true,
        };
        if !wanted || !seen.insert(h) {
            continue;
        }
        task.id = format!("{domain}-{split}-{h:016x}");
        // Everything a built-in task produces lives in the workdir: grade
        // in a fresh sandbox, so changes the agent made to system files
        // (a fake python3, an edited stdlib) cannot reach the checks.
        task.grade_mode = Some(crate::verify::GradeMode::Fresh);
        task.domain = domain.to_string();
        task.metadata.insert("split".into(), json!(split));
        task.metadata
            .insert("difficulty".into(), json!(opts.difficulty));
        task.metadata
            .insert("generator".into(), json!({"domain": domain, "seed": seed}));
        out.push(task);
    }
    if out.len() < n {
        return Err(TaskError::Other(format!(
            "could only generate {} distinct {domain} tasks at difficulty {}",
            out.len(),
            opts.difficulty
        )));
    }
    Ok(out)
}

/// Generate tasks and write them as `<out>/<id>.json` (native format).
/// Returns the files written.
pub fn gen_to_dir(
    domain: &str,
    n: usize,
    seed: u64,
    opts: &GenOptions,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let tasks = generate(domain, n, seed, opts)?;
    tasks
        .iter()
        .map(|t| crate::dataset::write_task_json(out, t))
        .collect()
}

// ---- shared helpers of the generators --------------------------------------

/// The generic checker run by built-in verifiers.
pub(crate) const CHECK_PY: &str = include_str!("check.py");

/// A verifier that runs the generic checker on `checks` (JSON), uploaded to
/// `/tests` only at grading time.
pub(crate) fn checker(checks: serde_json::Value) -> VerifierSpec {
    VerifierSpec::ExitStatus(CommandSpec {
        command: "python3 -I -S /tests/check.py /tests/spec.json".into(),
        files: vec![
            FileSpec::text("/tests/check.py", CHECK_PY),
            FileSpec::text("/tests/spec.json", json!({ "checks": checks }).to_string()),
        ],
        timeout_s: Some(60.0),
    })
}

pub(crate) fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[rng.gen_range(0..xs.len())]
}

const SYL: [&str; 24] = [
    "ka", "lo", "mi", "ren", "to", "va", "shi", "dor", "el", "quin", "bar", "zu", "an", "fel",
    "gri", "mo", "nal", "or", "pe", "sar", "tin", "ul", "wen", "yo",
];

/// A pronounceable made-up word of `n` syllables.
pub(crate) fn word(rng: &mut StdRng, n: usize) -> String {
    (0..n).map(|_| *pick(rng, &SYL)).collect()
}

/// A capitalized made-up name.
pub(crate) fn name(rng: &mut StdRng) -> String {
    let n = rng.gen_range(2..=3);
    let w = word(rng, n);
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => w,
    }
}

/// Shell single-quoting.
pub(crate) fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_disjoint_and_varied() {
        for d in DOMAINS {
            let o = GenOptions {
                difficulty: 3,
                split: Split::Train,
            };
            let a = generate(d, 30, 7, &o).unwrap_or_default();
            let b = generate(d, 30, 7, &o).unwrap_or_default();
            assert_eq!(a.len(), 30, "{d}");
            assert_eq!(a, b, "{d}: generation must be deterministic");
            let h = generate(
                d,
                30,
                7,
                &GenOptions {
                    split: Split::Heldout,
                    ..o
                },
            )
            .unwrap_or_default();
            let train: BTreeSet<_> = a.iter().map(|t| t.id.clone()).collect();
            assert_eq!(train.len(), 30);
            // Held-out tasks from another seed never equal a train task.
            let h2 = generate(
                d,
                30,
                8,
                &GenOptions {
                    split: Split::Heldout,
                    ..o
                },
            )
            .unwrap_or_default();
            for t in h.iter().chain(&h2) {
                assert!(!train.contains(&t.id), "{d}: {} in both splits", t.id);
                assert_eq!(t.meta_str("split"), Some("heldout"));
            }
            // What must be produced varies: tasks rarely share a verifier
            // (expected outputs, hidden tests), so memorized outputs fail.
            let expected: BTreeSet<_> = a
                .iter()
                .map(|t| serde_json::to_string(&t.verifier).unwrap_or_default())
                .collect();
            // (A count answer like `7` may recur by chance.)
            assert!(
                expected.len() >= 27,
                "{d}: only {} distinct verifiers",
                expected.len()
            );
            for t in &a {
                assert!(t.oracle.is_some());
                crate::dataset::validate(t, "gen").unwrap_or_else(|e| panic!("{d}: {e}"));
            }
        }
    }
}
