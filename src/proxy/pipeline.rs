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
//! to the next unit (settings, names, pins: see `Session::shareable` in `pooled.rs`).
//!
//! One task per pipeline owns the socket: it writes what the sessions queued and reads the
//! answers, waking each session when its answer is complete. When the last unit is answered
//! the pipeline retires and its connection goes back to the pool. PgBouncer lends one
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

/// How a unit's wait ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Outcome {
    Pending,
    /// Its answer is complete (up to and including its ReadyForQuery).
    Answered,
    /// The connection failed before its answer was complete.
    Lost,
}

/// One unit in a pipeline: where its answer gathers, and who waits for it.
pub(super) struct Share {
    answer: RefCell<BytesMut>,
    outcome: Cell<Outcome>,
    waker: Cell<Option<Waker>>,
    /// The session's cancel slot: holds the connection's key only while this unit is the
    /// one the server runs (the head of the queue), so a client's cancel never reaches
    /// another client's statement.
    cancel_slot: Arc<AtomicU64>,
}

impl Share {
    /// The answer, once complete (or `None` when the connection was lost).
    pub(super) fn wait(self: &Rc<Self>) -> impl Future<Output = Option<BytesMut>> + '_ {
        ShareWait(self)
    }
}

struct ShareWait<'a>(&'a Rc<Share>);

