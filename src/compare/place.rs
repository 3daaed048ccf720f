//! Placing a read by its own result. A read that overlapped writes of its rows on the
//! primary took its snapshot somewhere among them, and no clock outside the primary says
//! where (a backend descheduled between its snapshot, or commit, and its answer): numbered
//! by the answers' receive stamps, about 1% of such reads at 64 clients run on the shadow on
//! the wrong side of a write, and their difference is inconclusive. The primary's result
//! says where the read stood. So a read whose shadow answer differs, and that overlapped such
//! writes, stays pending in the order ledger (the writes of its rows numbered after it wait
//! for it), and is read again on the shadow just after the next overlapping write completed
//! there ([`Ledger::place_after`]), then after the next, at most `compare.place-reads-max`
//! times: the first answer equal to the primary's places it (a match, `compare_placed`);
//! none leaves it inconclusive (concurrent), as before.
//!
//! It never writes and never runs anything a read would not: only a plain `SELECT` with no
//! parameters, autocommit on the primary, that calls only built-ins without side effects (the
//! order re-check's list), read over a connection of its own to the shadow that is read-only
//! by default, each re-read inside a `BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY` of its
//! own rolled back at once (no transaction, so no lock, is held while it waits for its
//! place), with a `statement_timeout`, on a database without functions of its own that
//! reading may run (the re-check's guard, run again in each), the statement alone through
//! the extended protocol. It accepts only a state the shadow really
//! passed through in the primary's completion order: each re-read runs where the ledger put
//! it, after every conflicting sync point numbered before its place and before every one
//! after. It only moves a read later: a state the shadow already left cannot be read again.
//! Every wait is bounded (`compare.connect-timeout-ms`, `compare.order-wait-ms` per place,
//! `compare.shadow-timeout-ms` per re-read), and it shares the re-checks' bounds on how many
//! run at once.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::digest::{Digest, Digester, Step};
use super::order::{Pinned, Port, Unpinned};
use super::recheck::{guard_clean, guarded_params, preamble_as};
use super::verdict::{self, Kind};
use super::{CompareTarget, Record, open_as};
use crate::exec::net::Stream;
use crate::exec::within;
use crate::wire::{self, tag};

/// How each re-read's transaction starts: read-only, and read committed whatever the
/// session's `default_transaction_isolation` (the client's, or the shadow role's, database's
/// or server's): under repeatable read its snapshot would be taken at the guard.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY";

/// What a placement needs of the read it places.
pub(crate) struct Read {
    /// Its number in the ledger, kept pending ([`super::order::Ledger::keep`]).
    pub c: u64,
    pub text: Rc<str>,
    pub ordered: bool,
    /// The primary's answer.
    pub primary: Digest,
    /// Why it was unpinned.
    pub why: Unpinned,
}

/// Places `read`; reports it (inconclusive) in `record` when no place reproduces the
/// primary's answer. The caller took a re-check slot for it (released here).
pub(crate) async fn run(
    target: Rc<CompareTarget>,
    port: Rc<Port>,
    params: Rc<Vec<(String, String)>>,
    read: Read,
    mut record: Record,
) {
    let (placed, c) = place(&target, &port, &params, &read).await;
    let placed = placed && !port.ledger.spoiled(c);
    // A wait that ran out, or a lock break, sent a later conflicting sync point (its own
    // session's next write, say) ahead of a re-read: then what it read is not sure.
    let pinned = port.ledger.done(c, port.shard());
    port.drain();
    let placed = placed
        && match pinned {
            Pinned::InOrder => true,
            Pinned::Overtaken(u) => matches!(u, Unpinned::Overlapped | Unpinned::InFlight),
        };
    // Filed under the reason the ledger gives at its release: while it was kept, a wait
    // that ran out or a lock break may have overtaken it, or a primary-only write come.
    let why = match pinned {
        Pinned::InOrder => read.why,
        Pinned::Overtaken(u) => u,
    };
    let stats = &target.stats;
    stats.rechecks_running.set(stats.rechecks_running.get() - 1);
    target
        .rechecks
        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    if placed {
        stats.placed.set(stats.placed.get() + 1);
        return;
    }
    let cell = match why {
        Unpinned::InFlight => &stats.unplaced[1],
        _ => &stats.unplaced[0],
    };
    cell.set(cell.get() + 1);
    record.record = verdict::Verdict::Concurrent.record();
    record.verdict = verdict::Verdict::Concurrent.name();
    record.reason = why.name();
    record.failed_client = false;
    if !target.send(record) {
        stats.reports_dropped.set(stats.reports_dropped.get() + 1);
    }
}

