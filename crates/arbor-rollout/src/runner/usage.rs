//! What the gateway knows of a rollout attempt's session: the token counts and model-call
//! time of its recorded calls, and whether a per-session cap refused one of its calls.
//!
//! Both come from the gateway, not from the scaffold, so black-box agents (whose loop arbor
//! does not see) are reported like white-box ones.

use arbor_gateway::caps::CapTracker;
use arbor_gateway::{CapKind, Store};
use tracing::warn;

use crate::record::{RolloutResult, Status};

/// Sets `r`'s prompt and completion tokens and its model-call time (request arrival at the
/// gateway to the upstream's complete answer, summed) from the records of `r.session`. A
/// session without records (no call made) leaves `r` as it is.
pub(super) async fn fill_from_records(store: &Store, r: &mut RolloutResult) {
    let store = store.clone();
    let session = r.session.clone();
    let records = match tokio::task::spawn_blocking(move || store.session(&session)).await {
        Ok(Ok(Some(records))) => records,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return warn!(session = %r.session, "reading the session's calls: {e}"),
        Err(e) => return warn!(session = %r.session, "reading the session's calls: {e}"),
    };
    let (mut prompt, mut completion, mut ms) = (0, 0, 0);
    for rec in &records {
        let (p, c) = rec.token_counts();
        prompt += p;
        completion += c;
        ms += rec.duration_ms();
    }
    r.prompt_tokens = prompt;
    r.completion_tokens = completion;
    r.timing.model_ms = ms as f64;
}

/// The failure of an attempt whose session reached a cap: the agent's (it looped or ran
/// long), never the infrastructure's; class `call_cap` or `token_cap`.
pub(super) fn cap_failure(
    caps: &CapTracker,
    session: &str,
) -> Option<(Status, &'static str, String)> {
    let hit = caps.hit(session)?;
    let class = match hit.cap {
        CapKind::Calls => "call_cap",
        CapKind::Tokens => "token_cap",
    };
    Some((Status::AgentFailure, class, hit.to_string()))
}
