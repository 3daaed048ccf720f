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
//! * other threads wake a shard through an `eventfd` (see [`Notifier`]);
//! * a task woken several times before its poll is polled once, and a task of several parts
//!   ([`join3`], a compare session's halves) polls only the parts that were woken.
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
    /// The parts woken since the task was last polled (see [`join3`]); 0: not queued.
    woken: u8,
}

/// One shard's executor. Reached through a thread-local while [`run`] is active.
pub(crate) struct Executor {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    reactor: reactor::Reactor,
}

thread_local! {
    /// Keys (see [`key`]) of tasks to poll. A waker pushes onto the queue of the thread it
    /// is woken on; pgprism never moves wakers across threads, and if it ever did the wake
    /// would be lost (a stall, never memory unsafety).
    static READY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    static CURRENT: RefCell<Option<Rc<Executor>>> = const { RefCell::new(None) };
    /// The task being polled (its key with [`WHOLE`]), or `u64::MAX`; the parts of it woken
    /// for this poll; and those woken during it, which [`join3`] may poll in the same pass
    /// and the executor queues again for the rest.
    static POLLING: Cell<u64> = const { Cell::new(u64::MAX) };
    static WOKEN: Cell<u8> = const { Cell::new(0) };
    static REWOKEN: Cell<u8> = const { Cell::new(0) };
    /// A [`join3`] took this poll's parts (a second one in the same poll polls all of its).
    static CLAIMED: Cell<bool> = const { Cell::new(false) };
}

/// A waker's key: the task's slot (bits 0..32), the parts of the task it wakes (bits
/// 32..40: [`WHOLE`] for the task's own waker, one bit per part of a [`join3`]) and the
/// slot's generation (bits 40..64, 24 of them: a stale waker of a reused slot only causes a
/// spurious poll, which every future tolerates).
fn key(index: u32, generation: u32, parts: u8) -> u64 {
    ((generation as u64 & GENERATION_MASK) << 40) | ((parts as u64) << 32) | index as u64
}

const GENERATION_MASK: u64 = (1 << 24) - 1;
/// Every part of a task: what its own waker wakes.
const WHOLE: u8 = u8::MAX;

fn key_parts(key: u64) -> u8 {
    (key >> 32) as u8
}

/// The key without its parts: which task (slot and generation) it wakes.
fn key_task(key: u64) -> u64 {
    key & !(0xFF << 32)
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
                    woken: 0,
                });
                (slots.len() - 1) as u32
            }
        };
        let slot = &mut slots[index as usize];
        slot.task = Some(Box::pin(task));
        slot.woken = 0;
        key(index, slot.generation, WHOLE)
    };
    wake_key(key);
}

impl Executor {
    /// Notes a woken key: returns the slot's index when the task was not queued yet (a
    /// task woken several times before its poll, by several parts or by the same one, is
    /// polled once, for all of them).
    fn schedule(&self, key: u64) -> Option<u32> {
        let index = key as u32;
        let generation = (key >> 40) & GENERATION_MASK;
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(index as usize)?;
        if slot.generation as u64 & GENERATION_MASK != generation || slot.task.is_none() {
            return None;
        }
        let was = slot.woken;
        slot.woken |= key_parts(key);
        (was == 0).then_some(index)
    }

