//! Pooled mirror connections (`mirror[].pool-size` above 0): per shard and per mirror, a few
//! connections shared by every client session of the shard, so a mirror's connection count no
//! longer depends on the number of clients.
//!
//! A session's link (`Link`) collects the session's frames for the mirror until the session
//! stands at a transaction boundary (the router says when: a sync point outside a transaction
//! block), then hands the whole unit (one autocommit statement or batch, or BEGIN..COMMIT) to
//! its pool here. A pool connection takes the units that are ready when its writer wakes, makes
//! itself match each unit's session first (its settings, and the statement names the unit
//! creates) and sends them all in one write. It reads and counts the answers as a link does.
//!
//! Ordering: a session's units reach the mirror in the session's order, because a session
//! with a unit on a connection (sent or being sent, its answer not yet read) is bound to that
//! connection: its next units go there, behind it, until every one was answered or lost. Units
//! of different sessions run on different connections concurrently, so they may apply on the
//! mirror in another order than on the primary (two sessions' updates of one row, say).
//!
//! It must never send part of a unit unless the rest follows on the same connection, never
//! leave a unit that was lost uncounted, and never hold more connections than the shard's
//! share of the pool size.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::MirrorTarget;
use super::link::{BATCH_BYTES_MAX, Item, READ_CHUNK, count_sent, signal_or_read};
use super::stats::MirrorStats;
pub(super) use crate::backend::replay::{DIRTY, Snapshot, baseline, combined, signature};
use crate::backend::replay::{FRESH, RESET_SQL, query_frame};
use crate::exec::net::Stream;
use crate::exec::{self, within};
use crate::stats::fingerprints::Fingerprints;
use crate::wire::{self, ObjectKind, tag};

/// Statement names one pool connection follows. Sessions come and go, and their statements
/// stay prepared on the connection until a unit closes or replaces them: past this many the
/// connection drops them all (`DEALLOCATE ALL`, before the next unit) rather than grow
/// without bound. Not a config key: it bounds pgprism's bookkeeping of the mirror's own state,
/// and the units that follow prepare again what they use.
const CONNECTION_NAMES_MAX: usize = 10_000;

/// What a frame of a unit does to the connection's prepared statements (statement and
/// SQL-level names share one namespace). The unnamed statement is never followed: a unit
/// that uses it without parsing it parses it again.
pub(super) enum Names {
    /// Creates `name` from `ident` (the Parse frame or PREPARE text; `None` when not kept).
    /// `elidable`: the frame is pgprism's own preparation of it again and does nothing else,
    /// so it is left out where the connection has that very statement already.
    Create {
        name: String,
        ident: Option<Bytes>,
        elidable: bool,
    },
    Drop(String),
    /// DEALLOCATE ALL, DISCARD ALL.
    DropAll,
}

/// One change to the statement names, made by the unit's item at index `at`.
pub(super) struct Effect {
    pub(super) at: usize,
    pub(super) names: Names,
}

/// What a session's link and its units share: what of the session waits in the pool (bounded
/// with the link's own queue by `queue-messages-max` and `queue-bytes-max`), and which
/// connection the session is bound to while one of its units is there.
#[derive(Default)]
pub(super) struct Share {
    pub(super) messages: Cell<usize>,
    pub(super) bytes: Cell<usize>,
    /// The client, waiting for room under the `block` policy.
    pub(super) space: Cell<Option<Waker>>,
    bound: Cell<Option<u64>>,
    units: Cell<usize>,
    /// A client's cancel, as far as this mirror goes (see `backend::cancel::Pending`).
    pub(super) cancel: crate::backend::cancel::Pending,
    /// The pool connection the session's unit runs on now (its key) and the client sync
    /// point it runs there (None: nothing of the session's).
    running: Rc<super::link::Running>,
    /// The writes of the pool connection it runs on, held while a cancel is on its way.
    hold: RefCell<Rc<super::link::Hold>>,
}

impl Share {
    /// Cancels the session's statement on the connection running it, when it is the one
    /// the client's cancel reached on the primary.
    pub(super) fn check_cancel(&self, target: &Rc<MirrorTarget>) {
        let hold = self.hold.borrow().clone();
        super::link::check_cancel(target, &self.cancel, &self.running, &hold);
    }

    fn runs(
        &self,
        target: &Rc<MirrorTarget>,
        key: Option<(i32, i32)>,
        seq: Option<u64>,
        alone: bool,
        hold: &Rc<super::link::Hold>,
    ) {
        self.running.set((key, seq, alone));
        *self.hold.borrow_mut() = hold.clone();
        self.check_cancel(target);
    }

    fn bind(&self, conn: u64) {
        crate::invariant!(
            self.bound.get().is_none_or(|b| b == conn),
            "a session's unit was taken by a connection it is not bound to",
        );
        self.bound.set(Some(conn));
        self.units.set(self.units.get() + 1);
    }

    /// One of the session's units was answered or lost.
    fn unit_done(&self) {
        let Some(units) = self.units.get().checked_sub(1) else {
            crate::invariant::failed("a session finished more units than it had on a connection");
        };
        self.units.set(units);
        if units == 0 {
            self.bound.set(None);
        }
    }

    /// A frame of `len` bytes left the pool (written, or dropped).
    fn release(&self, stats: &MirrorStats, len: usize) {
        self.messages.set(self.messages.get().saturating_sub(1));
        self.bytes.set(self.bytes.get().saturating_sub(len));
        stats
            .queue_messages
            .set(stats.queue_messages.get().saturating_sub(1));
        stats
            .queue_bytes
            .set(stats.queue_bytes.get().saturating_sub(len as u64));
        if let Some(w) = self.space.take() {
            w.wake();
        }
    }
}

/// One session's transaction (or autocommit statement or batch), whole, for a pool.
pub(super) struct Unit {
    pub(super) share: Rc<Share>,
    pub(super) items: Vec<Item>,
    pub(super) effects: Vec<Effect>,
    /// The session's startup parameters as settings.
    pub(super) baseline: Rc<Snapshot>,
    /// The session's settings when the unit began.
    pub(super) before: Rc<Snapshot>,
    /// The connection's signature once the unit ran (`DIRTY` when unknown).
    pub(super) after: u64,
    /// It may end inside a transaction block (it holds transaction control): an internal
    /// ROLLBACK follows it at once, so the units written behind it never run in its block.
    pub(super) guard: bool,
    pub(super) closed: Instant,
    pub(super) bytes: usize,
}

