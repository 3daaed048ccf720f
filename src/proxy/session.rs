//! One client session: startup (SSL/GSS refusal, cancel forwarding), the primary connection,
//! and the two pumps that relay bytes between them. A session lives on the shard that accepted
//! it, start to end; it never blocks the shard and never buffers more than one partial message
//! per direction beyond what sits in the sockets.
//!
//! Authentication is relayed, not terminated: after the client's startup packet reaches the
//! primary, every message (AuthenticationSASL, SASLResponse, ...) is forwarded verbatim, so
//! trust, cleartext, MD5 and SCRAM-SHA-256 users all work unchanged. The primary's
//! BackendKeyData reaches the client untouched, so a CancelRequest carrying it can be
//! forwarded verbatim to the primary from whichever shard receives it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::compare::{self, Comparer};
use crate::exec::net::Stream;
use crate::exec::{self, within};
use crate::mirror::{self, Link, MirrorStats, MirrorTarget, Router};
use crate::session::{Answer, Framed, Step, Tracker};
use crate::stats::ShardStats;
use crate::stats::fingerprints::Fingerprints;
use crate::wire::{self, StartupPacket, sqlstate, tag};
use bytes::{Bytes, BytesMut};

/// PostgreSQL's own limit on the untagged startup packet (MAX_STARTUP_PACKET_LENGTH).
const STARTUP_BYTES_MAX: usize = 10_000;

/// What every session of a shard needs to know, derived once from the config.
pub struct ProxySettings {
    pub primary_addr: crate::config::LiveEndpoint,
    /// `host:port` as configured, or the socket file's path, for messages.
    pub primary_label: String,
    pub message_bytes_max: usize,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    pub sessions_per_shard_max: usize,
    pub pipeline_depth_max: usize,
    /// The bounds of each session's tracker (`proxy.session-names-max`, ...); statements are
    /// decoded only when mirrors or compare need them.
    pub session_limits: crate::session::Limits,
    /// `[client-tls]`: the TLS server side offered to clients that ask (None: answered `N`)
    /// and whether plain-text sessions are refused; replaced by a reload.
    pub client_tls: std::sync::Arc<crate::tls::ClientTlsSlot>,
    /// TLS towards the primary (its URL's `sslmode`).
    pub primary_tls: crate::tls::Upstream,
    /// `pool.mode = "transaction"`: clients are served by `pooled`.
    pub transaction_pooling: bool,
}

/// Everything a shard owns for its sessions.
pub struct ShardCtx {
    pub index: usize,
    pub settings: ProxySettings,
    pub stats: ShardStats,
    /// Bytes asked of the kernel per read.
    read_chunk_bytes: usize,
    sessions: RefCell<std::collections::HashMap<u64, Rc<SessionShared>>>,
    next_session: Cell<u64>,
    /// Mirrors every session replays to (empty: plain proxy, no routing work at all).
    pub mirrors: Vec<Rc<MirrorTarget>>,
    pub fingerprints: Rc<Fingerprints>,
    /// Compare mode: the shadow every session also runs its statements on.
    pub compare: Option<Rc<compare::CompareTarget>>,
    /// xorshift state for session sampling.
    sample_state: Cell<u64>,
    /// Transaction pooling (`pool.mode = "transaction"`) and the console's authentication:
    /// this shard's pools of primary connections.
    pub pools: Option<Rc<crate::backend::pool::Pools>>,
    /// Cancel keys of pooled sessions, shared by every shard.
    pub cancel_keys: super::pooled::CancelKeys,
    /// Pooled and console sessions: their client sockets and whether each holds a
    /// connection (a drain closes those that hold none).
    pooled: RefCell<std::collections::HashMap<u64, PooledEntry>>,
    /// Process-wide state the console reads and acts on.
    pub console: Option<std::sync::Arc<super::login::ConsoleCtx>>,
    /// Where pooled clients' secrets come from.
    pub secrets: Option<Rc<super::login::Secrets>>,
    /// Pipelined lending: the connections now shared by several clients' statements.
    pub(super) pipelines: RefCell<Vec<Rc<super::pipeline::Pipeline>>>,
    /// Pipelined lending: per pool, the clients whose shareable unit waits for room.
    pub(super) unit_lines: RefCell<Vec<Rc<super::pipeline::UnitLine>>>,
    /// Sessions whose statements also run on a shadow or mirrors, by the key their clients
    /// hold, shared by every shard (None: neither is configured).
    pub cancel_registry: Option<crate::backend::cancel::Registry>,
    /// Pooled sessions' sides for cancels, by session number.
    pub(super) pooled_sides: RefCell<std::collections::HashMap<u64, Rc<Sides>>>,
    /// Hands a pooled client that moves to another shard over (set by the server when
    /// clients may move: `client-placement = "pack"` with several shards).
    mover: RefCell<Option<Mover>>,
}

/// Hands a pooled client's socket and session to shard `to`; gives them back when that
/// shard cannot take them (its queue full, or it stopped).
pub type Mover = Rc<
    dyn Fn(
        usize,
        std::os::fd::OwnedFd,
        Box<super::pooled::MovedClient>,
    ) -> Result<(), (std::os::fd::OwnedFd, Box<super::pooled::MovedClient>)>,
>;

/// What a shard's pooled sessions share, when transaction pooling or the console is on.
#[derive(Default)]
pub struct Pooling {
    pub pools: Option<Rc<crate::backend::pool::Pools>>,
    pub cancel_keys: super::pooled::CancelKeys,
    pub console: Option<std::sync::Arc<super::login::ConsoleCtx>>,
    pub secrets: Option<Rc<super::login::Secrets>>,
}

/// A pooled session as the shard sees it from outside.
struct PooledEntry {
    client: Stream,
    state: Rc<super::pooled::ClientState>,
    closing: Cell<bool>,
}

/// Removes a pooled session from its shard's table, however it ends.
pub(super) struct PooledRegistration {
    shard: Rc<ShardCtx>,
    id: u64,
    /// The session goes on on another shard: it did not close.
    moved: bool,
}

impl PooledRegistration {
    /// Removes a session that moves to another shard (counted there, not as closed).
    pub(super) fn moved(mut self) {
        self.moved = true;
    }
}

impl Drop for PooledRegistration {
    fn drop(&mut self) {
        self.shard.pooled.borrow_mut().remove(&self.id);
        let stats = &self.shard.stats;
        stats
            .sessions_active
            .set(self.shard.sessions_active() as u64);
        if !self.moved {
            ShardStats::bump(&stats.counters.sessions_closed, 1);
        }
    }
}

