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
//! # Two phases
//!
//! 1. **Induction** ([`letters_corpus`], `induction_steps` at `induction_lr`, into
//!    `out/induction/`): lines of 8–48 random lowercase letters, each followed by three verbatim
//!    copies. Only the content-matching ("induction") circuit lowers its loss, because the copy
//!    distance varies. A 2-layer model sits on the plateau (`ln 26` nats/byte) for hundreds of
//!    steps before it escapes; at lr 1e-2 the escape started after ~800 steps of 4 096 bytes
//!    and the held-out toy copy loss was 0.036 nats/byte after ~3 000 (measured).
//! 2. **Mixed corpus** ([`copy_corpus`], `steps` at `lr`, into `out/`): the circuit applied to
//!    names shaped like the tasks' (below).
//!
//! Without phase 1 the circuit did not form: on the mixed corpus alone the held-out copy loss
//! was still 2.0 nats/byte (the entropy of the name generator) after 1 500 and 3 000 steps.
//!
//! # The mixed corpus ([`copy_corpus`])
//!
//! Each document is one to three *episodes*, drawn at random:
//!
//! - **verbatim** (3 in 10): a line of 20–80 bytes of random names, then the same line again
//!   once to three times.
//! - **repeat** (2 in 10): a line of random names and numbers, then a contiguous span of it
//!   quoted again inside a short template (continue a span seen before).
//! - **recall** (2 in 10): three to eight `key → value` facts in one of several layouts (`k = v`,
//!   `k: v`, ``the k is `v` ``, …), then some of the keys asked again in a *different* layout
//!   with their values. A value is unpredictable except by finding its key earlier in the
//!   document (associative recall, the circuit behind "the host named in the instruction").
//! - **Markov text** (3 in 10): order-2 Markov text over a fixed random language, where the
//!   next byte depends on the two previous ones (rewards a head that looks one position back,
//!   the first half of the copying circuit).
//!
//! Names mix the shapes the tasks use: pronounceable lowercase words, dotted host names, paths,
//! integers (also negative), capitalised words, `word_123`. Documents are up to ~900 bytes, so
//! the copy distances match an instruction-to-command distance.
//!
//! Every byte after the first is trained (language modelling). Each document also records which
//! bytes are predictable *only* by copying (a value or quoted span after its first byte); the
//! held-out **copy loss** (mean NLL of those bytes of mixed-corpus documents) is the stage's
//! diagnostic: a model that has formed the copying circuit drives it towards zero, one that has
//! not stays near the entropy of the name generator.
//!
//! # Training
//!
//! Each phase generates exactly enough documents for one pass (`steps × max_tokens_per_pack`
//! bytes, so no document is seen twice) from the seed and trains them with the SFT stage's
//! machinery ([`sft::train_sessions`]): same packing, schedule, log, checkpoints and resume
//! rules. `copy_loss.json` holds the copy loss of the fresh model, after phase 1 and after
//! phase 2, each measured once.
//!
//! # What it does for the tasks (measured, and not what was hoped)
//!
//! With phase 1 (3 000 letters steps) and 1 000 mixed steps, the held-out copy loss fell from
//! 2.0 to 0.83 nats/byte; but SFT from that model on the 1 000 terminal demonstrations (500
//! steps, lr 3e-3) passed 0/100 held-out terminal tasks against 4/100 from the fresh model, at
//! a held-out SFT loss of 0.28 against 0.065; with 1 000 SFT steps the loss caught up (0.064)
//! and it still passed 0/100: sampled freely, its commands derail into fragments of the
//! context after one wrong byte. So the stage is off in the example pipelines; it is here
//! because the copying skill is the measured gap, and the next try (a gentler phase 1, a longer
//! phase 2, a wider model) starts from it. Measured afterwards: much of the "miscopied name"
//! failure was temperature-1 sampling. Greedily, the fresh start's terminal SFT model passes
//! 36/100 and the one from this stage 13/100, so the stage still loses.

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

/// The alphabet of the order-2 Markov text.
const MARKOV: &[u8] = b"abcdefghijklmnopqrstuvwxyz ";

/// The `k`-th of the two bytes that may follow `a b` in the Markov text: a fixed hash, so every
/// document (and every seed) has the same language.
fn markov_next(a: u8, b: u8, k: u8) -> u8 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for x in [a, b, k] {
        h ^= x as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    MARKOV[(h % MARKOV.len() as u64) as usize]
}

