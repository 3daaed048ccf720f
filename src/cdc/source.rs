//! The replication source: one `START_REPLICATION` stream, read on the CDC thread. It feeds
//! XLogData payloads to the pipeline, hands the produced work to the loader over the bounded
//! ring (waiting when it is full: that is the backpressure, and keepalives are still answered
//! while waiting), and sends standby status updates that confirm only what the loader has
//! checkpointed, or, when nothing at all is pending, the server's own position so an idle
//! publication does not hold WAL back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{SendTimeoutError, Sender};

use super::lsn::Lsn;
use super::pgconn::{PgConn, PgError, quote_ident, quote_literal};
use super::pipeline::{Pipeline, Work};
use super::{CdcError, Shared};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// How long one read waits before the loop runs its timers.
const TICK: Duration = Duration::from_millis(50);
/// Bytes a read waits for (at most [`TICK`]) so a fast stream is read in large pieces.
const RECEIVE_LOW_WATER_BYTES: usize = 64 << 10;
/// Bound on the messages handled between two turns of the timers.
const MESSAGES_PER_TURN: usize = 4096;
/// Bound on the work produced in one turn before it goes to the ring.
const WORKS_PER_TURN: usize = 4;

pub struct SourceConfig {
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
}

/// Starts the stream. `messages 'true'` brings the logical messages, among them the initial
/// snapshot's watermarks.
pub fn start(conn: &mut PgConn, cfg: &SourceConfig, from: Lsn) -> Result<(), CdcError> {
    let sql = format!(
        "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '2', publication_names {}, streaming 'on', messages 'true')",
        quote_ident(&cfg.slot),
        quote_literal(&quote_ident(&cfg.publication))
    );
    conn.start_copy_both(&sql).map_err(|e| match &e {
        // The slot's WAL was removed while we were away: say what to do, not just why.
        PgError::Server(s)
            if s.code == "55000" && s.message.contains("can no longer get changes") =>
        {
            CdcError::Setup(super::setup::SetupError::SlotLost {
                slot: cfg.slot.clone(),
            })
        }
        _ => CdcError::Replication(e),
    })?;
    conn.set_read_timeout(TICK).map_err(CdcError::Replication)?;
    conn.set_receive_low_water(RECEIVE_LOW_WATER_BYTES)
        .map_err(CdcError::Replication)?;
    Ok(())
}

/// Runs until the loader stops (its error is the result) or the connection fails.
pub fn run(
    conn: &mut PgConn,
    cfg: &SourceConfig,
    pipeline: &mut Pipeline,
    ring: &Sender<Work>,
    shared: &Arc<Shared>,
) -> Result<(), CdcError> {
    let mut state = State {
        works_sent: 0,
        idle_candidate: None,
        last_status: Instant::now() - cfg.status_interval,
        last_reported: Lsn::ZERO,
        clock_refreshed: Instant::now() - Duration::from_secs(5),
    };
    let mut out = Vec::new();
    loop {
        if shared.stopped.load(Ordering::Acquire) || shared.shutdown.load(Ordering::Acquire) {
            return Ok(());
        }
        let reply_now = state.read_turn(conn, pipeline, &mut out, shared)?;
        state.tick(pipeline, &mut out, shared);
        if !state.hand_over(conn, cfg, ring, &mut out, shared)? {
            return Ok(());
        }
        state.maybe_report(conn, cfg, shared, reply_now)?;
    }
}

struct State {
    works_sent: u64,
    idle_candidate: Option<(Lsn, u64)>,
    last_status: Instant,
    last_reported: Lsn,
    clock_refreshed: Instant,
}

impl State {
    /// Reads up to a bounded number of messages, so timers and the ring still run while the
    /// server streams without pause. Returns whether the server asked for a reply now.
    fn read_turn(
        &mut self,
        conn: &mut PgConn,
        pipeline: &mut Pipeline,
        out: &mut Vec<Work>,
        shared: &Shared,
    ) -> Result<bool, CdcError> {
        let mut reply_now = false;
        for _ in 0..MESSAGES_PER_TURN {
            if pipeline.is_replaying() {
                // A committed streamed transaction first, its work handed over as it comes.
                pipeline.pump(out).map_err(CdcError::Pipeline)?;
                if out.len() >= WORKS_PER_TURN || pipeline.is_replaying() {
                    break;
                }
                continue;
            }
            let Some(data) = conn.read_copy_data().map_err(CdcError::Replication)? else {
                break;
            };
            match data.first() {
                Some(b'w') if data.len() >= 25 => {
                    let wal_end = Lsn(u64::from_be_bytes(
                        data[9..17].try_into().unwrap_or_default(),
                    ));
                    shared.server_lsn.fetch_max(wal_end.0, Ordering::Relaxed);
                    let payload = data.slice(25..);
                    pipeline.handle(&payload, out).map_err(CdcError::Pipeline)?;
                }
                Some(b'k') if data.len() >= 18 => {
                    let wal_end = Lsn(u64::from_be_bytes(
                        data[1..9].try_into().unwrap_or_default(),
                    ));
                    shared.server_lsn.fetch_max(wal_end.0, Ordering::Relaxed);
                    reply_now |= data[17] == 1;
                    if pipeline.is_idle() && out.is_empty() {
                        // Everything before this keepalive has been handed over: once the
                        // loader has done all of it, this position can be confirmed.
                        self.idle_candidate = Some((wal_end, self.works_sent));
                    }
                    break;
                }
                _ => return Err(CdcError::BadStream("unknown replication message")),
            }
            if out.len() >= WORKS_PER_TURN {
                break;
            }
        }
        Ok(reply_now)
    }

