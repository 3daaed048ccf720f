//! The pooled shadow (`shadow.pool-size` above 0): a session's shadow traffic runs on
//! connections of the shard's shadow pool (`backend::pool`, the lending machinery the
//! primary's transaction mode uses, with its process-wide bound), lent to the session from the
//! first bytes it writes at a transaction boundary until the shadow answers its last sync point
//! written with ReadyForQuery idle, so the shadow's connection count no longer depends on the
//! number of clients.
//!
//! The rest of compare mode sees a [`Shadow`]: bytes written, answers read, a cancel key.
//! A [`Lease`] makes the lent connection match the session before its bytes (the session's
//! startup parameters and settings, `backend::replay`; the statements it prepared, closing
//! those another session left), hides the answers to that preparation, and routes only the
//! session's own answers back to it, sync point by sync point. Everything the session wrote
//! runs on the one connection until it is idle again, so a transaction stays on one
//! connection, a session's statements reach the shadow in the order they were written, and
//! the pairing of answers (`exchange`) is the same as with a connection of its own.
//!
//! What a pooled connection cannot carry from one session to the next (LISTEN, session
//! advisory locks, temporary objects, WITH HOLD cursors, statements beyond the kept text)
//! pins the session to its connection until it ends; the connection is then reset with
//! `pool.server-reset-query` before anyone else gets it. A session that leaves inside a
//! transaction block has it rolled back first; one that leaves with a statement in flight
//! costs the pool that connection (closed, never lent dirty).
//!
//! It must never hand a session bytes that answer another session's statements or pgprism's
//! own, and never give a connection back with a statement in flight or a block open.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hasher;
use std::io;
use std::ops::ControlFlow;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use crate::backend::pool::{Pool, PooledConn, Pools, ServerConn, bump};
use crate::backend::replay::{self, DIRTY, FRESH, RESET_SQL, Snapshot, combined, query_frame};
use crate::exec::net::Stream;
use crate::session::Settings;
use crate::sql;
use crate::wire::{self, ObjectKind, tag};

/// Bytes of statement text a session's lease keeps to prepare its statements again on the
/// next connection (its Parse frames and PREPARE texts together), as the pooled mirror does.
/// A session past it is pinned to its connection instead: what it prepared stays there.
const KEPT_TEXT_BYTES_MAX: usize = 4 << 20;

/// Open portals a lease follows (they end with their transaction, WITH HOLD cursors pin);
/// past it the session is pinned rather than followed further.
const PORTALS_MAX: usize = 1024;

/// A session's shadow: a connection of its own, or a lease on the shard's shadow pool.
#[derive(Clone)]
pub enum Shadow {
    Own {
        stream: Stream,
        /// The connection's BackendKeyData (for cancels).
        key: Option<(i32, i32)>,
    },
    Pooled(Rc<Lease>),
}

impl Shadow {
    /// Writes `data` (complete client frames and pgprism's own), which ends `syncs` sync
    /// points; a pooled shadow first waits (bounded) for a connection when it has none.
    pub(crate) async fn write(&self, data: Bytes, syncs: usize) -> io::Result<()> {
        match self {
            Shadow::Own { stream, .. } => stream.write_bytes(data).await,
            Shadow::Pooled(lease) => lease.write(data, syncs).await,
        }
    }

    /// Reads the shadow's answers to this session (`Ok(0)`: its end).
    pub(crate) fn read_buf<'a>(
        &'a self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = io::Result<usize>> + 'a {
        futures_lite::future::poll_fn(move |cx| match self {
            Shadow::Own { stream, .. } => {
                let read = stream.read_buf(buf, chunk);
                std::pin::pin!(read).poll(cx)
            }
            Shadow::Pooled(lease) => lease.poll_read(cx, buf, chunk),
        })
    }

    /// The session is over with the shadow (its connection closes, or goes back to the pool
    /// once clean).
    pub fn shutdown(&self) {
        match self {
            Shadow::Own { stream, .. } => stream.shutdown(),
            Shadow::Pooled(lease) => lease.shutdown(),
        }
    }

    /// The key that cancels what the shadow runs for this session now (none while a pooled
    /// shadow has no connection, or still runs pgprism's preparation of it).
    pub(crate) fn key(&self) -> Option<(i32, i32)> {
        match self {
            Shadow::Own { key, .. } => *key,
            Shadow::Pooled(lease) => lease.key(),
        }
    }

