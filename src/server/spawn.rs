//! Starting the shards: one executor thread per listening socket, pinned to a core when asked,
//! each with its report ring and stop notifier. It owns the threads' handles until the drain
//! joins them; it never touches a shard's sessions, which only the shard's thread may.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use socket2::Socket;

use crate::config::Config;
use crate::exec;
use crate::proxy::ProxySettings;
use crate::stats::ShardReport;

use super::shard::{self, ContextPlan, ShardPlan};
use super::upstreams::Upstreams;
use super::{RING_ENTRIES, RuntimeError};

/// The running shard threads, as the control thread sees them.
pub(super) struct ShardThreads {
    /// One report ring per shard, read by the control loop.
    pub(super) rings: Vec<Receiver<ShardReport>>,
    handles: Vec<JoinHandle<()>>,
    stops: Vec<exec::Notifier>,
    /// Lets each shard accept (see [`ShardThreads::open_all`]).
    opens: Vec<exec::Notifier>,
    /// One message from each shard once its ring, listeners and context exist.
    started: Receiver<()>,
    /// Counts shards whose executor returned, so the control loop notices one that died early.
    exited: Arc<AtomicUsize>,
    /// Makes the drain patient (an upgrade): read by each shard on every turn of its drain.
    patient: Arc<AtomicBool>,
}

impl ShardThreads {
    /// Starts `shards` shards; shard `i` accepts from the TCP sockets `i`, `i + shards`, ...
    /// of `sockets` then `pending` (one each, unless an upgrade inherited more than there are
    /// shards) and from its own dup of the Unix listener, if any. No shard accepts before
    /// [`ShardThreads::open_all`]; the `pending` sockets listen only by then.
    pub(super) fn spawn(
        cfg: &Config,
        shards: usize,
        sockets: Vec<Socket>,
        pending: Vec<Socket>,
        unix_socket: Option<&Socket>,
        upstreams: &Upstreams,
    ) -> Result<Self, RuntimeError> {
        assert!(
            shards > 0 && sockets.len() + pending.len() >= shards,
            "a socket for every shard"
        );
        let listening = sockets.len();
        let mut per_shard: Vec<(Vec<Socket>, Vec<Socket>)> =
            (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, socket) in sockets.into_iter().chain(pending).enumerate() {
            let (ready, later) = &mut per_shard[i % shards];
            if i < listening {
                ready.push(socket);
            } else {
                later.push(socket);
            }
        }
        let (started_tx, started) = crossbeam_channel::bounded(shards);
        let pooling = pooling_plan(cfg, shards)?;
        // Clients' cancels reach the shadow and mirrors through it; a plain proxy has none.
        let cancel_registry = if upstreams.mirrors.is_empty() && upstreams.compare.is_none() {
            None
        } else {
            Some(
                crate::backend::cancel::Registry::new(shards)
                    .map_err(|source| RuntimeError::Shard { index: 0, source })?,
            )
        };
        let placement = super::placement::Placement::new(cfg, shards)
            .map_err(|source| RuntimeError::Shard { index: 0, source })?;
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut threads = ShardThreads {
            rings: Vec::with_capacity(shards),
            handles: Vec::with_capacity(shards),
            stops: Vec::with_capacity(shards),
            opens: Vec::with_capacity(shards),
            started,
            exited: Arc::new(AtomicUsize::new(0)),
            patient: Arc::new(AtomicBool::new(false)),
        };
        for (index, (mut sockets, pending)) in per_shard.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded(cfg.metrics.ring_capacity);
            threads.rings.push(rx);
            let stop =
                exec::Notifier::new().map_err(|source| RuntimeError::Shard { index, source })?;
            threads.stops.push(stop.clone());
            let open =
                exec::Notifier::new().map_err(|source| RuntimeError::Shard { index, source })?;
            threads.opens.push(open.clone());
            // Each shard owns a dup of the one Unix listener, so each closes its own descriptor.
            if let Some(unix) = unix_socket {
                sockets.push(
                    unix.try_clone()
                        .map_err(|source| RuntimeError::Shard { index, source })?,
                );
            }
            let mut plan = shard_plan(cfg, upstreams, index, sockets, tx, stop);
            plan.pending = pending;
            plan.open = open;
            plan.started = Some(started_tx.clone());
            plan.patient = threads.patient.clone();
            plan.context.pooling = pooling.clone();
            plan.context.cancel_registry = cancel_registry.clone();
            plan.context.shards = shards;
            plan.placement = placement.clone();
            let core =
                (cfg.proxy.pin_cores && !cores.is_empty()).then(|| cores[index % cores.len()]);
            let exited = ExitCount(threads.exited.clone());
            threads.handles.push(spawn_thread(cfg, plan, core, exited)?);
        }
        Ok(threads)
    }

    /// Waits until every shard has its ring, listeners and context (ready means able to
    /// serve); fails when one stops on the way or `limit` passes.
    pub(super) fn wait_started(&self, limit: Duration) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + limit;
        let mut started = 0;
        while started < self.handles.len() {
            if self.any_exited() {
                return Err(RuntimeError::ShardStopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RuntimeError::ShardStartTimeout {
                    waited_ms: limit.as_millis() as u64,
                });
            }
            // Short turns, so a shard that stopped is noticed before the deadline.
            match self
                .started
                .recv_timeout(left.min(Duration::from_millis(20)))
            {
                Ok(()) => started += 1,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(RuntimeError::ShardStopped),
            }
        }
        Ok(())
    }

    /// Lets every shard accept from its listeners.
    pub(super) fn open_all(&self) {
        for open in &self.opens {
            open.notify();
        }
    }

    /// Makes a patient drain an ordinary one: idle sessions are closed from now on.
    pub(super) fn hurry(&self) {
        self.patient.store(false, Ordering::Release);
    }

    /// Whether every shard's executor has returned.
    pub(super) fn all_exited(&self) -> bool {
        self.exited.load(Ordering::Relaxed) >= self.handles.len()
    }

    /// Whether any shard's executor has returned (or panicked) already.
    pub(super) fn any_exited(&self) -> bool {
        self.exited.load(Ordering::Relaxed) > 0
    }

    /// Tells every shard to stop accepting and drain; `patient` (an upgrade) lets sessions
    /// end on their own until the drain timeout.
    pub(super) fn stop_all(&self, patient: bool) {
        self.patient.store(patient, Ordering::Release);
        for stop in &self.stops {
            stop.notify();
        }
        // A shard still waiting to open wakes, sees the stop first and drains at once.
        self.open_all();
    }

    /// Joins every shard thread that ends within `limit`; false when one did not (its handle
    /// is dropped, the thread left detached). A panic is logged, not propagated.
    pub(super) fn join_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.handles.iter().all(|h| h.is_finished()) && Instant::now() < deadline {
            // Polling interval of this bounded wait (std threads have no timed join).
            std::thread::sleep(Duration::from_millis(10));
        }
        let all = self.handles.iter().all(|h| h.is_finished());
        for handle in self.handles.drain(..) {
            if handle.is_finished() && handle.join().is_err() {
                tracing::error!("a shard panicked during shutdown");
            }
        }
        all
    }

    /// Waits for every shard to finish its drain; a panic is logged, not propagated.
    pub(super) fn join_all(&mut self) {
        for handle in self.handles.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a shard panicked during shutdown");
            }
        }
    }
}

