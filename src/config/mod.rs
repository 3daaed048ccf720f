//! Typed configuration: a TOML file with `${ENV}` expansion, overridden by command-line flags,
//! validated before anything starts. Every error names the offending key path and what was
//! expected. This module only reads and checks; it never opens sockets or starts threads.

pub mod dns;
mod env;
mod pool;
pub mod reference;
mod url;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::dns::LiveEndpoint;
pub use self::pool::{AuthType, PoolConfig, PoolMode};
pub use self::url::{Endpoint, PgUrl, SOCKET_PATH_BYTES_MAX, SslMode, UrlError, socket_file};

/// The whole configuration, as the file spells it (kebab-case keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub proxy: ProxyConfig,
    pub primary: PrimaryConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    /// `[[mirror]]` tables: databases that receive a replay of the client traffic.
    pub mirror: Vec<MirrorConfig>,
    /// The shadow database of compare mode: every statement also runs there and the results
    /// are compared with the primary's.
    pub shadow: ShadowConfig,
    pub compare: CompareConfig,
    pub embed: EmbedConfig,
    /// `[cdc]`: logical replication into StarRocks.
    pub cdc: CdcConfig,
    /// `[client-tls]`: TLS between clients and pgprism.
    pub client_tls: ClientTlsConfig,
    /// `[pool]`: pool mode, pool bounds, client authentication and the console's users.
    pub pool: PoolConfig,
}

/// `[client-tls]`: pgprism's TLS server side. (TLS towards the databases is set in their URLs
/// with libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.)
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientTlsConfig {
    /// `disable`: SSLRequest is answered `N`. `allow`: clients that ask get TLS, the others
    /// plain text. `require`: plain-text sessions are refused (SQLSTATE 28000). Empty:
    /// `allow` when `cert-file` is set, else `disable`.
    pub mode: String,
    /// PEM certificate chain pgprism presents to clients.
    pub cert_file: String,
    /// PEM private key of that certificate.
    pub key_file: String,
}

/// What `[client-tls]` asks for, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsMode {
    Disable,
    Allow,
    Require,
}

impl ClientTlsConfig {
    pub fn effective_mode(&self) -> Result<ClientTlsMode, ConfigError> {
        match self.mode.as_str() {
            "" if self.cert_file.is_empty() => Ok(ClientTlsMode::Disable),
            "" | "allow" | "prefer" => Ok(ClientTlsMode::Allow),
            "disable" => Ok(ClientTlsMode::Disable),
            "require" => Ok(ClientTlsMode::Require),
            other => Err(ConfigError::key(
                "client-tls.mode",
                format!("expected disable, allow or require, got `{other}`"),
            )),
        }
    }
}

/// `[shadow]`: the database compare mode checks against the primary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShadowConfig {
    /// `postgres://user:password@host:port/database`; empty: compare mode is off. Without a
    /// user or database, the client's are used.
    pub url: String,
    /// Shadow connections for the whole process (`--shadow-pool-size`), split across the
    /// shards and lent to client sessions per transaction, so the shadow's connection count
    /// no longer depends on the number of clients. 0: each client session opens its own
    /// shadow connection. The pool's connections follow `[pool]`'s `server-lifetime-ms`,
    /// `server-idle-timeout-ms`, `server-check-query`, `server-reset-query` and
    /// `waiters-max`; a session waits for one at most `compare.shadow-timeout-ms`.
    pub pool_size: usize,
}

/// Whose results the client receives in compare mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceOfTruth {
    Primary,
    Shadow,
}

/// `[compare]`: how primary and shadow results are compared and what a difference does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CompareConfig {
    /// Whose results the client receives.
    pub source_of_truth: SourceOfTruth,
    /// Hold each result until both sides agree; on a difference the client gets SQLSTATE
    /// XX000 instead of the result (default: report only).
    pub fail_on_differences: bool,
    /// With `fail-on-differences`: a shadow slower than `slow-query-ratio` also fails.
    pub fail_on_slow_queries: bool,
    /// Shadow time / primary time above which a statement counts as slow on the shadow.
    pub slow_query_ratio: f64,
    /// Statements faster than this on the shadow are never slow.
    pub slow_query_min_ms: u64,
    /// Run `EXPLAIN (ANALYZE, BUFFERS)` on both sides for read-only slow statements.
    pub explain_slow_queries: bool,
    /// EXPLAIN runs per shard over the process lifetime (each opens two connections).
    pub explains_max: u64,
    /// Regexes of statements whose results are never compared (still run on both).
    pub exclude_patterns: Vec<String>,
    /// Regexes of statements sent to the primary only (needs `source-of-truth = primary`).
    pub primary_only_patterns: Vec<String>,
    /// Regexes of column names whose values are not compared.
    pub ignore_columns: Vec<String>,
    /// Absolute tolerance for float4/float8/numeric values (0: exact).
    pub float_tolerance: f64,
    /// Tolerance for timestamp/timestamptz/time/timetz values, in milliseconds (0: exact):
    /// values a step of this size apart or less compare equal, so a `now()` each side stored
    /// from its own clock and read back later agrees. Like the float tolerance it is a grid
    /// (values are rounded to the nearest multiple), the only form a streaming row hash
    /// allows: two values within it that straddle a step's midpoint still differ.
    pub timestamp_tolerance_ms: u64,
    /// Types declared equal across the two sides, e.g. `int8=numeric`.
    pub type_equivalences: Vec<String>,
    /// Bytes of the source of truth's answer held per sync point in fail-on-differences
    /// mode; above it the statement streams and is only reported.
    pub buffer_bytes_max: usize,
    /// Rows kept per result and side for reports.
    pub sample_rows_max: usize,
    /// JSON-lines file of mismatch and slow-query reports (empty: none).
    pub report_path: String,
    /// Size at which the report file is rotated: a line that would take it past this starts
    /// a new file (lines are never split, so only a single line longer than this exceeds it).
    pub report_bytes_max: u64,
    /// Rotated report files kept besides the live one (`report-path.1` newest ...
    /// `report-path.N` oldest); the oldest is deleted on rotation.
    pub report_files_max: usize,
    /// Reports queued from the shards to the control thread before new ones are dropped.
    pub report_queue_max: usize,
    /// Statement text kept per report, in bytes.
    pub statement_bytes_max: usize,
    /// Time allowed to open and authenticate a shadow (or EXPLAIN) connection.
    pub connect_timeout_ms: u64,
    /// How long a statement the primary has answered may wait for the shadow's answer; beyond
    /// it the session stops comparing (the shadow is closed, held results are released).
    pub shadow_timeout_ms: u64,
    /// Sync points the primary has answered and the shadow not yet, per session; beyond it
    /// the session stops comparing, as on a timeout.
    pub shadow_lag_max: usize,
    /// Client bytes per session waiting to be written to the shadow, held behind a
    /// transaction-control statement until both sides answered it; beyond it the client's
    /// reads wait (backpressure).
    pub shadow_queue_bytes_max: usize,
    /// Client bytes of one extended-protocol batch (Parse/Bind/Execute... before its Sync)
    /// held for the shadow until its Sync, which sends the batch whole in its turn of the
    /// completion order and decides its routing (`primary-only-patterns`). Beyond it, what
    /// is held goes to the shadow at once, as after a Flush: the batch is not ordered, and its
    /// routing is decided there (a batch already routed to the primary only stops being
    /// held; its frames are dropped for the shadow).
    pub shadow_batch_bytes_max: usize,
    /// Ordered shadow dispatch: how long a statement the primary has answered may wait for
    /// earlier conflicting statements (of other sessions) to complete on the shadow; beyond it
    /// it goes anyway and a difference in its result is inconclusive (concurrent), not a
    /// mismatch. 0 turns ordering off (each session's statements go as they arrive).
    pub order_wait_ms: u64,
    /// Ordered shadow dispatch: a statement whose transaction has written (so holds row
    /// locks on the shadow) stops waiting once every earlier statement it waits for has been
    /// running on the shadow this long: those are most likely waiting for its locks (the
    /// primary answered them just after it, and pgprism saw the answers in the other order).
    /// Its difference, if any, is inconclusive (concurrent). 0: only `order-wait-ms` bounds
    /// the wait.
    pub order_lock_wait_ms: u64,
    /// Ordered shadow dispatch: the primary's answers are numbered by when they reached
    /// pgprism's socket (the kernel's receive timestamp), which can be milliseconds before
    /// pgprism reads them on a busy machine, on another shard. So a statement may go to the
    /// shadow only once every conflicting statement of another session sent to the primary
    /// before its answer arrived has been answered too (its answer could carry an earlier
    /// timestamp), and at most this long after its answer arrived; then it goes, and if an
    /// earlier answer turns up after all, the difference it makes is inconclusive. 0: no
    /// such wait (statements are ordered as pgprism reads their answers).
    pub order_hold_ms: u64,
    /// Ordered shadow dispatch: a read takes its snapshot when it starts running on the
    /// primary, before its answer is sent, while a write takes effect when it commits, just
    /// before its answer. So a read is numbered this much (µs) before its answer reached
    /// pgprism (never before it was sent): a write answered within that time is taken to
    /// have come after it. Reads placed by their answers alone came after writes they had
    /// not seen more often than the other way round (hot rows, 64 clients: shadow minus
    /// primary +1 in most differing reads); 15 µs evened that out and made 30% fewer
    /// statements inconclusive on the 2-core build machine (docs/compare.md). 0: reads numbered by their answers.
    pub order_read_lead_us: u64,
    /// Ordered shadow dispatch: a read that overlapped writes of its rows on the primary
    /// and whose shadow answer differs from the primary's is read again on the shadow (over
    /// a read-only connection of its own, as an order re-check) just after each later
    /// overlapping write completed there, in the primary's completion order, at most this
    /// many times; the first answer equal to the primary's places it there (a match,
    /// counted in `compare_placed`), none leaves it inconclusive (concurrent). It holds the
    /// writes of its rows behind it while it is placed, and shares the re-checks' bounds
    /// (`order-rechecks-max`, `order-rechecks-total-max`). 0: reads are not placed.
    pub place_reads_max: u64,
    /// Order re-checks running at once per shard. Rows that agree but come in another order
    /// under an ORDER BY whose keys are not all output columns (an expression, a column not
    /// selected) are re-read on both sides over two read-only connections with the sort keys
    /// appended to the output, to tell ties from a real order difference. Beyond this many,
    /// or 0, such a difference is inconclusive (nondeterministic).
    pub order_rechecks_max: u64,
    /// Order re-checks running at once in the whole process, over every shard (each takes
    /// two connections, one to the primary and one to the shadow). Beyond this many, such a
    /// difference is inconclusive (nondeterministic).
    pub order_rechecks_total_max: u64,
    /// Statement shapes (the text with its plain literals masked: `WHERE id = 41` and `WHERE
    /// id = 7` are one) whose reading compare keeps per shard: the relations and rows a
    /// statement touches, for ordered dispatch, and whether it has a top-level ORDER BY. A
    /// text of a known shape is read in one byte pass and its values bound, instead of
    /// being tokenized and scanned again. Past this many the shard's cache starts over. 0:
    /// every text is read whole.
    pub shape_cache_max: u64,
    /// Calibration (A/A): the shadow is the primary itself, so writes run on the primary only
    /// and every difference is noise; reports carry the noise rate per fingerprint.
    pub calibrate: bool,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            source_of_truth: SourceOfTruth::Primary,
            fail_on_differences: false,
            fail_on_slow_queries: false,
            slow_query_ratio: 5.0,
            slow_query_min_ms: 10,
            explain_slow_queries: true,
            explains_max: 64,
            exclude_patterns: vec![
                r"(?i)\b(now|random|version|clock_timestamp|statement_timestamp|transaction_timestamp|timeofday|pg_backend_pid|txid_current|gen_random_uuid|inet_server_port)\s*\(".into(),
                r"(?i)\b(current_timestamp|localtimestamp|current_time|localtime)\b".into(),
                r"(?i)^\s*show\b".into(),
            ],
            primary_only_patterns: Vec::new(),
            ignore_columns: Vec::new(),
            float_tolerance: 0.0,
            timestamp_tolerance_ms: 0,
            type_equivalences: Vec::new(),
            buffer_bytes_max: 16 << 20,
            sample_rows_max: 5,
            report_path: "pgprism-mismatches.jsonl".into(),
            report_bytes_max: 64 << 20,
            report_files_max: 5,
            report_queue_max: 1024,
            statement_bytes_max: 4096,
            connect_timeout_ms: 5_000,
            shadow_timeout_ms: 30_000,
            shadow_lag_max: 10_000,
            shadow_queue_bytes_max: 4 << 20,
            shadow_batch_bytes_max: 4 << 20,
            order_wait_ms: 2_000,
            order_lock_wait_ms: 50,
            order_hold_ms: 100,
            order_read_lead_us: 15,
            place_reads_max: 4,
            order_rechecks_max: 8,
            order_rechecks_total_max: 32,
            shape_cache_max: 1024,
            calibrate: false,
        }
    }
}

