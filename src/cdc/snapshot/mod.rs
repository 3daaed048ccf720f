//! The initial snapshot: copies the tables' existing rows beside streaming, in primary-key
//! chunks read by parallel workers, each chunk placed into the stream between two watermarks
//! (DBLog; see [`window`]).
//!
//! A table is split into key ranges when its snapshot starts, from a sample of its keys
//! (`TABLESAMPLE SYSTEM`, a few hundred pages), and the ranges are recorded in the chunk table
//! (`{checkpoint-table}_snapshot`, one row per range). A worker takes a range and reads it in
//! order, one chunk at a time: `key > lo [AND key <= range end] ORDER BY key LIMIT n`, so
//! each chunk finds its upper bound in the read itself (the last key it got) and the next
//! chunk starts there. (Chunks were planned one at a time before, by an index-only walk of
//! `snapshot-chunk-rows` keys per chunk on a connection of its own: about a fifth of a chunk
//! read's database time.) A chunk is cut where its rows reach `snapshot-chunk-bytes-max`,
//! and the rows per read follow the rows' width, so that wide rows do not make a chunk of
//! `snapshot-chunk-rows` rows unbounded in memory. When a chunk's rows are in StarRocks, its
//! range's record moves past it (its `lo` becomes the chunk's last key, `rows` grows), so a
//! restart copies only what follows each range's record.
//!
//! With `snapshot-chunking = "ctid"` (the default on PostgreSQL 14 and later), a table's
//! ranges are ranges of its heap pages instead, each chunk whole pages read by a TID Range
//! Scan with no index and no sort (see [`CtidPlan`] for why that is complete, and
//! `window::PartialKeys` for the rows it can miss, read again by key before the table
//! counts as copied).
//!
//! Every CDC table has a primary key (setup refuses one without: StarRocks Primary Key tables
//! and deletes need it): the windows compare rows by key, whichever way the table is cut.
//!
//! A worker reads its next chunk while the stream decides on the ones it read before (at most
//! `snapshot-chunks-in-flight` of them), so the time a high watermark takes to come back
//! through the stream is spent reading, not waiting.
//!
//! This module must never hold more than `snapshot-chunks-in-flight` chunks per worker in
//! memory, never move a range's record past a chunk before the loader has its rows in
//! StarRocks, and never emit rows without a window.

pub mod csv;
pub mod window;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use self::window::{
    Exchange, Fetched, PartialRound, Piece, Verdict, Windows, encode_key_into, watermark_text,
};
use super::checkpoint::qualified;
use super::lsn::Lsn;
use super::pgconn::{PgConn, PgError, quote_ident, quote_literal};
use super::pipeline::{
    BodyFormat, PipelineConfig, TextGuard, snapshot_columns, starrocks_label, write_snapshot_row,
};
use super::schema::{Column, TableSchema};
use super::setup::{SourceTable, split_table};
use super::source::now_text;
use super::{CdcError, Shared};
use crate::config::{CdcConfig, CdcSnapshotChunking, CdcSnapshotFormat, PgUrl};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot query failed: {what}")]
    Query {
        what: String,
        #[source]
        source: PgError,
    },
    #[error(
        "snapshot chunk {chunk} of {table}: PostgreSQL sent a CSV row that does not split into fields"
    )]
    Csv { table: String, chunk: u32 },
    #[error(
        "snapshot chunk of range {chunk} of {table}: its rows did not come in ctid order (set cdc.snapshot-chunking = \"key\")"
    )]
    Order { table: String, chunk: u32 },
    #[error(
        "{table} was rewritten (VACUUM FULL, CLUSTER, a rewriting ALTER TABLE or TRUNCATE) during its snapshot, which moves every row: its ctid ranges are planned again and its snapshot starts over"
    )]
    Rewritten { table: String },
    #[error(
        "{table}: more than cdc.snapshot-partial-keys-max of its rows changed during its snapshot with an unchanged TOAST value left out of the change, which must be read again by key; raise cdc.snapshot-partial-keys-max and restart: the restart copies {table} again from its start (the keys past the bound were not kept)"
    )]
    PartialKeys { table: String },
    #[error(
        "{table}: its rows changed with unchanged TOAST values left out kept coming during {rounds} rounds in a row of reading them again by key, none of which resolved a key; raise cdc.snapshot-chunk-attempts-max and restart"
    )]
    Rounds { table: String, rounds: u32 },
    #[error(
        "{table} was rewritten {times} times during its snapshot (VACUUM FULL, CLUSTER, a rewriting ALTER TABLE or TRUNCATE), each of which starts its ctid ranges over; the limit is cdc.snapshot-chunk-attempts-max: stop rewriting it during the snapshot, or set cdc.snapshot-chunking = \"key\" (key ranges survive a rewrite), and restart (the snapshot resumes)"
    )]
    RewrittenTooOften { table: String, times: u32 },
    #[error(
        "snapshot chunk of range {chunk} of {table}: its last key is not text PostgreSQL can read back"
    )]
    Key { table: String, chunk: u32 },
    #[error(
        "snapshot chunk {chunk} of {table}: a value of column {column} is not UTF-8 (a SQL_ASCII database?), which StarRocks does not load; fix the value, or set cdc.non-utf8 = \"replace\" to load it with U+FFFD in place of those bytes, and restart (the snapshot resumes)"
    )]
    NotUtf8 {
        table: String,
        chunk: u32,
        column: String,
    },
    #[error(
        "snapshot chunk {chunk} of {table} could not be read in {attempts} attempts (last reason: {reason}); \
         lower cdc.snapshot-chunk-rows or raise cdc.snapshot-chunk-attempts-max"
    )]
    Attempts {
        table: String,
        chunk: u32,
        attempts: u32,
        reason: &'static str,
    },
}

impl SnapshotError {
    /// The PostgreSQL error underneath, if any (for the reconnect decision).
    pub fn pg(&self) -> Option<&PgError> {
        match self {
            SnapshotError::Query { source, .. } => Some(source),
            SnapshotError::Attempts { .. }
            | SnapshotError::Csv { .. }
            | SnapshotError::NotUtf8 { .. }
            | SnapshotError::Order { .. }
            | SnapshotError::Rewritten { .. }
            | SnapshotError::PartialKeys { .. }
            | SnapshotError::Rounds { .. }
            | SnapshotError::RewrittenTooOften { .. }
            | SnapshotError::Key { .. } => None,
        }
    }
}

fn query(what: impl Into<String>) -> impl FnOnce(PgError) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Query { what, source }
}

/// The chunk table's name for a checkpoint table.
fn chunk_table(cfg: &CdcConfig) -> String {
    qualified(&format!("{}_snapshot", cfg.checkpoint_table))
}

/// Setup's SQL for the chunk table: one row per key range (`lo`: the last key copied, or the
/// range's lower bound, exclusive; `hi`: its upper bound, inclusive; `last`: the open-ended
/// one; `rows`: rows copied; `done_at`: when the range was done) and, with chunk number 0,
/// one per table the snapshot owes. (Rows written by builds that planned one chunk per row
/// read the same: a range with nothing copied yet, or done.)
///
/// A `ctid` range (see [`CtidPlan`]) has its bounds as one `tid` text each and `filenode`,
/// the table's `pg_relation_filenode` when its ranges were planned (NULL on a key range);
/// the column is added to a chunk table of an older build.
pub fn create_sql(cfg: &CdcConfig) -> String {
    let t = chunk_table(cfg);
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (slot text NOT NULL, tbl text NOT NULL, chunk int NOT NULL, \
         lo text[], hi text[], last bool NOT NULL DEFAULT false, rows bigint, done_at timestamptz, \
         filenode text, PRIMARY KEY (slot, tbl, chunk)); \
         ALTER TABLE {t} ADD COLUMN IF NOT EXISTS filenode text"
    )
}

/// Setup's SQL, run before a slot is created: the plan of the new slot, replacing whatever an
/// earlier slot of that name left.
pub fn plan_sql(cfg: &CdcConfig, tables: &[SourceTable]) -> String {
    let t = chunk_table(cfg);
    let slot = quote_literal(&cfg.slot);
    let mut sql = format!("DELETE FROM {t} WHERE slot = {slot};");
    if cfg.snapshot {
        for table in tables {
            sql.push_str(&format!(
                " INSERT INTO {t} (slot, tbl, chunk) VALUES ({slot}, {0}, 0);\
                 INSERT INTO {t} (slot, tbl, chunk, lo) VALUES ({slot}, {0}, {PARTIAL_CHUNK}, '{{}}');",
                quote_literal(&table.name)
            ));
        }
    }
    sql
}

/// The keys a chunk covered, as its range's record sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Span {
    /// The chunk's lower bound (exclusive): where its range's record stands before it.
    pub lo: Option<Vec<String>>,
    /// Its last key; at the range's end, the range's upper bound (`None` on the open-ended
    /// last range).
    pub hi: Option<Vec<String>>,
    /// The chunk reached its range's end: the range is done.
    pub range_end: bool,
}

/// The loader's SQL when a chunk's rows are all in StarRocks: its range's record moves from
/// the chunk's lower bound to its upper one, in one statement with the rows counted and the
/// range marked done at its end, so the record says exactly what is copied. A row comes
/// back only when the record stood at the chunk's lower bound (else a chunk before it in the
/// range is not recorded yet, and this one waits for it).
pub fn chunk_done_sql(
    cfg_table: &str,
    slot: &str,
    table: &str,
    chunk: u32,
    rows: u64,
    span: &Span,
) -> String {
    let (lo, done_at) = if span.range_end {
        ("lo".to_string(), "now()")
    } else {
        (array_literal(span.hi.as_deref()), "NULL")
    };
    let at = match &span.lo {
        Some(_) => format!("lo = {}", array_literal(span.lo.as_deref())),
        None => "lo IS NULL".into(),
    };
    format!(
        "UPDATE {} SET lo = {lo}, rows = coalesce(rows, 0) + {rows}, done_at = {done_at} \
         WHERE slot = {} AND tbl = {} AND chunk = {chunk} AND {at} AND done_at IS NULL RETURNING 1",
        qualified(&format!("{cfg_table}_snapshot")),
        quote_literal(slot),
        quote_literal(table)
    )
}

/// Stream Load bodies of snapshot chunks the loader is done with, emptied, for the workers'
/// next chunks. A fresh body is memory the kernel must map and zero page by page, and the
/// allocator returns a freed one to the kernel soon after: at 2 M rows in 200,000-row chunks
/// (load 5, other agents compiling), zeroing fresh pages (`clear_page_erms`) took about
/// 70 % of the workers' CPU, the CSV rows themselves the rest. At most `bodies_max` bodies
/// wait here while a snapshot copies (no more than circulate between the workers and the
/// loader), none after it.
#[derive(Default)]
pub struct Bodies {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Bodies kept at most: 0 while no snapshot copies (a body given back is freed).
    max: std::sync::atomic::AtomicUsize,
}

impl Bodies {
    /// A body the loader is done with.
    pub fn give(&self, mut body: Vec<u8>) {
        let max = self.max.load(Ordering::Acquire);
        if max == 0 {
            return;
        }
        body.clear();
        if let Ok(mut free) = self.free.lock()
            && free.len() < max
        {
            free.push(body);
        }
    }

    /// An empty body: one given back, or a new one of `capacity`.
    fn take(&self, capacity: usize) -> Vec<u8> {
        self.free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    fn open(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    fn close(&self) {
        self.max.store(0, Ordering::Release);
        if let Ok(mut free) = self.free.lock() {
            *free = Vec::new();
        }
    }
}

/// Bodies (and key lists) kept for reuse at most: as many as can be away from the pool at
/// once, so that every body given back is kept. A body is in a chunk being read (one per
/// worker), in a chunk waiting for its verdict (`snapshot-chunks-in-flight` per worker), in
/// the ring to the loader once emitted (at most `ring-capacity` works, and a chunk is at
/// least three: a load, its record, the checkpoint), in the stream's hands while the ring is
/// full, or being loaded. (Session 15 kept the workers' share alone, so a body that came back
/// while the loader's queue held more was freed and a later read allocated a new one. Measured
/// beside that build at 10 M rows, this bound alone did not change pgprism's page faults or
/// CPU beyond the noise: the zeroing perf showed was transparent huge pages, see
/// `cdc::cmd::without_huge_pages`.)
fn bodies_max(cfg: &CdcConfig) -> usize {
    cfg.snapshot_workers * (cfg.snapshot_chunks_in_flight + 1) + cfg.ring_capacity + 2
}

/// Where the snapshot stands, for `/cdc/status` and the progress line.
#[derive(Default)]
pub struct Progress {
    state: AtomicU8,
    rows_copied: AtomicU64,
    /// Rows copied by earlier runs (chunks already done when this run started).
    rows_before: AtomicU64,
    rows_estimate: AtomicU64,
    rows_dropped: AtomicU64,
    chunks_done: AtomicU64,
    chunks_resumed: AtomicU64,
    chunks_retried: AtomicU64,
    /// Chunks handed to the loader by this run, and whether the planner ran out.
    chunks_taken: AtomicU64,
    planned_all: AtomicBool,
    started_unix_ms: AtomicU64,
}

/// Before setup has read the chunk table.
const STATE_STARTING: u8 = 0;
const STATE_SKIPPED: u8 = 1;
const STATE_NONE: u8 = 2;
const STATE_COPYING: u8 = 3;
const STATE_DONE: u8 = 4;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Progress {
    fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            STATE_STARTING => "starting",
            STATE_SKIPPED => "skipped",
            STATE_NONE => "not-needed",
            STATE_COPYING => "copying",
            _ => "done",
        }
    }

