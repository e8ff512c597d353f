//! The word-level grammar Dockerfiles share across instructions: `KEY=value`
//! lists (ENV, ARG, LABEL), quoting, and `$VAR` / `${VAR}` /
//! `${VAR:-default}` / `${VAR:+alt}` expansion against the build's variables.

use std::collections::BTreeMap;

/// Split `text` into words: whitespace separates, double and single quotes
/// group (and are removed), a backslash escapes the next character.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// `KEY=value KEY2="v 2"` pairs, or the legacy single-pair form `KEY value
/// with spaces` (ENV and LABEL accept it).
pub fn key_values(text: &str, allow_legacy: bool) -> Result<Vec<(String, String)>, String> {
    let trimmed = text.trim();
    let first = trimmed.split_whitespace().next().unwrap_or("");
    if allow_legacy && !first.contains('=') {
        let (key, rest) = trimmed
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("`{trimmed}` needs a value"))?;
        return Ok(vec![(key.to_string(), unquote(rest.trim())?)]);
    }
    split_words(trimmed)?
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("`{w}` is not KEY=value")),
        })
        .collect()
}

fn unquote(s: &str) -> Result<String, String> {
    let words = split_words(s)?;
    Ok(words.join(" "))
}

/// Expand `$VAR`, `${VAR}`, `${VAR:-default}` and `${VAR:+alt}`; `\$` is a
/// literal dollar. Unknown variables expand to "" (as Docker does).
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let mut body = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => body.push(ch),
                        None => return Err(format!("unterminated ${{ in `{text}`")),
                    }
                }
                out.push_str(&expand_braced(&body, vars)?);
            }
            '$' if chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') =>
            {
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        name.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn expand_braced(body: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let value = |name: &str| vars.get(name).filter(|v| !v.is_empty()).cloned();
    if let Some((name, default)) = body.split_once(":-") {
        return Ok(value(name).unwrap_or_else(|| default.to_string()));
    }
    if let Some((name, alt)) = body.split_once(":+") {
        return Ok(value(name).map(|_| alt.to_string()).unwrap_or_default());
    }
    if body.is_empty() || !body.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("unsupported variable expression ${{{body}}}"));
    }
    Ok(vars.get(body).cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [("A", "1"), ("PATH", "/bin"), ("E", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_the_forms_docker_knows() {
        let v = vars();
        assert_eq!(expand("$A-${A}", &v).unwrap(), "1-1");
        assert_eq!(expand("${PATH}:/usr/bin", &v).unwrap(), "/bin:/usr/bin");
        assert_eq!(
            expand("${E:-d} ${A:-d} ${A:+x} ${E:+x}", &v).unwrap(),
            "d 1 x "
        );
        assert_eq!(expand("\\$A $NOPE.", &v).unwrap(), "$A .");
        assert!(expand("${A", &v).is_err());
    }

    #[test]
    fn key_values_modern_and_legacy() {
        assert_eq!(
            key_values(r#"A=1 B="two words" C=x\ y"#, true).unwrap(),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x y".into())
            ]
        );
        assert_eq!(
            key_values("NAME some value", true).unwrap(),
            vec![("NAME".into(), "some value".into())]
        );
        assert!(key_values("NAME", true).is_err());
        assert!(key_values("=x", false).is_err());
    }
}
