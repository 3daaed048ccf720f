//! Pipelined lending (`pool.shared-depth-max` > 1): several clients' autocommit units (one
//! simple Query, or one extended batch ending in its Sync, outside a transaction block, with
//! the same settings) share one server connection. Their bytes go out in one write, in the
//! order the sessions handed them over, and the answers are split back by sync point: the
//! server answers each unit up to its own `ReadyForQuery`, so everything up to the n-th
//! `ReadyForQuery` belongs to the n-th unit.
//!
//! An error in one unit never touches another: each unit ends in its own Sync (or is its own
//! Query), so the server's error recovery stops at that unit's end, and a unit is admitted
//! only when it can neither open a transaction block nor change what the connection carries
//! to the next unit (settings, names, pins: see `Session::shareable` in `pooled.rs` and
//! [`crate::sql::shareable_alone`]). Should the server still end a unit outside idle, the
//! connection is closed at once, so that PostgreSQL rolls back whatever ran after it, and the
//! clients whose units were on it are told the connection was lost: no client is ever
//! answered from inside another's transaction.
//!
//! One task per pipeline owns the socket: it writes what the sessions queued and reads the
//! answers, handing each session its answer as it comes (in parts beyond
//! [`STREAM_BYTES`]; reading stops while the running unit's client has [`HELD_BYTES_MAX`]
//! not taken yet). When the last unit is answered the pipeline lingers for the next one, up to
//! `pool.shared-linger-us`: a client with a shareable unit joins it without a lend (no
//! acquire, no release, no new task), so that under load a shared connection stays shared
//! across the short gaps between its clients' statements rather than going back to the pool
//! and being lent (and a pipeline started) again for nearly every statement. It goes back at
//! once when a client waits for a connection of its own (on any shard), the pool is paused,
//! or the connection is past its lifetime; and it stops taking units after
//! [`SERVED_PER_DEPTH`] times its depth in a row while clients wait. PgBouncer lends one
//! connection per transaction and pays a wake-up and two system calls per statement on the
//! server leg; a pipeline of depth d pays them once per d statements.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;

use super::session::ShardCtx;
use crate::backend::pool::{Pool, ServerConn, bump};
use crate::exec::net::Stream;
use crate::wire::{self, tag};

/// A unit's answer is handed to its session in parts once this much has gathered.
const STREAM_BYTES: usize = 32 << 10;
/// The pipeline stops reading the server while the running unit's session has this much of
/// its answer not taken yet (its client reads slowly).
const HELD_BYTES_MAX: usize = 256 << 10;
/// Largest unit that may share a connection, and most bytes queued on one not yet written:
/// far below the socket buffers, so a write never waits on a server that is itself waiting
/// for its answers to be read.
pub(super) const UNIT_BYTES_MAX: usize = 8 << 10;
const QUEUED_BYTES_MAX: usize = 64 << 10;
/// A pipeline takes new units only until it has served this many times its depth since its
/// queue was last empty while clients wait for a connection of their own: then it drains and
/// its connection goes back to the pool (lifetime, RECONNECT and PAUSE apply there).
const SERVED_PER_DEPTH: u64 = 4;

/// The server's answers and the units on the connection no longer line up: it must go.
struct Misaligned;

/// What a unit's session gets from [`Share::next`].
pub(super) enum Part {
    /// A part of its answer (whole messages); more follows.
    More(BytesMut),
    /// The rest of its answer, up to and including its ReadyForQuery.
    Last(BytesMut),
    /// The connection failed (or was closed) before its answer was complete.
    Lost,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Pending,
    Answered,
    Lost,
}

/// One unit in a pipeline: where its answer gathers, and who waits for it.
pub(super) struct Share {
    answer: RefCell<BytesMut>,
    outcome: Cell<Outcome>,
    waker: Cell<Option<Waker>>,
    /// ReadyForQuery answers still to come (one per unit today; counted, not assumed).
    readies: Cell<usize>,
    /// Its session is gone: the rest of its answer is read and dropped.
    abandoned: Cell<bool>,
    /// The session's cancel slot: holds the connection's key only while this unit is the
    /// only one on the wire (running, nothing queued behind it), so that a client's cancel
    /// never reaches another client's statement.
    cancel_slot: Arc<AtomicU64>,
}

