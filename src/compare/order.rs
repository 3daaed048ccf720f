//! Ordered shadow dispatch: the shadow runs conflicting statements in the order the primary
//! completed them, across every session and shard.
//!
//! The model is Oracle Database Replay's commit-order synchronisation in its OBJECT_ID mode
//! (an action waits only for earlier actions that touched the same objects), with the
//! primary's completion order as the clock: each sync point the primary answers is numbered
//! by when its answer reached pgprism's socket, the kernel's receive timestamp
//! (`SO_TIMESTAMPNS`, asked on compare's primary legs only), in one process-wide book (the one
//! cross-thread cost compare mode pays; the plain proxy and mirror paths never touch this
//! module). Numbering answers in the order pgprism *read* them misplaced 30% of a hot row's
//! writes at 64 clients on a loaded 2-core machine (a shard descheduled for milliseconds reads
//! its answers late; 125 of 130 inversions were across shards); the timestamps misplace
//! 0.1-1% (`hot_row_order_gap` in tests/compare_concurrent.rs measures it). Since an answer
//! can be read after a later-stamped one, a sync point is also *held* while a conflicting one
//! of another session, sent to the primary before its answer arrived, is still unanswered
//! (that one's answer may be stamped earlier), for at most `compare.order-hold-ms` after its
//! answer arrived: a watermark per conflict rather than across shards, so unrelated traffic
//! is never held. A sync point goes to the shadow once every
//! conflicting sync point of another session with a smaller number has completed on the
//! shadow: two conflict when they share a relation and one writes (see [`Footprint`]). Reads
//! of the same relation stay parallel, and so do unrelated relations. A transaction's COMMIT
//! (or any sync point that ends it) carries every relation the transaction wrote, because
//! that is when its writes become visible to others.
//!
//! Waiting on the completion order rather than the start order is what makes contended rows
//! reproducible: on the primary, an autocommit UPDATE and a SELECT of the same row that
//! overlap in time can go either way, but the one that completed first is, but for a window
//! of microseconds, the one that took effect first.
//!
//! Every wait is bounded (`compare.order-wait-ms`): a sync point that waited that long goes
//! anyway, and it and the earlier ones it overtook are marked *overtaken*: their order was not
//! reproduced, so a difference in their results is inconclusive (concurrent), never a
//! mismatch. The same happens to a pending read when a conflicting write runs on the primary
//! only (primary-only routing, calibration). This is also what breaks the one cycle the
//! ordering could form with the shadow's own locks (a statement held by pgprism for an earlier
//! one that the shadow blocks on a lock the first one's transaction holds): it cannot last
//! longer than the bound. The hold is bounded the same way (`compare.order-hold-ms`): it
//! waits only for the primary, which answers whatever the shadow does, except under
//! `fail-on-differences`, where a client whose answer waits for the shadow may keep a lock
//! the awaited statement waits for on the primary: a write of rows the held one's
//! transaction wrote is therefore not waited for (see [`Locks`]), and any other such cycle
//! lasts at most the hold. A step
//! of the wall clock the timestamps are on misnumbers the answers around it; their
//! differences are judged by the overlap rule below like any other.
//!
//! A cycle the shadow's locks close is broken sooner when it can be seen: a sync point whose
//! transaction already wrote (so holds row locks on the shadow while it waits) and whose
//! every blocker has been running on the shadow for `compare.order-lock-wait-ms` goes then
//! (see [`Ledger::held_by_own_locks`]). Those blockers are most likely waiting for its
//! locks: on the primary they were answered just after it released them, and pgprism saw
//! the answers in the other order (two sockets, often two shards; on a loaded machine the
//! window is milliseconds). On a hot row every transaction would otherwise queue behind each
//! such inversion for the whole bound.
//!
//! Wake-ups cross threads through one `eventfd` per shard ([`Notifier`]); within a shard they
//! are direct. The book is one `Mutex`: held for a few map operations per sync point.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::footprint::{Footprint, Probe, Value, rows_disjoint, rows_within};
use crate::exec::Notifier;

/// The hasher of the book's maps, keyed by completion numbers (receive timestamps) and
/// relation hashes (FNV of names, which a client could make collide already): SipHash's
/// protection against chosen keys buys little there, the maps are bounded (`RECENT_MAX`
/// relations), and it cost about 2,000 instructions per compared sync point (callgrind,
/// pgbench `-S`). One folded 64x64-bit multiply (as FxHash and foldhash do) spreads a
/// key's bits over both halves of the hash, which hashbrown reads both of. It starts from
/// a key drawn once per process ([`IdBuild`]): the relation hashes come from names a
/// client sends, and without a key a client could choose names that share buckets and
/// make every lookup under the process-wide lock walk a long chain.
#[derive(Clone, Copy)]
struct IdHasher(u64);

/// Builds [`IdHasher`]s seeded with the process's key.
#[derive(Clone, Copy)]
struct IdBuild(u64);

impl Default for IdBuild {
    fn default() -> Self {
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        // std's RandomState is seeded from the OS's random source.
        IdBuild(*KEY.get_or_init(|| {
            std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1
        }))
    }
}

impl BuildHasher for IdBuild {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; any other key still hashes, byte by byte.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type IdMap<V> = HashMap<u64, V, IdBuild>;
type IdSet = HashSet<u64, IdBuild>;

/// One sync point the primary completed, pending on the shadow.
#[derive(Debug)]
struct Entry {
    session: u64,
    footprint: Footprint,
    /// Its transaction had written when it was sent: it holds row locks on the shadow.
    holds_locks: bool,
    /// What its transaction holds row locks on, on the primary, while it is pending (see
    /// [`Locks`]).
    locked: Footprint,
    /// When it was cleared to go to the shadow (it is written there at once).
    cleared: Option<Instant>,
    /// Its order with a conflicting sync point was not reproduced, and why.
    overtaken: Option<Unpinned>,
    /// The session whose sync point it is: `session` but for a read being placed (see
    /// [`Ledger::place_after`]), which is booked under a session of its own.
    origin: u64,
    /// A read being placed that a later write of its own session may precede on the
    /// shadow (see [`Ledger::complete`]): no re-read of it says where it stood.
    spoiled: bool,
    /// When it was sent to the primary, and when its answer arrived there (ns).
    since: u64,
    answer: u64,
}

/// What the primary did on one relation lately: which conflicting writes a sync point
/// overlapped there. The completion order is the primary's order only up to the time it
/// takes pgprism to see an answer: a sync point that overlapped a write of another session
/// on rows it touches may have seen it or not, and a difference in its result is
/// inconclusive (concurrent) rather than a mismatch.
#[derive(Debug, Default, Clone)]
struct Recent {
    /// The latest writes completed on the primary, oldest first: (completion number,
    /// session, rows of this relation; empty: all of them).
    writes: VecDeque<(u64, u64, Rows)>,
    /// The newest completion number among the writes no longer in `writes`: a sync point
    /// that started before it may have overlapped any of them.
    forgotten: u64,
    /// The newest completion number of any write remembered: a sync point that started
    /// after it overlapped none of `writes`, found without walking them (a relation written
    /// by every transaction keeps all [`WRITES_KEPT`], and the walk cost about 1,600
    /// instructions per pgbench `-N` transaction).
    newest: u64,
    /// Sync points sent to the primary whose answer pgprism has not read yet. The writes
    /// of primary-only routing or calibration land whenever they do, so a read the shadow
    /// completes while one is in flight is not pinned; and any one of them may carry an
    /// answer stamped before a later-read one's (see [`Book::held`]).
    in_flight: Vec<InFlight>,
}

/// A sync point in flight on the primary, on one relation.
#[derive(Debug, Clone)]
struct InFlight {
    session: u64,
    /// Its rows of the relation (empty: all of them).
    rows: Rows,
    /// It never runs on the shadow.
    only: bool,
    write: bool,
    /// When it was sent (ns since the Unix epoch).
    since: u64,
}

/// One relation's rows of a footprint (empty: all of them), kept by sharing the
/// footprint's probes: a copy of them in a vector of its own cost an allocation and its
/// release for every sync point in flight on a relation and every write remembered
/// (callgrind, pgbench `-N`).
#[derive(Debug, Clone)]
struct Rows {
    probes: Arc<[Probe]>,
    span: std::ops::Range<usize>,
}

impl Rows {
    /// `footprint`'s rows of `lane`; None: the relations it may touch whole (a wild one's).
    fn of(footprint: &Footprint, lane: Option<u64>) -> Rows {
        Rows {
            probes: footprint.probes.clone(),
            span: lane.map_or(0..0, |lane| footprint.rows_span(lane)),
        }
    }
}

impl Rows {
    /// The rows as a remembered write keeps them: still sharing the footprint's probes when
    /// they are most of them, else a copy of this relation's alone, so that a write
    /// remembered for a rarely written relation does not keep a large footprint's probes
    /// of every other relation alive (the bound stated at [`WRITES_KEPT`] holds).
    fn kept(&self) -> Rows {
        let whole = self.probes.len();
        if whole <= 8 || self.span.len() * 2 >= whole {
            return self.clone();
        }
        Rows {
            probes: self.probes[self.span.clone()].into(),
            span: 0..self.span.len(),
        }
    }
}

impl Rows {
    /// The same rows: most often the very probes (the footprint a sync point started with
    /// ends it), told without comparing them.
    fn same(&self, other: &Rows) -> bool {
        (Arc::ptr_eq(&self.probes, &other.probes) && self.span == other.span) || **self == **other
    }
}

impl std::ops::Deref for Rows {
    type Target = [Probe];

    fn deref(&self) -> &[Probe] {
        &self.probes[self.span.clone()]
    }
}

/// Writes remembered per relation: older ones count as overlapping whatever started before
/// them (a read whose time on the primary spans more writes of its relation than this is
/// not pinned, whatever the rows). With [`RECENT_MAX`] relations, at most about 16 Ki x 32
/// writes of a few dozen bytes each.
const WRITES_KEPT: usize = 32;

impl Recent {
    fn wrote(&mut self, c: u64, session: u64, rows: &Rows) {
        if self.writes.len() == WRITES_KEPT
            && let Some((old, _, _)) = self.writes.pop_front()
        {
            // Kept in the order pgprism read them, which is nearly but not quite the order
            // of their numbers (receive timestamps).
            self.forgotten = self.forgotten.max(old);
        }
        self.newest = self.newest.max(c);
        self.writes.push_back((c, session, rows.kept()));
    }

    /// Whether another session's write of rows that may meet `rows` (any, for a write of
    /// its own: see [`Footprint::conflicts`]) completed from `since` on or is in flight.
    fn overlaps(&self, session: u64, since: u64, write: bool, rows: &[Probe]) -> Option<Unpinned> {
        let meets = |r: &[Probe]| write || !rows_disjoint(rows, r);
        if self.forgotten >= since
            || (self.newest >= since
                && self
                    .writes
                    .iter()
                    .any(|(c, s, r)| *c >= since && *s != session && meets(r)))
        {
            return Some(Unpinned::Overlapped);
        }
        self.in_flight
            .iter()
            .any(|f| f.write && f.session != session && meets(&f.rows))
            .then_some(Unpinned::InFlight)
    }

    /// Whether a sync point of another session that `footprint` (of `session`, answered
    /// at `c`, `rows` of this relation) conflicts with was sent before `c` and is still in
    /// flight: its answer may have reached pgprism's socket before `c`'s and not been read
    /// yet. Primary-only ones never run on the shadow: no order to keep with them. Nor does
    /// a write of rows `c`'s transaction holds locks on (`locked`: of this relation; None:
    /// none known) hold it: that one waits on the primary for the transaction's end, so
    /// its answer comes after `c`'s (see [`Locks`]).
    fn holds(
        &self,
        (session, c): (u64, u64),
        footprint: &Footprint,
        rows: &[Probe],
        locked: Option<&[Probe]>,
    ) -> bool {
        self.in_flight.iter().any(|f| {
            f.session != session
                && f.since < c
                && !f.only
                && footprint.waits_for(f.write)
                && ((footprint.write && f.write) || !rows_disjoint(rows, &f.rows))
                && !(f.write && locked.is_some_and(|l| rows_within(&f.rows, l)))
        })
    }

    /// Whether a write that never runs on the shadow, of rows that may meet `rows`, is in
    /// flight.
    fn only_in_flight(&self, write: bool, rows: &[Probe]) -> bool {
        self.in_flight
            .iter()
            .any(|f| f.only && f.write && (write || !rows_disjoint(rows, &f.rows)))
    }

    fn start(&mut self, session: u64, rows: &Rows, started: Started) {
        self.in_flight.push(InFlight {
            session,
            rows: rows.clone(),
            only: started.only,
            write: started.write,
            since: started.since,
        });
    }

    fn end(&mut self, session: u64, rows: &Rows, started: Started) {
        if let Some(i) = self.in_flight.iter().position(|f| {
            f.session == session
                && f.only == started.only
                && f.write == started.write
                && f.since == started.since
                && f.rows.same(rows)
        }) {
            self.in_flight.swap_remove(i);
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.is_empty()
    }
}

/// Relations whose recent history is kept; beyond it, idle ones are forgotten (a forgotten
/// relation's next overlap goes unseen: its difference would be judged by order alone).
const RECENT_MAX: usize = 1 << 14;

/// Pending sync points of one relation (or of the wild ones, or all), by completion
/// number, reads and writes apart: `session` of each.
///
/// Apart because a read waits only for writes: with one map, a read walked every pending
/// read of its relation before it (pgbench `-S`: all of them) to find none, and with 8
/// clients on a loaded machine the shadow's backlog made that walk 7% of pgprism's CPU
/// (`perf record`, `Ledger::acquire` and `Book::waits_on`), a cost that grows with the lag
/// it adds to.
#[derive(Default)]
struct Lane {
    reads: Side,
    writes: Side,
}

impl Lane {
    /// `rows`: its rows of this relation (empty: all of them); None for the lanes of no
    /// one relation (the wild ones, all), which are not kept by row.
    fn insert(&mut self, c: u64, (session, write): (u64, bool), rows: Option<&[Probe]>) {
        self.of(write).insert(c, session, rows);
    }

