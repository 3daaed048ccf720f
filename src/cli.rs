//! Command line: subcommands and flags. Flags override the config file; the merged config is
//! validated once, before anything starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "pgprism",
    version,
    about = "Thread-per-core io_uring data plane for PostgreSQL traffic: proxy, mirror, compare, CDC, embedded servers"
)]
struct Cli {
    /// Log filter (e.g. `info`, `pgprism=debug`); RUST_LOG works too.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Log line format: `text` for people and journald, `json` (one object per line) for log
    /// shippers.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of a primary (flags, optionally on top of a config file).
    Proxy(Box<ProxyArgs>),
    /// Run everything the config file describes.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the process id here once serving; after an upgrade (SIGUSR2) the new
        /// process writes its own.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
    },
    /// Run supervised PostgreSQL servers (in RAM or on disk) until SIGTERM.
    Embed(EmbedArgs),
    /// Stream PostgreSQL changes (logical replication) into StarRocks with Stream Load.
    Cdc(Box<crate::cdc::cmd::CdcArgs>),
    /// Validate a config file and print the effective configuration.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Measure latency against one or two PostgreSQL URLs (direct or through pgprism).
    Bench(crate::bench::BenchArgs),
    /// Two in-memory servers, pgprism in front, a short workload, the differences it finds.
    Demo(crate::demo::DemoArgs),
    /// Print the configuration reference (every key, type, default, flag and meaning) as
    /// Markdown: the source of docs/configuration.md.
    ConfigReference,
    /// Writes the man pages and shell completions the Debian package installs
    /// (packaging/build-deb): OUT/man/*.1 and OUT/completions/{pgprism.bash,_pgprism,pgprism.fish}.
    #[command(hide = true)]
    PackageAssets {
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
}

#[derive(Args, Clone)]
struct ProxyArgs {
    /// Config file to start from; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address clients connect to.
    #[arg(long)]
    listen: Option<String>,
    /// Also listen on the Unix socket DIR/.s.PGSQL.<listen port> (`""` turns it off).
    #[arg(long, value_name = "DIR")]
    unix_socket_dir: Option<String>,
    /// Primary database URL (postgres://host:port, or a socket directory:
    /// postgres://%2Frun%2Fpostgresql:5432, postgres:///db?host=/run/postgresql).
    #[arg(long)]
    primary: Option<String>,
    /// Number of shards (0 = one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Admin endpoint address (`""` disables it).
    #[arg(long)]
    admin: Option<String>,
    /// File with the bearer token the admin endpoint requires (`admin.token-file`).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<String>,
    /// Write the process id here once serving; after an upgrade (SIGUSR2) the new process
    /// writes its own.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// listen(2) backlog per shard.
    #[arg(long)]
    backlog: Option<u32>,
    /// Largest protocol message accepted, in bytes.
    #[arg(long)]
    message_bytes_max: Option<usize>,
    /// Startup and authentication timeout, in milliseconds.
    #[arg(long)]
    startup_timeout_ms: Option<u64>,
    /// Drain timeout on SIGTERM/SIGINT, in milliseconds.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Re-resolve backend host names this often, in milliseconds (0: only at start-up).
    #[arg(long)]
    dns_refresh_ms: Option<u64>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// Which shard serves a new client: kernel (the SO_REUSEPORT hash, the default) or pack
    /// (the lowest-numbered shard not busy; for a small machine shared with the database).
    #[arg(long, value_name = "pack|kernel", value_parser = ["pack", "kernel"])]
    client_placement: Option<String>,
    /// With pack placement: the share of its core (percent) above which a shard takes no new
    /// clients and hands idle pooled clients to a less busy shard.
    #[arg(long, value_name = "PCT")]
    pack_busy_pct: Option<u32>,
    /// With pack placement: what a client just placed counts for in its shard's busy figure
    /// (thousandths of a core) until the measurement sees it; lower keeps bursts together.
    #[arg(long, value_name = "PERMILLE")]
    pack_client_permille: Option<u32>,
    /// With pack placement and transaction pooling: idle pooled clients a shard asks to move
    /// to another shard per look (0: clients never move).
    #[arg(long, value_name = "N")]
    rebalance_clients_max: Option<usize>,
    #[command(flatten)]
    mirror: MirrorArgs,
    #[command(flatten)]
    compare: CompareArgs,
    #[command(flatten)]
    client_tls: ClientTlsArgs,
    #[command(flatten)]
    pool: PoolArgs,
}

/// TLS between clients and pgprism (`[client-tls]`).
#[derive(Args, Clone)]
struct ClientTlsArgs {
    /// disable, allow or require (default: allow when --client-tls-cert is given).
    #[arg(long, value_parser = ["disable", "allow", "require"])]
    client_tls_mode: Option<String>,
    /// PEM certificate chain presented to clients.
    #[arg(long, value_name = "FILE")]
    client_tls_cert: Option<String>,
    /// PEM private key of that certificate.
    #[arg(long, value_name = "FILE")]
    client_tls_key: Option<String>,
}

impl ClientTlsArgs {
    fn apply(self, cfg: &mut Config) {
        let t = &mut cfg.client_tls;
        if let Some(v) = self.client_tls_mode {
            t.mode = v;
        }
        if let Some(v) = self.client_tls_cert {
            t.cert_file = v;
        }
        if let Some(v) = self.client_tls_key {
            t.key_file = v;
        }
    }
}

