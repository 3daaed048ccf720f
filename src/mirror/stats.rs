//! Per-shard, per-mirror counters, gauges and latency, and the copy sent to the control
//! thread. Single-threaded (`Cell`s); the error table is bounded.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::stats::new_histogram;

/// Distinct SQLSTATEs kept per mirror and shard; further ones are counted as `other`.
const ERROR_CODES_MAX: usize = 64;

macro_rules! mirror_counters {
    ($($name:ident: $help:literal,)*) => {
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MirrorCounters { $(pub $name: u64,)* }

        impl MirrorCounters {
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name),)*]
            }
            pub fn add(&mut self, o: &MirrorCounters) {
                $(self.$name += o.$name;)*
            }
        }

        #[derive(Default)]
        pub struct LiveCounters { $(pub $name: Cell<u64>,)* }

        impl LiveCounters {
            fn snapshot(&self) -> MirrorCounters {
                MirrorCounters { $($name: self.$name.get(),)* }
            }
        }
    };
}

mirror_counters! {
    sessions: "client sessions mirrored",
    sessions_unsampled: "client sessions left out by the sample fraction",
    statements: "statements (Query, Execute) sent to the mirror",
    messages: "protocol messages sent to the mirror",
    bytes: "bytes sent to the mirror",
    writes: "writes to the mirror's socket (statements / writes shows how much the flush delay coalesced)",
    rows: "rows the mirror returned or reported affected",
    errors: "ErrorResponses from the mirror",
    skipped_filter: "statements not mirrored because of the query filter",
    skipped_overflow: "messages dropped because the session's mirror queue was full",
    skipped_down: "messages not mirrored while the mirror was unreachable",
    skipped_resync: "messages skipped while waiting for a transaction boundary",
    transactions_cut: "times a mirror skipped the rest of a transaction (rolled back there)",
    skipped_unprepared: "statements not mirrored because the mirror lacked their prepared statement and its text was not kept",
    reprepared: "statements prepared again on the mirror before a Bind or EXECUTE",
    timeouts: "statements the mirror did not answer within its timeout",
    reconnects: "mirror connections re-established after a failure",
    cancels_forwarded: "CancelRequests sent to the mirror for the statement a client cancelled on the primary",
    cancels_skipped: "client cancels not sent to the mirror because a later statement was already written behind the cancelled one on that connection",
    units: "transactions (or autocommit statements and batches) handed whole to the mirror's pool",
    units_lost: "pooled transactions lost with a pool connection that failed before answering them (they may or may not have been applied)",
    units_rolled_back: "pooled units that ended inside a transaction block on the mirror, rolled back there before the connection's next unit",
    connect_failures: "mirror connection or authentication failures",
}

pub struct MirrorStats {
    pub counters: LiveCounters,
    pub queue_messages: Cell<u64>,
    pub queue_bytes: Cell<u64>,
    /// Longest time a message waited in a queue before being written, this report interval.
    pub lag_us: Cell<u64>,
    /// Every message's wait before being written (the interval's longest alone says little
    /// of a percentile: one preemption of the shard sets it for the whole second).
    pub lag_hist_us: RefCell<Histogram<u64>>,
    pub latency_us: RefCell<Histogram<u64>>,
    pub errors_by_code: RefCell<HashMap<String, u64>>,
    latency_us_max: u64,
}

impl MirrorStats {
    pub fn new(latency_us_max: u64) -> MirrorStats {
        MirrorStats {
            counters: LiveCounters::default(),
            queue_messages: Cell::new(0),
            queue_bytes: Cell::new(0),
            lag_us: Cell::new(0),
            lag_hist_us: RefCell::new(new_histogram(latency_us_max)),
            latency_us: RefCell::new(new_histogram(latency_us_max)),
            errors_by_code: RefCell::new(HashMap::new()),
            latency_us_max,
        }
    }

    #[inline]
    pub fn bump(cell: &Cell<u64>, by: u64) {
        cell.set(cell.get() + by);
    }

    pub fn record_latency(&self, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, self.latency_us_max);
        self.latency_us.borrow_mut().saturating_record(us);
    }

    pub fn record_error(&self, code: &str) {
        Self::bump(&self.counters.errors, 1);
        let mut table = self.errors_by_code.borrow_mut();
        let key = if table.contains_key(code) || table.len() < ERROR_CODES_MAX {
            code
        } else {
            "other"
        };
        *table.entry(key.to_string()).or_insert(0) += 1;
    }

    pub fn note_lag(&self, waited: Duration) {
        let us = waited.as_micros() as u64;
        if us > self.lag_us.get() {
            self.lag_us.set(us);
        }
        self.lag_hist_us
            .borrow_mut()
            .saturating_record(us.clamp(1, self.latency_us_max));
    }

    /// A copy for the control thread; resets the per-interval lag.
    pub fn report(&self, index: usize, name: &str) -> MirrorReport {
        MirrorReport {
            index,
            name: name.to_string(),
            counters: self.counters.snapshot(),
            queue_messages: self.queue_messages.get(),
            queue_bytes: self.queue_bytes.get(),
            lag_us: self.lag_us.replace(0),
            lag_hist_us: self.lag_hist_us.borrow().clone(),
            latency_us: self.latency_us.borrow().clone(),
            errors_by_code: self.errors_by_code.borrow().clone(),
        }
    }
}

#[derive(Clone)]
pub struct MirrorReport {
    pub index: usize,
    pub name: String,
    pub counters: MirrorCounters,
    pub queue_messages: u64,
    pub queue_bytes: u64,
    pub lag_us: u64,
    /// Every message's wait before being written, since the start (cumulative).
    pub lag_hist_us: Histogram<u64>,
    pub latency_us: Histogram<u64>,
    pub errors_by_code: HashMap<String, u64>,
}
