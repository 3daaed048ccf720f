//! A client session in transaction pooling mode: pgprism authenticates the client itself,
//! answers its startup, and lends it a primary connection from the shard's pool from the
//! first message of a transaction until the server reports idle with nothing in flight.
//!
//! The client keeps its session state whichever connection it gets:
//! * its settings (startup parameters, then its `SET`/`RESET`/`set_config` as the tracker
//!   keeps them) are applied to a connection that differs, as hidden statements whose answers
//!   the client never sees;
//! * its protocol-level prepared statements are prepared on the connections under a name
//!   derived from their text and parameter types (so clients share them), on demand, and its
//!   Parse of a statement a connection already holds, and its Close, are answered by pgprism
//!   in their place among the server's answers ([`Replies`]);
//! * its SQL-level `PREPARE`d statements are re-prepared under their own name on a connection
//!   that lacks them (or holds another client's of that name) before an `EXECUTE`.
//!
//! What a connection cannot carry to another client (`LISTEN`, session advisory locks,
//! temporary objects, `WITH HOLD` cursors) pins the client to its connection until it leaves;
//! the connection is then reset with `pool.server-reset-query` before anyone else gets it.
//! A client that leaves mid-transaction has its transaction rolled back first; one that
//! leaves with a statement in flight costs the pool that connection (closed, never lent
//! dirty).

use std::cell::{Cell, RefCell};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};

use super::pipeline::{Part, Pipeline, UNIT_BYTES_MAX, UnitLine, Want};
use super::session::{ShardCtx, error_bytes};
use crate::backend::pool::{NO_SETTINGS, Pool, PoolError, Pools, ServerConn, bump};
use crate::compare;
use crate::exec::net::Stream;
use crate::session::replies::{Awaits, Replies, Route, Settled};
use crate::session::{Refers, Slot, Statement, Step, Tracker};
use crate::sql::{self, Pin};
use crate::stats::ShardStats;
use crate::wire::{self, sqlstate, tag};

/// Settings hash meaning "unknown: apply everything".
const SETTINGS_UNKNOWN: u64 = u64::MAX;

/// Key of a hidden statement that brings settings (its failure makes them unknown).
const KEY_SETTINGS: u64 = 0;
/// Key of a hidden re-Parse of the unnamed statement.
const KEY_UNNAMED: u64 = 1;

/// What the pool derived from a client's prepared statement (kept in the statement's
/// [`Slot::Pool`]).
enum PoolDef {
    /// A Parse: its content hash, its name on pooled connections, and the Parse body after
    /// the name (query text and parameter types).
    Protocol {
        hash: u64,
        server_name: Box<str>,
        rest: Bytes,
        /// Whether its statement may run on a connection shared with other clients
        /// ([`sql::shareable_alone`]).
        shareable: bool,
    },
    /// `PREPARE name ...`: the name, and the statement text that prepares it.
    Sql { hash: u64, text: Rc<str> },
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    // 0 and 1 are keys of their own (KEY_SETTINGS, KEY_UNNAMED).
    h.finish().max(2)
}

/// A Parse body's name, and what follows it.
fn split_name(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = memchr::memchr(0, body)?;
    Some((&body[..nul], &body[nul + 1..]))
}

impl PoolDef {
    fn protocol(parse_body: &[u8]) -> PoolDef {
        let rest = split_name(parse_body).map(|(_, r)| r).unwrap_or_default();
        let hash = content_hash(rest);
        let text = memchr::memchr(0, rest).map(|n| &rest[..n]).unwrap_or(rest);
        PoolDef::Protocol {
            hash,
            server_name: format!("pgprism_{hash:016x}").into(),
            rest: Bytes::copy_from_slice(rest),
            shareable: sql::shareable_alone(text),
        }
    }
}

/// What [`Session::shareable`] learns of an extended batch, frame by frame.
#[derive(Default)]
struct UnitScan {
    /// Shared statements the connection must hold.
    hashes: Vec<u64>,
    /// The batch parses the unnamed statement.
    unnamed: bool,
    /// Names the batch parses.
    named: Vec<Vec<u8>>,
}

/// A frame `tag` whose body is `parts` one after the other.
fn frame_of(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(tag);
    out.put_u32((4 + len) as u32);
    for part in parts {
        out.put_slice(part);
    }
}

fn query_frame(out: &mut BytesMut, sql: &str) -> bool {
    wire::encode::query(out, sql).is_ok()
}

/// A `SET` for a startup parameter the client sent (PostgreSQL applies those as session
/// defaults; a pooled connection gets them as settings). Parameters that are not settings
/// (`user`, `database`, `replication`, `options`) and names that are not plain identifiers
/// are left out.
fn startup_set(key: &str, value: &str) -> Option<Bytes> {
    if matches!(key, "user" | "database" | "replication" | "options")
        || key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return None;
    }
    let quoted = value.replace('\'', "''");
    let mut out = BytesMut::new();
    query_frame(&mut out, &format!("SET {key} = '{quoted}'")).then(|| out.freeze())
}

/// `-c name=value` and `--name=value` of a startup `options` parameter.
fn options_sets(options: &str) -> Vec<Bytes> {
    let mut sets = Vec::new();
    let mut words = options.split_ascii_whitespace();
    while let Some(word) = words.next() {
        let pair = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest)
        } else {
            word.strip_prefix("-c")
        };
        if let Some((key, value)) = pair.and_then(|p| p.split_once('='))
            && let Some(frame) = startup_set(&key.replace('-', "_"), value)
        {
            sets.push(frame);
        }
    }
    sets
}

/// The cancel keys of pooled sessions, shared by all shards: a CancelRequest may arrive on
/// any of them. Each session's slot holds the key of the server connection lent to it (0:
/// none), updated when it is lent and returned.
#[derive(Default, Clone)]
pub struct CancelKeys(Arc<std::sync::Mutex<CancelMap>>);

/// Client pid → (client secret, the lent connection's packed key).
type CancelMap = std::collections::HashMap<i32, (i32, Arc<AtomicU64>)>;

impl CancelKeys {
    fn insert(&self, pid: i32, secret: i32, slot: Arc<AtomicU64>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, (secret, slot));
    }

    fn remove(&self, pid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// The server key to cancel for a client's (pid, secret); `None` when the pid is not a
    /// pooled session's (a session-mode client's key is the primary's own) — `Some(None)`
    /// when it is but nothing runs or the secret is wrong.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Option<(i32, i32)>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (expected, slot) = map.get(&pid)?;
        if *expected != secret {
            return Some(None);
        }
        let packed = slot.load(Ordering::Acquire);
        if packed == 0 {
            return Some(None);
        }
        Some(Some(((packed >> 32) as i32, packed as u32 as i32)))
    }
}

pub(super) fn pack_key(key: Option<(i32, i32)>) -> u64 {
    match key {
        Some((pid, secret)) => ((pid as u32 as u64) << 32) | secret as u32 as u64,
        None => 0,
    }
}

/// A random BackendKeyData for a pooled client: the pid carries the shard and a session
/// number, negative so it can never be a real server pid (those are positive).
fn client_key(shard: usize, id: u64) -> (i32, i32) {
    let pid = -(1 + (((shard as i64) << 22) | (id as i64 & 0x3F_FFFF)) as i32).abs();
    let mut secret = [0u8; 4];
    let _ = getrandom::fill(&mut secret);
    (pid, i32::from_be_bytes(secret))
}

/// Where the session loop stands after a turn.
/// Where a unit that waited in line goes: on a shared connection, on the connection lent to
/// its client, or nowhere (the client was told why).
enum Room {
    Shared(Rc<Pipeline>),
    Lent,
    End,
}

enum Turn {
    Continue,
    /// The session is over (the client left, or was told why).
    End,
}

struct Session<'a> {
    shard: &'a ShardCtx,
    /// The shard, for the tasks a session starts (a pipeline's).
    owner: Rc<ShardCtx>,
    pools: &'a Pools,
    pool: Rc<Pool>,
    client: Stream,
    tracker: Tracker,
    replies: Replies,
    conn: Option<ServerConn>,
    lent_at: Instant,
    statements_in_lend: u64,
    /// `SET` frames from the startup packet.
    base: Vec<Bytes>,
    /// The startup packet's parameters (a session that moves takes them along).
    params: Vec<(String, String)>,
    /// The settings' hash, and the tracker's count of applied setting changes it was
    /// worked out at (hashed again only after a change, not at every lend and return).
    settings_hashed: Cell<Option<(u64, u64)>>,
    pinned: Option<Pin>,
    cancel_slot: Arc<AtomicU64>,
    /// Bytes for the server and for the client, gathered over a turn.
    to_server: BytesMut,
    to_client: BytesMut,
    /// Names of hidden SQL re-prepares, by key, to forget them on the connection if they fail.
    hidden_sql: Vec<(u64, Box<str>)>,
    /// Hidden SQL re-preparations not answered yet: (key, name, hash).
    pending_sql: Vec<(u64, Box<str>, u64)>,
    state: Rc<ClientState>,
    /// Since when the lent connection has had answers outstanding (query time).
    busy_since: Option<Instant>,
    /// The session's mirror links (frames are replayed on the mirrors as in session mode).
    router: Option<crate::mirror::Router>,
    /// Client frames to route to the mirrors, with what the tracker made of them.
    to_route: Vec<(crate::session::Framed, Bytes)>,
    /// The session's mirrors and shadow, for its client's cancels (None: neither).
    cancel: Option<Rc<super::session::Sides>>,
    /// Compare mode: the shadow's side of the session.
    compare: Option<CompareUp>,
    /// Compare mode with ordering: the kernel's receive time of the server answers in
    /// `to_client` (see `Relayed::push`; 0: none).
    answers_stamp_ns: u64,
}

/// What a pooled session brings with it from its startup, and takes along if it moves to
/// another shard.
struct Carried {
    base: Vec<Bytes>,
    params: Vec<(String, String)>,
    cancel_slot: Arc<AtomicU64>,
}

impl<'a> Session<'a> {
    /// A session with nothing lent, pinned, buffered or pending; no mirrors, no shadow
    /// (a caller that has them sets `router` and `compare` before the first turn).
    fn new(
        shard: &'a Rc<ShardCtx>,
        pools: &'a Pools,
        pool: Rc<Pool>,
        client: Stream,
        tracker: Tracker,
        state: Rc<ClientState>,
        carried: Carried,
    ) -> Self {
        let Carried {
            base,
            params,
            cancel_slot,
        } = carried;
        Session {
            shard,
            owner: shard.clone(),
            pools,
            pool,
            client,
            tracker,
            replies: Replies::default(),
            conn: None,
            lent_at: Instant::now(),
            statements_in_lend: 0,
            base,
            params,
            settings_hashed: Cell::new(None),
            pinned: None,
            cancel_slot,
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            hidden_sql: Vec::new(),
            pending_sql: Vec::new(),
            state,
            busy_since: None,
            router: None,
            to_route: Vec::new(),
            cancel: None,
            compare: None,
            answers_stamp_ns: 0,
        }
    }
}

/// A compared pooled session's upstream half: the client's frames (as it sent them, before
/// pooling rewrote them) planned for the shadow at each write to the primary, and the
/// answers its client is to see handed to compare's pump instead of the client.
struct CompareUp {
    dispatch: compare::Dispatch,
    relayed: Rc<compare::Relayed>,
    host: Rc<CompareHost>,
    /// The client's frames since the last plan, with what the tracker made of them.
    frames: BytesMut,
    framed: Vec<crate::session::Framed>,
    /// The tracker's number of their first sync point, and when the first was read.
    first_sync: u64,
    read_at: Instant,
    /// Planned and not yet queued for the shadow (that follows the primary write).
    planned: bool,
}

/// A compared pooled session as compare's pump sees it: the session feeds its tracker
/// itself (it decides lending on it), so the pump only judges and writes to the client.
struct CompareHost {
    state: Rc<ClientState>,
    client_sent_all: Cell<bool>,
    terminated: Cell<bool>,
    client_gone: Cell<bool>,
    /// The session's last word for the client (pgprism's own FATAL), written once the pump
    /// has written everything before it.
    fatal: RefCell<Option<Bytes>>,
}

impl CompareHost {
    fn say(&self, msg: Bytes) {
        let mut fatal = self.fatal.borrow_mut();
        if fatal.is_none() {
            *fatal = Some(msg);
        }
    }
}

