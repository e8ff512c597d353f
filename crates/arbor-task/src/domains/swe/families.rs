//! The bug families of the `swe` domain: one function each, drawing its
//! constants from the seed and returning the correct and the buggy body with
//! cases that do and do not expose the bug.

use rand::Rng;
use rand::rngs::StdRng;

use super::{Func, cases, ints, py_list, py_str, py_str_list};
use crate::domains::{pick, word};

/// Every family; a task draws `1 + difficulty` distinct ones.
pub(super) const FAMILIES: [fn(&mut StdRng) -> Func; 10] = [
    scaled_total,
    clamp,
    count_prefixed,
    running_total,
    sum_multiples,
    dedupe,
    median,
    chunked,
    caesar,
    letter_grade,
];

/// `k·x` summed, plus a constant; the bug adds instead of multiplying.
fn scaled_total(rng: &mut StdRng) -> Func {
    let k = rng.gen_range(2..=9);
    let c = rng.gen_range(-20..=20);
    let name = pick(
        rng,
        &["scaled_total", "weighted_sum", "sum_scaled", "total_weight"],
    )
    .to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let n = r.gen_range(0..=5);
            let xs = ints(r, n, -5, 20);
            let good: i64 = xs.iter().map(|x| x * k).sum::<i64>() + c;
            let bad: i64 = xs.iter().map(|x| x + k).sum::<i64>() + c;
            (py_list(&xs), good.to_string(), bad.to_string())
        },
        3,
        1,
    );
    Func {
        name,
        params: "xs",
        doc: format!("Return the sum of every element of xs multiplied by {k}, plus {c}."),
        correct: vec![format!("    return sum(x * {k} for x in xs) + {c}")],
        buggy: vec![format!("    return sum(x + {k} for x in xs) + {c}")],
        exposing,
        agreeing,
    }
}

/// Clamping to a range; the bug uses an upper bound one too low.
fn clamp(rng: &mut StdRng) -> Func {
    let lo = rng.gen_range(-10..=10);
    let hi = lo + rng.gen_range(5..=40);
    let name = pick(rng, &["clamp", "bound", "limit_value", "clip"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let x = r.gen_range(lo - 20..=hi + 20);
            let good = x.min(hi).max(lo);
            let bad = x.min(hi - 1).max(lo);
            (x.to_string(), good.to_string(), bad.to_string())
        },
        2,
        2,
    );
    Func {
        name,
        params: "x",
        doc: format!("Return x limited to the closed range [{lo}, {hi}]."),
        correct: vec![format!("    return max({lo}, min(x, {hi}))")],
        buggy: vec![format!("    return max({lo}, min(x, {}))", hi - 1)],
        exposing,
        agreeing,
    }
}

