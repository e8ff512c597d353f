//! The batching engine: one thread decodes every active generation together.
//!
//! The served models are tiny, so a decode step of one sequence is almost all fixed overhead
//! (op dispatch, small matrix products). RL keeps tens of requests in flight; running them one
//! thread each paid that overhead per sequence and fought over two cores. The engine instead
//! owns all active sequences and runs one [`Qwen3Model::forward_decode_batch`] step over them,
//! so the overhead is paid once per step for the whole batch.
//!
//! - Requests arrive over a channel and are admitted in FIFO order while fewer than
//!   `max_batch` sequences are active; admission snapshots the current weights (a swap never
//!   changes a running generation), reports [`Event::Started`] and prefills the prompt.
//! - Active sequences are grouped by weights version, one batched step per group.
//! - Each sequence samples with its own [`Sampler`] (seeded RNG, temperature), so its tokens do
//!   not depend on what else is in the batch.
//! - A sequence leaves the batch when it ends (end marker, `max_tokens`), when its consumer is
//!   gone (the event receiver was dropped: client disconnected), or when the model fails on its
//!   step (its consumer gets [`Event::Failed`]; other groups are unaffected).
//! - If the engine thread ever dies, every event sender is dropped with it, so consumers see the
//!   end of their channel instead of waiting forever.
//!
//! [`Qwen3Model::forward_decode_batch`]: arbor_model::Qwen3Model::forward_decode_batch

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, TryRecvError};

use arbor_model::model::KvCache;
use tokio::sync::mpsc::UnboundedSender;

use crate::sample::{Finish, Sampler, Sampling};
use crate::{PolicyError, Result, Weights, WeightsSlot};

/// What the engine reports to a request, in this order: `Started`, then `Token`s, then one
/// `Done` or `Failed` (nothing more after those).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// Generation started on these weights (the request left the queue).
    Started {
        /// Weights version the whole generation uses.
        version: u64,
    },
    /// A token and its behaviour logprob.
    Token {
        /// Token id (a byte).
        id: u32,
        /// Log-probability under the distribution it was drawn from.
        logprob: f32,
    },
    /// Generation ended normally (never `Finish::Cancelled`: a cancelled request has no
    /// consumer to tell).
    Done(Finish),
    /// The model failed on this request.
    Failed(String),
}

/// A generation request.
pub(crate) struct Request {
    /// Prompt token ids.
    pub(crate) prompt: Vec<u32>,
    /// How to sample.
    pub(crate) sampling: Sampling,
    /// Where events go; dropping the receiver cancels the request.
    pub(crate) events: UnboundedSender<Event>,
}

/// The submitting side of the engine (cheap to share; the engine thread ends when the last
/// handle is dropped and no sequence is active).
pub(crate) struct Engine {
    tx: mpsc::Sender<Request>,
}

impl Engine {
    /// Starts the engine thread: batches of at most `max_batch` sequences, weights taken from
    /// `weights` when a request is admitted.
    pub(crate) fn start(weights: Arc<WeightsSlot>, max_batch: usize) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("arbor-policy-engine".into())
            .spawn(move || run(rx, &weights, max_batch.max(1)))?;
        Ok(Self { tx })
    }

    /// Queues a request; its events arrive on the receiver paired with `req.events`.
    pub(crate) fn submit(&self, req: Request) -> Result<()> {
        self.tx
            .send(req)
            .map_err(|_| PolicyError::Internal("the decoding engine has stopped".into()))
    }
}

/// One active generation.
struct Seq {
    weights: Arc<Weights>,
    cache: KvCache,
    sampler: Sampler,
    /// The last drawn token, the input of the next step.
    next: u32,
    events: UnboundedSender<Event>,
}

impl Seq {
    /// Draws from `logits` and reports the token; `false` when the sequence is finished
    /// (ended, or its consumer is gone).
    fn advance(&mut self, logits: &[f32]) -> bool {
        let (id, logprob, finish) = self.sampler.draw(logits);
        if self.events.send(Event::Token { id, logprob }).is_err() {
            return false;
        }
        self.next = id;
        match finish {
            Some(f) => {
                let _ = self.events.send(Event::Done(f));
                false
            }
            None => true,
        }
    }
}

