//! Change data capture: PostgreSQL logical replication (pgoutput) into StarRocks Stream Load,
//! exactly once.
//!
//! Threads: the CDC thread runs setup, then the replication source and the pipeline (parse,
//! batch, JSON encode); the loader thread runs Stream Loads and writes checkpoints. A bounded
//! crossbeam ring of batches sits between them. The loader publishes the checkpointed LSN
//! and the source confirms that, and only that, to PostgreSQL.
//!
//! This module must never drop or recreate a replication slot, never confirm a position whose
//! rows StarRocks does not have, and never load a batch without its deterministic label.

pub mod checkpoint;
pub mod cmd;
pub mod ddl;
pub mod failpoint;
pub mod fill;
pub mod handover;
pub mod lsn;
pub mod mysql;
pub mod pgconn;
pub mod pgoutput;
pub mod pipeline;
pub mod schema;
pub mod setup;
pub mod snapshot;
pub mod source;
pub mod spill;
pub mod starrocks;
pub mod streams;
pub mod txn;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;

use self::checkpoint::Checkpoints;
use self::ddl::SchemaChange;
use self::lsn::Lsn;
use self::pgconn::{PgConn, PgError};
use self::pipeline::{Pipeline, PipelineConfig, PipelineError, Work};
use self::starrocks::{LoadError, LoadOutcome, SinkConfig, StarRocks, StarRocksUrl};
use crate::config::{CdcConfig, CdcDeleteMode, CdcToastMode, ConfigError, PgUrl};

