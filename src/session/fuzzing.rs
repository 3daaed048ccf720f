//! Fuzz body for the session tracker, shared by `fuzz/fuzz_targets/session_track.rs` and the
//! corpus smoke test (stable, in CI). Not part of the supported API.
//!
//! Input: records of one head byte and up to 127 bytes; the head's high bit says the
//! direction (0: client, 1: server), its low bits the record's length. Each direction keeps
//! its own buffer, so frames span records as they span reads. [`encode`] writes a recorded
//! exchange in this shape (the seeds are real clients' traffic).

use super::{Limits, Tracker};

const FUZZ_MESSAGE_BYTES_MAX: usize = 1 << 16;

/// Feeds `data` through a tracker with small bounds; checks that it returns (`Ok` or `Err`,
/// never a panic) and that its counts stay consistent.
pub fn fuzz_session(data: &[u8]) {
    let mut tracker = Tracker::new(Limits {
        names_max: 8,
        settings_max: 4,
        statements: true,
        settings: true,
    });
    let mut buffers: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        let side = usize::from(head >> 7);
        let buf = &mut buffers[side];
        buf.extend_from_slice(chunk);
        let fed = if side == 0 {
            tracker.client_bytes(buf, FUZZ_MESSAGE_BYTES_MAX)
        } else {
            tracker.server_bytes(buf, FUZZ_MESSAGE_BYTES_MAX)
        };
        match fed {
            Ok(n) => {
                assert!(n <= buf.len(), "fed past the buffer");
                buf.drain(..n);
            }
            // The connection would be closed; the fuzzer goes on with fresh bytes.
            Err(_) => buf.clear(),
        }
        let (opened, answered) = tracker.sync_points();
        assert!(answered <= opened, "more answers than sync points");
        let (statements, portals) = tracker.names();
        assert!(statements <= 8 && portals <= 9, "names beyond their bound");
    }
}

/// Writes a recorded exchange (`true`: client → server) in the fuzz input's shape.
pub fn encode(chunks: &[(bool, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (from_client, bytes) in chunks {
        for piece in bytes.chunks(0x7f) {
            out.push(piece.len() as u8 | if *from_client { 0 } else { 0x80 });
            out.extend_from_slice(piece);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The CI smoke run of the session fuzzer: every committed corpus file.
    #[test]
    fn corpus_smoke() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/session_track");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
            fuzz_session(&data);
            files += 1;
        }
        assert!(files >= 5, "only {files} corpus files");
    }
}