    /// A cancel carrying [`Shadow::key`] is on its way (`true`) or done (`false`). A pooled
    /// shadow keeps its connection meanwhile, even once the session's statement is answered:
    /// lent to another session, the connection's key would cancel that session's statement.
    pub(crate) fn cancel_in_flight(&self, sending: bool) {
        if let Shadow::Pooled(lease) = self {
            let n = lease.cancelling.get();
            lease
                .cancelling
                .set(if sending { n + 1 } else { n.saturating_sub(1) });
            if !sending {
                lease.settle();
            }
        }
    }

    /// Whether a write now would not wait for a pooled connection.
    pub(crate) fn writable_now(&self) -> bool {
        match self {
            Shadow::Own { .. } => true,
            Shadow::Pooled(lease) => lease.conn.borrow().is_some() || lease.pool.has_idle(),
        }
    }

    /// The session holds a pooled connection while other sessions of the shard wait for one
    /// (an ordered wait of a transaction holding a connection would make them wait in turn).
    pub(crate) fn holds_while_others_wait(&self) -> bool {
        match self {
            Shadow::Own { .. } => false,
            Shadow::Pooled(lease) => lease.conn.borrow().is_some() && lease.pool.waiting() > 0,
        }
    }
}

/// What a session prepared on the shadow, as it must be on any connection it is lent.
#[derive(Default)]
struct Prepared {
    /// Statement name → the frame that creates it (a Parse, or a Query holding a PREPARE).
    names: HashMap<String, Bytes>,
    /// Text bytes kept in `names`.
    kept: usize,
    /// Statement name → the statement's text (the unnamed one too), read when a portal of it
    /// runs (settings and transaction control sent through the extended protocol).
    texts: HashMap<String, Rc<str>>,
    /// Portal → (statement name, bound with parameters).
    portals: HashMap<String, (String, bool)>,
}

/// One sync point of the session in flight on the lent connection.
struct Point {
    /// A Query of several statements (an implicit block for settings' bookkeeping).
    implicit: bool,
    /// Names its frames create or drop: unsure on the connection should it fail.
    creates: Vec<String>,
}

/// One session's lease on the shard's shadow pool.
pub struct Lease {
    pools: Rc<Pools>,
    pool: Rc<Pool>,
    message_bytes_max: usize,
    /// The connection lent to the session now.
    conn: RefCell<Option<ServerConn>>,
    /// Answers read from the lent connection and not yet handed over.
    rbuf: RefCell<BytesMut>,
    /// The session's answers ready for it.
    ready: RefCell<BytesMut>,
    /// pgprism's own sync points in flight ahead of the session's (answers hidden).
    internal: Cell<usize>,
    /// One of them failed: the connection's state is not what pgprism planned.
    internal_failed: Cell<bool>,
    /// The session's sync points in flight.
    points: RefCell<VecDeque<Point>>,
    /// The sync point being answered has failed.
    point_failed: Cell<bool>,
    /// Frames of an extended batch were written after the last sync point.
    open_batch: Cell<bool>,
    /// The transaction status of the last ReadyForQuery.
    status: Cell<u8>,
    /// The session writes nothing more (Terminate, or the session ended).
    finished: Cell<bool>,
    /// The connection failed, or none could be had: the shadow is gone for this session.
    failed: Cell<bool>,
    /// Shut down: what is lent goes back (or closes), nothing more is lent.
    closed: Cell<bool>,
    /// The session's reader, waiting for a connection to be lent.
    reader: Cell<Option<Waker>>,
    /// Cancels sent with the lent connection's key and not yet done: the connection is not
    /// given back meanwhile.
    cancelling: Cell<u32>,
    /// The session's startup parameters as settings.
    baseline: Rc<Snapshot>,
    settings: RefCell<Settings>,
    /// A RESET or a setting bound with parameters: the connection's settings are not what
    /// the session's kept ones say (the next lend of it resets it).
    untracked: Cell<bool>,
    prepared: RefCell<Prepared>,
    /// Names the open extended batch creates or drops (its sync point's, once its Sync is
    /// written).
    batch_creates: RefCell<Vec<String>>,
    /// Names of the session a failed sync point may have left undone on the connection.
    unsure: RefCell<Vec<String>>,
    /// Pinned to its connection until it ends.
    pinned: Cell<bool>,
    /// Called when the session's own statements start running on the lent connection (its
    /// preparation answered): a cancel waiting for that may go now.
    on_turn: RefCell<Option<Box<dyn Fn()>>>,
}

