//! The control thread after start-up: collect the shards' reports, answer signals (SIGHUP
//! reloads, SIGTERM/SIGINT stop), ping the systemd watchdog, notice a shard that died; then
//! drain. It never blocks on a shard: reports come through bounded rings it polls.

use std::time::{Duration, Instant};

use crate::control;

use super::assembly::Server;
use super::reload::reload_config;
use super::{Reload, signals};

impl Server<'_> {
    /// Runs control-loop turns until a stop signal or a shard that stopped on its own.
    pub(super) fn serve(&self, reload: Option<&Reload>) {
        let mut watchdog = Watchdog::new();
        let tick = Duration::from_millis(self.cfg.metrics.report_interval_ms.min(200));
        loop {
            self.collect();
            match signals::wait(tick) {
                Some(signals::Signal::Stop) => break,
                Some(signals::Signal::Reload) => self.reload(reload),
                None => {}
            }
            watchdog.ping_when_due();
            if self.threads.any_exited() {
                tracing::error!("a shard stopped unexpectedly; shutting down");
                break;
            }
        }
    }

    /// SIGHUP: tells systemd a reload is under way, applies it, then reports its outcome.
    fn reload(&self, reload: Option<&Reload>) {
        control::systemd::notify("RELOADING=1");
        let status = reload_config(self.cfg, reload, &self.upstreams.client_tls);
        control::systemd::notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// Moves the shards' reports and compare records into the control state.
    fn collect(&self) {
        control::collect(&self.state, &self.threads.rings);
        control::collect_compare(&self.state, &self.upstreams.compare_reports);
    }

    /// Stops accepting, lets every shard drain its sessions, collects the final reports and
    /// logs the totals; the admin endpoint serves until the very end.
    pub(super) fn drain(mut self) {
        tracing::info!(
            drain_timeout_ms = self.cfg.proxy.drain_timeout_ms,
            "stopping: no new connections, draining sessions"
        );
        control::lock(&self.state).draining = true;
        // New local clients find no socket file; the shards close their listeners next.
        self.unix_file.take();
        control::systemd::notify("STOPPING=1\nSTATUS=draining sessions");
        self.threads.stop_all();
        let drain_started = Instant::now();
        self.threads.join_all();
        self.collect();
        let totals = control::lock(&self.state).totals();
        tracing::info!(
            drained_ms = drain_started.elapsed().as_millis() as u64,
            sessions = totals.counters.sessions_closed,
            statements = totals.counters.statements,
            "stopped"
        );
        drop(self.admin.take());
    }
}

/// The systemd watchdog, when the unit asks for one (`WatchdogSec=`).
struct Watchdog {
    every: Option<Duration>,
    pinged_at: Instant,
}

impl Watchdog {
    /// Reads the interval systemd asks for; `every` is `None` without a watchdog.
    fn new() -> Self {
        Watchdog {
            every: control::systemd::watchdog_interval(),
            pinged_at: Instant::now(),
        }
    }

    /// Pings once the interval has passed since the last ping.
    fn ping_when_due(&mut self) {
        if let Some(every) = self.every
            && self.pinged_at.elapsed() >= every
        {
            // Pinged from the control loop, so a wedged control thread stops the pings.
            control::systemd::notify("WATCHDOG=1");
            self.pinged_at = Instant::now();
        }
    }
}
