//! Streamed transactions (pgoutput protocol v2 `Stream Start` ... `Stream Commit`) waiting for
//! their commit: in memory up to `cdc.stream-buffer-bytes-max` over all of them, beyond that
//! in spill files (see [`super::spill`]) up to `cdc.spill-bytes-max`, the largest transaction
//! first. A subtransaction's abort drops its messages; a transaction's abort drops all of
//! them, and its file. At Stream Commit the messages come back in order through [`Replay`],
//! one at a time, so a transaction larger than memory is applied in bounded memory.
//!
//! This module must never lose or reorder a message of a transaction that commits, and
//! never hold more than the memory bound in memory.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use bytes::Bytes;

use super::spill::{SpillError, SpillReader, SpillWriter};

/// Where and how much to spill.
#[derive(Debug, Clone)]
pub struct SpillLimits {
    pub dir: PathBuf,
    /// File names start with the slot.
    pub slot: String,
    pub bytes_max: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "streamed transactions hold more than cdc.stream-buffer-bytes-max ({max} bytes) in memory and spilling is off"
    )]
    MemoryFull { max: usize },
    #[error(
        "streamed transactions need more than cdc.spill-bytes-max ({max} bytes) of spill files; raise it (nothing was confirmed past them)"
    )]
    SpillFull { max: u64 },
    #[error(transparent)]
    Spill(#[from] SpillError),
}

enum Buffered {
    Memory {
        /// (subtransaction xid, payload) in arrival order.
        messages: Vec<(u32, Bytes)>,
        bytes: usize,
    },
    Spilled {
        file: SpillWriter,
        aborted: HashSet<u32>,
    },
}

/// Figures for `/cdc/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamStats {
    pub memory_bytes: u64,
    pub memory_bytes_peak: u64,
    pub spill_bytes: u64,
    pub spilled_bytes_total: u64,
    pub transactions_spilled_total: u64,
}

pub struct StreamBuffers {
    memory_bytes_max: usize,
    spill: Option<SpillLimits>,
    streams: HashMap<u32, Buffered>,
    stats: StreamStats,
}

impl StreamBuffers {
    pub fn new(memory_bytes_max: usize) -> StreamBuffers {
        StreamBuffers {
            memory_bytes_max,
            spill: None,
            streams: HashMap::new(),
            stats: StreamStats::default(),
        }
    }

    /// Spills beyond the memory bound instead of failing.
    pub fn set_spill(&mut self, limits: SpillLimits) {
        self.spill = Some(limits);
    }

    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// A Stream Start: the transaction is pending from now on.
    pub fn start(&mut self, xid: u32) {
        self.streams.entry(xid).or_insert_with(|| Buffered::Memory {
            messages: Vec::new(),
            bytes: 0,
        });
    }

    /// Keeps one message of transaction `top` (from its subtransaction `sub`).
    pub fn push(&mut self, top: u32, sub: u32, payload: &Bytes) -> Result<(), StreamError> {
        let len = payload.len();
        if !matches!(self.streams.get(&top), Some(Buffered::Spilled { .. })) {
            // Make room, the largest transaction in memory going to disk first.
            while self.stats.memory_bytes as usize + len > self.memory_bytes_max {
                let Some(xid) = self.largest_in_memory() else {
                    break;
                };
                self.spill_to_file(xid)?;
            }
        }
        let fits = self.stats.memory_bytes as usize + len <= self.memory_bytes_max;
        match self.streams.get(&top) {
            Some(Buffered::Spilled { .. }) => self.append(top, sub, payload),
            _ if !fits => {
                self.start(top);
                self.spill_to_file(top)?;
                self.append(top, sub, payload)
            }
            _ => {
                self.start(top);
                if let Some(Buffered::Memory { messages, bytes }) = self.streams.get_mut(&top) {
                    messages.push((sub, payload.clone()));
                    *bytes += len;
                }
                self.stats.memory_bytes += len as u64;
                self.stats.memory_bytes_peak =
                    self.stats.memory_bytes_peak.max(self.stats.memory_bytes);
                Ok(())
            }
        }
    }

    fn largest_in_memory(&self) -> Option<u32> {
        self.streams
            .iter()
            .filter_map(|(xid, b)| match b {
                Buffered::Memory { bytes, .. } if *bytes > 0 => Some((*bytes, *xid)),
                _ => None,
            })
            .max()
            .map(|(_, xid)| xid)
    }