impl Share {
    /// The next part of the answer.
    pub(super) fn next<'a>(self: &'a Rc<Self>, pipeline: &'a Pipeline) -> ShareWait<'a> {
        ShareWait(self, pipeline)
    }

    /// The session leaves without the rest of its answer.
    fn abandon(&self, pipeline: &Pipeline) {
        self.abandoned.set(true);
        self.answer.borrow_mut().clear();
        pipeline.wake_task();
    }
}

/// A session's hold on its unit: should the session end (or be dropped) before the whole
/// answer came, the rest is read and dropped, so the pipeline never waits on it.
pub(super) struct Waiting {
    pub(super) share: Rc<Share>,
    pub(super) pipeline: Rc<Pipeline>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.share.outcome.get() == Outcome::Pending {
            self.share.abandon(&self.pipeline);
        }
    }
}

pub(super) struct ShareWait<'a>(&'a Rc<Share>, &'a Pipeline);

impl Future for ShareWait<'_> {
    type Output = Part;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Part> {
        let (share, pipeline) = (self.0, self.1);
        match share.outcome.get() {
            Outcome::Answered => Poll::Ready(Part::Last(share.answer.take())),
            Outcome::Lost => Poll::Ready(Part::Lost),
            Outcome::Pending if share.answer.borrow().len() >= STREAM_BYTES => {
                // The pipeline may have stopped reading for this one.
                pipeline.wake_task();
                Poll::Ready(Part::More(share.answer.take()))
            }
            Outcome::Pending => {
                share.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// A pipeline's linger as the other shards see it (`Pools::mark_lingering`), for as long as
/// it lasts, however it ends.
struct Lingering<'a> {
    pools: &'a crate::backend::pool::Pools,
    pool: &'a Pool,
}

impl<'a> Lingering<'a> {
    fn mark(pools: &'a crate::backend::pool::Pools, pool: &'a Pool) -> Lingering<'a> {
        pools.mark_lingering(pool, true);
        Lingering { pools, pool }
    }
}

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.pools.mark_lingering(self.pool, false);
    }
}

/// A server connection lent to several sessions' units at once.
pub(super) struct Pipeline {
    pub(super) pool: Rc<Pool>,
    /// The settings every unit on it runs with (the connection's).
    pub(super) settings: u64,
    /// The connection's state (statements, unnamed statement, settings). A session takes it
    /// while it rewrites its unit for this connection, synchronously, and puts it back
    /// before it queues the bytes: the state always describes the bytes queued so far, in
    /// their order on the wire.
    pub(super) state: RefCell<Option<ServerConn>>,
    stream: Stream,
    key: u64,
    queue: RefCell<VecDeque<Rc<Share>>>,
    outbox: RefCell<BytesMut>,
    /// The pipeline task, parked until there is something to write, or room to read again.
    task: Cell<Option<Waker>>,
    /// Retired (drained, or its connection lost): no unit may join any more.
    retired: Cell<bool>,
    /// Units it took since its queue was last empty.
    served: Cell<u64>,
    depth_max: usize,
    /// How long it waits for another unit once every unit is answered.
    linger: std::time::Duration,
}

