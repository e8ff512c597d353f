//! `websearch`: questions answered from a generated document collection
//! through a `search` command inside the sandbox; the answer goes to a file.
//! Harder levels need several hops (question → person → company → city...).

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use super::{name, pick, sq, word};
use crate::model::{Environment, FileSpec, Solution, Task};
use crate::verify::{AnswerMatchSpec, MatchMode, VerifierSpec};

const SEARCH_PY: &str = include_str!("search.py");

struct City {
    name: String,
    founded: i64,
    river: String,
}
struct Person {
    name: String,
    born_in: usize,
    invention: String,
}
struct Company {
    name: String,
    founder: usize,
    hq: usize,
}

fn unique(rng: &mut StdRng, used: &mut Vec<String>, f: impl Fn(&mut StdRng) -> String) -> String {
    loop {
        let n = f(rng);
        if !used.contains(&n) {
            used.push(n.clone());
            return n;
        }
    }
}

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let d = difficulty as usize;
    let mut used = Vec::new();
    let n_cities = 6 + 3 * d;
    let n_people = 5 + 3 * d;
    let n_companies = 3 + 2 * d;
    let cities: Vec<City> = (0..n_cities)
        .map(|_| City {
            name: unique(rng, &mut used, name),
            founded: rng.gen_range(1100..1950),
            river: unique(rng, &mut used, name),
        })
        .collect();
    let people: Vec<Person> = (0..n_people)
        .map(|_| Person {
            name: format!("{} {}", unique(rng, &mut used, name), name(rng)),
            born_in: rng.gen_range(0..n_cities),
            invention: format!(
                "{} {}",
                unique(rng, &mut used, |r| word(r, 2)),
                pick(
                    rng,
                    &[
                        "engine", "loom", "valve", "lamp", "press", "compass", "clock"
                    ]
                )
            ),
        })
        .collect();
    // Each founder founded one company, so every question has one answer.
    let mut founders: Vec<usize> = (0..n_people).collect();
    for i in (1..founders.len()).rev() {
        let j = rng.gen_range(0..=i);
        founders.swap(i, j);
    }
    let companies: Vec<Company> = (0..n_companies)
        .map(|i| Company {
            name: format!(
                "{} {}",
                unique(rng, &mut used, name),
                pick(
                    rng,
                    &["Works", "Industries", "Trading Co.", "Foundry", "Labs"]
                )
            ),
            founder: founders[i],
            hq: rng.gen_range(0..n_cities),
        })
        .collect();

    let mut docs = Vec::new();
    for (i, c) in cities.iter().enumerate() {
        docs.push(json!({
            "id": format!("city-{i}"),
            "title": c.name,
            "text": format!("{} is a city founded in {}. The {} river flows through {}. It is known for its {} market.",
                c.name, c.founded, c.river, c.name, word(rng, 2)),
        }));
    }
    for (i, p) in people.iter().enumerate() {
        docs.push(json!({
            "id": format!("person-{i}"),
            "title": p.name,
            "text": format!("{} was an inventor born in {}. {} is best known for inventing the {}.",
                p.name, cities[p.born_in].name, p.name, p.invention),
        }));
    }
    for (i, c) in companies.iter().enumerate() {
        docs.push(json!({
            "id": format!("company-{i}"),
            "title": c.name,
            "text": format!("{} was founded by {}. Its headquarters are in {}.",
                c.name, people[c.founder].name, cities[c.hq].name),
        }));
    }
    // Shuffle document order.
    for i in (1..docs.len()).rev() {
        let j = rng.gen_range(0..=i);
        docs.swap(i, j);
    }
    let corpus: String = docs.iter().map(|d| d.to_string() + "\n").collect();

    // `extract`: for the one-hop levels, a sed program that reads the answer out of the
    // search results, so the oracle's demonstration shows the lookup a model can learn (copy
    // the name from the question, read the answer from the output) rather than an answer it
    // could not know. The multi-hop levels write the known answer after checking that the
    // collection is searchable.
    let (question, answer, mode, query, extract) = match d {
        1 => {
            let c = &cities[rng.gen_range(0..n_cities)];
            (
                format!("In what year was the city of {} founded?", c.name),
                c.founded.to_string(),
                MatchMode::Numeric,
                c.name.clone(),
                Some(r"s/.*founded in \([0-9]*\).*/\1/p"),
            )
        }
        2 => {
            let p = &people[rng.gen_range(0..n_people)];
            (
                format!("In which city was the inventor {} born?", p.name),
                cities[p.born_in].name.clone(),
                MatchMode::Normalized,
                p.name.clone(),
                Some(r"s/.*was an inventor born in \([A-Za-z]*\)\..*/\1/p"),
            )
        }
        3 => {
            let p = &people[rng.gen_range(0..n_people)];
            let c = &cities[p.born_in];
            (
                format!(
                    "In what year was the birthplace of the inventor of the {} founded?",
                    p.invention
                ),
                c.founded.to_string(),
                MatchMode::Numeric,
                p.invention.clone(),
                None,
            )
        }
        4 => {
            let co = &companies[rng.gen_range(0..n_companies)];
            let c = &cities[people[co.founder].born_in];
            (
                format!(
                    "Which river flows through the city where the founder of {} was born? Answer with the river's name.",
                    co.name
                ),
                c.river.clone(),
                MatchMode::Normalized,
                co.name.clone(),
                None,
            )
        }
        _ => {
            let co = &companies[rng.gen_range(0..n_companies)];
            let p = &people[co.founder];
            let c = &cities[co.hq];
            (
                format!(
                    "The company founded by the inventor of the {} has its headquarters in a city. In what year was that city founded?",
                    p.invention
                ),
                c.founded.to_string(),
                MatchMode::Numeric,
                p.invention.clone(),
                None,
            )
        }
    };
    let alternatives = if mode == MatchMode::Normalized && d == 4 {
        vec![format!("{answer} river"), format!("the {answer} river")]
    } else {
        Vec::new()
    };
    let instruction = format!(
        "Answer this question using the document collection available through the `search` command \
         (`search WORDS...` lists matching documents; `search --open ID` prints one):\n\n{question}\n\n\
         Write only the answer to /workspace/answer.txt."
    );
    Task {
        id: String::new(),
        domain: "websearch".into(),
        instruction,
        environment: Environment {
            files: vec![
                FileSpec::text("/srv/corpus/docs.jsonl", corpus),
                FileSpec::executable("/usr/local/bin/search", SEARCH_PY),
            ],
            ..Environment::default()
        },
        verifier: VerifierSpec::AnswerMatch(AnswerMatchSpec {
            path: "/workspace/answer.txt".into(),
            expected: answer.clone(),
            alternatives,
            mode,
            tolerance: Some(0.0),
        }),
        oracle: Some(Solution {
            script: Some(match extract {
                // The top-ranked match is the document the question names.
                Some(sed) => format!(
                    "search {} | sed -n {} | head -n 1 > /workspace/answer.txt",
                    sq(&query),
                    sq(sed)
                ),
                None => format!(
                    "search {} | grep -q '^\\[' && printf '%s\\n' {} > /workspace/answer.txt",
                    sq(&query),
                    sq(&answer)
                ),
            }),
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: Default::default(),
    }
}
