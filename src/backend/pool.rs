//! Per-shard pools of primary connections, one per (user, database), lent to client sessions
//! in transaction mode.
//!
//! Thread-per-core: each shard lends its own connections and never touches another shard's.
//! The one thing shards share is each pair's process-wide bound (`pool.size`): a [`Budget`] of
//! two atomics, touched only when a connection opens or closes, or when a client has to wait
//! — never per statement. A shard whose clients wait while the bound is reached says so in
//! the budget (`wanted`), and shards with connections to spare close them when they come back
//! (or, idle, at the next maintenance tick), so the connections follow the clients.
//!
//! While clients of several shards wait, the bound is shared out by demand: each shard
//! publishes how many of its clients are in a transaction or waiting (smoothed, at its care
//! tick), every shard works out the same apportionment of `pool.size` from those figures,
//! and a shard above its part closes a connection that comes back instead of lending it to
//! its own next waiter, while a shard at its part leaves free room to the others. Without
//! it, a shard whose clients always waited kept every connection it held, and the other
//! shard's clients queued behind connections that never came free (issue 14, session 12:
//! 64 pgbench clients, 27 on one shard with 13 connections and 0.7 ms average wait, 37 on
//! the other with 7 and 20-30 ms). Connections stay on their shard (a connection is its
//! shard's io_uring registration and TLS state); what moves is the room in the bound.
//! With more shards with demand than `pool.size`, the shards that get a connection change
//! every [`ROTATION_SLOT`] (a fixed tie order left the last shards without one for good).
//!
//! Every wait is bounded: a client waits at most `pool.query-wait-timeout-ms`, and at most
//! `pool.waiters-max` clients wait per shard and pair.
//!
//! Pairs are bounded too, since clients choose them: at most `pool.pairs-max` over the
//! process (the budgets map counts them), and a pair's pool goes once nothing uses it: at
//! once when its first server login failed, after `pool.pair-idle-timeout-ms` otherwise
//! (before, every database name a client tried left a pool on its shard and a budget for
//! good: issue 14).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;

use crate::config::{LiveEndpoint, PoolConfig};
use crate::exec::net::Stream;
use crate::exec::{self, within};
use crate::stats::pools::{PoolRow, ServerRow};
use crate::wire::{self, ServerLogin, tag};

/// How often a waiting client looks again for room another shard may have made.
const WAIT_RETRY: Duration = Duration::from_millis(5);

/// The hash of "no settings beyond the connection's defaults".
pub const NO_SETTINGS: u64 = 0;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "no server connection for pool {user}@{database} within pool.query-wait-timeout-ms ({ms} ms)"
    )]
    WaitTimeout {
        user: String,
        database: String,
        ms: u64,
    },
    #[error("too many clients waiting for pool {user}@{database} (pool.waiters-max)")]
    WaitersFull { user: String, database: String },
    #[error(
        "no pool for {user}@{database}: {max} (user, database) pairs have one already (pool.pairs-max)"
    )]
    PairsFull {
        user: String,
        database: String,
        max: usize,
    },
    #[error(transparent)]
    Backend(#[from] super::BackendError),
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::WaitTimeout { .. }
            | PoolError::WaitersFull { .. }
            | PoolError::PairsFull { .. } => wire::sqlstate::TOO_MANY_CONNECTIONS,
            PoolError::Backend(err) => err.sqlstate(),
        }
    }
}

/// A pair's bound over the whole process.
#[derive(Debug, Default)]
pub struct Budget {
    open: AtomicUsize,
    /// Of `open`, connections being closed (Terminate sent, the server not yet gone): they
    /// still count against the bound, but serve nobody, so trimming the pair to a lowered
    /// bound counts without them (else every connection coming back meanwhile is closed too).
    closing: AtomicUsize,
    /// Clients waiting for this pair on any shard.
    wanted: AtomicUsize,
    /// The server's ParameterStatus values for this pair, from the first connection any
    /// shard opened (what a new client is told at startup, on every shard).
    params: std::sync::OnceLock<Vec<(String, String)>>,
    /// Statements (content hashes) some connection of this pair prepared without an error,
    /// on any shard: a client's Parse of one of them, alone before its Sync, is answered
    /// without lending a connection (pgbench and libpq's PQprepare wait for it
    /// synchronously, so a client thread that serves several connections would otherwise
    /// wait on itself). Shared by the shards (one thread's clients land on several), locked
    /// only for such a batch and when a connection first prepares a statement.
    known: Mutex<std::collections::HashSet<u64>>,
    /// Shards where a shared connection of this pair lingers with nothing in flight
    /// (pipelined lending, `pool.shared-linger-us`): bit `shard % 64` of word `shard / 64`,
    /// one bit per shard whatever their number (with one word, shards 64 apart shared a bit
    /// and one cleared the other's mark). A client that starts waiting on another shard
    /// wakes them (see [`Wakeups`]), so that they give it back at once instead of at the
    /// end of their linger. Empty without pipelined lending (no wake-ups to ring).
    lingering: Box<[std::sync::atomic::AtomicU64]>,
    /// Each shard's demand for this pair (its clients in a transaction or waiting,
    /// smoothed, in sixteenths), published by the shard's care tick and when a client of
    /// an idle shard starts waiting: how `pool.size` is shared out while clients of several
    /// shards wait ([`apportion`]).
    demand: Box<[AtomicUsize]>,
}

impl Budget {
    fn try_take(&self, limit: usize) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections of the pair that serve or will: open (or opening), not being closed.
    fn serving(&self) -> usize {
        // `closing` first: a close decrements `open` and then `closing`, so read in this
        // order the count can be one too few for a moment, never one too many.
        let closing = self.closing.load(Ordering::Acquire);
        self.open().saturating_sub(closing)
    }

    /// Marks (`true`) or unmarks shard `shard` as holding a lingering shared connection of
    /// this pair (no-op without pipelined lending: there is no word to mark).
    fn mark(&self, shard: usize, lingering: bool) {
        let Some(word) = self.lingering.get(shard / 64) else {
            return;
        };
        let bit = 1u64 << (shard % 64);
        if lingering {
            word.fetch_or(bit, Ordering::SeqCst);
        } else {
            word.fetch_and(!bit, Ordering::SeqCst);
        }
    }

    #[cfg(test)]
    fn marked(&self, shard: usize) -> bool {
        self.lingering
            .get(shard / 64)
            .is_some_and(|w| w.load(Ordering::SeqCst) & (1u64 << (shard % 64)) != 0)
    }

    fn wanted(&self) -> usize {
        // SeqCst, as the waiter's increment and the lingering marks: a waiter that misses a
        // shard's mark is seen by that shard's next look (see `Pools::mark_lingering`).
        self.wanted.load(Ordering::SeqCst)
    }
}

/// The budgets of every pair, shared by all shards; locked only when a shard meets a pair
/// for the first time or lets one go. A pair's entry lasts while some shard has a pool of it
/// (each pool holds the `Arc`): its count is the number of pairs, `pool.pairs-max`'s.
#[derive(Debug, Default, Clone)]
pub struct Budgets(Arc<Mutex<BudgetMap>>, Wakeups);

/// One eventfd per shard (empty without pipelined lending): a client that starts waiting for
/// a connection wakes the shards where a shared connection of its pair lingers, which look
/// at once whether to give it back (`Pipeline::linger` on the proxy side). Rung only from
/// the waiting path, and only towards shards that marked a lingering connection.
#[derive(Default, Clone)]
pub struct Wakeups(Arc<Vec<exec::Notifier>>);

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wakeups({} shards)", self.0.len())
    }
}

type BudgetMap = HashMap<(String, String), Arc<Budget>>;

/// A shard's pools by (user, database).
type PoolMap = HashMap<(Rc<str>, Rc<str>), Rc<Pool>>;

impl Budgets {
    /// Budgets whose waiters wake the lingering shared connections of other shards (one
    /// eventfd per shard): for pipelined lending.
    pub fn with_wakeups(shards: usize) -> std::io::Result<Budgets> {
        let notifiers = (0..shards)
            .map(|_| exec::Notifier::new())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Budgets(Arc::default(), Wakeups(Arc::new(notifiers))))
    }

    /// The pair's budget, made when no shard has one; `None` when that would make more than
    /// `pairs_max` pairs (`None`: no bound).
    fn get(
        &self,
        user: &str,
        database: &str,
        shards: usize,
        pairs_max: Option<usize>,
    ) -> Option<Arc<Budget>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (user.to_string(), database.to_string());
        if let Some(budget) = map.get(&key) {
            return Some(budget.clone());
        }
        if pairs_max.is_some_and(|max| map.len() >= max) {
            return None;
        }
        let wakeups = (self.1).0.len();
        let budget = Arc::new(Budget {
            lingering: (0..wakeups.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            demand: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            ..Budget::default()
        });
        map.insert(key, budget.clone());
        Some(budget)
    }

    /// Drops the pair's budget once no shard holds it (the shard letting its pool go has
    /// dropped its own handle first). Under the lock no shard can take a new handle, so a
    /// count of one (the map's) stays one.
    fn forget(&self, user: &str, database: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (user.to_string(), database.to_string());
        if map.get(&key).is_some_and(|b| Arc::strong_count(b) == 1) {
            map.remove(&key);
        }
    }

    /// Pairs with a pool on some shard.
    #[cfg(test)]
    fn pairs(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether `database` has a pool on some shard (for any user).
    fn knows_database(&self, database: &str) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().any(|(_, db)| db == database)
    }
}

