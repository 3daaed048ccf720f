//! Whole rows for partial changes, so that they never cut a source transaction.
//!
//! pgoutput leaves out a TOAST value an UPDATE did not change (`'u'`), and a DELETE without
//! `REPLICA IDENTITY FULL` carries only the key (which a soft delete must turn into a whole
//! row with `is_deleted` set). Loaded as partial updates (a `columns` header naming only what
//! the row carries), such rows cannot share a StarRocks transaction with whole rows of their
//! table: the transaction interface takes one set of load parameters per table ("all
//! `/api/transaction/load` calls of a transaction must carry the same parameters"), so the
//! transaction used to be committed at that load and the source transaction became visible
//! in two parts.
//!
//! Here such rows become whole rows before they load. The value of a column a change left
//! out is the value the row had before that change:
//!
//! * the last value pgprism itself wrote for that key in the current flush cycle
//!   ([`CycleRows`]: the pipeline keeps the values of every row it writes in the cycle, for
//!   the columns that can come back left out, bounded by `cdc.fill-bytes-max`), else
//! * the value StarRocks holds. The cycle's StarRocks transaction is not committed yet, so
//!   StarRocks holds the row as the committed cycles left it, and a value left unchanged by
//!   this change was not changed since the last change pgprism saw of that key, which is in
//!   a committed cycle. The loader reads those values over the FE query port right before
//!   the batch loads, one `SELECT` per batch ([`fill_batch`]), and writes them into the
//!   rows' JSON.
//!
//! Every decision the pipeline makes here depends on the stream alone (the bound, the
//! tables), so a replay after a crash fills and cuts the same way. Where the pipeline cannot
//! know (the bound was exceeded in this cycle, a snapshot chunk of the table loaded in it,
//! its columns changed in it, or its key type prints differently in StarRocks), the row stays
//! a partial update and cuts the transaction as before (counted, with a warning). A `SELECT`
//! that fails is a failure of the cycle: it is rolled back and loaded again from the
//! checkpoint (never a cut, which a replay that reads StarRocks fine would not repeat).
//!
//! A row StarRocks does not have (it was never loaded: a table copied without a snapshot)
//! takes the columns' StarRocks defaults ([`ColumnDefault`]), which is what StarRocks' own
//! partial update gives a new key; a `NOT NULL` column without one stops CDC naming it.

use std::collections::{HashMap, HashSet};

use super::pgoutput::Datum;
use super::pipeline::Batch;
use super::schema::{JsonKind, TableSchema, json_string};
use super::snapshot::window::encode_key;
use super::starrocks::{LoadError, StarRocks};

/// What the pipeline knows of one column of a row it wrote in the cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Kept {
    Null,
    Text(Box<[u8]>),
    Binary(Box<[u8]>),
    /// The cycle never wrote this column for the key: StarRocks holds its value.
    InStarRocks,
    /// Not kept (a column that is never left out: fixed-length types); or left out by the
    /// change at hand and still to be found.
    Missing,
}

impl Kept {
    pub(super) fn of(datum: Datum<'_>) -> Kept {
        match datum {
            Datum::Null => Kept::Null,
            Datum::Text(v) => Kept::Text(v.into()),
            Datum::Binary(v) => Kept::Binary(v.into()),
            Datum::Unchanged => Kept::Missing,
        }
    }

    /// As a value to write (`Unchanged`: left out of the row's JSON).
    pub(super) fn datum(&self) -> Datum<'_> {
        match self {
            Kept::Null => Datum::Null,
            Kept::Text(v) => Datum::Text(v),
            Kept::Binary(v) => Datum::Binary(v),
            Kept::InStarRocks | Kept::Missing => Datum::Unchanged,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Kept::Text(v) | Kept::Binary(v) => v.len(),
            _ => 0,
        }
    }
}

/// PostgreSQL types whose values are never TOASTed (fixed length): never left out of an
/// UPDATE, so not kept for TOAST. (bool, "char", name, int8, int2, int4, oid, tid, xid, cid,
/// float4, float8, money, macaddr8, macaddr, date, time, timestamp, timestamptz, interval,
/// timetz, uuid, pg_lsn.)
fn fixed_length(type_oid: u32) -> bool {
    matches!(
        type_oid,
        16 | 18
            | 19
            | 20
            | 21
            | 23
            | 26
            | 27
            | 28
            | 29
            | 700
            | 701
            | 790
            | 774
            | 829
            | 1082
            | 1083
            | 1114
            | 1184
            | 1186
            | 1266
            | 2950
            | 3220
    )
}

/// Key types whose text is the same in PostgreSQL and StarRocks (integers, strings, uuid,
/// date): the rows a `SELECT` returns are matched to the keys asked for by that text. A
/// table keyed otherwise (a timestamp prints differently) is never read back: its rows that
/// need a value StarRocks holds stay partial updates.
fn key_prints_alike(type_oid: u32) -> bool {
    matches!(type_oid, 20 | 21 | 23 | 26 | 25 | 1042 | 1043 | 2950 | 1082)
}

/// Per-table decisions, from its columns.
pub(super) fn keeps_column(schema: &TableSchema, i: usize, soft_deletes: bool) -> bool {
    soft_deletes
        || schema
            .columns
            .get(i)
            .is_some_and(|c| !fixed_length(c.type_oid))
}

/// Whether any column of the table may need to be found (so its rows are kept).
pub(super) fn table_needs_rows(schema: &TableSchema, soft_deletes: bool) -> bool {
    (0..schema.columns.len())
        .any(|i| !schema.key.contains(&i) && keeps_column(schema, i, soft_deletes))
}

/// What the pipeline knows of a key in the cycle.
pub(super) enum Lookup<'a> {
    /// Written in the cycle: these values (by column).
    Row(&'a [Kept]),
    /// Not written in the cycle: StarRocks holds the row as it was before.
    InStarRocks,
    /// Cannot tell (the bound was exceeded, the table's memory of the cycle is incomplete,
    /// the key was deleted in the cycle, or StarRocks cannot be asked for it).
    Unknown,
}

