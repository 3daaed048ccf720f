//! A shard: one glommio executor pinned to one core, with its own listener, its client
//! sessions and their backend sockets, its counters and histograms. It talks to the control
//! thread only through a bounded ring and a stop flag, both off the per-message path.

use std::os::fd::IntoRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use glommio::net::TcpListener;
use socket2::Socket;

use crate::proxy::stats::{ShardReport, ShardStats};
use crate::proxy::{ProxySettings, ShardCtx, serve_client};

/// How often an idle accept loop and a drain look at the stop flag. Only shutdown latency
/// depends on it.
const STOP_POLL: Duration = Duration::from_millis(50);

pub(super) struct ShardPlan {
    pub index: usize,
    pub socket: Socket,
    pub settings: ProxySettings,
    pub read_chunk_bytes: usize,
    pub latency_us_max: u64,
    pub report_interval: Duration,
    pub drain_timeout: Duration,
    pub reports: Sender<ShardReport>,
    pub stop: Arc<AtomicBool>,
}

pub(super) async fn run(plan: ShardPlan) {
    // SAFETY: the socket is a listening TCP socket we own; ownership moves to the listener.
    let listener = unsafe {
        <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(plan.socket.into_raw_fd())
    };
    let shard = Rc::new(ShardCtx::new(
        plan.index,
        plan.settings,
        ShardStats::new(plan.latency_us_max),
        plan.read_chunk_bytes,
    ));

    let reporter = {
        let shard = shard.clone();
        let reports = plan.reports.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(plan.report_interval).await;
                send_report(&shard, &reports);
            }
        })
    };

    let stop = plan.stop.clone();
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !stop.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                glommio::spawn_local(serve_client(shard.clone(), stream)).detach();
            }
            Some(Err(err)) => {
                // EMFILE and friends: back off briefly instead of spinning on accept.
                tracing::warn!(shard = plan.index, error = %err, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);

    let deadline = Instant::now() + plan.drain_timeout;
    loop {
        shard.close_idle_sessions(false);
        if shard.sessions_active() == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let forced = shard.close_idle_sessions(true);
            tracing::warn!(shard = plan.index, sessions = forced, "drain timeout: closing busy sessions");
            // Let the closed sessions run their teardown before the executor stops.
            glommio::timer::sleep(STOP_POLL).await;
            break;
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    drop(reporter);
    // The final report must arrive: it carries the exact totals. Block briefly if needed;
    // the shard has no sessions left to delay.
    let _ = plan
        .reports
        .send_timeout(shard.stats.report(plan.index), Duration::from_secs(1));
}

fn send_report(shard: &ShardCtx, reports: &Sender<ShardReport>) {
    match reports.try_send(shard.stats.report(shard.index)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            ShardStats::bump(&shard.stats.counters.reports_dropped, 1);
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}