/// Compare mode: run every statement on the primary and a shadow and compare the results.
#[derive(Args, Clone)]
struct CompareArgs {
    /// Shadow database URL (postgres://user:password@host:port/db): turns compare mode on.
    #[arg(long, value_name = "URL")]
    shadow: Option<String>,
    /// Whose results the client receives.
    #[arg(long, value_parser = ["primary", "shadow"])]
    source_of_truth: Option<String>,
    /// Hold results until both sides agree; on a difference the client gets XX000.
    #[arg(long)]
    fail_on_differences: bool,
    /// With --fail-on-differences: a shadow slower than --slow-query-ratio fails too.
    #[arg(long)]
    fail_on_slow_queries: bool,
    /// Shadow/primary time ratio above which a statement is slow on the shadow.
    #[arg(long)]
    slow_query_ratio: Option<f64>,
    /// Statements faster than this (ms) on the shadow are never slow.
    #[arg(long)]
    slow_query_min_ms: Option<u64>,
    /// Regex of statements not compared (repeatable; replaces the defaults).
    #[arg(long = "compare-exclude", value_name = "REGEX")]
    exclude: Vec<String>,
    /// Regex of statements sent to the primary only (repeatable).
    #[arg(long = "compare-primary-only", value_name = "REGEX")]
    primary_only: Vec<String>,
    /// Regex of column names whose values are not compared (repeatable).
    #[arg(long = "compare-ignore-column", value_name = "REGEX")]
    ignore_columns: Vec<String>,
    /// Absolute tolerance for float4/float8/numeric values.
    #[arg(long)]
    float_tolerance: Option<f64>,
    /// Tolerance (ms) for timestamp/timestamptz/time/timetz values (0: exact).
    #[arg(long, alias = "compare-timestamp-tolerance-ms", value_name = "MS")]
    timestamp_tolerance_ms: Option<u64>,
    /// Types declared equal across sides, e.g. int8=numeric (repeatable).
    #[arg(long = "type-equivalence", value_name = "TYPE=TYPE")]
    type_equivalences: Vec<String>,
    /// JSON-lines file of mismatch and slow-query reports.
    #[arg(long)]
    compare_report: Option<String>,
    /// Bytes held per statement in --fail-on-differences mode before falling back to report.
    #[arg(long)]
    compare_buffer_bytes: Option<usize>,
    /// How long (ms) an answered statement waits for the shadow before comparing stops.
    #[arg(long)]
    compare_shadow_timeout_ms: Option<u64>,
    /// Bytes of one extended-protocol batch held for the shadow until its Sync; beyond it
    /// the batch goes to the shadow at once, unordered.
    #[arg(long)]
    compare_batch_bytes: Option<usize>,
    /// How long (ms) a statement may wait for earlier conflicting ones to complete on the
    /// shadow (ordered dispatch); 0 turns ordering off.
    #[arg(long)]
    compare_order_wait_ms: Option<u64>,
    /// How long (ms) the statements a transaction holding locks waits for may run on the
    /// shadow before it goes anyway (they most likely wait for its locks); 0: no such break.
    #[arg(long)]
    compare_order_lock_wait_ms: Option<u64>,
    /// How long (ms) after its answer arrived a statement may wait for earlier-sent
    /// conflicting ones still unanswered on the primary (their answers may have arrived
    /// first); 0: ordered as pgprism reads the answers.
    #[arg(long)]
    compare_order_hold_ms: Option<u64>,
    /// How long (µs) before its answer arrived a read is placed in the primary's order
    /// (it took its snapshot before it ran; a write takes effect at its commit, just
    /// before its answer); 0: reads placed by their answers.
    #[arg(long)]
    compare_order_read_lead_us: Option<u64>,
    /// How many times a read that overlapped writes of its rows and differs is read again
    /// on the shadow after each later overlapping write, to find its place; 0: never.
    #[arg(long)]
    compare_place_reads_max: Option<u64>,
    /// A/A calibration: the shadow is the primary itself (--shadow defaults to the primary's
    /// URL); writes run on the primary only and every difference counts as noise.
    #[arg(long)]
    calibrate: bool,
    /// Shadow connections for the whole process, lent per transaction to the sessions
    /// (0: one shadow connection per client session).
    #[arg(long, value_name = "N")]
    shadow_pool_size: Option<usize>,
}

impl CompareArgs {
    fn apply(self, cfg: &mut Config) {
        use crate::config::SourceOfTruth;
        let c = &mut cfg.compare;
        if let Some(v) = self.shadow {
            cfg.shadow.url = v;
        }
        if let Some(v) = self.source_of_truth {
            c.source_of_truth = if v == "shadow" {
                SourceOfTruth::Shadow
            } else {
                SourceOfTruth::Primary
            };
        }
        c.fail_on_differences |= self.fail_on_differences;
        c.fail_on_slow_queries |= self.fail_on_slow_queries;
        if let Some(v) = self.slow_query_ratio {
            c.slow_query_ratio = v;
        }
        if let Some(v) = self.slow_query_min_ms {
            c.slow_query_min_ms = v;
        }
        if !self.exclude.is_empty() {
            c.exclude_patterns = self.exclude;
        }
        c.primary_only_patterns.extend(self.primary_only);
        c.ignore_columns.extend(self.ignore_columns);
        if let Some(v) = self.float_tolerance {
            c.float_tolerance = v;
        }
        if let Some(v) = self.timestamp_tolerance_ms {
            c.timestamp_tolerance_ms = v;
        }
        c.type_equivalences.extend(self.type_equivalences);
        if let Some(v) = self.compare_report {
            c.report_path = v;
        }
        if let Some(v) = self.compare_shadow_timeout_ms {
            c.shadow_timeout_ms = v;
        }
        if let Some(v) = self.compare_buffer_bytes {
            c.buffer_bytes_max = v;
        }
        if let Some(v) = self.compare_batch_bytes {
            c.shadow_batch_bytes_max = v;
        }
        if let Some(v) = self.compare_order_wait_ms {
            c.order_wait_ms = v;
        }
        if let Some(v) = self.compare_order_lock_wait_ms {
            c.order_lock_wait_ms = v;
        }
        if let Some(v) = self.compare_order_hold_ms {
            c.order_hold_ms = v;
        }
        if let Some(v) = self.compare_place_reads_max {
            c.place_reads_max = v;
        }
        if let Some(v) = self.compare_order_read_lead_us {
            c.order_read_lead_us = v;
        }
        if let Some(v) = self.shadow_pool_size {
            cfg.shadow.pool_size = v;
        }
        if self.calibrate {
            c.calibrate = true;
            if cfg.shadow.url.is_empty() {
                cfg.shadow.url = cfg.primary.url.clone();
            }
        }
    }
}