/// Counting words with a prefix, ignoring case; the bug is case-sensitive.
fn count_prefixed(rng: &mut StdRng) -> Func {
    let p = pick(rng, &["re", "un", "pre", "de", "in", "ex", "sub", "over"]).to_string();
    let name = pick(rng, &["count_prefixed", "prefix_count", "num_with_prefix"]).to_string();
    let pool: Vec<String> = [
        "do", "play", "build", "mark", "set", "load", "turn", "write", "view", "cast",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pp = p.clone();
    let (exposing, agreeing) = cases(
        rng,
        move |r| {
            let n = r.gen_range(1..=5);
            let mut ws = Vec::new();
            for _ in 0..n {
                let stem = pick(r, &pool).clone();
                let w = match r.gen_range(0..3) {
                    0 => stem,
                    1 => format!("{pp}{stem}"),
                    _ => {
                        let mut c = pp.chars();
                        let cap = c
                            .next()
                            .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                            .unwrap_or_default();
                        format!("{cap}{stem}")
                    }
                };
                ws.push(w);
            }
            let good = ws
                .iter()
                .filter(|w| w.to_lowercase().starts_with(&pp))
                .count();
            let bad = ws.iter().filter(|w| w.starts_with(&pp)).count();
            (py_str_list(&ws), good.to_string(), bad.to_string())
        },
        3,
        1,
    );
    Func {
        name,
        params: "words",
        doc: format!("Return how many words start with '{p}', ignoring case."),
        correct: vec![format!(
            "    return sum(1 for w in words if w.lower().startswith('{p}'))"
        )],
        buggy: vec![format!(
            "    return sum(1 for w in words if w.startswith('{p}'))"
        )],
        exposing,
        agreeing,
    }
}

/// Running totals; the bug skips the first element.
fn running_total(rng: &mut StdRng) -> Func {
    let name = pick(rng, &["running_total", "prefix_sums", "cumulative"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let n = r.gen_range(0..=5);
            let xs = ints(r, n, -9, 30);
            let mut t = 0;
            let good: Vec<i64> = xs
                .iter()
                .map(|x| {
                    t += x;
                    t
                })
                .collect();
            let mut t2 = 0;
            let bad: Vec<i64> = xs
                .iter()
                .skip(1)
                .map(|x| {
                    t2 += x;
                    t2
                })
                .collect();
            (py_list(&xs), py_list(&good), py_list(&bad))
        },
        3,
        1,
    );
    Func {
        name,
        params: "xs",
        doc: "Return the list of running totals of xs.".into(),
        correct: vec![
            "    out = []".into(),
            "    total = 0".into(),
            "    for x in xs:".into(),
            "        total += x".into(),
            "        out.append(total)".into(),
            "    return out".into(),
        ],
        buggy: vec![
            "    out = []".into(),
            "    total = 0".into(),
            "    for x in xs[1:]:".into(),
            "        total += x".into(),
            "        out.append(total)".into(),
            "    return out".into(),
        ],
        exposing,
        agreeing,
    }
}

/// Summing the multiples of `a` or `b`; the bug needs both.
fn sum_multiples(rng: &mut StdRng) -> Func {
    let a = rng.gen_range(2..=7);
    let mut b = rng.gen_range(2..=9);
    if b == a {
        b += 1;
    }
    let name = pick(rng, &["sum_multiples", "multiples_total", "sum_divisible"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let limit: i64 = if r.gen_bool(0.2) {
                r.gen_range(0..=1)
            } else {
                r.gen_range(2..=60)
            };
            let good: i64 = (0..limit).filter(|n| n % a == 0 || n % b == 0).sum();
            let bad: i64 = (0..limit).filter(|n| n % a == 0 && n % b == 0).sum();
            (limit.to_string(), good.to_string(), bad.to_string())
        },
        3,
        1,
    );
    Func {
        name,
        params: "limit",
        doc: format!("Return the sum of the numbers below limit divisible by {a} or by {b}."),
        correct: vec![format!(
            "    return sum(n for n in range(limit) if n % {a} == 0 or n % {b} == 0)"
        )],
        buggy: vec![format!(
            "    return sum(n for n in range(limit) if n % {a} == 0 and n % {b} == 0)"
        )],
        exposing,
        agreeing,
    }
}

/// Distinct items in order; the bug reverses them.
fn dedupe(rng: &mut StdRng) -> Func {
    let name = pick(rng, &["dedupe", "unique_in_order", "distinct"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let n = r.gen_range(0..=6);
            let xs = ints(r, n, 1, 6);
            let mut good: Vec<i64> = Vec::new();
            for x in &xs {
                if !good.contains(x) {
                    good.push(*x);
                }
            }
            let bad: Vec<i64> = good.iter().rev().copied().collect();
            (py_list(&xs), py_list(&good), py_list(&bad))
        },
        3,
        1,
    );
    Func {
        name,
        params: "items",
        doc: "Return the distinct items in order of first appearance.".into(),
        correct: vec![
            "    seen = set()".into(),
            "    out = []".into(),
            "    for x in items:".into(),
            "        if x not in seen:".into(),
            "            seen.add(x)".into(),
            "            out.append(x)".into(),
            "    return out".into(),
        ],
        buggy: vec![
            "    seen = set()".into(),
            "    out = []".into(),
            "    for x in items:".into(),
            "        if x not in seen:".into(),
            "            seen.add(x)".into(),
            "            out.insert(0, x)".into(),
            "    return out".into(),
        ],
        exposing,
        agreeing,
    }
}

/// The median; the bug takes the upper middle value for even lengths.
fn median(rng: &mut StdRng) -> Func {
    let name = pick(rng, &["median", "middle_value", "median_of"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let n = r.gen_range(1..=6);
            let xs = ints(r, n, 0, 50);
            let mut s = xs.clone();
            s.sort();
            let mid = s.len() / 2;
            let (good, bad) = if s.len() % 2 == 1 {
                (s[mid].to_string(), s[mid].to_string())
            } else {
                let g = (s[mid - 1] + s[mid]) as f64 / 2.0;
                (format!("{g:?}"), s[mid].to_string())
            };
            let bad_cmp = if s.len().is_multiple_of(2) && (s[mid - 1] + s[mid]) == 2 * s[mid] {
                good.clone()
            } else {
                bad
            };
            (py_list(&xs), good, bad_cmp)
        },
        3,
        1,
    );
    Func {
        name,
        params: "xs",
        doc: "Return the median of a non-empty list (the mean of the two middle values for even lengths).".into(),
        correct: vec![
            "    s = sorted(xs)".into(),
            "    mid = len(s) // 2".into(),
            "    if len(s) % 2 == 1:".into(),
            "        return s[mid]".into(),
            "    return (s[mid - 1] + s[mid]) / 2".into(),
        ],
        buggy: vec![
            "    s = sorted(xs)".into(),
            "    mid = len(s) // 2".into(),
            "    if len(s) % 2 == 1:".into(),
            "        return s[mid]".into(),
            "    return s[mid]".into(),
        ],
        exposing,
        agreeing,
    }
}

/// Chunks of `k`; the bug drops a short last chunk.
fn chunked(rng: &mut StdRng) -> Func {
    let k: usize = rng.gen_range(2..=4);
    let name = pick(rng, &["chunked", "batches", "split_every"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let n = r.gen_range(0..=9);
            let xs = ints(r, n, 0, 9);
            let good: Vec<String> = xs.chunks(k).map(py_list).collect();
            let bad: Vec<String> = xs.chunks(k).filter(|c| c.len() == k).map(py_list).collect();
            (
                py_list(&xs),
                format!("[{}]", good.join(", ")),
                format!("[{}]", bad.join(", ")),
            )
        },
        3,
        1,
    );
    Func {
        name,
        params: "xs",
        doc: format!("Split xs into consecutive lists of {k} elements (the last may be shorter)."),
        correct: vec![
            "    out = []".into(),
            format!("    for i in range(0, len(xs), {k}):"),
            format!("        out.append(xs[i:i + {k}])"),
            "    return out".into(),
        ],
        buggy: vec![
            "    out = []".into(),
            format!("    for i in range(0, len(xs) - {k} + 1, {k}):"),
            format!("        out.append(xs[i:i + {k}])"),
            "    return out".into(),
        ],
        exposing,
        agreeing,
    }
}

/// A Caesar shift; the bug wraps modulo 25.
fn caesar(rng: &mut StdRng) -> Func {
    let k: u8 = rng.gen_range(1..=12);
    let name = pick(rng, &["rotate_letters", "caesar", "shift_text"]).to_string();
    let shift = |s: &str, m: u8| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_lowercase() {
                    (((c as u8 - b'a' + k) % m) + b'a') as char
                } else {
                    c
                }
            })
            .collect()
    };
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let n = r.gen_range(1..=2);
            let text: Vec<String> = (0..n).map(|_| word(r, 2)).collect();
            let text = text.join(" ");
            (
                py_str(&text),
                py_str(&shift(&text, 26)),
                py_str(&shift(&text, 25)),
            )
        },
        3,
        1,
    );
    Func {
        name,
        params: "text",
        doc: format!(
            "Shift every lowercase letter {k} places forward in the alphabet, wrapping around."
        ),
        correct: vec![
            "    out = []".into(),
            "    for ch in text:".into(),
            "        if 'a' <= ch <= 'z':".into(),
            format!("            out.append(chr((ord(ch) - 97 + {k}) % 26 + 97))"),
            "        else:".into(),
            "            out.append(ch)".into(),
            "    return ''.join(out)".into(),
        ],
        buggy: vec![
            "    out = []".into(),
            "    for ch in text:".into(),
            "        if 'a' <= ch <= 'z':".into(),
            format!("            out.append(chr((ord(ch) - 97 + {k}) % 25 + 97))"),
            "        else:".into(),
            "            out.append(ch)".into(),
            "    return ''.join(out)".into(),
        ],
        exposing,
        agreeing,
    }
}

