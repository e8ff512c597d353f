//! Reading named files of an image archive, whether it is a directory or a
//! tar (plain, or gzipped: then unpacked to one scratch file first, since a
//! gzip stream cannot be read out of order).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::error::{ImageError, Result};
use crate::store::Store;

/// JSON documents (manifests, indexes, configs) larger than this are refused.
const MAX_JSON: u64 = 16 << 20;

/// An archive's files by name (`blobs/sha256/<hex>`, `manifest.json`, ...).
pub(super) enum Source {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        /// name -> (offset, size) of each regular file's content.
        files: HashMap<String, (u64, u64)>,
        /// name -> target name, for symlinks and hard links.
        links: HashMap<String, String>,
        /// A decompressed copy to delete when done.
        scratch: Option<PathBuf>,
    },
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Tar {
            scratch: Some(path),
            ..
        } = self
        {
            let _ = fs::remove_file(path);
        }
    }
}

impl Source {
    /// Open `path`: a directory as is, a tar by indexing its entries; a
    /// gzipped tar is decompressed into the store's scratch space first.
    pub fn open(path: &Path, store: &Store) -> Result<Source> {
        let io_err = |e| ImageError::io(format!("read archive {}", path.display()), e);
        if path.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
        let gzipped = reader
            .fill_buf()
            .map_err(io_err)?
            .starts_with(&[0x1f, 0x8b]);
        if !gzipped {
            return Self::index_tar(path.to_path_buf(), None);
        }
        let plain = store.scratch_path("archive.tar");
        let copy = File::create(&plain)
            .and_then(|mut out| io::copy(&mut MultiGzDecoder::new(reader), &mut out));
        if let Err(e) = copy {
            let _ = fs::remove_file(&plain);
            return Err(ImageError::Invalid(format!(
                "archive {}: bad gzip stream: {e}",
                path.display()
            )));
        }
        Self::index_tar(plain.clone(), Some(plain))
    }

    fn index_tar(file: PathBuf, scratch: Option<PathBuf>) -> Result<Source> {
        let bad = |e: io::Error| ImageError::Invalid(format!("archive {}: {e}", file.display()));
        let (mut files, mut links) = (HashMap::new(), HashMap::new());
        let handle = File::open(&file)
            .map_err(|e| ImageError::io(format!("read archive {}", file.display()), e))?;
        let mut archive = tar::Archive::new(handle);
        for entry in archive.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Ok(name) = clean(&raw) else { continue };
            let kind = entry.header().entry_type();
            if kind.is_file() {
                files.insert(name, (entry.raw_file_position(), entry.size()));
            } else if kind.is_symlink() || kind.is_hard_link() {
                let target = String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default())
                    .into_owned();
                // Symlinks are relative to their directory, hard links to the root.
                let joined = match (kind.is_symlink(), name.rsplit_once('/')) {
                    (true, Some((dir, _))) => format!("{dir}/{target}"),
                    _ => target,
                };
                if let Ok(target) = clean(&joined) {
                    links.insert(name, target);
                }
            }
        }
        Ok(Source::Tar {
            file,
            files,
            links,
            scratch,
        })
    }

    /// Whether the archive has a file `name`.
    pub fn exists(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => clean(name).is_ok_and(|n| dir.join(n).is_file()),
            Source::Tar { .. } => self.locate(name).is_some(),
        }
    }

    /// Read the file `name`.
    pub fn open_file(&self, name: &str) -> Result<Box<dyn Read + '_>> {
        let missing = || ImageError::Invalid(format!("archive has no file {name}"));
        match self {
            Source::Dir(dir) => {
                let path = dir.join(clean(name)?);
                match File::open(&path) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
                    Err(e) => Err(ImageError::io(format!("read {}", path.display()), e)),
                }
            }
            Source::Tar { file, .. } => {
                let (offset, size) = self.locate(name).ok_or_else(missing)?;
                let mut f = File::open(file)
                    .map_err(|e| ImageError::io(format!("read {}", file.display()), e))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| ImageError::io(format!("read {}", file.display()), e))?;
                Ok(Box::new(f.take(size)))
            }
        }
    }

    /// Read a JSON document of the archive.
    pub fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_file(name)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut out)
            .map_err(|e| ImageError::io(format!("read {name} from archive"), e))?;
        if out.len() as u64 > MAX_JSON {
            return Err(ImageError::Invalid(format!(
                "archive file {name} is too large for a JSON document"
            )));
        }
        Ok(out)
    }

    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let Source::Tar { files, links, .. } = self else {
            return None;
        };
        let mut name = clean(name).ok()?;
        // Follow links a few hops (docker writes `<id>/layer.tar -> ../blobs/...`).
        for _ in 0..8 {
            if let Some(found) = files.get(&name) {
                return Some(*found);
            }
            name = links.get(&name)?.clone();
        }
        None
    }
}

/// `name` as `a/b/c`: `.` dropped, `..` resolved inside the archive, refused
/// above its root or when absolute.
pub(super) fn clean(name: &str) -> Result<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
            Component::CurDir => {}
            Component::ParentDir if parts.pop().is_some() => {}
            _ => {
                return Err(ImageError::Invalid(format!(
                    "archive path {name:?} leaves the archive"
                )));
            }
        }
    }
    if parts.is_empty() {
        return Err(ImageError::Invalid(format!("empty archive path {name:?}")));
    }
    Ok(parts.join("/"))
}
