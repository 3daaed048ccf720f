//! The pipeline: pgoutput messages in, per-table JSON batches and checkpoint markers out.
//!
//! It owns transaction boundaries (a checkpoint marker only ever follows a commit), the
//! buffering of streamed in-progress transactions until their Stream Commit (through
//! `streams`, which spills what does not fit in memory to files: the one I/O here), TOAST filling,
//! key changes, and the batching policy (by rows, by bytes, at commit after the flush
//! interval). It does no I/O: the caller feeds payloads and sends the produced [`Work`] over
//! the bounded ring to the loader. A batch never mixes two column lists, and rows of one
//! table stay in order because a table has at most one open batch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::ddl::SchemaChange;
use super::fill::{Carried, CycleRows, FillPlan, Kept, PendingRow, Prior, ToRead};
use super::lsn::Lsn;
use super::pgoutput::{Datum, DecodeError, Message, OldKind, Tuple};
use super::schema::{
    Applied, JsonKind, KeyColumns, SchemaCache, SchemaError, TableSchema, json_string,
};
use super::snapshot::window::{Windows, encode_key};
use super::streams::{Replay, SpillLimits, StreamBuffers, StreamError, StreamStats};
use crate::config::{CdcDeleteMode, CdcSchemaChanges, CdcToastMode};

/// What the loader does, in order.
#[derive(Debug)]
pub enum Work {
    Load(Batch),
    /// A batch with rows whose left-out values StarRocks holds: the loader reads them (see
    /// `fill`) right before the batch loads, and not at all when the load is skipped.
    LoadFilled(Batch, Box<FillPlan>),
    /// Empty StarRocks tables (a TRUNCATE in PostgreSQL); every earlier batch is loaded first.
    /// `at` (commit LSN of the source transaction, index inside it) is the TRUNCATE's place in
    /// the stream, the same in every replay: the loader records it once the tables are empty,
    /// and a replay skips a TRUNCATE at or before the recorded place, so rows an earlier run
    /// loaded after it (under the same labels) are not emptied again.
    Truncate {
        tables: Vec<String>,
        at: (Lsn, u64),
    },
    /// Make the StarRocks table follow a source table's new columns (`apply`: change it;
    /// `fail`: stop if it differs), before any later load. `columns` is the `columns` header
    /// of the table's whole-row loads from here on: the loader gives it to every whole-row
    /// load of the table in the flush cycle's StarRocks transaction when it must load that
    /// transaction again (see `txn::ColumnPlans`).
    Schema {
        change: SchemaChange,
        apply: bool,
        columns: String,
    },
    /// Everything before this marker is loaded: store and confirm this LSN (the commit
    /// time, microseconds since the Unix epoch, is for the lag metric).
    Checkpoint(Lsn, i64),
    /// The flush cycle now ending was cut by the wall clock (the stream went idle), not by
    /// the data: store this commit LSN as the pending boundary before loading the batches
    /// that follow, so a replay after a crash cuts its batches at the same place and gets the
    /// same labels.
    Boundary(Lsn),
    /// Every batch of this initial-snapshot chunk is loaded: record the chunk as done
    /// (`chunk`: its range's number; `span`: the keys it covered).
    SnapshotChunk {
        table: String,
        chunk: u32,
        rows: u64,
        span: crate::cdc::snapshot::Span,
    },
    /// The snapshot's keys left partial, as of the checkpoint that follows: stored with it
    /// (see `snapshot::window::PartialKeys`).
    SnapshotPartial(Vec<crate::cdc::snapshot::window::PartialState>),
}

/// One Stream Load.
#[derive(Debug, Clone)]
pub struct Batch {
    /// StarRocks table.
    pub table: String,
    /// `columns` header.
    pub columns: String,
    /// Send `partial_update: true`.
    pub partial: bool,
    /// A JSON array of objects, or CSV rows (see `format`).
    pub body: Vec<u8>,
    pub format: BodyFormat,
    pub rows: u64,
    /// Deterministic: the same changes replayed after a crash give the same label.
    pub label: String,
    /// A snapshot chunk's body: once loaded it goes back to the snapshot's workers
    /// (`snapshot::Bodies`), whose next chunks then write into memory already mapped.
    pub recycle: bool,
}

/// How a batch's body is written: the Stream Load `format` and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// A JSON array of objects (`format: json`, `strip_outer_array: true`).
    #[default]
    Json,
    /// CSV as PostgreSQL's `COPY ... (FORMAT csv, NULL '\N')` writes it: `,` between
    /// fields, `"` around a field that holds `,`, `"`, CR or LF (a `"` inside doubled), `\N`
    /// for NULL, `\n` after each row (`format: csv`, `column_separator: ,`, `enclose: "`).
    /// Only initial-snapshot chunks are loaded so (see `snapshot::csv`).
    Csv,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// What every label starts with: the slot's name and, after a dash, its incarnation
    /// (`setup::Prepared::incarnation`; the name alone for a slot an older version created).
    pub label_prefix: String,
    pub flush_rows: usize,
    pub flush_bytes: usize,
    pub flush_interval: Duration,
    pub delete_mode: CdcDeleteMode,
    pub toast_mode: CdcToastMode,
    /// Audit column prefix, when audit columns are on.
    pub audit_prefix: Option<String>,
    pub stream_buffer_bytes_max: usize,
    pub schema_changes: CdcSchemaChanges,
    /// Make partial changes whole rows (see `fill`): `cdc.fill-rows`, off where whole old
    /// rows always come (`REPLICA IDENTITY FULL` with `toast-mode = "full-row"`).
    pub fill_rows: bool,
    /// `cdc.fill-bytes-max`: the values of the flush cycle's rows kept for that.
    pub fill_bytes_max: usize,
    /// `cdc.non-utf8 = "replace"`: text that is not UTF-8 loads with U+FFFD (else refused).
    pub non_utf8_replace: bool,
}

/// What becomes of a text value that is not UTF-8 as rows are written (`cdc.non-utf8`): a
/// `SQL_ASCII` database sends its bytes as stored, and StarRocks' loaders take UTF-8 (a JSON
/// body is UTF-8 text, and a `\u` escape names a character, not a byte).
#[derive(Debug, Default)]
pub struct TextGuard {
    /// Replace the invalid sequences with U+FFFD; else refuse the value.
    pub replace: bool,
    /// Values replaced so far.
    pub replaced: u64,
    /// The column of the last value replaced since the caller looked (for its warning).
    pub replaced_column: Option<String>,
    /// The column of a value refused: the row must not load.
    pub refused: Option<String>,
}

impl TextGuard {
    pub fn new(replace: bool) -> TextGuard {
        TextGuard {
            replace,
            ..TextGuard::default()
        }
    }

    /// A value that is not UTF-8, in `column`: written replaced (with `replace`; else written
    /// so too, but refused, and the caller drops the row).
    #[cold]
    #[inline(never)]
    fn not_utf8(&mut self, body: &mut Vec<u8>, column: &str, text: &[u8]) {
        json_string(body, &String::from_utf8_lossy(text));
        if self.replace {
            self.replaced += 1;
            self.replaced_column = Some(column.to_string());
        } else if self.refused.is_none() {
            self.refused = Some(column.to_string());
        }
    }
}

/// How partial changes were made whole (see `fill`).
#[derive(Debug, Default, Clone, Copy)]
pub struct FillStats {
    /// Rows completed with values pgprism wrote earlier in the same flush cycle.
    pub rows_from_cycle: u64,
    /// Rows that need values StarRocks holds (read by the loader before their batch loads).
    pub rows_to_read: u64,
    /// Rows loaded as partial updates all the same (the cycle's memory could not tell):
    /// each cuts its StarRocks transaction.
    pub rows_partial: u64,
    /// Flush cycles whose rows outgrew `cdc.fill-bytes-max`.
    pub overflows: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("{what} outside a transaction")]
    OutOfOrder { what: &'static str },
    #[error(
        "a value of {table}.{column} in the change at {lsn} is not UTF-8 (a SQL_ASCII database?), which StarRocks does not load; nothing from it on is checkpointed: fix the value, or set cdc.non-utf8 = \"replace\" to load it with U+FFFD in place of those bytes, and restart"
    )]
    NotUtf8 {
        table: String,
        column: String,
        lsn: Lsn,
    },
}

/// A row position that is the same every time PostgreSQL replays the change: the commit LSN
/// of its transaction and its index inside the transaction. (Row LSNs alone are not unique:
/// a multi-row insert gives many rows one LSN.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    txn: Lsn,
    idx: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    Full,
    /// Partial update with these columns present.
    Partial(Vec<bool>),
}

struct OpenBatch {
    generation: u64,
    shape: Shape,
    columns: String,
    body: Vec<u8>,
    rows: u64,
    first: Pos,
    last: Pos,
    /// Its rows' values to read from StarRocks before it loads.
    fill: FillPlan,
    /// Tells this batch from the table's earlier and later ones (see `fill::Carried`).
    serial: u64,
}

/// Operation kinds for the audit `op_type` column (as dbmazz writes them).
#[derive(Clone, Copy)]
enum OpType {
    Insert = 0,
    Update = 1,
    Delete = 2,
}

/// A committed streamed transaction being applied, a bounded number of messages per call
/// ([`Pipeline::pump`]), so its work reaches the ring as it is made.
struct Replaying {
    replay: Replay,
    end_lsn: Lsn,
    commit_ts_us: i64,
}

/// Work items a replay turn stops at, so the caller hands them over first.
const REPLAY_WORKS_PER_PUMP: usize = 4;
/// Messages a replay turn applies at most.
const REPLAY_MESSAGES_PER_PUMP: usize = 4096;

pub struct Pipeline {
    cfg: PipelineConfig,
    schema: SchemaCache,
    open: HashMap<u32, OpenBatch>,
    open_rows: usize,
    in_txn: bool,
    txn: Lsn,
    txn_idx: u64,
    /// Latest commit whose rows may sit in open batches: the next checkpoint marker.
    unflushed_commit: Option<Lsn>,
    /// Commit time (PostgreSQL epoch, µs) of `unflushed_commit`.
    unflushed_commit_ts: i64,
    /// Latest commit seen at all.
    last_commit: Lsn,
    /// Commit time of the first transaction with rows in the current flush cycle.
    cycle_start_us: Option<i64>,
    /// The current transaction produced rows.
    txn_rows: bool,
    /// A row of the current transaction sits in a batch (open or handed over).
    txn_batched: bool,
    /// Replaying after a restart: cut the first cycle exactly at this commit.
    forced: Option<Lsn>,
    last_data: Instant,
    /// A TRUNCATE was applied in the current transaction: end the cycle at its commit.
    truncated_in_txn: bool,
    /// The current transaction wrote an initial-snapshot watermark: end the cycle at its
    /// commit (see [`Pipeline::watermark`]).
    watermark_in_txn: bool,
    streams: StreamBuffers,
    replaying: Option<Replaying>,
    in_stream: bool,
    current_stream: Option<u32>,
    synced_at: String,
    rows_in: u64,
    /// The initial snapshot's watermark windows, while a snapshot runs.
    windows: Option<Windows>,
    /// Top-level xid of the current transaction.
    xid: u32,
    /// The flush cycle's rows, to make partial changes whole (see `fill`).
    cycle_rows: CycleRows,
    fill_stats: FillStats,
    /// Writing the delete half of a key change: the row does not end its batch (see `update`).
    hold_batch: bool,
    /// Batches opened so far (the next one's serial).
    batch_serial: u64,
    /// The serial of the batch the last row went into.
    last_batch: u64,
    /// Text that is not UTF-8 (`cdc.non-utf8`).
    text: TextGuard,
    /// `table.column`s warned about for replaced values (at most every column once).
    text_warned: std::collections::HashSet<String>,
    /// A row refused for its text, ending the run at the end of the message.
    text_refused: Option<PipelineError>,
}