fn run(rx: Receiver<Request>, weights: &WeightsSlot, max_batch: usize) {
    let mut active: Vec<Seq> = Vec::new();
    let mut open = true;
    while open || !active.is_empty() {
        // Admit queued requests (blocking only when there is nothing to decode).
        while open && active.len() < max_batch {
            let req = if active.is_empty() {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            if let Some(seq) = admit(req, weights) {
                active.push(seq);
            }
        }
        step(&mut active);
    }
}

/// Starts a request: weights snapshot, `Started`, prefill, first token. `None` when it is
/// already over (cancelled while queued, `max_tokens` 0, ended at its first token, failed).
fn admit(req: Request, weights: &WeightsSlot) -> Option<Seq> {
    if req.events.is_closed() {
        return None;
    }
    let w = match weights.current() {
        Ok(w) => w,
        Err(e) => {
            let _ = req.events.send(Event::Failed(e.to_string()));
            return None;
        }
    };
    if req
        .events
        .send(Event::Started { version: w.version })
        .is_err()
    {
        return None;
    }
    let sampler = Sampler::new(&req.sampling);
    if sampler.is_empty() {
        let _ = req.events.send(Event::Done(Finish::Length));
        return None;
    }
    let mut cache = KvCache::default();
    let logits = w
        .model
        .forward_cached(&req.prompt, &mut cache)
        .and_then(|t| Ok(t.to_vec1::<f32>()?));
    let logits = match logits {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("prefill failed: {e}");
            let _ = req
                .events
                .send(Event::Failed(format!("generation failed: {e}")));
            return None;
        }
    };
    let mut seq = Seq {
        weights: w,
        cache,
        sampler,
        next: 0,
        events: req.events,
    };
    seq.advance(&logits).then_some(seq)
}

