//! `rlcheck`: the task family of `arbor train rl-check`, the check that RL learns.
//!
//! Every task asks for one of eight operations on a generated file, and each operation has
//! one short, fixed command: nothing in the answer is copied from the instruction. A model
//! that has the command format but not the mapping from instruction to command passes some
//! samples and fails others, which is exactly where group-relative RL has a signal; an RL loop
//! that cannot push such a model to near-certainty has a defect. The data differ per task (so
//! the check runs the command, it does not compare text) and are made so that no other
//! operation's output passes the check.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use super::{checker, pick, word};
use crate::model::{Environment, FileSpec, Solution, Task};

/// An operation: instruction phrasings and the one command that solves them.
struct Op {
    phrasings: [&'static str; 2],
    command: &'static str,
}

/// The input file and the answer file, relative to the workdir.
const INPUT: &str = "data/in.txt";
const ANSWER: &str = "/workspace/out.txt";

const OPS: [Op; 8] = [
    Op {
        phrasings: [
            "Count the lines of data/in.txt and write the number to out.txt.",
            "How many lines does data/in.txt have? Write the number to out.txt.",
        ],
        command: "wc -l < data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Count the words of data/in.txt and write the number to out.txt.",
            "How many words does data/in.txt have? Write the number to out.txt.",
        ],
        command: "wc -w < data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Write the first line of data/in.txt to out.txt.",
            "Copy only the top line of data/in.txt into out.txt.",
        ],
        command: "head -n 1 data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Write the last line of data/in.txt to out.txt.",
            "Copy only the bottom line of data/in.txt into out.txt.",
        ],
        command: "tail -n 1 data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Write the lines of data/in.txt to out.txt in sorted order.",
            "Sort the lines of data/in.txt into out.txt.",
        ],
        command: "sort data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Write the distinct lines of data/in.txt to out.txt, sorted.",
            "Sort the lines of data/in.txt into out.txt without duplicates.",
        ],
        command: "sort -u data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Write the lines of data/in.txt to out.txt in reverse order.",
            "Copy data/in.txt into out.txt with the last line first.",
        ],
        command: "tac data/in.txt > out.txt",
    },
    Op {
        phrasings: [
            "Write data/in.txt to out.txt in upper case.",
            "Copy data/in.txt into out.txt with every letter capitalized.",
        ],
        command: "tr a-z A-Z < data/in.txt > out.txt",
    },
];

/// Number of operations (a task's `metadata.op` is one of `0..OPS_COUNT`).
pub const OPS_COUNT: usize = OPS.len();

/// The command that solves operation `op`.
pub fn command(op: usize) -> &'static str {
    OPS[op % OPS.len()].command
}

/// Lines of two words each, with one repeated line and distinct first and last lines, so
/// every operation's output differs from every other's.
fn data(rng: &mut StdRng, d: usize) -> Vec<String> {
    let n = 4 + d + rng.gen_range(0..3);
    let mut lines: Vec<String> = Vec::with_capacity(n + 1);
    while lines.len() < n {
        let l = format!("{} {}", word(rng, 2), word(rng, 1));
        if !lines.contains(&l) {
            lines.push(l);
        }
    }
    // A duplicate in the middle: `sort -u` differs from `sort`, and neither end moves.
    let dup = lines[rng.gen_range(1..n - 1)].clone();
    lines.insert(rng.gen_range(1..n), dup);
    lines
}

/// What the answer file must hold after operation `op` on `lines`.
fn expected(op: usize, lines: &[String]) -> serde_json::Value {
    let mut sorted = lines.to_vec();
    sorted.sort();
    let out: Vec<String> = match op {
        0 => return json!({"t": "number", "path": ANSWER, "value": lines.len()}),
        1 => return json!({"t": "number", "path": ANSWER, "value": lines.len() * 2}),
        2 => vec![lines[0].clone()],
        3 => vec![lines[lines.len() - 1].clone()],
        4 => sorted,
        5 => {
            sorted.dedup();
            sorted
        }
        6 => lines.iter().rev().cloned().collect(),
        _ => lines.iter().map(|l| l.to_uppercase()).collect(),
    };
    json!({"t": "lines", "path": ANSWER, "lines": out})
}

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let op = rng.gen_range(0..OPS.len());
    let lines = data(rng, difficulty as usize);
    let instruction = pick(rng, &OPS[op].phrasings).to_string();
    let mut task = Task {
        id: String::new(),
        domain: "rlcheck".into(),
        instruction,
        environment: Environment {
            files: vec![FileSpec::text(INPUT, lines.join("\n") + "\n")],
            ..Environment::default()
        },
        verifier: checker(json!([expected(op, &lines)])),
        oracle: Some(Solution {
            script: Some(OPS[op].command.to_string()),
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: Default::default(),
    };
    task.metadata.insert("op".into(), json!(op));
    task
}

/// Demonstrations from an imperfect demonstrator: `tasks` dealt into [`OPS_COUNT`] sets, set
/// `s` holding tasks whose oracle was replaced by the command of operation `op + s` (set 0 keeps
/// the right command; a share `error_rate` of the tasks, drawn by `seed`, goes to sets 1..).
/// Their rollouts fail, and SFT on every rollout learns a policy that picks the right command
/// only part of the time.
///
/// The scripted oracle answers by instruction and instructions repeat across tasks, so each
/// set must be rolled out on its own: within one set an instruction always maps to one command.
pub fn demonstration_sets(tasks: Vec<Task>, error_rate: f64, seed: u64) -> Vec<Vec<Task>> {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0e11_0e11);
    let mut sets: Vec<Vec<Task>> = (0..OPS.len()).map(|_| Vec::new()).collect();
    for mut t in tasks {
        if !rng.gen_bool(error_rate.clamp(0.0, 1.0)) {
            sets[0].push(t);
            continue;
        }
        let op = t.metadata.get("op").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let shift = rng.gen_range(1..OPS.len());
        t.oracle = Some(Solution {
            script: Some(command(op + shift).to_string()),
            ..Solution::default()
        });
        sets[shift].push(t);
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn no_operation_passes_another_operations_check() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let lines = data(&mut rng, 1);
            let all: Vec<_> = (0..OPS.len()).map(|op| expected(op, &lines)).collect();
            for (i, a) in all.iter().enumerate() {
                for b in &all[i + 1..] {
                    assert_ne!(a, b, "{lines:?}");
                }
            }
        }
    }

    #[test]
    fn demonstration_sets_corrupt_the_given_share_consistently() {
        let mut rng = StdRng::seed_from_u64(5);
        let tasks: Vec<Task> = (0..400).map(|_| generate(&mut rng, 1)).collect();
        let sets = demonstration_sets(tasks, 0.5, 1);
        assert_eq!(sets.iter().map(Vec::len).sum::<usize>(), 400);
        assert!((150..250).contains(&sets[0].len()), "{}", sets[0].len());
        for (shift, set) in sets.iter().enumerate() {
            for t in set {
                let op = t.metadata["op"].as_u64().unwrap() as usize;
                let script = t.oracle.as_ref().unwrap().script.as_deref();
                assert_eq!(script, Some(command(op + shift)), "{}", t.instruction);
            }
        }
    }
}