    /// Takes `c` out; `rows` as it was inserted with.
    fn remove(&mut self, c: u64, write: bool, rows: Option<&[Probe]>) {
        self.of(write).remove(c, rows);
    }

    fn of(&mut self, write: bool) -> &mut Side {
        if write {
            &mut self.writes
        } else {
            &mut self.reads
        }
    }

    fn is_empty(&self) -> bool {
        self.reads.all.is_empty() && self.writes.all.is_empty()
    }
}

/// The pending reads or the pending writes of one relation: every one by completion number
/// and, so that a look-up for some rows walks only what may touch them, each by the rows it
/// touches.
///
/// By row because a look-up that needs rows to meet (a read for writes, a write or an END
/// for reads) walked every pending one of the other kind on the relation, and the shadow's
/// backlog made that walk long: pgbench `-S` right after `-N` on one process spent 90% of
/// its samples in `Ledger::acquire` -> `Book::first_conflict` (each read walked the
/// backlog of `-N` writes of `pgbench_accounts`, of other rows), and under `-N` the ENDs'
/// walks of pending reads were 10% each in `acquire` and `force` (perf record, session 14).
/// Now a look-up for rows whose key values are known walks the sync points keyed by those
/// values and those of no known row: O(what may meet), not O(backlog).
#[derive(Default)]
struct Side {
    /// Every one: completion number, session.
    all: Numbered,
    /// Those that may touch rows no key names: the whole relation, or rows of which one
    /// probe has no pair of a known value (see [`RowKey::of`]).
    unkeyed: Numbered,
    /// The others, under the key of each of their probes.
    keyed: HashMap<RowKey, Bucket, IdBuild>,
    /// The key columns used in `keyed`, with how many (sync point, key) pairs each has.
    columns: Vec<(KeyColumn, u32)>,
}

/// Pending sync points in completion-number order: (number, session).
///
/// A queue, not a B-tree: numbers come nearly in order (a write's is its answer's receive
/// stamp, a read's a few microseconds before its own) and the shadow completes nearly the
/// oldest first, so an insertion is mostly a push at the back and a removal a pop at the
/// front, each a comparison or two; the B-trees' insertion and removal were about 2,000
/// instructions per pgbench `-N` transaction (callgrind, with the lanes' two sides, the
/// unkeyed ones and the book's every-pending lane). One out of place is found by a binary
/// search and moved into place (`VecDeque` shifts the shorter side: a sync point left
/// behind by the ones around it, a read numbered before a few later-read answers).
#[derive(Default)]
struct Numbered(VecDeque<(u64, u64)>);

impl Numbered {
    /// Adds `c` of `session` (a number already there takes the new session, as a map's
    /// insertion would).
    fn insert(&mut self, c: u64, session: u64) {
        if self.0.back().is_none_or(|&(b, _)| b < c) {
            self.0.push_back((c, session));
            return;
        }
        match self.0.binary_search_by_key(&c, |&(b, _)| b) {
            Ok(at) => self.0[at].1 = session,
            Err(at) => self.0.insert(at, (c, session)),
        }
    }

    /// Takes `c` out: its session, None if it was not there.
    fn remove(&mut self, c: u64) -> Option<u64> {
        if let Some(&(f, s)) = self.0.front()
            && f == c
        {
            self.0.pop_front();
            return Some(s);
        }
        let at = self.0.binary_search_by_key(&c, |&(b, _)| b).ok()?;
        self.0.remove(at).map(|(_, s)| s)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Those numbered before `before`, in order.
    fn before(&self, before: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().copied().take_while(move |&(c, _)| c < before)
    }
}

/// A column probes are keyed by, with the kind of value (an integer or a text): values of
/// two kinds are never taken for different values (see `Value::differs`), so a look-up
/// with a value of the other kind cannot rule out any key there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyColumn {
    column: u64,
    text: bool,
}

/// A probe's key: one of its (column, value) pairs. Two probes with keys in one column and
/// different values there touch no row in common.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowKey {
    column: KeyColumn,
    value: u64,
}

impl std::hash::Hash for RowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Two words rather than three (the kind folded into the column's hash): a
        // collision of the two only shares a bucket, told apart by `eq`.
        state.write_u64(self.column.column ^ u64::from(self.column.text));
        state.write_u64(self.value);
    }
}

impl RowKey {
    /// The key `probe` is kept under: its first pair (by column) of a known value. None:
    /// it has none (parameters, binary values, whose kinds do not say when two differ).
    fn of(probe: &Probe) -> Option<RowKey> {
        probe
            .pairs
            .iter()
            .find_map(|&(column, value)| RowKey::new(column, value))
    }

    /// `probe`'s key in `column`. None: it names no value of that kind there, and may
    /// meet any row keyed there.
    fn at(probe: &Probe, column: KeyColumn) -> Option<RowKey> {
        let &(_, value) = probe.pairs.iter().find(|(c, _)| *c == column.column)?;
        RowKey::new(column.column, value).filter(|k| k.column == column)
    }

    fn new(column: u64, value: Value) -> Option<RowKey> {
        let (text, value) = match value {
            Value::Int(i) => (false, i as u64),
            Value::Text(h) => (true, h),
            _ => return None,
        };
        Some(RowKey {
            column: KeyColumn { column, text },
            value,
        })
    }

    /// Whether every probe of `rows` (never the whole relation) has a key: kept by row.
    fn all(rows: &[Probe]) -> bool {
        !rows.is_empty() && rows.iter().all(|p| RowKey::of(p).is_some())
    }
}

/// The pending sync points kept under one row key: (completion number, session), in number
/// order. Most keys have one (a row another statement touches while it is pending is the
/// exception): kept in place, without the allocation of a queue and its release per sync
/// point (about 1,000 instructions per pgbench `-N` transaction, callgrind).
enum Bucket {
    One((u64, u64)),
    /// Numbers come nearly in order (most go last) and the shadow completes the oldest
    /// first: a queue.
    Many(VecDeque<(u64, u64)>),
}

/// A sync point in a [`Bucket`]: (completion number, session).
type Keyed = (u64, u64);

impl Bucket {
    /// Its sync points in order, in two parts.
    fn parts(&self) -> (&[Keyed], &[Keyed]) {
        match self {
            Bucket::One(one) => (std::slice::from_ref(one), &[]),
            Bucket::Many(many) => many.as_slices(),
        }
    }

    /// Those before `before`, in order.
    fn before(&self, before: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (a, b) = self.parts();
        a.iter()
            .chain(b)
            .copied()
            .take_while(move |&(c, _)| c < before)
    }

    /// Adds `c`; false if it was there (two of its probes share a key).
    fn insert(&mut self, c: u64, session: u64) -> bool {
        match self {
            Bucket::One(one) if one.0 == c => false,
            Bucket::One(one) => {
                let one = *one;
                let pair = if one.0 < c {
                    [one, (c, session)]
                } else {
                    [(c, session), one]
                };
                *self = Bucket::Many(VecDeque::from(pair));
                true
            }
            Bucket::Many(many) => {
                let at = many.partition_point(|&(b, _)| b < c);
                if many.get(at).is_some_and(|&(b, _)| b == c) {
                    return false;
                }
                many.insert(at, (c, session));
                true
            }
        }
    }

    /// Takes `c` out: (whether it was there, whether the bucket is empty now).
    fn remove(&mut self, c: u64) -> (bool, bool) {
        match self {
            Bucket::One(one) => (one.0 == c, one.0 == c),
            Bucket::Many(many) => match many.binary_search_by_key(&c, |&(b, _)| b) {
                Ok(at) => {
                    many.remove(at);
                    (true, many.is_empty())
                }
                Err(_) => (false, false),
            },
        }
    }
}