impl Lease {
    /// A lease for a session whose startup parameters (and `options`, read as settings) are
    /// `baseline`, on `pool` of the shard's shadow `pools`; nothing is lent until it writes.
    pub fn new(
        pools: Rc<Pools>,
        pool: Rc<Pool>,
        baseline: Snapshot,
        settings_max: usize,
        message_bytes_max: usize,
    ) -> Rc<Lease> {
        pool.clients.set(pool.clients.get() + 1);
        Rc::new(Lease {
            pools,
            pool,
            message_bytes_max,
            conn: RefCell::new(None),
            rbuf: RefCell::new(BytesMut::new()),
            ready: RefCell::new(BytesMut::new()),
            internal: Cell::new(0),
            internal_failed: Cell::new(false),
            points: RefCell::new(VecDeque::new()),
            point_failed: Cell::new(false),
            open_batch: Cell::new(false),
            status: Cell::new(b'I'),
            finished: Cell::new(false),
            failed: Cell::new(false),
            closed: Cell::new(false),
            reader: Cell::new(None),
            cancelling: Cell::new(0),
            baseline: Rc::new(baseline),
            settings: RefCell::new(Settings::new(settings_max)),
            untracked: Cell::new(false),
            prepared: RefCell::new(Prepared::default()),
            batch_creates: RefCell::new(Vec::new()),
            unsure: RefCell::new(Vec::new()),
            pinned: Cell::new(false),
            on_turn: RefCell::new(None),
        })
    }

    /// `turn` is called whenever the session's own statements start running on a lent
    /// connection after pgprism's preparation of it.
    pub(crate) fn on_turn(&self, turn: Box<dyn Fn()>) {
        *self.on_turn.borrow_mut() = Some(turn);
    }

