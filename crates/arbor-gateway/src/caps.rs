//! Per-session caps on model calls and tokens.
//!
//! An agent stuck in a loop (an upstream that repeats a tool-call id made one call 1,223 times
//! in two minutes) should end as the agent's failure, not burn the policy's time. Past a cap
//! the gateway answers 429 with the code `session_call_cap` or `session_token_cap` (and
//! `x-should-retry: false`, which the OpenAI and Anthropic SDKs obey) and remembers the hit,
//! which its owner reads back ([`crate::RunningGateway::cap_hit`]) to classify the rollout.
//!
//! Calls are counted when admitted (before the upstream is asked), so concurrent calls of a
//! session never pass the call cap together; tokens (prompt + completion of recorded calls)
//! are known only afterwards, so the call that crosses the token cap completes and the next
//! one is refused. Counts start from the store's recovered records.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::record::CallRecord;

/// The caps (none by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCaps {
    /// Most calls one session may make.
    pub max_calls: Option<u64>,
    /// Most prompt + completion tokens one session may use, summed over its calls.
    pub max_tokens: Option<u64>,
}

/// Which cap a session reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapKind {
    /// [`SessionCaps::max_calls`].
    Calls,
    /// [`SessionCaps::max_tokens`].
    Tokens,
}

impl CapKind {
    /// The error `code` of the 429 answer.
    pub fn code(self) -> &'static str {
        match self {
            CapKind::Calls => "session_call_cap",
            CapKind::Tokens => "session_token_cap",
        }
    }
}

/// A cap a session reached: the first refused call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapHit {
    /// Which cap.
    pub cap: CapKind,
    /// The cap's value.
    pub limit: u64,
    /// Calls made or tokens used when the call was refused.
    pub used: u64,
}

impl std::fmt::Display for CapHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.cap {
            CapKind::Calls => write!(
                f,
                "call cap: the session made {} model calls, the cap is {}",
                self.used, self.limit
            ),
            CapKind::Tokens => write!(
                f,
                "token cap: the session used {} tokens, the cap is {}",
                self.used, self.limit
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Usage {
    calls: u64,
    tokens: u64,
    hit: Option<CapHit>,
}

/// Counts calls and tokens per session against the caps.
#[derive(Debug, Default)]
pub struct CapTracker {
    caps: SessionCaps,
    sessions: Mutex<HashMap<String, Usage>>,
}

impl CapTracker {
    /// A tracker for `caps`, counting `recovered` calls as made.
    pub fn new(caps: SessionCaps, recovered: &[CallRecord]) -> Self {
        let t = CapTracker {
            caps,
            sessions: Mutex::default(),
        };
        if t.enabled() {
            for r in recovered {
                let (p, c) = r.token_counts();
                t.with(&r.session, |u| {
                    u.calls += 1;
                    u.tokens += p + c;
                });
            }
        }
        t
    }

    fn enabled(&self) -> bool {
        self.caps.max_calls.is_some() || self.caps.max_tokens.is_some()
    }

    fn with<T>(&self, session: &str, f: impl FnOnce(&mut Usage) -> T) -> T {
        let mut map = self
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(map.entry(session.to_string()).or_default())
    }

    /// Admits one more call of `session`, or says which cap refuses it (and remembers it).
    pub fn admit(&self, session: &str) -> Result<(), CapHit> {
        if !self.enabled() {
            return Ok(());
        }
        let caps = self.caps;
        self.with(session, |u| {
            let hit = match (caps.max_calls, caps.max_tokens) {
                (Some(limit), _) if u.calls >= limit => Some(CapHit {
                    cap: CapKind::Calls,
                    limit,
                    used: u.calls,
                }),
                (_, Some(limit)) if u.tokens >= limit => Some(CapHit {
                    cap: CapKind::Tokens,
                    limit,
                    used: u.tokens,
                }),
                _ => None,
            };
            match hit {
                Some(h) => {
                    u.hit.get_or_insert(h);
                    Err(h)
                }
                None => {
                    u.calls += 1;
                    Ok(())
                }
            }
        })
    }

    /// Adds a recorded call's tokens to its session.
    pub fn add_tokens(&self, session: &str, tokens: u64) {
        if self.caps.max_tokens.is_some() {
            self.with(session, |u| u.tokens += tokens);
        }
    }

    /// The first cap `session` reached, if any.
    pub fn hit(&self, session: &str) -> Option<CapHit> {
        if !self.enabled() {
            return None;
        }
        let map = self
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(session).and_then(|u| u.hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_then_tokens_are_capped_per_session() {
        let t = CapTracker::new(
            SessionCaps {
                max_calls: Some(2),
                max_tokens: Some(100),
            },
            &[],
        );
        assert!(t.admit("a").is_ok());
        t.add_tokens("a", 100);
        let hit = t.admit("a").unwrap_err();
        assert_eq!((hit.cap, hit.limit, hit.used), (CapKind::Tokens, 100, 100));
        assert!(t.admit("b").is_ok() && t.admit("b").is_ok());
        let hit = t.admit("b").unwrap_err();
        assert_eq!((hit.cap, hit.used), (CapKind::Calls, 2));
        assert_eq!(
            hit.to_string(),
            "call cap: the session made 2 model calls, the cap is 2"
        );
        assert_eq!(t.hit("b"), Some(hit));
        assert_eq!(t.hit("c"), None);
        let off = CapTracker::default();
        assert!((0..10).all(|_| off.admit("a").is_ok()));
        assert_eq!(off.hit("a"), None);
    }
}