    /// Moves a transaction's messages from memory into a new spill file.
    fn spill_to_file(&mut self, xid: u32) -> Result<(), StreamError> {
        let Some(limits) = &self.spill else {
            return Err(StreamError::MemoryFull {
                max: self.memory_bytes_max,
            });
        };
        let file = SpillWriter::create(&limits.dir, &limits.slot, xid)?;
        let old = self.streams.remove(&xid);
        let (messages, bytes) = match old {
            Some(Buffered::Memory { messages, bytes }) => (messages, bytes),
            Some(spilled) => {
                self.streams.insert(xid, spilled);
                return Ok(());
            }
            None => (Vec::new(), 0),
        };
        self.stats.memory_bytes -= bytes as u64;
        self.stats.transactions_spilled_total += 1;
        tracing::debug!(xid, bytes, "spilling a streamed transaction to disk");
        // Written below through `append`, which checks the bound.
        self.streams.insert(
            xid,
            Buffered::Spilled {
                file,
                aborted: HashSet::new(),
            },
        );
        for (sub, payload) in &messages {
            self.append(xid, *sub, payload)?;
        }
        Ok(())
    }

    fn append(&mut self, xid: u32, sub: u32, payload: &[u8]) -> Result<(), StreamError> {
        let (Some(limits), Some(Buffered::Spilled { file, .. })) =
            (&self.spill, self.streams.get_mut(&xid))
        else {
            return Ok(());
        };
        let grows = 8 + payload.len() as u64;
        if self.stats.spill_bytes + grows > limits.bytes_max {
            return Err(StreamError::SpillFull {
                max: limits.bytes_max,
            });
        }
        file.append(sub, payload)?;
        self.stats.spill_bytes += grows;
        self.stats.spilled_bytes_total += grows;
        Ok(())
    }

    /// A Stream Abort: the whole transaction (`subxid == xid`) or one subtransaction.
    pub fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(b) = self.streams.remove(&xid) {
                self.forget(&b);
            }
            return;
        }
        match self.streams.get_mut(&xid) {
            Some(Buffered::Memory { messages, bytes }) => {
                let before = *bytes;
                messages.retain(|(sub, _)| *sub != subxid);
                *bytes = messages.iter().map(|m| m.1.len()).sum();
                self.stats.memory_bytes -= (before - *bytes) as u64;
            }
            // Its records stay in the file until the commit, which skips them.
            Some(Buffered::Spilled { aborted, .. }) => {
                aborted.insert(subxid);
            }
            None => {}
        }
    }

    fn forget(&mut self, b: &Buffered) {
        match b {
            Buffered::Memory { bytes, .. } => self.stats.memory_bytes -= *bytes as u64,
            Buffered::Spilled { file, .. } => self.stats.spill_bytes -= file.bytes(),
        }
    }

    /// A Stream Commit: the transaction's messages, in order (none if it sent none).
    pub fn take(&mut self, xid: u32) -> Result<Replay, StreamError> {
        let Some(b) = self.streams.remove(&xid) else {
            return Ok(Replay::Memory {
                messages: Vec::new().into_iter(),
                current: Bytes::new(),
            });
        };
        self.forget(&b);
        Ok(match b {
            Buffered::Memory { messages, .. } => Replay::Memory {
                messages: messages.into_iter(),
                current: Bytes::new(),
            },
            Buffered::Spilled { file, aborted } => Replay::Spilled {
                reader: file.into_reader()?,
                aborted,
            },
        })
    }
}

/// A committed streamed transaction's messages, read back one at a time.
pub enum Replay {
    Memory {
        messages: std::vec::IntoIter<(u32, Bytes)>,
        current: Bytes,
    },
    Spilled {
        reader: SpillReader,
        aborted: HashSet<u32>,
    },
}

impl Replay {
    /// The next message's payload, skipping aborted subtransactions'.
    pub fn next_message(&mut self) -> Result<Option<&[u8]>, SpillError> {
        match self {
            Replay::Memory { messages, current } => Ok(match messages.next() {
                Some((_, bytes)) => {
                    *current = bytes;
                    Some(&current[..])
                }
                None => None,
            }),
            Replay::Spilled { reader, aborted } => loop {
                match reader.next_record()? {
                    None => return Ok(None),
                    Some(sub) if aborted.contains(&sub) => continue,
                    Some(_) => break Ok(Some(reader.payload())),
                }
            },
        }
    }
}