    fn key(&self) -> Option<(i32, i32)> {
        if self.internal.get() > 0 {
            return None;
        }
        self.conn.borrow().as_ref().and_then(|c| c.key)
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// The shadow is gone for this session: its reader sees the end.
    fn fail(&self) {
        self.failed.set(true);
        self.wake_reader();
    }

    // The writing side.

    async fn write(&self, data: Bytes, syncs: usize) -> io::Result<()> {
        if self.failed.get() || self.closed.get() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "shadow lease ended",
            ));
        }
        let (data, terminate) = without_terminate(data);
        // The session's end is seen once what came before the Terminate counts as in flight
        // (it may first wait for a connection).
        let end = || {
            if terminate {
                self.finished.set(true);
                self.wake_reader();
            }
        };
        if data.is_empty() {
            end();
            return Ok(());
        }
        let mut prefix = BytesMut::new();
        if self.conn.borrow().is_none() && syncs == 0 && only_copy_frames(&data) {
            // The rest of a COPY the shadow refused (it answered, and the connection went
            // back): a server outside COPY ignores these, so they need no connection, and
            // one lent for them would stay lent with nothing to answer.
            end();
            return Ok(());
        }
        if self.conn.borrow().is_none() {
            let conn = match self.pools.acquire(&self.pool).await {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "no pooled shadow connection for the session");
                    self.fail();
                    return Err(io::Error::other(err));
                }
            };
            if self.closed.get() {
                // The session ended while it waited: the connection is untouched.
                let pools = self.pools.clone();
                let pool = self.pool.clone();
                crate::exec::spawn(async move { pools.release(&pool, conn, true).await });
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "shadow lease ended",
                ));
            }
            self.lend(conn, &mut prefix);
        }
        self.note(&data, syncs);
        end();
        let stream = match self.conn.borrow().as_ref() {
            Some(conn) => conn.stream.clone(),
            None => return Err(io::Error::new(io::ErrorKind::NotConnected, "no connection")),
        };
        let out = if prefix.is_empty() {
            data
        } else {
            prefix.extend_from_slice(&data);
            prefix.freeze()
        };
        let written = stream.write_bytes(out).await;
        if written.is_err() {
            self.lost();
        }
        written
    }

    /// Takes `conn` for the session, queueing in `prefix` what makes it match the session:
    /// its settings where the connection's differ, its statements where the connection lacks
    /// them (and a Close of each name the connection has that the session does not, so the
    /// session's own Parse of it cannot meet another session's statement).
    fn lend(&self, mut conn: ServerConn, prefix: &mut BytesMut) {
        conn.buf.clear();
        self.rbuf.borrow_mut().clear();
        self.pool.linked.set(self.pool.linked.get() + 1);
        let counters = &self.pool.counters;
        let mut internal = 0;
        let settings = self.settings.borrow();
        let own = replay::signature(settings.frames());
        let wanted = combined(self.baseline.sig, own);
        if conn.settings != wanted {
            if conn.settings != FRESH {
                prefix.extend_from_slice(&query_frame(RESET_SQL));
                internal += 1;
            }
            for frame in self.baseline.frames.iter().chain(settings.frames()) {
                prefix.extend_from_slice(frame);
                internal += 1;
            }
            conn.settings = wanted;
            bump(&counters.settings_applied, 1);
        }
        drop(settings);
        let prepared = self.prepared.borrow();
        let mut closes: Vec<String> = conn
            .sql_prepared
            .keys()
            .filter(|name| !prepared.names.contains_key(&***name))
            .map(|name| name.to_string())
            .collect();
        let mut creates: Vec<&Bytes> = Vec::new();
        for (name, frame) in &prepared.names {
            if conn.sql_prepared.get(name.as_str()) != Some(&ident(frame)) {
                closes.push(name.clone());
                creates.push(frame);
            }
        }
        if !closes.is_empty() {
            for name in &closes {
                let _ = wire::encode::close(prefix, ObjectKind::Statement, name);
            }
            wire::encode::sync(prefix);
            internal += 1;
        }
        for frame in &creates {
            prefix.extend_from_slice(frame);
            if frame.first() == Some(&tag::PARSE) {
                wire::encode::sync(prefix);
            }
            internal += 1;
        }
        bump(&counters.reprepares, creates.len() as u64);
        conn.sql_prepared = prepared
            .names
            .iter()
            .map(|(name, frame)| (Box::from(name.as_str()), ident(frame)))
            .collect();
        drop(prepared);
        if self.pinned.get() {
            conn.dirty = true;
        }
        self.internal.set(internal);
        self.internal_failed.set(false);
        self.status.set(b'I');
        *self.conn.borrow_mut() = Some(conn);
        self.wake_reader();
    }

    /// Follows what `data` (the session's frames, written now) does to the session's
    /// prepared statements, portals, settings and pins, and counts its sync points.
    fn note(&self, data: &Bytes, syncs: usize) {
        let mut points = Vec::new();
        let mut at = 0;
        while let Some(rest) = data.get(at..) {
            let Some(len) = first_frame(rest, self.message_bytes_max) else {
                break;
            };
            let frame = data.slice(at..at + len);
            at += len;
            let body = &frame[wire::HEADER_BYTES..];
            match frame[0] {
                tag::QUERY => {
                    self.open_batch.set(false);
                    points.push(self.note_query(body, &frame));
                }
                tag::SYNC | tag::FUNCTION_CALL => {
                    self.open_batch.set(false);
                    points.push(Point {
                        implicit: false,
                        creates: std::mem::take(&mut *self.batch_creates.borrow_mut()),
                    });
                }
                tag::PARSE => {
                    self.open_batch.set(true);
                    if let Some(name) = self.note_parse(body, &frame) {
                        self.batch_creates.borrow_mut().push(name);
                    }
                }
                tag::BIND => {
                    self.open_batch.set(true);
                    self.note_bind(body);
                }
                tag::EXECUTE => {
                    self.open_batch.set(true);
                    self.note_execute(body);
                }
                tag::CLOSE => {
                    self.open_batch.set(true);
                    let mut prepared = self.prepared.borrow_mut();
                    match wire::Close::new(body).target() {
                        Ok((ObjectKind::Statement, name)) => {
                            if let Some(frame) = prepared.names.remove(name) {
                                prepared.kept -= frame.len();
                            }
                            prepared.texts.remove(name);
                            // Skipped when its batch fails before it: the name may stay.
                            self.batch_creates.borrow_mut().push(name.to_string());
                        }
                        Ok((ObjectKind::Portal, name)) => {
                            prepared.portals.remove(name);
                        }
                        Err(_) => {}
                    }
                }
                tag::DESCRIBE | tag::FLUSH => self.open_batch.set(true),
                _ => {}
            }
        }
        // The Syncs a COPY ignores are no sync points: whatever the count says goes.
        points.truncate(syncs);
        while points.len() < syncs {
            points.push(Point {
                implicit: false,
                creates: Vec::new(),
            });
        }
        self.points.borrow_mut().extend(points);
    }

    fn note_query(&self, body: &[u8], frame: &Bytes) -> Point {
        let text = wire::Query::new(body).query().unwrap_or("");
        let ranges = sql::split_statements(text.as_bytes());
        let implicit = ranges.len() > 1;
        if implicit {
            self.settings.borrow_mut().begin_implicit();
        }
        let mut creates = Vec::new();
        for range in ranges {
            let Some(one) = text.get(range) else {
                continue;
            };
            self.note_statement(one, Some(frame), &mut creates, false);
        }
        Point { implicit, creates }
    }

    /// One statement the session runs (`params`: bound with parameters).
    fn note_statement(
        &self,
        text: &str,
        query: Option<&Bytes>,
        creates: &mut Vec<String>,
        params: bool,
    ) {
        let bytes = text.as_bytes();
        if sql::pins(bytes).is_some() {
            self.pin();
        }
        if let Some(setting) = sql::setting(bytes) {
            if params || !matches!(setting, sql::Setting::Set { .. }) {
                // A RESET returns the connection to its own defaults, not to the session's
                // startup parameters; a SET with parameters cannot be replayed from its text.
                self.untracked.set(true);
            }
            if !params {
                self.settings.borrow_mut().change(setting, bytes);
            }
        }
        if let Some(transaction) = sql::transaction(bytes) {
            self.settings.borrow_mut().transaction(transaction);
        }
        let mut prepared = self.prepared.borrow_mut();
        match sql::prepared(bytes) {
            Some(sql::Prepared::Prepare { name, .. }) if query.is_some() => {
                let frame = query_frame_of(text);
                self.keep(&mut prepared, name.clone(), frame);
                creates.push(name);
            }
            Some(sql::Prepared::Deallocate { name }) => {
                if let Some(frame) = prepared.names.remove(&name) {
                    prepared.kept -= frame.len();
                }
                creates.push(name);
            }
            Some(sql::Prepared::DeallocateAll | sql::Prepared::DiscardAll) => {
                prepared.names.clear();
                prepared.texts.clear();
                prepared.kept = 0;
            }
            _ => {}
        }
    }

    fn note_parse(&self, body: &[u8], frame: &Bytes) -> Option<String> {
        let (name, text, _) = wire::Parse::new(body).parts().ok()?;
        if sql::pins(text.as_bytes()).is_some() {
            self.pin();
        }
        let mut prepared = self.prepared.borrow_mut();
        if prepared.texts.len() < PORTALS_MAX || prepared.texts.contains_key(name) {
            prepared.texts.insert(name.to_string(), Rc::from(text));
        }
        if name.is_empty() {
            return None;
        }
        // Its own copy: kept for the statement's life, it must not pin the read buffer.
        let frame = Bytes::copy_from_slice(frame);
        self.keep(&mut prepared, name.to_string(), frame);
        Some(name.to_string())
    }

    fn keep(&self, prepared: &mut Prepared, name: String, frame: Bytes) {
        if let Some(old) = prepared.names.remove(&name) {
            prepared.kept -= old.len();
        }
        if prepared.kept + frame.len() > KEPT_TEXT_BYTES_MAX {
            // Not carried to another connection: the session keeps this one.
            self.pin();
            return;
        }
        prepared.kept += frame.len();
        prepared.names.insert(name, frame);
    }

    fn note_bind(&self, body: &[u8]) {
        let bind = wire::Bind::new(body);
        let (Ok(portal), Ok(statement)) = (bind.portal(), bind.statement()) else {
            return;
        };
        let params = bind.params().map(|v| !v.is_empty()).unwrap_or(true);
        let mut prepared = self.prepared.borrow_mut();
        if prepared.portals.len() >= PORTALS_MAX && !prepared.portals.contains_key(portal) {
            drop(prepared);
            self.pin();
            return;
        }
        prepared
            .portals
            .insert(portal.to_string(), (statement.to_string(), params));
    }

    fn note_execute(&self, body: &[u8]) {
        let Ok(portal) = wire::Execute::new(body).portal() else {
            return;
        };
        let text = {
            let prepared = self.prepared.borrow();
            prepared
                .portals
                .get(portal)
                .and_then(|(statement, params)| {
                    prepared
                        .texts
                        .get(statement)
                        .map(|text| (text.clone(), *params))
                })
        };
        if let Some((text, params)) = text {
            self.note_statement(&text, None, &mut Vec::new(), params);
        }
    }

    /// The session is pinned from its next lend on (or at once, when it holds one).
    fn pin(&self) {
        if !self.pinned.replace(true) {
            bump(&self.pool.counters.pins, 1);
            self.pool.pinned.set(self.pool.pinned.get() + 1);
        }
        if let Some(conn) = self.conn.borrow_mut().as_mut() {
            conn.dirty = true;
        }
    }

    // The reading side.

    fn poll_read(
        &self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            {
                let mut ready = self.ready.borrow_mut();
                if !ready.is_empty() {
                    let n = ready.len();
                    out.extend_from_slice(&ready.split());
                    return Poll::Ready(Ok(n));
                }
            }
            if self.failed.get() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "pooled shadow connection lost",
                )));
            }
            if self.finished.get() && self.points.borrow().is_empty() && !self.open_batch.get() {
                // The session's end, as a connection of its own would close after Terminate.
                return Poll::Ready(Ok(0));
            }
            self.reader.set(Some(cx.waker().clone()));
            let read = {
                let conn = self.conn.borrow();
                let Some(conn) = conn.as_ref() else {
                    return Poll::Pending;
                };
                let mut rbuf = self.rbuf.borrow_mut();
                let read = conn.stream.read_buf(&mut rbuf, chunk);
                std::pin::pin!(read).poll(cx)
            };
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => self.lost(),
                Poll::Ready(Ok(_)) => {
                    if !self.digest() {
                        // A message pgprism cannot read: the bytes from it on go to the
                        // session as they are, so its pump meets the bad message, counts it
                        // as a protocol error and ends the comparing, as with a shadow
                        // connection of the session's own; the connection is not lent again.
                        let rest = self.rbuf.borrow_mut().split();
                        self.ready.borrow_mut().extend_from_slice(&rest);
                        self.lost();
                    }
                }
            }
        }
    }

    /// Sorts the complete answers read: pgprism's own are dropped, the session's go to it;
    /// the connection goes back to the pool once the session is idle with nothing in flight.
    /// False when the bytes do not parse.
    fn digest(&self) -> bool {
        loop {
            let frame = {
                let mut rbuf = self.rbuf.borrow_mut();
                match wire::complete_prefix_until(&rbuf, self.message_bytes_max, |_, _| {
                    ControlFlow::Break(())
                }) {
                    Ok(0) => return true,
                    Ok(len) => rbuf.split_to(len),
                    Err(_) => return false,
                }
            };
            let body = &frame[wire::HEADER_BYTES..];
            let t = frame[0];
            if self.internal.get() > 0 {
                match t {
                    tag::ERROR_RESPONSE => self.internal_failed.set(true),
                    tag::READY_FOR_QUERY => {
                        self.internal.set(self.internal.get() - 1);
                        if self.internal.get() == 0
                            && let Some(turn) = self.on_turn.borrow().as_ref()
                        {
                            turn();
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if self.conn.borrow().is_none() {
                // Nothing of the session's is in flight: a notice while idle.
                continue;
            }
            self.ready.borrow_mut().extend_from_slice(&frame);
            match t {
                tag::ERROR_RESPONSE => {
                    self.point_failed.set(true);
                }
                tag::READY_FOR_QUERY => {
                    let status = body.first().copied().unwrap_or(b'I');
                    self.answered(status);
                    self.settle();
                }
                _ => {}
            }
        }
    }

    /// The session's oldest sync point in flight was answered, the session now `status`.
    fn answered(&self, status: u8) {
        self.status.set(status);
        let failed = self.point_failed.replace(false);
        let point = self.points.borrow_mut().pop_front();
        let mut settings = self.settings.borrow_mut();
        if let Some(point) = point {
            if point.implicit {
                settings.end_implicit(failed, status != b'I');
            }
            if failed {
                self.unsure.borrow_mut().extend(point.creates);
            }
        }
        if status == b'I' {
            settings.idle();
        }
    }

    /// Gives the connection back when the session is idle outside a transaction block, with
    /// nothing in flight and no extended batch open (and not pinned).
    fn settle(&self) {
        let releasable = self.points.borrow().is_empty()
            && !self.open_batch.get()
            && self.status.get() == b'I'
            && self.internal.get() == 0
            && self.cancelling.get() == 0
            && !self.pinned.get();
        if !releasable {
            return;
        }
        let Some(mut conn) = self.conn.borrow_mut().take() else {
            return;
        };
        self.rbuf.borrow_mut().clear();
        self.finish_lend(&mut conn);
        bump(&self.pool.counters.xact_count, 1);
        self.pools.give_back(&self.pool, conn);
    }

    /// What the connection holds once the session's lend ends.
    fn finish_lend(&self, conn: &mut PooledConn) {
        self.pool
            .linked
            .set(self.pool.linked.get().saturating_sub(1));
        if self.untracked.replace(false) {
            conn.settings = DIRTY;
        } else {
            let settings = self.settings.borrow();
            conn.settings = combined(self.baseline.sig, replay::signature(settings.frames()));
        }
        // What the session prepared during the lend is on the connection now, as far as it
        // succeeded: names a failed sync point created may or may not exist (the next lend
        // closes them, and prepares them again where its session has them).
        conn.sql_prepared = self
            .prepared
            .borrow()
            .names
            .iter()
            .map(|(name, frame)| (Box::from(name.as_str()), ident(frame)))
            .collect();
        let unsure: Vec<String> = self.unsure.borrow_mut().drain(..).collect();
        for name in unsure {
            conn.sql_prepared.insert(Box::from(name.as_str()), UNSURE);
        }
        if self.internal_failed.replace(false) {
            // Its preparation went otherwise than planned: reset before anyone else uses it.
            conn.dirty = true;
        }
        self.prepared.borrow_mut().portals.clear();
    }

    /// The lent connection failed: the shadow is gone for this session.
    fn lost(&self) {
        if let Some(conn) = self.conn.borrow_mut().take() {
            self.pool
                .linked
                .set(self.pool.linked.get().saturating_sub(1));
            self.pools.lost(&self.pool, conn);
        }
        self.fail();
    }

    /// Marks the lease closed and takes the session off the pool's client (and pinned)
    /// counts; `false` when it was closed already.
    fn close_once(&self) -> bool {
        if self.closed.replace(true) {
            return false;
        }
        self.pool
            .clients
            .set(self.pool.clients.get().saturating_sub(1));
        if self.pinned.get() {
            self.pool
                .pinned
                .set(self.pool.pinned.get().saturating_sub(1));
        }
        true
    }

    /// The session ended: a connection it still holds goes back once clean (a block left
    /// open is rolled back first, and a pinned one reset), or is closed when a statement is
    /// still in flight.
    fn shutdown(&self) {
        if !self.close_once() {
            return;
        }
        self.finished.set(true);
        let Some(mut conn) = self.conn.borrow_mut().take() else {
            return;
        };
        let busy = !self.points.borrow().is_empty()
            || self.open_batch.get()
            || self.internal.get() > 0
            // A cancel with its key may still land: never lent again.
            || self.cancelling.get() > 0
            || !self.rbuf.borrow().is_empty();
        self.finish_lend(&mut conn);
        let pools = self.pools.clone();
        let pool = self.pool.clone();
        if busy {
            crate::exec::spawn(async move { pools.release(&pool, conn, false).await });
            return;
        }
        let in_block = self.status.get() != b'I';
        crate::exec::spawn(async move {
            if in_block {
                let up = &pools.upstream;
                if crate::backend::pool::run_simple(&mut conn, "ROLLBACK", up)
                    .await
                    .is_err()
                {
                    pools.release(&pool, conn, false).await;
                    return;
                }
            }
            pools.release(&pool, conn, true).await;
        });
    }
}

/// Whether `data` is whole CopyData, CopyDone and CopyFail frames only.
fn only_copy_frames(mut data: &[u8]) -> bool {
    if data.is_empty() {
        return false;
    }
    while !data.is_empty() {
        let Some(&[t, a, b, c, d]) = data.get(..5) else {
            return false;
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if !matches!(t, b'd' | b'c' | b'f') || len < 4 || data.len() < 1 + len {
            return false;
        }
        data = &data[1 + len..];
    }
    true
}

impl Drop for Lease {
    /// The session was dropped without ending (its shard stops): a connection still lent is
    /// closed at once, with no task (the shard may be going away).
    fn drop(&mut self) {
        if !self.close_once() {
            return;
        }
        if let Some(conn) = self.conn.borrow_mut().take() {
            self.pool
                .linked
                .set(self.pool.linked.get().saturating_sub(1));
            self.pools.close_now(&self.pool, conn);
        }
    }
}

/// The ident of a name a connection may or may not hold.
const UNSURE: u64 = 0;

/// What tells one creation of a statement from another of the same name (never [`UNSURE`]).
fn ident(frame: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(frame);
    hasher.finish().max(1)
}

/// A Query frame holding `text` alone (the client's PREPARE, prepared again).
fn query_frame_of(text: &str) -> Bytes {
    let mut out = BytesMut::new();
    let _ = wire::encode::query(&mut out, text);
    out.freeze()
}

/// The length of the complete frame at the start of `buf`, if any.
fn first_frame(buf: &[u8], message_bytes_max: usize) -> Option<usize> {
    match wire::complete_prefix_until(buf, message_bytes_max, |_, _| ControlFlow::Break(())) {
        Ok(0) | Err(_) => None,
        Ok(len) => Some(len),
    }
}

/// `data` without its Terminate frames (a pooled connection outlives the session), and
/// whether it held one.
fn without_terminate(data: Bytes) -> (Bytes, bool) {
    let mut at = 0;
    let mut found = false;
    let mut kept = BytesMut::new();
    while let Some(rest) = data.get(at..) {
        let Some(len) = first_frame(rest, usize::MAX >> 1) else {
            break;
        };
        if rest[0] == tag::TERMINATE {
            if !found {
                kept.extend_from_slice(&data[..at]);
            }
            found = true;
        } else if found {
            kept.extend_from_slice(&rest[..len]);
        }
        at += len;
    }
    if !found {
        return (data, false);
    }
    if let Some(rest) = data.get(at..) {
        kept.extend_from_slice(rest);
    }
    (kept.freeze(), true)
}

/// The settings a session's `options` startup parameter sets (`-c name=value`,
/// `--name=value`), as PostgreSQL reads them (a backslash escapes the next character).
pub(crate) fn options_settings(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let pair = if w == "-c" {
            words.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some((name, value)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            out.push((name.replace('-', "_"), value.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_frames_alone_are_told_apart() {
        let mut frames = Vec::new();
        frames.extend_from_slice(b"d\0\0\0\x07abc");
        frames.extend_from_slice(b"c\0\0\0\x04");
        assert!(only_copy_frames(&frames));
        let mut with_sync = frames.clone();
        with_sync.extend_from_slice(b"S\0\0\0\x04");
        assert!(!only_copy_frames(&with_sync));
        assert!(
            !only_copy_frames(&frames[..frames.len() - 1]),
            "a cut frame"
        );
        assert!(!only_copy_frames(b"d\0\0\0\x02"), "a length below 4");
        assert!(!only_copy_frames(b""));
    }

    #[test]
    fn terminate_frames_are_left_out() {
        let mut buf = BytesMut::new();
        wire::encode::sync(&mut buf);
        wire::encode::terminate(&mut buf);
        let (kept, found) = without_terminate(buf.freeze());
        assert!(found);
        assert_eq!(&kept[..], &[b'S', 0, 0, 0, 4]);
        let mut buf = BytesMut::new();
        wire::encode::sync(&mut buf);
        let (kept, found) = without_terminate(buf.freeze());
        assert!(!found);
        assert_eq!(kept.len(), 5);
    }

    #[test]
    fn options_are_read_as_settings() {
        assert_eq!(
            options_settings("-c search_path=a\\ b --work-mem=64MB -cstatement_timeout=5"),
            [
                ("search_path".to_string(), "a b".to_string()),
                ("work_mem".to_string(), "64MB".to_string()),
                ("statement_timeout".to_string(), "5".to_string()),
            ]
        );
        assert!(options_settings("").is_empty());
    }
}