impl Side {
    fn insert(&mut self, c: u64, session: u64, rows: Option<&[Probe]>) {
        self.all.insert(c, session);
        let Some(rows) = rows else {
            return;
        };
        if !RowKey::all(rows) {
            self.unkeyed.insert(c, session);
            return;
        }
        for key in rows.iter().filter_map(RowKey::of) {
            match self.keyed.entry(key) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Bucket::One((c, session)));
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if !o.get_mut().insert(c, session) {
                        continue;
                    }
                }
            }
            match self.columns.iter_mut().find(|(k, _)| *k == key.column) {
                Some((_, n)) => *n += 1,
                None => self.columns.push((key.column, 1)),
            }
        }
    }

    fn remove(&mut self, c: u64, rows: Option<&[Probe]>) {
        if self.all.remove(c).is_none() {
            return;
        }
        let Some(rows) = rows else {
            return;
        };
        if !RowKey::all(rows) {
            self.unkeyed.remove(c);
            return;
        }
        for key in rows.iter().filter_map(RowKey::of) {
            // One look-up for the bucket and, when it empties, its removal.
            let std::collections::hash_map::Entry::Occupied(mut bucket) = self.keyed.entry(key)
            else {
                continue;
            };
            let (was, empty) = bucket.get_mut().remove(c);
            if empty {
                bucket.remove();
            }
            if !was {
                continue; // taken out under another probe with this key
            }
            if let Some(i) = self.columns.iter().position(|(k, _)| *k == key.column) {
                self.columns[i].1 -= 1;
                if self.columns[i].1 == 0 {
                    self.columns.swap_remove(i);
                }
            }
        }
    }

    /// Whether a look-up for `rows` can go by key: every probe names a value of the kind
    /// of every key column in use (one column in practice: the one the relation's rows are
    /// named by). Otherwise it walks `all`, as it did before the keys.
    fn narrows(&self, rows: &[Probe]) -> bool {
        !rows.is_empty()
            && self
                .columns
                .iter()
                .all(|&(k, _)| rows.iter().all(|p| RowKey::at(p, k).is_some()))
    }

    /// The earliest one before `before` that `hit` accepts (given its number and session),
    /// among those that may touch `rows` (None: all of them, the rows aside).
    fn first(
        &self,
        rows: Option<&[Probe]>,
        before: u64,
        hit: impl Fn(u64, u64) -> bool,
    ) -> Option<u64> {
        let Some(rows) = rows.filter(|r| self.narrows(r)) else {
            return self
                .all
                .before(before)
                .find(|&(c, s)| hit(c, s))
                .map(|(c, _)| c);
        };
        let mut first = self
            .unkeyed
            .before(before)
            .find(|&(c, s)| hit(c, s))
            .map(|(c, _)| c);
        for &(column, _) in &self.columns {
            for key in rows.iter().filter_map(|p| RowKey::at(p, column)) {
                let bound = first.unwrap_or(before);
                if let Some((c, _)) = self
                    .keyed
                    .get(&key)
                    .and_then(|bucket| bucket.before(bound).find(|&(c, s)| hit(c, s)))
                {
                    first = Some(c);
                }
            }
        }
        first
    }

    /// Each one before `before` that may touch `rows` (None: all of them), until `f`
    /// breaks: in no set order, and one kept under several keys may come more than once.
    fn each(
        &self,
        rows: Option<&[Probe]>,
        before: u64,
        mut f: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let Some(rows) = rows.filter(|r| self.narrows(r)) else {
            for (c, s) in self.all.before(before) {
                f(c, s)?;
            }
            return ControlFlow::Continue(());
        };
        for (c, s) in self.unkeyed.before(before) {
            f(c, s)?;
        }
        for &(column, _) in &self.columns {
            for key in rows.iter().filter_map(|p| RowKey::at(p, column)) {
                let Some(bucket) = self.keyed.get(&key) else {
                    continue;
                };
                for (c, s) in bucket.before(before) {
                    f(c, s)?;
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// A sync point waiting to go to the shadow.
struct Waiter {
    shard: usize,
    /// The pending sync point it was last found waiting for (the earliest conflicting one):
    /// until that one leaves the book it cannot go, so it is looked at again only then
    /// ([`Book::blocked_on`]). None: held for sync points in flight on the primary (see
    /// [`Turn::Hold`]), not waiting for pending ones.
    blocker: Option<u64>,
}

#[derive(Default)]
struct Book {
    /// How long a sync point may be held for earlier-sent conflicting ones still in flight
    /// (`compare.order-hold-ms`, in ns).
    hold_ns: u64,
    /// How long before its answer a read is numbered (`compare.order-read-lead-us`, in
    /// ns; see [`Ledger::complete`]).
    read_lead_ns: u64,
    /// The newest number of each session with a sync point pending: a read of that session
    /// is numbered after it whatever its lead (see [`Ledger::complete`]).
    newest: IdMap<u64>,
    recent: IdMap<Recent>,
    /// Writes that may touch every relation.
    recent_wild: Recent,
    entries: IdMap<Entry>,
    lanes: IdMap<Lane>,
    /// Past this many lanes, the empty ones are dropped (see `Ledger::complete`).
    lanes_prune_at: usize,
    /// Pending sync points that touch every relation.
    wild: Lane,
    /// Every pending sync point (what a wild one checks).
    all: Lane,
    waiters: BTreeMap<u64, Waiter>,
    /// The waiters (not held) by the pending sync point each was last found waiting for
    /// (see [`Waiter::blocker`]; an entry may be stale: the waiter says). Every time a sync
    /// point left the book, each waiter was looked at again and walked its relations'
    /// pending sync points for what it still waits for: with the shadow behind under
    /// pgbench `-N` (8 clients) that was 73% of pgprism's CPU samples (`Ledger::done`, perf
    /// record) and took a run from 244 to 3,573 us per transaction within three rounds.
    blocked_on: IdMap<Vec<u64>>,
    /// The held waiters: looked at whenever something leaves the book or the primary's
    /// flight.
    holding: BTreeSet<u64>,
    inboxes: Vec<Option<Arc<Inbox>>>,
    /// Reads being placed (see [`Ledger::keep`]), by their session: their numbers now (a
    /// session may have more than one: a read kept while an earlier one is still placed).
    placing: IdMap<Vec<u64>>,
}

/// Completion numbers released for one shard by another thread.
struct Inbox {
    released: Mutex<Vec<u64>>,
    /// Set once something is pushed to `released`, cleared by the drain before it takes
    /// them: a hint (the lock decides) that spares the shard's drains after every
    /// completion the lock when nothing came (about 400 instructions per pgbench `-N`
    /// transaction, callgrind). Set inside the lock, so a push never ends with it clear
    /// unless a drain that takes the push comes after.
    any: AtomicBool,
    notifier: Notifier,
}

/// The process-wide completion order, shared by every shard's compare mode.
pub struct Ledger {
    book: Mutex<Book>,
    sessions: AtomicU64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            book: Mutex::new(Book::default()),
            sessions: AtomicU64::new(1),
        }
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

/// What [`Ledger::done`] learnt of a sync point the shadow completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// It ran on the shadow after every conflicting earlier sync point and before every
    /// conflicting later one.
    InOrder,
    /// Its order with a conflicting sync point was not reproduced, for this reason.
    Overtaken(Unpinned),
}

/// Why a sync point's order with a conflicting one was not pinned: the rule that makes a
/// difference in its result inconclusive (concurrent) rather than a mismatch. Counted per
/// reason (`pgprism_compare_unpinned_<reason>_total`, and
/// `pgprism_compare_inconclusive_<reason>_total` for those that differed) and named in the
/// report, so a user (and whoever tunes the ordering) sees which rule judged a statement
/// concurrent: the overlap rules are the limit of ordering from outside the primary, the
/// others a bound that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpinned {
    /// A conflicting write of another session completed on the primary while it ran (from
    /// when it was sent to when its answer arrived): either may have taken effect first.
    Overlapped,
    /// A conflicting write of another session was still running on the primary when its
    /// answer arrived.
    InFlight,
    /// It, or a later conflicting sync point that overtook it, waited
    /// `compare.order-wait-ms` and went anyway.
    WaitExpired,
    /// A lock break (`compare.order-lock-wait-ms`, or a pooled shadow connection others
    /// wait for) sent it, or a later conflicting sync point, ahead.
    LockBreak,
    /// A conflicting write ran on the primary only (primary-only routing, calibration).
    PrimaryOnly,
    /// Its session stopped comparing before the shadow completed it.
    Abandoned,
}

impl Unpinned {
    /// Every reason, in the order of their counters.
    pub const ALL: [Unpinned; 6] = [
        Unpinned::Overlapped,
        Unpinned::InFlight,
        Unpinned::WaitExpired,
        Unpinned::LockBreak,
        Unpinned::PrimaryOnly,
        Unpinned::Abandoned,
    ];

    /// The reason's name, in reports and metric names.
    pub fn name(self) -> &'static str {
        match self {
            Unpinned::Overlapped => "overlapped",
            Unpinned::InFlight => "in_flight",
            Unpinned::WaitExpired => "wait_expired",
            Unpinned::LockBreak => "lock_break",
            Unpinned::PrimaryOnly => "primary_only",
            Unpinned::Abandoned => "abandoned",
        }
    }

    /// Records `why` in `slot`: a bound that ran out (or a primary-only write) names the
    /// reason over an overlap, which only says the order was uncertain, while the wait
    /// says it was not even tried; otherwise the first reason stays.
    fn mark(slot: &mut Option<Unpinned>, why: Unpinned) {
        let overlap = |u: Unpinned| matches!(u, Unpinned::Overlapped | Unpinned::InFlight);
        match slot {
            Some(now) if !overlap(*now) || overlap(why) => {}
            _ => *slot = Some(why),
        }
    }
}

/// What a sync point touched when it was sent to the primary, and where the order stood.
pub type Start = (Footprint, Started);

/// Where a sync point stood when it was sent to the primary.
#[derive(Debug, Clone, Copy, Default)]
pub struct Started {
    /// When (ns since the Unix epoch, the clock of the completion numbers): writes
    /// answered from then on overlapped it.
    pub since: u64,
    /// It touches something, and was counted in flight.
    pub counted: bool,
    pub write: bool,
    /// It runs on the primary only.
    pub only: bool,
}

/// The row locks the transaction of a sync point the primary answered holds.
///
/// A write of another session sent before the answer arrived and still in flight is what
/// [`Turn::Hold`] waits for: its answer may have been stamped earlier and not be read yet.
/// Not when it writes rows the transaction holds locks on: it waits on the primary for the
/// transaction's end, which comes after this answer, so its number will be larger. Under
/// `fail-on-differences` that wait is a cycle as well: the client's answer waits for the
/// shadow, so it cannot end its transaction, and the other write waits for its locks,
/// held for the whole `compare.order-hold-ms` on every hot-row transaction.
#[derive(Debug, Clone, Default)]
pub struct Locks {
    /// Its transaction had written when it was sent: it holds row locks on the shadow (see
    /// [`Ledger::held_by_own_locks`]).
    pub shadow: bool,
    /// What the transaction holds row locks on, on the primary, until it ends: what it
    /// wrote before this sync point, and, where the client waits for the shadow's answer
    /// (`fail-on-differences`, or the shadow as the source), what this one wrote, when the
    /// transaction stays open. (A
    /// client that gets its answer ends the transaction in a round trip or two, and then a
    /// write that ran just before this one, its answer unread, is waited for.)
    pub primary: Footprint,
}

impl From<bool> for Locks {
    fn from(shadow: bool) -> Locks {
        Locks {
            shadow,
            primary: Footprint::default(),
        }
    }
}

/// What [`Ledger::acquire`] says of a pending sync point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// It may go to the shadow now.
    Go,
    /// It waits for an earlier conflicting one to complete on the shadow: it is woken
    /// through its shard's inbox.
    Wait,
    /// An earlier-sent conflicting one is still in flight on the primary: it waits for it
    /// as [`Turn::Wait`] does, and at most this much longer (`compare.order-hold-ms`).
    Hold(Duration),
}

