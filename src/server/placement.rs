//! Which shard serves a new client (`proxy.client-placement`). It owns the shards' published
//! busy figures and one bounded hand-over queue per shard; it never touches a session (a
//! client lives on the shard that adopts its connection, start to end).
//!
//! `kernel` (the default) needs none of this: every shard serves what its listener accepts,
//! spread by the kernel's SO_REUSEPORT hash. `pack` is opt-in, for a small machine shared with
//! the database. Why it exists: with the kernel's spread every shard gets an even share of
//! the clients, so with light or moderate traffic every shard is half idle, sleeps after
//! nearly every event and is woken for the next one. Measured on the 2-core build machine
//! (issue 14, `benches/cost-split-pgbench.sh`, 64 pgbench clients, transaction pooling): one
//! shard made 0.09 system calls and 0.07 context switches per transaction, two shards
//! 0.71-1.04 and 0.43-0.66, and cost 1.4-1.7x the CPU per transaction. Packing the clients on
//! the first shard that is not busy keeps that shard busy enough to reap many completions per
//! wake-up, and a shard without clients sleeps; once the first shard's thread uses more than
//! `proxy.pack-busy-pct` of its core, new clients go to the next shard.
//!
//! The caveat: the busy figure is measured (and smoothed over about a second), so clients
//! that connect before their load starts (a pool opened at boot, `pgbench -c 2000`
//! connecting before it runs) look like no load. A burst is spread by counting each placement
//! into the chosen shard's figure until the measurement catches up (`proxy.pack-client-permille`), but
//! clients that trickle in while idle all land on the first shard. In transaction mode they
//! move when their load arrives: each shard looks at the figures ten times a second
//! ([`rebalance`]) and asks idle pooled clients (between transactions) to move, spreading
//! from a shard above `pack-busy-pct`, packing onto an earlier shard when load is light; a
//! client's session goes through the target's hand-over queue with its socket ([`Handed`]'s
//! `moved`). In session mode a client holds its server connection, which lives on its shard,
//! and never moves.
//!
//! Any shard may accept a connection (the kernel picks the listener); when the connection
//! belongs to another shard, its bare descriptor goes through that shard's bounded queue and
//! one eventfd write wakes it. That is one hop per connection, never per statement. A shard
//! that stops is closed to placement first; what was queued for it before is served by its
//! drain or refused with 57P01, never left waiting.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::{ClientPlacement, Config};
use crate::exec::{self, Notifier};

/// How often a shard measures the share of its core its thread used.
pub(super) const BUSY_TICK: Duration = Duration::from_millis(100);

// What a new client counts for in its shard's busy figure (`proxy.pack-client-permille`,
// thousandths of a core) until the measurement can see it, fading by an eighth per
// [`BUSY_TICK`] as the measured figure moves an eighth of the way (both about 0.8 s). The
// default, 25: on the 2-core build machine a pgbench client at full speed used about 2% of a
// core of proxy CPU (16 clients, 14,000 TPS, 25 us per transaction, PostgreSQL on the same
// cores; with the database elsewhere a client runs several times faster). At 25 thousandths,
// about 32 clients placed at once take an idle shard to the default `pack-busy-pct` of 80: the
// 16-client load that packing served at 0.74x the CPU still packs, a burst of a few hundred or
// thousand connections (a pool opened at boot, `pgbench -c 2000`) spreads over every shard,
// the least busy first, and clients arriving slower than about 40 a second still pack.

/// Ticks a shard waits after asking clients to move before it looks again: the smoothed
/// busy figures move an eighth of the way per tick, so about this long passes before they
/// show what moved (and the placements counted for them fade).
pub(super) const REBALANCE_REST_TICKS: u32 = 8;

/// A connection accepted on one shard for another.
pub(super) struct Handed {
    pub fd: OwnedFd,
    pub unix: bool,
    /// When it was accepted: the startup timeout counts from here, not from adoption.
    pub accepted: Instant,
    /// The client counted on the shard it is placed on from the placement on, so that a
    /// burst sees the shards' `sessions-per-shard-max` before any of it is adopted.
    pub counted: Option<Counted>,
    /// A pooled client moving between shards, between transactions: its session.
    pub moved: Option<Box<crate::proxy::MovedClient>>,
}

