//! `webcoding`: write an HTML page meeting stated structural constraints,
//! checked by parsing the page (Python's `html.parser`) after the agent.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::{checker, name, pick, word};
use crate::model::{Environment, FileSpec, Solution, Task};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The page being specified: the stated requirements, the checks that
/// verify them, and the oracle's markup that meets them.
struct Page {
    site: String,
    reqs: Vec<String>,
    checks: Vec<Value>,
    head: String,
    body: String,
    lang_attr: String,
}

/// One kind of structural constraint, added to the page.
type Part = fn(&mut StdRng, usize, &mut Page);

/// The constraint kinds; a task uses `1 + difficulty` of them, in random order.
const PARTS: [Part; 7] = [list, table, link, form, class_count, images, lang];

pub(super) fn generate(rng: &mut StdRng, difficulty: u32) -> Task {
    let d = difficulty as usize;
    let site = name(rng);
    let file = pick(
        rng,
        &[
            "index.html",
            "page.html",
            "site/index.html",
            "public/home.html",
        ],
    )
    .to_string();
    let path = format!("/workspace/{file}");
    let mut page = Page {
        site,
        reqs: Vec::new(),
        checks: Vec::new(),
        head: String::from("<meta charset=\"utf-8\">\n"),
        body: String::new(),
        lang_attr: String::new(),
    };
    title_and_heading(rng, &mut page);
    let mut kinds: Vec<usize> = (0..PARTS.len()).collect();
    for i in (1..kinds.len()).rev() {
        let j = rng.gen_range(0..=i);
        kinds.swap(i, j);
    }
    for &k in kinds.iter().take(1 + d) {
        PARTS[k](rng, d, &mut page);
    }
    let Page {
        site,
        reqs,
        checks,
        head,
        body,
        lang_attr,
    } = page;
    let html = format!(
        "<!DOCTYPE html>\n<html{lang_attr}>\n<head>\n{head}</head>\n<body>\n{body}</body>\n</html>\n"
    );
    let instruction = format!(
        "Write an HTML page at {path} for the site \"{site}\". It must satisfy all of these constraints:\n\n{}\n\n\
         The page is checked by parsing its HTML.",
        reqs.iter()
            .map(|r| format!("- {r}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Task {
        id: String::new(),
        domain: "webcoding".into(),
        instruction,
        environment: Environment::default(),
        verifier: checker(json!([{"t": "html", "path": path, "checks": checks}])),
        oracle: Some(Solution {
            files: vec![FileSpec::text(path, html)],
            ..Solution::default()
        }),
        grade_mode: None,
        metadata: Default::default(),
    }
}

/// Always present: an exact title and one `<h1>`.
fn title_and_heading(rng: &mut StdRng, page: &mut Page) {
    let site = &page.site;
    let title = format!(
        "{site} {}",
        pick(
            rng,
            &["Home", "Catalog", "Dashboard", "Notes", "Gallery", "Shop"]
        )
    );
    page.reqs
        .push(format!("The page title (`<title>`) is exactly `{title}`."));
    page.checks.push(json!({"k": "title", "text": title}));
    page.head
        .push_str(&format!("<title>{}</title>\n", esc(&title)));
    let h1 = format!("Welcome to {site}");
    page.reqs
        .push(format!("There is exactly one `<h1>`, reading `{h1}`."));
    page.checks
        .push(json!({"k": "heading", "tag": "h1", "text": h1}));
    page.body.push_str(&format!("<h1>{}</h1>\n", esc(&h1)));
}

/// A `<ul>`/`<ol>` with given items in order.
fn list(rng: &mut StdRng, d: usize, page: &mut Page) {
    let id = format!("{}-list", word(rng, 1));
    let tag = if rng.gen_bool(0.5) { "ul" } else { "ol" };
    let items: Vec<String> = (0..rng.gen_range(2..=3 + d))
        .map(|_| word(rng, 2))
        .collect();
    page.reqs.push(format!(
        "A `<{tag}>` with id `{id}` whose direct `<li>` items are, in order: {}.",
        items
            .iter()
            .map(|i| format!("`{i}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    page.checks
        .push(json!({"k": "list", "tag": tag, "id": id, "items": items}));
    let body = &mut page.body;
    body.push_str(&format!("<{tag} id=\"{id}\">\n"));
    for i in &items {
        body.push_str(&format!("  <li>{i}</li>\n"));
    }
    body.push_str(&format!("</{tag}>\n"));
}

/// A table with a header row and a number of data rows.
fn table(rng: &mut StdRng, d: usize, page: &mut Page) {
    let id = format!("{}-table", word(rng, 1));
    let cols = rng.gen_range(2..=2 + d.min(3));
    let rows = rng.gen_range(2..=2 + d);
    let header: Vec<String> = (0..cols).map(|_| word(rng, 1)).collect();
    page.reqs.push(format!(
        "A `<table>` with id `{id}` of {} rows (`<tr>`) of {cols} cells each; the first row holds \
         header cells (`<th>`) {}, the other {rows} rows hold `<td>` cells.",
        rows + 1,
        header
            .iter()
            .map(|h| format!("`{h}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    page.checks
        .push(json!({"k": "table", "id": id, "rows": rows + 1, "cols": cols, "header": header}));
    let body = &mut page.body;
    body.push_str(&format!("<table id=\"{id}\">\n  <tr>"));
    for h in &header {
        body.push_str(&format!("<th>{h}</th>"));
    }
    body.push_str("</tr>\n");
    for r in 0..rows {
        body.push_str("  <tr>");
        for c in 0..cols {
            body.push_str(&format!("<td>{}</td>", r * cols + c));
        }
        body.push_str("</tr>\n");
    }
    body.push_str("</table>\n");
}

/// A link with a given target and text.
fn link(rng: &mut StdRng, _d: usize, page: &mut Page) {
    let href = format!("https://{}.example.org/{}", word(rng, 2), word(rng, 1));
    let text = format!(
        "{} {}",
        pick(rng, &["Read", "See", "Visit", "Open"]),
        word(rng, 2)
    );
    page.reqs
        .push(format!("A link to `{href}` whose text is `{text}`."));
    page.checks
        .push(json!({"k": "link", "href": href, "text": text}));
    page.body
        .push_str(&format!("<p><a href=\"{href}\">{text}</a></p>\n"));
}

/// A form with an action and named, typed inputs.
fn form(rng: &mut StdRng, d: usize, page: &mut Page) {
    let id = format!("{}-form", word(rng, 1));
    let action = format!("/{}", word(rng, 2));
    let types = ["text", "email", "number", "password", "checkbox"];
    let mut inputs: Vec<(String, String)> = Vec::new();
    for _ in 0..rng.gen_range(1..=1 + d.min(3)) {
        let n = word(rng, 1);
        if !inputs.iter().any(|i| i.0 == n) {
            inputs.push((n, pick(rng, &types).to_string()));
        }
    }
    page.reqs.push(format!(
        "A `<form>` with id `{id}` and action `{action}` containing inputs {}.",
        inputs
            .iter()
            .map(|(n, t)| format!("`name={n}` of `type={t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    page.checks
        .push(json!({"k": "form", "id": id, "action": action, "inputs": inputs}));
    let body = &mut page.body;
    body.push_str(&format!("<form id=\"{id}\" action=\"{action}\">\n"));
    for (n, t) in &inputs {
        body.push_str(&format!("  <input name=\"{n}\" type=\"{t}\">\n"));
    }
    body.push_str("</form>\n");
}

/// An exact number of elements of one tag with one class.
fn class_count(rng: &mut StdRng, d: usize, page: &mut Page) {
    let cls = word(rng, 2);
    let n = rng.gen_range(2..=3 + d);
    let tag = pick(rng, &["div", "section", "article", "span"]).to_string();
    page.reqs.push(format!(
        "Exactly {n} `<{tag}>` elements with class `{cls}` (each may hold any text)."
    ));
    page.checks
        .push(json!({"k": "class_count", "tag": tag, "cls": cls, "n": n}));
    for i in 0..n {
        page.body
            .push_str(&format!("<{tag} class=\"{cls}\">item {i}</{tag}>\n"));
    }
}

/// An exact number of images, each with alt text.
fn images(rng: &mut StdRng, d: usize, page: &mut Page) {
    let n = rng.gen_range(1..=2 + d / 2);
    page.reqs.push(format!(
        "Exactly {n} `<img>` elements, each with a non-empty `alt` text."
    ));
    page.checks.push(json!({"k": "img_alt", "n": n}));
    for i in 0..n {
        page.body.push_str(&format!(
            "<img src=\"img/{i}.png\" alt=\"picture {i} of {}\">\n",
            page.site
        ));
    }
}

/// A `lang` attribute on `<html>`, and no scripts.
fn lang(rng: &mut StdRng, _d: usize, page: &mut Page) {
    let lang = pick(rng, &["en", "fr", "de", "es", "it", "nl"]).to_string();
    page.reqs.push(format!(
        "The `<html>` element has `lang=\"{lang}\"`, and the page uses no `<script>` elements."
    ));
    page.checks.push(json!({"k": "lang", "lang": lang}));
    page.checks.push(json!({"k": "no_tag", "tag": "script"}));
    page.lang_attr = format!(" lang=\"{lang}\"");
}