/// Now, in ns since the Unix epoch: the clock of the kernel's receive timestamps.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Ledger {
    /// A ledger whose sync points are held at most `hold` for earlier-sent conflicting
    /// ones still in flight on the primary (`compare.order-hold-ms`).
    pub fn new(hold: Duration) -> Ledger {
        let ledger = Ledger::default();
        ledger.book().hold_ns = hold.as_nanos() as u64;
        ledger
    }

    /// Reads are numbered `lead` before their answers (`compare.order-read-lead-us`).
    pub fn with_read_lead(self, lead: Duration) -> Ledger {
        self.book().read_lead_ns = lead.as_nanos() as u64;
        self
    }

    /// A sync point of `session` touching `footprint` is sent to the primary now.
    pub fn start(&self, session: u64, footprint: &Footprint, only: bool) -> Started {
        let mut book = self.book();
        let started = Started {
            since: now_ns(),
            counted: !footprint.is_empty(),
            write: footprint.write,
            only,
        };
        if started.counted {
            book.each_recent(footprint, |r, rows| r.start(session, rows, started));
        }
        started
    }

    /// The primary answered a sync point of `session` sent at `started`: it is no longer in
    /// flight, a write is remembered on its relations, and the answer is whether (and how)
    /// it overlapped a conflicting write of another session.
    fn finish(
        book: &mut Book,
        session: u64,
        footprint: &Footprint,
        started: &Start,
        c: u64,
    ) -> Option<Unpinned> {
        let (counted, started) = (&started.0, started.1);
        if started.counted {
            book.each_recent(counted, |r, rows| r.end(session, rows, started));
        }
        let mut overlapped = None;
        if !footprint.is_empty() {
            let (since, write) = (started.since, footprint.write);
            // A write completed while it ran names the reason over one still in flight.
            let mut note = |o: Option<Unpinned>| {
                if o.is_some() && overlapped != Some(Unpinned::Overlapped) {
                    overlapped = o;
                }
            };
            note(book.recent_wild.overlaps(session, since, write, &[]));
            if footprint.wild {
                for r in book.recent.values() {
                    note(r.overlaps(session, since, write, &[]));
                }
            } else if write {
                // One look-up per relation for both questions: whether it overlapped
                // another session's write there, then (its own write, which that question
                // leaves out) remembered. Each relation's history is its own, so asking
                // and remembering relation by relation finds what asking all first does.
                for &lane in footprint.lanes.iter() {
                    let rows = Rows::of(footprint, Some(lane));
                    let recent = match book.recent.entry(lane) {
                        std::collections::hash_map::Entry::Occupied(o) => {
                            let recent = o.into_mut();
                            note(recent.overlaps(session, since, write, &rows));
                            recent
                        }
                        // Nothing known of it: nothing overlapped there.
                        std::collections::hash_map::Entry::Vacant(v) => v.insert(Recent::default()),
                    };
                    recent.wrote(c, session, &rows);
                }
            } else {
                for lane in footprint.lanes.iter() {
                    if let Some(r) = book.recent.get(lane) {
                        note(r.overlaps(session, since, write, footprint.rows(*lane)));
                    }
                }
            }
        }
        if footprint.write && footprint.wild {
            book.each_recent(footprint, |r, rows| r.wrote(c, session, rows));
        }
        if book.recent.len() > RECENT_MAX {
            book.recent.retain(|_, r| !r.idle());
        }
        overlapped
    }

    /// The session ended before the primary answered sync points sent at `started`.
    pub fn unstart(&self, session: u64, started: &[Start], this_shard: usize) {
        let mut book = self.book();
        let mut freed = Footprint::default();
        for (footprint, s) in started {
            if s.counted {
                book.each_recent(footprint, |r, rows| r.end(session, rows, *s));
                freed.join(footprint);
            }
        }
        // What was held for them is checked again.
        if !freed.is_empty() {
            book.release(&[&freed], None, this_shard);
        }
    }

    /// The primary answered sync point `seq` of `session`, whose sync points sent and not
    /// answered yet are `in_flight` (by sync point number, oldest first): takes it off the
    /// list and says whether it was there (counted in flight). Earlier ones still listed
    /// were answered without being taken off (an answer that found no sync point of the
    /// session's to number): they are taken back from the book too, or they would stay in
    /// flight for good, never ended by an answer nor by the session's end, and hold every
    /// conflicting sync point of every other session for `compare.order-hold-ms`.
    pub fn answered_in_flight(
        &self,
        session: u64,
        in_flight: &mut VecDeque<(u64, Start)>,
        seq: u64,
        this_shard: usize,
    ) -> bool {
        let mut stale = Vec::new();
        while in_flight.front().is_some_and(|(s, _)| *s < seq) {
            stale.extend(in_flight.pop_front().map(|(_, start)| start));
        }
        if !stale.is_empty() {
            self.unstart(session, &stale, this_shard);
        }
        let counted = in_flight.front().is_some_and(|(s, _)| *s == seq);
        if counted {
            in_flight.pop_front();
        }
        counted
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A shard that panicked while holding the book left it consistent enough: every
        // method leaves it valid between map operations, and a stale entry costs one bounded
        // wait.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A number for a new compare session, unique in the process.
    pub fn session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }

    /// The primary completed a sync point of `session` that goes to the shadow: its number
    /// in the completion order, the time its answer reached pgprism's socket (`stamp_ns`,
    /// the kernel's receive timestamp; 0: none, pgprism's clock now stands for it), made
    /// unique. It is pending until [`done`](Self::done). `locks`: what its transaction holds
    /// locks on (see [`Locks`]).
    pub fn complete(
        &self,
        session: u64,
        footprint: Footprint,
        (started, stamp_ns): (&Start, u64),
        locks: impl Into<Locks>,
        this_shard: usize,
    ) -> u64 {
        let locks = locks.into();
        let mut book = self.book();
        let stamp = if stamp_ns == 0 { now_ns() } else { stamp_ns };
        // A write takes effect when it commits, just before its answer is sent; a read
        // when it takes its snapshot, as it starts running: numbered by its answer alone,
        // a read comes after writes answered while it ran that it had not seen. So a read
        // is numbered `read_lead_ns` before its answer, never before it was sent, nor
        // before its own session's pending sync points: a pipelining client's earlier
        // sync point may share its answer's stamp, and a read numbered before it (which
        // goes to the shadow after it, in its session's order) would let another session's
        // write numbered between them wait for the read while the earlier one waits for
        // that write, until `order-wait-ms`. Whether it overlapped a write is still judged
        // from when it was sent ([`Ledger::finish`]), so a read placed wrong is
        // inconclusive, never a mismatch.
        let mut c = if footprint.write {
            stamp
        } else {
            let after_own = book.newest.get(&session).map_or(0, |&n| n + 1);
            stamp
                .saturating_sub(book.read_lead_ns)
                .max(started.1.since.min(stamp))
                .max(after_own)
        }
        .max(1);
        while book.entries.contains_key(&c) {
            c += 1;
        }
        // A write of the session of a read being placed, numbered before the read's place:
        // it may run on the shadow before the read's re-read, which the primary's read
        // never saw: that placement is spoilt (each of the session's).
        if footprint.write {
            let book = &mut *book;
            for p in book.placing.get(&session).into_iter().flatten() {
                if c < *p
                    && let Some(e) = book.entries.get_mut(p)
                {
                    e.spoiled = true;
                }
            }
        }
        let newest = book.newest.entry(session).or_insert(c);
        *newest = (*newest).max(c);
        let overlapped = Ledger::finish(&mut book, session, &footprint, started, c);
        let key = (session, footprint.write);
        if footprint.wild {
            book.wild.insert(c, key, None);
        }
        for &lane in footprint.lanes.iter() {
            let rows = Some(footprint.rows(lane));
            book.lanes.entry(lane).or_default().insert(c, key, rows);
        }
        book.all.insert(c, key, None);
        book.entries.insert(
            c,
            Entry {
                session,
                footprint,
                holds_locks: locks.shadow,
                locked: locks.primary,
                cleared: None,
                overtaken: overlapped,
                origin: session,
                spoiled: false,
                since: started.1.since,
                answer: stamp,
            },
        );
        // It is no longer in flight: what was held for it may go (or now waits for it).
        if !book.waiters.is_empty() {
            let pending = book.entries[&c].footprint.clone();
            book.release(&[&started.0, &pending], None, this_shard);
        }
        if book.lanes.len() > book.lanes_prune_at {
            book.lanes.retain(|_, l| !l.is_empty());
            // Lanes still in use stay: scan again only once as many more have come, not
            // on every completion while more than `RECENT_MAX` relations are pending.
            book.lanes_prune_at = RECENT_MAX.max(2 * book.lanes.len());
        }
        c
    }

    /// The primary completed a write of `session` that the shadow never runs (routed to the
    /// primary only): the conflicting sync points still pending on the shadow may see its
    /// effect there, out of order.
    pub fn primary_only(
        &self,
        session: u64,
        footprint: &Footprint,
        (started, stamp_ns): (&Start, u64),
        this_shard: usize,
    ) {
        let mut book = self.book();
        Ledger::finish_unordered(
            &mut book,
            session,
            footprint,
            (started, stamp_ns),
            this_shard,
        );
        if !footprint.write || footprint.is_empty() {
            return;
        }
        // Its own session's pending sync points too: they are on their way to the shadow
        // and this write, which the shadow never runs, is already there.
        Ledger::overtake(&mut book, footprint);
    }

    /// The primary answered a sync point that went to the shadow unordered (a COPY, or one a
    /// Flush sent early): it is no longer in flight, and a write is remembered.
    pub fn answered(
        &self,
        session: u64,
        footprint: &Footprint,
        (started, stamp_ns): (&Start, u64),
        this_shard: usize,
    ) {
        let mut book = self.book();
        Ledger::finish_unordered(
            &mut book,
            session,
            footprint,
            (started, stamp_ns),
            this_shard,
        );
    }

    /// A sync point the primary answered outside the completion order (see
    /// [`answered`](Self::answered) and [`primary_only`](Self::primary_only)): finished at its
    /// receive stamp (now when it has none), and no longer in flight.
    fn finish_unordered(
        book: &mut Book,
        session: u64,
        footprint: &Footprint,
        (started, stamp_ns): (&Start, u64),
        this_shard: usize,
    ) {
        let c = if stamp_ns == 0 { now_ns() } else { stamp_ns };
        Ledger::finish(book, session, footprint, started, c);
        if started.1.counted {
            book.release(&[&started.0], None, this_shard);
        }
    }

    fn overtake(book: &mut Book, footprint: &Footprint) {
        // No session is 0: every pending conflicting sync point.
        let blockers = book.conflicting(0, footprint, u64::MAX);
        for c in blockers {
            if let Some(e) = book.entries.get_mut(&c) {
                Unpinned::mark(&mut e.overtaken, Unpinned::PrimaryOnly);
            }
        }
    }

    /// Whether sync point `c` (on `shard`) may go to the shadow now. When not, it is woken
    /// through the shard's inbox once it may (or, held, asks again when the hold ends).
    pub fn acquire(&self, c: u64, shard: usize) -> Turn {
        let mut book = self.book();
        // The entry looked up once for both questions.
        let (blocker, turn) = match book.entries.get(&c) {
            // Gone (its session ended): nothing to wait for.
            None => (None, Turn::Go),
            Some(entry) => match book.first_conflict(entry.session, &entry.footprint, c) {
                Some(b) => (Some(b), Turn::Wait),
                None => match book.held_entry(c, entry, now_ns) {
                    Some(left) => (None, Turn::Hold(left)),
                    None => (None, Turn::Go),
                },
            },
        };
        if turn == Turn::Go {
            // (The held ones are waiters too: none waits, none to take off.)
            if !book.waiters.is_empty() {
                book.unwait(c);
            }
            book.clear(c);
        } else {
            book.wait(c, Waiter { shard, blocker });
        }
        turn
    }

    /// Sync point `c` waited as long as it may (`why`: its wait ran out, or a lock break):
    /// it goes now, and it and every earlier conflicting one still pending are overtaken.
    pub fn force(&self, c: u64, why: Unpinned) {
        let mut book = self.book();
        book.unwait(c);
        let Some((session, footprint)) = book
            .entries
            .get(&c)
            .map(|e| (e.session, e.footprint.clone()))
        else {
            return;
        };
        let blockers = book.conflicting(session, &footprint, c);
        tracing::debug!(
            c,
            session,
            lanes = footprint.lanes.len(),
            write = footprint.write,
            blockers = ?blockers
                .iter()
                .filter_map(|b| book.entries.get(b).map(|e| (*b, e.session, e.footprint.lanes.len(), e.footprint.write)))
                .collect::<Vec<_>>(),
            "compare ordering: a wait ran out"
        );
        for b in blockers.into_iter().chain([c]) {
            if let Some(e) = book.entries.get_mut(&b) {
                Unpinned::mark(&mut e.overtaken, why);
            }
        }
        book.clear(c);
    }

    /// Whether pending sync point `c` most likely waits for statements that wait on the
    /// shadow for its own transaction's locks: it holds locks there, and every earlier
    /// conflicting sync point it waits for is stuck: cleared to the shadow at least `grace`
    /// ago and not completed, or itself waiting in the ledger only for stuck ones (a chain:
    /// `c` waits for `b`, which waits for `d`, which the shadow holds on `c`'s locks).
    /// (Sound only as a reason to stop waiting: a blocker that is merely slow looks the
    /// same, and then the order is not reproduced, which [`force`](Self::force) records.)
    pub fn held_by_own_locks(&self, c: u64, grace: Duration) -> bool {
        let book = self.book();
        let Some(entry) = book.entries.get(&c) else {
            return false;
        };
        if !entry.holds_locks {
            return false;
        }
        let mut seen = Vec::new();
        book.all_stuck(
            entry.session,
            &entry.footprint,
            c,
            grace,
            CHAIN_DEPTH_MAX,
            &mut seen,
        )
    }

    /// The shadow completed read `c`, and its answer differs from the primary's: when the
    /// read overlapped a conflicting write of another session on the primary (so the
    /// difference may be its place, not the shadow), it stays pending, holding the writes
    /// numbered after it, for [`place_after`](Self::place_after); the reason it was
    /// unpinned is returned. Otherwise None, and the caller ends it with
    /// [`done`](Self::done) as any other.
    pub fn keep(&self, c: u64) -> Option<Unpinned> {
        let mut book = self.book();
        let entry = book.entries.get(&c)?;
        if entry.footprint.write || entry.footprint.wild {
            return None;
        }
        let why = entry
            .overtaken
            .filter(|u| matches!(u, Unpinned::Overlapped | Unpinned::InFlight))?;
        // A later write of its rows by its own session already cleared to the shadow (it
        // did not wait for it) may run there before any re-read.
        let origin = entry.origin;
        if book.entries.iter().any(|(k, e)| {
            *k > c
                && e.origin == origin
                && e.cleared.is_some()
                && e.footprint.write
                && entry.footprint.conflicts(&e.footprint)
        }) {
            return None;
        }
        // Nowhere to place it: not kept (it would hold the writes behind it for nothing).
        Ledger::next_place(&book, c)?;
        // Booked under a session of its own from now on, at the same number: its own
        // session's later writes of its rows (numbered after it: sent after its answer
        // arrived) then wait for it too, so no re-read sees them.
        self.rebook(&mut book, c, c)?;
        book.placing.entry(origin).or_default().push(c);
        Some(why)
    }

    /// Books pending read `c` again at `n` (not taken), under a new session.
    fn rebook(&self, book: &mut Book, c: u64, n: u64) -> Option<()> {
        let mut moved = book.remove(c)?;
        moved.session = self.sessions.fetch_add(1, Ordering::Relaxed);
        moved.cleared = None;
        let key = (moved.session, false);
        for &lane in moved.footprint.lanes.iter() {
            let rows = Some(moved.footprint.rows(lane));
            book.lanes.entry(lane).or_default().insert(n, key, rows);
        }
        book.all.insert(n, key, None);
        book.newest.insert(moved.session, n);
        book.entries.insert(n, moved);
        Some(())
    }

    /// Moves kept read `c` (see [`keep`](Self::keep)) to just after the next write that may
    /// have preceded it on the primary: the earliest pending conflicting write of another
    /// session numbered after it that was sent to the primary before the read's answer
    /// arrived there (their windows met), and before any later sync point of the read's own
    /// session. The read is booked under a session of its own, so that every conflicting
    /// sync point numbered after its new place waits for it, its own session's included;
    /// the writes it held until now may go. Returns its new number, to be waited for with
    /// [`Port::wait`] and ended with [`done`](Self::done); None when no such write is
    /// pending, or no place after it is sound (it stays at `c`, never placed): the place
    /// would come after a later conflicting write of the read's own session (the numbers
    /// just after the write were taken), or after a conflicting write of another session
    /// sent to the primary after the read's answer arrived (numbered before the write it
    /// follows: answered sooner), which the primary's read cannot have seen.
    ///
    /// Sound because the read then runs on the shadow where the ordering put it: after
    /// every conflicting sync point numbered before its new place and before every one
    /// numbered after it, a state the shadow really passes through, in the primary's
    /// completion order.
    pub fn place_after(&self, c: u64, this_shard: usize) -> Option<u64> {
        let mut book = self.book();
        let n = Ledger::next_place(&book, c)?;
        let entry = book.entries.get(&c)?;
        let (origin, footprint) = (entry.origin, entry.footprint.clone());
        self.rebook(&mut book, c, n)?;
        book.placing.entry(origin).or_default().push(n);
        // What waited for it at `c` is looked at again (the write it now follows may go).
        book.release(&[&footprint], Some(&[c]), this_shard);
        Some(n)
    }

    /// Where [`place_after`](Self::place_after) would move pending read `c`: None where no
    /// place is (see there).
    fn next_place(book: &Book, c: u64) -> Option<u64> {
        let entry = book.entries.get(&c)?;
        if entry.footprint.write || entry.footprint.wild {
            return None;
        }
        let (origin, answer) = (entry.origin, entry.answer);
        // A placement is rare (a read that differed): a walk of what is pending.
        let own_next = book
            .entries
            .iter()
            .filter(|(k, e)| {
                **k > c
                    && e.origin == origin
                    && e.footprint.write
                    && entry.footprint.conflicts(&e.footprint)
            })
            .map(|(&k, _)| k)
            .min()
            .unwrap_or(u64::MAX);
        let next = book
            .entries
            .iter()
            .filter(|(k, e)| {
                **k > c
                    && **k < own_next
                    && e.footprint.write
                    && e.origin != origin
                    && e.since < answer
                    && entry.footprint.conflicts(&e.footprint)
            })
            .map(|(&k, _)| k)
            .min()?;
        let mut n = next + 1;
        while book.entries.contains_key(&n) {
            n += 1;
        }
        if n >= own_next
            || book.entries.iter().any(|(k, e)| {
                *k > c
                    && *k < n
                    && e.footprint.write
                    && e.origin != origin
                    && e.since >= answer
                    && entry.footprint.conflicts(&e.footprint)
            })
        {
            return None;
        }
        Some(n)
    }

    /// Whether read `c`, being placed, may have been preceded on the shadow by a later
    /// write of its own session (see [`Ledger::complete`]): then no re-read places it.
    pub fn spoiled(&self, c: u64) -> bool {
        self.book().entries.get(&c).is_none_or(|e| e.spoiled)
    }

    /// The shadow completed sync point `c`: it is no longer pending, and what waited for it
    /// may go. `this_shard`'s releases go to its inbox without a wake-up (the caller drains
    /// it).
    pub fn done(&self, c: u64, this_shard: usize) -> Pinned {
        let mut book = self.book();
        let Some(entry) = book.remove(c) else {
            return Pinned::Overtaken(Unpinned::Abandoned);
        };
        book.release(&[&entry.footprint], Some(&[c]), this_shard);
        // Whatever the session: the shadow may already see a primary-only write of its own.
        let write = entry.footprint.write;
        let mut only = book.recent_wild.only_in_flight(write, &[]);
        for lane in entry.footprint.lanes.iter() {
            only |= book
                .recent
                .get(lane)
                .is_some_and(|r| r.only_in_flight(write, entry.footprint.rows(*lane)));
        }
        let mut why = entry.overtaken;
        if only {
            Unpinned::mark(&mut why, Unpinned::PrimaryOnly);
        }
        why.map_or(Pinned::InOrder, Pinned::Overtaken)
    }

    /// The session ended (or stopped comparing): its pending sync points will never complete
    /// on the shadow.
    pub fn abandon(&self, cs: &[u64], this_shard: usize) {
        if cs.is_empty() {
            return;
        }
        let mut book = self.book();
        let mut freed = Footprint::default();
        for &c in cs {
            book.unwait(c);
            if let Some(entry) = book.remove(c) {
                freed.join(&entry.footprint);
            }
        }
        // What waited for any of them is checked again.
        book.release(&[&freed], Some(cs), this_shard);
    }

    /// Registers shard `shard`'s inbox; returns it.
    fn inbox(&self, shard: usize) -> std::io::Result<Arc<Inbox>> {
        let mut book = self.book();
        if book.inboxes.len() <= shard {
            book.inboxes.resize(shard + 1, None);
        }
        if let Some(inbox) = &book.inboxes[shard] {
            return Ok(inbox.clone());
        }
        let inbox = Arc::new(Inbox {
            released: Mutex::new(Vec::new()),
            any: AtomicBool::new(false),
            notifier: Notifier::new()?,
        });
        book.inboxes[shard] = Some(inbox.clone());
        Ok(inbox)
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.book().entries.len()
    }
}

