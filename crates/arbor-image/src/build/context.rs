//! The build context: resolving COPY/ADD sources inside it (never outside),
//! hashing what they contain (part of the step's cache key), and packing them
//! as the tar a sandbox unpacks.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{Run, State, build_err};
use crate::dockerfile::{Op, Step};
use crate::error::{ImageError, Result};

/// What besides the instruction text decides a step's result: the variables
/// in scope, the network, and for COPY/ADD the content copied.
pub(crate) fn step_inputs(run: &Run<'_>, state: &State, step: &Step) -> Result<String> {
    let mut inputs = String::new();
    for (k, v) in &state.args {
        let _ = writeln!(inputs, "arg {k}={v}");
    }
    if let Op::Run { .. } = step.op {
        let _ = writeln!(inputs, "network_host {}", run.opts.network_host);
    }
    if let Op::Copy { sources, from, .. } = &step.op {
        match from {
            Some(stage) => {
                let _ = writeln!(inputs, "from {}", stage_key(run, stage)?);
            }
            None => {
                for src in sources {
                    let path = resolve(&run.opts.context, src)
                        .map_err(|m| build_err(run, step.line, m))?;
                    let _ = writeln!(inputs, "src {src} {}", hash_tree(&path)?);
                }
            }
        }
    }
    Ok(inputs)
}

/// The cache key of an earlier stage (by name or index) or an image reference.
fn stage_key(run: &Run<'_>, stage: &str) -> Result<String> {
    let by_name = run
        .stages
        .iter()
        .find(|(n, _)| n.as_deref() == Some(stage))
        .or_else(|| stage.parse::<usize>().ok().and_then(|i| run.stages.get(i)));
    match by_name {
        Some((_, s)) => Ok(s.key.to_string()),
        None => Ok(format!("image {stage}")),
    }
}

/// A source path under the context: relative, no `..` above the context, no
/// wildcards, and (after symlinks) still inside the context.
pub(crate) fn resolve(context: &Path, src: &str) -> std::result::Result<PathBuf, String> {
    if src.contains(['*', '?', '[']) {
        return Err(format!("COPY source `{src}`: wildcards are not supported"));
    }
    if src.starts_with("http://") || src.starts_with("https://") {
        return Err(format!(
            "ADD from a URL ({src}) is not supported: builds have no network; download it in a RUN step"
        ));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(src).components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !rel.pop() {
                    return Err(format!("COPY source `{src}` is outside the build context"));
                }
            }
            Component::Prefix(_) => return Err(format!("COPY source `{src}` is not a path")),
        }
    }
    let root = context
        .canonicalize()
        .map_err(|e| format!("build context {}: {e}", context.display()))?;
    let full = root.join(&rel);
    let real = full
        .canonicalize()
        .map_err(|e| format!("COPY source `{src}`: {e}"))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "COPY source `{src}` resolves outside the build context"
        ));
    }
    Ok(full)
}

/// A digest of a file or directory tree: names, types, modes, link targets
/// and file contents, in sorted order.
pub(crate) fn hash_tree(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    hash_entry(path, Path::new(""), &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn hash_entry(path: &Path, rel: &Path, h: &mut Sha256) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let io = |e| ImageError::io(format!("read {}", path.display()), e);
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    h.update(format!("{}\0{:o}\0", rel.display(), meta.mode()).as_bytes());
    if meta.is_symlink() {
        h.update(
            std::fs::read_link(path)
                .map_err(io)?
                .as_os_str()
                .as_encoded_bytes(),
        );
    } else if meta.is_file() {
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    } else if meta.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(io)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        names.sort();
        for n in names {
            hash_entry(&path.join(&n), &rel.join(&n), h)?;
        }
    }
    Ok(())
}

/// A tar of one source for `write_tar`: a directory's contents, or a file
/// under the name `name`.
pub(crate) fn pack_source(path: &Path, name: &str) -> Result<Vec<u8>> {
    let io = |e| ImageError::io(format!("pack {}", path.display()), e);
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if meta.is_dir() {
        b.append_dir_all(".", path).map_err(io)?;
    } else {
        b.append_path_with_name(path, name).map_err(io)?;
    }
    b.into_inner().map_err(io)
}

/// Whether an ADD source is a local tar archive (unpacked, not copied).
pub(crate) fn is_archive(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    path.is_file()
        && [".tar", ".tar.gz", ".tgz"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// An archive's entries as a plain tar (gzip undone), for `write_tar`.
pub(crate) fn read_archive(path: &Path) -> Result<Vec<u8>> {
    let io = |e| ImageError::io(format!("read {}", path.display()), e);
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}