impl ShardCtx {
    pub fn new(
        index: usize,
        settings: ProxySettings,
        stats: ShardStats,
        read_chunk_bytes: usize,
        mirrors: Vec<Rc<MirrorTarget>>,
        fingerprints: Rc<Fingerprints>,
        compare: Option<Rc<compare::CompareTarget>>,
    ) -> ShardCtx {
        ShardCtx {
            index,
            settings,
            stats,
            read_chunk_bytes,
            sessions: RefCell::new(Default::default()),
            next_session: Cell::new(0),
            mirrors,
            fingerprints,
            compare,
            sample_state: Cell::new(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1)),
            pools: None,
            cancel_keys: Default::default(),
            pooled: RefCell::new(Default::default()),
            console: None,
            secrets: None,
            pipelines: RefCell::new(Vec::new()),
            unit_lines: RefCell::new(Vec::new()),
            cancel_registry: None,
            pooled_sides: RefCell::new(Default::default()),
            mover: RefCell::new(None),
        }
    }

    /// Lets this shard's pooled clients move to other shards through `mover`.
    pub fn set_mover(&self, mover: Mover) {
        *self.mover.borrow_mut() = Some(mover);
    }

    pub(super) fn mover(&self) -> Option<Mover> {
        self.mover.borrow().clone()
    }

    /// Whether pooled clients may move from this shard to another.
    pub fn moves_clients(&self) -> bool {
        self.mover.borrow().is_some()
    }

    /// Asks at most `max` of this shard's pooled clients that are between transactions to
    /// move to shard `to`; returns how many were asked. Each goes when it next waits for
    /// its client (at once, when it waits now).
    pub fn ask_to_move(&self, to: usize, max: usize) -> usize {
        let mut asked = 0;
        for entry in self.pooled.borrow().values() {
            if asked >= max {
                break;
            }
            if !entry.closing.get() && entry.state.can_move() {
                entry.state.ask_to_move(to);
                asked += 1;
            }
        }
        asked
    }

    /// The registry that carries clients' cancels to the shadow and mirrors.
    pub fn with_cancel_registry(
        mut self,
        registry: Option<crate::backend::cancel::Registry>,
    ) -> ShardCtx {
        self.cancel_registry = registry;
        self
    }

    /// Hands the shard's sessions the cancels their clients asked for on any shard, until
    /// the shard stops (runs only with a registry).
    pub async fn serve_cancels(self: &Rc<Self>) {
        let Some(registry) = &self.cancel_registry else {
            return std::future::pending().await;
        };
        loop {
            let ids = match registry.next(self.index).await {
                Ok(ids) => ids,
                Err(err) => {
                    tracing::error!(shard = self.index, error = %err, "cancel inbox failed");
                    return std::future::pending().await;
                }
            };
            for id in ids {
                let session = self.sessions.borrow().get(&id).cloned();
                if let Some(session) = session {
                    session.cancel_requested();
                }
                let pooled = self.pooled_sides.borrow().get(&id).cloned();
                if let Some(sides) = pooled {
                    sides.requested(sides.points.get());
                }
            }
        }
    }

    /// Transaction pooling and the console (when configured).
    pub fn with_pooling(mut self, pooling: Pooling) -> ShardCtx {
        self.pools = pooling.pools;
        self.cancel_keys = pooling.cancel_keys;
        self.console = pooling.console;
        self.secrets = pooling.secrets;
        self
    }

    /// The pooled and console sessions' states (for the console's SHOW CLIENTS/SERVERS).
    pub(super) fn pooled_states(&self) -> Vec<Rc<super::pooled::ClientState>> {
        self.pooled
            .borrow()
            .values()
            .map(|e| e.state.clone())
            .collect()
    }

    /// Closes the pooled clients of `database` (console KILL).
    pub(super) fn kill_pooled(&self, database: &str) {
        for entry in self.pooled.borrow().values() {
            if entry.state.database == database && !entry.closing.replace(true) {
                let msg = error_bytes(
                    "FATAL",
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection due to administrator command (KILL)",
                );
                entry.client.write_now(&msg);
                entry.client.shutdown();
            }
        }
    }

    /// A new session number, unique on this shard.
    pub(super) fn next_session_id(&self) -> u64 {
        let id = self.next_session.get();
        self.next_session.set(id + 1);
        id
    }

    pub(super) fn read_chunk_bytes(&self) -> usize {
        self.read_chunk_bytes
    }

    /// Enters a pooled (or console) session in the shard's table until the registration
    /// drops; `busy` says whether it holds a server connection.
    pub(super) fn register_pooled(
        self: &Rc<Self>,
        id: u64,
        client: &Stream,
        state: Rc<super::pooled::ClientState>,
    ) -> PooledRegistration {
        self.pooled.borrow_mut().insert(
            id,
            PooledEntry {
                client: client.clone(),
                state,
                closing: Cell::new(false),
            },
        );
        self.stats
            .sessions_active
            .set(self.sessions_active() as u64);
        PooledRegistration {
            shard: self.clone(),
            id,
            moved: false,
        }
    }

    /// A uniform draw in [0, 1) for the `sample` fraction.
    fn draw(&self) -> f64 {
        let mut x = self.sample_state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.sample_state.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The mirror links of a new session, one per mirror that samples it.
    pub(super) fn mirror_router(&self, params: &[(String, String)]) -> Option<Router> {
        if self.mirrors.is_empty() {
            return None;
        }
        let mut links = Vec::with_capacity(self.mirrors.len());
        for target in &self.mirrors {
            if target.cfg.sample < 1.0 && self.draw() >= target.cfg.sample {
                MirrorStats::bump(&target.stats.counters.sessions_unsampled, 1);
                continue;
            }
            MirrorStats::bump(&target.stats.counters.sessions, 1);
            let link = Link::new(
                target.clone(),
                self.fingerprints.clone(),
                params,
                self.settings.message_bytes_max,
            );
            mirror::start_link(&link);
            links.push(link);
        }
        Some(Router::new(
            links,
            self.fingerprints.clone(),
            self.settings.session_limits,
        ))
    }

    pub fn sessions_active(&self) -> usize {
        self.sessions.borrow().len() + self.pooled.borrow().len()
    }

    /// Closes every session that is idle (authenticated, outside a transaction, nothing in
    /// flight) with `57P01`, as PostgreSQL does on a fast shutdown. Sessions that are busy are
    /// left to finish and are closed by a later call once they are idle, unless `force`.
    pub fn close_idle_sessions(&self, force: bool) -> usize {
        let mut closed = 0;
        for session in self.sessions.borrow().values() {
            // Bytes the client sent that were received but not yet read (the upstream pump is
            // woken, not run: the drain may run first in the shard's turn) make the session
            // busy: its statement is served, and the session closed at a later poll.
            let idle = session.is_idle() && !session.client.has_unread();
            if session.closing.get() || !(force || idle) {
                continue;
            }
            session.closing.set(true);
            // The downstream pump is parked on a read of the primary (the session is idle),
            // so this write does not interleave with one of its writes.
            shutdown_farewell(&session.client);
            if force {
                // A busy session may be waiting on the primary (a long query, or one a client
                // that already left is still running): wake that pump too.
                session.primary.shutdown();
            }
            ShardStats::bump(&self.stats.counters.shutdown_closed, 1);
            closed += 1;
        }
        for session in self.pooled.borrow().values() {
            // A session waiting for a connection is busy too: its frames would still run.
            // So is one whose client sent bytes not read yet (a statement that just came).
            let busy = session.state.busy.get()
                || session.state.waiting_since.get().is_some()
                || session.state.relaying.get()
                || session.state.owed.get()
                || session.client.has_unread();
            if session.closing.get() || (!force && busy) {
                continue;
            }
            session.closing.set(true);
            // An idle pooled session waits on a read of its client only.
            shutdown_farewell(&session.client);
            ShardStats::bump(&self.stats.counters.shutdown_closed, 1);
            closed += 1;
        }
        if let Some(pools) = &self.pools {
            pools.close_idle();
        }
        closed
    }
}

