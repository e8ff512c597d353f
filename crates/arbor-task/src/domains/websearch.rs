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

/// The facts the questions are about: cities, inventors, their companies.
struct World {
    cities: Vec<City>,
    people: Vec<Person>,
    companies: Vec<Company>,
}

/// A question, its answer, and how the oracle finds it.
struct Question {
    text: String,
    answer: String,
    mode: MatchMode,
    /// What the oracle searches for.
    query: String,
    /// For the one-hop levels, a sed program that reads the answer out of the
    /// search results, so the oracle's demonstration shows the lookup a model
    /// can learn (copy the name from the question, read the answer from the
    /// output) rather than an answer it could not know. The multi-hop levels
    /// write the known answer after checking that the collection is searchable.
    extract: Option<&'static str>,
}

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let d = difficulty as usize;
    let world = world(rng, d);
    let corpus = corpus(rng, &world);
    let q = question(rng, &world, d);
    let alternatives = if q.mode == MatchMode::Normalized && d == 4 {
        vec![
            format!("{} river", q.answer),
            format!("the {} river", q.answer),
        ]
    } else {
        Vec::new()
    };
    let instruction = format!(
        "Answer this question using the document collection available through the `search` command \
         (`search WORDS...` lists matching documents; `search --open ID` prints one):\n\n{}\n\n\
         Write only the answer to /workspace/answer.txt.",
        q.text
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
            expected: q.answer.clone(),
            alternatives,
            mode: q.mode,
            tolerance: Some(0.0),
        }),
        oracle: Some(Solution {
            script: Some(oracle_script(&q)),
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: Default::default(),
    }
}

/// Cities, people and companies with unique names; difficulty scales their number.
fn world(rng: &mut StdRng, d: usize) -> World {
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
    World {
        cities,
        people,
        companies,
    }
}

/// One JSONL document per city, person and company, in shuffled order.
fn corpus(rng: &mut StdRng, w: &World) -> String {
    let (cities, people) = (&w.cities, &w.people);
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
    for (i, c) in w.companies.iter().enumerate() {
        docs.push(json!({
            "id": format!("company-{i}"),
            "title": c.name,
            "text": format!("{} was founded by {}. Its headquarters are in {}.",
                c.name, people[c.founder].name, cities[c.hq].name),
        }));
    }
    for i in (1..docs.len()).rev() {
        let j = rng.gen_range(0..=i);
        docs.swap(i, j);
    }
    docs.iter().map(|d| d.to_string() + "\n").collect()
}

/// A question needing `d` hops at most (levels 1-2: one document; 3-5: a chain).
fn question(rng: &mut StdRng, w: &World, d: usize) -> Question {
    let (cities, people, companies) = (&w.cities, &w.people, &w.companies);
    match d {
        1 => {
            let c = &cities[rng.gen_range(0..cities.len())];
            Question {
                text: format!("In what year was the city of {} founded?", c.name),
                answer: c.founded.to_string(),
                mode: MatchMode::Numeric,
                query: c.name.clone(),
                extract: Some(r"s/.*founded in \([0-9]*\).*/\1/p"),
            }
        }
        2 => {
            let p = &people[rng.gen_range(0..people.len())];
            Question {
                text: format!("In which city was the inventor {} born?", p.name),
                answer: cities[p.born_in].name.clone(),
                mode: MatchMode::Normalized,
                query: p.name.clone(),
                extract: Some(r"s/.*was an inventor born in \([A-Za-z]*\)\..*/\1/p"),
            }
        }
        3 => {
            let p = &people[rng.gen_range(0..people.len())];
            let c = &cities[p.born_in];
            Question {
                text: format!(
                    "In what year was the birthplace of the inventor of the {} founded?",
                    p.invention
                ),
                answer: c.founded.to_string(),
                mode: MatchMode::Numeric,
                query: p.invention.clone(),
                extract: None,
            }
        }
        4 => {
            let co = &companies[rng.gen_range(0..companies.len())];
            let c = &cities[people[co.founder].born_in];
            Question {
                text: format!(
                    "Which river flows through the city where the founder of {} was born? Answer with the river's name.",
                    co.name
                ),
                answer: c.river.clone(),
                mode: MatchMode::Normalized,
                query: co.name.clone(),
                extract: None,
            }
        }
        _ => {
            let co = &companies[rng.gen_range(0..companies.len())];
            let p = &people[co.founder];
            let c = &cities[co.hq];
            Question {
                text: format!(
                    "The company founded by the inventor of the {} has its headquarters in a city. In what year was that city founded?",
                    p.invention
                ),
                answer: c.founded.to_string(),
                mode: MatchMode::Numeric,
                query: p.invention.clone(),
                extract: None,
            }
        }
    }
}

/// The oracle's shell script: search, then extract the answer or write the known one.
fn oracle_script(q: &Question) -> String {
    match q.extract {
        // The top-ranked match is the document the question names.
        Some(sed) => format!(
            "search {} | sed -n {} | head -n 1 > /workspace/answer.txt",
            sq(&q.query),
            sq(sed)
        ),
        None => format!(
            "search {} | grep -q '^\\[' && printf '%s\\n' {} > /workspace/answer.txt",
            sq(&q.query),
            sq(&q.answer)
        ),
    }
}