/// Where a connection a shard accepted goes.
pub(super) enum Route {
    /// The accepting shard was chosen: it serves the connection.
    Here(Handed),
    /// Queued for another shard, which serves it.
    HandedOver,
    /// The chosen shard's queue was full or it closed: the accepting shard serves it.
    Overflow(Handed),
}

/// One shard's side: what the others read to place clients, and its hand-over queue.
struct Slot {
    /// The share of its core the shard's thread used, in thousandths, smoothed.
    busy_permille: AtomicU32,
    /// The clients placed on the shard lately, as thousandths of a core (`proxy.pack-client-permille`
    /// each, fading every tick).
    placed_permille: AtomicU32,
    /// Client connections placed on the shard (queued, accepted or adopted, until they end).
    clients: AtomicUsize,
    /// Set when the shard stops serving: no client is placed on it from then on.
    closed: AtomicBool,
    inbox: Sender<Handed>,
    outbox: Receiver<Handed>,
    wake: Notifier,
}

/// The process's placement of clients on shards, shared by every shard.
pub(super) struct Placement {
    busy_permille_max: u32,
    /// `proxy.pack-client-permille`: what a placement counts for until it is measured.
    placed_permille: u32,
    clients_max: usize,
    /// `proxy.rebalance-clients-max`: idle pooled clients a shard asks to move per look.
    rebalance_clients_max: usize,
    slots: Box<[Slot]>,
    /// Tests only: `PGPRISM_TEST_SHARD_BUSY_FILE`, read once at start (see [`BUSY_FILE_ENV`]).
    busy_file: Option<PathBuf>,
}

/// Tests only: a file of per-shard busy figures (`0=95,1=0`: percent of a core per shard)
/// that placement and rebalancing read at each look instead of the measured figures, so
/// that a test of clients moving does not depend on how loaded the machine running it is.
/// A shard the file does not name, or a file that is missing or does not parse, reads as
/// measured. Unset in production, where it costs one environment look at start.
pub(super) const BUSY_FILE_ENV: &str = "PGPRISM_TEST_SHARD_BUSY_FILE";

impl Placement {
    /// `None` when every shard keeps what it accepts: `client-placement = "kernel"`, or one
    /// shard.
    pub(super) fn new(cfg: &Config, shards: usize) -> io::Result<Option<Arc<Placement>>> {
        if shards < 2 || cfg.proxy.client_placement == ClientPlacement::Kernel {
            return Ok(None);
        }
        let slots = (0..shards)
            .map(|_| {
                let (inbox, outbox) = crossbeam_channel::bounded(cfg.proxy.handover_queue_max);
                Ok(Slot {
                    busy_permille: AtomicU32::new(0),
                    placed_permille: AtomicU32::new(0),
                    clients: AtomicUsize::new(0),
                    closed: AtomicBool::new(false),
                    inbox,
                    outbox,
                    wake: Notifier::new()?,
                })
            })
            .collect::<io::Result<Box<[Slot]>>>()?;
        Ok(Some(Arc::new(Placement {
            busy_permille_max: cfg.proxy.pack_busy_pct.min(100) * 10,
            placed_permille: cfg.proxy.pack_client_permille.min(1000),
            clients_max: cfg.proxy.sessions_per_shard_max,
            rebalance_clients_max: cfg.proxy.rebalance_clients_max,
            slots,
            busy_file: std::env::var_os(BUSY_FILE_ENV).map(PathBuf::from),
        })))
    }

    pub(super) fn rebalance_clients_max(&self) -> usize {
        self.rebalance_clients_max
    }

    /// Every shard's busy figure, in thousandths of a core: measured (or the test file's,
    /// see [`BUSY_FILE_ENV`]), plus the placements counted lately when `placed`.
    fn figures(&self, placed: bool) -> Vec<u32> {
        let forced = self.forced();
        (0..self.slots.len())
            .map(|i| self.figure(forced.as_deref(), i, placed))
            .collect()
    }

    /// Shard `me`'s busy figure, as [`figures`](Self::figures) (0 for no such shard).
    fn figure_of(&self, me: usize, placed: bool) -> u32 {
        self.figure(self.forced().as_deref(), me, placed)
    }