impl Pipeline {
    /// Makes a pipeline of `conn` (registered on the shard) and starts its task.
    pub(super) fn start(
        shard: &Rc<ShardCtx>,
        pool: &Rc<Pool>,
        mut conn: ServerConn,
    ) -> Rc<Pipeline> {
        let (depth_max, linger_us) = shard
            .pools
            .as_ref()
            .map(|p| {
                let cfg = p.cfg();
                (cfg.shared_depth_max, cfg.shared_linger_us)
            })
            .unwrap_or((1, 0));
        let buf = std::mem::take(&mut conn.buf);
        let pipeline = Rc::new(Pipeline {
            pool: pool.clone(),
            settings: conn.settings,
            stream: conn.stream.clone(),
            key: super::pooled::pack_key(conn.key),
            state: RefCell::new(Some(conn)),
            queue: RefCell::new(VecDeque::new()),
            outbox: RefCell::new(BytesMut::new()),
            task: Cell::new(None),
            retired: Cell::new(false),
            served: Cell::new(0),
            depth_max,
            linger: std::time::Duration::from_micros(linger_us),
        });
        shard.pipelines.borrow_mut().push(pipeline.clone());
        bump(&pool.counters.pipelines, 1);
        pool.linked.set(pool.linked.get() + 1);
        crate::exec::spawn(pipeline.clone().run(shard.clone(), buf));
        // Room for the units in line.
        UnitLine::wake_of(shard, &pipeline, depth_max);
        pipeline
    }

    /// Whether this pipeline carries units of `pool` with `settings` at all: not retired,
    /// and (while clients wait for a connection of their own) not past its share of units.
    fn takes_units_of(&self, pool: &Rc<Pool>, settings: u64) -> bool {
        Rc::ptr_eq(&self.pool, pool)
            && self.settings == settings
            && !self.retired.get()
            && (pool.waiting() == 0 || self.served.get() < SERVED_PER_DEPTH * self.depth_max as u64)
    }

    /// A pipeline of `pool` on this shard that takes one more unit like `want`. Without
    /// `pressed` (connections to spare) only one with nothing in flight, where the unit waits
    /// behind no other.
    pub(super) fn find(
        shard: &ShardCtx,
        pool: &Rc<Pool>,
        want: &Want,
        pressed: bool,
    ) -> Option<Rc<Pipeline>> {
        if shard
            .pools
            .as_ref()
            .is_some_and(|p| p.is_paused(&pool.database))
        {
            return None;
        }
        // One with a write pending in this round first (the unit goes out in that write and
        // waits only behind the units in it), else the least loaded one, so that units
        // spread over the connections lent.
        shard
            .pipelines
            .borrow()
            .iter()
            .filter(|p| {
                p.takes_units_of(pool, want.settings)
                    && p.queue.borrow().len() < if pressed { p.depth_max } else { 1 }
                    && p.outbox.borrow().len() + want.bytes <= QUEUED_BYTES_MAX
                    && p.holds_all(&want.hashes)
            })
            .min_by_key(|p| (p.outbox.borrow().is_empty(), p.queue.borrow().len()))
            .inspect(|p| p.use_all(&want.hashes))
            .cloned()
    }

    /// Whether this pipeline's connection holds every shared statement of `hashes` (nothing
    /// hidden goes ahead of a shared unit, so a unit joins only where its statements are).
    /// Only a look: the statements of connections looked at and not chosen keep their place
    /// in the order they are closed in ([`Pipeline::use_all`] marks the chosen one's).
    fn holds_all(&self, hashes: &[u64]) -> bool {
        if hashes.is_empty() {
            return true;
        }
        let state = self.state.borrow();
        state
            .as_ref()
            .is_some_and(|conn| hashes.iter().all(|h| conn.prepared.holds(*h)))
    }

    /// Marks `hashes` used now on this pipeline's connection (a unit of them joins it).
    fn use_all(&self, hashes: &[u64]) {
        if let Some(conn) = self.state.borrow_mut().as_mut() {
            for h in hashes {
                conn.prepared.contains(*h);
            }
        }
    }

    /// Units of `settings` the pipelines of `pool` on this shard take now (what
    /// [`Pipeline::find`] would find under pressure, counted in free places).
    pub(super) fn room(shard: &ShardCtx, pool: &Rc<Pool>, settings: u64) -> usize {
        if shard
            .pools
            .as_ref()
            .is_some_and(|p| p.is_paused(&pool.database))
        {
            return 0;
        }
        shard
            .pipelines
            .borrow()
            .iter()
            .filter(|p| p.takes_units_of(pool, settings))
            .map(|p| p.depth_max.saturating_sub(p.queue.borrow().len()))
            .sum()
    }

