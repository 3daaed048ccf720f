//! The load itself: worker threads, each running one io_uring runtime with its share of the
//! client tasks, and the rules for when a transaction is sent and how its latency is counted.
//!
//! Each thread owns its histograms and error counts (one set per target) and hands them back
//! when it ends; they are merged with `Histogram::add`. While running, a thread shares only
//! relaxed counters for the progress line, written by it alone. All threads connect their
//! clients first and start together, so connection setup is never measured.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::BenchError;
use super::client::{ClientError, ConnectParams, PgConnection};
use super::progress::Progress;
use super::workload::{Keys, Protocol, Rng, Workload};
use crate::config::PgUrl;
use crate::exec;
use crate::wire::TransactionStatus;

/// Submission queue entries per worker ring; one socket per client, few in flight.
const RING_ENTRIES: u32 = 256;
/// Highest latency the histograms track (1 hour, in microseconds); above is clamped.
pub(super) const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Histogram precision: 3 significant digits (0.1% error), HdrHistogram's usual choice.
pub(super) const SIGFIG: u8 = 3;
/// Lead between "everyone connected" and the common start, so every thread is awake for it.
const START_LEAD: Duration = Duration::from_millis(20);
/// Polling period while threads wait for each other to finish connecting (setup only).
const RENDEZVOUS_POLL: Duration = Duration::from_millis(1);
/// Attempts to replace a broken connection before the client gives up.
const RECONNECT_ATTEMPTS: u32 = 3;
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// How long a duration-mode run waits for transactions still in flight at the end (beyond
/// their own timeout) before the thread stops anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Error key for a connection that broke (I/O, protocol); SQLSTATE 08006.
pub(super) const ERROR_CONNECTION: &str = "08006";
/// Error key for a transaction abandoned after `--tx-timeout`.
pub(super) const ERROR_TIMEOUT: &str = "timeout";

pub(super) struct Target {
    pub label: String,
    pub url: PgUrl,
    pub params: ConnectParams,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Stop {
    /// Measure for this long (after the warm-up).
    Duration(Duration),
    /// Measure this many transactions per target (after the warm-up).
    Transactions(u64),
}

/// Everything the run needs, shared read-only by all threads.
pub(super) struct Plan {
    pub targets: Vec<Target>,
    pub workload: Workload,
    pub protocol: Protocol,
    /// Connections per target.
    pub clients: usize,
    pub threads: usize,
    pub stop: Stop,
    /// Transactions per second per target; `None` is a closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub seed: u64,
    pub tx_timeout: Duration,
}

/// One thread's progress counters for one target; padded so threads never share a line.
#[repr(align(64))]
#[derive(Default)]
pub(super) struct Counters {
    /// Measured transactions that completed.
    pub done: AtomicU64,
    /// Measured transactions that failed.
    pub failed: AtomicU64,
}

impl Counters {
    /// Only the owning thread writes, so a load and a store replace a locked add.
    fn bump(counter: &AtomicU64) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// What the threads share: the start rendezvous and the progress counters.
pub(super) struct Shared {
    /// Threads done connecting (successfully or not).
    ready: AtomicUsize,
    abort: AtomicBool,
    /// When the run starts (the warm-up, then measuring); set once everyone is connected.
    pub start: OnceLock<Instant>,
    /// `[thread * targets + target]`.
    pub counters: Vec<Counters>,
    pub targets: usize,
}

impl Shared {
    pub(crate) fn totals(&self, target: usize) -> (u64, u64) {
        self.counters
            .iter()
            .skip(target)
            .step_by(self.targets)
            .fold((0, 0), |(done, failed), c| {
                (
                    done + c.done.load(Ordering::Relaxed),
                    failed + c.failed.load(Ordering::Relaxed),
                )
            })
    }
}

/// One target's results (one thread's share, or merged).
pub(crate) struct TargetStats {
    pub histogram: Histogram<u64>,
    /// Measured transactions that completed (= samples in the histogram).
    pub count: u64,
    /// Measured transactions that failed, by SQLSTATE (or [`ERROR_CONNECTION`] /
    /// [`ERROR_TIMEOUT`]).
    pub errors: BTreeMap<String, u64>,
    /// When the last measured transaction ended.
    pub last_finish: Option<Instant>,
}

impl TargetStats {
    fn new() -> TargetStats {
        TargetStats {
            // Cannot fail: the bounds are constants within the crate's limits.
            histogram: Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGFIG)
                .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
            count: 0,
            errors: BTreeMap::new(),
            last_finish: None,
        }
    }