/// Most `compare.timestamp-tolerance-ms`: a day (a wider grid says nothing about a clock).
const TIMESTAMP_TOLERANCE_MS_MAX: u64 = 86_400_000;
/// Smallest `compare.report-bytes-max`.
const REPORT_BYTES_MIN: u64 = 4096;
/// Most `compare.report-files-max`.
const REPORT_FILES_MAX: usize = 1000;
/// Longest `proxy.ring-batch-wait-us`: a batching wait adds up to this much latency to a
/// busy shard's answers.
const RING_BATCH_WAIT_US_MAX: u32 = 1000;

/// Which statements a mirror receives (Frenzy's `--mirror-*` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueryFilter {
    /// DDL and DML (the default): a mirror's data follows the primary's.
    DdlDml,
    /// Everything, SELECTs included (`--mirror-all-queries`): for load and latency tests.
    All,
    /// SELECTs only (`--mirror-select-queries`): read load on a replica-like mirror.
    Select,
    /// DDL only (`--mirror-ddl-only`).
    Ddl,
    /// DML only (`--mirror-dml-only`).
    Dml,
}

/// What a mirror does when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Skip the rest of the current transaction on that mirror (rolled back there) and resume
    /// at the next transaction boundary. The client never waits.
    Drop,
    /// Backpressure: the client waits for the mirror, as strict as replication.
    Block,
}

/// One mirror database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MirrorConfig {
    /// Name in metrics and logs; default `mirror-<n>`.
    pub name: String,
    /// `postgres://user:password@host:port/database`: credentials for the mirror. Without a
    /// user or database, the client's are used.
    pub url: String,
    pub queries: QueryFilter,
    /// Do not replay BEGIN/COMMIT/ROLLBACK/SAVEPOINT (each statement then commits alone).
    pub skip_transaction_control: bool,
    /// Fraction of client sessions mirrored (0.0 to 1.0).
    pub sample: f64,
    pub overflow: Overflow,
    /// Messages queued per session for this mirror before the overflow policy applies.
    pub queue_messages_max: usize,
    /// Bytes queued per session for this mirror before the overflow policy applies.
    pub queue_bytes_max: usize,
    /// Sync points (Query, Sync) sent to this mirror and not yet answered, per session. At
    /// the bound the mirror connection waits for answers before sending the next one (what
    /// waits meanwhile stays queued, under the queue bounds).
    pub in_flight_messages_max: usize,
    /// A statement the mirror has not answered within this time counts as a timeout; the
    /// mirror connection is then reset and resumes at the next transaction boundary.
    pub timeout_ms: u64,
    /// Reconnection attempts per outage before the session gives up on this mirror.
    pub retries: u32,
    /// First reconnection delay; doubles per attempt up to `retry-delay-max-ms`.
    pub retry_delay_ms: u64,
    /// Longest reconnection delay.
    pub retry_delay_max_ms: u64,
    /// Time allowed to open and authenticate a mirror connection.
    pub connect_timeout_ms: u64,
    /// Hold frames up to this long so that several go to the mirror in one write (0: send
    /// each at once). Fewer sends and fewer wake-ups of the mirror's backend per statement,
    /// for a mirror that lags the primary by up to this much.
    pub flush_delay_us: u64,
    /// With `flush-delay-us` above 0: the answers to one write in this many are read as they
    /// arrive, and their statements timed; the others are read in one go a flush delay after
    /// their write and only counted (rows, errors), which spares a wake-up and a read per
    /// statement. 1: every statement is timed.
    pub latency_sample_every: u32,
    /// Connections to this mirror for the whole process, however many clients: client
    /// transactions are replayed on them whole, at transaction boundaries (0: one mirror
    /// connection per client session, as before pooling).
    pub pool_size: usize,
    /// Pooled (`pool-size` above 0): a connection whose last write is not answered yet
    /// holds the units it would write next until the answers are in, for at most this long,
    /// and they then go in one write; the units of sessions bound to no connection go to the
    /// first connection that keeps up (its oldest answer awaited is younger than this) and
    /// wait for it the same way. The busier the mirror, the more units a write carries (one
    /// send and one wake-up of the mirror's backend for several). Past this wait a unit goes
    /// to any connection (another opens while the pool's share allows). The mirror's lag then
    /// includes the wait and the time the shard takes to wake for the answers (milliseconds on
    /// a loaded machine). 0 (default): every unit is written as soon as a connection takes it.
    pub pool_batch_wait_us: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            name: String::new(),
            url: String::new(),
            queries: QueryFilter::DdlDml,
            skip_transaction_control: false,
            sample: 1.0,
            overflow: Overflow::Drop,
            queue_messages_max: 10_000,
            queue_bytes_max: 16 << 20,
            in_flight_messages_max: 65_536,
            timeout_ms: 30_000,
            retries: 10,
            retry_delay_ms: 100,
            retry_delay_max_ms: 5_000,
            connect_timeout_ms: 5_000,
            flush_delay_us: 0,
            latency_sample_every: 8,
            pool_size: 0,
            pool_batch_wait_us: 0,
        }
    }
}