/// Encoded key → the row's values (`None`: deleted in the cycle).
type TableRows = HashMap<Box<[u8]>, Option<Box<[Kept]>>>;

/// A row to complete from StarRocks: its key values (as PostgreSQL prints them, in key
/// order) and the indexes of the columns to read.
pub(super) type ToRead = (Vec<Box<[u8]>>, Vec<usize>);

/// [`Lookup`], owned: what the cycle knew of a key before a change (an UPDATE that moves a
/// row to a new key takes its left-out values from the old key's row).
pub(super) enum Prior {
    Row(Box<[Kept]>),
    InStarRocks,
    Unknown,
}

/// Rough bytes of one remembered row besides its values (key, map entry, allocations).
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// The rows the pipeline wrote in the current flush cycle, by table and key (see the module
/// comment). Cleared at every cycle's end.
pub(super) struct CycleRows {
    /// Relation id → encoded key → the row's values (`None`: deleted in the cycle).
    tables: HashMap<u32, TableRows>,
    bytes: usize,
    bytes_max: usize,
    /// Source tables whose memory of the cycle is incomplete: a snapshot chunk loaded
    /// (rows pgprism wrote without seeing them here), or their columns changed.
    incomplete: HashSet<String>,
    /// The bound was exceeded: nothing is known for the rest of the cycle.
    overflowed: bool,
    /// Source tables StarRocks' values cannot be read from (setup's check found no `SELECT`
    /// on the target table): rows the cycle did not write stay partial there.
    unreadable: HashSet<String>,
    /// Cycles that exceeded the bound.
    pub(super) overflows: u64,
    /// Rows whose left-out values are still to be read from StarRocks by another key (a row
    /// moved from that key in this cycle): (relation id, key) → that key's values and the
    /// batch that reads them (see [`CycleRows::carried`]).
    carried: HashMap<(u32, Box<[u8]>), Carried>,
}

/// Where the values a moved row left out are read: by the key it moved from, in the batch
/// that holds that key's delete (`Pipeline`'s batch serial), before the batch loads.
#[derive(Clone, Debug)]
pub(super) struct Carried {
    /// The key values StarRocks is asked for (as PostgreSQL prints them, in key order).
    pub(super) read_key: Vec<Box<[u8]>>,
    /// The batch whose read covers them.
    pub(super) batch: u64,
}

impl Carried {
    fn bytes(&self, key: &[u8]) -> usize {
        ENTRY_OVERHEAD_BYTES + key.len() + self.read_key.iter().map(|k| k.len()).sum::<usize>()
    }
}

impl CycleRows {
    pub(super) fn new(bytes_max: usize) -> CycleRows {
        CycleRows {
            tables: HashMap::new(),
            bytes: 0,
            bytes_max,
            incomplete: HashSet::new(),
            overflowed: false,
            unreadable: HashSet::new(),
            overflows: 0,
            carried: HashMap::new(),
        }
    }

    /// The source tables whose target StarRocks does not let pgprism read (for the run).
    pub(super) fn set_unreadable(&mut self, tables: HashSet<String>) {
        self.unreadable = tables;
    }

    /// The cycle ended (its transaction commits before anything later loads).
    pub(super) fn clear(&mut self) {
        self.tables.clear();
        self.carried.clear();
        self.bytes = 0;
        self.incomplete.clear();
        self.overflowed = false;
    }

    /// Rows of this table were written without passing here, or its columns changed:
    /// forget it for the rest of the cycle.
    pub(super) fn mark_incomplete(&mut self, oid: Option<u32>, source_name: &str) {
        if let Some(oid) = oid {
            self.forget_table(oid);
        }
        self.incomplete.insert(source_name.to_string());
    }

    /// The table was emptied (TRUNCATE): what was kept of it is gone, and StarRocks is
    /// empty too once the loader applied it.
    pub(super) fn forget_table(&mut self, oid: u32) {
        if let Some(rows) = self.tables.remove(&oid) {
            self.bytes -= rows
                .iter()
                .map(|(k, v)| entry_bytes(k, v.as_deref()))
                .sum::<usize>();
        }
        let mut freed = 0;
        self.carried.retain(|(o, key), c| {
            let keep = *o != oid;
            if !keep {
                freed += c.bytes(key);
            }
            keep
        });
        self.bytes -= freed;
    }

    /// Where the values `key`'s row left out are read, if by another key (see [`Carried`]).
    pub(super) fn carried(&self, oid: u32, key: &[u8]) -> Option<&Carried> {
        if self.overflowed {
            return None;
        }
        self.carried.get(&(oid, Box::from(key)))
    }

    /// Notes that the row `key` has (just written, see [`CycleRows::remember`]) takes its
    /// left-out values from StarRocks by another key. Beyond the bound, forgets the whole
    /// cycle and says so (`false`).
    pub(super) fn carry(&mut self, oid: u32, key: Box<[u8]>, carried: Carried) -> bool {
        if self.overflowed {
            return false;
        }
        self.bytes += carried.bytes(&key);
        if let Some(old) = self.carried.insert((oid, key.clone()), carried) {
            self.bytes -= old.bytes(&key);
        }
        self.check_bound()
    }