impl compare::Host for CompareHost {
    fn tracker(&self) -> Option<&RefCell<Tracker>> {
        None
    }

    fn answer_sync(&self, _seq: u64, _arrived: Instant) {}

    fn client_sent_all(&self) -> bool {
        self.client_sent_all.get()
    }

    fn client_said_terminate(&self) -> bool {
        self.terminated.get()
    }

    fn set_writing(&self, writing: bool) {
        self.state.relaying.set(writing);
    }

    fn set_holding(&self, holding: bool) {
        self.state.owed.set(holding);
    }

    fn client_lost(&self) {
        self.client_gone.set(true);
    }

    fn fail(&self, code: &str, message: &str) {
        self.say(error_bytes("FATAL", code, message));
    }
}

/// What the console sees of a pooled client, updated as it goes.
pub(super) struct ClientState {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: String,
    pub port: u16,
    pub local_addr: String,
    pub local_port: u16,
    pub connect_time: SystemTime,
    pub application_name: String,
    pub tls: bool,
    pub remote_pid: i32,
    /// It holds a server connection.
    pub busy: Cell<bool>,
    /// It waits for one, since then.
    pub waiting_since: Cell<Option<Instant>>,
    /// When it last asked for a connection (SHOW CLIENTS `request_time`): kept as the
    /// monotonic clock reading the lend takes anyway, turned into wall-clock time when a row
    /// is made, not a second (wall) clock read per lend.
    pub request_at: Cell<Instant>,
    /// The connection lent to it: (id, server pid, opened at).
    pub server: Cell<Option<(u64, i32, SystemTime)>>,
    pub pinned: Cell<Option<&'static str>>,
    /// Compare mode: the pump writes to the client now, or holds answers the client has not
    /// been given (waiting for the shadow); either keeps the session busy for a drain.
    pub relaying: Cell<bool>,
    pub owed: Cell<bool>,
    /// Its session can move to another shard between transactions (plain transaction
    /// pooling: no mirrors, no shadow, no TLS).
    pub movable: Cell<bool>,
    /// The shard it was asked to move to (see [`ClientState::ask_to_move`]), and the waker
    /// of its session's wait for the client.
    move_to: Cell<Option<usize>>,
    move_waker: Cell<Option<std::task::Waker>>,
}