/// Client-facing side: listener, shards and the per-session bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProxyConfig {
    /// Address clients connect to.
    pub listen: String,
    /// Directory of a Unix-domain socket clients may also connect to, as PgBouncer's
    /// `unix_socket_dir`: the socket is `<dir>/.s.PGSQL.<port of listen>`, so
    /// `psql -h <dir> -p <port>` works. Empty: no Unix socket.
    pub unix_socket_dir: String,
    /// Number of shards (one executor pinned to one core each); 0 means one per core.
    pub shards: usize,
    /// Pin each shard's thread to one core (turn off when sharing a machine with other
    /// pinned services).
    pub pin_cores: bool,
    /// Which shard serves a new client: `kernel` (the default) leaves it to the kernel's
    /// SO_REUSEPORT hash (clients spread evenly over the shards); `pack` keeps new clients on
    /// the lowest-numbered shard not busier than `pack-busy-pct` (any shard may accept; it
    /// hands the connection over), so that a shard with clients is busy enough to serve
    /// several per wake-up and a shard without clients sleeps: the choice for a small machine
    /// shared with the database, where it saved about a quarter of the CPU per transaction at
    /// 16 clients. The busy figure is measured, so clients that connect before their load
    /// starts and slower than about 40 a second (a pool opened at boot one connection at a
    /// time) all land on the first shard; a burst of more than about 30 at once is spread
    /// over the shards. In transaction mode idle clients then move between shards as the
    /// load changes (`rebalance-clients-max`); in session mode a client stays on its shard
    /// for its whole life.
    pub client_placement: ClientPlacement,
    /// With `client-placement = "pack"`: a shard whose thread ran, or waited runnable for
    /// its core, more than this share of the time (percent, smoothed over about a second,
    /// each client placed there lately counting 2.5%) takes no new clients while a later
    /// shard is below it; when every shard is above it, the least busy one takes them.
    pub pack_busy_pct: u32,
    /// With `client-placement = "pack"`: what a client just placed on a shard counts for in
    /// its busy figure (thousandths of a core) until the measurement can see it, fading over
    /// about 0.8 s. 25 (a pgbench client at full speed on the 2-core build machine): about 32
    /// clients placed at once take an idle shard to the default `pack-busy-pct`, so a burst
    /// (a pool opened at boot, `pgbench -c 512`) is spread over every shard. Lower keeps a
    /// burst together on the first shard until its measured load says otherwise (in
    /// transaction mode idle clients then move as `rebalance-clients-max` says); 0: only the
    /// measured figure counts.
    pub pack_client_permille: u32,
    /// With `client-placement = "pack"`: accepted connections waiting for the shard they are
    /// placed on, per shard; when that queue is full the accepting shard serves the client
    /// itself (counted as `handover_overflows`).
    pub handover_queue_max: usize,
    /// With `client-placement = "pack"` and transaction pooling: idle pooled clients
    /// (between transactions, holding no server connection, not pinned, without mirrors,
    /// shadow or TLS) a shard asks to move to another shard at each look (ten looks a
    /// second, resting 0.8 s after a move). A shard above `pack-busy-pct` hands clients to
    /// the least busy shard below half of it; a shard below half of it hands them to the
    /// first earlier shard that can take its load and stay below three quarters of it. A
    /// client moves with its settings, prepared statements, cancel key and console row,
    /// through the hand-over queue. 0: clients never move.
    pub rebalance_clients_max: usize,
    /// listen(2) backlog of each shard's listener.
    pub backlog: u32,
    /// Largest single protocol message accepted from a client or a server.
    pub message_bytes_max: usize,
    /// Bytes read from a socket per read call (the per-connection buffer grows in these steps).
    pub read_chunk_bytes: usize,
    /// Bytes written to a socket that may wait for the kernel to take them, per connection
    /// (client, primary, mirror, shadow); beyond it the writer waits (backpressure).
    pub send_queue_bytes: usize,
    /// How long a closed connection may take to send what was written to it before the
    /// close (a farewell error to a client that reads nothing, say); then it is cut.
    pub close_linger_ms: u64,
    /// How long a busy shard's wait for I/O may gather more completions before it wakes
    /// (io_uring's `min_wait_usec`, Linux 6.12+; ignored, with a log line, on a kernel
    /// without it). Only after a turn that handled several completions: then the shard waits
    /// for as many again, and wakes at this bound if at least one came. An idle shard
    /// wakes at the first completion, so no latency is added when traffic is light. 0: every
    /// wait ends at the first completion. Off by default: on a 2-core machine shared with
    /// PostgreSQL and the clients it showed no gain (docs/benchmarks.md, "Waking less").
    pub ring_batch_wait_us: u32,
    /// Run io_uring completion work only when the shard asks for it
    /// (`IORING_SETUP_DEFER_TASKRUN`) instead of on every socket event: with
    /// `ring-batch-wait-us`, a waiting shard is then not woken before its batch is in. Off by
    /// default: test runs under load have stalled with it (see src/exec/reactor.rs).
    pub ring_defer_taskrun: bool,
    /// Time a client has to send its startup packet and finish authentication.
    pub startup_timeout_ms: u64,
    /// Time allowed to open a connection to the primary.
    pub connect_timeout_ms: u64,
    /// How often backend host names (primary, mirrors, shadow) are resolved again, so new
    /// connections follow a name that moved; 0: resolved once at start-up.
    pub dns_refresh_ms: u64,
    /// On SIGTERM/SIGINT: how long running sessions may take to finish before pgprism exits.
    /// After an upgrade (SIGUSR2) the old process waits this long for its sessions to end on
    /// their own, then closes the rest with 57P01.
    pub drain_timeout_ms: u64,
    /// On SIGUSR2: how long the new binary has to validate its config, take over the
    /// listening sockets and report ready; past it the old process kills it and keeps serving.
    pub upgrade_timeout_ms: u64,
    /// At start-up: how long the shards have to set up their io_uring rings, listeners and
    /// pools before pgprism gives up; it says ready (and, after an upgrade, takes over) only
    /// once every shard can serve.
    pub shard_start_timeout_ms: u64,
    /// Client sessions per shard; beyond it new clients get SQLSTATE 53300.
    pub sessions_per_shard_max: usize,
    /// Statements in flight per session whose latency is recorded (pipelines deeper than this
    /// are still forwarded; only their latency samples are skipped).
    pub pipeline_depth_max: usize,
    /// Prepared statements and portals each session's tracker remembers by name (for the
    /// modes that need statements: mirrors, compare); beyond it a name's statement is unknown.
    pub session_names_max: usize,
    /// Session settings (SET, RESET, `set_config`) kept per session, one per parameter.
    pub session_settings_max: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:6432".into(),
            unix_socket_dir: String::new(),
            shards: 0,
            pin_cores: true,
            client_placement: ClientPlacement::Kernel,
            pack_busy_pct: 80,
            pack_client_permille: 25,
            handover_queue_max: 1024,
            rebalance_clients_max: 16,
            backlog: 4096,
            message_bytes_max: 64 << 20,
            read_chunk_bytes: 16 << 10,
            send_queue_bytes: 64 << 10,
            close_linger_ms: 5_000,
            ring_batch_wait_us: 0,
            ring_defer_taskrun: false,
            startup_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            dns_refresh_ms: 15_000,
            drain_timeout_ms: 30_000,
            upgrade_timeout_ms: 30_000,
            shard_start_timeout_ms: 10_000,
            sessions_per_shard_max: 10_000,
            pipeline_depth_max: 1024,
            session_names_max: 10_000,
            session_settings_max: 64,
        }
    }
}