    fn poll_task(&self, index: u32) {
        let (mut task, generation, woken) = {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(index as usize) else {
                return;
            };
            let woken = std::mem::take(&mut slot.woken);
            match slot.task.take() {
                Some(task) => (task, slot.generation, woken),
                // Already finished.
                None => return,
            }
        };
        let key = key(index, generation, WHOLE);
        let waker = waker_for(key);
        let mut cx = Context::from_waker(&waker);
        POLLING.set(key);
        WOKEN.set(woken);
        REWOKEN.set(0);
        CLAIMED.set(false);
        let polled = task.as_mut().poll(&mut cx);
        POLLING.set(u64::MAX);
        WOKEN.set(0);
        let rewoken = REWOKEN.take();
        match polled {
            Poll::Pending => {
                if let Some(slot) = self.slots.borrow_mut().get_mut(index as usize) {
                    slot.task = Some(task);
                }
                // Woken while it was polled (by itself, or one part by another after that
                // part's turn in the pass): polled again in the next round.
                if rewoken != 0 {
                    push_ready(key_task(key) | ((rewoken as u64) << 32));
                }
            }
            Poll::Ready(()) => {
                // Drop outside the borrow: dropping closes sockets, which reaches the reactor.
                drop(task);
                if let Some(slot) = self.slots.borrow_mut().get_mut(index as usize) {
                    slot.generation = slot.generation.wrapping_add(1);
                    slot.woken = 0;
                }
                self.free.borrow_mut().push(index);
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
    let mut polls = Vec::new();
    let result = loop {
        for _ in 0..ROUNDS_PER_TURN {
            READY.with(|r| std::mem::swap(&mut *r.borrow_mut(), &mut batch));
            if batch.is_empty() {
                break;
            }
            polls.extend(batch.drain(..).filter_map(|key| exec.schedule(key)));
            for index in polls.drain(..) {
                exec.poll_task(index);
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

/// Runs three parts of one task (a session's halves) to their ends, as `zip` would, but
/// polls only the parts that were woken: each part gets a waker of its own (the task's key
/// with the part's bit), and one part woken by another earlier in the same pass (a socket
/// read that completes what a later part waits for) is polled in that pass. A compare
/// session's client side, pump and shadow writer were polled all three on each of the ~19
/// wake-ups of a pgbench `-N` transaction, whichever was woken.
///
/// What this asks of the parts: a part that waits on state another part changes must
/// register its waker where that part wakes it (a `zip` polled every part on any wake, so
/// such a wait could work without one). Where a part is not the top of the task's future
/// (polled with another waker than the task's own, or a second `join3` in one poll), every
/// part is polled on every poll with the waker it was given, as `zip` does.
pub async fn join3(
    a: impl Future<Output = ()>,
    b: impl Future<Output = ()>,
    c: impl Future<Output = ()>,
) {
    let mut parts: [Pin<&mut dyn Future<Output = ()>>; 3] =
        [std::pin::pin!(a), std::pin::pin!(b), std::pin::pin!(c)];
    let mut done = [false; 3];
    const PARTS: u8 = 0b111;
    std::future::poll_fn(|cx| {
        let own = POLLING.get();
        let ours = cx.waker().data() as u64 == own
            && std::ptr::eq(cx.waker().vtable(), &VTABLE)
            && !CLAIMED.replace(true);
        let mut woken = if ours { WOKEN.take() } else { WHOLE };
        for (i, part) in parts.iter_mut().enumerate() {
            let bit = 1u8 << i;
            if ours {
                // Woken by an earlier part in this pass: its turn comes now. (Only the parts'
                // bits: the rest of a whole-task wake stays for the executor.)
                let rewoken = REWOKEN.get();
                woken |= rewoken & PARTS;
                REWOKEN.set(rewoken & !PARTS);
            }
            if done[i] || woken & bit == 0 {
                continue;
            }
            woken &= !bit;
            let polled = if ours {
                let waker = waker_for(key_task(own) | ((bit as u64) << 32));
                part.as_mut().poll(&mut Context::from_waker(&waker))
            } else {
                part.as_mut().poll(cx)
            };
            done[i] = polled.is_ready();
        }
        if ours {
            // Parts woken after their turn (or by themselves): the next poll's.
            let mut again = woken & PARTS;
            for (i, done) in done.iter().enumerate() {
                if *done {
                    again &= !(1 << i);
                }
            }
            REWOKEN.set(REWOKEN.get() | again);
        }
        if done.iter().all(|d| *d) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

fn wake_key(key: u64) {
    if key_task(key) == key_task(POLLING.get()) {
        // The task being polled: noted for the rest of its poll (see [`join3`]).
        REWOKEN.set(REWOKEN.get() | key_parts(key));
        return;
    }
    push_ready(key);
}

fn push_ready(key: u64) {
    READY.with(|r| {
        if let Ok(mut queue) = r.try_borrow_mut() {
            queue.push(key);
        }
    });
}

// The waker's data pointer *is* the task key (no allocation, no reference counting). A
// static, so that every waker points at the one table ([`join3`] recognises the task's own).
static VTABLE: RawWakerVTable = RawWakerVTable::new(
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

    /// A flag one part sets and another waits on, with the waiter's waker.
    #[derive(Default)]
    struct Signal {
        set: Cell<bool>,
        waker: Cell<Option<Waker>>,
    }

    impl Signal {
        fn raise(&self) {
            self.set.set(true);
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }

        async fn wait(&self, polls: &Cell<u32>) {
            std::future::poll_fn(|cx| {
                polls.set(polls.get() + 1);
                if self.set.get() {
                    return Poll::Ready(());
                }
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await
        }
    }

    #[test]
    fn join3_polls_only_the_parts_woken() {
        let counts = Rc::new([const { Cell::new(0u32) }; 4]);
        let seen = counts.clone();
        run(64, async move {
            let (first, third) = (Signal::default(), Signal::default());
            let c = &seen;
            let parts = join3(
                // Woken by the third part, after its own turn in that pass: polled again in
                // the next poll of the task.
                first.wait(&c[0]),
                async {
                    std::future::poll_fn(|_| {
                        c[1].set(c[1].get() + 1);
                        Poll::Ready(())
                    })
                    .await;
                    sleep(Duration::from_millis(5)).await;
                    c[1].set(c[1].get() + 1);
                    // The third part's turn comes after this one's in the same pass.
                    third.raise();
                },
                async {
                    third.wait(&c[2]).await;
                    first.raise();
                },
            );
            let mut parts = std::pin::pin!(parts);
            // Counts the task's polls (the same waker: the parts keep their own).
            std::future::poll_fn(|cx| {
                c[3].set(c[3].get() + 1);
                parts.as_mut().poll(cx)
            })
            .await;
        })
        .unwrap();
        // A `zip` polls every part on each of the task's 3 polls (first, timer, first's
        // wake): the waiting parts would count 3 each.
        let polls: Vec<u32> = counts.iter().map(Cell::get).collect();
        assert_eq!(
            polls,
            [2, 2, 2, 3],
            "first, second, third part, and the task"
        );
    }
}