impl Future for ShareWait<'_> {
    type Output = Option<BytesMut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BytesMut>> {
        let share = self.0;
        match share.outcome.get() {
            Outcome::Pending => {
                share.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
            Outcome::Answered => Poll::Ready(Some(std::mem::take(&mut *share.answer.borrow_mut()))),
            Outcome::Lost => Poll::Ready(None),
        }
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
    /// The pipeline task, parked until there is something to write or to read.
    task: Cell<Option<Waker>>,
    /// The server ended a unit outside idle (never expected: the connection is closed, not
    /// lent again, once its queue is answered).
    broken: Cell<bool>,
    /// Retired: no unit may join any more.
    retired: Cell<bool>,
    depth_max: usize,
}

impl Pipeline {
    /// Makes a pipeline of `conn` (registered on the shard) and starts its task.
    pub(super) fn start(shard: &Rc<ShardCtx>, pool: &Rc<Pool>, conn: ServerConn) -> Rc<Pipeline> {
        let depth_max = shard
            .pools
            .as_ref()
            .map(|p| p.cfg.shared_depth_max)
            .unwrap_or(1);
        let pipeline = Rc::new(Pipeline {
            pool: pool.clone(),
            settings: conn.settings,
            stream: conn.stream.clone(),
            key: super::pooled::pack_key(conn.key),
            state: RefCell::new(Some(conn)),
            queue: RefCell::new(VecDeque::new()),
            outbox: RefCell::new(BytesMut::new()),
            task: Cell::new(None),
            broken: Cell::new(false),
            retired: Cell::new(false),
            depth_max,
        });
        shard.pipelines.borrow_mut().push(pipeline.clone());
        bump(&pool.counters.pipelines, 1);
        pool.linked.set(pool.linked.get() + 1);
        crate::exec::spawn(pipeline.clone().run(shard.clone()));
        pipeline
    }

    /// A pipeline of `pool` on this shard that takes one more unit with `settings`.
    pub(super) fn find(shard: &ShardCtx, pool: &Rc<Pool>, settings: u64) -> Option<Rc<Pipeline>> {
        shard
            .pipelines
            .borrow()
            .iter()
            .find(|p| {
                Rc::ptr_eq(&p.pool, pool)
                    && p.settings == settings
                    && !p.retired.get()
                    && !p.broken.get()
                    && p.queue.borrow().len() < p.depth_max
            })
            .cloned()
    }

    /// Queues a unit's bytes; its answer comes through the returned [`Share`].
    pub(super) fn submit(&self, bytes: BytesMut, cancel_slot: Arc<AtomicU64>) -> Rc<Share> {
        let share = Rc::new(Share {
            answer: RefCell::new(BytesMut::new()),
            outcome: Cell::new(Outcome::Pending),
            waker: Cell::new(None),
            cancel_slot,
        });
        let mut queue = self.queue.borrow_mut();
        // Only the unit the server runs may be cancelled.
        let head = queue.is_empty();
        share
            .cancel_slot
            .store(if head { self.key } else { 0 }, Ordering::Release);
        queue.push_back(share.clone());
        self.outbox.borrow_mut().extend_from_slice(&bytes);
        bump(&self.pool.counters.shared_units, 1);
        if !head {
            bump(&self.pool.counters.shared_behind, 1);
        }
        if let Some(waker) = self.task.take() {
            waker.wake();
        }
        share
    }

    /// The pipeline's task: writes what was queued (all of it in one write), reads the
    /// answers and hands each unit its own, until the queue is answered.
    async fn run(self: Rc<Self>, shard: Rc<ShardCtx>) {
        let max = shard.settings.message_bytes_max;
        let chunk = shard.read_chunk_bytes();
        let mut buf = BytesMut::new();
        loop {
            // Yield once, so that every session woken in this round queues its unit before
            // the write.
            futures_lite::future::yield_now().await;
            let out = self.outbox.borrow_mut().split().freeze();
            if !out.is_empty() {
                bump(&self.pool.counters.bytes_received, out.len() as u64);
                bump(&self.pool.counters.shared_writes, 1);
                if self.stream.write_bytes(out).await.is_err() {
                    return self.lose(&shard);
                }
                continue;
            }
            if self.queue.borrow().is_empty() {
                return self.retire(&shard, buf).await;
            }
            let read = futures_lite::future::or(
                async { Some(self.stream.read_buf(&mut buf, chunk).await) },
                WaitWork(&self),
            )
            .await;
            match read {
                None => continue,
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return self.lose(&shard),
            }
            loop {
                let frame = match wire::split_message(&mut buf, max) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => return self.lose(&shard),
                };
                let Some(head) = self.queue.borrow().front().cloned() else {
                    // Nothing the server says between units is anyone's (a notice at most);
                    // a farewell is followed by the end of the connection.
                    continue;
                };
                head.answer.borrow_mut().extend_from_slice(frame.bytes());
                if frame.tag() != tag::READY_FOR_QUERY {
                    continue;
                }
                if frame.body().first() != Some(&b'I') {
                    self.broken.set(true);
                }
                self.queue.borrow_mut().pop_front();
                head.cancel_slot.store(0, Ordering::Release);
                head.outcome.set(Outcome::Answered);
                if let Some(waker) = head.waker.take() {
                    waker.wake();
                }
                if let Some(next) = self.queue.borrow().front() {
                    next.cancel_slot.store(self.key, Ordering::Release);
                }
            }
        }
    }

    /// Every unit answered: the connection goes back to the pool (closed if the server
    /// ever ended a unit outside idle).
    async fn retire(&self, shard: &Rc<ShardCtx>, buf: BytesMut) {
        self.retired.set(true);
        self.unregister(shard);
        let Some(mut conn) = self.state.borrow_mut().take() else {
            return;
        };
        conn.buf = buf;
        // A unit's unnamed Parse may have failed after the state said it holds it (its
        // session learns that only now).
        conn.unnamed = None;
        let clean = !self.broken.get() && conn.buf.is_empty();
        self.pool
            .linked
            .set(self.pool.linked.get().saturating_sub(1));
        if let Some(pools) = shard.pools.as_ref() {
            pools.release(&self.pool, conn, clean).await;
        }
    }

    /// The connection failed: every unit still waiting learns it, the pool replaces it.
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

    fn unregister(&self, shard: &ShardCtx) {
        shard
            .pipelines
            .borrow_mut()
            .retain(|p| !std::ptr::eq(Rc::as_ptr(p), self));
    }
}

/// Resolves when the pipeline has bytes to write (a session queued a unit).
struct WaitWork<'a>(&'a Pipeline);

impl Future for WaitWork<'_> {
    type Output = Option<std::io::Result<usize>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.0.outbox.borrow().is_empty() {
            return Poll::Ready(None);
        }
        self.0.task.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}