/// Mirror options, named as Frenzy names them where they fit. They apply to every mirror,
/// those from `--mirror` and those of the config file.
#[derive(Args, Clone)]
struct MirrorArgs {
    /// Mirror database URL (postgres://user:password@host:port/db); repeat for several.
    #[arg(long = "mirror", value_name = "URL")]
    urls: Vec<String>,
    /// Per-statement mirror timeout (e.g. 500ms, 5s).
    #[arg(long, value_parser = parse_duration_ms)]
    mirror_timeout: Option<u64>,
    /// Reconnection attempts per mirror outage.
    #[arg(long)]
    mirror_retries: Option<u32>,
    /// First reconnection delay (doubles per attempt).
    #[arg(long, value_parser = parse_duration_ms)]
    retry_delay: Option<u64>,
    /// Hold statements for a mirror up to this many microseconds so several go in one write
    /// (0: send each at once).
    #[arg(long, value_name = "US")]
    mirror_flush_delay_us: Option<u64>,
    /// Pooled mirrors: units wait up to this many microseconds for their connection's last
    /// write to be answered, then go together in one write (0: written at once).
    #[arg(long, value_name = "US")]
    mirror_pool_batch_wait_us: Option<u64>,
    /// With a flush delay: time the statements of one mirror write in N (the others' answers
    /// are read in one go and only counted); 1 times every statement.
    #[arg(long, value_name = "N")]
    mirror_latency_sample_every: Option<u32>,
    /// Mirrors never slow the client (default). `--async-mirrors false` makes every mirror
    /// use the `block` overflow policy: the client then waits for the slowest mirror.
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    async_mirrors: Option<bool>,
    /// Mirror every statement, SELECTs included.
    #[arg(long, group = "filter")]
    mirror_all_queries: bool,
    /// Mirror SELECTs only.
    #[arg(long, group = "filter")]
    mirror_select_queries: bool,
    /// Mirror DDL only.
    #[arg(long, group = "filter")]
    mirror_ddl_only: bool,
    /// Mirror DML only.
    #[arg(long, group = "filter")]
    mirror_dml_only: bool,
    /// Do not replay BEGIN/COMMIT/ROLLBACK/SAVEPOINT on mirrors.
    #[arg(long)]
    mirror_skip_transaction_control: bool,
    /// Fraction of sessions mirrored (0.0-1.0).
    #[arg(long)]
    mirror_sample: Option<f64>,
    /// What a full mirror queue does: drop (skip to the next transaction) or block.
    #[arg(long, value_parser = ["drop", "block"])]
    mirror_overflow: Option<String>,
    /// Messages queued per session and mirror.
    #[arg(long)]
    mirror_queue_messages: Option<usize>,
    /// Bytes queued per session and mirror.
    #[arg(long)]
    mirror_queue_bytes: Option<usize>,
    /// Sync points sent per session and mirror and not yet answered; at the bound the mirror
    /// connection waits for answers.
    #[arg(long)]
    mirror_in_flight_messages: Option<usize>,
}

/// Pool options, named as PgBouncer names them; Frenzy's names are aliases of theirs, so
/// that a Frenzy command line runs unchanged.
#[derive(Args, Clone)]
struct PoolArgs {
    /// `session` (each client owns its primary connection; default) or `transaction`
    /// (connections are lent per transaction).
    #[arg(long, value_parser = ["session", "transaction"])]
    pool_mode: Option<String>,
    /// Most primary connections per (user, database) for the process.
    #[arg(long, visible_alias = "max-conns", value_name = "N")]
    pool_size: Option<usize>,
    /// Connections per (user, database) kept open when idle.
    #[arg(long, visible_alias = "min-conns", value_name = "N")]
    pool_min_size: Option<usize>,
    /// Close a primary connection older than this when it comes back (e.g. 1h, 30m, 1h30m).
    #[arg(long, visible_alias = "max-conn-lifetime", value_parser = parse_duration_ms)]
    server_lifetime: Option<u64>,
    /// Close a primary connection idle longer than this (e.g. 10m, 90s).
    #[arg(long, visible_alias = "max-conn-idle-time", value_parser = parse_duration_ms)]
    server_idle_timeout: Option<u64>,
    /// A client waiting longer than this for a connection gets 53300.
    #[arg(long, value_parser = parse_duration_ms)]
    query_wait_timeout: Option<u64>,
    /// PgBouncer-format userlist (`"user" "secret"` per line) for client authentication.
    #[arg(long, value_name = "FILE")]
    auth_file: Option<String>,
    /// How clients authenticate in transaction mode: scram-sha-256, md5, plain or trust.
    #[arg(long, value_parser = ["scram-sha-256", "md5", "plain", "trust"])]
    auth_type: Option<String>,
    /// Connections to each mirror for the whole process (0: one per client session).
    #[arg(long, value_name = "N")]
    mirror_pool_size: Option<usize>,
    /// Pipelined lending: up to N clients' autocommit statements in flight on one shared
    /// primary connection (1: off).
    #[arg(long, value_name = "N")]
    shared_depth_max: Option<usize>,
    /// Pipelined lending: how long a shared connection with every statement answered waits
    /// for the next one before it goes back to the pool, in microseconds (0: at once).
    #[arg(long, value_name = "US")]
    shared_linger_us: Option<u64>,
}

impl PoolArgs {
    fn apply(self, cfg: &mut Config) {
        use crate::config::{AuthType, PoolMode};
        let p = &mut cfg.pool;
        match self.pool_mode.as_deref() {
            Some("transaction") => p.mode = PoolMode::Transaction,
            Some("session") => p.mode = PoolMode::Session,
            _ => {}
        }
        if let Some(v) = self.pool_size {
            p.size = v;
        }
        if let Some(v) = self.pool_min_size {
            p.min_size = v;
        }
        if let Some(v) = self.server_lifetime {
            p.server_lifetime_ms = v;
        }
        if let Some(v) = self.server_idle_timeout {
            p.server_idle_timeout_ms = v;
        }
        if let Some(v) = self.query_wait_timeout {
            p.query_wait_timeout_ms = v;
        }
        if let Some(v) = self.auth_file {
            p.auth_file = v;
        }
        match self.auth_type.as_deref() {
            Some("scram-sha-256") => p.auth_type = AuthType::ScramSha256,
            Some("md5") => p.auth_type = AuthType::Md5,
            Some("plain") => p.auth_type = AuthType::Plain,
            Some("trust") => p.auth_type = AuthType::Trust,
            _ => {}
        }
        if let Some(v) = self.shared_depth_max {
            p.shared_depth_max = v;
        }
        if let Some(v) = self.shared_linger_us {
            p.shared_linger_us = v;
        }
        if let Some(v) = self.mirror_pool_size {
            for m in &mut cfg.mirror {
                m.pool_size = v;
            }
        }
    }
}

/// A duration flag's value in milliseconds: a bare number is milliseconds (`250`); otherwise
/// Go's duration syntax, which Frenzy's flags take: numbers with an optional fraction, each
/// with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), added up (`500ms`, `1.5s`, `2m`,
/// `1h30m`). A value that is not a whole number of milliseconds is refused rather than
/// rounded (rounded down, `100us` would read as 0, which means "never" for lifetimes), and
/// so is one above `i64::MAX` ms: the `[pool]` table a console SET writes out holds TOML
/// integers, and one value beyond them would make every later SET fail.
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let refused = || format!("expected a duration such as 500ms, 5s, 2m or 1h30m, got `{text}`");
    let too_large = || format!("`{text}` is too long: at most {} ms", i64::MAX);
    let not_whole = || format!("expected a whole number of milliseconds, got `{text}`");
    if text.is_empty() {
        return Err(refused());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        let ms = text.parse::<u64>().map_err(|_| too_large())?;
        return if i64::try_from(ms).is_ok() {
            Ok(ms)
        } else {
            Err(too_large())
        };
    }
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let mut rest = text;
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(refused)?;
        let (number, tail) = rest.split_at(digits);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        // Go's rule: digits on at least one side of the point; 30 digits bound the work.
        if (whole.is_empty() && fraction.is_empty())
            || whole.len() + fraction.len() > 30
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(refused());
        }
        // The longest unit that matches ("ms" before "m").
        let &(unit, scale) = UNITS
            .iter()
            .filter(|(u, _)| tail.starts_with(u))
            .max_by_key(|(u, _)| u.len())
            .ok_or_else(refused)?;
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| refused())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(too_large)?;
        let mut place = scale;
        for digit in fraction.bytes() {
            place /= 10;
            // A digit below a nanosecond (`1.0000000001ms`): no whole millisecond either,
            // refused (it was dropped, so the value read as a whole number of ms).
            if place == 0 && digit != b'0' {
                return Err(not_whole());
            }
            part = part
                .checked_add(u128::from(digit - b'0') * place)
                .ok_or_else(too_large)?;
        }
        total_ns = total_ns.checked_add(part).ok_or_else(too_large)?;
        rest = &tail[unit.len()..];
    }
    if !total_ns.is_multiple_of(1_000_000) {
        return Err(not_whole());
    }
    i64::try_from(total_ns / 1_000_000)
        .ok()
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(too_large)
}