/// State both pumps of one session see. Single-threaded: `Cell`s, no locks.
struct SessionShared {
    /// The client socket, for writes from outside the pumps (drain, watchdog).
    client: Stream,
    /// The primary socket, for a forced close from outside the pumps (drain timeout).
    primary: Stream,
    /// Where the session stands: sync points, COPY, transaction status, startup, batches
    /// (the one home of those protocol rules). The upstream pump feeds it client frames
    /// before forwarding them, the downstream pump the primary's frames as it reads them.
    tracker: RefCell<Tracker>,
    /// `(sequence, read time, fingerprint)` of in-flight sync points, bounded by
    /// `pipeline_depth_max`.
    stamps: RefCell<VecDeque<(u64, Instant, u64)>>,
    /// The client is gone (or said Terminate): nothing more is written to it.
    client_ended: Cell<bool>,
    /// The client said Terminate: it reads nothing more.
    terminated: Cell<bool>,
    /// The client sends nothing more (Terminate, end-of-stream or a malformed frame) and the
    /// primary was told so: its closing then is the end of the client's statements, not a
    /// failure, and what the shadow still owes is awaited (compare).
    client_sent_all: Cell<bool>,
    /// An error to give the client before closing, set by the upstream pump.
    fatal: RefCell<Option<Bytes>>,
    closing: Cell<bool>,
    /// The downstream pump is in the middle of writing to the client.
    writing: Cell<bool>,
    /// Compare holds answers the client has not been given yet (they wait for the shadow).
    holding: Cell<bool>,
    /// The session number on its shard.
    id: u64,
    /// Where the session's statements also run (the shadow, mirrors), for a client's
    /// cancel; `None` for a plain proxy session, which pays nothing for it.
    sides: Option<Sides>,
}

/// The sides of a session besides the primary, for a client's CancelRequest: it reaches
/// them through the shard-shared registry (`backend::cancel`), which the session enters once
/// its key is known.
pub(super) struct Sides {
    shadow: Option<compare::Cancel>,
    mirrors: Vec<Rc<Link>>,
    /// The primary's sync point a cancel was asked during.
    wanted: Cell<Option<u64>>,
    registered: RefCell<Option<crate::backend::cancel::Registered>>,
    /// A pooled session's sync points (opened, answered), as its tracker (not shared) last
    /// told them.
    pub(super) points: Cell<(u64, u64)>,
}

impl Sides {
    /// The sides of a session (`None`: none besides the primary).
    pub(super) fn of(shadow: Option<compare::Cancel>, mirrors: Vec<Rc<Link>>) -> Option<Sides> {
        (shadow.is_some() || !mirrors.is_empty()).then(|| Sides {
            shadow,
            mirrors,
            wanted: Cell::new(None),
            registered: RefCell::new(None),
            points: Cell::new((0, 0)),
        })
    }

    /// Enters the session in the registry under `key`, the key its client holds.
    pub(super) fn register(&self, shard: &ShardCtx, key: (i32, i32), id: u64) {
        if let Some(registry) = &shard.cancel_registry {
            *self.registered.borrow_mut() = Some(registry.register(key, shard.index, id));
        }
    }

    /// The client asked to cancel while the primary had answered `answered` of the
    /// `opened` sync points: the one it runs now is the one it may cancel; each side cancels
    /// it once the primary's answer says it was (see `backend::cancel::Pending`).
    pub(super) fn requested(&self, (opened, answered): (u64, u64)) {
        if answered >= opened {
            // Nothing runs: the primary ignores the cancel, and so does every side.
            return;
        }
        self.wanted.set(Some(answered));
        if let Some(shadow) = &self.shadow {
            shadow.request(answered);
        }
        for link in &self.mirrors {
            link.cancel_request(answered);
        }
    }

    /// Whether a cancel waits for the primary's answer to sync point `seq`.
    pub(super) fn waits_for(&self, seq: u64) -> bool {
        self.wanted.get() == Some(seq)
    }

    /// The primary answered sync point `seq` (`cancelled`: with 57014): if a cancel was
    /// asked during it, the sides learn whether it took.
    pub(super) fn answered(&self, seq: u64, cancelled: bool) {
        if !self.waits_for(seq) {
            return;
        }
        self.wanted.set(None);
        if let Some(shadow) = &self.shadow {
            shadow.primary_answered(seq, cancelled);
        }
        for link in &self.mirrors {
            link.primary_answered(seq, cancelled);
        }
    }
}

impl SessionShared {
    /// Startup and authentication are complete (the first ReadyForQuery came).
    fn ready(&self) -> bool {
        self.tracker.borrow().ready()
    }

    /// The primary answered the oldest sync point (a ReadyForQuery read at `arrived`): count
    /// it, and record its primary latency (overall and by fingerprint) when it was sampled.
    /// Returns when the client's statement was read, for the client-observed latency.
    fn answer_sync(&self, shard: &ShardCtx, seq: u64, arrived: Instant) -> Option<Instant> {
        self.cancel_answered(seq);
        let mut stamps = self.stamps.borrow_mut();
        // A stamp older than the answer can never be answered (a server that answered fewer
        // sync points than were counted): it must not block the ones after it.
        while stamps.front().is_some_and(|&(s, _, _)| s < seq) {
            stamps.pop_front();
        }
        if stamps.front().is_none_or(|&(s, _, _)| s != seq) {
            return None;
        }
        let (_, read_at, fingerprint) = stamps.pop_front()?;
        let stats = &shard.stats;
        stats.record(&stats.primary_latency_us, arrived - read_at);
        if fingerprint != 0 {
            shard
                .fingerprints
                .record_primary(fingerprint, arrived - read_at);
        }
        Some(read_at)
    }

    /// Enters the session in the cancel registry once the primary's key is known (the
    /// client holds that key: a CancelRequest carries it).
    fn register_cancel(&self, shard: &ShardCtx) {
        let Some(sides) = &self.sides else {
            return;
        };
        if sides.registered.borrow().is_some() {
            return;
        }
        if let Some(key) = self.tracker.borrow().key() {
            sides.register(shard, key, self.id);
        }
    }

    /// The client asked to cancel (heard from whichever shard got its CancelRequest).
    fn cancel_requested(&self) {
        let Some(sides) = &self.sides else {
            return;
        };
        let tracker = self.tracker.borrow();
        let (opened, answered) = tracker.sync_points();
        // The cancel went to the primary from the shard that got it while this notice was on
        // its way: the primary's 57014 may have been read first. Nothing runs now, and the
        // last sync point the primary answered was cancelled: that is the one.
        let late = answered >= opened && answered > 0 && tracker.cancelled(answered - 1);
        drop(tracker);
        if late {
            sides.requested((answered, answered - 1));
            sides.answered(answered - 1, true);
        } else {
            sides.requested((opened, answered));
        }
    }

    /// The primary answered sync point `seq`.
    fn cancel_answered(&self, seq: u64) {
        if let Some(sides) = &self.sides
            && sides.waits_for(seq)
        {
            let cancelled = self.tracker.borrow().cancelled(seq);
            sides.answered(seq, cancelled);
        }
    }

    /// At a transaction boundary with nothing in flight: safe to close (drain) or to resume a
    /// mirror (nothing half-done would follow).
    fn is_idle(&self) -> bool {
        self.tracker.borrow().is_idle() && !self.writing.get() && !self.holding.get()
    }
}

