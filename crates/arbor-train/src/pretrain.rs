//! The pretraining stage: a fresh byte-level model learns to copy from its context on a
//! synthetic corpus, before any task data.
//!
//! # Why
//!
//! Every recipe this crate reproduces starts from a *pretrained* base model. A fresh byte model
//! trained only on a few thousand demonstrations learns the command templates but not the one
//! skill every domain needs on top of them: copying a name, path or number from the instruction
//! into the command (measured: the terminal SFT model writes `sed -i 's/host=dolor\.internal/…'`
//! for a task about `zudor.internal`). Natural-text pretraining is out of reach on 2 CPU cores;
//! this corpus concentrates on the mechanism instead. It contains no task, instruction or
//! command of any domain: only randomly generated names in random key/value and repetition
//! layouts, so whatever the SFT stage later gains from it is the copying skill, not task data.
//!
//! # The corpus ([`copy_corpus`])
//!
//! Each document is one to three *episodes* of three kinds, drawn at random:
//!
//! - **verbatim** (4 in 10): a line of 20–80 bytes of random names, then the same line again
//!   once to three times. The easiest copying signal: the circuit forms on it within a few
//!   hundred steps; on the other two kinds alone it had not formed after 3 000 steps of 4 096
//!   bytes (held-out copy loss 2.08 nats/byte, measured).
//! - **recall** (3 in 10): three to eight `key → value` facts in one of several layouts (`k = v`,
//!   `k: v`, ``the k is `v` ``, …), then some of the keys asked again in a *different* layout
//!   with their values. A value is unpredictable except by finding its key earlier in the
//!   document (associative recall, the circuit behind "the host named in the instruction").
//! - **repeat** (3 in 10): a line of random names and numbers, then a contiguous span of it
//!   quoted again inside a short template (induction: continue a span seen before).
//!
//! Names mix the shapes the tasks use: pronounceable lowercase words, dotted host names, paths,
//! integers (also negative), capitalised words, `word_123`. Documents are 150–900 bytes, so the
//! copy distances match an instruction-to-command distance.
//!
//! Every byte after the first is trained (language modelling). Each document also records which
//! bytes are predictable *only* by copying (a value or quoted span after its first byte); the
//! held-out **copy loss** (mean NLL of those bytes) is the stage's diagnostic: a model that has
//! formed the copying circuit drives it towards zero, one that has not stays near the entropy of
//! the name generator.
//!
//! # Training
//!
//! [`train_pretrain`] generates exactly enough documents for one pass (`steps ×
//! packs_per_step × max_tokens_per_pack` tokens, so no document is seen twice) from
//! [`SftConfig::seed`] and trains them with the SFT stage's machinery ([`sft::train_sessions`]):
//! same packing, schedule, log, checkpoints and resume rules. `steps` must be set.

use std::path::Path;

use arbor_model::Qwen3Model;
use arbor_tree::Sequence;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::sft::{self, SftConfig, SftData, SftEvent, SftInit, SftReport, SftSession};
use crate::{Result, TrainError};

/// The file with the stage's copy-loss measurements (next to `sft_report.json`).
pub const COPY_FILE: &str = "copy_loss.json";

/// One generated document.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyDocument {
    /// The text (ASCII).
    pub text: String,
    /// Per byte: predictable only by copying from earlier in the document.
    pub copy_mask: Vec<bool>,
}

impl CopyDocument {
    /// The document as a sequence trained on every byte after the first.
    pub fn training_sequence(&self, id: String) -> Sequence {
        let mut s = Sequence::new(id, self.text.bytes().map(u32::from).collect());
        s.loss_mask[0] = false;
        s
    }

    /// The document as a sequence scored on its copy bytes only.
    pub fn copy_sequence(&self, id: String) -> Sequence {
        let mut s = Sequence::new(id, self.text.bytes().map(u32::from).collect());
        s.loss_mask = self.copy_mask.clone();
        s
    }
}

