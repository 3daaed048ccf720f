//! `pgprism cdc`: flags on top of an optional config file's `[cdc]` section, and a small
//! control endpoint (status, pause, resume) for this mode.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Args;

use super::Shared;
use crate::config::{
    AdminConfig, CdcConfig, CdcDeleteMode, CdcSchemaChanges, CdcSnapshotChunking,
    CdcSnapshotFormat, CdcToastMode, CdcTransactionMode, Config,
};

#[derive(Args, Debug)]
pub struct CdcArgs {
    /// Config file whose `[cdc]` section to start from; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Source database URL (postgres://user:password@host:port/db).
    #[arg(long)]
    source: Option<String>,
    /// StarRocks FE URL (http://user:password@host:8030).
    #[arg(long)]
    starrocks: Option<String>,
    /// StarRocks FE query (MySQL protocol) port, for TRUNCATE.
    #[arg(long)]
    starrocks_query_port: Option<u16>,
    /// StarRocks database.
    #[arg(long)]
    database: Option<String>,
    /// Tables to stream, comma separated (`schema.table` or `table`).
    #[arg(long, value_delimiter = ',')]
    tables: Vec<String>,
    #[arg(long)]
    slot: Option<String>,
    #[arg(long)]
    publication: Option<String>,
    /// Turn on `publish_via_partition_root` on an existing publication that lacks it
    /// (`cdc.publication-set-via-root`).
    #[arg(long)]
    publication_set_via_root: bool,
    #[arg(long)]
    flush_rows: Option<usize>,
    #[arg(long)]
    flush_interval_ms: Option<u64>,
    /// StarRocks transaction timeout (`cdc.transaction-timeout-ms`).
    #[arg(long)]
    transaction_timeout_ms: Option<u64>,
    /// `hard` (`__op` delete) or `soft` (audit columns mark the row).
    #[arg(long, value_parser = ["hard", "soft"])]
    delete_mode: Option<String>,
    /// `full-row` or `partial`.
    #[arg(long, value_parser = ["full-row", "partial"])]
    toast_mode: Option<String>,
    /// `multi-table` (StarRocks 4.0+), `per-table` (2.4 to 3.x) or `none` (plain Stream Load).
    #[arg(long, value_parser = ["multi-table", "per-table", "none"])]
    transaction_mode: Option<String>,
    /// `apply`, `ignore` or `fail`: what a column change in a source table does in StarRocks.
    #[arg(long, value_parser = ["apply", "ignore", "fail"])]
    schema_changes: Option<String>,
    /// Create missing StarRocks tables from the source's definition.
    #[arg(long)]
    create_tables: bool,
    /// Add the audit columns to every row.
    #[arg(long)]
    audit_columns: bool,
    /// Copy the tables first when the slot is created (the default).
    #[arg(long, conflicts_with = "no_snapshot")]
    snapshot: bool,
    /// Do not copy the tables' existing rows when the slot is created: stream changes only.
    #[arg(long)]
    no_snapshot: bool,
    /// Connections copying snapshot chunks in parallel.
    #[arg(long)]
    snapshot_workers: Option<usize>,
    /// Rows per snapshot chunk.
    #[arg(long)]
    snapshot_chunk_rows: Option<usize>,
    /// Chunks each snapshot worker reads ahead of the stream's verdicts.
    #[arg(long)]
    snapshot_chunks_in_flight: Option<usize>,
    /// Bytes of rows at which a snapshot chunk is cut.
    #[arg(long)]
    snapshot_chunk_bytes_max: Option<usize>,
    /// Microseconds a snapshot worker lets rows pile up after a small read (0: none).
    #[arg(long)]
    snapshot_read_coalesce_us: Option<u64>,
    /// Not used (accepted for older command lines).
    #[arg(long)]
    snapshot_chunks_planned_ahead: Option<usize>,
    /// `csv` (COPY in CSV, passed to Stream Load as it comes) or `json`.
    #[arg(long, value_parser = ["csv", "json"])]
    snapshot_format: Option<String>,
    /// `ctid` (ranges of heap pages) or `key` (primary-key ranges).
    #[arg(long, value_parser = ["ctid", "key"])]
    snapshot_chunking: Option<String>,
    /// Bytes of streamed, uncommitted transactions held in memory before spilling to files.
    #[arg(long)]
    stream_buffer_bytes_max: Option<usize>,
    /// Directory of the spill files.
    #[arg(long)]
    spill_dir: Option<String>,
    /// Bytes of spill files at most.
    #[arg(long)]
    spill_bytes_max: Option<u64>,
    /// Control endpoint address (GET /cdc/status, POST /cdc/pause, POST /cdc/resume).
    #[arg(long)]
    admin: Option<String>,
    /// File with the bearer token the control endpoint requires (`admin.token-file`).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<String>,
}