impl ClientState {
    pub(super) fn new(
        id: u64,
        user: &str,
        database: &str,
        client: &Stream,
        params: &[(String, String)],
        remote_pid: i32,
    ) -> ClientState {
        let application_name = params
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        ClientState::with(
            id,
            user.to_string(),
            database.to_string(),
            peer(client, true),
            peer(client, false),
            SystemTime::now(),
            application_name,
            client.is_tls(),
            remote_pid,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn with(
        id: u64,
        user: String,
        database: String,
        (addr, port): (String, u16),
        (local_addr, local_port): (String, u16),
        connect_time: SystemTime,
        application_name: String,
        tls: bool,
        remote_pid: i32,
    ) -> ClientState {
        ClientState {
            id,
            user,
            database,
            addr,
            port,
            local_addr,
            local_port,
            connect_time,
            application_name,
            tls,
            remote_pid,
            busy: Cell::new(false),
            waiting_since: Cell::new(None),
            request_at: Cell::new(Instant::now()),
            server: Cell::new(None),
            pinned: Cell::new(None),
            relaying: Cell::new(false),
            owed: Cell::new(false),
            movable: Cell::new(false),
            move_to: Cell::new(None),
            move_waker: Cell::new(None),
        }
    }

    /// Whether it could move now: movable, between transactions (no connection, not
    /// waiting for one, not pinned) and not asked already.
    pub(super) fn can_move(&self) -> bool {
        self.movable.get()
            && !self.busy.get()
            && self.waiting_since.get().is_none()
            && self.pinned.get().is_none()
            && self.move_to.get().is_none()
    }

    /// Asks its session to move to shard `to` when it next waits for its client between
    /// transactions (at once when it waits now).
    pub(super) fn ask_to_move(&self, to: usize) {
        self.move_to.set(Some(to));
        if let Some(waker) = self.move_waker.take() {
            waker.wake();
        }
    }

    /// Completes with the shard its session was asked to move to.
    async fn asked_to_move(&self) -> usize {
        futures_lite::future::poll_fn(|cx| match self.move_to.get() {
            Some(to) => std::task::Poll::Ready(to),
            None => {
                self.move_waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// When it last asked for a connection, by the wall clock (`now`: the monotonic one).
    pub(super) fn request_time(&self, now: Instant) -> SystemTime {
        let ago = now.saturating_duration_since(self.request_at.get());
        SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    pub(super) fn row(&self, shard: usize, now: Instant) -> crate::stats::pools::ClientRow {
        let waiting = self.waiting_since.get();
        crate::stats::pools::ClientRow {
            id: self.id,
            shard,
            user: self.user.clone(),
            database: self.database.clone(),
            state: if waiting.is_some() {
                "waiting"
            } else if self.busy.get() {
                "active"
            } else {
                "idle"
            },
            addr: self.addr.clone(),
            port: self.port,
            local_addr: self.local_addr.clone(),
            local_port: self.local_port,
            connect_time: self.connect_time,
            request_time: self.request_time(now),
            wait_us: waiting
                .map(|w| now.saturating_duration_since(w).as_micros() as u64)
                .unwrap_or(0),
            link: self.server.get().map(|s| s.0),
            remote_pid: self.remote_pid,
            tls: self.tls,
            application_name: self.application_name.clone(),
            pinned: self.pinned.get(),
        }
    }
}

/// A pooled client on its way to another shard, between transactions: everything its
/// session keeps from one transaction to the next, as plain data (its socket travels
/// beside it). The cancel key stays registered (the map is the process's) and its slot
/// travels, so a CancelRequest with the key the client was given still finds it.
pub struct MovedClient {
    /// What the client sent that was not handled yet (part of a message at most).
    buf: BytesMut,
    unix: bool,
    user: String,
    database: String,
    login: wire::ServerLogin,
    params: Vec<(String, String)>,
    base: Vec<Bytes>,
    settings: crate::session::Settings,
    statements: Vec<MovedStatement>,
    pid: i32,
    cancel_slot: Arc<AtomicU64>,
    addr: String,
    port: u16,
    local_addr: String,
    local_port: u16,
    connect_time: SystemTime,
    application_name: String,
}

impl MovedClient {
    /// Its socket is a Unix-domain one.
    pub fn is_unix(&self) -> bool {
        self.unix
    }

    /// It cannot go on (its shard stopped before taking it, its socket could not be
    /// adopted, it left on its way): its cancel key goes, and its session, which left its
    /// first shard as moved, not closed, is counted closed on `shard`.
    pub fn lost(&self, shard: &ShardCtx) {
        shard.cancel_keys.remove(self.pid);
        ShardStats::bump(&shard.stats.counters.sessions_closed, 1);
    }
}

/// A prepared statement of a moving client, and what the pool derived from it.
struct MovedStatement {
    name: String,
    text: String,
    params: bool,
    def: Option<MovedDef>,
}

/// [`PoolDef`] as plain data.
enum MovedDef {
    Protocol {
        hash: u64,
        server_name: Box<str>,
        rest: Bytes,
        shareable: bool,
    },
    Sql {
        hash: u64,
        text: String,
    },
}

impl MovedDef {
    fn of(def: &PoolDef) -> MovedDef {
        match def {
            PoolDef::Protocol {
                hash,
                server_name,
                rest,
                shareable,
            } => MovedDef::Protocol {
                hash: *hash,
                server_name: server_name.clone(),
                rest: rest.clone(),
                shareable: *shareable,
            },
            PoolDef::Sql { hash, text } => MovedDef::Sql {
                hash: *hash,
                text: text.to_string(),
            },
        }
    }

    fn into_def(self) -> PoolDef {
        match self {
            MovedDef::Protocol {
                hash,
                server_name,
                rest,
                shareable,
            } => PoolDef::Protocol {
                hash,
                server_name,
                rest,
                shareable,
            },
            MovedDef::Sql { hash, text } => PoolDef::Sql {
                hash,
                text: text.into(),
            },
        }
    }
}

/// How a session's loop ended.
enum Leave {
    /// The client left, or was told why.
    End,
    /// Asked to move to shard `to`, between transactions: `cbuf` is what the client sent
    /// that was not handled yet.
    Move { to: usize, cbuf: BytesMut },
}

/// The peer's (or, `!remote`, our own) address and port of a client socket.
fn peer(client: &Stream, remote: bool) -> (String, u16) {
    if client.is_unix() {
        return ("unix".into(), 0);
    }
    // SAFETY: the descriptor stays open for the duration of this call (the stream holds it).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(client.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    let addr = if remote {
        sock.peer_addr()
    } else {
        sock.local_addr()
    };
    match addr.ok().and_then(|a| a.as_socket()) {
        Some(a) => (a.ip().to_string(), a.port()),
        None => (String::new(), 0),
    }
}

/// Serves a client in transaction pooling mode (authentication, startup, the session).
pub(super) async fn serve(
    shard: Rc<ShardCtx>,
    client: Stream,
    params: Vec<(String, String)>,
    mut buf: BytesMut,
    deadline: Instant,
) {
    let Some(pools) = shard.pools.as_ref() else {
        return;
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(user) = param("user").filter(|u| !u.is_empty()).map(str::to_string) else {
        let msg = error_bytes(
            "FATAL",
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        );
        let _ = client.write_all(&msg).await;
        return;
    };
    let database = param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let login =
        match super::login::authenticate_client(&shard, &client, &mut buf, &user, deadline).await {
            Some(login) => login,
            None => return,
        };
    if super::console::is_console_database(&database) {
        // The console's configuration, which a SET changes at once (this shard's copy
        // follows it only at its next care tick).
        let allowed = shard
            .console
            .as_ref()
            .is_some_and(|c| super::console::Access::of(&c.config().pool, &user).is_some());
        if !allowed {
            let mut msg = BytesMut::new();
            super::console::not_allowed(&mut msg);
            let _ = client.write_all(&msg).await;
            return;
        }
        super::login::serve_console(&shard, client, &user, buf).await;
        return;
    }
    let pool = match pools.pool(&user, &database) {
        Ok(pool) => pool,
        Err(err) => {
            refuse(&shard, &client, &err).await;
            return;
        }
    };
    pool.set_login(login);
    let id = shard.next_session_id();
    if pool.params().is_empty() {
        // The first client of this pair: one connection tells what the server reports (and
        // whether it takes this user and database at all).
        match pools.acquire(&pool).await {
            Ok(conn) => pools.release(&pool, conn, true).await,
            Err(err) => {
                // A name the server does not know leaves no pool behind (issue 14), gone
                // before the client hears why.
                drop(pool);
                pools.forget_failed(&user, &database);
                refuse(&shard, &client, &err).await;
                return;
            }
        }
    }
    // Compare mode: the session's shadow (a lease on the shard's shadow pool, or a
    // connection of its own), before the client hears it may start.
    let shadow = match super::session::open_compare(&shard, &client, None, &params, id).await {
        Ok(shadow) => shadow,
        Err(()) => return,
    };
    let (pid, secret) = client_key(shard.index, id);
    let cancel_slot = Arc::new(AtomicU64::new(0));
    shard.cancel_keys.insert(pid, secret, cancel_slot.clone());
    let mut hello = BytesMut::new();
    wire::encode::authentication_ok(&mut hello);
    let mut reported: Vec<(String, String)> = pool.params();
    for (key, value) in &params {
        if let Some(slot) = reported.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value.clone();
        }
    }
    for (key, value) in &reported {
        let _ = wire::encode::parameter_status(&mut hello, key, value);
    }
    wire::encode::backend_key_data(&mut hello, pid, secret);
    wire::encode::ready_for_query(&mut hello, wire::TransactionStatus::Idle);
    let mut base: Vec<Bytes> = params
        .iter()
        .filter_map(|(k, v)| startup_set(k, v))
        .collect();
    if let Some(options) = param("options") {
        base.extend(options_sets(options));
    }
    let mut tracker = Tracker::new(crate::session::Limits {
        statements: true,
        settings: true,
        ..shard.settings.session_limits
    });
    // The startup is answered by pgprism: the tracker learns it from the same bytes.
    let _ = wire::complete_prefix(&hello, usize::MAX, |t, b| {
        tracker.server(t, b);
    });
    if client.write_all(&hello).await.is_err() {
        shard.cancel_keys.remove(pid);
        return;
    }
    // What the session holds in the shard leaves with it, however it ends (its future is
    // dropped mid-session when the shard stops, too).
    let held = Held::take(&shard, &pool, id, pid);
    let state = Rc::new(ClientState::new(
        id, &user, &database, &client, &params, pid,
    ));
    let registration = shard.register_pooled(id, &client, state.clone());
    let (compare, down) = match shadow {
        Some((dispatch, comparer, writer)) => {
            let host = Rc::new(CompareHost {
                state: state.clone(),
                client_sent_all: Cell::new(false),
                terminated: Cell::new(false),
                client_gone: Cell::new(false),
                fatal: RefCell::new(None),
            });
            let relayed = Rc::new(compare::Relayed::default());
            let up = CompareUp {
                dispatch,
                relayed: relayed.clone(),
                host: host.clone(),
                frames: BytesMut::new(),
                framed: Vec::new(),
                first_sync: 0,
                read_at: Instant::now(),
                planned: false,
            };
            let shadow = up.dispatch.shadow.clone();
            (Some(up), Some((comparer, writer, host, relayed, shadow)))
        }
        None => (None, None),
    };
    let router = shard.mirror_router(&params);
    state
        .movable
        .set(router.is_none() && compare.is_none() && !client.is_tls() && shard.moves_clients());
    let carried = Carried {
        base,
        params,
        cancel_slot,
    };
    let mut session = Session::new(&shard, pools, pool.clone(), client, tracker, state, carried);
    session.router = router;
    session.compare = compare;
    // A cancel reaches the mirrors and the shadow too (through the registry, under
    // pgprism's own key).
    let mirrors = session.router.as_ref().map(|r| r.links().to_vec());
    let shadow_cancel = down.as_ref().map(|(comparer, ..)| comparer.cancel());
    if let Some(sides) = super::session::Sides::of(shadow_cancel, mirrors.unwrap_or_default()) {
        sides.register(&shard, (pid, secret), id);
        let sides = Rc::new(sides);
        shard.pooled_sides.borrow_mut().insert(id, sides.clone());
        session.cancel = Some(sides);
    }
    let Some((comparer, writer, host, relayed, shadow)) = down else {
        serve_plain(&shard, session, buf, registration, held).await;
        return;
    };
    let client = session.client.clone();
    let served = async {
        // A compared session never moves (see `take_move`).
        let _ = session.run(buf).await;
        session.finish().await;
        if let Some(up) = session.compare.as_mut() {
            // The shadow runs what it was sent, then ends too; the pump reads the end of
            // the primary's answers after the last of them.
            up.dispatch.finish(false);
            // A session pgprism ends with its own FATAL (the primary lost, no connection in
            // time) stops the pump at once, as a lost primary does in session mode; a client
            // that left still has the shadow judged what it sent.
            let said = up.host.fatal.borrow().is_some();
            up.host.client_sent_all.set(!said);
            up.relayed.close();
        }
    };
    let settings = compare::PumpSettings {
        message_bytes_max: shard.settings.message_bytes_max,
        read_chunk_bytes: shard.read_chunk_bytes(),
        shard: shard.index,
    };
    let pump = compare::Pump::new(
        &*host,
        &shard.stats,
        settings,
        compare::Primary::Relayed(relayed),
        shadow,
        client.clone(),
        comparer,
        BytesMut::new(),
    );
    let judged = async {
        pump.run().await;
        // The session's own last word, after every answer before it.
        let fatal = host.fatal.borrow_mut().take();
        if let Some(msg) = fatal
            && !host.client_gone.get()
            && !host.terminated.get()
        {
            let _ = client.write_all(&msg).await;
        }
        // A pump that stopped early (the shadow as source lost, a malformed answer)
        // ends the session: its client reads fail.
        client.shutdown();
    };
    // Each part polled only when woken (why none waits unwoken: compare/exchange.rs,
    // "Three halves, three wakers").
    crate::exec::join3(served, judged, writer.run()).await;
    drop(registration);
    drop(held);
}

/// Runs a pooled session without a shadow to its end, or until it moves to another shard.
async fn serve_plain(
    shard: &Rc<ShardCtx>,
    mut session: Session<'_>,
    buf: BytesMut,
    registration: super::session::PooledRegistration,
    mut held: Held,
) {
    match session.run(buf).await {
        Leave::End => session.finish().await,
        Leave::Move { to, cbuf } => {
            let (client, moved) = session.pack(cbuf);
            // Its row, its count in the pool and its table entry leave this shard; its
            // cancel key stays registered (the client keeps it).
            registration.moved();
            held.keep_key = true;
            drop(held);
            move_client(shard, client, to, moved).await;
            return;
        }
    }
    drop(registration);
    drop(held);
}

/// Takes a client's socket off this shard and hands it, with its session, to shard `to`;
/// when that shard cannot take it (its hand-over queue full, or it stopped), the session
/// goes on here. A client that left meanwhile just ends.
async fn move_client(shard: &Rc<ShardCtx>, client: Stream, to: usize, mut moved: MovedClient) {
    let fd = match client.detach(&mut moved.buf).await {
        Ok(fd) => fd,
        Err(_) => {
            // It left on its way out: its registration went as moved, so it is counted
            // closed here, once.
            moved.lost(shard);
            return;
        }
    };
    let moved = Box::new(moved);
    let handed = match shard.mover() {
        Some(mover) => mover(to, fd, moved),
        None => Err((fd, moved)),
    };
    match handed {
        Ok(()) => ShardStats::bump(&shard.stats.counters.clients_moved_out, 1),
        Err((fd, moved)) => {
            // Not a move: neither out nor in, but counted so a refusal can be seen.
            ShardStats::bump(&shard.stats.counters.client_moves_refused, 1);
            match Stream::adopt(fd, moved.unix) {
                Ok(client) => {
                    crate::exec::spawn(go_on(shard.clone(), client, *moved));
                }
                Err(err) => {
                    tracing::warn!(shard = shard.index, error = %err, "cannot serve a client that could not move");
                    moved.lost(shard);
                }
            }
        }
    }
}

/// Goes on with a pooled client that moved to this shard between transactions (or could
/// not leave it): its settings, prepared statements, cancel key and console row as they
/// were, under a new session number here.
pub async fn resume(shard: Rc<ShardCtx>, client: Stream, moved: MovedClient) {
    if shard.pools.is_some() {
        ShardStats::bump(&shard.stats.counters.clients_moved_in, 1);
    }
    go_on(shard, client, moved).await;
}

/// Goes on with a pooled client on this shard, whether it moved here or came back after
/// its move was refused (not counted as moved in: it never left).
async fn go_on(shard: Rc<ShardCtx>, client: Stream, moved: MovedClient) {
    let Some(pools) = shard.pools.as_ref() else {
        moved.lost(&shard);
        return;
    };
    let MovedClient {
        buf,
        unix: _,
        user,
        database,
        login,
        params,
        base,
        settings,
        statements,
        pid,
        cancel_slot,
        addr,
        port,
        local_addr,
        local_port,
        connect_time,
        application_name,
    } = moved;
    // Its pair was counted against `pool.pairs-max` when it logged in.
    let pool = pools.pool_unbounded(&user, &database);
    pool.set_login(login);
    let id = shard.next_session_id();
    let mut tracker = Tracker::new(crate::session::Limits {
        statements: true,
        settings: true,
        ..shard.settings.session_limits
    });
    tracker.adopt_session(settings);
    for moved in statements {
        if let Some(statement) = tracker.adopt_statement(&moved.name, &moved.text, moved.params)
            && let Some(def) = moved.def
        {
            statement.extension(Slot::Pool, || def.into_def());
        }
    }
    let held = Held::take(&shard, &pool, id, pid);
    let state = Rc::new(ClientState::with(
        id,
        user,
        database,
        (addr, port),
        (local_addr, local_port),
        connect_time,
        application_name,
        false,
        pid,
    ));
    state.movable.set(shard.moves_clients());
    let registration = shard.register_pooled(id, &client, state.clone());
    let carried = Carried {
        base,
        params,
        cancel_slot,
    };
    let session = Session::new(&shard, pools, pool.clone(), client, tracker, state, carried);
    serve_plain(&shard, session, buf, registration, held).await;
}

/// A pooled session's entries in its shard (its cancel sides with their registry entry and
/// mirror links, its count in the pool, its cancel key), removed when it drops.
struct Held {
    shard: Rc<ShardCtx>,
    pool: Rc<Pool>,
    id: u64,
    pid: i32,
    /// The session moved to another shard: its cancel key goes on there.
    keep_key: bool,
}

impl Held {
    /// Counts the session as one of its pool's clients until the `Held` is dropped.
    fn take(shard: &Rc<ShardCtx>, pool: &Rc<Pool>, id: u64, pid: i32) -> Held {
        pool.clients.set(pool.clients.get() + 1);
        Held {
            shard: shard.clone(),
            pool: pool.clone(),
            id,
            pid,
            keep_key: false,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let sides = self.shard.pooled_sides.borrow_mut().remove(&self.id);
        drop(sides);
        self.pool
            .clients
            .set(self.pool.clients.get().saturating_sub(1));
        if !self.keep_key {
            self.shard.cancel_keys.remove(self.pid);
        }
    }
}

/// Tells a client why it gets no connection.
async fn refuse(shard: &ShardCtx, client: &Stream, err: &PoolError) {
    let counter = match err {
        PoolError::PairsFull { .. } => &shard.stats.counters.pool_pairs_refused,
        _ => &shard.stats.counters.primary_connect_failures,
    };
    ShardStats::bump(counter, 1);
    let message = match err {
        PoolError::Backend(crate::backend::BackendError::Refused { message, .. }) => {
            message.clone()
        }
        other => format!("pgprism: {}", crate::config::error_text(other)),
    };
    let msg = error_bytes("FATAL", err.sqlstate(), &message);
    let _ = client.write_all(&msg).await;
}

impl Session<'_> {
    async fn run(&mut self, mut cbuf: BytesMut) -> Leave {
        let chunk = self.shard.read_chunk_bytes();
        loop {
            if let Turn::End = self.client_frames(&mut cbuf).await {
                return Leave::End;
            }
            if let Turn::End = self.flush().await {
                return Leave::End;
            }
            if self.conn.is_some() {
                // Read whichever side speaks first: the client may pipeline more while the
                // server answers.
                let conn = self.conn.as_mut().expect("checked above");
                let (server, sbuf) = (&conn.stream, &mut conn.buf);
                let client = &self.client;
                let compare = &self.compare;
                let event = futures_lite::future::or(
                    async { (true, server.read_buf(sbuf, chunk).await) },
                    async {
                        // Compared: more of the client only while the shadow's queue has room.
                        if let Some(up) = compare {
                            up.dispatch.room().await;
                        }
                        (false, client.read_buf(&mut cbuf, chunk).await)
                    },
                )
                .await;
                match event {
                    (true, Ok(n)) if n > 0 => {
                        if let Turn::End = self.server_frames().await {
                            return Leave::End;
                        }
                    }
                    (true, _) => {
                        self.server_lost().await;
                        return Leave::End;
                    }
                    (false, Ok(n)) if n > 0 => {
                        ShardStats::bump(&self.shard.stats.counters.client_bytes_in, n as u64);
                    }
                    (false, _) => return Leave::End,
                }
            } else {
                if let Some(up) = &self.compare {
                    up.dispatch.room().await;
                }
                // Between transactions a movable session also hears its shard ask it to
                // move (the read it drops leaves its receive in flight: `Stream::detach`
                // takes what it brings along).
                let (client, state) = (&self.client, &self.state);
                let read = futures_lite::future::or(
                    async { Some(client.read_buf(&mut cbuf, chunk).await) },
                    async {
                        if !state.movable.get() {
                            futures_lite::future::pending::<()>().await;
                        }
                        state.asked_to_move().await;
                        None
                    },
                )
                .await;
                match read {
                    None => {
                        if let Some(to) = self.take_move() {
                            return Leave::Move { to, cbuf };
                        }
                    }
                    Some(Ok(0) | Err(_)) => return Leave::End,
                    Some(Ok(n)) => {
                        ShardStats::bump(&self.shard.stats.counters.client_bytes_in, n as u64)
                    }
                }
            }
        }
    }

    /// The shard the session was asked to move to, when it can go now: between
    /// transactions with nothing held, owed or pending, and its client socket held by
    /// itself and the shard's table only. Asked when it cannot, it stays (and may be asked
    /// again).
    fn take_move(&mut self) -> Option<usize> {
        let to = self.state.move_to.take()?;
        let quiet = self.conn.is_none()
            && self.pinned.is_none()
            && self.compare.is_none()
            && self.router.is_none()
            && self.cancel.is_none()
            && self.tracker.is_idle()
            && self.replies.is_empty()
            && self.to_server.is_empty()
            && self.to_client.is_empty()
            && self.pending_sql.is_empty()
            && self.hidden_sql.is_empty()
            && !self.client.is_tls()
            && !self.client.sending()
            && self.client.handles() == 2;
        (quiet && to != self.shard.index).then_some(to)
    }

    /// What the session keeps across transactions, to go on on another shard, and its
    /// client socket. (Everything it wrote was sent, see [`take_move`](Self::take_move):
    /// taking the socket off the shard never waits for a client that does not read.)
    fn pack(mut self, buf: BytesMut) -> (Stream, MovedClient) {
        let statements = self
            .tracker
            .prepared()
            .filter_map(|st| {
                Some(MovedStatement {
                    name: st.name.as_deref()?.to_string(),
                    text: st.text.to_string(),
                    params: st.params,
                    def: st
                        .extension_if::<PoolDef>(Slot::Pool)
                        .map(|def| MovedDef::of(&def)),
                })
            })
            .collect();
        let state = &self.state;
        let moved = MovedClient {
            buf,
            unix: self.client.is_unix(),
            user: state.user.clone(),
            database: state.database.clone(),
            login: self.pool.login(),
            params: std::mem::take(&mut self.params),
            base: std::mem::take(&mut self.base),
            settings: self.tracker.take_settings(),
            statements,
            pid: state.remote_pid,
            cancel_slot: self.cancel_slot.clone(),
            addr: state.addr.clone(),
            port: state.port,
            local_addr: state.local_addr.clone(),
            local_port: state.local_port,
            connect_time: state.connect_time,
            application_name: state.application_name.clone(),
        };
        (self.client, moved)
    }

    /// Handles the complete client frames at the front of `cbuf`.
    async fn client_frames(&mut self, cbuf: &mut BytesMut) -> Turn {
        let max = self.shard.settings.message_bytes_max;
        let idle_before = self.tracker.is_idle();
        loop {
            let frame = match wire::split_message(cbuf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.route(idle_before).await;
                    return Turn::Continue;
                }
                Err(err) => {
                    ShardStats::bump(&self.shard.stats.counters.protocol_errors, 1);
                    // What came before still reaches the server.
                    let _ = self.flush().await;
                    let fatal = error_bytes(
                        "FATAL",
                        err.sqlstate(),
                        &format!("pgprism: invalid message from client: {err}"),
                    );
                    if let Some(up) = &self.compare {
                        // After the answers to what came before, which go to the pump.
                        up.host.say(fatal);
                        self.drain_answers().await;
                        return Turn::End;
                    }
                    self.to_client.extend_from_slice(&fatal);
                    self.drain_answers().await;
                    let _ = self.client.write_all(&self.to_client.split()).await;
                    return Turn::End;
                }
            };
            if frame.tag() == tag::TERMINATE {
                self.tracker.client(frame.tag(), frame.body());
                if let Some(up) = &self.compare {
                    up.host.terminated.set(true);
                }
                self.route(idle_before).await;
                let _ = self.flush().await;
                return Turn::End;
            }
            if self.conn.is_none() && self.answer_known_parses(&frame, cbuf) {
                continue;
            }
            if self.conn.is_none() {
                // An autocommit unit may share a connection with other clients' units.
                let unit = self.shareable(&frame, cbuf);
                let mut pressed = false;
                if let Some((len, hashes)) = &unit {
                    let bytes = frame.bytes().len() + len;
                    pressed = self.pool.under_pressure(self.pools.cfg().size);
                    // Nobody waits for room: a shared connection that takes it now. Else
                    // the unit queues behind those who wait (never passing them).
                    let line = UnitLine::of(self.shard, &self.pool);
                    let want = Want {
                        settings: self.settings_hash(),
                        bytes,
                        hashes: hashes.clone(),
                    };
                    let found = if line.is_empty() {
                        Pipeline::find(self.shard, &self.pool, &want, pressed)
                    } else {
                        None
                    };
                    let found = match found {
                        Some(pipeline) => Some(pipeline),
                        None if pressed || !line.is_empty() => {
                            match self.wait_in_line(&line, want).await {
                                Room::Shared(pipeline) => Some(pipeline),
                                Room::Lent => None,
                                Room::End => return Turn::End,
                            }
                        }
                        None => None,
                    };
                    if let Some(pipeline) = found {
                        match self.share(pipeline, frame, cbuf, *len, idle_before).await {
                            Turn::Continue => continue,
                            Turn::End => return Turn::End,
                        }
                    }
                }
                // Anything the client sends that the server must answer needs a connection.
                if self.conn.is_none()
                    && let Turn::End = self.lend().await
                {
                    return Turn::End;
                }
                // Others wait for connections: this one becomes a pipeline they may join,
                // provided it already holds what the unit needs (nothing hidden goes ahead
                // of a shared unit).
                if let Some((len, hashes)) = unit
                    && (pressed || self.pool.under_pressure(self.pools.cfg().size))
                    && self.to_server.is_empty()
                    && let Some(mut conn) = self.conn.take()
                {
                    if hashes.iter().all(|h| conn.prepared.contains(*h)) {
                        self.unlink();
                        let pipeline = Pipeline::start(&self.owner, &self.pool, conn);
                        match self.share(pipeline, frame, cbuf, len, idle_before).await {
                            Turn::Continue => continue,
                            Turn::End => return Turn::End,
                        }
                    }
                    self.conn = Some(conn);
                }
            }
            self.forward(frame);
        }
    }

    /// A client between transactions that only prepares statements some connection already
    /// prepared (named Parses, then Sync) is answered by pgprism: ParseComplete for each and
    /// ReadyForQuery, no connection lent. Its statements are prepared on the connection it
    /// gets later, on demand. `frame` is the first of them, already split off `cbuf`;
    /// returns false (leaving `cbuf` alone) when the batch is anything else or incomplete.
    fn answer_known_parses(&mut self, frame: &wire::Frame, cbuf: &mut BytesMut) -> bool {
        if frame.tag() != tag::PARSE || !self.tracker.is_idle() {
            return false;
        }
        // The batch up to its Sync must be complete and all named Parses; then every one of
        // them must be known (one lock for the lot).
        let parsed = |body: &[u8]| match split_name(body) {
            Some((name, rest)) if !name.is_empty() => Some(content_hash(rest)),
            _ => None,
        };
        let Some(first) = parsed(frame.body()) else {
            return false;
        };
        let mut hashes = vec![first];
        let max = self.shard.settings.message_bytes_max;
        let mut end = None;
        let walk = wire::complete_prefix_until(cbuf, max, |t, body| {
            if t == tag::SYNC {
                end = Some(());
                return std::ops::ControlFlow::Break(());
            }
            match (t == tag::PARSE).then(|| parsed(body)).flatten() {
                Some(hash) => hashes.push(hash),
                None => return std::ops::ControlFlow::Break(()),
            }
            std::ops::ControlFlow::Continue(())
        });
        let Ok(len) = walk else {
            return false;
        };
        if end.is_none() || !self.pool.knows_all(&hashes) {
            return false;
        }
        let rest = cbuf.split_to(len).freeze();
        let mut frames = vec![(frame.tag(), frame.body().to_vec())];
        let _ = wire::complete_prefix(&rest, max, |t, body| frames.push((t, body.to_vec())));
        for (t, body) in frames {
            let step = self.tracker.client(t, &body);
            self.cancel_points();
            let refers = self.tracker.take_refers();
            if let Refers::Statement(statement) = &refers {
                // What its later Bind needs to prepare it on a connection.
                statement.extension(Slot::Pool, || PoolDef::protocol(&body));
            }
            let applied = self.tracker.take_applied();
            if self.router.is_some() || self.compare.is_some() {
                let mut bytes = BytesMut::with_capacity(body.len() + 5);
                frame_of(&mut bytes, t, &[&body]);
                self.queue_route(t, step, refers, applied, bytes.freeze());
            }
            if t == tag::PARSE {
                self.to_client.put_u8(tag::PARSE_COMPLETE);
                self.to_client.put_u32(4);
            }
        }
        let at = self.to_client.len();
        wire::encode::ready_for_query(&mut self.to_client, wire::TransactionStatus::Idle);
        let ready = self.to_client[at..].to_vec();
        self.tracker.server(ready[0], &ready[wire::HEADER_BYTES..]);
        self.cancel_points();
        true
    }

    /// The unit at the front of the client's bytes (`frame`, then the rest of `cbuf` up to
    /// its Sync), when it may share a connection with other clients' units: the length of
    /// its rest in `cbuf`, and the shared statements (content hashes) its Binds need on the
    /// connection. A unit shares when it is complete, the client is between transactions
    /// with nothing in flight, and it is one Query or one extended batch (Parses, Binds,
    /// Describes, Executes, Closes, one Sync) whose statements are
    /// [`sql::shareable_alone`].
    fn shareable(&self, frame: &wire::Frame, cbuf: &BytesMut) -> Option<(usize, Vec<u64>)> {
        if self.pools.cfg().shared_depth_max < 2
            || !self.tracker.is_idle()
            || self.pinned.is_some()
            || !self.replies.is_empty()
        {
            return None;
        }
        match frame.tag() {
            tag::QUERY if frame.bytes().len() <= UNIT_BYTES_MAX => {
                let body = frame.body();
                let text = body.strip_suffix(b"\0").unwrap_or(body);
                sql::shareable_alone(text).then(|| (0, Vec::new()))
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE => {
                let mut scan = UnitScan::default();
                if !self.unit_frame(frame.tag(), frame.body(), &mut scan) {
                    return None;
                }
                let (mut ok, mut synced) = (true, false);
                let max = self.shard.settings.message_bytes_max;
                let len = wire::complete_prefix_until(cbuf, max, |t, body| {
                    if t == tag::SYNC {
                        synced = true;
                    } else if !self.unit_frame(t, body, &mut scan) {
                        ok = false;
                    } else {
                        return std::ops::ControlFlow::Continue(());
                    }
                    std::ops::ControlFlow::Break(())
                })
                .ok()?;
                (ok && synced && frame.bytes().len() + len <= UNIT_BYTES_MAX)
                    .then_some((len, scan.hashes))
            }
            _ => None,
        }
    }

    /// Whether one frame of an extended batch may be part of a shared unit (see
    /// [`Session::shareable`]); collects the shared statements it needs on the connection.
    fn unit_frame(&self, t: u8, body: &[u8], scan: &mut UnitScan) -> bool {
        match t {
            tag::PARSE => {
                let Some((name, rest)) = split_name(body) else {
                    return false;
                };
                let text = memchr::memchr(0, rest).map(|n| &rest[..n]).unwrap_or(rest);
                if !sql::shareable_alone(text) {
                    return false;
                }
                if name.is_empty() {
                    scan.unnamed = true;
                } else {
                    // A named statement shares only where the connection already holds it
                    // (pgprism then answers the Parse itself).
                    scan.hashes.push(content_hash(rest));
                    scan.named.push(name.to_vec());
                }
                true
            }
            tag::BIND => {
                let Some((_, rest)) = split_name(body) else {
                    return false;
                };
                let Some((name, _)) = split_name(rest) else {
                    return false;
                };
                self.known_statement(name, scan)
            }
            // A portal, or a statement the unit parsed or the connection holds (drivers ask
            // for parameter and result types before they bind).
            tag::DESCRIBE => match body.split_first() {
                Some((b'P', _)) => true,
                Some((b'S', name)) => {
                    let name = name.strip_suffix(b"\0").unwrap_or(name);
                    self.known_statement(name, scan)
                }
                _ => false,
            },
            // A statement's Close is answered by pgprism (the shared statement stays); a
            // portal's ends what the unit bound.
            tag::CLOSE | tag::EXECUTE => true,
            _ => false,
        }
    }

    /// Whether the statement `name` refers to in a shared unit is one it may use: parsed in
    /// the unit, or a shareable statement of the client's (its shared name then needed on
    /// the connection; the unnamed one is parsed again, as every unit parses its own).
    fn known_statement(&self, name: &[u8], scan: &mut UnitScan) -> bool {
        if name.is_empty() && scan.unnamed || scan.named.iter().any(|n| n == name) {
            return true;
        }
        let Some(statement) = std::str::from_utf8(name)
            .ok()
            .and_then(|n| self.tracker.statement(n))
        else {
            return false;
        };
        let def = statement.extension(Slot::Pool, || PoolDef::Sql {
            hash: 0,
            text: "".into(),
        });
        match &*def {
            PoolDef::Protocol {
                hash, shareable, ..
            } if *shareable => {
                if !name.is_empty() {
                    scan.hashes.push(*hash);
                }
                true
            }
            _ => false,
        }
    }

    /// Sends the unit at the front (`frame`, then `len` bytes of `cbuf`) on `pipeline`,
    /// shared with other clients' units, and hands the client its answer.
    async fn share(
        &mut self,
        pipeline: Rc<Pipeline>,
        frame: wire::Frame,
        cbuf: &mut BytesMut,
        len: usize,
        idle_before: bool,
    ) -> Turn {
        let mut rest = cbuf.split_to(len);
        // The connection's state, for the rewrite (shared statement names), given back
        // before anything awaits.
        self.conn = pipeline.state.borrow_mut().take();
        let Some(conn) = self.conn.as_mut() else {
            crate::invariant::failed("a pipeline open for units holds its connection")
        };
        // Every unit brings its own unnamed statement: one another client sent before may
        // have failed.
        conn.unnamed = None;
        let server = (conn.id, conn.key.map(|k| k.0).unwrap_or(0), conn.opened_at);
        self.forward(frame);
        let max = self.shard.settings.message_bytes_max;
        while let Ok(Some(next)) = wire::split_message(&mut rest, max) {
            self.forward(next);
        }
        *pipeline.state.borrow_mut() = self.conn.take();
        self.state.server.set(Some(server));
        self.state.busy.set(true);
        let started = Instant::now();
        self.state.request_at.set(started);
        let readies = self.replies.readies();
        let waiting = pipeline.submit(self.to_server.split(), readies, self.cancel_slot.clone());
        self.route(idle_before).await;
        let turn = loop {
            let (part, last) = match waiting.share.next(&pipeline).await {
                Part::More(part) => (part, false),
                Part::Last(part) => (part, true),
                Part::Lost => {
                    self.replies.clear();
                    let _ = self.flush_client().await;
                    self.server_lost().await;
                    break Turn::End;
                }
            };
            self.shared_answer(&pipeline, part);
            if let Turn::End = self.flush_client().await {
                // `waiting` goes: the rest of the answer is dropped as it comes.
                break Turn::End;
            }
            if last {
                break Turn::Continue;
            }
        };
        self.state.busy.set(false);
        self.state.server.set(None);
        if let Turn::End = turn {
            return Turn::End;
        }
        self.replies.clear();
        let c = &self.pool.counters;
        bump(&c.xact_count, 1);
        bump(&c.query_count, 1);
        let spent = started.elapsed().as_micros() as u64;
        bump(&c.xact_time_us, spent);
        bump(&c.query_time_us, spent);
        Turn::Continue
    }

    /// Hands the client a part of its shared unit's answer (whole messages).
    fn shared_answer(&mut self, pipeline: &Pipeline, mut part: BytesMut) {
        let mut settled = Settled::default();
        while let Ok(Some(frame)) = wire::split_message(&mut part, usize::MAX) {
            settled.own.clear();
            let route = self.replies.server(frame.tag(), &mut settled);
            if settled.failed.drain(..).any(|key| key == KEY_UNNAMED)
                && let Some(conn) = pipeline.state.borrow_mut().as_mut()
            {
                conn.unnamed = None;
            }
            settled.done.clear();
            if route == Route::Client {
                self.tracker.server(frame.tag(), frame.body());
                self.cancel_points();
                self.to_client.extend_from_slice(frame.bytes());
            }
            for own in settled.own.drain(..) {
                self.to_client.extend_from_slice(&own);
            }
        }
    }

    /// A shareable unit while the pool is under pressure (or others wait before it): waits
    /// its turn in the shard's line for the pool, then for room on a shared connection or,
    /// first in line, for a connection of its own, whichever comes first. Bounded by
    /// `pool.query-wait-timeout-ms` (and the line by `pool.waiters-max`).
    async fn wait_in_line(&mut self, line: &Rc<UnitLine>, want: Want) -> Room {
        let cfg = self.pools.cfg();
        let (wait_ms, waiters_max) = (cfg.query_wait_timeout_ms, cfg.waiters_max);
        if line.len() >= waiters_max {
            let err = PoolError::WaitersFull {
                user: self.pool.user.to_string(),
                database: self.pool.database.to_string(),
            };
            return self.lent(Err(err)).await;
        }
        let place = line.join(want);
        let started = Instant::now();
        self.state.waiting_since.set(Some(started));
        self.state.request_at.set(started);
        let (shard, pools, pool) = (self.shard, self.pools, self.pool.clone());
        // When it joined the pool's queue too (the pool counts the wait from there on, if
        // it is the pool that ends it).
        let acquiring = Cell::new(None);
        let waited = crate::exec::within(Duration::from_millis(wait_ms), async {
            loop {
                if let Some(pipeline) = place.room(shard) {
                    return Ok(pipeline);
                }
                if place.ahead() == 0 {
                    break;
                }
                place.woken().await;
            }
            // First in line: also in the pool's queue, keeping that place while it looks
            // for room at each wake.
            if !pool.has_idle() {
                Pipeline::nudge(shard, &pool);
            }
            acquiring.set(Some(Instant::now()));
            place.counted_by_pool();
            let mut acquire = std::pin::pin!(pools.acquire(&pool));
            loop {
                let got = futures_lite::future::or(async { Some((&mut acquire).await) }, async {
                    place.woken().await;
                    None
                })
                .await;
                if let Some(acquired) = got {
                    return Err(acquired);
                }
                if let Some(pipeline) = place.room(shard) {
                    return Ok(pipeline);
                }
            }
        })
        .await;
        drop(place);
        // The time in line counts as waiting for a connection (SHOW STATS, /metrics). When
        // the pool answered, it counted its own part (from `acquiring` on); when the client
        // left its queue for room on a shared connection, or timed out, the whole wait is
        // counted here (the pool's count went with the dropped acquire).
        let counted_until = match (&waited, acquiring.get()) {
            (Some(Err(_)), Some(acquiring)) => acquiring,
            _ => Instant::now(),
        };
        let in_line = counted_until.saturating_duration_since(started);
        bump(&self.pool.counters.wait_time_us, in_line.as_micros() as u64);
        match waited {
            Some(Ok(pipeline)) => {
                self.state.waiting_since.set(None);
                Room::Shared(pipeline)
            }
            Some(Err(acquired)) => self.lent(acquired).await,
            None => {
                bump(&self.pool.counters.wait_timeouts, 1);
                let err = PoolError::WaitTimeout {
                    user: self.pool.user.to_string(),
                    database: self.pool.database.to_string(),
                    ms: wait_ms,
                };
                self.lent(Err(err)).await
            }
        }
    }

    /// Gets a connection from the pool and makes it match the client's settings.
    async fn lend(&mut self) -> Turn {
        let now = Instant::now();
        self.state.waiting_since.set(Some(now));
        self.state.request_at.set(now);
        if !self.pool.has_idle() {
            // A lingering pipeline holds a connection this client may need.
            Pipeline::nudge(self.shard, &self.pool);
        }
        let acquired = self.pools.acquire(&self.pool).await;
        match self.lent(acquired).await {
            Room::End => Turn::End,
            _ => Turn::Continue,
        }
    }

    /// What the pool answered: the connection, made to match the client's settings, or the
    /// client told why there is none.
    async fn lent(&mut self, acquired: Result<ServerConn, PoolError>) -> Room {
        self.state.waiting_since.set(None);
        match acquired {
            Ok(conn) => {
                self.cancel_slot
                    .store(pack_key(conn.key), Ordering::Release);
                self.state.server.set(Some((
                    conn.id,
                    conn.key.map(|k| k.0).unwrap_or(0),
                    conn.opened_at,
                )));
                self.conn = Some(conn);
                self.lent_at = Instant::now();
                self.statements_in_lend = 0;
                self.state.busy.set(true);
                self.pool.linked.set(self.pool.linked.get() + 1);
                self.stamp_answers();
                self.match_settings();
                Room::Lent
            }
            Err(err) => {
                let message = format!("pgprism: {}", crate::config::error_text(&err));
                let msg = error_bytes("FATAL", err.sqlstate(), &message);
                self.say(msg).await;
                Room::End
            }
        }
    }

    /// Compare mode with ordering: the lent connection's answers are read with their kernel
    /// receive timestamps, which the pump's ordered dispatch numbers them by (as it does a
    /// session-mode primary's). Only then: the plain pooled path keeps its plain receives.
    /// The socket keeps stamping when it goes back to the pool, for the next compared
    /// session that borrows it (every session of a compared process is, unless its shadow
    /// could not be opened).
    fn stamp_answers(&self) {
        let ordered = self.compare.is_some()
            && self
                .shard
                .compare
                .as_ref()
                .is_some_and(|target| target.port.is_some());
        if !ordered {
            return;
        }
        if let Some(conn) = &self.conn
            && let Err(err) = conn.stream.stamp_receives()
        {
            // The ordered dispatch then numbers these answers as the pump reads them.
            tracing::debug!(error = %err, "compare ordering: no receive timestamps from a lent connection");
        }
    }

    /// The client's settings: startup parameters, then what it set since.
    fn settings_hash(&self) -> u64 {
        let applied = self.tracker.settings().applied();
        if let Some((at, hash)) = self.settings_hashed.get()
            && at == applied
        {
            return hash;
        }
        let hash = self.hash_settings();
        self.settings_hashed.set(Some((applied, hash)));
        hash
    }

    fn hash_settings(&self) -> u64 {
        // FNV-1a: a few short frames per lend, where SipHash's setup would dominate.
        let frames = self.tracker.settings().frames();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut any = false;
        for frame in self.base.iter().chain(frames) {
            for &b in frame.iter() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            // A separator, so that frame boundaries count.
            h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
            any = true;
        }
        if !any {
            return NO_SETTINGS;
        }
        h.clamp(1, SETTINGS_UNKNOWN - 1)
    }

    fn match_settings(&mut self) {
        let wanted = self.settings_hash();
        let conn = self.conn.as_mut().expect("lent");
        if conn.settings == wanted {
            return;
        }
        bump(&self.pool.counters.settings_applied, 1);
        if conn.settings != NO_SETTINGS {
            // RESET ALL leaves the role and the session authorization alone (PostgreSQL
            // exempts them): reset them first, or one client's SET ROLE would be the next
            // client's.
            query_frame(
                &mut self.to_server,
                "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL",
            );
            self.replies.hidden(Awaits::Ready, KEY_SETTINGS);
        }
        // Any simple query replaces the unnamed statement.
        conn.unnamed = None;
        for frame in self.base.iter().chain(self.tracker.settings().frames()) {
            self.to_server.extend_from_slice(frame);
            self.replies.hidden(Awaits::Ready, KEY_SETTINGS);
        }
        conn.settings = wanted;
    }

    /// Tells the session's cancel sides where its sync points stand (its tracker is its
    /// own), and which of them the primary answered since, cancelled or not. Nothing without
    /// mirrors.
    fn cancel_points(&self) {
        let Some(sides) = &self.cancel else {
            return;
        };
        let (opened, answered) = self.tracker.sync_points();
        let (_, before) = sides.points.replace((opened, answered));
        for seq in before..answered {
            sides.answered(seq, self.tracker.cancelled(seq));
        }
    }

    /// One client frame on its way to the lent connection, rewritten where pooling needs it.
    fn forward(&mut self, frame: wire::Frame) {
        let (t, body) = (frame.tag(), frame.body());
        let step = self.tracker.client(t, body);
        self.cancel_points();
        let refers = self.tracker.take_refers();
        let applied = self.tracker.take_applied();
        // Compare's own Describe of the portal an Execute runs, when the client never
        // described its statement (see `Dispatch::describe_unseen`).
        let own_describe = match self.compare.as_mut() {
            Some(up) if matches!(t, tag::DESCRIBE | tag::EXECUTE) => {
                up.dispatch.describe_unseen(t, body, &refers)
            }
            _ => None,
        };
        if self.router.is_some() || self.compare.is_some() {
            let bytes = frame.bytes().clone();
            self.queue_route(t, step, refers.clone(), applied.clone(), bytes);
        }
        match t {
            tag::PARSE => self.parse(&frame, &refers),
            tag::BIND => {
                let Some((portal, rest)) = split_name(body) else {
                    return self.pass(frame, Awaits::Bind);
                };
                let statement = match &refers {
                    Refers::Portal(p) => Some(p.statement.clone()),
                    _ => None,
                };
                match statement.and_then(|s| self.server_name(&s)) {
                    Some(name) => {
                        let rest = split_name(rest).map(|(_, r)| r).unwrap_or_default();
                        let parts: [&[u8]; 5] = [portal, b"\0", name.as_bytes(), b"\0", rest];
                        frame_of(&mut self.to_server, t, &parts);
                        self.replies.client(Awaits::Bind);
                    }
                    None => self.pass(frame, Awaits::Bind),
                }
            }
            tag::DESCRIBE | tag::CLOSE => {
                let kind = body.first().copied().unwrap_or(0);
                let awaits = if t == tag::CLOSE {
                    Awaits::Close
                } else if kind == b'S' {
                    Awaits::DescribeStatement
                } else {
                    Awaits::DescribePortal
                };
                let named = kind == b'S' && body.get(1).is_some_and(|b| *b != 0);
                if t == tag::CLOSE && named {
                    // The statement stays prepared on the connections for whoever shares
                    // it; only the client's name goes (the tracker forgot it).
                    let mut done = BytesMut::new();
                    done.put_u8(tag::CLOSE_COMPLETE);
                    done.put_u32(4);
                    if let Some(answer) = self.replies.own(done.freeze()) {
                        self.to_client.extend_from_slice(&answer);
                    }
                    return;
                }
                let statement = match &refers {
                    Refers::Statement(s) if kind == b'S' => Some(s.clone()),
                    _ => None,
                };
                match statement.and_then(|s| self.server_name(&s)) {
                    Some(name) => {
                        frame_of(&mut self.to_server, t, &[&[kind], name.as_bytes(), b"\0"]);
                        self.replies.client(awaits);
                    }
                    None => self.pass(frame, awaits),
                }
            }
            tag::EXECUTE => {
                if let Refers::Portal(p) = &refers {
                    self.check_pin(&p.statement);
                    self.executed_command(&p.statement);
                }
                if let Some(describe) = own_describe {
                    // Its answer goes to compare's pump with the client's, which keeps it
                    // from the client.
                    self.to_server.extend_from_slice(&describe);
                    self.replies.client(Awaits::DescribePortal);
                }
                self.statements_in_lend += 1;
                self.pass(frame, Awaits::Execute);
            }
            tag::QUERY => {
                if let Refers::Query(parts) = &refers {
                    for part in parts.iter() {
                        self.check_pin(&part.own);
                        self.sql_prepared(part, &applied);
                        // A RESET goes back to the connection's defaults, not to the
                        // client's startup parameters: re-apply them at the next lend.
                        if matches!(
                            part.own.setting(),
                            Some(sql::Setting::Reset { .. } | sql::Setting::ResetAll)
                        ) && let Some(conn) = self.conn.as_mut()
                        {
                            conn.settings = SETTINGS_UNKNOWN;
                        }
                    }
                }
                if let Some(conn) = self.conn.as_mut() {
                    conn.unnamed = None;
                }
                self.statements_in_lend += 1;
                self.pass(frame, Awaits::Ready);
            }
            tag::SYNC if step == Step::QuietSync => self.pass_silent(frame),
            tag::SYNC | tag::FUNCTION_CALL => self.pass(frame, Awaits::Ready),
            _ => self.pass_silent(frame),
        }
    }

    /// Keeps a frame for the mirrors (routed once the turn's frames are read) and the
    /// shadow (planned before the next write to the primary).
    fn queue_route(
        &mut self,
        tag: u8,
        step: Step,
        refers: Refers,
        applied: crate::session::Applied,
        bytes: Bytes,
    ) {
        if let Some(up) = self.compare.as_mut() {
            if up.framed.is_empty() {
                up.read_at = Instant::now();
                // The tracker has counted this frame's sync point already.
                up.first_sync = self.tracker.sync_points().0 - u64::from(step == Step::SyncPoint);
            }
            let start = up.frames.len();
            up.frames.extend_from_slice(&bytes);
            up.framed.push(crate::session::Framed {
                tag,
                start,
                end: up.frames.len(),
                step,
                refers: refers.clone(),
                applied: applied.clone(),
            });
        }
        if self.router.is_none() {
            return;
        }
        let framed = crate::session::Framed {
            tag,
            start: 0,
            end: bytes.len(),
            step,
            refers,
            applied,
        };
        self.to_route.push((framed, bytes));
    }

    /// Routes the frames read this turn to the mirrors (the client never waits for them,
    /// unless a mirror uses the `block` policy).
    async fn route(&mut self, idle_before: bool) {
        let Some(router) = self.router.as_mut() else {
            return;
        };
        if self.to_route.is_empty() {
            return;
        }
        router.begin_batch(idle_before);
        for (framed, bytes) in self.to_route.drain(..) {
            router.route(&framed, &bytes).await;
        }
    }

    fn pass(&mut self, frame: wire::Frame, awaits: Awaits) {
        self.to_server.extend_from_slice(frame.bytes());
        self.replies.client(awaits);
    }

    fn pass_silent(&mut self, frame: wire::Frame) {
        self.to_server.extend_from_slice(frame.bytes());
    }

    /// A client Parse: named statements go to the connections under their shared name,
    /// prepared once per connection.
    fn parse(&mut self, frame: &wire::Frame, refers: &Refers) {
        let body = frame.body();
        let Some((name, _)) = split_name(body) else {
            return self.pass(frame.clone(), Awaits::Parse);
        };
        let Refers::Statement(statement) = refers else {
            return self.pass(frame.clone(), Awaits::Parse);
        };
        let def = statement.extension(Slot::Pool, || PoolDef::protocol(body));
        let PoolDef::Protocol {
            hash,
            server_name,
            rest,
            ..
        } = &*def
        else {
            return self.pass(frame.clone(), Awaits::Parse);
        };
        let conn = self.conn.as_mut().expect("lent");
        if name.is_empty() {
            conn.unnamed = Some(*hash);
            self.to_server.extend_from_slice(frame.bytes());
            self.replies.client_keyed(Awaits::Parse, KEY_UNNAMED);
            return;
        }
        if conn.prepared.contains(*hash) {
            let mut done = BytesMut::new();
            done.put_u8(tag::PARSE_COMPLETE);
            done.put_u32(4);
            if let Some(answer) = self.replies.own(done.freeze()) {
                self.to_client.extend_from_slice(&answer);
            }
            return;
        }
        self.prepare_shared(*hash, server_name, rest, false);
    }

    /// Prepares the shared statement `server_name` (content `hash`, Parse body after the name
    /// `rest`) on the lent connection: the least recently used ones closed beyond
    /// `prepared-statements-max` (one, or more after a console SET lowered it), then a Close
    /// of the name itself (no error when missing, and one the server still holds after a
    /// skipped eviction goes away), then the Parse, answered to the client (its own Parse)
    /// or swallowed (`hidden`, before its Bind).
    fn prepare_shared(&mut self, hash: u64, server_name: &str, rest: &[u8], hidden: bool) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        for victim in conn
            .prepared
            .insert(hash, self.pools.cfg().prepared_statements_max)
        {
            let victim_name = format!("pgprism_{victim:016x}");
            frame_of(
                &mut self.to_server,
                tag::CLOSE,
                &[b"S", victim_name.as_bytes(), b"\0"],
            );
            self.replies.hidden(Awaits::Close, victim);
        }
        frame_of(
            &mut self.to_server,
            tag::CLOSE,
            &[b"S", server_name.as_bytes(), b"\0"],
        );
        self.replies.hidden(Awaits::Close, KEY_SETTINGS + 2);
        frame_of(
            &mut self.to_server,
            tag::PARSE,
            &[server_name.as_bytes(), b"\0", rest],
        );
        if hidden {
            self.replies.hidden(Awaits::Parse, hash);
            bump(&self.pool.counters.reprepares, 1);
        } else {
            self.replies.client_keyed(Awaits::Parse, hash);
        }
    }

    /// The name `statement` has on the lent connection, preparing it there first when the
    /// connection lacks it; `None`: send the client's frame unchanged.
    fn server_name(&mut self, statement: &Rc<Statement>) -> Option<Box<str>> {
        let name = statement.name.as_ref()?;
        let def = statement.extension(Slot::Pool, || PoolDef::Sql {
            hash: 0,
            text: "".into(),
        });
        let conn = self.conn.as_mut()?;
        match &*def {
            PoolDef::Protocol {
                hash,
                server_name,
                rest,
                ..
            } => {
                if name.is_empty() {
                    if conn.unnamed != Some(*hash) {
                        frame_of(&mut self.to_server, tag::PARSE, &[b"\0", rest]);
                        self.replies.hidden(Awaits::Parse, KEY_UNNAMED);
                        conn.unnamed = Some(*hash);
                        bump(&self.pool.counters.reprepares, 1);
                    }
                    return None;
                }
                if !conn.prepared.contains(*hash) {
                    let (hash, rest) = (*hash, rest.clone());
                    self.prepare_shared(hash, server_name, &rest, true);
                }
                Some(server_name.clone())
            }
            // SQL-level statements keep their names (re-prepared before an EXECUTE).
            PoolDef::Sql { .. } => None,
        }
    }

    /// SQL-level PREPARE/EXECUTE/DEALLOCATE of one Query statement on the lent connection.
    fn sql_prepared(
        &mut self,
        part: &crate::session::QueryPart,
        _applied: &crate::session::Applied,
    ) {
        let Some(command) = part.own.command() else {
            return;
        };
        let conn = self.conn.as_mut().expect("lent");
        match command {
            sql::Prepared::Prepare { name, .. } => {
                let hash = content_hash(part.own.text.as_bytes());
                if let Some(created) = &part.applied.prepares {
                    created.extension(Slot::Pool, || PoolDef::Sql {
                        hash,
                        text: part.own.text.clone(),
                    });
                }
                // A statement of that name on this connection (another client's, or this
                // client's own from before its DEALLOCATE elsewhere) goes first.
                if conn.sql_prepared.contains_key(name.as_str()) {
                    Self::drop_sql_name(&mut self.to_server, &mut self.replies, name);
                }
                conn.sql_prepared.insert(name.as_str().into(), hash);
            }
            sql::Prepared::Execute { name, .. } | sql::Prepared::CreateTableAsExecute { name } => {
                self.ensure_sql(name, part.applied.names.as_ref());
            }
            sql::Prepared::Deallocate { name } => {
                // It must find the client's own statement of that name there to drop.
                self.ensure_sql(name, part.applied.names.as_ref());
                if let Some(conn) = self.conn.as_mut() {
                    conn.sql_prepared.remove(name.as_str());
                }
            }
            // PostgreSQL drops the protocol-level statements too.
            sql::Prepared::DeallocateAll => {
                conn.sql_prepared.clear();
                conn.prepared.clear();
                conn.unnamed = None;
            }
            sql::Prepared::DiscardAll => {
                conn.forget_state();
                // The connection is back at its defaults, without the client's startup
                // parameters: re-apply them at the next lend.
                conn.settings = SETTINGS_UNKNOWN;
            }
        }
    }

    /// An Execute of a statement that changes the connection's session (DISCARD ALL,
    /// DEALLOCATE, PREPARE, RESET sent through the extended protocol, as JDBC does): what
    /// pgprism knows of the connection follows.
    fn executed_command(&mut self, statement: &Statement) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match statement.command() {
            Some(sql::Prepared::DiscardAll) => {
                conn.forget_state();
                conn.settings = SETTINGS_UNKNOWN;
            }
            Some(sql::Prepared::DeallocateAll) => {
                conn.sql_prepared.clear();
                conn.prepared.clear();
                conn.unnamed = None;
            }
            Some(sql::Prepared::Deallocate { name } | sql::Prepared::Prepare { name, .. }) => {
                // Whatever it holds under that name now is not known for sure.
                conn.sql_prepared.remove(name.as_str());
            }
            _ => {}
        }
        if matches!(
            statement.setting(),
            Some(sql::Setting::Reset { .. } | sql::Setting::ResetAll)
        ) {
            conn.settings = SETTINGS_UNKNOWN;
        }
    }

    /// Makes the lent connection hold the client's SQL-level statement `name` (created by
    /// its `PREPARE`), replacing another client's of that name.
    fn ensure_sql(&mut self, name: &str, statement: Option<&Rc<Statement>>) {
        let Some(statement) = statement else {
            return;
        };
        let def = statement.extension(Slot::Pool, || PoolDef::Sql {
            hash: 0,
            text: "".into(),
        });
        let PoolDef::Sql { hash, text } = &*def else {
            return;
        };
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if *hash == 0 || conn.sql_prepared.get(name) == Some(hash) {
            return;
        }
        Self::drop_sql_name(&mut self.to_server, &mut self.replies, name);
        conn.unnamed = None;
        if query_frame(&mut self.to_server, text) {
            let key = content_hash(name.as_bytes());
            self.replies.hidden(Awaits::Ready, key);
            // Recorded once it worked (see `server_frames`).
            conn.sql_prepared.remove(name);
            self.hidden_sql.push((key, name.into()));
            self.pending_sql.push((key, name.into(), *hash));
            bump(&self.pool.counters.reprepares, 1);
        }
    }

    /// Drops whatever statement `name` the connection may hold, without an error when it
    /// holds none (a protocol Close, then a Sync for its answer; inside a transaction block
    /// the Sync ends nothing): DEALLOCATE of a missing name would fail, and abort the
    /// client's transaction.
    fn drop_sql_name(out: &mut BytesMut, replies: &mut Replies, name: &str) {
        frame_of(out, tag::CLOSE, &[b"S", name.as_bytes(), b"\0"]);
        replies.hidden(Awaits::Close, KEY_SETTINGS + 2);
        wire::encode::sync(out);
        replies.hidden(Awaits::Ready, KEY_SETTINGS + 2);
    }

    fn check_pin(&mut self, statement: &Statement) {
        if self.pinned.is_some() {
            return;
        }
        if let Some(pin) = statement.pin() {
            self.pinned = Some(pin);
            self.state.pinned.set(Some(pin.name()));
            self.pool.pinned.set(self.pool.pinned.get() + 1);
            bump(&self.pool.counters.pins, 1);
            if let Some(conn) = self.conn.as_mut() {
                conn.dirty = true;
            }
        }
    }

    /// Sends what the turn gathered: to the server, then to the client (and, compared, to
    /// the shadow).
    async fn flush(&mut self) -> Turn {
        self.plan_compare();
        let turn = self.flush_both().await;
        self.queue_shadow();
        turn
    }

    async fn flush_both(&mut self) -> Turn {
        if !self.to_server.is_empty() {
            let out = self.to_server.split().freeze();
            bump(&self.pool.counters.bytes_received, out.len() as u64);
            // Query time (SHOW STATS total_query_time) runs from the first bytes sent until
            // every answer is in (see where `busy_since` is taken).
            if self.busy_since.is_none() {
                self.busy_since = Some(Instant::now());
            }
            let conn = self
                .conn
                .as_ref()
                .expect("lent when there is something to send");
            if conn.stream.write_bytes(out).await.is_err() {
                self.server_lost().await;
                return Turn::End;
            }
        }
        if !self.to_client.is_empty() {
            let out = self.to_client.split().freeze();
            // pgprism's own answers, given as the client's frames are read: no receive time.
            if !self.deliver(out, 0).await {
                return Turn::End;
            }
        }
        Turn::Continue
    }

    /// The lent connection's answers read so far. Those the client gets as they came (nearly
    /// all) go to it as one run of bytes, split off the read buffer without a copy when
    /// nothing else is due first, the tracker reading each on the way, as session mode's relay
    /// does. A message that needs more is handled on its own in its place: one the replies
    /// keep from the client (a hidden statement's answer), one after which pgprism's own
    /// answers are due or that settles a keyed statement, and the server's farewell.
    async fn server_frames(&mut self) -> Turn {
        let max = self.shard.settings.message_bytes_max;
        let mut settled = Settled::default();
        if let Some(conn) = &self.conn {
            // The frames below completed with the last read.
            self.answers_stamp_ns = conn.stream.received_at_ns();
        }
        // Bytes of the read buffer handled, and where the run for the client starts in them.
        let (mut done, mut run) = (0usize, 0usize);
        loop {
            let Some(conn) = self.conn.as_mut() else {
                crate::invariant::failed("a session reading its server holds the connection")
            };
            let (replies, tracker) = (&mut self.replies, &mut self.tracker);
            // The message that ended the walk early: its route, its length, and whether it
            // is the server's farewell.
            let mut special: Option<(Route, usize, bool)> = None;
            let mut walked = 0usize;
            let scanned = wire::complete_prefix_until(&conn.buf[done..], max, |t, body| {
                let len = wire::HEADER_BYTES + body.len();
                walked += len;
                let route = replies.server(t, &mut settled);
                let mut farewell = false;
                if route == Route::Client {
                    tracker.server(t, body);
                    farewell = t == tag::ERROR_RESPONSE && crate::session::is_farewell(body);
                }
                if route == Route::Client && !farewell && settled.is_empty() {
                    return std::ops::ControlFlow::Continue(());
                }
                special = Some((route, len, farewell));
                std::ops::ControlFlow::Break(())
            });
            let end = done + walked;
            if scanned.is_err() {
                // The messages ahead of the malformed one still reach the client.
                self.take_run(run, end);
                self.cancel_points();
                ShardStats::bump(&self.shard.stats.counters.protocol_errors, 1);
                let fatal = error_bytes(
                    "FATAL",
                    sqlstate::PROTOCOL_VIOLATION,
                    "pgprism: invalid message from the primary",
                );
                let _ = self.flush_client().await;
                // pgprism's own word, not the primary's answer: compared, it follows
                // the judged answers and is never paired with the shadow's.
                self.say(fatal).await;
                self.drop_conn(false).await;
                return Turn::End;
            }
            let Some((route, len, farewell)) = special else {
                done = end;
                break;
            };
            if route == Route::Swallow {
                // The run ends before it (when the run starts there, it is empty).
                self.run_to_client(run, end - len);
                run = end;
            }
            self.settle(&mut settled);
            if farewell {
                self.take_run(run, end);
                self.cancel_points();
                let _ = self.flush_client().await;
                self.drop_conn(false).await;
                return Turn::End;
            }
            if !settled.own.is_empty() {
                // pgprism's own answers are due after this message.
                self.run_to_client(run, end);
                run = end;
                for answer in settled.own.drain(..) {
                    self.to_client.extend_from_slice(&answer);
                }
            }
            settled.skipped_own = 0;
            done = end;
        }
        self.take_run(run, done);
        self.cancel_points();
        if self.replies.is_empty()
            && let Some(since) = self.busy_since.take()
        {
            bump(
                &self.pool.counters.query_time_us,
                since.elapsed().as_micros() as u64,
            );
        }
        if let Turn::End = self.flush_client().await {
            return Turn::End;
        }
        if self.tracker.is_idle() && self.replies.is_empty() && self.pinned.is_none() {
            self.give_back(true).await;
        }
        Turn::Continue
    }

    /// Bytes `from..to` of the lent connection's read buffer go to the client (copied: more
    /// of the buffer is still being handled).
    fn run_to_client(&mut self, from: usize, to: usize) {
        if from < to
            && let Some(conn) = &self.conn
        {
            self.to_client.extend_from_slice(&conn.buf[from..to]);
        }
    }

    /// The first `to` bytes of the lent connection's read buffer are handled, and those
    /// from `from` on go to the client: split off the buffer as they are when nothing is
    /// ahead of them for the client, else copied after what is.
    fn take_run(&mut self, from: usize, to: usize) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if to == 0 {
            return;
        }
        if from == 0 && self.to_client.is_empty() {
            self.to_client = conn.buf.split_to(to);
            return;
        }
        if from < to {
            self.to_client.extend_from_slice(&conn.buf[from..to]);
        }
        let _ = conn.buf.split_to(to);
    }

    /// What the replies settled with a server message: hidden statements that failed are
    /// forgotten on the connection, those that worked are learnt.
    fn settle(&mut self, settled: &mut Settled) {
        for key in settled.failed.drain(..) {
            self.forget(key);
        }
        for key in settled.done.iter() {
            if let Some(at) = self.pending_sql.iter().position(|(k, _, _)| k == key) {
                let (_, name, hash) = self.pending_sql.swap_remove(at);
                if let Some(conn) = self.conn.as_mut() {
                    conn.sql_prepared.insert(name, hash);
                }
            }
        }
        for key in settled.done.drain(..) {
            if key > KEY_UNNAMED && !self.hidden_sql.iter().any(|(k, _)| *k == key) {
                self.pool
                    .learn(key, self.pools.cfg().prepared_statements_max.max(1024) * 4);
            }
        }
    }

    async fn flush_client(&mut self) -> Turn {
        // The stamp is the last read's, taken even when that read brought only hidden
        // answers: left over, it would date the next flush (a shared unit's answers, read off
        // another session's connection) with an older receive time.
        let stamp = std::mem::take(&mut self.answers_stamp_ns);
        if self.to_client.is_empty() {
            return Turn::Continue;
        }
        let out = self.to_client.split().freeze();
        bump(&self.pool.counters.bytes_sent, out.len() as u64);
        if !self.deliver(out, stamp).await {
            return Turn::End;
        }
        self.queue_shadow();
        Turn::Continue
    }

    /// A hidden message failed (or the client's own Parse did): forget what it would have
    /// left on the connection.
    fn forget(&mut self, key: u64) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match key {
            KEY_SETTINGS => conn.settings = SETTINGS_UNKNOWN,
            KEY_UNNAMED => conn.unnamed = None,
            _ => {
                conn.prepared.remove(key);
                if let Some(at) = self.hidden_sql.iter().position(|(k, _)| *k == key) {
                    let (_, name) = self.hidden_sql.swap_remove(at);
                    conn.sql_prepared.remove(&name);
                }
            }
        }
    }

    /// The connection goes back to the pool (or is closed when not `clean`).
    async fn give_back(&mut self, clean: bool) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        self.unlink();
        let c = &self.pool.counters;
        bump(&c.xact_count, 1);
        bump(&c.query_count, self.statements_in_lend);
        bump(&c.xact_time_us, self.lent_at.elapsed().as_micros() as u64);
        if conn.settings != SETTINGS_UNKNOWN {
            conn.settings = self.settings_hash();
        }
        let _ = &mut conn;
        self.hidden_sql.clear();
        self.pending_sql.clear();
        self.replies.clear();
        // The common case without an await (and without moving the connection through
        // `release`'s future).
        if clean {
            if let Some(conn) = self.pools.release_now(&self.pool, conn) {
                self.pools.release(&self.pool, conn, true).await;
            }
        } else {
            self.pools.release(&self.pool, conn, false).await;
        }
    }

    /// The client no longer holds a connection.
    fn unlink(&mut self) {
        self.cancel_slot.store(0, Ordering::Release);
        self.state.server.set(None);
        if self.state.busy.replace(false) {
            self.pool
                .linked
                .set(self.pool.linked.get().saturating_sub(1));
        }
    }

    async fn drop_conn(&mut self, clean: bool) {
        self.give_back(clean).await;
    }

    /// The lent connection failed: the client is told (08006) and the pool replaces it.
    async fn server_lost(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.unlink();
            self.pools.lost(&self.pool, conn);
        }
        ShardStats::bump(&self.shard.stats.counters.primary_lost, 1);
        let msg = error_bytes(
            "FATAL",
            sqlstate::CONNECTION_FAILURE,
            &format!(
                "pgprism lost the server connection of pool {}@{}",
                self.pool.user, self.pool.database
            ),
        );
        self.say(msg).await;
    }