impl MirrorArgs {
    fn apply(self, cfg: &mut Config) {
        use crate::config::{MirrorConfig, Overflow, QueryFilter};
        for url in self.urls {
            cfg.mirror.push(MirrorConfig {
                url,
                ..MirrorConfig::default()
            });
        }
        let filter = if self.mirror_all_queries {
            Some(QueryFilter::All)
        } else if self.mirror_select_queries {
            Some(QueryFilter::Select)
        } else if self.mirror_ddl_only {
            Some(QueryFilter::Ddl)
        } else if self.mirror_dml_only {
            Some(QueryFilter::Dml)
        } else {
            None
        };
        for m in &mut cfg.mirror {
            if let Some(f) = filter {
                m.queries = f;
            }
            if let Some(v) = self.mirror_timeout {
                m.timeout_ms = v;
            }
            if let Some(v) = self.mirror_retries {
                m.retries = v;
            }
            if let Some(v) = self.retry_delay {
                m.retry_delay_ms = v;
                m.retry_delay_max_ms = m.retry_delay_max_ms.max(v);
            }
            if let Some(v) = self.mirror_flush_delay_us {
                m.flush_delay_us = v;
            }
            if let Some(v) = self.mirror_pool_batch_wait_us {
                m.pool_batch_wait_us = v;
            }
            if let Some(v) = self.mirror_latency_sample_every {
                m.latency_sample_every = v;
            }
            if self.async_mirrors == Some(false) {
                m.overflow = Overflow::Block;
            }
            if let Some(v) = &self.mirror_overflow {
                m.overflow = if v == "block" {
                    Overflow::Block
                } else {
                    Overflow::Drop
                };
            }
            if self.mirror_skip_transaction_control {
                m.skip_transaction_control = true;
            }
            if let Some(v) = self.mirror_sample {
                m.sample = v;
            }
            if let Some(v) = self.mirror_queue_messages {
                m.queue_messages_max = v;
            }
            if let Some(v) = self.mirror_queue_bytes {
                m.queue_bytes_max = v;
            }
            if let Some(v) = self.mirror_in_flight_messages {
                m.in_flight_messages_max = v;
            }
        }
    }
}

#[derive(Args)]
struct EmbedArgs {
    /// Config file whose `[embed]` and `[admin]` sections to use; flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// `NAME:PORT[:memory|:DIR]`, repeatable; port 0 picks a free one, data defaults to memory.
    #[arg(long = "instance", value_name = "NAME:PORT[:memory|:DIR]")]
    instances: Vec<String>,
    /// Admin endpoint address (`""` disables it).
    #[arg(long)]
    admin: Option<String>,
    /// File with the bearer token the admin endpoint requires (`admin.token-file`).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<String>,
    /// Directory with `postgres` and `initdb`.
    #[arg(long)]
    bindir: Option<PathBuf>,
    /// OS user the servers run as when pgprism runs as root.
    #[arg(long)]
    os_user: Option<String>,
    /// Registry of running servers (cleanup after a killed pgprism).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Restarts allowed within the restart window before an instance is marked failed.
    #[arg(long)]
    restarts_max: Option<u32>,
    /// First restart delay after a crash, in milliseconds (doubles per crash).
    #[arg(long)]
    restart_backoff_ms: Option<u64>,
}

impl EmbedArgs {
    fn into_config(self) -> Result<Config, crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        for spec in &self.instances {
            let inst = crate::embed::parse_instance_flag(spec)?;
            cfg.embed.instance.retain(|i| i.name != inst.name);
            cfg.embed.instance.push(inst);
        }
        if let Some(v) = self.admin {
            cfg.admin.listen = v;
        }
        if let Some(v) = self.admin_token_file {
            cfg.admin.token_file = v;
        }
        if self.bindir.is_some() {
            cfg.embed.bindir = self.bindir;
        }
        if let Some(v) = self.os_user {
            cfg.embed.os_user = v;
        }
        if self.state_dir.is_some() {
            cfg.embed.state_dir = self.state_dir;
        }
        if let Some(v) = self.restarts_max {
            cfg.embed.restarts_max = v;
        }
        if let Some(v) = self.restart_backoff_ms {
            cfg.embed.restart_backoff_ms = v;
        }
        Ok(cfg)
    }
}