    /// Whether a unit like `want` could join this pipeline once it has room (the room
    /// itself aside): what [`UnitLine`] asks when room comes.
    fn could_take(&self, pool: &Rc<Pool>, want: &Want) -> bool {
        self.takes_units_of(pool, want.settings)
            && self.outbox.borrow().len() + want.bytes <= QUEUED_BYTES_MAX
            && self.holds_all(&want.hashes)
    }

    /// Queues a unit's bytes, answered by `readies` ReadyForQuery messages; its answer
    /// comes through the returned [`Share`].
    pub(super) fn submit(
        self: &Rc<Self>,
        bytes: BytesMut,
        readies: usize,
        cancel_slot: Arc<AtomicU64>,
    ) -> Waiting {
        let share = Rc::new(Share {
            answer: RefCell::new(BytesMut::new()),
            outcome: Cell::new(Outcome::Pending),
            waker: Cell::new(None),
            readies: Cell::new(readies.max(1)),
            abandoned: Cell::new(false),
            cancel_slot,
        });
        let mut queue = self.queue.borrow_mut();
        // Only a unit alone on the wire may be cancelled: one queued behind another, or one
        // with another behind it, could see its cancel reach the other's statement.
        match queue.back() {
            None => share.cancel_slot.store(self.key, Ordering::Release),
            Some(_) => {
                share.cancel_slot.store(0, Ordering::Release);
                if let Some(front) = queue.front() {
                    front.cancel_slot.store(0, Ordering::Release);
                }
                bump(&self.pool.counters.shared_behind, 1);
            }
        }
        queue.push_back(share.clone());
        self.outbox.borrow_mut().extend_from_slice(&bytes);
        self.served.set(self.served.get() + 1);
        bump(&self.pool.counters.shared_units, 1);
        self.wake_task();
        Waiting {
            share,
            pipeline: self.clone(),
        }
    }

    fn wake_task(&self) {
        if let Some(waker) = self.task.take() {
            waker.wake();
        }
    }

    /// A client of `pool` on this shard is about to wait for a connection of its own: the
    /// pipelines lingering with nothing in flight look again whether to go back to the pool.
    pub(super) fn nudge(shard: &ShardCtx, pool: &Rc<Pool>) {
        for p in shard.pipelines.borrow().iter() {
            if Rc::ptr_eq(&p.pool, pool) && p.queue.borrow().is_empty() {
                p.wake_task();
            }
        }
    }

    /// A client of another shard started waiting: the pipelines lingering here with nothing
    /// in flight look again whether to go back to the pool.
    pub(super) fn nudge_all(shard: &ShardCtx) {
        for p in shard.pipelines.borrow().iter() {
            if p.queue.borrow().is_empty() {
                p.wake_task();
            }
        }
    }

    /// Whether a pipeline with nothing in flight must give its connection back now rather
    /// than linger: a client waits for a connection of its own (here, or on another shard
    /// while this one holds more than its share), the pool is paused, the pair is above a
    /// bound a console SET lowered, or the connection is past its lifetime (or a RECONNECT).
    fn must_go_back(&self, shard: &ShardCtx, now: std::time::Instant) -> bool {
        let Some(pools) = shard.pools.as_ref() else {
            return true;
        };
        pools.wants_conn(&self.pool)
            || pools.is_paused(&self.pool.database)
            // Beyond a bound a console SET lowered: back, where it is closed.
            || pools.above_bound(&self.pool)
            || self
                .state
                .borrow()
                .as_ref()
                .is_none_or(|conn| pools.expired(conn, now))
    }