impl Pipeline {
    /// The partitions of the configured partitioned tables (from setup), so that a change
    /// arriving under a partition's name is refused naming the cause.
    pub fn set_partitions(&mut self, partitions: std::collections::HashMap<String, String>) {
        self.schema.set_partitions(partitions);
    }

    pub fn new(cfg: PipelineConfig, keys: KeyColumns) -> Self {
        let cfg_replace = cfg.non_utf8_replace;
        Pipeline {
            streams: StreamBuffers::new(cfg.stream_buffer_bytes_max),
            cycle_rows: CycleRows::new(cfg.fill_bytes_max),
            cfg,
            schema: SchemaCache::new(keys),
            open: HashMap::new(),
            open_rows: 0,
            in_txn: false,
            txn: Lsn::ZERO,
            txn_idx: 0,
            unflushed_commit: None,
            unflushed_commit_ts: 0,
            last_commit: Lsn::ZERO,
            cycle_start_us: None,
            txn_rows: false,
            txn_batched: false,
            forced: None,
            last_data: Instant::now(),
            truncated_in_txn: false,
            watermark_in_txn: false,
            replaying: None,
            in_stream: false,
            current_stream: None,
            synced_at: String::from("1970-01-01 00:00:00"),
            rows_in: 0,
            windows: None,
            xid: 0,
            fill_stats: FillStats::default(),
            hold_batch: false,
            batch_serial: 0,
            last_batch: 0,
            text: TextGuard::new(cfg_replace),
            text_warned: std::collections::HashSet::new(),
            text_refused: None,
        }
    }

    /// Text values replaced (`cdc.non-utf8 = "replace"`) since the last call.
    pub fn take_non_utf8_replaced(&mut self) -> u64 {
        std::mem::take(&mut self.text.replaced)
    }

    /// How partial changes were made whole so far.
    pub fn fill_stats(&self) -> FillStats {
        FillStats {
            overflows: self.cycle_rows.overflows,
            ..self.fill_stats
        }
    }

    /// Follows the initial snapshot's watermarks (see `snapshot::window`).
    pub fn set_windows(&mut self, windows: Windows) {
        self.windows = Some(windows);
    }

    /// Value written to the `synced_at` audit column (the caller refreshes it once a second).
    pub fn set_synced_at(&mut self, text: String) {
        self.synced_at = text;
    }

    /// Rows decoded so far.
    pub fn rows_in(&self) -> u64 {
        self.rows_in
    }

    /// True when nothing received is still waiting to be handed to the loader: no open
    /// batch, no open or streamed transaction.
    pub fn is_idle(&self) -> bool {
        !self.in_txn
            && self.open.is_empty()
            && self.streams.is_empty()
            && !self.in_stream
            && self.replaying.is_none()
    }

    /// The commit LSN the last checkpoint marker would carry if flushed now.
    pub fn last_commit(&self) -> Lsn {
        self.last_commit
    }

