//! The initial snapshot: copies the tables' existing rows beside streaming, in primary-key
//! chunks read by parallel workers, each chunk placed into the stream between two watermarks
//! (DBLog; see [`window`]). Chunks are planned one key range at a time, by a thread of their
//! own up to `snapshot-chunks-planned-ahead` chunks ahead of the workers, and recorded in the
//! chunk table (`{checkpoint-table}_snapshot`) when they are planned and again when their rows
//! are in StarRocks, so a restart copies only the chunks not yet done.
//!
//! Every CDC table has a primary key (setup refuses one without: StarRocks Primary Key tables
//! and deletes need it), so every table is chunked by key; there is no unchunked path.
//!
//! A worker reads its next chunk while the stream decides on the ones it read before (at most
//! `snapshot-chunks-in-flight` of them), so the time a high watermark takes to come back
//! through the stream is spent reading, not waiting.
//!
//! This module must never hold more than `snapshot-chunks-in-flight` chunks per worker in
//! memory, never mark a chunk
//! done before the loader has its rows in StarRocks, and never emit rows without a window.

pub mod csv;
pub mod window;

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use self::window::{Exchange, Fetched, Piece, Verdict, Windows, encode_key_into, watermark_text};
use super::checkpoint::qualified;
use super::lsn::Lsn;
use super::pgconn::{PgConn, PgError, quote_ident, quote_literal};
use super::pipeline::{
    BodyFormat, PipelineConfig, snapshot_columns, starrocks_label, write_snapshot_row,
};
use super::schema::{Column, TableSchema};
use super::setup::{SourceTable, split_table};
use super::source::now_text;
use super::{CdcError, Shared};
use crate::config::{CdcConfig, CdcSnapshotFormat, PgUrl};

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
            SnapshotError::Attempts { .. } | SnapshotError::Csv { .. } => None,
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

/// Setup's SQL for the chunk table: one row per chunk planned (`lo`, `hi`: the key range,
/// `last`: the open-ended one) and, with chunk number 0, one per table the snapshot owes.
pub fn create_sql(cfg: &CdcConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (slot text NOT NULL, tbl text NOT NULL, chunk int NOT NULL, \
         lo text[], hi text[], last bool NOT NULL DEFAULT false, rows bigint, done_at timestamptz, \
         PRIMARY KEY (slot, tbl, chunk))",
        chunk_table(cfg)
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
                " INSERT INTO {t} (slot, tbl, chunk) VALUES ({slot}, {}, 0);",
                quote_literal(&table.name)
            ));
        }
    }
    sql
}