/// How far [`Ledger::held_by_own_locks`] follows a chain of waits in the ledger, and how many
/// sync points it looks at in all (it runs under the book's lock).
const CHAIN_DEPTH_MAX: u32 = 4;
const CHAIN_SEEN_MAX: usize = 64;

impl Book {
    /// Whether pending sync point `c` cannot go on by itself: it has run on the shadow for
    /// `grace` without an answer, or waits in the ledger only for such ones (followed
    /// `depth` more links; `seen` holds what was judged already).
    fn stuck(&self, c: u64, grace: Duration, depth: u32, seen: &mut Vec<(u64, bool)>) -> bool {
        if let Some(&(_, stuck)) = seen.iter().find(|(s, _)| *s == c) {
            return stuck;
        }
        let Some(entry) = self.entries.get(&c) else {
            return false;
        };
        let stuck = match entry.cleared {
            Some(t) => t.elapsed() >= grace,
            None if depth == 0 || seen.len() >= CHAIN_SEEN_MAX => false,
            // Earlier numbers only: the walk ends.
            None => self.all_stuck(entry.session, &entry.footprint, c, grace, depth - 1, seen),
        };
        seen.push((c, stuck));
        stuck
    }

    /// Whether `footprint` (of `session`, pending as `c`) waits for some earlier
    /// conflicting sync point, and every one it waits for is [`stuck`](Self::stuck). Stops
    /// at the first that is not: this runs for every waiting sync point once per
    /// `compare.order-lock-wait-ms`, and collecting every conflicting one first was 12% of
    /// pgprism's CPU samples under pgbench `-N` with the shadow behind (perf record).
    fn all_stuck(
        &self,
        session: u64,
        footprint: &Footprint,
        c: u64,
        grace: Duration,
        depth: u32,
        seen: &mut Vec<(u64, bool)>,
    ) -> bool {
        let mut any = false;
        let all = self.each_conflict(session, footprint, c, |b| {
            if !self.stuck(b, grace, depth, seen) {
                return ControlFlow::Break(());
            }
            any = true;
            ControlFlow::Continue(())
        });
        all.is_continue() && any
    }

    /// Applies `f` to the recent history of every relation `footprint` touches, with the
    /// rows it touches there.
    fn each_recent(&mut self, footprint: &Footprint, mut f: impl FnMut(&mut Recent, &Rows)) {
        if footprint.wild {
            f(&mut self.recent_wild, &Rows::of(footprint, None));
        }
        for lane in footprint.lanes.iter() {
            let rows = Rows::of(footprint, Some(*lane));
            f(self.recent.entry(*lane).or_default(), &rows);
        }
    }

    /// Sync point `c` goes to the shadow now.
    fn clear(&mut self, c: u64) {
        if let Some(e) = self.entries.get_mut(&c) {
            e.cleared.get_or_insert_with(Instant::now);
        }
    }

    fn remove(&mut self, c: u64) -> Option<Entry> {
        let entry = self.entries.remove(&c)?;
        if entry.origin != entry.session
            && let std::collections::hash_map::Entry::Occupied(mut p) =
                self.placing.entry(entry.origin)
        {
            p.get_mut().retain(|&n| n != c);
            if p.get().is_empty() {
                p.remove();
            }
        }
        if let std::collections::hash_map::Entry::Occupied(newest) =
            self.newest.entry(entry.session)
            && *newest.get() == c
        {
            // Its session's newest: none of its sync points is pending any more (the
            // shadow runs a session's sync points in order), or the earlier ones left
            // behind are numbered below it anyway.
            newest.remove();
        }
        let write = entry.footprint.write;
        self.all.remove(c, write, None);
        if entry.footprint.wild {
            self.wild.remove(c, write, None);
        }
        // An emptied lane stays for the relation's next sync point (most come back at
        // once: a map insert, a removal and a tree's allocation per sync point otherwise);
        // empty ones go when there are more than `RECENT_MAX` (see `Ledger::complete`).
        for lane in entry.footprint.lanes.iter() {
            if let Some(l) = self.lanes.get_mut(lane) {
                l.remove(c, write, Some(entry.footprint.rows(*lane)));
            }
        }
        Some(entry)
    }

    /// How much longer pending sync point `c` (`entry`) is held (see [`Turn::Hold`]): numbered by
    /// when its answer reached pgprism's socket, it could still be overtaken by an answer
    /// that reached another socket earlier and is not read yet (a shard descheduled for
    /// milliseconds, a busy turn). Those are in flight, sent before `c`'s answer arrived:
    /// it waits for the conflicting ones, at most `compare.order-hold-ms` after its answer.
    /// (`now`: the clock, read only when something holds it: most sync points are held by
    /// nothing, and a clock read is a few hundred instructions.)
    fn held_entry(&self, c: u64, entry: &Entry, now: impl FnOnce() -> u64) -> Option<Duration> {
        let end = c.saturating_add(self.hold_ns);
        if end <= c {
            return None;
        }
        let footprint = &entry.footprint;
        // The rows of `lane` its transaction holds locks on (none known for the whole
        // relation: a write there may not meet them).
        let locked = |lane: u64| {
            let rows = entry.locked.rows(lane);
            (!rows.is_empty()).then_some(rows)
        };
        let holds = |r: &Recent, rows: &[Probe], lane: Option<u64>| {
            r.holds((entry.session, c), footprint, rows, lane.and_then(locked))
        };
        let mut held = holds(&self.recent_wild, &[], None);
        if footprint.wild {
            held = held
                || self
                    .recent
                    .iter()
                    .any(|(lane, r)| holds(r, &[], Some(*lane)));
        } else {
            held = held
                || footprint.lanes.iter().any(|lane| {
                    self.recent
                        .get(lane)
                        .is_some_and(|r| holds(r, footprint.rows(*lane), Some(*lane)))
                });
        }
        if !held {
            return None;
        }
        let now = now();
        (now < end).then(|| Duration::from_nanos(end - now))
    }

    /// The earliest conflicting sync point pending sync point `c` must still wait for.
    fn blocker(&self, c: u64) -> Option<u64> {
        let entry = self.entries.get(&c)?;
        self.first_conflict(entry.session, &entry.footprint, c)
    }

    /// `c` waits (again), as `waiter` says.
    fn wait(&mut self, c: u64, waiter: Waiter) {
        match waiter.blocker {
            Some(b) => {
                self.blocked_on.entry(b).or_default().push(c);
                self.holding.remove(&c);
            }
            None => {
                self.holding.insert(c);
            }
        }
        self.waiters.insert(c, waiter);
    }

    /// `c` waits no more.
    fn unwait(&mut self, c: u64) -> Option<Waiter> {
        self.holding.remove(&c);
        self.waiters.remove(&c)
    }

    /// The pending sync points `footprint` may conflict with, by relation (None: the
    /// pending ones that touch every relation, or every pending one for a wild footprint),
    /// only the reads or the writes of each as it waits for them: `f(lane, pending, write)`
    /// for each, until it breaks. (Loops rather than an iterator: the chained and
    /// flattened one's adapters were about 1,000 instructions per pgbench `-N` transaction,
    /// callgrind.)
    fn each_lane(
        &self,
        footprint: &Footprint,
        mut f: impl FnMut(Option<u64>, &Side, bool) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        // Of each relation, the side of the kind it waits for (see
        // [`Footprint::waits_for`]): the writes first, where a write finds what it waits
        // for at once (two writes conflict whatever their rows), which bounds the walk of
        // the reads (see [`Book::first_conflict`]).
        let mut sides = |lane: Option<u64>, pending: &Lane| {
            for (side, write) in [(&pending.writes, true), (&pending.reads, false)] {
                if !side.all.is_empty() && footprint.waits_for(write) {
                    f(lane, side, write)?;
                }
            }
            ControlFlow::Continue(())
        };
        if footprint.wild {
            return sides(None, &self.all);
        }
        for l in footprint.lanes.iter() {
            if let Some(lane) = self.lanes.get(l) {
                sides(Some(*l), lane)?;
            }
        }
        sides(None, &self.wild)
    }

    fn rows_for(footprint: &Footprint, lane: Option<u64>, write: bool) -> Option<&[Probe]> {
        lane.filter(|_| !(footprint.write && write))
            .map(|l| footprint.rows(l))
    }

    /// Whether pending sync point `c` (of session `s`, writing or not: `write`) on
    /// relation `lane` is one `footprint`, of another session, waits for (the caller
    /// looks only at the kind it waits for).
    fn waits_on(
        &self,
        footprint: &Footprint,
        session: u64,
        (lane, write): (Option<u64>, bool),
        (c, s): (u64, u64),
    ) -> bool {
        s != session
            && match lane {
                None => true,
                // Two writes conflict whatever the rows: no need to look at them.
                Some(lane) => {
                    (footprint.write && write)
                        || self.entries.get(&c).is_none_or(|e| {
                            footprint.conflicts_in(lane, e.footprint.write, e.footprint.rows(lane))
                        })
                }
            }
    }

    /// The earliest pending sync point before `before`, of another session, that conflicts
    /// with `footprint`.
    fn first_conflict(&self, session: u64, footprint: &Footprint, before: u64) -> Option<u64> {
        // Each walk stops at the earliest one found so far: what comes after it cannot be
        // the first.
        let mut first = None;
        let _ = self.each_lane(footprint, |lane, pending, write| {
            let rows = Book::rows_for(footprint, lane, write);
            if let Some(c) = pending.first(rows, first.unwrap_or(before), |c, s| {
                self.waits_on(footprint, session, (lane, write), (c, s))
            }) {
                first = Some(c);
            }
            ControlFlow::Continue(())
        });
        first
    }

    /// Every pending sync point before `before`, of another session, that conflicts with
    /// `footprint`.
    fn conflicting(&self, session: u64, footprint: &Footprint, before: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        let _ = self.each_conflict(session, footprint, before, |c| {
            out.push(c);
            ControlFlow::Continue(())
        });
        out.sort_unstable();
        out.dedup();
        out
    }

    /// [`conflicting`](Self::conflicting) as it is found, until `f` breaks: by relation,
    /// in no set order, one that touches several relations (or rows) once for each.
    fn each_conflict(
        &self,
        session: u64,
        footprint: &Footprint,
        before: u64,
        mut f: impl FnMut(u64) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        self.each_lane(footprint, |lane, pending, write| {
            let rows = Book::rows_for(footprint, lane, write);
            pending.each(rows, before, |c, s| {
                if self.waits_on(footprint, session, (lane, write), (c, s)) {
                    f(c)
                } else {
                    ControlFlow::Continue(())
                }
            })
        })
    }

    /// Something touching `freed` left the book (`removed`: these sync points) or stopped
    /// being in flight on the primary (None: only held waiters may go for it): the waiters it
    /// may have held are sent to their shard's inbox to ask again ([`Ledger::acquire`]
    /// decides, and clears). A waiter that is not held is looked at only when the sync point
    /// it was found waiting for is among `removed`.
    fn release(&mut self, freed: &[&Footprint], removed: Option<&[u64]>, this_shard: usize) {
        if self.waiters.is_empty() {
            // Waiters that went without a release (their wait ran out, a lock break, their
            // session ended) may still be listed under what left: drop those lists, or they
            // would stay for the process's life.
            if !self.blocked_on.is_empty() {
                for r in removed.unwrap_or(&[]) {
                    self.blocked_on.remove(r);
                }
            }
            return;
        }
        let mut go: Vec<u64> = Vec::new();
        for &c in &self.holding {
            let Some(entry) = self.entries.get(&c) else {
                go.push(c);
                continue;
            };
            // As a write: whatever it touched may have held this one.
            if !freed.iter().any(|f| entry.footprint.conflicts_as(f, true))
                && !entry.footprint.is_empty()
            {
                continue;
            }
            if self
                .first_conflict(entry.session, &entry.footprint, c)
                .is_none()
            {
                go.push(c);
            }
        }
        let mut moved: Vec<(u64, u64)> = Vec::new();
        for &r in removed.unwrap_or(&[]) {
            let Some(blocked) = self.blocked_on.remove(&r) else {
                continue;
            };
            for c in blocked {
                if self.waiters.get(&c).is_none_or(|w| w.blocker != Some(r)) {
                    continue; // stale: it went, or waits for another one now
                }
                match self.blocker(c) {
                    None => go.push(c),
                    Some(b) => moved.push((c, b)),
                }
            }
        }
        for (c, b) in moved {
            if let Some(w) = self.waiters.get_mut(&c) {
                w.blocker = Some(b);
                self.blocked_on.entry(b).or_default().push(c);
            }
        }
        for c in go {
            let Some(waiter) = self.unwait(c) else {
                continue;
            };
            let Some(Some(inbox)) = self.inboxes.get(waiter.shard) else {
                continue;
            };
            let mut released = inbox.released.lock().unwrap_or_else(|e| e.into_inner());
            let first = released.is_empty();
            released.push(c);
            inbox.any.store(true, Ordering::Release);
            drop(released);
            if first && waiter.shard != this_shard {
                inbox.notifier.notify();
            }
        }
    }
}

/// One shard's side of the ledger: the wakers of its sessions' writers waiting on it.
pub struct Port {
    pub ledger: Arc<Ledger>,
    shard: usize,
    inbox: Option<Arc<Inbox>>,
    waiters: RefCell<IdMap<Waker>>,
    released: RefCell<IdSet>,
    listening: Cell<bool>,
}

