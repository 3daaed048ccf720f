//! The compare response pump: once a session's startup is over, reads the primary's and the
//! shadow's answer streams, lets the [`Comparer`] pair and judge them, and writes the source
//! of truth's bytes (streamed, or held until judged) to the client. It owns the shadow's
//! time limits (`compare.shadow-timeout-ms`, `compare.shadow-lag-max`, the drain after the
//! client left) and what happens when either side closes first.
//!
//! It must never write to the primary or the shadow (the upstream half and the shadow writer
//! do), and knows the session that hosts it only through [`Host`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{Comparer, PRIMARY, SHADOW, Shadow};
use crate::exec::net::Stream;
use crate::exec::{Sleep, sleep_until, within};
use crate::session::Tracker;
use crate::stats::ShardStats;
use crate::wire::{self, sqlstate};

/// What the pump needs of the client session that hosts it (the proxy's relay).
pub trait Host {
    /// Where the session stands; the pump feeds it the primary's frames. `None`: the
    /// session feeds its tracker itself as it relays them ([`Primary::Relayed`]), and keeps
    /// its own latencies.
    fn tracker(&self) -> Option<&RefCell<Tracker>>;
    /// The primary answered sync point `seq` at `arrived` (latency bookkeeping).
    fn answer_sync(&self, seq: u64, arrived: Instant);
    /// The client sends nothing more and the primary was told so.
    fn client_sent_all(&self) -> bool;
    /// The client said Terminate: it reads nothing more.
    fn client_said_terminate(&self) -> bool;
    /// The pump is (or is no longer) in the middle of a write to the client.
    fn set_writing(&self, writing: bool);
    /// The pump holds answers the client has not been given yet (waiting for the shadow):
    /// the session is not idle, whatever the primary said.
    fn set_holding(&self, holding: bool);
    /// A write to the client failed: nothing more is written to it.
    fn client_lost(&self);
    /// The session ends with this FATAL error for the client.
    fn fail(&self, code: &str, message: &str);
}

/// Bytes of answers a transaction-pooled session may have handed its pump and the pump not
/// read yet; beyond it the session waits (it reads no more of the primary meanwhile).
const RELAYED_BYTES_MAX: usize = 256 << 10;

/// The primary's answers as the pump reads them: a connection of the session's own, or the
/// answers a transaction-pooled session relays from the connections lent to it.
pub enum Primary {
    Stream(Stream),
    Relayed(Rc<Relayed>),
}

impl Primary {
    fn read_buf<'a>(
        &'a self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = io::Result<usize>> + 'a {
        futures_lite::future::poll_fn(move |cx| match self {
            Primary::Stream(stream) => {
                let read = stream.read_buf(buf, chunk);
                std::pin::pin!(read).poll(cx)
            }
            Primary::Relayed(relayed) => relayed.poll_read(cx, buf),
        })
    }

    /// Asks for kernel receive timestamps on the primary's answers (see
    /// [`Stream::stamp_receives`]). Relayed answers carry the stamps of the lent
    /// connections' receives (the transaction-pooled session asks for them when it borrows
    /// a connection and hands each with its bytes, see [`Relayed::push`]).
    fn stamp_receives(&self) -> io::Result<()> {
        match self {
            Primary::Stream(stream) => stream.stamp_receives(),
            Primary::Relayed(_) => Ok(()),
        }
    }

    /// When the last answer bytes read reached the socket (0: not known).
    fn received_at_ns(&self) -> u64 {
        match self {
            Primary::Stream(stream) => stream.received_at_ns(),
            Primary::Relayed(relayed) => relayed.read_stamp_ns.get(),
        }
    }
}

