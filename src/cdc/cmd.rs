//! `pgprism cdc`: flags on top of an optional config file's `[cdc]` section, and a small
//! control endpoint (status, pause, resume) for this mode.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Args;

use super::Shared;
use crate::config::{
    CdcConfig, CdcDeleteMode, CdcSchemaChanges, CdcToastMode, CdcTransactionMode, Config,
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
    #[arg(long)]
    flush_rows: Option<usize>,
    #[arg(long)]
    flush_interval_ms: Option<u64>,
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
    /// Copy the tables first when the slot is created.
    #[arg(long)]
    snapshot: bool,
    /// Control endpoint address (GET /cdc/status, POST /cdc/pause, POST /cdc/resume).
    #[arg(long)]
    admin: Option<String>,
}

impl CdcArgs {
    fn into_config(self) -> Result<(CdcConfig, Option<String>), crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?.cdc,
            None => CdcConfig::default(),
        };
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
        cfg.audit_columns |= self.audit_columns;
        cfg.snapshot |= self.snapshot;
        Ok((cfg, self.admin))
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

/// Entry point of `pgprism cdc`.
pub fn main(args: CdcArgs) -> ExitCode {
    let (cfg, admin) = match args.into_config() {
        Ok(v) => v,
        Err(err) => return report(&err),
    };
    let shared = Arc::new(Shared::default());
    let admin_addr = match admin.filter(|a| !a.is_empty()) {
        Some(addr) => match TcpListener::bind(&addr) {
            Ok(listener) => {
                let local = listener.local_addr().ok();
                let s = Arc::clone(&shared);
                let _ = std::thread::Builder::new()
                    .name("cdc-admin".into())
                    .spawn(move || serve_admin(listener, &s));
                local
            }
            Err(err) => return report(&err),
        },
        None => None,
    };
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

/// Blocking, one request per connection; this endpoint is for operators, not traffic.
fn serve_admin(listener: TcpListener, shared: &Shared) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        // Skip the headers; requests here have no body that matters.
        let mut header = String::new();
        while reader
            .read_line(&mut header)
            .map(|n| n > 2)
            .unwrap_or(false)
        {
            header.clear();
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (code, body) = match (method, path) {
            ("GET", "/cdc/status") => (200, shared.status_json()),
            ("GET", "/cdc/metrics") => (200, shared.prometheus()),
            ("POST", "/cdc/pause") => {
                shared.paused.store(true, Ordering::Release);
                (200, "{\"paused\":true}".to_string())
            }
            ("POST", "/cdc/resume") => {
                shared.paused.store(false, Ordering::Release);
                (200, "{\"paused\":false}".to_string())
            }
            _ => (404, "{\"error\":\"not found\"}".to_string()),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            if code == 200 { "OK" } else { "Not Found" },
            body.len()
        );
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
