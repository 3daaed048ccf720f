//! DBLog watermark windows, the part that lives in the stream (sans-IO, fed by the pipeline).
//!
//! A snapshot worker writes a low watermark into the WAL, reads one chunk of a table (a
//! primary-key range), and writes a high watermark (Andreadis & Kozlowski, "DBLog: A
//! Watermark Based Change-Data-Capture Framework", 2020). The chunk's rows wait here until
//! the stream reaches the high watermark; every key the stream changed between the two
//! watermarks is dropped from the chunk, because the stream already carries a newer (or the
//! same) version of that row. The rows left are emitted at the high watermark's place in the
//! stream, so every change after it lands on top of them. No exported snapshot is needed,
//! which is what makes a chunk correct on its own, and so the snapshot resumable.
//!
//! PostgreSQL makes a committed transaction visible slightly after its commit record is in
//! the WAL. A transaction that committed before the low watermark but was still invisible
//! to the chunk's SELECT would leave that chunk older than the stream for the rows it
//! changed. The worker therefore hands over the SELECT's in-progress transaction ids
//! (`pg_snapshot_xip`) and its `pg_snapshot_xmax` (xids from it on are invisible too, and in
//! no xip: a transaction can commit before the low watermark and still be running, with a
//! higher xid, when the SELECT takes its snapshot). While the snapshot copies, this module remembers the last
//! [`RECENT_COMMITS`] commits and the keys each changed (at most `keys_max` keys over all of
//! them): the keys of such a straggler are dropped from the chunk like the keys changed
//! inside the window, since the stream carried the straggler's versions before the low
//! watermark. Only when its keys are no longer remembered is the chunk refused and read
//! again. (On a busy, loaded server a committing transaction is often caught between its
//! commit record and its visibility; refusing every such chunk made the snapshot fail after
//! `snapshot-chunk-attempts-max` unlucky reads.)
//!
//! The window drops the chunk's rows by key, one by one, never by the chunk's key range:
//! which keys a chunk holds is all it needs, so a `ctid` chunk (whole heap pages, its rows in
//! no key order) is judged exactly like a key range. A row changed inside the window and
//! moved out of the chunk's pages is not in the chunk, and nothing is dropped for it; a row
//! moved into them is in the chunk at its newer version, and dropped (the stream has it).
//!
//! This module must never emit a chunk row whose key the stream changed inside its window,
//! and never emit a chunk it cannot vouch for: it refuses instead, and the worker retries.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use super::Span;
use crate::cdc::lsn::Lsn;
use crate::cdc::pipeline::{Batch, BodyFormat};

/// The logical-message prefix of the watermarks (`pg_logical_emit_message`).
pub const WATERMARK_PREFIX: &str = "pgprism-snapshot";

/// Commits remembered for the visibility check (about 16 bytes each). A transaction whose
/// commit record preceded the low watermark by more commits than this while it was still
/// invisible to the chunk's SELECT would go unnoticed; PostgreSQL makes a transaction visible
/// microseconds after its commit record, so in practice none does.
pub const RECENT_COMMITS: usize = 65_536;

/// A piece's keys and row ranges (see [`Piece`]), kept for another piece.
type KeyLists = (Vec<u8>, Vec<(u32, u32, u32)>);

/// A chunk a worker read, waiting for its high watermark.
pub struct Fetched {
    /// The source table (`schema.table`).
    pub table: String,
    /// The number of the chunk's range within its table.
    pub chunk: u32,
    /// The keys the chunk covers, for its record in the chunk table.
    pub span: Span,
    /// StarRocks Stream Load bodies of at most `flush-bytes` each, with the key of each row.
    pub pieces: Vec<Piece>,
    /// How the bodies are written (every piece of a chunk alike).
    pub format: BodyFormat,
    /// The StarRocks table and `columns` header.
    pub target: String,
    pub columns: String,
    /// Label prefix; the piece number is appended.
    pub label: String,
    /// Transactions in progress for the chunk's SELECT (low 32 bits of their ids).
    pub xip: Vec<u32>,
    /// The SELECT's snapshot's xmax (low 32 bits; `None`: not read): every transaction from
    /// it on is invisible to the chunk and is not in `xip`.
    pub xmax: Option<u32>,
    /// Where the worker hears whether its chunk was taken.
    pub reply: Sender<Verdict>,
    /// A round of the keys whose changes left a TOAST value out (see
    /// [`Exchange::note_change`]): at its high watermark the stream says whether the table
    /// is complete.
    pub keys_round: bool,
}

/// One Stream Load body of chunk rows (`[row,row,...]` in JSON, one line per row in CSV) and,
/// per row, its key and byte range.
#[derive(Default)]
pub struct Piece {
    pub body: Vec<u8>,
    /// Every row's key ([`encode_key`]), one after the other: one buffer, not one
    /// allocation per row.
    pub keys: Vec<u8>,
    /// Per row: where its key ends in `keys` (it starts where the previous one's ended), and
    /// its byte range in `body`.
    pub rows: Vec<(u32, u32, u32)>,
}

impl Piece {
    /// Appends a row: its key, then its bytes already written to `body` from `start`.
    pub fn push_row(&mut self, key: &[u8], start: u32) {
        self.keys.extend_from_slice(key);
        self.rows
            .push((self.keys.len() as u32, start, self.body.len() as u32));
    }

    /// The last row's key, if any.
    pub fn last_key(&self) -> Option<&[u8]> {
        let n = self.rows.len();
        let end = self.rows.get(n.checked_sub(1)?)?.0 as usize;
        let start = n.checked_sub(2).map_or(0, |i| self.rows[i].0 as usize);
        self.keys.get(start..end)
    }

