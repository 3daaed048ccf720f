//! A shard: one executor thread pinned to one core, with its own listener, its client
//! sessions and their backend sockets, its counters and histograms. It talks to the control
//! thread only through a bounded ring and a stop notifier, both off the per-message path.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use socket2::Socket;

use crate::exec::net::{Listener, Stream};
use crate::exec::{self, Notifier};

use crate::mirror::MirrorTarget;
use crate::proxy::{ProxySettings, ShardCtx, serve_client};
use crate::stats::fingerprints::Fingerprints;
use crate::stats::{ShardReport, ShardStats};

use super::placement::{self, Handed, Placement, Route};

/// How often a drain looks for sessions that became idle.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Everything a shard starts with, built on the main thread by `spawn`.
pub(super) struct ShardPlan {
    pub index: usize,
    /// The shard's listening sockets: its TCP socket of the SO_REUSEPORT group (more than one
    /// after an upgrade to fewer shards), and its dup of the Unix-domain listener, if any.
    pub sockets: Vec<Socket>,
    /// Sockets an upgrade added, which listen only once the process is ready: registered
    /// after `open`.
    pub pending: Vec<Socket>,
    /// Told once the shard's ring, listeners and context exist.
    pub started: Option<crossbeam_channel::Sender<()>>,
    /// Notified when the process is ready: the shard accepts from then on.
    pub open: Notifier,
    /// Set before `stop` when the process hands over to a new one (an upgrade): sessions end
    /// on their own until the drain timeout instead of being closed as soon as they are idle.
    pub patient: Arc<AtomicBool>,
    pub context: ContextPlan,
    pub report_interval: Duration,
    pub drain_timeout: Duration,
    pub reports: Sender<ShardReport>,
    pub stop: Notifier,
    /// Which shard serves a client this one accepts (None: this one, always).
    pub placement: Option<Arc<Placement>>,
}

/// What the shard's [`ShardCtx`] (its sessions' shared state) is built from.
pub(super) struct ContextPlan {
    pub settings: ProxySettings,
    pub read_chunk_bytes: usize,
    pub latency_us_max: u64,
    pub mirrors: Vec<crate::mirror::Resolved>,
    pub fingerprints_max: usize,
    pub compare: Option<crate::compare::Resolved>,
    /// Transaction pooling and the console, when configured.
    pub pooling: super::spawn::PoolingPlan,
    /// Carries clients' cancels to the shadow and mirrors (None: neither configured).
    pub cancel_registry: Option<crate::backend::cancel::Registry>,
    /// The primary URL's credentials (pooled connections of that user log in with them).
    pub primary_user: String,
    pub primary_password: String,
    pub shards: usize,
}

/// The shard's life: accept until told to stop, drain, send the final report.
pub(super) async fn run(plan: ShardPlan) {
    let Some(mut listeners) = register_listeners(plan.index, plan.sockets) else {
        return;
    };
    let Some(shard) = context(plan.index, plan.context) else {
        return;
    };
    if let Some(started) = plan.started {
        let _ = started.send(());
    }
    // Nothing is accepted before the process is ready (a stop notifies `open` too, and the
    // stop is then seen first below).
    if let Err(err) = plan.open.notified().await {
        tracing::error!(shard = plan.index, error = %err, "open notifier failed");
        return;
    }
    match register_listeners(plan.index, plan.pending) {
        Some(late) => listeners.extend(late),
        None => return,
    }
    if let Some(placement) = plan.placement.clone()
        && placement.rebalance_clients_max() > 0
        && shard.settings.transaction_pooling
    {
        shard.set_mover(mover(&shard, placement));
    }
    let clients = Clients::default();
    let placing = Placing {
        shard: &shard,
        clients: &clients,
        placement: plan.placement.as_ref(),
    };
    serve_until_stopped(
        &placing,
        &listeners,
        &plan.reports,
        plan.report_interval,
        &plan.stop,
    )
    .await;
    placing.close();
    drop(listeners);
    drain(&placing, plan.drain_timeout, &plan.patient).await;
    placing.refuse_queued();
    // The final report must arrive: it carries the exact totals. Block briefly if needed;
    // the shard has no sessions left to delay.
    let _ = plan
        .reports
        .send_timeout(report(&shard), Duration::from_secs(1));
}