    pub(super) fn lookup(&self, schema: &TableSchema, key: &[u8]) -> Lookup<'_> {
        if self.overflowed || self.incomplete.contains(&schema.source_name) {
            return Lookup::Unknown;
        }
        match self.tables.get(&schema.oid).and_then(|t| t.get(key)) {
            Some(Some(row)) => Lookup::Row(row),
            Some(None) => Lookup::Unknown,
            None if !self.unreadable.contains(&schema.source_name)
                && schema.key.iter().all(|&i| {
                    schema
                        .columns
                        .get(i)
                        .is_some_and(|c| key_prints_alike(c.type_oid))
                }) =>
            {
                Lookup::InStarRocks
            }
            None => Lookup::Unknown,
        }
    }

    /// [`CycleRows::lookup`], kept past the next change.
    pub(super) fn prior(&self, schema: &TableSchema, key: &[u8]) -> Prior {
        match self.lookup(schema, key) {
            Lookup::Row(row) => Prior::Row(row.into()),
            Lookup::InStarRocks => Prior::InStarRocks,
            Lookup::Unknown => Prior::Unknown,
        }
    }

    /// Records the row `key` now has (`None`: deleted). Beyond the bound, forgets the whole
    /// cycle and says so (`false`).
    pub(super) fn remember(&mut self, oid: u32, key: Box<[u8]>, row: Option<Box<[Kept]>>) -> bool {
        if self.overflowed {
            return false;
        }
        let added = entry_bytes(&key, row.as_deref());
        // A new row for the key: where its values were read from is the caller's to say again
        // (the map is empty but for moved rows: no key copy on the common path).
        if !self.carried.is_empty()
            && let Some(old) = self.carried.remove(&(oid, key.clone()))
        {
            self.bytes -= old.bytes(&key);
        }
        let table = self.tables.entry(oid).or_default();
        if let Some(old) = table.get(&key) {
            self.bytes -= entry_bytes(&key, old.as_deref());
        }
        self.bytes += added;
        table.insert(key, row);
        self.check_bound()
    }

    /// Past the bound, forgets the whole cycle (`false`).
    fn check_bound(&mut self) -> bool {
        if self.bytes > self.bytes_max {
            self.tables.clear();
            self.carried.clear();
            self.bytes = 0;
            self.overflowed = true;
            self.overflows += 1;
            return false;
        }
        true
    }
}

fn entry_bytes(key: &[u8], row: Option<&[Kept]>) -> usize {
    ENTRY_OVERHEAD_BYTES + key.len() + row.map_or(0, |r| r.iter().map(Kept::bytes).sum::<usize>())
}

/// The encoded key of a row (`None` when a key value is missing).
pub(super) fn key_of(schema: &TableSchema, values: &[Kept]) -> Option<Box<[u8]>> {
    let mut parts = Vec::with_capacity(schema.key.len());
    for &i in &schema.key {
        match values.get(i)? {
            Kept::Text(v) | Kept::Binary(v) => parts.push(Some(&v[..])),
            _ => return None,
        }
    }
    Some(encode_key(parts.into_iter()))
}

/// The values of a row that need reading from StarRocks before its batch loads.
#[derive(Debug, Clone)]
pub struct PendingRow {
    /// Offset in the batch body right after the row's `{`.
    pub(super) at: usize,
    /// Key values as PostgreSQL prints them, in key order.
    pub(super) key: Vec<Box<[u8]>>,
    /// Indexes into [`FillPlan::columns`].
    pub(super) columns: Vec<u16>,
}

/// The reads a batch needs before it loads: its rows whose left-out values StarRocks holds.
#[derive(Debug, Clone, Default)]
pub struct FillPlan {
    /// Key column names, in key order.
    pub(super) key: Vec<String>,
    /// Columns some row needs: name, how its value is written, `"name":`.
    pub(super) columns: Vec<(String, JsonKind, Vec<u8>)>,
    pub(super) rows: Vec<PendingRow>,
}

impl FillPlan {
    /// The index of `column` in [`FillPlan::columns`], added when new.
    pub(super) fn column(&mut self, name: &str, kind: JsonKind, json_key: &[u8]) -> u16 {
        if let Some(i) = self.columns.iter().position(|c| c.0 == name) {
            return i as u16;
        }
        self.columns
            .push((name.to_string(), kind, json_key.to_vec()));
        (self.columns.len() - 1) as u16
    }
}

/// Transactions (and plain loads) committed whose publish had not finished (`publish
/// timeout`, state `COMMITTED`): their rows are not visible yet, so values are read from
/// StarRocks only once they are ([`Publishing::wait`]). The list outlives a run (it is
/// carried in `Shared`, as the column plans are): a run that reconnects after a wait gave
/// up still waits for the same labels before its first read. Bounded by
/// `cdc.publishing-labels-max`: every commit that adds a label first drops those already
/// visible from the front (one state check each, stopping at the first still publishing),
/// and at the bound waits for the oldest.
#[derive(Debug, Default)]
pub struct Publishing {
    labels: std::collections::VecDeque<String>,
    max: usize,
}

/// A label's state that means its rows are visible: `VISIBLE`, or `UNKNOWN` (StarRocks
/// keeps a finished label for `label_keep_max_second` and then forgets it; a label pgprism
/// committed and StarRocks no longer knows was published long ago).
fn published(state: &Result<String, String>) -> bool {
    matches!(state.as_deref(), Ok("VISIBLE" | "UNKNOWN"))
}

impl Publishing {
    /// Sets the bound (`cdc.publishing-labels-max`, at least 1) of a list carried over.
    pub fn with_max(mut self, max: usize) -> Publishing {
        self.max = max.max(1);
        self
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The labels still publishing, oldest first (stored with the checkpoint).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.labels.iter().map(String::as_str)
    }