    fn merge(&mut self, other: TargetStats) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.histogram.add(&other.histogram);
        self.count += other.count;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.last_finish = self.last_finish.max(other.last_finish);
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The merged result of a run.
pub(crate) struct Outcome {
    pub targets: Vec<TargetStats>,
    /// When measuring began (start + warm-up).
    pub measure_start: Instant,
}

impl Outcome {
    /// The measured time of one target: from the start of measuring to its last completion
    /// (for a duration run, about the duration).
    pub(crate) fn elapsed(&self, target: usize) -> Duration {
        self.targets[target]
            .last_finish
            .map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(self.measure_start)
            })
    }
}

/// One client's assignment.
#[derive(Clone, Copy, Debug)]
struct ClientSpec {
    target: usize,
    /// Index among the target's clients (spreads constant-rate schedules).
    index: usize,
    /// Measured transactions to run, for `Stop::Transactions`.
    budget: Option<u64>,
    seed: u64,
}

fn client_specs(plan: &Plan) -> Vec<Vec<ClientSpec>> {
    let mut per_thread = vec![Vec::new(); plan.threads];
    let mut global = 0usize;
    for target in 0..plan.targets.len() {
        for index in 0..plan.clients {
            let budget = match plan.stop {
                Stop::Transactions(n) => {
                    let clients = plan.clients as u64;
                    Some(n / clients + u64::from((index as u64) < n % clients))
                }
                Stop::Duration(_) => None,
            };
            if budget == Some(0) {
                // More clients than transactions: this one would only connect.
                continue;
            }
            // Different, reproducible streams of keys per client.
            let seed = plan
                .seed
                .wrapping_add((global as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
            per_thread[global % plan.threads].push(ClientSpec {
                target,
                index,
                budget,
                seed,
            });
            global += 1;
        }
    }
    per_thread
}

/// Runs the load on `plan.threads` threads, drawing `progress` from this thread meanwhile.
pub(super) fn run(plan: Arc<Plan>, mut progress: Progress) -> Result<Outcome, BenchError> {
    let targets = plan.targets.len();
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
        start: OnceLock::new(),
        counters: (0..plan.threads * targets)
            .map(|_| Counters::default())
            .collect(),
        targets,
    });
    let mut handles = Vec::with_capacity(plan.threads);
    for (thread, specs) in client_specs(&plan).into_iter().enumerate() {
        let (plan, for_thread) = (plan.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("bench-{thread}"))
            .spawn(move || worker(thread, specs, plan, for_thread));
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(source) => {
                // Threads already started must not wait for this one forever.
                shared.abort.store(true, Ordering::SeqCst);
                return Err(BenchError::Thread {
                    index: thread,
                    source,
                });
            }
        }
    }
    while !handles.iter().all(|h| h.is_finished()) {
        progress.tick(&shared);
        std::thread::sleep(progress.period());
    }
    progress.finish(&shared);
    let mut merged: Vec<TargetStats> = (0..targets).map(|_| TargetStats::new()).collect();
    let mut first_error = None;
    for (index, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(stats)) => {
                for (into, from) in merged.iter_mut().zip(stats) {
                    into.merge(from);
                }
            }
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(_) => {
                first_error.get_or_insert(BenchError::WorkerPanicked { index });
            }
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    let start = shared.start.get().copied().unwrap_or_else(Instant::now);
    Ok(Outcome {
        targets: merged,
        measure_start: start + plan.warmup,
    })
}

/// Wakes one waiting task when the last client task ends.
struct Countdown {
    left: Cell<usize>,
    waker: Cell<Option<Waker>>,
}

impl Countdown {
    fn done(&self) {
        self.left.set(self.left.get().saturating_sub(1));
        if self.left.get() == 0
            && let Some(waker) = self.waker.take()
        {
            waker.wake();
        }
    }

