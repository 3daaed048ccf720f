//! Per-shard counters and latency histograms. Owned by one shard and touched only from its
//! thread, so plain `Cell`s and `RefCell`s: no atomics on the hot path. The shard's reporter
//! copies them into a [`ShardReport`] for the control thread.

pub mod fingerprints;
pub mod pools;

use std::cell::{Cell, RefCell};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Counter names, in the order they appear in reports and on `/metrics`.
macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// Plain copy of a shard's counters (cumulative since start).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Counters { $(pub $name: u64,)* }

        impl Counters {
            /// `(name, help, value)` for every counter, for the metrics exposition.
            pub fn fields(&self) -> [(&'static str, &'static str, u64); counters!(@count $($name)*)] {
                [$((stringify!($name), $help, self.$name),)*]
            }

            pub fn add(&mut self, other: &Counters) {
                $(self.$name += other.$name;)*
            }
        }

        /// The live counters of one shard.
        #[derive(Default)]
        pub struct ShardCounters { $(pub $name: Cell<u64>,)* }

        impl ShardCounters {
            pub fn snapshot(&self) -> Counters {
                Counters { $($name: self.$name.get(),)* }
            }
        }
    };
    (@count) => { 0 };
    (@count $head:ident $($tail:ident)*) => { 1 + counters!(@count $($tail)*) };
}