/// `proxy.client-placement` (`--client-placement`): which shard serves a new client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientPlacement {
    /// New clients stay on the shard whose listener the kernel's SO_REUSEPORT hash chose (the
    /// default).
    #[default]
    Kernel,
    /// New clients go to the lowest-numbered shard below `proxy.pack-busy-pct` (opt-in, for a
    /// small machine shared with the database; in transaction mode idle clients move between
    /// shards as the load changes, in session mode never).
    Pack,
}

/// The primary database: every client byte goes here and the client sees its answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrimaryConfig {
    /// `postgres://host:port` (user, password and database come from each client), or its
    /// socket directory: `postgres://%2Fdir:port`, `postgres:///?host=/dir&port=N`; TLS with
    /// `?sslmode=...&sslrootcert=...` as in libpq. Required when a proxy runs.
    pub url: String,
}

/// Admin HTTP endpoint (`/metrics`, `/health`, `/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Address of the admin endpoint; empty disables it. An address beyond loopback needs
    /// `token-file`.
    pub listen: String,
    /// File holding the bearer token (one line, at least 16 characters) that requests must
    /// carry as `Authorization: Bearer <token>`: every state-changing request (any method but
    /// GET), and on an address beyond loopback every request. The file must not be readable
    /// or writable by group or others (as ssh insists for keys). Empty: no token, and
    /// state-changing requests are refused with 403.
    pub token_file: String,
    /// PEM certificate chain the admin endpoint presents: set it (with `key-file`) to serve
    /// HTTPS instead of plain HTTP.
    pub cert_file: String,
    /// PEM private key of that certificate.
    pub key_file: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9930".into(),
            token_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        }
    }
}

impl AdminConfig {
    /// The address and token rules that need no file: a listen address beyond loopback
    /// needs a token; certificate and key go together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Ok(());
        }
        let addr = parse_addr("admin.listen", &self.listen)?;
        if !addr.ip().is_loopback() && self.token_file.is_empty() {
            return Err(ConfigError::key(
                "admin.token-file",
                format!(
                    "admin.listen `{}` is reachable beyond this machine, so every request \
                     must carry a bearer token: set admin.token-file (a file only pgprism's \
                     user can read) or listen on 127.0.0.1",
                    self.listen
                ),
            ));
        }
        match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (false, true) => Err(ConfigError::key(
                "admin.key-file",
                "admin.cert-file is set: set admin.key-file too (its private key)",
            )),
            (true, false) => Err(ConfigError::key(
                "admin.cert-file",
                "admin.key-file is set: set admin.cert-file too (the certificate chain)",
            )),
            _ => Ok(()),
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
    /// Statement fingerprints tracked per shard for primary-vs-mirror latency; statements
    /// beyond it are counted under `other`.
    pub fingerprints_max: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            report_interval_ms: 1_000,
            ring_capacity: 64,
            latency_us_max: 60_000_000,
            fingerprints_max: 256,
        }
    }
}

/// `pgprism embed`: supervised PostgreSQL servers (`[embed]` and `[[embed.instance]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmbedConfig {
    /// Directory with `postgres` and `initdb`; unset: `pg_config --bindir`, then the highest
    /// `/usr/lib/postgresql/*/bin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bindir: Option<PathBuf>,
    /// OS account the servers run as when pgprism runs as root (PostgreSQL refuses root).
    pub os_user: String,
    /// Where the registry of running servers lives, so a later pgprism can stop what a killed
    /// one left behind. Unset: `$PGPRISM_STATE_DIR`, else `/run/pgprism` as root, else
    /// `$XDG_RUNTIME_DIR/pgprism`, else `/tmp/pgprism-<uid>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// First delay before restarting a crashed server; doubles on each further crash.
    pub restart_backoff_ms: u64,
    /// Upper bound of the restart delay.
    pub restart_backoff_max_ms: u64,
    /// Restarts allowed within `restart-window-s`; one more crash marks the instance failed.
    pub restarts_max: u32,
    /// Window the restart cap counts over.
    pub restart_window_s: u64,
    /// How often the supervisor checks whether its servers are still running.
    pub monitor_interval_ms: u64,
    /// Bound on one server's start (template copy to ready).
    pub start_timeout_ms: u64,
    /// Bound on a fast shutdown before the server is killed.
    pub stop_timeout_ms: u64,
    /// Upgrade of a `pgprism run` (SIGUSR2): how long the new process waits for the old one
    /// to let go of its servers (it may be in the middle of starting one) before it adopts
    /// them all the same.
    pub handover_timeout_ms: u64,
    /// The servers to run.
    pub instance: Vec<EmbedInstanceConfig>,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            bindir: None,
            os_user: "postgres".into(),
            state_dir: None,
            restart_backoff_ms: 200,
            restart_backoff_max_ms: 10_000,
            restarts_max: 5,
            restart_window_s: 60,
            monitor_interval_ms: 100,
            start_timeout_ms: 30_000,
            stop_timeout_ms: 10_000,
            handover_timeout_ms: 60_000,
            instance: Vec::new(),
        }
    }
}

/// One `[[embed.instance]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmbedInstanceConfig {
    /// Unique name: letters, digits, `_` and `-`, at most 32 characters.
    pub name: String,
    /// `listen_addresses` of the server.
    pub host: String,
    /// TCP port; 0 picks a free one (kept across restarts).
    pub port: u16,
    /// `memory` (tmpfs, fsync off, gone on stop) or a directory (persistent).
    pub data: String,
    /// Database superuser. Over TCP it authenticates with scram-sha-256 and this password;
    /// through the server's Unix socket (in the data directory, mode 0700) without one.
    pub user: String,
    /// The superuser's password for TCP connections. Empty: generated (a directory keeps its
    /// own across restarts). Either way it is written to `pgpass` in the data directory
    /// (mode 0600, libpq's passfile format: `PGPASSFILE=DATA/pgpass psql ...`).
    pub password: String,
    /// Database created at first start when missing.
    pub database: String,
    /// Extra `postgresql.conf` settings; they win over pgprism's defaults.
    pub settings: BTreeMap<String, toml::Value>,
}

impl Default for EmbedInstanceConfig {
    fn default() -> Self {
        EmbedInstanceConfig {
            name: String::new(),
            host: "127.0.0.1".into(),
            port: 0,
            data: EMBED_DATA_MEMORY.into(),
            user: "postgres".into(),
            password: String::new(),
            database: "postgres".into(),
            settings: BTreeMap::new(),
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
    /// Fill them from the `REPLICA IDENTITY FULL` old row. An UPDATE without it (a table whose
    /// replica identity is not FULL) is handled as with `partial`, except that with
    /// `replica-identity-full = true` `fill-rows` is off: the row loads as a partial update,
    /// which ends the StarRocks transaction there.
    FullRow,
    /// Without the old row: `fill-rows` fills them (from the flush cycle's own rows, else
    /// from StarRocks); with `fill-rows = false`, a partial update listing only the columns
    /// present, which ends the StarRocks transaction there.
    Partial,
}

/// What becomes of a text value that is not UTF-8 (`cdc.non-utf8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcNonUtf8 {
    /// Stop with an error naming the table, the column and the LSN; nothing past it is
    /// checkpointed, so a restart after the data (or this setting) changed loses nothing.
    Fail,
    /// Load it with every invalid byte sequence replaced by U+FFFD (counted and warned): the
    /// row arrives, that value changed. Two keys that differ only in such bytes become one
    /// StarRocks row.
    Replace,
}

/// How initial-snapshot chunks are read from PostgreSQL and loaded into StarRocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcSnapshotFormat {
    /// `COPY (SELECT ...) TO STDOUT` in CSV, passed to Stream Load as it comes (`format:
    /// csv`): only the key columns are parsed. A table with a boolean key, and a chunk
    /// holding the text `\N` (StarRocks' NULL in CSV), are loaded as JSON instead.
    Csv,
    /// A `SELECT`, each row written as a JSON object (`format: json`), as the stream does.
    Json,
}

