//! Answer matching: exact, normalized, regex, numeric tolerance.

use serde_json::json;

use super::{AnswerMatchSpec, MatchMode, VerifierResult};

/// SQuAD-style normalization: lowercase, punctuation removed, articles
/// (`a`, `an`, `the`) dropped, whitespace collapsed.
pub fn normalize(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else if c == '-' || c == '/' {
                ' '
            } else {
                '\u{0}'
            }
        })
        .filter(|c| *c != '\u{0}')
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A number in an answer: the whole trimmed text (commas, `$`, `%` ignored),
/// else the last number in it.
pub fn parse_number(s: &str) -> Option<f64> {
    let cleaned: String = s
        .trim()
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | '%' | '_'))
        .collect();
    if let Ok(x) = cleaned.trim().parse::<f64>() {
        return x.is_finite().then_some(x);
    }
    let re = regex::Regex::new(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?").ok()?;
    re.find_iter(&cleaned)
        .last()
        .and_then(|m| m.as_str().parse::<f64>().ok())
        .filter(|x| x.is_finite())
}

/// Whether `answer` matches `expected` under `mode`.
pub fn matches(
    mode: MatchMode,
    expected: &str,
    answer: &str,
    tolerance: f64,
) -> Result<bool, String> {
    Ok(match mode {
        MatchMode::Exact => answer.trim() == expected.trim(),
        MatchMode::Normalized => normalize(answer) == normalize(expected),
        MatchMode::Regex => {
            let re = regex::Regex::new(&format!("^(?:{expected})$"))
                .map_err(|e| format!("invalid regex {expected:?}: {e}"))?;
            re.is_match(answer.trim())
        }
        MatchMode::Numeric => {
            let want = parse_number(expected)
                .ok_or_else(|| format!("expected value {expected:?} is not a number"))?;
            match parse_number(answer) {
                Some(got) => (got - want).abs() <= tolerance.max(tolerance * want.abs()),
                None => false,
            }
        }
    })
}

/// Grade an answer text.
pub fn grade_answer(spec: &AnswerMatchSpec, answer: &str) -> VerifierResult {
    let tol = spec.tolerance.unwrap_or(1e-6).abs();
    let mut ok = false;
    for exp in std::iter::once(&spec.expected).chain(spec.alternatives.iter()) {
        match matches(spec.mode, exp, answer, tol) {
            Ok(true) => {
                ok = true;
                break;
            }
            Ok(false) => {}
            // A broken expected value is the task's fault, not the agent's.
            Err(e) => return VerifierResult::infra(format!("answer_match: {e}")),
        }
    }
    let shown: String = answer.chars().take(500).collect();
    VerifierResult::score(ok, json!({ "answer": shown, "mode": spec.mode }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let m = |mode, e, a| matches(mode, e, a, 1e-3).unwrap_or(false);
        assert!(m(MatchMode::Exact, "Paris", " Paris\n"));
        assert!(!m(MatchMode::Exact, "Paris", "paris"));
        assert!(m(
            MatchMode::Normalized,
            "The Eiffel Tower",
            "eiffel tower!"
        ));
        assert!(!m(MatchMode::Normalized, "Eiffel Tower", "eiffel"));
        assert!(m(MatchMode::Regex, r"\d{4}", "1742\n"));
        assert!(!m(MatchMode::Regex, r"\d{4}", "year 1742"));
        assert!(m(MatchMode::Numeric, "3.14159", "3.1416"));
        assert!(m(MatchMode::Numeric, "1000", "The answer is 1,000."));
        assert!(!m(MatchMode::Numeric, "2", "3"));
        assert!(matches(MatchMode::Regex, "(", "x", 0.0).is_err());
    }
}