    /// Every unit is answered: waits up to the linger time for another. True when one came;
    /// false when the connection is to go back to the pool.
    async fn linger(&self, shard: &ShardCtx) -> bool {
        if self.linger.is_zero() {
            return false;
        }
        let now = std::time::Instant::now();
        let deadline = now + self.linger;
        // Marked before the first look: a client that starts waiting on another shard from
        // now on wakes this one (`Pools::mark_lingering`), one that waits already is seen.
        let _mark = shard
            .pools
            .as_ref()
            .map(|pools| Lingering::mark(pools, &self.pool));
        if self.must_go_back(shard, now) {
            return false;
        }
        futures_lite::future::or(
            futures_lite::future::poll_fn(|cx| {
                if !self.outbox.borrow().is_empty() {
                    return Poll::Ready(true);
                }
                // Woken by a nudge (or by a session that left): look again.
                if self.must_go_back(shard, std::time::Instant::now()) {
                    return Poll::Ready(false);
                }
                self.task.set(Some(cx.waker().clone()));
                Poll::Pending
            }),
            async {
                crate::exec::sleep_until(deadline).await;
                false
            },
        )
        .await
    }

    /// The pipeline's task: writes what was queued (all of it in one write), reads the
    /// answers and hands each unit its own, until the queue is answered.
    async fn run(self: Rc<Self>, shard: Rc<ShardCtx>, mut buf: BytesMut) {
        let max = shard.settings.message_bytes_max;
        let chunk = shard.read_chunk_bytes();
        loop {
            if !self.outbox.borrow().is_empty() {
                // Yield once before a write, so that every session woken in this round
                // queues its unit first: they all go out in this one write.
                futures_lite::future::yield_now().await;
                let out = self.outbox.borrow_mut().split().freeze();
                bump(&self.pool.counters.bytes_received, out.len() as u64);
                bump(&self.pool.counters.shared_writes, 1);
                if self.stream.write_bytes(out).await.is_err() {
                    return self.lose(&shard);
                }
                continue;
            }
            if self.queue.borrow().is_empty() {
                self.served.set(0);
                // Units in line were woken as their room came: they join before this
                // connection thinks of going back to the pool for the first of them.
                if !UnitLine::of(&shard, &self.pool).is_empty() {
                    futures_lite::future::yield_now().await;
                    if !self.outbox.borrow().is_empty() {
                        continue;
                    }
                }
                if self.linger(&shard).await {
                    continue;
                }
                return self.retire(&shard, buf).await;
            }
            if self.head_full() {
                // The running unit's client has not taken what it was given: wait for it
                // (or for more to write).
                WaitWork(&self, true).await;
                continue;
            }
            let read = futures_lite::future::or(
                async { Some(self.stream.read_buf(&mut buf, chunk).await) },
                WaitWork(&self, false),
            )
            .await;
            match read {
                None => continue,
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return self.lose(&shard),
            }
            match self.split_answers(&mut buf, max) {
                Ok(0) => {}
                // Room for as many units in line.
                Ok(answered) => UnitLine::wake_of(&shard, &self, answered),
                Err(Misaligned) => return self.lose(&shard),
            }
        }
    }

    /// Hands the complete answers in `buf` to their units: how many units were answered
    /// whole.
    fn split_answers(&self, buf: &mut BytesMut, max: usize) -> Result<usize, Misaligned> {
        let mut answered = 0;
        loop {
            let frame = match wire::split_message(buf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return Err(Misaligned),
            };
            let Some(head) = self.queue.borrow().front().cloned() else {
                // Between units the server may only note something; anything else means
                // the answers and the units no longer line up.
                if matches!(frame.tag(), tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS) {
                    continue;
                }
                return Err(Misaligned);
            };
            if frame.tag() == tag::READY_FOR_QUERY && frame.body().first() != Some(&b'I') {
                // Never expected (no shared unit opens a transaction block): whatever
                // ran after it ran inside it. Closing the connection rolls it all back;
                // every client on it is told the connection was lost.
                return Err(Misaligned);
            }
            if !head.abandoned.get() {
                head.answer.borrow_mut().extend_from_slice(frame.bytes());
            }
            if frame.tag() != tag::READY_FOR_QUERY {
                if head.answer.borrow().len() >= STREAM_BYTES
                    && let Some(waker) = head.waker.take()
                {
                    waker.wake();
                }
                continue;
            }
            head.readies.set(head.readies.get() - 1);
            if head.readies.get() > 0 {
                continue;
            }
            let mut queue = self.queue.borrow_mut();
            queue.pop_front();
            head.cancel_slot.store(0, Ordering::Release);
            head.outcome.set(Outcome::Answered);
            answered += 1;
            if let Some(waker) = head.waker.take() {
                waker.wake();
            }
            if queue.len() == 1
                && let Some(next) = queue.front()
            {
                next.cancel_slot.store(self.key, Ordering::Release);
            }
        }
        Ok(answered)
    }