/// Letter grades by thresholds; the bug makes the top threshold strict.
fn letter_grade(rng: &mut StdRng) -> Func {
    let t2 = rng.gen_range(30..=60);
    let t1 = t2 + rng.gen_range(10..=30);
    let name = pick(rng, &["letter_grade", "grade", "rank_score"]).to_string();
    let (exposing, agreeing) = cases(
        rng,
        |r| {
            let s = if r.gen_bool(0.4) {
                t1
            } else {
                r.gen_range(0..=100)
            };
            let g = |strict: bool| {
                if (strict && s > t1) || (!strict && s >= t1) {
                    "'A'"
                } else if s >= t2 {
                    "'B'"
                } else {
                    "'C'"
                }
            };
            (s.to_string(), g(false).to_string(), g(true).to_string())
        },
        1,
        3,
    );
    Func {
        name,
        params: "score",
        doc: format!("Return 'A' for scores of at least {t1}, 'B' for at least {t2}, else 'C'."),
        correct: vec![
            format!("    if score >= {t1}:"),
            "        return 'A'".into(),
            format!("    if score >= {t2}:"),
            "        return 'B'".into(),
            "    return 'C'".into(),
        ],
        buggy: vec![
            format!("    if score > {t1}:"),
            "        return 'A'".into(),
            format!("    if score >= {t2}:"),
            "        return 'B'".into(),
            "    return 'C'".into(),
        ],
        exposing,
        agreeing,
    }
}