    /// Handles one pgoutput payload (an XLogData body).
    pub fn handle(&mut self, payload: &Bytes, out: &mut Vec<Work>) -> Result<(), PipelineError> {
        self.last_data = Instant::now();
        if self.replaying.is_some() {
            // A caller that does not pump: finish the committed transaction first.
            self.pump_with(out, usize::MAX)?;
        }
        let msg = Message::decode(payload, self.in_stream)?;
        match msg {
            Message::StreamStart { xid, .. } => {
                self.in_stream = true;
                self.streams.start(xid);
                self.current_stream = Some(xid);
            }
            Message::StreamStop => {
                self.in_stream = false;
                self.current_stream = None;
            }
            Message::StreamAbort { xid, subxid } => self.streams.abort(xid, subxid),
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts_us,
            } => self.stream_commit(xid, commit_lsn, end_lsn, commit_ts_us, out)?,
            msg if self.in_stream => self.buffer_streamed(&msg, payload)?,
            Message::Begin { final_lsn, xid, .. } => {
                self.begin(final_lsn);
                self.xid = xid;
            }
            Message::Commit {
                end_lsn,
                commit_ts_us,
                ..
            } => {
                if !self.in_txn {
                    return Err(PipelineError::OutOfOrder { what: "Commit" });
                }
                self.commit(end_lsn, commit_ts_us, out);
            }
            msg => self.apply(msg, out)?,
        }
        Ok(())
    }

    /// Starts applying a committed streamed transaction (see [`Pipeline::pump`]).
    fn stream_commit(
        &mut self,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts_us: i64,
        out: &mut Vec<Work>,
    ) -> Result<(), PipelineError> {
        let replay = self.streams.take(xid)?;
        self.begin(commit_lsn);
        self.xid = xid;
        self.replaying = Some(Replaying {
            replay,
            end_lsn,
            commit_ts_us,
        });
        self.pump(out)
    }

    /// Whether a committed streamed transaction is still being applied: call
    /// [`Pipeline::pump`] (after handing `out` over) before the next [`Pipeline::handle`].
    pub fn is_replaying(&self) -> bool {
        self.replaying.is_some()
    }

    /// Applies more of the committed streamed transaction, until a few work items are out
    /// (a large transaction goes to the ring batch by batch, never all in memory at once).
    pub fn pump(&mut self, out: &mut Vec<Work>) -> Result<(), PipelineError> {
        self.pump_with(out, REPLAY_WORKS_PER_PUMP)
    }

    fn pump_with(&mut self, out: &mut Vec<Work>, works_max: usize) -> Result<(), PipelineError> {
        let Some(mut r) = self.replaying.take() else {
            return Ok(());
        };
        for _ in 0..REPLAY_MESSAGES_PER_PUMP.max(works_max) {
            if out.len() >= works_max {
                break;
            }
            let Some(bytes) = r.replay.next_message().map_err(StreamError::from)? else {
                self.commit(r.end_lsn, r.commit_ts_us, out);
                return Ok(());
            };
            let msg = Message::decode(bytes, true)?;
            self.apply(msg, out)?;
        }
        self.replaying = Some(r);
        Ok(())
    }

    /// Spills streamed transactions beyond `stream_buffer_bytes_max` to files instead of
    /// failing.
    /// Source tables whose target cannot be read for `fill-rows` (see
    /// `fill::CycleRows::set_unreadable`).
    pub fn set_fill_unreadable(&mut self, tables: std::collections::HashSet<String>) {
        self.cycle_rows.set_unreadable(tables);
    }

    pub fn set_spill(&mut self, limits: SpillLimits) {
        self.streams.set_spill(limits);
    }

    /// Memory and spill figures of the streamed transactions.
    pub fn stream_stats(&self) -> StreamStats {
        self.streams.stats()
    }

    /// Keeps a message of an in-progress streamed transaction until its Stream Commit: in
    /// memory within `stream_buffer_bytes_max`, beyond it in spill files.
    fn buffer_streamed(&mut self, msg: &Message<'_>, payload: &Bytes) -> Result<(), PipelineError> {
        let sub = match *msg {
            Message::Relation { xid, .. }
            | Message::Type { xid, .. }
            | Message::Insert { xid, .. }
            | Message::Update { xid, .. }
            | Message::Delete { xid, .. }
            | Message::Truncate { xid, .. }
            | Message::Message { xid, .. } => xid.unwrap_or_default(),
            _ => 0,
        };
        let top = self.current_stream.unwrap_or(sub);
        self.streams.push(top, sub, payload)?;
        Ok(())
    }

    fn begin(&mut self, txn: Lsn) {
        self.in_txn = true;
        self.txn = txn;
        self.txn_idx = 0;
        self.txn_rows = false;
        self.txn_batched = false;
    }

    /// After a restart: the boundary a crashed run had announced ([`Work::Boundary`]).
    pub fn set_forced_boundary(&mut self, lsn: Option<Lsn>) {
        self.forced = lsn;
    }

    /// Flush decisions at a commit depend only on the stream (row counts, commit timestamps),
    /// never on the wall clock, so a replay after a crash cuts the same batches.
    fn commit(&mut self, end_lsn: Lsn, commit_ts_us: i64, out: &mut Vec<Work>) {
        self.in_txn = false;
        if let Some(windows) = &mut self.windows {
            windows.committed(self.xid, self.txn);
        }
        self.last_commit = end_lsn;
        if self.txn_rows || !self.open.is_empty() || self.unflushed_commit.is_some() {
            self.unflushed_commit = Some(end_lsn);
            self.unflushed_commit_ts = commit_ts_us;
            self.cycle_start_us.get_or_insert(commit_ts_us);
        }
        let watermark = std::mem::take(&mut self.watermark_in_txn);
        if std::mem::take(&mut self.truncated_in_txn) || watermark {
            if self.forced.is_some_and(|f| end_lsn >= f) {
                self.forced = None;
            }
            self.flush_all(out);
            return;
        }
        if let Some(forced) = self.forced {
            if end_lsn >= forced {
                self.forced = None;
                self.flush_all(out);
            }
            return;
        }
        let interval_us = self.cfg.flush_interval.as_micros() as i64;
        let aged = self
            .cycle_start_us
            .is_some_and(|start| commit_ts_us.saturating_sub(start) >= interval_us);
        if self.unflushed_commit.is_some() && (self.open_rows >= self.cfg.flush_rows || aged) {
            self.flush_all(out);
        }
    }

    /// At a transaction boundary: hands every open batch to `out`, then the checkpoint
    /// marker for the last commit they contain. Does nothing inside a transaction.
    pub fn flush_all(&mut self, out: &mut Vec<Work>) {
        if self.in_txn {
            return;
        }
        self.end_cycle(out);
    }

    /// Hands every open batch to `out`, then the checkpoint marker for the last commit they
    /// contain; the caller knows no row of an unfinished transaction is among them.
    fn end_cycle(&mut self, out: &mut Vec<Work>) {
        self.flush_open(out);
        if let Some(lsn) = self.unflushed_commit.take() {
            if let Some(state) = self.windows.as_ref().and_then(Windows::partial_state) {
                out.push(Work::SnapshotPartial(state));
            }
            // PostgreSQL's epoch is 2000-01-01; the metric wants Unix time.
            out.push(Work::Checkpoint(
                lsn,
                self.unflushed_commit_ts + 946_684_800_000_000,
            ));
        }
        self.cycle_start_us = None;
        // Committed before anything later loads: StarRocks holds it all from here on.
        self.cycle_rows.clear();
    }

    /// When no change arrived for the flush interval: flushes what waits, announcing the
    /// boundary first (a wall-clock decision a replay could not repeat on its own).
    pub fn idle_flush(&mut self, out: &mut Vec<Work>) {
        if self.in_txn
            || self.forced.is_some()
            || self.last_data.elapsed() < self.cfg.flush_interval
        {
            return;
        }
        let Some(lsn) = self.unflushed_commit else {
            return;
        };
        out.push(Work::Boundary(lsn));
        self.flush_all(out);
    }

    fn flush_open(&mut self, out: &mut Vec<Work>) {
        let mut oids: Vec<u32> = self.open.keys().copied().collect();
        oids.sort_unstable();
        for oid in oids {
            self.flush_table(oid, out);
        }
    }

    fn flush_table(&mut self, oid: u32, out: &mut Vec<Work>) {
        let Some(mut b) = self.open.remove(&oid) else {
            return;
        };
        self.open_rows -= b.rows as usize;
        b.body.push(b']');
        let table = self
            .schema
            .get(oid)
            .map(|s| s.target_name.clone())
            .unwrap_or_default();
        let label = label(&self.cfg.label_prefix, &table, b.first, b.last);
        let batch = Batch {
            table,
            columns: b.columns,
            partial: matches!(b.shape, Shape::Partial(_)),
            body: b.body,
            format: BodyFormat::Json,
            rows: b.rows,
            label,
            recycle: false,
        };
        if b.fill.rows.is_empty() {
            out.push(Work::Load(batch));
            return;
        }
        let mut plan = b.fill;
        if let Ok(schema) = self.schema.get(oid) {
            plan.key = schema
                .key
                .iter()
                .filter_map(|&i| schema.columns.get(i).map(|c| c.name.clone()))
                .collect();
        }
        out.push(Work::LoadFilled(batch, Box::new(plan)));
    }

    fn apply(&mut self, msg: Message<'_>, out: &mut Vec<Work>) -> Result<(), PipelineError> {
        self.apply_message(msg, out)?;
        match self.text_refused.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn apply_message(
        &mut self,
        msg: Message<'_>,
        out: &mut Vec<Work>,
    ) -> Result<(), PipelineError> {
        match msg {
            Message::Relation { rel, .. } => {
                // A configured table renamed to a name not configured loses its schema
                // here: its open batch loads first, under the name it was written for.
                if self.open.contains_key(&rel.oid)
                    && !self.schema.configured(rel.namespace, rel.name)
                {
                    self.flush_table(rel.oid, out);
                }
                let applied = self.schema.apply(&rel)?;
                if matches!(applied, Applied::Unconfigured) {
                    return Ok(());
                }
                if matches!(applied, Applied::Changed(_)) {
                    // The rows kept are by column position: forget them for this cycle.
                    let name = format!("{}.{}", rel.namespace, rel.name);
                    self.cycle_rows.mark_incomplete(Some(rel.oid), &name);
                    if self.open.contains_key(&rel.oid) {
                        self.carry_over_new_columns(rel.oid, out);
                    }
                }
                self.follow_schema(rel.oid, applied, out)?;
            }
            Message::Insert { rel, new, .. } => {
                self.note_keys(rel, [Some(new), None], false);
                let schema = self.schema.get(rel)?;
                let (oid, generation) = (schema.oid, schema.generation);
                let pos = self.next_pos();
                let kept = self.kept_row(oid, new.iter());
                let shape = if new.has_unchanged() {
                    Shape::Partial(new.iter().map(|d| d != Datum::Unchanged).collect())
                } else {
                    Shape::Full
                };
                self.row(
                    oid,
                    generation,
                    shape,
                    pos,
                    new.iter(),
                    Op::Upsert(OpType::Insert),
                    None,
                    out,
                );
                // After the row: `row` may end the cycle before writing it (see `keep`).
                self.keep(oid, kept);
            }
            Message::Update { rel, old, new, .. } => {
                // The old row fills what the new one left out (`fill_unchanged`): whole.
                let filled = matches!(old, Some((OldKind::Full, t))
                    if self.cfg.toast_mode == CdcToastMode::FullRow && !t.has_unchanged());
                self.note_keys(rel, [Some(new), old.map(|(_, t)| t)], filled);
                self.update(rel, old, new, out)?;
            }
            Message::Delete {
                rel, old_kind, old, ..
            } => {
                self.note_keys(rel, [Some(old), None], true);
                let schema = self.schema.get(rel)?;
                let (oid, generation) = (schema.oid, schema.generation);
                self.delete(oid, generation, old_kind, old, out);
            }
            Message::Truncate { rels, .. } => {
                self.flush_open(out);
                self.txn_rows = true;
                self.truncated_in_txn = true;
                // Its own place in the transaction (not a row: the row counters stay).
                self.txn_idx += 1;
                for oid in rels.iter() {
                    self.cycle_rows.forget_table(oid);
                }
                // A relation not configured stops the stream as its row changes do: a table
                // renamed away and truncated under its new name is still the configured one
                // (with publish_via_partition_root pgoutput names no partition here).
                let tables: Vec<String> = rels
                    .iter()
                    .map(|oid| self.schema.get(oid).map(|s| s.target_name.clone()))
                    .collect::<Result<_, _>>()?;
                if !tables.is_empty() {
                    out.push(Work::Truncate {
                        tables,
                        at: (self.txn, self.txn_idx),
                    });
                }
            }
            Message::Message {
                prefix, content, ..
            } => self.watermark(prefix, content, out),
            // Types and origins carry nothing to load.
            _ => {}
        }
        Ok(())
    }

    /// After a Relation message: what StarRocks must do before rows with these columns load.
    /// The first one of a run only makes sure StarRocks has every column (a change made
    /// while pgprism was down); a later one is compared with the columns before.
    fn follow_schema(
        &mut self,
        oid: u32,
        applied: Applied,
        out: &mut Vec<Work>,
    ) -> Result<(), PipelineError> {
        let mode = self.cfg.schema_changes;
        if mode == CdcSchemaChanges::Ignore {
            return Ok(());
        }
        let schema = self.schema.get(oid)?;
        let change = match applied {
            Applied::Unchanged | Applied::Unconfigured => return Ok(()),
            Applied::New => super::ddl::diff(
                &schema.source_name,
                &schema.target_name,
                &[],
                &schema.columns,
            ),
            Applied::Changed(old) => super::ddl::diff(
                &schema.source_name,
                &schema.target_name,
                &old,
                &schema.columns,
            ),
        };
        if !change.is_empty() {
            let columns = columns_header(
                schema,
                &Shape::Full,
                self.cfg.delete_mode,
                self.cfg.audit_prefix.as_deref(),
            );
            out.push(Work::Schema {
                change,
                apply: mode == CdcSchemaChanges::Apply,
                columns,
            });
        }
        Ok(())
    }

    /// Tells the snapshot's windows which keys a change touched (the open windows on this
    /// table, and the transaction's keys while the snapshot copies).
    /// `filled`: the change's row is whole though its new tuple left values out (the old
    /// row fills them; a delete leaves no row to read again).
    fn note_keys(&mut self, rel: u32, tuples: [Option<Tuple<'_>>; 2], filled: bool) {
        let (Some(windows), Ok(schema)) = (self.windows.as_mut(), self.schema.get(rel)) else {
            return;
        };
        if !windows.recording() {
            return;
        }
        for (i, tuple) in tuples.into_iter().enumerate() {
            let Some(tuple) = tuple else { continue };
            let key = key_text(&schema.key, tuple);
            if i == 0
                && let Some(k) = &key
            {
                // The row as the change leaves it: whole, or without an unchanged TOAST
                // value (see `window::Exchange::note_change`).
                windows.changed_row(&schema.source_name, k, filled || !tuple.has_unchanged());
            }
            windows.touched(&schema.source_name, key);
        }
    }

    /// A logical message: at a snapshot chunk's high watermark, the chunk's rows go out here,
    /// after every change of that table before it.
    ///
    /// A transaction that writes a watermark (of any run: the rule must hold in a replay
    /// too) is a flush cycle of its own: the cycle before ends at the last commit, and this
    /// one at its commit. A chunk's rows may be CSV (`BodyFormat::Csv`) and the stream's rows
    /// of the same table are JSON, and a StarRocks transaction takes one set of load
    /// parameters per table. The cuts depend on the stream alone (watermark transactions
    /// hold no rows), so a replay after a crash, which does not emit the chunk again, cuts
    /// the stream's rows at the same places and finds the same labels.
    fn watermark(&mut self, prefix: &str, content: &[u8], out: &mut Vec<Work>) {
        if prefix != super::snapshot::window::WATERMARK_PREFIX {
            return;
        }
        if !self.txn_rows && !self.txn_batched {
            // Nothing of this transaction is in a batch: the cycle ends at the last commit.
            self.end_cycle(out);
        }
        self.watermark_in_txn = true;
        let Some(windows) = &mut self.windows else {
            return;
        };
        let Some(emitted) = windows.message(prefix, content, self.txn) else {
            return;
        };
        let oids: Vec<u32> = self
            .open
            .keys()
            .copied()
            .filter(|oid| {
                self.schema
                    .get(*oid)
                    .is_ok_and(|s| s.source_name == emitted.table)
            })
            .collect();
        for oid in oids {
            self.flush_table(oid, out);
        }
        // Rows written without passing here: StarRocks cannot be asked for this table's
        // values until the cycle commits.
        self.cycle_rows.mark_incomplete(None, &emitted.table);
        out.extend(emitted.batches.into_iter().map(Work::Load));
        // (A keys round, chunk 0, has no range to record: the partial keys' state, stored
        // with the checkpoints, says what is owed.)
        if emitted.chunk != 0 {
            out.push(Work::SnapshotChunk {
                table: emitted.table,
                chunk: emitted.chunk,
                rows: emitted.rows,
                span: emitted.span,
            });
        }
        // The checkpoint must pass this point only once those loads are done.
        self.txn_rows = true;
    }

    /// A table's batch must close because its column list changes. A StarRocks transaction
    /// takes one column list per table, so the loader commits there; when nothing of the
    /// current source transaction is batched yet, end the whole cycle at the last commit
    /// instead, so the cut falls between source transactions and none is split. (The
    /// decision depends on the stream alone: a replay cuts at the same place.)
    /// A table's columns changed while it has an open batch. A StarRocks transaction takes one
    /// `columns` header per table, so the batch's whole rows, written before the change, take
    /// the new header and the rows after it join them: a column added since is missing from
    /// the older rows' JSON, and StarRocks gives them its default for it, as it gives every
    /// row it already had; a column dropped since is a JSON key the header no longer names,
    /// which StarRocks ignores. The source transaction then stays in one StarRocks
    /// transaction (the loader runs the `ALTER` before this batch loads, see
    /// `Work::Schema`). A batch of partial updates (its header names the columns present) is
    /// cut instead.
    fn carry_over_new_columns(&mut self, oid: u32, out: &mut Vec<Work>) {
        if !self.txn_batched && self.unflushed_commit.is_some() {
            // Nothing of this source transaction is batched: end the cycle at the last
            // commit, so no StarRocks transaction is open on the table when it changes.
            self.end_cycle(out);
            return;
        }
        let header = match self.schema.get(oid) {
            Ok(schema) => Some((
                schema.generation,
                columns_header(
                    schema,
                    &Shape::Full,
                    self.cfg.delete_mode,
                    self.cfg.audit_prefix.as_deref(),
                ),
            )),
            _ => None,
        };
        match (self.open.get_mut(&oid), header) {
            (Some(batch), Some((generation, columns))) if batch.shape == Shape::Full => {
                batch.generation = generation;
                batch.columns = columns;
            }
            _ => self.flush_table(oid, out),
        }
    }

    fn cut_for_new_columns(&mut self, oid: u32, out: &mut Vec<Work>) {
        if self.txn_batched || self.unflushed_commit.is_none() {
            self.flush_table(oid, out);
            return;
        }
        self.end_cycle(out);
    }

    fn next_pos(&mut self) -> Pos {
        self.txn_idx += 1;
        self.txn_rows = true;
        self.rows_in += 1;
        Pos {
            txn: self.txn,
            idx: self.txn_idx,
        }
    }

    fn update(
        &mut self,
        rel: u32,
        old: Option<(OldKind, Tuple<'_>)>,
        new: Tuple<'_>,
        out: &mut Vec<Work>,
    ) -> Result<(), PipelineError> {
        let schema = self.schema.get(rel)?;
        let (oid, generation) = (schema.oid, schema.generation);
        // A row moved to a new key takes its left-out values from the old key's row.
        let mut moved: Option<(Prior, Vec<Box<[u8]>>)> = None;
        let mut moved_carry: Option<Carried> = None;
        if let Some((kind, old_t)) = old {
            // A key change: the old key's row goes away first (the old tuple carries the key
            // under both REPLICA IDENTITY DEFAULT and FULL).
            if key_changed(&schema.key, old_t, new) {
                if self.cfg.fill_rows && new.has_unchanged() {
                    let old_vals: Vec<Datum<'_>> = old_t.iter().collect();
                    let key_values: Vec<Box<[u8]>> = schema
                        .key
                        .iter()
                        .filter_map(|&i| match old_vals.get(i) {
                            Some(Datum::Text(v) | Datum::Binary(v)) => Some(Box::from(*v)),
                            _ => None,
                        })
                        .collect();
                    let (prior, carried) = match key_text(&schema.key, old_t) {
                        Some(key) if key_values.len() == schema.key.len() => (
                            self.cycle_rows.prior(schema, &key),
                            self.cycle_rows.carried(oid, &key).cloned(),
                        ),
                        _ => (Prior::Unknown, None),
                    };
                    moved = Some((prior, key_values));
                    moved_carry = carried;
                }
                // Values read by the old key must be read before its delete commits: the
                // delete and the moved row share a batch (read before it loads), never split
                // by flush-rows or flush-bytes (a batch may take one row more), since with
                // transaction-mode = "none" every batch commits as it loads.
                self.hold_batch = true;
                self.delete(oid, generation, kind, old_t, out);
                self.hold_batch = false;
                // The old key moved here from a third key in this cycle, its left-out values
                // still to be read by that key: while the batch that reads them is open, the
                // row moved on takes them from there too (7 → 8 → 9: both read by 7).
                if let (Some((prior, _)), Some(c)) = (&moved, moved_carry)
                    && let Some(prior) = self.through_carry(oid, prior, &c)
                {
                    moved = Some((prior, c.read_key));
                }
            }
        }
        if !new.has_unchanged() {
            let pos = self.next_pos();
            let kept = self.kept_row(oid, new.iter());
            self.row(
                oid,
                generation,
                Shape::Full,
                pos,
                new.iter(),
                Op::Upsert(OpType::Update),
                None,
                out,
            );
            self.keep(oid, kept);
            return Ok(());
        }
        let filled = self.fill_unchanged(rel, old, new)?;
        let pos = self.next_pos();
        if !filled.contains(&Datum::Unchanged) {
            let kept = self.kept_row(oid, filled.iter().copied());
            self.row(
                oid,
                generation,
                Shape::Full,
                pos,
                filled.iter().copied(),
                Op::Upsert(OpType::Update),
                None,
                out,
            );
            self.keep(oid, kept);
            return Ok(());
        }
        let mut values: Vec<Kept> = filled.iter().map(|d| Kept::of(*d)).collect();
        if let Some(fill) = self.complete(oid, &mut values, moved) {
            let elsewhere = self.read_elsewhere(oid, &values, &fill);
            self.row(
                oid,
                generation,
                Shape::Full,
                pos,
                values.iter().map(Kept::datum),
                Op::Upsert(OpType::Update),
                Some(fill),
                out,
            );
            self.keep_read_elsewhere(oid, values, elsewhere);
            return Ok(());
        }
        let kept = self.kept_row(oid, filled.iter().copied());
        let shape = Shape::Partial(filled.iter().map(|d| *d != Datum::Unchanged).collect());
        self.row(
            oid,
            generation,
            shape,
            pos,
            filled.iter().copied(),
            Op::Upsert(OpType::Update),
            None,
            out,
        );
        self.keep(oid, kept);
        Ok(())
    }

    /// Whether the rows of table `oid` are kept in the cycle (see `fill`).
    fn keeps_rows(&self, schema: &TableSchema) -> bool {
        self.cfg.fill_rows
            && super::fill::table_needs_rows(schema, self.cfg.delete_mode == CdcDeleteMode::Soft)
    }

    /// What to keep of a row of table `oid` (for the columns that can be left out later),
    /// when the table's rows are kept: handed to [`Pipeline::keep`] once the row is written.
    fn kept_row<'a>(
        &self,
        oid: u32,
        values: impl Iterator<Item = Datum<'a>>,
    ) -> Option<Box<[Kept]>> {
        let schema = self.schema.get(oid).ok()?;
        if !self.keeps_rows(schema) {
            return None;
        }
        let soft = self.cfg.delete_mode == CdcDeleteMode::Soft;
        let row: Box<[Kept]> = values
            .enumerate()
            .map(|(i, d)| {
                if schema.key.contains(&i) || super::fill::keeps_column(schema, i, soft) {
                    Kept::of(d)
                } else {
                    Kept::Missing
                }
            })
            .collect();
        Some(row)
    }

    /// Records `row` as what its key holds in the cycle. Called after the row went to
    /// [`Pipeline::row`], never before: writing it may end the cycle first (a batch of
    /// another shape is open and the row is its transaction's first), which forgets the
    /// cycle's rows, and the row then belongs to the new cycle.
    fn keep(&mut self, oid: u32, row: Option<Box<[Kept]>>) {
        let Some(row) = row else {
            return;
        };
        let Ok(schema) = self.schema.get(oid) else {
            return;
        };
        let Some(key) = super::fill::key_of(schema, &row) else {
            return;
        };
        let table = schema.source_name.clone();
        let before = self.cycle_rows.overflows;
        self.cycle_rows.remember(oid, key, Some(row));
        if self.cycle_rows.overflows > before {
            tracing::warn!(%table, "the flush cycle's rows outgrew cdc.fill-bytes-max: its partial changes from here on are loaded as partial updates, each ending the StarRocks transaction");
        }
    }

    /// Makes `values` (a row with some values left out: `Kept::Missing`) whole: from the
    /// rows the cycle wrote, or to be read from StarRocks (what it returns). `None` when
    /// that cannot be known: the row stays a partial update. The caller keeps the row's new
    /// values (`values`) once it is written.
    /// `moved`: the row moved from another key (an UPDATE of the key): what the cycle knew
    /// of that key before the change, and its values, which StarRocks is asked for.
    fn complete(
        &mut self,
        oid: u32,
        values: &mut [Kept],
        moved: Option<(Prior, Vec<Box<[u8]>>)>,
    ) -> Option<ToRead> {
        let schema = self.schema.get(oid).ok()?;
        if !self.keeps_rows(schema) {
            return None;
        }
        let (prior, moved_key) = match moved {
            Some((prior, key)) => (prior, Some(key)),
            None => {
                let key = super::fill::key_of(schema, values)?;
                let prior = self.cycle_rows.prior(schema, &key);
                // The key's row moved here in this cycle and reads its left-out values by
                // the key it moved from: so does this change, in the same batch.
                let carried = self.cycle_rows.carried(oid, &key);
                match carried.and_then(|c| Some((self.through_carry(oid, &prior, c)?, c))) {
                    Some((prior, c)) => (prior, Some(c.read_key.clone())),
                    None => (prior, None),
                }
            }
        };
        match prior {
            Prior::Row(row) => {
                for (v, kept) in values.iter_mut().zip(row.iter()) {
                    if *v == Kept::Missing {
                        *v = kept.clone();
                    }
                }
            }
            Prior::InStarRocks => {
                for v in values.iter_mut() {
                    if *v == Kept::Missing {
                        *v = Kept::InStarRocks;
                    }
                }
            }
            Prior::Unknown => {
                self.fill_stats.rows_partial += 1;
                return None;
            }
        }
        if values.contains(&Kept::Missing) {
            // A column the cycle did not keep (cannot happen for the columns that can be
            // left out; the row stays partial rather than guess).
            self.fill_stats.rows_partial += 1;
            return None;
        }
        let pending: Vec<usize> = (0..values.len())
            .filter(|&i| values[i] == Kept::InStarRocks)
            .collect();
        let key_values: Vec<Box<[u8]>> = moved_key.unwrap_or_else(|| {
            schema
                .key
                .iter()
                .filter_map(|&i| match values.get(i) {
                    Some(Kept::Text(v) | Kept::Binary(v)) => Some(v.clone()),
                    _ => None,
                })
                .collect()
        });
        if !pending.is_empty() && key_values.iter().any(|k| std::str::from_utf8(k).is_err()) {
            // The key is asked for and matched as text, which StarRocks answers in UTF-8: a
            // key that is not (a database in another encoding) would never match, and its
            // values would load as NULL. It stays partial.
            self.fill_stats.rows_partial += 1;
            return None;
        }
        if pending.is_empty() {
            self.fill_stats.rows_from_cycle += 1;
        } else {
            self.fill_stats.rows_to_read += 1;
        }
        Some((key_values, pending))
    }

    /// What a key's row knew before a change, when its left-out values are still to be read
    /// by another key (`carried`): while the batch that reads them is the table's open one
    /// (the change's row goes there: same shape, nothing flushed it), the columns the row
    /// lacks are read by that key there too (the read comes before the batch loads, so before
    /// that key's delete in it is visible, whatever the transaction mode). Once that batch
    /// has gone, nothing tells where StarRocks holds them before this row's batch loads: the
    /// change stays partial (the prior row lacks them).
    fn through_carry(&self, oid: u32, prior: &Prior, carried: &Carried) -> Option<Prior> {
        let open = self.open.get(&oid).map(|b| b.serial);
        match prior {
            Prior::Row(row) if open == Some(carried.batch) => Some(Prior::Row(
                row.iter()
                    .map(|v| match v {
                        Kept::Missing => Kept::InStarRocks,
                        v => v.clone(),
                    })
                    .collect(),
            )),
            _ => None,
        }
    }

    /// Whether the values `fill` reads for the row `values` are read by another key than
    /// its own (a moved row): the key read, to note once the row is written.
    fn read_elsewhere(&self, oid: u32, values: &[Kept], fill: &ToRead) -> Option<Vec<Box<[u8]>>> {
        if fill.1.is_empty() {
            return None;
        }
        let schema = self.schema.get(oid).ok()?;
        let own = schema.key.iter().map(|&i| match values.get(i) {
            Some(Kept::Text(v) | Kept::Binary(v)) => Some(v),
            _ => None,
        });
        let same = own.clone().count() == fill.0.len()
            && own.zip(&fill.0).all(|(a, b)| a.is_some_and(|a| a == b));
        (!same).then(|| fill.0.clone())
    }

    /// Keeps a row just written ([`Pipeline::keep`]); when its left-out values are read by
    /// another key (`elsewhere`), notes that key and the batch that reads it. By its own key
    /// StarRocks has no row (or an older, soft-deleted one), so the row's values to read are
    /// kept as unknown: a later change of the key that leaves them out reads them by that
    /// other key while the same batch is open ([`Pipeline::through_carry`]), else stays
    /// partial.
    fn keep_read_elsewhere(
        &mut self,
        oid: u32,
        mut values: Vec<Kept>,
        elsewhere: Option<Vec<Box<[u8]>>>,
    ) {
        let Some(read_key) = elsewhere else {
            self.keep(oid, Some(values.into_boxed_slice()));
            return;
        };
        for v in &mut values {
            if *v == Kept::InStarRocks {
                *v = Kept::Missing;
            }
        }
        let key = self
            .schema
            .get(oid)
            .ok()
            .and_then(|schema| super::fill::key_of(schema, &values));
        self.keep(oid, Some(values.into_boxed_slice()));
        if let Some(key) = key {
            let carried = Carried {
                read_key,
                batch: self.last_batch,
            };
            if !self.cycle_rows.carry(oid, key, carried) {
                tracing::warn!(
                    "the flush cycle's rows outgrew cdc.fill-bytes-max: its partial changes from here on are loaded as partial updates, each ending the StarRocks transaction"
                );
            }
        }
    }

    /// Unchanged TOAST values: fills them from the old row where we have it (the whole old
    /// row only with `cdc.toast-mode = full-row`, else its key columns); the rest stay unchanged.
    fn fill_unchanged<'t>(
        &self,
        rel: u32,
        old: Option<(OldKind, Tuple<'t>)>,
        new: Tuple<'t>,
    ) -> Result<Vec<Datum<'t>>, PipelineError> {
        let old_vals: Vec<Datum<'_>> = match old {
            Some((OldKind::Full, t)) if self.cfg.toast_mode == CdcToastMode::FullRow => {
                t.iter().collect()
            }
            Some((OldKind::Key, t)) | Some((OldKind::Full, t)) => {
                // Keys only (a key column can be TOASTed too).
                let key = &self.schema.get(rel)?.key;
                t.iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if key.contains(&i) {
                            d
                        } else {
                            Datum::Unchanged
                        }
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(new
            .iter()
            .enumerate()
            .map(|(i, d)| match (d, old_vals.get(i)) {
                (Datum::Unchanged, Some(o)) => *o,
                (d, _) => d,
            })
            .collect())
    }

    fn delete(
        &mut self,
        oid: u32,
        generation: u64,
        kind: OldKind,
        old: Tuple<'_>,
        out: &mut Vec<Work>,
    ) {
        let pos = self.next_pos();
        match self.cfg.delete_mode {
            CdcDeleteMode::Hard => {
                let gone = match self.schema.get(oid) {
                    Ok(schema) if self.keeps_rows(schema) => key_text(&schema.key, old),
                    _ => None,
                };
                self.row(
                    oid,
                    generation,
                    Shape::Full,
                    pos,
                    old.iter(),
                    Op::Delete,
                    None,
                    out,
                );
                // After the row (see `keep`).
                if let Some(key) = gone {
                    self.cycle_rows.remember(oid, key, None);
                }
            }
            CdcDeleteMode::Soft => {
                let Ok(schema) = self.schema.get(oid) else {
                    return;
                };
                let whole = kind == OldKind::Full && !old.has_unchanged();
                let mut kept = None;
                if whole {
                    kept = self.kept_row(oid, old.iter());
                } else if self.cfg.fill_rows {
                    // The row stays in StarRocks, marked deleted: its other values are the
                    // ones it had.
                    let mut values: Vec<Kept> = old
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            if kind == OldKind::Full || schema.key.contains(&i) {
                                Kept::of(d)
                            } else {
                                Kept::Missing
                            }
                        })
                        .collect();
                    if let Some(fill) = self.complete(oid, &mut values, None) {
                        let elsewhere = self.read_elsewhere(oid, &values, &fill);
                        self.row(
                            oid,
                            generation,
                            Shape::Full,
                            pos,
                            values.iter().map(Kept::datum),
                            Op::SoftDelete,
                            Some(fill),
                            out,
                        );
                        self.keep_read_elsewhere(oid, values, elsewhere);
                        return;
                    }
                }
                let Ok(schema) = self.schema.get(oid) else {
                    return;
                };
                let shape = if whole {
                    Shape::Full
                } else {
                    Shape::Partial(
                        (0..schema.columns.len())
                            .map(|i| schema.key.contains(&i))
                            .collect(),
                    )
                };
                let vals: Vec<Datum<'_>> = match &shape {
                    Shape::Full => old.iter().collect(),
                    Shape::Partial(mask) => old
                        .iter()
                        .zip(mask)
                        .map(|(d, &m)| if m { d } else { Datum::Unchanged })
                        .collect(),
                };
                self.row(
                    oid,
                    generation,
                    shape,
                    pos,
                    vals.into_iter(),
                    Op::SoftDelete,
                    None,
                    out,
                );
                self.keep(oid, kept);
            }
        }
    }

    /// Appends one row to the table's open batch, opening (and first flushing) as needed.
    #[allow(clippy::too_many_arguments)]
    fn row<'a>(
        &mut self,
        oid: u32,
        generation: u64,
        shape: Shape,
        pos: Pos,
        values: impl Iterator<Item = Datum<'a>>,
        op: Op,
        fill: Option<ToRead>,
        out: &mut Vec<Work>,
    ) {
        let reopen = match self.open.get(&oid) {
            Some(b) => b.generation != generation || b.shape != shape,
            None => true,
        };
        if reopen {
            if self.open.contains_key(&oid) {
                self.cut_for_new_columns(oid, out);
            }
            let Ok(schema) = self.schema.get(oid) else {
                return;
            };
            let columns = columns_header(
                schema,
                &shape,
                self.cfg.delete_mode,
                self.cfg.audit_prefix.as_deref(),
            );
            self.open.insert(
                oid,
                OpenBatch {
                    generation,
                    shape,
                    columns,
                    body: Vec::with_capacity(64 << 10),
                    rows: 0,
                    first: pos,
                    last: pos,
                    fill: FillPlan::default(),
                    serial: self.batch_serial,
                },
            );
            self.batch_serial += 1;
        }
        let (Ok(schema), Some(batch)) = (self.schema.get(oid), self.open.get_mut(&oid)) else {
            return;
        };
        batch.body.push(if batch.rows == 0 { b'[' } else { b',' });
        if let Some((key, pending)) = fill
            && !pending.is_empty()
        {
            let columns = pending
                .iter()
                .filter_map(|&i| schema.columns.get(i))
                .map(|c| batch.fill.column(&c.name, c.kind, &c.json_key))
                .collect();
            batch.fill.rows.push(PendingRow {
                // Right after the row's `{`: the values read are written there.
                at: batch.body.len() + 1,
                key,
                columns,
            });
        }
        write_row(
            &mut batch.body,
            schema,
            values,
            op,
            self.cfg.delete_mode == CdcDeleteMode::Hard && batch.shape == Shape::Full,
            self.cfg.audit_prefix.as_deref(),
            &self.synced_at,
            pos.txn,
            &mut self.text,
        );
        if let Some(column) = self.text.refused.take()
            && self.text_refused.is_none()
        {
            self.text_refused = Some(PipelineError::NotUtf8 {
                table: schema.source_name.clone(),
                column,
                lsn: pos.txn,
            });
        }
        if let Some(column) = self.text.replaced_column.take() {
            let name = format!("{}.{column}", schema.source_name);
            if !self.text_warned.contains(&name) {
                tracing::warn!(column = %name, lsn = %pos.txn, "a value that is not UTF-8 was loaded with U+FFFD in place of those bytes (cdc.non-utf8 = \"replace\"); counted in non_utf8_values_replaced, warned once per column");
                self.text_warned.insert(name);
            }
        }
        batch.rows += 1;
        batch.last = pos;
        self.last_batch = batch.serial;
        self.open_rows += 1;
        self.txn_batched = true;
        if !self.hold_batch
            && (batch.rows as usize >= self.cfg.flush_rows
                || batch.body.len() >= self.cfg.flush_bytes)
        {
            self.flush_table(oid, out);
        }
    }
}