/// One decode step over every active sequence, one batch per weights version; finished
/// sequences are removed.
fn step(active: &mut Vec<Seq>) {
    if active.is_empty() {
        return;
    }
    // Stable: FIFO order within a version, so a batch's row order is its admission order.
    active.sort_by_key(|s| s.weights.version);
    let mut keep = vec![true; active.len()];
    let mut at = 0;
    for group in active.chunk_by_mut(|a, b| a.weights.version == b.weights.version) {
        let n = group.len();
        let model = group[0].weights.model.clone();
        let tokens: Vec<u32> = group.iter().map(|s| s.next).collect();
        let mut caches: Vec<&mut KvCache> = group.iter_mut().map(|s| &mut s.cache).collect();
        let logits = model
            .forward_decode_batch(&tokens, &mut caches)
            .and_then(|t| Ok(t.to_vec2::<f32>()?));
        match logits {
            Ok(rows) => {
                for ((s, row), k) in group.iter_mut().zip(&rows).zip(&mut keep[at..at + n]) {
                    *k = s.advance(row);
                }
            }
            Err(e) => {
                tracing::warn!(sequences = n, "decode step failed: {e}");
                for (s, k) in group.iter_mut().zip(&mut keep[at..at + n]) {
                    let _ = s
                        .events
                        .send(Event::Failed(format!("generation failed: {e}")));
                    *k = false;
                }
            }
        }
        at += n;
    }
    let mut flags = keep.into_iter();
    active.retain(|_| flags.next().unwrap_or(false));
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use arbor_model::{Qwen3Config, Qwen3Model};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;
    use crate::sample::generate;

    fn slot(model: Qwen3Model) -> Arc<WeightsSlot> {
        Arc::new(WeightsSlot(RwLock::new(Arc::new(Weights {
            model: Arc::new(model),
            version: 1,
        }))))
    }

    fn submit(engine: &Engine, prompt: &[u32], sampling: Sampling) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        engine
            .submit(Request {
                prompt: prompt.to_vec(),
                sampling,
                events: tx,
            })
            .unwrap();
        rx
    }

    /// Everything a request receives: weights version, tokens, logprobs, ending.
    fn collect(mut rx: UnboundedReceiver<Event>) -> (u64, Vec<u32>, Vec<f32>, Event) {
        let Some(Event::Started { version }) = rx.blocking_recv() else {
            panic!("no Started event");
        };
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        loop {
            match rx
                .blocking_recv()
                .expect("events ended without Done/Failed")
            {
                Event::Token { id, logprob } => {
                    ids.push(id);
                    lps.push(logprob);
                }
                end => return (version, ids, lps, end),
            }
        }
    }

    fn reference(model: &Qwen3Model, prompt: &[u32], s: &Sampling) -> (Vec<u32>, Vec<f32>, Finish) {
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        let f = generate(model, prompt, s, |id, lp| {
            ids.push(id);
            lps.push(lp);
            true
        })
        .unwrap();
        (ids, lps, f)
    }

    fn jobs() -> Vec<(Vec<u32>, Sampling)> {
        let s = |temperature, max_tokens, seed| Sampling {
            temperature,
            max_tokens,
            seed,
        };
        let p = |n: usize, salt: u32| -> Vec<u32> {
            (0..n as u32)
                .map(|i| (i * 37 + salt * 11 + 5) % 256)
                .collect()
        };
        vec![
            (p(30, 1), s(1.0, 40, 7)),
            (p(3, 2), s(0.7, 25, 8)),
            (p(57, 3), s(0.0, 12, 9)),
            (p(30, 1), s(1.0, 40, 10)),
            (p(1, 4), s(1.3, 1, 11)),
            (p(12, 5), s(1.0, 0, 12)),
            (p(80, 6), s(1.0, 33, 13)),
        ]
    }

    #[test]
    fn a_request_samples_the_same_tokens_whatever_else_is_in_the_batch() {
        let dense = Qwen3Config::tiny(256, 32, 2, 2, 1);
        for cfg in [dense.clone(), dense.with_moe(4, 2, 16)] {
            let model = Qwen3Model::new(cfg, 3).unwrap();
            let want: Vec<_> = jobs()
                .iter()
                .map(|(p, s)| reference(&model, p, s))
                .collect();
            let w = slot(model);
            // One at a time, a batch smaller than the load (queueing), everything at once.
            for max_batch in [1, 3, 16] {
                let engine = Engine::start(w.clone(), max_batch).unwrap();
                let rxs: Vec<_> = jobs()
                    .into_iter()
                    .map(|(p, s)| submit(&engine, &p, s))
                    .collect();
                for (i, (rx, (ids, lps, finish))) in rxs.into_iter().zip(&want).enumerate() {
                    let (version, got, got_lps, end) = collect(rx);
                    assert_eq!(version, 1);
                    assert_eq!(&got, ids, "request {i}, batch {max_batch}");
                    assert_eq!(end, Event::Done(*finish), "request {i}");
                    for (a, b) in got_lps.iter().zip(lps) {
                        assert!((a - b).abs() <= 1e-5, "request {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn cancelled_and_failing_requests_leave_the_others_untouched() {
        let model = Qwen3Model::new(Qwen3Config::tiny(256, 32, 2, 2, 1), 5).unwrap();
        let s = |seed| Sampling {
            temperature: 1.0,
            max_tokens: 30,
            seed,
        };
        let want = reference(&model, &[1, 2, 3], &s(1)).0;
        let engine = Engine::start(slot(model), 4).unwrap();
        let keep = submit(&engine, &[1, 2, 3], s(1));
        let mut gone = submit(&engine, &[4, 5], s(2));
        // A prompt the model rejects fails alone.
        let bad = submit(&engine, &[1, 300], s(3));
        assert!(matches!(gone.blocking_recv(), Some(Event::Started { .. })));
        assert!(matches!(gone.blocking_recv(), Some(Event::Token { .. })));
        drop(gone);
        let (_, ids, _, end) = collect(keep);
        assert_eq!(ids, want);
        assert_eq!(end, Event::Done(Finish::Length));
        match collect(bad) {
            (_, ids, _, Event::Failed(m)) => {
                assert!(ids.is_empty());
                assert!(m.contains("generation failed"), "{m}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // The engine still serves after all that.
        let (_, ids, _, _) = collect(submit(&engine, &[1, 2, 3], s(1)));
        assert_eq!(ids, want);
    }

    #[test]
    fn a_swap_leaves_running_generations_on_their_weights() {
        let cfg = Qwen3Config::tiny(256, 32, 2, 2, 1);
        let (m1, m2) = (
            Qwen3Model::new(cfg.clone(), 1).unwrap(),
            Qwen3Model::new(cfg.clone(), 2).unwrap(),
        );
        let s = Sampling {
            temperature: 1.0,
            max_tokens: 60,
            seed: 4,
        };
        let (want1, want2) = (
            reference(&m1, &[9, 8, 7], &s).0,
            reference(&m2, &[9, 8, 7], &s).0,
        );
        assert_ne!(want1, want2);
        let w = slot(m1);
        let engine = Engine::start(w.clone(), 8).unwrap();
        let mut old = submit(&engine, &[9, 8, 7], s.clone());
        assert_eq!(old.blocking_recv(), Some(Event::Started { version: 1 }));
        let Some(Event::Token { id: first, .. }) = old.blocking_recv() else {
            panic!("no first token");
        };
        assert_eq!(w.swap(m2).unwrap(), 2);
        // Both versions decode side by side (one batch each).
        let new = submit(&engine, &[9, 8, 7], s);
        let (v2, ids2, _, _) = collect(new);
        let mut ids1 = vec![first];
        while let Some(Event::Token { id, .. }) = old.blocking_recv() {
            ids1.push(id);
        }
        assert_eq!((v2, ids1, ids2), (2, want1, want2));
    }
}