/// The loader's SQL when a chunk's rows are all in StarRocks.
pub fn chunk_done_sql(cfg_table: &str, slot: &str, table: &str, chunk: u32, rows: u64) -> String {
    format!(
        "UPDATE {} SET rows = {rows}, done_at = now() WHERE slot = {} AND tbl = {} AND chunk = {chunk}",
        qualified(&format!("{cfg_table}_snapshot")),
        quote_literal(slot),
        quote_literal(table)
    )
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

/// A chunk: the rows of `table` with key in (`lo`, `hi`] (no bound where `None`).
#[derive(Debug, Clone)]
struct Chunk {
    table: usize,
    number: u32,
    lo: Option<Vec<String>>,
    hi: Option<Vec<String>>,
}

/// Where one table's snapshot stands.
struct TablePlan {
    source: SourceTable,
    /// Planned in an earlier run, not done.
    pending: VecDeque<Chunk>,
    /// The next chunk to plan (its number and lower bound); `None` once the last is planned.
    next: Option<(u32, Option<Vec<String>>)>,
}

/// Plans chunks one key range at a time (the N-th key after the previous bound, an
/// index-only walk of the primary key) and records each before it is handed out.
struct Planner {
    conn: PgConn,
    tables: Vec<TablePlan>,
    chunk_table: String,
    slot: String,
    chunk_rows: usize,
}

impl Planner {
    fn next(&mut self) -> Result<Option<Chunk>, SnapshotError> {
        for i in 0..self.tables.len() {
            if let Some(chunk) = self.tables[i].pending.pop_front() {
                return Ok(Some(chunk));
            }
            if self.tables[i].next.is_some() {
                return self.plan(i).map(Some);
            }
        }
        Ok(None)
    }

    fn plan(&mut self, i: usize) -> Result<Chunk, SnapshotError> {
        let t = &self.tables[i];
        let (number, lo) = t.next.clone().unwrap_or((1, None));
        let name = qualified(&t.source.name);
        let key = key_list(&t.source.key);
        // Aliased, so ORDER BY names the columns (an output column of the same name would
        // win); a plain list, so the primary key index gives the order. The columns as they
        // are, made text only outside the walk: a `::text` in this list was computed for
        // every key the OFFSET skips (50,000 casts per chunk, about half the planning query's
        // time on an int key).
        let keys: Vec<String> = t
            .source
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} AS k{i}", quote_ident(k)))
            .collect();
        let order: Vec<String> = t.source.key.iter().map(|k| quote_ident(k)).collect();
        let bound: Vec<String> = (0..t.source.key.len())
            .map(|i| format!("b.k{i}::text"))
            .collect();
        // The bound and its record in one round trip: no row from `b` is the last chunk (a
        // key column is never NULL, so `b.k0 IS NULL` says there was none).
        let sql = format!(
            "WITH b AS (SELECT {} FROM {name}{} ORDER BY {} OFFSET {} LIMIT 1) \
             INSERT INTO {} (slot, tbl, chunk, lo, hi, last) \
             SELECT {}, {}, {number}, {}, CASE WHEN b.k0 IS NULL THEN NULL ELSE ARRAY[{}] END, b.k0 IS NULL \
             FROM (VALUES (1)) AS one LEFT JOIN b ON true \
             ON CONFLICT (slot, tbl, chunk) DO UPDATE SET lo = excluded.lo, hi = excluded.hi, last = excluded.last \
             RETURNING array_to_json(hi)::text",
            keys.join(", "),
            lower_bound(&key, lo.as_deref()),
            order.join(", "),
            self.chunk_rows - 1,
            self.chunk_table,
            quote_literal(&self.slot),
            quote_literal(&t.source.name),
            array_literal(lo.as_deref()),
            bound.join(", "),
        );
        let rows = self
            .conn
            .query(&sql)
            .map_err(query(format!("plan a chunk of {}", t.source.name)))?;
        let hi: Option<Vec<String>> = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|json| text_array(&json));
        let t = &mut self.tables[i];
        t.next = hi.clone().map(|h| (number + 1, Some(h)));
        Ok(Chunk {
            table: i,
            number,
            lo,
            hi,
        })
    }
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