    /// The timers of one turn: the audit clock, the idle flush, and the stats.
    fn tick(&mut self, pipeline: &mut Pipeline, out: &mut Vec<Work>, shared: &Shared) {
        if self.clock_refreshed.elapsed() >= Duration::from_secs(1) {
            pipeline.set_synced_at(now_text());
            self.clock_refreshed = Instant::now();
        }
        pipeline.idle_flush(out);
        shared
            .rows_decoded
            .store(pipeline.rows_in(), Ordering::Relaxed);
        shared.store_fill_stats(pipeline.fill_stats());
        shared
            .non_utf8_replaced
            .fetch_add(pipeline.take_non_utf8_replaced(), Ordering::Relaxed);
        if let Ok(mut s) = shared.streams.lock() {
            *s = pipeline.stream_stats();
        }
        let caught_up = pipeline.is_idle()
            && out.is_empty()
            && shared.works_done.load(Ordering::Acquire) >= self.works_sent;
        shared.caught_up.store(caught_up, Ordering::Relaxed);
    }

    /// Sends `out` over the ring, answering the server while the ring is full. Returns false
    /// when the loader has stopped (the run ends).
    fn hand_over(
        &mut self,
        conn: &mut PgConn,
        cfg: &SourceConfig,
        ring: &Sender<Work>,
        out: &mut Vec<Work>,
        shared: &Shared,
    ) -> Result<bool, CdcError> {
        // A confirmed idle position precedes every work sent after it, so later work never
        // invalidates it.
        for work in out.drain(..) {
            self.works_sent += 1;
            let mut work = work;
            loop {
                match ring.send_timeout(work, TICK) {
                    Ok(()) => break,
                    Err(SendTimeoutError::Timeout(w)) => {
                        // The loader is behind: keep the server from timing us out meanwhile.
                        work = w;
                        self.maybe_report(conn, cfg, shared, false)?;
                        if shared.stopped.load(Ordering::Acquire) {
                            return Ok(false);
                        }
                    }
                    Err(SendTimeoutError::Disconnected(_)) => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    fn confirmed(&self, shared: &Shared) -> Lsn {
        let mut lsn = Lsn(shared.checkpointed.load(Ordering::Acquire));
        if let Some((candidate, needed)) = self.idle_candidate
            && shared.works_done.load(Ordering::Acquire) >= needed
        {
            lsn = lsn.max(candidate);
        }
        lsn
    }

    fn maybe_report(
        &mut self,
        conn: &mut PgConn,
        cfg: &SourceConfig,
        shared: &Shared,
        force: bool,
    ) -> Result<(), CdcError> {
        let confirmed = self.confirmed(shared);
        let due = self.last_status.elapsed() >= cfg.status_interval;
        if !(force || due) {
            return Ok(());
        }
        // Never move backwards: the server ignores it, and it would confuse the stats.
        let confirmed = confirmed.max(self.last_reported);
        let received = Lsn(shared.server_lsn.load(Ordering::Relaxed)).max(confirmed);
        let mut msg = Vec::with_capacity(34);
        msg.push(b'r');
        msg.extend_from_slice(&received.0.to_be_bytes());
        msg.extend_from_slice(&confirmed.0.to_be_bytes());
        msg.extend_from_slice(&confirmed.0.to_be_bytes());
        msg.extend_from_slice(&pg_now_us().to_be_bytes());
        msg.push(0);
        conn.send_copy_data(&msg).map_err(CdcError::Replication)?;
        shared.confirmed.store(confirmed.0, Ordering::Release);
        self.last_reported = confirmed;
        self.last_status = Instant::now();
        Ok(())
    }
}

fn pg_now_us() -> i64 {
    let unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix_us - PG_EPOCH_OFFSET_US
}

/// UTC `YYYY-MM-DD HH:MM:SS`, the DATETIME text StarRocks accepts.
pub fn now_text() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