impl CdcArgs {
    /// The `[cdc]` section with the flags on top, and the control endpoint's `[admin]` (off
    /// unless `--admin` names an address; its token and certificate from the file).
    pub(crate) fn into_config(
        self,
    ) -> Result<(CdcConfig, AdminConfig), crate::config::ConfigError> {
        let (mut cfg, mut admin) = match &self.config {
            Some(path) => {
                let file = Config::load(path)?;
                (file.cdc, file.admin)
            }
            None => (CdcConfig::default(), AdminConfig::default()),
        };
        admin.listen = self.admin.unwrap_or_default();
        if let Some(v) = self.admin_token_file {
            admin.token_file = v;
        }
        admin.validate()?;
        if let Some(v) = self.source {
            cfg.source = v;
        }
        if let Some(v) = self.starrocks {
            cfg.starrocks = v;
        }
        if let Some(v) = self.starrocks_query_port {
            cfg.starrocks_query_port = v;
        }
        if let Some(v) = self.database {
            cfg.database = v;
        }
        if !self.tables.is_empty() {
            cfg.tables = self.tables;
        }
        if let Some(v) = self.slot {
            cfg.slot = v;
        }
        if let Some(v) = self.publication {
            cfg.publication = v;
        }
        if let Some(v) = self.flush_rows {
            cfg.flush_rows = v;
        }
        if let Some(v) = self.flush_interval_ms {
            cfg.flush_interval_ms = v;
        }
        if let Some(v) = self.transaction_timeout_ms {
            cfg.transaction_timeout_ms = v;
        }
        match self.delete_mode.as_deref() {
            Some("soft") => cfg.delete_mode = CdcDeleteMode::Soft,
            Some("hard") => cfg.delete_mode = CdcDeleteMode::Hard,
            _ => {}
        }
        match self.toast_mode.as_deref() {
            Some("partial") => cfg.toast_mode = CdcToastMode::Partial,
            Some("full-row") => cfg.toast_mode = CdcToastMode::FullRow,
            _ => {}
        }
        match self.snapshot_format.as_deref() {
            Some("csv") => cfg.snapshot_format = CdcSnapshotFormat::Csv,
            Some("json") => cfg.snapshot_format = CdcSnapshotFormat::Json,
            _ => {}
        }
        match self.snapshot_chunking.as_deref() {
            Some("ctid") => cfg.snapshot_chunking = CdcSnapshotChunking::Ctid,
            Some("key") => cfg.snapshot_chunking = CdcSnapshotChunking::Key,
            _ => {}
        }
        match self.transaction_mode.as_deref() {
            Some("multi-table") => cfg.transaction_mode = CdcTransactionMode::MultiTable,
            Some("per-table") => cfg.transaction_mode = CdcTransactionMode::PerTable,
            Some("none") => cfg.transaction_mode = CdcTransactionMode::None,
            _ => {}
        }
        match self.schema_changes.as_deref() {
            Some("apply") => cfg.schema_changes = CdcSchemaChanges::Apply,
            Some("ignore") => cfg.schema_changes = CdcSchemaChanges::Ignore,
            Some("fail") => cfg.schema_changes = CdcSchemaChanges::Fail,
            _ => {}
        }
        cfg.create_tables |= self.create_tables;
        cfg.publication_set_via_root |= self.publication_set_via_root;
        cfg.audit_columns |= self.audit_columns;
        if self.snapshot {
            cfg.snapshot = true;
        }
        if self.no_snapshot {
            cfg.snapshot = false;
        }
        if let Some(v) = self.snapshot_workers {
            cfg.snapshot_workers = v;
        }
        if let Some(v) = self.snapshot_chunk_rows {
            cfg.snapshot_chunk_rows = v;
        }
        if let Some(v) = self.snapshot_chunks_in_flight {
            cfg.snapshot_chunks_in_flight = v;
        }
        if let Some(v) = self.snapshot_chunk_bytes_max {
            cfg.snapshot_chunk_bytes_max = v;
        }
        if let Some(v) = self.snapshot_read_coalesce_us {
            cfg.snapshot_read_coalesce_us = v;
        }
        if let Some(v) = self.snapshot_chunks_planned_ahead {
            cfg.snapshot_chunks_planned_ahead = v;
        }
        if let Some(v) = self.stream_buffer_bytes_max {
            cfg.stream_buffer_bytes_max = v;
        }
        if let Some(v) = self.spill_dir {
            cfg.spill_dir = v;
        }
        if let Some(v) = self.spill_bytes_max {
            cfg.spill_bytes_max = v;
        }
        Ok((cfg, admin))
    }
}

