//! The control thread after start-up: collect the shards' reports, answer signals (SIGHUP
//! reloads, SIGTERM/SIGINT stop, SIGUSR2 upgrades), ping the systemd watchdog, notice a shard
//! that died; then drain, or hand over to the new process. It never blocks on a shard:
//! reports come through bounded rings it polls.

use std::time::{Duration, Instant};

use crate::control;

use super::assembly::Server;
use super::reload::reload_config;
use super::upgrade::{Invocation, Progress, Successor};
use super::{Reload, signals};

/// What SIGUSR2 needs: how this process was started, and whether it may upgrade at all.
pub(super) struct Upgrades {
    pub(super) invocation: Invocation,
    /// Why this process cannot hand over (it runs more than the proxy); `None`: it can.
    pub(super) refused: Option<&'static str>,
}

/// How serving ended.
pub(super) enum Outcome {
    /// SIGTERM/SIGINT, or a shard that stopped: drain and exit.
    Stopped,
    /// A new process serves on our sockets: stop accepting, let the sessions end, exit.
    /// `hurry`: a stop signal came too, so idle sessions are closed at once. `successor`:
    /// the new process (the channel to it stays open for what it must hear next).
    HandedOver { hurry: bool, successor: Successor },
}

impl Server<'_> {
    /// Runs control-loop turns until a stop signal, a shard that stopped on its own, or a new
    /// process that took over after SIGUSR2.
    pub(super) fn serve(&self, reload: Option<&Reload>, upgrades: &Upgrades) -> Outcome {
        let mut watchdog = Watchdog::new();
        let mut successor: Option<Successor> = None;
        let tick = Duration::from_millis(self.cfg.metrics.report_interval_ms.min(200));
        loop {
            self.collect();
            match signals::wait(tick) {
                Some(signals::Signal::Stop) => return stop_during(successor.take()),
                Some(signals::Signal::Reload) => self.reload(reload),
                Some(signals::Signal::Upgrade) => {
                    if let Some(started) = self.upgrade(upgrades, successor.as_ref()) {
                        successor = Some(started);
                    }
                }
                None => {}
            }
            if let Some(upgrade) = successor.as_mut() {
                match upgrade.progress() {
                    Progress::Waiting => {}
                    Progress::Ready(pid) => {
                        tracing::info!(
                            pid,
                            "upgrade: the new process serves; this one stops accepting and \
                             lets its sessions end"
                        );
                        upgrade.handed_over();
                        if let Some(successor) = successor.take() {
                            return Outcome::HandedOver {
                                hurry: false,
                                successor,
                            };
                        }
                    }
                    Progress::Failed(why) => {
                        tracing::error!(
                            pid = upgrade.pid(),
                            "upgrade failed: the new process did not take over: {why}; this \
                             process keeps serving (fix the cause, then send SIGUSR2 again)"
                        );
                        successor = None;
                        control::systemd::notify("STATUS=serving (the last upgrade failed)");
                    }
                }
            }
            watchdog.ping_when_due();
            if self.threads.any_exited() {
                tracing::error!("a shard stopped unexpectedly; shutting down");
                return Outcome::Stopped;
            }
        }
    }

    /// SIGUSR2: starts the binary at the path this process was started from, with the same
    /// arguments, and sends it the listening sockets; `None` (logged) when it cannot.
    fn upgrade(&self, upgrades: &Upgrades, under_way: Option<&Successor>) -> Option<Successor> {
        if let Some(why) = upgrades.refused {
            tracing::warn!("SIGUSR2: cannot upgrade: {why}; ignoring");
            return None;
        }
        if let Some(successor) = under_way {
            tracing::warn!(
                pid = successor.pid(),
                "SIGUSR2: an upgrade is under way already; ignoring"
            );
            return None;
        }
        let Some(hand_over) = &self.hand_over else {
            tracing::error!("SIGUSR2: cannot upgrade: the listening sockets were not kept");
            return None;
        };
        let admin = match self.admin.as_ref().map(|a| a.listener()).transpose() {
            Ok(admin) => admin,
            Err(err) => {
                tracing::error!(error = %err, "SIGUSR2: cannot upgrade: no descriptor of the admin socket");
                return None;
            }
        };
        let timeout = Duration::from_millis(self.cfg.proxy.upgrade_timeout_ms);
        match Successor::start(&upgrades.invocation, hand_over, admin.as_ref(), timeout) {
            Ok(successor) => {
                tracing::info!(
                    pid = successor.pid(),
                    program = %upgrades.invocation.program().display(),
                    "upgrade: started the new process and handed it the listening sockets"
                );
                control::systemd::notify("STATUS=upgrading: a new process is starting");
                Some(successor)
            }
            Err(err) => {
                tracing::error!(
                    program = %upgrades.invocation.program().display(),
                    error = %err,
                    "upgrade failed: cannot start the new process; this process keeps serving"
                );
                None
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
        // Our descriptors would keep the sockets listening after the shards close theirs.
        self.hand_over.take();
        // New local clients find no socket file; the shards close their listeners next.
        self.unix_file.take();
        control::systemd::notify("STOPPING=1\nSTATUS=draining sessions");
        self.threads.stop_all(false);
        self.finish();
        drop(self.admin.take());
    }

    /// After an upgrade: the new process holds every listening socket (and their backlogs)
    /// and answers the admin endpoint; this one closes its descriptors, lets its sessions end
    /// on their own (up to `proxy.drain-timeout-ms`, then 57P01) and returns. It leaves the
    /// Unix socket file and the pid file to the new process and tells systemd nothing: the
    /// unit's main process is the new one.
    pub(super) fn hand_off(mut self, hurry: bool) {
        tracing::info!(
            drain_timeout_ms = self.cfg.proxy.drain_timeout_ms,
            "upgraded: no new connections here, waiting for this process's sessions to end"
        );
        // The shards stop accepting first: the admin thread may take up to its connection
        // deadline to end.
        self.threads.stop_all(!hurry);
        // Ours would answer some of the admin requests (with a 503) for as long as we drain.
        drop(self.admin.take());
        self.hand_over.take();
        if let Some(file) = self.unix_file.take() {
            file.keep();
        }
        // Signals still matter while the sessions end: SIGTERM (say, `systemctl stop`, which
        // signals every process of the unit) ends the patience.
        let tick = Duration::from_millis(200);
        while !self.threads.all_exited() {
            match signals::wait(tick) {
                Some(signals::Signal::Stop) => {
                    tracing::info!(
                        "stop signal while draining after an upgrade: closing idle sessions now"
                    );
                    self.threads.hurry();
                }
                Some(signals::Signal::Upgrade) => {
                    tracing::warn!("SIGUSR2: this process has handed over already; ignoring");
                }
                Some(signals::Signal::Reload) => {
                    tracing::warn!("SIGHUP: this process has handed over already; ignoring");
                }
                None => {}
            }
        }
        self.finish();
    }

    /// Waits for every shard's drain, then logs the totals.
    fn finish(&mut self) {
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
    }
}

/// A stop signal: with an upgrade under way, the new process may have said it is ready (it
/// serves already, and waits, bounded, for our ack before it writes the pid file and tells
/// systemd its MAINPID); then this process acknowledges and hands over all the same, in a
/// hurry, so the new process takes the pid file and the unit over. A new process not ready
/// within the short wait is stopped, and this one stops as asked.
fn stop_during(successor: Option<Successor>) -> Outcome {
    let Some(mut successor) = successor else {
        return Outcome::Stopped;
    };
    match successor.settle(Duration::from_secs(2)) {
        Progress::Ready(pid) => {
            tracing::info!(
                pid,
                "stop signal during an upgrade: the new process serves; this one drains"
            );
            successor.handed_over();
            Outcome::HandedOver {
                hurry: true,
                successor,
            }
        }
        Progress::Failed(why) => {
            tracing::warn!(
                pid = successor.pid(),
                "stop signal during an upgrade: {why}"
            );
            Outcome::Stopped
        }
        // `settle` answers Waiting never; were it to, dropping the successor stops it.
        Progress::Waiting => Outcome::Stopped,
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