    /// Whether the running unit holds as much of its answer as its session may leave there.
    fn head_full(&self) -> bool {
        self.queue
            .borrow()
            .front()
            .is_some_and(|h| h.answer.borrow().len() >= HELD_BYTES_MAX)
    }

    /// Every unit answered: the connection goes back to the pool.
    async fn retire(&self, shard: &Rc<ShardCtx>, buf: BytesMut) {
        self.retired.set(true);
        self.unregister(shard);
        let Some(mut conn) = self.state.borrow_mut().take() else {
            return;
        };
        // A unit's unnamed Parse may have failed after the state said it holds it (its
        // session learns that only now).
        conn.unnamed = None;
        let clean = buf.is_empty();
        conn.buf = buf;
        self.pool
            .linked
            .set(self.pool.linked.get().saturating_sub(1));
        if let Some(pools) = shard.pools.as_ref() {
            pools.release(&self.pool, conn, clean).await;
        }
    }

    /// The connection failed (or must not be used again): every unit still waiting learns
    /// it, the connection is closed and the pool replaces it.
    fn lose(&self, shard: &Rc<ShardCtx>) {
        self.retired.set(true);
        self.unregister(shard);
        for share in self.queue.borrow_mut().drain(..) {
            share.cancel_slot.store(0, Ordering::Release);
            share.outcome.set(Outcome::Lost);
            if let Some(waker) = share.waker.take() {
                waker.wake();
            }
        }
        self.pool
            .linked
            .set(self.pool.linked.get().saturating_sub(1));
        if let (Some(conn), Some(pools)) = (self.state.borrow_mut().take(), shard.pools.as_ref()) {
            pools.lost(&self.pool, conn);
        }
    }

    /// Its connection as a SHOW SERVERS row: `active` (lent, to the units on it or lingering
    /// for the next), linked to no one client, since several share it. `None` once retired.
    pub(super) fn server_row(
        &self,
        pools: &crate::backend::pool::Pools,
        now: std::time::Instant,
        check_delay: std::time::Duration,
    ) -> Option<crate::stats::pools::ServerRow> {
        if self.retired.get() {
            return None;
        }
        let state = self.state.borrow();
        let mut row = pools.server_row(&self.pool, state.as_ref()?, None, now, check_delay);
        row.state = "active";
        Some(row)
    }

    fn unregister(&self, shard: &ShardCtx) {
        shard
            .pipelines
            .borrow_mut()
            .retain(|p| !std::ptr::eq(Rc::as_ptr(p), self));
    }
}

/// Resolves when the pipeline has bytes to write (a session queued a unit), or, with
/// `for_room`, when the running unit's session took its answer (or left).
struct WaitWork<'a>(&'a Pipeline, bool);

impl Future for WaitWork<'_> {
    type Output = Option<std::io::Result<usize>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let pipeline = self.0;
        if !pipeline.outbox.borrow().is_empty() || (self.1 && !pipeline.head_full()) {
            return Poll::Ready(None);
        }
        pipeline.task.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// What a unit waiting in line needs of a shared connection: the settings it runs with, its
/// size, and the shared statements the connection must hold.
pub(super) struct Want {
    pub(super) settings: u64,
    pub(super) bytes: usize,
    pub(super) hashes: Vec<u64>,
}