    /// The test file's figures, when [`BUSY_FILE_ENV`] is set and the file reads.
    fn forced(&self) -> Option<Vec<(usize, u32)>> {
        self.busy_file.as_deref().and_then(read_busy_file)
    }

    fn figure(&self, forced: Option<&[(usize, u32)]>, i: usize, placed: bool) -> u32 {
        let Some(slot) = self.slots.get(i) else {
            return 0;
        };
        let busy = forced
            .and_then(|f| f.iter().find(|(shard, _)| *shard == i))
            .map_or_else(|| slot.busy_permille.load(Ordering::Relaxed), |f| f.1);
        if placed {
            busy.saturating_add(slot.placed_permille.load(Ordering::Relaxed))
        } else {
            busy
        }
    }

    /// Per shard, whether it takes no more clients (closed, or at its client bound).
    fn full(&self) -> Vec<bool> {
        self.slots
            .iter()
            .map(|s| {
                s.closed.load(Ordering::SeqCst)
                    || s.clients.load(Ordering::Relaxed) >= self.clients_max
            })
            .collect()
    }

    /// The shard that serves a client `here` just accepted.
    fn choose(&self, here: usize) -> usize {
        let (busy, full) = (self.figures(true), self.full());
        choose(&busy, &full, self.busy_permille_max, here)
    }

    /// Places a connection shard `here` accepted: counts it on the chosen shard (its client
    /// count and its busy figure) and queues it there, or gives it back to serve `here`.
    pub(super) fn route(
        self: &Arc<Self>,
        here: usize,
        fd: OwnedFd,
        unix: bool,
        accepted: Instant,
    ) -> Route {
        let to = self.choose(here);
        if let Some(slot) = self.slots.get(to) {
            slot.placed_permille
                .fetch_add(self.placed_permille, Ordering::Relaxed);
        }
        let handed = Handed {
            fd,
            unix,
            accepted,
            counted: Some(self.count(to)),
            moved: None,
        };
        if to == here {
            return Route::Here(handed);
        }
        match self.hand_over(to, handed) {
            Ok(()) => Route::HandedOver,
            Err(mut back) => {
                // Served here after all: counted here (the other shard's count is undone).
                back.counted = Some(self.count(here));
                Route::Overflow(back)
            }
        }
    }

    /// Hands pooled client `moved` (its socket `fd`) to shard `to`, counted there as a
    /// placement; gives it back when that shard's queue is full or it stopped. A fresh
    /// connection the race with a stopping shard gives back instead is `Err` with no session
    /// (see [`hand_over`](Self::hand_over)): the caller serves it.
    pub(super) fn move_client(
        self: &Arc<Self>,
        to: usize,
        fd: OwnedFd,
        moved: Box<crate::proxy::MovedClient>,
    ) -> Result<(), Handed> {
        // Its load was counted on `to` when it was asked to move (`expect_moves`).
        let handed = Handed {
            fd,
            unix: moved.is_unix(),
            accepted: Instant::now(),
            counted: Some(self.count(to)),
            moved: Some(moved),
        };
        self.hand_over(to, handed)
    }

    /// How many of its idle pooled clients shard `me` asks to move (of at most `max`):
    /// spreading, at most half its clients, so the load it sheds cannot take the
    /// other shard over the line in its turn.
    pub(super) fn clients_to_move(&self, me: usize, max: usize) -> usize {
        let Some(slot) = self.slots.get(me) else {
            return 0;
        };
        let busy = self.figure_of(me, true);
        if busy > self.busy_permille_max {
            max.min((slot.clients.load(Ordering::Relaxed) / 2).max(1))
        } else {
            max
        }
    }

    /// Counts the load of `asked` clients shard `me` asked to move on shard `to` (their
    /// share of `me`'s busy figure) until the measurement sees them there, as a placement
    /// counts: so that no shard takes more than its room meanwhile, and a client that moved
    /// to make a shard busier is not sent back.
    pub(super) fn expect_moves(&self, me: usize, to: usize, asked: usize) {
        let (Some(from), Some(slot)) = (self.slots.get(me), self.slots.get(to)) else {
            return;
        };
        let busy = self.figure_of(me, false) as usize;
        let clients = from.clients.load(Ordering::Relaxed).max(1);
        let share = (busy * asked.min(clients) / clients) as u32;
        slot.placed_permille.fetch_add(share, Ordering::Relaxed);
    }