    /// pgprism's own last word to the client: written now, or, when compared, once the pump
    /// has written every answer before it.
    async fn say(&mut self, msg: Bytes) {
        match &self.compare {
            Some(up) => up.host.say(msg),
            None => {
                let _ = self.client.write_all(&msg).await;
            }
        }
    }

    /// What the client is to see of the server: written to it, or, when compared, handed
    /// to compare's pump (which writes it once judged) with `stamp_ns`, when the answers in
    /// it reached pgprism's socket. False: the client is gone.
    async fn deliver(&mut self, out: Bytes, stamp_ns: u64) -> bool {
        self.plan_compare();
        let len = out.len() as u64;
        if let Some(up) = &self.compare {
            // The pump counts what it writes to the client.
            up.relayed.push(&out, stamp_ns).await;
            return true;
        }
        if self.client.write_bytes(out).await.is_err() {
            return false;
        }
        ShardStats::bump(&self.shard.stats.counters.client_bytes_out, len);
        true
    }

    /// Compare mode: plans the client frames read since the last plan for the shadow (before
    /// they go to the primary, so the pump finds every sync point it pairs).
    fn plan_compare(&mut self) {
        let Some(up) = self.compare.as_mut() else {
            return;
        };
        if up.framed.is_empty() {
            return;
        }
        let frames = up.frames.split().freeze();
        up.dispatch
            .plan(&frames, &up.framed, up.read_at, up.first_sync);
        up.framed.clear();
        up.planned = true;
    }