/// The text values as a row of untyped literals, which PostgreSQL types like the key.
fn row_literal(values: &[String]) -> String {
    format!(
        "({})",
        values
            .iter()
            .map(|v| quote_literal(v))
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
                .map(|s| quote_literal(s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "NULL::text[]".into(),
    }
}

/// A snapshot this run owes: what is left of it.
pub struct Snapshot {
    planner: Planner,
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
    let rows = conn
        .query(&format!(
            "SELECT tbl, chunk::text, array_to_json(lo)::text, array_to_json(hi)::text, last::text, \
             (done_at IS NOT NULL)::text, coalesce(rows, 0)::text FROM {t} AS c WHERE slot = {} \
             ORDER BY c.tbl, c.chunk",
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
    let mut plans: Vec<TablePlan> = tables
        .iter()
        .filter(|s| {
            rows.iter()
                .any(|r| r.first().cloned().flatten().as_deref() == Some(&s.name))
        })
        .map(|s| TablePlan {
            source: s.clone(),
            pending: VecDeque::new(),
            next: Some((1, None)),
        })
        .collect();
    let (mut resumed, mut rows_before) = (0u64, 0u64);
    for r in &rows {
        let field = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let Some(ti) = plans.iter().position(|p| p.source.name == field(0)) else {
            continue;
        };
        let number: u32 = field(1).parse().unwrap_or(0);
        if number == 0 {
            continue;
        }
        let (lo, hi) = (text_array(&field(2)), text_array(&field(3)));
        let plan = &mut plans[ti];
        // Chunks are planned in order, so the last one read says where planning goes on
        // (ordered by the number, not its text: `c.chunk`, since the output column `chunk`
        // is text and sorted 10 before 9, which planned chunk 10 again after a restart).
        plan.next = (field(4) != "true").then(|| (number + 1, hi.clone()));
        if field(5) == "true" {
            resumed += 1;
            rows_before += field(6).parse::<u64>().unwrap_or(0);
        } else {
            plan.pending.push_back(Chunk {
                table: ti,
                number,
                lo,
                hi,
            });
        }
    }
    plans.retain(|p| !p.pending.is_empty() || p.next.is_some());
    for (i, p) in plans.iter_mut().enumerate() {
        for c in &mut p.pending {
            c.table = i;
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
            conn,
            tables: plans,
            chunk_table: t,
            slot: cfg.slot.clone(),
            chunk_rows: cfg.snapshot_chunk_rows,
        },
        tag: format!("{} {nonce}", cfg.slot),
        exchange: Arc::new(Exchange::default()),
    }))
}

/// `["a","b"]` (from `array_to_json`) as strings; `None` for SQL NULL.
fn text_array(json: &str) -> Option<Vec<String>> {
    if json.is_empty() {
        return None;
    }
    sonic_rs::from_str::<Vec<String>>(json).ok()
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
    /// Chunks planned ahead (see [`plan_ahead`]); disconnected once every chunk is planned.
    chunks: crossbeam_channel::Receiver<Chunk>,
    /// The planner ran out of chunks (rather than stopping on an error or a stop).
    planned_all: AtomicBool,
    /// The tables, as planned (a chunk's `table` indexes them).
    tables: Vec<SourceTable>,
    exchange: Arc<Exchange>,
    tag: String,
    next_id: AtomicU64,
    pcfg: PipelineConfig,
    attempts_max: u32,
    /// Chunks a worker has read whose verdict it has not heard yet.
    in_flight_max: usize,
    format: CdcSnapshotFormat,
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
        let (planned, chunks) =
            crossbeam_channel::bounded(cfg.snapshot_chunks_planned_ahead.max(1));
        let tables = self
            .planner
            .tables
            .iter()
            .map(|t| t.source.clone())
            .collect();
        let ctx = Arc::new(Ctx {
            chunks,
            planned_all: AtomicBool::new(false),
            tables,
            exchange: self.exchange,
            tag: self.tag,
            next_id: AtomicU64::new(1),
            pcfg: pcfg.clone(),
            attempts_max: cfg.snapshot_chunk_attempts_max,
            in_flight_max: cfg.snapshot_chunks_in_flight,
            format: cfg.snapshot_format,
            url: url.clone(),
            timeout,
            shared: Arc::clone(shared),
            running: AtomicU64::new(cfg.snapshot_workers as u64),
        });
        let mut handles = Vec::with_capacity(cfg.snapshot_workers + 1);
        let planner = self.planner;
        let planner_ctx = Arc::clone(&ctx);
        let handle = std::thread::Builder::new()
            .name("cdc-snapshot-plan".into())
            .spawn(move || {
                let result = plan_ahead(planner, &planned, &planner_ctx);
                if result.is_err() {
                    // Before the channel closes: the workers must stop, not take its end for
                    // the end of the plan.
                    planner_ctx.shared.stopped.store(true, Ordering::Release);
                }
                drop(planned);
                result
            })
            .map_err(|e| CdcError::Replication(PgError::Io(e)))?;
        handles.push(handle);
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
                    }
                    if last && result.is_ok() && ctx.planned_all.load(Ordering::Acquire) {
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
    /// Every chunk is planned and handed out.
    End,
    /// The run stops.
    Stopped,
}

/// The planner's thread: plans chunks (each recorded in the chunk table before it is handed
/// out) into a channel of `snapshot-chunks-planned-ahead`, so that the planning query (an
/// index walk of a chunk's worth of keys, and the record) runs while the workers read and a
/// worker finds its next chunk ready. (It ran on the worker that wanted a chunk, under a lock:
/// at 2 M rows, load average 10, the two workers spent 1.8 to 2.2 s of a 3.1 to 3.3 s
/// snapshot planning or waiting for the other one's plan.) A chunk planned ahead and not read
/// when the run stops is a pending chunk of the next run, like one planned and not finished.
fn plan_ahead(
    mut planner: Planner,
    out: &crossbeam_channel::Sender<Chunk>,
    ctx: &Ctx,
) -> Result<(), SnapshotError> {
    while let Some(mut chunk) = planner.next()? {
        loop {
            if ctx.shared.stopped.load(Ordering::Acquire) {
                return Ok(());
            }
            match out.send_timeout(chunk, Duration::from_millis(100)) {
                Ok(()) => break,
                Err(crossbeam_channel::SendTimeoutError::Timeout(c)) => chunk = c,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Ok(()),
            }
        }
    }
    ctx.planned_all.store(true, Ordering::Release);
    Ok(())
}

/// A chunk read whose high watermark is written: the stream's verdict comes on `verdict`.
struct InFlight {
    chunk: Chunk,
    /// Reads of this chunk so far, this one included.
    attempts: u32,
    verdict: crossbeam_channel::Receiver<Verdict>,
}

/// One worker: its connection and the column lists it has read.
struct Worker<'a> {
    ctx: &'a Ctx,
    conn: PgConn,
    schemas: Vec<Option<Arc<Read>>>,
    /// The last chunk read whose high watermark is not written yet (its id and table).
    high: Option<(u64, String)>,
    phases: Phases,
}

/// Where a worker's time went, logged at debug level when it ends: the figures that say
/// which part of a chunk's path to work on next.
#[derive(Default)]
struct Phases {
    chunks: u64,
    /// Waiting for the planner's next chunk.
    planned_wait: Duration,
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
            planned_wait_ms = ms(self.planned_wait),
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
    /// Positions of the key columns in the row.
    key_at: Vec<usize>,
    columns: String,
    /// `{label prefix}-{target}`, the name of the chunks' labels (see `starrocks_label`).
    label: String,
    /// How chunks of this table are read as CSV; `None`: as JSON rows.
    csv: Option<CsvRead>,
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
        // Chunks read, waiting for their verdict (oldest first), and chunks to read again.
        let mut flight: VecDeque<InFlight> = VecDeque::with_capacity(ctx.in_flight_max);
        let mut again: VecDeque<(Chunk, u32)> = VecDeque::new();
        loop {
            if ctx.shared.stopped.load(Ordering::Acquire) {
                return Ok(());
            }
            if flight.len() < ctx.in_flight_max {
                let next = match again.pop_front() {
                    Some(retry) => Some(retry),
                    None => match worker.next_planned() {
                        Planned::Chunk(c) => Some((c, 0)),
                        Planned::End => None,
                        Planned::Stopped => return Ok(()),
                    },
                };
                if let Some((chunk, attempts)) = next {
                    let verdict = worker.send(&chunk)?;
                    flight.push_back(InFlight {
                        chunk,
                        attempts: attempts + 1,
                        verdict,
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
                    progress.chunks_taken.fetch_add(1, Ordering::AcqRel);
                    progress.rows_dropped.fetch_add(dropped, Ordering::Relaxed);
                    tracing::debug!(%table, chunk = f.chunk.number, rows, dropped, "snapshot chunk read");
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

    /// The next chunk the planner recorded: waits while it plans.
    fn next_planned(&mut self) -> Planned {
        let t = Instant::now();
        let next = self.wait_planned();
        self.phases.planned_wait += t.elapsed();
        next
    }

    fn wait_planned(&self) -> Planned {
        loop {
            match self.ctx.chunks.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => return Planned::Chunk(c),
                Err(RecvTimeoutError::Disconnected) => return Planned::End,
                Err(RecvTimeoutError::Timeout) => {
                    if self.ctx.shared.stopped.load(Ordering::Acquire) {
                        return Planned::Stopped;
                    }
                }
            }
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
        let read = Arc::new(Read {
            select: format!("SELECT {} FROM {name}", list.join(", ")),
            key: key_list(&source.key),
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
    /// [`flush_high`](Self::flush_high)). Returns where its verdict will arrive.
    fn send(
        &mut self,
        chunk: &Chunk,
    ) -> Result<crossbeam_channel::Receiver<Verdict>, SnapshotError> {
        let read = self.read_of(chunk.table)?;
        let id = self.ctx.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, verdict) = crossbeam_channel::bounded(1);
        let t = Instant::now();
        let fetched = self.read_chunk(&read, chunk, id, reply)?;
        let took = t.elapsed();
        self.phases.read += took;
        self.phases.chunks += 1;
        tracing::debug!(table = %read.schema.source_name, chunk = chunk.number, read_us = took.as_micros() as u64, "snapshot chunk's round trip");
        // In the exchange before its high watermark is written, so the stream finds it there.
        self.ctx.exchange.put(id, fetched);
        self.high = Some((id, read.schema.source_name.clone()));
        Ok(verdict)
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
    ) -> Result<Fetched, SnapshotError> {
        let table = &read.schema.source_name;
        let mut filter = Vec::new();
        if let Some(lo) = &chunk.lo {
            filter.push(format!("{} > {}", read.key, row_literal(lo)));
        }
        if let Some(hi) = &chunk.hi {
            filter.push(format!("{} <= {}", read.key, row_literal(hi)));
        }
        let filter = if filter.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filter.join(" AND "))
        };
        let select = match &read.csv {
            // NULL as StarRocks writes it in CSV (PostgreSQL's default there is an empty
            // field, which StarRocks reads as an empty string).
            Some(c) => format!(
                "COPY ({}{filter}) TO STDOUT (FORMAT csv, NULL E'\\\\N')",
                c.select
            ),
            None => format!("{}{filter}", read.select),
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
        // The key range is read with a bitmap heap scan, not an index scan: the heap pages in
        // their physical order, each visited once, rather than one heap fetch per index
        // entry. (Chunks stay key ranges, not `ctid` ranges, which would read pages in order
        // with no index at all: a row whose UPDATE moves it to a page of a chunk already
        // read, before its own chunk is read, would be in no chunk, and the stream's change
        // is only a partial row when a TOAST value was left unchanged; a VACUUM FULL or
        // CLUSTER during the snapshot moves every row and sends nothing into the stream.)
        sql.push_str(
            "; COMMIT; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL enable_indexscan = off; \
             SELECT pg_snapshot_xmax(s)::text, x.id::text FROM pg_current_snapshot() s \
             LEFT JOIN LATERAL pg_snapshot_xip(s) AS x(id) ON true; ",
        );
        sql.push_str(&select);
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
        let mut rows_csv = CsvRows::new(read.csv.as_ref(), &self.ctx.pcfg, &synced_at);
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
                    if set != low_set + 2 {
                        return;
                    }
                    let piece = match pieces.last_mut() {
                        Some(p) if p.body.len() < flush_bytes => p,
                        _ => {
                            pieces.push(Piece::default());
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
                    );
                    piece.push_row(&key, start);
                },
                rows_csv
                    .as_mut()
                    .map(|r| |row: &[u8]| r.push(row, low.get(), flush_bytes)),
            )
            .map_err(query(format!("read chunk {} of {table}", chunk.number)))?;
        let low = low.get();
        let (pieces, format, columns) = match (rows_csv, &read.csv) {
            (Some(rows), Some(c)) => {
                let bad = || SnapshotError::Csv {
                    table: table.clone(),
                    chunk: chunk.number,
                };
                if rows.malformed {
                    return Err(bad());
                }
                if rows.null_text {
                    // A text `\N` would load as NULL: the whole chunk as JSON (one StarRocks
                    // transaction takes one format per table).
                    tracing::debug!(%table, chunk = chunk.number, "a value is the text \\N: the chunk goes as JSON");
                    let json =
                        csv_to_json(&self.ctx.pcfg, c, rows.pieces, &synced_at, low, flush_bytes)
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
        let pieces: Vec<Piece> = pieces.into_iter().filter(|p| !p.rows.is_empty()).collect();
        Ok(Fetched {
            table: table.clone(),
            chunk: chunk.number,
            pieces,
            format,
            target: read.schema.target_name.clone(),
            columns,
            label: starrocks_label(&read.label, &format!("snap{}-{:X}", chunk.number, low.0)),
            xip,
            xmax,
            reply,
        })
    }
}

/// A chunk's CSV rows as they arrive, cut into Stream Load bodies of about `flush-bytes`.
struct CsvRows {
    pieces: Vec<Piece>,
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
    /// A value is the text `\N` (see [`csv::holds_null_text`]).
    null_text: bool,
}

impl CsvRows {
    fn new(read: Option<&CsvRead>, pcfg: &PipelineConfig, synced_at: &str) -> Option<CsvRows> {
        let read = read?;
        Some(CsvRows {
            pieces: Vec::new(),
            key_columns: read.schema.key.len(),
            audit: Vec::new(),
            audit_lsn: None,
            audit_on: pcfg.audit_prefix.is_some(),
            synced_at: synced_at.to_string(),
            key: Vec::new(),
            malformed: false,
            null_text: false,
        })
    }

    /// One CopyData message: one row, `\n` at its end.
    fn push(&mut self, row: &[u8], low: Lsn, flush_bytes: usize) {
        self.key.clear();
        if !csv::key_into(&mut self.key, row, self.key_columns) {
            self.malformed = true;
            return;
        }
        if !self.null_text && csv::holds_null_text(row) {
            self.null_text = true;
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
                    body: Vec::with_capacity(flush_bytes.min(1 << 18)),
                    ..Piece::default()
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
        piece.push_row(&self.key, start);
    }
}

/// A chunk read as CSV, written as JSON rows instead (see [`CsvRows::null_text`]), cut
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
