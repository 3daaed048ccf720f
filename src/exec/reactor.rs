//! The io_uring side of the shard runtime: connected sockets as [`Channel`]s driven by
//! `RECV`/`SEND` operations (see channel.rs), readiness of listeners and the eventfd through
//! multishot `POLL_ADD`, timers through the `io_uring_enter` wait timeout, and cross-thread
//! wake-ups through an `eventfd`.
//!
//! Readiness (listeners, the eventfd) is watched with one multishot poll per descriptor, for
//! reads only. Connected sockets have no poll: their receives and sends are operations of
//! their own, and a connect in progress is watched by a one-shot write poll.
//!
//! A source's slot is only reused after the kernel has confirmed its poll is gone (the final
//! CQE without `IORING_CQE_F_MORE`), so a stale completion can never reach a new socket.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::channel::{Channel, Submit};

/// user_data of operations whose completions carry no information (poll removals).
const IGNORED: u64 = u64::MAX;

/// Marks the user_data of a one-shot write poll (the rest is the source's token).
const WRITE_POLL: u64 = 1 << 62;
/// Marks the user_data of a channel's receive and send operations.
const RECV_OP: u64 = 1 << 61;
const SEND_OP: u64 = 1 << 60;
/// Marks the user_data of a channel's one-shot read poll (`Channel::poll_readable`).
const READ_POLL: u64 = 1 << 59;
const OP_MASK: u64 = WRITE_POLL | RECV_OP | SEND_OP | READ_POLL;
/// `IORING_RECVSEND_POLL_FIRST` (the io-uring crate exports it for some targets only).
const RECVSEND_POLL_FIRST: u16 = 1;
/// Slot generations stay below the operation bits.
const GENERATION_MASK: u32 = (1 << 27) - 1;

/// The most completions a batching wait asks for (see `Reactor::turn`).
const BATCH_WANT_MAX: u32 = 64;
/// A batching wait needs an overall timeout (without one the kernel ends the wait when the
/// batch time is up, events or not): this long when no timer is due sooner.
const BATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Re-arms of a poll in a row that ended in errors before giving up on it.
const ERROR_REARMS_MAX: u32 = 8;

const READ_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;
const WRITE_EVENTS: u32 = (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) as u32;

/// Readiness of one registered descriptor (a listener, an eventfd), shared by the handle and
/// the reactor.
pub(crate) struct Source {
    token: u64,
    /// Believed readable: the next syscall is worth trying. Cleared when a syscall says
    /// EAGAIN, set again by the next poll completion.
    pub readable: Cell<bool>,
    pub read_waker: Cell<Option<Waker>>,
}

struct SourceSlot {
    generation: u32,
    source: Option<Rc<Source>>,
    /// A connected socket driven by operations (no multishot poll); the slot owns its fd.
    channel: Option<Rc<Channel>>,
    fd: RawFd,
    /// The owner dropped it; free the slot once the kernel confirms the poll is gone.
    released: bool,
    /// Re-arms in a row after error completions (see `reap`).
    error_rearms: u32,
    /// Events of the multishot poll.
    events: u32,
}

pub(crate) struct Reactor {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<SourceSlot>>,
    free: RefCell<Vec<u32>>,
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
    next_timer: Cell<u64>,
    /// Removals and cancellations that could not be queued (retried each turn): until they
    /// are in, the kernel keeps the socket and the slot stays taken.
    pending: RefCell<Vec<squeue::Entry>>,
    /// Released channels still sending: the instant their sends are cancelled, the token,
    /// and whether the cancel went out (the entry stays until the slot is freed).
    lingering: RefCell<Vec<(Instant, u64, bool)>>,
    /// `proxy.ring-batch-wait-us`, 0 when off or when the kernel lacks min_wait.
    batch_wait_us: u32,
    /// Completions the last turn reaped: two or more mark the shard busy (see `turn`).
    last_reaped: Cell<u32>,
    /// The channel completions of a turn, handled after the ring's borrow ends: kept from
    /// turn to turn, since a vector allocated, grown and freed on every turn was about
    /// 3,000 instructions per compared pgbench `-N` transaction (callgrind, 20 turns).
    channel_events: RefCell<Vec<(Rc<Channel>, u64, i32)>>,
}