/// One client's place in a [`UnitLine`].
pub(super) struct Spot {
    waker: Cell<Option<Waker>>,
    /// Woken since it last looked (room may have come).
    kicked: Cell<bool>,
    left: Cell<bool>,
    /// When it joined the line (SHOW POOLS `maxwait`).
    since: std::time::Instant,
    want: Want,
}

/// Clients of one pool on this shard whose shareable unit waits, in arrival order, for room
/// on a shared connection (or, first in line, for a connection of its own).
///
/// Why a line of its own: before it, a unit that found every shared connection full waited
/// for a connection in the pool's queue, while units that arrived later joined the shared
/// connections as soon as one of their units was answered; at 512 clients on 20 connections
/// (depth 8) the ones in the pool's queue waited until a shared connection drained, and
/// pgprism's p99 was 179 ms against PgBouncer's 69. Now a unit never passes one that waits
/// and could take the same room: while anyone is in line, newcomers queue behind, room on a
/// shared connection goes to the first in line that can use it, and only the first also
/// waits in the pool's queue for a connection.
///
/// Why "that can use it": a unit needs a connection with its own settings, with space for
/// its bytes and holding its prepared statements. Room that the first in line cannot use
/// (a connection with other settings) goes to the next that can, in arrival order among
/// those; held back for the first, it stayed idle until the connection drained, and the
/// units that could have used it waited with it (review finding F1 of session 13).
pub(super) struct UnitLine {
    pool: Rc<Pool>,
    spots: RefCell<VecDeque<Rc<Spot>>>,
}

impl UnitLine {
    /// The line of `pool` on this shard (made on first use; one per pool).
    pub(super) fn of(shard: &ShardCtx, pool: &Rc<Pool>) -> Rc<UnitLine> {
        let mut lines = shard.unit_lines.borrow_mut();
        if let Some(line) = lines.iter().find(|l| Rc::ptr_eq(&l.pool, pool)) {
            return line.clone();
        }
        let line = Rc::new(UnitLine {
            pool: pool.clone(),
            spots: RefCell::new(VecDeque::new()),
        });
        lines.push(line.clone());
        line
    }

    /// Lets go the lines of pools without clients on this shard that nobody holds and
    /// nobody waits in (a care tick's): a line holds its pool, which could otherwise never
    /// go (`pool.pair-idle-timeout-ms`), and a pool made again would not find it. A line is
    /// made again on first use, the same as new.
    pub(super) fn drop_unused(shard: &ShardCtx) {
        shard.unit_lines.borrow_mut().retain(|line| {
            Rc::strong_count(line) > 1 || line.pool.clients.get() > 0 || !line.is_empty()
        });
    }

    /// Drops those that left from the front, and tells the pool since when its first
    /// client in line waits.
    fn trim(&self) {
        let mut spots = self.spots.borrow_mut();
        while spots.front().is_some_and(|s| s.left.get()) {
            spots.pop_front();
        }
        self.pool.line_since.set(spots.front().map(|s| s.since));
    }

    /// Clients in line.
    pub(super) fn len(&self) -> usize {
        self.trim();
        self.spots.borrow().iter().filter(|s| !s.left.get()).count()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.trim();
        self.spots.borrow().is_empty()
    }

    /// Takes a place at the back for a unit that needs `want`; it is given up when the
    /// returned guard goes.
    pub(super) fn join(self: &Rc<Self>, want: Want) -> InLine {
        let spot = Rc::new(Spot {
            waker: Cell::new(None),
            kicked: Cell::new(false),
            left: Cell::new(false),
            since: std::time::Instant::now(),
            want,
        });
        self.spots.borrow_mut().push_back(spot.clone());
        self.trim();
        self.pool.lined.set(self.pool.lined.get() + 1);
        InLine {
            line: self.clone(),
            spot,
            in_pool_queue: Cell::new(false),
        }
    }

    /// How many clients still in line are ahead of `spot`.
    fn ahead(&self, spot: &Rc<Spot>) -> usize {
        self.spots
            .borrow()
            .iter()
            .take_while(|s| !Rc::ptr_eq(s, spot))
            .filter(|s| !s.left.get())
            .count()
    }