impl Unit {
    /// Drops a unit that will not be sent, counting its frames under `counter`.
    fn drop_counted(self, stats: &MirrorStats, counter: &Cell<u64>) {
        for item in &self.items {
            self.share.release(stats, item.frame.len());
            MirrorStats::bump(counter, 1);
        }
    }
}

/// Who a pool's connections log in as: the pools of a mirror are per user, database and
/// startup `options` (what a session cannot change once connected).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) user: String,
    pub(super) database: String,
    pub(super) options: String,
}

/// A mirror's pools on one shard, and the shard's share of its connections.
pub(super) struct Pools {
    share: usize,
    /// Connections held now over every pool (opening, open, or waiting to open again).
    held: Cell<usize>,
    by_key: RefCell<HashMap<Key, Rc<Pool>>>,
    /// Pools with units waiting and no connection, while every connection is held elsewhere:
    /// the next connection that goes idle elsewhere closes and leaves them its place.
    starving: RefCell<VecDeque<Weak<Pool>>>,
    next_id: Cell<u64>,
}

impl Pools {
    /// `share`: this shard's connections at most (at least 1; see `shard_share`).
    pub(super) fn new(share: usize) -> Pools {
        Pools {
            share: share.max(1),
            held: Cell::new(0),
            by_key: RefCell::new(HashMap::new()),
            starving: RefCell::new(VecDeque::new()),
            next_id: Cell::new(0),
        }
    }

    /// The pool of connections logging in as `key` says, with `password`; a new one reads
    /// answers of up to `message_bytes_max` bytes and times statements into `fingerprints`
    /// (the shard's).
    pub(super) fn pool(
        &self,
        key: Key,
        password: &str,
        message_bytes_max: usize,
        fingerprints: &Rc<Fingerprints>,
    ) -> Rc<Pool> {
        let mut by_key = self.by_key.borrow_mut();
        if let Some(pool) = by_key.get(&key) {
            return pool.clone();
        }
        // Forget the pools nobody uses any more (no session, no connection, nothing queued):
        // keys are bounded by what clients log in as, not by time.
        by_key.retain(|_, p| Rc::strong_count(p) > 1 || !p.ready.borrow().is_empty());
        let pool = Rc::new(Pool::new(
            &key,
            password,
            message_bytes_max,
            fingerprints.clone(),
        ));
        by_key.insert(key, pool.clone());
        pool
    }

    /// Nothing waits in any pool and nothing is in flight (the shard's drain waits for it).
    pub(super) fn flushed(&self) -> bool {
        self.by_key.borrow().values().all(|p| {
            (p.ready.borrow().is_empty() || p.down.get())
                && p.conns.borrow().iter().all(|c| c.idle() || !c.up.get())
        })
    }

    /// `pool` has units and no connection while every connection is held: ask an idle one of
    /// another pool to close and leave it its place.
    fn starve(&self, pool: &Rc<Pool>) {
        let mut starving = self.starving.borrow_mut();
        if !starving
            .iter()
            .any(|w| w.upgrade().is_some_and(|p| Rc::ptr_eq(&p, pool)))
        {
            starving.push_back(Rc::downgrade(pool));
        }
        drop(starving);
        for other in self.by_key.borrow().values() {
            if Rc::ptr_eq(other, pool) || !other.ready.borrow().is_empty() {
                continue;
            }
            if let Some(conn) = other.conns.borrow().iter().find(|c| c.idle() && c.up.get()) {
                conn.retire.set(true);
                conn.wake_writer();
                return;
            }
        }
    }

    fn has_starving(&self) -> bool {
        self.starving
            .borrow()
            .iter()
            .any(|w| w.upgrade().is_some_and(|p| p.conns.borrow().is_empty()))
    }

    /// A connection's place was freed: give it to a pool that starves, if any.
    fn grant(&self, target: &Rc<MirrorTarget>) {
        loop {
            let Some(weak) = self.starving.borrow_mut().pop_front() else {
                return;
            };
            if let Some(pool) = weak.upgrade()
                && pool.conns.borrow().is_empty()
                && !pool.ready.borrow().is_empty()
            {
                spawn_conn(target, &pool);
                return;
            }
        }
    }
}

/// This shard's share of a pool of `size` connections over `shards` shards: `size / shards`,
/// one more for the first `size % shards` shards.
pub fn shard_share(size: usize, shards: usize, shard: usize) -> usize {
    let shards = shards.max(1);
    size / shards + usize::from(shard < size % shards)
}

/// The connections of one mirror, shard and login, and the units waiting for them.
pub(super) struct Pool {
    params: Vec<(String, String)>,
    user: String,
    password: String,
    /// `proxy.message-bytes-max`: the largest answer frame read.
    message_bytes_max: usize,
    fingerprints: Rc<Fingerprints>,
    /// Units handed over and not yet taken by a connection, oldest first.
    ready: RefCell<VecDeque<Unit>>,
    conns: RefCell<Vec<Rc<Conn>>>,
    /// Connections open now.
    live: Cell<usize>,
    /// No connection is open and the last attempt to open one failed: units are skipped
    /// (counted as `skipped_down`) until one opens.
    down: Cell<bool>,
}

impl Pool {
    fn new(
        key: &Key,
        password: &str,
        message_bytes_max: usize,
        fingerprints: Rc<Fingerprints>,
    ) -> Pool {
        let mut params = vec![
            ("user".to_string(), key.user.clone()),
            ("database".to_string(), key.database.clone()),
        ];
        if !key.options.is_empty() {
            params.push(("options".to_string(), key.options.clone()));
        }
        Pool {
            params,
            user: key.user.clone(),
            password: password.to_string(),
            message_bytes_max,
            fingerprints,
            ready: RefCell::new(VecDeque::new()),
            conns: RefCell::new(Vec::new()),
            live: Cell::new(0),
            down: Cell::new(false),
        }
    }

    fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().iter().find(|c| c.id == id).cloned()
    }

    /// With a batch wait of `wait`, the connection that takes the units of sessions bound to
    /// none: the first open one that is not retiring and keeps up (its oldest answer awaited
    /// was written less than `wait` ago), so units gather on one connection while it keeps
    /// up instead of going one per write over every connection. None when none keeps up:
    /// then any connection takes them, and the pool opens more as it did without a wait.
    fn first_open(&self, wait: Duration) -> Option<Rc<Conn>> {
        let now = Instant::now();
        self.conns
            .borrow()
            .iter()
            .find(|c| {
                c.up.get()
                    && !c.retire.get()
                    && c.inflight
                        .borrow()
                        .front()
                        .is_none_or(|f| now.saturating_duration_since(f.sent) < wait)
            })
            .cloned()
    }

    /// A unit waited its batch wait out while the first connection worked: open another
    /// connection if none is idle or opening and the shard's share allows, so a mirror
    /// slower than the primary gets every connection of its pool.
    fn grow(self: &Rc<Self>, target: &Rc<MirrorTarget>) {
        let Some(pools) = target.pools.as_ref() else {
            return;
        };
        if pools.held.get() >= pools.share
            || self
                .conns
                .borrow()
                .iter()
                .any(|c| c.idle() || (!c.up.get() && !c.retire.get()))
        {
            return;
        }
        spawn_conn(target, self);
    }

    /// A unit was handed over: wake the connection that takes it (the one its session is bound
    /// to, an idle one, or one still opening), open another while all are busy and the shard's
    /// share allows, else wake the least busy one.
    fn wake_for(self: &Rc<Self>, target: &Rc<MirrorTarget>, bound: Option<u64>) {
        if let Some(conn) = bound.and_then(|id| self.conn(id)) {
            conn.wake_writer();
            return;
        }
        let wait = Duration::from_micros(target.cfg.pool_batch_wait_us);
        if !wait.is_zero()
            && let Some(first) = self.first_open(wait)
        {
            first.wake_writer();
            // The first connection is busy: the unit waits for it, and an idle connection
            // takes it once its batch wait is over. Those set their timers for the oldest
            // unit waiting, so they are told only of the first.
            let unbound = self
                .ready
                .borrow()
                .iter()
                .filter(|u| u.share.bound.get().is_none())
                .count();
            if !first.idle() && unbound == 1 {
                for conn in self.conns.borrow().iter() {
                    if conn.id != first.id && conn.idle() {
                        conn.wake_writer();
                    }
                }
            }
            return;
        }
        let conns = self.conns.borrow();
        if let Some(conn) = conns
            .iter()
            .find(|c| c.idle() || (!c.up.get() && !c.retire.get()))
        {
            conn.wake_writer();
            return;
        }
        let empty = conns.is_empty();
        drop(conns);
        let Some(pools) = target.pools.as_ref() else {
            return;
        };
        if pools.held.get() < pools.share {
            spawn_conn(target, self);
            return;
        }
        if empty {
            pools.starve(self);
            return;
        }
        let least = self
            .conns
            .borrow()
            .iter()
            .filter(|c| c.up.get())
            .min_by_key(|c| c.inflight.borrow().len())
            .cloned();
        if let Some(conn) = least {
            conn.wake_writer();
        }
    }

    /// No connection is open and opening one failed: what waits is skipped.
    fn mark_down(&self, stats: &MirrorStats) {
        self.down.set(true);
        let units: Vec<Unit> = self.ready.borrow_mut().drain(..).collect();
        for unit in units {
            unit.drop_counted(stats, &stats.counters.skipped_down);
        }
    }
}

/// Hands a closed unit to its pool.
pub(super) fn dispatch(target: &Rc<MirrorTarget>, pool: &Rc<Pool>, unit: Unit) {
    let stats = &target.stats;
    MirrorStats::bump(&stats.counters.units, 1);
    if pool.down.get() {
        unit.drop_counted(stats, &stats.counters.skipped_down);
        return;
    }
    let bound = unit.share.bound.get();
    pool.ready.borrow_mut().push_back(unit);
    pool.wake_for(target, bound);
}

/// A sync point sent on a pool connection and not yet answered.
struct Flight {
    sent: Instant,
    /// The session whose unit it belongs to, and its client sync point (None: pgprism's own).
    owner: Option<(Rc<Share>, u64)>,
    fingerprint: u64,
    internal: bool,
    /// It ends its unit: answered (or lost), the unit's session is done with it.
    ends: Option<Rc<Share>>,
    /// Its unit is followed by its own ROLLBACK (`Unit::guard`).
    guarded: bool,
    /// The statement names its unit creates or drops (all the connection had, for a
    /// DEALLOCATE ALL): unknown on the connection if the unit fails.
    names: Option<Rc<[String]>>,
}

/// A frame on its way out of a connection.
struct Out {
    item: Item,
    /// The session whose unit it belongs to (its bound counts it until written); `None` for
    /// pgprism's own preparation of the connection.
    owner: Option<Rc<Share>>,
    ends: Option<Rc<Share>>,
    guarded: bool,
    names: Option<Rc<[String]>>,
}

/// One place in a pool: a connection, opened again when it fails, and what it is sending.
struct Conn {
    id: u64,
    /// Open, and not failed since.
    up: Cell<bool>,
    failed: Cell<bool>,
    /// Close once idle, leaving the place to a pool that starves.
    retire: Cell<bool>,
    writer: Cell<Option<Waker>>,
    reader: Cell<Option<Waker>>,
    /// The unit being sent (the in-flight bound may hold back its rest), after what makes the
    /// connection match it.
    outbox: RefCell<VecDeque<Out>>,
    inflight: RefCell<VecDeque<Flight>>,
    /// Statement names prepared on the connection, with what created them (`None`: not kept).
    names: RefCell<HashMap<String, Option<Bytes>>>,
    /// The statement names that units queued or in flight here create or drop (their
    /// `Flight::names`), each with the number of such units: a name among them exists only
    /// if those units succeed. Kept as units come and go, so planning a unit costs nothing
    /// per unit in flight (a scan of the answers awaited made every unit cost as much as
    /// the connection's backlog).
    pending: RefCell<HashMap<String, usize>>,
    /// A session's statement of the unit being answered failed.
    unit_failed: Cell<bool>,
    /// The signature of the settings the connection runs with (see `Snapshot`).
    sig: Cell<u64>,
    /// The open connection's BackendKeyData (for cancels).
    key: Cell<Option<(i32, i32)>>,
    /// The session whose sync point the connection runs now (the front of `inflight`).
    running: RefCell<Option<Rc<Share>>>,
    /// Writes held while a cancel for the one statement in flight is on its way.
    hold: Rc<super::link::Hold>,
    /// A unit ended inside a transaction block on the mirror: roll it back before the next.
    leaked: Cell<bool>,
    answered: Cell<u64>,
}

