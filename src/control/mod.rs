//! The control thread: collects shard reports from their bounded rings, merges counters and
//! histograms, and serves the admin endpoint. It does the blocking and slow work (HTTP,
//! formatting) so shards never do, and it never holds anything a shard waits on.

mod admin;
mod render;

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crossbeam_channel::Receiver;
use hdrhistogram::Histogram;

use crate::proxy::stats::{Counters, ShardReport, new_histogram};

pub use admin::{AdminServer, ExtraRoutes, RouteResponse};

/// What the admin endpoint shows; updated by the control loop, read by the admin thread.
pub struct ControlState {
    pub started: Instant,
    pub started_unix_s: u64,
    pub listen: String,
    pub primary: String,
    pub draining: bool,
    latency_us_max: u64,
    shards: Vec<Option<ShardReport>>,
}

/// Merged view over all shards.
pub struct Totals {
    pub counters: Counters,
    pub sessions_active: u64,
    pub client_latency_us: Histogram<u64>,
    pub primary_latency_us: Histogram<u64>,
    pub shards_reporting: usize,
}

impl ControlState {
    pub fn new(
        shards: usize,
        listen: String,
        primary: String,
        latency_us_max: u64,
    ) -> ControlState {
        ControlState {
            started: Instant::now(),
            started_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            listen,
            primary,
            draining: false,
            latency_us_max,
            shards: vec![None; shards],
        }
    }

    /// Keeps the newest report of each shard (reports are cumulative).
    pub fn absorb(&mut self, report: ShardReport) {
        if let Some(slot) = self.shards.get_mut(report.shard) {
            *slot = Some(report);
        }
    }

    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            counters: Counters::default(),
            sessions_active: 0,
            client_latency_us: new_histogram(self.latency_us_max),
            primary_latency_us: new_histogram(self.latency_us_max),
            shards_reporting: 0,
        };
        for report in self.shards.iter().flatten() {
            totals.shards_reporting += 1;
            totals.counters.add(&report.counters);
            totals.sessions_active += report.sessions_active;
            // Same bounds on every histogram, so `add` cannot fail; a failure would only
            // mean a sample range mismatch, which we surface as a missing merge, not a crash.
            let _ = totals.client_latency_us.add(&report.client_latency_us);
            let _ = totals.primary_latency_us.add(&report.primary_latency_us);
        }
        totals
    }

    pub fn shard_reports(&self) -> impl Iterator<Item = &ShardReport> {
        self.shards.iter().flatten()
    }
}

/// Drains every ring without blocking.
pub fn collect(state: &Mutex<ControlState>, rings: &[Receiver<ShardReport>]) {
    let mut pending = Vec::new();
    for ring in rings {
        while let Ok(report) = ring.try_recv() {
            pending.push(report);
        }
    }
    if pending.is_empty() {
        return;
    }
    let mut state = lock(state);
    for report in pending {
        state.absorb(report);
    }
}

/// The state lock is only contended between the control and admin threads; a poisoned lock
/// (a panic while rendering) must not take the proxy down, so recover the data.
pub fn lock(state: &Mutex<ControlState>) -> std::sync::MutexGuard<'_, ControlState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub type SharedState = Arc<Mutex<ControlState>>;
