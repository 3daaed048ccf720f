//! Moving CDC from one pgprism process to the next on an upgrade (SIGUSR2 to a `pgprism run`
//! that runs CDC). The replication slot admits one reader, and two loaders would race each
//! other's checkpoints, so CDC never runs in both: the old process stops its stream (the
//! loader finishes the work already handed to it, checkpoints as always, and the replication
//! connection closes), says so on the upgrade channel, and only then does the new process
//! start, from the checkpoint, once PostgreSQL shows the slot free (a walsender ends a moment
//! after its client leaves). Exactly once holds as for any restart: what was loaded but not
//! checkpointed comes again under the same labels, which StarRocks answers as loaded.
//!
//! This module owns the two ends of that (stop with a bound, start when the slot is free); the
//! channel itself is `server::upgrade`'s, and the decision when to call which is the caller's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::pgconn::{PgConn, quote_literal};
use super::{CdcError, CdcThread, Shared};
use crate::config::{CdcConfig, ConfigError, PgUrl};

/// Polling interval of the bounded waits here (the CDC thread's end, the slot's release).
const POLL: Duration = Duration::from_millis(20);

/// Starts CDC on its own thread with counters the caller made beforehand (its admin routes
/// serve them before CDC starts, while the new process waits for the old one's release).
pub fn spawn_with(cfg: CdcConfig, shared: Arc<Shared>) -> std::io::Result<CdcThread> {
    std::thread::Builder::new()
        .name("cdc".into())
        .spawn(move || super::run_reconnecting(&cfg, shared, || {}))
}

/// How [`stop`] ended.
pub enum Stopped {
    /// The CDC thread ended within the limit; its result.
    Ended(Result<(), CdcError>),
    /// The thread panicked.
    Panicked,
    /// Still running at the limit (a Stream Load retrying, say): it ends with the process.
    Running(CdcThread),
}

/// Stops CDC for good and waits up to `limit` for its thread: the source stops reading, the
/// loader loads and checkpoints what it was handed, and the replication connection closes.
pub fn stop(shared: &Shared, thread: CdcThread, limit: Duration) -> Stopped {
    // `shutdown` first: a stop is final, not a lost connection to recover from.
    shared.shutdown.store(true, Ordering::Release);
    shared.stopped.store(true, Ordering::Release);
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return Stopped::Running(thread);
        }
        std::thread::sleep(POLL);
    }
    match thread.join() {
        Ok(result) => Stopped::Ended(result),
        Err(_) => Stopped::Panicked,
    }
}

/// Waits until `cdc.slot` has no reader (or does not exist), up to `deadline`. `Ok(false)`:
/// still active at the deadline.
pub fn wait_slot_free(cfg: &CdcConfig, deadline: Instant) -> Result<bool, CdcError> {
    let url: PgUrl = cfg
        .source
        .parse()
        .map_err(|e| ConfigError::invalid("cdc.source", &e))?;
    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let mut conn = PgConn::connect(&url, false, timeout).map_err(CdcError::Checkpoint)?;
    let sql = format!(
        "SELECT active::text FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(&cfg.slot)
    );
    loop {
        let rows = conn.query(&sql).map_err(CdcError::Checkpoint)?;
        let active = rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .is_some_and(|value| value == "true");
        if !active {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}