/// How initial-snapshot chunks divide a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcSnapshotChunking {
    /// Ranges of heap pages (`ctid`), each read by a TID Range Scan in physical order with
    /// no index (PostgreSQL 14 and later; a partitioned table, or an older server, is read
    /// by `key`). About a fifth less PostgreSQL CPU per row than reads in key order. A row an
    /// UPDATE moves to a page already read is in no chunk: the stream carries it, and a
    /// change that left a TOAST value out is read again by key before the table counts as
    /// copied (`snapshot-partial-keys-max`). A table rewritten during its snapshot (VACUUM
    /// FULL, CLUSTER, a rewriting ALTER TABLE, TRUNCATE) is copied again from its start.
    Ctid,
    /// Primary-key ranges, each chunk read in key order by the primary key's index.
    Key,
}

/// How loads are grouped into StarRocks transactions (the Stream Load transaction interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcTransactionMode {
    /// One StarRocks transaction per flush cycle across every table (StarRocks 4.0 and
    /// later): a source transaction that changed several tables becomes visible at once.
    MultiTable,
    /// One StarRocks transaction per table per flush cycle (StarRocks 2.4 to 3.x): each
    /// table's share of a source transaction is all or nothing, but two tables become
    /// visible one after the other.
    PerTable,
    /// Plain Stream Load, one load per batch (any StarRocks): a batch is all or nothing.
    None,
}

/// What a column change in a source table does to the StarRocks table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcSchemaChanges {
    /// Add added columns, widen widened ones and drop dropped ones, before the first row
    /// that needs it loads.
    Apply,
    /// Change nothing in StarRocks; the source's columns are sent as they are.
    Ignore,
    /// Stop the stream at a change, naming it.
    Fail,
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
    /// StarRocks FE query (MySQL protocol) port: applies a TRUNCATE, alters columns
    /// (`schema-changes`), and reads the values `fill-rows` completes partial changes with
    /// (`SELECT` on the target tables).
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
    /// Let setup turn on `publish_via_partition_root` on an existing publication that
    /// publishes a partitioned table of `tables` without it. Off: setup stops, naming the
    /// statement to run. The option changes what every consumer of the publication receives
    /// (another subscriber may lose or duplicate rows), and covers only changes made after
    /// it: see "Partitioned tables" in docs/cdc.md.
    pub publication_set_via_root: bool,
    /// Table in the source database that holds the confirmed LSN per slot.
    pub checkpoint_table: String,
    /// Set `REPLICA IDENTITY FULL` on the tables during setup: whole old rows then fill
    /// unchanged TOAST values and soft deletes (with `toast-mode = "full-row"`); without it,
    /// `fill-rows` does, reading StarRocks where the flush cycle has not the values.
    pub replica_identity_full: bool,
    pub delete_mode: CdcDeleteMode,
    pub toast_mode: CdcToastMode,
    /// Make partial changes whole rows before they load, so that they never end a StarRocks
    /// transaction inside a source transaction: a TOAST value an UPDATE left unchanged, or
    /// the columns of a soft delete without the whole old row, take the value the flush
    /// cycle wrote for that key before, else the one StarRocks holds (read over the FE query
    /// port before the batch loads). Off: such rows load as partial updates, each ending
    /// the StarRocks transaction there. Nothing is kept where whole old rows always come
    /// (`replica-identity-full` with `toast-mode = "full-row"`).
    pub fill_rows: bool,
    /// Bytes of the current flush cycle's row values kept for `fill-rows` (the columns that
    /// can be left out, per key written in the cycle); beyond it the cycle's later partial
    /// changes load as partial updates (counted in `fill.overflows`).
    pub fill_bytes_max: usize,
    /// Commits still publishing (StarRocks answered `publish timeout`) remembered so that
    /// `fill-rows` reads values only once they are visible. Each commit that adds one drops
    /// those already visible; beyond this many the loader waits for the oldest (up to
    /// `load-timeout-ms`, then the cycle is loaded again from the checkpoint).
    pub publishing_labels_max: usize,
    /// A text value that is not UTF-8 (a `SQL_ASCII` database sends its bytes as stored;
    /// StarRocks' JSON and CSV loaders take UTF-8): `fail` stops CDC with an error naming
    /// the table, the column and the LSN (or the snapshot chunk), nothing checkpointed past
    /// it; `replace` loads it with each invalid sequence replaced by U+FFFD, counted
    /// (`non_utf8_values_replaced`) and warned once per column.
    pub non_utf8: CdcNonUtf8,
    /// Add the audit columns (`op_type`, `is_deleted`, `synced_at`, `cdc_version`) to every row.
    pub audit_columns: bool,
    /// Prefix of the audit column names.
    pub audit_prefix: String,
    /// Copy the tables' current content when the slot is created (the default); the copy
    /// runs beside streaming in primary-key chunks and resumes after a restart.
    pub snapshot: bool,
    /// Rows per snapshot chunk (one primary-key range, one SELECT between two watermarks).
    pub snapshot_chunk_rows: usize,
    /// Connections copying snapshot chunks in parallel.
    pub snapshot_workers: usize,
    /// Chunks a snapshot worker reads ahead while the stream has not yet taken the ones it
    /// read before (each held in memory until its high watermark comes through the stream).
    pub snapshot_chunks_in_flight: usize,
    /// Bytes of rows at which a snapshot chunk is cut (it ends at its last row kept, and the
    /// next starts there); the rows per read then follow the rows' width, so a chunk held in
    /// memory stays near this bound however wide the rows. A snapshot keeps at most
    /// `snapshot-workers` x (`snapshot-chunks-in-flight` + 1) + `ring-capacity` + 2 chunk
    /// bodies (20 by default), reused chunk after chunk, so its memory stays below that many
    /// times this bound (640 MiB by default, reached only by rows wide enough to cut chunks
    /// by bytes; lower it on a small machine).
    pub snapshot_chunk_bytes_max: usize,
    /// Microseconds a snapshot worker lets PostgreSQL's rows pile up in the socket after a
    /// read that returned less than 32 KiB, before reading again (one read then takes many
    /// of PostgreSQL's 8 KiB writes instead of one wake-up per write); 0 reads at once.
    /// At most 100,000. Only the snapshot workers' connections wait; the stream never does.
    pub snapshot_read_coalesce_us: u64,
    /// Not used since chunks are no longer planned one at a time (a table's key ranges come
    /// from a sample when its snapshot starts); accepted so that configuration files that
    /// set it still load.
    pub snapshot_chunks_planned_ahead: usize,
    /// Attempts per snapshot chunk (a chunk is read again when its watermark window cannot
    /// be trusted) before the snapshot fails; also the most rounds of reading partial keys
    /// again per table, and the most times a table rewritten during its ctid snapshot is
    /// copied again from its start in one run.
    pub snapshot_chunk_attempts_max: u32,
    /// Changed keys remembered per open watermark window; beyond it the chunk is read again.
    pub snapshot_window_keys_max: usize,
    /// How snapshot chunks are read and loaded: `csv` (COPY in CSV, passed through) or
    /// `json` (a SELECT, each row encoded as JSON like the stream's).
    pub snapshot_format: CdcSnapshotFormat,
    /// How snapshot chunks divide a table: `ctid` (ranges of heap pages, PostgreSQL 14 and
    /// later) or `key` (primary-key ranges).
    pub snapshot_chunking: CdcSnapshotChunking,
    /// Keys remembered per table whose change, while the table's snapshot copies, left an
    /// unchanged TOAST value out (read again by key before the table counts as copied, and
    /// kept in the chunk table across restarts), whichever `snapshot-chunking`; beyond it the
    /// snapshot stops with an error naming the table, and the next run copies that table
    /// again from its start (raise this first; `REPLICA IDENTITY FULL` with
    /// `toast-mode = "full-row"` makes such changes whole, so they owe no key).
    pub snapshot_partial_keys_max: usize,
    /// Flush a table's batch when it holds this many rows.
    pub flush_rows: usize,
    /// Flush a table's batch when its JSON body reaches this many bytes.
    pub flush_bytes: usize,
    /// Flush everything at the next transaction boundary after this long.
    pub flush_interval_ms: u64,
    /// Batches queued between the source and the loader (backpressure beyond it).
    pub ring_capacity: usize,
    /// Bytes of streamed, not yet committed transactions kept in memory; beyond it the
    /// largest goes to a spill file.
    pub stream_buffer_bytes_max: usize,
    /// Directory of the spill files (`""`: `pgprism-spill` in the system temporary directory).
    pub spill_dir: String,
    /// Bytes of spill files at most; beyond it the stream stops with an error (nothing is
    /// confirmed past the transaction, so a restart with a higher bound goes on).
    pub spill_bytes_max: u64,
    /// Stream Load `max_filter_ratio`; 0 means a filtered row fails the load.
    pub max_filter_ratio: f64,
    /// How loads are grouped into StarRocks transactions.
    pub transaction_mode: CdcTransactionMode,
    /// What a column change in a source table does in StarRocks.
    pub schema_changes: CdcSchemaChanges,
    /// Create missing StarRocks tables as Primary Key tables from the source's definition.
    pub create_tables: bool,
    /// Longest wait for a StarRocks schema change job (ALTER TABLE runs asynchronously).
    pub schema_change_timeout_ms: u64,
    /// Attempts per Stream Load before giving up (same label each time).
    pub load_attempts_max: u32,
    /// First retry delay; doubles per attempt up to `load-backoff-ms-max`.
    pub load_backoff_ms: u64,
    /// Longest retry delay between Stream Load attempts.
    pub load_backoff_ms_max: u64,
    /// Timeout of one Stream Load HTTP exchange.
    pub load_timeout_ms: u64,
    /// StarRocks transaction timeout, sent (in whole seconds, rounded up) with each begin as
    /// `timeout` (a transaction not prepared within it is aborted by the FE) and
    /// `idle_transaction_timeout` (one that received no load for that long is rolled back).
    /// A flush cycle must load and prepare within it; an aborted one is loaded again from the
    /// checkpoint.
    pub transaction_timeout_ms: u64,
    /// Timeout to connect to PostgreSQL and for setup queries.
    pub connect_timeout_ms: u64,
    /// Standby status update interval (also answers keepalives earlier when asked).
    pub status_interval_ms: u64,
    /// Reconnects in a row after a lost PostgreSQL connection before giving up (the count
    /// resets after a minute of streaming); 0 exits on the first loss.
    pub reconnect_attempts_max: u32,
    /// Upgrade of a `pgprism run` (SIGUSR2): how long the old process waits for its CDC to
    /// stop (the cycle under way loaded and checkpointed, the replication connection closed),
    /// and how long the new process waits for that and then for the replication slot to be
    /// free before it starts CDC from the checkpoint (past it, it starts all the same and
    /// PostgreSQL refuses a second reader of an active slot).
    pub handover_timeout_ms: u64,
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
            publication_set_via_root: false,
            checkpoint_table: "pgprism_cdc_checkpoint".into(),
            replica_identity_full: true,
            delete_mode: CdcDeleteMode::Hard,
            toast_mode: CdcToastMode::FullRow,
            fill_rows: true,
            fill_bytes_max: 64 << 20,
            publishing_labels_max: 256,
            non_utf8: CdcNonUtf8::Fail,
            audit_columns: false,
            audit_prefix: "pgprism_".into(),
            snapshot: true,
            snapshot_chunk_rows: 200_000,
            snapshot_workers: 2,
            snapshot_chunks_in_flight: 4,
            snapshot_chunk_bytes_max: 32 << 20,
            snapshot_read_coalesce_us: 500,
            snapshot_chunks_planned_ahead: 2,
            snapshot_chunk_attempts_max: 5,
            snapshot_window_keys_max: 1_000_000,
            snapshot_format: CdcSnapshotFormat::Csv,
            snapshot_chunking: CdcSnapshotChunking::Ctid,
            snapshot_partial_keys_max: 100_000,
            flush_rows: 50_000,
            flush_bytes: 32 << 20,
            flush_interval_ms: 1_000,
            ring_capacity: 8,
            stream_buffer_bytes_max: 64 << 20,
            spill_dir: String::new(),
            spill_bytes_max: 64 << 30,
            max_filter_ratio: 0.0,
            transaction_mode: CdcTransactionMode::MultiTable,
            schema_changes: CdcSchemaChanges::Apply,
            create_tables: false,
            schema_change_timeout_ms: 1_800_000,
            load_attempts_max: 10,
            load_backoff_ms: 100,
            load_backoff_ms_max: 10_000,
            load_timeout_ms: 600_000,
            transaction_timeout_ms: 600_000,
            connect_timeout_ms: 10_000,
            status_interval_ms: 1_000,
            reconnect_attempts_max: 10,
            handover_timeout_ms: 60_000,
        }
    }
}