/// `pgprism embed`: one ready line per instance (with the psql command), then one summary
/// line, on stdout so scripts and tests know where to connect.
fn embed_main(args: EmbedArgs) -> ExitCode {
    let cfg = match args.into_config() {
        Ok(cfg) => cfg,
        Err(err) => return report(&err),
    };
    let ready = |bound: &crate::embed::EmbedBound| {
        for inst in &bound.instances {
            println!(
                "pgprism embed: instance {} ready on {}:{} pid {} data {} connect: \
                 PGPASSFILE={} psql '{}'",
                inst.name,
                inst.host,
                inst.port,
                inst.pid.unwrap_or(0),
                inst.data,
                inst.passfile,
                inst.url
            );
        }
        let admin = bound.admin.map(|a| a.to_string()).unwrap_or_default();
        println!("pgprism embed ready admin {admin}");
    };
    match crate::embed::run_embed(&cfg.embed, &cfg.admin, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

impl ProxyArgs {
    fn into_config(self) -> Result<Config, crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            cfg.proxy.listen = v;
        }
        if let Some(v) = self.unix_socket_dir {
            cfg.proxy.unix_socket_dir = v;
        }
        if let Some(v) = self.primary {
            cfg.primary.url = v;
        }
        if let Some(v) = self.shards {
            cfg.proxy.shards = v;
        }
        if let Some(v) = self.admin {
            cfg.admin.listen = v;
        }
        if let Some(v) = self.admin_token_file {
            cfg.admin.token_file = v;
        }
        if let Some(v) = self.backlog {
            cfg.proxy.backlog = v;
        }
        if let Some(v) = self.message_bytes_max {
            cfg.proxy.message_bytes_max = v;
        }
        if let Some(v) = self.startup_timeout_ms {
            cfg.proxy.startup_timeout_ms = v;
        }
        if let Some(v) = self.dns_refresh_ms {
            cfg.proxy.dns_refresh_ms = v;
        }
        if let Some(v) = self.drain_timeout_ms {
            cfg.proxy.drain_timeout_ms = v;
        }
        if self.no_pin {
            cfg.proxy.pin_cores = false;
        }
        match self.client_placement.as_deref() {
            Some("pack") => cfg.proxy.client_placement = crate::config::ClientPlacement::Pack,
            Some("kernel") => cfg.proxy.client_placement = crate::config::ClientPlacement::Kernel,
            _ => {}
        }
        if let Some(v) = self.pack_busy_pct {
            cfg.proxy.pack_busy_pct = v;
        }
        if let Some(v) = self.pack_client_permille {
            cfg.proxy.pack_client_permille = v;
        }
        if let Some(v) = self.rebalance_clients_max {
            cfg.proxy.rebalance_clients_max = v;
        }
        self.mirror.apply(&mut cfg);
        self.compare.apply(&mut cfg);
        self.client_tls.apply(&mut cfg);
        // After the mirrors: `--mirror-pool-size` applies to those of `--mirror` too.
        self.pool.apply(&mut cfg);
        Ok(cfg)
    }
}

/// Prints an error with its whole source chain, one cause per line.
fn report(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("pgprism: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::FAILURE
}

/// An error and its causes on one line, for a log field.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn init_logging(filter: &str, format: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if format == "json" {
        builder.json().with_current_span(false).try_init()
    } else {
        builder.try_init()
    };
}

