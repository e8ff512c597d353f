//! Built-in file operations, run inside the sandbox by a confined child of
//! init. Data flows over the child's stdin/stdout pipes, so large files never
//! touch the control socket and paths resolve in the sandbox's own root.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::protocol::ExecKind;

/// Perform a file operation; errors are printed by the caller.
pub fn run(kind: ExecKind) -> Result<(), String> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    match kind {
        ExecKind::WriteFile { path, mode } => {
            let p = Path::new(&path);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| format!("create {}: {e}", parent.display()))?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(p)
                .map_err(|e| format!("open {path}: {e}"))?;
            io::copy(&mut stdin.lock(), &mut f).map_err(|e| format!("write {path}: {e}"))?;
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {path}: {e}"))?;
            Ok(())
        }
        ExecKind::ReadFile { path } => {
            let mut f = fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
            if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(format!("{path} is a directory (read it as an archive)"));
            }
            let mut out = stdout.lock();
            io::copy(&mut f, &mut out).map_err(|e| format!("read {path}: {e}"))?;
            out.flush().map_err(|e| format!("read {path}: {e}"))
        }
        ExecKind::WriteTar { dest } => {
            fs::create_dir_all(&dest).map_err(|e| format!("create {dest}: {e}"))?;
            let mut archive = tar::Archive::new(stdin.lock());
            archive.set_preserve_permissions(true);
            archive.set_preserve_mtime(true);
            archive.set_overwrite(true);
            archive
                .unpack(&dest)
                .map_err(|e| format!("unpack into {dest}: {e}"))
        }
        ExecKind::ReadTar { path } => {
            let p = Path::new(&path);
            let meta = fs::symlink_metadata(p).map_err(|e| format!("{path}: {e}"))?;
            let mut builder = tar::Builder::new(BufWriter::new(stdout.lock()));
            builder.follow_symlinks(false);
            if meta.is_dir() {
                builder
                    .append_dir_all(".", p)
                    .map_err(|e| format!("archive {path}: {e}"))?;
            } else {
                let name = p
                    .file_name()
                    .ok_or_else(|| format!("{path}: no file name"))?;
                builder
                    .append_path_with_name(p, name)
                    .map_err(|e| format!("archive {path}: {e}"))?;
            }
            builder
                .into_inner()
                .and_then(|mut w| w.flush())
                .map_err(|e| format!("archive {path}: {e}"))
        }
        ExecKind::Command { .. } => Err("not a file operation".into()),
    }
}