fn report(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("pgprism: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::FAILURE
}

/// Turns transparent huge pages off for this process: `pgprism cdc` alone, the proxy keeps
/// them. mimalloc asks for huge pages on the memory it maps (`MADV_HUGEPAGE`), so the first
/// touch of each 2 MiB region made the kernel zero all of it, whether the process used a few
/// bytes of it or all: the initial snapshot's bodies and key lists, grown as the first chunks
/// were read, cost whole huge pages zeroed (`clear_page_erms` under
/// `mi_page_free_list_extend`, 45 to 239 of 557 to 736 CPU samples per 10 M-row snapshot,
/// the spread following what huge pages the kernel had free). Measured side by side (10 M
/// rows, 2 workers, `MIMALLOC_ALLOW_THP=0` on one side, load 2.6 to 3.4): pgprism's CPU 0.99
/// to 1.11 s against 1.34 to 1.97 s, the snapshot 2.61 to 2.83 s against 2.88 to 3.74 s,
/// faster in each of three runs.
fn without_huge_pages() {
    let (disable, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disable, unused, unused, unused) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "transparent huge pages stay on");
    }
}

/// Entry point of `pgprism cdc`.
pub fn main(args: CdcArgs) -> ExitCode {
    without_huge_pages();
    let (cfg, admin) = match args.into_config() {
        Ok(v) => v,
        Err(err) => return report(&err),
    };
    let shared = Arc::new(Shared::default());
    // The shared admin endpoint (its access rule included) with only the CDC routes behind it.
    let state = Arc::new(std::sync::Mutex::new(crate::control::ControlState::new(
        0,
        String::new(),
        String::new(),
        crate::config::MetricsConfig::default().latency_us_max,
    )));
    let routes = admin_routes(Arc::clone(&shared));
    let admin_server = match crate::control::AdminServer::start(&admin, state, Some(routes)) {
        Ok(server) => server,
        Err(err) => return report(&err),
    };
    let admin_addr = admin_server.as_ref().map(|s| s.addr);
    let slot = cfg.slot.clone();
    let ready = || {
        let admin = admin_addr.map(|a| a.to_string()).unwrap_or_default();
        // One parseable line on stdout so scripts and tests know streaming started.
        println!("pgprism cdc streaming slot {slot} admin {admin}");
        let _ = std::io::stdout().flush();
    };
    match super::run_reconnecting(&cfg, shared, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// The CDC routes for the shared admin endpoint (`pgprism run` with a `[cdc]` section):
/// `GET /cdc/status`, `POST /cdc/pause`, `POST /cdc/resume`.
pub fn admin_routes(shared: Arc<Shared>) -> crate::control::ExtraRoutes {
    Arc::new(move |method: &str, path: &str| {
        let json = |code, body: String| crate::control::RouteResponse {
            code,
            content_type: "application/json",
            body,
        };
        match (method, path) {
            ("GET", "/cdc/status") => Some(json(200, shared.status_json())),
            ("GET", "/cdc/metrics") => Some(crate::control::RouteResponse {
                code: 200,
                content_type: "text/plain; version=0.0.4",
                body: shared.prometheus(),
            }),
            ("POST", "/cdc/pause") => {
                shared.paused.store(true, Ordering::Release);
                Some(json(200, "{\"paused\":true}".into()))
            }
            ("POST", "/cdc/resume") => {
                shared.paused.store(false, Ordering::Release);
                Some(json(200, "{\"paused\":false}".into()))
            }
            _ => None,
        }
    })
}