impl Conn {
    fn new(id: u64) -> Conn {
        Conn {
            id,
            up: Cell::new(false),
            failed: Cell::new(false),
            retire: Cell::new(false),
            writer: Cell::new(None),
            reader: Cell::new(None),
            outbox: RefCell::new(VecDeque::new()),
            inflight: RefCell::new(VecDeque::new()),
            names: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            unit_failed: Cell::new(false),
            sig: Cell::new(FRESH),
            key: Cell::new(None),
            running: RefCell::new(None),
            hold: Rc::default(),
            leaked: Cell::new(false),
            answered: Cell::new(0),
        }
    }

    /// Open, with nothing to send and nothing in flight.
    fn idle(&self) -> bool {
        self.up.get() && self.outbox.borrow().is_empty() && self.inflight.borrow().is_empty()
    }

    /// The unit that created or dropped `unsure` was answered: its names are no longer
    /// pending on it.
    fn settled_names(&self, unsure: &[String]) {
        let mut pending = self.pending.borrow_mut();
        for name in unsure {
            if let Some(count) = pending.get_mut(name.as_str()) {
                *count -= 1;
                if *count == 0 {
                    pending.remove(name.as_str());
                }
            }
        }
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// The connection ended: what it was sending and what it awaited is lost, counted (frames
    /// not written as `skipped_down`, units as `units_lost`); its sessions are unbound.
    fn lost(&self, stats: &MirrorStats) {
        let mut units = 0;
        let outbox: Vec<Out> = self.outbox.borrow_mut().drain(..).collect();
        for out in outbox {
            if let Some(owner) = &out.owner {
                owner.release(stats, out.item.frame.len());
                MirrorStats::bump(&stats.counters.skipped_down, 1);
            }
            if let Some(share) = out.ends {
                share.unit_done();
                units += 1;
            }
        }
        let inflight: Vec<Flight> = self.inflight.borrow_mut().drain(..).collect();
        for flight in inflight {
            if let Some(share) = flight.ends {
                share.unit_done();
                units += 1;
            }
        }
        MirrorStats::bump(&stats.counters.units_lost, units);
        self.names.borrow_mut().clear();
        self.pending.borrow_mut().clear();
        self.sig.set(FRESH);
        self.leaked.set(false);
        self.unit_failed.set(false);
    }
}

/// Opens another connection for `pool`, within the shard's share.
fn spawn_conn(target: &Rc<MirrorTarget>, pool: &Rc<Pool>) {
    let Some(pools) = target.pools.as_ref() else {
        return;
    };
    pools.held.set(pools.held.get() + 1);
    let id = pools.next_id.get();
    pools.next_id.set(id + 1);
    let conn = Rc::new(Conn::new(id));
    pool.conns.borrow_mut().push(conn.clone());
    exec::spawn(serve(target.clone(), pool.clone(), conn));
}

/// One place in a pool for the shard's life (or until it retires): opens the connection,
/// sends and reads until it fails, opens it again with backoff.
async fn serve(target: Rc<MirrorTarget>, pool: Rc<Pool>, conn: Rc<Conn>) {
    let cfg = &target.cfg;
    let stats = &target.stats;
    let mut attempt = 0u32;
    let mut opened_before = false;
    while !conn.retire.get() {
        let opened = target
            .open(
                &pool.params,
                &pool.user,
                &pool.password,
                pool.message_bytes_max,
            )
            .await;
        let failure = match opened {
            Ok(opened) => {
                let stream = opened.stream;
                conn.key.set(opened.key);
                if opened_before {
                    MirrorStats::bump(&stats.counters.reconnects, 1);
                }
                opened_before = true;
                pool.live.set(pool.live.get() + 1);
                pool.down.set(false);
                conn.failed.set(false);
                conn.up.set(true);
                let answered_before = conn.answered.get();
                let link = Live {
                    target: &target,
                    pool: &pool,
                    conn: &conn,
                    stream: &stream,
                };
                let (clean, ()) = futures_lite::future::zip(link.writer(), link.reader()).await;
                stream.shutdown();
                conn.up.set(false);
                pool.live.set(pool.live.get() - 1);
                conn.key.set(None);
                if let Some(session) = conn.running.borrow_mut().take() {
                    session.runs(&target, None, None, true, &conn.hold);
                }
                conn.lost(stats);
                if clean {
                    break;
                }
                if conn.answered.get() > answered_before {
                    attempt = 0;
                    continue;
                }
                "connection lost before any answer".to_string()
            }
            Err(err) => {
                MirrorStats::bump(&stats.counters.connect_failures, 1);
                stats.record_error(err.sqlstate());
                // The mirror cannot be reached (a connection that opened and then ended says
                // nothing of the next attempt): with none open, what waits is skipped.
                if pool.live.get() == 0 {
                    pool.mark_down(stats);
                }
                err.to_string()
            }
        };
        tracing::debug!(mirror = %target.name, error = %failure, "pooled mirror connection failed");
        // A pool keeps trying (the mirror serves every later session too): the delay doubles
        // up to `retry-delay-max-ms` and stays there.
        attempt = attempt.saturating_add(1);
        exec::sleep(backoff(cfg, attempt)).await;
    }
    pool.conns.borrow_mut().retain(|c| c.id != conn.id);
    if let Some(pools) = target.pools.as_ref() {
        pools.held.set(pools.held.get().saturating_sub(1));
        pools.grant(&target);
    }
    // Units its sessions were bound to it for were counted lost; what waits goes elsewhere.
    if !pool.ready.borrow().is_empty() {
        pool.wake_for(&target, None);
    }
}

fn backoff(cfg: &crate::config::MirrorConfig, attempt: u32) -> Duration {
    let ms = cfg
        .retry_delay_ms
        .saturating_mul(1u64 << attempt.min(20).saturating_sub(1))
        .min(cfg.retry_delay_max_ms);
    Duration::from_millis(ms)
}

/// What a connection's choice of units depends on, read once per look at the units waiting.
struct Turn {
    now: Instant,
    /// This is the first open connection (or none is open): it takes the units of sessions
    /// bound to none at once.
    first: bool,
}

/// One open connection of a place: its writer and its reader, two futures taking turns.
struct Live<'a> {
    target: &'a Rc<MirrorTarget>,
    pool: &'a Rc<Pool>,
    conn: &'a Rc<Conn>,
    stream: &'a Stream,
}

