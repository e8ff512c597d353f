//! `arbor_rl._native`: the Python face of `arbor-tree` (and of `arbor-trace`'s gateway sessions).
//!
//! Trees, packing and loss weights are computed here by the same Rust code `arbor-train` uses;
//! the Python package never re-implements them. Sequences cross the boundary as JSONL text (the
//! `Sequence` interchange format) and packs as pack-file bytes (`arbor-pack/1` safetensors), so
//! what Python reads is byte for byte what `arbor tree pack` writes.

use std::path::PathBuf;

use arbor_tree::{
    LossNormalization, OversizePolicy, Pack, PackOptions, PackStrategy, Sequence, TrajectoryTree,
    synthetic,
};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// A pack as `(pack-file bytes, metadata JSON)`.
type PackOut = (Py<PyBytes>, String);

fn value_err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Errors reading a path are `OSError`s, everything else (bad JSON, bad options) `ValueError`s.
fn tree_err(e: arbor_tree::TreeError) -> PyErr {
    match e {
        arbor_tree::TreeError::Io { .. } => PyOSError::new_err(e.to_string()),
        other => value_err(other),
    }
}

fn parse_jsonl(text: &str) -> PyResult<Vec<Sequence>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let seq: Sequence = serde_json::from_str(line)
            .map_err(|e| value_err(format!("sequence {}: {e}", n + 1)))?;
        seq.validate()
            .map_err(|e| value_err(format!("sequence {} ({}): {e}", n + 1, seq.id)))?;
        out.push(seq);
    }
    Ok(out)
}

fn to_jsonl(seqs: &[Sequence]) -> PyResult<String> {
    let mut out = String::new();
    for s in seqs {
        out.push_str(&serde_json::to_string(s).map_err(value_err)?);
        out.push('\n');
    }
    Ok(out)
}

/// Reads sequences from a JSONL file, a directory of them, or a `.json` tree document (the
/// gateway's `GET /sessions/{id}/tree` answer), as JSONL text.
#[pyfunction]
fn load_sequences(path: PathBuf) -> PyResult<String> {
    to_jsonl(&arbor_tree::load_sequences(&path).map_err(tree_err)?)
}

/// Every session of a gateway store directory, as JSONL text (one sequence per recorded call).
#[pyfunction]
fn gateway_sequences(store: PathBuf) -> PyResult<String> {
    let seqs = arbor_trace::store_sequences(&store).map_err(|e| match e {
        arbor_trace::TraceError::Io { .. } => PyOSError::new_err(e.to_string()),
        other => value_err(other),
    })?;
    to_jsonl(&seqs)
}

/// Statistics of the tree built from JSONL sequences (POR, ideal speedup, sizes), as JSON.
#[pyfunction]
fn tree_stats(jsonl: &str) -> PyResult<String> {
    let tree = TrajectoryTree::from_sequences(&parse_jsonl(jsonl)?).map_err(tree_err)?;
    serde_json::to_string(&tree.stats()).map_err(value_err)
}

fn pack_out(py: Python<'_>, pack: &Pack) -> PyResult<PackOut> {
    let bytes = arbor_tree::pack_to_bytes(pack).map_err(tree_err)?;
    let meta = serde_json::to_string(&pack.meta()).map_err(value_err)?;
    Ok((PyBytes::new(py, &bytes).unbind(), meta))
}

/// Builds the tree of JSONL sequences and packs it into packs of at most `budget` tokens.
/// Returns the packs (bytes + metadata) and the packing statistics as JSON.
#[pyfunction]
#[pyo3(signature = (jsonl, budget, strategy="greedy", normalization="token_mean", oversize="dedicated"))]
fn pack_sequences(
    py: Python<'_>,
    jsonl: &str,
    budget: usize,
    strategy: &str,
    normalization: &str,
    oversize: &str,
) -> PyResult<(Vec<PackOut>, String)> {
    if budget == 0 {
        return Err(value_err("budget must be at least 1 token"));
    }
    let opts = PackOptions {
        budget,
        strategy: strategy.parse::<PackStrategy>().map_err(value_err)?,
        oversize: oversize.parse::<OversizePolicy>().map_err(value_err)?,
        normalization: normalization
            .parse::<LossNormalization>()
            .map_err(value_err)?,
    };
    let seqs = parse_jsonl(jsonl)?;
    let (stats, packs) = py
        .detach(|| {
            let tree = TrajectoryTree::from_sequences(&seqs)?;
            let (packing, packs) = arbor_tree::pack_tree(&tree, &opts)?;
            Ok((packing.stats(&tree), packs))
        })
        .map_err(tree_err)?;
    let out = packs
        .iter()
        .map(|p| pack_out(py, p))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((out, serde_json::to_string(&stats).map_err(value_err)?))
}

/// Reads and validates a pack file (any `arbor-pack/1` file), returning its canonical bytes and
/// metadata.
#[pyfunction]
fn read_pack(py: Python<'_>, path: PathBuf) -> PyResult<PackOut> {
    let pack = arbor_tree::read_pack(&path).map_err(tree_err)?;
    pack_out(py, &pack)
}

/// Synthetic group-sampling sequences (tasks sampled `samples_per_group` times, shared prompt)
/// with a target POR, as JSONL text. For benchmarks and tests.
#[pyfunction]
#[pyo3(signature = (por, flat_tokens, samples_per_group, seq_len, seed=0, vocab_size=32_000))]
fn synthetic_group_sampling(
    por: f64,
    flat_tokens: usize,
    samples_per_group: usize,
    seq_len: usize,
    seed: u64,
    vocab_size: u32,
) -> PyResult<String> {
    let mut cfg =
        synthetic::GroupSampling::for_por(por, flat_tokens, samples_per_group, seq_len, seed)
            .map_err(tree_err)?;
    cfg.vocab_size = vocab_size;
    to_jsonl(&synthetic::group_sampling(&cfg))
}

/// Synthetic multi-turn branching episodes with a target POR, as JSONL text.
#[pyfunction]
#[pyo3(signature = (por, flat_tokens, path_len, seed=0, vocab_size=32_000))]
fn synthetic_multi_turn(
    por: f64,
    flat_tokens: usize,
    path_len: usize,
    seed: u64,
    vocab_size: u32,
) -> PyResult<String> {
    let mut cfg = synthetic::MultiTurnBranching::for_por(por, flat_tokens, path_len, seed)
        .map_err(tree_err)?;
    cfg.vocab_size = vocab_size;
    to_jsonl(&synthetic::multi_turn_branching(&cfg))
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load_sequences, m)?)?;
    m.add_function(wrap_pyfunction!(gateway_sequences, m)?)?;
    m.add_function(wrap_pyfunction!(tree_stats, m)?)?;
    m.add_function(wrap_pyfunction!(pack_sequences, m)?)?;
    m.add_function(wrap_pyfunction!(read_pack, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic_group_sampling, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic_multi_turn, m)?)?;
    m.add("PACK_FORMAT", arbor_tree::PACK_FORMAT)?;
    Ok(())
}