/// Reads `read` again after each later overlapping write until its answer equals the
/// primary's: whether it did, and the ledger number it is pending under at the end.
async fn place(
    target: &CompareTarget,
    port: &Rc<Port>,
    params: &[(String, String)],
    read: &Read,
) -> (bool, u64) {
    let cfg = &target.cfg;
    let mut c = read.c;
    let budget_ms = cfg.shadow_timeout_ms.max(1);
    let limit = Duration::from_millis(cfg.connect_timeout_ms);
    let max = cfg.buffer_bytes_max.max(1 << 20);
    let params = guarded_params(params, budget_ms);
    // Moved to its first place before connecting: the write it now follows goes to the
    // shadow meanwhile instead of waiting for the connection.
    let Some(first) = port.ledger.place_after(c, port.shard()) else {
        return (false, c);
    };
    c = first;
    port.drain();
    let Ok(conn) = open_as(
        &target.addr.get(),
        &target.url,
        &target.tls,
        &params,
        limit,
        max,
    )
    .await
    else {
        return (false, c);
    };
    let stream = conn.stream;
    let mut reader = Reader {
        stream: &stream,
        buf: BytesMut::new(),
        max,
        budget: Duration::from_millis(budget_ms),
    };
    let mut placed = false;
    if reader.guard(budget_ms, false).await {
        let wait = Duration::from_millis(cfg.order_wait_ms.max(1));
        let stats = &target.stats;
        for i in 0..cfg.place_reads_max {
            if i > 0 {
                let Some(next) = port.ledger.place_after(c, port.shard()) else {
                    break;
                };
                c = next;
                port.drain();
            }
            if within(wait, port.wait(c)).await.is_none() {
                port.give_up(c);
                break;
            }
            // A transaction of its own per re-read, ended with it: none is open while it
            // waits (a lock its read took would hold the table's DDL, and every later
            // statement of it, behind the wait), and each reads a snapshot of its own
            // (read committed, whatever the session's default isolation).
            if !reader.guard(budget_ms, true).await {
                break;
            }
            stats.place_rereads.set(stats.place_rereads.get() + 1);
            let Some(again) = reader.read_again(&target.rules, &read.text).await else {
                break;
            };
            let differences = verdict::compare(&read.primary, &again, read.ordered, &target.rules);
            if differences.iter().all(|d| d.kind == Kind::Slow) {
                placed = true;
                break;
            }
        }
    }
    // (Closing the session rolls back a transaction a failed re-read left open.)
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    stream.shutdown();
    (placed, c)
}

/// The placement's own connection to the shadow.
struct Reader<'s> {
    stream: &'s Stream,
    buf: BytesMut,
    max: usize,
    budget: Duration,
}

impl Reader<'_> {
    /// Checks the database has no functions of its own that reading may run, in a
    /// read-only read-committed transaction left open when `open` (for a re-read, which
    /// ends it) or else rolled back: whether it may read.
    async fn guard(&mut self, timeout_ms: u64, open: bool) -> bool {
        let mut out = BytesMut::new();
        let mut text = preamble_as(BEGIN, timeout_ms);
        if !open {
            text.push_str("; ROLLBACK");
        }
        let want = if open { b'T' } else { b'I' };
        if wire::encode::query(&mut out, &text).is_err()
            || self.stream.write_all(&out).await.is_err()
        {
            return false;
        }
        let mut clean = None;
        let deadline = Instant::now() + self.budget;
        loop {
            let Some((t, body)) = self.next(deadline).await else {
                return false;
            };
            match t {
                tag::DATA_ROW => clean = guard_clean(&body),
                tag::ERROR_RESPONSE => clean = Some(false),
                tag::READY_FOR_QUERY => return clean == Some(true) && body.first() == Some(&want),
                _ => {}
            }
        }
    }

    /// Reads `text` once more (alone, through the extended protocol, text results) in the
    /// transaction [`guard`](Self::guard) opened, and ends it: its digest, or None when it
    /// failed.
    async fn read_again(&mut self, rules: &Rc<super::rules::Rules>, text: &str) -> Option<Digest> {
        let mut out = BytesMut::new();
        wire::encode::parse(&mut out, "", text, &[]).ok()?;
        wire::encode::bind(&mut out, "", "", &[], &[], &[]).ok()?;
        wire::encode::describe(&mut out, wire::ObjectKind::Portal, "").ok()?;
        wire::encode::execute(&mut out, "", 0).ok()?;
        wire::encode::sync(&mut out);
        wire::encode::query(&mut out, "ROLLBACK").ok()?;
        self.stream.write_all(&out).await.ok()?;
        let mut digester = Digester::new(rules.clone());
        let deadline = Instant::now() + self.budget;
        loop {
            let (t, body) = self.next(deadline).await?;
            if let Step::SyncEnd(status) = digester.visit(t, &body) {
                let mut digest = digester.finish_sync(status, Instant::now());
                // An error (a timeout) failed it: no more re-reads.
                if status != b'T' || digest.results.len() != 1 {
                    return None;
                }
                // The ROLLBACK's answer: the transaction is over.
                loop {
                    let (t, body) = self.next(deadline).await?;
                    if t == tag::READY_FOR_QUERY {
                        return (body.first() == Some(&b'I'))
                            .then(|| digest.results.pop())
                            .flatten();
                    }
                }
            }
        }
    }

    /// The next message, by `deadline`.
    async fn next(&mut self, deadline: Instant) -> Option<(u8, bytes::Bytes)> {
        loop {
            match wire::split_message(&mut self.buf, self.max) {
                Ok(Some(frame)) => {
                    let t = frame.tag();
                    return Some((t, bytes::Bytes::copy_from_slice(frame.body())));
                }
                Ok(None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match within(left, self.stream.read_buf(&mut self.buf, 64 << 10)).await {
                        Some(Ok(n)) if n > 0 => {}
                        _ => return None,
                    }
                }
                Err(_) => return None,
            }
        }
    }
}