#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("CDC setup failed")]
    Setup(#[from] setup::SetupError),
    #[error("replication stream failed")]
    Replication(#[source] PgError),
    #[error("replication stream is malformed: {0}")]
    BadStream(&'static str),
    #[error("cannot process the replication stream")]
    Pipeline(#[source] PipelineError),
    #[error("loading into StarRocks failed")]
    Load(#[source] LoadError),
    #[error(
        "TRUNCATE of {table} cannot be applied: StarRocks has no Stream Load truncate; truncate it in StarRocks and restart"
    )]
    Truncate { table: String },
    #[error("writing the checkpoint failed")]
    Checkpoint(#[source] PgError),
    #[error("initial snapshot failed")]
    Snapshot(#[source] snapshot::SnapshotError),
    #[error("the loader thread panicked")]
    LoaderPanicked,
}

/// Per-table load counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableStats {
    pub rows: u64,
    pub bytes: u64,
    pub loads: u64,
    pub already_loaded: u64,
}

/// State shared by the CDC thread, the loader and the control side.
#[derive(Default)]
pub struct Shared {
    /// Last LSN stored in the checkpoint table.
    pub checkpointed: AtomicU64,
    /// Last LSN confirmed to PostgreSQL.
    pub confirmed: AtomicU64,
    /// Highest WAL end the server reported.
    pub server_lsn: AtomicU64,
    pub works_done: AtomicU64,
    pub rows_decoded: AtomicU64,
    pub retries: AtomicU64,
    /// Unix ms of the last checkpoint write.
    pub checkpoint_unix_ms: AtomicU64,
    /// Commit time (Unix ms) of the last checkpointed transaction, for lag in seconds.
    pub checkpoint_commit_unix_ms: AtomicU64,
    /// The source has handed everything over and the loader has done it all.
    pub caught_up: AtomicBool,
    pub paused: AtomicBool,
    /// Set by the owner to stop for good (not reset by a reconnect).
    pub shutdown: AtomicBool,
    /// Tells one run's threads to stop (set internally when either side ends).
    pub stopped: AtomicBool,
    /// Runs ended by a PostgreSQL message that broke the protocol (08P01).
    pub protocol_errors: AtomicU64,
    /// Reconnects after a lost PostgreSQL connection.
    pub reconnects: AtomicU64,
    /// StarRocks transactions committed inside a source transaction because one table's
    /// column list changed there (see `txn`).
    pub transactions_split: AtomicU64,
    /// Flush cycles rolled back and loaded again from the checkpoint so that a table whose
    /// columns changed inside one takes the new column list from its first load (see `txn`).
    pub transactions_reloaded: AtomicU64,
    /// Partial changes (a TOAST value left unchanged, a soft delete without the old row)
    /// made whole rows with values the flush cycle wrote before (see `fill`).
    pub fill_rows_from_cycle: AtomicU64,
    /// ... with values read from StarRocks before their batch loaded.
    pub fill_rows_read: AtomicU64,
    /// ... that StarRocks did not have (their left-out columns load as NULL, as the partial
    /// update would have given them).
    pub fill_rows_missing: AtomicU64,
    /// Partial changes loaded as partial updates all the same (each ends its StarRocks
    /// transaction; see `transactions_split`).
    pub fill_rows_partial: AtomicU64,
    /// Flush cycles whose rows outgrew `cdc.fill-bytes-max`.
    pub fill_overflows: AtomicU64,
    /// Text values that were not UTF-8, loaded with U+FFFD (`cdc.non-utf8 = "replace"`):
    /// the stream's and the snapshot's. A snapshot chunk's count once the stream takes it (a
    /// chunk refused and read again counts once); after a restart inside the process
    /// (`reconnect`), what is loaded again from the checkpoint counts again, the stream's
    /// changes and a chunk taken but not recorded before it alike.
    pub non_utf8_replaced: AtomicU64,
    /// Tables whose `SELECT` StarRocks refused in the middle of the run (after the start's
    /// check found them readable): cut for the rest of the run.
    pub fill_tables_refused: AtomicU64,
    /// The StarRocks tables `fill-rows` may not read, as the first run's check found them,
    /// plus those refused since (`None` before the check): kept for the life of the
    /// process, so that every run of it (a reconnect too) cuts a flush cycle at the same
    /// places, and a replay of a cycle cuts it as the first attempt did.
    fill_unreadable: Mutex<Option<std::collections::HashSet<String>>>,
    /// What the loader learned for the cycle it loads again (kept across runs).
    column_plans: Mutex<txn::ColumnPlans>,
    /// Commits still publishing when a run ended (kept across runs: see `fill::Publishing`).
    publishing: Mutex<fill::Publishing>,
    pub tables: Mutex<BTreeMap<String, TableStats>>,
    /// The initial snapshot's progress.
    pub snapshot: snapshot::Progress,
    /// Snapshot chunks' Stream Load bodies the loader is done with, for the next chunks.
    pub snapshot_bodies: snapshot::Bodies,
    /// Streamed transactions' memory and spill figures (the source copies them).
    pub streams: Mutex<streams::StreamStats>,
}

impl CdcError {
    /// PostgreSQL sent what the protocol does not allow there (SQLSTATE 08P01).
    pub fn is_protocol_violation(&self) -> bool {
        let pg = match self {
            CdcError::Replication(e) | CdcError::Checkpoint(e) => Some(e),
            CdcError::Setup(setup::SetupError::Connect(e)) => Some(e),
            CdcError::Snapshot(e) => e.pg(),
            _ => None,
        };
        pg.and_then(PgError::code) == Some(crate::wire::sqlstate::PROTOCOL_VIOLATION)
    }

    /// A lost or refused PostgreSQL connection: worth reconnecting, resuming from the
    /// checkpoint. Everything else (configuration, setup, StarRocks refusing data) is not.
    pub fn is_transient(&self) -> bool {
        let pg = match self {
            // The cycle is loaded again from the checkpoint, under the same label.
            CdcError::Load(
                LoadError::TxnAborted { .. }
                | LoadError::Replan { .. }
                | LoadError::SelectRefused { .. }
                | LoadError::NotUtf8 { .. }
                | LoadError::Query { .. }
                | LoadError::NotVisible { .. },
            ) => {
                return true;
            }
            CdcError::Replication(e) | CdcError::Checkpoint(e) => e,
            CdcError::Setup(setup::SetupError::Connect(e)) => e,
            CdcError::Snapshot(e) => match e.pg() {
                Some(e) => e,
                None => return false,
            },
            _ => return false,
        };
        match pg {
            PgError::Connect { .. } | PgError::Io(_) | PgError::Closed => true,
            // Administrator command, crash shutdown, cannot connect now (server restarting);
            // the slot still held by its previous reader (55006, "replication slot is active
            // for PID"): a process an upgrade replaced that has not let go yet, or a
            // walsender that has not noticed its client is gone. Retried within
            // `cdc.reconnect-attempts-max`, so two live readers of one slot still fail.
            PgError::Server(e) => {
                matches!(e.code.as_str(), "57P01" | "57P02" | "57P03" | "55006")
            }
            _ => false,
        }
    }
}

impl Shared {
    /// Notes that StarRocks refused `fill-rows` a `SELECT` of `table` mid-run: its partial
    /// changes cut from the next run on. `false` when it was known already (then the
    /// refusal is a failure like any other).
    fn refuse_select(&self, table: &str) -> bool {
        let Ok(mut kept) = self.fill_unreadable.lock() else {
            return false;
        };
        let added = kept
            .get_or_insert_with(Default::default)
            .insert(table.to_string());
        if added {
            self.fill_tables_refused.fetch_add(1, Ordering::Relaxed);
        }
        added
    }

    /// The loader's share of the fill counters (this run's).
    fn store_filled(&self, filled: fill::Filled) {
        self.fill_rows_read
            .store(filled.rows_read, Ordering::Relaxed);
        self.fill_rows_missing
            .store(filled.rows_missing, Ordering::Relaxed);
    }

    /// The pipeline's share of the fill counters (this run's).
    pub(crate) fn store_fill_stats(&self, stats: pipeline::FillStats) {
        self.fill_rows_from_cycle
            .store(stats.rows_from_cycle, Ordering::Relaxed);
        self.fill_rows_partial
            .store(stats.rows_partial, Ordering::Relaxed);
        self.fill_overflows
            .store(stats.overflows, Ordering::Relaxed);
    }

    fn fill_json(&self) -> sonic_rs::Value {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        sonic_rs::json!({
            "rows_from_cycle": load(&self.fill_rows_from_cycle),
            "rows_read": load(&self.fill_rows_read),
            "rows_missing": load(&self.fill_rows_missing),
            "rows_partial": load(&self.fill_rows_partial),
            "overflows": load(&self.fill_overflows),
            "tables_refused": load(&self.fill_tables_refused),
        })
    }

    fn streams_json(&self) -> sonic_rs::Value {
        let s = self.streams.lock().map(|s| *s).unwrap_or_default();
        sonic_rs::json!({
            "memory_bytes": s.memory_bytes,
            "memory_bytes_peak": s.memory_bytes_peak,
            "spill_bytes": s.spill_bytes,
            "spilled_bytes_total": s.spilled_bytes_total,
            "transactions_spilled_total": s.transactions_spilled_total,
        })
    }

    /// A JSON status document (for the admin endpoint and logs).
    pub fn status_json(&self) -> String {
        let server = self.server_lsn.load(Ordering::Relaxed);
        let confirmed = self.confirmed.load(Ordering::Relaxed);
        let ckpt_ms = self.checkpoint_unix_ms.load(Ordering::Relaxed);
        let commit_ms = self.checkpoint_commit_unix_ms.load(Ordering::Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let tables = self.tables.lock().map(|t| t.clone()).unwrap_or_default();
        let doc = sonic_rs::json!({
            "paused": self.paused.load(Ordering::Relaxed),
            "server_lsn": Lsn(server).to_string(),
            "confirmed_lsn": Lsn(confirmed).to_string(),
            "checkpoint_lsn": Lsn(self.checkpointed.load(Ordering::Relaxed)).to_string(),
            "lag_bytes": server.saturating_sub(confirmed),
            // Seconds between now and the commit of the last transaction StarRocks has, while
            // anything is still on its way; 0 when caught up.
            "lag_seconds": if self.caught_up.load(Ordering::Relaxed) || commit_ms == 0 {
                0
            } else {
                now_ms.saturating_sub(commit_ms) / 1000
            },
            "last_checkpoint_unix_ms": ckpt_ms,
            "rows_decoded": self.rows_decoded.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "reconnects": self.reconnects.load(Ordering::Relaxed),
            "transactions_split": self.transactions_split.load(Ordering::Relaxed),
            "non_utf8_values_replaced": self.non_utf8_replaced.load(Ordering::Relaxed),
            "transactions_reloaded": self.transactions_reloaded.load(Ordering::Relaxed),
            "tables": sonic_rs::to_value(&tables).unwrap_or_default(),
            "snapshot": self.snapshot.json(),
            "streams": self.streams_json(),
            "fill": self.fill_json(),
        });
        doc.to_string()
    }
}

impl Shared {
    /// The same figures as [`Shared::status_json`] in Prometheus text format
    /// (`GET /cdc/metrics`), per-table series labelled with the table.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        self.write_run_metrics(&mut out);
        self.write_table_metrics(&mut out);
        out
    }

    /// The run's own series, one value each.
    fn write_run_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let server = load(&self.server_lsn);
        let confirmed = load(&self.confirmed);
        for (name, kind, help, value) in [
            (
                "server_lsn",
                "gauge",
                "highest WAL position the server reported",
                server,
            ),
            (
                "confirmed_lsn",
                "gauge",
                "position confirmed to PostgreSQL",
                confirmed,
            ),
            (
                "checkpoint_lsn",
                "gauge",
                "position stored in the checkpoint table",
                load(&self.checkpointed),
            ),
            (
                "lag_bytes",
                "gauge",
                "WAL bytes not yet confirmed",
                server.saturating_sub(confirmed),
            ),
            (
                "last_checkpoint_unix_ms",
                "gauge",
                "time of the last checkpoint",
                load(&self.checkpoint_unix_ms),
            ),
            (
                "rows_decoded_total",
                "counter",
                "rows decoded from pgoutput",
                load(&self.rows_decoded),
            ),
            (
                "retries_total",
                "counter",
                "Stream Load retries",
                load(&self.retries),
            ),
            (
                "protocol_errors_total",
                "counter",
                "runs ended by a PostgreSQL message that broke the protocol (08P01)",
                load(&self.protocol_errors),
            ),
            (
                "reconnects_total",
                "counter",
                "reconnects after a lost PostgreSQL connection",
                load(&self.reconnects),
            ),
            (
                "non_utf8_values_replaced_total",
                "counter",
                "text values that were not UTF-8, loaded with U+FFFD (cdc.non-utf8 = \"replace\")",
                load(&self.non_utf8_replaced),
            ),
            (
                "transactions_split_total",
                "counter",
                "StarRocks transactions committed inside a source transaction",
                load(&self.transactions_split),
            ),
            (
                "transactions_reloaded_total",
                "counter",
                "flush cycles loaded again for a column list changed inside them",
                load(&self.transactions_reloaded),
            ),
            (
                "fill_rows_from_cycle_total",
                "counter",
                "partial changes made whole rows from the flush cycle's own rows",
                load(&self.fill_rows_from_cycle),
            ),
            (
                "fill_rows_read_total",
                "counter",
                "partial changes made whole rows with values read from StarRocks",
                load(&self.fill_rows_read),
            ),
            (
                "fill_rows_missing_total",
                "counter",
                "partial changes whose row StarRocks did not have (left-out columns take their StarRocks defaults)",
                load(&self.fill_rows_missing),
            ),
            (
                "fill_rows_partial_total",
                "counter",
                "partial changes loaded as partial updates (each ends its StarRocks transaction)",
                load(&self.fill_rows_partial),
            ),
            (
                "fill_overflows_total",
                "counter",
                "flush cycles whose rows outgrew cdc.fill-bytes-max",
                load(&self.fill_overflows),
            ),
            (
                "fill_tables_refused_total",
                "counter",
                "tables whose SELECT StarRocks refused mid-run (their partial changes cut from then on)",
                load(&self.fill_tables_refused),
            ),
            (
                "paused",
                "gauge",
                "1 while loading is paused",
                self.paused.load(Ordering::Relaxed) as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP pgprism_cdc_{name} {help}");
            let _ = writeln!(out, "# TYPE pgprism_cdc_{name} {kind}");
            let _ = writeln!(out, "pgprism_cdc_{name} {value}");
        }
    }

    /// The per-table series, labelled with the table.
    fn write_table_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let tables = self.tables.lock().map(|t| t.clone()).unwrap_or_default();
        for (name, kind, help, get) in [
            (
                "rows_loaded_total",
                "counter",
                "rows loaded into StarRocks",
                (|t: &TableStats| t.rows) as fn(&TableStats) -> u64,
            ),
            (
                "bytes_loaded_total",
                "counter",
                "JSON bytes loaded into StarRocks",
                |t| t.bytes,
            ),
            (
                "loads_total",
                "counter",
                "Stream Load requests that succeeded",
                |t| t.loads,
            ),
            (
                "loads_already_loaded_total",
                "counter",
                "loads StarRocks already had (label dedup)",
                |t| t.already_loaded,
            ),
        ] {
            let _ = writeln!(out, "# HELP pgprism_cdc_{name} {help}");
            let _ = writeln!(out, "# TYPE pgprism_cdc_{name} {kind}");
            for (table, stats) in &tables {
                let _ = writeln!(
                    out,
                    "pgprism_cdc_{name}{{table=\"{table}\"}} {}",
                    get(stats)
                );
            }
        }
    }
}

/// Checks the `[cdc]` section, naming the key on error.
pub fn validate(cfg: &CdcConfig) -> Result<(), ConfigError> {
    validate_endpoints(cfg)?;
    validate_names(cfg)?;
    validate_limits(cfg)
}

/// A [`ConfigError`] for the key `cdc.{path}`.
fn key_error(path: &str, message: &str) -> ConfigError {
    ConfigError::Key {
        path: format!("cdc.{path}"),
        message: message.to_string(),
    }
}

/// The source and StarRocks URLs.
fn validate_endpoints(cfg: &CdcConfig) -> Result<(), ConfigError> {
    if cfg.source.is_empty() {
        return Err(key_error(
            "source",
            "required: the source postgres://user@host:port/db URL",
        ));
    }
    let url: PgUrl = cfg
        .source
        .parse()
        .map_err(|e| ConfigError::invalid("cdc.source", &e))?;
    crate::tls::Upstream::try_from(&url).map_err(|e| ConfigError::invalid("cdc.source", &e))?;
    if cfg.starrocks.is_empty() {
        return Err(key_error(
            "starrocks",
            "required: the StarRocks FE http://user:password@host:8030 URL",
        ));
    }
    StarRocksUrl::parse(&cfg.starrocks).map_err(|e| key_error("starrocks", &e))?;
    Ok(())
}

/// The database, tables, slot and publication names.
fn validate_names(cfg: &CdcConfig) -> Result<(), ConfigError> {
    if cfg.database.is_empty() {
        return Err(key_error("database", "required: the StarRocks database"));
    }
    if cfg.tables.is_empty() || cfg.tables.iter().any(|t| t.trim().is_empty()) {
        return Err(key_error("tables", "required: at least one table name"));
    }
    let ident_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if !ident_ok(&cfg.slot) {
        return Err(key_error(
            "slot",
            "expected 1 to 63 characters of a-z, 0-9 and _ (PostgreSQL slot names)",
        ));
    }
    if cfg.publication.is_empty() {
        return Err(key_error("publication", "required"));
    }
    Ok(())
}

/// The sizes, counts and timeouts, and the settings that depend on each other.
fn validate_limits(cfg: &CdcConfig) -> Result<(), ConfigError> {
    for (name, value) in [
        ("flush-rows", cfg.flush_rows as u64),
        ("flush-bytes", cfg.flush_bytes as u64),
        ("flush-interval-ms", cfg.flush_interval_ms),
        ("ring-capacity", cfg.ring_capacity as u64),
        ("load-attempts-max", u64::from(cfg.load_attempts_max)),
        ("load-timeout-ms", cfg.load_timeout_ms),
        ("publishing-labels-max", cfg.publishing_labels_max as u64),
        ("transaction-timeout-ms", cfg.transaction_timeout_ms),
        ("connect-timeout-ms", cfg.connect_timeout_ms),
        ("status-interval-ms", cfg.status_interval_ms),
        ("snapshot-chunk-rows", cfg.snapshot_chunk_rows as u64),
        (
            "snapshot-chunk-bytes-max",
            cfg.snapshot_chunk_bytes_max as u64,
        ),
        ("schema-change-timeout-ms", cfg.schema_change_timeout_ms),
        ("snapshot-workers", cfg.snapshot_workers as u64),
        (
            "snapshot-chunks-in-flight",
            cfg.snapshot_chunks_in_flight as u64,
        ),
        (
            "snapshot-chunks-planned-ahead",
            cfg.snapshot_chunks_planned_ahead as u64,
        ),
        (
            "snapshot-chunk-attempts-max",
            u64::from(cfg.snapshot_chunk_attempts_max),
        ),
        (
            "snapshot-window-keys-max",
            cfg.snapshot_window_keys_max as u64,
        ),
        (
            "snapshot-partial-keys-max",
            cfg.snapshot_partial_keys_max as u64,
        ),
        (
            "stream-buffer-bytes-max",
            cfg.stream_buffer_bytes_max as u64,
        ),
        ("spill-bytes-max", cfg.spill_bytes_max),
    ] {
        if value == 0 {
            return Err(key_error(name, "expected a value above 0"));
        }
    }
    if cfg.snapshot_read_coalesce_us > 100_000 {
        return Err(key_error(
            "snapshot-read-coalesce-us",
            "expected at most 100000 (0.1 s)",
        ));
    }
    if cfg.snapshot_workers > 64 {
        return Err(key_error(
            "snapshot-workers",
            "expected at most 64 (each is a PostgreSQL connection)",
        ));
    }
    if cfg.snapshot_chunks_in_flight > 64 {
        return Err(key_error(
            "snapshot-chunks-in-flight",
            "expected at most 64 (each is a chunk held in memory per worker)",
        ));
    }
    if cfg.snapshot_chunks_planned_ahead > 64 {
        return Err(key_error(
            "snapshot-chunks-planned-ahead",
            "expected at most 64 (each is a chunk recorded as planned before it is read)",
        ));
    }
    if cfg.flush_bytes > 100 << 20 {
        return Err(key_error(
            "flush-bytes",
            "expected at most 104857600 (Stream Load's JSON body limit)",
        ));
    }
    if !(0.0..=1.0).contains(&cfg.max_filter_ratio) {
        return Err(key_error(
            "max-filter-ratio",
            "expected a ratio from 0 to 1",
        ));
    }
    if cfg.delete_mode == CdcDeleteMode::Soft && !cfg.audit_columns {
        return Err(key_error(
            "delete-mode",
            "soft deletes need cdc.audit-columns = true (is_deleted marks them)",
        ));
    }
    Ok(())
}

/// Runs CDC like [`run`], reconnecting after a lost PostgreSQL connection (bounded by
/// `cdc.reconnect-attempts-max`, with backoff). Each reconnect is a fresh start from the
/// checkpoint: setup again (idempotent), replay, labels dedup what was already loaded.
pub fn run_reconnecting(
    cfg: &CdcConfig,
    shared: Arc<Shared>,
    ready: impl FnOnce(),
) -> Result<(), CdcError> {
    let mut ready = Some(ready);
    let mut failures = 0u32;
    // Snapshot restarts per table after a rewrite, bounded by `snapshot-chunk-attempts-max`
    // (a table rewritten again and again would otherwise be copied from its start forever).
    let mut rewrites: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    loop {
        let started = std::time::Instant::now();
        shared.stopped.store(false, Ordering::Release);
        let result = run(cfg, Arc::clone(&shared), || {
            if let Some(ready) = ready.take() {
                ready();
            }
        });
        if let Err(err) = &result
            && err.is_protocol_violation()
        {
            shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        let err = match result {
            Err(CdcError::Load(LoadError::Replan { label, table }))
                if !shared.shutdown.load(Ordering::Acquire) =>
            {
                // No failure: the loader chose to, and bounds how often
                // (`txn::ColumnPlans`).
                tracing::info!(%label, %table, "loading the flush cycle again from the checkpoint");
                shared.transactions_reloaded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(CdcError::Load(LoadError::SelectRefused { table, source }))
                if !shared.shutdown.load(Ordering::Acquire) && shared.refuse_select(&table) =>
            {
                // No failure either: the cycle is loaded again, the table cut from now on.
                tracing::warn!(%table, error = %source, "StarRocks refused to let fill-rows read this table (grant SELECT on it): its partial changes that need values StarRocks holds load as partial updates for the rest of the run, each ending the StarRocks transaction there; loading the flush cycle again from the checkpoint");
                shared.transactions_reloaded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(CdcError::Load(LoadError::NotUtf8 { table, column }))
                if !shared.shutdown.load(Ordering::Acquire) && shared.refuse_select(&table) =>
            {
                // As above: StarRocks holds bytes a JSON load cannot carry unchanged; a
                // partial update keeps them as they are.
                tracing::warn!(%table, %column, "a value fill-rows read from StarRocks is not UTF-8 and cannot be loaded back unchanged: this table's partial changes that need values StarRocks holds load as partial updates for the rest of the run (which keep StarRocks' bytes), each ending the StarRocks transaction there; loading the flush cycle again from the checkpoint");
                shared.transactions_reloaded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(CdcError::Snapshot(snapshot::SnapshotError::Rewritten { table }))
                if !shared.shutdown.load(Ordering::Acquire) =>
            {
                // No failure: the table's ranges are forgotten and planned again, a bounded
                // number of times.
                let times = rewrites.entry(table.clone()).or_insert(0);
                *times += 1;
                if *times > cfg.snapshot_chunk_attempts_max {
                    return Err(CdcError::Snapshot(
                        snapshot::SnapshotError::RewrittenTooOften {
                            table,
                            times: *times,
                        },
                    ));
                }
                tracing::info!(%table, "resuming from the checkpoint; the table's snapshot starts over");
                continue;
            }
            Err(err) if err.is_transient() && !shared.shutdown.load(Ordering::Acquire) => err,
            other => return other,
        };
        if started.elapsed() > Duration::from_secs(60) {
            failures = 0;
        }
        failures += 1;
        if failures > cfg.reconnect_attempts_max {
            return Err(err);
        }
        let delay = Duration::from_millis(250u64 << failures.min(7)).min(Duration::from_secs(30));
        // The whole chain: the cause (a lost connection, a transaction StarRocks aborted)
        // sits below the top-level error.
        let mut error = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(e) = source {
            error.push_str(": ");
            error.push_str(&e.to_string());
            source = e.source();
        }
        tracing::warn!(%error, attempt = failures, ?delay, "resuming from the checkpoint");
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(delay);
    }
}

/// Runs CDC until an error (or [`Shared::stopped`]). `ready` is called once setup is done and
/// streaming starts.
pub fn run(cfg: &CdcConfig, shared: Arc<Shared>, ready: impl FnOnce()) -> Result<(), CdcError> {
    validate(cfg)?;
    let url: PgUrl = cfg
        .source
        .parse()
        .map_err(|e| ConfigError::invalid("cdc.source", &e))?;
    let sr_url = StarRocksUrl::parse(&cfg.starrocks).map_err(|message| ConfigError::Key {
        path: "cdc.starrocks".into(),
        message,
    })?;
    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let sink = StarRocks::new(sr_url, sink_config(cfg));
    let prepared = setup::prepare(cfg, &url, &sink, timeout)?;
    let pcfg = pipeline_config(cfg, &prepared.incarnation);
    // Transactions a killed run began under other batch boundaries (see
    // `txn::roll_back_leftovers`); labels without an incarnation (an older version's slot)
    // are `{slot}-...`, a prefix other slots' names may share, so those are left alone.
    if cfg.transaction_mode != crate::config::CdcTransactionMode::None
        && !prepared.incarnation.is_empty()
    {
        let targets: Vec<&str> = prepared
            .tables
            .iter()
            .map(|t| setup::split_table(&t.name).1)
            .collect();
        txn::roll_back_leftovers(&sink, &pcfg.label_prefix, &targets);
    }
    // Checked by the process's first run, then kept (see `Shared::fill_unreadable`).
    let unreadable = if pcfg.fill_rows {
        let mut kept = shared
            .fill_unreadable
            .lock()
            .map_err(|_| CdcError::LoaderPanicked)?;
        let refused = kept.get_or_insert_with(|| {
            fill::unreadable_tables(
                &sink,
                prepared
                    .tables
                    .iter()
                    .map(|t| (setup::split_table(&t.name).1, &t.key[..])),
            )
        });
        prepared
            .tables
            .iter()
            .filter(|t| refused.contains(setup::split_table(&t.name).1))
            .map(|t| t.name.clone())
            .collect()
    } else {
        Default::default()
    };
    let mut checkpoints = Checkpoints::connect(&url, &cfg.checkpoint_table, &cfg.slot, timeout)
        .map_err(CdcError::Checkpoint)?;
    // Commits an earlier process left publishing (a reconnect carries its own list too).
    let publishing_stored = checkpoints
        .load_publishing()
        .map_err(CdcError::Checkpoint)?;
    let start = prepared.checkpoint.unwrap_or(Lsn::ZERO);
    let snapshot = snapshot::resume(
        cfg,
        &url,
        &prepared.tables,
        prepared.slot_created,
        &shared,
        timeout,
    )
    .map_err(CdcError::Snapshot)?;
    let mut repl = PgConn::connect(&url, true, timeout).map_err(CdcError::Replication)?;
    if let Some(lsn) = prepared.checkpoint {
        shared.checkpointed.store(lsn.0, Ordering::Release);
    }
    tracing::info!(slot = %cfg.slot, from = %start, created = prepared.slot_created, "starting replication");
    let scfg = source::SourceConfig {
        slot: cfg.slot.clone(),
        publication: cfg.publication.clone(),
        status_interval: Duration::from_millis(cfg.status_interval_ms),
    };
    source::start(&mut repl, &scfg, start)?;
    ready();

    // Counts of this run only (the source compares them with what it sent in this run).
    shared.works_done.store(0, Ordering::Release);
    let (tx, rx) = crossbeam_channel::bounded::<Work>(cfg.ring_capacity);
    let plans = shared
        .column_plans
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default();
    let mut publishing = shared
        .publishing
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default()
        .with_max(cfg.publishing_labels_max);
    publishing.merge(publishing_stored);
    let (txns, plain) = match cfg.transaction_mode {
        crate::config::CdcTransactionMode::None => (None, publishing),
        mode => (
            txn::Transactions::new(mode, plans, cfg.reconnect_attempts_max, publishing),
            fill::Publishing::default(),
        ),
    };
    let loader = spawn_loader(rx, sink, txns, plain, checkpoints, Arc::clone(&shared))?;
    let mut pipeline = Pipeline::new(pcfg.clone(), prepared.keys);
    pipeline.set_partitions(prepared.partitions);
    pipeline.set_forced_boundary(prepared.pending);
    pipeline.set_spill(spill_limits(cfg)?);
    pipeline.set_fill_unreadable(unreadable);
    let workers = match snapshot {
        Some(snapshot) => {
            pipeline.set_windows(snapshot.windows(cfg.snapshot_window_keys_max));
            Some(snapshot.spawn(cfg, &url, &pcfg, &shared, timeout)?)
        }
        None => None,
    };
    let streamed = source::run(&mut repl, &scfg, &mut pipeline, &tx, &shared);
    drop(tx);
    shared.stopped.store(true, Ordering::Release);
    let loaded = loader.join().map_err(|_| CdcError::LoaderPanicked)?;
    let copied = workers.map_or(Ok(()), snapshot::Workers::join);
    // The loader's error is the cause when it stopped first, then a snapshot worker's.
    loaded.and(copied).and(streamed)
}

/// The spill directory and bound; removes the files a crashed run left there (their
/// transactions come again from their first change).
fn spill_limits(cfg: &CdcConfig) -> Result<streams::SpillLimits, CdcError> {
    let dir = if cfg.spill_dir.is_empty() {
        std::env::temp_dir().join("pgprism-spill")
    } else {
        std::path::PathBuf::from(&cfg.spill_dir)
    };
    let removed = spill::remove_leftovers(&dir, &cfg.slot)
        .map_err(|e| CdcError::Pipeline(PipelineError::Stream(e.into())))?;
    if removed > 0 {
        tracing::info!(dir = %dir.display(), files = removed, "removed the spill files of an earlier run");
    }
    Ok(streams::SpillLimits {
        dir,
        slot: cfg.slot.clone(),
        bytes_max: cfg.spill_bytes_max,
    })
}

fn sink_config(cfg: &CdcConfig) -> SinkConfig {
    SinkConfig {
        database: cfg.database.clone(),
        query_port: cfg.starrocks_query_port,
        schema_change_timeout: Duration::from_millis(cfg.schema_change_timeout_ms),
        max_filter_ratio: cfg.max_filter_ratio,
        attempts_max: cfg.load_attempts_max,
        backoff: Duration::from_millis(cfg.load_backoff_ms),
        backoff_max: Duration::from_millis(cfg.load_backoff_ms_max),
        timeout: Duration::from_millis(cfg.load_timeout_ms),
        txn_timeout: Duration::from_millis(cfg.transaction_timeout_ms),
    }
}

fn pipeline_config(cfg: &CdcConfig, incarnation: &str) -> PipelineConfig {
    PipelineConfig {
        label_prefix: if incarnation.is_empty() {
            cfg.slot.clone()
        } else {
            format!("{}-{incarnation}", cfg.slot)
        },
        flush_rows: cfg.flush_rows,
        flush_bytes: cfg.flush_bytes,
        flush_interval: Duration::from_millis(cfg.flush_interval_ms),
        delete_mode: cfg.delete_mode,
        toast_mode: cfg.toast_mode,
        audit_prefix: cfg.audit_columns.then(|| cfg.audit_prefix.clone()),
        stream_buffer_bytes_max: cfg.stream_buffer_bytes_max,
        schema_changes: cfg.schema_changes,
        // Whole old rows fill every left-out value then; no row needs keeping.
        fill_rows: cfg.fill_rows
            && !(cfg.replica_identity_full && cfg.toast_mode == CdcToastMode::FullRow),
        fill_bytes_max: cfg.fill_bytes_max,
        non_utf8_replace: cfg.non_utf8 == crate::config::CdcNonUtf8::Replace,
    }
}

/// Starts the loader thread: it loads what arrives on `rx` and writes the checkpoints.
fn spawn_loader(
    rx: Receiver<Work>,
    mut sink: StarRocks,
    mut txns: Option<txn::Transactions>,
    mut plain: fill::Publishing,
    mut checkpoints: Checkpoints,
    shared: Arc<Shared>,
) -> Result<std::thread::JoinHandle<Result<(), CdcError>>, CdcError> {
    std::thread::Builder::new()
        .name("cdc-loader".into())
        .spawn(move || {
            let result = load_loop(
                rx,
                &mut sink,
                txns.as_mut(),
                &mut plain,
                &mut checkpoints,
                &shared,
            );
            if let Some(txns) = txns.as_mut() {
                // A cycle cut off by the stop: its rows come again from the checkpoint.
                txns.abort_all(&mut sink);
                if let Ok(mut plans) = shared.column_plans.lock() {
                    *plans = txns.take_plans();
                }
                plain = txns.take_publishing();
            }
            // Commits still publishing: the next run waits for them before it reads.
            if let Ok(mut publishing) = shared.publishing.lock() {
                *publishing = plain;
            }
            // Wake the source so it stops instead of waiting on a full ring.
            shared.stopped.store(true, Ordering::Release);
            result
        })
        .map_err(|e| CdcError::Replication(PgError::Io(e)))
}

/// A snapshot chunk whose rows are in StarRocks, to record in the chunk table.
struct ChunkDone {
    table: String,
    chunk: u32,
    rows: u64,
    span: snapshot::Span,
}

/// Records snapshot chunks as copied, in key order within each range: a range's record moves
/// from a chunk's lower bound to its upper one, so a chunk that comes before the one ahead
/// of it in its range (that one was read again, see `snapshot::Worker::turns`) waits here
/// until it does. At most a worker's chunks in flight times the attempts per chunk wait: a
/// chunk read again is read before its worker reads any further, and the chunks read
/// after it are taken in order once it is.
#[derive(Default)]
struct ChunkRecords {
    waiting: Vec<ChunkDone>,
}

impl ChunkRecords {
    fn record(
        &mut self,
        checkpoints: &mut Checkpoints,
        shared: &Shared,
        done: ChunkDone,
    ) -> Result<(), CdcError> {
        failpoint::hit("cdc-mid-snapshot-chunk");
        let stored = checkpoints
            .store_chunk_done(&done.table, done.chunk, done.rows, &done.span)
            .map_err(CdcError::Checkpoint)?;
        if !stored {
            self.waiting.push(done);
            return Ok(());
        }
        Self::counted(shared, done.rows);
        // The chunks of that range waiting for this one, in turn (a chunk's lower bound is
        // the text of the previous one's upper bound, as the worker cut it).
        let mut at = done.span.hi;
        while let Some(i) = self
            .waiting
            .iter()
            .position(|w| w.table == done.table && w.chunk == done.chunk && w.span.lo == at)
        {
            let w = self.waiting.swap_remove(i);
            if !checkpoints
                .store_chunk_done(&w.table, w.chunk, w.rows, &w.span)
                .map_err(CdcError::Checkpoint)?
            {
                self.waiting.push(w);
                break;
            }
            at = w.span.hi;
            Self::counted(shared, w.rows);
        }
        Ok(())
    }

    fn counted(shared: &Shared, rows: u64) {
        if shared.snapshot.chunk_recorded(rows) {
            snapshot::log_finished(&shared.snapshot);
        }
    }
}

/// The CDC thread started by [`spawn`]; joining it gives the reason it stopped.
pub type CdcThread = std::thread::JoinHandle<Result<(), CdcError>>;

/// Starts CDC on its own thread, for running beside the proxy in one process. The returned
/// [`Shared`] carries the counters, pause/resume and `stopped` (set it to stop).
pub fn spawn(cfg: CdcConfig) -> std::io::Result<(Arc<Shared>, CdcThread)> {
    let shared = Arc::new(Shared::default());
    let thread_shared = Arc::clone(&shared);
    let handle = std::thread::Builder::new()
        .name("cdc".into())
        .spawn(move || run_reconnecting(&cfg, thread_shared, || {}))?;
    Ok((shared, handle))
}

fn load_loop(
    rx: Receiver<Work>,
    sink: &mut StarRocks,
    mut txns: Option<&mut txn::Transactions>,
    unpublished_plain: &mut fill::Publishing,
    checkpoints: &mut Checkpoints,
    shared: &Shared,
) -> Result<(), CdcError> {
    // Snapshot chunks whose rows wait in the open StarRocks transaction (bounded by the
    // chunks one flush cycle can hold).
    let mut chunks_pending: Vec<ChunkDone> = Vec::new();
    // The snapshot's partial keys as of the next checkpoint (see `Work::SnapshotPartial`).
    let mut partial_pending: Option<Vec<snapshot::window::PartialState>> = None;
    let mut chunk_records = ChunkRecords::default();
    // The last TRUNCATE applied (by this run or an earlier one).
    let mut truncated = checkpoints.load_truncated().map_err(CdcError::Checkpoint)?;
    // Columns to drop once the cycle's StarRocks transaction has committed.
    let mut drops_pending: Vec<SchemaChange> = Vec::new();
    // Rows filled from StarRocks with plain Stream Load (`transaction-mode = "none"`).
    let mut filled_plain = fill::Filled::default();
    for work in rx {
        while shared.paused.load(Ordering::Acquire) && !shared.stopped.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
        match work {
            Work::Load(_) | Work::LoadFilled(..) => {
                let (batch, fill) = match work {
                    Work::Load(batch) => (batch, None),
                    Work::LoadFilled(batch, plan) => (batch, Some(plan)),
                    _ => continue,
                };
                failpoint::hit("cdc-before-load");
                let outcome = match txns.as_deref_mut() {
                    Some(txns) => {
                        let outcome = txns.load(sink, &batch, fill.as_deref());
                        shared
                            .transactions_split
                            .store(txns.splits, Ordering::Relaxed);
                        shared.store_filled(txns.filled);
                        outcome
                    }
                    None => match fill {
                        // Plain Stream Load: a label an earlier run loaded is refused whatever
                        // the body, so the values are read every time.
                        Some(plan) => unpublished_plain
                            .wait(sink)
                            .and_then(|()| fill::fill_batch(sink, &batch, &plan))
                            .and_then(|(whole, counts)| {
                                filled_plain.rows_read += counts.rows_read;
                                filled_plain.rows_missing += counts.rows_missing;
                                shared.store_filled(filled_plain);
                                sink.load(&whole)
                            }),
                        None => sink.load(&batch),
                    }
                    .and_then(|outcome| {
                        // Its rows are not visible yet (`Publish Timeout`), or loaded by an
                        // earlier run and perhaps not yet visible (one state check if so).
                        if outcome != LoadOutcome::Loaded {
                            unpublished_plain.push(sink, batch.label.clone())?;
                        }
                        Ok(outcome)
                    }),
                }
                .map_err(CdcError::Load)?;
                shared.retries.store(sink.retries, Ordering::Relaxed);
                if let Ok(mut tables) = shared.tables.lock() {
                    let t = tables.entry(batch.table.clone()).or_default();
                    t.loads += 1;
                    if outcome == LoadOutcome::AlreadyLoaded {
                        t.already_loaded += 1;
                    } else {
                        t.rows += batch.rows;
                        t.bytes += batch.body.len() as u64;
                    }
                }
                tracing::debug!(table = %batch.table, label = %batch.label, rows = batch.rows, ?outcome, "loaded");
                failpoint::hit("cdc-after-load");
                if batch.recycle {
                    shared.snapshot_bodies.give(batch.body);
                }
            }
            Work::Truncate { tables, at } => {
                // TRUNCATE is no part of a StarRocks transaction: what came before it goes
                // first (also when it is skipped below: that ends the cycle's transaction,
                // as it did in the run that applied it).
                if let Some(txns) = txns.as_deref_mut() {
                    txns.commit_all(sink).map_err(CdcError::Load)?;
                }
                for drop in drops_pending.drain(..) {
                    change_schema(sink, txns.as_deref_mut(), &drop, true, "")?;
                }
                for done in chunks_pending.drain(..) {
                    chunk_records.record(checkpoints, shared, done)?;
                }
                if truncated.is_some_and(|done| at <= done) {
                    // An earlier run emptied the tables here and may have loaded (and
                    // committed, under these same labels) rows that followed: emptying them
                    // again would lose those rows.
                    tracing::info!(?tables, "TRUNCATE already applied by an earlier run");
                } else {
                    for table in &tables {
                        sink.truncate(table).map_err(CdcError::Load)?;
                        tracing::info!(%table, "truncated");
                    }
                    checkpoints
                        .store_truncated(at)
                        .map_err(CdcError::Checkpoint)?;
                    truncated = Some(at);
                }
            }
            Work::Schema {
                change,
                apply,
                columns,
            } => {
                // A column dropped waits for the cycle's commit: the rows of the cycle load
                // without it meanwhile (StarRocks gives them NULL there), and a replay of the
                // cycle (its first Relation still lists the column) finds StarRocks with it,
                // instead of adding it back while a transaction an earlier run prepared, which
                // the ALTER would wait for, still holds the table.
                let (change, dropped) = if apply {
                    change.split_drops()
                } else {
                    (change, None)
                };
                // A column added under a name the cycle dropped: that drop goes first.
                let (first, later): (Vec<_>, Vec<_>) =
                    drops_pending.drain(..).partition(|d: &SchemaChange| {
                        d.table == change.table
                            && d.dropped.iter().any(|c| {
                                change.added.iter().any(|(a, _)| a.eq_ignore_ascii_case(c))
                            })
                    });
                drops_pending = later;
                for drop in &first {
                    change_schema(sink, txns.as_deref_mut(), drop, true, &columns)?;
                }
                change_schema(sink, txns.as_deref_mut(), &change, apply, &columns)?;
                drops_pending.extend(dropped);
            }
            Work::SnapshotChunk {
                table,
                chunk,
                rows,
                span,
            } => {
                let done = ChunkDone {
                    table,
                    chunk,
                    rows,
                    span,
                };
                if txns.is_some() {
                    // The chunk's rows sit in the cycle's open StarRocks transaction: record
                    // the chunk once that commits (recorded before, a crash could leave it
                    // done without its rows). Not committing here: a resumed run does not
                    // copy this chunk again at this place, so a cut here would not repeat
                    // and a replay could skip rows under the cut-off label.
                    chunks_pending.push(done);
                } else {
                    chunk_records.record(checkpoints, shared, done)?;
                }
            }
            Work::SnapshotPartial(state) => partial_pending = Some(state),
            Work::Boundary(lsn) => {
                checkpoints
                    .store_pending(lsn)
                    .map_err(CdcError::Checkpoint)?;
            }
            Work::Checkpoint(lsn, commit_unix_us) => {
                if let Some(txns) = txns.as_deref_mut() {
                    txns.commit_all(sink).map_err(CdcError::Load)?;
                    shared.retries.store(sink.retries, Ordering::Relaxed);
                    failpoint::hit("cdc-after-commit");
                }
                for drop in drops_pending.drain(..) {
                    change_schema(sink, txns.as_deref_mut(), &drop, true, "")?;
                }
                for done in chunks_pending.drain(..) {
                    chunk_records.record(checkpoints, shared, done)?;
                }
                // After the loads it covers are committed, with the checkpoint.
                if let Some(state) = partial_pending.take() {
                    checkpoints
                        .store_partial_keys(&state)
                        .map_err(CdcError::Checkpoint)?;
                }
                failpoint::hit("cdc-before-checkpoint");
                let publishing: Vec<&str> = match txns.as_deref() {
                    Some(txns) => txns.publishing().labels().collect(),
                    None => unpublished_plain.labels().collect(),
                };
                checkpoints
                    .store(lsn, &publishing)
                    .map_err(CdcError::Checkpoint)?;
                shared.checkpointed.store(lsn.0, Ordering::Release);
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                shared.checkpoint_unix_ms.store(now_ms, Ordering::Relaxed);
                shared
                    .checkpoint_commit_unix_ms
                    .store((commit_unix_us / 1000).max(0) as u64, Ordering::Relaxed);
                failpoint::hit("cdc-after-checkpoint");
            }
        }
        shared.works_done.fetch_add(1, Ordering::Release);
    }
    Ok(())
}

/// Makes the StarRocks table follow `change` (see `Work::Schema`; `columns`: the table's
/// whole-row header after it). A schema change waits for the open transactions that loaded
/// the table, so one of ours that did, or may still load it in this cycle, is rolled back
/// first and the cycle loaded again (`Transactions::settle_for_ddl`).
fn change_schema(
    sink: &mut StarRocks,
    txns: Option<&mut txn::Transactions>,
    change: &SchemaChange,
    apply: bool,
    columns: &str,
) -> Result<(), CdcError> {
    if change.is_empty() {
        return Ok(());
    }
    let statements = sink.plan_schema(change, apply).map_err(CdcError::Load)?;
    if statements.is_empty() {
        return Ok(());
    }
    let (rolled_back, exhausted) = match txns {
        Some(txns) => {
            let label = txns
                .settle_for_ddl(sink, &change.table, columns)
                .map_err(CdcError::Load)?;
            (label, txns.replans_exhausted())
        }
        None => (None, false),
    };
    for statement in &statements {
        sink.ddl(&change.table, statement).map_err(CdcError::Load)?;
    }
    let Some(label) = rolled_back else {
        return Ok(());
    };
    let table = change.table.clone();
    Err(CdcError::Load(if exhausted {
        LoadError::TxnAborted {
            label,
            why: format!("rolled back for a schema change of {table}"),
        }
    } else {
        LoadError::Replan { label, table }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::pgconn::ServerError;

    fn refused(code: &str) -> CdcError {
        CdcError::Replication(PgError::Server(ServerError {
            code: code.into(),
            message: "refused".into(),
            detail: None,
        }))
    }

    #[test]
    fn a_slot_still_held_by_its_previous_reader_is_retried() {
        assert!(refused("55006").is_transient());
        assert!(refused("57P01").is_transient());
        assert!(!refused("42704").is_transient(), "a missing slot is not");
        assert!(!refused("28P01").is_transient(), "nor a refused password");
    }
}