    /// Rows per second copied by this run, and the seconds left at that rate (when known).
    fn rate_and_eta(&self) -> (u64, Option<u64>) {
        let started = self.started_unix_ms.load(Ordering::Relaxed);
        let copied = self.rows_copied.load(Ordering::Relaxed);
        let this_run = copied.saturating_sub(self.rows_before.load(Ordering::Relaxed));
        let ms = unix_ms().saturating_sub(started).max(1);
        let rate = if started == 0 {
            0
        } else {
            this_run * 1000 / ms
        };
        let estimate = self.rows_estimate.load(Ordering::Relaxed);
        let eta = (rate > 0 && estimate > 0).then(|| estimate.saturating_sub(copied) / rate);
        (rate, eta)
    }

    /// The `snapshot` object of `/cdc/status`.
    pub fn json(&self) -> sonic_rs::Value {
        let (rate, eta) = self.rate_and_eta();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        sonic_rs::json!({
            "state": self.state_name(),
            "rows_copied": load(&self.rows_copied),
            "rows_total_estimate": load(&self.rows_estimate),
            "rows_per_second": rate,
            "eta_seconds": eta,
            "rows_dropped_for_newer_changes": load(&self.rows_dropped),
            "chunks_done": load(&self.chunks_done),
            "chunks_resumed": load(&self.chunks_resumed),
            "chunks_retried": load(&self.chunks_retried),
        })
    }

    /// One line for a terminal.
    fn line(&self) -> String {
        let (rate, eta) = self.rate_and_eta();
        let copied = self.rows_copied.load(Ordering::Relaxed);
        let estimate = self.rows_estimate.load(Ordering::Relaxed);
        let eta = eta.map(|s| format!(", ETA {}m{:02}s", s / 60, s % 60));
        format!(
            "snapshot: {copied} of ~{estimate} rows, {rate} rows/s{}, {} chunks",
            eta.unwrap_or_default(),
            self.chunks_done.load(Ordering::Relaxed)
        )
    }

    /// The loader recorded a chunk; returns true when that finished the snapshot.
    pub fn chunk_recorded(&self, rows: u64) -> bool {
        self.rows_copied.fetch_add(rows, Ordering::Relaxed);
        self.chunks_done.fetch_add(1, Ordering::AcqRel);
        self.check_finished()
    }