/// Appends text to a document under construction.
struct Builder {
    text: String,
    copy: Vec<bool>,
}

impl Builder {
    fn plain(&mut self, s: &str) {
        self.text.push_str(s);
        self.copy.extend(std::iter::repeat_n(false, s.len()));
    }

    /// A span the reader can only complete by copying: its first byte is a choice (which fact,
    /// which span), the rest follows from the earlier occurrence.
    fn copied(&mut self, s: &str) {
        self.text.push_str(s);
        self.copy
            .extend((0..s.len()).map(|i| i > 0 && s.is_char_boundary(i)));
    }
}

const CONSONANTS: &[u8] = b"bdfghklmnprstvwz";
const VOWELS: &[u8] = b"aeiou";
const TLDS: &[&str] = &["internal", "local", "example.org", "net", "io"];
const EXTS: &[&str] = &["txt", "cfg", "log", "csv", "md", "json", "py"];

fn word(rng: &mut StdRng) -> String {
    let syllables = rng.gen_range(2..=3);
    let mut w = String::new();
    for _ in 0..syllables {
        w.push(*CONSONANTS.choose(rng).unwrap_or(&b'k') as char);
        w.push(*VOWELS.choose(rng).unwrap_or(&b'a') as char);
    }
    if rng.gen_bool(0.3) {
        w.push(*CONSONANTS.choose(rng).unwrap_or(&b'n') as char);
    }
    w
}

/// A random name in one of the shapes the task domains use.
fn name(rng: &mut StdRng) -> String {
    match rng.gen_range(0..8) {
        0 | 1 => word(rng),
        2 => format!("{}.{}", word(rng), TLDS.choose(rng).unwrap_or(&"net")),
        3 => format!(
            "/{}/{}.{}",
            word(rng),
            word(rng),
            EXTS.choose(rng).unwrap_or(&"txt")
        ),
        4 => rng.gen_range(-999..100_000).to_string(),
        5 => {
            let mut w = word(rng);
            w[..1].make_ascii_uppercase();
            w
        }
        6 => format!("{}_{}", word(rng), rng.gen_range(0..1000)),
        _ => format!("{} {}", word(rng), word(rng)),
    }
}

/// `(key, value)` layouts of the facts; the query layout is drawn different from the fact's.
const LAYOUTS: &[(&str, &str, &str)] = &[
    ("", " = ", ""),
    ("", ": ", ""),
    ("the ", " is `", "`"),
    ("set ", " to '", "'"),
    ("", " -> ", ""),
    ("echo '", "' # ", ""),
    ("", "=", ""),
    ("- ", " (", ")"),
];

fn recall(b: &mut Builder, rng: &mut StdRng) {
    let n = rng.gen_range(3..=8);
    let mut facts: Vec<(String, String)> = Vec::with_capacity(n);
    while facts.len() < n {
        let k = word(rng);
        // Keys must identify their fact.
        if facts.iter().any(|(f, _)| f == &k) {
            continue;
        }
        facts.push((k, name(rng)));
    }
    let def = rng.gen_range(0..LAYOUTS.len());
    let mut ask = rng.gen_range(0..LAYOUTS.len() - 1);
    if ask >= def {
        ask += 1;
    }
    let sep = *["\n", "; ", ", "].choose(rng).unwrap_or(&"\n");
    for (i, (k, v)) in facts.iter().enumerate() {
        if i > 0 {
            b.plain(sep);
        }
        let (pre, mid, post) = LAYOUTS[def];
        b.plain(&format!("{pre}{k}{mid}{v}{post}"));
    }
    b.plain("\n\n");
    let q = rng.gen_range(2..=n);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    for &i in &order[..q] {
        let (k, v) = &facts[i];
        let (pre, mid, post) = LAYOUTS[ask];
        b.plain(pre);
        b.copied(k);
        b.plain(mid);
        b.copied(v);
        b.plain(post);
        b.plain("\n");
    }
}