    /// Adds the labels an earlier process recorded with its last checkpoint that the list
    /// lacks (a label visible since costs one state check, at the next settle or wait).
    pub fn merge(&mut self, labels: Vec<String>) {
        for label in labels {
            if !self.labels.contains(&label) {
                self.labels.push_back(label);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Notes a commit still publishing. The label is kept whatever happens next; beyond the
    /// bound the oldest is waited for (a [`LoadError::NotVisible`] past
    /// `cdc.load-timeout-ms`: the list is carried to the next run, which waits again).
    pub fn push(&mut self, sink: &StarRocks, label: String) -> Result<(), LoadError> {
        self.note(label);
        self.settle(sink)
    }

    /// Notes a commit still publishing, without asking StarRocks (see [`Publishing::settle`]).
    pub fn note(&mut self, label: String) {
        self.labels.push_back(label);
    }

    /// Drops the labels already visible from the front; beyond the bound, waits for the
    /// oldest.
    pub fn settle(&mut self, sink: &StarRocks) -> Result<(), LoadError> {
        while let Some(front) = self.labels.front() {
            if !published(&sink.label_state(front)) {
                break;
            }
            self.labels.pop_front();
        }
        while self.labels.len() > self.max.max(1) {
            self.wait_front(sink)?;
        }
        Ok(())
    }

    /// Waits until every label is visible (emptied as they become so): a `SELECT` before
    /// that would read the rows they replaced. Bounded by `cdc.load-timeout-ms` per label;
    /// beyond, the cycle is loaded again from the checkpoint (the list is kept).
    pub fn wait(&mut self, sink: &StarRocks) -> Result<(), LoadError> {
        while !self.labels.is_empty() {
            self.wait_front(sink)?;
        }
        Ok(())
    }

    fn wait_front(&mut self, sink: &StarRocks) -> Result<(), LoadError> {
        let cfg = sink.config();
        let deadline = std::time::Instant::now() + cfg.timeout;
        let mut delay = cfg.backoff;
        let Some(label) = self.labels.front() else {
            return Ok(());
        };
        loop {
            let state = sink.label_state(label);
            if published(&state) {
                self.labels.pop_front();
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(LoadError::NotVisible {
                    label: label.clone(),
                    state: state.unwrap_or_else(|e| e),
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(cfg.backoff_max);
        }
    }
}

/// The target tables (of (target table, key columns)) StarRocks refuses to read (`SELECT key FROM db.t LIMIT 0` answered an error: no `SELECT`
/// privilege, say). Their rows that need a value StarRocks holds stay partial updates for the
/// run (cut, counted in `fill.rows_partial`, warned here), rather than failing every cycle
/// that reads them. A check that cannot reach the FE leaves the table readable: a read that
/// fails later fails its cycle, which is loaded again from the checkpoint.
pub fn unreadable_tables<'a>(
    sink: &StarRocks,
    tables: impl Iterator<Item = (&'a str, &'a [String])>,
) -> HashSet<String> {
    use super::ddl::quote;
    let mut out = HashSet::new();
    for (target, key) in tables {
        let names: Vec<String> = key.iter().map(|k| quote(k)).collect();
        let sql = format!(
            "SELECT {} FROM {}.{} LIMIT 0",
            names.join(", "),
            quote(&sink.config().database),
            quote(target)
        );
        match sink.query(&sql) {
            Ok(_) => {}
            Err(LoadError::Query {
                source: super::mysql::MysqlError::Server { code, message, .. },
                ..
            }) => {
                tracing::warn!(table = %target, code, %message, "fill-rows cannot read this StarRocks table (grant SELECT on it): its partial changes that need values StarRocks holds load as partial updates, each ending the StarRocks transaction there");
                out.insert(target.to_string());
            }
            Err(e) => {
                tracing::warn!(table = %target, error = %e, "could not check that fill-rows can read this StarRocks table");
            }
        }
    }
    out
}

/// Keys one `SELECT` asks for at most (the statement stays far below the FE's packet size).
const KEYS_PER_QUERY: usize = 500;

/// What [`fill_batch`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Filled {
    /// Rows whose values were read from StarRocks.
    pub rows_read: u64,
    /// Rows StarRocks did not have (their left-out columns take StarRocks' defaults).
    pub rows_missing: u64,
}

/// Reads the values `plan` needs from StarRocks (committed data: the cycle's own loads are
/// not visible) and writes them into a copy of `batch`'s rows.
///
/// Chunk by chunk: the keys are asked in the order their rows come ([`KEYS_PER_QUERY`] per
/// `SELECT`), each chunk is read only when the first row that needs it is written, and a
/// key's values are dropped after the last row that needs them. Besides the batch and its
/// copy, what is held is one chunk's values and those of keys a later row needs again.
///
/// A row StarRocks does not have takes the columns' defaults ([`ColumnDefault`], read once
/// per batch, and only for a batch with such a row).
pub fn fill_batch(
    sink: &StarRocks,
    batch: &Batch,
    plan: &FillPlan,
) -> Result<(Batch, Filled), LoadError> {
    let not_utf8 = |column: String| LoadError::NotUtf8 {
        table: batch.table.clone(),
        column,
    };
    let read = |chunk: &[&[Box<[u8]>]]| {
        // Keys are asked for as text; the pipeline never plans a read by a key that is not
        // UTF-8, and one that would be is refused here rather than changed.
        let sql = select_sql(&sink.config().database, &batch.table, plan, chunk)
            .ok_or_else(|| not_utf8(plan.key.join(", ")))?;
        sink.query_raw(&sql)
            .map(|(_, rows)| rows)
            .map_err(|e| match e {
                // An answer, and a refusal (the SELECT privilege taken away since the check,
                // say): the table is cut for the rest of the run, as the check would have.
                LoadError::Query {
                    source: source @ super::mysql::MysqlError::Server { .. },
                    ..
                } => LoadError::SelectRefused {
                    table: batch.table.clone(),
                    source,
                },
                e => e,
            })
    };
    let defaults = || column_defaults(sink, &batch.table, plan);
    fill_with(&batch.body, plan, read, defaults)
        .map_err(|e| match e {
            FillError::Read(e) => e,
            FillError::NotUtf8 { column } => not_utf8(column),
            FillError::NoDefault { column, default } => LoadError::NoDefault {
                table: batch.table.clone(),
                column,
                why: match default {
                    None => "NOT NULL without a default".into(),
                    Some(d) => format!("defaulted to {d}, which StarRocks computes per row"),
                },
            },
        })
        .map(|(body, filled)| {
            (
                Batch {
                    body,
                    ..batch.clone()
                },
                filled,
            )
        })
}

/// What StarRocks gives a column that a load leaves out of a row it does not have yet: a
/// partial update of a new key "inserts a new row, and fills default values in fields that
/// are empty" (StarRocks, "Change data through loading", Partial updates), and a full row
/// that names a `NOT NULL` column without a value is filtered (`NULL value in non-nullable
/// column`). pgprism makes such a change a whole row, so it writes what StarRocks' own
/// partial update would have written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ColumnDefault {
    /// Nullable without a default (or a column StarRocks does not list): NULL.
    Null,
    /// The default's text (`information_schema.columns.COLUMN_DEFAULT`; for
    /// `CURRENT_TIMESTAMP`, StarRocks' own current time, read once per batch).
    Value(String),
    /// `NOT NULL` without a default: StarRocks refuses such a row, so does pgprism.
    Refused,
    /// A default pgprism cannot evaluate the way StarRocks does (`uuid()`, say).
    Expression(String),
}

/// The defaults of `plan`'s columns in `db.table` (one `information_schema.columns` read, and
/// one `SELECT current_timestamp()` when a column's default is that).
fn column_defaults(
    sink: &StarRocks,
    table: &str,
    plan: &FillPlan,
) -> Result<Vec<ColumnDefault>, LoadError> {
    let sql = format!(
        "SELECT COLUMN_NAME, IS_NULLABLE, COLUMN_DEFAULT FROM information_schema.columns WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{}'",
        sink.config().database.replace('\'', "''"),
        table.replace('\'', "''")
    );
    let (_, rows) = sink.query_raw(&sql)?;
    let not_utf8 = |column: &str| LoadError::NotUtf8 {
        table: table.to_string(),
        column: column.to_string(),
    };
    let mut found: HashMap<String, (bool, Option<String>)> = HashMap::new();
    for row in rows {
        let mut row = row.into_iter();
        let (Some(Some(name)), Some(nullable), Some(default)) =
            (row.next(), row.next(), row.next())
        else {
            continue;
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        let nullable = !nullable.is_some_and(|n| n.eq_ignore_ascii_case(b"NO"));
        let default = match default {
            None => None,
            Some(d) => Some(String::from_utf8(d).map_err(|_| not_utf8(&name))?),
        };
        // StarRocks column names are case-insensitive; information_schema gives them as
        // declared.
        found.insert(name.to_ascii_lowercase(), (nullable, default));
    }
    let mut now: Option<String> = None;
    let mut out = Vec::with_capacity(plan.columns.len());
    for (name, kind, _) in &plan.columns {
        out.push(match found.get(&name.to_ascii_lowercase()) {
            None | Some((true, None)) => ColumnDefault::Null,
            Some((false, None)) => ColumnDefault::Refused,
            Some((_, Some(d))) if is_current_timestamp(d) => {
                if now.is_none() {
                    let (_, rows) = sink.query_raw("SELECT current_timestamp()")?;
                    let text = rows
                        .into_iter()
                        .next()
                        .and_then(|r| r.into_iter().next().flatten())
                        .and_then(|v| String::from_utf8(v).ok())
                        .ok_or_else(|| LoadError::Protocol {
                            what: "SELECT current_timestamp()",
                            detail: "no value".into(),
                        })?;
                    now = Some(text);
                }
                ColumnDefault::Value(now.clone().unwrap_or_default())
            }
            Some((_, Some(d))) if is_expression(d) => ColumnDefault::Expression(d.clone()),
            // A BOOLEAN default is kept as written (`TRUE`, `1`): one pgprism cannot read as
            // true or false is refused, never loaded as false.
            Some((_, Some(d))) if *kind == JsonKind::Bool && starrocks_bool(d).is_none() => {
                ColumnDefault::Expression(d.clone())
            }
            Some((_, Some(d))) => ColumnDefault::Value(d.clone()),
        });
    }
    Ok(out)
}

fn is_current_timestamp(default: &str) -> bool {
    let d = default.trim().to_ascii_uppercase();
    matches!(
        d.as_str(),
        "CURRENT_TIMESTAMP" | "CURRENT_TIMESTAMP()" | "NOW()"
    )
}

/// A default StarRocks computes per row (`(uuid())`, `uuid_numeric()`): a function call.
fn is_expression(default: &str) -> bool {
    let d = default.trim().trim_start_matches('(').to_ascii_lowercase();
    d.starts_with("uuid()") || d.starts_with("uuid_numeric()")
}

/// Why [`fill_with`] failed.
#[derive(Debug, PartialEq, Eq)]
enum FillError<E> {
    /// A read failed.
    Read(E),
    /// A value read is not UTF-8: a JSON body cannot carry it unchanged (JSON text is
    /// UTF-8, and a `\u` escape names a character, not a byte), and changing it (a lossy
    /// decode) would load another value than StarRocks held.
    NotUtf8 { column: String },
    /// A row StarRocks does not have left out a column whose default pgprism cannot give
    /// ([`ColumnDefault::Refused`], [`ColumnDefault::Expression`]).
    NoDefault {
        column: String,
        default: Option<String>,
    },
}

/// Values as read: by column, NULL is `None`, bytes as StarRocks sent them.
type RawRow = Vec<Option<Vec<u8>>>;

/// [`fill_batch`] with the reads done by `read` (one call per chunk of keys), and the
/// columns' defaults (for rows StarRocks does not have) by `defaults` (at most once).
fn fill_with<E>(
    body: &[u8],
    plan: &FillPlan,
    mut read: impl FnMut(&[&[Box<[u8]>]]) -> Result<Vec<RawRow>, E>,
    mut defaults: impl FnMut() -> Result<Vec<ColumnDefault>, E>,
) -> Result<(Vec<u8>, Filled), FillError<E>> {
    let mut known_defaults: Option<Vec<ColumnDefault>> = None;
    // Each key once, in the order of its first row; and each row's key's place there.
    let mut keys: Vec<&[Box<[u8]>]> = Vec::new();
    let mut place: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut row_key: Vec<usize> = Vec::with_capacity(plan.rows.len());
    for row in &plan.rows {
        let joined = joined(row.key.iter().map(|k| &k[..]));
        let next = keys.len();
        let at = *place.entry(joined).or_insert(next);
        if at == next {
            keys.push(&row.key);
        }
        row_key.push(at);
    }
    drop(place);
    // The last row that needs each key.
    let mut last_use = vec![0usize; keys.len()];
    for (i, &k) in row_key.iter().enumerate() {
        last_use[k] = i;
    }
    let mut found: HashMap<Vec<u8>, RawRow> = HashMap::new();
    let mut chunks_read = 0;
    let mut out = Vec::with_capacity(body.len() + body.len() / 2);
    let mut done = 0;
    let mut filled = Filled::default();
    for (i, row) in plan.rows.iter().enumerate() {
        let k = row_key[i];
        while chunks_read * KEYS_PER_QUERY <= k {
            let from = chunks_read * KEYS_PER_QUERY;
            let to = (from + KEYS_PER_QUERY).min(keys.len());
            let rows = read(&keys[from..to]).map_err(FillError::Read)?;
            collect(&mut found, rows, plan.key.len());
            chunks_read += 1;
        }
        let Some(head) = body.get(done..row.at) else {
            continue;
        };
        out.extend_from_slice(head);
        done = row.at;
        let joined = joined(row.key.iter().map(|k| &k[..]));
        let values = if last_use[k] == i {
            found.remove(&joined)
        } else {
            found.get(&joined).cloned()
        };
        let Some(values) = values else {
            filled.rows_missing += 1;
            if known_defaults.is_none() {
                known_defaults = Some(defaults().map_err(FillError::Read)?);
            }
            write_defaults(
                &mut out,
                plan,
                row,
                known_defaults.as_deref().unwrap_or_default(),
            )?;
            continue;
        };
        filled.rows_read += 1;
        write_values(&mut out, plan, row, &values)?;
    }
    out.extend_from_slice(body.get(done..).unwrap_or_default());
    Ok((out, filled))
}

/// The values read for one row, right after its `{`.
fn write_values<E>(
    out: &mut Vec<u8>,
    plan: &FillPlan,
    row: &PendingRow,
    values: &[Option<Vec<u8>>],
) -> Result<(), FillError<E>> {
    for &c in &row.columns {
        let (Some((name, kind, json_key)), Some(value)) =
            (plan.columns.get(usize::from(c)), values.get(usize::from(c)))
        else {
            continue;
        };
        let text = match value.as_deref().map(simdutf8::basic::from_utf8) {
            None => None,
            Some(Ok(text)) => Some(text),
            Some(Err(_)) => {
                return Err(FillError::NotUtf8 {
                    column: name.clone(),
                });
            }
        };
        out.extend_from_slice(json_key);
        write_starrocks_value(out, *kind, text);
        out.push(b',');
    }
    Ok(())
}

/// The defaults of the columns a row StarRocks does not have left out, right after its
/// `{` (a nullable column without a default stays out: StarRocks gives it NULL).
fn write_defaults<E>(
    out: &mut Vec<u8>,
    plan: &FillPlan,
    row: &PendingRow,
    defaults: &[ColumnDefault],
) -> Result<(), FillError<E>> {
    for &c in &row.columns {
        let Some((name, kind, json_key)) = plan.columns.get(usize::from(c)) else {
            continue;
        };
        match defaults.get(usize::from(c)) {
            None | Some(ColumnDefault::Null) => {}
            Some(ColumnDefault::Value(v)) => {
                out.extend_from_slice(json_key);
                write_starrocks_value(out, *kind, Some(v));
                out.push(b',');
            }
            Some(ColumnDefault::Refused) => {
                return Err(FillError::NoDefault {
                    column: name.clone(),
                    default: None,
                });
            }
            Some(ColumnDefault::Expression(d)) => {
                return Err(FillError::NoDefault {
                    column: name.clone(),
                    default: Some(d.clone()),
                });
            }
        }
    }
    Ok(())
}

/// Key values joined with NUL (which no PostgreSQL text contains).
fn joined<'a>(parts: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p);
        out.push(0);
    }
    out
}

/// Result rows (key columns first, then the plan's columns) by joined key.
fn collect(found: &mut HashMap<Vec<u8>, RawRow>, rows: Vec<RawRow>, key_len: usize) {
    for mut row in rows {
        if row.len() < key_len || row[..key_len].iter().any(Option::is_none) {
            continue;
        }
        let values = row.split_off(key_len);
        let key = joined(row.iter().map(|k| k.as_deref().unwrap_or_default()));
        found.insert(key, values);
    }
}

/// `` SELECT `k`, `c` FROM `db`.`t` WHERE `k` IN ('1', '2') `` (one key column), or
/// `` WHERE (`k1` = 'a' AND `k2` = 'b') OR ... `` (several). `None` when a key value is
/// not UTF-8 (a statement is text; such a key is never changed into another).
fn select_sql(db: &str, table: &str, plan: &FillPlan, keys: &[&[Box<[u8]>]]) -> Option<String> {
    use super::ddl::quote;
    let mut sql = String::from("SELECT ");
    let names: Vec<String> = plan
        .key
        .iter()
        .chain(plan.columns.iter().map(|c| &c.0))
        .map(|n| quote(n))
        .collect();
    sql.push_str(&names.join(", "));
    sql.push_str(" FROM ");
    sql.push_str(&quote(db));
    sql.push('.');
    sql.push_str(&quote(table));
    sql.push_str(" WHERE ");
    if plan.key.len() == 1 {
        sql.push_str(&quote(&plan.key[0]));
        sql.push_str(" IN (");
        for (i, k) in keys.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            literal(&mut sql, k.first().map_or(&[][..], |v| &v[..]))?;
        }
        sql.push(')');
    } else {
        for (i, k) in keys.iter().enumerate() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push('(');
            for (j, (name, v)) in plan.key.iter().zip(k.iter()).enumerate() {
                if j > 0 {
                    sql.push_str(" AND ");
                }
                sql.push_str(&quote(name));
                sql.push_str(" = ");
                literal(&mut sql, v)?;
            }
            sql.push(')');
        }
    }
    Some(sql)
}