/// Removes the session from the shard's table and updates the gauges, however it ends.
struct Registration {
    shard: Rc<ShardCtx>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shard.sessions.borrow_mut().remove(&self.id);
        let stats = &self.shard.stats;
        stats
            .sessions_active
            .set(self.shard.sessions.borrow().len() as u64);
        ShardStats::bump(&stats.counters.sessions_closed, 1);
    }
}

/// A drain's last word to a client (57P01, as PostgreSQL's fast shutdown), then the close.
fn shutdown_farewell(client: &Stream) {
    client.write_now(&shutdown_error());
    client.shutdown();
}

/// The 57P01 a client gets when pgprism stops (a drained session, or a connection queued for
/// a shard that stopped).
pub(crate) fn shutdown_error() -> Bytes {
    error_bytes(
        "FATAL",
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection because pgprism is shutting down",
    )
}

pub(crate) fn error_bytes(severity: &str, code: &str, message: &str) -> Bytes {
    let mut buf = BytesMut::new();
    let spec = wire::encode::ErrorSpec::new(severity, code, message);
    if wire::encode::error_response(&mut buf, &spec).is_err() {
        // Only a NUL inside the text can fail; the client still deserves the error.
        let cleaned = message.replace('\0', " ");
        let spec = wire::encode::ErrorSpec::new(severity, code, &cleaned);
        let _ = wire::encode::error_response(&mut buf, &spec);
    }
    buf.freeze()
}

/// Serves one accepted client connection to its end. `accepted` is when a listener accepted
/// it (on this shard or, under `client-placement = "pack"`, on the one that handed it over):
/// the startup timeout counts from there.
pub async fn serve_client(shard: Rc<ShardCtx>, mut client: Stream, accepted: Instant) {
    let stats = &shard.stats;
    ShardStats::bump(&stats.counters.connections_accepted, 1);
    if client.is_unix() {
        ShardStats::bump(&stats.counters.unix_connections_accepted, 1);
    }
    if shard.sessions_active() >= shard.settings.sessions_per_shard_max {
        ShardStats::bump(&stats.counters.sessions_rejected, 1);
        let msg = error_bytes(
            "FATAL",
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already (pgprism proxy.sessions-per-shard-max)",
        );
        client.write_now(&msg);
        return;
    }
    // Nagle would hold back small protocol messages; latency matters more than packet count.
    // (A Unix-socket client has no Nagle: this does nothing for it.)
    let _ = client.set_nodelay(true);
    let deadline = accepted + shard.settings.startup_timeout;
    let mut buf = BytesMut::new();

    let startup = within(
        deadline.saturating_duration_since(Instant::now()),
        read_startup(&shard, &mut client, &mut buf),
    )
    .await;
    let packet = match startup {
        None => {
            ShardStats::bump(&stats.counters.startup_timeouts, 1);
            let msg = error_bytes(
                "FATAL",
                sqlstate::PROTOCOL_VIOLATION,
                "no startup packet received within proxy.startup-timeout-ms",
            );
            client.write_now(&msg);
            return;
        }
        Some(Err(Closed)) => return,
        Some(Ok(Startup::Cancel(packet))) => {
            forward_cancel(&shard, &packet).await;
            return;
        }
        Some(Ok(Startup::Session(packet))) => packet,
    };
    if shard.pools.is_some() {
        let params = match StartupPacket::parse(&packet) {
            Ok(StartupPacket::Startup { params, .. }) => params,
            _ => Vec::new(),
        };
        let database = params
            .iter()
            .find(|(k, _)| k == "database")
            .map(|(_, v)| v.as_str());
        if shard.settings.transaction_pooling
            || database.is_some_and(super::console::is_console_database)
        {
            super::pooled::serve(shard.clone(), client, params, buf, deadline).await;
            return;
        }
    }

    let primary = match connect_primary(&shard).await {
        Ok(primary) => primary,
        Err(err) => {
            ShardStats::bump(&stats.counters.primary_connect_failures, 1);
            let msg = error_bytes(
                "FATAL",
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                &format!(
                    "pgprism could not connect to primary {}: {err}",
                    shard.settings.primary_label
                ),
            );
            let _ = client.write_all(&msg).await;
            return;
        }
    };
    if let Err(err) = relay(&shard, client, primary, packet, buf, deadline).await {
        tracing::debug!(shard = shard.index, error = %err, "session setup failed");
    }
}

enum Startup {
    Session(Bytes),
    Cancel(Bytes),
}

/// The client closed the connection (or broke it) before a session could start.
struct Closed;

/// Reads the startup packet. SSLRequest starts TLS when `[client-tls]` offers it and is
/// answered `N` otherwise; GSSENCRequest is answered `N`.
async fn read_startup(
    shard: &ShardCtx,
    client: &mut Stream,
    buf: &mut BytesMut,
) -> Result<Startup, Closed> {
    let counters = &shard.stats.counters;
    let (client_tls, client_tls_required) = shard.settings.client_tls.get();
    loop {
        match wire::split_startup(buf, STARTUP_BYTES_MAX) {
            Ok(Some(packet)) => match StartupPacket::parse(&packet) {
                Ok(StartupPacket::SslRequest) if !client.is_tls() => {
                    let Some(config) = client_tls.clone() else {
                        ShardStats::bump(&counters.ssl_refused, 1);
                        client.write_all(b"N").await.map_err(|_| Closed)?;
                        continue;
                    };
                    if !buf.is_empty() {
                        // Bytes sent after SSLRequest before our answer would bypass TLS
                        // (the attack of CVE-2021-23214): refuse them.
                        ShardStats::bump(&counters.protocol_errors, 1);
                        let msg = error_bytes(
                            "FATAL",
                            sqlstate::PROTOCOL_VIOLATION,
                            "received unencrypted data after SSL request",
                        );
                        let _ = client.write_all(&msg).await;
                        return Err(Closed);
                    }
                    client.write_all(b"S").await.map_err(|_| Closed)?;
                    if let Err(err) = client.start_tls_server(config).await {
                        ShardStats::bump(&counters.client_tls_failures, 1);
                        tracing::debug!(shard = shard.index, error = %err, "client TLS handshake failed");
                        return Err(Closed);
                    }
                    ShardStats::bump(&counters.client_tls_sessions, 1);
                    continue;
                }
                Ok(StartupPacket::SslRequest) | Ok(StartupPacket::GssEncRequest) => {
                    ShardStats::bump(&counters.ssl_refused, 1);
                    client.write_all(b"N").await.map_err(|_| Closed)?;
                    continue;
                }
                Ok(StartupPacket::Cancel { .. }) => return Ok(Startup::Cancel(packet)),
                // As with PostgreSQL's `hostssl`, a Unix-domain socket (local, never TLS in
                // libpq) is not held to it.
                Ok(StartupPacket::Startup { .. })
                    if client_tls_required && !client.is_tls() && !client.is_unix() =>
                {
                    ShardStats::bump(&counters.client_tls_refused, 1);
                    let msg = error_bytes(
                        "FATAL",
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        "pgprism accepts TLS connections only (client-tls.mode = require)",
                    );
                    let _ = client.write_all(&msg).await;
                    return Err(Closed);
                }
                Ok(StartupPacket::Startup { .. }) => return Ok(Startup::Session(packet)),
                Err(err) => return Err(protocol_error(shard, client, &err).await),
            },
            Ok(None) => {}
            Err(err) => return Err(protocol_error(shard, client, &err).await),
        }
        match client.read_buf(buf, shard.read_chunk_bytes).await {
            Ok(0) | Err(_) => return Err(Closed),
            Ok(n) => ShardStats::bump(&shard.stats.counters.client_bytes_in, n as u64),
        }
    }
}