/// How this shard's pooled clients move to another shard (through its hand-over queue).
fn mover(shard: &Rc<ShardCtx>, placement: Arc<Placement>) -> crate::proxy::Mover {
    // Weak: the shard holds its mover.
    let here = Rc::downgrade(shard);
    Rc::new(move |to, fd, moved| {
        let Err(back) = placement.move_client(to, fd, moved) else {
            return Ok(());
        };
        let Handed {
            fd,
            unix,
            accepted,
            counted,
            moved,
        } = back;
        if let Some(moved) = moved {
            return Err((fd, moved));
        }
        // The race with a stopping shard gave back a fresh connection instead (the client
        // that moved is served by that shard's drain, or refused with 57P01): served here.
        if let Some(shard) = here.upgrade()
            && let Ok(stream) = Stream::adopt(fd, unix)
        {
            exec::spawn(async move {
                let _counted = counted;
                serve_client(shard, stream, accepted).await;
            });
        }
        Ok(())
    })
}

/// Registers the shard's listening sockets with its executor; `None` (logged) when one fails.
fn register_listeners(index: usize, sockets: Vec<Socket>) -> Option<Vec<Listener>> {
    let mut listeners = Vec::with_capacity(sockets.len());
    for socket in sockets {
        match Listener::from_socket(socket) {
            Ok(listener) => listeners.push(listener),
            Err(err) => {
                tracing::error!(shard = index, error = %err, "cannot register a listener");
                return None;
            }
        }
    }
    Some(listeners)
}

/// Builds the shard's context: mirror targets, fingerprints, the compiled compare rules;
/// `None` (logged) when the rules do not compile.
fn context(index: usize, plan: ContextPlan) -> Option<Rc<ShardCtx>> {
    let mirrors: Vec<_> = plan
        .mirrors
        .iter()
        .enumerate()
        .map(|(i, m)| MirrorTarget::on_shard(i, m, plan.latency_us_max, index))
        .collect();
    let fingerprints = Rc::new(Fingerprints::new(
        plan.fingerprints_max,
        mirrors.len(),
        plan.latency_us_max,
    ));
    let compare = match &plan.compare {
        None => None,
        Some(resolved) => {
            match crate::compare::CompareTarget::new(
                resolved,
                plan.settings.primary_addr.clone(),
                index,
            ) {
                Ok(target) => Some(target),
                Err(err) => {
                    let error = crate::config::error_text(&err);
                    tracing::error!(shard = index, %error, "cannot compile [compare] rules");
                    return None;
                }
            }
        }
    };
    let pooling = match plan.pooling {
        None => crate::proxy::Pooling::default(),
        Some(shared) => {
            let upstream = crate::backend::pool::Upstream {
                addr: plan.settings.primary_addr.clone(),
                label: plan.settings.primary_label.clone(),
                tls: plan.settings.primary_tls.clone(),
                connect_timeout: plan.settings.connect_timeout,
                message_bytes_max: plan.settings.message_bytes_max,
                url_user: plan.primary_user.clone(),
                url_password: plan.primary_password.clone(),
            };
            let secrets = crate::proxy::Secrets::new(
                shared.cfg.auth_type,
                shared.userlist.clone(),
                shared.cfg.auth_query.clone(),
                shared.cfg.auth_user.clone(),
            );
            let pools = crate::backend::pool::Pools::new(
                index,
                shared.cfg.clone(),
                upstream,
                shared.budgets.clone(),
                plan.shards,
            );
            crate::proxy::Pooling {
                pools: Some(Rc::new(pools)),
                cancel_keys: shared.cancel_keys.clone(),
                console: Some(shared.console.clone()),
                secrets: Some(Rc::new(secrets)),
            }
        }
    };
    Some(Rc::new(
        ShardCtx::new(
            index,
            plan.settings,
            ShardStats::new(plan.latency_us_max),
            plan.read_chunk_bytes,
            mirrors,
            fingerprints,
            compare,
        )
        .with_pooling(pooling)
        .with_cancel_registry(plan.cancel_registry),
    ))
}