/// The `columns` header of initial-snapshot rows (whole rows, upserts).
pub fn snapshot_columns(cfg: &PipelineConfig, schema: &TableSchema) -> String {
    columns_header(
        schema,
        &Shape::Full,
        cfg.delete_mode,
        cfg.audit_prefix.as_deref(),
    )
}

/// Appends one initial-snapshot row (values as PostgreSQL prints them, `None` for NULL) to
/// `body` as a JSON upsert; `lsn` goes into the `cdc_version` audit column.
pub fn write_snapshot_row<'a>(
    cfg: &PipelineConfig,
    schema: &TableSchema,
    body: &mut Vec<u8>,
    values: impl Iterator<Item = Option<&'a [u8]>>,
    synced_at: &str,
    lsn: Lsn,
    text: &mut TextGuard,
) {
    let values = values.map(|v| match v {
        Some(text) => Datum::Text(text),
        None => Datum::Null,
    });
    write_row(
        body,
        schema,
        values,
        Op::Upsert(OpType::Insert),
        cfg.delete_mode == CdcDeleteMode::Hard,
        cfg.audit_prefix.as_deref(),
        synced_at,
        lsn,
        text,
    );
}

/// The key of a changed row for the snapshot's windows; `None` when a key column was not
/// sent (an unchanged TOAST value).
fn key_text(key: &[usize], tuple: Tuple<'_>) -> Option<Box<[u8]>> {
    let values: Vec<Datum<'_>> = tuple.iter().collect();
    let mut parts = Vec::with_capacity(key.len());
    for &i in key {
        parts.push(match values.get(i)? {
            Datum::Text(v) | Datum::Binary(v) => Some(*v),
            Datum::Null => None,
            Datum::Unchanged => return None,
        });
    }
    Some(encode_key(parts.into_iter()))
}

