//! The durable call store: an append-only JSON-lines log with group commit.
//!
//! Layout: `DIR/calls.jsonl`, one [`CallRecord`] per line. A dedicated writer thread appends
//! batches of records and `fdatasync`s them before acknowledging; a caller's response is only
//! completed after that acknowledgement, so a call whose response completed is on disk even if
//! the process is killed with SIGKILL. On open, a torn last line (a write cut by a crash) is
//! truncated away and records with an id already seen are skipped, so nothing is duplicated.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

use crate::error::GatewayError;
use crate::record::CallRecord;

/// File name of the log inside the store directory.
pub use arbor_trace::store::LOG_FILE;

/// Largest batch the writer commits with one fsync.
const MAX_BATCH: usize = 4096;

struct WriteReq {
    line: Vec<u8>,
    done: oneshot::Sender<std::io::Result<u64>>,
}

#[derive(Default)]
struct Index {
    /// session -> (offset, len) of each record, in index order.
    sessions: HashMap<String, Vec<(u64, u32)>>,
    total: usize,
}

/// The durable store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<WriteReq>>>,
    reader: File,
    index: Mutex<Index>,
}

/// What [`Store::open`] found on disk.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Records read back, in log order.
    pub records: Vec<CallRecord>,
    /// Bytes of a torn last line that were truncated away.
    pub truncated_bytes: u64,
    /// Records skipped because their id was already present.
    pub duplicates_skipped: usize,
    /// Lines in the middle of the log that could not be parsed (skipped).
    pub corrupt_lines: usize,
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovers what is on disk and starts the writer.
    pub fn open(dir: &Path) -> Result<(Store, Recovery), GatewayError> {
        let perr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| GatewayError::Path { path, source }
        };
        std::fs::create_dir_all(dir).map_err(perr(dir))?;
        let path = dir.join(LOG_FILE);
        let mut recovery = Recovery::default();
        let mut index = Index::default();
        let mut good_end: u64 = 0;
        if path.exists() {
            let f = File::open(&path).map_err(perr(&path))?;
            let len = f.metadata().map_err(perr(&path))?.len();
            let mut reader = BufReader::with_capacity(1 << 20, f);
            let mut offset: u64 = 0;
            let mut line = Vec::new();
            let mut seen = std::collections::HashSet::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(perr(&path))?;
                if n == 0 {
                    break;
                }
                let complete = line.last() == Some(&b'\n');
                let parsed = if complete {
                    serde_json::from_slice::<CallRecord>(&line[..n - 1]).ok()
                } else {
                    None
                };
                match parsed {
                    Some(rec) => {
                        if seen.insert(rec.id.clone()) {
                            index
                                .sessions
                                .entry(rec.session.clone())
                                .or_default()
                                .push((offset, (n - 1) as u32));
                            index.total += 1;
                            recovery.records.push(rec);
                        } else {
                            recovery.duplicates_skipped += 1;
                        }
                        good_end = offset + n as u64;
                    }
                    None if offset + n as u64 >= len => {
                        // The last line is torn: cut it off.
                        recovery.truncated_bytes = len - offset;
                    }
                    None => {
                        recovery.corrupt_lines += 1;
                        good_end = offset + n as u64;
                        tracing::warn!(offset, "skipping an unreadable line in the call log");
                    }
                }
                offset += n as u64;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(perr(&path))?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "truncating a torn record at the end of the call log"
            );
            file.set_len(good_end).map_err(perr(&path))?;
            file.sync_all().map_err(perr(&path))?;
        }
        // Make the directory entry durable too (new file).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        let reader = File::open(&path).map_err(perr(&path))?;
        let (tx, rx) = mpsc::channel::<WriteReq>();
        let start = good_end.max(file.metadata().map_err(perr(&path))?.len());
        std::thread::Builder::new()
            .name("arbor-gw-store".into())
            .spawn(move || writer_loop(file, start, rx))
            .map_err(GatewayError::Io)?;
        let store = Store {
            inner: Arc::new(StoreInner {
                path,
                tx: Mutex::new(Some(tx)),
                reader,
                index: Mutex::new(index),
            }),
        };
        Ok((store, recovery))
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends a record and returns once it is on disk (fdatasync'd).
    ///
    /// Records of one session must be appended in index order (the gateway holds a per-session
    /// lock around this call).
    pub async fn append(&self, record: &CallRecord) -> Result<(), GatewayError> {
        let mut line = serde_json::to_vec(record)?;
        let len = line.len() as u32;
        line.push(b'\n');
        let (done, wait) = oneshot::channel();
        {
            let tx = self
                .inner
                .tx
                .lock()
                .map_err(|_| GatewayError::StoreClosed)?;
            let tx = tx.as_ref().ok_or(GatewayError::StoreClosed)?;
            tx.send(WriteReq { line, done })
                .map_err(|_| GatewayError::StoreClosed)?;
        }
        let offset = wait.await.map_err(|_| GatewayError::StoreClosed)??;
        let mut index = self
            .inner
            .index
            .lock()
            .map_err(|_| GatewayError::StoreClosed)?;
        index
            .sessions
            .entry(record.session.clone())
            .or_default()
            .push((offset, len));
        index.total += 1;
        Ok(())
    }

    /// Number of records in the store.
    pub fn len(&self) -> usize {
        self.inner.index.lock().map(|i| i.total).unwrap_or(0)
    }

    /// True when the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Session ids with their number of calls, sorted by id.
    pub fn sessions(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = match self.inner.index.lock() {
            Ok(i) => i
                .sessions
                .iter()
                .map(|(k, v)| (k.clone(), v.len()))
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// Number of calls recorded for a session.
    pub fn session_len(&self, session: &str) -> usize {
        self.inner
            .index
            .lock()
            .map(|i| i.sessions.get(session).map_or(0, |v| v.len()))
            .unwrap_or(0)
    }

    /// Reads back the records of a session, in index order. `None` if the session is unknown.
    pub fn session(&self, session: &str) -> Result<Option<Vec<CallRecord>>, GatewayError> {
        let entries = match self.inner.index.lock() {
            Ok(i) => match i.sessions.get(session) {
                Some(e) => e.clone(),
                None => return Ok(None),
            },
            Err(_) => return Err(GatewayError::StoreClosed),
        };
        let mut out = Vec::with_capacity(entries.len());
        let mut buf = Vec::new();
        for (offset, len) in entries {
            buf.resize(len as usize, 0);
            self.inner
                .reader
                .read_exact_at(&mut buf, offset)
                .map_err(|source| GatewayError::Path {
                    path: self.inner.path.clone(),
                    source,
                })?;
            out.push(serde_json::from_slice(&buf)?);
        }
        Ok(Some(out))
    }

    /// Stops the writer after the records already queued are written.
    pub fn close(&self) {
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
    }
}

fn writer_loop(mut file: File, mut pos: u64, rx: mpsc::Receiver<WriteReq>) {
    let mut buf = Vec::with_capacity(1 << 20);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        buf.clear();
        let mut offsets = Vec::with_capacity(batch.len());
        for r in &batch {
            offsets.push(pos + buf.len() as u64);
            buf.extend_from_slice(&r.line);
        }
        let res = file.write_all(&buf).and_then(|_| file.sync_data());
        match res {
            Ok(()) => {
                pos += buf.len() as u64;
                for (r, off) in batch.into_iter().zip(offsets) {
                    let _ = r.done.send(Ok(off));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "writing the call log failed");
                // Cut back whatever part of the batch reached the file.
                let _ = file.set_len(pos);
                for r in batch {
                    let _ = r
                        .done
                        .send(Err(std::io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Api;
    use crate::record::{TokenSource, Tokens};
    use serde_json::json;

    fn rec(session: &str, index: u32) -> CallRecord {
        CallRecord {
            v: 1,
            id: format!("{session}/{index}"),
            session: session.into(),
            index,
            api: Api::Chat,
            stream: false,
            started_ms: 0,
            finished_ms: 0,
            upstream: "u".into(),
            upstream_id: None,
            model: None,
            request: json!({"messages": []}),
            upstream_request: json!({}),
            response: json!({}),
            usage: None,
            tokens: Tokens {
                source: TokenSource::None,
                prompt: vec![],
                completions: vec![],
            },
            branch: None,
        }
    }

    #[tokio::test]
    async fn recovers_torn_tail_and_skips_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rec0) = Store::open(dir.path()).unwrap();
        assert!(rec0.records.is_empty());
        for i in 0..3 {
            store.append(&rec("a", i)).await.unwrap();
        }
        store.append(&rec("b", 0)).await.unwrap();
        assert_eq!(store.session("a").unwrap().unwrap().len(), 3);
        store.close();
        // A duplicated line and a torn last line, as a crash could leave them.
        let path = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let first_line_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        let dup = bytes[..first_line_end].to_vec();
        bytes.extend_from_slice(&dup);
        bytes.extend_from_slice(b"{\"v\":1,\"id\":\"a/3\",\"sess");
        std::fs::write(&path, &bytes).unwrap();
        let (store, rec1) = Store::open(dir.path()).unwrap();
        assert_eq!(rec1.records.len(), 4);
        assert_eq!(rec1.duplicates_skipped, 1);
        assert!(rec1.truncated_bytes > 0);
        assert_eq!(store.len(), 4);
        store.append(&rec("a", 3)).await.unwrap();
        let a = store.session("a").unwrap().unwrap();
        assert_eq!(
            a.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        store.close();
        let (_, rec2) = Store::open(dir.path()).unwrap();
        assert_eq!(rec2.records.len(), 5);
        assert_eq!(rec2.truncated_bytes, 0);
    }
}