/// The `data` value that means "in RAM".
pub const EMBED_DATA_MEMORY: &str = "memory";
/// Longest instance name: it ends up in file names, URLs and socket paths.
const EMBED_NAME_BYTES_MAX: usize = 32;

impl EmbedInstanceConfig {
    /// Settings as `postgresql.conf` strings (TOML numbers and booleans are written as is).
    pub fn settings_text(&self) -> Vec<(String, String)> {
        self.settings
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
                    other => other.to_string(),
                };
                (key.clone(), text)
            })
            .collect()
    }
}

impl EmbedConfig {
    /// Checks the `[embed]` section alone (`pgprism embed` needs no primary).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("embed.restart-backoff-ms", self.restart_backoff_ms),
            ("embed.restart-backoff-max-ms", self.restart_backoff_max_ms),
            ("embed.restart-window-s", self.restart_window_s),
            ("embed.monitor-interval-ms", self.monitor_interval_ms),
            ("embed.start-timeout-ms", self.start_timeout_ms),
            ("embed.stop-timeout-ms", self.stop_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "expected a value above 0"));
            }
        }
        if self.restart_backoff_max_ms < self.restart_backoff_ms {
            return Err(ConfigError::key(
                "embed.restart-backoff-max-ms",
                "expected at least embed.restart-backoff-ms",
            ));
        }
        if self.os_user.is_empty() {
            return Err(ConfigError::key("embed.os-user", "expected a user name"));
        }
        for (index, inst) in self.instance.iter().enumerate() {
            let key = |field: &str| format!("embed.instance[{index}].{field}");
            validate_instance_name(&inst.name).map_err(|m| ConfigError::key(&key("name"), m))?;
            if self.instance[..index].iter().any(|i| i.name == inst.name) {
                return Err(ConfigError::key(
                    &key("name"),
                    format!("duplicate instance name `{}`", inst.name),
                ));
            }
            if inst.port != 0
                && let Some(other) = self.instance[..index]
                    .iter()
                    .find(|i| i.port == inst.port && i.host == inst.host)
            {
                return Err(ConfigError::key(
                    &key("port"),
                    format!(
                        "port {} is already used by instance `{}`",
                        inst.port, other.name
                    ),
                ));
            }
            for (field, value) in [
                ("host", &inst.host),
                ("data", &inst.data),
                ("user", &inst.user),
                ("database", &inst.database),
            ] {
                if value.is_empty() {
                    return Err(ConfigError::key(&key(field), "expected a non-empty value"));
                }
            }
        }
        Ok(())
    }
}

/// Instance names appear in file names, URL paths and socket paths: keep them plain.
pub fn validate_instance_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > EMBED_NAME_BYTES_MAX {
        return Err(format!(
            "expected 1 to {EMBED_NAME_BYTES_MAX} characters, got `{name}`"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "expected only letters, digits, `_` and `-`, got `{name}`"
        ));
    }
    Ok(())
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
    pub fn key(path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: path.to_string(),
            message: message.into(),
        }
    }

    /// The key at `path` holds a value `error` rejects. The message is the error with its
    /// whole source chain: `Key` stays text because SIGHUP's log line and status, and
    /// `pgprism check`'s callers, print a `ConfigError` without walking its sources.
    pub fn invalid(path: &str, error: &dyn std::error::Error) -> ConfigError {
        ConfigError::key(path, error_text(error))
    }
}

