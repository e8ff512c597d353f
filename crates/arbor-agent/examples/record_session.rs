//! Record one real agent session and write its calls as `arbor-tree`
//! sequences (JSONL): the `bash` scaffold in a sandbox, through the gateway,
//! against the scripted-oracle policy, with history truncation so the
//! session branches. Produces the recorded-session fixture of arbor-model's
//! exactness tests.
//!
//! `cargo run -p arbor-agent --example record_session -- OUT.jsonl` (as root)

use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_agent::scaffold::bash::BashScaffold;
use arbor_agent::{ChatClient, ContextPolicy, Scaffold, ScaffoldConfig};
use arbor_gateway::GatewayConfig;
use arbor_sandbox::local::LocalBackend;
use arbor_sandbox::{Sandbox, SandboxSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: record_session OUT.jsonl"))?;
    let policy = ScriptedPolicy::start("127.0.0.1:0".parse()?).await?;
    let task = "List, then count.";
    policy.register(
        task,
        vec![
            "printf 'a%.0s' $(seq 120)".into(),
            "printf 'b%.0s' $(seq 120)".into(),
            "echo ok".into(),
        ],
    );
    let store = tempfile::tempdir()?;
    let gw = arbor_gateway::start(GatewayConfig::new(
        "127.0.0.1:0".parse()?,
        vec![policy.base_url()],
        store.path().into(),
    ))
    .await?;
    let backend = LocalBackend::with_defaults()?;
    let sb = backend.create_local(&SandboxSpec::default()).await?;
    let scaffold = BashScaffold {
        config: ScaffoldConfig {
            system_prompt: Some(
                "Shell agent. One ```bash block per reply; `submit` when done.".into(),
            ),
            context: ContextPolicy::TruncateObservations {
                budget_chars: 300,
                keep_last: 1,
            },
            ..Default::default()
        },
    };
    let client = ChatClient::new(
        format!("http://{}/s/fixture/v1", gw.addr),
        "k",
        "scripted-oracle",
    );
    let res = scaffold.run(&sb, task, &client).await;
    sb.destroy().await?;
    res?;
    let calls = gw
        .store()
        .session("fixture")?
        .ok_or_else(|| anyhow::anyhow!("no session recorded"))?;
    let (seqs, _) = arbor_gateway::tree::session_sequences(&calls);
    arbor_tree::write_jsonl(std::path::Path::new(&out), &seqs)?;
    let stats = arbor_tree::TrajectoryTree::from_sequences(&seqs)?.stats();
    eprintln!("{} calls -> {out}: {stats}", calls.len());
    gw.shutdown().await?;
    Ok(())
}
