//! The input of tree building: one linear token sequence (a root-to-leaf path), and readers for JSONL files
//! of sequences.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TreeError};

/// One linear trajectory: the tokens of one model context (prompt and generated tokens) with per-token
/// training fields and per-sequence RL fields.
///
/// This is also the JSONL interchange format (one JSON object per line) that other crates write and
/// [`load_sequences`] reads:
///
/// ```json
/// {"id":"task-1/0","tokens":[1,2,3,4],"loss_mask":[false,false,true,true],
///  "logprobs":[0.0,0.0,-0.5,-1.2],"turns":[0,0,0,0],"reward":1.0,"advantage":0.5,"group":"task-1"}
/// ```
///
/// `loss_mask`, `logprobs` and `turns` may be omitted (or empty); they then default to *every token
/// trained* (`true`), `0.0` and turn `0`. When present they must have exactly one entry per token.
/// `reward`, `advantage` and `group` may be omitted or `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    /// A unique id (for example `"{task}/{sample}"` or a gateway call id).
    pub id: String,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `true` for tokens that carry a loss (generated tokens); empty means all `true`.
    #[serde(default)]
    pub loss_mask: Vec<bool>,
    /// Behaviour-policy log-probability of each token; `0.0` where unknown (prompt). Empty means all `0.0`.
    #[serde(default)]
    pub logprobs: Vec<f32>,
    /// Turn index of each token; empty means all `0`.
    #[serde(default)]
    pub turns: Vec<u32>,
    /// Scalar reward of the trajectory, if scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Advantage of the trajectory (e.g. group-relative), if computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantage: Option<f64>,
    /// Group (e.g. task id) the trajectory was sampled in, for group-relative advantages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Sequence {
    /// A sequence with the given tokens, every token trained, logprobs `0.0`, turn `0`, no RL fields.
    pub fn new(id: impl Into<String>, tokens: Vec<u32>) -> Self {
        let n = tokens.len();
        Sequence {
            id: id.into(),
            tokens,
            loss_mask: vec![true; n],
            logprobs: vec![0.0; n],
            turns: vec![0; n],
            reward: None,
            advantage: None,
            group: None,
        }
    }

    /// Checks that the sequence is non-empty and that every per-token field is empty (defaulted) or has
    /// one entry per token.
    pub fn validate(&self) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(TreeError::EmptySequence {
                id: self.id.clone(),
            });
        }
        let check = |field: &'static str, actual: usize| {
            if actual != 0 && actual != n {
                Err(TreeError::LengthMismatch {
                    id: self.id.clone(),
                    field,
                    expected: n,
                    actual,
                })
            } else {
                Ok(())
            }
        };
        check("loss_mask", self.loss_mask.len())?;
        check("logprobs", self.logprobs.len())?;
        check("turns", self.turns.len())?;
        Ok(())
    }

    /// The sequence with omitted per-token fields filled with their defaults (after [`Sequence::validate`]).
    pub fn normalized(&self) -> Result<Sequence> {
        self.validate()?;
        let n = self.tokens.len();
        let mut s = self.clone();
        if s.loss_mask.is_empty() {
            s.loss_mask = vec![true; n];
        }
        if s.logprobs.is_empty() {
            s.logprobs = vec![0.0; n];
        }
        if s.turns.is_empty() {
            s.turns = vec![0; n];
        }
        Ok(s)
    }

    /// Value of the loss mask at position `i` (with the default for an omitted field).
    pub(crate) fn mask_at(&self, i: usize) -> bool {
        self.loss_mask.get(i).copied().unwrap_or(true)
    }

    /// Behaviour logprob at position `i` (with the default for an omitted field).
    pub(crate) fn logprob_at(&self, i: usize) -> f32 {
        self.logprobs.get(i).copied().unwrap_or(0.0)
    }

    /// Turn at position `i` (with the default for an omitted field).
    pub(crate) fn turn_at(&self, i: usize) -> u32 {
        self.turns.get(i).copied().unwrap_or(0)
    }
}