/// An error with its source chain on one line (`error: cause: cause`), for messages that
/// are text by design and for log lines.
pub fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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

    /// Checks every value that serde cannot and that needs nothing beyond the config itself:
    /// ranges, addresses, URLs. What needs more (TLS files, compare's regexes and type names,
    /// the StarRocks URL) is checked where that part starts, and all of it by `pgprism check`
    /// (`server::check`): `config` is a leaf that imports no mode.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_proxy()?;
        self.validate_durations_and_counts()?;
        self.validate_metrics()?;
        self.validate_primary()?;
        self.validate_client_tls()?;
        self.admin.validate()?;
        self.validate_mirrors()?;
        self.validate_compare()?;
        self.pool.validate()?;
        self.embed.validate()
    }

    /// `[proxy]`: the listen address, the socket directory and the byte bounds.
    fn validate_proxy(&self) -> Result<(), ConfigError> {
        parse_addr("proxy.listen", &self.proxy.listen)?;
        self.validate_unix_socket_dir()?;
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
        if !(4096..=(64 << 20)).contains(&self.proxy.send_queue_bytes) {
            return Err(ConfigError::key(
                "proxy.send-queue-bytes",
                "expected between 4096 and 67108864 bytes",
            ));
        }
        if !(1..=100).contains(&self.proxy.pack_busy_pct) {
            return Err(ConfigError::key(
                "proxy.pack-busy-pct",
                "expected a percentage between 1 and 100",
            ));
        }
        if self.proxy.pack_client_permille > 1000 {
            return Err(ConfigError::key(
                "proxy.pack-client-permille",
                "expected at most 1000 (thousandths of a core)",
            ));
        }
        if !(1..=1 << 20).contains(&self.proxy.handover_queue_max) {
            return Err(ConfigError::key(
                "proxy.handover-queue-max",
                "expected between 1 and 1048576 connections",
            ));
        }
        if self.proxy.rebalance_clients_max > 1 << 20 {
            return Err(ConfigError::key(
                "proxy.rebalance-clients-max",
                "expected at most 1048576 clients",
            ));
        }
        if self.proxy.ring_batch_wait_us > RING_BATCH_WAIT_US_MAX {
            return Err(ConfigError::key(
                "proxy.ring-batch-wait-us",
                format!("expected at most {RING_BATCH_WAIT_US_MAX} microseconds"),
            ));
        }
        Ok(())
    }

    /// The timeouts and per-shard counts that must not be 0.
    fn validate_durations_and_counts(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("proxy.startup-timeout-ms", self.proxy.startup_timeout_ms),
            ("proxy.connect-timeout-ms", self.proxy.connect_timeout_ms),
            ("proxy.upgrade-timeout-ms", self.proxy.upgrade_timeout_ms),
            (
                "proxy.shard-start-timeout-ms",
                self.proxy.shard_start_timeout_ms,
            ),
            (
                "metrics.report-interval-ms",
                self.metrics.report_interval_ms,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "expected a duration above 0 ms"));
            }
        }
        for (key, value) in [
            (
                "proxy.sessions-per-shard-max",
                self.proxy.sessions_per_shard_max,
            ),
            ("proxy.session-names-max", self.proxy.session_names_max),
            (
                "proxy.session-settings-max",
                self.proxy.session_settings_max,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "expected at least 1"));
            }
        }
        Ok(())
    }

    fn validate_metrics(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    fn validate_primary(&self) -> Result<(), ConfigError> {
        // A file may configure only embedded servers or only CDC; then no proxy runs and no
        // primary is needed. Mirrors and a shadow need one.
        let proxy_needed = !self.mirror.is_empty()
            || !self.shadow.url.is_empty()
            || (self.embed.instance.is_empty() && self.cdc.source.is_empty());
        if self.primary.url.is_empty() && proxy_needed {
            return Err(ConfigError::key(
                "primary.url",
                "required: the primary's postgres://host:port URL",
            ));
        }
        if !self.primary.url.is_empty() {
            self.primary
                .url
                .parse::<PgUrl>()
                .map_err(|e| ConfigError::invalid("primary.url", &e))?;
        }
        Ok(())
    }

    /// The mode, and a certificate and key whenever it is not `disable`.
    fn validate_client_tls(&self) -> Result<(), ConfigError> {
        if self.client_tls.effective_mode()? != ClientTlsMode::Disable {
            if self.client_tls.cert_file.is_empty() {
                return Err(ConfigError::key(
                    "client-tls.cert-file",
                    "required when client-tls.mode is allow or require",
                ));
            }
            if self.client_tls.key_file.is_empty() {
                return Err(ConfigError::key(
                    "client-tls.key-file",
                    "required with client-tls.cert-file",
                ));
            }
        }
        Ok(())
    }

    /// Every `[[mirror]]`, in order, and that their names are distinct.
    fn validate_mirrors(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.mirror.iter().enumerate() {
            validate_mirror(i, m)?;
            if !names.insert(self.mirror_name(i)) {
                return Err(ConfigError::key(
                    &format!("mirror[{i}].name"),
                    "duplicate mirror name",
                ));
            }
        }
        Ok(())
    }

    fn validate_unix_socket_dir(&self) -> Result<(), ConfigError> {
        let dir = &self.proxy.unix_socket_dir;
        let key = "proxy.unix-socket-dir";
        if dir.is_empty() {
            return Ok(());
        }
        if !dir.starts_with('/') || dir.contains('\0') {
            return Err(ConfigError::key(
                key,
                format!("expected an absolute directory path, got `{dir}`"),
            ));
        }
        // The longest socket file name it can get, whatever the port.
        let longest = socket_file(dir, u16::MAX);
        if longest.as_os_str().len() > SOCKET_PATH_BYTES_MAX {
            return Err(ConfigError::key(
                key,
                format!(
                    "{} would be longer than the {SOCKET_PATH_BYTES_MAX} bytes a socket path may have",
                    longest.display()
                ),
            ));
        }
        Ok(())
    }

    fn validate_compare(&self) -> Result<(), ConfigError> {
        if self.shadow.url.is_empty() {
            return Ok(());
        }
        self.shadow
            .url
            .parse::<PgUrl>()
            .map_err(|e| ConfigError::invalid("shadow.url", &e))?;
        if self.pool.mode == PoolMode::Transaction && self.pool.shared_depth_max > 1 {
            // A compared session relays the primary's answers to its client through compare's
            // pump, sync point by sync point; a shared connection's answers are split among
            // its clients by the pipeline's own task, which that pump does not stand in.
            // Refused rather than silently not compared.
            return Err(ConfigError::key(
                "pool.shared-depth-max",
                "compare mode (shadow.url) does not work with pipelined lending (pool.shared-depth-max above 1): set it to 1 to compare in transaction mode",
            ));
        }
        let c = &self.compare;
        if !c.primary_only_patterns.is_empty() && c.source_of_truth == SourceOfTruth::Shadow {
            return Err(ConfigError::key(
                "compare.primary-only-patterns",
                "needs source-of-truth = primary (the client must get every answer from one side)",
            ));
        }
        if !(c.float_tolerance >= 0.0 && c.float_tolerance.is_finite()) {
            return Err(ConfigError::key(
                "compare.float-tolerance",
                "expected a finite value of at least 0",
            ));
        }
        if c.timestamp_tolerance_ms > TIMESTAMP_TOLERANCE_MS_MAX {
            return Err(ConfigError::key(
                "compare.timestamp-tolerance-ms",
                "expected at most 86400000 (one day)",
            ));
        }
        if c.slow_query_ratio.is_nan() || c.slow_query_ratio < 1.0 {
            return Err(ConfigError::key(
                "compare.slow-query-ratio",
                "expected a ratio of at least 1.0",
            ));
        }
        for (key, value) in [
            ("compare.buffer-bytes-max", c.buffer_bytes_max),
            ("compare.shadow-queue-bytes-max", c.shadow_queue_bytes_max),
            ("compare.report-queue-max", c.report_queue_max),
            ("compare.statement-bytes-max", c.statement_bytes_max),
            ("compare.connect-timeout-ms", c.connect_timeout_ms as usize),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "expected a value above 0"));
            }
        }
        // A file smaller than a page would rotate on nearly every report.
        if c.report_bytes_max < REPORT_BYTES_MIN {
            return Err(ConfigError::key(
                "compare.report-bytes-max",
                format!("expected at least {REPORT_BYTES_MIN} bytes"),
            ));
        }
        // Each rotation renames every kept file, on the control thread.
        if !(1..=REPORT_FILES_MAX).contains(&c.report_files_max) {
            return Err(ConfigError::key(
                "compare.report-files-max",
                format!("expected 1 to {REPORT_FILES_MAX} rotated files"),
            ));
        }
        Ok(())
    }

    /// The name of mirror `i`: configured, or `mirror-<i+1>`.
    pub fn mirror_name(&self, i: usize) -> String {
        match self.mirror.get(i) {
            Some(m) if !m.name.is_empty() => m.name.clone(),
            _ => format!("mirror-{}", i + 1),
        }
    }

    /// The configuration as TOML, the way `pgprism check` prints it. Passwords in URLs are
    /// masked so the output can be pasted into a ticket.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.primary.url = shown
            .primary
            .url
            .parse::<PgUrl>()
            .map(|u| u.masked())
            .unwrap_or(shown.primary.url);
        if let Ok(u) = shown.shadow.url.parse::<PgUrl>() {
            shown.shadow.url = u.masked();
        }
        for m in &mut shown.mirror {
            if let Ok(u) = m.url.parse::<PgUrl>() {
                m.url = u.masked();
            }
        }
        if let Ok(u) = shown.cdc.source.parse::<PgUrl>() {
            shown.cdc.source = u.masked();
        }
        shown.cdc.starrocks = mask_http_password(&shown.cdc.starrocks);
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

