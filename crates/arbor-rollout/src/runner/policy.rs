//! The policy behind the run's gateway: starting an in-process policy (the
//! scripted oracle or an embedded checkpoint) or naming remote upstreams,
//! and the gateway in front of it with the model settings scaffolds use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_gateway::{GatewayConfig, RunningGateway};
use arbor_task::Task;

use crate::error::{Result, RolloutError};
use crate::experiment::{Experiment, PolicySpec};

/// An in-process policy server, kept alive for the run.
pub(super) type PolicyServer = Box<dyn std::any::Any + Send>;

/// What scaffolds ask the gateway for: model name and sampling settings.
pub(super) struct ModelSettings {
    pub(super) model: String,
    pub(super) max_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
}

/// Start the policy behind the gateway. Returns the in-process server to
/// keep alive for the run (none for remote upstreams) and the upstream URLs.
pub(super) async fn start_policy(
    exp: &Experiment,
    tasks: &[Task],
) -> Result<(Option<PolicyServer>, Vec<String>)> {
    match &exp.policy {
        PolicySpec::ScriptedOracle => start_scripted_oracle(tasks).await,
        PolicySpec::Upstream { base_urls, .. } => Ok((None, base_urls.clone())),
        PolicySpec::Embedded {
            checkpoint,
            max_tokens,
            max_concurrency,
            ..
        } => {
            let dir = checkpoint.clone();
            let model = tokio::task::spawn_blocking(move || arbor_policy::load_checkpoint(&dir))
                .await
                .map_err(|e| RolloutError::Other(format!("loading the checkpoint: {e}")))?
                .map_err(|e| {
                    RolloutError::Other(format!("loading checkpoint {}: {e}", checkpoint.display()))
                })?;
            let mut opts = arbor_policy::PolicyOptions::default();
            if let Some(n) = max_tokens {
                opts.default_max_tokens = *n as usize;
            }
            if let Some(c) = max_concurrency {
                opts.max_concurrency = (*c).max(1);
            }
            let policy = arbor_policy::EmbeddedPolicy::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                model,
                opts,
            )
            .await
            .map_err(|e| RolloutError::Other(format!("starting the embedded policy: {e}")))?;
            let url = policy.base_url();
            Ok((Some(Box::new(policy)), vec![url]))
        }
    }
}

/// The scripted-oracle policy, with every task's oracle registered under
/// its instruction.
async fn start_scripted_oracle(tasks: &[Task]) -> Result<(Option<PolicyServer>, Vec<String>)> {
    let policy = ScriptedPolicy::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| RolloutError::io("starting the scripted-oracle policy", e))?;
    // The policy recognises a task by its instruction: two tasks with
    // one instruction but different oracles would be ambiguous.
    let mut by_instruction: HashMap<&str, (&str, Vec<String>)> = HashMap::new();
    for t in tasks {
        let cmds = crate::oracle::oracle_commands(t)?;
        match by_instruction.get(t.instruction.as_str()) {
            Some((other, c)) if *c != cmds => {
                return Err(RolloutError::Other(format!(
                    "tasks `{other}` and `{}` share an instruction but not an oracle; \
                     the scripted-oracle policy cannot tell them apart",
                    t.id
                )));
            }
            Some(_) => {}
            None => {
                policy.register(&t.instruction, cmds.clone());
                by_instruction.insert(&t.instruction, (&t.id, cmds));
            }
        }
    }
    let url = policy.base_url();
    Ok((Some(Box::new(policy)), vec![url]))
}

/// Starts the run's gateway (store in `dir`/`gateway`) in front of
/// `upstreams`, with the experiment's `[gateway]` options and model settings.
pub(super) async fn start_gateway(
    exp: &Experiment,
    dir: &Path,
    upstreams: Vec<String>,
) -> Result<(RunningGateway, ModelSettings)> {
    let mut gw_cfg = GatewayConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        upstreams,
        dir.join(crate::store::GATEWAY),
    );
    exp.gateway.apply(&mut gw_cfg);
    let settings = model_settings(exp, &mut gw_cfg)?;
    gw_cfg.request_timeout = Duration::from_secs_f64(exp.timeouts.model_call_s);
    let gateway = arbor_gateway::start(gw_cfg).await?;
    Ok((gateway, settings))
}

/// The model settings of the experiment's policy (an upstream's API key
/// goes into `gw_cfg`); the temperature must be a number >= 0.
fn model_settings(exp: &Experiment, gw_cfg: &mut GatewayConfig) -> Result<ModelSettings> {
    let (model, max_tokens, temperature) = match &exp.policy {
        PolicySpec::ScriptedOracle => (arbor_agent::policy::scripted::NAME.to_string(), None, None),
        PolicySpec::Upstream {
            model,
            api_key_env,
            max_tokens,
            temperature,
            ..
        } => {
            if let Some(var) = api_key_env {
                gw_cfg.upstream_api_key = Some(std::env::var(var).map_err(|_| {
                    RolloutError::Other(format!("policy.api_key_env: ${var} is not set"))
                })?);
            }
            (model.clone(), *max_tokens, *temperature)
        }
        PolicySpec::Embedded {
            max_tokens,
            temperature,
            ..
        } => ("arbor-embedded".to_string(), *max_tokens, *temperature),
    };
    if let Some(t) = temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(RolloutError::Other(format!(
            "policy.temperature must be a number >= 0, got {t}"
        )));
    }
    Ok(ModelSettings {
        model,
        max_tokens,
        temperature,
    })
}