async fn protocol_error(shard: &ShardCtx, client: &Stream, err: &wire::WireError) -> Closed {
    ShardStats::bump(&shard.stats.counters.protocol_errors, 1);
    let msg = error_bytes(
        "FATAL",
        err.sqlstate(),
        &format!("invalid startup packet: {err}"),
    );
    let _ = client.write_all(&msg).await;
    Closed
}

async fn connect_primary(shard: &ShardCtx) -> io::Result<Stream> {
    let settings = &shard.settings;
    let mut primary =
        crate::backend::connect(&settings.primary_addr.get(), settings.connect_timeout).await?;
    let negotiated = within(
        settings.connect_timeout,
        settings.primary_tls.negotiate(&mut primary),
    )
    .await;
    match negotiated {
        Some(Ok(_)) => Ok(primary),
        Some(Err(err)) => Err(err),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS negotiation timed out (proxy.connect-timeout-ms)",
        )),
    }
}

/// Forwards a CancelRequest verbatim: the key in it is the primary's own (see module doc).
/// Returns once the primary closed that connection (it has acted on the request by then), or
/// after `proxy.connect-timeout-ms`: libpq and JDBC wait for that close before they send
/// anything else, so that a late cancel cannot hit the next statement.
async fn forward_cancel(shard: &ShardCtx, packet: &Bytes) {
    // The session's shard hears of it first, so that it knows which statement the primary
    // runs before the primary's answer to the cancel can come.
    if let (Some(registry), Ok(StartupPacket::Cancel { pid, secret })) =
        (&shard.cancel_registry, StartupPacket::parse(packet))
    {
        registry.request((pid, secret));
    }
    // A pooled client's key is pgprism's own: cancel what runs on the connection lent to it.
    let mut rewritten = None;
    let mut pooled = None;
    if let Ok(StartupPacket::Cancel { pid, secret }) = StartupPacket::parse(packet)
        && let Some(found) = shard.cancel_keys.lookup(pid, secret)
    {
        let Some((server_pid, server_secret)) = found else {
            return;
        };
        let mut out = BytesMut::new();
        wire::encode::cancel_request(&mut out, server_pid, server_secret);
        rewritten = Some(out.freeze());
        pooled = Some((pid, secret, (server_pid, server_secret)));
    }
    let packet = rewritten.as_ref().unwrap_or(packet);
    let Ok(primary) = connect_primary(shard).await else {
        return;
    };
    // The connection may have gone back to the pool (and to another client) while the cancel
    // connection opened: cancel only if it is still this client's.
    if let Some((pid, secret, key)) = pooled
        && shard.cancel_keys.lookup(pid, secret) != Some(Some(key))
    {
        primary.shutdown();
        return;
    }
    if primary.write_all(packet).await.is_ok() {
        ShardStats::bump(&shard.stats.counters.cancels_forwarded, 1);
        let mut sink = BytesMut::new();
        let _ = within(shard.settings.connect_timeout, async {
            // The primary sends nothing on a cancel connection; whatever comes is dropped.
            while let Ok(n) = primary.read_buf(&mut sink, 256).await {
                if n == 0 {
                    break;
                }
                sink.clear();
            }
        })
        .await;
        primary.shutdown();
    }
}

/// Runs the session proper: both pumps, plus the watchdog that ends a session whose
/// authentication did not complete before `deadline`.
async fn relay(
    shard: &Rc<ShardCtx>,
    client: Stream,
    primary: Stream,
    startup: Bytes,
    leftover: BytesMut,
    deadline: Instant,
) -> io::Result<()> {
    primary.write_all(&startup).await?;
    let params = match StartupPacket::parse(&startup) {
        Ok(StartupPacket::Startup { params, .. }) => params,
        _ => Vec::new(),
    };
    let id = shard.next_session.get();
    shard.next_session.set(id + 1);
    let Ok(compare) = open_compare(shard, &client, Some(&primary), &params, id).await else {
        return Ok(());
    };
    let router = shard.mirror_router(&params);
    let mirrors: Vec<Rc<Link>> = router
        .as_ref()
        .map(|r| r.links().to_vec())
        .unwrap_or_default();
    let shadow = compare.as_ref().map(|(_, comparer, _)| comparer.cancel());
    let sides = Sides::of(shadow, mirrors);
    let shared = Rc::new(SessionShared {
        client: client.clone(),
        primary: primary.clone(),
        tracker: RefCell::new(Tracker::new(crate::session::Limits {
            // Compare planning and mirror routing read the statements and portals off the
            // tracker; a plain session decodes none.
            statements: compare.is_some() || router.is_some(),
            ..shard.settings.session_limits
        })),
        stamps: RefCell::new(VecDeque::new()),
        client_ended: Cell::new(false),
        terminated: Cell::new(false),
        client_sent_all: Cell::new(false),
        fatal: RefCell::new(None),
        closing: Cell::new(false),
        writing: Cell::new(false),
        holding: Cell::new(false),
        id,
        sides,
    });
    shard.sessions.borrow_mut().insert(id, shared.clone());
    shard
        .stats
        .sessions_active
        .set(shard.sessions.borrow().len() as u64);
    let _registration = Registration {
        shard: shard.clone(),
        id,
    };

    let pumps = run_pumps(shard, &shared, (client, primary), leftover, router, compare);
    futures_lite::future::or(pumps, watchdog(shard, &shared, deadline)).await;
    Ok(())
}

/// The shadow session of a compare-mode client (session mode, or transaction-pooled without
/// a primary connection of its own), paired with the session's compare halves. `Err`: it
/// could not be opened and the client, who asked for verified (or the shadow's) answers, was
/// told so (its own primary connection, if any, closed); `Ok(None)`: no compare mode, or
/// comparing is given up on.
pub(super) async fn open_compare(
    shard: &ShardCtx,
    client: &Stream,
    primary: Option<&Stream>,
    params: &[(String, String)],
    id: u64,
) -> Result<Option<(compare::Dispatch, Comparer, compare::ShadowWriter)>, ()> {
    let Some(target) = &shard.compare else {
        return Ok(None);
    };
    match target
        .shadow_session(
            params,
            shard.settings.message_bytes_max,
            shard.settings.session_limits.settings_max,
        )
        .await
    {
        Ok(shadow) => Ok(Some(compare::Exchange::pair(
            target.clone(),
            shadow,
            ((shard.index as u64) << 48) | id,
            params.to_vec(),
        ))),
        Err(err) => {
            ShardStats::bump(&shard.stats.counters.compare_shadow_connect_failures, 1);
            tracing::warn!(shard = shard.index, error = %err, "cannot open the shadow session");
            if !(target.cfg.fail_on_differences || target.shadow_is_source()) {
                return Ok(None);
            }
            // The client asked for verified (or shadow) answers: none can be given.
            if let Some(primary) = primary {
                primary.shutdown();
            }
            let msg = error_bytes(
                "FATAL",
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                &format!("pgprism could not open the shadow session: {err}"),
            );
            let _ = client.write_all(&msg).await;
            Err(())
        }
    }
}

