//! Typed configuration: a TOML file with `${ENV}` expansion, overridden by command-line flags,
//! validated before anything starts. Every error names the offending key path and what was
//! expected. This module only reads and checks; it never opens sockets or starts threads.

mod env;
mod url;

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use self::url::PgUrl;

/// The whole configuration, as the file spells it (kebab-case keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub proxy: ProxyConfig,
    pub primary: PrimaryConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub cdc: CdcConfig,
}

/// Client-facing side: listener, shards and the per-session bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProxyConfig {
    /// Address clients connect to.
    pub listen: String,
    /// Number of shards (one executor pinned to one core each); 0 means one per core.
    pub shards: usize,
    /// Pin each shard's thread to one core (turn off when sharing a machine with other
    /// pinned services).
    pub pin_cores: bool,
    /// listen(2) backlog of each shard's listener.
    pub backlog: u32,
    /// Largest single protocol message accepted from a client or a server.
    pub message_bytes_max: usize,
    /// Bytes read from a socket per read call (the per-connection buffer grows in these steps).
    pub read_chunk_bytes: usize,
    /// Time a client has to send its startup packet and finish authentication.
    pub startup_timeout_ms: u64,
    /// Time allowed to open a TCP connection to the primary.
    pub connect_timeout_ms: u64,
    /// On SIGTERM/SIGINT: how long running sessions may take to finish before pgprism exits.
    pub drain_timeout_ms: u64,
    /// Client sessions per shard; beyond it new clients get SQLSTATE 53300.
    pub sessions_per_shard_max: usize,
    /// Statements in flight per session whose latency is recorded (pipelines deeper than this
    /// are still forwarded; only their latency samples are skipped).
    pub pipeline_depth_max: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:6432".into(),
            shards: 0,
            pin_cores: true,
            backlog: 4096,
            message_bytes_max: 64 << 20,
            read_chunk_bytes: 16 << 10,
            startup_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            drain_timeout_ms: 30_000,
            sessions_per_shard_max: 10_000,
            pipeline_depth_max: 1024,
        }
    }
}

/// The primary database: every client byte goes here and the client sees its answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrimaryConfig {
    /// `postgres://host:port` (user, password and database come from each client).
    pub url: String,
}

/// Admin HTTP endpoint (`/metrics`, `/health`, `/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Address of the admin endpoint; empty disables it.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9930".into(),
        }
    }
}

/// How shards report to the control thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// How often each shard sends its counters and histograms to the control thread.
    pub report_interval_ms: u64,
    /// Capacity of each shard's ring to the control thread; a full ring drops the report
    /// (counted) instead of blocking the shard.
    pub ring_capacity: usize,
    /// Highest latency the histograms track; larger values are clamped to it.
    pub latency_us_max: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            report_interval_ms: 1_000,
            ring_capacity: 64,
            latency_us_max: 60_000_000,
        }
    }
}

/// How a delete in PostgreSQL shows up in StarRocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcDeleteMode {
    /// `__op` = 1 on a Primary Key table: the row is removed.
    Hard,
    /// The row stays, with the audit columns saying it was deleted (`is_deleted` = true).
    Soft,
}

/// What to do with unchanged TOAST values (not sent by PostgreSQL on update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcToastMode {
    /// Fill them from the `REPLICA IDENTITY FULL` old row; where there is none, fall back to
    /// a partial update that leaves those columns out.
    FullRow,
    /// Always a partial update listing only the columns present.
    Partial,
}