/// What a transaction-pooled session's client is to see of the primary (the lent
/// connections' answers, pgprism's own in their place among them, never its hidden
/// preparations'), handed to the session's pump in order. The session is its only writer and
/// the pump its only reader, on one shard.
///
/// Each handover carries the kernel's receive timestamp of the read it came from (the lent
/// connection's `SO_TIMESTAMPNS`, 0 for none), and the pump reads one stamp's bytes at a
/// time: the ordered dispatch numbers a pooled session's answers by when they reached
/// pgprism's socket, as a session-mode pump does, not by when the pump got to them (which
/// misplaced hot-row writes; see `order`).
#[derive(Default)]
pub struct Relayed {
    buf: RefCell<BytesMut>,
    /// The stamps of `buf`'s bytes, front first: (bytes, receive time in ns since the Unix
    /// epoch; 0: none). Handovers with the same stamp share one entry. Bounded with `buf`
    /// (each entry holds at least one complete frame).
    stamps: RefCell<VecDeque<(usize, u64)>>,
    /// The stamp of the bytes the pump read last.
    read_stamp_ns: Cell<u64>,
    /// The session sends nothing more: the pump reads the end after the last bytes.
    closed: Cell<bool>,
    /// The pump ended: what the session hands over is dropped, and it never waits.
    reader_gone: Cell<bool>,
    reader: Cell<Option<Waker>>,
    writer: Cell<Option<Waker>>,
}

impl Relayed {
    /// Hands over complete answer frames that reached pgprism's socket at `stamp_ns` (the
    /// kernel's receive timestamp; 0: not known, or not pgprism's to stamp); waits while more
    /// than [`RELAYED_BYTES_MAX`] waits for the pump (a slow client slows the session's reads
    /// of the primary, as a socket would).
    pub async fn push(&self, bytes: &[u8], stamp_ns: u64) {
        futures_lite::future::poll_fn(|cx| {
            let queued = self.buf.borrow().len();
            if self.reader_gone.get() || queued == 0 || queued + bytes.len() <= RELAYED_BYTES_MAX {
                return Poll::Ready(());
            }
            self.writer.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if self.reader_gone.get() {
            return;
        }
        if bytes.is_empty() {
            return;
        }
        self.buf.borrow_mut().extend_from_slice(bytes);
        let mut stamps = self.stamps.borrow_mut();
        match stamps.back_mut() {
            Some((len, stamp)) if *stamp == stamp_ns => *len += bytes.len(),
            _ => stamps.push_back((bytes.len(), stamp_ns)),
        }
        drop(stamps);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// The session ends: the pump reads the end once it has read everything.
    pub fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn stop_reading(&self) {
        self.reader_gone.set(true);
        self.buf.borrow_mut().clear();
        self.stamps.borrow_mut().clear();
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, out: &mut BytesMut) -> Poll<io::Result<usize>> {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            if self.closed.get() {
                return Poll::Ready(Ok(0));
            }
            self.reader.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        // One stamp's bytes at a time: each read the pump judges has one receive time.
        let (n, stamp) = match self.stamps.borrow_mut().pop_front() {
            Some((len, stamp)) => (len.min(buf.len()), stamp),
            None => (buf.len(), 0),
        };
        crate::invariant!(
            n == buf.len() || !self.stamps.borrow().is_empty(),
            "relayed bytes are all stamped"
        );
        out.extend_from_slice(&buf.split_to(n));
        self.read_stamp_ns.set(stamp);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
}

/// The settings the pump runs with.
pub struct PumpSettings {
    pub message_bytes_max: usize,
    pub read_chunk_bytes: usize,
    pub shard: usize,
}

/// What one turn of the pump woke up for.
enum Turn {
    /// A side's read: bytes, the end of its stream (`Ok(0)`) or an error.
    Read(usize, io::Result<usize>),
    /// The shadow fell behind and was given up on; nothing was read.
    ShadowGivenUp,
}

/// How long the shadow may still take, as [`Pump::shadow_limit`] says.
enum Limit {
    /// No limit: nothing waits for it, or it is the source of truth.
    None,
    /// Past it already: it is given up on without waiting.
    Reached,
    /// Until then.
    At(Instant),
}

/// After a turn: go on to settle and write, skip to the next turn, or stop at once.
enum Flow {
    Settle,
    Next,
    Stop,
}

/// One session's pump.
pub struct Pump<'a> {
    host: &'a dyn Host,
    stats: &'a ShardStats,
    settings: PumpSettings,
    primary: Primary,
    shadow: Shadow,
    client: Stream,
    comparer: Comparer,
    pbuf: BytesMut,
    sbuf: BytesMut,
    out: Vec<Bytes>,
    running: bool,
    shadow_open: bool,
    /// The client and the primary are done; the shadow still runs what it was sent.
    primary_done: bool,
    /// A write to the client failed.
    client_gone: bool,
    /// Alternates which side is polled first, so neither starves the other.
    flip: bool,
    /// The primary said FATAL or PANIC: the client got its farewell from it.
    farewell: bool,
    /// The timer of the shadow's time limit while something waits for it, with its
    /// deadline, kept from turn to turn: a timer armed and cancelled on every turn that
    /// waited for the shadow (most turns under ordered dispatch, where the shadow runs a
    /// statement after the primary answered it) cost about 4,000 instructions per pgbench
    /// `-N` transaction (callgrind: `Sleep::poll`, `Reactor::set_timer` and
    /// `cancel_timer`). The deadline only moves later as the oldest answered sync point
    /// is paired, so a timer armed for an earlier one fires early, never late: the limit
    /// is then read again (see [`Pump::next_turn`]).
    limit_timer: Option<LimitTimer>,
}

/// The timer of the shadow's time limit (see [`Pump::limit_timer`]).
struct LimitTimer {
    at: Instant,
    sleep: Sleep,
    /// The waker it was registered with: while the pump is polled with the same one, the
    /// reactor wakes the pump's task at `at`, and a poll before then reads the clock only.
    /// (Polling the timer itself on every turn looked up its registration in the
    /// reactor's timers to replace the waker: about 2,000 instructions per pgbench `-N`
    /// transaction, callgrind.)
    registered: Option<Waker>,
}

impl Future for LimitTimer {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
            && Instant::now() < self.at
        {
            return Poll::Pending;
        }
        let polled = std::pin::Pin::new(&mut self.sleep).poll(cx);
        if polled.is_pending() {
            self.registered = Some(cx.waker().clone());
        }
        polled
    }
}

impl<'a> Pump<'a> {
    /// `pbuf`: what was read from the primary after its startup's ReadyForQuery.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: &'a dyn Host,
        stats: &'a ShardStats,
        settings: PumpSettings,
        primary: Primary,
        shadow: Shadow,
        client: Stream,
        comparer: Comparer,
        pbuf: BytesMut,
    ) -> Pump<'a> {
        if comparer.target().port.is_some()
            && let Err(err) = primary.stamp_receives()
        {
            // The ordered dispatch then numbers the primary's answers as it reads them.
            tracing::debug!(error = %err, "compare ordering: no receive timestamps from the primary");
        }
        Pump {
            host,
            stats,
            settings,
            primary,
            shadow,
            client,
            comparer,
            pbuf,
            sbuf: BytesMut::new(),
            out: Vec::new(),
            running: true,
            shadow_open: true,
            primary_done: false,
            client_gone: false,
            flip: false,
            farewell: false,
            limit_timer: None,
        }
    }