/// Both pumps of a session (and, in compare mode, the shadow's writer), to their end.
async fn run_pumps(
    shard: &ShardCtx,
    shared: &SessionShared,
    (client, primary): (Stream, Stream),
    leftover: BytesMut,
    router: Option<Router>,
    compare: Option<(compare::Dispatch, Comparer, compare::ShadowWriter)>,
) {
    let (client_up, primary_up) = (client.clone(), primary.clone());
    match compare {
        None => {
            futures_lite::future::zip(
                upstream(shard, shared, client_up, primary_up, leftover, router, None),
                downstream(shard, shared, primary, client),
            )
            .await;
        }
        Some((up, down, writer)) => {
            let shadow = up.shadow.clone();
            // Each half polled only when woken (why none waits unwoken: compare/exchange.rs,
            // "Three halves, three wakers").
            exec::join3(
                upstream(
                    shard,
                    shared,
                    client_up,
                    primary_up,
                    leftover,
                    router,
                    Some(up),
                ),
                downstream_compare(shard, shared, primary, shadow, client, down),
                writer.run(),
            )
            .await;
        }
    }
}

/// Ends a session whose authentication did not complete by `deadline` (a 08P01 for the
/// client); pending forever once it did.
async fn watchdog(shard: &ShardCtx, shared: &SessionShared, deadline: Instant) {
    // The timer is dropped (cancelled) as soon as the session is ready, so the messages of a
    // running session never touch the timer table.
    let mut timer = Some(exec::sleep_until(deadline));
    futures_lite::future::poll_fn(|cx| {
        if shared.ready() {
            timer = None;
        }
        match timer.as_mut() {
            Some(sleep) => std::pin::Pin::new(sleep).poll(cx),
            None => std::task::Poll::Pending,
        }
    })
    .await;
    if !shared.ready() {
        ShardStats::bump(&shard.stats.counters.startup_timeouts, 1);
        let msg = error_bytes(
            "FATAL",
            sqlstate::PROTOCOL_VIOLATION,
            "authentication not completed within proxy.startup-timeout-ms",
        );
        shared.client.write_now(&msg);
        return;
    }
    std::future::pending::<()>().await
}

/// One read's complete client frames, as the tracker saw them.
struct Scanned {
    /// Bytes of complete, well-formed frames at the front of the buffer.
    complete: usize,
    /// The client sent a malformed frame after them.
    bad: Option<wire::WireError>,
    /// Sync points the frames opened, numbered from `first_sync`.
    syncs: u64,
    first_sync: u64,
    terminated: bool,
}

/// Feeds the complete frames at the front of `buf` to the session's tracker and counts them;
/// `framed` gets each frame with its step when mirrors or compare need them.
fn scan(
    shard: &ShardCtx,
    shared: &SessionShared,
    buf: &[u8],
    framed: &mut Vec<Framed>,
    collect: bool,
) -> Scanned {
    let (mut statements, mut syncs, mut messages) = (0u64, 0u64, 0u64);
    let mut terminated = false;
    let mut at = 0usize;
    framed.clear();
    let mut tracker = shared.tracker.borrow_mut();
    let first_sync = tracker.sync_points().0;
    let scanned = wire::complete_prefix(buf, shard.settings.message_bytes_max, |tag, body| {
        messages += 1;
        let step = tracker.client(tag, body);
        let end = at + wire::HEADER_BYTES + body.len();
        if collect {
            framed.push(Framed {
                tag,
                start: at,
                end,
                step,
                refers: tracker.take_refers(),
                applied: tracker.take_applied(),
            });
        }
        at = end;
        statements += u64::from(tag == tag::QUERY || tag == tag::EXECUTE);
        match step {
            Step::SyncPoint => syncs += 1,
            Step::Terminate => terminated = true,
            Step::QuietSync | Step::Other => {}
        }
    });
    crate::invariant!(
        tracker.sync_points().0 == first_sync + syncs,
        "every sync point the tracker opened is counted once"
    );
    let counters = &shard.stats.counters;
    ShardStats::bump(&counters.client_messages_in, messages);
    ShardStats::bump(&counters.statements, statements);
    ShardStats::bump(&counters.sync_points, syncs);
    // A malformed frame: the complete messages before it still go to the primary, as
    // PostgreSQL itself runs what precedes a bad message before it rejects it.
    let (complete, bad) = match scanned {
        Ok(complete) => (complete, None),
        Err(err) => (at, Some(err)),
    };
    Scanned {
        complete,
        bad,
        syncs,
        first_sync,
        terminated,
    }
}

/// Routes a batch to the mirrors before it goes to the primary (routing never waits, unless
/// a mirror uses the `block` policy) and stamps each sync point with its fingerprint; without
/// mirrors, only the stamps.
async fn route_and_stamp(
    shared: &SessionShared,
    settings: &ProxySettings,
    router: Option<&mut Router>,
    (frames, framed): (&Bytes, &[Framed]),
    scanned: &Scanned,
    (read_at, idle_before): (Instant, bool),
) {
    let Some(router) = router else {
        for seq in scanned.first_sync..scanned.first_sync + scanned.syncs {
            push_stamp(shared, settings, seq, read_at, 0);
        }
        return;
    };
    router.begin_batch(idle_before);
    let mut seq = scanned.first_sync;
    for f in framed {
        router.route(f, &frames.slice(f.start..f.end)).await;
        if f.step == Step::SyncPoint {
            push_stamp(shared, settings, seq, read_at, router.last_fingerprint());
            seq += 1;
        }
    }
}

/// How the upstream pump ended.
#[derive(PartialEq, Eq)]
enum UpstreamEnd {
    /// The client left: Terminate, end-of-stream or a failed read.
    ClientLeft,
    /// The client sent a malformed frame; it gets the error after its answers.
    BadFrame,
    /// A write to the primary failed.
    PrimaryFailed,
}