counters! {
    connections_accepted: "client connections accepted",
    unix_connections_accepted: "client connections accepted on the Unix socket (also in connections_accepted)",
    sessions_rejected: "clients refused because the shard was at proxy.sessions-per-shard-max",
    clients_handed_over: "client connections this shard accepted and handed to the shard proxy.client-placement chose",
    handover_overflows: "client connections served by the shard that accepted them because the chosen shard's proxy.handover-queue-max was full or that shard was stopping",
    clients_moved_out: "pooled clients this shard handed, between transactions, to another shard (proxy.client-placement = \"pack\" rebalancing)",
    clients_moved_in: "pooled clients that moved to this shard between transactions",
    client_moves_refused: "pooled clients this shard asked to move that stayed on it because the other shard could not take them (its proxy.handover-queue-max full, or it was stopping)",
    sessions_closed: "client sessions ended",
    startup_timeouts: "clients that did not finish startup within proxy.startup-timeout-ms",
    protocol_errors: "connections closed for a protocol violation (08P01) or an oversized message (54000)",
    ssl_refused: "SSLRequest/GSSENCRequest answered 'N'",
    client_tls_sessions: "client connections that completed a TLS handshake",
    client_tls_failures: "client TLS handshakes that failed",
    client_tls_refused: "plain-text sessions refused (client-tls.mode = require)",
    cancels_forwarded: "CancelRequests forwarded to the primary",
    shadow_cancels_forwarded: "CancelRequests sent to the shadow for the statement a client cancelled on the primary",
    shadow_cancels_skipped: "client cancels not sent to the shadow because a later statement was already written behind the cancelled one",
    auth_failures: "pooled or console clients that failed pgprism's own authentication",
    primary_connect_failures: "sessions whose primary connection could not be opened",
    primary_lost: "sessions whose primary connection ended while the client was still connected",
    shutdown_closed: "idle sessions closed by a drain",
    statements: "Query and Execute messages forwarded to the primary",
    sync_points: "Query, Sync and FunctionCall messages (each answered by one ReadyForQuery)",
    primary_errors: "ErrorResponse messages relayed from the primary",
    client_bytes_in: "bytes read from clients",
    client_bytes_out: "bytes written to clients",
    client_messages_in: "messages read from clients",
    primary_messages_in: "messages read from the primary",
    reports_dropped: "reports to the control thread dropped because its ring was full",
    compare_statements: "statements whose primary and shadow results were compared",
    compare_mismatches: "compared statements whose results differ between primary and shadow (real incompatibilities)",
    compare_inconclusive_concurrent: "compared statements whose results differ but whose order with a conflicting statement of another session could not be reproduced on the shadow",
    compare_inconclusive_nondeterministic: "compared statements whose results differ by nature (volatile functions, server-local values, LIMIT without ORDER BY)",
    compare_unpinned: "compared statements whose order with a conflicting write of another session was not pinned (they overlapped it on the primary, or a wait for it ran out): a difference in them is inconclusive (concurrent)",
    compare_unpinned_overlapped: "compared statements unpinned because a conflicting write of another session completed on the primary while they ran (also in compare_unpinned)",
    compare_unpinned_in_flight: "compared statements unpinned because a conflicting write of another session was still running on the primary when their answer arrived (also in compare_unpinned)",
    compare_unpinned_wait_expired: "compared statements unpinned because their wait, or a later conflicting one's, ran out (compare.order-wait-ms; also in compare_unpinned)",
    compare_unpinned_lock_break: "compared statements unpinned by a lock break (compare.order-lock-wait-ms, or a pooled shadow connection others wait for; also in compare_unpinned)",
    compare_unpinned_primary_only: "compared statements unpinned because a conflicting write ran on the primary only (primary-only routing, calibration; also in compare_unpinned)",
    compare_unpinned_abandoned: "compared statements unpinned because their session stopped comparing before the shadow completed them (also in compare_unpinned)",
    compare_inconclusive_overlapped: "inconclusive (concurrent) statements: a conflicting write of another session completed on the primary while they ran (the limit of ordering from outside the primary)",
    compare_inconclusive_in_flight: "inconclusive (concurrent) statements: a conflicting write of another session was still running on the primary when their answer arrived",
    compare_inconclusive_wait_expired: "inconclusive (concurrent) statements: their wait, or a later conflicting one's, ran out (compare.order-wait-ms)",
    compare_inconclusive_lock_break: "inconclusive (concurrent) statements: sent ahead by a lock break (compare.order-lock-wait-ms, or a pooled shadow connection others wait for)",
    compare_inconclusive_primary_only: "inconclusive (concurrent) statements: a conflicting write ran on the primary only (primary-only routing, calibration)",
    compare_inconclusive_abandoned: "inconclusive (concurrent) statements: their session stopped comparing before the shadow completed them",
    compare_inconclusive_order_recheck: "inconclusive (concurrent) statements: their order re-check read other rows than the statement (the data changed meanwhile, or the statement saw its own transaction's writes)",
    compare_order_waits_expired: "statements sent to the shadow after waiting compare.order-wait-ms for earlier conflicting ones (their order not reproduced)",
    compare_order_lock_breaks: "statements of a transaction holding locks sent to the shadow while the earlier conflicting ones they waited for ran there for compare.order-lock-wait-ms, most likely waiting for those locks (their order not reproduced)",
    compare_skipped: "statements not compared (excluded, diverged transaction, shadow unavailable): the sum of the compare_skipped_* reasons",
    compare_skipped_excluded: "statements not compared: excluded by compare.exclude-patterns",
    compare_skipped_routed: "statements not compared: routed to the primary only (compare.primary-only-patterns)",
    compare_skipped_withheld: "statements not compared: an extended batch sent to the shadow before its Sync named a statement routed to the primary only (the rest withheld)",
    compare_skipped_diverged: "statements not compared: the shadow's transaction had already failed where the primary's had not (or the other way round)",
    compare_skipped_shadow_gone: "statements not compared: the session had stopped comparing (shadow connection lost, unavailable, or given up) before the shadow answered them",
    compare_fallbacks: "fail-on-differences mismatches above compare.buffer-bytes-max: streamed and only reported",
    compare_batches_released: "extended-protocol batches sent to the shadow before their Sync because they passed compare.shadow-batch-bytes-max (not ordered)",
    compare_own_describes: "Describes of a portal pgprism sent (to the primary and the shadow, or to the shadow alone when the client's own Describe went to the primary only) before an Execute of a statement the client never described there, for its columns' types (once per prepared statement and side; answers kept from the client)",
    compare_batches_cut: "extended-protocol batches sent to the shadow before their Sync that then named a statement routed to the primary only: the rest withheld from the shadow, the sync point not compared",
    compare_rollbacks: "ROLLBACKs sent to a shadow left in a transaction the primary had ended",
    compare_begins: "BEGINs sent to a shadow left outside a transaction the primary had opened",
    compare_slow: "statements slower on the shadow than compare.slow-query-ratio",
    compare_explains: "EXPLAIN (ANALYZE, BUFFERS) runs for slow statements",
    compare_order_rechecks: "order re-checks: statements whose rows came in another order under an ORDER BY of keys not all in the output, read again on both sides with the keys appended",
    compare_placed: "reads that overlapped writes of their rows on the primary and differed on the shadow, placed by a re-read on the shadow just after a later overlapping write (compare.place-reads-max): the answer there equal to the primary's, judged a match",
    compare_place_rereads: "re-reads of such reads on the shadow, each just after one overlapping write (see compare_placed)",
    compare_order_recheck_ties: "order re-checks that found the keys in the same order on both sides (ties in another order: no difference)",
    compare_reports_dropped: "mismatch reports dropped because the ring to the control thread was full",
    compare_shadow_connect_failures: "sessions whose shadow connection could not be opened",
    compare_shadow_lost: "sessions whose shadow connection ended early (comparison stopped)",
    compare_shadow_timeouts: "sessions that stopped comparing because the shadow fell behind (compare.shadow-timeout-ms or compare.shadow-lag-max)",
    pool_lends: "transaction pooling: primary connections lent to clients",
    pool_transactions: "transaction pooling: lends that ended with the connection back in the pool or closed",
    pool_wait_us: "transaction pooling: microseconds clients waited for a connection",
    pool_wait_timeouts: "transaction pooling: clients that waited past pool.query-wait-timeout-ms (53300)",
    pool_pins: "transaction pooling: clients pinned to their connection (LISTEN, session advisory lock, temporary object, WITH HOLD cursor)",
    pool_reprepares: "transaction pooling: statements prepared on a lent connection on demand",
    pool_settings_applied: "transaction pooling: lends that first brought the connection to the client's settings",
    pool_servers_opened: "transaction pooling: primary connections opened",
    pool_servers_closed: "transaction pooling: primary connections closed",
    pool_servers_yielded: "transaction pooling: primary connections closed to make room in pool.size for clients of other shards (the bound shared out by each shard's demand)",
    pool_servers_lost: "transaction pooling: primary connections that failed (while lent or at a check)",
    pool_dirty_closed: "transaction pooling: connections closed instead of returned (client left mid-statement, failed rollback or reset)",
    pool_pairs_refused: "transaction pooling: logins refused (53300) because their (user, database) pair would have gone beyond pool.pairs-max",
    pool_pairs_removed: "transaction pooling: (user, database) pools let go, per shard: their first server login failed, or unused for pool.pair-idle-timeout-ms",
    pool_pipelines: "pipelined lending: connections lent to several clients' autocommit statements at once",
    pool_shared_units: "pipelined lending: client statements (a Query, or a batch up to its Sync) sent on a shared connection",
    pool_shared_behind: "pipelined lending: shared statements queued behind another client's on the connection",
    pool_shared_writes: "pipelined lending: writes to shared connections (each carries one or more clients' statements)",
    shadow_pool_lends: "pooled compare shadow: shadow connections lent to sessions (shadow.pool-size)",
    shadow_pool_wait_timeouts: "pooled compare shadow: sessions that stopped comparing after waiting compare.shadow-timeout-ms for a shadow connection",
    shadow_pool_pins: "pooled compare shadow: sessions pinned to their shadow connection (LISTEN, session advisory lock, temporary object, WITH HOLD cursor, statements beyond the kept text)",
    shadow_pool_reprepares: "pooled compare shadow: session statements prepared again on a lent shadow connection",
    shadow_pool_settings_applied: "pooled compare shadow: lends that first brought the shadow connection to the session's settings",
    shadow_pool_servers_opened: "pooled compare shadow: shadow connections opened",
    shadow_pool_dirty_closed: "pooled compare shadow: shadow connections closed instead of returned (session left with a statement in flight, failed rollback or reset)",
}