/// Accepts (and reports) until the control thread asks the shard to stop.
async fn serve_until_stopped(
    placing: &Placing<'_>,
    listeners: &[Listener],
    reports: &Sender<ShardReport>,
    report_interval: Duration,
    stop: &Notifier,
) {
    let shard = placing.shard;
    let reporter = async {
        loop {
            exec::sleep(report_interval).await;
            if let Some(compare) = &shard.compare {
                compare.maintain();
            }
            send_report(shard, reports);
        }
    };
    let accepting = async {
        futures_lite::future::zip(accept_all(listeners, placing), placing.adopt_handed()).await;
    };
    let stopped = async {
        if let Err(err) = stop.notified().await {
            tracing::error!(shard = shard.index, error = %err, "stop notifier failed");
        }
    };
    let pool_care = async {
        match &shard.pools {
            Some(_) => crate::proxy::pool_care(shard.clone()).await,
            None => futures_lite::future::pending().await,
        }
    };
    let cancels = shard.serve_cancels();
    futures_lite::future::or(stopped, async {
        futures_lite::future::zip(
            accepting,
            futures_lite::future::zip(reporter, futures_lite::future::zip(pool_care, cancels)),
        )
        .await;
    })
    .await;
}

/// The client connections a shard serves, counted from accept to the end of `serve_client`:
/// unlike the sessions, this includes clients still in their startup and authentication.
#[derive(Default)]
struct Clients(Rc<Cell<usize>>);

impl Clients {
    /// Counts one client until the returned guard is dropped.
    fn count(&self) -> ClientCounted {
        self.0.set(self.0.get() + 1);
        ClientCounted(self.0.clone())
    }
}

struct ClientCounted(Rc<Cell<usize>>);

