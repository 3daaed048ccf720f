//! Which shard serves a new client (`proxy.client-placement`). It owns the shards' published
//! busy figures and one bounded hand-over queue per shard; it never touches a session (a
//! client lives on the shard that adopts its connection, start to end).
//!
//! Why: with the kernel's SO_REUSEPORT hash every shard gets an even share of the clients,
//! so with light or moderate traffic every shard is half idle, sleeps after nearly every
//! event and is woken for the next one. Measured on the 2-core build machine (issue 14,
//! `benches/cost-split-pgbench.sh`, 64 pgbench clients, transaction pooling): one shard made
//! 0.09 system calls and 0.07 context switches per transaction, two shards 0.71-1.04 and
//! 0.43-0.66, and cost 1.4-1.7x the CPU per transaction. Packing the clients on the first
//! shard that is not busy keeps that shard busy enough to reap many completions per wake-up,
//! and a shard without clients sleeps; once the first shard's thread uses more than
//! `proxy.pack-busy-pct` of its core, new clients go to the next shard, so a machine whose
//! traffic needs several cores still gets them.
//!
//! Any shard may accept a connection (the kernel picks the listener); when the connection
//! belongs to another shard, its bare descriptor goes through that shard's bounded queue and
//! one eventfd write wakes it. That is one hop per connection, never per statement.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::{ClientPlacement, Config};
use crate::exec::{self, Notifier};

/// How often a shard measures the share of its core its thread used.
pub(super) const BUSY_TICK: Duration = Duration::from_millis(100);

/// A connection accepted on one shard for another.
pub(super) struct Handed {
    pub fd: OwnedFd,
    pub unix: bool,
}

/// One shard's side: what the others read to place clients, and its hand-over queue.
struct Slot {
    /// The share of its core the shard's thread used, in thousandths, smoothed.
    busy_permille: AtomicU32,
    /// Client connections the shard serves (accepted or adopted, until they end).
    clients: AtomicUsize,
    inbox: Sender<Handed>,
    outbox: Receiver<Handed>,
    wake: Notifier,
}

/// The process's placement of clients on shards, shared by every shard.
pub(super) struct Placement {
    busy_permille_max: u32,
    clients_max: usize,
    slots: Box<[Slot]>,
}

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
                    clients: AtomicUsize::new(0),
                    inbox,
                    outbox,
                    wake: Notifier::new()?,
                })
            })
            .collect::<io::Result<Box<[Slot]>>>()?;
        Ok(Some(Arc::new(Placement {
            busy_permille_max: cfg.proxy.pack_busy_pct.min(100) * 10,
            clients_max: cfg.proxy.sessions_per_shard_max,
            slots,
        })))
    }

    /// The shard that serves a client `here` just accepted.
    pub(super) fn choose(&self, here: usize) -> usize {
        let busy: Vec<u32> = self
            .slots
            .iter()
            .map(|s| s.busy_permille.load(Ordering::Relaxed))
            .collect();
        let full: Vec<bool> = self
            .slots
            .iter()
            .map(|s| s.clients.load(Ordering::Relaxed) >= self.clients_max)
            .collect();
        choose(&busy, &full, self.busy_permille_max, here)
    }

    /// Queues `handed` for shard `to` and wakes it; gives the connection back when the queue
    /// is full (the caller serves it itself).
    pub(super) fn hand_over(&self, to: usize, handed: Handed) -> Result<(), Handed> {
        let Some(slot) = self.slots.get(to) else {
            return Err(handed);
        };
        match slot.inbox.try_send(handed) {
            Ok(()) => {
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

    /// Completes when a connection may have been handed to shard `me`.
    pub(super) async fn handed(&self, me: usize) -> io::Result<()> {
        match self.slots.get(me) {
            Some(slot) => slot.wake.notified().await,
            None => futures_lite::future::pending().await,
        }
    }

    /// Counts a client of shard `me` until the returned guard is dropped.
    pub(super) fn count(self: &Arc<Self>, me: usize) -> Counted {
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

/// The time the calling thread has run (user and kernel) and waited runnable for a core,
/// from `/proc/thread-self/schedstat`; its CPU time alone where that cannot be read. A read
/// of procfs is answered from the scheduler's counters in memory (no disk, no wait), ten
/// times a second: not the blocking file work shards leave to the control thread.
fn thread_demand() -> Duration {
    let read = std::fs::read_to_string("/proc/thread-self/schedstat");
    let mut fields = read.as_deref().unwrap_or("").split_ascii_whitespace();
    match (
        fields.next().and_then(|f| f.parse::<u64>().ok()),
        fields.next().and_then(|f| f.parse::<u64>().ok()),
    ) {
        (Some(run), Some(wait)) => Duration::from_nanos(run.saturating_add(wait)),
        _ => thread_cpu(),
    }
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
    use super::choose;

    #[test]
    fn clients_pack_on_the_first_shard_not_busy() {
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
    fn a_full_shard_takes_no_more_clients() {
        assert_eq!(choose(&[0, 0], &[true, false], 700, 0), 1);
        assert_eq!(choose(&[0, 900], &[true, false], 700, 0), 1);
        // All full: the accepting shard refuses the client itself.
        assert_eq!(choose(&[0, 0], &[true, true], 700, 1), 1);
    }
}