    fn check_finished(&self) -> bool {
        let done =
            self.chunks_done.load(Ordering::Acquire) - self.chunks_resumed.load(Ordering::Relaxed);
        let finished = self.planned_all.load(Ordering::Acquire)
            && done >= self.chunks_taken.load(Ordering::Acquire);
        finished
            && self
                .state
                .compare_exchange(
                    STATE_COPYING,
                    STATE_DONE,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// What a worker reads next: the rows of `table` with key in (`lo`, `hi`] (no bound where
/// `None`), of the range numbered `number`, in chunks (see [`Worker::read_chunk`]).
#[derive(Debug, Clone)]
struct Chunk {
    table: usize,
    number: u32,
    lo: Option<Vec<String>>,
    hi: Option<Vec<String>>,
    /// `hi` is the range's own upper bound (not that of a chunk read again).
    range_end: bool,
    /// A `ctid` range: the bounds are `tid`s, and this is the table's `pg_relation_filenode`
    /// when its ranges were planned (`None`: a key range).
    filenode: Option<String>,
    /// A round of the keys the stream left partial (see `window::PartialKeys`), read by key
    /// after the table's ranges; the keys it took once read (given back if it is refused).
    round: Option<Arc<Vec<Box<[u8]>>>>,
}

impl Chunk {
    /// A keys round of `table` (its keys are taken when it is read).
    fn round(table: usize) -> Chunk {
        Chunk {
            table,
            number: 0,
            lo: None,
            hi: None,
            range_end: false,
            filenode: None,
            round: Some(Arc::new(Vec::new())),
        }
    }
}

/// Ranges per table: about `snapshot-chunk-rows` times this many halves each (a range ends
/// in a chunk of about half the rows, so two and a half chunks make three reads, and a
/// sample that is a little off does not add a fourth, tiny one)...
const RANGE_HALF_CHUNKS: u64 = 5;
/// ...but at least this many per worker (down to a chunk's rows each), so that the workers
/// end about together: a worker that takes the last range reads it alone.
const RANGES_PER_WORKER: u64 = 4;
/// Ranges per table at most (the chunk table's rows, the plan in memory).
const RANGES_MAX: u64 = 4096;
/// Heap pages sampled for a table's key ranges (`TABLESAMPLE SYSTEM`): about 50,000 keys
/// of a narrow table; the ranges need only be about even.
const SAMPLE_PAGES: u64 = 300;
/// Sampled keys read at most, should a table's size be far off (the ranges then cover the
/// lowest keys sampled, and the last, open-ended one the rest).
const SAMPLE_KEYS_MAX: u64 = 100_000;

/// The ranges still owed, in the order they are handed out.
struct Planner {
    ranges: VecDeque<Chunk>,
}

impl Planner {
    fn next(&mut self) -> Option<Chunk> {
        self.ranges.pop_front()
    }
}

/// Splits the keys of `source` above `from` into ranges (numbered from `first`) by a sample
/// of its keys, and records them in the chunk table, the last one open-ended.
fn plan_ranges(
    conn: &mut PgConn,
    cfg: &CdcConfig,
    chunk_table: &str,
    table: usize,
    source: &SourceTable,
    first: u32,
    from: Option<&[String]>,
) -> Result<Vec<Chunk>, SnapshotError> {
    let name = qualified(&source.name);
    if cfg.snapshot_chunking == CdcSnapshotChunking::Ctid
        && from.is_none()
        && let Some(plan) = CtidPlan::of(conn, &name, &source.name)?
    {
        return plan.record(conn, cfg, chunk_table, table, source, first);
    }
    // A partitioned table has no storage of its own: its size is that of its leaves.
    let pages: u64 = conn
        .query(&format!(
            "SELECT (coalesce((SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree({0}::regclass) \
               WHERE isleaf), pg_relation_size({0}::regclass)) / current_setting('block_size')::int8)::int8::text",
            quote_literal(&name)
        ))
        .map_err(query(format!("size {}", source.name)))?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let percent = (100.0 * SAMPLE_PAGES as f64 / pages.max(1) as f64).min(100.0);
    // The keys' text, ordered by the columns themselves: qualified by the table's alias, so
    // that no output column's name (a key column's own, as text) can take the ORDER BY.
    // TABLESAMPLE on a partitioned table samples each leaf.
    // As the hex of their bytes ([`exact_text`]), read back by [`from_hex`]: a key that is
    // not UTF-8 (SQL_ASCII) becomes a bound that is the same bytes, not U+FFFD.
    let keys: Vec<String> = source
        .key
        .iter()
        .map(|k| exact_text(&format!("{}::text", quote_ident(k))))
        .collect();
    let order: Vec<String> = source
        .key
        .iter()
        .map(|k| format!("__pgprism_sample.{}", quote_ident(k)))
        .collect();
    // At most SAMPLE_KEYS_MAX keys, whatever the size said: the sample is held in memory.
    let sample = conn
        .query(&format!(
            "SELECT {} FROM {name} AS __pgprism_sample TABLESAMPLE SYSTEM ({percent:.6}){} ORDER BY {} LIMIT {SAMPLE_KEYS_MAX}",
            keys.join(", "),
            lower_bound(&key_list(&source.key), from),
            order.join(", "),
        ))
        .map_err(query(format!("sample the keys of {}", source.name)))?;
    let n = sample.len() as u64;
    let estimate = (n as f64 * 100.0 / percent) as u64;
    let ranges = range_count(cfg, estimate, n);
    // Range i ends at the sample's ((i + 1) n / ranges)-th key: strictly rising, n >= ranges.
    let bounds = (1..ranges).filter_map(|i| {
        let at = (i * n).div_ceil(ranges).checked_sub(1)?;
        let row = sample.get(at as usize)?;
        row.iter()
            .map(|v| v.as_deref().and_then(from_hex))
            .collect::<Option<Vec<String>>>()
    });
    let chunks = ranges_from(table, first, from.map(<[String]>::to_vec), bounds, None);
    record_ranges(conn, cfg, chunk_table, source, &chunks, None)?;
    tracing::debug!(table = %source.name, pages, sampled = n, estimate, ranges = chunks.len(), "snapshot key ranges");
    Ok(chunks)
}

/// How many ranges a table of about `estimate` rows is cut into (see [`RANGE_HALF_CHUNKS`]
/// and [`RANGES_PER_WORKER`]), at most `units` (the keys sampled, or the pages: each range
/// ends at one of them).
fn range_count(cfg: &CdcConfig, estimate: u64, units: u64) -> u64 {
    let chunk_rows = cfg.snapshot_chunk_rows.max(1) as u64;
    let for_balance =
        (cfg.snapshot_workers as u64 * RANGES_PER_WORKER).min(estimate.div_ceil(chunk_rows));
    (estimate * 2)
        .div_ceil(chunk_rows * RANGE_HALF_CHUNKS)
        .max(for_balance)
        .clamp(1, RANGES_MAX)
        .min(units.max(1))
}

/// The ranges of `table` numbered from `first`: the first from `lo` on, each ending at the
/// next of `bounds`, and one more, open-ended, after the last.
fn ranges_from(
    table: usize,
    first: u32,
    mut lo: Option<Vec<String>>,
    bounds: impl Iterator<Item = Vec<String>>,
    filenode: Option<&str>,
) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for (i, hi) in bounds.map(Some).chain([None]).enumerate() {
        chunks.push(Chunk {
            table,
            number: first + i as u32,
            lo: lo.clone(),
            hi: hi.clone(),
            range_end: true,
            filenode: filenode.map(str::to_string),
            round: None,
        });
        lo = hi;
    }
    chunks
}

/// Records a table's planned ranges in the chunk table (a row of the same number, left by
/// an earlier plan, takes the new bounds). `filenode`: `ctid` ranges, recorded with the
/// table's filenode (key ranges leave the column as it is).
fn record_ranges(
    conn: &mut PgConn,
    cfg: &CdcConfig,
    chunk_table: &str,
    source: &SourceTable,
    chunks: &[Chunk],
    filenode: Option<&str>,
) -> Result<(), SnapshotError> {
    let values: Vec<String> = chunks
        .iter()
        .map(|c| {
            let mut row = format!(
                "({}, {}, {}, {}, {}, {}",
                quote_literal(&cfg.slot),
                quote_literal(&source.name),
                c.number,
                array_literal(c.lo.as_deref()),
                array_literal(c.hi.as_deref()),
                c.hi.is_none()
            );
            if let Some(f) = filenode {
                row.push_str(", ");
                row.push_str(&quote_literal(f));
            }
            row.push(')');
            row
        })
        .collect();
    let (column, set, kind) = match filenode {
        Some(_) => (", filenode", ", filenode = excluded.filenode", "ctid"),
        None => ("", "", "key"),
    };
    conn.query(&format!(
        "INSERT INTO {chunk_table} (slot, tbl, chunk, lo, hi, last{column}) VALUES {} \
         ON CONFLICT (slot, tbl, chunk) DO UPDATE SET lo = excluded.lo, hi = excluded.hi, \
         last = excluded.last{set}",
        values.join(", ")
    ))
    .map_err(query(format!(
        "record the {kind} ranges of {}",
        source.name
    )))?;
    Ok(())
}

/// A table's `ctid` ranges: its heap pages cut into ranges, each read by a TID Range Scan
/// (`ctid > lo AND ctid <= hi LIMIT n`, in physical order, with no index), the last one
/// open-ended (rows inserted during the snapshot may land on new pages; the stream carries
/// them whole, so reading them again is harmless).
///
/// Why that is as complete as key ranges, with the DBLog windows:
/// * a row not changed during the table's snapshot stays at its `ctid` and is in exactly one
///   chunk;
/// * a row changed during the snapshot is the stream's from its last change on: a chunk
///   read before that change is emitted before it (its high watermark precedes the change)
///   or drops the row (the change is inside its window), and a chunk read after it holds
///   the same version. What a `ctid` range adds is a row an UPDATE moved from a page not
///   read yet to a page already read: in no chunk at all. The stream's change is then all
///   StarRocks gets, which is the whole row except when it left an unchanged TOAST value
///   out; such keys are read again by key before the table counts as copied (see
///   `window::Exchange::note_partial`);
/// * a rewrite (VACUUM FULL, CLUSTER, a rewriting ALTER TABLE, TRUNCATE) moves every row and
///   sends nothing of it into the stream: each chunk reads `pg_relation_filenode` in its
///   own transaction after its rows (its lock on the table then keeps a rewrite out until it
///   commits), and on a change the table's snapshot starts over ([`SnapshotError::Rewritten`]).
struct CtidPlan {
    pages: u64,
    filenode: String,
    estimate: u64,
}

impl CtidPlan {
    /// The table's pages and filenode; `None` where `ctid` ranges do not apply (PostgreSQL
    /// before 14, which has no TID Range Scan; a partitioned table, whose leaves have pages
    /// of their own).
    fn of(conn: &mut PgConn, name: &str, source: &str) -> Result<Option<CtidPlan>, SnapshotError> {
        let row = conn
            .query(&format!(
                "SELECT pg_relation_filenode(c.oid)::text, \
                 (pg_relation_size(c.oid) / current_setting('block_size')::int8)::text, \
                 greatest(c.reltuples, 0)::int8::text \
                 FROM pg_class c WHERE c.oid = {}::regclass AND c.relkind = 'r' \
                 AND current_setting('server_version_num')::int >= 140000",
                quote_literal(name)
            ))
            .map_err(query(format!("size {source}")))?;
        let Some(row) = row.first() else {
            return Ok(None);
        };
        let field = |i: usize| row.get(i).cloned().flatten();
        let Some(filenode) = field(0) else {
            return Ok(None);
        };
        let num = |i: usize| field(i).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        Ok(Some(CtidPlan {
            filenode,
            pages: num(1),
            estimate: num(2),
        }))
    }

    /// Cuts the pages into ranges (as many as key ranges would be), numbered from `first`,
    /// and records them.
    fn record(
        &self,
        conn: &mut PgConn,
        cfg: &CdcConfig,
        chunk_table: &str,
        table: usize,
        source: &SourceTable,
        first: u32,
    ) -> Result<Vec<Chunk>, SnapshotError> {
        // Never analyzed (reltuples -1, read as 0): about 100 narrow rows a page.
        let estimate = if self.estimate > 0 {
            self.estimate
        } else {
            self.pages * 100
        };
        let ranges = range_count(cfg, estimate, self.pages);
        // Range i ends with page (i + 1) pages / ranges - 1: the last item a page can hold
        // is below 65535, the largest offset a `tid` takes.
        let bounds = (1..ranges).map(|i| vec![format!("({},65535)", i * self.pages / ranges - 1)]);
        let filenode = Some(self.filenode.as_str());
        let chunks = ranges_from(table, first, None, bounds, filenode);
        record_ranges(conn, cfg, chunk_table, source, &chunks, filenode)?;
        tracing::debug!(table = %source.name, pages = self.pages, estimate, ranges = chunks.len(), filenode = %self.filenode, "snapshot ctid ranges");
        Ok(chunks)
    }
}

/// Pages per `ctid` chunk at most.
const PAGES_PER_CHUNK_MAX: u64 = 1 << 20;

/// What one chunk read gives: the chunk for the stream, whether it reached its range's end,
/// and the keys a keys round took.
struct ChunkRead {
    fetched: Fetched,
    through: bool,
    round: Option<Arc<Vec<Box<[u8]>>>>,
    /// Text values replaced (`cdc.non-utf8 = "replace"`).
    replaced: u64,
}

/// The pages a `ctid` chunk reads: from its lower bound on, `pages` of them, or fewer where
/// its range ends first.
struct PageWindow {
    pages: u64,
    /// Its last page.
    last_page: u64,
    /// Its upper bound: the end of `last_page`, or the range's own.
    hi: Vec<String>,
    /// `hi` is the range's end.
    to_range_end: bool,
    /// Pages it covers (fewer than `pages` at the range's end).
    covered: u64,
}

impl PageWindow {
    fn of(chunk: &Chunk, pages: u64) -> PageWindow {
        let tid = |b: &Option<Vec<String>>| {
            b.as_ref()
                .and_then(|b| b.first())
                .and_then(|t| parse_tid(t.as_bytes()))
        };
        // After `(p,65535)` comes page p + 1; after `(p,i)`, the rest of page p.
        let first = match tid(&chunk.lo) {
            None => 0,
            Some((p, 65535)) => u64::from(p) + 1,
            Some((p, _)) => u64::from(p),
        };
        let pages = pages.max(1);
        let last_page = (first + pages - 1).min(u64::from(u32::MAX) - 1);
        match tid(&chunk.hi) {
            Some((p, i)) if (last_page, 65535) >= (u64::from(p), u32::from(i)) => PageWindow {
                pages,
                last_page: u64::from(p),
                hi: chunk.hi.clone().unwrap_or_default(),
                to_range_end: true,
                covered: (u64::from(p) + 1).saturating_sub(first),
            },
            _ => PageWindow {
                pages,
                last_page,
                hi: vec![format!("({last_page},65535)")],
                to_range_end: false,
                covered: pages,
            },
        }
    }
}

/// A `tid`'s text, `(page,item)`, as numbers.
fn parse_tid(text: &[u8]) -> Option<(u32, u16)> {
    let inner = text.strip_prefix(b"(")?.strip_suffix(b")")?;
    let comma = memchr::memchr(b',', inner)?;
    let num = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
    let page = u32::try_from(num(&inner[..comma])?).ok()?;
    let item = u16::try_from(num(&inner[comma + 1..])?).ok()?;
    Some((page, item))
}

/// The key columns for ORDER BY (a list, not a row, so that the primary key index gives
/// the order).
fn order_list(key: &[String]) -> String {
    key.iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_list(key: &[String]) -> String {
    format!(
        "({})",
        key.iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// SQL for the bytes of a text expression, in hex: what PostgreSQL holds (its database
/// encoding's bytes for SQL_ASCII, whose text may be any bytes; UTF-8 otherwise, which
/// every other encoding converts to exactly). Read through a text connection, a value that
/// is not UTF-8 would be decoded lossily (U+FFFD), and a key bound so changed is another
/// key: a range resumed from it would skip or repeat rows.
fn exact_text(expr: &str) -> String {
    format!(
        "encode(convert_to({expr}, CASE getdatabaseencoding() WHEN 'SQL_ASCII' THEN 'SQL_ASCII' ELSE 'UTF8' END), 'hex')"
    )
}

/// [`exact_text`]'s hex back as a key part: the text, or, for bytes that are not UTF-8,
/// [`RAW_KEY`] and the hex, as [`decode_key`] holds them. `None` for what is not hex.
fn from_hex(hex: &str) -> Option<String> {
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = hex
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    Some(raw_or_text(&bytes))
}

/// A key part's bytes as [`decode_key`] and [`key_literal`] hold them.
fn raw_or_text(part: &[u8]) -> String {
    match std::str::from_utf8(part) {
        Ok(text) => text.to_string(),
        Err(_) => {
            let mut raw = String::with_capacity(1 + 2 * part.len());
            raw.push(RAW_KEY);
            for b in part {
                raw.push_str(&format!("{b:02x}"));
            }
            raw
        }
    }
}

/// Marks a key part held as the hex of bytes that are not UTF-8 ([`decode_key`]): a NUL,
/// which no PostgreSQL text holds.
const RAW_KEY: char = '\0';

/// A key part as SQL: an untyped literal, which PostgreSQL types like the key, or, for bytes
/// that are not UTF-8, those bytes as text of the database's encoding (SQL_ASCII takes any).
fn key_literal(value: &str) -> String {
    match value.strip_prefix(RAW_KEY) {
        Some(hex) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            format!("convert_from(decode('{hex}', 'hex'), 'SQL_ASCII')")
        }
        _ => quote_literal(value),
    }
}

/// The text values as a row of untyped literals, which PostgreSQL types like the key.
fn row_literal(values: &[String]) -> String {
    format!(
        "({})",
        values
            .iter()
            .map(|v| key_literal(v))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn lower_bound(key: &str, lo: Option<&[String]>) -> String {
    match lo {
        Some(lo) => format!(" WHERE {key} > {}", row_literal(lo)),
        None => String::new(),
    }
}

fn array_literal(values: Option<&[String]>) -> String {
    match values {
        Some(v) => format!(
            "ARRAY[{}]::text[]",
            v.iter()
                .map(|s| key_literal(s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "NULL::text[]".into(),
    }
}

/// A snapshot this run owes: what is left of it.
pub struct Snapshot {
    planner: Planner,
    /// The tables owing a snapshot (a chunk's `table` indexes them).
    tables: Vec<SourceTable>,
    tag: String,
    exchange: Arc<Exchange>,
}

/// Reads the chunk table: the snapshot still owed by this slot, if any. Sets the progress
/// state either way and logs which it is.
pub fn resume(
    cfg: &CdcConfig,
    url: &PgUrl,
    tables: &[SourceTable],
    slot_created: bool,
    shared: &Shared,
    timeout: Duration,
) -> Result<Option<Snapshot>, SnapshotError> {
    let progress = &shared.snapshot;
    let mut conn = PgConn::connect(url, false, timeout).map_err(query("connect"))?;
    let t = chunk_table(cfg);
    // `lo` and `hi` element by element as the hex of their bytes ([`exact_text`]), joined
    // with commas (NULL for a NULL array): a bound that is not UTF-8 (SQL_ASCII) comes back
    // as the same bytes. (Read as `array_to_json` text they came back lossily, U+FFFD, and
    // a range resumed from such a `lo` started at another key: rows skipped or read again.)
    let bound = |col: &str| {
        format!(
            "(SELECT string_agg({}, ',' ORDER BY o) FROM unnest(c.{col}) WITH ORDINALITY AS u(x, o))",
            exact_text("x")
        )
    };
    let rows = conn
        .query(&format!(
            "SELECT tbl, chunk::text, {}, {}, last::text, \
             (done_at IS NOT NULL)::text, coalesce(rows, 0)::text, filenode, (lo IS NULL)::text \
             FROM {t} AS c WHERE slot = {} \
             ORDER BY c.tbl, c.chunk",
            bound("lo"),
            bound("hi"),
            quote_literal(&cfg.slot)
        ))
        .map_err(query("read the chunk table"))?;
    if rows.is_empty() || !cfg.snapshot {
        let (state, why) = match (slot_created, cfg.snapshot) {
            (true, false) => (
                STATE_SKIPPED,
                "snapshot = false: existing rows are not copied",
            ),
            (_, false) if !rows.is_empty() => (
                STATE_SKIPPED,
                "snapshot = false: the unfinished initial snapshot is not resumed",
            ),
            _ => (STATE_NONE, "the slot exists and owes no snapshot"),
        };
        progress.state.store(state, Ordering::Relaxed);
        tracing::info!(slot = %cfg.slot, "no initial snapshot: {why}");
        return Ok(None);
    }
    // Per table: its ranges not done, and where planning goes on (the next range number and
    // the lower bound) when its ranges do not reach its end yet.
    struct TablePlan {
        source: SourceTable,
        pending: Vec<Chunk>,
        next: Option<(u32, Option<Vec<String>>)>,
        /// The keys left partial still owed, and whether their rounds began (`None`: the
        /// table is complete, or its plan is older than this record).
        partial: Option<(Vec<Box<[u8]>>, bool)>,
        /// More keys were left partial than `snapshot-partial-keys-max` (their row's `lo` is
        /// NULL): those past the bound are not known, so the table is copied again from its
        /// start, its ranges forgotten.
        overflow: bool,
    }
    let mut plans: Vec<TablePlan> = tables
        .iter()
        .filter(|s| {
            rows.iter()
                .any(|r| r.first().cloned().flatten().as_deref() == Some(&s.name))
        })
        .map(|s| TablePlan {
            source: s.clone(),
            pending: Vec::new(),
            next: Some((1, None)),
            partial: None,
            overflow: false,
        })
        .collect();
    let (mut resumed, mut rows_before) = (0u64, 0u64);
    for r in &rows {
        let field = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let Some(ti) = plans.iter().position(|p| p.source.name == field(0)) else {
            continue;
        };
        if field(1) == PARTIAL_CHUNK.to_string() {
            // (Its row comes first of the table's: ordered by chunk number.)
            if field(5) != "true" && field(8) == "true" {
                plans[ti].overflow = true;
                plans[ti].partial = Some((Vec::new(), false));
            } else if field(5) != "true" {
                // Each key's hex, held as the hex of that text.
                let keys = hex_array(r.get(2).cloned().flatten().as_deref())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|h| hex_bytes(h))
                    .map(Vec::into_boxed_slice)
                    .collect();
                plans[ti].partial = Some((keys, field(4) == "true"));
            }
            continue;
        }
        let number: u32 = field(1).parse().unwrap_or(0);
        if number == 0 || plans[ti].overflow {
            continue;
        }
        let (lo, hi) = (
            hex_array(r.get(2).cloned().flatten().as_deref()),
            hex_array(r.get(3).cloned().flatten().as_deref()),
        );
        let plan = &mut plans[ti];
        // Ranges are numbered in key order, so the last one says whether planning goes on
        // (ordered by the number, not its text: `c.chunk`, since the output column `chunk`
        // is text and sorted 10 before 9, which planned chunk 10 again after a restart).
        plan.next = (field(4) != "true").then(|| (number + 1, hi.clone()));
        // Rows copied by earlier runs, of ranges done or begun.
        rows_before += field(6).parse::<u64>().unwrap_or(0);
        if field(5) == "true" {
            resumed += 1;
        } else {
            plan.pending.push(Chunk {
                table: ti,
                number,
                lo,
                hi,
                range_end: true,
                filenode: r.get(7).cloned().flatten(),
                round: None,
            });
        }
    }
    plans.retain(|p| !p.pending.is_empty() || p.next.is_some() || p.partial.is_some());
    for p in plans.iter().filter(|p| p.overflow) {
        // The keys past the bound were not kept (a run that met them stopped, and one that
        // stored them with a checkpoint and then died never read them): every row is read
        // again, under windows that keep that correct as after a rewrite, and the keys left
        // partial from here on are remembered from none, unfrozen.
        tracing::warn!(table = %p.source.name, "more keys were left partial during its snapshot than cdc.snapshot-partial-keys-max: copying it again from its start");
        conn.query(&format!(
            "DELETE FROM {t} WHERE slot = {slot} AND tbl = {tbl} AND chunk > 0; \
             UPDATE {t} SET lo = '{{}}', last = false, done_at = NULL \
             WHERE slot = {slot} AND tbl = {tbl} AND chunk = {PARTIAL_CHUNK}",
            slot = quote_literal(&cfg.slot),
            tbl = quote_literal(&p.source.name),
        ))
        .map_err(query(format!("forget the ranges of {}", p.source.name)))?;
    }
    let exchange = Arc::new(Exchange::default());
    for (i, p) in plans.iter_mut().enumerate() {
        for c in &mut p.pending {
            c.table = i;
        }
        let fresh = p.pending.is_empty()
            && p.next
                .as_ref()
                .is_some_and(|(n, lo)| *n == 1 && lo.is_none());
        if let Some((first, from)) = p.next.take() {
            let planned = plan_ranges(&mut conn, cfg, &t, i, &p.source, first, from.as_deref())?;
            p.pending.extend(planned);
        }
        if let Some((keys, mut frozen)) = p.partial.take() {
            // A table copied from its start (its ranges forgotten after a rewrite) has no
            // rounds begun: every key a change leaves partial from here on is remembered.
            // Nor has a table with a range still to copy (one of its chunks may have been
            // refused when the rounds began): until every range is copied again, a row that
            // moves out of an uncopied chunk's pages must be remembered.
            frozen &= !fresh && p.pending.is_empty();
            exchange.restore_partial(&p.source.name, keys, frozen);
            // Every range is copied: the keys rounds go on, one at least, whose high
            // watermark comes after the changes this run replays from the checkpoint (the
            // state stored there does not know them).
            if p.pending.is_empty() {
                p.pending.push(Chunk::round(i));
            }
        }
    }
    progress.chunks_resumed.store(resumed, Ordering::Relaxed);
    progress.chunks_done.store(resumed, Ordering::Relaxed);
    progress.rows_copied.store(rows_before, Ordering::Relaxed);
    progress.rows_before.store(rows_before, Ordering::Relaxed);
    if plans.is_empty() {
        progress.state.store(STATE_DONE, Ordering::Relaxed);
        tracing::info!(slot = %cfg.slot, chunks = resumed, "initial snapshot already done");
        return Ok(None);
    }
    let names: Vec<String> = plans
        .iter()
        .map(|p| quote_literal(&qualified(&p.source.name)))
        .collect();
    let estimate = conn
        .query(&format!(
            "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::int8::text FROM pg_class \
             WHERE oid IN ({})",
            names
                .iter()
                .map(|n| format!("{n}::regclass"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .map_err(query("estimate the rows"))?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(0);
    progress
        .rows_estimate
        .store(estimate.max(rows_before), Ordering::Relaxed);
    progress.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
    progress.state.store(STATE_COPYING, Ordering::Release);
    if resumed > 0 {
        tracing::info!(slot = %cfg.slot, chunks_done = resumed, rows_done = rows_before, "resuming the initial snapshot after the chunks already done");
    } else {
        tracing::info!(slot = %cfg.slot, tables = plans.len(), rows_estimate = estimate, chunk_rows = cfg.snapshot_chunk_rows, workers = cfg.snapshot_workers, "initial snapshot: copying the existing rows beside streaming");
    }
    let nonce = format!("{:x}{:x}", std::process::id(), unix_ms());
    Ok(Some(Snapshot {
        planner: Planner {
            ranges: plans.iter_mut().flat_map(|p| p.pending.drain(..)).collect(),
        },
        tables: plans.into_iter().map(|p| p.source).collect(),
        tag: format!("{} {nonce}", cfg.slot),
        exchange,
    }))
}

/// The chunk number of a table's row of keys left partial (see `window::PartialKeys`): its
/// `lo` holds them (each key's bytes in hex; NULL: more than `snapshot-partial-keys-max`,
/// the table is copied again), `last` says whether their rounds began and `done_at` when the
/// table was complete.
const PARTIAL_CHUNK: i32 = -1;

/// The loader's SQL storing the partial keys' state with a checkpoint. An upsert: a snapshot
/// planned by a build older than this row (which setup writes with the plan) has none.
pub fn partial_sql(cfg_table: &str, slot: &str, state: &[window::PartialState]) -> String {
    let t = qualified(&format!("{cfg_table}_snapshot"));
    state
        .iter()
        .map(|p| {
            // Past the bound the keys are no use (the table is copied again): NULL says so.
            let keys = match p.overflow {
                true => "NULL".to_string(),
                false => {
                    let keys: Vec<String> =
                        p.keys.iter().map(|k| format!("'{}'", hex(k))).collect();
                    format!("ARRAY[{}]::text[]", keys.join(","))
                }
            };
            format!(
                "INSERT INTO {t} (slot, tbl, chunk, lo, last, done_at) VALUES ({}, {}, {PARTIAL_CHUNK}, \
                 {keys}, {}, {}) ON CONFLICT (slot, tbl, chunk) DO UPDATE \
                 SET lo = excluded.lo, last = excluded.last, done_at = excluded.done_at;",
                quote_literal(slot),
                quote_literal(&p.table),
                p.frozen,
                if p.done { "now()" } else { "NULL" },
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    hex.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// A bound as the chunk table query reads it (comma-joined [`exact_text`] hex) back as key
/// parts; `None` for SQL NULL (an empty text is one empty part: a key `''`).
fn hex_array(joined: Option<&str>) -> Option<Vec<String>> {
    joined?.split(',').map(from_hex).collect()
}

/// The running workers of one run.
pub struct Workers {
    handles: Vec<std::thread::JoinHandle<Result<(), SnapshotError>>>,
}

impl Workers {
    /// Waits for the workers; the first error wins.
    pub fn join(self) -> Result<(), CdcError> {
        let mut result = Ok(());
        for h in self.handles {
            let r = h.join().map_err(|_| CdcError::LoaderPanicked)?;
            if result.is_ok() {
                result = r.map_err(CdcError::Snapshot);
            }
        }
        result
    }
}

/// What the workers share.
struct Ctx {
    /// The ranges not taken by a worker yet.
    ranges: std::sync::Mutex<Planner>,
    /// A worker found no range left (rather than stopping on an error or a stop).
    planned_all: AtomicBool,
    /// The tables, as planned (a chunk's `table` indexes them).
    tables: Vec<SourceTable>,
    exchange: Arc<Exchange>,
    tag: String,
    next_id: AtomicU64,
    pcfg: PipelineConfig,
    attempts_max: u32,
    /// Rows per chunk read at most, and the bytes of rows at which a chunk is cut.
    chunk_rows: usize,
    chunk_bytes_max: usize,
    /// `snapshot-read-coalesce-us` (see [`PgConn::coalesce_reads`]).
    read_coalesce: Duration,
    /// Chunks a worker has read whose verdict it has not heard yet.
    in_flight_max: usize,
    format: CdcSnapshotFormat,
    /// Pieces of each table (by its index) not taken by the stream yet, over every worker:
    /// its ranges not handed out, its chunks in flight or waiting to be read again, and the
    /// rests of its ranges and of its chunks read again. At 0 every row of its ranges is
    /// copied, and only then may its keys rounds begin (or the table count as complete): a
    /// round freezes the partial keys, so a chunk read after it (one refused earlier, read
    /// again) would leave a row whose key changes partially inside its window, or a row moved
    /// out of its pages, in no chunk and owed by no key.
    chunks_owed: std::sync::Mutex<HashMap<usize, usize>>,
    /// The chunk table and the slot, for a table rewritten during its snapshot.
    chunk_table: String,
    slot: String,
    url: PgUrl,
    timeout: Duration,
    shared: Arc<Shared>,
    running: AtomicU64,
}

impl Snapshot {
    /// The stream side of this snapshot, for the pipeline.
    pub fn windows(&self, keys_max: usize) -> Windows {
        Windows::new(self.tag.clone(), Arc::clone(&self.exchange), keys_max)
    }

    /// Starts the workers (and a progress line when stderr is a terminal). Call after
    /// streaming started: a watermark before the stream's start would never be seen.
    pub fn spawn(
        self,
        cfg: &CdcConfig,
        url: &PgUrl,
        pcfg: &PipelineConfig,
        shared: &Arc<Shared>,
        timeout: Duration,
    ) -> Result<Workers, CdcError> {
        let mut chunks_owed = HashMap::new();
        for c in self.planner.ranges.iter().filter(|c| c.round.is_none()) {
            *chunks_owed.entry(c.table).or_insert(0) += 1;
        }
        self.exchange.watch_partial(
            self.tables.iter().map(|t| t.name.clone()),
            cfg.snapshot_partial_keys_max,
        );
        let ctx = Arc::new(Ctx {
            chunks_owed: std::sync::Mutex::new(chunks_owed),
            ranges: std::sync::Mutex::new(self.planner),
            planned_all: AtomicBool::new(false),
            tables: self.tables,
            exchange: self.exchange,
            tag: self.tag,
            next_id: AtomicU64::new(1),
            pcfg: pcfg.clone(),
            attempts_max: cfg.snapshot_chunk_attempts_max,
            chunk_rows: cfg.snapshot_chunk_rows.max(1),
            chunk_bytes_max: cfg.snapshot_chunk_bytes_max.max(1),
            read_coalesce: Duration::from_micros(cfg.snapshot_read_coalesce_us),
            in_flight_max: cfg.snapshot_chunks_in_flight,
            format: cfg.snapshot_format,
            chunk_table: chunk_table(cfg),
            slot: cfg.slot.clone(),
            url: url.clone(),
            timeout,
            shared: Arc::clone(shared),
            running: AtomicU64::new(cfg.snapshot_workers as u64),
        });
        shared.snapshot_bodies.open(bodies_max(cfg));
        ctx.exchange.keep_spares(bodies_max(cfg));
        let mut handles = Vec::with_capacity(cfg.snapshot_workers);
        for n in 0..cfg.snapshot_workers {
            let ctx = Arc::clone(&ctx);
            let handle = std::thread::Builder::new()
                .name(format!("cdc-snapshot-{n}"))
                .spawn(move || {
                    let result = Worker::run(&ctx);
                    if result.is_err() {
                        // The run ends; a restart resumes after the chunks done.
                        ctx.shared.stopped.store(true, Ordering::Release);
                    }
                    let last = ctx.running.fetch_sub(1, Ordering::AcqRel) == 1;
                    if last {
                        ctx.exchange.set_workers_done();
                        ctx.shared.snapshot_bodies.close();
                    }
                    // (A worker that stopped for the run's stop returns Ok too, with its range
                    // unfinished.)
                    if last
                        && result.is_ok()
                        && ctx.planned_all.load(Ordering::Acquire)
                        && !ctx.shared.stopped.load(Ordering::Acquire)
                    {
                        let p = &ctx.shared.snapshot;
                        p.planned_all.store(true, Ordering::Release);
                        if p.check_finished() {
                            log_finished(p);
                        }
                    }
                    result
                })
                .map_err(|e| CdcError::Replication(PgError::Io(e)))?;
            handles.push(handle);
        }
        // SAFETY: isatty only inspects the descriptor number it is given.
        if unsafe { libc::isatty(2) } == 1 {
            let shared = Arc::clone(shared);
            let _ = std::thread::Builder::new()
                .name("cdc-snapshot-progress".into())
                .spawn(move || progress_line(&shared));
        }
        Ok(Workers { handles })
    }
}

/// Logs the end of the snapshot (once, by whoever saw it finish).
pub fn log_finished(progress: &Progress) {
    tracing::info!(
        rows = progress.rows_copied.load(Ordering::Relaxed),
        chunks = progress.chunks_done.load(Ordering::Relaxed),
        retried = progress.chunks_retried.load(Ordering::Relaxed),
        "initial snapshot done"
    );
}

/// Rewrites one stderr line each second while the snapshot copies.
fn progress_line(shared: &Shared) {
    let p = &shared.snapshot;
    let mut err = std::io::stderr();
    while p.state.load(Ordering::Acquire) == STATE_COPYING
        && !shared.stopped.load(Ordering::Acquire)
    {
        let _ = write!(err, "\r{}\x1b[K", p.line());
        let _ = err.flush();
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = writeln!(err, "\r{}\x1b[K", p.line());
}

/// What a worker gets from the planner.
enum Planned {
    Chunk(Chunk),
    /// Every range is handed out.
    End,
    /// The run stops.
    Stopped,
}

/// A chunk read whose high watermark is written: the stream's verdict comes on `verdict`.
struct InFlight {
    chunk: Chunk,
    /// Reads of this chunk so far, this one included.
    attempts: u32,
    verdict: crossbeam_channel::Receiver<Verdict>,
    /// Text values the read replaced (`cdc.non-utf8 = "replace"`), counted once the stream
    /// takes the chunk: a chunk refused and read again counts once.
    replaced: u64,
}

/// One worker: its connection and the column lists it has read.
struct Worker<'a> {
    ctx: &'a Ctx,
    conn: PgConn,
    schemas: Vec<Option<Arc<Read>>>,
    /// The last chunk read whose high watermark is not written yet (its id and table).
    high: Option<(u64, String)>,
    /// Rows per read, per table: `snapshot-chunk-rows`, or fewer where rows are wide (see
    /// [`Worker::read_chunk`]).
    limits: Vec<usize>,
    /// Pages per `ctid` chunk, per table (0: not known yet; see [`Worker::page_limit`]).
    page_limits: Vec<u64>,
    phases: Phases,
}

/// Where a worker's time went, logged at debug level when it ends: the figures that say
/// which part of a chunk's path to work on next.
#[derive(Default)]
struct Phases {
    chunks: u64,
    /// The chunk's round trip: watermark commit, snapshot, rows (see [`Worker::read_chunk`]).
    read: Duration,
    /// High watermarks written alone (the read-ahead was full or the plan ran out).
    high_alone: Duration,
    /// Waiting for the stream's verdict on the oldest chunk in flight.
    verdict_wait: Duration,
}

impl Phases {
    fn log(&self) {
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::debug!(
            chunks = self.chunks,
            read_ms = ms(self.read),
            high_alone_ms = ms(self.high_alone),
            verdict_wait_ms = ms(self.verdict_wait),
            "snapshot worker's time"
        );
    }
}

/// How a worker reads one table.
struct Read {
    schema: TableSchema,
    /// `SELECT` list and `FROM`.
    select: String,
    key: String,
    /// The key columns for ORDER BY.
    order: String,
    /// Positions of the key columns in the row.
    key_at: Vec<usize>,
    columns: String,
    /// `{label prefix}-{target}`, the name of the chunks' labels (see `starrocks_label`).
    label: String,
    /// How chunks of this table are read as CSV; `None`: as JSON rows.
    csv: Option<CsvRead>,
    /// Rows per heap page, as `pg_class` estimates them (0: unknown).
    rows_per_page: f64,
}

/// A table's chunks read with `COPY (SELECT ...) TO STDOUT (FORMAT csv)`, whose rows go to
/// StarRocks as PostgreSQL wrote them (see [`csv`]).
struct CsvRead {
    /// `SELECT <key columns>, <the others> FROM <table>`: the key first, so that a row's
    /// key is its first fields. Booleans as `::text` (`true`/`false`): StarRocks' CSV reader
    /// takes `true`, `false` or a number, not PostgreSQL's `t` and `f`. Every other mapped
    /// type's text is what the JSON path sends as a string, and StarRocks reads it alike.
    select: String,
    /// The `columns` header in that order, audit columns after (no `__op`: a Primary Key
    /// load without it upserts every row).
    columns: String,
    /// The table in that column order, for a chunk written as JSON after all.
    schema: TableSchema,
    /// The `columns` header of such a chunk.
    json_columns: String,
    /// Positions of the boolean columns in that order.
    bools: Vec<usize>,
}

/// PostgreSQL's `boolean`.
const BOOL_OID: u32 = 16;

impl CsvRead {
    /// The CSV read of a table, unless a key column is boolean (the windows compare keys as
    /// pgoutput writes them, `t`/`f`, and the CSV has `true`/`false`).
    fn new(
        pcfg: &PipelineConfig,
        name: &str,
        schema: &TableSchema,
        key_columns: usize,
    ) -> Option<CsvRead> {
        let columns = &schema.columns;
        if schema.key.len() != key_columns
            || schema.key.iter().any(|&i| columns[i].type_oid == BOOL_OID)
        {
            return None;
        }
        let order: Vec<usize> = schema
            .key
            .iter()
            .copied()
            .chain((0..columns.len()).filter(|i| !schema.key.contains(i)))
            .collect();
        let ordered = TableSchema {
            columns: order.iter().map(|&i| columns[i].clone()).collect(),
            key: (0..schema.key.len()).collect(),
            ..schema.clone()
        };
        let list: Vec<String> = ordered
            .columns
            .iter()
            .map(|c| match c.type_oid {
                BOOL_OID => format!("{}::text", quote_ident(&c.name)),
                _ => quote_ident(&c.name),
            })
            .collect();
        let bools = (0..ordered.columns.len())
            .filter(|&i| ordered.columns[i].type_oid == BOOL_OID)
            .collect();
        let mut header: Vec<String> = ordered.columns.iter().map(|c| c.name.clone()).collect();
        if let Some(p) = &pcfg.audit_prefix {
            header.extend(
                super::pipeline::AUDIT_COLUMNS
                    .iter()
                    .map(|a| format!("{p}{a}")),
            );
        }
        Some(CsvRead {
            select: format!("SELECT {} FROM {name}", list.join(", ")),
            columns: header.join(","),
            json_columns: snapshot_columns(pcfg, &ordered),
            schema: ordered,
            bools,
        })
    }
}

impl<'a> Worker<'a> {
    fn run(ctx: &'a Ctx) -> Result<(), SnapshotError> {
        let mut conn = PgConn::connect(&ctx.url, false, ctx.timeout).map_err(query("connect"))?;
        conn.coalesce_reads(ctx.read_coalesce);
        // A chunk waits until the stream reaches its high watermark, and a walsender sends
        // only WAL that is flushed: on a server with `synchronous_commit = off` the watermark's
        // commit waited for the WAL writer (up to `wal_writer_delay`, 200 ms by default), so
        // each chunk did (a 10M-row snapshot of 200 chunks spent most of its time so). `local`
        // flushes the commit at once without waiting for synchronous standbys. Only then:
        // on a server that commits `on` (or `remote_*`) the watermark commits as everyone
        // else's do, so that it is not seen ahead of commits that wait for a standby (each
        // such commit in its window would make the chunk be read again).
        conn.query(
            "SELECT set_config('synchronous_commit', 'local', false) \
             WHERE current_setting('synchronous_commit') = 'off'",
        )
        .map_err(query("set synchronous_commit"))?;
        let mut worker = Worker {
            ctx,
            conn,
            schemas: Vec::new(),
            high: None,
            limits: Vec::new(),
            page_limits: Vec::new(),
            phases: Phases::default(),
        };
        let result = worker.turns();
        worker.phases.log();
        result
    }

    /// Reads chunks until the plan runs out or the run stops.
    fn turns(&mut self) -> Result<(), SnapshotError> {
        let ctx = self.ctx;
        let worker = self;
        // Chunks read, waiting for their verdict (oldest first), chunks to read again (first,
        // so that the chunks of a range taken after one of them wait for it in the loader no
        // longer than its next read), and the rest of the range being read.
        let mut flight: VecDeque<InFlight> = VecDeque::with_capacity(ctx.in_flight_max);
        let mut again: VecDeque<(Chunk, u32)> = VecDeque::new();
        let mut rest: Option<Chunk> = None;
        loop {
            if ctx.shared.stopped.load(Ordering::Acquire) {
                return Ok(());
            }
            if flight.len() < ctx.in_flight_max {
                let next = match (again.pop_front(), rest.take()) {
                    (Some((chunk, attempts)), r) => {
                        rest = r;
                        Some((chunk, attempts, true))
                    }
                    (None, Some(chunk)) => Some((chunk, 0, false)),
                    (None, None) => match worker.next_planned() {
                        Planned::Chunk(c) => Some((c, 0, false)),
                        Planned::End => None,
                        Planned::Stopped => return Ok(()),
                    },
                };
                if let Some((chunk, attempts, retry)) = next {
                    let (covered, remainder, verdict, replaced) = worker.send(&chunk)?;
                    // What the chunk did not cover is read next: a range's rest, or the rest
                    // of a chunk read again (whose range went on already).
                    if let Some(r) = remainder {
                        // One piece of the table became two (a keys round has no rest).
                        worker.owe_more(r.table);
                        if retry {
                            again.push_front((r, 0));
                        } else {
                            rest = Some(r);
                        }
                    }
                    flight.push_back(InFlight {
                        chunk: covered,
                        attempts: attempts + 1,
                        verdict,
                        replaced,
                    });
                    continue;
                }
            }
            // The pipeline is full, or nothing is left to read: the oldest verdict, once
            // every chunk read has its high watermark.
            let t = Instant::now();
            worker.flush_high()?;
            worker.phases.high_alone += t.elapsed();
            let Some(f) = flight.pop_front() else {
                return Ok(());
            };
            let t = Instant::now();
            let verdict = worker.verdict(&f.verdict);
            worker.phases.verdict_wait += t.elapsed();
            let Some(verdict) = verdict else {
                return Ok(());
            };
            let table = worker.table_name(f.chunk.table);
            let progress = &ctx.shared.snapshot;
            match verdict {
                Verdict::Taken { rows, dropped } => {
                    // (A keys round is no chunk the loader records.)
                    if f.chunk.round.is_none() {
                        progress.chunks_taken.fetch_add(1, Ordering::AcqRel);
                    }
                    progress.rows_dropped.fetch_add(dropped, Ordering::Relaxed);
                    ctx.shared
                        .non_utf8_replaced
                        .fetch_add(f.replaced, Ordering::Relaxed);
                    tracing::debug!(%table, chunk = f.chunk.number, rows, dropped, "snapshot chunk read");
                    let next_round = match &f.chunk.round {
                        // The stream said at the round's high watermark whether keys are
                        // still owed, and whether this round resolved any.
                        Some(_) => (!ctx.exchange.partial_done(&table))
                            .then(|| ctx.exchange.partial_stalled(&table)),
                        // Not at the range's end only: a chunk read again (and its rest)
                        // may be the table's last piece taken.
                        None => (worker.chunk_taken(f.chunk.table)
                            && !ctx.exchange.complete_if_none_owed(&table))
                        .then_some(0),
                    };
                    if let Some(rounds) = next_round {
                        if rounds >= ctx.attempts_max {
                            return Err(SnapshotError::Rounds { table, rounds });
                        }
                        again.push_front((Chunk::round(f.chunk.table), 0));
                    }
                }
                Verdict::Retry { reason } if f.chunk.round.is_some() => {
                    // The round's keys are owed again; a new round takes them.
                    progress.chunks_retried.fetch_add(1, Ordering::Relaxed);
                    if let Some(keys) = &f.chunk.round {
                        ctx.exchange.give_back_partial(&table, keys.iter().cloned());
                    }
                    if f.attempts >= ctx.attempts_max {
                        return Err(SnapshotError::Attempts {
                            table,
                            chunk: 0,
                            attempts: f.attempts,
                            reason,
                        });
                    }
                    again.push_back((Chunk::round(f.chunk.table), f.attempts));
                }
                Verdict::Retry { reason } => {
                    progress.chunks_retried.fetch_add(1, Ordering::Relaxed);
                    if f.attempts >= ctx.attempts_max {
                        return Err(SnapshotError::Attempts {
                            table,
                            chunk: f.chunk.number,
                            attempts: f.attempts,
                            reason,
                        });
                    }
                    tracing::warn!(%table, chunk = f.chunk.number, reason, "reading a snapshot chunk again");
                    again.push_back((f.chunk, f.attempts));
                }
            }
        }
    }

    /// Pages per `ctid` chunk of `table`: as the last chunk found them, or from the table's
    /// rows per page (`reltuples` / `relpages`; 100 when never analyzed).
    fn page_limit(&mut self, table: usize, read: &Read) -> u64 {
        if let Some(&p) = self.page_limits.get(table).filter(|p| **p > 0) {
            return p;
        }
        let per_page = read.rows_per_page.max(1.0);
        let pages = ((self.ctx.chunk_rows as f64 / per_page) as u64).clamp(1, PAGES_PER_CHUNK_MAX);
        self.set_page_limit(table, pages);
        pages
    }

    fn set_page_limit(&mut self, table: usize, pages: u64) {
        if self.page_limits.len() <= table {
            self.page_limits.resize(table + 1, 0);
        }
        self.page_limits[table] = pages;
    }

    /// A chunk of `table` left a rest to read: one more piece owed (see `Ctx::chunks_owed`).
    fn owe_more(&self, table: usize) {
        if let Ok(mut owed) = self.ctx.chunks_owed.lock() {
            *owed.entry(table).or_insert(0) += 1;
        }
    }

    /// A chunk of `table` was taken by the stream; true when it was the table's last piece
    /// owed (none is in flight, waiting to be read again, or left to read, on any worker).
    fn chunk_taken(&self, table: usize) -> bool {
        let Ok(mut owed) = self.ctx.chunks_owed.lock() else {
            return false;
        };
        match owed.get_mut(&table) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        }
    }

    /// The next range no worker has taken.
    fn next_planned(&mut self) -> Planned {
        let next = match self.ctx.ranges.lock() {
            Ok(mut ranges) => ranges.next(),
            Err(_) => return Planned::Stopped,
        };
        match next {
            Some(c) => Planned::Chunk(c),
            None => {
                self.ctx.planned_all.store(true, Ordering::Release);
                Planned::End
            }
        }
    }

    /// A chunk found its table rewritten since its ranges were planned (`now`: the filenode
    /// its read saw): the table's ranges are forgotten, so that the run that resumes plans
    /// them again and copies the table from its start (its windows keep that correct: every
    /// row is read again and lands over what the earlier chunks loaded, below every change
    /// the stream brings after its chunk).
    fn rewritten(&mut self, table: &str, chunk: &Chunk, now: Option<&str>) -> SnapshotError {
        tracing::warn!(%table, planned = chunk.filenode.as_deref().unwrap_or_default(), now = now.unwrap_or_default(), "table rewritten during its snapshot: copying it again from its start");
        let sql = format!(
            "DELETE FROM {} WHERE slot = {} AND tbl = {} AND chunk > 0 AND filenode = {}",
            self.ctx.chunk_table,
            quote_literal(&self.ctx.slot),
            quote_literal(table),
            quote_literal(chunk.filenode.as_deref().unwrap_or_default())
        );
        match self.conn.query(&sql) {
            Ok(_) => SnapshotError::Rewritten {
                table: table.to_string(),
            },
            Err(e) => query(format!("forget the ctid ranges of {table}"))(e),
        }
    }

    /// The source name of the table `table` (as planned), for messages.
    fn table_name(&self, table: usize) -> String {
        self.schemas
            .get(table)
            .and_then(|r| r.as_ref())
            .map(|r| r.schema.source_name.clone())
            .unwrap_or_default()
    }

    /// Waits for a chunk's verdict; `None` when the run stops first.
    fn verdict(&self, rx: &crossbeam_channel::Receiver<Verdict>) -> Option<Verdict> {
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => return Some(v),
                Err(RecvTimeoutError::Timeout)
                    if !self.ctx.shared.stopped.load(Ordering::Acquire) => {}
                Err(_) => return None,
            }
        }
    }

    fn read_of(&mut self, table: usize) -> Result<Arc<Read>, SnapshotError> {
        if let Some(Some(r)) = self.schemas.get(table) {
            return Ok(Arc::clone(r));
        }
        let source = self
            .ctx
            .tables
            .get(table)
            .cloned()
            .unwrap_or_else(|| SourceTable {
                name: String::new(),
                key: Vec::new(),
                replica_identity: 'd',
            });
        let name = qualified(&source.name);
        // The columns the publication sends (PostgreSQL 15 leaves generated ones out).
        let cols = self
            .conn
            .query(&format!(
                "SELECT attname, atttypid::int8::text FROM pg_attribute \
                 WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
                 ORDER BY attnum",
                quote_literal(&name)
            ))
            .map_err(query(format!("read the columns of {}", source.name)))?;
        let columns: Vec<Column> = cols
            .iter()
            .map(|r| {
                let n = r.first().cloned().flatten().unwrap_or_default();
                let oid = r
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(25);
                Column::new(&n, oid)
            })
            .collect();
        let key_at: Vec<usize> = source
            .key
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        let list: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        let target = split_table(&source.name).1.to_string();
        let schema = TableSchema {
            oid: 0,
            source_name: source.name.clone(),
            target_name: target.clone(),
            columns,
            key: key_at.clone(),
            generation: 0,
        };
        let csv = match self.ctx.format {
            CdcSnapshotFormat::Csv => {
                CsvRead::new(&self.ctx.pcfg, &name, &schema, source.key.len())
            }
            CdcSnapshotFormat::Json => None,
        };
        let rows_per_page = self
            .conn
            .query(&format!(
                "SELECT CASE WHEN relpages > 0 AND reltuples > 0 THEN reltuples / relpages ELSE 100 END::text \
                 FROM pg_class WHERE oid = {}::regclass",
                quote_literal(&name)
            ))
            .map_err(query(format!("estimate the rows per page of {}", source.name)))?
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|t| t.parse::<f64>().ok())
            .unwrap_or(100.0);
        let read = Arc::new(Read {
            rows_per_page,
            select: format!("SELECT {} FROM {name}", list.join(", ")),
            key: key_list(&source.key),
            order: order_list(&source.key),
            key_at,
            columns: snapshot_columns(&self.ctx.pcfg, &schema),
            label: format!("{}-{}", self.ctx.pcfg.label_prefix, target),
            schema,
            csv,
        });
        if self.schemas.len() <= table {
            self.schemas.resize(table + 1, None);
        }
        self.schemas[table] = Some(Arc::clone(&read));
        Ok(read)
    }

    /// Reads one chunk between its two watermarks: low watermark, read, the rows handed to
    /// the stream; its high watermark goes out with the next chunk's low one (or alone, from
    /// [`flush_high`](Self::flush_high)). Returns the keys the read covered (what to read
    /// again if the stream refuses it), what it left of `chunk` (`None`: nothing), and where
    /// its verdict will arrive.
    fn send(
        &mut self,
        chunk: &Chunk,
    ) -> Result<
        (
            Chunk,
            Option<Chunk>,
            crossbeam_channel::Receiver<Verdict>,
            u64,
        ),
        SnapshotError,
    > {
        let read = self.read_of(chunk.table)?;
        super::failpoint::hit("cdc-snapshot-before-read");
        let t = Instant::now();
        let (
            id,
            verdict,
            ChunkRead {
                fetched,
                through,
                round,
                replaced,
            },
        ) = loop {
            let id = self.ctx.next_id.fetch_add(1, Ordering::Relaxed);
            let (reply, verdict) = crossbeam_channel::bounded(1);
            match self.read_chunk(&read, chunk, id, reply)? {
                Some(r) => break (id, verdict, r),
                // Too many bytes in its pages: its window closes with nothing in the
                // exchange (its high watermark goes with the next low one), and fewer pages
                // are read (see `read_chunk`).
                None => self.high = Some((id, read.schema.source_name.clone())),
            }
        };
        let took = t.elapsed();
        self.phases.read += took;
        self.phases.chunks += 1;
        tracing::debug!(table = %read.schema.source_name, chunk = chunk.number, read_us = took.as_micros() as u64, "snapshot chunk's round trip");
        let covered = Chunk {
            hi: fetched.span.hi.clone(),
            range_end: fetched.span.range_end,
            round: round.or_else(|| chunk.round.clone()),
            ..chunk.clone()
        };
        let remainder = (!through).then(|| Chunk {
            lo: fetched.span.hi.clone(),
            ..chunk.clone()
        });
        // In the exchange before its high watermark is written, so the stream finds it there.
        self.ctx.exchange.put(id, fetched);
        self.high = Some((id, read.schema.source_name.clone()));
        Ok((covered, remainder, verdict, replaced))
    }

    /// Writes the high watermark still owed by the last chunk read, if any.
    fn flush_high(&mut self) -> Result<(), SnapshotError> {
        if let Some((id, table)) = self.high.take() {
            let sql = self.watermark_sql(id, true, &table);
            self.conn
                .query(&sql)
                .map_err(query("write a snapshot watermark"))?;
        }
        Ok(())
    }

    /// A watermark into the WAL (a transactional logical message: committed, so flushed and
    /// placed in commit order); the statement returns its LSN.
    fn watermark_sql(&self, id: u64, high: bool, table: &str) -> String {
        let text = watermark_text(&self.ctx.tag, id, high, table);
        format!(
            "SELECT pg_logical_emit_message(true, {}, {})::text",
            quote_literal(window::WATERMARK_PREFIX),
            quote_literal(&text)
        )
    }

    /// Reads the chunk's rows as Stream Load bodies, with the transactions its snapshot
    /// could not see.
    fn read_chunk(
        &mut self,
        read: &Read,
        chunk: &Chunk,
        id: u64,
        reply: crossbeam_channel::Sender<Verdict>,
    ) -> Result<Option<ChunkRead>, SnapshotError> {
        let table = &read.schema.source_name;
        let limit = self
            .limits
            .get(chunk.table)
            .copied()
            .unwrap_or(self.ctx.chunk_rows);
        let bytes_max = self.ctx.chunk_bytes_max;
        let round = match &chunk.round {
            Some(_) => match self.ctx.exchange.take_partial(table, limit) {
                PartialRound::Keys(keys) => {
                    tracing::info!(%table, keys = keys.len(), "snapshot: reading again by key the rows whose changes left a TOAST value out");
                    Some(keys)
                }
                PartialRound::Overflow => {
                    // Said in the chunk table at once (the stream says it too, with its next
                    // checkpoint): the restart copies the table again (see `resume`).
                    // (An upsert, as `partial_sql`: an older build's plan has no such row.)
                    let sql = format!(
                        "INSERT INTO {} (slot, tbl, chunk, lo) VALUES ({}, {}, {PARTIAL_CHUNK}, NULL) \
                         ON CONFLICT (slot, tbl, chunk) DO UPDATE SET lo = NULL",
                        self.ctx.chunk_table,
                        quote_literal(&self.ctx.slot),
                        quote_literal(table)
                    );
                    self.conn.query(&sql).map_err(query(format!(
                        "store the overflow of {table}'s partial keys"
                    )))?;
                    return Err(SnapshotError::PartialKeys {
                        table: table.clone(),
                    });
                }
            },
            None => None,
        };
        let ctid = chunk.filenode.is_some();
        // A `ctid` chunk is whole pages, about `snapshot-chunk-rows` rows' worth (see
        // `PageWindow`), its rows read without their `ctid`: printing it cost PostgreSQL
        // about 60 % more time per row of a narrow table (15:40 UTC, 1 M rows, 123 against
        // 200 ms). Only a chunk of one page, whose rows are wide, has each row's `ctid`, to
        // be cut inside its page.
        let pages = ctid.then(|| PageWindow::of(chunk, self.page_limit(chunk.table, read)));
        let tid_rows = pages.as_ref().is_some_and(|w| w.pages == 1);
        let bound = |b: &[String]| match ctid {
            true => format!("{}::tid", quote_literal(b.first().map_or("(0,0)", |t| t))),
            false => row_literal(b),
        };
        let column = if ctid { "ctid" } else { &read.key };
        let mut filter = Vec::new();
        if let Some(lo) = &chunk.lo {
            filter.push(format!("{column} > {}", bound(lo)));
        }
        let hi = match &pages {
            Some(w) => Some(&w.hi),
            None => chunk.hi.as_ref(),
        };
        if let Some(hi) = hi {
            filter.push(format!("{column} <= {}", bound(hi)));
        }
        if let Some(keys) = &round {
            let list: Vec<String> = keys
                .iter()
                .filter_map(|k| decode_key(k))
                .map(|k| row_literal(&k))
                .collect();
            filter.push(match list.is_empty() {
                true => "false".to_string(),
                false => format!("{} IN ({})", read.key, list.join(", ")),
            });
        }
        let filter = if filter.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filter.join(" AND "))
        };
        // The chunk is the first `limit` keys above its lower bound (below its range's
        // end): it ends where the read ends, at its last key, and the next chunk of the range
        // starts there. Its window is as sound as one whose bounds were planned before it:
        // the rows of (lo, last key] the read's snapshot sees are exactly those it returns
        // (the first `limit` keys in order, or those up to the byte cut), so every row of
        // that range either is in the chunk as of the snapshot taken after the low
        // watermark, or was changed by a transaction the snapshot does not see, whose change
        // the stream carries after the low watermark (dropped from the chunk inside the
        // window) or before it (a straggler, see `window`); a key beyond the last one is left
        // to the next chunk, read under a window of its own. The bound is recorded only with
        // the chunk's `done`, in one statement ([`chunk_done_sql`]); a restart before that
        // reads from the range's record again, under new watermarks.
        //
        // A `ctid` chunk is the same with `ctid` for the key and no ORDER BY: a TID Range
        // Scan returns its rows in `ctid` order (checked row by row, see `TidOrder`), and
        // each row's `ctid` comes first, for where the chunk ends.
        let order = match ctid {
            true => String::new(),
            false => format!(" ORDER BY {} LIMIT {limit}", read.order),
        };
        let with_ctid = |select: &str| match tid_rows {
            true => select.replacen("SELECT ", "SELECT ctid::text, ", 1),
            false => select.to_string(),
        };
        let select = match &read.csv {
            // NULL as StarRocks writes it in CSV (PostgreSQL's default there is an empty
            // field, which StarRocks reads as an empty string).
            Some(c) => format!(
                "COPY ({}{filter}{order}) TO STDOUT (FORMAT csv, NULL E'\\\\N')",
                with_ctid(&c.select)
            ),
            None => format!("{}{filter}{order}", with_ctid(&read.select)),
        };
        // One round trip: the previous chunk's high watermark and this one's low watermark,
        // committed together (the one window closes where the next opens), then the chunk in
        // a transaction of its own, whose snapshot is taken after the low watermark committed.
        let high = self.high.take();
        let mut sql = String::from("BEGIN; ");
        if let Some((hid, htable)) = &high {
            sql.push_str(&self.watermark_sql(*hid, true, htable));
            sql.push_str("; ");
        }
        sql.push_str(&self.watermark_sql(id, false, table));
        // A key chunk reads its keys in order, by the primary key's index (never a sort of
        // the range's rows: a bitmap heap scan reads a planned range's pages in physical
        // order, 6 to 9 % less time per row, but the whole range, and needs the planning walk
        // that found its bound first). A `ctid` chunk reads its pages in order with no index
        // at all; the objections that once kept chunks key ranges (a row an UPDATE moves to a
        // page already read is in no chunk, and its change may be partial; a rewrite moves
        // every row and sends nothing into the stream) are answered in `CtidPlan` and
        // `window::PartialKeys`.
        sql.push_str(
            "; COMMIT; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL enable_sort = off; ",
        );
        if ctid {
            // A parallel scan would interleave the rows of several workers.
            sql.push_str("SET LOCAL max_parallel_workers_per_gather = 0; ");
        }
        sql.push_str(
            "SELECT pg_snapshot_xmax(s)::text, x.id::text FROM pg_current_snapshot() s \
             LEFT JOIN LATERAL pg_snapshot_xip(s) AS x(id) ON true; ",
        );
        sql.push_str(&select);
        if ctid {
            // After the rows, in their transaction: its lock on the table keeps a rewrite
            // out until it commits, so this is the relation the rows came from.
            // Its size too: a page from it on holds no row this snapshot sees.
            sql.push_str(&format!(
                "; SELECT pg_relation_filenode({0}::regclass)::text, \
                 (pg_relation_size({0}::regclass) / current_setting('block_size')::int8)::text",
                quote_literal(&qualified(table))
            ));
        }
        sql.push_str("; COMMIT");
        // The results: [high watermark], low watermark, the snapshot's xmax and xip (one
        // row per xip, at least one), the rows.
        let low_set = usize::from(high.is_some());
        let flush_bytes = self.ctx.pcfg.flush_bytes;
        let synced_at = now_text();
        let low = std::cell::Cell::new(Lsn::default());
        let mut xip: Vec<u32> = Vec::new();
        let mut xmax: Option<u32> = None;
        let mut pieces: Vec<Piece> = vec![Piece::default()];
        let mut key = Vec::new();
        let mut text = TextGuard::new(self.ctx.pcfg.non_utf8_replace);
        // Bytes of the rows kept (JSON path); at `bytes_max` the chunk is cut.
        let mut json_bytes = 0usize;
        let bodies = &self.ctx.shared.snapshot_bodies;
        let mut rows_csv = CsvRows::new(
            read.csv.as_ref(),
            &self.ctx.pcfg,
            &synced_at,
            bytes_max,
            bodies,
            &self.ctx.exchange,
        );
        if let Some(r) = rows_csv.as_mut() {
            r.ctid = tid_rows.then(TidOrder::default);
        }
        let mut json_tids = TidOrder::default();
        let mut filenode: Option<String> = None;
        let mut nblocks: Option<u64> = None;
        // The filenode's result set: after the rows' own (the CSV rows come in a COPY,
        // which has none).
        let filenode_set = low_set + 2 + usize::from(read.csv.is_none());
        self.conn
            .query_sets_copy(
                &sql,
                |set, mut values| {
                    if set == low_set {
                        let text = values.next().flatten().unwrap_or_default();
                        low.set(
                            std::str::from_utf8(text)
                                .ok()
                                .and_then(Lsn::parse)
                                .unwrap_or_default(),
                        );
                        return;
                    }
                    if set == low_set + 1 {
                        // Low 32 bits, as the stream's xids come.
                        let mut xid = || {
                            let text = values.next().flatten()?;
                            let x = std::str::from_utf8(text).ok()?.parse::<u64>().ok()?;
                            Some(x as u32)
                        };
                        if let Some(x) = xid() {
                            xmax = Some(x);
                        }
                        if let Some(x) = xid() {
                            xip.push(x);
                        }
                        return;
                    }
                    if ctid && set == filenode_set {
                        filenode = values
                            .next()
                            .flatten()
                            .map(|v| String::from_utf8_lossy(v).into_owned());
                        nblocks = values
                            .next()
                            .flatten()
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
                        return;
                    }
                    if set != low_set + 2 || json_bytes >= bytes_max {
                        return;
                    }
                    if tid_rows {
                        json_tids.push(values.next().flatten().unwrap_or_default());
                    }
                    let piece = match pieces.last_mut() {
                        Some(p) if p.body.len() < flush_bytes => p,
                        _ => {
                            pieces.push(Piece {
                                body: bodies.take(flush_bytes.min(1 << 18)),
                                ..self.ctx.exchange.piece()
                            });
                            let Some(p) = pieces.last_mut() else { return };
                            p
                        }
                    };
                    piece
                        .body
                        .push(if piece.body.is_empty() { b'[' } else { b',' });
                    let start = piece.body.len() as u32;
                    key.clear();
                    encode_key_into(
                        &mut key,
                        read.key_at.iter().map(|&i| values.clone().nth(i).flatten()),
                    );
                    write_snapshot_row(
                        &self.ctx.pcfg,
                        &read.schema,
                        &mut piece.body,
                        values,
                        &synced_at,
                        low.get(),
                        &mut text,
                    );
                    piece.push_row(&key, start);
                    json_bytes += piece.body.len() - start as usize + 1;
                },
                rows_csv
                    .as_mut()
                    .map(|r| |row: &[u8]| r.push(row, low.get(), flush_bytes)),
            )
            .map_err(query(format!("read chunk {} of {table}", chunk.number)))?;
        let low = low.get();
        if ctid && filenode != chunk.filenode {
            return Err(self.rewritten(table, chunk, filenode.as_deref()));
        }
        let tids = match &rows_csv {
            Some(r) => r.ctid.clone().unwrap_or_default(),
            None => json_tids,
        };
        if tid_rows && tids.disordered {
            return Err(SnapshotError::Order {
                table: table.clone(),
                chunk: chunk.number,
            });
        }
        let (cut, bytes) = match &rows_csv {
            Some(r) => (r.bytes >= bytes_max, r.bytes),
            None => (json_bytes >= bytes_max, json_bytes),
        };
        let (pieces, format, columns) = match (rows_csv, &read.csv) {
            (Some(rows), Some(c)) => {
                let bad = || SnapshotError::Csv {
                    table: table.clone(),
                    chunk: chunk.number,
                };
                if rows.malformed {
                    return Err(bad());
                }
                // Bytes that are not UTF-8 (a SQL_ASCII database): StarRocks' loaders take
                // UTF-8, so the chunk goes as JSON, where each such value is refused or
                // replaced (`cdc.non-utf8`) by the JSON writer. One SIMD pass per body.
                let not_utf8 = rows
                    .pieces
                    .iter()
                    .any(|p| simdutf8::basic::from_utf8(&p.body).is_err());
                if not_utf8 || rows.holds_null_text() {
                    // A text `\N` would load as NULL: the whole chunk as JSON (one StarRocks
                    // transaction takes one format per table).
                    tracing::debug!(%table, chunk = chunk.number, not_utf8, "a value is the text \\N or not UTF-8: the chunk goes as JSON");
                    let json = csv_to_json(
                        &self.ctx.pcfg,
                        c,
                        rows.pieces,
                        &synced_at,
                        low,
                        flush_bytes,
                        &mut text,
                    )
                    .ok_or_else(bad)?;
                    (json, BodyFormat::Json, c.json_columns.clone())
                } else {
                    (rows.pieces, BodyFormat::Csv, c.columns.clone())
                }
            }
            _ => {
                for p in &mut pieces {
                    p.body.push(b']');
                }
                (pieces, BodyFormat::Json, read.columns.clone())
            }
        };
        if let Some(column) = text.refused.take() {
            return Err(SnapshotError::NotUtf8 {
                table: table.clone(),
                chunk: chunk.number,
                column,
            });
        }
        if text.replaced > 0 {
            tracing::warn!(%table, chunk = chunk.number, values = text.replaced, column = text.replaced_column.as_deref().unwrap_or_default(), "values that are not UTF-8 were loaded with U+FFFD in place of those bytes (cdc.non-utf8 = \"replace\")");
        }
        let pieces: Vec<Piece> = pieces.into_iter().filter(|p| !p.rows.is_empty()).collect();
        let kept: usize = pieces.iter().map(|p| p.rows.len()).sum();
        // Where the chunk ends: at its last key when the read stopped short of its upper
        // bound (the limit's rows came, or the byte cut), else at that bound.
        let last = if cut || kept >= limit {
            pieces.iter().rev().find_map(|p| p.last_key())
        } else {
            None
        };
        let last = match last {
            // A `ctid` chunk ends at the last row kept.
            Some(_) if ctid => tids
                .last
                .map(|(page, item)| vec![format!("({page},{item})")]),
            Some(k) => Some(decode_key(k).ok_or_else(|| SnapshotError::Key {
                table: table.clone(),
                chunk: chunk.number,
            })?),
            None => None,
        };
        let mut through = last.is_none() || last == chunk.hi;
        let mut span = Span {
            lo: chunk.lo.clone(),
            hi: if through {
                chunk.hi.clone()
            } else {
                last.clone()
            },
            range_end: through && chunk.range_end,
        };
        if let Some(w) = &pages {
            if cut && !tid_rows {
                // More bytes than the bound in these pages: half as many, read again (under
                // a window of their own; this one closes empty).
                self.set_page_limit(chunk.table, (w.pages / 2).max(1));
                return Ok(None);
            }
            let end = match (cut, w.to_range_end, &chunk.hi) {
                (true, ..) => false,
                (false, true, _) => true,
                // The open-ended last range: through once no page is left after these.
                (false, false, None) => nblocks.is_some_and(|n| w.last_page + 1 >= n),
                (false, false, Some(_)) => false,
            };
            through = end;
            span.hi = match (cut, end) {
                (true, _) => last.clone(),
                (false, true) => chunk.hi.clone(),
                (false, false) => Some(w.hi.clone()),
            };
            span.range_end = end && chunk.range_end;
            if kept > 0 {
                // The next chunk's pages: `snapshot-chunk-rows` rows at these pages' rows
                // per page, and within `snapshot-chunk-bytes-max` (a tenth below).
                let covered = w.covered.max(1) as u128;
                let by_rows = self.ctx.chunk_rows as u128 * covered / kept as u128;
                let by_bytes = bytes_max as u128 * covered / bytes.max(1) as u128 * 9 / 10;
                self.set_page_limit(
                    chunk.table,
                    by_rows.min(by_bytes).clamp(1, PAGES_PER_CHUNK_MAX as u128) as u64,
                );
            } else if !end {
                // Empty pages (rows deleted): twice as many next.
                self.set_page_limit(chunk.table, (w.pages * 2).min(PAGES_PER_CHUNK_MAX));
            }
        }
        if let Some(keys) = &round {
            // A round has no range: it moves the table's own record (chunk 0) by nothing
            // but its rows. Keys a byte cut left out are owed again.
            if cut {
                let kept: std::collections::HashSet<&[u8]> = pieces
                    .iter()
                    .flat_map(|p| p.iter().map(|(k, _, _)| k))
                    .collect();
                self.ctx.exchange.give_back_partial(
                    table,
                    keys.iter().filter(|k| !kept.contains(&k[..])).cloned(),
                );
            }
            through = true;
            span = Span::default();
        }
        // The next read's rows: as many as fit in `bytes_max` at this chunk's width (a
        // tenth below), at most `snapshot-chunk-rows`.
        if kept > 0 {
            let fit = (bytes_max as u128 * kept as u128 / bytes.max(1) as u128) * 9 / 10;
            let next = (fit.min(self.ctx.chunk_rows as u128) as usize).max(1);
            if self.limits.len() <= chunk.table {
                self.limits.resize(chunk.table + 1, self.ctx.chunk_rows);
            }
            self.limits[chunk.table] = next;
        }
        if cut {
            tracing::debug!(%table, chunk = chunk.number, rows = kept, bytes, "snapshot chunk cut at cdc.snapshot-chunk-bytes-max");
        }
        let fetched = Fetched {
            table: table.clone(),
            chunk: chunk.number,
            span,
            pieces,
            format,
            target: read.schema.target_name.clone(),
            columns,
            label: starrocks_label(&read.label, &format!("snap{}-{:X}", chunk.number, low.0)),
            xip,
            xmax,
            reply,
            keys_round: round.is_some(),
        };
        Ok(Some(ChunkRead {
            fetched,
            through,
            round: round.map(Arc::new),
            replaced: text.replaced,
        }))
    }
}

/// An encoded key ([`window::encode_key`]) back as its columns' text; `None` when it is not
/// such a key. A part that is not UTF-8 (a SQL_ASCII database sends its bytes as stored)
/// comes back as [`RAW_KEY`] and the bytes in hex, which [`key_literal`] writes back as the
/// same bytes: the next chunk starts exactly where this one ended.
fn decode_key(key: &[u8]) -> Option<Vec<String>> {
    let key = key.strip_suffix(&[0])?;
    Some(key.split(|&b| b == 0).map(raw_or_text).collect())
}

/// A chunk's CSV rows as they arrive, cut into Stream Load bodies of about `flush-bytes`.
struct CsvRows<'a> {
    pieces: Vec<Piece>,
    /// Where a new piece's body and key lists come from.
    bodies: &'a Bodies,
    exchange: &'a Exchange,
    /// Bytes of the rows kept; at `bytes_max` the chunk is cut.
    bytes: usize,
    bytes_max: usize,
    /// Key columns: the first fields of each row.
    key_columns: usize,
    /// The audit columns' values, written after each row's fields (empty without them).
    audit: Vec<u8>,
    audit_lsn: Option<Lsn>,
    audit_on: bool,
    synced_at: String,
    /// The current row's key.
    key: Vec<u8>,
    /// A row did not split into fields.
    malformed: bool,
    /// A `ctid` chunk: each row's first field is its `ctid`, taken off here.
    ctid: Option<TidOrder>,
}

impl<'a> CsvRows<'a> {
    fn new(
        read: Option<&CsvRead>,
        pcfg: &PipelineConfig,
        synced_at: &str,
        bytes_max: usize,
        bodies: &'a Bodies,
        exchange: &'a Exchange,
    ) -> Option<CsvRows<'a>> {
        let read = read?;
        Some(CsvRows {
            bodies,
            exchange,
            bytes: 0,
            bytes_max,
            pieces: Vec::new(),
            key_columns: read.schema.key.len(),
            audit: Vec::new(),
            audit_lsn: None,
            audit_on: pcfg.audit_prefix.is_some(),
            synced_at: synced_at.to_string(),
            key: Vec::new(),
            malformed: false,
            ctid: None,
        })
    }

    /// Whether a value of the chunk is the text `\N` (see [`csv::holds_null_text`]). Asked
    /// once per piece, not per row: such a row holds a quote, and one `memchr` over a body
    /// finds that none does (the check and its `memchr` per row of about 30 bytes were
    /// about a tenth of the workers' user-space samples at 14:10 UTC).
    fn holds_null_text(&self) -> bool {
        self.pieces.iter().any(|p| {
            memchr::memchr(b'"', &p.body).is_some()
                && p.iter().any(|(_, start, end)| {
                    p.body
                        .get(start as usize..end as usize)
                        .is_some_and(csv::holds_null_text)
                })
        })
    }

    /// One CopyData message: one row, `\n` at its end. Past `bytes_max`, rows are not kept
    /// (the chunk ends at the last one kept).
    fn push(&mut self, row: &[u8], low: Lsn, flush_bytes: usize) {
        if self.bytes >= self.bytes_max {
            return;
        }
        let row = match self.ctid.as_mut() {
            // `"(page,item)",` (the comma inside makes PostgreSQL quote it).
            Some(order) => {
                let end = memchr::memmem::find(row, b"\",");
                match end {
                    Some(end) if row.first() == Some(&b'"') => {
                        order.push(&row[1..end]);
                        &row[end + 2..]
                    }
                    _ => {
                        self.malformed = true;
                        return;
                    }
                }
            }
            None => row,
        };
        self.key.clear();
        if !csv::key_into(&mut self.key, row, self.key_columns) {
            self.malformed = true;
            return;
        }
        if self.audit_on && self.audit_lsn != Some(low) {
            // As the JSON path writes them: an insert, not deleted, the read's time, and the
            // low watermark's LSN as `cdc_version`.
            self.audit = format!(",0,false,{},{}", self.synced_at, low.0).into_bytes();
            self.audit_lsn = Some(low);
        }
        let piece = match self.pieces.last_mut() {
            Some(p) if p.body.len() < flush_bytes => p,
            _ => {
                self.pieces.push(Piece {
                    body: self.bodies.take(flush_bytes.min(1 << 18)),
                    ..self.exchange.piece()
                });
                let Some(p) = self.pieces.last_mut() else {
                    return;
                };
                p
            }
        };
        let start = piece.body.len() as u32;
        piece
            .body
            .extend_from_slice(row.strip_suffix(b"\n").unwrap_or(row));
        piece.body.extend_from_slice(&self.audit);
        piece.body.push(b'\n');
        self.bytes += piece.body.len() - start as usize;
        piece.push_row(&self.key, start);
    }
}

/// The `ctid`s of a chunk's rows as they come: the last one kept, and whether one came
/// after a higher one (the chunk could then not end at its last row).
#[derive(Default, Clone)]
struct TidOrder {
    last: Option<(u32, u16)>,
    disordered: bool,
}

impl TidOrder {
    fn push(&mut self, text: &[u8]) {
        match parse_tid(text) {
            Some(tid) if self.last.is_none_or(|last| tid > last) => self.last = Some(tid),
            _ => self.disordered = true,
        }
    }
}

/// A chunk read as CSV, written as JSON rows instead (see [`CsvRows::holds_null_text`]), cut
/// into bodies of about `flush_bytes` again (JSON repeats every column's name: a CSV piece
/// can grow several times over, past Stream Load's limit on a JSON body); `None` when a row
/// does not split.
fn csv_to_json(
    pcfg: &PipelineConfig,
    read: &CsvRead,
    pieces: Vec<Piece>,
    synced_at: &str,
    low: Lsn,
    flush_bytes: usize,
    text: &mut TextGuard,
) -> Option<Vec<Piece>> {
    let mut out = Vec::with_capacity(pieces.len());
    let mut json = Piece::default();
    for piece in pieces {
        for (key, start, end) in piece.iter() {
            if json.body.len() >= flush_bytes && !json.rows.is_empty() {
                json.body.push(b']');
                out.push(std::mem::take(&mut json));
            }
            let row = piece.body.get(start as usize..end as usize)?;
            let mut values = csv::fields(row)?;
            // Back to PostgreSQL's own text, which the JSON writer turns into true/false.
            for &b in &read.bools {
                if let Some(Some(v)) = values.get_mut(b) {
                    let t: &'static [u8] = if v.as_ref() == b"true" { b"t" } else { b"f" };
                    *v = std::borrow::Cow::Borrowed(t);
                }
            }
            json.body
                .push(if json.body.is_empty() { b'[' } else { b',' });
            let from = json.body.len() as u32;
            write_snapshot_row(
                pcfg,
                &read.schema,
                &mut json.body,
                values.iter().map(|v| v.as_deref()),
                synced_at,
                low,
                text,
            );
            json.push_row(key, from);
        }
    }
    if !json.rows.is_empty() {
        json.body.push(b']');
        out.push(json);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_says_rows_estimate_rate_and_eta_of_this_run() {
        use sonic_rs::JsonValueTrait;
        // 20,000 rows copied by this run in about 10 s (1,000 by an earlier one), of an
        // estimated 100,000: about 2,000 rows/s, about 39 s left.
        let p = Progress::default();
        p.state.store(STATE_COPYING, Ordering::Relaxed);
        p.rows_before.store(1000, Ordering::Relaxed);
        p.rows_copied.store(21_000, Ordering::Relaxed);
        p.rows_estimate.store(100_000, Ordering::Relaxed);
        p.chunks_done.store(5, Ordering::Relaxed);
        let started = unix_ms() - 10_000;
        p.started_unix_ms.store(started, Ordering::Relaxed);
        let before = unix_ms();
        let json = p.json();
        let after = unix_ms();
        let num = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{k}: {json:?}"));
        assert_eq!(json["state"].as_str(), Some("copying"));
        assert_eq!(num("rows_copied"), 21_000);
        assert_eq!(num("rows_total_estimate"), 100_000);
        assert_eq!(num("chunks_done"), 5);
        // This run's rows over the time since it started, as the clock read during json().
        let rate = num("rows_per_second");
        let (slow, fast) = (
            20_000_000 / (after - started),
            20_000_000 / (before - started),
        );
        assert!((slow..=fast).contains(&rate), "{json:?}");
        assert_eq!(num("eta_seconds"), 79_000 / rate, "{json:?}");
        let line = p.line();
        let (head, tail) = line.split_once(" rows/s, ETA ").expect(&line);
        assert!(
            head.starts_with("snapshot: 21000 of ~100000 rows, ") && tail.ends_with("s, 5 chunks"),
            "{line}"
        );
        // Nothing copied yet by this run: no rate, no ETA.
        let fresh = Progress::default();
        fresh.rows_estimate.store(100, Ordering::Relaxed);
        assert!(fresh.json()["eta_seconds"].is_null());
        assert_eq!(fresh.line(), "snapshot: 0 of ~100 rows, 0 rows/s, 0 chunks");
    }

    #[test]
    fn a_chunks_last_key_reads_back_as_its_columns_text() {
        let key = window::encode_key([Some(&b"12"[..]), Some(&b"a,b\"c"[..])].into_iter());
        assert_eq!(
            decode_key(&key),
            Some(vec!["12".to_string(), "a,b\"c".to_string()])
        );
        assert_eq!(decode_key(b"no end"), None);
        // Bytes that are not UTF-8 (SQL_ASCII) go back to PostgreSQL as the same bytes.
        let raw = decode_key(b"ab\xff\x007\x00").unwrap();
        assert_eq!(raw, vec!["\x006162ff".to_string(), "7".to_string()]);
        assert_eq!(
            row_literal(&raw),
            "(convert_from(decode('6162ff', 'hex'), 'SQL_ASCII'), '7')"
        );
        assert_eq!(
            array_literal(Some(&raw)),
            "ARRAY[convert_from(decode('6162ff', 'hex'), 'SQL_ASCII'), '7']::text[]"
        );
        assert_eq!(row_literal(&["o'k".to_string()]), "('o''k')");
        // The chunk table's bounds read back as hex: the same parts, raw ones included.
        assert_eq!(
            hex_array(Some("6162ff,37")),
            Some(vec!["\x006162ff".to_string(), "7".to_string()])
        );
        assert_eq!(hex_array(Some("")), Some(vec![String::new()]));
        assert_eq!(hex_array(None), None);
        assert_eq!(hex_array(Some("6")), None);
        assert_eq!(from_hex("c3a9").as_deref(), Some("é"));
    }

    #[test]
    fn a_ctid_chunk_is_whole_pages_up_to_its_ranges_end() {
        assert_eq!(parse_tid(b"(12,3)"), Some((12, 3)));
        assert_eq!(parse_tid(b"(4294967295,65535)"), Some((u32::MAX, 65535)));
        assert_eq!(parse_tid(b"(1,65536)"), None);
        assert_eq!(parse_tid(b"12,3"), None);
        let chunk = |lo: Option<&str>, hi: Option<&str>| Chunk {
            table: 0,
            number: 1,
            lo: lo.map(|t| vec![t.to_string()]),
            hi: hi.map(|t| vec![t.to_string()]),
            range_end: true,
            filenode: Some("1".into()),
            round: None,
        };
        // From the table's start, 10 pages: 0 to 9.
        let w = PageWindow::of(&chunk(None, Some("(99,65535)")), 10);
        assert_eq!((w.last_page, w.to_range_end, w.covered), (9, false, 10));
        assert_eq!(w.hi, vec!["(9,65535)".to_string()]);
        // After page 89: 90 to 99, the range's end.
        let w = PageWindow::of(&chunk(Some("(89,65535)"), Some("(99,65535)")), 10);
        assert_eq!((w.last_page, w.to_range_end, w.covered), (99, true, 10));
        // After a cut inside page 95: its rest, and to the range's end.
        let w = PageWindow::of(&chunk(Some("(95,7)"), Some("(99,65535)")), 10);
        assert_eq!((w.last_page, w.to_range_end, w.covered), (99, true, 5));
        // The open-ended last range never ends by its bound (the relation's size says).
        let w = PageWindow::of(&chunk(Some("(99,65535)"), None), 4);
        assert_eq!((w.last_page, w.to_range_end), (103, false));
    }

    #[test]
    fn partial_keys_are_stored_as_hex_and_read_back() {
        let key = window::encode_key([Some(&b"a\xff"[..]), None].into_iter());
        let state = [window::PartialState {
            table: "public.t".into(),
            keys: vec![key.clone()],
            frozen: true,
            done: false,
            overflow: false,
        }];
        let sql = partial_sql("ck", "s", &state);
        let hexed = hex(&key);
        // Inserted where an older build's plan has no such row.
        assert!(
            sql.contains(&format!(
                "VALUES ('s', 'public.t', -1, ARRAY['{hexed}']::text[], true, NULL) \
                 ON CONFLICT (slot, tbl, chunk) DO UPDATE"
            )),
            "{sql}"
        );
        assert_eq!(hex_bytes(&hexed).as_deref(), Some(&key[..]));
        // Past the bound: NULL, whatever keys were kept.
        let state = [window::PartialState {
            overflow: true,
            ..state[0].clone()
        }];
        let sql = partial_sql("ck", "s", &state);
        assert!(sql.contains("-1, NULL, true, NULL)"), "{sql}");
        assert_eq!(hex_bytes("0"), None);
    }

    #[test]
    fn a_chunk_moves_its_ranges_record_only_from_where_it_stands() {
        let span = Span {
            lo: Some(vec!["10".into()]),
            hi: Some(vec!["20".into()]),
            range_end: false,
        };
        let sql = chunk_done_sql("ck", "s", "public.t", 3, 7, &span);
        assert!(
            sql.contains(
                "SET lo = ARRAY['20']::text[], rows = coalesce(rows, 0) + 7, done_at = NULL"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("chunk = 3 AND lo = ARRAY['10']::text[] AND done_at IS NULL RETURNING 1"),
            "{sql}"
        );
        let end = Span {
            lo: None,
            hi: None,
            range_end: true,
        };
        let sql = chunk_done_sql("ck", "s", "public.t", 1, 0, &end);
        assert!(
            sql.contains("SET lo = lo, rows = coalesce(rows, 0) + 0, done_at = now()"),
            "{sql}"
        );
        assert!(sql.contains("AND lo IS NULL AND"), "{sql}");
    }
}