    /// The rows: key, start and end in `body`.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u32, u32)> {
        let mut from = 0usize;
        self.rows.iter().map(move |&(k, start, end)| {
            let key = self.keys.get(from..k as usize).unwrap_or_default();
            from = k as usize;
            (key, start, end)
        })
    }
}

/// What became of a chunk at its high watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its rows were handed to the loader (this many, after dropping changed keys).
    Taken { rows: u64, dropped: u64 },
    /// The window cannot vouch for it: read it again (`reason` for the log).
    Retry { reason: &'static str },
}

/// Chunks read by the workers, by watermark id, until the stream reaches their high
/// watermark. A worker puts its chunk here before it writes that watermark.
#[derive(Default)]
pub struct Exchange {
    fetched: Mutex<HashMap<u64, Fetched>>,
    /// Emitted pieces' key lists, emptied, for the workers' next chunks (like the bodies, see
    /// `snapshot::Bodies`: a fresh list is memory the kernel maps and zeroes as it grows).
    spare: Mutex<Vec<KeyLists>>,
    /// Spare key lists kept at most: as many as the bodies (see `snapshot::Bodies`).
    spare_max: std::sync::atomic::AtomicUsize,
    /// Every worker has stopped: no more low watermarks will come.
    workers_done: std::sync::atomic::AtomicBool,
    /// Per table being copied: the keys whose row StarRocks may lack.
    partial: Mutex<HashMap<String, PartialKeys>>,
    /// Keys kept per table at most (`snapshot-partial-keys-max`).
    partial_max: std::sync::atomic::AtomicUsize,
    /// `partial` changed since [`Exchange::partial_state`] last took it.
    partial_dirty: std::sync::atomic::AtomicBool,
}

/// One table's [`PartialKeys`] as the chunk table keeps them (see
/// [`Windows::partial_state`]): the keys owed (those of a round in flight too), whether the
/// rounds began, and whether the table is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialState {
    pub table: String,
    pub keys: Vec<Box<[u8]>>,
    pub frozen: bool,
    pub done: bool,
    /// More keys than the bound were left partial: `keys` is not all that is owed, and the
    /// table must be copied again from its start (see `snapshot::resume`).
    pub overflow: bool,
}

/// The keys of one table whose last change, while the table's snapshot copies, left an
/// unchanged TOAST value out, so that StarRocks got a partial row.
///
/// Why they are read again: a `ctid` chunk misses a row an UPDATE moved to a page already
/// read (and any chunk drops a row changed inside its window). The stream's change is then
/// all StarRocks gets of that row, which is whole unless it left a TOAST value out: the fill
/// (`cdc::fill`) then finds no row in StarRocks and the value is lost. So every such key is
/// remembered until a whole change of the row (an insert, an update that carried every
/// value, a delete) comes, and once the table's ranges are all copied, the keys left are
/// read again by key, in rounds under DBLog windows of their own, until a round's high
/// watermark finds none left.
///
/// The first round starts (`frozen`) only once every chunk of the table was taken; from then
/// on no key is added: every row not owed is in StarRocks by then (its range's chunk loaded
/// it, or a whole change did), and a partial change of it is filled from StarRocks (a key of
/// the round in flight is owed again by the round's window, see [`Exchange::note_change`]).
#[derive(Default)]
struct PartialKeys {
    keys: HashSet<Box<[u8]>>,
    /// Keys taken by the round in flight: a partial change of one inside its window drops it
    /// from the round, so it is remembered again.
    round: HashSet<Box<[u8]>>,
    frozen: bool,
    /// More keys than the bound: the table cannot be completed.
    overflow: bool,
    /// Keys owed when the round in flight took its own (see [`Exchange::close_round`]).
    owed_at_take: usize,
    /// Rounds in a row that left as many keys owed as they found.
    stalled: u32,
    /// The table is complete: nothing is remembered any more.
    done: bool,
}

/// What a keys round takes ([`Exchange::take_partial`]).
pub enum PartialRound {
    Keys(Vec<Box<[u8]>>),
    /// More keys than `snapshot-partial-keys-max` were remembered.
    Overflow,
}

impl Exchange {
    /// The last worker stopped (the stream stops remembering keys once no window is open).
    pub fn set_workers_done(&self) {
        self.workers_done
            .store(true, std::sync::atomic::Ordering::Release);
        if let Ok(mut s) = self.spare.lock() {
            *s = Vec::new();
        }
    }