/// Everything shard `index` is started with.
fn shard_plan(
    cfg: &Config,
    upstreams: &Upstreams,
    index: usize,
    sockets: Vec<Socket>,
    reports: Sender<ShardReport>,
    stop: exec::Notifier,
) -> ShardPlan {
    ShardPlan {
        index,
        sockets,
        pending: Vec::new(),
        started: None,
        open: stop.clone(),
        patient: Arc::new(AtomicBool::new(false)),
        context: ContextPlan {
            settings: proxy_settings(cfg, upstreams),
            read_chunk_bytes: cfg.proxy.read_chunk_bytes,
            latency_us_max: cfg.metrics.latency_us_max,
            mirrors: upstreams.mirrors.clone(),
            fingerprints_max: cfg.metrics.fingerprints_max,
            compare: upstreams.compare.clone(),
            pooling: None,
            cancel_registry: None,
            primary_user: upstreams.primary.user.clone().unwrap_or_default(),
            primary_password: upstreams.primary.password.clone().unwrap_or_default(),
            shards: 0,
        },
        report_interval: Duration::from_millis(cfg.metrics.report_interval_ms),
        drain_timeout: Duration::from_millis(cfg.proxy.drain_timeout_ms),
        reports,
        stop,
        placement: None,
    }
}

/// The settings every session of a shard runs with.
fn proxy_settings(cfg: &Config, upstreams: &Upstreams) -> ProxySettings {
    ProxySettings {
        primary_addr: upstreams.primary_addr.clone(),
        primary_label: upstreams.primary_label.clone(),
        message_bytes_max: cfg.proxy.message_bytes_max,
        startup_timeout: Duration::from_millis(cfg.proxy.startup_timeout_ms),
        connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
        sessions_per_shard_max: cfg.proxy.sessions_per_shard_max,
        pipeline_depth_max: cfg.proxy.pipeline_depth_max,
        session_limits: crate::session::Limits {
            names_max: cfg.proxy.session_names_max,
            settings_max: cfg.proxy.session_settings_max,
            // Decided per session (`proxy::relay`): only a session that compares
            // reads the tracker's statements.
            statements: false,
            // No mode reads the tracker's settings yet (mirror routing keeps its own).
            settings: false,
        },
        client_tls: upstreams.client_tls.clone(),
        primary_tls: upstreams.primary_tls.clone(),
        transaction_pooling: cfg.pool.mode == crate::config::PoolMode::Transaction,
    }
}