/// One `[[mirror]]`'s URL and bounds; errors name `mirror[i].<key>`.
fn validate_mirror(i: usize, m: &MirrorConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("mirror[{i}].{field}");
    if m.url.is_empty() {
        return Err(ConfigError::key(
            &key("url"),
            "required: postgres://user:password@host:port/db",
        ));
    }
    m.url
        .parse::<PgUrl>()
        .map_err(|e| ConfigError::invalid(&key("url"), &e))?;
    if !(0.0..=1.0).contains(&m.sample) {
        return Err(ConfigError::key(
            &key("sample"),
            "expected a fraction from 0.0 to 1.0",
        ));
    }
    if m.queue_messages_max == 0 || m.queue_bytes_max < 1024 {
        return Err(ConfigError::key(
            &key("queue-messages-max"),
            "expected at least 1 message and queue-bytes-max of at least 1024",
        ));
    }
    if m.in_flight_messages_max == 0 {
        return Err(ConfigError::key(
            &key("in-flight-messages-max"),
            "expected at least 1 statement awaiting its answer",
        ));
    }
    for (field, v) in [
        ("timeout-ms", m.timeout_ms),
        ("retry-delay-ms", m.retry_delay_ms),
        ("connect-timeout-ms", m.connect_timeout_ms),
    ] {
        if v == 0 {
            return Err(ConfigError::key(
                &key(field),
                "expected a duration above 0 ms",
            ));
        }
    }
    if m.pool_batch_wait_us > POOL_BATCH_WAIT_US_MAX {
        return Err(ConfigError::key(
            &key("pool-batch-wait-us"),
            "expected at most 1000000 (1 s): a unit waits this long at most before it is written",
        ));
    }
    if m.latency_sample_every == 0 {
        return Err(ConfigError::key(
            &key("latency-sample-every"),
            "expected 1 (time every write's statements) or more",
        ));
    }
    if m.retry_delay_max_ms < m.retry_delay_ms {
        return Err(ConfigError::key(
            &key("retry-delay-max-ms"),
            "expected at least retry-delay-ms",
        ));
    }
    Ok(())
}

/// The longest `mirror[].pool-batch-wait-us`.
const POOL_BATCH_WAIT_US_MAX: u64 = 1_000_000;

/// `http://user:secret@host` → `http://user:***@host`.
fn mask_http_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
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
    #[test]
    fn compare_with_transaction_pooling_needs_one_client_per_connection() {
        let base = "[primary]\nurl = \"postgres://127.0.0.1:5432\"\n[shadow]\nurl = \"postgres://127.0.0.1:5433\"\n[pool]\nmode = \"transaction\"\n";
        Config::parse(base).unwrap().validate().unwrap();
        let cfg = Config::parse(&format!("{base}shared-depth-max = 4\n")).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("pool.shared-depth-max"), "{err}");
    }

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
        cfg.proxy.send_queue_bytes = 100;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("proxy.send-queue-bytes"), "{err}");
        cfg.proxy.send_queue_bytes = 65536;
        cfg.proxy.ring_batch_wait_us = 1001;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("proxy.ring-batch-wait-us"), "{err}");
        cfg.proxy.ring_batch_wait_us = 1000;
        cfg.validate().unwrap();
        cfg.proxy.listen = "nowhere".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("proxy.listen"), "{err}");
    }

    #[test]
    fn unix_socket_dir_is_checked_and_shown() {
        let base = "[primary]\nurl = \"postgres://u@%2Frun%2Fpostgresql:5432/db\"\n";
        let cfg = Config::parse(&format!("{base}[proxy]\nunix-socket-dir = \"/tmp\"\n")).unwrap();
        cfg.validate().unwrap();
        let shown = cfg.to_toml();
        assert!(shown.contains("unix-socket-dir = \"/tmp\""), "{shown}");
        assert!(shown.contains("%2Frun%2Fpostgresql:5432"), "{shown}");
        assert_eq!(Config::parse(&shown).unwrap().proxy.unix_socket_dir, "/tmp");
        for bad in ["tmp", &format!("/{}", "x".repeat(100))] {
            let cfg =
                Config::parse(&format!("{base}[proxy]\nunix-socket-dir = \"{bad}\"\n")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("proxy.unix-socket-dir"), "{err}");
        }
        let cfg = Config::parse("[primary]\nurl = \"postgres:///db?host=/tmp&port=x\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("primary.url"), "{err}");
    }

    #[test]
    fn embed_section_parses_and_validates() {
        let cfg = Config::parse(
            "[embed]\nrestarts-max = 3\n[[embed.instance]]\nname = \"a\"\nport = 5433\n\
             settings = { work_mem = \"8MB\", max_connections = 50, fsync = true }\n\
             [[embed.instance]]\nname = \"b\"\nport = 5434\ndata = \"/var/lib/b\"\n",
        )
        .unwrap();
        cfg.embed.validate().unwrap();
        assert_eq!(cfg.embed.restarts_max, 3);
        assert_eq!(cfg.embed.instance.len(), 2);
        assert_eq!(cfg.embed.instance[0].data, "memory");
        assert_eq!(
            cfg.embed.instance[0].settings_text(),
            vec![
                ("fsync".to_string(), "on".to_string()),
                ("max_connections".to_string(), "50".to_string()),
                ("work_mem".to_string(), "8MB".to_string()),
            ]
        );
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.embed.instance[1].data, "/var/lib/b");
    }

    #[test]
    fn embed_errors_name_the_key() {
        let cfg = Config::parse(
            "[[embed.instance]]\nname = \"a\"\nport = 1\n[[embed.instance]]\nname = \"a\"\n",
        )
        .unwrap();
        let err = cfg.embed.validate().unwrap_err().to_string();
        assert!(err.contains("embed.instance[1].name"), "{err}");
        let cfg = Config::parse("[[embed.instance]]\nname = \"a/b\"\n").unwrap();
        let err = cfg.embed.validate().unwrap_err().to_string();
        assert!(err.contains("embed.instance[0].name"), "{err}");
        let cfg = Config::parse("[embed]\nrestart-backoff-ms = 0\n").unwrap();
        let err = cfg.embed.validate().unwrap_err().to_string();
        assert!(err.contains("embed.restart-backoff-ms"), "{err}");
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

    #[test]
    fn compare_section_parses_and_validates() {
        let base = "[primary]\nurl = \"postgres://127.0.0.1:5432\"\n[shadow]\nurl = \"postgres://u:p@127.0.0.1:5433/db\"\n";
        let cfg = Config::parse(&format!(
            "{base}[compare]\nsource-of-truth = \"shadow\"\nfail-on-differences = true\n\
             float-tolerance = 0.01\ntype-equivalences = [\"int8=numeric\"]\n\
             ignore-columns = [\"^updated_at$\"]\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.compare.source_of_truth, SourceOfTruth::Shadow);
        assert!(!cfg.to_toml().contains(":p@"));
        let bad = Config::parse(&format!(
            "{base}[compare]\nsource-of-truth = \"shadow\"\nprimary-only-patterns = [\"pg_catalog\"]\n"
        ))
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("compare.primary-only-patterns"), "{err}");
        for (key, value) in [
            ("report-bytes-max", "4095"),
            ("report-files-max", "0"),
            ("report-files-max", "1001"),
        ] {
            let bad = Config::parse(&format!("{base}[compare]\n{key} = {value}\n")).unwrap();
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("compare.{key}")), "{err}");
        }
        let ok = Config::parse(&format!(
            "{base}[compare]\nreport-bytes-max = 4096\nreport-files-max = 1\n"
        ))
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.compare.report_bytes_max, 4096);
    }
}