pub fn main() -> ExitCode {
    // Before any thread: the upgrade's descriptor number must not reach what we spawn.
    crate::server::take_upgrade_environment();
    let cli = Cli::parse();
    init_logging(&cli.log, &cli.log_format);
    let cfg = match cli.command {
        Command::Demo(args) => {
            return match crate::demo::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => report(&err),
            };
        }
        Command::Bench(args) => {
            return match crate::bench::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => report(&err),
            };
        }
        Command::Check { config } => {
            let checked =
                Config::load(&config).and_then(|cfg| crate::server::check(&cfg).map(|()| cfg));
            return match checked {
                Ok(cfg) => {
                    print!("{}", cfg.to_toml());
                    eprintln!("pgprism: {} is valid", config.display());
                    ExitCode::SUCCESS
                }
                Err(err) => report(&err),
            };
        }
        Command::Cdc(args) => return crate::cdc::cmd::main(*args),
        Command::ConfigReference => {
            return match crate::config::reference::Reference::build() {
                Ok(reference) => {
                    print!("{}", reference.markdown(&flag_keys()));
                    ExitCode::SUCCESS
                }
                Err(err) => report(&err),
            };
        }
        Command::PackageAssets { out } => {
            return match package_assets(&out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => report(&err),
            };
        }
        Command::Run { config, pid_file } => match Config::load(&config) {
            Ok(cfg) => {
                let path = config.clone();
                return run_main(cfg, Box::new(move || Config::load(&path)), pid_file);
            }
            Err(err) => return report(&err),
        },
        Command::Embed(args) => return embed_main(args),
        Command::Proxy(args) => match args.clone().into_config() {
            Ok(cfg) => (cfg, args),
            Err(err) => return report(&err),
        },
    };
    let (cfg, args) = cfg;
    let pid_file = args.pid_file.clone();
    // SIGHUP reads the file again (if any) with the same flags on top.
    let reload: crate::server::Reload = Box::new(move || args.clone().into_config());
    let opts = crate::server::Options {
        reload: Some(reload),
        pid_file,
        ..Default::default()
    };
    match crate::server::run_proxy_with(&cfg, opts, print_ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// The man pages (one for pgprism, one per visible subcommand, as `git` has) and the bash, zsh
/// and fish completions, all from the clap command itself so they cannot drift from it.
fn package_assets(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(man.join("pgprism.1"), page)?;
    // After `build`, a subcommand's display name is `pgprism-NAME`, the page's name.
    let pages = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help");
    for sub in pages {
        let name = sub.get_display_name().unwrap_or(sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone()).render(&mut page)?;
        std::fs::write(man.join(format!("{name}.1")), page)?;
    }
    use clap_complete::Shell;
    for (shell, file) in [
        (Shell::Bash, "pgprism.bash"),
        (Shell::Zsh, "_pgprism"),
        (Shell::Fish, "pgprism.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "pgprism", &mut script);
        std::fs::write(completions.join(file), script)?;
    }
    Ok(())
}

/// `pgprism run`: everything the file configures. Embedded servers start first (the proxy's
/// primary or the CDC source may be one of them), then CDC on its own thread, then the proxy;
/// the admin endpoint serves all their routes. On SIGTERM the proxy drains, then CDC stops
/// (its position is checkpointed as always), then the servers stop. On SIGUSR2 (with a
/// proxy) the servers and CDC move to the new process: it adopts the servers and starts CDC
/// once this one has let go of them (`server::Movable`).
fn run_main(cfg: Config, reload: crate::server::Reload, pid_file: Option<PathBuf>) -> ExitCode {
    if let Err(err) = crate::server::check(&cfg) {
        return report(&err);
    }
    let has_embed = !cfg.embed.instance.is_empty();
    let has_cdc = !cfg.cdc.source.is_empty();
    let has_proxy = !cfg.primary.url.is_empty();
    if has_embed && !has_proxy && !has_cdc {
        return run_embed_only(&cfg, pid_file.as_deref());
    }
    crate::server::signals::block();
    let mut routes: Vec<crate::control::ExtraRoutes> = Vec::new();
    let mut supervisor = None;
    // With a proxy, SIGUSR2 hands everything to a new process: the servers must outlive this
    // one, and a process an upgrade started adopts its predecessor's servers rather than
    // starting its own (once the predecessor has let go of them).
    let upgradable = has_proxy;
    let adopting = has_proxy && crate::server::started_by_upgrade();
    if has_embed {
        match start_supervisor(&cfg, upgradable, adopting) {
            Ok(sup) => {
                routes.push(crate::embed::admin_routes(sup.handle()));
                supervisor = Some(sup);
            }
            Err(err) => return report(&err),
        }
    }
    let cdc = has_cdc.then(|| std::sync::Arc::new(RunCdc::new(cfg.cdc.clone())));
    if let Some(cdc) = &cdc {
        routes.push(crate::cdc::cmd::admin_routes(cdc.shared.clone()));
        // After an upgrade the old process runs CDC until it has released it (the slot
        // admits one reader): this one starts it then, from the take-over thread.
        if !(has_proxy && crate::server::started_by_upgrade()) {
            if let Err(err) = cdc.start() {
                return report(&err);
            }
            println!("pgprism cdc started (slot {})", cfg.cdc.slot);
        }
    }
    let routes = compose_routes(routes);
    let result = if has_proxy {
        let mut movable = Vec::new();
        if let Some(sup) = &supervisor {
            let (old, new) = (sup.handle(), sup.handle());
            movable.push(crate::server::Movable {
                name: "embed",
                release: Box::new(move || {
                    old.release();
                    true
                }),
                take_over: Box::new(move |released| adopt_servers(&new, released)),
                wait: std::time::Duration::from_millis(cfg.embed.handover_timeout_ms),
            });
        }
        if let Some(cdc) = &cdc {
            let (old, new) = (cdc.clone(), cdc.clone());
            movable.push(crate::server::Movable {
                name: "cdc",
                release: Box::new(move || old.release()),
                take_over: Box::new(move |released| new.take_over(released)),
                wait: std::time::Duration::from_millis(cfg.cdc.handover_timeout_ms),
            });
        }
        let opts = crate::server::Options {
            routes,
            reload: Some(reload),
            pid_file,
            upgrade_refused: None,
            movable,
        };
        crate::server::run_proxy_with(&cfg, opts, print_ready).map_err(RunError::Proxy)
    } else {
        if let Some(path) = &pid_file {
            crate::server::write_pid_file(path);
        }
        let served = serve_until_stopped(&cfg, routes, cdc.as_deref());
        if let Some(path) = &pid_file {
            crate::server::remove_pid_file(path);
        }
        served
    };
    let mut failed = result.err();
    if let Some(cdc) = cdc {
        failed = cdc.finish(failed);
    }
    if let Some(sup) = supervisor {
        sup.shutdown();
    }
    match failed {
        None => ExitCode::SUCCESS,
        Some(err) => report(&err),
    }
}

/// CDC under `pgprism run`: started at once, or (in a process an upgrade started) once the
/// old process has released it; stopped at the end, or released to the new process of an
/// upgrade. Its counters exist from the start, so the admin routes serve them throughout.
struct RunCdc {
    cfg: crate::config::CdcConfig,
    shared: std::sync::Arc<crate::cdc::Shared>,
    state: std::sync::Mutex<CdcState>,
}

enum CdcState {
    /// Not started yet (an upgrade's new process waiting for the old one's release).
    Waiting,
    Running(crate::cdc::CdcThread),
    /// Stopped for a new process (or left to end with this one when it would not stop in
    /// time): nothing to stop at the end.
    Released,
    /// The run is over: a late take-over starts nothing.
    Closed,
}

impl RunCdc {
    fn new(cfg: crate::config::CdcConfig) -> RunCdc {
        RunCdc {
            cfg,
            shared: std::sync::Arc::new(crate::cdc::Shared::default()),
            state: std::sync::Mutex::new(CdcState::Waiting),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CdcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the CDC thread, unless it runs already or the run is over; whether it did.
    fn start(&self) -> Result<bool, RunError> {
        let mut state = self.lock();
        if !matches!(*state, CdcState::Waiting) {
            return Ok(false);
        }
        let thread = crate::cdc::handover::spawn_with(self.cfg.clone(), self.shared.clone())
            .map_err(RunError::CdcSpawn)?;
        *state = CdcState::Running(thread);
        Ok(true)
    }

    /// In a process an upgrade started, once the old process has released CDC (or did not
    /// within `cdc.handover-timeout-ms`): waits (up to the same again) for the slot to be
    /// free, then starts CDC from the checkpoint.
    fn take_over(&self, released: crate::server::Released) {
        // The release took part of the limit already; the slot gets as long again at most.
        let limit = std::time::Duration::from_millis(self.cfg.handover_timeout_ms);
        let deadline = std::time::Instant::now() + limit;
        match released {
            crate::server::Released::Said => {
                tracing::info!("upgrade: the old process stopped its CDC; starting it here");
            }
            crate::server::Released::Gone => {
                tracing::info!("upgrade: the old process runs no CDC (any more); starting it here");
            }
            crate::server::Released::TimedOut => tracing::warn!(
                handover_timeout_ms = self.cfg.handover_timeout_ms,
                "upgrade: the old process did not release CDC within cdc.handover-timeout-ms; \
                 starting it once the slot is free"
            ),
        }
        match crate::cdc::handover::wait_slot_free(&self.cfg, deadline) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                slot = %self.cfg.slot,
                "upgrade: the replication slot is still in use at cdc.handover-timeout-ms; \
                 starting CDC all the same (while the old reader holds the slot, PostgreSQL \
                 refuses it with 55006, retried within cdc.reconnect-attempts-max)"
            ),
            Err(err) => tracing::warn!(
                error = %error_chain(&err),
                "upgrade: cannot check the replication slot; starting CDC all the same"
            ),
        }
        match self.start() {
            Ok(true) => {
                tracing::info!(slot = %self.cfg.slot, "pgprism cdc started after the upgrade")
            }
            Ok(false) => tracing::info!("upgrade: this process is stopping; CDC not started"),
            Err(err) => tracing::error!(error = %err, "upgrade: cannot start CDC"),
        }
    }

    /// In the old process, once the new one serves: stops CDC (bounded by
    /// `cdc.handover-timeout-ms`); whether it stopped.
    fn release(&self) -> bool {
        let thread = match std::mem::replace(&mut *self.lock(), CdcState::Released) {
            CdcState::Running(thread) => thread,
            // Never started, or over: nothing holds the slot.
            _ => return true,
        };
        let limit = std::time::Duration::from_millis(self.cfg.handover_timeout_ms);
        match crate::cdc::handover::stop(&self.shared, thread, limit) {
            crate::cdc::handover::Stopped::Ended(result) => {
                if let Err(err) = result {
                    tracing::warn!(error = %error_chain(&err), "CDC had stopped on an error");
                }
                tracing::info!(
                    checkpoint = %crate::cdc::lsn::Lsn(self.shared.checkpointed.load(std::sync::atomic::Ordering::Acquire)),
                    "upgrade: CDC stopped here (checkpointed); the new process takes it over"
                );
                true
            }
            crate::cdc::handover::Stopped::Panicked => {
                tracing::error!("the cdc thread panicked");
                true
            }
            crate::cdc::handover::Stopped::Running(_) => {
                tracing::error!(
                    handover_timeout_ms = self.cfg.handover_timeout_ms,
                    "upgrade: CDC did not stop within cdc.handover-timeout-ms; it ends with this \
                     process, and the new one starts it once the slot is free"
                );
                false
            }
        }
    }

    /// At the end of the run: stops CDC if it runs here (its position is checkpointed as
    /// always) and returns the run's failure, CDC's own when the run had none.
    fn finish(&self, mut failed: Option<RunError>) -> Option<RunError> {
        let state = std::mem::replace(&mut *self.lock(), CdcState::Closed);
        let CdcState::Running(thread) = state else {
            return failed;
        };
        self.shared
            .shutdown
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::Release);
        match thread.join() {
            Ok(Err(err)) if failed.is_none() => failed = Some(RunError::Cdc(err)),
            Err(_) => failed = Some(RunError::CdcPanicked),
            _ => {}
        }
        failed
    }

    /// Whether the CDC thread has ended on its own.
    fn thread_finished(&self) -> bool {
        matches!(&*self.lock(), CdcState::Running(thread) if thread.is_finished())
    }
}

/// Why `pgprism run` stopped on a failure once its parts were started.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Proxy(crate::server::RuntimeError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot start the admin endpoint")]
    Admin(#[source] crate::control::AdminError),
    #[error("cdc stopped")]
    Cdc(#[source] crate::cdc::CdcError),
    #[error("the cdc thread panicked")]
    CdcPanicked,
    #[error("cannot start the cdc thread")]
    CdcSpawn(#[source] std::io::Error),
}

/// `pgprism run` with only embedded servers: the supervisor runs them until SIGTERM.
fn run_embed_only(cfg: &Config, pid_file: Option<&std::path::Path>) -> ExitCode {
    let ready = |bound: &crate::embed::EmbedBound| {
        for inst in &bound.instances {
            println!(
                "pgprism embed: instance {} ready on port {} passfile {}",
                inst.name, inst.port, inst.passfile
            );
        }
        if let Some(path) = pid_file {
            crate::server::write_pid_file(path);
        }
    };
    let result = crate::embed::run_embed(&cfg.embed, &cfg.admin, ready);
    if let Some(path) = pid_file {
        crate::server::remove_pid_file(path);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// Starts the embed supervisor and every configured instance, one ready line each.
/// `upgradable`: the servers outlive this process (an upgrade hands them over); `adopting`:
/// this process was started by an upgrade and adopts its predecessor's servers once it has
/// released them ([`adopt_servers`]), starting none now.
fn start_supervisor(
    cfg: &Config,
    upgradable: bool,
    adopting: bool,
) -> Result<crate::embed::Supervisor, crate::embed::EmbedError> {
    let mut settings = crate::embed::SupervisorSettings::from_config(&cfg.embed);
    if adopting {
        // The process that started this one: the one being replaced.
        // SAFETY: getppid has no preconditions and cannot fail.
        settings.adopt_from = Some(unsafe { libc::getppid() } as u32);
    }
    crate::embed::Supervisor::start(settings).and_then(|sup| {
        for inst in &cfg.embed.instance {
            let mut instance = crate::embed::instance_config(&cfg.embed, inst)?;
            instance.outlive_parent = upgradable;
            if adopting {
                sup.add_pending(instance)?;
                continue;
            }
            let info = sup.add(instance)?;
            println!(
                "pgprism embed: instance {} ready on port {} passfile {}",
                info.name, info.port, info.passfile
            );
        }
        Ok(sup)
    })
}

/// In a process an upgrade started, once the old one has let go of its servers (or could
/// not say so in time): adopts each where it runs, or starts it afresh if it is gone.
fn adopt_servers(handle: &crate::embed::SupervisorHandle, released: crate::server::Released) {
    if released == crate::server::Released::TimedOut {
        tracing::warn!(
            "upgrade: the old process did not release its embedded servers within \
             embed.handover-timeout-ms; adopting them all the same"
        );
    }
    match handle.adopt() {
        Ok(instances) => {
            for info in instances {
                tracing::info!(
                    instance = %info.name,
                    pid = info.pid.unwrap_or(0),
                    port = info.port,
                    state = ?info.state,
                    "upgrade: embedded server taken over"
                );
            }
        }
        Err(err) => {
            tracing::error!(error = %error_chain(&err), "upgrade: cannot adopt the embedded servers")
        }
    }
}

/// Several subsystems' admin routes as one: the first that answers a request wins.
fn compose_routes(routes: Vec<crate::control::ExtraRoutes>) -> Option<crate::control::ExtraRoutes> {
    if routes.is_empty() {
        return None;
    }
    Some(std::sync::Arc::new(move |method: &str, path: &str| {
        routes.iter().find_map(|r| r(method, path))
    }))
}

/// No proxy configured: serve the admin endpoint (CDC, embed routes) until SIGTERM/SIGINT or
/// until CDC stops on its own.
fn serve_until_stopped(
    cfg: &Config,
    routes: Option<crate::control::ExtraRoutes>,
    cdc: Option<&RunCdc>,
) -> Result<(), RunError> {
    use crate::server::signals;
    let state = std::sync::Arc::new(std::sync::Mutex::new(crate::control::ControlState::new(
        0,
        String::new(),
        String::new(),
        cfg.metrics.latency_us_max,
    )));
    let _admin =
        crate::control::AdminServer::start(&cfg.admin, state, routes).map_err(RunError::Admin)?;
    if let Some(server) = &_admin {
        println!("pgprism admin {}", server.addr);
    }
    loop {
        match signals::wait(std::time::Duration::from_millis(200)) {
            Some(signals::Signal::Stop) => return Ok(()),
            Some(signals::Signal::Upgrade) => tracing::warn!(
                "SIGUSR2: an upgrade hands over a proxy's sockets and this process runs no \
                 proxy; ignoring (restart pgprism to run a new version)"
            ),
            _ => {}
        }
        if cdc.is_some_and(RunCdc::thread_finished) {
            return Ok(()); // the join reports why
        }
    }
}

/// One parseable line on stdout so scripts and tests know where to connect (the last one at
/// start-up), preceded by the Unix socket's line when there is one.
fn print_ready(bound: &crate::server::Bound) {
    use std::io::Write;
    // Not println!: after an upgrade stdout may be a pipe its reader closed long ago, and a
    // failed write must not end a proxy that serves.
    let mut out = std::io::stdout().lock();
    if let Some(path) = &bound.unix {
        let _ = writeln!(out, "pgprism unix socket {}", path.display());
    }
    let admin = bound.admin.map(|a| a.to_string()).unwrap_or_default();
    let _ = writeln!(out, "pgprism listening on {} admin {}", bound.listen, admin);
    let _ = out.flush();
}

/// The subcommands whose flags set config keys, each with a command line to start from: a
/// mirror and an embedded instance, so that flags that change every mirror or add an
/// instance have something to show on.
const FLAG_PROBES: &[(&str, &[&str])] = &[
    (
        "proxy",
        &[
            "--primary",
            "postgres://127.0.0.1:1",
            "--mirror",
            "postgres://127.0.0.1:2",
        ],
    ),
    ("embed", &["--instance", "base:5:memory"]),
    ("cdc", &[]),
];

/// Which config keys each flag sets, for the configuration reference: every flag of the
/// subcommands above is applied to their command line through the real `into_config`, and
/// the keys whose values change are the flag's. Found by trial rather than listed so that the
/// reference cannot name a flag for a key it does not set, and a new flag appears in it
/// without a table to keep. Key -> "`--flag` (commands)".
fn flag_keys() -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, BTreeMap<String, BTreeSet<&str>>> = BTreeMap::new();
    let cli = Cli::command();
    for &(name, base) in FLAG_PROBES {
        let (Some(sub), Some(before)) = (cli.find_subcommand(name), probe_config(name, base, &[]))
        else {
            continue;
        };
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_global_set() || long == "config" {
                continue;
            }
            // A visible alias (Frenzy's `--max-conns` for `--pool-size`) is tried on its own,
            // so the reference names it only if it really sets the key.
            let aliases = arg.get_visible_aliases().unwrap_or_default();
            for spelled in std::iter::once(long).chain(aliases) {
                let flag = format!("--{spelled}");
                for value in probe_values(arg) {
                    let extra: Vec<&str> = std::iter::once(flag.as_str())
                        .chain(value.as_deref())
                        .collect();
                    let Some(after) = probe_config(name, base, &extra) else {
                        continue;
                    };
                    let mut keys = BTreeSet::new();
                    changed_keys(&before, &after, "", &mut keys);
                    for key in keys {
                        found
                            .entry(key)
                            .or_default()
                            .entry(flag.clone())
                            .or_default()
                            .insert(name);
                    }
                }
            }
        }
    }
    found
        .into_iter()
        .map(|(key, flags)| {
            let flags = flags
                .into_iter()
                .map(|(flag, commands)| {
                    let commands: Vec<&str> = commands.into_iter().collect();
                    format!("`{flag}` ({})", commands.join(", "))
                })
                .collect();
            (key, flags)
        })
        .collect()
}

/// Values to try a flag with: none for a switch, each possible value, else a number and an
/// instance spec (every other flag takes one of those: a count, a duration, a string).
fn probe_values(arg: &clap::Arg) -> Vec<Option<String>> {
    if !arg.get_action().takes_values() {
        return vec![None];
    }
    let possible = arg.get_possible_values();
    if !possible.is_empty() {
        return possible
            .iter()
            .map(|v| Some(v.get_name().to_string()))
            .collect();
    }
    vec![Some("7".into()), Some("probe:7:/probe".into())]
}

/// The configuration `pgprism SUB BASE EXTRA` would run with, serialized; `None` when the
/// command line is refused.
fn probe_config(sub: &str, base: &[&str], extra: &[&str]) -> Option<toml::Value> {
    let argv = ["pgprism", sub]
        .into_iter()
        .chain(base.iter().copied())
        .chain(extra.iter().copied());
    let cfg = match Cli::try_parse_from(argv).ok()?.command {
        Command::Proxy(args) => args.into_config().ok()?,
        Command::Embed(args) => args.into_config().ok()?,
        Command::Cdc(args) => {
            let (cdc, admin) = args.into_config().ok()?;
            Config {
                cdc,
                admin,
                ..Config::default()
            }
        }
        _ => return None,
    };
    toml::Value::try_from(&cfg).ok()
}

/// The dotted keys whose values differ between two serialized configurations (`[]` for an
/// element of an array of tables; an element only in `after` is compared with the first of
/// `before`, so an added mirror shows as the keys its flag set).
fn changed_keys(
    before: &toml::Value,
    after: &toml::Value,
    prefix: &str,
    out: &mut BTreeSet<String>,
) {
    use toml::Value;
    match (before, after) {
        (Value::Table(b), Value::Table(a)) => {
            for (name, value) in a {
                let key = format!("{prefix}{name}");
                match b.get(name) {
                    Some(old) => changed_keys(old, value, &format!("{key}."), out),
                    None => {
                        out.insert(key);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(a))
            if matches!(a.first(), Some(Value::Table(_)))
                || matches!(b.first(), Some(Value::Table(_))) =>
        {
            let key = prefix.trim_end_matches('.');
            let empty = Value::Table(toml::Table::new());
            for (i, value) in a.iter().enumerate() {
                let old = b.get(i).or(b.first()).unwrap_or(&empty);
                changed_keys(old, value, &format!("{key}[]."), out);
            }
        }
        (b, a) if b != a => {
            out.insert(prefix.trim_end_matches('.').to_string());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations_take_pgprism_and_go_forms() {
        for (text, ms) in [
            ("250", 250),
            ("0", 0),
            ("0s", 0),
            ("250ms", 250),
            ("5s", 5_000),
            ("2m", 120_000),
            ("30m", 1_800_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("2h45m10s", 9_910_000),
            ("1.5s", 1_500),
            (".5h", 1_800_000),
            ("2000us", 2),
            ("2000µs", 2),
            ("3000000ns", 3),
            (" 90s ", 90_000),
            // Zeros below a nanosecond change nothing.
            ("1.0000000000s", 1_000),
            ("9223372036854775807", i64::MAX as u64),
            ("9223372036854775807ms", i64::MAX as u64),
        ] {
            assert_eq!(parse_duration_ms(text), Ok(ms), "{text}");
        }
    }

    #[test]
    fn durations_that_are_not_whole_milliseconds_or_malformed_are_refused() {
        for text in [
            "",
            "s",
            "-1s",
            "1x",
            "1h30",
            "1.2.3s",
            ".s",
            "1 s",
            "100us",
            "1.0005s",
            "5d",
            "99999999999999999999999999999h",
        ] {
            assert!(parse_duration_ms(text).is_err(), "{text} was accepted");
        }
        // A digit below a nanosecond is below a millisecond too (it was dropped).
        for text in ["1.0000001ms", "2.0000000001s", "1.00000000000001h"] {
            let err = parse_duration_ms(text).expect_err(text);
            assert!(
                err.contains("whole number of milliseconds"),
                "{text}: {err}"
            );
        }
        // Above i64::MAX ms: a SET could no longer write the [pool] table out.
        for text in [
            "9223372036854775808",
            "18446744073709551615",
            "9223372036854775808ms",
            "99999999999999999999",
            "9999999999999h",
        ] {
            let err = parse_duration_ms(text).expect_err(text);
            assert!(err.contains("too long"), "{text}: {err}");
        }
    }
}