/// A run of order-2 Markov text: the next byte is one of two that depend on the *two* previous
/// bytes. Predicting it well needs an attention head that looks one position back, which is
/// the first half of the copying circuit (measured: without this kind, copying had not
/// started after 1 500 steps; see the module docs).
fn markov(b: &mut Builder, rng: &mut StdRng) {
    let n = rng.gen_range(40..=120);
    let mut text = vec![
        *MARKOV.choose(rng).unwrap_or(&b'a'),
        *MARKOV.choose(rng).unwrap_or(&b'a'),
    ];
    while text.len() < n {
        let (a, c) = (text[text.len() - 2], text[text.len() - 1]);
        text.push(markov_next(a, c, rng.gen_range(0..2)));
    }
    b.plain(&String::from_utf8_lossy(&text));
    b.plain("\n");
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
            0..=2 => verbatim(&mut b, rng),
            3..=4 => repeat(&mut b, rng),
            5..=6 => recall(&mut b, rng),
            _ => markov(&mut b, rng),
        }
    }
    CopyDocument {
        text: b.text,
        copy_mask: b.copy,
    }
}

/// One document of the induction phase: one to three lines of 8–48 random lowercase letters,
/// each followed by three verbatim copies. Nothing but copying can be learned from it, and the
/// copy distance varies, so only the content-matching (induction) circuit lowers the loss.
pub fn letters_document(rng: &mut StdRng) -> CopyDocument {
    let mut b = Builder {
        text: String::new(),
        copy: Vec::new(),
    };
    for _ in 0..rng.gen_range(1..=3) {
        let n = rng.gen_range(8..=48);
        let line: String = (0..n).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
        b.plain(&line);
        for _ in 0..3 {
            b.plain("\n");
            b.copied(&line);
        }
        b.plain("\n");
    }
    CopyDocument {
        text: b.text,
        copy_mask: b.copy,
    }
}

/// Documents drawn by `draw` from a seeded stream until they hold at least `tokens` bytes.
fn corpus(seed: u64, tokens: usize, draw: fn(&mut StdRng) -> CopyDocument) -> Vec<CopyDocument> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut docs = Vec::new();
    let mut total = 0;
    while total < tokens {
        let d = draw(&mut rng);
        total += d.text.len();
        docs.push(d);
    }
    docs
}

/// Induction-phase documents from `seed` until they hold at least `tokens` bytes.
pub fn letters_corpus(seed: u64, tokens: usize) -> Vec<CopyDocument> {
    corpus(seed ^ 0x1e77_e125, tokens, letters_document)
}

/// Mixed-corpus documents from `seed` until they hold at least `tokens` bytes.
pub fn copy_corpus(seed: u64, tokens: usize) -> Vec<CopyDocument> {
    corpus(seed ^ 0xc09e_c0de, tokens, copy_document)
}

/// Held-out documents for the copy loss (a stream disjoint from the training seed's).
pub fn copy_eval_documents(seed: u64, n: usize) -> Vec<CopyDocument> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe7a1_c09e);
    (0..n).map(|_| copy_document(&mut rng)).collect()
}

/// Settings of the pretraining stage (all fields have defaults; a partial TOML/JSON works).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Optimizer steps of the first phase, on [`letters_document`]s (0 = no first phase).
    pub induction_steps: usize,
    /// Peak learning rate of the first phase.
    pub induction_lr: f64,
    /// Optimizer steps of the second phase, on the mixed corpus ([`copy_document`]s).
    pub steps: usize,
    /// Peak learning rate of the second phase.
    pub lr: f64,
    /// Linear warm-up steps of each phase.
    pub warmup_steps: usize,
    /// Tokens per pack (one pack per step).
    pub max_tokens_per_pack: usize,
    /// Seed of the corpora (and of the pack order).
    pub seed: u64,
    /// Held-out loss every this many steps (0 = only before and after each phase).
    pub eval_every: usize,
    /// Periodic checkpoint every this many steps.
    pub save_every: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            induction_steps: 2000,
            induction_lr: 1e-2,
            steps: 1000,
            lr: 3e-3,
            warmup_steps: 20,
            max_tokens_per_pack: 4096,
            seed: 0,
            eval_every: 0,
            save_every: 100,
        }
    }
}

impl PretrainConfig {
    /// The SFT settings of one phase.
    fn phase(&self, steps: usize, lr: f64) -> SftConfig {
        SftConfig {
            steps: Some(steps),
            lr,
            warmup_steps: self.warmup_steps,
            max_tokens_per_pack: self.max_tokens_per_pack,
            seed: self.seed,
            eval_fraction: 0.01,
            max_eval_sessions: 32,
            eval_every: self.eval_every,
            save_every: self.save_every,
            ..SftConfig::default()
        }
    }
}

