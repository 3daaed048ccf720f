//! Spill files: the streamed (in-progress) transactions that no longer fit in
//! `cdc.stream-buffer-bytes-max` are kept on disk under `cdc.spill-dir` until their Stream
//! Commit, then read back one message at a time.
//!
//! One file per top-level transaction, `{slot}-{xid}.spill`, of records `subxid: u32`,
//! `len: u32`, the pgoutput payload. The files of a run that crashed are removed at the next
//! start (the stream sends those transactions again from their first change); a file is
//! removed when its transaction commits or aborts. The total size is bounded by
//! `cdc.spill-bytes-max`.
//!
//! This module must never let a write error pass silently (a full disk stops the stream, and
//! nothing is confirmed past the transaction), and never read a record beyond the file's end.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// A spill file error, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("spill file {path}: {what}")]
pub struct SpillError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SpillError {
    let path = path.to_path_buf();
    move |source| SpillError { path, what, source }
}

const WRITE_BUFFER_BYTES: usize = 256 << 10;

/// Removes the spill files a crashed run of `slot` left in `dir` (creating `dir` if missing);
/// returns how many.
pub fn remove_leftovers(dir: &Path, slot: &str) -> Result<usize, SpillError> {
    std::fs::create_dir_all(dir).map_err(io(dir, "cannot create the spill directory"))?;
    let prefix = format!("{slot}-");
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(io(dir, "cannot list the spill directory"))? {
        let entry = entry.map_err(io(dir, "cannot list the spill directory"))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".spill"))
            .is_some_and(|xid| !xid.is_empty() && xid.bytes().all(|b| b.is_ascii_digit()));
        if ours {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io(&path, "cannot remove a leftover file"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A transaction's spill file while it is written.
pub struct SpillWriter {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    bytes: u64,
}

impl SpillWriter {
    pub fn create(dir: &Path, slot: &str, xid: u32) -> Result<SpillWriter, SpillError> {
        let path = dir.join(format!("{slot}-{xid}.spill"));
        let file = File::create(&path).map_err(io(&path, "cannot create"))?;
        Ok(SpillWriter {
            out: Some(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file)),
            path,
            bytes: 0,
        })
    }

    /// Bytes written (records included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn append(&mut self, subxid: u32, payload: &[u8]) -> Result<(), SpillError> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let len = u32::try_from(payload.len()).map_err(|_| SpillError {
            path: self.path.clone(),
            what: "a message above 4 GiB",
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let write = |out: &mut BufWriter<File>| {
            out.write_all(&subxid.to_le_bytes())?;
            out.write_all(&len.to_le_bytes())?;
            out.write_all(payload)
        };
        write(out).map_err(io(&self.path, "cannot write (is the disk full?)"))?;
        self.bytes += 8 + payload.len() as u64;
        Ok(())
    }

    /// Flushes the file and opens it for reading from the start.
    pub fn into_reader(mut self) -> Result<SpillReader, SpillError> {
        if let Some(out) = self.out.take() {
            out.into_inner()
                .map_err(|e| e.into_error())
                .map_err(io(&self.path, "cannot write (is the disk full?)"))?;
        }
        let file = File::open(&self.path).map_err(io(&self.path, "cannot reopen"))?;
        Ok(SpillReader {
            input: BufReader::with_capacity(WRITE_BUFFER_BYTES, file),
            path: std::mem::take(&mut self.path),
            left: self.bytes,
            buf: Vec::new(),
        })
    }
}

impl Drop for SpillWriter {
    fn drop(&mut self) {
        // An aborted transaction, or one handed to a reader (which then owns the file).
        if !self.path.as_os_str().is_empty() {
            drop(self.out.take());
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A spilled transaction read back in order; the file is removed when this is dropped.
pub struct SpillReader {
    input: BufReader<File>,
    path: PathBuf,
    /// Bytes written that are not read yet: a record can never run past them.
    left: u64,
    buf: Vec<u8>,
}

impl SpillReader {
    /// Reads the next record and returns its subtransaction xid ([`SpillReader::payload`]
    /// has its payload), or `None` at the end.
    pub fn next_record(&mut self) -> Result<Option<u32>, SpillError> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut head = [0u8; 8];
        self.input
            .read_exact(&mut head)
            .map_err(io(&self.path, "cannot read"))?;
        let subxid = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
        if 8 + len > self.left {
            return Err(SpillError {
                path: self.path.clone(),
                what: "a record runs past what was written",
                source: std::io::ErrorKind::InvalidData.into(),
            });
        }
        self.left -= 8 + len;
        self.buf.resize(len as usize, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(io(&self.path, "cannot read"))?;
        Ok(Some(subxid))
    }

    /// The payload of the record read last.
    pub fn payload(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for SpillReader {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_and_files_go_away() {
        let dir = std::env::temp_dir().join(format!("pgprism-spill-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s-17.spill"), b"left by a crash").unwrap();
        std::fs::write(dir.join("other-17.spill"), b"another slot's").unwrap();
        assert_eq!(remove_leftovers(&dir, "s").unwrap(), 1);
        assert!(dir.join("other-17.spill").exists());

        let mut w = SpillWriter::create(&dir, "s", 42).unwrap();
        w.append(42, b"first").unwrap();
        w.append(43, b"").unwrap();
        w.append(42, &[7u8; 300_000]).unwrap();
        assert_eq!(w.bytes(), 24 + 5 + 300_000);
        let path = dir.join("s-42.spill");
        assert!(path.exists());
        let mut r = w.into_reader().unwrap();
        assert_eq!(r.next_record().unwrap(), Some(42));
        assert_eq!(r.payload(), b"first");
        assert_eq!(r.next_record().unwrap(), Some(43));
        assert_eq!(r.payload(), b"");
        assert_eq!(r.next_record().unwrap(), Some(42));
        assert_eq!(r.payload(), &[7u8; 300_000][..]);
        assert_eq!(r.next_record().unwrap(), None);
        drop(r);
        assert!(!path.exists(), "read back: removed");

        let mut w = SpillWriter::create(&dir, "s", 43).unwrap();
        w.append(43, b"aborted").unwrap();
        drop(w);
        assert!(!dir.join("s-43.spill").exists(), "aborted: removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