    /// Compare mode: what was planned goes to the shadow's queue (after the primary write).
    fn queue_shadow(&mut self) {
        if let Some(up) = self.compare.as_mut()
            && std::mem::take(&mut up.planned)
        {
            up.dispatch.queue();
        }
    }

    /// Before a fatal error to the client: let what was sent be answered first.
    async fn drain_answers(&mut self) {
        while self.conn.is_some() && !self.replies.is_empty() {
            let chunk = self.shard.read_chunk_bytes();
            let conn = self.conn.as_mut().expect("checked");
            match crate::exec::within(
                self.pools.upstream.connect_timeout,
                conn.stream.read_buf(&mut conn.buf, chunk),
            )
            .await
            {
                Some(Ok(n)) if n > 0 => {
                    if let Turn::End = self.server_frames().await {
                        return;
                    }
                }
                _ => {
                    self.drop_conn(false).await;
                    return;
                }
            }
        }
    }

    /// Reads the lent connection's answers until none is owed (the connection may go back
    /// on the way, when the session is idle); the caller bounds it in time.
    async fn read_owed_answers(&mut self) {
        while self.conn.is_some() && !self.replies.is_empty() {
            let chunk = self.shard.read_chunk_bytes();
            let conn = self.conn.as_mut().expect("checked");
            match conn.stream.read_buf(&mut conn.buf, chunk).await {
                Ok(n) if n > 0 => {
                    if let Turn::End = self.server_frames().await {
                        return;
                    }
                }
                _ => {
                    self.drop_conn(false).await;
                    return;
                }
            }
        }
    }

