//! The control thread: collects shard reports from their bounded rings, merges counters and
//! histograms, and serves the admin endpoint. It does the blocking and slow work (HTTP,
//! formatting) so shards never do, and it never holds anything a shard waits on.

mod access;
mod admin;
mod render;
pub mod systemd;

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crossbeam_channel::Receiver;
use hdrhistogram::Histogram;

use std::collections::HashMap;

use crate::mirror::MirrorReport;
use crate::stats::fingerprints::FingerprintReport;
use crate::stats::{Counters, ShardReport, new_histogram};

pub use admin::{AdminError, AdminServer, ExtraRoutes, RouteResponse};

/// Reads what the admin endpoint of `cfg` would read at start-up (the token file, the
/// certificate and key) and applies the same rules, binding nothing: for `pgprism check`.
pub fn check_admin(cfg: &crate::config::AdminConfig) -> Result<(), crate::config::ConfigError> {
    if cfg.listen.is_empty() {
        return Ok(());
    }
    let addr = crate::config::parse_addr("admin.listen", &cfg.listen)?;
    access::Access::load(cfg, addr).map(drop)
}

/// What the admin endpoint shows; updated by the control loop, read by the admin thread.
pub struct ControlState {
    pub started: Instant,
    pub started_unix_s: u64,
    pub listen: String,
    /// The Unix socket file clients may also use, if any.
    pub unix_socket: Option<String>,
    pub primary: String,
    /// Backends by role (`primary`, `mirror NAME`, `shadow`) with the address new connections
    /// go to now (it follows DNS).
    pub backends: Vec<(String, crate::config::LiveEndpoint)>,
    /// What `[client-tls]` offers now (a reload may change it).
    pub client_tls: Option<std::sync::Arc<crate::tls::ClientTlsSlot>>,
    pub draining: bool,
    /// Admin requests refused with 401 (no or wrong bearer token).
    pub admin_unauthorized: u64,
    /// State-changing admin requests refused with 403 (no token configured).
    pub admin_forbidden: u64,
    latency_us_max: u64,
    shards: Vec<Option<ShardReport>>,
    /// Latest copy of every fingerprint per shard (reports carry only the changed ones).
    fingerprints: Vec<HashMap<u64, FingerprintReport>>,
    pub mirror_names: Vec<String>,
    /// Compare mode's reports, grouped (None without a shadow).
    pub compare: Option<crate::compare::report::Book>,
}

/// One statement fingerprint merged over shards.
pub struct FingerprintTotals {
    pub id: u64,
    pub text: String,
    pub primary: Histogram<u64>,
    pub mirrors: Vec<Histogram<u64>>,
}