    fn workers_done(&self) -> bool {
        self.workers_done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A piece with empty key lists: spare ones, or new ones. Its body is left empty.
    pub fn piece(&self) -> Piece {
        let (keys, rows) = self
            .spare
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default();
        Piece {
            body: Vec::new(),
            keys,
            rows,
        }
    }

    /// Keeps up to `max` spare key lists from now on (see `snapshot::Bodies::open`).
    pub fn keep_spares(&self, max: usize) {
        self.spare_max
            .store(max, std::sync::atomic::Ordering::Release);
    }

    /// An emitted piece's key lists, kept while the workers copy (at most as many as
    /// [`Exchange::keep_spares`] said).
    fn give_keys(&self, piece: Piece) {
        if self.workers_done() {
            return;
        }
        let (mut keys, mut rows) = (piece.keys, piece.rows);
        keys.clear();
        rows.clear();
        if let Ok(mut s) = self.spare.lock()
            && s.len() < self.spare_max.load(std::sync::atomic::Ordering::Acquire)
        {
            s.push((keys, rows));
        }
    }

    /// The tables whose snapshot copies (their partial keys are remembered), and the bound.
    pub fn watch_partial(&self, tables: impl Iterator<Item = String>, max: usize) {
        self.partial_max
            .store(max, std::sync::atomic::Ordering::Release);
        if let Ok(mut p) = self.partial.lock() {
            for t in tables {
                p.entry(t).or_default();
            }
        }
    }

    /// The state a resumed snapshot found in the chunk table for `table`.
    pub fn restore_partial(&self, table: &str, keys: Vec<Box<[u8]>>, frozen: bool) {
        if let Ok(mut p) = self.partial.lock() {
            let t = p.entry(table.to_string()).or_default();
            t.keys.extend(keys);
            t.frozen = frozen;
        }
    }

    /// Every watched table's state, when it changed since the last call. Taken by the stream
    /// when it ends a flush cycle, so the state is the one at that cycle's checkpoint: stored
    /// with the checkpoint, it holds every key a change up to there left partial (a whole
    /// change after it that dropped a key comes again after a restart).
    fn partial_state(&self) -> Option<Vec<PartialState>> {
        if !self
            .partial_dirty
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return None;
        }
        let p = self.partial.lock().ok()?;
        let mut state: Vec<PartialState> = p
            .iter()
            .map(|(table, t)| PartialState {
                table: table.clone(),
                keys: t.keys.iter().chain(t.round.iter()).cloned().collect(),
                frozen: t.frozen,
                done: t.done,
                overflow: t.overflow,
            })
            .collect();
        state.sort_by(|a, b| a.table.cmp(&b.table));
        Some(state)
    }

    /// A change left the row with this key `whole`, or without a TOAST value (see
    /// [`PartialKeys`]).
    fn note_change(&self, table: &str, key: &[u8], whole: bool) {
        let Ok(mut p) = self.partial.lock() else {
            return;
        };
        let Some(t) = p.get_mut(table).filter(|t| !t.done) else {
            return;
        };
        if whole {
            if t.keys.remove(key) {
                self.dirty();
            }
            return;
        }
        // Already owed: nothing changes. (Asked before the bound: a key noted again at the
        // bound is no key more.)
        if t.keys.contains(key) {
            return;
        }
        // Once the rounds began, a partial change of a key not owed changes nothing. Such a
        // row is in StarRocks (every chunk of the table was taken before the first round)
        // and the change is filled from it; that holds for a key of the round in flight too.
        // The stream meets changes in WAL order, so a change of a round's key comes before
        // the round's high watermark: committed before its low watermark, it is visible to
        // the round's read (which has the row at that version or later) or a straggler the
        // read could not see; committed inside the window, it is in the window. Either way
        // `close_round`'s `changed` holds the key and owes it again. Owing it here as well
        // owed a hot row updated more often than the stream lags at every round, which
        // then never completed.
        if t.frozen {
            return;
        }
        self.dirty();
        if t.keys.len() >= self.partial_max.load(std::sync::atomic::Ordering::Acquire) {
            t.overflow = true;
        } else {
            t.keys.insert(key.into());
        }
    }