/// Where pool connections go and how.
pub struct Upstream {
    pub addr: LiveEndpoint,
    pub label: String,
    pub tls: crate::tls::Upstream,
    pub connect_timeout: Duration,
    pub message_bytes_max: usize,
    /// The primary URL's user and password: the login of a pair whose clients gave none
    /// that pgprism can reuse (trust).
    pub url_user: String,
    pub url_password: String,
}

/// A server-side prepared statement cache with least-recently-used eviction.
#[derive(Debug, Default)]
pub struct PreparedSet {
    /// Statement hash → last use tick.
    used: HashMap<u64, u64>,
    tick: u64,
}

impl PreparedSet {
    /// Whether `hash` is prepared, without counting it as used (a look, not a use).
    pub fn holds(&self, hash: u64) -> bool {
        self.used.contains_key(&hash)
    }

    /// Whether `hash` is prepared, counting it as used now (the last used is closed last).
    pub fn contains(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `hash` as prepared; returns the statements to close first, least recently
    /// used first, as many as the set holds beyond `max` (one at most, unless a console SET
    /// lowered `max` since the set last grew: then it shrinks to the new bound at once).
    pub fn insert(&mut self, hash: u64, max: usize) -> Vec<u64> {
        self.tick += 1;
        self.used.insert(hash, self.tick);
        let excess = self.used.len().saturating_sub(max.max(1));
        if excess == 0 {
            return Vec::new();
        }
        let others = self.used.iter().filter(|(h, _)| **h != hash);
        let victims: Vec<u64> = if excess == 1 {
            // The usual case: one scan, no sort.
            others
                .min_by_key(|(_, t)| **t)
                .map(|(h, _)| *h)
                .into_iter()
                .collect()
        } else {
            let mut by_age: Vec<(u64, u64)> = others.map(|(h, t)| (*t, *h)).collect();
            by_age.sort_unstable();
            by_age.into_iter().take(excess).map(|(_, h)| h).collect()
        };
        for victim in &victims {
            self.used.remove(victim);
        }
        victims
    }

    pub fn remove(&mut self, hash: u64) {
        self.used.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// One primary connection of a pool, as it moves between the pool and its clients: boxed,
/// so that each move (idle list, acquire, lend, release, put back, a waiter's hand-over) is a
/// pointer's, not the whole connection's (about 240 bytes; its copies cost about 700
/// instructions a pooled transaction, callgrind, session 15).
pub type ServerConn = Box<PooledConn>;

/// One primary connection of a pool, with what pgprism knows of its session state.
pub struct PooledConn {
    pub id: u64,
    pub stream: Stream,
    /// Bytes read from the server and not yet handled.
    pub buf: BytesMut,
    /// The server's BackendKeyData (for cancels).
    pub key: Option<(i32, i32)>,
    pub opened: Instant,
    pub opened_at: SystemTime,
    pub last_used: Instant,
    /// Hash of the settings applied on top of the connection's defaults
    /// ([`NO_SETTINGS`]: none).
    pub settings: u64,
    /// Protocol-level statements prepared, by content hash (their names derive from it).
    pub prepared: PreparedSet,
    /// SQL-level statements (`PREPARE name`): name → hash of the PREPARE text.
    pub sql_prepared: HashMap<Box<str>, u64>,
    /// What the unnamed statement holds (content hash), when known.
    pub unnamed: Option<u64>,
    /// Something may be left on it that a reset must clear (a pinned client used it).
    pub dirty: bool,
}

impl PooledConn {
    /// Forget every statement and setting (after DISCARD ALL, or when unsure).
    pub fn forget_state(&mut self) {
        self.prepared.clear();
        self.sql_prepared.clear();
        self.unnamed = None;
        self.settings = NO_SETTINGS;
    }
}

/// Counters of one pool (cumulative), for SHOW POOLS / STATS and /metrics.
#[derive(Debug, Default)]
pub struct PoolCounters {
    pub xact_count: Cell<u64>,
    pub query_count: Cell<u64>,
    pub bytes_received: Cell<u64>,
    pub bytes_sent: Cell<u64>,
    pub xact_time_us: Cell<u64>,
    pub query_time_us: Cell<u64>,
    pub wait_time_us: Cell<u64>,
    pub servers_opened: Cell<u64>,
    pub servers_closed: Cell<u64>,
    pub lends: Cell<u64>,
    pub wait_timeouts: Cell<u64>,
    pub pins: Cell<u64>,
    pub reprepares: Cell<u64>,
    pub settings_applied: Cell<u64>,
    pub servers_lost: Cell<u64>,
    pub dirty_closed: Cell<u64>,
    /// Pipelined lending: pipelines started, units that shared a connection, those of them
    /// queued behind another client's unit, and writes that carried them.
    pub pipelines: Cell<u64>,
    pub shared_units: Cell<u64>,
    pub shared_behind: Cell<u64>,
    pub shared_writes: Cell<u64>,
    /// Connections closed to make room in the bound for clients of other shards.
    pub servers_yielded: Cell<u64>,
}

impl PoolCounters {
    /// Adds `other`'s counts to these (a pool that goes leaves its counts to its shard's
    /// total, so that `/metrics` never counts down).
    fn absorb(&self, other: &PoolCounters) {
        let PoolCounters {
            xact_count,
            query_count,
            bytes_received,
            bytes_sent,
            xact_time_us,
            query_time_us,
            wait_time_us,
            servers_opened,
            servers_closed,
            lends,
            wait_timeouts,
            pins,
            reprepares,
            settings_applied,
            servers_lost,
            dirty_closed,
            pipelines,
            shared_units,
            shared_behind,
            shared_writes,
            servers_yielded,
        } = other;
        for (mine, theirs) in [
            (&self.xact_count, xact_count),
            (&self.query_count, query_count),
            (&self.bytes_received, bytes_received),
            (&self.bytes_sent, bytes_sent),
            (&self.xact_time_us, xact_time_us),
            (&self.query_time_us, query_time_us),
            (&self.wait_time_us, wait_time_us),
            (&self.servers_opened, servers_opened),
            (&self.servers_closed, servers_closed),
            (&self.lends, lends),
            (&self.wait_timeouts, wait_timeouts),
            (&self.pins, pins),
            (&self.reprepares, reprepares),
            (&self.settings_applied, settings_applied),
            (&self.servers_lost, servers_lost),
            (&self.dirty_closed, dirty_closed),
            (&self.pipelines, pipelines),
            (&self.shared_units, shared_units),
            (&self.shared_behind, shared_behind),
            (&self.shared_writes, shared_writes),
            (&self.servers_yielded, servers_yielded),
        ] {
            bump(mine, theirs.get());
        }
    }
}

pub fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get().wrapping_add(by));
}

struct Waiter {
    conn: RefCell<Option<ServerConn>>,
    waker: Cell<Option<Waker>>,
    since: Instant,
    /// It left the queue (served or timed out); removed lazily from the front.
    done: Cell<bool>,
    /// Room was made (or it became first in line): look again.
    kicked: Cell<bool>,
    /// Its counts (`waiting`, the budget's `wanted`) were given back: it left the line for
    /// good. (`done` alone is no sign of it: a waiter handed a connection is `done` first.)
    left: Cell<bool>,
}

/// One (user, database) pool on one shard.
pub struct Pool {
    pub user: Rc<str>,
    pub database: Rc<str>,
    idle: RefCell<Vec<ServerConn>>,
    /// Connections of this shard: idle, lent and being opened.
    open: Cell<usize>,
    connecting: Cell<usize>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
    /// Waiters still waiting (the queue may hold some that left).
    waiting: Cell<usize>,
    budget: Arc<Budget>,
    /// How pgprism logs in to the server as this user (from the latest client that
    /// authenticated, or the primary URL's password).
    login: RefCell<ServerLogin>,
    /// Clients of this pair on this shard, and those of them linked to a connection.
    pub clients: Cell<u64>,
    pub linked: Cell<u64>,
    pub pinned: Cell<u64>,
    /// Clients of this shard whose shareable unit waits in line for room on a shared
    /// connection (pipelined lending), not in this pool's queue: waiting clients all the
    /// same (SHOW POOLS `cl_waiting`, this shard's demand).
    pub lined: Cell<usize>,
    /// Since when the first of them waits (SHOW POOLS `maxwait`), kept by the line.
    pub line_since: Cell<Option<Instant>>,
    pub counters: PoolCounters,
    /// Shared connections of this pair lingering on this shard with nothing in flight.
    lingering: Cell<usize>,
    /// This shard's demand (clients in a transaction or waiting), smoothed over care ticks,
    /// in sixteenths; and the figure last published in the budget.
    demand: Cell<usize>,
    published: Cell<usize>,
    /// `counters.lends` at the last care tick: a shard that lent a connection since counts
    /// as one client of demand even when none was in a transaction at the tick itself.
    lends_seen: Cell<u64>,
    /// This shard's part of `pool.size` while clients of other shards wait (worked out at
    /// each care tick from every shard's published demand).
    share: Cell<usize>,
    /// Console KILL of the pair's database: connections opened before this are closed, the
    /// idle ones at once, the lent ones as they come back (never lent again).
    killed_before: Cell<Option<Instant>>,
    /// Since when nothing uses the pool (seen at a care tick): it goes after
    /// `pool.pair-idle-timeout-ms` of it.
    unused_since: Cell<Option<Instant>>,
}

impl Pool {
    /// The server's ParameterStatus values (empty until a connection of the pair opened on
    /// some shard).
    pub fn params(&self) -> Vec<(String, String)> {
        self.budget.params.get().cloned().unwrap_or_default()
    }