impl Drop for ClientCounted {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Closes sessions as they become idle until none is left (and pooled mirrors sent what their
/// sessions left them) or `drain_timeout` passes, then closes the busy ones too. A `patient`
/// drain (after an upgrade) closes no session before the timeout: its client may still send
/// a transaction, and only this process can run it. The flag is read every turn: a SIGTERM
/// during a patient drain makes it an ordinary one.
async fn drain(placing: &Placing<'_>, drain_timeout: Duration, patient: &AtomicBool) {
    let (shard, clients) = (placing.shard, placing.clients);
    let deadline = Instant::now() + drain_timeout;
    loop {
        // Connections other shards queued for this one before it closed are clients like
        // those in their startup: served, and closed as idle or to their end.
        placing.adopt_queued();
        // A client still in its startup is no session yet, but it will be one: wait for it
        // (it is closed as idle, or served to its end, like the others), never drop it.
        let none_left = shard.sessions_active() == 0 && clients.0.get() == 0;
        if !patient.load(Ordering::Acquire) || none_left {
            // Patient or not, with no session left this closes the idle pooled servers.
            shard.close_idle_sessions(false);
        }
        if none_left && shard.mirrors.iter().all(|m| m.flushed()) {
            break;
        }
        if Instant::now() >= deadline {
            let forced = shard.close_idle_sessions(true);
            tracing::warn!(
                shard = shard.index,
                sessions = forced,
                "drain timeout: closing busy sessions"
            );
            // Let the closed sessions run their teardown before the executor stops.
            exec::sleep(DRAIN_POLL).await;
            break;
        }
        exec::sleep(DRAIN_POLL).await;
    }
}

/// Accepts from every listener of the shard until the shard stops (the future is dropped).
async fn accept_all(listeners: &[Listener], placing: &Placing<'_>) {
    type Accepting<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;
    let mut loops: Vec<Accepting<'_>> = listeners
        .iter()
        .map(|l| Box::pin(accept_loop(l, placing)) as Accepting<'_>)
        .collect();
    // Each loop runs forever; polling all of them on every wake costs a few accept4 calls
    // that answer EAGAIN, on a handful of listeners.
    futures_lite::future::poll_fn(|cx| {
        for accepting in &mut loops {
            let _ = accepting.as_mut().poll(cx);
        }
        Poll::<()>::Pending
    })
    .await;
}

/// Accepts clients from one listener until the shard stops (the future is dropped).
async fn accept_loop(listener: &Listener, placing: &Placing<'_>) {
    let shard = placing.shard;
    loop {
        match listener.accept_fd().await {
            Ok(fd) => placing.place(fd, listener.is_unix()),
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning on accept.
                tracing::warn!(
                    shard = shard.index,
                    unix = listener.is_unix(),
                    error = %err,
                    "accept failed"
                );
                exec::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Where this shard's accepted clients go, and the clients it serves.
struct Placing<'a> {
    shard: &'a Rc<ShardCtx>,
    clients: &'a Clients,
    placement: Option<&'a Arc<Placement>>,
}

impl Placing<'_> {
    /// A connection this shard accepted: handed to the shard the placement chooses, or
    /// served here (this shard chosen, or the chosen one's queue full or closed).
    fn place(&self, fd: OwnedFd, unix: bool) {
        let accepted = Instant::now();
        let Some(placement) = self.placement else {
            return self.serve(Handed {
                fd,
                unix,
                accepted,
                counted: None,
                moved: None,
            });
        };
        match placement.route(self.shard.index, fd, unix, accepted) {
            Route::Here(handed) => self.serve(handed),
            Route::HandedOver => {
                ShardStats::bump(&self.shard.stats.counters.clients_handed_over, 1);
            }
            Route::Overflow(handed) => {
                ShardStats::bump(&self.shard.stats.counters.handover_overflows, 1);
                self.serve(handed);
            }
        }
    }

    /// Serves a connection on this shard to its end.
    fn serve(&self, handed: Handed) {
        let Handed {
            fd,
            unix,
            accepted,
            counted: placed,
            moved,
        } = handed;
        let stream = match Stream::adopt(fd, unix) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(shard = self.shard.index, error = %err, "cannot serve a client");
                if let Some(moved) = &moved {
                    moved.lost(self.shard);
                }
                return;
            }
        };
        let counted = self.clients.count();
        let shard = self.shard.clone();
        exec::spawn(async move {
            let _counted = (counted, placed);
            match moved {
                Some(moved) => crate::proxy::resume(shard, stream, *moved).await,
                None => serve_client(shard, stream, accepted).await,
            }
        });
    }

    /// Serves the connections other shards queued for this one.
    fn adopt_queued(&self) {
        if let Some(placement) = self.placement {
            for handed in placement.take(self.shard.index) {
                self.serve(handed);
            }
        }
    }

    /// Serves the connections other shards hand to this one, and keeps this shard's busy
    /// figure current, until the shard stops (the future is dropped).
    async fn adopt_handed(&self) {
        let Some(placement) = self.placement else {
            return futures_lite::future::pending().await;
        };
        let me = self.shard.index;
        let adopting = async {
            loop {
                if let Err(err) = placement.handed(me).await {
                    // Without its wake-up (a submission the ring refused) the queue would sit
                    // unread while this shard's figure fades and draws every new client:
                    // closed to placement (senders keep what they accepted, as for a stopping
                    // shard), and what was queued before is served by looking every 10 ms.
                    tracing::error!(shard = me, error = %err, "hand-over notifier failed: no more clients are placed on this shard");
                    placement.close(me);
                    loop {
                        self.adopt_queued();
                        crate::exec::sleep(Duration::from_millis(10)).await;
                    }
                }
                // Crash tests: the first shard leaves its queue unread until it stops (as one
                // whose thread is held up would), so that its drain finds connections queued
                // and clients moving to it find its queue full. (The first only: the other
                // shards go on serving the clients handed to them.)
                if me == 0 && crate::cdc::failpoint::fails("placement-adopt") {
                    return futures_lite::future::pending().await;
                }
                self.adopt_queued();
            }
        };
        let rebalancing = async {
            let max = placement.rebalance_clients_max();
            if max == 0 || !self.shard.moves_clients() {
                return futures_lite::future::pending().await;
            }
            let mut resting = 0u32;
            loop {
                exec::sleep(placement::BUSY_TICK).await;
                if resting > 0 {
                    resting -= 1;
                    continue;
                }
                let Some(to) = placement.rebalance_to(me) else {
                    continue;
                };
                let asked = self
                    .shard
                    .ask_to_move(to, placement.clients_to_move(me, max));
                if asked > 0 {
                    placement.expect_moves(me, to, asked);
                    // The busy figures take about this long to show what moved.
                    resting = placement::REBALANCE_REST_TICKS;
                }
            }
        };
        futures_lite::future::zip(
            adopting,
            futures_lite::future::zip(placement.meter(me), rebalancing),
        )
        .await;
    }

    /// The shard stopped serving: no client is placed on it from now on (those queued
    /// before are served by the drain, see [`adopt_queued`](Self::adopt_queued)).
    fn close(&self) {
        if let Some(placement) = self.placement {
            placement.close(self.shard.index);
        }
    }

    /// After the drain, with the executor about to stop: refuses what is still queued
    /// (57P01) instead of leaving it to wait for a shard that is gone.
    fn refuse_queued(&self) {
        let Some(placement) = self.placement else {
            return;
        };
        let queued = placement.take(self.shard.index);
        if queued.is_empty() {
            return;
        }
        let msg = crate::proxy::shutdown_error();
        tracing::info!(
            shard = self.shard.index,
            clients = queued.len(),
            "refusing clients queued for a stopped shard"
        );
        for handed in queued {
            if let Some(moved) = &handed.moved {
                moved.lost(self.shard);
            }
            placement::refuse_stopped(handed, &msg);
        }
    }
}

/// The shard's counters, histograms, mirror stats, fingerprints and compare verdict counts.
fn report(shard: &ShardCtx) -> ShardReport {
    let mut report = shard.stats.report(shard.index);
    report.mirrors = shard
        .mirrors
        .iter()
        .map(|m| m.stats.report(m.index, &m.name))
        .collect();
    report.fingerprints = shard.fingerprints.report();
    if let Some(compare) = &shard.compare {
        report.compare_kinds = compare.kind_counts();
        // Counted by compare's own cancel tasks, which see no shard stats.
        report.counters.shadow_cancels_forwarded = compare.stats.cancels_forwarded.get();
        report.counters.shadow_cancels_skipped = compare.stats.cancels_skipped.get();
        // Order re-checks settle after their statement, in tasks that see no shard stats.
        let stats = &compare.stats;
        let counters = &mut report.counters;
        counters.compare_order_rechecks = stats.order_rechecks.get();
        counters.compare_order_recheck_ties = stats.order_recheck_ties.get();
        counters.compare_mismatches += stats.rechecked[0].get();
        counters.compare_inconclusive_concurrent += stats.rechecked[1].get();
        counters.compare_inconclusive_order_recheck = stats.rechecked_changed.get();
        counters.compare_inconclusive_nondeterministic += stats.rechecked[2].get();
        counters.compare_reports_dropped += stats.reports_dropped.get();
        counters.compare_batches_released = stats.batches_released.get();
        counters.compare_batches_cut = stats.batches_cut.get();
        counters.compare_own_describes = stats.own_describes.get();
        // Placements settle after their statement too.
        counters.compare_placed = stats.placed.get();
        counters.compare_place_rereads = stats.place_rereads.get();
        let [overlapped, in_flight] = &stats.unplaced;
        counters.compare_inconclusive_concurrent += overlapped.get() + in_flight.get();
        counters.compare_inconclusive_overlapped += overlapped.get();
        counters.compare_inconclusive_in_flight += in_flight.get();
        report.calibration = compare.calibration();
        let c = &mut report.counters;
        [
            c.shadow_pool_lends,
            c.shadow_pool_wait_timeouts,
            c.shadow_pool_pins,
            c.shadow_pool_reprepares,
            c.shadow_pool_settings_applied,
            c.shadow_pool_servers_opened,
            c.shadow_pool_dirty_closed,
        ] = compare.shadow_pool_counts();
    }
    report
}

/// Sends a periodic report without blocking; a full ring drops it and counts the drop.
fn send_report(shard: &ShardCtx, reports: &Sender<ShardReport>) {
    match reports.try_send(report(shard)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            ShardStats::bump(&shard.stats.counters.reports_dropped, 1);
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}