/// Change data capture: PostgreSQL logical replication into StarRocks Stream Load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CdcConfig {
    /// Source database, `postgres://user:password@host:port/database`; the user needs the
    /// REPLICATION attribute (or superuser) and ownership of the tables for setup.
    pub source: String,
    /// StarRocks FE HTTP address, `http://user:password@host:8030`.
    pub starrocks: String,
    /// StarRocks FE query (MySQL protocol) port, used only to apply a TRUNCATE.
    pub starrocks_query_port: u16,
    /// StarRocks database the tables are loaded into.
    pub database: String,
    /// Source tables (`schema.table` or `table` for `public`); StarRocks tables have the same
    /// (unqualified) names.
    pub tables: Vec<String>,
    /// Logical replication slot; created when absent, never dropped.
    pub slot: String,
    /// Publication; created when absent, extended with missing tables.
    pub publication: String,
    /// Table in the source database that holds the confirmed LSN per slot.
    pub checkpoint_table: String,
    /// Set `REPLICA IDENTITY FULL` on the tables during setup (needed to fill TOAST values
    /// and for soft deletes of non-key columns).
    pub replica_identity_full: bool,
    pub delete_mode: CdcDeleteMode,
    pub toast_mode: CdcToastMode,
    /// Add the audit columns (`op_type`, `is_deleted`, `synced_at`, `cdc_version`) to every row.
    pub audit_columns: bool,
    /// Prefix of the audit column names.
    pub audit_prefix: String,
    /// Copy the tables' current content before streaming (only when the slot is created).
    pub snapshot: bool,
    /// Rows per snapshot chunk.
    pub snapshot_chunk_rows: usize,
    /// Flush a table's batch when it holds this many rows.
    pub flush_rows: usize,
    /// Flush a table's batch when its JSON body reaches this many bytes.
    pub flush_bytes: usize,
    /// Flush everything at the next transaction boundary after this long.
    pub flush_interval_ms: u64,
    /// Batches queued between the source and the loader (backpressure beyond it).
    pub ring_capacity: usize,
    /// Bytes of streamed, not yet committed transactions kept in memory before failing.
    pub stream_buffer_bytes_max: usize,
    /// Stream Load `max_filter_ratio`; 0 means a filtered row fails the load.
    pub max_filter_ratio: f64,
    /// Attempts per Stream Load before giving up (same label each time).
    pub load_attempts_max: u32,
    /// First retry delay; doubles per attempt up to `load-backoff-ms-max`.
    pub load_backoff_ms: u64,
    pub load_backoff_ms_max: u64,
    /// Timeout of one Stream Load HTTP exchange.
    pub load_timeout_ms: u64,
    /// Timeout to connect to PostgreSQL and for setup queries.
    pub connect_timeout_ms: u64,
    /// Standby status update interval (also answers keepalives earlier when asked).
    pub status_interval_ms: u64,
    /// Reconnects in a row after a lost PostgreSQL connection before giving up (the count
    /// resets after a minute of streaming); 0 exits on the first loss.
    pub reconnect_attempts_max: u32,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            source: String::new(),
            starrocks: String::new(),
            starrocks_query_port: 9030,
            database: String::new(),
            tables: Vec::new(),
            slot: "pgprism_cdc".into(),
            publication: "pgprism_cdc".into(),
            checkpoint_table: "pgprism_cdc_checkpoint".into(),
            replica_identity_full: true,
            delete_mode: CdcDeleteMode::Hard,
            toast_mode: CdcToastMode::FullRow,
            audit_columns: false,
            audit_prefix: "pgprism_".into(),
            snapshot: false,
            snapshot_chunk_rows: 50_000,
            flush_rows: 50_000,
            flush_bytes: 32 << 20,
            flush_interval_ms: 1_000,
            ring_capacity: 8,
            stream_buffer_bytes_max: 1 << 30,
            max_filter_ratio: 0.0,
            load_attempts_max: 10,
            load_backoff_ms: 100,
            load_backoff_ms_max: 10_000,
            load_timeout_ms: 600_000,
            connect_timeout_ms: 10_000,
            status_interval_ms: 1_000,
            reconnect_attempts_max: 10,
        }
    }
}

/// A configuration problem, always naming the key path involved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config line {line}: environment variable `{name}` is not set (use ${{{name}:-default}} for a default)"
    )]
    EnvMissing { line: usize, name: String },
    #[error("config line {line}: unterminated `${{` expansion")]
    EnvUnterminated { line: usize },
    #[error("config is not valid TOML")]
    Syntax(#[source] toml::de::Error),
    #[error("config key `{path}`: {message}")]
    Key { path: String, message: String },
}