    /// What the pair's connections log in with.
    pub fn login(&self) -> ServerLogin {
        self.login.borrow().clone()
    }

    pub fn set_login(&self, login: ServerLogin) {
        if !matches!(login, ServerLogin::None) {
            *self.login.borrow_mut() = login;
        }
    }

    /// A statement prepared without an error (bounded: forgotten wholesale beyond it).
    pub fn learn(&self, hash: u64, max: usize) {
        let mut known = self.budget.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= max {
            known.clear();
        }
        known.insert(hash);
    }

    /// Whether every statement of `hashes` is known (see [`Budget`]'s `known`).
    pub fn knows_all(&self, hashes: &[u64]) -> bool {
        let known = self.budget.known.lock().unwrap_or_else(|e| e.into_inner());
        hashes.iter().all(|h| known.contains(h))
    }

    pub fn open_here(&self) -> usize {
        self.open.get()
    }

    /// Whether a client wanting a connection now would have to wait: nothing idle here and
    /// the pair at its bound, or someone already waiting.
    pub fn under_pressure(&self, size: usize) -> bool {
        self.waiting.get() > 0 || (self.idle.borrow().is_empty() && self.budget.open() >= size)
    }

    /// Clients of this shard waiting for a connection of this pair.
    pub fn waiting(&self) -> usize {
        self.waiting.get()
    }