    fn dirty(&self) {
        self.partial_dirty
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Up to `max` keys for the next keys round of `table` (none: nothing is owed).
    pub fn take_partial(&self, table: &str, max: usize) -> PartialRound {
        let Ok(mut p) = self.partial.lock() else {
            return PartialRound::Overflow;
        };
        let Some(t) = p.get_mut(table) else {
            return PartialRound::Keys(Vec::new());
        };
        if t.overflow {
            return PartialRound::Overflow;
        }
        if !t.frozen {
            t.frozen = true;
            self.dirty();
        }
        t.owed_at_take = t.keys.len();
        let keys: Vec<Box<[u8]>> = t.keys.iter().take(max).cloned().collect();
        for k in &keys {
            t.keys.remove(k);
        }
        t.round = keys.iter().cloned().collect();
        PartialRound::Keys(keys)
    }

    /// Keys of a round that its read did not keep (the chunk was cut by bytes): owed again.
    pub fn give_back_partial(&self, table: &str, keys: impl Iterator<Item = Box<[u8]>>) {
        if let Ok(mut p) = self.partial.lock()
            && let Some(t) = p.get_mut(table)
        {
            t.keys.extend(keys);
        }
    }

    /// Once the table's ranges are all copied (their last verdict came, so the stream is past
    /// their high watermarks): true, and the table complete, when no key is owed. A key owed
    /// then leaves only by a whole change of its row, so an empty set now means every row
    /// missed by the ranges came whole since; no round is needed.
    pub fn complete_if_none_owed(&self, table: &str) -> bool {
        let Ok(mut p) = self.partial.lock() else {
            return false;
        };
        let Some(t) = p.get_mut(table) else {
            return true;
        };
        if t.done {
            return true;
        }
        if t.keys.is_empty() && t.round.is_empty() && !t.overflow {
            t.done = true;
            self.dirty();
            return true;
        }
        false
    }

    /// Whether `table` is complete (a keys round's high watermark found no key owed).
    pub fn partial_done(&self, table: &str) -> bool {
        self.partial
            .lock()
            .ok()
            .and_then(|p| p.get(table).map(|t| t.done))
            .unwrap_or(true)
    }

    /// Keys rounds of `table` in a row that resolved no key (left as many owed as they
    /// found).
    pub fn partial_stalled(&self, table: &str) -> u32 {
        self.partial
            .lock()
            .ok()
            .and_then(|p| p.get(table).map(|t| t.stalled))
            .unwrap_or(0)
    }

    /// At a keys round's high watermark, in stream order: the round's keys the window drops
    /// (`changed`: changed inside it, or by a transaction its read could not see, whole or
    /// not, which the window cannot tell) are owed again, and the table is complete when no
    /// key is owed.
    fn close_round(&self, table: &str, changed: &HashSet<Box<[u8]>>) {
        if let Ok(mut p) = self.partial.lock()
            && let Some(t) = p.get_mut(table)
        {
            let round = std::mem::take(&mut t.round);
            t.keys
                .extend(round.into_iter().filter(|k| changed.contains(k)));
            // A round may take fewer keys than are owed (the rows per read of wide rows), so
            // only a round that resolved none counts against the table.
            t.stalled = match t.keys.len() < t.owed_at_take {
                true => 0,
                false => t.stalled.saturating_add(1),
            };
            if t.keys.is_empty() && !t.overflow {
                t.done = true;
            }
            self.dirty();
        }
    }

    pub fn put(&self, id: u64, chunk: Fetched) {
        if let Ok(mut f) = self.fetched.lock() {
            f.insert(id, chunk);
        }
    }

    fn take(&self, id: u64) -> Option<Fetched> {
        self.fetched.lock().ok().and_then(|mut f| f.remove(&id))
    }
}

/// A chunk's rows as the stream emits them at its high watermark.
pub struct Emitted {
    pub table: String,
    pub chunk: u32,
    pub span: Span,
    pub batches: Vec<Batch>,
    pub rows: u64,
}

struct Window {
    id: u64,
    table: String,
    /// Commit LSN of the low watermark.
    low: Lsn,
    keys: HashSet<Box<[u8]>>,
    /// More keys changed than `keys_max`, or a change whose key could not be read.
    untrusted: Option<&'static str>,
}

/// Keys a transaction changed, each with its table.
type ChangedKeys = Vec<(Arc<str>, Box<[u8]>)>;

/// A recent commit: its top-level xid, commit LSN, and the keys it changed per table
/// (`None` once forgotten, or when there were more than `keys_max`).
struct Commit {
    xid: u32,
    lsn: Lsn,
    keys: Option<ChangedKeys>,
}

/// The open windows of this run, and the recent commits for the visibility check.
pub struct Windows {
    /// `{slot} {run}`: watermarks of other runs and other slots are not ours.
    tag: String,
    exchange: Arc<Exchange>,
    open: Vec<Window>,
    recent: VecDeque<Commit>,
    /// Keys held in `recent`, at most `keys_max`.
    recent_keys: usize,
    /// Entries of `recent` before this one have had their keys forgotten (oldest first).
    forgotten: usize,
    /// Keys the current transaction changed (`None`: more than `keys_max`, or one unreadable).
    txn_keys: Option<ChangedKeys>,
    /// Table names, shared by the remembered keys.
    names: Vec<Arc<str>>,
    keys_max: usize,
}

/// A row's key as the snapshot compares keys: each key column's text (as PostgreSQL prints
/// it, the same in a SELECT and in pgoutput) and a NUL, which text values cannot contain;
/// a NULL is a 0x01 byte.
pub fn encode_key<'a>(parts: impl Iterator<Item = Option<&'a [u8]>>) -> Box<[u8]> {
    let mut text = Vec::with_capacity(16);
    encode_key_into(&mut text, parts);
    text.into_boxed_slice()
}

/// [`encode_key`] appended to `out`.
pub fn encode_key_into<'a>(out: &mut Vec<u8>, parts: impl Iterator<Item = Option<&'a [u8]>>) {
    for part in parts {
        match part {
            Some(v) => out.extend_from_slice(v),
            None => out.push(1),
        }
        out.push(0);
    }
}

/// The watermark text: `{tag} {id} {L|H} {table}`.
pub fn watermark_text(tag: &str, id: u64, high: bool, table: &str) -> String {
    format!("{tag} {id} {} {table}", if high { 'H' } else { 'L' })
}

impl Windows {
    pub fn new(tag: String, exchange: Arc<Exchange>, keys_max: usize) -> Windows {
        Windows {
            tag,
            exchange,
            open: Vec::new(),
            recent: VecDeque::with_capacity(1024),
            recent_keys: 0,
            forgotten: 0,
            txn_keys: Some(Vec::new()),
            names: Vec::new(),
            keys_max,
        }
    }

    /// Whether changes to `table` must be noted (a window on it is open).
    #[inline]
    pub fn watching(&self, table: &str) -> bool {
        !self.open.is_empty() && self.open.iter().any(|w| w.table == table)
    }

    /// Whether changed keys must be noted at all: while the snapshot copies (a later chunk
    /// may need to drop a straggler's keys) or a window is open.
    #[inline]
    pub fn recording(&self) -> bool {
        !self.open.is_empty() || !self.exchange.workers_done()
    }

    fn name(&mut self, table: &str) -> Arc<str> {
        if let Some(n) = self.names.iter().find(|n| &***n == table) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(table);
        self.names.push(Arc::clone(&n));
        n
    }

    /// A change left the row with this key whole or partial (see [`Exchange::note_change`]).
    pub fn changed_row(&mut self, table: &str, key: &[u8], whole: bool) {
        if !self.exchange.workers_done() {
            self.exchange.note_change(table, key, whole);
        }
    }

    /// The snapshot's partial keys, when they changed since the last call (see
    /// [`Exchange::partial_state`]).
    pub fn partial_state(&self) -> Option<Vec<PartialState>> {
        self.exchange.partial_state()
    }

