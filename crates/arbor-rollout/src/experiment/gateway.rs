//! `[gateway]`: options of a run's gateway.
//!
//! Those of `arbor gateway serve` that a run does not set itself (the listen address,
//! upstreams and store come from the run, the API key and model from `[policy]`, the request
//! timeout from `[timeouts]`). The env server takes the same table in submitted experiments.
//!
//! ```toml
//! [gateway]
//! drop_unsupported_tools = true     # drop tools that are not functions instead of refusing
//! upstream_token_ids = false        # a hosted upstream that rejects `return_token_ids` ...
//! tokenizer = "models/qwen3"        # ... tokenized here instead (relative to this file)
//! max_calls_per_session = 200       # past it: 429 `session_call_cap`, an agent failure
//! max_tokens_per_session = 2000000  # past it: 429 `session_token_cap`, an agent failure
//! ```

use std::path::PathBuf;
use std::time::Duration;

use arbor_gateway::{GatewayConfig, SessionCaps, ToolPolicy};
use serde::{Deserialize, Serialize};

/// The `[gateway]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySpec {
    /// Drop tools that are not functions (web search, custom tools) instead of refusing the
    /// call (`--drop-unsupported-tools`). Function tools inside namespaces are always kept.
    pub drop_unsupported_tools: bool,
    /// Model directory with `tokenizer.json` and a chat template, to tokenize calls whose
    /// upstream returns no token ids (`--tokenizer`).
    pub tokenizer: Option<PathBuf>,
    /// Ask upstreams for token ids (`return_token_ids`); `false` for hosted APIs that reject
    /// the field (`--no-upstream-token-ids`).
    pub upstream_token_ids: bool,
    /// Calls one session (one rollout attempt) may make (`--max-calls-per-session`).
    pub max_calls_per_session: Option<u64>,
    /// Prompt + completion tokens one session may use (`--max-tokens-per-session`).
    pub max_tokens_per_session: Option<u64>,
    /// Longest silence inside an upstream stream, seconds (`--idle-timeout`).
    pub idle_timeout_s: f64,
    /// Largest accepted request body, MiB (`--max-body-mb`).
    pub max_body_mb: usize,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        GatewaySpec {
            drop_unsupported_tools: false,
            tokenizer: None,
            upstream_token_ids: true,
            max_calls_per_session: None,
            max_tokens_per_session: None,
            idle_timeout_s: 120.0,
            max_body_mb: 256,
        }
    }
}

impl GatewaySpec {
    /// Check the values; errors name the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.idle_timeout_s.is_finite() && self.idle_timeout_s > 0.0) {
            return Err("gateway.idle_timeout_s must be a positive number of seconds".into());
        }
        if self.max_body_mb == 0 {
            return Err("gateway.max_body_mb must be at least 1".into());
        }
        if self.max_calls_per_session == Some(0) || self.max_tokens_per_session == Some(0) {
            return Err(
                "gateway.max_calls_per_session and max_tokens_per_session must be at least 1 \
                 (leave them out for no cap)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Sets these options in a gateway configuration.
    pub fn apply(&self, cfg: &mut GatewayConfig) {
        cfg.tool_policy = if self.drop_unsupported_tools {
            ToolPolicy::Drop
        } else {
            ToolPolicy::Refuse
        };
        cfg.tokenizer = self.tokenizer.clone();
        cfg.upstream_token_ids = self.upstream_token_ids;
        cfg.caps = SessionCaps {
            max_calls: self.max_calls_per_session,
            max_tokens: self.max_tokens_per_session,
        };
        cfg.idle_stream_timeout = Duration::from_secs_f64(self.idle_timeout_s);
        cfg.max_body_bytes = self.max_body_mb.saturating_mul(1 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::Experiment;

    const BASE: &str = r#"name = "x"
output = "out"
[[datasets]]
domain = "terminal"
n = 1
[[scaffolds]]
kind = "bash"
[policy]
kind = "scripted-oracle"
"#;

    #[test]
    fn the_table_sets_the_gateway_config_from_toml_and_json() {
        let text = format!(
            "{BASE}[gateway]\ndrop_unsupported_tools = true\nupstream_token_ids = false\n\
             tokenizer = \"/models/q\"\nmax_calls_per_session = 9\nmax_tokens_per_session = 99\n\
             idle_timeout_s = 5\nmax_body_mb = 2\n"
        );
        let exp = Experiment::parse(&text).unwrap();
        let mut cfg = GatewayConfig::new(([127, 0, 0, 1], 0).into(), vec![], "s".into());
        exp.gateway.apply(&mut cfg);
        assert_eq!(cfg.tool_policy, ToolPolicy::Drop);
        assert!(!cfg.upstream_token_ids);
        assert_eq!(
            cfg.tokenizer.as_deref(),
            Some(std::path::Path::new("/models/q"))
        );
        assert_eq!(
            (cfg.caps.max_calls, cfg.caps.max_tokens),
            (Some(9), Some(99))
        );
        assert_eq!(cfg.idle_stream_timeout, Duration::from_secs(5));
        assert_eq!(cfg.max_body_bytes, 2 << 20);
        // The env server takes the experiment as JSON: the same table.
        let json = serde_json::to_value(&exp).unwrap();
        assert_eq!(json["gateway"]["max_calls_per_session"], 9);
        let back: Experiment = serde_json::from_value(json).unwrap();
        assert_eq!(back.gateway, exp.gateway);
        // Without the table: the defaults, and nothing serialized.
        let plain = Experiment::parse(BASE).unwrap();
        assert_eq!(plain.gateway, GatewaySpec::default());
        assert!(
            serde_json::to_value(&plain)
                .unwrap()
                .get("gateway")
                .is_none()
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err =
            |extra: &str| Experiment::parse(&format!("{BASE}[gateway]\n{extra}\n")).unwrap_err();
        assert!(err("max_calls_per_session = 0").contains("max_calls_per_session"));
        assert!(err("idle_timeout_s = -1").contains("idle_timeout_s"));
        assert!(err("drop_tools = true").contains("drop_tools"));
    }
}