/// Client → primary: frames what the client sends and forwards every complete message, many
/// per write, in order.
async fn upstream(
    shard: &ShardCtx,
    shared: &SessionShared,
    client: Stream,
    primary: Stream,
    mut buf: BytesMut,
    mut router: Option<Router>,
    mut compare: Option<compare::Dispatch>,
) {
    let settings = &shard.settings;
    let mut terminated = false;
    // Each frame of the batch with the tracker's step, only when mirrors or compare need them.
    let mut framed: Vec<Framed> = Vec::new();
    let collect = router.is_some() || compare.is_some();
    let end = loop {
        if !buf.is_empty() {
            let read_at = Instant::now();
            // Whether the session stood at a transaction boundary before this batch (mirrors
            // resume only there).
            let idle_before = router.is_some() && shared.is_idle();
            let scanned = scan(shard, shared, &buf, &mut framed, collect);
            terminated |= scanned.terminated;
            let complete = scanned.complete;
            let frames = buf.split_to(complete).freeze();
            let batch = (&frames, framed.as_slice());
            let when = (read_at, idle_before);
            route_and_stamp(shared, settings, router.as_mut(), batch, &scanned, when).await;
            let mut own_describes = None;
            let compared = match compare.as_mut() {
                Some(up) if complete > 0 && shared.ready() => {
                    // Executes of statements the client never described go with compare's
                    // own Describe of their portal (answered to compare only).
                    own_describes = up.describe_unseen_in(&frames, &framed);
                    // Before the primary write, so the comparer finds every sync point it pairs.
                    up.plan(&frames, &framed, read_at, scanned.first_sync);
                    true
                }
                _ => false,
            };
            let frames = own_describes.unwrap_or(frames);
            if complete > 0 && primary.write_bytes(frames).await.is_err() {
                // The primary is gone: the downstream pump sees it too and tells the client.
                break UpstreamEnd::PrimaryFailed;
            }
            release_if_large(&mut buf, complete, shard.read_chunk_bytes);
            if terminated && scanned.bad.is_none() {
                // The primary has the Terminate and may close before the shadow write below
                // completes: its end must already read as the client's (compare then drains
                // the shadow), not as a primary lost mid-session (which stops the pump with
                // the shadow's last answers unjudged).
                shared.terminated.set(true);
                shared.client_sent_all.set(true);
            }
            // A failed shadow write stops the shadow's side (the downstream pump sees its end
            // and stops comparing).
            if compared && let Some(up) = compare.as_mut() {
                up.write().await;
            }
            if let Some(err) = scanned.bad {
                ShardStats::bump(&shard.stats.counters.protocol_errors, 1);
                *shared.fatal.borrow_mut() = Some(error_bytes(
                    "FATAL",
                    err.sqlstate(),
                    &format!("pgprism: invalid message from client: {err}"),
                ));
                break UpstreamEnd::BadFrame;
            }
            if terminated {
                break UpstreamEnd::ClientLeft;
            }
        }
        match client.read_buf(&mut buf, shard.read_chunk_bytes).await {
            Ok(0) | Err(_) => break UpstreamEnd::ClientLeft,
            Ok(n) => ShardStats::bump(&shard.stats.counters.client_bytes_in, n as u64),
        }
        // The drain closed the session: its 57P01 is on the way to the client, which must be
        // able to trust that nothing it sent after its last answer ran. What a read still
        // hands over (received before the close, read after it) is dropped, not forwarded.
        if shared.closing.get() {
            break UpstreamEnd::ClientLeft;
        }
    };
    client_finished(shared, &primary, end, terminated).await;
    if let Some(mut up) = compare {
        up.finish(terminated);
    }
    if let Some(router) = router {
        for link in router.links() {
            link.client_done();
        }
    }
}

/// The client sends nothing more: tell the primary (and whoever waits on the session).
async fn client_finished(
    shared: &SessionShared,
    primary: &Stream,
    end: UpstreamEnd,
    terminated: bool,
) {
    if end == UpstreamEnd::ClientLeft {
        // The client left (Terminate or EOF): no error of ours will be written to it.
        shared.client_ended.set(true);
    }
    if end == UpstreamEnd::PrimaryFailed {
        // Wake the downstream pump: it sees end-of-stream from the primary and finishes.
        primary.shutdown();
        return;
    }
    shared.terminated.set(terminated);
    shared.client_sent_all.set(true);
    if !terminated && shared.ready() {
        let _ = primary.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
    // Only our sending side: a client that half-closed still reads the answers to what it
    // sent, as it would directly (and one that sent a bad frame gets them before the error).
    // The primary closes after the Terminate (or the end-of-stream), which ends the
    // downstream pump.
    primary.shutdown_write();
}

/// A read buffer that had to grow for a large message keeps that allocation for the rest of
/// the session (the empty view still owns it): once such a message has gone out and nothing
/// is left, start over with a fresh buffer, so an idle session holds a read chunk's worth and
/// not the largest message it ever relayed.
fn release_if_large(buf: &mut BytesMut, relayed: usize, read_chunk_bytes: usize) {
    if buf.is_empty() && relayed > 4 * read_chunk_bytes {
        *buf = BytesMut::new();
    }
}

/// The session's last word to a client that is still there: the upstream pump's fatal error
/// if it set one, else "lost the connection to primary" — unless the primary already said
/// FATAL itself (`farewell`), which the client has received.
async fn say_goodbye(shard: &ShardCtx, shared: &SessionShared, client: &Stream, farewell: bool) {
    let primary_said_goodbye = farewell && shared.fatal.borrow().is_none();
    if shared.client_ended.get() || primary_said_goodbye {
        return;
    }
    let fatal = shared.fatal.borrow_mut().take();
    let msg = fatal.unwrap_or_else(|| {
        ShardStats::bump(&shard.stats.counters.primary_lost, 1);
        error_bytes(
            "FATAL",
            sqlstate::CONNECTION_FAILURE,
            &format!(
                "pgprism lost the connection to primary {}",
                shard.settings.primary_label
            ),
        )
    });
    let _ = client.write_all(&msg).await;
}

/// Remembers when sync point `seq` was read, for its latencies (within the pipeline bound).
fn push_stamp(
    shared: &SessionShared,
    settings: &ProxySettings,
    seq: u64,
    read_at: Instant,
    fingerprint: u64,
) {
    let mut stamps = shared.stamps.borrow_mut();
    if stamps.len() < settings.pipeline_depth_max {
        stamps.push_back((seq, read_at, fingerprint));
    }
}

/// A client without TLS must not be offered the SCRAM channel binding that only pgprism's own
/// TLS connection to the primary could give (libpq refuses such an offer, and the binding
/// would be to the wrong connection): SCRAM-SHA-256-PLUS is dropped from AuthenticationSASL,
/// and the client authenticates with plain SCRAM-SHA-256, which the server accepts.
fn without_channel_binding(frames: Bytes) -> Bytes {
    const SASL: [u8; 4] = [0, 0, 0, 10];
    let mut out = BytesMut::with_capacity(frames.len());
    let mut changed = false;
    let mut at = 0;
    while let Some(head) = frames.get(at..at + wire::HEADER_BYTES) {
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let end = at + 1 + len;
        let Some(body) = frames.get(at + wire::HEADER_BYTES..end) else {
            break;
        };
        if head[0] == tag::AUTHENTICATION && body.starts_with(&SASL) {
            let mut rebuilt = SASL.to_vec();
            for mechanism in body[4..].split(|b| *b == 0) {
                if !mechanism.is_empty() && mechanism != b"SCRAM-SHA-256-PLUS" {
                    rebuilt.extend_from_slice(mechanism);
                    rebuilt.push(0);
                }
            }
            rebuilt.push(0);
            out.extend_from_slice(&[tag::AUTHENTICATION]);
            out.extend_from_slice(&((rebuilt.len() + 4) as u32).to_be_bytes());
            out.extend_from_slice(&rebuilt);
            changed = true;
        } else {
            out.extend_from_slice(&frames[at..end]);
        }
        at = end;
    }
    if !changed {
        return frames;
    }
    out.extend_from_slice(&frames[at..]);
    out.freeze()
}

/// Primary → client: relays every complete message, tracks ReadyForQuery (transaction status,
/// latency), and tells the client clearly when the primary goes away.
async fn downstream(shard: &ShardCtx, shared: &SessionShared, primary: Stream, client: Stream) {
    let stats = &shard.stats;
    let settings = &shard.settings;
    let mut buf = BytesMut::new();
    let mut answered: Vec<Instant> = Vec::new();
    let mut farewell = false;
    loop {
        match primary.read_buf(&mut buf, shard.read_chunk_bytes).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let arrived = Instant::now();
        let (mut answered_syncs, mut errors, mut messages) = (0u64, 0u64, 0u64);
        let starting = !shared.ready();
        let first_answer = shared.tracker.borrow().sync_points().1;
        // The complete messages ahead of a malformed one, if one comes.
        let mut valid = 0usize;
        let scanned = {
            let mut tracker = shared.tracker.borrow_mut();
            wire::complete_prefix(&buf, settings.message_bytes_max, |tag, body| {
                valid += wire::HEADER_BYTES + body.len();
                messages += 1;
                match tracker.server(tag, body) {
                    Answer::SyncAnswered => answered_syncs += 1,
                    Answer::Error { farewell: last } => {
                        errors += 1;
                        // A FATAL/PANIC is the primary's own farewell, so the client needs no
                        // second one from us.
                        farewell |= last;
                    }
                    Answer::Ready | Answer::CopyIn | Answer::Other => {}
                }
            })
        };
        // A malformed message: the answers ahead of it still reach the client, then the
        // session ends with pgprism's FATAL.
        let (complete, bad) = match scanned {
            Ok(complete) => (complete, false),
            Err(err) => {
                ShardStats::bump(&stats.counters.protocol_errors, 1);
                *shared.fatal.borrow_mut() = Some(error_bytes(
                    "FATAL",
                    sqlstate::PROTOCOL_VIOLATION,
                    &format!(
                        "pgprism: invalid message from primary {}: {err}",
                        settings.primary_label
                    ),
                ));
                (valid, true)
            }
        };
        ShardStats::bump(&stats.counters.primary_messages_in, messages);
        ShardStats::bump(&stats.counters.primary_errors, errors);
        if starting && shared.ready() {
            shared.register_cancel(shard);
        }
        answered.clear();
        for seq in first_answer..first_answer + answered_syncs {
            if let Some(read_at) = shared.answer_sync(shard, seq, arrived) {
                answered.push(read_at);
            }
        }
        if complete == 0 {
            if bad {
                break;
            }
            continue;
        }
        let mut frames = buf.split_to(complete).freeze();
        if starting && primary.is_tls() && !client.is_tls() {
            frames = without_channel_binding(frames);
        }
        shared.writing.set(true);
        let written = client.write_bytes(frames).await;
        shared.writing.set(false);
        if written.is_err() {
            shared.client_ended.set(true);
            break;
        }
        release_if_large(&mut buf, complete, shard.read_chunk_bytes);
        ShardStats::bump(&stats.counters.client_bytes_out, complete as u64);
        if !answered.is_empty() {
            let written = Instant::now();
            for &read_at in &answered {
                stats.record(&stats.client_latency_us, written - read_at);
            }
        }
        if bad {
            break;
        }
    }
    say_goodbye(shard, shared, &client, farewell).await;
    // Wake the upstream pump whatever it waits on: reading the client, or writing to a
    // primary that nobody reads any more (a dead client in the middle of a pipeline).
    client.shutdown();
    primary.shutdown();
}

/// The proxy session as the compare pump sees it.
struct CompareHost<'a> {
    shard: &'a ShardCtx,
    shared: &'a SessionShared,
}

