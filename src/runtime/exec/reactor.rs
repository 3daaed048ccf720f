//! The io_uring side of the shard runtime: readiness of registered file descriptors through
//! multishot `POLL_ADD`, timers through the `io_uring_enter` wait timeout, and cross-thread
//! wake-ups through an `eventfd`.
//!
//! Readiness is watched with one multishot poll per descriptor. For Unix-domain sockets the
//! multishot poll watches reads only, and write readiness is asked for only when a send found
//! the socket full (a one-shot poll): a Unix socket announces new space every time its peer
//! reads, which would cost a completion per message for nothing. TCP sockets announce space
//! only after running out of it, and measured faster with writes in the multishot poll
//! (`pgprism-old`/`pgprism-new` A/B runs, 4 rounds of pgbench -S -c 64: 22 against 23-37 us
//! of CPU per transaction), so they keep it.
//!
//! A source's slot is only reused after the kernel has confirmed its poll is gone (the final
//! CQE without `IORING_CQE_F_MORE`), so a stale completion can never reach a new socket.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// user_data of operations whose completions carry no information (poll removals).
const IGNORED: u64 = u64::MAX;

/// Marks the user_data of a one-shot write poll (the rest is the source's token).
const WRITE_POLL: u64 = 1 << 62;
/// Slot generations stay below the write bit.
const GENERATION_MASK: u32 = (1 << 30) - 1;

/// Re-arms of a poll in a row that ended in errors before giving up on it.
const ERROR_REARMS_MAX: u32 = 8;

const READ_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;
const WRITE_EVENTS: u32 = (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) as u32;
const CLOSED: u32 = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;

/// Readiness of one registered descriptor, shared by the handle and the reactor.
pub(crate) struct Source {
    token: u64,
    /// Believed readable/writable: the next syscall is worth trying. Cleared when a syscall
    /// says EAGAIN (or drained the socket), set again by the next poll completion.
    pub readable: Cell<bool>,
    pub writable: Cell<bool>,
    /// The peer closed or reset: set for good by the first completion that says so, because
    /// that completion may also have announced the last data, and no further one will come.
    pub hup: Cell<bool>,
    pub read_waker: Cell<Option<Waker>>,
    pub write_waker: Cell<Option<Waker>>,
    /// A one-shot write poll is in the kernel.
    write_armed: Cell<bool>,
    /// Writes are watched by one-shot polls on demand, not by the multishot poll.
    write_on_demand: bool,
}

struct SourceSlot {
    generation: u32,
    source: Option<Rc<Source>>,
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
    /// Poll removals that did not fit in the submission queue (retried each turn).
    pending_removals: RefCell<Vec<u64>>,
}