    /// The client left: its connection goes back clean (rolled back when a transaction was
    /// open) or is closed.
    async fn finish(&mut self) {
        self.route(false).await;
        if let Some(router) = self.router.take() {
            for link in router.links() {
                link.client_done();
            }
        }
        if self.pinned.take().is_some() {
            self.pool
                .pinned
                .set(self.pool.pinned.get().saturating_sub(1));
        }
        // Not when an answer may never come however long it waits: a batch without its Sync
        // (the server holds its answers back) or a COPY (the server waits for the client's
        // data). Those sessions' waiting shadow segments are dropped once the primary's
        // answers end (`Comparer::primary_ended`).
        let answers_come =
            !self.tracker.extended_open() && !self.tracker.batch().iter().any(|s| s.copy.is_some());
        if self.compare.is_some() && !self.replies.is_empty() && answers_come {
            // Compared: the shadow runs what the primary ran, in the primary's order, so it
            // waits for the primary's answers. Closing the primary's connection now would
            // leave the shadow waiting for answers that never come (holding the client's
            // transaction meanwhile), while an autocommit write in flight still commits on
            // the primary. Read them first, as long as the shadow may take for its own
            // (`compare.shadow-timeout-ms`).
            let limit = self
                .shard
                .compare
                .as_ref()
                .map_or(Duration::ZERO, |target| {
                    Duration::from_millis(target.cfg.shadow_timeout_ms)
                });
            if crate::exec::within(limit, self.read_owed_answers())
                .await
                .is_none()
            {
                self.drop_conn(false).await;
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let quiet = self.tracker.in_flight() == 0 && self.replies.is_empty();
        if !quiet || self.tracker.extended_open() {
            self.drop_conn(false).await;
            return;
        }
        if self.tracker.status() != b'I' {
            let ok = crate::backend::pool::run_simple(conn, "ROLLBACK", &self.pools.upstream)
                .await
                .is_ok();
            self.drop_conn(ok).await;
            return;
        }
        self.drop_conn(true).await;
    }
}

/// A shard's pool care: the pools' maintenance (idle timeouts, lifetimes, min-size, room
/// for other shards' clients), the console's actions (PAUSE, RECONNECT, KILL), and the
/// snapshot the console reads.
pub async fn pool_care(shard: Rc<ShardCtx>) {
    let Some(pools) = shard.pools.clone() else {
        return;
    };
    // Clients of other shards that start waiting while a shared connection lingers here.
    let calls = async {
        let Some(wakeup) = pools.wakeup() else {
            return std::future::pending().await;
        };
        loop {
            if let Err(err) = wakeup.notified().await {
                tracing::error!(shard = shard.index, error = %err, "pool wake-up failed");
                return std::future::pending().await;
            }
            super::pipeline::Pipeline::nudge_all(&shard);
        }
    };
    futures_lite::future::or(calls, care(&shard, &pools)).await
}

/// The periodic part of [`pool_care`].
async fn care(shard: &Rc<ShardCtx>, pools: &Rc<Pools>) {
    const TICK: Duration = Duration::from_millis(50);
    const PUBLISH_EVERY: u32 = 5;
    const MODES_EVERY: u32 = 20;
    let mut reconnects = 0;
    let mut kills = 0;
    let mut settings = 0;
    // Each database's kill count as this shard last acted on it.
    let mut killed: std::collections::HashMap<String, u64> = Default::default();
    let mut tick = 0u32;
    loop {
        crate::exec::sleep(TICK).await;
        if let Some(console) = &shard.console {
            pools.set_paused(
                console.paused_all.load(Ordering::Acquire),
                console.paused_databases(),
            );

            // Console SET: the `[pool]` keys in force now.
            let s = console.settings.load(Ordering::Acquire);
            if s != settings {
                settings = s;
                pools.set_cfg(console.config().pool.clone());
            }
            let r = console.reconnects.load(Ordering::Acquire);
            if r != reconnects {
                reconnects = r;
                pools.reconnect();
            }
            let k = console.kills.load(Ordering::Acquire);
            if k != kills {
                kills = k;
                // Every database killed since the last look, not only the last one.
                let due: Vec<String> = console
                    .killed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|&(db, &n)| killed.insert(db.clone(), n) != Some(n))
                    .map(|(db, _)| db.clone())
                    .collect();
                for database in due {
                    shard.kill_pooled(&database);
                    pools.kill_database(&database);
                }
            }
        }
        super::pipeline::UnitLine::drop_unused(shard);
        pools.maintain();
        tick = tick.wrapping_add(1);
        if tick.is_multiple_of(PUBLISH_EVERY) {
            publish(shard, pools);
            count_pools(shard, pools);
        }
        if tick.is_multiple_of(MODES_EVERY)
            && let Some(console) = &shard.console
        {
            let mirrors = shard
                .mirrors
                .iter()
                .map(|m| super::console::MirrorRow::from(&m.stats.report(m.index, &m.name)))
                .collect();
            let compare = shard
                .compare
                .as_ref()
                .map(|_| super::console::CompareRow::from(&shard.stats.counters.snapshot()));
            console.publish_modes(shard.index, mirrors, compare);
        }
    }
}

/// Copies the pools' cumulative counters into the shard's (for `/metrics`).
fn count_pools(shard: &ShardCtx, pools: &Pools) {
    let mut totals = [0u64; 16];
    let all = pools.all();
    // The pools that went count too: the totals never go down.
    let counters = all
        .iter()
        .map(|pool| &pool.counters)
        .chain([pools.retired()]);
    for c in counters {
        for (t, v) in totals.iter_mut().zip([
            c.lends.get(),
            c.xact_count.get(),
            c.wait_time_us.get(),
            c.wait_timeouts.get(),
            c.pins.get(),
            c.reprepares.get(),
            c.settings_applied.get(),
            c.servers_opened.get(),
            c.servers_closed.get(),
            c.servers_lost.get(),
            c.dirty_closed.get(),
            c.pipelines.get(),
            c.shared_units.get(),
            c.shared_behind.get(),
            c.shared_writes.get(),
            c.servers_yielded.get(),
        ]) {
            *t += v;
        }
    }
    let s = &shard.stats.counters;
    for (cell, v) in [
        &s.pool_lends,
        &s.pool_transactions,
        &s.pool_wait_us,
        &s.pool_wait_timeouts,
        &s.pool_pins,
        &s.pool_reprepares,
        &s.pool_settings_applied,
        &s.pool_servers_opened,
        &s.pool_servers_closed,
        &s.pool_servers_lost,
        &s.pool_dirty_closed,
        &s.pool_pipelines,
        &s.pool_shared_units,
        &s.pool_shared_behind,
        &s.pool_shared_writes,
        &s.pool_servers_yielded,
    ]
    .into_iter()
    .zip(totals)
    {
        cell.set(v);
    }
    s.pool_pairs_removed.set(pools.removed.get());
}

/// Publishes this shard's pools, clients and servers for the console.
pub(super) fn publish(shard: &ShardCtx, pools: &Pools) {
    let Some(console) = &shard.console else {
        return;
    };
    let mode = if shard.settings.transaction_pooling {
        "transaction"
    } else {
        "session"
    };
    let now = Instant::now();
    let (pool_rows, mut servers) = pools.rows(mode);
    // Shared connections (pipelined lending) are lent too, to several clients at once.
    let check_delay = std::time::Duration::from_millis(pools.cfg().server_check_delay_ms);
    servers.extend(
        shard
            .pipelines
            .borrow()
            .iter()
            .filter_map(|p| p.server_row(pools, now, check_delay)),
    );
    let mut clients = Vec::new();
    for state in shard.pooled_states() {
        clients.push(state.row(shard.index, now));
        if let Some((id, pid, opened)) = state.server.get() {
            servers.push(crate::stats::pools::ServerRow {
                id,
                shard: shard.index,
                user: state.user.clone(),
                database: state.database.clone(),
                state: "active",
                addr: pools.upstream.label.clone(),
                port: 0,
                local_addr: String::new(),
                local_port: 0,
                connect_time: opened,
                request_time: state.request_time(now),
                link: Some(state.id),
                remote_pid: pid,
                tls: false,
                prepared_statements: 0,
            });
        }
    }
    console.board.publish(crate::stats::pools::ShardPools {
        shard: shard.index,
        taken: Some(SystemTime::now()),
        paused: pools.paused.get(),
        pools: pool_rows,
        clients,
        servers,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_become_settings() {
        let set = startup_set("application_name", "it's").unwrap();
        assert_eq!(&set[5..set.len() - 1], b"SET application_name = 'it''s'");
        assert!(startup_set("user", "x").is_none());
        assert!(startup_set("bad;key", "x").is_none());
        let sets = options_sets("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB");
        assert_eq!(sets.len(), 3);
        assert!(sets[1].ends_with(b"SET statement_timeout = '5s'\0"));
    }

    #[test]
    fn cancel_keys_pack_and_unpack() {
        let keys = CancelKeys::default();
        let slot = Arc::new(AtomicU64::new(0));
        keys.insert(-5, 42, slot.clone());
        assert_eq!(keys.lookup(-5, 42), Some(None));
        slot.store(pack_key(Some((1234, -7))), Ordering::Release);
        assert_eq!(keys.lookup(-5, 42), Some(Some((1234, -7))));
        assert_eq!(keys.lookup(-5, 41), Some(None));
        assert_eq!(keys.lookup(99, 42), None);
    }

    #[test]
    fn client_pids_are_never_server_pids() {
        for id in [0, 1, 0x3F_FFFF, u64::MAX] {
            for shard in [0, 1, 63] {
                assert!(client_key(shard, id).0 < 0);
            }
        }
    }
}
