//! `general`: instruction following with checkable constraints, and short
//! reasoning questions with exact or numeric answers. No tools are needed:
//! the agent's final response is saved to `/workspace/answer.txt`.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use super::{checker, pick, sq, word};
use crate::model::{Environment, FileSpec, Solution, Task};
use crate::verify::{AnswerMatchSpec, MatchMode, VerifierSpec};

const ANSWER: &str = "/workspace/answer.txt";
const NOTE: &str = "Your final response is saved to /workspace/answer.txt and checked there.";

/// The oracle either writes `answer` (texts a model has to compose) or, where a shell pipeline
/// computes it from numbers and words in the question, runs `compute` with its output going to
/// the answer file: a demonstration a model can learn by copying from the question, as an agent
/// with a shell would solve it.
fn task(
    instruction: String,
    verifier: VerifierSpec,
    answer: String,
    compute: Option<String>,
) -> Task {
    let oracle = match compute {
        Some(cmd) => Solution {
            script: Some(format!("{cmd} > {ANSWER}")),
            ..Solution::default()
        },
        None => Solution {
            files: vec![FileSpec::text(ANSWER, answer)],
            ..Solution::default()
        },
    };
    let mut t = Task {
        id: String::new(),
        domain: "general".into(),
        instruction: format!("{instruction}\n\n{NOTE}"),
        environment: Environment::default(),
        verifier,
        oracle: Some(oracle),
        grade_mode: None,
        metadata: Default::default(),
    };
    t.metadata.insert("answer_path".into(), json!(ANSWER));
    t
}

fn answer_match(expected: String, mode: MatchMode) -> VerifierSpec {
    VerifierSpec::AnswerMatch(AnswerMatchSpec {
        path: ANSWER.into(),
        expected,
        alternatives: Vec::new(),
        mode,
        tolerance: Some(1e-6),
    })
}

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let d = difficulty as usize;
    match rng.gen_range(0..5) {
        0 | 1 => constrained_text(rng, d),
        2 => arithmetic(rng, d),
        3 => sort_numbers(rng, d),
        _ => count_letters(rng, d),
    }
}

/// The drawn constraints of a constrained-text task.
struct TextRules {
    topic: &'static str,
    /// Number of lines.
    n: usize,
    keywords: Vec<String>,
    /// 0 none, 1 lower, 2 upper.
    case: i32,
    /// Every body line starts with this.
    prefix: Option<String>,
    first_word: Option<String>,
    last: Option<String>,
    forbid_comma: bool,
    max_len: i32,
}

impl TextRules {
    /// `s` in the required case.
    fn apply_case(&self, s: &str) -> String {
        match self.case {
            1 => s.to_lowercase(),
            2 => s.to_uppercase(),
            _ => s.to_string(),
        }
    }

    /// Lines before the fixed last line, if any.
    fn body_lines(&self) -> usize {
        if self.last.is_some() {
            self.n - 1
        } else {
            self.n
        }
    }
}