/// A StarRocks string literal: single quotes, backslash escapes (as in MySQL). `None` for
/// bytes that are not UTF-8.
fn literal(sql: &mut String, value: &[u8]) -> Option<()> {
    sql.push('\'');
    for c in std::str::from_utf8(value).ok()?.chars() {
        match c {
            '\'' => sql.push_str("\\'"),
            '\\' => sql.push_str("\\\\"),
            '\0' => sql.push_str("\\0"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
    Some(())
}

/// A BOOLEAN as StarRocks prints it (`1`/`0`) or as a default may be written (`true`,
/// `FALSE`, `t`), any case; `None` for anything else.
fn starrocks_bool(text: &str) -> Option<bool> {
    let t = text.trim().trim_matches(|c| c == '\'' || c == '"');
    if ["1", "true", "t"].iter().any(|v| t.eq_ignore_ascii_case(v)) {
        Some(true)
    } else if ["0", "false", "f"]
        .iter()
        .any(|v| t.eq_ignore_ascii_case(v))
    {
        Some(false)
    } else {
        None
    }
}

/// Writes a value as StarRocks printed it (text protocol) so that loading it again stores
/// the same value: numbers as numbers, BOOLEAN (printed `1`/`0`) as `true`/`false`,
/// everything else as a JSON string (a JSON column's text is the document, loaded again as
/// pgprism loads PostgreSQL's json text).
fn write_starrocks_value(body: &mut Vec<u8>, kind: JsonKind, value: Option<&str>) {
    let Some(text) = value else {
        body.extend_from_slice(b"null");
        return;
    };
    match kind {
        JsonKind::Number if super::pipeline::is_json_number(text.as_bytes()) => {
            body.extend_from_slice(text.as_bytes());
        }
        JsonKind::Bool => body.extend_from_slice(if starrocks_bool(text) == Some(true) {
            b"true"
        } else {
            b"false"
        }),
        _ => json_string(body, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boolean_default_is_read_in_any_case_and_an_unknown_one_is_not_false() {
        for t in ["1", "true", "TRUE", "True", "t", "'true'"] {
            assert_eq!(starrocks_bool(t), Some(true), "{t}");
        }
        for f in ["0", "false", "FALSE", "f", "\"false\""] {
            assert_eq!(starrocks_bool(f), Some(false), "{f}");
        }
        for x in ["yes", "", "2", "truth"] {
            assert_eq!(starrocks_bool(x), None, "{x}");
        }
        let mut body = Vec::new();
        write_starrocks_value(&mut body, JsonKind::Bool, Some("TRUE"));
        assert_eq!(body, b"true");
    }

    fn plan(key: &[&str]) -> FillPlan {
        let mut plan = FillPlan {
            key: key.iter().map(|k| k.to_string()).collect(),
            ..FillPlan::default()
        };
        plan.column("big", JsonKind::String, br#""big":"#);
        plan.column("ok", JsonKind::Bool, br#""ok":"#);
        plan
    }

    fn no_defaults<E>() -> Result<Vec<ColumnDefault>, E> {
        Ok(vec![ColumnDefault::Null, ColumnDefault::Null])
    }

    #[test]
    fn a_row_starrocks_lacks_takes_the_columns_defaults_as_its_partial_update_would() {
        let mut p = plan(&["id"]);
        let body = br#"[{"id":1,"__op":0},{"id":2,"__op":0}]"#;
        p.rows = vec![
            PendingRow {
                at: 2,
                key: vec![b"1".to_vec().into()],
                columns: vec![0, 1],
            },
            PendingRow {
                at: 20,
                key: vec![b"2".to_vec().into()],
                columns: vec![0],
            },
        ];
        assert_eq!(&body[19..21], b"{\"");
        let stored: Vec<RawRow> = vec![vec![
            Some(b"1".to_vec()),
            Some(b"x".to_vec()),
            Some(b"0".to_vec()),
        ]];
        let mut asked = 0;
        let defaults = vec![
            ColumnDefault::Value("none".into()),
            ColumnDefault::Value("1".into()),
        ];
        let (out, filled) = fill_with(
            body,
            &p,
            |_| Ok::<_, ()>(stored.clone()),
            || {
                asked += 1;
                Ok(defaults.clone())
            },
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"[{"big":"x","ok":false,"id":1,"__op":0},{"big":"none","id":2,"__op":0}]"#
        );
        assert_eq!((filled.rows_read, filled.rows_missing, asked), (1, 1, 1));
        // Defaults are read only for a batch with a row StarRocks lacks.
        let all: Vec<RawRow> = vec![
            stored[0].clone(),
            vec![Some(b"2".to_vec()), Some(b"y".to_vec()), None],
        ];
        let mut asked = 0;
        fill_with(
            body,
            &p,
            |_| Ok::<_, ()>(all.clone()),
            || {
                asked += 1;
                Ok(defaults.clone())
            },
        )
        .unwrap();
        assert_eq!(asked, 0);
        // NOT NULL without a default, or a default computed per row: refused, naming it.
        for (d, want) in [
            (ColumnDefault::Refused, None),
            (
                ColumnDefault::Expression("uuid()".into()),
                Some("uuid()".to_string()),
            ),
        ] {
            assert_eq!(
                fill_with(
                    body,
                    &p,
                    |_| Ok::<_, ()>(stored.clone()),
                    || Ok(vec![d.clone(), ColumnDefault::Null])
                )
                .unwrap_err(),
                FillError::NoDefault {
                    column: "big".into(),
                    default: want
                }
            );
        }
        // Nullable without a default: left out, StarRocks gives NULL.
        let (out, _) = fill_with(
            body,
            &p,
            |_| Ok::<_, ()>(stored.clone()),
            || Ok(vec![ColumnDefault::Null, ColumnDefault::Null]),
        )
        .unwrap();
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .ends_with(r#"{"id":2,"__op":0}]"#)
        );
        assert!(is_current_timestamp("CURRENT_TIMESTAMP") && !is_current_timestamp("now"));
        assert!(is_expression("(uuid())") && !is_expression("uuid"));
    }

    #[test]
    fn selects_by_key_with_escaped_literals() {
        let one = plan(&["id"]);
        let keys: Vec<Box<[u8]>> = vec![b"1".to_vec().into(), b"it's \\".to_vec().into()];
        let asked: Vec<&[Box<[u8]>]> = keys.chunks(1).collect();
        assert_eq!(
            select_sql("db", "t", &one, &asked).unwrap(),
            r"SELECT `id`, `big`, `ok` FROM `db`.`t` WHERE `id` IN ('1', 'it\'s \\')"
        );
        // A key that is not UTF-8 is never asked for changed.
        let bad: Vec<Box<[u8]>> = vec![vec![b'a', 0xFF].into()];
        assert_eq!(select_sql("db", "t", &one, &[&bad[..]]), None);
        let two = plan(&["a", "b"]);
        let keys: Vec<Box<[u8]>> = vec![b"1".to_vec().into(), b"x".to_vec().into()];
        assert_eq!(
            select_sql("db", "t", &two, &[&keys[..], &keys[..]]).unwrap(),
            "SELECT `a`, `b`, `big`, `ok` FROM `db`.`t` WHERE (`a` = '1' AND `b` = 'x') OR (`a` = '1' AND `b` = 'x')"
        );
    }

    #[test]
    fn values_read_go_right_after_each_rows_brace() {
        let mut p = plan(&["id"]);
        let body = br#"[{"id":1,"__op":0},{"id":2,"__op":0},{"id":3,"__op":0}]"#;
        p.rows = vec![
            PendingRow {
                at: 2,
                key: vec![b"1".to_vec().into()],
                columns: vec![0, 1],
            },
            PendingRow {
                at: 38,
                key: vec![b"3".to_vec().into()],
                columns: vec![0],
            },
        ];
        assert_eq!(&body[37..39], b"{\"");
        let mut asked = Vec::new();
        let mut stored: Vec<RawRow> = vec![vec![
            Some(b"1".to_vec()),
            Some(b"a\"b".to_vec()),
            Some(b"1".to_vec()),
        ]];
        let (out, filled) = fill_with(
            body,
            &p,
            |chunk| {
                asked.push(chunk.len());
                Ok::<_, ()>(stored.clone())
            },
            no_defaults,
        )
        .unwrap();
        assert_eq!(asked, vec![2], "both keys in one SELECT");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"[{"big":"a\"b","ok":true,"id":1,"__op":0},{"id":2,"__op":0},{"id":3,"__op":0}]"#
        );
        assert_eq!((filled.rows_read, filled.rows_missing), (1, 1));
        // The third row was not found: no default, it keeps its JSON, StarRocks gives it NULL.
        stored.push(vec![Some(b"3".to_vec()), None, None]);
        let (out, _) = fill_with(body, &p, |_| Ok::<_, ()>(stored.clone()), no_defaults).unwrap();
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .ends_with(r#"{"big":null,"id":3,"__op":0}]"#)
        );
        // A value that is not UTF-8 is refused, never written changed (U+FFFD).
        stored[1][1] = Some(vec![b'x', 0xC3]);
        assert_eq!(
            fill_with(body, &p, |_| Ok::<_, ()>(stored.clone()), no_defaults).unwrap_err(),
            FillError::NotUtf8 {
                column: "big".into()
            }
        );
    }

    #[test]
    fn keys_are_read_a_chunk_at_a_time_and_a_key_needed_again_keeps_its_values() {
        let mut p = plan(&["id"]);
        // Rows 0..KEYS_PER_QUERY+10 each with its own key, then key 0 once more.
        let n = KEYS_PER_QUERY + 10;
        let mut body = b"[".to_vec();
        let mut ids: Vec<usize> = (0..n).collect();
        ids.push(0);
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.push(b'{');
            p.rows.push(PendingRow {
                at: body.len(),
                key: vec![id.to_string().into_bytes().into()],
                columns: vec![0],
            });
            body.extend_from_slice(format!("\"id\":{id}}}").as_bytes());
        }
        body.push(b']');
        let mut reads = Vec::new();
        let (out, filled) = fill_with(
            &body,
            &p,
            |chunk| {
                reads.push(chunk.len());
                Ok::<_, ()>(
                    chunk
                        .iter()
                        .map(|k| {
                            let id = String::from_utf8(k[0].to_vec()).unwrap();
                            vec![
                                Some(id.clone().into_bytes()),
                                Some(format!("v{id}").into_bytes()),
                                None,
                            ]
                        })
                        .collect(),
                )
            },
            no_defaults,
        )
        .unwrap();
        assert_eq!(reads, vec![KEYS_PER_QUERY, 10]);
        assert_eq!(filled.rows_read, n as u64 + 1);
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with(r#"[{"big":"v0","id":0},{"big":"v1","id":1}"#));
        assert!(
            out.ends_with(r#"{"big":"v0","id":0}]"#),
            "{}",
            &out[out.len() - 60..]
        );
        // A failed read fails the whole batch.
        assert_eq!(
            fill_with(&body, &p, |_| Err("down"), || Ok(Vec::new())).unwrap_err(),
            FillError::Read("down")
        );
    }

    #[test]
    fn past_the_bound_the_cycle_knows_nothing_until_it_ends() {
        let schema = TableSchema {
            oid: 1,
            source_name: "public.t".into(),
            target_name: "t".into(),
            columns: vec![
                super::super::schema::Column::new("id", 23),
                super::super::schema::Column::new("big", 25),
            ],
            key: vec![0],
            generation: 1,
        };
        assert!(table_needs_rows(&schema, false));
        let mut rows = CycleRows::new(200);
        let row = |v: &[u8]| -> Box<[Kept]> {
            vec![Kept::Text(b"1".to_vec().into()), Kept::Text(v.into())].into()
        };
        let key = key_of(&schema, &row(b"x")).unwrap();
        assert!(matches!(rows.lookup(&schema, &key), Lookup::InStarRocks));
        rows.remember(1, key.clone(), Some(row(b"x")));
        assert!(
            matches!(rows.lookup(&schema, &key), Lookup::Row(r) if r[1] == Kept::Text(b"x".to_vec().into()))
        );
        rows.remember(1, key.clone(), Some(row(&[b'y'; 300])));
        assert_eq!(rows.overflows, 1);
        assert!(matches!(rows.lookup(&schema, &key), Lookup::Unknown));
        rows.clear();
        assert!(matches!(rows.lookup(&schema, &key), Lookup::InStarRocks));
        rows.mark_incomplete(None, "public.t");
        assert!(matches!(rows.lookup(&schema, &key), Lookup::Unknown));
    }
}