#[derive(Clone, Copy)]
enum Op {
    Upsert(OpType),
    Delete,
    SoftDelete,
}

fn columns_header(
    schema: &TableSchema,
    shape: &Shape,
    mode: CdcDeleteMode,
    audit: Option<&str>,
) -> String {
    let mut cols: Vec<&str> = Vec::with_capacity(schema.columns.len() + 5);
    for (i, c) in schema.columns.iter().enumerate() {
        if let Shape::Partial(mask) = shape
            && !mask.get(i).copied().unwrap_or(false)
        {
            continue;
        }
        cols.push(&c.name);
    }
    let mut header = cols.join(",");
    if mode == CdcDeleteMode::Hard && *shape == Shape::Full {
        header.push_str(",__op");
    }
    if let Some(p) = audit {
        for name in AUDIT_COLUMNS {
            header.push(',');
            header.push_str(p);
            header.push_str(name);
        }
    }
    header
}

pub(super) const AUDIT_COLUMNS: [&str; 4] = ["op_type", "is_deleted", "synced_at", "cdc_version"];

#[allow(clippy::too_many_arguments)]
#[inline]
fn write_row<'a>(
    body: &mut Vec<u8>,
    schema: &TableSchema,
    values: impl Iterator<Item = Datum<'a>>,
    op: Op,
    op_column: bool,
    audit: Option<&str>,
    synced_at: &str,
    lsn: Lsn,
    text: &mut TextGuard,
) {
    body.push(b'{');
    let mut first = true;
    for (col, datum) in schema.columns.iter().zip(values) {
        if datum == Datum::Unchanged {
            continue;
        }
        if !first {
            body.push(b',');
        }
        first = false;
        body.extend_from_slice(&col.json_key);
        write_value(body, col, datum, text);
    }
    if op_column {
        // Partial batches never carry deletes, so only Full-shape batches have `__op`.
        match op {
            Op::Delete => body.extend_from_slice(b",\"__op\":1"),
            _ => body.extend_from_slice(b",\"__op\":0"),
        }
    }
    if let Some(p) = audit {
        let (op_type, deleted) = match op {
            Op::Upsert(t) => (t as u8, false),
            Op::Delete | Op::SoftDelete => (OpType::Delete as u8, true),
        };
        let key = |name: &str, body: &mut Vec<u8>| {
            body.push(b',');
            let mut k = String::with_capacity(p.len() + name.len());
            k.push_str(p);
            k.push_str(name);
            json_string(body, &k);
            body.push(b':');
        };
        key("op_type", body);
        body.extend_from_slice(op_type.to_string().as_bytes());
        key("is_deleted", body);
        body.extend_from_slice(if deleted { b"true" } else { b"false" });
        key("synced_at", body);
        json_string(body, synced_at);
        key("cdc_version", body);
        body.extend_from_slice(lsn.0.to_string().as_bytes());
    }
    body.push(b'}');
}