    /// Whether an idle connection is ready here.
    pub fn has_idle(&self) -> bool {
        !self.idle.borrow().is_empty()
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Clients of other shards wait for this pair (the budget counts this shard's own
    /// waiters too, those just handed a connection included).
    fn others_wait(&self) -> bool {
        self.budget.wanted() > self.waiting.get()
    }

    /// This shard's part of the bound while clients of other shards wait.
    pub fn share(&self) -> usize {
        self.share.get()
    }

    /// The first waiter still waiting (dropping those that left from the front).
    fn first_waiter(&self) -> Option<Rc<Waiter>> {
        let mut waiters = self.waiters.borrow_mut();
        while waiters.front().is_some_and(|w| w.done.get()) {
            waiters.pop_front();
        }
        waiters.front().cloned()
    }

    /// The longest current wait, in the pool's queue or in the unit line (whose first
    /// client joined the line before it joined the queue).
    fn max_wait(&self, now: Instant) -> Duration {
        self.waiters
            .borrow()
            .iter()
            .filter(|w| !w.done.get())
            .map(|w| w.since)
            .chain(self.line_since.get())
            .map(|since| now.saturating_duration_since(since))
            .max()
            .unwrap_or_default()
    }
}

/// A waiter's place in line, given up when dropped (see [`Pools::leave_line`]).
struct Queued<'a> {
    pools: &'a Pools,
    pool: &'a Rc<Pool>,
    waiter: Rc<Waiter>,
}

impl Queued<'_> {
    fn leave(&mut self) {
        self.pools.leave_line(self.pool, &self.waiter);
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The pools of one shard.
pub struct Pools {
    pub shard: usize,
    /// The `[pool]` keys in force; the console's SET replaces them ([`Pools::set_cfg`]), so
    /// they are read where used ([`Pools::cfg`]) and never kept aside.
    cfg: RefCell<Rc<PoolConfig>>,
    pub upstream: Upstream,
    budgets: Budgets,
    pools: RefCell<PoolMap>,
    next_id: Cell<u64>,
    /// Lending is paused (console PAUSE): clients wait (bounded) for RESUME.
    pub paused: Cell<bool>,
    /// Databases paused one by one.
    paused_databases: RefCell<Vec<String>>,
    /// Generation of RECONNECT: connections opened before it are closed when they come back.
    reconnect_before: Cell<Option<Instant>>,
    /// Shards in the process (each keeps its share of `min-size`).
    shards: usize,
    /// The counts of the pools that went (see [`PoolCounters::absorb`]).
    retired: PoolCounters,
    /// Pools this shard let go (unused, or their first login failed).
    pub removed: Cell<u64>,
    /// A console SET lowered `size + reserve-size`: connections beyond it are closed as
    /// they come back and at the care tick, until no pool of this shard is above it. Off
    /// otherwise, so that a raise (in force on the console's shard before the others) never
    /// makes a shard still at the old bound close connections, and a returned connection
    /// costs one read.
    trim: Cell<bool>,
}

impl Pools {
    pub fn new(
        shard: usize,
        cfg: PoolConfig,
        upstream: Upstream,
        budgets: Budgets,
        shards: usize,
    ) -> Pools {
        Pools {
            shard,
            cfg: RefCell::new(Rc::new(cfg)),
            upstream,
            budgets,
            pools: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            paused: Cell::new(false),
            paused_databases: RefCell::new(Vec::new()),
            reconnect_before: Cell::new(None),
            shards: shards.max(1),
            retired: PoolCounters::default(),
            removed: Cell::new(0),
            trim: Cell::new(false),
        }
    }

    /// The counts of the pools this shard let go, for the totals.
    pub fn retired(&self) -> &PoolCounters {
        &self.retired
    }

    /// The `[pool]` keys in force (a handle: a SET meanwhile does not change what the caller
    /// holds).
    pub fn cfg(&self) -> Rc<PoolConfig> {
        self.cfg.borrow().clone()
    }

    /// Console SET: `cfg` is in force from now on for every lend, wait, check and care tick
    /// of this shard (each connection's lifetime and idle time are measured against the new
    /// values; beyond a smaller `size`, connections are closed as they come back, and idle
    /// ones at the care tick: see [`Pools::above_bound`]).
    pub fn set_cfg(&self, cfg: PoolConfig) {
        let bound = |c: &PoolConfig| c.size.saturating_add(c.reserve_size);
        if bound(&cfg) < bound(&self.cfg.borrow()) {
            self.trim.set(true);
        }
        *self.cfg.borrow_mut() = Rc::new(cfg);
        // A larger bound may let the first waiter of each pool open a connection now.
        for pool in self.all() {
            self.wake_one(&pool);
        }
    }

    /// Whether some shard has a pool of `database` (a client logged in to it, or is trying,
    /// and the pool has not gone since): known at once process-wide, unlike the console's
    /// snapshots.
    pub fn knows_database(&self, database: &str) -> bool {
        self.budgets.knows_database(database)
    }

    /// The pool of (user, database), made on first use; refused when that would make more
    /// than `pool.pairs-max` pairs in the process.
    pub fn pool(&self, user: &str, database: &str) -> Result<Rc<Pool>, PoolError> {
        let max = self.cfg().pairs_max;
        self.pool_within(user, database, Some(max))
            .ok_or_else(|| PoolError::PairsFull {
                user: user.to_string(),
                database: database.to_string(),
                max,
            })
    }

    /// As [`pool`](Self::pool), never refused: for a client that moved from another shard
    /// (its pair was counted when it logged in), and the compare shadow's pools (their pairs
    /// are the clients' own, which the primary's pools or the clients' own connections bound).
    pub fn pool_unbounded(&self, user: &str, database: &str) -> Rc<Pool> {
        self.pool_within(user, database, None)
            .expect("no bound, no refusal")
    }

    fn pool_within(
        &self,
        user: &str,
        database: &str,
        pairs_max: Option<usize>,
    ) -> Option<Rc<Pool>> {
        let mut pools = self.pools.borrow_mut();
        if let Some(pool) = pools.get(&(user.into(), database.into())) {
            // In use again: its idle clock starts anew at the next tick that finds it unused.
            pool.unused_since.set(None);
            return Some(pool.clone());
        }
        let budget = self.budgets.get(user, database, self.shards, pairs_max)?;
        let (user, database): (Rc<str>, Rc<str>) = (user.into(), database.into());
        let login = if self.upstream.url_user == *user && !self.upstream.url_password.is_empty() {
            ServerLogin::Password(self.upstream.url_password.clone())
        } else {
            ServerLogin::None
        };
        let pool = Rc::new(Pool {
            budget,
            user: user.clone(),
            database: database.clone(),
            idle: RefCell::new(Vec::new()),
            open: Cell::new(0),
            connecting: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            waiting: Cell::new(0),
            login: RefCell::new(login),
            clients: Cell::new(0),
            linked: Cell::new(0),
            pinned: Cell::new(0),
            lined: Cell::new(0),
            line_since: Cell::new(None),
            counters: PoolCounters::default(),
            lingering: Cell::new(0),
            demand: Cell::new(0),
            published: Cell::new(0),
            lends_seen: Cell::new(0),
            share: Cell::new(self.cfg().size),
            killed_before: Cell::new(None),
            unused_since: Cell::new(None),
        });
        pools.insert((user, database), pool.clone());
        Some(pool)
    }

    /// Lets the pool of (user, database) go at once if nothing uses it and no connection of
    /// its pair ever opened (its first login failed: the client has the server's error), so
    /// that names clients try leave nothing behind. The caller has dropped its own handle.
    pub fn forget_failed(&self, user: &str, database: &str) {
        let key: (Rc<str>, Rc<str>) = (user.into(), database.into());
        let gone = {
            let mut pools = self.pools.borrow_mut();
            match pools.get(&key) {
                Some(pool) if unused(pool) && pool.budget.params.get().is_none() => {
                    pools.remove(&key)
                }
                _ => None,
            }
        };
        if let Some(pool) = gone {
            self.retire(pool);
        }
    }

    /// A care tick's look for pools nothing uses: those whose pair never had a connection go
    /// at once, the others once unused for `pool.pair-idle-timeout-ms` (0: never) while no
    /// `min-size` is kept on this shard.
    fn remove_unused(&self, now: Instant) {
        let cfg = self.cfg();
        let limit = Duration::from_millis(cfg.pair_idle_timeout_ms);
        let timed = cfg.pair_idle_timeout_ms > 0 && self.min_share() == 0;
        let mut gone = Vec::new();
        self.pools.borrow_mut().retain(|_, pool| {
            if !unused(pool) {
                pool.unused_since.set(None);
                return true;
            }
            let since = *pool.unused_since.get().get_or_insert(now);
            pool.unused_since.set(Some(since));
            let never_opened = pool.budget.params.get().is_none();
            if never_opened || (timed && now.saturating_duration_since(since) >= limit) {
                gone.push(pool.clone());
                return false;
            }
            true
        });
        for pool in gone {
            self.retire(pool);
        }
    }

    /// A pool taken out of the map goes: its counts stay in the shard's totals, its demand
    /// leaves the budget (other shards would otherwise keep sharing the bound out with a
    /// shard that no longer wants any), and the pair's budget goes once no shard holds it.
    fn retire(&self, pool: Rc<Pool>) {
        self.retired.absorb(&pool.counters);
        bump(&self.removed, 1);
        self.publish_demand(&pool, 0);
        let (user, database) = (pool.user.clone(), pool.database.clone());
        drop(pool);
        self.budgets.forget(&user, &database);
    }

    pub fn all(&self) -> Vec<Rc<Pool>> {
        self.pools.borrow().values().cloned().collect()
    }

    /// A connection of `pool` for a client, waiting (bounded) when none is free.
    pub async fn acquire(&self, pool: &Rc<Pool>) -> Result<ServerConn, PoolError> {
        // The common case: an idle connection that needs no check, taken without a clock read
        // beyond the check's own.
        if !self.is_paused(&pool.database) {
            let idle = pool.idle.borrow_mut().pop();
            if let Some(conn) = idle {
                // Most idle connections need neither closing nor a check: lent as they are,
                // without moving through `usable`'s future (a 240-byte copy each way).
                let conn = if self.ready(pool, &conn, Instant::now()) {
                    Some(conn)
                } else {
                    self.usable(pool, conn).await
                };
                if let Some(conn) = conn {
                    bump(&pool.counters.lends, 1);
                    return Ok(conn);
                }
            }
        }
        let started = Instant::now();
        let wait_limit = Duration::from_millis(self.cfg().query_wait_timeout_ms);
        let deadline = started + wait_limit;
        let result = self.acquire_until(pool, started, deadline).await;
        bump(
            &pool.counters.wait_time_us,
            started.elapsed().as_micros() as u64,
        );
        match &result {
            Ok(_) => bump(&pool.counters.lends, 1),
            Err(PoolError::WaitTimeout { .. }) => bump(&pool.counters.wait_timeouts, 1),
            Err(_) => {}
        }
        result
    }

    async fn acquire_until(
        &self,
        pool: &Rc<Pool>,
        started: Instant,
        deadline: Instant,
    ) -> Result<ServerConn, PoolError> {
        if let Some(conn) = self.try_take(pool, started).await? {
            return Ok(conn);
        }
        if pool.waiting.get() >= self.cfg().waiters_max {
            return Err(PoolError::WaitersFull {
                user: pool.user.to_string(),
                database: pool.database.to_string(),
            });
        }
        // Join the queue once and keep the place: connections coming back are handed over
        // in arrival order. Only the first in line also looks every WAIT_RETRY for room other
        // shards made; the others sleep until handed a connection, kicked or timed out.
        let waiter = Rc::new(Waiter {
            conn: RefCell::new(None),
            waker: Cell::new(None),
            since: started,
            done: Cell::new(false),
            kicked: Cell::new(false),
            left: Cell::new(false),
        });
        pool.waiters.borrow_mut().push_back(waiter.clone());
        pool.waiting.set(pool.waiting.get() + 1);
        pool.budget.wanted.fetch_add(1, Ordering::SeqCst);
        self.wake_lingering(pool);
        // A shard that published no demand (its clients were idle) says so now, not at its
        // next tick: the others would otherwise see no reason to make room for it. Its own
        // smoothed figure starts there too (else its next tick would publish nothing again)
        // and its part is worked out at once, not at that tick.
        if pool.published.get() == 0 {
            let now = (pool.linked.get() as usize + pool.waiting.get()) * 16;
            pool.demand.set(pool.demand.get().max(now));
            self.publish_demand(pool, now);
            self.work_out_share(pool);
        }
        // Should this future be dropped while it waits (its caller gave up, its task ended),
        // the place in line and the counts go with it, and a connection handed over
        // meanwhile goes back to the pool instead of being lost with the budget it holds.
        let mut queued = Queued {
            pools: self,
            pool,
            waiter: waiter.clone(),
        };
        let result = loop {
            let now = Instant::now();
            if now >= deadline {
                break Err(PoolError::WaitTimeout {
                    user: pool.user.to_string(),
                    database: pool.database.to_string(),
                    ms: deadline.saturating_duration_since(started).as_millis() as u64,
                });
            }
            let first = pool.first_waiter().is_some_and(|w| Rc::ptr_eq(&w, &waiter));
            let slice = if first {
                WAIT_RETRY.min(deadline - now)
            } else {
                deadline - now
            };
            let _ = within(
                slice,
                futures_lite::future::poll_fn(|cx| {
                    if waiter.conn.borrow().is_some() || waiter.kicked.replace(false) {
                        return Poll::Ready(());
                    }
                    waiter.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }),
            )
            .await;
            let handed = waiter.conn.borrow_mut().take();
            if let Some(conn) = handed {
                break Ok(conn);
            }
            match self.try_take(pool, started).await {
                Ok(Some(conn)) => break Ok(conn),
                Ok(None) => {}
                Err(err) => break Err(err),
            }
        };
        // A connection handed over while this waiter was leaving: taken instead of an error.
        let result = match result {
            Err(err) => waiter.conn.borrow_mut().take().ok_or(err),
            ok => ok,
        };
        queued.leave();
        result
    }

    /// A waiter leaves the line: no longer counted, and a connection handed to it too late
    /// goes to the next in line (or back to the pool), who is woken to look for room.
    fn leave_line(&self, pool: &Rc<Pool>, waiter: &Waiter) {
        if waiter.left.replace(true) {
            return;
        }
        waiter.done.set(true);
        pool.waiting.set(pool.waiting.get().saturating_sub(1));
        pool.budget.wanted.fetch_sub(1, Ordering::AcqRel);
        let late = waiter.conn.borrow_mut().take();
        if let Some(conn) = late {
            self.put_back(pool, conn);
        }
        // The next in line becomes first (and looks for room itself).
        self.wake_one(pool);
    }

    /// An idle connection, or a new one when the bound allows; `None`: wait.
    async fn try_take(
        &self,
        pool: &Rc<Pool>,
        started: Instant,
    ) -> Result<Option<ServerConn>, PoolError> {
        if self.is_paused(&pool.database) {
            return Ok(None);
        }
        loop {
            let idle = pool.idle.borrow_mut().pop();
            let Some(conn) = idle else {
                break;
            };
            if let Some(conn) = self.usable(pool, conn).await {
                return Ok(Some(conn));
            }
        }
        // Clients of other shards wait and this shard holds its part of the bound: free room
        // is theirs (this shard's own connections come back to its waiters). The shards work
        // out their parts from figures read at different ticks, so the parts may not add up
        // to the bound for a tick: room left over under `pool.size` may still go to a shard
        // at its part, one connection beyond it (given back as it returns while others wait).
        let cfg = self.cfg();
        let (open, share) = (pool.open.get(), pool.share.get());
        if pool.others_wait() && (open > share || (open == share && pool.budget.open() >= cfg.size))
        {
            return Ok(None);
        }
        let waited = started.elapsed();
        let limit = if waited >= Duration::from_millis(cfg.reserve_timeout_ms) {
            cfg.size.saturating_add(cfg.reserve_size)
        } else {
            cfg.size
        };
        if pool.budget.try_take(limit) {
            return self.open(pool).await.map(Some).map_err(PoolError::from);
        }
        Ok(None)
    }

    /// Whether an idle connection may be lent as it is: not past its lifetime, and not
    /// idle long enough to be checked first (what [`Pools::usable`] would let through
    /// untouched).
    fn ready(&self, pool: &Pool, conn: &PooledConn, now: Instant) -> bool {
        let cfg = self.cfg();
        !self.stale(pool, conn, now)
            && (cfg.server_check_query.is_empty()
                || now.saturating_duration_since(conn.last_used)
                    < Duration::from_millis(cfg.server_check_delay_ms))
    }

    /// An idle connection about to be lent: closed when too old, checked when idle long.
    async fn usable(&self, pool: &Rc<Pool>, mut conn: ServerConn) -> Option<ServerConn> {
        let now = Instant::now();
        if self.stale(pool, &conn, now) {
            self.close(pool, conn);
            return None;
        }
        let cfg = self.cfg();
        let delay = Duration::from_millis(cfg.server_check_delay_ms);
        if !cfg.server_check_query.is_empty()
            && now.saturating_duration_since(conn.last_used) >= delay
        {
            let check = cfg.server_check_query.clone();
            if run_simple(&mut conn, &check, &self.upstream).await.is_err() {
                bump(&pool.counters.servers_lost, 1);
                self.close(pool, conn);
                return None;
            }
        }
        Some(conn)
    }

    /// Whether a connection of `pool` lent out but free now (a lingering shared one) should
    /// go back for a waiting client: one of this shard still in line, or one of another shard
    /// (the budget's count beyond this shard's) while this shard holds more than its part of
    /// `pool.size` (worked out afresh: the other shard's waiter has just published its
    /// demand), or, with no client of its own waiting, more than its even share of the bound
    /// (a connection with nothing in flight and nobody here to take it serves better there).
    pub fn wants_conn(&self, pool: &Pool) -> bool {
        if pool.first_waiter().is_some() {
            return true;
        }
        if !pool.others_wait() {
            return false;
        }
        self.work_out_share(pool);
        let open = pool.open.get();
        open > pool.share.get()
            || (pool.waiting.get() == 0 && open > self.cfg().size / self.shards.max(1))
    }

    /// A shared connection of `pool` starts (`true`) or stops lingering on this shard with
    /// nothing in flight. The mark is set before the pipeline looks at the budget's waiters
    /// and a waiter counts itself before it reads the marks (both SeqCst), so a waiter on
    /// another shard is either seen by that look or wakes this shard.
    pub fn mark_lingering(&self, pool: &Pool, lingering: bool) {
        let n = pool.lingering.get();
        if lingering {
            pool.lingering.set(n + 1);
            if n == 0 {
                pool.budget.mark(self.shard, true);
            }
        } else if n > 0 {
            pool.lingering.set(n - 1);
            if n == 1 {
                pool.budget.mark(self.shard, false);
            }
        }
    }

    /// A client of `pool` starts waiting: the other shards where a shared connection of the
    /// pair lingers hear of it now (one eventfd write each), not at the end of the linger.
    fn wake_lingering(&self, pool: &Pool) {
        let notifiers = &(self.budgets.1).0;
        if notifiers.is_empty() {
            return;
        }
        for (w, word) in pool.budget.lingering.iter().enumerate() {
            let marks = word.load(Ordering::SeqCst);
            if marks == 0 {
                continue;
            }
            for (shard, notifier) in notifiers.iter().enumerate().skip(w * 64).take(64) {
                if shard != self.shard && marks & (1u64 << (shard % 64)) != 0 {
                    notifier.notify();
                }
            }
        }
    }

    /// This shard's eventfd for [`Pools::wake_lingering`] (None without pipelined lending).
    pub fn wakeup(&self) -> Option<exec::Notifier> {
        (self.budgets.1).0.get(self.shard).cloned()
    }

    /// Whether `conn` of `pool` is [`expired`](Self::expired) or older than the last KILL of
    /// its database.
    fn stale(&self, pool: &Pool, conn: &PooledConn, now: Instant) -> bool {
        self.expired(conn, now)
            || pool
                .killed_before
                .get()
                .is_some_and(|before| conn.opened < before)
    }

    /// Whether `conn` is past `server-lifetime-ms` or older than the last RECONNECT.
    pub fn expired(&self, conn: &PooledConn, now: Instant) -> bool {
        let lifetime = self.cfg().server_lifetime_ms;
        (lifetime > 0
            && now.saturating_duration_since(conn.opened) >= Duration::from_millis(lifetime))
            || self
                .reconnect_before
                .get()
                .is_some_and(|before| conn.opened < before)
    }

    async fn open(&self, pool: &Rc<Pool>) -> Result<ServerConn, super::BackendError> {
        pool.open.set(pool.open.get() + 1);
        pool.connecting.set(pool.connecting.get() + 1);
        let params = [("user", &*pool.user), ("database", &*pool.database)];
        let login = pool.login.borrow().clone();
        let up = &self.upstream;
        let opened = super::open_as(
            &up.addr.get(),
            up.connect_timeout,
            &params,
            &login,
            &pool.user,
            up.message_bytes_max,
            &up.tls,
        )
        .await;
        pool.connecting.set(pool.connecting.get() - 1);
        match opened {
            Ok(opened) => {
                let _ = pool.budget.params.set(opened.params);
                bump(&pool.counters.servers_opened, 1);
                let id = self.next_id.get();
                self.next_id.set(id + 1);
                let now = Instant::now();
                Ok(Box::new(PooledConn {
                    id: ((self.shard as u64) << 40) | id,
                    stream: opened.stream,
                    buf: opened.leftover,
                    key: opened.key,
                    opened: now,
                    opened_at: SystemTime::now(),
                    last_used: now,
                    settings: NO_SETTINGS,
                    prepared: PreparedSet::default(),
                    sql_prepared: HashMap::new(),
                    unnamed: None,
                    dirty: false,
                }))
            }
            Err(err) => {
                pool.open.set(pool.open.get() - 1);
                pool.budget.give_back();
                self.wake_one(pool);
                Err(err)
            }
        }
    }

    /// As [`release`](Self::release) of a clean connection, without an await, when nothing
    /// needs resetting; otherwise the connection comes back for `release`.
    pub fn release_now(&self, pool: &Rc<Pool>, mut conn: ServerConn) -> Option<ServerConn> {
        if conn.dirty {
            return Some(conn);
        }
        conn.last_used = Instant::now();
        self.put_back(pool, conn);
        None
    }

    /// A connection comes back from a client. `clean`: at a transaction boundary with
    /// nothing in flight and nothing left that another client must not see; otherwise it is
    /// closed (never lent dirty).
    pub async fn release(&self, pool: &Rc<Pool>, mut conn: ServerConn, clean: bool) {
        conn.last_used = Instant::now();
        if !clean {
            bump(&pool.counters.dirty_closed, 1);
            self.close(pool, conn);
            return;
        }
        if conn.dirty {
            let reset = self.cfg().server_reset_query.clone();
            if reset.is_empty() || run_simple(&mut conn, &reset, &self.upstream).await.is_err() {
                bump(&pool.counters.dirty_closed, 1);
                self.close(pool, conn);
                return;
            }
            conn.forget_state();
            conn.dirty = false;
        }
        self.put_back(pool, conn);
    }

    /// As [`release`](Self::release) of a clean connection, without an await when nothing
    /// needs resetting (the pooled compare shadow gives connections back from a read).
    pub fn give_back(self: &Rc<Self>, pool: &Rc<Pool>, mut conn: ServerConn) {
        if conn.dirty {
            let (pools, pool) = (self.clone(), pool.clone());
            exec::spawn(async move { pools.release(&pool, conn, true).await });
            return;
        }
        conn.last_used = Instant::now();
        self.put_back(pool, conn);
    }

    fn put_back(&self, pool: &Rc<Pool>, conn: ServerConn) {
        if self.stale(pool, &conn, conn.last_used) {
            self.close(pool, conn);
            return;
        }
        // Beyond the pair's bound (a console SET lowered it): closed rather than handed on,
        // or the pair would stay above it for as long as clients wait (until lifetimes
        // ran out). A waiter then opens one within the bound or takes the next to come back.
        if self.above_bound(pool) {
            self.close(pool, conn);
            return;
        }
        // Paused (console PAUSE): nothing is lent until RESUME.
        if self.is_paused(&pool.database) {
            pool.idle.borrow_mut().push(conn);
            return;
        }
        // A client of this shard waits: hand it over directly, first come first served;
        // unless clients of other shards wait too and this shard holds more than its part of
        // the bound: then the room goes to them (they open a connection in its place).
        if let Some(waiter) = pool.first_waiter() {
            if pool.others_wait() && pool.open.get() > pool.share.get() {
                bump(&pool.counters.servers_yielded, 1);
                self.close(pool, conn);
                return;
            }
            pool.waiters.borrow_mut().pop_front();
            waiter.done.set(true);
            *waiter.conn.borrow_mut() = Some(conn);
            if let Some(waker) = waiter.waker.take() {
                waker.wake();
            }
            return;
        }
        // Clients of another shard wait for this pair at the bound: make room for them, out of
        // what this shard holds beyond its part (its part it keeps for its own clients, who
        // may come back at once; should they not, its demand and so its part fall within a
        // few care ticks).
        if pool.others_wait() && pool.open.get() > pool.share.get() {
            bump(&pool.counters.servers_yielded, 1);
            self.close(pool, conn);
            return;
        }
        pool.idle.borrow_mut().push(conn);
    }

    /// Whether the pair has more connections serving, over every shard, than its bound now
    /// allows: `pool.size` plus `reserve-size` (what PgBouncer trims a pool to; reserve
    /// connections opened for clients that waited past `reserve-timeout-ms` are kept as
    /// PgBouncer keeps them). Only a console SET that lowered a bound makes it so; the
    /// budget's count is process-wide, so it holds whatever each shard's part of the bound.
    pub(crate) fn above_bound(&self, pool: &Pool) -> bool {
        // Per returned connection: one read unless a SET lowered the bound.
        if !self.trim.get() {
            return false;
        }
        let bound = {
            let cfg = self.cfg.borrow();
            cfg.size.saturating_add(cfg.reserve_size)
        };
        pool.budget.serving() > bound
    }

    /// Closes a connection (Terminate, then the socket) and frees its place in the budget
    /// once the server has closed its end (`pool.server-close-wait-ms`): until then its
    /// backend still counts against the server's `max_connections`, and a connection opened
    /// in its place would take the pair past `pool.size` as the server counts.
    pub fn close(&self, pool: &Rc<Pool>, conn: ServerConn) {
        let wait = Duration::from_millis(self.cfg().server_close_wait_ms);
        self.close_after(pool, conn, wait);
    }

    /// Closes `conn` now, without waiting for the server to end its side (and without a
    /// task: usable while a shard's sessions are being dropped).
    pub fn close_now(&self, pool: &Rc<Pool>, conn: ServerConn) {
        self.close_after(pool, conn, Duration::ZERO);
    }

    fn close_after(&self, pool: &Rc<Pool>, mut conn: ServerConn, wait: Duration) {
        let mut bye = BytesMut::new();
        wire::encode::terminate(&mut bye);
        conn.stream.write_now(&bye);
        pool.open.set(pool.open.get().saturating_sub(1));
        bump(&pool.counters.servers_closed, 1);
        if wait.is_zero() {
            conn.stream.shutdown();
            pool.budget.give_back();
            wake_one(pool);
            return;
        }
        conn.stream.shutdown_write();
        pool.budget.closing.fetch_add(1, Ordering::AcqRel);
        let pool = pool.clone();
        crate::exec::spawn(async move {
            // The server ends its side after the Terminate: end-of-stream (or an error) is
            // the backend gone. What it still sends (a notice) is read and dropped.
            let gone = async {
                loop {
                    conn.buf.clear();
                    match conn.stream.read_buf(&mut conn.buf, 4096).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            let _ = crate::exec::within(wait, gone).await;
            conn.stream.shutdown();
            // Open first: for a moment the pair counts one too few serving, never one too
            // many (which could close one more).
            pool.budget.give_back();
            pool.budget.closing.fetch_sub(1, Ordering::AcqRel);
            wake_one(&pool);
        });
    }

    /// A connection that broke while lent (its socket is gone): free its place.
    pub fn lost(&self, pool: &Rc<Pool>, conn: ServerConn) {
        bump(&pool.counters.servers_lost, 1);
        self.close(pool, conn);
    }

    /// Room was made in the budget: the first local waiter may open a connection now
    /// rather than at its next retry.
    fn wake_one(&self, pool: &Pool) {
        wake_one(pool);
    }

    /// Periodic care: close idle connections past their idle timeout or lifetime (keeping
    /// `min-size`), make room for other shards' waiting clients, open up to `min-size`, let
    /// unused pools go.
    pub fn maintain(self: &Rc<Self>) {
        /// How long an idle connection of a shard without waiters is kept within its part
        /// while clients of other shards wait.
        const IDLE_YIELD: Duration = Duration::from_millis(100);
        let now = Instant::now();
        let cfg = self.cfg();
        let idle_limit = cfg.server_idle_timeout_ms;
        let bound = cfg.size.saturating_add(cfg.reserve_size);
        let trimming = self.trim.get();
        let mut still_above = false;
        for pool in self.all() {
            still_above |= trimming && pool.budget.serving() > bound;
            self.share_out(&pool);
            let mut closing = Vec::new();
            {
                let mut idle = pool.idle.borrow_mut();
                let keep = self.min_share();
                let mut i = 0;
                while i < idle.len() {
                    let conn = &idle[i];
                    let idle_for = now.saturating_duration_since(conn.last_used);
                    let too_idle = idle_limit > 0
                        && idle_for.as_millis() as u64 >= idle_limit
                        && pool.open.get() - closing.len() > keep;
                    // Beyond its part; or, with no client of this shard waiting, unused
                    // for longer than a pause between one client's transactions (its part
                    // may stay up for a few ticks after its clients went, while another
                    // shard's client waits out `query-wait-timeout-ms`).
                    let others_wait = pool.budget.wanted() > pool.waiting.get() + closing.len()
                        && pool.waiting.get() == 0
                        && (pool.open.get() - closing.len() > pool.share.get()
                            || idle_for >= IDLE_YIELD);
                    let expired = self.stale(&pool, conn, now);
                    // Beyond a bound a console SET lowered (see `above_bound`).
                    let above =
                        trimming && pool.budget.serving().saturating_sub(closing.len()) > bound;
                    if others_wait && !too_idle && !expired {
                        bump(&pool.counters.servers_yielded, 1);
                    }
                    if too_idle || expired || others_wait || above {
                        closing.push(idle.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            for conn in closing {
                self.close(&pool, conn);
            }
            let share = self.min_share();
            let known_login = !matches!(*pool.login.borrow(), ServerLogin::None)
                || pool.budget.params.get().is_some();
            if known_login && pool.open.get() < share && pool.budget.try_take(cfg.size) {
                let pools = self.clone();
                let pool = pool.clone();
                exec::spawn(async move {
                    if let Ok(conn) = pools.open(&pool).await {
                        pools.put_back(&pool, conn);
                    }
                });
            }
        }
        if trimming && !still_above {
            self.trim.set(false);
        }
        self.remove_unused(now);
    }

    /// A care tick's part in sharing the bound out by demand: this shard's demand (clients
    /// in a transaction or waiting) smoothed and published, and its part of `pool.size`
    /// worked out from every shard's published demand.
    fn share_out(&self, pool: &Pool) {
        // A shard that lent a connection since the last tick counts at least one client,
        // though none was in a transaction at the tick: a client busy part of the time keeps
        // its part (and its connection) instead of losing it at every return.
        let lends = pool.counters.lends.get();
        let lent = lends != pool.lends_seen.get();
        pool.lends_seen.set(lends);
        let busy = pool.linked.get() as usize + pool.waiting.get() + pool.lined.get();
        let sample = busy.max(usize::from(lent)) * 16;
        let smoothed = pool.demand.get() - pool.demand.get() / 4 + sample / 4;
        pool.demand.set(smoothed);
        // Never below one client while one is in a transaction, waits or was lent to, nor
        // soon after (until the smoothed figure falls under a quarter client, some 7 ticks):
        // a client pausing between transactions keeps its part and its connection.
        let figure = if sample > 0 || (pool.published.get() > 0 && smoothed >= 4) {
            smoothed.max(16)
        } else if smoothed < 16 {
            0
        } else {
            smoothed
        };
        // Published only when it moved by more than an eighth (or to or from nothing), so
        // that every shard works out its part from the same figures and the parts add up to
        // the bound, instead of each shard's tick moving a connection back and forth.
        let published = pool.published.get();
        if figure.abs_diff(published) > (published / 8).max(16) || (figure == 0) != (published == 0)
        {
            self.publish_demand(pool, figure);
        }
        self.work_out_share(pool);
    }

    /// This shard's part of `pool.size` from every shard's published demand (its own counted
    /// as at least one client while its clients wait), in the current rotation slot.
    fn work_out_share(&self, pool: &Pool) {
        let mut demand: Vec<usize> = pool
            .budget
            .demand
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect();
        if pool.waiting.get() > 0
            && let Some(mine) = demand.get_mut(self.shard)
        {
            *mine = (*mine).max(16);
        }
        pool.share.set(apportion(
            self.cfg().size,
            &demand,
            self.shard,
            rotation_slot(),
        ));
    }

    fn publish_demand(&self, pool: &Pool, demand: usize) {
        pool.published.set(demand);
        if let Some(slot) = pool.budget.demand.get(self.shard) {
            slot.store(demand, Ordering::Relaxed);
        }
    }

    /// Console PAUSE/RESUME: everything, or these databases.
    pub fn set_paused(&self, all: bool, databases: Vec<String>) {
        let was = self.paused.get() || !self.paused_databases.borrow().is_empty();
        self.paused.set(all);
        *self.paused_databases.borrow_mut() = databases;
        if was {
            // Resumed (some of) them: the first waiter of each pool looks again.
            for pool in self.all() {
                if !self.is_paused(&pool.database) {
                    self.wake_one(&pool);
                }
            }
        }
    }

    pub fn is_paused(&self, database: &str) -> bool {
        self.paused.get() || self.paused_databases.borrow().iter().any(|d| d == database)
    }

    /// This shard's part of `min-size` (the process-wide minimum).
    fn min_share(&self) -> usize {
        let min = self.cfg().min_size;
        min / self.shards + usize::from(self.shard < min % self.shards)
    }

    /// Console RECONNECT: connections opened before now are closed as they come back.
    pub fn reconnect(&self) {
        self.reconnect_before.set(Some(Instant::now()));
        for pool in self.all() {
            let conns: Vec<_> = pool.idle.borrow_mut().drain(..).collect();
            for conn in conns {
                self.close(&pool, conn);
            }
        }
    }

    /// Console KILL: the connections of `database`'s pools opened before now are closed, the
    /// idle ones at once, the lent ones when they come back (their clients are being closed).
    pub fn kill_database(&self, database: &str) {
        let now = Instant::now();
        for pool in self.all() {
            if &*pool.database != database {
                continue;
            }
            pool.killed_before.set(Some(now));
            let conns: Vec<_> = pool.idle.borrow_mut().drain(..).collect();
            for conn in conns {
                self.close(&pool, conn);
            }
        }
    }

    /// Closes every idle connection (shutdown).
    pub fn close_idle(&self) {
        for pool in self.all() {
            let conns: Vec<_> = pool.idle.borrow_mut().drain(..).collect();
            for conn in conns {
                self.close(&pool, conn);
            }
        }
    }

    /// This shard's pools for the console.
    pub fn rows(&self, mode: &'static str) -> (Vec<PoolRow>, Vec<ServerRow>) {
        let now = Instant::now();
        let mut rows = Vec::new();
        let mut servers = Vec::new();
        let cfg = self.cfg();
        let check_delay = Duration::from_millis(cfg.server_check_delay_ms);
        for pool in self.all() {
            let idle = pool.idle.borrow();
            let used = idle
                .iter()
                .filter(|c| now.saturating_duration_since(c.last_used) >= check_delay)
                .count() as u64;
            let lent = pool.open.get() - idle.len() - pool.connecting.get();
            let c = &pool.counters;
            rows.push(PoolRow {
                database: pool.database.to_string(),
                user: pool.user.to_string(),
                pool_mode: mode,
                cl_active: pool.linked.get(),
                cl_waiting: (pool.waiting.get() + pool.lined.get()) as u64,
                cl_idle: pool
                    .clients
                    .get()
                    .saturating_sub(pool.linked.get() + pool.lined.get() as u64),
                sv_active: lent as u64,
                sv_idle: idle.len() as u64 - used,
                sv_used: used,
                sv_tested: 0,
                sv_login: pool.connecting.get() as u64,
                maxwait_us: pool.max_wait(now).as_micros() as u64,
                pinned: pool.pinned.get(),
                pool_size: cfg.size as u64,
                reserve_size: cfg.reserve_size as u64,
                min_size: cfg.min_size as u64,
                xact_count: c.xact_count.get(),
                query_count: c.query_count.get(),
                bytes_received: c.bytes_received.get(),
                bytes_sent: c.bytes_sent.get(),
                xact_time_us: c.xact_time_us.get(),
                query_time_us: c.query_time_us.get(),
                wait_time_us: c.wait_time_us.get(),
                servers_opened: c.servers_opened.get(),
                servers_closed: c.servers_closed.get(),
                lends: c.lends.get(),
                wait_timeouts: c.wait_timeouts.get(),
                pins: c.pins.get(),
                reprepares: c.reprepares.get(),
                settings_applied: c.settings_applied.get(),
            });
            for conn in idle.iter() {
                servers.push(self.server_row(&pool, conn, None, now, check_delay));
            }
        }
        (rows, servers)
    }

    /// A server row for SHOW SERVERS (`link`: the client it is lent to).
    pub fn server_row(
        &self,
        pool: &Pool,
        conn: &PooledConn,
        link: Option<u64>,
        now: Instant,
        check_delay: Duration,
    ) -> ServerRow {
        let state = if link.is_some() {
            "active"
        } else if now.saturating_duration_since(conn.last_used) >= check_delay {
            "used"
        } else {
            "idle"
        };
        let (addr, port) = match self.upstream.addr.get() {
            crate::config::Endpoint::Tcp(a) => (a.ip().to_string(), a.port()),
            crate::config::Endpoint::Unix(p) => (p.display().to_string(), 0),
        };
        ServerRow {
            id: conn.id,
            shard: self.shard,
            user: pool.user.to_string(),
            database: pool.database.to_string(),
            state,
            addr,
            port,
            local_addr: String::new(),
            local_port: 0,
            connect_time: conn.opened_at,
            request_time: SystemTime::now() - now.saturating_duration_since(conn.last_used),
            link,
            remote_pid: conn.key.map(|k| k.0).unwrap_or(0),
            tls: conn.stream.is_tls(),
            prepared_statements: conn.prepared.len() as u64,
        }
    }
}

/// Runs one simple query on an otherwise idle connection and reads up to its ReadyForQuery
/// (within the connect timeout); `Err` when the server errs, closes or takes too long.
pub async fn run_simple(conn: &mut PooledConn, sql: &str, up: &Upstream) -> Result<(), ()> {
    // A simple query replaces the unnamed statement.
    conn.unnamed = None;
    let mut out = BytesMut::new();
    wire::encode::query(&mut out, sql).map_err(|_| ())?;
    conn.stream.write_all(&out).await.map_err(|_| ())?;
    let limit = up.connect_timeout;
    let max = up.message_bytes_max;
    let read = async {
        let mut failed = false;
        loop {
            while let Some(frame) = wire::split_message(&mut conn.buf, max).map_err(|_| ())? {
                match frame.tag() {
                    tag::ERROR_RESPONSE => failed = true,
                    tag::READY_FOR_QUERY => {
                        return if failed || frame.body().first() != Some(&b'I') {
                            Err(())
                        } else {
                            Ok(())
                        };
                    }
                    _ => {}
                }
            }
            match conn.stream.read_buf(&mut conn.buf, 8192).await {
                Ok(0) | Err(_) => return Err(()),
                Ok(_) => {}
            }
        }
    };
    within(limit, read).await.unwrap_or(Err(()))
}

/// How long one rotation slot of [`apportion`] lasts: while more shards have demand than
/// `pool.size` allows connections, which of them get one changes every slot.
const ROTATION_SLOT: Duration = Duration::from_secs(1);

/// The current rotation slot, the same on every shard (counted from one process-wide
/// start).
fn rotation_slot() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    (start.elapsed().as_millis() / ROTATION_SLOT.as_millis()) as u64
}

/// Shard `me`'s part of `size` connections shared out in proportion to each shard's
/// `demand` (largest remainders, ties to the shard first from `slot`'s starting point, so
/// that the parts add up to `size`), every shard with some demand getting at least one
/// while `size` allows: a shard with a single waiting client is never left without a
/// connection of its own. More shards with demand than `size`: one connection each to
/// `size` of them, taken in turn from a starting point that moves on by `size` every
/// `slot`, so that every one of them is served within ceil(shards / size) slots. No demand
/// anywhere: no limit (`size`).
fn apportion(size: usize, demand: &[usize], me: usize, slot: u64) -> usize {
    let total: usize = demand.iter().sum();
    if total == 0 || me >= demand.len() {
        return size;
    }
    let n = demand.len();
    // Shard i's place in this slot's order.
    let start = ((slot % n as u64) as usize * (size % n)) % n;
    let place = |i: usize| (i + n - start) % n;
    let wanting = demand.iter().filter(|&&d| d > 0).count();
    if wanting > size {
        if demand[me] == 0 {
            return 0;
        }
        let before = (0..n)
            .filter(|&i| demand[i] > 0 && place(i) < place(me))
            .count();
        return usize::from(before < size);
    }
    // (part, remainder) per shard.
    let mut parts: Vec<(usize, usize)> = demand
        .iter()
        .map(|&d| (size * d / total, size * d % total))
        .collect();
    let mut left = size - parts.iter().map(|p| p.0).sum::<usize>();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| parts[b].1.cmp(&parts[a].1).then(place(a).cmp(&place(b))));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i].0 += 1;
        left -= 1;
    }
    while let Some(starved) = (0..parts.len()).find(|&i| demand[i] > 0 && parts[i].0 == 0) {
        let Some(largest) = (0..parts.len()).max_by_key(|&i| (parts[i].0, std::cmp::Reverse(i)))
        else {
            break;
        };
        if parts[largest].0 <= 1 {
            break;
        }
        parts[largest].0 -= 1;
        parts[starved].0 += 1;
    }
    parts[me].0
}

/// Whether nothing uses `pool` (held by its shard's map alone): no client (a session holds
/// the pool), no waiter, no connection open, being opened or closing (a closing connection's
/// task holds the pool until the server has closed its end and the budget has its place back).
fn unused(pool: &Rc<Pool>) -> bool {
    Rc::strong_count(pool) == 1
        && pool.open.get() == 0
        && pool.clients.get() == 0
        && pool.waiting.get() == 0
        && pool.lined.get() == 0
}

/// Room was made in `pool`'s budget: its first local waiter may open a connection now
/// rather than at its next retry.
fn wake_one(pool: &Pool) {
    if let Some(waiter) = pool.first_waiter() {
        waiter.kicked.set(true);
        if let Some(waker) = waiter.waker.take() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_set_evicts_the_least_recently_used() {
        let mut set = PreparedSet::default();
        assert_eq!(set.insert(1, 2), Vec::<u64>::new());
        assert_eq!(set.insert(2, 2), Vec::<u64>::new());
        assert!(set.contains(1));
        assert_eq!(set.insert(3, 2), [2]);
        assert!(set.contains(1) && set.contains(3) && !set.contains(2));
    }

    /// A console SET that lowers `max_prepared_statements` shrinks a connection's set to the
    /// new bound at its next insert, the least recently used going first (evicting one per
    /// insert, as before, left it above the bound for good).
    #[test]
    fn prepared_set_shrinks_to_a_lowered_bound_at_once() {
        let mut set = PreparedSet::default();
        for hash in 1..=6 {
            assert_eq!(set.insert(hash, 10), Vec::<u64>::new());
        }
        assert!(set.contains(2) && set.contains(5));
        // Least recently used first: 1, 3, 4, 6, then 2 and 5.
        assert_eq!(set.insert(7, 3), [1, 3, 4, 6]);
        assert_eq!(set.len(), 3);
        assert!(set.holds(2) && set.holds(5) && set.holds(7));
        assert_eq!(set.insert(8, 3), [2]);
    }

    #[test]
    fn budget_holds_its_bound() {
        let b = Budget::default();
        assert!(b.try_take(2) && b.try_take(2));
        assert!(!b.try_take(2));
        b.give_back();
        assert!(b.try_take(2));
        assert_eq!(b.open(), 2);
    }

    #[test]
    fn the_bound_is_shared_out_by_demand_and_adds_up() {
        // The session-12 measurement: 27 and 37 clients busy, pool 20.
        assert_eq!(apportion(20, &[27, 37], 0, 0), 8);
        assert_eq!(apportion(20, &[27, 37], 1, 0), 12);
        // No demand anywhere: no limit; demand on one shard only: all of it.
        assert_eq!(apportion(20, &[0, 0], 1, 0), 20);
        assert_eq!(apportion(20, &[5, 0], 0, 0), 20);
        assert_eq!(apportion(20, &[5, 0], 1, 0), 0);
        // One waiting client against a hundred still gets a connection.
        assert_eq!(apportion(2, &[100, 1], 1, 0), 1);
        assert_eq!(apportion(2, &[100, 1], 0, 0), 1);
        // The parts add up to the bound, in every slot.
        for slot in 0..7 {
            for size in 1..12 {
                for demand in [[3usize, 1, 7], [1, 1, 1], [0, 9, 2], [50, 1, 1]] {
                    let sum: usize = (0..3).map(|s| apportion(size, &demand, s, slot)).sum();
                    assert_eq!(sum, size, "size {size}, demand {demand:?}, slot {slot}");
                }
            }
        }
    }

    #[test]
    fn more_shards_with_demand_than_connections_take_turns() {
        // 32 shards all busy on pool.size 20 (review finding: shards 20-31 got 0 for good),
        // uneven demand, a few shards idle, sizes that divide the shard count or not.
        let even = [16usize; 32];
        let uneven: Vec<usize> = (0..32).map(|i| 16 + (i * 7) % 23).collect();
        let gaps: Vec<usize> = (0..32).map(|i| if i % 5 == 0 { 0 } else { 16 }).collect();
        let three = [40usize, 16, 16];
        let cases: [(usize, &[usize]); 7] = [
            (20, &even),
            (20, &uneven),
            (20, &gaps),
            (8, &even),
            (5, &gaps),
            (2, &three),
            (1, &three),
        ];
        for (size, demand) in cases {
            let n = demand.len();
            let mut served = vec![0usize; n];
            let slots = n.div_ceil(size) as u64;
            for slot in 0..slots {
                let parts: Vec<usize> = (0..n).map(|s| apportion(size, demand, s, slot)).collect();
                assert_eq!(
                    parts.iter().sum::<usize>(),
                    size,
                    "size {size}, slot {slot}"
                );
                for (s, &p) in parts.iter().enumerate() {
                    if p > 0 {
                        assert!(demand[s] > 0, "shard {s} without demand got {p}");
                        served[s] += 1;
                    }
                }
            }
            for s in 0..n {
                assert!(
                    demand[s] == 0 || served[s] > 0,
                    "size {size}: shard {s} of {n} never got a connection in {slots} slots"
                );
            }
        }
    }

    #[test]
    fn the_budgets_map_bounds_pairs_and_keeps_those_a_shard_holds() {
        let budgets = Budgets::default();
        let a = budgets.get("u", "a", 2, Some(2)).expect("first pair");
        let b = budgets.get("u", "b", 2, Some(2)).expect("second pair");
        assert!(
            budgets.get("u", "c", 2, Some(2)).is_none(),
            "beyond the bound"
        );
        let again = budgets
            .get("u", "a", 2, Some(2))
            .expect("a known pair is no new one");
        assert!(Arc::ptr_eq(&a, &again));
        // One shard lets a's pool go, the other still holds it: the budget stays.
        drop(again);
        budgets.forget("u", "a");
        assert_eq!(budgets.pairs(), 2);
        drop(a);
        budgets.forget("u", "a");
        assert_eq!(budgets.pairs(), 1);
        assert!(budgets.get("u", "c", 2, Some(2)).is_some(), "room again");
        drop(b);
        assert!(budgets.get("u", "d", 2, None).is_some(), "no bound");
    }

    #[test]
    fn lingering_marks_of_shards_64_apart_are_their_own() {
        let budgets = Budgets::with_wakeups(130).expect("eventfds");
        let b = budgets.get("u", "d", 130, None).expect("no bound");
        b.mark(0, true);
        b.mark(64, true);
        b.mark(128, true);
        b.mark(0, false);
        assert!(!b.marked(0));
        assert!(
            b.marked(64) && b.marked(128),
            "shard 0's unmark left the others marked"
        );
        b.mark(128, false);
        assert!(b.marked(64) && !b.marked(128));
    }
}
