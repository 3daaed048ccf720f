//! The shard runtime: a minimal single-threaded async executor driven by one io_uring.
//!
//! Why not glommio (which DESIGN.md names): measured on the 2-core build machine with pgbench
//! `-S`, a glommio-based pgprism spent ~50 us of CPU per transaction against PgBouncer's ~22,
//! and almost all of it was glommio's park path, which runs on every sleep: a throughput
//! preemption timer, a latency timer armed and cancelled, cancellation flushes and a
//! `membarrier`, before linking its rings. A request/response proxy parks after nearly every
//! message, so it paid all of that per message. This runtime keeps the design (one pinned
//! thread per shard owning its sockets, io_uring, no locks or atomics on the hot path) and
//! does only what pgprism needs:
//!
//! * connected sockets are driven by io_uring `RECV`/`SEND` operations (channel.rs): a receive
//!   lands in a buffer the socket owns and reaches the reader as `BytesMut` without a copy; a
//!   write queues `Bytes` and is sent from them; all of a turn's operations go to the kernel
//!   with one `io_uring_enter` (readiness plus a `recv`/`send` system call per message cost
//!   4.4 system calls per pgbench transaction; this costs 0.2-0.7);
//! * listeners and the eventfd use multishot `POLL_ADD` readiness, armed once;
//! * timers are a sorted map whose earliest deadline bounds the `io_uring_enter` wait;
//! * a busy shard may wait for several completions at once (`proxy.ring-batch-wait-us`,
//!   `proxy.ring-defer-taskrun`; off by default, docs/benchmarks.md says why);
//! * other threads wake a shard through an `eventfd` (see [`Notifier`]).
//!
//! It must never block (no blocking syscalls on a shard) and never be touched from another
//! thread: its types are `!Send` on purpose.

mod channel;
pub mod net;
mod reactor;
mod timer;
mod tls;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

pub use reactor::Notifier;
pub use timer::{Sleep, sleep, sleep_until, within};

type Task = Pin<Box<dyn Future<Output = ()>>>;

struct Slot {
    generation: u32,
    task: Option<Task>,
}

/// One shard's executor. Reached through a thread-local while [`run`] is active.
pub(crate) struct Executor {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    reactor: reactor::Reactor,
}

thread_local! {
    /// Keys (generation << 32 | slot) of tasks to poll. A waker pushes onto the queue of the
    /// thread it is woken on; pgprism never moves wakers across threads, and if it ever did
    /// the wake would be lost (a stall, never memory unsafety).
    static READY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    static CURRENT: RefCell<Option<Rc<Executor>>> = const { RefCell::new(None) };
}

/// How many rounds of ready tasks run before the reactor is consulted again, so a task that
/// keeps waking itself cannot starve I/O and timers.
const ROUNDS_PER_TURN: usize = 16;

thread_local! {
    /// Bytes a socket's send queue may hold before writers wait (see channel.rs).
    static SEND_QUEUE_BYTES: Cell<usize> = const { Cell::new(64 << 10) };
}

/// Sets this thread's send queue bound (`proxy.send-queue-bytes`), before [`run`].
pub fn set_send_queue_bytes(bytes: usize) {
    SEND_QUEUE_BYTES.with(|b| b.set(bytes.max(1)));
}

fn send_queue_bytes() -> usize {
    SEND_QUEUE_BYTES.with(|b| b.get())
}

thread_local! {
    /// How long a closed socket may take to send what was queued (see channel.rs).
    static CLOSE_LINGER: Cell<std::time::Duration> =
        const { Cell::new(std::time::Duration::from_secs(5)) };
}

/// Sets this thread's close linger time (`proxy.close-linger-ms`), before [`run`].
pub fn set_close_linger(linger: std::time::Duration) {
    CLOSE_LINGER.with(|l| l.set(linger));
}

fn close_linger() -> std::time::Duration {
    CLOSE_LINGER.with(|l| l.get())
}

/// How a shard waits for I/O (`proxy.ring-batch-wait-us`, `proxy.ring-defer-taskrun`).
#[derive(Debug, Clone, Copy, Default)]
pub struct WaitPolicy {
    /// A busy shard's wait may gather completions this long before it wakes; 0: never.
    pub batch_wait_us: u32,
    /// `IORING_SETUP_DEFER_TASKRUN`: completion work runs only when the shard waits for it.
    pub defer_taskrun: bool,
}

thread_local! {
    static WAIT_POLICY: Cell<WaitPolicy> = const {
        Cell::new(WaitPolicy { batch_wait_us: 0, defer_taskrun: false })
    };
}

/// Sets this thread's wait policy, before [`run`].
pub fn set_wait_policy(policy: WaitPolicy) {
    WAIT_POLICY.with(|p| p.set(policy));
}

fn wait_policy() -> WaitPolicy {
    WAIT_POLICY.with(|p| p.get())
}

fn current() -> Rc<Executor> {
    CURRENT
        .with(|c| c.borrow().clone())
        .unwrap_or_else(|| not_in_runtime())
}

#[cold]
#[inline(never)]
fn not_in_runtime() -> ! {
    panic!("pgprism runtime function called outside a shard thread")
}