#[inline]
fn write_value(
    body: &mut Vec<u8>,
    col: &super::schema::Column,
    datum: Datum<'_>,
    guard: &mut TextGuard,
) {
    match datum {
        Datum::Null | Datum::Unchanged => body.extend_from_slice(b"null"),
        Datum::Text(text) | Datum::Binary(text) => match col.kind {
            JsonKind::Number if is_json_number(text) => body.extend_from_slice(text),
            JsonKind::Bool => body.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
            _ => match simdutf8::basic::from_utf8(text) {
                Ok(s) => json_string(body, s),
                Err(_) => guard.not_utf8(body, &col.name, text),
            },
        },
    }
}

/// True when `text` is a JSON number (`-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`).
/// PostgreSQL prints its numbers that way except NaN and the infinities, which (like anything
/// unexpected) are written as strings instead.
#[inline]
pub(super) fn is_json_number(text: &[u8]) -> bool {
    fn digits(t: &[u8], mut i: usize) -> usize {
        while i < t.len() && t[i].is_ascii_digit() {
            i += 1;
        }
        i
    }
    let mut i = usize::from(text.first() == Some(&b'-'));
    match text.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(text, i + 1),
        _ => return false,
    }
    if text.get(i) == Some(&b'.') {
        let end = digits(text, i + 1);
        if end == i + 1 {
            return false;
        }
        i = end;
    }
    if matches!(text.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(text.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(text, i);
        if end == i {
            return false;
        }
        i = end;
    }
    i == text.len()
}

/// Whether an update changes a key column: `new` differs from `old` in a key column it
/// carries (an unchanged TOAST value is not a change).
fn key_changed(key: &[usize], old: Tuple<'_>, new: Tuple<'_>) -> bool {
    let old_vals: Vec<Datum<'_>> = old.iter().collect();
    new.iter()
        .enumerate()
        .any(|(i, d)| key.contains(&i) && d != Datum::Unchanged && old_vals.get(i) != Some(&d))
}

/// `{prefix}-{table}-{commit}.{idx}-{commit}.{idx}` (the prefix: the slot and its
/// incarnation), limited by [`starrocks_label`].
fn label(prefix: &str, table: &str, first: Pos, last: Pos) -> String {
    let range = format!(
        "{:X}_{}-{:X}_{}",
        first.txn.0, first.idx, last.txn.0, last.idx
    );
    starrocks_label(&format!("{prefix}-{table}"), &range)
}

/// The most characters StarRocks takes in a label: the FE checks every label against
/// `^[-\w]{1,128}$` (ASCII letters, digits, `_` and `-`), which is also the set
/// [`starrocks_label`] writes.
pub(crate) const LABEL_CHARS_MAX: usize = 128;

/// `{name}-{suffix}` as a StarRocks label: letters, digits, `-` and `_` (anything else in
/// `name` becomes `_`), at most [`LABEL_CHARS_MAX`] characters. A name too long for that is
/// replaced by its 64-bit FNV-1a hash in hex, never cut: two long names sharing a prefix
/// would collide once cut, and a label found in use means "already loaded". `suffix` (the
/// LSN range, the snapshot chunk) is ASCII of the same set and short.
pub(crate) fn starrocks_label(name: &str, suffix: &str) -> String {
    let name = label_chars(name);
    if name.len() + 1 + suffix.len() <= LABEL_CHARS_MAX {
        format!("{name}-{suffix}")
    } else {
        format!("{}-{suffix}", hashed_label_name(&name))
    }
}

/// What a label of `name` starts with when [`starrocks_label`] replaces the name by its hash
/// (`{hash}-`): how leftovers of a long name are found again.
pub(crate) fn hashed_label_prefix(name: &str) -> String {
    format!("{}-", hashed_label_name(&label_chars(name)))
}