/// A shard's statistics: counters plus the latency histograms.
pub struct ShardStats {
    pub counters: ShardCounters,
    pub sessions_active: Cell<u64>,
    /// From pgprism reading a statement to it writing the ReadyForQuery to the client.
    pub client_latency_us: RefCell<Histogram<u64>>,
    /// From pgprism reading a statement to it reading the primary's ReadyForQuery.
    pub primary_latency_us: RefCell<Histogram<u64>>,
    /// Compare mode: from pgprism reading the primary's answer to a sync point to it reading
    /// the shadow's answer to the same sync point (0 when the shadow answered first).
    pub shadow_lag_us: RefCell<Histogram<u64>>,
    latency_us_max: u64,
}

impl ShardStats {
    pub fn new(latency_us_max: u64) -> ShardStats {
        ShardStats {
            counters: ShardCounters::default(),
            sessions_active: Cell::new(0),
            client_latency_us: RefCell::new(new_histogram(latency_us_max)),
            primary_latency_us: RefCell::new(new_histogram(latency_us_max)),
            shadow_lag_us: RefCell::new(new_histogram(latency_us_max)),
            latency_us_max,
        }
    }

    #[inline]
    pub fn bump(cell: &Cell<u64>, by: u64) {
        cell.set(cell.get() + by);
    }