impl Reactor {
    pub(crate) fn new(entries: u32, policy: super::WaitPolicy) -> io::Result<Reactor> {
        let mut builder = IoUring::builder();
        if policy.defer_taskrun {
            // Completion work waits for the shard's next enter with GETEVENTS (every enter
            // carries it while work is pending: TASKRUN_FLAG tells the io-uring crate), and a
            // waiting shard is woken only once as many completions as it waits for are due.
            builder.setup_defer_taskrun().setup_taskrun_flag();
        } else {
            // Completions are only reaped in `turn`, on this thread: no need for the kernel to
            // interrupt the task to run completion work early.
            //
            // DEFER_TASKRUN is not the default: it measured 2-5% more TPS (A/B, pgbench -S),
            // but with it the test suite stalled now and then under load (a SIGTERM drain
            // whose listener kept accepting for seconds, a mirror that stopped answering for
            // 20 s; about one run in four of the mirror, unix, tls and proxy tests together,
            // none in nine without it), as if deferred completion work sometimes waited for
            // the next unrelated event. Until that is understood, the plain cooperative mode.
            // (Tried again with the io_uring channels, with GETEVENTS on every enter,
            // including the one that does not wait: the SIGTERM drain test still saw its
            // listener accept for 5 s, once in four runs of those tests.) It stays behind
            // `proxy.ring-defer-taskrun` for measurements.
            builder.setup_coop_taskrun();
        }
        let ring = builder
            .setup_single_issuer()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let mut batch_wait_us = policy.batch_wait_us;
        if batch_wait_us > 0 && !ring.params().is_feature_min_timeout() {
            tracing::warn!(
                "proxy.ring-batch-wait-us is ignored: this kernel has no io_uring min_wait \
                 (IORING_FEAT_MIN_TIMEOUT, Linux 6.12+)"
            );
            batch_wait_us = 0;
        }
        Ok(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            timers: RefCell::new(BTreeMap::new()),
            next_timer: Cell::new(0),
            pending: RefCell::new(Vec::new()),
            lingering: RefCell::new(Vec::new()),
            batch_wait_us,
            last_reaped: Cell::new(0),
            channel_events: RefCell::new(Vec::new()),
        })
    }

    /// Queues `entry`, submitting the queue first when it is full.
    ///
    /// Every caller guarantees that memory the entry points to (a channel's receive buffer
    /// or queued `Bytes`) stays valid until the entry's completion: see channel.rs.
    fn push(&self, entry: squeue::Entry) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: see above; poll, cancel and poll-remove entries reference no user memory.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
        // SAFETY: as above.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full after submit"))
    }

    /// Starts driving the connected socket `fd` (owned by the reactor from now on: it closes
    /// once the channel is released and its last operation has completed).
    pub(crate) fn register_channel(&self, fd: OwnedFd) -> io::Result<Rc<Channel>> {
        let (index, generation) = self.take_slot();
        let token = ((generation as u64) << 32) | index as u64;
        let channel = Rc::new(Channel::new(token, fd.into_raw_fd()));
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[index as usize];
        slot.channel = Some(channel.clone());
        slot.fd = channel.fd;
        slot.released = false;
        Ok(channel)
    }

    /// Queues the operation a channel asked for.
    pub(crate) fn submit(&self, channel: &Channel, submit: Submit) -> io::Result<()> {
        let fd = types::Fd(channel.fd);
        let entry = match submit {
            Submit::Recv {
                ptr,
                len,
                poll_first,
            } => opcode::Recv::new(fd, ptr, len)
                .ioprio(if poll_first { RECVSEND_POLL_FIRST } else { 0 })
                .build()
                .user_data(channel.token | RECV_OP),
            Submit::RecvMsg { msg, poll_first } => opcode::RecvMsg::new(fd, msg)
                .ioprio(if poll_first { RECVSEND_POLL_FIRST } else { 0 })
                .build()
                .user_data(channel.token | RECV_OP),
            Submit::Send { ptr, len } => opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(channel.token | SEND_OP),
        };
        let pushed = self.push(entry);
        if pushed.is_err() {
            // Nothing is in flight after all.
            match submit {
                Submit::Recv { .. } | Submit::RecvMsg { .. } => channel.recv_busy.set(false),
                Submit::Send { .. } => channel.send_busy.set(false),
            }
        }
        pushed
    }

    /// One-shot poll for the end of a non-blocking connect.
    pub(crate) fn watch_connect(&self, channel: &Channel) -> io::Result<()> {
        self.poll_once(channel, WRITE_POLL, &channel.connect_busy)
    }

    /// One-shot poll for data to read (or the end), without reading it.
    pub(crate) fn watch_readable(&self, channel: &Channel) -> io::Result<()> {
        self.poll_once(channel, READ_POLL, &channel.readable_busy)
    }

    /// The channel's one-shot polls: `op` is `WRITE_POLL` or `READ_POLL`; `busy` is set while
    /// the poll is in the kernel.
    fn poll_once(&self, channel: &Channel, op: u64, busy: &Cell<bool>) -> io::Result<()> {
        let events = if op == WRITE_POLL {
            WRITE_EVENTS
        } else {
            READ_EVENTS
        };
        let entry = opcode::PollAdd::new(types::Fd(channel.fd), events)
            .build()
            .user_data(channel.token | op);
        self.push(entry)?;
        busy.set(true);
        Ok(())
    }

    /// Every handle of `channel` is gone: cancel its receive, let queued data go out for at
    /// most the close linger time (`proxy.close-linger-ms`), then close.
    pub(crate) fn release_channel(&self, channel: &Channel) {
        channel.released.set(true);
        if channel.recv_busy.get() {
            self.cancel(channel.token | RECV_OP);
        }
        for (busy, op) in [
            (&channel.connect_busy, WRITE_POLL),
            (&channel.readable_busy, READ_POLL),
        ] {
            if busy.get() {
                self.push_or_retry(
                    opcode::PollRemove::new(channel.token | op)
                        .build()
                        .user_data(IGNORED),
                );
            }
        }
        if channel.send_busy.get() {
            let until = Instant::now() + super::close_linger();
            channel.linger_until.set(Some(until));
            self.lingering
                .borrow_mut()
                .push((until, channel.token, false));
        }
        if !channel.busy() {
            self.free_slot(channel.token as u32);
        }
    }

    /// Asks the kernel to end `channel`'s receive in flight now (it completes, with what it
    /// had or `ECANCELED`): a socket leaving this shard must not leave a receive behind that
    /// would take bytes meant for the shard adopting it.
    pub(crate) fn cancel_recv(&self, channel: &Channel) {
        if channel.recv_busy.get() {
            self.cancel(channel.token | RECV_OP);
        }
    }

    fn cancel(&self, user_data: u64) {
        self.push_or_retry(
            opcode::AsyncCancel::new(user_data)
                .build()
                .user_data(IGNORED),
        );
    }

    /// Queues an entry that references no user memory, or keeps it for the next turn.
    fn push_or_retry(&self, entry: squeue::Entry) {
        if self.push(entry.clone()).is_err() {
            self.pending.borrow_mut().push(entry);
        }
    }

    /// Whether released channels still have operations out (the shard's last turns wait for
    /// them, so their descriptors close and their peers see the end).
    pub(crate) fn has_released_busy(&self) -> bool {
        self.slots.borrow().iter().any(|slot| {
            slot.channel
                .as_ref()
                .is_some_and(|c| c.released.get() && c.busy())
        })
    }

    fn take_slot(&self) -> (u32, u32) {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(index) => index,
            None => {
                slots.push(SourceSlot {
                    generation: 0,
                    source: None,
                    channel: None,
                    fd: -1,
                    released: false,
                    error_rearms: 0,
                    events: 0,
                });
                (slots.len() - 1) as u32
            }
        };
        (index, slots[index as usize].generation)
    }

    fn arm(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build()
            .user_data(token);
        self.push(entry)
    }

    /// Starts watching `fd` for reads (the caller keeps it open until
    /// [`Reactor::release`]).
    pub(crate) fn register(&self, fd: RawFd) -> io::Result<Rc<Source>> {
        let events = READ_EVENTS;
        let (index, generation) = self.take_slot();
        let token = ((generation as u64) << 32) | index as u64;
        let source = Rc::new(Source {
            token,
            readable: Cell::new(false),
            read_waker: Cell::new(None),
        });
        {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.source = Some(source.clone());
            slot.fd = fd;
            slot.released = false;
            slot.error_rearms = 0;
            slot.events = events;
        }
        if let Err(err) = self.arm(fd, token, events) {
            self.free_slot(index);
            return Err(err);
        }
        Ok(source)
    }

    /// The owner is done with the source: cancel its polls. The caller may close the fd right
    /// after; the kernel holds its own reference until the polls are removed.
    pub(crate) fn release(&self, source: &Source) {
        let index = source.token as u32 as usize;
        if let Some(slot) = self.slots.borrow_mut().get_mut(index) {
            slot.released = true;
            slot.source = None;
        }
        self.push_or_retry(
            opcode::PollRemove::new(source.token)
                .build()
                .user_data(IGNORED),
        );
    }

    fn free_slot(&self, index: u32) {
        if let Some(slot) = self.slots.borrow_mut().get_mut(index as usize) {
            slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
            slot.source = None;
            if let Some(channel) = slot.channel.take() {
                // SAFETY: the channel's descriptor, owned by this slot, closed once: no
                // operation on it is in flight and no handle is left.
                unsafe { libc::close(channel.fd) };
                self.lingering
                    .borrow_mut()
                    .retain(|&(_, token, _)| token != channel.token);
            }
            slot.fd = -1;
            slot.released = false;
        }
        self.free.borrow_mut().push(index);
    }

    pub(crate) fn set_timer(&self, deadline: Instant, id: Option<u64>, waker: Waker) -> u64 {
        let mut timers = self.timers.borrow_mut();
        if let Some(id) = id
            && let Some(slot) = timers.get_mut(&(deadline, id))
        {
            *slot = waker;
            return id;
        }
        let id = self.next_timer.get();
        self.next_timer.set(id + 1);
        timers.insert((deadline, id), waker);
        id
    }

    pub(crate) fn cancel_timer(&self, deadline: Instant, id: u64) {
        self.timers.borrow_mut().remove(&(deadline, id));
    }

    /// Submits queued operations, waits for events (not at all when `tasks_ready`, else up to
    /// the next timer), then wakes whatever became ready.
    pub(crate) fn turn(&self, tasks_ready: bool) -> io::Result<()> {
        let pending: Vec<squeue::Entry> = std::mem::take(&mut *self.pending.borrow_mut());
        for entry in pending {
            self.push_or_retry(entry);
        }
        let wait = if tasks_ready {
            Some(Duration::ZERO)
        } else {
            let timer = self.timers.borrow().keys().next().map(|&(at, _)| at);
            let linger = self
                .lingering
                .borrow()
                .iter()
                .filter(|&&(_, _, cancelled)| !cancelled)
                .map(|&(at, _, _)| at)
                .min();
            let next = match (timer, linger) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            next.map(|at| at.saturating_duration_since(Instant::now()))
        };
        {
            let ring = self.ring.borrow();
            // Busy (the last turn handled several completions): wait for as many again, for
            // at most `batch_wait_us` before waking with whatever came, so one wake-up serves
            // several sessions. (The sends this enter submits mostly complete in it and count:
            // in a steady request/response flow the batch fills with the answers to them.)
            // After one completion, or none, the shard is taken to be idle and wakes at the
            // first completion, so light traffic waits no longer.
            let last = self.last_reaped.get();
            let batch = self.batch_wait_us > 0 && last >= 2;
            let submitted = match wait {
                Some(Duration::ZERO) => ring.submit(),
                _ if batch => {
                    let want = last.min(BATCH_WANT_MAX) as usize;
                    let ts = types::Timespec::from(wait.unwrap_or(BATCH_IDLE_TIMEOUT));
                    let args = types::SubmitArgs::new()
                        .timespec(&ts)
                        .min_wait_usec(self.batch_wait_us);
                    ring.submitter().submit_with_args(want, &args)
                }
                Some(limit) => {
                    let ts = types::Timespec::from(limit);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args)
                }
                None => ring.submit_and_wait(1),
            };
            match submitted {
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::ETIME)
                            | Some(libc::EINTR)
                            | Some(libc::EBUSY)
                            | Some(libc::EAGAIN)
                    ) => {}
                Err(err) => return Err(err),
            }
        }
        self.reap();
        // One clock read for both, and none when neither has anything to time.
        if !self.lingering.borrow().is_empty() || !self.timers.borrow().is_empty() {
            let now = Instant::now();
            self.end_lingering(now);
            self.fire_timers(now);
        }
        Ok(())
    }

    /// Cancels the sends of released channels whose linger time is up (their entries stay
    /// until the cancelled send completes and the slot is freed).
    fn end_lingering(&self, now: Instant) {
        if self.lingering.borrow().is_empty() {
            return;
        }
        let mut expired = Vec::new();
        for (until, token, cancelled) in self.lingering.borrow_mut().iter_mut() {
            if *until <= now && !*cancelled {
                *cancelled = true;
                expired.push(*token);
            }
        }
        for token in expired {
            let live = self
                .slots
                .borrow()
                .get(token as u32 as usize)
                .and_then(|slot| slot.channel.clone())
                .filter(|c| c.token == token && c.send_busy.get());
            if live.is_some() {
                self.cancel(token | SEND_OP);
            } else {
                self.lingering.borrow_mut().retain(|&(_, t, _)| t != token);
            }
        }
    }

    fn reap(&self) {
        let mut rearm = Vec::new();
        // Taken for the turn and put back empty (a completion's handling never reaps, but
        // if it did it would only find an empty one).
        let mut channel_events = std::mem::take(&mut *self.channel_events.borrow_mut());
        let mut reaped = 0u32;
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in ring.completion() {
                reaped = reaped.saturating_add(1);
                let token = cqe.user_data();
                if token == IGNORED {
                    continue;
                }
                let index = token as u32 as usize;
                let Some(slot) = slots.get_mut(index) else {
                    continue;
                };
                if slot.generation != ((token & !OP_MASK) >> 32) as u32 {
                    continue;
                }
                let result = cqe.result();
                if let Some(channel) = &slot.channel {
                    // Handled below, outside the ring and slot borrows (a completion may
                    // queue the next operation).
                    channel_events.push((channel.clone(), token & OP_MASK, result));
                    continue;
                }
                if let Some(source) = &slot.source {
                    // An error completion (other than our own cancellation) is surfaced by
                    // letting the next syscall run and report it.
                    source.readable.set(true);
                    if let Some(w) = source.read_waker.take() {
                        w.wake();
                    }
                }
                if !cqueue::more(cqe.flags()) {
                    if slot.released {
                        rearm.push((index as u32, None));
                    } else if result >= 0 || slot.error_rearms < ERROR_REARMS_MAX {
                        // The kernel ended the multishot poll (CQ overflow, a transient error):
                        // re-arm. Consecutive errors are capped: a permanent one (EBADF) would
                        // otherwise loop here; the source was marked ready above, so its
                        // owner's next syscall reports the error and the owner closes it.
                        slot.error_rearms = if result >= 0 {
                            0
                        } else {
                            slot.error_rearms + 1
                        };
                        rearm.push((index as u32, Some((slot.fd, token, slot.events))));
                    }
                }
            }
        }
        self.last_reaped.set(reaped);
        for (channel, op, result) in channel_events.drain(..) {
            match op {
                RECV_OP => channel.received(result),
                SEND_OP => {
                    if let Some(next) = channel.sent(result)
                        && let Err(err) = self.submit(&channel, next)
                    {
                        tracing::warn!(%err, "cannot queue a send");
                        channel.sent(-libc::EIO);
                    }
                }
                READ_POLL => channel.readable_done(),
                _ => channel.connect_done(),
            }
            if channel.released.get() && !channel.busy() {
                self.free_slot(channel.token as u32);
            }
        }
        *self.channel_events.borrow_mut() = channel_events;
        for (index, arm) in rearm {
            match arm {
                None => self.free_slot(index),
                Some((fd, token, events)) => {
                    if self.arm(fd, token, events).is_err() {
                        tracing::warn!(fd, "cannot re-arm a poll");
                    }
                }
            }
        }
    }

    fn fire_timers(&self, now: Instant) {
        loop {
            let waker = {
                let mut timers = self.timers.borrow_mut();
                match timers.first_entry() {
                    Some(entry) if entry.key().0 <= now => entry.remove(),
                    _ => break,
                }
            };
            waker.wake();
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Closing the ring cancels what is still in flight, but the kernel may finish with a
        // buffer after this returns: leak the channels that still have operations out rather
        // than free memory the kernel may write to (a shard's last moments only).
        for slot in self.slots.get_mut().iter_mut() {
            if let Some(channel) = slot.channel.take()
                && channel.busy()
            {
                std::mem::forget(channel);
            }
        }
    }
}

/// Wakes a shard from another thread (the control thread's stop request). The shard awaits
/// [`Notifier::notified`]; any thread may call [`Notifier::notify`].
#[derive(Clone)]
pub struct Notifier {
    fd: Arc<OwnedFd>,
}

impl Notifier {
    pub fn new() -> io::Result<Notifier> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier { fd: Arc::new(fd) })
    }

    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64; failure (counter saturated) still leaves the
        // eventfd readable, which is all a waiter needs.
        unsafe {
            libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Completes once [`Notifier::notify`] has been called (now or before).
    pub async fn notified(&self) -> io::Result<()> {
        let exec = super::current();
        let source = exec.reactor.register(self.fd.as_raw_fd())?;
        let result = futures_lite::future::poll_fn(|cx| {
            let mut value: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
            if n == 8 {
                return std::task::Poll::Ready(Ok(()));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return std::task::Poll::Ready(Err(err));
            }
            source.readable.set(false);
            source.read_waker.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        })
        .await;
        exec.reactor.release(&source);
        result
    }
}