    /// Where shard `me` should move some of its idle pooled clients now, if anywhere (see
    /// [`rebalance`]).
    pub(super) fn rebalance_to(&self, me: usize) -> Option<usize> {
        let (busy, full) = (self.figures(true), self.full());
        rebalance(&busy, &full, me, self.busy_permille_max)
    }

    /// Queues `handed` for shard `to` and wakes it; gives the connection back when the queue
    /// is full or the shard closed (the caller serves it itself).
    fn hand_over(&self, to: usize, handed: Handed) -> Result<(), Handed> {
        let Some(slot) = self.slots.get(to) else {
            return Err(handed);
        };
        if slot.closed.load(Ordering::SeqCst) {
            return Err(handed);
        }
        match slot.inbox.try_send(handed) {
            Ok(()) => {
                // The shard may have closed, and taken its queue for the last time, between
                // the check above and the send: then take one connection back (any one: they
                // are alike) so that nothing waits in a queue nobody reads. Closing is
                // ordered before the shard's last take, so one of the two sees the other.
                if slot.closed.load(Ordering::SeqCst)
                    && let Ok(back) = slot.outbox.try_recv()
                {
                    return Err(back);
                }
                slot.wake.notify();
                Ok(())
            }
            Err(TrySendError::Full(h) | TrySendError::Disconnected(h)) => Err(h),
        }
    }

    /// Connections handed to shard `me` since it last looked.
    pub(super) fn take(&self, me: usize) -> Vec<Handed> {
        self.slots
            .get(me)
            .map(|s| s.outbox.try_iter().collect())
            .unwrap_or_default()
    }

    /// Closes shard `me` to placement (it stops serving): no client is chosen for it or
    /// queued to it from now on. What was queued before is still there for [`take`](Self::take).
    pub(super) fn close(&self, me: usize) {
        if let Some(slot) = self.slots.get(me) {
            slot.closed.store(true, Ordering::SeqCst);
        }
    }

    /// Completes when a connection may have been handed to shard `me`.
    pub(super) async fn handed(&self, me: usize) -> io::Result<()> {
        match self.slots.get(me) {
            Some(slot) => slot.wake.notified().await,
            None => futures_lite::future::pending().await,
        }
    }

    /// Counts a client of shard `me` until the returned guard is dropped.
    fn count(self: &Arc<Self>, me: usize) -> Counted {
        if let Some(slot) = self.slots.get(me) {
            slot.clients.fetch_add(1, Ordering::Relaxed);
        }
        Counted(self.clone(), me)
    }

    /// Measures, every [`BUSY_TICK`], the share of its core shard `me`'s thread used or
    /// wanted (its CPU time, user and kernel, and its time runnable but waiting for the
    /// core, over the wall time), smoothed, and publishes it. The waiting counts: a shard
    /// pinned to a core crowded by other processes serves its clients late however little
    /// CPU it gets, and must not be given more. Runs on the shard's own thread for as long
    /// as the shard serves.
    pub(super) async fn meter(&self, me: usize) {
        let Some(slot) = self.slots.get(me) else {
            return;
        };
        let mut cpu = thread_demand();
        let mut at = Instant::now();
        let mut smoothed: u64 = 0;
        loop {
            exec::sleep(BUSY_TICK).await;
            let (cpu_now, now) = (thread_demand(), Instant::now());
            let wall = now.saturating_duration_since(at).as_nanos().max(1) as u64;
            let used = cpu_now.saturating_sub(cpu).as_nanos() as u64;
            let permille = (used.saturating_mul(1000) / wall).min(1000);
            // An eighth of the way to each tick's figure (a time constant of about 0.8 s): a
            // burst of connections that keeps the shard busy for a few tenths of a second
            // (512 pgbench clients connecting at once: their startups and authentication)
            // does not make the next clients spill to another shard, a lasting load does
            // within a second or two. With half the way per tick, 63 of 512 such clients
            // spilled to the second shard and cost it 35 us of CPU per transaction of the
            // run on its few clients (benches/shard-wakes.sh, docs/benchmarks.md).
            smoothed = (smoothed * 7 + permille) / 8;
            slot.busy_permille.store(smoothed as u32, Ordering::Relaxed);
            // The placements fade as fast as the measurement takes their load in.
            let _ = slot
                .placed_permille
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                    Some(p - p.div_ceil(8))
                });
            (cpu, at) = (cpu_now, now);
        }
    }
}