impl Port {
    pub fn new(ledger: Arc<Ledger>, shard: usize) -> Rc<Port> {
        let inbox = match ledger.inbox(shard) {
            Ok(inbox) => Some(inbox),
            Err(err) => {
                // Without an eventfd, releases from other shards are picked up when this
                // shard's own sessions complete something, or at the bounded wait's end.
                tracing::warn!(shard, error = %err, "compare ordering: no eventfd for this shard");
                None
            }
        };
        Rc::new(Port {
            ledger,
            shard,
            inbox,
            waiters: RefCell::new(IdMap::default()),
            released: RefCell::new(IdSet::default()),
            listening: Cell::new(false),
        })
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Moves what the inbox holds to the released set and wakes those writers.
    pub fn drain(&self) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        if !inbox.any.load(Ordering::Acquire) {
            return;
        }
        inbox.any.store(false, Ordering::Release);
        let taken = std::mem::take(&mut *inbox.released.lock().unwrap_or_else(|e| e.into_inner()));
        if taken.is_empty() {
            return;
        }
        let mut waiters = self.waiters.borrow_mut();
        let mut released = self.released.borrow_mut();
        for c in taken {
            released.insert(c);
            if let Some(w) = waiters.remove(&c) {
                w.wake();
            }
        }
    }

    /// Waits until sync point `c` may go to the shadow (the caller bounds the wait).
    pub async fn wait(self: &Rc<Self>, c: u64) {
        let mut again = false;
        loop {
            let hold = match self.ledger.acquire(c, self.shard) {
                Turn::Go => {
                    if again {
                        // A release sent before a hold ran out may still be on its way.
                        self.drain();
                        self.released.borrow_mut().remove(&c);
                    }
                    return;
                }
                Turn::Wait => None,
                Turn::Hold(left) => Some(left),
            };
            self.listen();
            let released = futures_lite::future::poll_fn(|cx| {
                self.drain();
                if self.released.borrow_mut().remove(&c) {
                    return Poll::Ready(());
                }
                self.waiters.borrow_mut().insert(c, cx.waker().clone());
                Poll::Pending
            });
            again = true;
            match hold {
                None => released.await,
                Some(left) => {
                    // Released (its blockers or what held it are gone) or the hold ran
                    // out: asked again either way.
                    let _ = crate::exec::within(left, released).await;
                    self.waiters.borrow_mut().remove(&c);
                }
            }
        }
    }

    /// The wait for `c` ended without a release (its bound, or the session ended).
    pub fn give_up(&self, c: u64) {
        self.waiters.borrow_mut().remove(&c);
        self.released.borrow_mut().remove(&c);
    }