/// Merged view over all shards.
pub struct Totals {
    pub counters: Counters,
    pub sessions_active: u64,
    pub client_latency_us: Histogram<u64>,
    pub primary_latency_us: Histogram<u64>,
    pub shadow_lag_us: Histogram<u64>,
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
            unix_socket: None,
            primary,
            backends: Vec::new(),
            client_tls: None,
            draining: false,
            admin_unauthorized: 0,
            admin_forbidden: 0,
            latency_us_max,
            shards: vec![None; shards],
            fingerprints: vec![HashMap::new(); shards],
            mirror_names: Vec::new(),
            compare: None,
        }
    }

    /// Keeps the newest report of each shard (reports are cumulative).
    pub fn absorb(&mut self, mut report: ShardReport) {
        if let Some(table) = self.fingerprints.get_mut(report.shard) {
            for f in std::mem::take(&mut report.fingerprints) {
                table.insert(f.id, f);
            }
        }
        if let Some(slot) = self.shards.get_mut(report.shard) {
            *slot = Some(report);
        }
    }

    /// Mirror statistics merged over shards, in configuration order.
    pub fn mirrors(&self) -> Vec<MirrorReport> {
        let mut merged: Vec<MirrorReport> = Vec::new();
        for report in self.shards.iter().flatten() {
            for m in &report.mirrors {
                match merged.iter_mut().find(|x| x.index == m.index) {
                    None => merged.push(m.clone()),
                    Some(x) => {
                        x.counters.add(&m.counters);
                        x.queue_messages += m.queue_messages;
                        x.queue_bytes += m.queue_bytes;
                        x.lag_us = x.lag_us.max(m.lag_us);
                        let _ = x.lag_hist_us.add(&m.lag_hist_us);
                        let _ = x.latency_us.add(&m.latency_us);
                        for (code, n) in &m.errors_by_code {
                            *x.errors_by_code.entry(code.clone()).or_insert(0) += n;
                        }
                    }
                }
            }
        }
        merged.sort_by_key(|m| m.index);
        merged
    }

    /// Fingerprints merged over shards, most executed first, at most `limit`.
    pub fn fingerprints(&self, limit: usize) -> Vec<FingerprintTotals> {
        let mut merged: HashMap<u64, FingerprintTotals> = HashMap::new();
        for f in self.fingerprints.iter().flat_map(|t| t.values()) {
            match merged.get_mut(&f.id) {
                Some(entry) => {
                    let _ = entry.primary.add(&f.primary);
                    for (m, h) in entry.mirrors.iter_mut().zip(&f.mirrors) {
                        let _ = m.add(h);
                    }
                }
                None => {
                    merged.insert(
                        f.id,
                        FingerprintTotals {
                            id: f.id,
                            text: f.text.clone(),
                            primary: f.primary.clone(),
                            mirrors: f.mirrors.clone(),
                        },
                    );
                }
            }
        }
        let mut out: Vec<FingerprintTotals> = merged.into_values().collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.primary.len()));
        out.truncate(limit);
        out
    }

    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            counters: Counters::default(),
            sessions_active: 0,
            client_latency_us: new_histogram(self.latency_us_max),
            primary_latency_us: new_histogram(self.latency_us_max),
            shadow_lag_us: new_histogram(self.latency_us_max),
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
            let _ = totals.shadow_lag_us.add(&report.shadow_lag_us);
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

/// Drains the compare reports ring into the report file and the fingerprint groups.
pub fn collect_compare(state: &Mutex<ControlState>, records: &Receiver<crate::compare::Record>) {
    let pending: Vec<_> = records.try_iter().take(10_000).collect();
    if pending.is_empty() {
        return;
    }
    let mut state = lock(state);
    if let Some(book) = state.compare.as_mut() {
        for record in pending {
            book.absorb(record);
        }
        book.flush();
    }
}

/// Mismatches by kind merged over shards.
impl ControlState {
    /// Compare calibration: per fingerprint, merged over shards, noisiest first.
    pub fn calibration(&self) -> Vec<(u64, String, u64, u64)> {
        let mut merged: HashMap<u64, (String, u64, u64)> = HashMap::new();
        for report in self.shards.iter().flatten() {
            for (id, text, compared, noisy) in &report.calibration {
                let entry = merged.entry(*id).or_insert_with(|| (text.clone(), 0, 0));
                entry.1 += compared;
                entry.2 += noisy;
            }
        }
        let mut out: Vec<(u64, String, u64, u64)> = merged
            .into_iter()
            .map(|(id, (text, compared, noisy))| (id, text, compared, noisy))
            .collect();
        out.sort_by_key(|f| (std::cmp::Reverse(f.3), std::cmp::Reverse(f.2)));
        out
    }

    pub fn compare_kinds(&self) -> Vec<(&'static str, u64)> {
        let mut merged: Vec<(&'static str, u64)> = Vec::new();
        for report in self.shards.iter().flatten() {
            for &(kind, n) in &report.compare_kinds {
                match merged.iter_mut().find(|(k, _)| *k == kind) {
                    Some(entry) => entry.1 += n,
                    None => merged.push((kind, n)),
                }
            }
        }
        merged
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