const TEMPLATES: &[(&str, &str)] = &[
    ("copy: `", "`"),
    ("printf '%s' '", "'"),
    ("again \"", "\""),
    ("> ", ""),
    ("grep -c '", "' notes.txt"),
];

fn repeat(b: &mut Builder, rng: &mut StdRng) {
    let n = rng.gen_range(4..=10);
    let items: Vec<String> = (0..n).map(|_| name(rng)).collect();
    b.plain(&items.join(" "));
    b.plain("\n");
    let times = rng.gen_range(1..=3);
    for _ in 0..times {
        let start = rng.gen_range(0..n);
        let len = rng.gen_range(1..=(n - start).min(4));
        let (pre, post) = *TEMPLATES.choose(rng).unwrap_or(&("> ", ""));
        b.plain(pre);
        b.copied(&items[start..start + len].join(" "));
        b.plain(post);
        b.plain("\n");
    }
}

fn verbatim(b: &mut Builder, rng: &mut StdRng) {
    let mut line = name(rng);
    let len = rng.gen_range(20..=80);
    while line.len() < len {
        line.push(' ');
        line.push_str(&name(rng));
    }
    b.plain(&line);
    for _ in 0..rng.gen_range(1..=3) {
        b.plain("\n");
        b.copied(&line);
    }
    b.plain("\n");
}

/// One document (seeded by the caller's RNG).
pub fn copy_document(rng: &mut StdRng) -> CopyDocument {
    let mut b = Builder {
        text: String::new(),
        copy: Vec::new(),
    };
    let episodes = rng.gen_range(1..=3);
    for e in 0..episodes {
        if e > 0 {
            b.plain("\n");
        }
        match rng.gen_range(0..10) {
            0..=3 => verbatim(&mut b, rng),
            4..=6 => repeat(&mut b, rng),
            _ => recall(&mut b, rng),
        }
    }
    CopyDocument {
        text: b.text,
        copy_mask: b.copy,
    }
}

/// Documents from `seed` until they hold at least `tokens` bytes.
pub fn copy_corpus(seed: u64, tokens: usize) -> Vec<CopyDocument> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc09e_c0de);
    let mut docs = Vec::new();
    let mut total = 0;
    while total < tokens {
        let d = copy_document(&mut rng);
        total += d.text.len();
        docs.push(d);
    }
    docs
}

/// Held-out documents for the copy loss (a stream disjoint from the training seed's).
pub fn copy_eval_documents(seed: u64, n: usize) -> Vec<CopyDocument> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe7a1_c09e);
    (0..n).map(|_| copy_document(&mut rng)).collect()
}

/// The copy-loss measurements of a pretraining stage (`out/copy_loss.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyLoss {
    /// Held-out documents scored.
    pub documents: usize,
    /// Copy bytes scored.
    pub copy_bytes: usize,
    /// Mean NLL (nats/byte) of the copy bytes under the start model.
    pub before: f64,
    /// The same after training.
    pub after: f64,
}

/// Mean NLL of the copy bytes of `docs` under `model`.
pub fn copy_loss(model: &Qwen3Model, docs: &[CopyDocument]) -> Result<f64> {
    let seqs: Vec<Sequence> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| d.copy_sequence(format!("copy-eval/{i}")))
        .collect();
    sft::sequences_loss(model, &seqs, 8192)?
        .ok_or_else(|| TrainError::Input("no copy bytes in the held-out documents".into()))
}

/// Held-out documents the copy loss is measured on.
const COPY_EVAL_DOCS: usize = 64;

