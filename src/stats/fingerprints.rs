//! Per-shard latency by statement fingerprint: the primary's and each mirror's, so users see
//! which queries got slower on the mirror. Bounded (`metrics.fingerprints-max`); statements
//! beyond the bound are recorded under fingerprint 0, shown as `other`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Fingerprint id of everything that did not fit in the table.
pub const OTHER: u64 = 0;

/// Display text kept per fingerprint.
const TEXT_BYTES_MAX: usize = 200;

struct Entry {
    text: String,
    primary: Histogram<u64>,
    mirrors: Vec<Histogram<u64>>,
    dirty: bool,
}

pub struct Fingerprints {
    max: usize,
    mirrors: usize,
    latency_us_max: u64,
    table: RefCell<HashMap<u64, Entry>>,
}

/// What a shard reports for one fingerprint (only those that changed since the last report).
#[derive(Clone)]
pub struct FingerprintReport {
    pub id: u64,
    pub text: String,
    pub primary: Histogram<u64>,
    pub mirrors: Vec<Histogram<u64>>,
}

fn histogram(latency_us_max: u64) -> Histogram<u64> {
    // Two significant digits keep each histogram a few KiB: there can be hundreds.
    Histogram::new_with_bounds(1, latency_us_max.max(2), 2)
        .unwrap_or_else(|_| crate::stats::new_histogram(latency_us_max))
}

impl Fingerprints {
    pub fn new(max: usize, mirrors: usize, latency_us_max: u64) -> Fingerprints {
        Fingerprints {
            max,
            mirrors,
            latency_us_max,
            table: RefCell::new(HashMap::new()),
        }
    }

    /// The id of `sql`'s fingerprint, adding it to the table when there is room.
    pub fn intern(&self, sql: &[u8]) -> u64 {
        // Hash only (a zero text budget allocates nothing); the display text is built once,
        // when the fingerprint is first seen.
        let (hash, _) = crate::sql::fingerprint(sql, 0);
        let id = hash.max(1);
        let mut table = self.table.borrow_mut();
        if table.contains_key(&id) {
            return id;
        }
        if table.len() >= self.max {
            return self.other(&mut table);
        }
        let (_, text) = crate::sql::fingerprint(sql, TEXT_BYTES_MAX);
        table.insert(id, self.entry(text));
        id
    }

    fn entry(&self, text: String) -> Entry {
        Entry {
            text,
            primary: histogram(self.latency_us_max),
            mirrors: (0..self.mirrors)
                .map(|_| histogram(self.latency_us_max))
                .collect(),
            dirty: false,
        }
    }

    fn other(&self, table: &mut HashMap<u64, Entry>) -> u64 {
        table
            .entry(OTHER)
            .or_insert_with(|| self.entry("other".into()));
        OTHER
    }

    fn record(&self, id: u64, mirror: Option<usize>, elapsed: Duration) {
        let mut table = self.table.borrow_mut();
        let Some(entry) = table.get_mut(&id) else {
            return;
        };
        let us = (elapsed.as_micros() as u64).clamp(1, self.latency_us_max);
        let histogram = match mirror {
            None => &mut entry.primary,
            Some(i) => match entry.mirrors.get_mut(i) {
                Some(h) => h,
                None => return,
            },
        };
        histogram.saturating_record(us);
        entry.dirty = true;
    }

    pub fn record_primary(&self, id: u64, elapsed: Duration) {
        self.record(id, None, elapsed);
    }

    pub fn record_mirror(&self, id: u64, mirror: usize, elapsed: Duration) {
        self.record(id, Some(mirror), elapsed);
    }

    /// Copies of the entries that changed since the last call.
    pub fn report(&self) -> Vec<FingerprintReport> {
        let mut table = self.table.borrow_mut();
        table
            .iter_mut()
            .filter(|(_, e)| e.dirty)
            .map(|(&id, e)| {
                e.dirty = false;
                FingerprintReport {
                    id,
                    text: e.text.clone(),
                    primary: e.primary.clone(),
                    mirrors: e.mirrors.clone(),
                }
            })
            .collect()
    }
}