fn constrained_text(rng: &mut StdRng, d: usize) -> Task {
    let rules = text_rules(rng, d);
    let (reqs, spec) = text_requirements(&rules);
    task(
        format!(
            "Follow every instruction below.\n\n{}",
            reqs.iter()
                .map(|r| format!("- {r}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        checker(json!([spec])),
        text_answer(&rules),
        None,
    )
}

/// Draw the constraints; harder levels add a fixed last line and a comma ban.
fn text_rules(rng: &mut StdRng, d: usize) -> TextRules {
    let topic = *pick(
        rng,
        &[
            "tea",
            "rivers",
            "bicycles",
            "libraries",
            "winter",
            "bees",
            "maps",
            "bridges",
            "gardens",
            "clocks",
        ],
    );
    let n = rng.gen_range(3..=3 + d);
    let keywords: Vec<String> = (0..1 + d / 2).map(|_| word(rng, 2)).collect();
    let case = rng.gen_range(0..3);
    let use_prefix = rng.gen_bool(0.6);
    let prefix = pick(rng, &["- ", "* ", "> "]).to_string();
    let first_word = (!use_prefix)
        .then(|| pick(rng, &["Today", "Often", "Honestly", "First", "Imagine"]).to_string());
    let last = (d >= 2 && rng.gen_bool(0.6)).then(|| format!("END-{}", word(rng, 1)));
    let forbid_comma = d >= 3 && rng.gen_bool(0.5);
    let max_len = 70 + rng.gen_range(0..30);
    TextRules {
        topic,
        n,
        keywords,
        case,
        prefix: use_prefix.then_some(prefix),
        first_word,
        last,
        forbid_comma,
        max_len,
    }
}

/// The requirements as stated to the agent, and the checker spec that verifies them.
fn text_requirements(r: &TextRules) -> (Vec<String>, serde_json::Value) {
    let (n, max_len) = (r.n, r.max_len);
    let mut reqs = vec![format!("Write exactly {n} lines about {}.", r.topic)];
    let mut spec = json!({"t": "text", "path": ANSWER, "line_count": n, "max_line_len": max_len});
    if let Some(prefix) = &r.prefix {
        reqs.push(format!(
            "{} start with `{prefix}`.",
            if r.last.is_some() {
                "Every line except the last must"
            } else {
                "Every line must"
            }
        ));
        spec["prefix"] = json!(r.apply_case(prefix));
        spec["prefix_lines"] = json!(r.body_lines());
    }
    if let Some(w) = &r.first_word {
        let w = r.apply_case(w);
        reqs.push(format!("The response must begin with the word `{w}`."));
        spec["first_word"] = json!(w);
    }
    reqs.push(format!(
        "Mention each of these words at least once: {}.",
        r.keywords
            .iter()
            .map(|k| format!("`{}`", r.apply_case(k)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    spec["contains"] = json!(
        r.keywords
            .iter()
            .map(|k| r.apply_case(k))
            .collect::<Vec<_>>()
    );
    match r.case {
        1 => {
            reqs.push("Use only lowercase letters.".into());
            spec["lowercase"] = json!(true);
        }
        2 => {
            reqs.push("Use only uppercase letters.".into());
            spec["uppercase"] = json!(true);
        }
        _ => {}
    }
    reqs.push(format!("No line may be longer than {max_len} characters."));
    if let Some(l) = &r.last {
        let l = r.apply_case(l);
        reqs.push(format!("The last line must be exactly `{l}`."));
        spec["last_line"] = json!(l);
    }
    if r.forbid_comma {
        reqs.push("Do not use any commas.".into());
        spec["forbid"] = json!([","]);
    }
    (reqs, spec)
}

/// A text meeting every rule (the oracle's answer).
fn text_answer(r: &TextRules) -> String {
    let body_lines = r.body_lines();
    let keywords = &r.keywords;
    let mut lines = Vec::new();
    for i in 0..body_lines {
        let kw = keywords
            .get(i)
            .cloned()
            .unwrap_or_else(|| keywords.join(" and "));
        let mut l = String::new();
        if let Some(prefix) = &r.prefix {
            l.push_str(prefix);
        }
        if i == 0
            && let Some(w) = &r.first_word
        {
            l.push_str(w);
            l.push(' ');
        }
        l.push_str(&format!("{} note {} mentions {kw}", r.topic, i + 1));
        lines.push(r.apply_case(&l));
    }
    // Keywords beyond the body lines go on the first line (bounded length).
    if keywords.len() > body_lines {
        let extra = keywords[body_lines..].join(" ");
        if let Some(first) = lines.first_mut() {
            first.push(' ');
            first.push_str(&r.apply_case(&extra));
        }
    }
    if let Some(l) = &r.last {
        lines.push(r.apply_case(l));
    }
    lines.join("\n") + "\n"
}

fn arithmetic(rng: &mut StdRng, d: usize) -> Task {
    let who = super::name(rng);
    let item = pick(rng, &["rolls", "lamps", "books", "jars", "kites", "cups"]);
    let trays = rng.gen_range(2..=6 + d);
    let per = rng.gen_range(3..=12);
    let sold = rng.gen_range(1..trays * per);
    let mut q = format!("{who} makes {trays} boxes of {per} {item} each and sells {sold} of them.");
    let mut ans = (trays * per - sold) as i64;
    let mut expr = format!("{trays} * {per} - {sold}");
    if d >= 2 {
        let broken = rng.gen_range(0..=ans.min(5));
        q.push_str(&format!(" Then {broken} of the remaining {item} break."));
        ans -= broken;
        expr = format!("{expr} - {broken}");
    }
    if d >= 3 {
        let price = rng.gen_range(2..=15);
        q.push_str(&format!(
            " The rest are sold at {price} coins each. How many coins does {who} receive for them?"
        ));
        ans *= price;
        expr = format!("({expr}) * {price}");
        if d >= 5 {
            let fee = rng.gen_range(1..=9);
            q.push_str(&format!(
                " (A market fee of {fee} coins is then paid; give the amount left after the fee.)"
            ));
            ans -= fee;
            expr = format!("{expr} - {fee}");
        }
    } else {
        q.push_str(&format!(" How many {item} are left?"));
    }
    task(
        format!("{q}\n\nAnswer with just the number."),
        answer_match(ans.to_string(), MatchMode::Numeric),
        format!("{ans}\n"),
        Some(format!("echo $(( {expr} ))")),
    )
}

fn sort_numbers(rng: &mut StdRng, d: usize) -> Task {
    let n = 4 + 2 * d;
    let xs: Vec<i64> = (0..n).map(|_| rng.gen_range(-50..200)).collect();
    let desc = d >= 3 && rng.gen_bool(0.5);
    let mut s = xs.clone();
    s.sort();
    if desc {
        s.reverse();
    }
    let shown = xs
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let want = s
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    task(
        format!(
            "Sort these numbers in {} order and answer with them separated by single spaces, nothing else: {shown}",
            if desc { "descending" } else { "ascending" }
        ),
        answer_match(want.clone(), MatchMode::Exact),
        format!("{want}\n"),
        Some(format!(
            "printf '%s\\n' {} | sort -n{} | paste -sd ' '",
            xs.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            if desc { "r" } else { "" }
        )),
    )
}

fn count_letters(rng: &mut StdRng, d: usize) -> Task {
    let words: Vec<String> = (0..2 + d).map(|_| word(rng, 3)).collect();
    let text = words.join(" ");
    let letters: Vec<char> = text.chars().filter(|c| c.is_ascii_lowercase()).collect();
    let letter = letters[rng.gen_range(0..letters.len())];
    let n = text.chars().filter(|c| *c == letter).count();
    task(
        format!(
            "How many times does the letter `{letter}` occur in the text `{text}`? Answer with just the number."
        ),
        answer_match(n.to_string(), MatchMode::Numeric),
        format!("{n}\n"),
        Some(format!(
            "printf '%s' {} | tr -cd {letter} | wc -c",
            sq(&text)
        )),
    )
}