impl Reactor {
    pub(crate) fn new(entries: u32) -> io::Result<Reactor> {
        let ring = IoUring::builder()
            // Completions are only reaped in `turn`, on this thread: no need for the kernel to
            // interrupt the task to run completion work early.
            //
            // Not DEFER_TASKRUN: it measured 2-5% more TPS (A/B, pgbench -S), but with it the
            // test suite stalled now and then under load (a SIGTERM drain whose listener kept
            // accepting for seconds, a mirror that stopped answering for 20 s; about one run
            // in four of the mirror, unix, tls and proxy tests together, none in nine
            // without it), as if deferred completion work sometimes waited for the next
            // unrelated event. Until that is understood, the plain cooperative mode.
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        Ok(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            timers: RefCell::new(BTreeMap::new()),
            next_timer: Cell::new(0),
            pending_removals: RefCell::new(Vec::new()),
        })
    }

    fn push(&self, entry: squeue::Entry) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: poll and poll-remove entries reference no user memory.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
        // SAFETY: as above.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full after submit"))
    }

    fn arm(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build()
            .user_data(token);
        self.push(entry)
    }

    /// Starts watching `fd` (which the caller keeps open until [`Reactor::release`]).
    pub(crate) fn register(&self, fd: RawFd) -> io::Result<Rc<Source>> {
        self.register_with(fd, false)
    }

    /// As [`register`](Self::register); `write_on_demand`: write readiness is polled only
    /// when a writer waits for it (Unix-domain sockets, see the module doc).
    pub(crate) fn register_with(&self, fd: RawFd, write_on_demand: bool) -> io::Result<Rc<Source>> {
        let events = if write_on_demand {
            READ_EVENTS
        } else {
            READ_EVENTS | WRITE_EVENTS
        };
        let (index, generation) = {
            let mut slots = self.slots.borrow_mut();
            let index = match self.free.borrow_mut().pop() {
                Some(index) => index,
                None => {
                    slots.push(SourceSlot {
                        generation: 0,
                        source: None,
                        fd: -1,
                        released: false,
                        error_rearms: 0,
                        events,
                    });
                    (slots.len() - 1) as u32
                }
            };
            (index, slots[index as usize].generation)
        };
        let token = ((generation as u64) << 32) | index as u64;
        let source = Rc::new(Source {
            token,
            readable: Cell::new(false),
            hup: Cell::new(false),
            // A connected socket is writable until a send says otherwise; a connecting one
            // is not, and its owner clears this before waiting.
            writable: Cell::new(true),
            read_waker: Cell::new(None),
            write_waker: Cell::new(None),
            write_armed: Cell::new(false),
            write_on_demand,
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

    /// The owner found `source` full (`writable` is now false): asks the kernel to say when
    /// it has space again, once.
    pub(crate) fn want_writable(&self, source: &Source) {
        if !source.write_on_demand || source.write_armed.get() {
            return;
        }
        let index = source.token as u32 as usize;
        let Some(fd) = self.slots.borrow().get(index).map(|slot| slot.fd) else {
            return;
        };
        let entry = opcode::PollAdd::new(types::Fd(fd), WRITE_EVENTS)
            .build()
            .user_data(source.token | WRITE_POLL);
        if self.push(entry).is_ok() {
            source.write_armed.set(true);
        } else {
            // Cannot happen with a ring that was just submitted; rather than a writer waiting
            // forever, let its next send try again.
            tracing::warn!(fd, "cannot arm a write poll");
            source.writable.set(true);
        }
    }

    /// The owner is done with the source: cancel its polls. The caller may close the fd right
    /// after; the kernel holds its own reference until the polls are removed.
    pub(crate) fn release(&self, source: &Source) {
        let index = source.token as u32 as usize;
        if let Some(slot) = self.slots.borrow_mut().get_mut(index) {
            slot.released = true;
            slot.source = None;
        }
        let mut tokens = vec![source.token];
        if source.write_armed.get() {
            tokens.push(source.token | WRITE_POLL);
        }
        for token in tokens {
            let entry = opcode::PollRemove::new(token).build().user_data(IGNORED);
            if self.push(entry).is_err() {
                // Retried at the next turn: until the removal is in, the kernel keeps the
                // socket.
                self.pending_removals.borrow_mut().push(token);
            }
        }
    }

    fn free_slot(&self, index: u32) {
        if let Some(slot) = self.slots.borrow_mut().get_mut(index as usize) {
            slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
            slot.source = None;
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
        let pending: Vec<u64> = std::mem::take(&mut *self.pending_removals.borrow_mut());
        for token in pending {
            let entry = opcode::PollRemove::new(token).build().user_data(IGNORED);
            if self.push(entry).is_err() {
                self.pending_removals.borrow_mut().push(token);
            }
        }
        let wait = if tasks_ready {
            Some(Duration::ZERO)
        } else {
            self.timers
                .borrow()
                .keys()
                .next()
                .map(|(deadline, _)| deadline.saturating_duration_since(Instant::now()))
        };
        {
            let ring = self.ring.borrow();
            let submitted = match wait {
                Some(Duration::ZERO) => ring.submit(),
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
        self.fire_timers();
        Ok(())
    }

    fn reap(&self) {
        let mut rearm = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in ring.completion() {
                let token = cqe.user_data();
                if token == IGNORED {
                    continue;
                }
                let index = token as u32 as usize;
                let Some(slot) = slots.get_mut(index) else {
                    continue;
                };
                if slot.generation != ((token & !WRITE_POLL) >> 32) as u32 {
                    continue;
                }
                let result = cqe.result();
                if token & WRITE_POLL != 0 {
                    // One-shot: space again (or an error the next send will report).
                    if let Some(source) = &slot.source {
                        source.write_armed.set(false);
                        if result >= 0 && result as u32 & CLOSED != 0 {
                            source.hup.set(true);
                        }
                        source.writable.set(true);
                        if let Some(w) = source.write_waker.take() {
                            w.wake();
                        }
                    }
                    continue;
                }
                if let Some(source) = &slot.source {
                    // An error completion (other than our own cancellation) is surfaced by
                    // letting the next syscall run and report it.
                    let events = if result >= 0 {
                        result as u32
                    } else {
                        READ_EVENTS | WRITE_EVENTS
                    };
                    if events & CLOSED != 0 {
                        source.hup.set(true);
                    }
                    if events & READ_EVENTS != 0 {
                        source.readable.set(true);
                        if let Some(w) = source.read_waker.take() {
                            w.wake();
                        }
                    }
                    // A closed or failed socket fails its next send too: let a waiting writer
                    // find out.
                    if events & WRITE_EVENTS != 0 || result < 0 {
                        source.writable.set(true);
                        if let Some(w) = source.write_waker.take() {
                            w.wake();
                        }
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

    fn fire_timers(&self) {
        let now = Instant::now();
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