    /// Runs to the session's end; returns whether the primary said its own farewell.
    pub async fn run(mut self) -> bool {
        if !self.pbuf.is_empty() {
            // Answers that came in the same read as the startup's end.
            if let Flow::Stop = self.on_bytes(PRIMARY, Instant::now()) {
                self.running = false;
            } else {
                self.flush_out().await;
            }
        }
        while self.running {
            let turn = self.next_turn().await;
            let arrived = Instant::now();
            let flow = match turn {
                // Nothing was read; `settle` below releases what waited for the shadow.
                Turn::ShadowGivenUp => Flow::Settle,
                Turn::Read(side, Ok(0) | Err(_)) => self.on_end(side),
                Turn::Read(side, Ok(_)) => self.on_bytes(side, arrived),
            };
            match flow {
                Flow::Stop => break,
                Flow::Next => continue,
                Flow::Settle => {}
            }
            self.flush_out().await;
        }
        self.comparer.stop_shadow_writes();
        self.shadow.shutdown();
        if let Primary::Relayed(relayed) = &self.primary {
            relayed.stop_reading();
        }
        self.farewell
    }

    /// Waits for the next read: both sides while the shadow is open (within its time
    /// limits), only the shadow while it drains, only the primary once it was given up.
    async fn next_turn(&mut self) -> Turn {
        let chunk = self.settings.read_chunk_bytes;
        self.flip = !self.flip;
        if self.primary_done {
            let limit = self.drain_limit();
            return match within(limit, self.shadow.read_buf(&mut self.sbuf, chunk)).await {
                Some(read) => Turn::Read(SHADOW, read),
                None if self.comparer.shadow_wait().is_some() => {
                    // Statements the primary answered are still unanswered by the shadow:
                    // given up as on a timeout while the client was there (and counted).
                    self.give_up_shadow();
                    self.running = false;
                    Turn::ShadowGivenUp
                }
                None => Turn::Read(SHADOW, Ok(0)),
            };
        }
        if !self.shadow_open {
            return Turn::Read(PRIMARY, self.primary.read_buf(&mut self.pbuf, chunk).await);
        }
        loop {
            let at = match self.shadow_limit() {
                Limit::None => None,
                Limit::Reached => break,
                // Run out while the last turn was handled: given up on without a read.
                Limit::At(at) if at <= Instant::now() => break,
                Limit::At(at) => Some(at),
            };
            if let Some(at) = at
                && self.limit_timer.as_ref().is_none_or(|t| t.at > at)
            {
                self.limit_timer = Some(LimitTimer {
                    at,
                    sleep: sleep_until(at),
                    registered: None,
                });
            }
            let read = {
                let (primary, shadow) = (&self.primary, &self.shadow);
                let (pbuf, sbuf) = (&mut self.pbuf, &mut self.sbuf);
                let mut p = std::pin::pin!(primary.read_buf(pbuf, chunk));
                let mut s = std::pin::pin!(shadow.read_buf(sbuf, chunk));
                let flip = self.flip;
                let mut timer = match at {
                    Some(_) => self.limit_timer.as_mut(),
                    None => None,
                };
                // One poll of the two reads (in turn first: neither starves the other),
                // then of the limit's timer: the futures `or` of async blocks built, three
                // deep, cost about 1,500 instructions per pgbench `-N` transaction more
                // (callgrind).
                futures_lite::future::poll_fn(|cx| {
                    for side in if flip {
                        [PRIMARY, SHADOW]
                    } else {
                        [SHADOW, PRIMARY]
                    } {
                        let polled = if side == PRIMARY {
                            p.as_mut().poll(cx)
                        } else {
                            s.as_mut().poll(cx)
                        };
                        if let Poll::Ready(read) = polled {
                            return Poll::Ready(Some((side, read)));
                        }
                    }
                    if let Some(t) = timer.as_mut()
                        && std::pin::Pin::new(&mut **t).poll(cx).is_ready()
                    {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await
            };
            match read {
                Some((side, read)) => return Turn::Read(side, read),
                // The timer is done; the limit is read again (it may have been armed for
                // an earlier deadline than the one that holds now).
                None => self.limit_timer = None,
            }
        }
        self.give_up_shadow();
        Turn::ShadowGivenUp
    }

    /// A shadow that falls behind must not hold the client (fail-on-differences) or grow the
    /// session's memory (report mode) without bound. (When the shadow is the source of
    /// truth, its time is the client's own query time: no limit.)
    fn shadow_limit(&self) -> Limit {
        let cfg = &self.comparer.target().cfg;
        let wait = match self.comparer.source {
            PRIMARY => self.comparer.shadow_wait(),
            _ => None,
        };
        match wait {
            Some((_, lag)) if lag > cfg.shadow_lag_max => Limit::Reached,
            Some((since, _)) => Limit::At(since + Duration::from_millis(cfg.shadow_timeout_ms)),
            None => Limit::None,
        }
    }

    /// How long the shadow may take for its next answer once the client and the primary are
    /// done: the same `compare.shadow-timeout-ms` as while the client was there, counted from
    /// the oldest sync point the primary answered and the shadow has not (a session's last
    /// statements can queue behind other sessions' for a pooled shadow connection and their
    /// ordered waits, as long as the client's could); with nothing left to compare, that long
    /// from now for the shadow to close. (This was a fixed 30 s, shorter than a raised
    /// `shadow-timeout-ms`: on a loaded machine a session's last statements were then given up
    /// on, unanswered and uncounted, while the bound the user set had not been reached.)
    fn drain_limit(&self) -> Duration {
        let timeout = Duration::from_millis(self.comparer.target().cfg.shadow_timeout_ms);
        match self.comparer.shadow_wait() {
            Some((since, _)) => (since + timeout).saturating_duration_since(Instant::now()),
            None => timeout,
        }
    }

    fn give_up_shadow(&mut self) {
        let cfg = &self.comparer.target().cfg;
        ShardStats::bump(&self.stats.counters.compare_shadow_timeouts, 1);
        tracing::warn!(
            shard = self.settings.shard,
            timeout_ms = cfg.shadow_timeout_ms,
            lag_max = cfg.shadow_lag_max,
            "the shadow fell behind; this session stops comparing"
        );
        self.shadow_open = false;
        self.shadow.shutdown();
        self.comparer.shadow_lost(&mut self.out);
    }

    /// The shadow ended after the client's last statement while statements the primary
    /// answered still wait for its answers: they are skipped, and the session counted as one
    /// whose shadow was lost (a clean end comes after the last answer, owing nothing).
    fn count_owed_as_lost(&self) {
        if self.comparer.shadow_wait().is_some() {
            ShardStats::bump(&self.stats.counters.compare_shadow_lost, 1);
        }
    }

    /// `side` closed (or failed). The client sent all it will: the primary and the shadow
    /// close after their last answers, in either order, and what the client receives may
    /// still wait for the other one (fail-on-differences, or the shadow's own results).
    fn on_end(&mut self, side: usize) -> Flow {
        let sent_all = self.host.client_sent_all();
        if side == PRIMARY {
            // Whatever the primary has not answered it never will: the shadow's queue does
            // not wait for those answers (the Terminate behind them goes now).
            self.comparer.primary_ended();
            if self.shadow_open && sent_all {
                self.primary_done = true;
                return Flow::Next;
            }
            if !sent_all {
                // The session ends early (the primary lost, or pgprism's own FATAL): what
                // the primary answered before still reaches the client ahead of that end,
                // released unjudged (a COMMIT that went through is not lost to the client).
                self.comparer.shadow_lost(&mut self.out);
                self.running = false;
                return Flow::Settle;
            }
            // The shadow closed first: what it never answered is released unjudged.
            self.count_owed_as_lost();
            self.comparer.shadow_lost(&mut self.out);
            self.running = false;
        } else if self.primary_done {
            // The shadow is done too (or failed, or was silent past the drain's bound with
            // nothing left to compare).
            self.count_owed_as_lost();
            self.comparer.shadow_lost(&mut self.out);
            self.running = false;
        } else if sent_all {
            // Expected: the primary's last answers are still to come.
            self.shadow_open = false;
        } else {
            self.shadow_open = false;
            if self.comparer.source == SHADOW {
                self.host.fail(
                    sqlstate::CONNECTION_FAILURE,
                    "pgprism lost the connection to the shadow (compare.source-of-truth = shadow)",
                );
                return Flow::Stop;
            }
            ShardStats::bump(&self.stats.counters.compare_shadow_lost, 1);
            self.comparer.shadow_lost(&mut self.out);
        }
        Flow::Settle
    }

    /// Bytes came from `side`: its complete frames go to the comparer (the primary's also
    /// to the session's tracker, in the same walk).
    fn on_bytes(&mut self, side: usize, arrived: Instant) -> Flow {
        let buf = if side == PRIMARY {
            &mut self.pbuf
        } else {
            &mut self.sbuf
        };
        // The complete messages ahead of a malformed one, if one comes.
        let mut valid = 0usize;
        let walked = wire::complete_prefix(buf, self.settings.message_bytes_max, |_, body| {
            valid += wire::HEADER_BYTES + body.len();
        });
        let complete = match walked {
            Ok(complete) => complete,
            Err(err) if side == PRIMARY => return self.on_bad_primary_answer(&err, valid, arrived),
            Err(err) => return self.on_bad_shadow_answer(&err, valid),
        };
        if complete == 0 {
            return Flow::Settle;
        }
        let frames = buf.split_to(complete).freeze();
        if side == SHADOW {
            self.comparer.feed(side, &frames, None, &mut self.out);
            return Flow::Settle;
        }
        self.on_primary_frames(&frames, arrived);
        Flow::Settle
    }

    /// The primary sent a message pgprism cannot read: the session ends with pgprism's own
    /// FATAL (08P01), after the answers before it. The complete messages ahead of the bad one
    /// are fed as usual, and what the comparer holds for the shadow is released unjudged
    /// ahead of the FATAL, as when a transaction-pooled session ends with pgprism's own FATAL
    /// (a COMMIT that went through on the primary is not lost to the client).
    #[cold]
    fn on_bad_primary_answer(
        &mut self,
        err: &wire::WireError,
        valid: usize,
        arrived: Instant,
    ) -> Flow {
        ShardStats::bump(&self.stats.counters.protocol_errors, 1);
        self.host.fail(
            sqlstate::PROTOCOL_VIOLATION,
            &format!("pgprism: invalid message from the primary: {err}"),
        );
        if valid > 0 {
            let frames = self.pbuf.split_to(valid).freeze();
            self.on_primary_frames(&frames, arrived);
        }
        self.comparer.primary_ended();
        self.comparer.shadow_lost(&mut self.out);
        self.running = false;
        Flow::Settle
    }

    /// The shadow sent a message pgprism cannot read (counted as a protocol error). With the
    /// shadow as the source of truth the client's answers are lost: the session ends with
    /// pgprism's own FATAL (08P01). Otherwise the client's session on the primary goes on, as
    /// when the shadow's connection ends early: the complete messages ahead of the bad one
    /// are still compared, the shadow's connection is closed (counted as a lost shadow), and
    /// what waited for it is released unjudged.
    #[cold]
    fn on_bad_shadow_answer(&mut self, err: &wire::WireError, valid: usize) -> Flow {
        ShardStats::bump(&self.stats.counters.protocol_errors, 1);
        if self.comparer.source == SHADOW {
            self.host.fail(
                sqlstate::PROTOCOL_VIOLATION,
                &format!("pgprism: invalid message from the shadow: {err}"),
            );
            return Flow::Stop;
        }
        tracing::warn!(
            shard = self.settings.shard,
            error = %err,
            "invalid message from the shadow; this session stops comparing"
        );
        if valid > 0 {
            let frames = self.sbuf.split_to(valid).freeze();
            self.comparer.feed(SHADOW, &frames, None, &mut self.out);
            // Judged now: what the shadow answered whole is compared before it is lost.
            self.comparer.settle(self.stats, &mut self.out);
        }
        self.sbuf.clear();
        ShardStats::bump(&self.stats.counters.compare_shadow_lost, 1);
        self.shadow_open = false;
        self.shadow.shutdown();
        self.comparer.shadow_lost(&mut self.out);
        if self.primary_done {
            self.running = false;
        }
        Flow::Settle
    }

    /// Complete frames of the primary's answers: to the comparer, and to the session's
    /// tracker in the same walk.
    fn on_primary_frames(&mut self, frames: &Bytes, arrived: Instant) {
        self.comparer
            .set_primary_received(self.primary.received_at_ns());
        let Some(tracker) = self.host.tracker() else {
            // The session fed its tracker as it relayed these frames.
            self.comparer.feed(PRIMARY, frames, None, &mut self.out);
            return;
        };
        let mut tracker = tracker.borrow_mut();
        let first_answer = tracker.sync_points().1;
        let fed = self
            .comparer
            .feed(PRIMARY, frames, Some(&mut tracker), &mut self.out);
        self.farewell |= tracker.farewell();
        drop(tracker);
        ShardStats::bump(&self.stats.counters.primary_errors, fed.errors);
        for seq in first_answer..first_answer + fed.syncs {
            self.host.answer_sync(seq, arrived);
        }
    }

    /// Settles what both sides answered and writes what the client may have now.
    async fn flush_out(&mut self) {
        self.comparer.settle(self.stats, &mut self.out);
        self.host.set_holding(self.comparer.owes_client());
        // A client that half-closed, or sent a malformed frame, still reads its answers; one
        // that said Terminate or cannot be written to does not.
        if self.host.client_said_terminate() || self.client_gone {
            self.out.clear();
        }
        for bytes in self.out.drain(..) {
            self.host.set_writing(true);
            let len = bytes.len() as u64;
            let written = self.client.write_bytes(bytes).await;
            self.host.set_writing(false);
            if written.is_err() {
                self.host.client_lost();
                self.client_gone = true;
                // While the shadow drains, the comparing goes on without the client.
                self.running = self.primary_done;
                break;
            }
            ShardStats::bump(&self.stats.counters.client_bytes_out, len);
        }
        // What was not written is dropped with the client.
        self.out.clear();
    }
}