impl ConfigError {
    fn key(path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads, expands and parses a config file (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Expands `${VAR}` / `${VAR:-default}` and parses TOML, reporting the key path of a
    /// value of the wrong type or an unknown key.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let expanded = env::expand(text, |name| std::env::var(name).ok())?;
        let de = toml::Deserializer::parse(&expanded).map_err(ConfigError::Syntax)?;
        serde_path_to_error::deserialize(de).map_err(|err| {
            let path = err.path().to_string();
            ConfigError::Key {
                path,
                message: err.into_inner().message().to_string(),
            }
        })
    }

    /// Checks every value that serde cannot: ranges, addresses, URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("proxy.listen", &self.proxy.listen)?;
        if self.proxy.backlog == 0 {
            return Err(ConfigError::key("proxy.backlog", "expected at least 1"));
        }
        if self.proxy.message_bytes_max < 1024 {
            return Err(ConfigError::key(
                "proxy.message-bytes-max",
                "expected at least 1024 bytes",
            ));
        }
        if !(512..=(16 << 20)).contains(&self.proxy.read_chunk_bytes) {
            return Err(ConfigError::key(
                "proxy.read-chunk-bytes",
                "expected between 512 and 16777216 bytes",
            ));
        }
        for (key, value) in [
            ("proxy.startup-timeout-ms", self.proxy.startup_timeout_ms),
            ("proxy.connect-timeout-ms", self.proxy.connect_timeout_ms),
            (
                "metrics.report-interval-ms",
                self.metrics.report_interval_ms,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "expected a duration above 0 ms"));
            }
        }
        if self.proxy.sessions_per_shard_max == 0 {
            return Err(ConfigError::key(
                "proxy.sessions-per-shard-max",
                "expected at least 1",
            ));
        }
        if self.metrics.ring_capacity == 0 {
            return Err(ConfigError::key(
                "metrics.ring-capacity",
                "expected at least 1",
            ));
        }
        if self.metrics.latency_us_max < 1000 {
            return Err(ConfigError::key(
                "metrics.latency-us-max",
                "expected at least 1000",
            ));
        }
        if self.primary.url.is_empty() {
            return Err(ConfigError::key(
                "primary.url",
                "required: the primary's postgres://host:port URL",
            ));
        }
        PgUrl::parse(&self.primary.url).map_err(|e| ConfigError::key("primary.url", e))?;
        if !self.admin.listen.is_empty() {
            parse_addr("admin.listen", &self.admin.listen)?;
        }
        Ok(())
    }

    /// The configuration as TOML, the way `pgprism check` prints it. Passwords in URLs are
    /// masked so the output can be pasted into a ticket.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.primary.url = PgUrl::parse(&shown.primary.url)
            .map(|u| u.masked())
            .unwrap_or(shown.primary.url);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Number of shards to run: the configured count, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.proxy.shards > 0 {
            return self.proxy.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Parses a `host:port` socket address, naming the key on failure.
pub fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            ConfigError::key(
                key,
                format!("expected host:port (e.g. 127.0.0.1:6432), got `{value}`"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_primary() {
        let cfg = Config::parse("").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("primary.url"), "{err}");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err = Config::parse("[proxy]\nlisten = \"127.0.0.1:1\"\nbaklog = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.baklog") || err.contains("baklog"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_its_path() {
        let err = Config::parse("[proxy]\nbacklog = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.backlog"), "{err}");
    }

    #[test]
    fn range_errors_name_the_key() {
        let mut cfg = Config::parse("[primary]\nurl = \"postgres://127.0.0.1:5432\"\n").unwrap();
        cfg.validate().unwrap();
        cfg.proxy.read_chunk_bytes = 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("proxy.read-chunk-bytes"), "{err}");
        cfg.proxy.read_chunk_bytes = 4096;
        cfg.proxy.listen = "nowhere".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("proxy.listen"), "{err}");
    }

    #[test]
    fn check_output_masks_passwords_and_round_trips() {
        let cfg =
            Config::parse("[primary]\nurl = \"postgres://bob:secret@db:5432/app\"\n").unwrap();
        let shown = cfg.to_toml();
        assert!(!shown.contains("secret"), "{shown}");
        let again = Config::parse(&shown).unwrap();
        assert_eq!(again.proxy.backlog, 4096);
    }
}