/// A client counted on its shard (see [`Placement::count`]).
pub(super) struct Counted(Arc<Placement>, usize);

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(slot) = self.0.slots.get(self.1) {
            slot.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Refuses a connection that was queued for a shard that no longer serves: 57P01 (the
/// server is shutting down), written straight to the socket, which then closes. The shard's
/// executor has stopped, so this writes without it; a new connection's send buffer is
/// empty, so the short message fits (a failure means the client left: nothing to do).
pub(super) fn refuse_stopped(handed: Handed, message: &[u8]) {
    let Handed { fd, unix, .. } = handed;
    let _ = if unix {
        std::os::unix::net::UnixStream::from(fd).write(message)
    } else {
        std::net::TcpStream::from(fd).write(message)
    };
}

/// The first shard, in index order, neither busier than `busy_max` nor full; when every
/// shard that is not full is busy, the least busy of them; when all are full, `here` (which
/// refuses the client itself, as without placement).
fn choose(busy: &[u32], full: &[bool], busy_max: u32, here: usize) -> usize {
    let open = |i: &usize| !full.get(*i).copied().unwrap_or(true);
    if let Some(calm) = (0..busy.len()).filter(open).find(|&i| busy[i] <= busy_max) {
        return calm;
    }
    (0..busy.len())
        .filter(open)
        .min_by_key(|&i| (busy[i], i != here))
        .unwrap_or(here)
}

/// Where shard `me` moves idle pooled clients, by the shards' busy figures: a shard above
/// `busy_max` spreads to the least busy shard below half of it (a burst of clients that
/// connected before their load, all packed here); a shard below half of `busy_max`
/// consolidates onto the first shard before it that can take its load and stay below three
/// quarters of `busy_max` (light load packs again, so that the later shards sleep). The
/// gaps between the lines keep a client from moving back and forth.
fn rebalance(busy: &[u32], full: &[bool], me: usize, busy_max: u32) -> Option<usize> {
    let mine = *busy.get(me)?;
    let open = |i: &usize| *i != me && !full.get(*i).copied().unwrap_or(true);
    if mine > busy_max {
        return (0..busy.len())
            .filter(open)
            .filter(|&i| busy[i] < busy_max / 2)
            .min_by_key(|&i| (busy[i], i));
    }
    if mine >= busy_max / 2 {
        return None;
    }
    (0..me)
        .filter(open)
        .find(|&i| busy[i].saturating_add(mine) <= busy_max / 4 * 3)
}

/// The time the calling thread has run (user and kernel) and waited runnable for a core,
/// from `/proc/thread-self/schedstat`; its CPU time alone where that cannot be read. A read
/// of procfs is answered from the scheduler's counters in memory (no disk, no wait), ten
/// times a second: not the blocking file work shards leave to the control thread.
fn thread_demand() -> Duration {
    // The CPU time first: the run time read after it is at least as large unless schedstat
    // is stale or switched off.
    let cpu = thread_cpu();
    let read = std::fs::read_to_string("/proc/thread-self/schedstat");
    demand(read.as_deref().unwrap_or(""), cpu)
}

/// The run and wait fields of a schedstat line, the run time never below `cpu`: a kernel
/// with sched_info off (no schedstats, no delay accounting) writes `0 0 0`, and the run
/// field leaves out the running slice not yet accounted, so CLOCK_THREAD_CPUTIME_ID stands
/// in for it whenever it is larger. The wait field then is 0, and the figure is the CPU time.
fn demand(schedstat: &str, cpu: Duration) -> Duration {
    let mut fields = schedstat.split_ascii_whitespace();
    match (
        fields.next().and_then(|f| f.parse::<u64>().ok()),
        fields.next().and_then(|f| f.parse::<u64>().ok()),
    ) {
        (Some(run), Some(wait)) => Duration::from_nanos(run).max(cpu) + Duration::from_nanos(wait),
        _ => cpu,
    }
}

/// The figures of a [`BUSY_FILE_ENV`] file, `(shard, thousandths)`; `None` when it cannot be
/// read or does not parse (the measured figures stand).
fn read_busy_file(path: &std::path::Path) -> Option<Vec<(usize, u32)>> {
    parse_busy(&std::fs::read_to_string(path).ok()?)
}

/// `0=95,1=0` (percent of a core per shard, at most 100) as `(shard, thousandths)`.
fn parse_busy(text: &str) -> Option<Vec<(usize, u32)>> {
    text.trim()
        .split(',')
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let (shard, pct) = f.split_once('=')?;
            let pct: u32 = pct.trim().parse().ok()?;
            Some((shard.trim().parse().ok()?, pct.min(100) * 10))
        })
        .collect()
}