    /// A change to the row with this key (`None`: the key could not be read).
    pub fn touched(&mut self, table: &str, key: Option<Box<[u8]>>) {
        if !self.exchange.workers_done() {
            let remembered = match (&key, self.txn_keys.as_ref().map(Vec::len)) {
                (Some(_), Some(n)) => n < self.keys_max,
                _ => false,
            };
            if remembered {
                let name = self.name(table);
                if let (Some(keys), Some(k)) = (self.txn_keys.as_mut(), &key) {
                    keys.push((name, k.clone()));
                }
            } else {
                self.txn_keys = None;
            }
        }
        for w in self.open.iter_mut().filter(|w| w.table == table) {
            match &key {
                _ if w.untrusted.is_some() => {}
                Some(k) => {
                    if w.keys.len() >= self.keys_max {
                        w.untrusted = Some("more changed keys than cdc.snapshot-window-keys-max");
                        w.keys = HashSet::new();
                    } else {
                        w.keys.insert(k.clone());
                    }
                }
                None => w.untrusted = Some("a change whose key was not sent"),
            }
        }
    }

    /// A transaction committed (top-level xid, commit LSN).
    pub fn committed(&mut self, xid: u32, lsn: Lsn) {
        let keys = self.txn_keys.replace(Vec::new());
        if self.recent.len() == RECENT_COMMITS
            && let Some(old) = self.recent.pop_front()
        {
            self.recent_keys -= old.keys.map_or(0, |k| k.len());
            self.forgotten = self.forgotten.saturating_sub(1);
        }
        self.recent_keys += keys.as_ref().map_or(0, Vec::len);
        self.recent.push_back(Commit { xid, lsn, keys });
        // Within the bound, forget the oldest commits' keys first (from where the last
        // forgetting stopped, so each commit is visited once).
        while self.recent_keys > self.keys_max && self.forgotten < self.recent.len() {
            if let Some(k) = self.recent[self.forgotten].keys.take() {
                self.recent_keys -= k.len();
            }
            self.forgotten += 1;
        }
    }

    /// A logical message at commit LSN `lsn`. A high watermark of this run returns the
    /// chunk's rows to emit now, after every change before it.
    pub fn message(&mut self, prefix: &str, content: &[u8], lsn: Lsn) -> Option<Emitted> {
        if prefix != WATERMARK_PREFIX {
            return None;
        }
        let text = std::str::from_utf8(content).ok()?;
        let rest = text.strip_prefix(&self.tag)?.strip_prefix(' ')?;
        let mut parts = rest.splitn(3, ' ');
        let id: u64 = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        let table = parts.next()?.to_string();
        match kind {
            "L" => {
                self.open.push(Window {
                    id,
                    table,
                    low: lsn,
                    keys: HashSet::new(),
                    untrusted: None,
                });
                None
            }
            "H" => self.close(id),
            _ => None,
        }
    }

    fn close(&mut self, id: u64) -> Option<Emitted> {
        let window = self
            .open
            .iter()
            .position(|w| w.id == id)
            .map(|i| self.open.swap_remove(i));
        let fetched = self.exchange.take(id)?;
        let verdict = match &window {
            None => Err("the low watermark was not seen"),
            Some(w) => match w.untrusted {
                Some(reason) => Err(reason),
                None => self.invisible_before(w.low, &fetched.xip, fetched.xmax, &fetched.table),
            },
        };
        let stragglers = match verdict {
            Ok(keys) => keys,
            Err(reason) => {
                let _ = fetched.reply.send(Verdict::Retry { reason });
                return None;
            }
        };
        let mut keys = window.map(|w| w.keys).unwrap_or_default();
        keys.extend(stragglers);
        let reply = fetched.reply.clone();
        if fetched.keys_round {
            self.exchange.close_round(&fetched.table, &keys);
        }
        let (emitted, dropped) = emit(fetched, &keys, &self.exchange);
        let _ = reply.send(Verdict::Taken {
            rows: emitted.rows,
            dropped,
        });
        Some(emitted)
    }

    /// The keys of `table` changed by transactions the chunk's SELECT could not see that
    /// committed before the low watermark (the chunk is older than the stream for those
    /// rows); an error when such a transaction's keys are not remembered.
    ///
    /// Invisible are the snapshot's `xip` and every xid from its `xmax` on. The latter
    /// matters: a transaction whose xid is above the low watermark's can write its commit
    /// record before the watermark's and still be running when the SELECT takes its
    /// snapshot; `xmax` (the latest completed xid + 1) is then at or below its xid, and
    /// PostgreSQL leaves it out of `xip`.
    fn invisible_before(
        &self,
        low: Lsn,
        xip: &[u32],
        xmax: Option<u32>,
        table: &str,
    ) -> Result<Vec<Box<[u8]>>, &'static str> {
        let Some(xmax) = xmax else {
            return Err("the chunk's snapshot xmax was not read");
        };
        // Wrapping: the remembered commits span far fewer than 2^31 xids.
        let invisible = |xid: u32| xip.contains(&xid) || xid.wrapping_sub(xmax) as i32 >= 0;
        // (Whatever the xip: a straggler from xmax on is in no list the chunk brings.)
        if self.recent.front().is_some_and(|c| c.lsn > low) {
            return Err("too many commits since the low watermark to check visibility");
        }
        let mut keys = Vec::new();
        for c in self
            .recent
            .iter()
            .rev()
            .skip_while(|c| c.lsn >= low)
            .filter(|c| invisible(c.xid))
        {
            let Some(changed) = &c.keys else {
                return Err(
                    "a transaction invisible to the chunk committed before its low watermark, and its keys are not remembered",
                );
            };
            keys.extend(
                changed
                    .iter()
                    .filter(|(t, _)| &**t == table)
                    .map(|(_, k)| k.clone()),
            );
        }
        Ok(keys)
    }
}

