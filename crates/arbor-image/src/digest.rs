//! Content digests (`sha256:<hex>`): strict parsing, and hashing while a
//! stream passes through, so a blob is verified in the same pass that stores
//! or unpacks it.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, Result};

/// A content digest. Only `sha256` is accepted: it is what every registry and
/// archive in use writes, and one algorithm keeps cache keys unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: String,
    hex: String,
}

impl Digest {
    /// Parse `sha256:<64 lowercase hex>`; anything else is [`ImageError::Invalid`].
    pub fn parse(s: &str) -> Result<Digest> {
        let invalid =
            || ImageError::Invalid(format!("malformed digest {s:?} (want sha256:<64 hex>)"));
        let (algorithm, hex) = s.split_once(':').ok_or_else(invalid)?;
        let hex_ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if algorithm != "sha256" || !hex_ok {
            return Err(invalid());
        }
        Ok(Digest {
            algorithm: algorithm.to_string(),
            hex: hex.to_string(),
        })
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Digest {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    fn from_hasher(hasher: Sha256) -> Digest {
        Digest {
            algorithm: "sha256".to_string(),
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The algorithm (`sha256`).
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The lowercase hex of the hash.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `Invalid` naming `what` unless `actual` equals `self`.
    pub fn verify(&self, actual: &Digest, what: &str) -> Result<()> {
        if self == actual {
            Ok(())
        } else {
            Err(ImageError::Invalid(format!(
                "{what}: digest mismatch (expected {self}, content hashes to {actual})"
            )))
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl FromStr for Digest {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Digest> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A reader that hashes (and counts) everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Read `inner` to its end (so the digest covers all of it, e.g. tar
    /// padding a parser stops short of) and return the digest.
    pub fn drain_and_finish(mut self) -> io::Result<Digest> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.finish())
    }

    /// The digest of what was read.
    pub fn finish(self) -> Digest {
        Digest::from_hasher(self.hasher)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A writer that hashes (and counts) everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The digest of what was written, and the inner writer.
    pub fn finish(self) -> (Digest, W) {
        (Digest::from_hasher(self.hasher), self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The sha256 digest of a file's content.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<Digest> {
    let path = path.as_ref();
    let file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    HashingReader::new(file)
        .drain_and_finish()
        .map_err(|e| ImageError::io(format!("read {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_strict() {
        let hex = "a".repeat(64);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{hex}"),
            format!("sha256:{}", "a".repeat(63)),
            hex.clone(),
            format!("sha256:{hex}x"),
        ] {
            assert!(
                matches!(Digest::parse(&bad), Err(ImageError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn streams_hash_like_the_whole() {
        let data = b"hello layer".repeat(1000);
        let mut r = HashingReader::new(&data[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(r.bytes_read(), data.len() as u64);
        assert_eq!(r.finish(), Digest::sha256(&data));
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let (d, inner) = w.finish();
        assert_eq!(d, Digest::sha256(&data));
        assert_eq!(inner, data);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }
}