impl Live<'_> {
    fn stats(&self) -> &MirrorStats {
        &self.target.stats
    }

    fn in_flight_full(&self) -> bool {
        self.conn.inflight.borrow().len() >= self.target.cfg.in_flight_messages_max.max(1)
    }

    /// `pool-batch-wait-us`, when above 0.
    fn batch_wait(&self) -> Option<Duration> {
        let us = self.target.cfg.pool_batch_wait_us;
        (us > 0).then(|| Duration::from_micros(us))
    }

    /// What decides which units this connection may take now: the time, and with a batch
    /// wait whether this is the first open connection.
    fn turn(&self) -> Turn {
        let first = match self.batch_wait() {
            Some(wait) => self
                .pool
                .first_open(wait)
                .is_none_or(|c| c.id == self.conn.id),
            None => true,
        };
        Turn {
            now: Instant::now(),
            first,
        }
    }

    /// A unit this connection may take: its session is bound to this connection, or to none
    /// and (with a batch wait) this is the first open connection or the unit waited its
    /// batch wait out.
    fn eligible(&self, unit: &Unit, turn: &Turn) -> bool {
        match unit.share.bound.get() {
            Some(b) => b == self.conn.id,
            None => turn.first || self.overdue(unit, turn.now),
        }
    }

    /// The unit waited its batch wait out (never, without one).
    fn overdue(&self, unit: &Unit, now: Instant) -> bool {
        self.batch_wait()
            .is_some_and(|wait| now.saturating_duration_since(unit.closed) >= wait)
    }

    fn has_work(&self) -> bool {
        if !self.conn.outbox.borrow().is_empty() {
            return true;
        }
        let turn = self.turn();
        self.pool
            .ready
            .borrow()
            .iter()
            .any(|u| self.eligible(u, &turn))
    }

    // The writer's turns.

    /// Sends units until the connection fails (false) or retires (true).
    async fn writer(&self) -> bool {
        let mut batch = BytesMut::new();
        loop {
            if self.conn.failed.get() {
                return false;
            }
            self.hold().await;
            self.conn.hold.wait().await;
            self.wait_for_answers().await;
            if self.conn.failed.get() {
                return false;
            }
            let out = self.take(&mut batch);
            if !out.is_empty() {
                if !self.write(out).await {
                    return false;
                }
                continue;
            }
            if !self.conn.outbox.borrow().is_empty() {
                self.wait_for_room().await;
                continue;
            }
            let idle = self.conn.inflight.borrow().is_empty();
            if idle
                && !self.conn.retire.get()
                && self.pool.ready.borrow().is_empty()
                && self.target.pools.as_ref().is_some_and(Pools::has_starving)
            {
                self.conn.retire.set(true);
            }
            if self.conn.retire.get() && idle && !self.has_work() {
                let _ = self.stream.write_all(&[tag::TERMINATE, 0, 0, 0, 4]).await;
                return true;
            }
            self.wait_for_work().await;
        }
    }

    /// With `flush-delay-us`, holds the oldest unit this connection may take up to that long,
    /// so the units that follow go in the same write, unless a write's worth waits already.
    async fn hold(&self) {
        let cfg = &self.target.cfg;
        if cfg.flush_delay_us == 0 || !self.conn.outbox.borrow().is_empty() {
            return;
        }
        let turn = self.turn();
        let oldest = self
            .pool
            .ready
            .borrow()
            .iter()
            .find(|u| self.eligible(u, &turn))
            .map(|u| u.closed);
        let Some(oldest) = oldest else {
            return;
        };
        let left = (oldest + Duration::from_micros(cfg.flush_delay_us))
            .saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = within(
            left,
            futures_lite::future::poll_fn(|cx| {
                let waiting: usize = self.pool.ready.borrow().iter().map(|u| u.bytes).sum();
                if self.conn.failed.get() || waiting >= BATCH_BYTES_MAX {
                    return Poll::Ready(());
                }
                self.conn.writer.set(Some(cx.waker().clone()));
                Poll::Pending
            }),
        )
        .await;
    }

    /// Takes what goes in one write: the rest of the unit being sent, then further units the
    /// connection may take, up to `BATCH_BYTES_MAX` and the sync point that finds no room in
    /// flight. Empty when nothing could be taken.
    fn take(&self, batch: &mut BytesMut) -> Bytes {
        batch.clear();
        let mut single: Option<Bytes> = None;
        let now = Instant::now();
        loop {
            if self.conn.outbox.borrow().is_empty() && !self.pull(now) {
                break;
            }
            let next_sync = self
                .conn
                .outbox
                .borrow()
                .front()
                .is_some_and(|o| o.item.sync.is_some());
            if next_sync && self.in_flight_full() {
                break;
            }
            let Some(out) = self.conn.outbox.borrow_mut().pop_front() else {
                break;
            };
            self.sent(&out, now);
            let frame = out.item.frame;
            match single.take() {
                None if batch.is_empty() => single = Some(frame),
                None => batch.extend_from_slice(&frame),
                Some(first) => {
                    batch.extend_from_slice(&first);
                    batch.extend_from_slice(&frame);
                }
            }
            if batch.len() >= BATCH_BYTES_MAX {
                break;
            }
        }
        match single {
            Some(frame) => frame,
            None => batch.split().freeze(),
        }
    }

    /// Accounts for a frame going out now: counters, lag, the session's bound, the answer it
    /// awaits.
    fn sent(&self, out: &Out, now: Instant) {
        let stats = self.stats();
        let item = &out.item;
        if let Some(owner) = &out.owner {
            owner.release(stats, item.frame.len());
            stats.note_lag(now - item.enqueued);
            count_sent(stats, item);
            if item.reprepare && item.sync.is_none() {
                MirrorStats::bump(&stats.counters.reprepared, 1);
            }
        }
        if let Some(fingerprint) = item.sync {
            let owner = match &out.owner {
                Some(share) if !item.internal => Some((share.clone(), item.seq)),
                _ => None,
            };
            self.conn.inflight.borrow_mut().push_back(Flight {
                sent: now,
                owner,
                fingerprint,
                internal: item.internal,
                ends: out.ends.clone(),
                guarded: out.guarded,
                names: out.names.clone(),
            });
            // A first sync point runs now; a second one ends the first's running alone.
            if self.conn.inflight.borrow().len() <= 2 {
                self.front_changed();
            }
            if let Some(w) = self.conn.reader.take() {
                w.wake();
            }
        }
    }

    /// The sync point at the front of the answers awaited changed: the session it belongs
    /// to runs it now (and the one before runs nothing here any more).
    fn front_changed(&self) {
        let (owner, seq, alone) = {
            let inflight = self.conn.inflight.borrow();
            let alone = inflight.len() <= 1;
            match inflight.front() {
                Some(Flight {
                    owner: Some((share, seq)),
                    ..
                }) => (Some(share.clone()), Some(*seq), alone),
                _ => (None, None, alone),
            }
        };
        let before = self.conn.running.replace(owner.clone());
        if let Some(before) = before
            && !owner.as_ref().is_some_and(|o| Rc::ptr_eq(o, &before))
        {
            before.runs(self.target, None, None, true, &self.conn.hold);
        }
        if let Some(owner) = owner {
            owner.runs(
                self.target,
                self.conn.key.get(),
                seq,
                alone,
                &self.conn.hold,
            );
        }
    }

    /// Takes the oldest unit this connection may take into its outbox, after what makes the
    /// connection match the unit's session. False when there is none.
    fn pull(&self, now: Instant) -> bool {
        let turn = Turn { now, ..self.turn() };
        let unit = {
            let mut ready = self.pool.ready.borrow_mut();
            let Some(at) = ready.iter().position(|u| self.eligible(u, &turn)) else {
                return false;
            };
            ready.remove(at)
        };
        let Some(unit) = unit else {
            return false;
        };
        if unit.share.bound.get().is_none() && self.overdue(&unit, now) {
            self.pool.grow(self.target);
        }
        unit.share.bind(self.conn.id);
        self.prepare(unit, now);
        true
    }

    /// Queues `unit` in the outbox, preceded by what makes this connection match its session:
    /// a ROLLBACK of a block the previous unit left open, the session's settings where the
    /// connection's differ, Closes of the statement names the unit creates that the
    /// connection has under another text; pgprism's own preparations of statements the
    /// connection has under that very text are left out.
    fn prepare(&self, unit: Unit, now: Instant) {
        let conn = self.conn;
        let mut outbox = conn.outbox.borrow_mut();
        let internal = |frame: Bytes, sync: bool| Out {
            item: Item {
                frame,
                enqueued: now,
                seq: 0,
                sync: sync.then_some(0),
                statement: false,
                internal: true,
                reprepare: false,
            },
            owner: None,
            ends: None,
            guarded: false,
            names: None,
        };
        if conn.leaked.replace(false) {
            outbox.push_back(internal(query_frame("ROLLBACK"), true));
        }
        let wanted = combined(unit.baseline.sig, unit.before.sig);
        if conn.sig.get() != wanted {
            if conn.sig.get() != FRESH {
                outbox.push_back(internal(query_frame(RESET_SQL), true));
            }
            for frame in unit.baseline.frames.iter().chain(&unit.before.frames) {
                outbox.push_back(internal(frame.clone(), true));
            }
        }
        conn.sig.set(unit.after);
        let mut names = conn.names.borrow_mut();
        if names.len() >= CONNECTION_NAMES_MAX {
            outbox.push_back(internal(query_frame("DEALLOCATE ALL"), true));
            names.clear();
        }
        // A name an earlier unit creates or drops that has not been answered yet (queued or in
        // flight) exists only if that unit succeeds: a preparation of it again is kept (after
        // a Close, which does nothing where the name is absent) rather than left out on the
        // strength of a success not known yet.
        let pending = conn.pending.borrow();
        if !pending.is_empty() {
            for effect in &unit.effects {
                if let Names::Create {
                    name,
                    elidable: true,
                    ..
                } = &effect.names
                    && pending.contains_key(name.as_str())
                {
                    names.insert(name.clone(), None);
                }
            }
        }
        drop(pending);
        let unsure = unsure_names(&names, &unit.effects);
        if let Some(unsure) = &unsure {
            let mut pending = conn.pending.borrow_mut();
            for name in unsure.iter() {
                *pending.entry(name.clone()).or_insert(0) += 1;
            }
        }
        let (closes, elided) = plan_names(&mut names, &unit.effects, unit.items.len());
        drop(names);
        if !closes.is_empty() {
            let mut out = BytesMut::new();
            for name in &closes {
                let _ = wire::encode::close(&mut out, ObjectKind::Statement, name);
            }
            outbox.push_back(internal(out.split().freeze(), false));
            wire::encode::sync(&mut out);
            outbox.push_back(internal(out.freeze(), true));
        }
        let start = outbox.len();
        let stats = self.stats();
        // A Sync pgprism added after preparing statements again is left out when every one
        // of them was (nothing since the last sync point for it to close).
        let mut since_sync = false;
        for (i, item) in unit.items.into_iter().enumerate() {
            let left_out = elided.get(i).copied().unwrap_or(false)
                || (item.reprepare && item.sync.is_some() && !since_sync);
            if left_out {
                unit.share.release(stats, item.frame.len());
                continue;
            }
            since_sync = item.sync.is_none();
            outbox.push_back(Out {
                item,
                owner: Some(unit.share.clone()),
                ends: None,
                guarded: false,
                names: None,
            });
        }
        let last = outbox
            .iter_mut()
            .skip(start)
            .rev()
            .find(|o| o.item.sync.is_some());
        match last {
            Some(last) => {
                last.ends = Some(unit.share.clone());
                last.guarded = unit.guard;
                last.names = unsure;
            }
            None => {
                let mut sync = BytesMut::new();
                wire::encode::sync(&mut sync);
                let mut out = internal(sync.freeze(), true);
                out.ends = Some(unit.share.clone());
                out.guarded = unit.guard;
                out.names = unsure;
                outbox.push_back(out);
            }
        }
        if unit.guard {
            // Written with the unit, before any other session's: a block it left open (a
            // failed one too) ends here, not around the next units (only a warning when
            // none is open).
            outbox.push_back(internal(query_frame("ROLLBACK"), true));
        }
    }

    async fn write(&self, out: Bytes) -> bool {
        MirrorStats::bump(&self.stats().counters.writes, 1);
        if self.stream.write_bytes(out).await.is_err() {
            self.fail();
            return false;
        }
        true
    }

    fn fail(&self) {
        self.conn.failed.set(true);
        self.stream.shutdown();
        if let Some(w) = self.conn.reader.take() {
            w.wake();
        }
        self.conn.wake_writer();
    }

    async fn wait_for_room(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.conn.failed.get() || !self.in_flight_full() {
                return Poll::Ready(());
            }
            self.conn.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    /// With a batch wait: while the last write is unanswered, holds the units this
    /// connection would write next until the answers are in or the oldest of them waited its
    /// batch wait out, so they go in one write.
    async fn wait_for_answers(&self) {
        let Some(wait) = self.batch_wait() else {
            return;
        };
        if !self.conn.outbox.borrow().is_empty() || self.conn.inflight.borrow().is_empty() {
            return;
        }
        let turn = self.turn();
        let oldest = self
            .pool
            .ready
            .borrow()
            .iter()
            .find(|u| self.eligible(u, &turn))
            .map(|u| u.closed);
        let Some(oldest) = oldest else {
            return;
        };
        let left = (oldest + wait).saturating_duration_since(turn.now);
        if left.is_zero() {
            return;
        }
        // The wait goes on while the shard sleeps: the answers or the timer wake it. (Ending
        // it once the shard has nothing else to do, so no unit waits across a sleep, was
        // tried: at 16 pgbench clients the shard idles between almost every two units, and
        // writes carried 1.17 units instead of 1.10 without a wait and 8.6 with it.)
        let _ = within(
            left,
            futures_lite::future::poll_fn(|cx| {
                if self.conn.failed.get() || self.conn.inflight.borrow().is_empty() {
                    return Poll::Ready(());
                }
                self.conn.writer.set(Some(cx.waker().clone()));
                Poll::Pending
            }),
        )
        .await;
    }

    /// With a batch wait, when the oldest unit of a session bound to no connection, waiting
    /// for the first connection, may go to this one.
    fn next_overdue(&self) -> Option<Instant> {
        let wait = self.batch_wait()?;
        self.pool
            .ready
            .borrow()
            .iter()
            .find(|u| u.share.bound.get().is_none())
            .map(|u| u.closed + wait)
    }

    /// Waits until there is something to take, the connection fails, or its last answer came
    /// while it retires or another pool starves.
    async fn wait_for_work(&self) {
        let work = futures_lite::future::poll_fn(|cx| {
            let conn = self.conn;
            let idle = conn.inflight.borrow().is_empty();
            let starving = || {
                self.pool.ready.borrow().is_empty()
                    && self.target.pools.as_ref().is_some_and(Pools::has_starving)
            };
            if conn.failed.get() || self.has_work() || (idle && (conn.retire.get() || starving())) {
                return Poll::Ready(());
            }
            conn.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        });
        match self.next_overdue() {
            Some(at) => {
                let _ = within(at.saturating_duration_since(Instant::now()), work).await;
            }
            None => work.await,
        }
    }

    // The reader's turns.

    /// Reads and counts answers until the connection ends (then marks it failed).
    async fn reader(&self) {
        let mut buf = BytesMut::new();
        let mut last_answer: Option<Instant> = None;
        let timeout = Duration::from_millis(self.target.cfg.timeout_ms);
        loop {
            let oldest = self.conn.inflight.borrow().front().map(|f| f.sent);
            let read = match oldest {
                Some(sent) => {
                    let left = (sent + timeout).saturating_duration_since(Instant::now());
                    match within(left, self.stream.read_buf(&mut buf, READ_CHUNK)).await {
                        Some(read) => read,
                        None => {
                            MirrorStats::bump(&self.stats().counters.timeouts, 1);
                            tracing::debug!(mirror = %self.target.name, "pooled mirror statement timed out");
                            break;
                        }
                    }
                }
                None => {
                    let ready =
                        || self.conn.failed.get() || !self.conn.inflight.borrow().is_empty();
                    match signal_or_read(self.stream, &mut buf, &self.conn.reader, ready).await {
                        Some(read) => read,
                        None if self.conn.failed.get() => break,
                        None => continue,
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if !self.account(&mut buf, &mut last_answer) {
                break;
            }
        }
        self.fail();
    }

    /// Counts the complete answers read (rows and errors of the sessions' statements, sync
    /// points answered) and settles their sync points. False when the bytes do not parse.
    fn account(&self, buf: &mut BytesMut, last_answer: &mut Option<Instant>) -> bool {
        let stats = self.stats();
        let arrived = Instant::now();
        let mut answered = 0usize;
        let inflight = self.conn.inflight.borrow();
        let scanned = wire::complete_prefix(buf, self.pool.message_bytes_max, |t, body| {
            let flight = inflight.get(answered);
            // pgprism's own statements' answers (and what comes with no sync point in
            // flight, such as a termination's FATAL) are not the sessions'.
            let client = flight.is_some_and(|f| !f.internal);
            match t {
                tag::COMMAND_COMPLETE if client => {
                    let text = body.strip_suffix(&[0]).unwrap_or(body);
                    if let Some(rows) = std::str::from_utf8(text).ok().and_then(wire::command_rows)
                    {
                        MirrorStats::bump(&stats.counters.rows, rows);
                    }
                }
                tag::ERROR_RESPONSE if client => {
                    let code = wire::ErrorNotice::new(body)
                        .code()
                        .ok()
                        .flatten()
                        .unwrap_or("XX000");
                    stats.record_error(code);
                    self.conn.unit_failed.set(true);
                }
                tag::READY_FOR_QUERY => {
                    let ends = flight.filter(|f| f.ends.is_some());
                    // The names were planned as if the unit succeeded: those of one that
                    // failed (or ended in a block) may or may not exist, under whatever text.
                    // Marked unknown, the next unit creating one closes it first and
                    // prepares it again.
                    if let Some(f) = ends {
                        let failed = self.conn.unit_failed.replace(false);
                        if (failed || body.first() != Some(&b'I'))
                            && let Some(unsure) = &f.names
                        {
                            let mut names = self.conn.names.borrow_mut();
                            for name in unsure.iter() {
                                names.insert(name.clone(), None);
                            }
                        }
                    }
                    if let Some(f) = ends
                        && body.first() != Some(&b'I')
                    {
                        if !f.guarded {
                            self.conn.leaked.set(true);
                        }
                        MirrorStats::bump(&stats.counters.units_rolled_back, 1);
                    }
                    answered += 1;
                }
                _ => {}
            }
        });
        drop(inflight);
        let Ok(complete) = scanned else {
            return false;
        };
        let _ = buf.split_to(complete);
        self.conn
            .answered
            .set(self.conn.answered.get() + answered as u64);
        self.settle(answered, arrived, last_answer);
        if answered > 0 {
            self.conn.wake_writer();
        }
        true
    }

    /// Retires the `answered` oldest sync points in flight: latency for the sessions' ones
    /// (from when each reached the mirror or the one before it was answered, whichever is
    /// later, shared by those answered in one read), units done.
    fn settle(&self, answered: usize, arrived: Instant, last_answer: &mut Option<Instant>) {
        if answered == 0 {
            return;
        }
        let stats = self.stats();
        let inflight = self.conn.inflight.borrow();
        let start = inflight
            .front()
            .map(|f| last_answer.map_or(f.sent, |last| f.sent.max(last)));
        let clients = inflight
            .iter()
            .take(answered)
            .filter(|f| !f.internal)
            .count();
        drop(inflight);
        let share = match start {
            Some(start) if clients > 0 => arrived.saturating_duration_since(start) / clients as u32,
            _ => Duration::ZERO,
        };
        *last_answer = Some(arrived);
        let mut units_done = false;
        for _ in 0..answered {
            let Some(done) = self.conn.inflight.borrow_mut().pop_front() else {
                break;
            };
            if !done.internal {
                stats.record_latency(share);
                if done.fingerprint != 0 {
                    self.pool.fingerprints.record_mirror(
                        done.fingerprint,
                        self.target.index,
                        share,
                    );
                }
            }
            if let Some(unsure) = &done.names {
                self.conn.settled_names(unsure);
            }
            if let Some(session) = done.ends {
                session.unit_done();
                units_done = true;
            }
        }
        self.front_changed();
        // A session unbound now may have units waiting that other connections skipped.
        if units_done && !self.pool.ready.borrow().is_empty() {
            for conn in self.pool.conns.borrow().iter() {
                if conn.id != self.conn.id && conn.idle() {
                    conn.wake_writer();
                }
            }
        }
    }
}

/// Plans the statement names of a unit about to run on a connection that has `names`: the
/// names to close first (the unit creates them before anything drops them, and the connection
/// has them from another session or under another text), and which of the unit's items to
/// leave out (pgprism's own preparations of statements the connection has as they are).
/// Updates `names` to what the connection has once the unit ran.
fn plan_names(
    names: &mut HashMap<String, Option<Bytes>>,
    effects: &[Effect],
    items: usize,
) -> (Vec<String>, Vec<bool>) {
    let mut elided = vec![false; items];
    let mut touched: HashSet<&str> = HashSet::new();
    let mut cleared = false;
    let mut closes = Vec::new();
    for effect in effects {
        match &effect.names {
            Names::Create {
                name,
                ident,
                elidable,
            } => {
                if !cleared && touched.insert(name) {
                    match names.get(name.as_str()) {
                        Some(have) if *elidable && ident.is_some() && have == ident => {
                            if let Some(e) = elided.get_mut(effect.at) {
                                *e = true;
                            }
                            continue;
                        }
                        Some(_) => closes.push(name.clone()),
                        None => {}
                    }
                }
                names.insert(name.clone(), ident.clone());
            }
            Names::Drop(name) => {
                touched.insert(name);
                names.remove(name.as_str());
            }
            Names::DropAll => {
                cleared = true;
                names.clear();
            }
        }
    }
    (closes, elided)
}

/// The names a unit's `effects` create or drop, and all of `names` if it drops them all:
/// what may be left as it was, or half done, should the unit fail. `None` when none.
fn unsure_names(
    names: &HashMap<String, Option<Bytes>>,
    effects: &[Effect],
) -> Option<Rc<[String]>> {
    if effects.is_empty() {
        return None;
    }
    let mut unsure: HashSet<&str> = HashSet::new();
    for effect in effects {
        match &effect.names {
            Names::Create { name, .. } | Names::Drop(name) => {
                unsure.insert(name);
            }
            Names::DropAll => unsure.extend(names.keys().map(String::as_str)),
        }
    }
    Some(unsure.into_iter().map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(at: usize, name: &str, ident: &'static [u8], elidable: bool) -> Effect {
        Effect {
            at,
            names: Names::Create {
                name: name.into(),
                ident: Some(Bytes::from_static(ident)),
                elidable,
            },
        }
    }

    #[test]
    fn shares_split_the_pool_over_shards() {
        assert_eq!(
            (0..3).map(|s| shard_share(4, 3, s)).collect::<Vec<_>>(),
            [2, 1, 1]
        );
        assert_eq!(
            (0..2).map(|s| shard_share(4, 2, s)).sum::<usize>(),
            4,
            "the shares add up to the pool size"
        );
        assert_eq!(shard_share(7, 1, 0), 7);
    }

    #[test]
    fn names_the_connection_has_as_they_are_are_not_prepared_again() {
        let mut names = HashMap::new();
        names.insert("s1".to_string(), Some(Bytes::from_static(b"A")));
        names.insert("s2".to_string(), Some(Bytes::from_static(b"B")));
        // s1 again as it is: left out; s2 under another text: closed first; s3: new.
        let effects = [
            create(0, "s1", b"A", true),
            create(2, "s2", b"X", true),
            create(4, "s3", b"C", false),
        ];
        let (closes, elided) = plan_names(&mut names, &effects, 6);
        assert_eq!(closes, ["s2"]);
        assert_eq!(elided, [true, false, false, false, false, false]);
        assert_eq!(names["s2"].as_deref(), Some(&b"X"[..]));
        assert!(names.contains_key("s3"));
    }

    #[test]
    fn a_clients_own_create_of_a_name_the_connection_has_closes_it_first() {
        let mut names = HashMap::new();
        names.insert("S_1".to_string(), Some(Bytes::from_static(b"A")));
        // The client's own Parse of the same text is not left out (it is the client's), so
        // the connection's copy must go first.
        let (closes, elided) = plan_names(&mut names, &[create(0, "S_1", b"A", false)], 1);
        assert_eq!(closes, ["S_1"]);
        assert_eq!(elided, [false]);
    }

    #[test]
    fn creates_after_a_drop_or_drop_all_need_no_close() {
        let mut names = HashMap::new();
        names.insert("a".to_string(), Some(Bytes::from_static(b"A")));
        names.insert("b".to_string(), Some(Bytes::from_static(b"B")));
        let effects = [
            Effect {
                at: 0,
                names: Names::DropAll,
            },
            create(1, "a", b"Z", false),
        ];
        let (closes, _) = plan_names(&mut names, &effects, 2);
        assert!(closes.is_empty());
        assert_eq!(names.len(), 1);
    }
}