/// Runs the pretraining stage into `out` (see the module docs). Resumable like SFT.
pub fn train_pretrain(
    init: &SftInit,
    out: &Path,
    cfg: &SftConfig,
    progress: &mut dyn FnMut(SftEvent<'_>),
) -> Result<(SftReport, CopyLoss)> {
    let Some(steps) = cfg.steps else {
        return Err(TrainError::Input(
            "pretraining needs `steps` (the corpus is generated for exactly one pass)".into(),
        ));
    };
    let tokens = steps * cfg.packs_per_step.max(1) * cfg.max_tokens_per_pack;
    let docs = copy_corpus(cfg.seed, tokens);
    let sessions = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let id = format!("copy/{i}");
            let mut seq = d.training_sequence(id.clone());
            seq.group = Some(id.clone());
            SftSession {
                run: 0,
                session: id.clone(),
                task_id: id,
                scaffold: "corpus".into(),
                domain: "copy".into(),
                sequences: vec![seq],
            }
        })
        .collect();
    let data = SftData {
        sessions,
        filtered: 0,
        missing: 0,
    };
    let eval_docs = copy_eval_documents(cfg.seed, COPY_EVAL_DOCS);
    let copy_path = out.join(COPY_FILE);
    // The start model's copy loss, measured once (a resumed run keeps the first measurement).
    let before = match std::fs::read(&copy_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CopyLoss>(&b).ok())
    {
        Some(c) => c.before,
        None => {
            let start = init.build()?;
            let before = copy_loss(&start, &eval_docs)?;
            std::fs::create_dir_all(out)
                .map_err(|e| TrainError::Io(format!("{}: {e}", out.display())))?;
            write_copy(&copy_path, &eval_docs, before, f64::NAN)?;
            before
        }
    };
    let report = sft::train_sessions(init, data, out, cfg, progress)?;
    let model = Qwen3Model::load(out)?;
    let after = copy_loss(&model, &eval_docs)?;
    let copy = write_copy(&copy_path, &eval_docs, before, after)?;
    Ok((report, copy))
}

fn write_copy(path: &Path, docs: &[CopyDocument], before: f64, after: f64) -> Result<CopyLoss> {
    let copy = CopyLoss {
        documents: docs.len(),
        copy_bytes: docs
            .iter()
            .map(|d| d.copy_mask.iter().filter(|&&m| m).count())
            .sum(),
        before,
        after,
    };
    let json = serde_json::to_vec_pretty(&copy).map_err(|e| TrainError::Input(e.to_string()))?;
    crate::checkpoint::write_atomic(path, &json)?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_deterministic_and_sized() {
        let a = copy_corpus(7, 20_000);
        let b = copy_corpus(7, 20_000);
        assert_eq!(a, b);
        let total: usize = a.iter().map(|d| d.text.len()).sum();
        assert!((20_000..22_000).contains(&total), "{total}");
        assert_ne!(a, copy_corpus(8, 20_000));
    }

    #[test]
    fn copy_bytes_repeat_earlier_text() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let d = copy_document(&mut rng);
            assert!(d.text.is_ascii());
            assert_eq!(d.copy_mask.len(), d.text.len());
            assert!(d.copy_mask.iter().any(|&m| m), "{}", d.text);
            // Every maximal run of copy bytes, with the byte before it (the choice), occurs
            // earlier in the document: it really is copyable.
            let bytes = d.text.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if !d.copy_mask[i] {
                    i += 1;
                    continue;
                }
                let start = i - 1;
                while i < bytes.len() && d.copy_mask[i] {
                    i += 1;
                }
                let span = &d.text[start..i];
                assert!(
                    d.text[..start].contains(span),
                    "`{span}` not earlier in:\n{}",
                    d.text
                );
            }
        }
    }

    #[test]
    fn training_sequence_trains_all_but_the_first_byte() {
        let mut rng = StdRng::seed_from_u64(1);
        let d = copy_document(&mut rng);
        let s = d.training_sequence("x".into());
        assert!(!s.loss_mask[0]);
        assert!(s.loss_mask[1..].iter().all(|&m| m));
        assert_eq!(s.tokens.len(), d.text.len());
    }
}
