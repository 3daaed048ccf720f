//! A shard: one executor thread pinned to one core, with its own listener, its client
//! sessions and their backend sockets, its counters and histograms. It talks to the control
//! thread only through a bounded ring and a stop notifier, both off the per-message path.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use socket2::Socket;

use crate::exec::net::Listener;
use crate::exec::{self, Notifier};

use crate::mirror::MirrorTarget;
use crate::proxy::{ProxySettings, ShardCtx, serve_client};
use crate::stats::fingerprints::Fingerprints;
use crate::stats::{ShardReport, ShardStats};

/// How often a drain looks for sessions that became idle.
const DRAIN_POLL: Duration = Duration::from_millis(20);

pub(super) struct ShardPlan {
    pub index: usize,
    pub socket: Socket,
    /// This shard's dup of the Unix-domain listener, when there is one.
    pub unix: Option<Socket>,
    pub settings: ProxySettings,
    pub read_chunk_bytes: usize,
    pub latency_us_max: u64,
    pub report_interval: Duration,
    pub drain_timeout: Duration,
    pub reports: Sender<ShardReport>,
    pub stop: Notifier,
    pub mirrors: Vec<crate::mirror::Resolved>,
    pub fingerprints_max: usize,
    pub compare: Option<crate::compare::Resolved>,
}

pub(super) async fn run(plan: ShardPlan) {
    let listener = match Listener::from_socket(plan.socket) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(shard = plan.index, error = %err, "cannot register the listener");
            return;
        }
    };
    let unix_listener = match plan.unix.map(Listener::from_socket).transpose() {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(shard = plan.index, error = %err, "cannot register the Unix listener");
            return;
        }
    };
    let mirrors: Vec<_> = plan
        .mirrors
        .iter()
        .enumerate()
        .map(|(i, m)| MirrorTarget::new(i, m, plan.latency_us_max))
        .collect();
    let fingerprints = Rc::new(Fingerprints::new(
        plan.fingerprints_max,
        mirrors.len(),
        plan.latency_us_max,
    ));
    let compare = match &plan.compare {
        None => None,
        Some(resolved) => {
            match crate::compare::Target::new(
                resolved,
                plan.settings.primary_addr.clone(),
                plan.index,
            ) {
                Ok(target) => Some(target),
                Err(err) => {
                    tracing::error!(shard = plan.index, error = %err, "cannot compile [compare] rules");
                    return;
                }
            }
        }
    };
    let shard = Rc::new(ShardCtx::new(
        plan.index,
        plan.settings,
        ShardStats::new(plan.latency_us_max),
        plan.read_chunk_bytes,
        mirrors,
        fingerprints,
        compare,
    ));

    let reporter = {
        let shard = shard.clone();
        let reports = plan.reports.clone();
        let interval = plan.report_interval;
        async move {
            loop {
                exec::sleep(interval).await;
                send_report(&shard, &reports);
            }
        }
    };

    let accepting = futures_lite::future::zip(accept_loop(&listener, &shard), async {
        match &unix_listener {
            Some(unix) => accept_loop(unix, &shard).await,
            None => futures_lite::future::pending().await,
        }
    });
    // Accept (and report) until the control thread asks us to stop.
    let stop = async {
        if let Err(err) = plan.stop.notified().await {
            tracing::error!(shard = plan.index, error = %err, "stop notifier failed");
        }
    };
    futures_lite::future::or(stop, async {
        futures_lite::future::zip(accepting, reporter).await;
    })
    .await;
    drop(listener);
    drop(unix_listener);

    let deadline = Instant::now() + plan.drain_timeout;
    loop {
        shard.close_idle_sessions(false);
        if shard.sessions_active() == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let forced = shard.close_idle_sessions(true);
            tracing::warn!(
                shard = plan.index,
                sessions = forced,
                "drain timeout: closing busy sessions"
            );
            // Let the closed sessions run their teardown before the executor stops.
            exec::sleep(DRAIN_POLL).await;
            break;
        }
        exec::sleep(DRAIN_POLL).await;
    }
    // The final report must arrive: it carries the exact totals. Block briefly if needed;
    // the shard has no sessions left to delay.
    let _ = plan
        .reports
        .send_timeout(report(&shard), Duration::from_secs(1));
}

/// Accepts clients from one listener until the shard stops (the future is dropped).
async fn accept_loop(listener: &Listener, shard: &Rc<ShardCtx>) {
    loop {
        match listener.accept().await {
            Ok(stream) => exec::spawn(serve_client(shard.clone(), stream)),
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
    }
    report
}

fn send_report(shard: &ShardCtx, reports: &Sender<ShardReport>) {
    match reports.try_send(report(shard)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            ShardStats::bump(&shard.stats.counters.reports_dropped, 1);
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}