/// The copy-loss measurements of a pretraining stage (`out/copy_loss.json`), on the mixed
/// corpus's held-out documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyLoss {
    /// Held-out documents scored.
    pub documents: usize,
    /// Copy bytes scored.
    pub copy_bytes: usize,
    /// Mean NLL (nats/byte) of the copy bytes under the start model.
    pub before: f64,
    /// The same after the first (induction) phase, when there is one.
    pub after_induction: Option<f64>,
    /// The same after the stage (`None` until it has finished).
    pub after: Option<f64>,
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

/// Documents as SFT sessions trained on every byte after the first.
fn sessions(docs: &[CopyDocument], kind: &str) -> SftData {
    let sessions = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let id = format!("{kind}/{i}");
            let mut seq = d.training_sequence(id.clone());
            seq.group = Some(id.clone());
            SftSession {
                run: 0,
                session: id.clone(),
                task_id: id,
                scaffold: "corpus".into(),
                domain: kind.into(),
                sequences: vec![seq],
            }
        })
        .collect();
    SftData {
        sessions,
        filtered: 0,
        missing: 0,
    }
}

/// Which phase an [`SftEvent`] of [`train_pretrain`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first phase (verbatim random letters), in `out/induction/`.
    Induction,
    /// The second phase (the mixed corpus), in `out/`.
    Mixed,
}

/// Runs the pretraining stage into `out` (see the module docs): the induction phase into
/// `out/induction/` (when `induction_steps > 0`), then the mixed corpus into `out/`, each a
/// resumable SFT stage of its own. Returns the second phase's report and the copy losses.
pub fn train_pretrain(
    init: &SftInit,
    out: &Path,
    cfg: &PretrainConfig,
    progress: &mut dyn FnMut(Phase, SftEvent<'_>),
) -> Result<(SftReport, CopyLoss)> {
    if cfg.steps == 0 || cfg.max_tokens_per_pack == 0 {
        return Err(TrainError::Input(
            "pretraining needs `steps` > 0 and `max_tokens_per_pack` > 0".into(),
        ));
    }
    let eval_docs = copy_eval_documents(cfg.seed, COPY_EVAL_DOCS);
    let copy_path = out.join(COPY_FILE);
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io(format!("{}: {e}", out.display())))?;
    // Measurements survive a restart: each is taken once.
    let mut copy = match std::fs::read(&copy_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CopyLoss>(&b).ok())
    {
        Some(c) => c,
        None => {
            let c = CopyLoss {
                documents: eval_docs.len(),
                copy_bytes: eval_docs
                    .iter()
                    .map(|d| d.copy_mask.iter().filter(|&&m| m).count())
                    .sum(),
                before: copy_loss(&init.build()?, &eval_docs)?,
                after_induction: None,
                after: None,
            };
            write_copy(&copy_path, &c)?;
            c
        }
    };
    let tokens = |steps: usize| steps * cfg.max_tokens_per_pack;

    let mut init = init.clone();
    if cfg.induction_steps > 0 {
        let dir = out.join("induction");
        let docs = letters_corpus(cfg.seed, tokens(cfg.induction_steps));
        let pcfg = cfg.phase(cfg.induction_steps, cfg.induction_lr);
        sft::train_sessions(&init, sessions(&docs, "letters"), &dir, &pcfg, &mut |ev| {
            progress(Phase::Induction, ev)
        })?;
        if copy.after_induction.is_none() {
            copy.after_induction = Some(copy_loss(&Qwen3Model::load(&dir)?, &eval_docs)?);
            write_copy(&copy_path, &copy)?;
        }
        init = SftInit::Dir(dir);
    }
    let docs = copy_corpus(cfg.seed, tokens(cfg.steps));
    let report = sft::train_sessions(
        &init,
        sessions(&docs, "copy"),
        out,
        &cfg.phase(cfg.steps, cfg.lr),
        &mut |ev| progress(Phase::Mixed, ev),
    )?;
    if copy.after.is_none() {
        copy.after = Some(copy_loss(&Qwen3Model::load(out)?, &eval_docs)?);
        write_copy(&copy_path, &copy)?;
    }
    Ok((report, copy))
}

fn write_copy(path: &Path, copy: &CopyLoss) -> Result<()> {
    let json = serde_json::to_vec_pretty(copy).map_err(|e| TrainError::Input(e.to_string()))?;
    crate::checkpoint::write_atomic(path, &json)
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
        let mut with_copies = 0;
        for _ in 0..200 {
            let d = copy_document(&mut rng);
            assert!(d.text.is_ascii());
            assert_eq!(d.copy_mask.len(), d.text.len());
            with_copies += d.copy_mask.iter().any(|&m| m) as usize;
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
        assert!(
            with_copies > 150,
            "{with_copies} of 200 documents have copy bytes"
        );
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