    /// A shared connection with room for `spot`'s unit that no client ahead of it may take
    /// first: those ahead that can use room of the same settings go first, one place each
    /// (they were woken first); those that cannot use it hold no place.
    fn room_for(&self, shard: &ShardCtx, spot: &Rc<Spot>) -> Option<Rc<Pipeline>> {
        let want = &spot.want;
        let free = Pipeline::room(shard, &self.pool, want.settings);
        if free == 0 {
            return None;
        }
        let mut ahead = 0;
        for s in self.spots.borrow().iter() {
            if Rc::ptr_eq(s, spot) {
                break;
            }
            if s.left.get() || s.want.settings != want.settings {
                continue;
            }
            if Pipeline::find(shard, &self.pool, &s.want, true).is_some() {
                ahead += 1;
                if ahead >= free {
                    return None;
                }
            }
        }
        Pipeline::find(shard, &self.pool, want, true)
    }

    /// Room for `n` units came on `pipeline`: wakes the first `n` clients in line that can
    /// use it (see the type's doc: the first in line may not).
    fn wake_for(&self, pipeline: &Pipeline, n: usize) {
        let mut woken = 0;
        for spot in self.spots.borrow().iter() {
            if woken >= n {
                break;
            }
            // One woken already and not yet looking will look anyway (for room that came
            // before): counting it would leave this room to no one.
            if spot.left.get() || spot.kicked.get() || !pipeline.could_take(&self.pool, &spot.want)
            {
                continue;
            }
            woken += 1;
            spot.kick();
        }
    }

    /// Wakes the first client in line (it moved up: it looks for room, and waits for a
    /// connection of its own if there is none).
    fn wake_front(&self) {
        if let Some(spot) = self.spots.borrow().iter().find(|s| !s.left.get()) {
            spot.kick();
        }
    }

    /// The line of `pipeline`'s pool on this shard, if it has one with anybody in it, learns
    /// that `pipeline` has room for `n` more units.
    fn wake_of(shard: &ShardCtx, pipeline: &Pipeline, n: usize) {
        if let Some(line) = shard
            .unit_lines
            .borrow()
            .iter()
            .find(|l| Rc::ptr_eq(&l.pool, &pipeline.pool))
            && !line.is_empty()
        {
            line.wake_for(pipeline, n);
        }
    }
}

impl Spot {
    fn kick(&self) {
        self.kicked.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// A client's place in a [`UnitLine`], given up (and the next client woken) when dropped.
pub(super) struct InLine {
    line: Rc<UnitLine>,
    spot: Rc<Spot>,
    /// First in line, it also waits in the pool's queue (and is counted there).
    in_pool_queue: Cell<bool>,
}

impl InLine {
    /// First in line, it joins the pool's queue too: counted there from now on.
    pub(super) fn counted_by_pool(&self) {
        if !self.in_pool_queue.replace(true) {
            let pool = &self.line.pool;
            pool.lined.set(pool.lined.get().saturating_sub(1));
        }
    }

    /// How many clients are ahead of this one.
    pub(super) fn ahead(&self) -> usize {
        self.line.ahead(&self.spot)
    }

    /// A shared connection with room for this unit, now (see [`UnitLine::room_for`]).
    pub(super) fn room(&self, shard: &ShardCtx) -> Option<Rc<Pipeline>> {
        self.line.room_for(shard, &self.spot)
    }

    /// Resolves once woken (room may have come, or it moved up) since it last looked.
    pub(super) async fn woken(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.spot.kicked.replace(false) {
                return Poll::Ready(());
            }
            self.spot.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        if !self.in_pool_queue.get() {
            let pool = &self.line.pool;
            pool.lined.set(pool.lined.get().saturating_sub(1));
        }
        self.spot.left.set(true);
        self.spot.waker.take();
        // Whoever is first now looks for room, and waits for a connection if there is none.
        if !self.line.is_empty() {
            self.line.wake_front();
        }
    }
}