/// Spawns a task on the current shard; it runs until it finishes or the shard stops.
pub fn spawn(task: impl Future<Output = ()> + 'static) {
    let exec = current();
    let key = {
        let mut slots = exec.slots.borrow_mut();
        let index = match exec.free.borrow_mut().pop() {
            Some(index) => index,
            None => {
                slots.push(Slot {
                    generation: 0,
                    task: None,
                });
                (slots.len() - 1) as u32
            }
        };
        let slot = &mut slots[index as usize];
        slot.task = Some(Box::pin(task));
        ((slot.generation as u64) << 32) | index as u64
    };
    wake_key(key);
}

impl Executor {
    fn poll_task(&self, key: u64) {
        let index = key as u32 as usize;
        let generation = (key >> 32) as u32;
        let mut task = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(index) {
                Some(slot) if slot.generation == generation => match slot.task.take() {
                    Some(task) => task,
                    // Already finished, or a duplicate wake of a task being polled.
                    None => return,
                },
                _ => return,
            }
        };
        let waker = waker_for(key);
        let mut cx = Context::from_waker(&waker);
        match task.as_mut().poll(&mut cx) {
            Poll::Pending => {
                if let Some(slot) = self.slots.borrow_mut().get_mut(index) {
                    slot.task = Some(task);
                }
            }
            Poll::Ready(()) => {
                // Drop outside the borrow: dropping closes sockets, which reaches the reactor.
                drop(task);
                if let Some(slot) = self.slots.borrow_mut().get_mut(index) {
                    slot.generation = slot.generation.wrapping_add(1);
                }
                self.free.borrow_mut().push(index as u32);
            }
        }
    }
}

/// Runs `root` on this thread until it completes, together with every task it spawns.
/// Tasks still pending when `root` completes are dropped (their sockets close).
pub fn run(ring_entries: u32, root: impl Future<Output = ()> + 'static) -> io::Result<()> {
    let exec = Rc::new(Executor {
        slots: RefCell::new(Vec::new()),
        free: RefCell::new(Vec::new()),
        reactor: reactor::Reactor::new(ring_entries, wait_policy())?,
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(exec.clone()));
    let done = Rc::new(Cell::new(false));
    {
        let done = done.clone();
        spawn(async move {
            root.await;
            done.set(true);
        });
    }
    let mut batch = Vec::new();
    let result = loop {
        for _ in 0..ROUNDS_PER_TURN {
            READY.with(|r| std::mem::swap(&mut *r.borrow_mut(), &mut batch));
            if batch.is_empty() {
                break;
            }
            for key in batch.drain(..) {
                exec.poll_task(key);
            }
        }
        if done.get() {
            break Ok(());
        }
        let more_ready = READY.with(|r| !r.borrow().is_empty());
        if let Err(err) = exec.reactor.turn(more_ready) {
            break Err(err);
        }
    };
    // Drop every task while the reactor still exists (sockets deregister on drop).
    let tasks: Vec<Task> = exec
        .slots
        .borrow_mut()
        .iter_mut()
        .filter_map(|s| s.task.take())
        .collect();
    drop(tasks);
    // What the tasks queued last (a farewell error, a Terminate) still goes out: the
    // released channels' sends run for their linger time at most, then are cancelled; the
    // loop ends when every released channel is closed (a timer bounds each wait in case a
    // cancellation never completes).
    let _ = exec.reactor.turn(true);
    let deadline = std::time::Instant::now() + close_linger() + std::time::Duration::from_secs(1);
    let _ = exec
        .reactor
        .set_timer(deadline, None, std::task::Waker::noop().clone());
    while exec.reactor.has_released_busy() && std::time::Instant::now() < deadline {
        if exec.reactor.turn(false).is_err() {
            break;
        }
    }
    READY.with(|r| r.borrow_mut().clear());
    CURRENT.with(|c| *c.borrow_mut() = None);
    result
}

fn wake_key(key: u64) {
    READY.with(|r| {
        if let Ok(mut queue) = r.try_borrow_mut() {
            queue.push(key);
        }
    });
}

// The waker's data pointer *is* the task key (no allocation, no reference counting).
const VTABLE: RawWakerVTable = RawWakerVTable::new(
    |data| RawWaker::new(data, &VTABLE),
    |data| wake_key(data as u64),
    |data| wake_key(data as u64),
    |_| {},
);

fn waker_for(key: u64) -> Waker {
    // SAFETY: the vtable functions never dereference `data`; it is an integer key, so every
    // RawWaker contract (clone/wake/drop on any copy) holds trivially.
    unsafe { Waker::from_raw(RawWaker::new(key as *const (), &VTABLE)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn tasks_timers_and_spawn_from_tasks() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let seen = log.clone();
        let started = Instant::now();
        run(64, async move {
            let inner = seen.clone();
            spawn(async move {
                sleep(Duration::from_millis(30)).await;
                inner.borrow_mut().push("late");
            });
            seen.borrow_mut().push("root");
            sleep(Duration::from_millis(60)).await;
            assert_eq!(
                within(Duration::from_millis(10), std::future::pending::<()>()).await,
                None
            );
            assert_eq!(within(Duration::from_secs(5), async { 7 }).await, Some(7));
        })
        .unwrap();
        assert_eq!(*log.borrow(), ["root", "late"]);
        assert!(started.elapsed() >= Duration::from_millis(60));
    }
}
