//! Scaffold → gateway → scripted-oracle policy, with context truncation:
//! every call is recorded at token level, the session's history rewrite
//! makes the trajectory branch, and the session tree's root-to-leaf paths
//! reproduce each recorded call's exact token sequence.

use std::path::PathBuf;

use arbor_agent::policy::scripted::ScriptedPolicy;
use arbor_agent::scaffold::bash::BashScaffold;
use arbor_agent::{ChatClient, ContextPolicy, Scaffold, ScaffoldConfig, StopReason};
use arbor_gateway::GatewayConfig;
use arbor_sandbox::local::{LocalBackend, LocalConfig};
use arbor_sandbox::{Sandbox, SandboxSpec};
use arbor_tree::TrajectoryTree;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_session_tree_reproduces_every_call() {
    let policy = ScriptedPolicy::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("policy");
    let task = "Produce output in several steps.";
    let cmds: Vec<String> = (0..4)
        .map(|i| format!("head -c 2000 /dev/zero | tr '\\0' '{i}'"))
        .collect();
    policy.register(task, cmds);
    let store = tempfile::tempdir().expect("tempdir");
    let gw = arbor_gateway::start(GatewayConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        vec![policy.base_url()],
        store.path().to_path_buf(),
    ))
    .await
    .expect("gateway");

    let init = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("arbor-sandbox-init")));
    let backend = LocalBackend::new(LocalConfig {
        init_program: init.filter(|p: &PathBuf| p.exists()),
        ..Default::default()
    })
    .expect("backend (root)");
    let sb = backend
        .create_local(&SandboxSpec::default())
        .await
        .expect("sandbox");
    let scaffold = BashScaffold {
        config: ScaffoldConfig {
            context: ContextPolicy::TruncateObservations {
                budget_chars: 4000,
                keep_last: 1,
            },
            ..Default::default()
        },
    };
    let client = ChatClient::new(
        format!("http://{}/s/episode-1/v1", gw.addr),
        "unused",
        "scripted-oracle",
    );
    let out = scaffold.run(&sb, task, &client).await;
    sb.destroy().await.expect("destroy");
    let out = out.expect("episode");
    assert_eq!(out.stop, StopReason::Submitted);
    assert!(
        out.turns.iter().any(|t| t.context_rewritten),
        "the budget should force a history rewrite"
    );

    let calls = gw
        .store()
        .session("episode-1")
        .expect("read store")
        .expect("session recorded");
    assert_eq!(calls.len(), out.turns.len(), "one record per model call");
    let (seqs, skipped) = arbor_gateway::tree::session_sequences(&calls);
    assert!(skipped.is_empty(), "calls without token ids: {skipped:?}");
    let tree = TrajectoryTree::from_sequences(&seqs).expect("tree");
    let stats = tree.stats();
    assert!(
        stats.paths as usize == calls.len() && stats.unique_tokens < stats.flat_tokens,
        "{stats:?}"
    );
    // The rewrite breaks prefix extension: the tree must branch below the root.
    assert!(
        stats.nodes > 1,
        "expected a branch after the history rewrite: {stats:?}"
    );
    let paths = tree.paths();
    for (call, seq) in calls.iter().zip(&seqs) {
        let path = paths
            .iter()
            .find(|p| p.id == seq.id)
            .expect("path for every call");
        let mut expected = call.tokens.prompt.clone();
        expected.extend_from_slice(&call.tokens.completions[0].ids);
        assert_eq!(
            path.tokens, expected,
            "path of {} reproduces its call",
            call.id
        );
        let completion_logprobs = call.tokens.completions[0]
            .logprobs
            .as_ref()
            .expect("logprobs recorded");
        assert_eq!(
            completion_logprobs.len(),
            call.tokens.completions[0].ids.len()
        );
    }
    gw.shutdown().await.expect("shutdown");
}
