//! The variables of the server's environment a submitted batch may name: only
//! those the operator allowed (`arbor serve --allow-env VAR`). A named
//! variable's value is sent as a bearer token to an endpoint the batch
//! chooses (its upstream `policy.api_key_env`, a task's LLM judge
//! `api_key_env`), so without this list any HTTP client could have any
//! secret of the server's environment sent to a host of its choosing.

use arbor_task::{Task, VerifierSpec};

use crate::experiment::{Experiment, PolicySpec};

/// The allowed variable names.
#[derive(Debug, Clone, Default)]
pub struct AllowedEnv(Vec<String>);

impl AllowedEnv {
    /// Refuses a name that is not a plain variable name and the server's own
    /// tokens, which no batch may have sent anywhere.
    pub fn new(vars: &[String]) -> Result<Self, String> {
        for v in vars {
            if v.is_empty() || v.contains('=') || v.contains('\0') {
                return Err(format!("`{v}` is not an environment variable name"));
            }
            if own_token(v) {
                return Err(format!(
                    "`{v}` holds one of this server's own tokens; it cannot be allowed"
                ));
            }
        }
        Ok(AllowedEnv(vars.to_vec()))
    }

    /// The allowed names.
    pub fn vars(&self) -> &[String] {
        &self.0
    }

    /// `Ok` if `var` (named by `field`) may be read, else a message naming
    /// the variable, the allowed ones and how the operator allows one.
    pub fn check(&self, field: &str, var: &str) -> Result<(), String> {
        if own_token(var) {
            return Err(format!(
                "{field}: `{var}` holds one of this server's own tokens, which would be sent \
                 to the batch's endpoint"
            ));
        }
        if self.0.iter().any(|v| v == var) {
            return Ok(());
        }
        let allowed = if self.0.is_empty() {
            "this server allows none".to_string()
        } else {
            format!("the allowed variables are {}", self.0.join(", "))
        };
        Err(format!(
            "{field}: environment variable `{var}` is not one this server lets a batch read; \
             {allowed} (the operator allows one with `arbor serve --allow-env VAR`)"
        ))
    }

    /// Checks the variable an experiment's upstream policy names.
    pub fn check_experiment(&self, exp: &Experiment) -> Result<(), String> {
        match &exp.policy {
            PolicySpec::Upstream {
                api_key_env: Some(var),
                ..
            } => self.check("policy.api_key_env", var),
            _ => Ok(()),
        }
    }

    /// Checks the variables the LLM judges of the loaded tasks name.
    pub fn check_tasks(&self, tasks: &[Task]) -> Result<(), String> {
        for t in tasks {
            let mut vars = Vec::new();
            judge_vars(&t.verifier, &mut vars);
            for var in vars {
                self.check(&format!("task `{}`: verifier api_key_env", t.id), var)?;
            }
        }
        Ok(())
    }
}

fn own_token(var: &str) -> bool {
    [super::TOKEN_ENV, crate::backend::TOKEN_ENV].contains(&var)
}

/// Every `api_key_env` of the judges in `v` and its parts.
fn judge_vars<'a>(v: &'a VerifierSpec, out: &mut Vec<&'a str>) {
    match v {
        VerifierSpec::LlmJudge(j) => out.extend(j.api_key_env.as_deref()),
        VerifierSpec::Composite(c) => c.parts.iter().for_each(|p| judge_vars(&p.verifier, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_variables_and_never_the_servers_tokens() {
        let a = AllowedEnv::new(&["OPENAI_API_KEY".into()]).expect("allowed");
        assert_eq!(a.check("f", "OPENAI_API_KEY"), Ok(()));
        let e = a.check("f", "AWS_SECRET_ACCESS_KEY").unwrap_err();
        assert!(
            e.contains("`AWS_SECRET_ACCESS_KEY`") && e.contains("OPENAI_API_KEY"),
            "{e}"
        );
        assert!(e.contains("--allow-env"), "{e}");
        let e = AllowedEnv::default().check("f", "X").unwrap_err();
        assert!(e.contains("allows none"), "{e}");
        assert!(AllowedEnv::new(&["ARBOR_TOKEN".into()]).is_err());
        assert!(AllowedEnv::new(&["ARBOR_NODE_TOKEN".into()]).is_err());
        assert!(AllowedEnv::new(&["A=B".into()]).is_err());
        assert!(
            a.check("f", "ARBOR_TOKEN")
                .unwrap_err()
                .contains("own tokens")
        );
    }
}