/// The CPU time (user and kernel) the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local; the result is checked.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::{Placement, Route, choose, demand, parse_busy};
    use crate::config::{ClientPlacement, Config};
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn placement_packs_on_the_first_shard_not_busy() {
        let open = [false; 3];
        // Nobody busy: the first shard, whoever accepted.
        assert_eq!(choose(&[0, 0, 0], &open, 700, 2), 0);
        assert_eq!(choose(&[650, 0, 0], &open, 700, 1), 0);
        // The first is busy: the next one that is not.
        assert_eq!(choose(&[900, 0, 0], &open, 700, 0), 1);
        assert_eq!(choose(&[900, 800, 100], &open, 700, 0), 2);
        // Every shard busy: the least busy, the accepting shard on a tie.
        assert_eq!(choose(&[900, 800, 950], &open, 700, 0), 1);
        assert_eq!(choose(&[900, 900, 900], &open, 700, 2), 2);
    }

    #[test]
    fn placement_rebalances_spreading_when_busy_and_packing_when_light() {
        use super::rebalance;
        let open = [false; 3];
        // Shard 0 above the line: its clients go to the least busy shard below half of it.
        assert_eq!(rebalance(&[900, 500, 100], &open, 0, 800), Some(2));
        assert_eq!(rebalance(&[900, 500, 450], &open, 0, 800), None);
        // A light later shard packs onto the first one with room for its load.
        assert_eq!(rebalance(&[300, 200, 0], &open, 1, 800), Some(0));
        assert_eq!(rebalance(&[550, 200, 100], &open, 2, 800), Some(1));
        // Not when the sum would pass three quarters, nor from a shard at half or more.
        assert_eq!(rebalance(&[500, 200, 0], &open, 1, 800), None);
        assert_eq!(rebalance(&[0, 400, 0], &open, 1, 800), None);
        // Shard 0 never packs "onto" anyone; a full or closed shard takes nobody.
        assert_eq!(rebalance(&[100, 0, 0], &open, 0, 800), None);
        assert_eq!(rebalance(&[0, 100], &[true, false], 1, 800), None);
        // What moved must not move back: after spreading 0 -> 1 at 900/100, shard 1 at,
        // say, 450 and shard 0 at 500 stay put.
        assert_eq!(rebalance(&[500, 450], &[false; 2], 1, 800), None);
        assert_eq!(rebalance(&[500, 450], &[false; 2], 0, 800), None);
    }

    #[test]
    fn placement_skips_a_full_shard() {
        assert_eq!(choose(&[0, 0], &[true, false], 700, 0), 1);
        assert_eq!(choose(&[0, 900], &[true, false], 700, 0), 1);
        // All full: the accepting shard refuses the client itself.
        assert_eq!(choose(&[0, 0], &[true, true], 700, 1), 1);
    }

    fn pack(shards: usize, sessions_max: usize) -> Arc<Placement> {
        let mut cfg = Config::default();
        cfg.proxy.client_placement = ClientPlacement::Pack;
        cfg.proxy.sessions_per_shard_max = sessions_max;
        Placement::new(&cfg, shards).unwrap().unwrap()
    }

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// Where each connection went: the shard it is counted on.
    fn route(p: &Arc<Placement>, here: usize, kept: &mut Vec<super::Handed>) -> usize {
        match p.route(here, fd(), false, Instant::now()) {
            Route::Here(h) | Route::Overflow(h) => {
                let to = h.counted.as_ref().unwrap().1;
                kept.push(h);
                to
            }
            Route::HandedOver => usize::MAX,
        }
    }

    /// A burst of connections at boot, before any load: each placement counts on its shard,
    /// so the burst spreads over every shard instead of all landing on shard 0.
    #[test]
    fn placement_spreads_a_burst_of_idle_clients() {
        let p = pack(4, 100_000);
        let mut kept = Vec::new();
        for _ in 0..2000 {
            let _ = route(&p, 0, &mut kept);
        }
        let mut per_shard: Vec<usize> = (0..4).map(|i| p.take(i).len()).collect();
        per_shard[0] += kept.len();
        assert_eq!(per_shard.iter().sum::<usize>(), 2000);
        for (shard, n) in per_shard.iter().enumerate() {
            assert!((400..=600).contains(n), "shard {shard}: {per_shard:?}");
        }
        // A handful of clients still packs on the first shard.
        let p = pack(4, 100_000);
        let mut kept = Vec::new();
        for _ in 0..16 {
            assert_eq!(route(&p, 3, &mut kept), usize::MAX);
        }
        assert_eq!(p.take(0).len(), 16);
    }

    /// `sessions-per-shard-max` holds while connections are still queued: a placement counts
    /// on the chosen shard before it is adopted.
    #[test]
    fn placement_counts_queued_clients_against_the_shard_bound() {
        let p = pack(2, 3);
        let mut kept = Vec::new();
        for _ in 0..6 {
            let _ = route(&p, 1, &mut kept);
        }
        // Three queued for shard 0 (none adopted yet), three kept by shard 1.
        assert_eq!(p.take(0).len(), 3);
        assert_eq!(kept.len(), 3);
        assert!(kept.iter().all(|h| h.counted.as_ref().unwrap().1 == 1));
    }

    /// A shard that stopped is never chosen, nothing is queued for it, and what was queued
    /// before it closed is still there to take.
    #[test]
    fn placement_skips_and_refuses_a_closed_shard() {
        let p = pack(2, 100);
        let mut kept = Vec::new();
        assert_eq!(route(&p, 1, &mut kept), usize::MAX);
        p.close(0);
        assert_eq!(route(&p, 1, &mut kept), 1);
        assert_eq!(p.take(0).len(), 1);
        let handed = super::Handed {
            fd: fd(),
            unix: false,
            accepted: Instant::now(),
            counted: None,
            moved: None,
        };
        assert!(p.hand_over(0, handed).is_err());
        assert!(p.take(0).is_empty());
    }

    #[test]
    fn placement_demand_falls_back_to_cpu_time_without_schedstats() {
        let cpu = Duration::from_millis(30);
        // sched_info off: all zeros.
        assert_eq!(demand("0 0 0\n", cpu), cpu);
        // Unreadable.
        assert_eq!(demand("", cpu), cpu);
        // The run field behind the CPU clock: the CPU clock, plus the wait.
        assert_eq!(
            demand("20000000 5000000 9\n", cpu),
            Duration::from_millis(35)
        );
        // Ordinary: run plus wait.
        assert_eq!(
            demand("40000000 5000000 9\n", cpu),
            Duration::from_millis(45)
        );
    }

    #[test]
    fn placement_test_busy_file_parses_or_stands_aside() {
        assert_eq!(parse_busy("0=95,1=0\n"), Some(vec![(0, 950), (1, 0)]));
        assert_eq!(parse_busy(" 1 = 250 "), Some(vec![(1, 1000)]));
        assert_eq!(parse_busy(""), Some(vec![]));
        for garbled in ["0=", "=5", "0=5;1=2", "x=1", "0=-1", "\u{0}"] {
            assert_eq!(parse_busy(garbled), None, "{garbled:?}");
        }
    }
}