/// What every shard's pools share: the process-wide budgets, the cancel keys of pooled
/// clients, the auth file, the console's state. `None` when neither transaction pooling
/// nor the console is configured (a plain session-mode proxy pays for none of it).
#[derive(Clone)]
pub(super) struct PoolingShared {
    pub cfg: crate::config::PoolConfig,
    pub budgets: crate::backend::pool::Budgets,
    pub cancel_keys: crate::proxy::CancelKeys,
    pub userlist: Option<Arc<crate::proxy::credentials::Userlist>>,
    pub console: Arc<crate::proxy::ConsoleCtx>,
}

pub(super) type PoolingPlan = Option<PoolingShared>;

/// The pooling every shard shares, read once (the auth file) on the main thread.
fn pooling_plan(cfg: &Config, shards: usize) -> Result<PoolingPlan, RuntimeError> {
    let p = &cfg.pool;
    let wanted = p.mode == crate::config::PoolMode::Transaction
        || !p.admin_users.is_empty()
        || !p.stats_users.is_empty();
    if !wanted {
        return Ok(None);
    }
    let userlist = if p.auth_file.is_empty() {
        None
    } else {
        let list = crate::proxy::credentials::Userlist::load(std::path::Path::new(&p.auth_file))
            .map_err(|e| crate::config::ConfigError::invalid("pool.auth-file", &e))?;
        Some(Arc::new(list))
    };
    // With pipelined lending, a client that starts waiting wakes the shards where a shared
    // connection of its pair lingers (one eventfd per shard).
    let budgets = if p.shared_depth_max > 1 {
        crate::backend::pool::Budgets::with_wakeups(shards)
            .map_err(|source| RuntimeError::Shard { index: 0, source })?
    } else {
        Default::default()
    };
    Ok(Some(PoolingShared {
        cfg: p.clone(),
        budgets,
        cancel_keys: Default::default(),
        userlist,
        console: Arc::new(crate::proxy::ConsoleCtx::new(cfg.clone(), shards)),
    }))
}

/// Starts the shard's thread: pins it, sets the executor's per-thread limits, runs the shard.
fn spawn_thread(
    cfg: &Config,
    plan: ShardPlan,
    core: Option<core_affinity::CoreId>,
    exited: ExitCount,
) -> Result<JoinHandle<()>, RuntimeError> {
    let index = plan.index;
    let send_queue_bytes = cfg.proxy.send_queue_bytes;
    let close_linger = Duration::from_millis(cfg.proxy.close_linger_ms);
    let wait_policy = exec::WaitPolicy {
        batch_wait_us: cfg.proxy.ring_batch_wait_us,
        defer_taskrun: cfg.proxy.ring_defer_taskrun,
    };
    std::thread::Builder::new()
        .name(format!("pgprism-shard-{index}"))
        .spawn(move || {
            let _exited = exited;
            if let Some(core) = core
                && !core_affinity::set_for_current(core)
            {
                tracing::warn!(
                    shard = index,
                    core = core.id,
                    "cannot pin shard to its core"
                );
            }
            exec::set_send_queue_bytes(send_queue_bytes);
            exec::set_close_linger(close_linger);
            exec::set_wait_policy(wait_policy);
            // Stands in for a ring the kernel refuses, in the upgrade's tests.
            if super::upgrade::started_by_upgrade()
                && crate::cdc::failpoint::fails("upgrade-shard-ring")
            {
                tracing::error!(shard = index, "shard runtime failed: failpoint");
                return;
            }
            if let Err(err) = exec::run(RING_ENTRIES, shard::run(plan)) {
                tracing::error!(shard = index, error = %err, "shard runtime failed");
            }
        })
        .map_err(|source| RuntimeError::Shard { index, source })
}

/// Increments the shared count when dropped: on a shard's normal return and on a panic alike.
struct ExitCount(Arc<AtomicUsize>);

impl Drop for ExitCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}