/// Reads sequences from a JSONL file, or from every `*.jsonl` file under a directory (recursively, in
/// lexicographic path order, so the result is deterministic).
///
/// Blank lines are skipped. Every sequence is [validated](Sequence::validate); errors name the file and line.
///
/// A file ending in `.json` (not `.jsonl`) is read as one JSON document instead: a serialized
/// [`TrajectoryTree`](crate::TrajectoryTree), an object with such a tree under `"tree"` (the model
/// gateway's `GET /sessions/{id}/tree` answer), or an array of sequences; trees give their paths back.
pub fn load_sequences(path: &Path) -> Result<Vec<Sequence>> {
    let meta = std::fs::metadata(path).map_err(|e| TreeError::io(path, e))?;
    let mut out = Vec::new();
    if meta.is_file() && path.extension().is_some_and(|e| e == "json") {
        return read_json_document(path);
    }
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_jsonl(path, &mut files)?;
        files.sort();
        for f in files {
            read_jsonl_into(&f, &mut out)?;
        }
    } else {
        read_jsonl_into(path, &mut out)?;
    }
    Ok(out)
}

/// Reads one JSONL file of sequences.
pub fn read_jsonl(path: &Path) -> Result<Vec<Sequence>> {
    let mut out = Vec::new();
    read_jsonl_into(path, &mut out)?;
    Ok(out)
}

/// Writes sequences as JSONL (one compact JSON object per line).
pub fn write_jsonl(path: &Path, sequences: &[Sequence]) -> Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(|e| TreeError::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    for s in sequences {
        let line = serde_json::to_string(s).map_err(|e| TreeError::Json {
            path: path.to_path_buf(),
            line: 0,
            source: e,
        })?;
        w.write_all(line.as_bytes())
            .and_then(|_| w.write_all(b"\n"))
            .map_err(|e| TreeError::io(path, e))?;
    }
    w.flush().map_err(|e| TreeError::io(path, e))
}

fn read_json_document(path: &Path) -> Result<Vec<Sequence>> {
    let text = std::fs::read_to_string(path).map_err(|e| TreeError::io(path, e))?;
    let json_err = |e: serde_json::Error| TreeError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        source: e,
    };
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(json_err)?;
    if value.is_array() {
        let seqs: Vec<Sequence> = serde_json::from_value(value).map_err(json_err)?;
        for s in &seqs {
            s.validate()?;
        }
        return Ok(seqs);
    }
    if value.get("nodes").is_none()
        && let Some(tree) = value.get_mut("tree")
    {
        value = tree.take();
    }
    if value.get("nodes").is_none() {
        return Err(TreeError::invalid(
            "sequence source",
            format!(
                "{}: expected a tree (with \"nodes\"), an object with a \"tree\", or an array of sequences",
                path.display()
            ),
        ));
    }
    let tree: crate::TrajectoryTree = serde_json::from_value(value).map_err(json_err)?;
    Ok(tree.paths())
}

fn collect_jsonl(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| TreeError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| TreeError::io(dir, e))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(|e| TreeError::io(&p, e))?;
        if ft.is_dir() {
            collect_jsonl(&p, files)?;
        } else if p.extension().is_some_and(|e| e == "jsonl") {
            files.push(p);
        }
    }
    Ok(())
}

fn read_jsonl_into(path: &Path, out: &mut Vec<Sequence>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| TreeError::io(path, e))?;
    let reader = std::io::BufReader::new(file);
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| TreeError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let seq: Sequence = serde_json::from_str(&line).map_err(|e| TreeError::Json {
            path: path.to_path_buf(),
            line: i + 1,
            source: e,
        })?;
        seq.validate().map_err(|e| TreeError::Invalid {
            what: "sequence",
            reason: format!("{}:{}: {e}", path.display(), i + 1),
        })?;
        out.push(seq);
    }
    Ok(())
}
