//! Bearer tokens, shared by every arbor server that takes one (`arbor node
//! serve`, `arbor serve`): read from a file or an environment variable
//! (never the command line, where `ps` would show it), and checked in
//! constant time.

use std::path::Path;

use subtle::ConstantTimeEq;

/// The token in `file`, or else in the environment variable `env`: the
/// whole text with surrounding whitespace trimmed (a trailing newline from
/// `echo` or `kubectl create secret --from-file` does not count), never empty.
/// `Ok(None)` when neither is given.
pub fn read(file: Option<&Path>, env: &str) -> Result<Option<String>, String> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("reading the token file {}: {e}", f.display()))?,
        None => match std::env::var(env) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        let from = file.map_or_else(|| format!("${env}"), |f| f.display().to_string());
        return Err(format!("the token in {from} is empty"));
    }
    Ok(Some(token))
}

/// Why an `Authorization` header value does not carry the expected token,
/// or `None` when it does. The comparison takes the same time however much
/// of a guess matches.
pub fn refusal(authorization: Option<&str>, expected: &str) -> Option<&'static str> {
    let given = authorization.and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Some("a bearer token is required (Authorization: Bearer ...)"),
        Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => None,
        Some(_) => Some("wrong bearer token"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tokens_are_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").expect("write");
        assert_eq!(
            read(Some(&f), "ARBOR_TEST_UNSET").unwrap().as_deref(),
            Some("s3cret")
        );
        std::fs::write(&f, " \n").expect("write");
        assert!(
            read(Some(&f), "ARBOR_TEST_UNSET")
                .unwrap_err()
                .contains("empty")
        );
        let missing = dir.path().join("missing");
        assert!(
            read(Some(&missing), "ARBOR_TEST_UNSET")
                .unwrap_err()
                .contains("missing")
        );
        assert_eq!(
            read(None, "ARBOR_TEST_SURELY_UNSET_VARIABLE").unwrap(),
            None
        );
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        assert_eq!(refusal(Some("Bearer abc"), "abc"), None);
        assert_eq!(
            refusal(Some("Bearer abd"), "abc"),
            Some("wrong bearer token")
        );
        assert_eq!(
            refusal(Some("Bearer ab"), "abc"),
            Some("wrong bearer token")
        );
        assert!(refusal(Some("abc"), "abc").is_some_and(|m| m.contains("required")));
        assert!(refusal(None, "abc").is_some_and(|m| m.contains("required")));
    }
}
