//! `terminal`: file and text work with shell tools on generated data,
//! checked by a script uploaded after the agent has finished.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use super::{checker, name, pick, word};
use crate::model::{Environment, FileSpec, Solution, Task};

fn users(rng: &mut StdRng, n: usize) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    while v.len() < n {
        let u = word(rng, 2);
        if !v.contains(&u) {
            v.push(u);
        }
    }
    v
}

fn sorted_unique(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

fn task(
    instruction: String,
    files: Vec<FileSpec>,
    script: String,
    checks: serde_json::Value,
) -> Task {
    Task {
        id: String::new(),
        domain: "terminal".into(),
        instruction,
        environment: Environment {
            files,
            ..Environment::default()
        },
        verifier: checker(checks),
        oracle: Some(Solution {
            script: Some(script),
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: Default::default(),
    }
}

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let d = difficulty as usize;
    let rows = 10 + 15 * d + rng.gen_range(0..10);
    match rng.gen_range(0..7) {
        0 => access_log(rng, d, rows),
        1 => csv_users(rng, d, rows),
        2 => csv_sum(rng, d, rows),
        3 => rename(rng, d),
        4 => replace(rng, d),
        5 => top_words(rng, d),
        _ => merge_parts(rng, d),
    }
}

fn access_log(rng: &mut StdRng, d: usize, rows: usize) -> Task {
    let us = users(rng, 3 + d);
    let statuses = [200, 201, 301, 404, 500, 503];
    let paths = [
        "/",
        "/login",
        "/api/items",
        "/static/app.js",
        "/health",
        "/search",
    ];
    let mut lines = Vec::new();
    let mut recs = Vec::new();
    for i in 0..rows {
        let u = pick(rng, &us).clone();
        let s = *pick(rng, &statuses);
        let p = *pick(rng, &paths);
        let b = rng.gen_range(100..9000);
        lines.push(format!(
            "2026-03-{:02}T{:02}:{:02}:{:02} user={u} method=GET path={p} status={s} bytes={b}",
            1 + i % 28,
            rng.gen_range(0..24),
            rng.gen_range(0..60),
            rng.gen_range(0..60)
        ));
        recs.push((u, s));
    }
    let target = recs[rng.gen_range(0..recs.len())].1;
    let file = FileSpec::text("data/access.log", lines.join("\n") + "\n");
    if d >= 3 {
        let n = sorted_unique(
            recs.iter()
                .filter(|r| r.1 == target)
                .map(|r| r.0.clone())
                .collect(),
        )
        .len();
        task(
            format!(
                "/workspace/data/access.log is a web server log. How many distinct users made at least one \
                 request that got status {target}? Write just the number to /workspace/answer.txt."
            ),
            vec![file],
            format!(
                "grep ' status={target} ' data/access.log | sed 's/.* user=\\([^ ]*\\) .*/\\1/' | LC_ALL=C sort -u | wc -l > /workspace/answer.txt"
            ),
            json!([{"t": "number", "path": "/workspace/answer.txt", "value": n}]),
        )
    } else {
        let n = recs.iter().filter(|r| r.1 == target).count();
        task(
            format!(
                "/workspace/data/access.log is a web server log. Count the requests that got status {target} \
                 and write just the number to /workspace/answer.txt."
            ),
            vec![file],
            format!("grep -c ' status={target} ' data/access.log > /workspace/answer.txt"),
            json!([{"t": "number", "path": "/workspace/answer.txt", "value": n}]),
        )
    }
}

fn csv_rows(
    rng: &mut StdRng,
    d: usize,
    rows: usize,
) -> (String, Vec<(String, String, i64)>, Vec<String>) {
    let us = users(rng, 4 + 2 * d);
    let regions: Vec<String> = (0..3 + d % 3).map(|_| word(rng, 2)).collect();
    let mut text = String::from("id,user,region,amount\n");
    let mut recs = Vec::new();
    for i in 0..rows {
        let u = pick(rng, &us).clone();
        let r = pick(rng, &regions).clone();
        let a = rng.gen_range(1..500);
        text.push_str(&format!("{},{u},{r},{a}\n", 1000 + i));
        recs.push((u, r, a));
    }
    (text, recs, regions)
}

fn csv_users(rng: &mut StdRng, d: usize, rows: usize) -> Task {
    let (text, recs, _) = csv_rows(rng, d, rows);
    let file = FileSpec::text("data/events.csv", text);
    if d >= 3 {
        let region = recs[rng.gen_range(0..recs.len())].1.clone();
        let want = sorted_unique(
            recs.iter()
                .filter(|r| r.1 == region)
                .map(|r| r.0.clone())
                .collect(),
        );
        task(
            format!(
                "/workspace/data/events.csv has columns id,user,region,amount. Write the distinct users that \
                 appear in region `{region}`, sorted alphabetically (byte order), one per line, to /workspace/users.txt."
            ),
            vec![file],
            format!(
                "awk -F, -v r={region} 'NR>1 && $3==r {{print $2}}' data/events.csv | LC_ALL=C sort -u > /workspace/users.txt"
            ),
            json!([{"t": "lines", "path": "/workspace/users.txt", "lines": want}]),
        )
    } else {
        let want = sorted_unique(recs.iter().map(|r| r.0.clone()).collect());
        task(
            "/workspace/data/events.csv has columns id,user,region,amount. Write the distinct users, sorted \
             alphabetically (byte order), one per line, to /workspace/users.txt."
                .into(),
            vec![file],
            "tail -n +2 data/events.csv | cut -d, -f2 | LC_ALL=C sort -u > /workspace/users.txt".into(),
            json!([{"t": "lines", "path": "/workspace/users.txt", "lines": want}]),
        )
    }
}

fn csv_sum(rng: &mut StdRng, d: usize, rows: usize) -> Task {
    let (text, recs, _) = csv_rows(rng, d, rows);
    let region = recs[rng.gen_range(0..recs.len())].1.clone();
    let file = FileSpec::text("data/sales.csv", text);
    if d >= 4 {
        // Per-user totals in the region, largest first (ties by name).
        let mut totals: std::collections::BTreeMap<String, i64> = Default::default();
        for r in recs.iter().filter(|r| r.1 == region) {
            *totals.entry(r.0.clone()).or_default() += r.2;
        }
        let mut v: Vec<(String, i64)> = totals.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let lines: Vec<String> = v.iter().map(|(u, t)| format!("{u} {t}")).collect();
        task(
            format!(
                "/workspace/data/sales.csv has columns id,user,region,amount. For region `{region}`, write one \
                 line per user, `USER TOTAL` (the sum of that user's amounts), largest total first, ties in \
                 alphabetical order, to /workspace/totals.txt."
            ),
            vec![file],
            format!(
                "awk -F, -v r={region} 'NR>1 && $3==r {{s[$2]+=$4}} END {{for (u in s) print u, s[u]}}' data/sales.csv \
                 | LC_ALL=C sort -k2,2nr -k1,1 > /workspace/totals.txt"
            ),
            json!([{"t": "lines", "path": "/workspace/totals.txt", "lines": lines}]),
        )
    } else {
        let sum: i64 = recs.iter().filter(|r| r.1 == region).map(|r| r.2).sum();
        task(
            format!(
                "/workspace/data/sales.csv has columns id,user,region,amount. Compute the total amount of the \
                 rows whose region is `{region}` and write just the number to /workspace/answer.txt."
            ),
            vec![file],
            format!(
                "awk -F, -v r={region} 'NR>1 && $3==r {{s+=$4}} END {{print s+0}}' data/sales.csv > /workspace/answer.txt"
            ),
            json!([{"t": "number", "path": "/workspace/answer.txt", "value": sum}]),
        )
    }
}

fn rename(rng: &mut StdRng, d: usize) -> Task {
    let n = 2 + d + rng.gen_range(0..3);
    let mut files = Vec::new();
    let mut checks = Vec::new();
    let mut used = Vec::new();
    for i in 0..n {
        let mut base = word(rng, 2);
        if d >= 3 && i % 2 == 0 {
            base = format!("{base} notes {i}");
        }
        if used.contains(&base) {
            continue;
        }
        used.push(base.clone());
        let dir = if d >= 4 && i % 3 == 1 {
            format!("notes/{}", word(rng, 1))
        } else {
            "notes".to_string()
        };
        let content = format!("{} {}\n", name(rng), rng.gen_range(0..100000));
        files.push(FileSpec::text(format!("{dir}/{base}.txt"), content.clone()));
        checks.push(json!({"t": "absent", "path": format!("/workspace/{dir}/{base}.txt")}));
        checks.push(json!({"t": "contains", "path": format!("/workspace/{dir}/{base}.md"), "needle": content.trim()}));
    }
    // A file that must not be touched.
    let keep = format!("notes/{}.log", word(rng, 2));
    files.push(FileSpec::text(keep.clone(), "keep me\n"));
    checks.push(json!({"t": "exists", "path": format!("/workspace/{keep}")}));
    let (where_, script) = if d >= 4 {
        (
            "anywhere under /workspace/notes (including subdirectories)",
            "find notes -type f -name '*.txt' | while IFS= read -r f; do mv \"$f\" \"${f%.txt}.md\"; done",
        )
    } else {
        (
            "in /workspace/notes",
            "cd notes && for f in *.txt; do mv \"$f\" \"${f%.txt}.md\"; done",
        )
    };
    task(
        format!(
            "Rename every `.txt` file {where_} to the same name with the extension `.md`. Leave other files alone."
        ),
        files,
        script.into(),
        json!(checks),
    )
}

fn replace(rng: &mut StdRng, d: usize) -> Task {
    let old = format!("{}.internal", word(rng, 2));
    let new = format!("{}.example.net", word(rng, 2));
    let n = 2 + d;
    let mut files = Vec::new();
    let mut checks = Vec::new();
    for _ in 0..n {
        let f = format!("conf/{}.cfg", word(rng, 2));
        if files.iter().any(|x: &FileSpec| x.path == f) {
            continue;
        }
        let port = rng.gen_range(1000..9999);
        let text = format!(
            "# {f}\nhost={old}\nport={port}\nbackup_host={old}\nname={}\n",
            word(rng, 2)
        );
        let want = text.replace(&format!("host={old}"), &format!("host={new}"));
        checks.push(json!({"t": "lines", "path": format!("/workspace/{f}"), "lines": want.lines().collect::<Vec<_>>()}));
        files.push(FileSpec::text(f, text));
    }
    let bak = format!("conf/{}.cfg.bak", word(rng, 2));
    files.push(FileSpec::text(bak.clone(), format!("host={old}\n")));
    checks.push(json!({"t": "contains", "path": format!("/workspace/{bak}"), "needle": format!("host={old}")}));
    task(
        format!(
            "In every file ending in `.cfg` in /workspace/conf, replace each occurrence of `host={old}` with \
             `host={new}`. Do not modify any other file."
        ),
        files,
        format!(
            "sed -i 's/host={}/host={}/g' conf/*.cfg",
            old.replace('.', "\\."),
            new
        ),
        json!(checks),
    )
}

fn top_words(rng: &mut StdRng, d: usize) -> Task {
    let m = 5 + 2 * d;
    let k = 2 + d.min(4);
    let mut vocab: Vec<String> = Vec::new();
    while vocab.len() < m {
        let w = word(rng, 2);
        if !vocab.contains(&w) {
            vocab.push(w);
        }
    }
    // Distinct counts so the ranking has no ties.
    let mut counts: Vec<usize> = (1..=m).map(|i| i * 2 + rng.gen_range(0..2)).collect();
    for i in (1..counts.len()).rev() {
        let j = rng.gen_range(0..=i);
        counts.swap(i, j);
    }
    let mut words: Vec<&String> = Vec::new();
    for (w, c) in vocab.iter().zip(&counts) {
        for _ in 0..*c {
            words.push(w);
        }
    }
    for i in (1..words.len()).rev() {
        let j = rng.gen_range(0..=i);
        words.swap(i, j);
    }
    let text: String = words
        .chunks(9)
        .map(|c| c.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let mut ranked: Vec<(usize, &String)> = counts.iter().copied().zip(&vocab).collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
    let want: Vec<String> = ranked.iter().take(k).map(|(_, w)| (*w).clone()).collect();
    task(
        format!(
            "Find the {k} most frequent words in /workspace/data/text.txt (words are separated by spaces and \
             newlines). Write them to /workspace/top.txt, one per line, most frequent first."
        ),
        vec![FileSpec::text("data/text.txt", text)],
        format!(
            "tr ' ' '\\n' < data/text.txt | grep -v '^$' | LC_ALL=C sort | uniq -c | sort -k1,1nr | head -n {k} | awk '{{print $2}}' > /workspace/top.txt"
        ),
        json!([{"t": "lines", "path": "/workspace/top.txt", "lines": want}]),
    )
}

fn merge_parts(rng: &mut StdRng, d: usize) -> Task {
    let n = 3 + 2 * d + rng.gen_range(0..4);
    let mut files = Vec::new();
    let mut all = Vec::new();
    let prefix = word(rng, 1);
    for i in 1..=n {
        let lines: Vec<String> = (0..rng.gen_range(1..4))
            .map(|_| format!("{} {}", name(rng), rng.gen_range(0..1000)))
            .collect();
        all.extend(lines.clone());
        files.push(FileSpec::text(
            format!("data/parts/{prefix}-{i}.txt"),
            lines.join("\n") + "\n",
        ));
    }
    for i in (1..files.len()).rev() {
        let j = rng.gen_range(0..=i);
        files.swap(i, j);
    }
    task(
        format!(
            "/workspace/data/parts holds files `{prefix}-1.txt` to `{prefix}-{n}.txt`. Concatenate them in \
             numeric order (1, 2, ..., {n}) into /workspace/merged.txt."
        ),
        files,
        format!(
            "for i in $(seq 1 {n}); do cat data/parts/{prefix}-$i.txt; done > /workspace/merged.txt"
        ),
        json!([{"t": "lines", "path": "/workspace/merged.txt", "lines": all}]),
    )
}