/// `name` with anything but ASCII letters, digits, `-` and `_` replaced by `_`.
pub(crate) fn label_chars(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn hashed_label_name(name: &str) -> String {
    format!("{:016x}", fnv1a(name.as_bytes()))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::pgoutput::build;

    fn cfg() -> PipelineConfig {
        PipelineConfig {
            label_prefix: "s".into(),
            flush_rows: 1000,
            flush_bytes: 1 << 20,
            flush_interval: Duration::from_secs(3600),
            delete_mode: CdcDeleteMode::Hard,
            toast_mode: CdcToastMode::FullRow,
            audit_prefix: None,
            stream_buffer_bytes_max: 1 << 20,
            schema_changes: CdcSchemaChanges::Ignore,
            fill_rows: false,
            fill_bytes_max: 64 << 20,
            non_utf8_replace: false,
        }
    }

    fn keys() -> KeyColumns {
        [("public.t".to_string(), vec!["id".to_string()])].into()
    }

    fn feed(p: &mut Pipeline, msgs: &[Vec<u8>]) -> Vec<Work> {
        let mut out = Vec::new();
        for m in msgs {
            p.handle(&Bytes::from(m.clone()), &mut out).unwrap();
        }
        out
    }

    fn rel() -> Vec<u8> {
        let mut b = Vec::new();
        build::relation(
            &mut b,
            1,
            "public",
            "t",
            &[(true, "id", 23), (false, "v", 25)],
        );
        b
    }

    fn msg(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = Vec::new();
        f(&mut b);
        b
    }

    /// A Truncate of relation `oid`.
    fn truncate(oid: u32) -> Vec<u8> {
        msg(|b| {
            b.push(b'T');
            b.extend_from_slice(&1u32.to_be_bytes());
            b.push(0);
            b.extend_from_slice(&oid.to_be_bytes());
        })
    }

    #[test]
    fn a_configured_table_renamed_away_loads_its_open_rows_then_refuses_its_truncate() {
        // `ALTER TABLE t RENAME TO t_old; TRUNCATE t_old`: the Relation names t_old under
        // t's id. The rows written before load into t (not into a table without a name),
        // and the TRUNCATE stops the stream as a row change would, instead of being
        // skipped while StarRocks keeps t's rows.
        let mut p = Pipeline::new(cfg(), keys());
        let mut out = feed(
            &mut p,
            &[
                msg(|b| build::begin(b, Lsn(100), 5)),
                rel(),
                msg(|b| build::insert(b, 1, &[Some(Some("1")), Some(Some("a"))])),
                msg(|b| {
                    build::relation(
                        b,
                        1,
                        "public",
                        "t_old",
                        &[(true, "id", 23), (false, "v", 25)],
                    )
                }),
            ],
        );
        let [Work::Load(batch)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(batch.table, "t");
        out.clear();
        let err = p.handle(&Bytes::from(truncate(1)), &mut out).unwrap_err();
        assert!(
            err.to_string().contains("public.t_old is not configured"),
            "{err}"
        );
        assert!(
            !out.iter().any(|w| matches!(w, Work::Truncate { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn a_change_under_a_partitions_name_names_the_slot_as_the_cause() {
        let mut p = Pipeline::new(cfg(), keys());
        p.set_partitions([("public.t1".to_string(), "public.t".to_string())].into());
        let mut out = feed(
            &mut p,
            &[
                msg(|b| build::begin(b, Lsn(100), 5)),
                msg(|b| {
                    build::relation(b, 7, "public", "t1", &[(true, "id", 23), (false, "v", 25)])
                }),
            ],
        );
        let insert = msg(|b| build::insert(b, 7, &[Some(Some("1")), Some(Some("a"))]));
        let err = p.handle(&Bytes::from(insert), &mut out).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("public.t1, a partition of public.t")
                && text.contains("Recreate the slot"),
            "{text}"
        );
    }

    #[test]
    fn batches_rows_and_checkpoints_after_commit() {
        let mut p = Pipeline::new(cfg(), keys());
        let mut msgs = vec![msg(|b| build::begin(b, Lsn(100), 5)), rel()];
        msgs.push(msg(|b| {
            build::insert(b, 1, &[Some(Some("1")), Some(Some("a\"b"))])
        }));
        msgs.push(msg(|b| build::insert(b, 1, &[Some(Some("2")), None])));
        msgs.push(msg(|b| build::commit(b, Lsn(100), Lsn(120))));
        let out = feed(&mut p, &msgs);
        assert!(out.is_empty(), "not due yet");
        let mut out = Vec::new();
        p.flush_all(&mut out);
        let [Work::Load(batch), Work::Checkpoint(Lsn(120), _)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(batch.columns, "id,v,__op");
        assert_eq!(
            std::str::from_utf8(&batch.body).unwrap(),
            r#"[{"id":1,"v":"a\"b","__op":0},{"id":2,"v":null,"__op":0}]"#
        );
        assert_eq!(batch.label, "s-t-64_1-64_2");
        assert!(p.is_idle());
    }

    #[test]
    fn toast_filled_from_full_old_row_else_partial() {
        let mut p = Pipeline::new(cfg(), keys());
        let update = |old: Option<(u8, &str)>| {
            msg(|b| {
                b.push(b'U');
                b.extend_from_slice(&1u32.to_be_bytes());
                if let Some((kind, v)) = old {
                    b.push(kind);
                    build::tuple(b, &[Some(Some("1")), Some(Some(v))]);
                }
                b.push(b'N');
                build::tuple(b, &[Some(Some("1")), Some(None)]);
            })
        };
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            msg(|b| build::insert(b, 1, &[Some(Some("2")), Some(Some("x"))])),
            update(Some((b'O', "big"))),
            update(None),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
        ];
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let loads: Vec<_> = out
            .iter()
            .filter_map(|w| match w {
                Work::Load(b) => Some((
                    b.partial,
                    b.columns.clone(),
                    String::from_utf8(b.body.clone()).unwrap(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            loads,
            vec![
                (
                    false,
                    "id,v,__op".into(),
                    r#"[{"id":2,"v":"x","__op":0},{"id":1,"v":"big","__op":0}]"#.into()
                ),
                (true, "id".into(), r#"[{"id":1}]"#.into()),
            ]
        );
    }

    #[test]
    fn unchanged_toast_values_come_from_the_cycle_else_from_starrocks() {
        let mut p = Pipeline::new(
            PipelineConfig {
                toast_mode: CdcToastMode::Partial,
                fill_rows: true,
                ..cfg()
            },
            keys(),
        );
        let unchanged = |id: &'static str| {
            msg(move |b| {
                b.push(b'U');
                b.extend_from_slice(&1u32.to_be_bytes());
                b.push(b'N');
                build::tuple(b, &[Some(Some(id)), Some(None)]);
            })
        };
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            msg(|b| build::insert(b, 1, &[Some(Some("2")), Some(Some("x"))])),
            unchanged("2"),
            unchanged("1"),
            unchanged("1"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
            msg(|b| build::begin(b, Lsn(200), 6)),
            unchanged("2"),
            msg(|b| build::commit(b, Lsn(200), Lsn(220))),
        ];
        let mut out = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            p.handle(&Bytes::from(m.clone()), &mut out).unwrap();
            if i == 6 {
                // The first cycle ends: the second must not take its rows for StarRocks'.
                p.flush_all(&mut out);
            }
        }
        p.flush_all(&mut out);
        let loads: Vec<_> = out
            .iter()
            .filter_map(|w| match w {
                Work::LoadFilled(b, plan) => Some((
                    String::from_utf8(b.body.clone()).unwrap(),
                    plan.rows.iter().map(|r| r.at).collect::<Vec<_>>(),
                    plan.key.clone(),
                )),
                Work::Load(b) => Some((String::from_utf8(b.body.clone()).unwrap(), vec![], vec![])),
                _ => None,
            })
            .collect();
        let first = r#"[{"id":2,"v":"x","__op":0},{"id":2,"v":"x","__op":0},{"id":1,"__op":0},{"id":1,"__op":0}]"#;
        assert_eq!(
            loads,
            vec![
                (first.to_string(), vec![54, 72], vec!["id".to_string()]),
                (
                    r#"[{"id":2,"__op":0}]"#.to_string(),
                    vec![2],
                    vec!["id".to_string()]
                ),
            ]
        );
        assert!(out.iter().all(|w| !matches!(w, Work::Load(b) if b.partial)));
        let stats = p.fill_stats();
        assert_eq!(
            (
                stats.rows_from_cycle,
                stats.rows_to_read,
                stats.rows_partial
            ),
            (1, 3, 0)
        );
    }

    #[test]
    fn a_row_moved_to_a_new_key_takes_the_old_keys_values() {
        let mut p = Pipeline::new(
            PipelineConfig {
                toast_mode: CdcToastMode::Partial,
                fill_rows: true,
                ..cfg()
            },
            keys(),
        );
        let moved = |from: &'static str, to: &'static str| {
            msg(move |b| {
                b.push(b'U');
                b.extend_from_slice(&1u32.to_be_bytes());
                b.push(b'K');
                build::tuple(b, &[Some(Some(from)), Some(Some(""))]);
                b.push(b'N');
                build::tuple(b, &[Some(Some(to)), Some(None)]);
            })
        };
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            msg(|b| build::insert(b, 1, &[Some(Some("1")), Some(Some("x"))])),
            moved("1", "3"),
            moved("7", "8"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
        ];
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let [Work::LoadFilled(batch, plan), Work::Checkpoint(..)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            std::str::from_utf8(&batch.body).unwrap(),
            r#"[{"id":1,"v":"x","__op":0},{"id":1,"v":"","__op":1},{"id":3,"v":"x","__op":0},{"id":7,"v":"","__op":1},{"id":8,"__op":0}]"#
        );
        // The row moved from 7 (not written in the cycle) is read from StarRocks by key 7.
        assert_eq!(plan.rows.len(), 1);
        assert_eq!(&*plan.rows[0].key[0], b"7");
    }

    fn filling() -> PipelineConfig {
        PipelineConfig {
            toast_mode: CdcToastMode::Partial,
            fill_rows: true,
            ..cfg()
        }
    }

    /// An UPDATE of row `id` with its TOAST column `v` unchanged.
    fn unchanged(id: &str) -> Vec<u8> {
        msg(|b| {
            b.push(b'U');
            b.extend_from_slice(&1u32.to_be_bytes());
            b.push(b'N');
            build::tuple(b, &[Some(Some(id)), Some(None)]);
        })
    }

    /// An UPDATE that moves row `from` to key `to`, `v` unchanged.
    fn moved(from: &str, to: &str) -> Vec<u8> {
        msg(|b| {
            b.push(b'U');
            b.extend_from_slice(&1u32.to_be_bytes());
            b.push(b'K');
            build::tuple(b, &[Some(Some(from)), Some(Some(""))]);
            b.push(b'N');
            build::tuple(b, &[Some(Some(to)), Some(None)]);
        })
    }

    /// The loads of `out`: body, whether partial, keys to read from StarRocks.
    fn loads(out: &[Work]) -> Vec<(String, bool, Vec<String>)> {
        out.iter()
            .filter_map(|w| match w {
                Work::LoadFilled(b, plan) => Some((
                    String::from_utf8(b.body.clone()).unwrap(),
                    b.partial,
                    plan.rows
                        .iter()
                        .map(|r| String::from_utf8_lossy(&r.key[0]).into_owned())
                        .collect(),
                )),
                Work::Load(b) => Some((
                    String::from_utf8(b.body.clone()).unwrap(),
                    b.partial,
                    vec![],
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_row_that_ends_the_cycle_is_remembered_in_the_next() {
        // A partial update is open (the first cycle outgrew fill-bytes-max); the next
        // transaction's first row is whole, so writing it ends that cycle. Its values must
        // be in the new cycle's memory: the transaction's next change of the key, leaving
        // `v` out, takes them, not StarRocks' (committed, older) value.
        let mut p = Pipeline::new(
            PipelineConfig {
                fill_bytes_max: 150,
                ..filling()
            },
            keys(),
        );
        let big = "y".repeat(200);
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            msg(|b| build::insert(b, 1, &[Some(Some("5")), Some(Some(&big))])),
            unchanged("5"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
            msg(|b| build::begin(b, Lsn(200), 6)),
            msg(|b| {
                b.push(b'U');
                b.extend_from_slice(&1u32.to_be_bytes());
                b.push(b'N');
                build::tuple(b, &[Some(Some("1")), Some(Some("v2"))]);
            }),
            unchanged("1"),
            msg(|b| build::commit(b, Lsn(200), Lsn(220))),
        ];
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let loads = loads(&out);
        assert_eq!(loads.len(), 3, "{loads:?}");
        assert_eq!(
            loads[1],
            (r#"[{"id":5}]"#.to_string(), true, vec![]),
            "the first cycle knew nothing past its bound"
        );
        assert_eq!(
            loads[2],
            (
                r#"[{"id":1,"v":"v2","__op":0},{"id":1,"v":"v2","__op":0}]"#.to_string(),
                false,
                vec![]
            )
        );
        let stats = p.fill_stats();
        assert_eq!((stats.rows_from_cycle, stats.rows_to_read), (1, 0));
    }

    #[test]
    fn a_deleted_key_that_ends_the_cycle_stays_deleted_in_the_next() {
        // As above with a DELETE: the key deleted in the new cycle is not StarRocks' to tell.
        let mut p = Pipeline::new(
            PipelineConfig {
                fill_bytes_max: 150,
                ..filling()
            },
            keys(),
        );
        let big = "y".repeat(200);
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            msg(|b| build::insert(b, 1, &[Some(Some("5")), Some(Some(&big))])),
            unchanged("5"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
            msg(|b| build::begin(b, Lsn(200), 6)),
            msg(|b| {
                b.push(b'D');
                b.extend_from_slice(&1u32.to_be_bytes());
                b.push(b'K');
                build::tuple(b, &[Some(Some("1")), None]);
            }),
            unchanged("1"),
            msg(|b| build::commit(b, Lsn(200), Lsn(220))),
        ];
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let loads = loads(&out);
        assert_eq!(
            loads.last(),
            Some(&(r#"[{"id":1}]"#.to_string(), true, vec![])),
            "{loads:?}"
        );
    }

    #[test]
    fn later_changes_of_a_moved_row_read_by_the_first_key_while_its_batch_is_open() {
        // The row moved 7 → 8 has its `v` read by key 7. A later change of key 8 leaving `v`
        // out cannot read it by key 8 (StarRocks has no such row, or a soft-deleted older
        // one): in the same batch it is read by key 7 too, moved on (8 → 9) as well.
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            moved("7", "8"),
            unchanged("8"),
            moved("8", "9"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
        ];
        let mut p = Pipeline::new(filling(), keys());
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let whole = loads(&out);
        assert_eq!(
            whole,
            vec![(
                r#"[{"id":7,"v":"","__op":1},{"id":8,"__op":0},{"id":8,"__op":0},{"id":8,"v":"","__op":1},{"id":9,"__op":0}]"#
                    .to_string(),
                false,
                vec!["7".to_string(), "7".to_string(), "7".to_string()]
            )]
        );
        let stats = p.fill_stats();
        assert_eq!((stats.rows_to_read, stats.rows_partial), (3, 0));
        // Once the batch that reads key 7 has gone (flush-rows 2), nothing tells where
        // StarRocks holds `v` before the later change's batch loads: those stay partial.
        let mut p = Pipeline::new(
            PipelineConfig {
                flush_rows: 2,
                ..filling()
            },
            keys(),
        );
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let split = loads(&out);
        assert_eq!(split[0].2, vec!["7".to_string()]);
        assert!(split[1..].iter().any(|l| l.1), "{split:?}");
        let stats = p.fill_stats();
        assert_eq!((stats.rows_to_read, stats.rows_partial), (1, 2));
    }

    #[test]
    fn a_key_changes_delete_and_moved_row_share_a_batch() {
        // With transaction-mode = "none" every batch commits as it loads: had the delete of
        // key 7 ended a batch of its own (flush-rows = 2), it would commit before the moved
        // row's batch reads key 7.
        let mut p = Pipeline::new(
            PipelineConfig {
                flush_rows: 2,
                ..filling()
            },
            keys(),
        );
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel(),
            msg(|b| build::insert(b, 1, &[Some(Some("1")), Some(Some("x"))])),
            moved("7", "8"),
            msg(|b| build::insert(b, 1, &[Some(Some("2")), Some(Some("y"))])),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
        ];
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let loads = loads(&out);
        assert_eq!(
            loads,
            vec![
                (
                    r#"[{"id":1,"v":"x","__op":0},{"id":7,"v":"","__op":1},{"id":8,"__op":0}]"#
                        .to_string(),
                    false,
                    vec!["7".to_string()]
                ),
                (r#"[{"id":2,"v":"y","__op":0}]"#.to_string(), false, vec![]),
            ]
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_naming_it_or_replaced_and_counted() {
        let rel =
            msg(|b| build::relation(b, 1, "public", "t", &[(true, "id", 23), (false, "v", 25)]));
        let insert = |v: &[u8]| {
            let mut b = vec![b'I'];
            b.extend_from_slice(&1u32.to_be_bytes());
            b.push(b'N');
            b.extend_from_slice(&2u16.to_be_bytes());
            b.push(b't');
            b.extend_from_slice(&1u32.to_be_bytes());
            b.push(b'1');
            b.push(b't');
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v);
            b
        };
        let msgs = [
            msg(|b| build::begin(b, Lsn(100), 5)),
            rel,
            insert(b"caf\xe9"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
        ];
        // fail (the default): the change is refused, naming table, column and LSN.
        let mut p = Pipeline::new(cfg(), keys());
        let mut out = Vec::new();
        let mut err = None;
        for m in &msgs {
            if let Err(e) = p.handle(&Bytes::from(m.clone()), &mut out) {
                err = Some(e.to_string());
                break;
            }
        }
        let err = err.expect("a value that is not UTF-8 was taken");
        assert!(
            err.contains("public.t.v") && err.contains("0/64") && err.contains("cdc.non-utf8"),
            "{err}"
        );
        // replace: loaded with U+FFFD, counted.
        let mut p = Pipeline::new(
            PipelineConfig {
                non_utf8_replace: true,
                ..cfg()
            },
            keys(),
        );
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let body = loads(&out)
            .into_iter()
            .map(|l| l.0)
            .collect::<Vec<_>>()
            .join("");
        assert!(body.contains("caf\u{FFFD}"), "{body}");
        assert_eq!(p.take_non_utf8_replaced(), 1);
        assert_eq!(p.take_non_utf8_replaced(), 0);
    }

    #[test]
    fn a_key_that_is_not_utf8_is_never_asked_for() {
        // StarRocks answers in UTF-8: such a key would never match, its values load as NULL.
        // (Loaded at all with `cdc.non-utf8 = "replace"` only.)
        let mut p = Pipeline::new(
            PipelineConfig {
                non_utf8_replace: true,
                ..filling()
            },
            keys(),
        );
        let text_keyed =
            msg(|b| build::relation(b, 1, "public", "t", &[(true, "id", 25), (false, "v", 25)]));
        let update = |key: &[u8]| {
            let mut b = vec![b'U'];
            b.extend_from_slice(&1u32.to_be_bytes());
            b.push(b'N');
            b.extend_from_slice(&2u16.to_be_bytes());
            b.push(b't');
            b.extend_from_slice(&(key.len() as u32).to_be_bytes());
            b.extend_from_slice(key);
            b.push(b'u');
            b
        };
        let msgs = vec![
            msg(|b| build::begin(b, Lsn(100), 5)),
            text_keyed,
            update("é".as_bytes()),
            update(b"\xe9"),
            msg(|b| build::commit(b, Lsn(100), Lsn(120))),
        ];
        let mut out = feed(&mut p, &msgs);
        p.flush_all(&mut out);
        let loads = loads(&out);
        assert_eq!(loads.len(), 2, "{loads:?}");
        assert_eq!(
            (loads[0].1, &loads[0].2[..]),
            (false, &["é".to_string()][..])
        );
        assert!(loads[1].1, "partial: {loads:?}");
        let stats = p.fill_stats();
        assert_eq!((stats.rows_to_read, stats.rows_partial), (1, 1));
    }

    #[test]
    fn key_change_deletes_old_key_and_streams_apply_on_commit_only() {
        let mut p = Pipeline::new(cfg(), keys());
        let mut start = vec![b'S'];
        start.extend_from_slice(&7u32.to_be_bytes());
        start.push(1);
        let mut streamed_rel = vec![b'R'];
        streamed_rel.extend_from_slice(&7u32.to_be_bytes());
        streamed_rel.extend_from_slice(&rel()[1..]);
        let mut ins = vec![b'I'];
        ins.extend_from_slice(&7u32.to_be_bytes());
        ins.extend_from_slice(&1u32.to_be_bytes());
        ins.push(b'N');
        build::tuple(&mut ins, &[Some(Some("9")), Some(Some("s"))]);
        let mut upd = vec![b'U'];
        upd.extend_from_slice(&7u32.to_be_bytes());
        upd.extend_from_slice(&1u32.to_be_bytes());
        upd.push(b'K');
        build::tuple(&mut upd, &[Some(Some("9")), None]);
        upd.push(b'N');
        build::tuple(&mut upd, &[Some(Some("10")), Some(Some("s"))]);
        let mut commit = vec![b'c'];
        commit.extend_from_slice(&7u32.to_be_bytes());
        commit.push(0);
        commit.extend_from_slice(&200u64.to_be_bytes());
        commit.extend_from_slice(&210u64.to_be_bytes());
        commit.extend_from_slice(&0i64.to_be_bytes());
        let out = feed(&mut p, &[start, streamed_rel, ins, upd, vec![b'E']]);
        assert!(out.is_empty());
        assert!(!p.is_idle(), "a streamed transaction is pending");
        let mut out = feed(&mut p, &[commit]);
        p.flush_all(&mut out);
        let Work::Load(b) = &out[0] else { panic!() };
        assert_eq!(
            std::str::from_utf8(&b.body).unwrap(),
            r#"[{"id":9,"v":"s","__op":0},{"id":9,"v":null,"__op":1},{"id":10,"v":"s","__op":0}]"#
        );
        assert!(matches!(out[1], Work::Checkpoint(Lsn(210), _)));
        assert!(p.is_idle());
    }

    #[test]
    fn new_columns_end_the_cycle_between_transactions() {
        let keys: KeyColumns = [
            ("public.t".to_string(), vec!["id".to_string()]),
            ("public.u".to_string(), vec!["id".to_string()]),
        ]
        .into();
        let mut p = Pipeline::new(cfg(), keys);
        let rel_u = msg(|b| build::relation(b, 2, "public", "u", &[(true, "id", 23)]));
        let rel_t2 = msg(|b| {
            build::relation(
                b,
                1,
                "public",
                "t",
                &[(true, "id", 23), (false, "v", 25), (false, "w", 25)],
            )
        });
        let out = feed(
            &mut p,
            &[
                msg(|b| build::begin(b, Lsn(100), 5)),
                rel(),
                rel_u,
                msg(|b| build::insert(b, 1, &[Some(Some("1")), Some(Some("a"))])),
                msg(|b| build::insert(b, 2, &[Some(Some("1"))])),
                msg(|b| build::commit(b, Lsn(100), Lsn(120))),
                msg(|b| build::begin(b, Lsn(200), 6)),
                rel_t2,
                msg(|b| build::insert(b, 1, &[Some(Some("2")), Some(Some("b")), Some(Some("c"))])),
            ],
        );
        // The first transaction's rows of both tables, then its checkpoint: a StarRocks
        // transaction ends there and the second source transaction starts a new one.
        let kinds: Vec<String> = out
            .iter()
            .map(|w| match w {
                Work::Load(b) => format!("load {}", b.table),
                Work::Checkpoint(lsn, _) => format!("checkpoint {lsn}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["load t", "load u", "checkpoint 0/78"]);
    }

    #[test]
    fn new_columns_inside_a_transaction_carry_the_open_batch_over() {
        // t's row before the ALTER and the one after it leave in one batch under the new
        // column list, after the schema change: one StarRocks transaction can hold them.
        let mut cfg = cfg();
        cfg.schema_changes = CdcSchemaChanges::Apply;
        let mut p = Pipeline::new(cfg, keys());
        let rel_t2 = msg(|b| {
            build::relation(
                b,
                1,
                "public",
                "t",
                &[(true, "id", 23), (false, "v", 25), (false, "w", 23)],
            )
        });
        let out = feed(
            &mut p,
            &[
                msg(|b| build::begin(b, Lsn(100), 5)),
                rel(),
                msg(|b| build::insert(b, 1, &[Some(Some("1")), Some(Some("a"))])),
                rel_t2,
                msg(|b| build::insert(b, 1, &[Some(Some("2")), Some(Some("b")), Some(Some("7"))])),
                msg(|b| build::commit(b, Lsn(100), Lsn(120))),
            ],
        );
        let mut out = out;
        p.flush_all(&mut out);
        let kinds: Vec<String> = out
            .iter()
            .map(|w| match w {
                Work::Load(b) => format!("load {} {} {}", b.table, b.columns, b.rows),
                Work::Schema { columns, .. } => format!("schema {columns}"),
                Work::Checkpoint(lsn, _) => format!("checkpoint {lsn}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "schema id,v,__op",
                "schema id,v,w,__op",
                "load t id,v,w,__op 2",
                "checkpoint 0/78"
            ]
        );
        let Some(Work::Load(batch)) = out.get(2) else {
            unreachable!()
        };
        // The older row lacks the new column: StarRocks gives it its default, not an
        // explicit NULL.
        assert_eq!(
            String::from_utf8_lossy(&batch.body),
            r#"[{"id":1,"v":"a","__op":0},{"id":2,"v":"b","w":7,"__op":0}]"#
        );
    }

    #[test]
    fn json_numbers_are_validated() {
        for ok in [
            "0",
            "-1",
            "12.50",
            "1e+20",
            "-0.5E-3",
            "123456789012345678901234567890",
        ] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "-",
            "NaN",
            "Infinity",
            "-Infinity",
            "01",
            "1.",
            ".5",
            "1e",
            "1\"",
            "1 ",
        ] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn aborted_stream_is_dropped_and_labels_are_bounded() {
        let mut p = Pipeline::new(cfg(), keys());
        let mut start = vec![b'S'];
        start.extend_from_slice(&7u32.to_be_bytes());
        start.push(1);
        let mut abort = vec![b'A'];
        abort.extend_from_slice(&7u32.to_be_bytes());
        abort.extend_from_slice(&7u32.to_be_bytes());
        let out = feed(&mut p, &[start, vec![b'E'], abort]);
        assert!(out.is_empty());
        assert!(p.is_idle());
        let long = "x".repeat(300);
        let l = label(
            &long,
            "t",
            Pos {
                txn: Lsn(1),
                idx: 1,
            },
            Pos {
                txn: Lsn(2),
                idx: 3,
            },
        );
        assert!(l.len() <= 128, "{l}");
    }

    #[test]
    fn labels_stay_within_what_starrocks_takes() {
        let valid = |l: &str| {
            l.len() <= LABEL_CHARS_MAX
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        // A snapshot chunk's suffix, the longest an LSN gives.
        let suffix = format!("snap{}-{:X}", u64::MAX, u64::MAX);
        let short = starrocks_label("pgprism_slot-1A2B-public.t", &suffix);
        assert_eq!(short, format!("pgprism_slot-1A2B-public_t-{suffix}"));
        for n in [90, 100, 101, 127, 128, 300] {
            let name = format!("{}.é", "s".repeat(n));
            let l = starrocks_label(&name, &suffix);
            assert!(valid(&l), "{n}: {l}");
        }
        // Long names are hashed whole, not cut: two differing only at the end stay apart.
        let a = starrocks_label(&format!("{}a", "x".repeat(200)), "1");
        let b = starrocks_label(&format!("{}b", "x".repeat(200)), "1");
        assert_ne!(a, b);
        assert!(valid(&a) && valid(&b));
    }
}