    /// Starts the shard's listener for releases from other threads, once.
    fn listen(self: &Rc<Self>) {
        if self.listening.replace(true) {
            return;
        }
        let Some(inbox) = self.inbox.clone() else {
            return;
        };
        let port = Rc::downgrade(self);
        crate::exec::spawn(async move {
            while inbox.notifier.notified().await.is_ok() {
                let Some(port) = port.upgrade() else {
                    break;
                };
                port.drain();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_write_keeps_only_its_relations_rows_of_a_large_footprint() {
        use crate::compare::footprint::{Probe, Value};
        let probe = |lane: u64, v: i64| Probe {
            lane,
            pairs: std::sync::Arc::from(vec![(1u64, Value::Int(v))]),
        };
        let probes: std::sync::Arc<[Probe]> =
            (0..40).map(|i| probe(1 + i / 20, i as i64)).collect();
        // One relation's rows among many: copied, the footprint's probes let go.
        let one = Rows {
            probes: probes.clone(),
            span: 20..22,
        }
        .kept();
        assert_eq!(one.probes.len(), 2);
        assert_eq!(one.iter().map(|p| p.lane).collect::<Vec<_>>(), [2, 2]);
        // Most of the probes: still shared.
        let most = Rows {
            probes: probes.clone(),
            span: 0..30,
        }
        .kept();
        assert!(std::sync::Arc::ptr_eq(&most.probes, &probes));
        // A whole relation (empty span) of a large footprint: empty, as before.
        let whole = Rows {
            probes: probes.clone(),
            span: 0..0,
        }
        .kept();
        assert!(whole.is_empty() && whole.probes.is_empty());
    }

    /// Sent to the primary and answered at once.
    fn now(ledger: &Ledger, session: u64, footprint: Footprint) -> u64 {
        let started = ledger.start(session, &footprint, false);
        ledger.complete(
            session,
            footprint.clone(),
            (&(footprint, started), 0),
            false,
            0,
        )
    }

    #[test]
    fn a_read_that_overlapped_a_write_of_another_session_is_not_pinned() {
        let ledger = Ledger::default();
        let read = fp(&[7], false);
        let started = ledger.start(1, &read, false);
        let write = now(&ledger, 2, fp(&[7], true));
        let c = ledger.complete(1, read.clone(), (&(read.clone(), started), 0), false, 0);
        assert_eq!(ledger.done(write, 0), Pinned::InOrder);
        assert_eq!(ledger.done(c, 0), Pinned::Overtaken(Unpinned::Overlapped));
        // A write still in flight when the read completes overlaps it too.
        let w = fp(&[7], true);
        let in_flight = ledger.start(2, &w, false);
        let c = now(&ledger, 1, read.clone());
        assert_eq!(ledger.done(c, 0), Pinned::Overtaken(Unpinned::InFlight));
        ledger.unstart(2, &[(w, in_flight)], 0);
        let c = now(&ledger, 1, read);
        assert_eq!(ledger.done(c, 0), Pinned::InOrder);
    }

    fn fp(lanes: &[u64], write: bool) -> Footprint {
        Footprint {
            lanes: lanes.into(),
            probes: Default::default(),
            write,
            wild: false,
            ends: false,
        }
    }

    /// Relation `lane`, in the row where column 1 holds `key`.
    fn row(lane: u64, key: i64, write: bool) -> Footprint {
        row_where(lane, (1, Value::Int(key)), write)
    }

    /// Relation `lane`, in the rows where `column` holds `value`.
    fn row_where(lane: u64, (column, value): (u64, Value), write: bool) -> Footprint {
        Footprint {
            lanes: vec![lane].into(),
            probes: vec![Probe {
                lane,
                pairs: vec![(column, value)].into(),
            }]
            .into(),
            write,
            wild: false,
            ends: false,
        }
    }

    #[test]
    fn a_read_of_a_row_waits_for_writes_of_that_row_and_of_no_known_row_only() {
        let ledger = Ledger::default();
        let _ = ledger.inbox(0);
        let other = now(&ledger, 2, row(7, 2, true));
        let same = now(&ledger, 3, row(7, 1, true));
        // A binary value: its kind does not say which values differ from it.
        let unknown = now(&ledger, 4, row_where(7, (1, Value::Bytes(8, 42)), true));
        let read = now(&ledger, 1, row(7, 1, false));
        let apart = now(&ledger, 5, row(7, 3, false));
        assert_eq!(ledger.book().blocker(read), Some(same));
        assert_eq!(ledger.book().blocker(apart), Some(unknown));
        // Rows the keys cannot tell apart wait for the earliest write: a text value where
        // the writes name integers, another column.
        let text = now(&ledger, 6, row_where(7, (1, Value::Text(9)), false));
        let column = now(&ledger, 6, row_where(7, (2, Value::Int(2)), false));
        assert_eq!(ledger.book().blocker(text), Some(other));
        assert_eq!(ledger.book().blocker(column), Some(other));
        for c in [read, apart, text, column] {
            assert_eq!(ledger.acquire(c, 0), Turn::Wait);
        }
        let inbox = ledger.inbox(0).unwrap();
        let released = || {
            let mut r = std::mem::take(&mut *inbox.released.lock().unwrap());
            r.sort_unstable();
            r
        };
        // Each leaving write wakes only what waits for it and has nothing else to wait for.
        ledger.done(other, 0);
        assert!(
            released().is_empty(),
            "the write of row 2 holds no one alone"
        );
        ledger.done(same, 0);
        assert!(
            released().is_empty(),
            "the write of no known row is pending"
        );
        assert_eq!(ledger.book().waiters[&read].blocker, Some(unknown));
        ledger.done(unknown, 0);
        assert_eq!(released(), vec![read, apart, text, column]);
        for c in [read, apart, text, column] {
            assert_eq!(ledger.acquire(c, 0), Turn::Go);
            ledger.done(c, 0);
        }
        assert_eq!(ledger.pending(), 0);
        let book = ledger.book();
        let lane = &book.lanes[&7];
        for side in [&lane.reads, &lane.writes] {
            assert!(side.all.is_empty() && side.unkeyed.is_empty());
            assert!(side.keyed.is_empty() && side.columns.is_empty());
        }
    }

    /// A fixed-seed xorshift: the same footprints on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        /// A footprint over relations 1 to 3, in rows named by columns 1 and 2 with values
        /// of every kind, now and then wild.
        fn footprint(&mut self) -> Footprint {
            if self.below(40) == 0 {
                return Footprint::wild();
            }
            let (mut lanes, mut probes) = (Vec::new(), Vec::new());
            for lane in 1..=3 {
                if self.below(2) == 0 {
                    continue;
                }
                lanes.push(lane);
                for _ in 0..self.below(3) {
                    let mut pairs = Vec::new();
                    for column in 1..=2 {
                        let value = match self.below(10) {
                            k @ 0..=3 => Value::Int(k as i64),
                            4 | 5 => Value::Text(self.below(2)),
                            6 => Value::Bytes(4, 1),
                            7 => Value::Param(1),
                            _ => continue,
                        };
                        pairs.push((column, value));
                    }
                    if !pairs.is_empty() {
                        probes.push(Probe {
                            lane,
                            pairs: pairs.into(),
                        });
                    }
                }
            }
            if lanes.is_empty() {
                lanes.push(1 + self.below(3));
            }
            let write = self.below(2) == 0;
            Footprint {
                lanes: lanes.into(),
                probes: probes.into(),
                write,
                wild: false,
                ends: write && self.below(4) == 0,
            }
        }
    }

    /// What the ledger's look-ups must find: every pending sync point before `before`, of
    /// another session, that `footprint` waits for, found by looking at each.
    fn every_conflict(book: &Book, session: u64, footprint: &Footprint, before: u64) -> Vec<u64> {
        let mut out: Vec<u64> = book
            .entries
            .iter()
            .filter(|(c, e)| {
                **c < before
                    && e.session != session
                    && footprint.waits_for(e.footprint.write)
                    && footprint.conflicts_as(&e.footprint, e.footprint.write)
            })
            .map(|(c, _)| *c)
            .collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn the_row_keys_find_what_a_look_at_every_pending_sync_point_finds() {
        let ledger = Ledger::default();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut pending: Vec<u64> = Vec::new();
        for step in 0..3_000 {
            if pending.len() < 60 && rng.below(3) != 0 {
                let footprint = rng.footprint();
                pending.push(now(&ledger, 1 + rng.below(4), footprint));
            } else if !pending.is_empty() {
                let c = pending.swap_remove(rng.below(pending.len() as u64) as usize);
                ledger.done(c, 0);
            }
            let book = ledger.book();
            let before = match pending.len() {
                0 => u64::MAX,
                n => pending[rng.below(n as u64) as usize],
            };
            let (session, footprint) = (rng.below(5), rng.footprint());
            let all = every_conflict(&book, session, &footprint, before);
            assert_eq!(
                book.conflicting(session, &footprint, before),
                all,
                "step {step}: {footprint:?}"
            );
            assert_eq!(
                book.first_conflict(session, &footprint, before),
                all.first().copied(),
                "step {step}: {footprint:?}"
            );
            for &c in &pending {
                let e = &book.entries[&c];
                let first = every_conflict(&book, e.session, &e.footprint, c);
                assert_eq!(book.blocker(c), first.first().copied(), "step {step}");
            }
        }
        for c in pending {
            ledger.done(c, 0);
        }
        let book = ledger.book();
        for lane in book.lanes.values().chain([&book.all, &book.wild]) {
            for side in [&lane.reads, &lane.writes] {
                assert!(side.all.is_empty() && side.unkeyed.is_empty());
                assert!(side.keyed.is_empty() && side.columns.is_empty());
            }
        }
    }

    #[test]
    fn reads_and_writes_of_different_rows_neither_wait_nor_overlap() {
        let ledger = Ledger::default();
        let _ = ledger.inbox(0);
        // A read of row 2 overlapping a write of row 1: neither waits, the read is pinned.
        let read = row(7, 2, false);
        let started = ledger.start(1, &read, false);
        let write = now(&ledger, 2, row(7, 1, true));
        let c = ledger.complete(1, read.clone(), (&(read.clone(), started), 0), false, 0);
        assert!(ledger.acquire(write, 0) == Turn::Go);
        assert!(
            ledger.acquire(c, 0) == Turn::Go,
            "a read of another row does not wait"
        );
        assert_eq!(ledger.done(c, 0), Pinned::InOrder);
        assert_eq!(ledger.done(write, 0), Pinned::InOrder);
        // The same row: the read waits, and overlapped.
        let started = ledger.start(1, &read, false);
        let write = now(&ledger, 2, row(7, 2, true));
        let c = ledger.complete(1, read.clone(), (&(read.clone(), started), 0), false, 0);
        assert!(ledger.acquire(c, 0) != Turn::Go);
        assert_eq!(ledger.done(write, 0), Pinned::InOrder);
        assert_eq!(ledger.done(c, 0), Pinned::Overtaken(Unpinned::Overlapped));
        // A whole-relation read waits for a write of any row.
        let write = now(&ledger, 2, row(7, 9, true));
        let whole = now(&ledger, 1, fp(&[7], false));
        assert!(ledger.acquire(whole, 0) != Turn::Go);
        // Two writes of different rows are ordered still (unique constraints span rows).
        let other = now(&ledger, 3, row(7, 8, true));
        assert!(ledger.acquire(other, 0) != Turn::Go);
        // A write in flight overlaps a read of its row only.
        let w = row(7, 5, true);
        let in_flight = ledger.start(4, &w, false);
        let same = now(&ledger, 5, row(7, 5, false));
        let apart = now(&ledger, 6, row(7, 6, false));
        ledger.unstart(4, &[(w, in_flight)], 0);
        for x in [write, whole, other] {
            ledger.done(x, 0);
        }
        assert_eq!(ledger.done(same, 0), Pinned::Overtaken(Unpinned::InFlight));
        assert_eq!(ledger.done(apart, 0), Pinned::InOrder);
        assert_eq!(ledger.pending(), 0);
    }

    #[test]
    fn a_waiter_that_went_leaves_nothing_listed_under_its_blocker() {
        let ledger = Ledger::default();
        let _ = ledger.inbox(0);
        let write = now(&ledger, 2, row(7, 1, true));
        let read = now(&ledger, 1, row(7, 1, false));
        assert!(ledger.acquire(write, 0) == Turn::Go);
        assert!(ledger.acquire(read, 0) != Turn::Go);
        assert_eq!(ledger.book().blocked_on.len(), 1);
        // The reader's session ends while it waits; then the write leaves with no one waiting.
        ledger.abandon(&[read], 0);
        ledger.done(write, 0);
        assert_eq!(ledger.pending(), 0);
        assert!(ledger.book().blocked_on.is_empty());
    }

    #[test]
    fn a_commit_waits_only_for_reads_of_the_rows_its_transaction_wrote() {
        let ledger = Ledger::default();
        let _ = ledger.inbox(0);
        let other_row = now(&ledger, 2, row(7, 2, false));
        let same_row = now(&ledger, 3, row(7, 1, false));
        let mut commit = row(7, 1, true);
        commit.ends = true;
        let commit = now(&ledger, 1, commit);
        assert!(
            ledger.acquire(other_row, 0) == Turn::Go && ledger.acquire(same_row, 0) == Turn::Go
        );
        assert!(ledger.acquire(commit, 0) != Turn::Go);
        assert_eq!(ledger.done(same_row, 0), Pinned::InOrder);
        let inbox = ledger.inbox(0).unwrap();
        assert_eq!(*inbox.released.lock().unwrap(), vec![commit]);
        ledger.done(other_row, 0);
        ledger.done(commit, 0);
    }

    #[test]
    fn an_answer_read_late_but_stamped_earlier_goes_first() {
        // Session 2's write of row 1 is sent; session 1's read of it is answered (stamp 20)
        // and read first; the write's answer reached its socket earlier (stamp 10) and is
        // read after: the read is held for it, then waits for it on the shadow.
        let ledger = Ledger::new(Duration::from_secs(3600));
        let _ = ledger.inbox(0);
        let w = row(7, 1, true);
        let w_started = ledger.start(2, &w, false);
        let r = row(7, 1, false);
        let r_started = ledger.start(1, &r, false);
        let stamp = w_started.since.max(r_started.since) + 1_000;
        let read = ledger.complete(1, r.clone(), (&(r, r_started), stamp + 10), false, 0);
        assert!(matches!(ledger.acquire(read, 0), Turn::Hold(_)));
        // A read of another row and a write of another relation are not held.
        let apart = now(&ledger, 3, row(7, 2, false));
        assert_eq!(ledger.acquire(apart, 0), Turn::Go);
        let write = ledger.complete(2, w.clone(), (&(w, w_started), stamp), false, 0);
        assert!(write < read, "numbered by the receive timestamps");
        assert_eq!(ledger.acquire(read, 0), Turn::Wait);
        assert_eq!(ledger.acquire(write, 0), Turn::Go);
        assert_eq!(ledger.done(write, 0), Pinned::InOrder);
        let inbox = ledger.inbox(0).unwrap();
        assert_eq!(*inbox.released.lock().unwrap(), vec![read]);
        // The write was in flight when the read was answered: the read is not pinned.
        assert_eq!(ledger.done(read, 0), Pinned::Overtaken(Unpinned::InFlight));
        ledger.done(apart, 0);
        // A hold ends after `compare.order-hold-ms` from the answer's arrival.
        let ledger = Ledger::new(Duration::from_millis(5));
        let w = row(7, 1, true);
        let _in_flight = ledger.start(2, &w, false);
        let r = row(7, 1, false);
        let started = ledger.start(1, &r, false);
        let read = ledger.complete(1, r.clone(), (&(r, started), 0), false, 0);
        let Turn::Hold(left) = ledger.acquire(read, 0) else {
            panic!("held");
        };
        assert!(left <= Duration::from_millis(5));
        // The hold's end is what is tested here, not a wait for an outcome.
        std::thread::sleep(left);
        assert_eq!(ledger.acquire(read, 0), Turn::Go);
    }

    #[test]
    fn a_read_is_numbered_before_its_answer_by_the_read_lead() {
        // Sessions 1 (read) and 2 (write) of row 1 are both in flight; the write's answer
        // is stamped 10 us before the read's. With a 15 us lead the read took its snapshot
        // before the write committed: numbered first, it goes first on the shadow, and the
        // write waits for it.
        let ledger =
            Ledger::new(Duration::from_secs(3600)).with_read_lead(Duration::from_micros(15));
        let _ = ledger.inbox(0);
        let (w, r) = (row(7, 1, true), row(7, 1, false));
        let w_started = ledger.start(2, &w, false);
        let r_started = ledger.start(1, &r, false);
        let stamp = w_started.since.max(r_started.since) + 1_000_000;
        let write = ledger.complete(2, w.clone(), (&(w, w_started), stamp), false, 0);
        let read = ledger.complete(1, r.clone(), (&(r, r_started), stamp + 10_000), false, 0);
        assert!(read < write, "the read is placed 15 us before its answer");
        assert_eq!(ledger.acquire(read, 0), Turn::Go);
        assert_eq!(ledger.acquire(write, 0), Turn::Wait);
        // Both overlapped on the primary: the read is not pinned, whichever way it went.
        assert_eq!(
            ledger.done(read, 0),
            Pinned::Overtaken(Unpinned::Overlapped)
        );
        assert_eq!(ledger.acquire(write, 0), Turn::Go);
        ledger.done(write, 0);
        // Never before it was sent: a read sent after a write's answer stays after it,
        // however soon it is answered.
        let ledger = Ledger::new(Duration::from_secs(3600)).with_read_lead(Duration::from_secs(1));
        let (w, r) = (row(7, 1, true), row(7, 1, false));
        let w_started = ledger.start(2, &w, false);
        let write = ledger.complete(2, w, (&(row(7, 1, true), w_started), now_ns()), false, 0);
        let r_started = ledger.start(1, &r, false);
        let read = ledger.complete(
            1,
            r.clone(),
            (&(r, r_started), r_started.since + 1),
            false,
            0,
        );
        assert!(
            write < read,
            "a read sent after the write's answer is numbered after it"
        );
        // A pipelining session's read answered in the same read as its own earlier write
        // (one stamp): numbered after that write, whatever the lead, while it is pending.
        let ledger =
            Ledger::new(Duration::from_secs(3600)).with_read_lead(Duration::from_micros(15));
        let (w, r) = (row(7, 1, true), row(7, 1, false));
        let w_started = ledger.start(1, &w, false);
        let r_started = ledger.start(1, &r, false);
        let stamp = w_started.since.max(r_started.since) + 1_000_000;
        let own = ledger.complete(1, w.clone(), (&(w, w_started), stamp), false, 0);
        let read = ledger.complete(1, r.clone(), (&(r, r_started), stamp), false, 0);
        assert!(
            own < read,
            "a read comes after its session's pending sync points"
        );
        assert_eq!(ledger.acquire(own, 0), Turn::Go);
        ledger.done(own, 0);
        assert_eq!(ledger.acquire(read, 0), Turn::Go);
        ledger.done(read, 0);
        assert!(
            ledger.book().newest.is_empty(),
            "nothing kept once nothing is pending"
        );
        // Writes are numbered by their answers whatever the lead.
        let ledger = Ledger::new(Duration::from_secs(3600)).with_read_lead(Duration::from_secs(1));
        let w = row(7, 1, true);
        let started = ledger.start(2, &w, false);
        let stamp = started.since + 5_000_000_000;
        assert_eq!(
            ledger.complete(2, w.clone(), (&(w, started), stamp), false, 0),
            stamp
        );
    }

    #[test]
    fn sync_points_answered_without_a_number_leave_the_flight() {
        let ledger = Ledger::new(Duration::from_secs(60));
        let w = row(7, 1, true);
        let mut in_flight = VecDeque::new();
        for seq in 0..3 {
            in_flight.push_back((seq, (w.clone(), ledger.start(2, &w, false))));
        }
        // Sync point 2 is answered; 0 and 1 never were numbered.
        let answered = in_flight[2].1.clone();
        assert!(ledger.answered_in_flight(2, &mut in_flight, 2, 0));
        assert!(in_flight.is_empty());
        assert!(!ledger.answered_in_flight(2, &mut in_flight, 3, 0));
        let c = ledger.complete(2, w, (&answered, 0), false, 0);
        assert_eq!(ledger.acquire(c, 0), Turn::Go);
        ledger.done(c, 0);
        // Its completion ends only its own Start: without taking back 0 and 1, another
        // session's write of the row would be held for the whole hold.
        let r = row(7, 1, true);
        let started = ledger.start(1, &r, false);
        let c = ledger.complete(1, r.clone(), (&(r, started), 0), false, 0);
        assert_eq!(ledger.acquire(c, 0), Turn::Go);
    }

    #[test]
    fn a_write_waiting_for_the_transactions_locks_does_not_hold_it() {
        let ledger = Ledger::new(Duration::from_secs(60));
        // Session 2's UPDATE of row 1 was sent before session 1's answer arrived and is
        // still in flight: it waits on the primary for session 1's lock on row 1.
        let w = row(7, 1, true);
        let other = ledger.start(2, &w, false);
        let locked = |rows: Footprint| Locks {
            shadow: false,
            primary: rows,
        };
        let answered = |ledger: &Ledger, locks: Locks| {
            let u = row(7, 1, true);
            let started = ledger.start(1, &u, false);
            ledger.complete(1, u.clone(), (&(u, started), 0), locks, 0)
        };
        let c = answered(&ledger, locked(row(7, 1, true)));
        assert_eq!(ledger.acquire(c, 0), Turn::Go);
        ledger.done(c, 0);
        // Without locks on its rows, it may have run first: held.
        for locks in [
            Locks::default(),
            locked(row(7, 2, true)),
            locked(fp(&[7], true)),
            locked(row(8, 1, true)),
        ] {
            let c = answered(&ledger, locks.clone());
            assert!(
                matches!(ledger.acquire(c, 0), Turn::Hold(_)),
                "{locks:?} held"
            );
            ledger.force(c, Unpinned::WaitExpired);
            ledger.done(c, 0);
        }
        ledger.unstart(2, &[(w, other)], 0);
    }

    #[test]
    fn a_primary_only_write_overtakes_pending_reads_of_its_rows_only() {
        let ledger = Ledger::default();
        let same = now(&ledger, 1, row(7, 1, false));
        let apart = now(&ledger, 1, row(7, 2, false));
        let f = row(7, 1, true);
        let started = ledger.start(2, &f, true);
        ledger.primary_only(2, &f, (&(f.clone(), started), 0), 0);
        assert_eq!(
            ledger.done(same, 0),
            Pinned::Overtaken(Unpinned::PrimaryOnly)
        );
        assert_eq!(ledger.done(apart, 0), Pinned::InOrder);
    }

    #[test]
    fn a_read_kept_to_be_placed_moves_after_each_write_that_overlapped_it() {
        let ledger = Ledger::default();
        // Sessions 1 to 5 are the test's: a read being placed gets a session of its own.
        for _ in 1..=5 {
            ledger.session();
        }
        let _ = ledger.inbox(0);
        let inbox = ledger.inbox(0).unwrap();
        let read = row(7, 1, false);
        let started = ledger.start(1, &read, false);
        // Two writes of its row by other sessions, sent before its answer arrived, and a
        // write of another row.
        let w = row(7, 1, true);
        let s1 = ledger.start(2, &w, false);
        let s2 = ledger.start(3, &w, false);
        let c = ledger.complete(1, read.clone(), (&(read.clone(), started), 0), false, 0);
        let w1 = ledger.complete(2, w.clone(), (&(w.clone(), s1), 0), false, 0);
        let other = now(&ledger, 4, row(7, 2, true));
        let w2 = ledger.complete(3, w.clone(), (&(w.clone(), s2), 0), false, 0);
        assert!(c < w1 && w1 < other && other < w2);
        assert_eq!(ledger.acquire(c, 0), Turn::Go);
        assert_ne!(
            ledger.acquire(w1, 0),
            Turn::Go,
            "the write waits for the read"
        );
        // The shadow read it before both writes, and differed: kept, and moved after the
        // first write, which goes now; the read waits for it.
        assert_eq!(ledger.keep(c), Some(Unpinned::InFlight));
        let n1 = ledger.place_after(c, 0).expect("a write to place it after");
        assert!(w1 < n1 && n1 < w2, "{w1} < {n1} < {w2}");
        assert!(inbox.released.lock().unwrap().contains(&w1));
        assert_eq!(ledger.acquire(w1, 0), Turn::Go);
        assert_ne!(
            ledger.acquire(n1, 0),
            Turn::Go,
            "the re-read waits for the write"
        );
        assert_ne!(ledger.acquire(w2, 0), Turn::Go);
        ledger.done(w1, 0);
        assert_eq!(ledger.acquire(n1, 0), Turn::Go);
        assert_ne!(
            ledger.acquire(w2, 0),
            Turn::Go,
            "the next write waits for the re-read"
        );
        // Then after the second (the write of another row is no place).
        let n2 = ledger.place_after(n1, 0).expect("the second write");
        assert!(n2 > w2);
        ledger.done(other, 0);
        assert_eq!(ledger.acquire(w2, 0), Turn::Go);
        assert!(
            ledger.place_after(n2, 0).is_none(),
            "no write left to place it after"
        );
        assert!(!ledger.spoiled(n2));
        // A write of the read's own session numbered before its place spoils it: it may run
        // on the shadow before the re-read.
        let own = row(7, 1, true);
        let s = ledger.start(1, &own, false);
        let u = ledger.complete(1, own.clone(), (&(own.clone(), s), n1), false, 0);
        assert!(u < n2);
        assert!(ledger.spoiled(n2));
        assert_eq!(ledger.done(n2, 0), Pinned::Overtaken(Unpinned::InFlight));
        // A read that overlapped nothing is never kept.
        let alone = now(&ledger, 5, row(8, 1, false));
        assert_eq!(ledger.keep(alone), None);
    }

    /// The test's sessions 1 to 5, then a ledger whose read `r` of session 1 overlapped
    /// write `w` of session 2 (sent before the read's answer, answered after it): (read's
    /// number, write's number).
    fn overlapped_read(ledger: &Ledger, r: Footprint, w: Footprint) -> (u64, u64) {
        for _ in 1..=5 {
            ledger.session();
        }
        let _ = ledger.inbox(0);
        let started = ledger.start(1, &r, false);
        let s = ledger.start(2, &w, false);
        let c = ledger.complete(1, r.clone(), (&(r, started), 0), false, 0);
        let w1 = ledger.complete(2, w.clone(), (&(w, s), 0), false, 0);
        (c, w1)
    }

    #[test]
    fn a_write_of_a_session_spoils_each_of_its_reads_being_placed() {
        let ledger = Ledger::default();
        let (c, w1) = overlapped_read(&ledger, row(7, 1, false), row(7, 1, true));
        assert_eq!(ledger.keep(c), Some(Unpinned::InFlight));
        let n1 = ledger.place_after(c, 0).expect("placed after the write");
        assert!(w1 < n1);
        // The session's next read differs too, and is kept while the first is placed.
        let read = row(7, 1, false);
        let started = ledger.start(1, &read, false);
        let w = row(7, 1, true);
        let s = ledger.start(3, &w, false);
        let c2 = ledger.complete(1, read.clone(), (&(read, started), 0), false, 0);
        ledger.complete(3, w.clone(), (&(w, s), 0), false, 0);
        assert_eq!(ledger.keep(c2), Some(Unpinned::InFlight));
        assert!(!ledger.spoiled(n1) && !ledger.spoiled(c2));
        // Then a write of the session numbered before the first read's place (at the
        // number the read left): it may run on the shadow before that read's re-read.
        let own = row(7, 1, true);
        let s = ledger.start(1, &own, false);
        let k = ledger.complete(1, own.clone(), (&(own, s), c), false, 0);
        assert!(k < n1, "{k} < {n1}");
        assert!(ledger.spoiled(n1), "the first read's placement is spoilt");
        assert!(ledger.spoiled(c2));
        // Leaving the book drops each from the session's placements.
        ledger.done(n1, 0);
        ledger.done(c2, 0);
        assert!(ledger.book().placing.is_empty());
    }

    #[test]
    fn a_read_is_never_placed_past_its_own_sessions_next_write() {
        let ledger = Ledger::default();
        let (c, w1) = overlapped_read(&ledger, row(7, 1, false), row(7, 1, true));
        // The session's next write of the row, numbered just after the overlapping write:
        // the read's place would come after it.
        let own = row(7, 1, true);
        let s = ledger.start(1, &own, false);
        let u = ledger.complete(1, own.clone(), (&(own, s), w1 + 1), false, 0);
        assert_eq!(u, w1 + 1);
        assert_eq!(ledger.keep(c), None, "not kept: there is no place");
        assert_eq!(ledger.place_after(c, 0), None, "never placed");
        assert!(
            ledger.book().entries.contains_key(&c),
            "it stays at its number"
        );
    }

    #[test]
    fn a_read_is_never_placed_after_a_write_sent_after_its_answer() {
        let ledger = Ledger::default();
        for _ in 1..=5 {
            ledger.session();
        }
        let _ = ledger.inbox(0);
        // The read reads rows 1 and 2 (the whole relation); a write of row 1 was sent
        // before its answer, a write of row 2 after it, and that one was answered first.
        let read = fp(&[7], false);
        let started = ledger.start(1, &read, false);
        let w1 = row(7, 1, true);
        let s1 = ledger.start(2, &w1, false);
        let c = ledger.complete(1, read.clone(), (&(read, started), 0), false, 0);
        let w2 = row(7, 2, true);
        let s2 = ledger.start(3, &w2, false);
        let n2 = ledger.complete(3, w2.clone(), (&(w2, s2), 0), false, 0);
        let n1 = ledger.complete(2, w1.clone(), (&(w1, s1), 0), false, 0);
        assert!(c < n2 && n2 < n1);
        assert_eq!(ledger.keep(c), None, "not kept: there is no place");
        // After the first write, the re-read would see the second, which the primary's
        // read never saw.
        assert_eq!(ledger.place_after(c, 0), None, "never placed");
    }

    #[test]
    fn conflicting_sync_points_go_in_completion_order() {
        let ledger = Ledger::default();
        let _ = ledger.inbox(0);
        let update = now(&ledger, 1, fp(&[7], true));
        let read = now(&ledger, 2, fp(&[7], false));
        let other = now(&ledger, 3, fp(&[8], true));
        let own = now(&ledger, 1, fp(&[7], false));
        assert!(ledger.acquire(update, 0) == Turn::Go);
        // The read waits for the earlier write of another session; unrelated relations and
        // the writer's own session do not wait.
        assert!(ledger.acquire(read, 0) != Turn::Go);
        assert!(ledger.acquire(other, 0) == Turn::Go);
        assert!(ledger.acquire(own, 0) == Turn::Go);
        assert_eq!(ledger.done(update, 0), Pinned::InOrder);
        let inbox = ledger.inbox(0).unwrap();
        assert_eq!(*inbox.released.lock().unwrap(), vec![read]);
        // Two reads do not conflict.
        let read2 = now(&ledger, 4, fp(&[7], false));
        assert!(ledger.acquire(read2, 0) == Turn::Go);
        // A later write waits for both reads.
        let write = now(&ledger, 5, fp(&[7], true));
        assert!(ledger.acquire(write, 0) != Turn::Go);
        assert_eq!(ledger.done(read, 0), Pinned::InOrder);
        assert_eq!(ledger.done(read2, 0), Pinned::InOrder);
        assert!(!inbox.released.lock().unwrap().contains(&write));
        assert_eq!(ledger.done(own, 0), Pinned::InOrder);
        assert!(inbox.released.lock().unwrap().contains(&write));
    }

    #[test]
    fn a_transaction_holding_locks_stops_waiting_for_blockers_running_on_the_shadow() {
        // Session 2's UPDATE of row 7 was held by the primary on session 1's lock and seen
        // answered before session 1's COMMIT: on the shadow it waits for that lock.
        let ledger = Ledger::default();
        let row = fp(&[7], true);
        let update = now(&ledger, 2, row.clone());
        let started = ledger.start(1, &row, false);
        let commit = ledger.complete(1, row.clone(), (&(row.clone(), started), 0), true, 0);
        assert!(ledger.acquire(commit, 0) != Turn::Go);
        let grace = Duration::from_millis(5);
        assert!(
            !ledger.held_by_own_locks(commit, grace),
            "the UPDATE is not on the shadow yet"
        );
        assert!(ledger.acquire(update, 0) == Turn::Go);
        assert!(!ledger.held_by_own_locks(commit, Duration::from_secs(3600)));
        // The grace elapsing is what is tested here, not a wait for an outcome.
        std::thread::sleep(grace);
        assert!(ledger.held_by_own_locks(commit, grace));
        // A session holding no locks keeps waiting.
        let started = ledger.start(3, &row, false);
        let read = ledger.complete(3, row.clone(), (&(row, started), 0), false, 0);
        assert!(ledger.acquire(read, 0) != Turn::Go);
        assert!(!ledger.held_by_own_locks(read, grace));
        ledger.force(commit, Unpinned::LockBreak);
        for x in [update, commit, read] {
            ledger.done(x, 0);
        }
        assert_eq!(ledger.pending(), 0);
    }

    #[test]
    fn a_transaction_holding_locks_sees_through_a_chain_of_waits() {
        // Session 3's UPDATE runs on the shadow, held there by session 1's lock; session 2's
        // read of the row waits for it in the ledger, and session 1's COMMIT for the read.
        let ledger = Ledger::default();
        let update = now(&ledger, 3, row(7, 1, true));
        let read = now(&ledger, 2, row(7, 1, false));
        let mut end = row(7, 1, true);
        end.ends = true;
        let started = ledger.start(1, &end, false);
        let commit = ledger.complete(1, end.clone(), (&(end, started), 0), true, 0);
        assert!(ledger.acquire(update, 0) == Turn::Go);
        assert!(ledger.acquire(read, 0) != Turn::Go);
        assert!(ledger.acquire(commit, 0) != Turn::Go);
        let grace = Duration::from_millis(5);
        // The grace elapsing is what is tested here, not a wait for an outcome.
        std::thread::sleep(grace);
        assert!(ledger.held_by_own_locks(commit, grace));
        // Once the head of the chain is answered, nothing is stuck.
        ledger.done(update, 0);
        assert!(!ledger.held_by_own_locks(commit, grace));
    }

    #[test]
    fn a_forced_sync_point_and_what_it_overtook_are_overtaken() {
        let ledger = Ledger::default();
        let first = now(&ledger, 1, fp(&[7], true));
        let second = now(&ledger, 2, fp(&[7], true));
        let unrelated = now(&ledger, 3, fp(&[9], true));
        assert!(ledger.acquire(second, 0) != Turn::Go);
        ledger.force(second, Unpinned::WaitExpired);
        assert_eq!(
            ledger.done(second, 0),
            Pinned::Overtaken(Unpinned::WaitExpired)
        );
        assert_eq!(
            ledger.done(first, 0),
            Pinned::Overtaken(Unpinned::WaitExpired)
        );
        assert_eq!(ledger.done(unrelated, 0), Pinned::InOrder);
        assert_eq!(ledger.pending(), 0);
    }

    #[test]
    fn a_bound_that_ran_out_names_the_reason_over_an_overlap() {
        let ledger = Ledger::default();
        // A read that overlapped a write of its relation, then was overtaken by a lock break.
        let read = fp(&[7], false);
        let started = ledger.start(1, &read, false);
        let write = now(&ledger, 2, fp(&[7], true));
        let c = ledger.complete(1, read.clone(), (&(read, started), 0), false, 0);
        let later = now(&ledger, 3, fp(&[7], true));
        ledger.force(later, Unpinned::LockBreak);
        assert_eq!(
            ledger.done(write, 0),
            Pinned::Overtaken(Unpinned::LockBreak)
        );
        assert_eq!(ledger.done(c, 0), Pinned::Overtaken(Unpinned::LockBreak));
        assert_eq!(
            ledger.done(later, 0),
            Pinned::Overtaken(Unpinned::LockBreak)
        );
        // The first bound's reason stays; an overlap never replaces one.
        let mut slot = None;
        Unpinned::mark(&mut slot, Unpinned::InFlight);
        Unpinned::mark(&mut slot, Unpinned::Overlapped);
        assert_eq!(slot, Some(Unpinned::InFlight));
        Unpinned::mark(&mut slot, Unpinned::WaitExpired);
        Unpinned::mark(&mut slot, Unpinned::PrimaryOnly);
        Unpinned::mark(&mut slot, Unpinned::Overlapped);
        assert_eq!(slot, Some(Unpinned::WaitExpired));
        // A sync point whose session stopped comparing.
        assert_eq!(ledger.done(c, 0), Pinned::Overtaken(Unpinned::Abandoned));
        let names: Vec<&str> = Unpinned::ALL.iter().map(|u| u.name()).collect();
        assert_eq!(
            names,
            [
                "overlapped",
                "in_flight",
                "wait_expired",
                "lock_break",
                "primary_only",
                "abandoned"
            ]
        );
    }

    #[test]
    fn a_primary_only_write_overtakes_pending_reads() {
        let ledger = Ledger::default();
        let read = now(&ledger, 1, fp(&[7], false));
        for write in [true, false] {
            let f = fp(&[7], write);
            let started = ledger.start(2, &f, true);
            ledger.primary_only(2, &f, (&(f.clone(), started), 0), 0);
        }
        assert_eq!(
            ledger.done(read, 0),
            Pinned::Overtaken(Unpinned::PrimaryOnly)
        );
    }

    #[test]
    fn wild_sync_points_conflict_with_everything_and_abandoning_releases() {
        let ledger = Ledger::default();
        let _ = ledger.inbox(0);
        let ddl = now(&ledger, 1, Footprint::wild());
        let read = now(&ledger, 2, fp(&[3], false));
        assert!(ledger.acquire(read, 0) != Turn::Go);
        ledger.abandon(&[ddl], 0);
        let inbox = ledger.inbox(0).unwrap();
        assert_eq!(*inbox.released.lock().unwrap(), vec![read]);
        let wild_after = now(&ledger, 3, Footprint::wild());
        assert!(ledger.acquire(wild_after, 0) != Turn::Go);
    }
}