    #[inline]
    pub fn record(&self, histogram: &RefCell<Histogram<u64>>, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, self.latency_us_max);
        // `saturating_record` cannot fail: values are clamped into the tracked range.
        histogram.borrow_mut().saturating_record(us);
    }

    pub fn report(&self, shard: usize) -> ShardReport {
        ShardReport {
            shard,
            counters: self.counters.snapshot(),
            sessions_active: self.sessions_active.get(),
            client_latency_us: self.client_latency_us.borrow().clone(),
            primary_latency_us: self.primary_latency_us.borrow().clone(),
            shadow_lag_us: self.shadow_lag_us.borrow().clone(),
            mirrors: Vec::new(),
            fingerprints: Vec::new(),
            compare_kinds: Vec::new(),
            calibration: Vec::new(),
        }
    }
}

/// Histograms with 3 significant digits from 1 us to `latency_us_max`.
pub fn new_histogram(latency_us_max: u64) -> Histogram<u64> {
    // The bounds are validated by the config (latency-us-max >= 1000), so this cannot fail;
    // fall back to the crate's auto-resizing histogram rather than panic.
    Histogram::new_with_bounds(1, latency_us_max.max(2), 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()))
}

#[cold]
fn unreachable_histogram() -> Histogram<u64> {
    panic!("hdrhistogram rejected 3 significant digits")
}

/// What a shard sends the control thread: cumulative, so a dropped report loses nothing.
#[derive(Clone)]
pub struct ShardReport {
    pub shard: usize,
    pub counters: Counters,
    pub sessions_active: u64,
    pub client_latency_us: Histogram<u64>,
    pub primary_latency_us: Histogram<u64>,
    pub shadow_lag_us: Histogram<u64>,
    pub mirrors: Vec<crate::mirror::MirrorReport>,
    /// Fingerprints whose latency changed since the previous report.
    pub fingerprints: Vec<fingerprints::FingerprintReport>,
    /// Compare mismatches by kind (cumulative), empty without a shadow.
    pub compare_kinds: Vec<(&'static str, u64)>,
    /// Compare calibration (A/A): per fingerprint, its text, statements compared and those
    /// that differed (the noise).
    pub calibration: Vec<(u64, String, u64, u64)>,
}