impl compare::Host for CompareHost<'_> {
    fn tracker(&self) -> Option<&RefCell<Tracker>> {
        Some(&self.shared.tracker)
    }

    fn answer_sync(&self, seq: u64, arrived: Instant) {
        self.shared.answer_sync(self.shard, seq, arrived);
    }

    fn client_sent_all(&self) -> bool {
        self.shared.client_sent_all.get()
    }

    fn client_said_terminate(&self) -> bool {
        self.shared.terminated.get()
    }

    fn set_writing(&self, writing: bool) {
        self.shared.writing.set(writing);
    }

    fn set_holding(&self, holding: bool) {
        self.shared.holding.set(holding);
    }

    fn client_lost(&self) {
        self.shared.client_ended.set(true);
    }

    fn fail(&self, code: &str, message: &str) {
        *self.shared.fatal.borrow_mut() = Some(error_bytes("FATAL", code, message));
    }
}

/// Primary + shadow → client in compare mode: relays the primary's startup verbatim, then
/// hands both answer streams to compare's pump.
async fn downstream_compare(
    shard: &ShardCtx,
    shared: &SessionShared,
    primary: Stream,
    shadow: compare::Shadow,
    client: Stream,
    comparer: Comparer,
) {
    let mut pbuf = BytesMut::new();
    let mut farewell = false;
    let started = relay_startup(shard, shared, &primary, &client, &mut pbuf, &mut farewell).await;
    if started {
        shared.register_cancel(shard);
        let host = CompareHost { shard, shared };
        let settings = compare::PumpSettings {
            message_bytes_max: shard.settings.message_bytes_max,
            read_chunk_bytes: shard.read_chunk_bytes,
            shard: shard.index,
        };
        let pump = compare::Pump::new(
            &host,
            &shard.stats,
            settings,
            compare::Primary::Stream(primary.clone()),
            shadow.clone(),
            client.clone(),
            comparer,
            pbuf,
        );
        farewell |= pump.run().await;
    } else {
        comparer.stop_shadow_writes();
    }
    say_goodbye(shard, shared, &client, farewell).await;
    client.shutdown();
    shadow.shutdown();
    primary.shutdown();
}

/// Startup and authentication are the primary's alone (the shadow session is pgprism's):
/// relays them verbatim up to the first ReadyForQuery, leaving what follows it in `pbuf`.
/// Returns whether the session started.
async fn relay_startup(
    shard: &ShardCtx,
    shared: &SessionShared,
    primary: &Stream,
    client: &Stream,
    pbuf: &mut BytesMut,
    farewell: &mut bool,
) -> bool {
    while !shared.ready() {
        match primary.read_buf(pbuf, shard.read_chunk_bytes).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let scanned = {
            let mut tracker = shared.tracker.borrow_mut();
            wire::complete_prefix_until(pbuf, shard.settings.message_bytes_max, |tag, body| {
                match tracker.server(tag, body) {
                    Answer::Error { farewell: last } => *farewell |= last,
                    // What follows startup is compared.
                    Answer::Ready => return std::ops::ControlFlow::Break(()),
                    _ => {}
                }
                std::ops::ControlFlow::Continue(())
            })
        };
        let Ok(complete) = scanned else {
            ShardStats::bump(&shard.stats.counters.protocol_errors, 1);
            *shared.fatal.borrow_mut() = Some(error_bytes(
                "FATAL",
                sqlstate::PROTOCOL_VIOLATION,
                &format!(
                    "pgprism: invalid message from primary {}",
                    shard.settings.primary_label
                ),
            ));
            return false;
        };
        let mut frames = pbuf.split_to(complete).freeze();
        if primary.is_tls() && !client.is_tls() {
            frames = without_channel_binding(frames);
        }
        shared.writing.set(true);
        let failed = !frames.is_empty() && client.write_bytes(frames).await.is_err();
        shared.writing.set(false);
        if failed {
            shared.client_ended.set(true);
            return false;
        }
    }
    true
}