/// The batches of a chunk without the rows whose keys are in `changed`; the second value is
/// the number of rows dropped.
fn emit(chunk: Fetched, changed: &HashSet<Box<[u8]>>, exchange: &Exchange) -> (Emitted, u64) {
    let mut batches = Vec::with_capacity(chunk.pieces.len());
    let (mut rows, mut dropped) = (0u64, 0u64);
    for (n, mut piece) in chunk.pieces.into_iter().enumerate() {
        let keep = if changed.is_empty() {
            piece.rows.len()
        } else {
            piece
                .iter()
                .filter(|(k, _, _)| !changed.contains(*k))
                .count()
        };
        dropped += (piece.rows.len() - keep) as u64;
        if keep == 0 {
            exchange.give_keys(piece);
            continue;
        }
        let body = if keep == piece.rows.len() {
            std::mem::take(&mut piece.body)
        } else {
            let json = chunk.format == BodyFormat::Json;
            let mut body = Vec::with_capacity(piece.body.len());
            if json {
                body.push(b'[');
            }
            for (k, start, end) in piece.iter() {
                if changed.contains(k) {
                    continue;
                }
                if json && body.len() > 1 {
                    body.push(b',');
                }
                // A CSV row's range holds its final newline.
                let row = piece.body.get(start as usize..end as usize);
                body.extend_from_slice(row.unwrap_or_default());
            }
            if json {
                body.push(b']');
            }
            body
        };
        exchange.give_keys(piece);
        rows += keep as u64;
        batches.push(Batch {
            table: chunk.target.clone(),
            columns: chunk.columns.clone(),
            partial: false,
            body,
            format: chunk.format,
            rows: keep as u64,
            label: format!("{}-{n}", chunk.label),
            recycle: true,
        });
    }
    let emitted = Emitted {
        table: chunk.table,
        chunk: chunk.chunk,
        span: chunk.span,
        batches,
        rows,
    };
    (emitted, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Box<[u8]> {
        encode_key([Some(k.as_bytes())].into_iter())
    }

    /// A fetched chunk of rows `keys`, and where its verdict arrives.
    fn fetched(keys: &[&str], xip: Vec<u32>) -> (Fetched, crossbeam_channel::Receiver<Verdict>) {
        let (reply, verdict) = crossbeam_channel::bounded(1);
        let mut piece = Piece::default();
        for k in keys {
            piece
                .body
                .push(if piece.body.is_empty() { b'[' } else { b',' });
            let start = piece.body.len() as u32;
            piece
                .body
                .extend_from_slice(format!("{{\"id\":{k}}}").as_bytes());
            piece.push_row(&key(k), start);
        }
        piece.body.push(b']');
        let chunk = Fetched {
            table: "public.t".into(),
            chunk: 3,
            span: Span::default(),
            pieces: vec![piece],
            format: BodyFormat::Json,
            target: "t".into(),
            columns: "id".into(),
            label: "s-t-snap3-10".into(),
            xip,
            // Above every xid the tests commit.
            xmax: Some(10_000),
            reply,
            keys_round: false,
        };
        (chunk, verdict)
    }

    fn windows(keys_max: usize) -> (Windows, Arc<Exchange>) {
        let exchange = Arc::new(Exchange::default());
        (
            Windows::new("s run1".into(), Arc::clone(&exchange), keys_max),
            exchange,
        )
    }

    fn mark(w: &mut Windows, id: u64, high: bool, lsn: u64) -> Option<Emitted> {
        let text = watermark_text("s run1", id, high, "public.t");
        w.message(WATERMARK_PREFIX, text.as_bytes(), Lsn(lsn))
    }

    #[test]
    fn keys_changed_inside_the_window_are_dropped() {
        let (mut w, exchange) = windows(100);
        w.touched("public.t", Some(key("1")));
        assert!(mark(&mut w, 7, false, 100).is_none());
        assert!(w.watching("public.t") && !w.watching("public.u"));
        w.touched("public.t", Some(key("2")));
        w.touched("public.u", Some(key("3")));
        let (chunk, verdict) = fetched(&["1", "2", "3"], vec![]);
        exchange.put(7, chunk);
        let out = mark(&mut w, 7, true, 200).expect("emitted at the high watermark");
        assert_eq!(out.rows, 2);
        assert_eq!(out.batches.len(), 1);
        assert_eq!(out.batches[0].body, br#"[{"id":1},{"id":3}]"#);
        assert_eq!(out.batches[0].label, "s-t-snap3-10-0");
        assert_eq!(
            verdict.try_recv(),
            Ok(Verdict::Taken {
                rows: 2,
                dropped: 1
            })
        );
        assert!(!w.watching("public.t"), "the window closed");
    }

    #[test]
    fn an_invisible_transaction_committed_before_the_window_forces_a_retry() {
        let (mut w, exchange) = windows(100);
        // 900's keys are unknown (a change whose key was not sent).
        w.touched("public.t", None);
        w.committed(900, Lsn(50));
        mark(&mut w, 1, false, 100);
        w.committed(901, Lsn(150));
        // 901 committed inside the window: harmless. 900 committed before it, yet the
        // chunk's SELECT did not see it: the chunk may be older than the stream.
        let (chunk, verdict) = fetched(&["1"], vec![901]);
        exchange.put(1, chunk);
        assert!(mark(&mut w, 1, true, 200).is_some());
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Taken { .. })));
        mark(&mut w, 2, false, 300);
        let (chunk, verdict) = fetched(&["1"], vec![900]);
        exchange.put(2, chunk);
        assert!(mark(&mut w, 2, true, 400).is_none());
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Retry { .. })));
    }

    #[test]
    fn an_invisible_transactions_keys_are_dropped_while_remembered() {
        let (mut w, exchange) = windows(3);
        // 900 changed keys 1 and 2 of t (and one of u) and committed before the low
        // watermark, yet the chunk's SELECT did not see it: those rows of the chunk are
        // older than the stream's, so they are dropped; the rest is taken.
        w.touched("public.t", Some(key("1")));
        w.touched("public.u", Some(key("1")));
        w.touched("public.t", Some(key("2")));
        w.committed(900, Lsn(50));
        mark(&mut w, 1, false, 100);
        let (chunk, verdict) = fetched(&["1", "2", "3"], vec![900]);
        exchange.put(1, chunk);
        let out = mark(&mut w, 1, true, 200).expect("taken");
        assert_eq!(out.batches[0].body, br#"[{"id":3}]"#);
        assert_eq!(
            verdict.try_recv(),
            Ok(Verdict::Taken {
                rows: 1,
                dropped: 2
            })
        );
        // Beyond keys_max over the recent commits, the oldest commits' keys are forgotten:
        // a chunk that needs them is read again.
        for (xid, k) in [(901, "4"), (902, "5")] {
            w.touched("public.t", Some(key(k)));
            w.committed(xid, Lsn(250 + u64::from(xid - 900)));
        }
        mark(&mut w, 2, false, 300);
        let (chunk, verdict) = fetched(&["1"], vec![900]);
        exchange.put(2, chunk);
        assert!(mark(&mut w, 2, true, 400).is_none());
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Retry { .. })));
        // Once the workers are done, nothing more is remembered.
        exchange.set_workers_done();
        assert!(!w.recording());
    }

    #[test]
    fn a_transaction_from_the_snapshots_xmax_on_is_invisible_though_not_in_xip() {
        let (mut w, exchange) = windows(100);
        // 905 wrote its commit record before the low watermark (xid 904) did, and was still
        // running when the chunk's SELECT took its snapshot: xmax 905 (the latest completed
        // xid + 1), so 905 is invisible and in no xip. Its keys are dropped.
        w.touched("public.t", Some(key("1")));
        w.committed(905, Lsn(50));
        w.touched("public.t", Some(key("2")));
        w.committed(903, Lsn(60));
        mark(&mut w, 1, false, 100);
        let (mut chunk, verdict) = fetched(&["1", "2", "3"], vec![]);
        chunk.xmax = Some(905);
        exchange.put(1, chunk);
        let out = mark(&mut w, 1, true, 200).expect("taken");
        assert_eq!(out.batches[0].body, br#"[{"id":2},{"id":3}]"#);
        assert_eq!(
            verdict.try_recv(),
            Ok(Verdict::Taken {
                rows: 2,
                dropped: 1
            })
        );
        // Across the wrap of 32-bit xids too.
        w.touched("public.t", Some(key("4")));
        w.committed(2, Lsn(250));
        mark(&mut w, 2, false, 300);
        let (mut chunk, verdict) = fetched(&["4", "5"], vec![]);
        chunk.xmax = Some(u32::MAX - 3);
        exchange.put(2, chunk);
        let out = mark(&mut w, 2, true, 400).expect("taken");
        assert_eq!(out.batches[0].body, br#"[{"id":5}]"#);
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Taken { .. })));
        // A chunk whose snapshot was not read is never vouched for.
        mark(&mut w, 3, false, 500);
        let (mut chunk, verdict) = fetched(&["6"], vec![]);
        chunk.xmax = None;
        exchange.put(3, chunk);
        assert!(mark(&mut w, 3, true, 600).is_none());
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Retry { .. })));
    }

    #[test]
    fn too_many_changed_keys_or_a_missing_key_force_a_retry() {
        let (mut w, exchange) = windows(2);
        mark(&mut w, 1, false, 100);
        for k in ["1", "2", "3"] {
            w.touched("public.t", Some(key(k)));
        }
        let (chunk, verdict) = fetched(&["9"], vec![]);
        exchange.put(1, chunk);
        assert!(mark(&mut w, 1, true, 200).is_none());
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Retry { .. })));
        mark(&mut w, 2, false, 300);
        w.touched("public.t", None);
        let (chunk, verdict) = fetched(&["9"], vec![]);
        exchange.put(2, chunk);
        assert!(mark(&mut w, 2, true, 400).is_none());
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Retry { .. })));
    }

    #[test]
    fn keys_left_partial_are_owed_until_a_round_takes_them_or_a_whole_change_comes() {
        let (mut w, exchange) = windows(100);
        exchange.watch_partial(["public.t".to_string()].into_iter(), 3);
        // 1 and 2 changed without a TOAST value, then 2 came whole: only 1 is owed.
        w.changed_row("public.t", &key("1"), false);
        w.changed_row("public.t", &key("2"), false);
        w.changed_row("public.t", &key("2"), true);
        w.changed_row("public.u", &key("9"), false);
        let state = w.partial_state().expect("changed");
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].keys, vec![key("1")]);
        assert!(!state[0].frozen && !state[0].done);
        assert!(w.partial_state().is_none(), "unchanged since");
        assert!(!exchange.complete_if_none_owed("public.t"));
        // A round takes 1; from then on only keys owed or in the round are kept (every
        // other row is in StarRocks).
        let PartialRound::Keys(round) = exchange.take_partial("public.t", 10) else {
            panic!("overflow")
        };
        assert_eq!(round, vec![key("1")]);
        w.changed_row("public.t", &key("5"), false);
        // 1 changes partially inside the round's window: dropped from the round, owed again.
        mark(&mut w, 1, false, 100);
        w.touched("public.t", Some(key("1")));
        w.changed_row("public.t", &key("1"), false);
        let (mut chunk, verdict) = fetched(&["1"], vec![]);
        chunk.keys_round = true;
        exchange.put(1, chunk);
        let out = mark(&mut w, 1, true, 200).expect("taken");
        assert_eq!(out.rows, 0);
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Taken { .. })));
        assert!(!exchange.partial_done("public.t"), "1 is owed again");
        // The next round finds it unchanged: the table is complete.
        let PartialRound::Keys(round) = exchange.take_partial("public.t", 10) else {
            panic!("overflow")
        };
        assert_eq!(round, vec![key("1")]);
        mark(&mut w, 2, false, 300);
        let (mut chunk, _verdict) = fetched(&["1"], vec![]);
        chunk.keys_round = true;
        exchange.put(2, chunk);
        assert_eq!(mark(&mut w, 2, true, 400).expect("taken").rows, 1);
        assert!(exchange.partial_done("public.t"));
        let state = w.partial_state().expect("changed");
        assert!(state[0].done && state[0].frozen && state[0].keys.is_empty());
        // Past the bound, a round cannot complete the table.
        let (mut w, exchange) = windows(100);
        exchange.watch_partial(["public.t".to_string()].into_iter(), 2);
        for k in ["1", "2", "3"] {
            w.changed_row("public.t", &key(k), false);
        }
        assert!(matches!(
            exchange.take_partial("public.t", 10),
            PartialRound::Overflow
        ));
        assert!(!exchange.complete_if_none_owed("public.t"));
    }

    /// A round of one key of `public.t` under window `id` (low at `lsn`, high 100 later), its
    /// key changed partially inside it when `change`; whether the table is complete after.
    fn round(w: &mut Windows, exchange: &Exchange, id: u64, lsn: u64, change: bool) -> bool {
        let PartialRound::Keys(keys) = exchange.take_partial("public.t", 1) else {
            panic!("overflow")
        };
        mark(w, id, false, lsn);
        for k in keys.iter().filter(|_| change) {
            w.touched("public.t", Some(k.clone()));
            w.changed_row("public.t", k, false);
        }
        let names: Vec<String> = keys
            .iter()
            .map(|k| String::from_utf8_lossy(&k[..k.len() - 1]).into_owned())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (mut chunk, _verdict) = fetched(&names, vec![]);
        chunk.keys_round = true;
        exchange.put(id, chunk);
        mark(w, id, true, lsn + 100).expect("taken");
        exchange.partial_done("public.t")
    }

    #[test]
    fn a_key_noted_again_at_the_bound_is_no_key_more() {
        let (mut w, exchange) = windows(100);
        exchange.watch_partial(["public.t".to_string()].into_iter(), 2);
        for k in ["1", "2", "1", "2"] {
            w.changed_row("public.t", &key(k), false);
        }
        assert!(matches!(
            exchange.take_partial("public.t", 10),
            PartialRound::Keys(_)
        ));
    }

    #[test]
    fn a_round_keys_change_the_stream_meets_before_its_window_is_not_owed_again() {
        let (mut w, exchange) = windows(100);
        exchange.watch_partial(["public.t".to_string()].into_iter(), 10);
        w.changed_row("public.t", &key("1"), false);
        let PartialRound::Keys(keys) = exchange.take_partial("public.t", 10) else {
            panic!("overflow")
        };
        assert_eq!(keys, vec![key("1")]);
        // The stream lags: a partial change of 1 committed before the round's low watermark
        // (so visible to its read) reaches it only now.
        w.touched("public.t", Some(key("1")));
        w.changed_row("public.t", &key("1"), false);
        w.committed(7, Lsn(50));
        mark(&mut w, 1, false, 100);
        let (mut chunk, _verdict) = fetched(&["1"], vec![]);
        chunk.keys_round = true;
        exchange.put(1, chunk);
        assert_eq!(mark(&mut w, 1, true, 200).expect("taken").rows, 1);
        assert!(exchange.partial_done("public.t"), "the round read 1 whole");
    }

    #[test]
    fn only_rounds_that_resolve_no_key_count_as_stalled() {
        let (mut w, exchange) = windows(100);
        exchange.watch_partial(["public.t".to_string()].into_iter(), 10);
        for k in ["1", "2", "3"] {
            w.changed_row("public.t", &key(k), false);
        }
        // One key a round (a wide row's rows per read): each round resolves one.
        assert!(!round(&mut w, &exchange, 1, 100, false));
        assert_eq!(exchange.partial_stalled("public.t"), 0);
        assert!(!round(&mut w, &exchange, 2, 300, false));
        assert_eq!(exchange.partial_stalled("public.t"), 0);
        // The last key changes inside two rounds' windows: they resolve none.
        assert!(!round(&mut w, &exchange, 3, 500, true));
        assert!(!round(&mut w, &exchange, 4, 700, true));
        assert_eq!(exchange.partial_stalled("public.t"), 2);
        assert!(round(&mut w, &exchange, 5, 900, false));
        assert_eq!(exchange.partial_stalled("public.t"), 0);
    }

    #[test]
    fn watermarks_of_other_runs_and_prefixes_are_ignored() {
        let (mut w, exchange) = windows(100);
        let (chunk, verdict) = fetched(&["1"], vec![]);
        exchange.put(5, chunk);
        let old = watermark_text("s run0", 5, true, "public.t");
        assert!(
            w.message(WATERMARK_PREFIX, old.as_bytes(), Lsn(1))
                .is_none()
        );
        let ours = watermark_text("s run1", 5, true, "public.t");
        assert!(w.message("other", ours.as_bytes(), Lsn(1)).is_none());
        assert!(w.message(WATERMARK_PREFIX, b"\xff\xfe", Lsn(1)).is_none());
        assert!(verdict.try_recv().is_err(), "nothing decided yet");
        // A high watermark without its low one (a restart in between) is not trusted.
        assert!(
            w.message(WATERMARK_PREFIX, ours.as_bytes(), Lsn(2))
                .is_none()
        );
        assert!(matches!(verdict.try_recv(), Ok(Verdict::Retry { .. })));
    }
}