    async fn wait(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.left.get() == 0 {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }
}

/// State of one worker thread, shared by its client tasks (single-threaded: `Rc`/`RefCell`).
struct Worker {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    thread: usize,
    stats: RefCell<Vec<TargetStats>>,
    countdown: Countdown,
}

/// How one transaction ended.
enum Ending<'a> {
    Committed,
    /// Server error (SQLSTATE) or a client-side key; the connection may be gone.
    Failed(&'a str),
}

impl Worker {
    fn record(&self, target: usize, latency: Duration, ending: Ending<'_>, finished: Instant) {
        let counters = &self.shared.counters[self.thread * self.shared.targets + target];
        let mut stats = self.stats.borrow_mut();
        let stats = &mut stats[target];
        stats.last_finish = Some(finished);
        match ending {
            Ending::Committed => {
                Counters::bump(&counters.done);
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                stats.histogram.saturating_record(us);
                stats.count += 1;
            }
            Ending::Failed(code) => {
                Counters::bump(&counters.failed);
                match stats.errors.get_mut(code) {
                    Some(n) => *n += 1,
                    None => {
                        stats.errors.insert(code.to_string(), 1);
                    }
                }
            }
        }
    }
}

fn worker(
    thread: usize,
    specs: Vec<ClientSpec>,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
) -> Result<Vec<TargetStats>, BenchError> {
    let targets = plan.targets.len();
    let state = Rc::new(Worker {
        plan: plan.clone(),
        shared: shared.clone(),
        thread,
        stats: RefCell::new((0..targets).map(|_| TargetStats::new()).collect()),
        countdown: Countdown {
            left: Cell::new(specs.len()),
            waker: Cell::new(None),
        },
    });
    let failure: Rc<RefCell<Option<BenchError>>> = Rc::new(RefCell::new(None));
    let root = {
        let (state, failure) = (state.clone(), failure.clone());
        async move {
            let mut clients = Vec::with_capacity(specs.len());
            for spec in specs {
                match open(&state.plan, spec.target).await {
                    Ok(conn) => clients.push((spec, conn)),
                    Err(err) => {
                        *failure.borrow_mut() = Some(err);
                        // Before `ready`: a thread that sees everyone ready also sees this.
                        state.shared.abort.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
            state.shared.ready.fetch_add(1, Ordering::SeqCst);
            let Some(start) = rendezvous(&state.shared, state.plan.threads).await else {
                return;
            };
            for (spec, conn) in clients {
                exec::spawn(client(spec, conn, state.clone(), start));
            }
            match state.plan.stop {
                Stop::Duration(d) => {
                    let end = start + state.plan.warmup + d;
                    let limit = end.saturating_duration_since(Instant::now())
                        + state.plan.tx_timeout
                        + DRAIN_GRACE;
                    if exec::within(limit, state.countdown.wait()).await.is_none() {
                        tracing::warn!(thread, "clients still busy after the end; stopping them");
                    }
                }
                // Every transaction is bounded by its timeout and every client by its budget.
                Stop::Transactions(_) => state.countdown.wait().await,
            }
        }
    };
    exec::run(RING_ENTRIES, root).map_err(|err| {
        // The ring could not be built, so this thread never reached the rendezvous: release
        // the others waiting there.
        shared.abort.store(true, Ordering::SeqCst);
        BenchError::Runtime(err)
    })?;
    if let Some(err) = failure.take() {
        return Err(err);
    }
    Ok(state.stats.replace(Vec::new()))
}

/// Waits until every thread has connected its clients; `None` if one of them failed.
async fn rendezvous(shared: &Shared, threads: usize) -> Option<Instant> {
    loop {
        // `ready` before `abort`: a failing thread sets `abort` before counting itself.
        let ready = shared.ready.load(Ordering::SeqCst);
        if shared.abort.load(Ordering::SeqCst) {
            return None;
        }
        if ready >= threads {
            return Some(*shared.start.get_or_init(|| Instant::now() + START_LEAD));
        }
        // Bounded: every thread's connects are bounded by the connect timeout.
        exec::sleep(RENDEZVOUS_POLL).await;
    }
}

/// Connects one client to `target` and prepares the workload's statements.
async fn open(plan: &Plan, target: usize) -> Result<PgConnection, BenchError> {
    let t = &plan.targets[target];
    let mut conn =
        PgConnection::connect(&t.params)
            .await
            .map_err(|source| BenchError::Connect {
                label: t.label.clone(),
                url: t.url.masked(),
                source: Box::new(source),
            })?;
    if plan.protocol == Protocol::Prepared {
        for (index, statement) in plan.workload.statements().iter().enumerate() {
            conn.prepare(statement.name(), statement.prepared_sql(), &[])
                .await
                .map_err(|source| BenchError::Setup {
                    label: t.label.clone(),
                    url: t.url.masked(),
                    step: format!("preparing statement {}", index + 1),
                    hint: String::new(),
                    source: Box::new(source),
                })?;
        }
    }
    Ok(conn)
}

/// When one client sends: on a constant-rate schedule, or at once (a closed loop).
struct Schedule {
    interval: Option<Duration>,
    next_at: Instant,
}

impl Schedule {
    fn new(plan: &Plan, index: usize, start: Instant) -> Schedule {
        // Constant rate: this client sends every `clients / rate` seconds, its schedule offset
        // by its index so the target's clients do not send in bursts.
        let interval = plan
            .rate
            .map(|rate| Duration::from_secs_f64(plan.clients as f64 / rate));
        let next_at = start
            + interval.map_or(Duration::ZERO, |iv| {
                iv.mul_f64(index as f64 / plan.clients as f64)
            });
        Schedule { interval, next_at }
    }

    /// When the next transaction should be sent.
    fn next(&mut self) -> Instant {
        match self.interval {
            Some(iv) => {
                let at = self.next_at;
                self.next_at += iv;
                at
            }
            None => Instant::now(),
        }
    }

    fn is_constant_rate(&self) -> bool {
        self.interval.is_some()
    }
}

/// One client: sends transactions until its stop condition, recording each one.
async fn client(spec: ClientSpec, conn: PgConnection, state: Rc<Worker>, start: Instant) {
    let plan = state.plan.clone();
    let measure_start = start + plan.warmup;
    let end = match plan.stop {
        Stop::Duration(d) => Some(measure_start + d),
        Stop::Transactions(_) => None,
    };
    let mut schedule = Schedule::new(&plan, spec.index, start);
    let mut rng = Rng::new(spec.seed);
    let mut scratch = String::new();
    let mut measured = 0u64;
    let mut conn = Some(conn);
    // Every thread's clients begin together, at `start`.
    exec::sleep_until(start).await;
    loop {
        let intended = schedule.next();
        if end.is_some_and(|end| intended >= end) || spec.budget.is_some_and(|b| measured >= b) {
            break;
        }
        // Behind schedule: send at once, never skip (the delay shows in the latency).
        if intended > Instant::now() {
            exec::sleep_until(intended).await;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match reconnect(&plan, spec.target, end).await {
                Some(c) => conn.insert(c),
                None => break,
            },
        };
        let keys = plan.workload.draw(&mut rng);
        let sent = Instant::now();
        let result = exec::within(
            plan.tx_timeout,
            transaction(c, &plan.workload, plan.protocol, &keys, &mut scratch),
        )
        .await;
        let finished = Instant::now();
        // Constant rate measures from the intended send time (coordinated omission);
        // a closed loop from the actual send.
        let from = if schedule.is_constant_rate() {
            intended
        } else {
            sent
        };
        let ending = ending(&result, &plan.targets[spec.target].label);
        let connection_broken = !matches!(result, Some(Ok(()) | Err(ClientError::Server(_))));
        if from >= measure_start {
            measured += 1;
            state.record(spec.target, finished - from, ending, finished);
        }
        if connection_broken {
            conn = None;
        }
    }
    if let Some(conn) = conn {
        conn.close().await;
    }
    state.countdown.done();
}

/// How a transaction ended: its result, or `None` when it ran past `--tx-timeout`.
fn ending<'a>(result: &'a Option<Result<(), ClientError>>, label: &str) -> Ending<'a> {
    match result {
        Some(Ok(())) => Ending::Committed,
        Some(Err(ClientError::Server(err))) => Ending::Failed(err.code.as_str()),
        Some(Err(err)) => {
            tracing::debug!(target = %label, error = %err, "connection lost");
            Ending::Failed(ERROR_CONNECTION)
        }
        None => Ending::Failed(ERROR_TIMEOUT),
    }
}

/// Replaces a broken connection, a bounded number of times; `None` ends the client.
async fn reconnect(plan: &Plan, target: usize, end: Option<Instant>) -> Option<PgConnection> {
    for attempt in 1..=RECONNECT_ATTEMPTS {
        exec::sleep(RECONNECT_PAUSE).await;
        if end.is_some_and(|end| Instant::now() >= end) {
            return None;
        }
        match open(plan, target).await {
            Ok(conn) => return Some(conn),
            Err(err) => {
                tracing::warn!(attempt, error = %err, "reconnect failed");
            }
        }
    }
    tracing::warn!(target = %plan.targets[target].label, "giving up on a client after {RECONNECT_ATTEMPTS} failed reconnects");
    None
}

/// Runs one transaction's statements; after a server error inside a transaction block, rolls
/// back so the connection is idle again.
async fn transaction(
    conn: &mut PgConnection,
    workload: &Workload,
    protocol: Protocol,
    keys: &Keys,
    scratch: &mut String,
) -> Result<(), ClientError> {
    let result = statements(conn, workload, protocol, keys, scratch).await;
    if let Err(ClientError::Server(_)) = &result
        && conn.transaction_status() != TransactionStatus::Idle
    {
        conn.simple_query("ROLLBACK").await?;
    }
    result
}

async fn statements(
    conn: &mut PgConnection,
    workload: &Workload,
    protocol: Protocol,
    keys: &Keys,
    scratch: &mut String,
) -> Result<(), ClientError> {
    for statement in workload.statements() {
        match protocol {
            Protocol::Simple => {
                scratch.clear();
                statement.render(keys, scratch);
                conn.simple_query(scratch).await?;
            }
            Protocol::Prepared => {
                let params = statement.params(keys, scratch);
                conn.execute_prepared(statement.name(), params.as_slice())
                    .await?;
            }
        }
    }
    Ok(())
}
