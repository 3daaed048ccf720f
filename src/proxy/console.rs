//! The admin console: a client of the virtual database `pgbouncer` or `pgprism` gets
//! PgBouncer 1.18's console instead of a primary connection, so that pgbouncer exporters and
//! runbooks written for PgBouncer work unchanged. This module owns the console's grammar
//! ([`parse`]), who may run what ([`allowed`]), the result sets with PgBouncer 1.18's column
//! names and types ([`render`]), and the session loop after login ([`serve`]).
//!
//! It must never touch a pool, a shard or a session directly: it reads snapshots and asks for
//! changes through [`ConsoleView`], which the session code implements. Rendering is sans-IO;
//! only [`serve`] reads and writes, with every frame bounded by `message_bytes_max`.
//!
//! Ground truth for names, types, tags and error texts is PgBouncer 1.18.0 (Debian 12) itself,
//! queried over the wire. Where pgprism differs, the item says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;

use crate::config::{
    AuthType, ClientTlsConfig, ClientTlsMode, Config, PgUrl, PoolConfig, PoolMode,
};
use crate::exec::net::Stream;
use crate::mirror::MirrorReport;
use crate::stats::Counters;
use crate::stats::pools::{ClientRow, PoolRow, ServerRow, ShardPools};
use crate::wire::encode::{self, ErrorSpec};
use crate::wire::{
    FieldDescription, Format, Frame, FrontendMessage, TransactionStatus, WireError, split_message,
    sqlstate,
};

/// The virtual databases that lead to the console.
pub const CONSOLE_DATABASES: [&str; 2] = ["pgbouncer", "pgprism"];

/// The PgBouncer release whose console this one speaks (columns, tags, error texts).
pub const PGBOUNCER_VERSION: &str = "1.18.0";

/// Longest stretch of a rejected query quoted back in "invalid command" (PgBouncer formats
/// its errors into 1 KiB).
const QUOTED_BYTES_MAX: usize = 1000;

/// How often [`serve`] looks at the pool snapshots while a PAUSE waits for its servers.
const PAUSE_POLL: Duration = Duration::from_millis(20);

/// PgBouncer's pool size for its admin database (fixed there, reported in SHOW DATABASES).
const CONSOLE_POOL_SIZE: u64 = 2;

/// Whether `database` is one of the console's virtual databases (exact match, as PgBouncer).
pub fn is_console_database(database: &str) -> bool {
    CONSOLE_DATABASES.contains(&database)
}

// ------------------------------------------------------------------------------------------
// Commands
// ------------------------------------------------------------------------------------------

/// What `SHOW` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Help,
    Pools,
    Clients,
    Servers,
    Stats,
    StatsTotals,
    StatsAverages,
    Totals,
    Databases,
    Config,
    Lists,
    Version,
    Users,
    /// pgprism's own: one row per mirror.
    Mirrors,
    /// pgprism's own: compare mode's counters (no row when compare mode is off).
    Compare,
}

impl Show {
    fn from_word(word: &str) -> Option<Show> {
        const WORDS: [(&str, Show); 15] = [
            ("help", Show::Help),
            ("pools", Show::Pools),
            ("clients", Show::Clients),
            ("servers", Show::Servers),
            ("stats", Show::Stats),
            ("stats_totals", Show::StatsTotals),
            ("stats_averages", Show::StatsAverages),
            ("totals", Show::Totals),
            ("databases", Show::Databases),
            ("config", Show::Config),
            ("lists", Show::Lists),
            ("version", Show::Version),
            ("users", Show::Users),
            ("mirrors", Show::Mirrors),
            ("compare", Show::Compare),
        ];
        WORDS
            .iter()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
            .map(|(_, show)| *show)
    }
}

/// Session parameters some drivers read or set on any connection: PgBouncer answers `SHOW`
/// of them with a fixed value and ignores `SET` of them (with a notice).
const FAKE_PARAMS: [(&str, &str); 6] = [
    ("client_encoding", "UTF-8"),
    ("default_transaction_isolation", "read committed"),
    ("standard_conforming_strings", "on"),
    ("datestyle", "ISO"),
    ("timezone", "GMT"),
    ("extra_float_digits", "2"),
];

fn fake_param(name: &str) -> Option<(&'static str, &'static str)> {
    FAKE_PARAMS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .copied()
}

/// One console statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    /// `SHOW client_encoding` and the like: `(name, fixed value)`.
    ShowParam(&'static str, &'static str),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    /// `KILL` without a database parses (PgBouncer answers "a database is required").
    Kill(Option<String>),
    Reload,
    Shutdown,
    /// `SET` of a session parameter: answered `SET` with the notice "SET ignored".
    SetIgnored,
    /// `SET name = value` of a configuration key, name as written (unquoted).
    Set {
        name: String,
        value: String,
    },
}

impl Command {
    /// Commands that change nothing: what `stats-users` may run.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Command::Show(_) | Command::ShowParam(..) | Command::SetIgnored
        )
    }
}

/// The query is not a console command: PgBouncer's "invalid command" (SQLSTATE 08P01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidCommand {
    query: String,
}

impl InvalidCommand {
    fn new(query: &str) -> InvalidCommand {
        let mut end = query.len().min(QUOTED_BYTES_MAX);
        while !query.is_char_boundary(end) {
            end -= 1;
        }
        InvalidCommand {
            query: query.get(..end).unwrap_or_default().to_string(),
        }
    }
}

impl fmt::Display for InvalidCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid command '{}', use SHOW HELP;", self.query)
    }
}

impl std::error::Error for InvalidCommand {}

/// A token of the console grammar (PgBouncer's regex elements).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// `[0-9a-z_]+` (any case), or a `"quoted"` identifier with `""` for a quote.
    Word {
        text: String,
        quoted: bool,
    },
    /// `'string'` with `''` for a quote.
    Str(String),
    Equals,
    Semicolon,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Splits a query into tokens; `None` for a byte the grammar has no place for.
fn tokens(query: &str) -> Option<Vec<Token>> {
    let bytes = query.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            _ if is_space(b) => i += 1,
            b'=' => {
                out.push(Token::Equals);
                i += 1;
            }
            b';' => {
                out.push(Token::Semicolon);
                i += 1;
            }
            b'"' | b'\'' => {
                let (text, next) = quoted(query, i, b)?;
                out.push(if b == b'"' {
                    Token::Word { text, quoted: true }
                } else {
                    Token::Str(text)
                });
                i = next;
            }
            _ if b.is_ascii_alphanumeric() || b == b'_' => {
                let start = i;
                while bytes
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    i += 1;
                }
                let text = query.get(start..i)?.to_string();
                out.push(Token::Word {
                    text,
                    quoted: false,
                });
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The quoted text starting at `open` (a `quote` byte), doubled quotes undone, and the index
/// after the closing quote.
fn quoted(query: &str, open: usize, quote: u8) -> Option<(String, usize)> {
    let bytes = query.as_bytes();
    let mut text = String::new();
    let mut i = open + 1;
    let mut run = i;
    loop {
        let b = *bytes.get(i)?;
        if b != quote {
            i += 1;
            continue;
        }
        text.push_str(query.get(run..i)?);
        if bytes.get(i + 1) == Some(&quote) {
            text.push(quote as char);
            i += 2;
            run = i;
        } else {
            return Some((text, i + 1));
        }
    }
}

/// Parses one console statement, as PgBouncer 1.18 does: `CMD [arg] [;]` or
/// `SET key (=|TO) value [;]`, case-insensitive, any whitespace, at most one trailing `;`.
/// Several statements in one query are refused as a whole ("invalid command"), as PgBouncer
/// refuses them.
pub fn parse(query: &str) -> Result<Command, InvalidCommand> {
    let invalid = || InvalidCommand::new(query);
    let mut toks = tokens(query).ok_or_else(invalid)?;
    if toks.last() == Some(&Token::Semicolon) {
        toks.pop();
    }
    match toks.as_slice() {
        [
            Token::Word {
                text: set,
                quoted: false,
            },
            rest @ ..,
        ] if set.eq_ignore_ascii_case("set") => parse_set(rest).ok_or_else(invalid),
        [Token::Word { text: cmd, .. }] => command(cmd, None).ok_or_else(invalid),
        [Token::Word { text: cmd, .. }, Token::Word { text: arg, .. }] => {
            command(cmd, Some(arg)).ok_or_else(invalid)
        }
        _ => Err(invalid()),
    }
}

fn parse_set(rest: &[Token]) -> Option<Command> {
    let (name, value) = match rest {
        [Token::Word { text: name, .. }, op, value] if is_assign(op) => (name, value),
        _ => return None,
    };
    let value = match value {
        Token::Word { text, .. } | Token::Str(text) => text.clone(),
        _ => return None,
    };
    if fake_param(name).is_some() {
        return Some(Command::SetIgnored);
    }
    Some(Command::Set {
        name: name.clone(),
        value,
    })
}

fn is_assign(token: &Token) -> bool {
    match token {
        Token::Equals => true,
        Token::Word {
            text,
            quoted: false,
        } => text.eq_ignore_ascii_case("to"),
        _ => false,
    }
}

fn command(cmd: &str, arg: Option<&String>) -> Option<Command> {
    let is = |word: &str| cmd.eq_ignore_ascii_case(word);
    let db = || arg.cloned();
    Some(match () {
        () if is("show") => {
            let arg = arg?;
            match Show::from_word(arg) {
                Some(show) => Command::Show(show),
                None => {
                    let (name, value) = fake_param(arg)?;
                    Command::ShowParam(name, value)
                }
            }
        }
        () if is("pause") => Command::Pause(db()),
        () if is("resume") => Command::Resume(db()),
        () if is("reconnect") => Command::Reconnect(db()),
        () if is("kill") => Command::Kill(db()),
        () if is("reload") && arg.is_none() => Command::Reload,
        () if is("shutdown") && arg.is_none() => Command::Shutdown,
        () => return None,
    })
}

// ------------------------------------------------------------------------------------------
// Access
// ------------------------------------------------------------------------------------------

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `pool.admin-users`: every command.
    Admin,
    /// `pool.stats-users`: SHOW only.
    Stats,
}

impl Access {
    /// The user's rights; `None`: PgBouncer refuses the login with FATAL 08P01 "not allowed"
    /// (see [`not_allowed`]).
    pub fn of(cfg: &PoolConfig, user: &str) -> Option<Access> {
        if cfg.admin_users.iter().any(|u| u == user) {
            Some(Access::Admin)
        } else if cfg.stats_users.iter().any(|u| u == user) {
            Some(Access::Stats)
        } else {
            None
        }
    }
}

/// Whether `user` may run `command`: admin users everything, stats users what changes
/// nothing, anyone else nothing.
pub fn allowed(cfg: &PoolConfig, user: &str, command: &Command) -> bool {
    match Access::of(cfg, user) {
        Some(Access::Admin) => true,
        Some(Access::Stats) => command.is_read_only(),
        None => false,
    }
}

/// PgBouncer's answer to a login of a user who is neither an admin nor a stats user:
/// FATAL 08P01 "not allowed" (the caller then closes).
pub fn not_allowed(out: &mut BytesMut) {
    error(
        out,
        "FATAL",
        sqlstate::PROTOCOL_VIOLATION,
        "not allowed",
        None,
    );
}

/// The ParameterStatus messages PgBouncer 1.18 sends a console client after
/// AuthenticationOk. `server_version` is what drivers parse (psycopg2 reads 11800 from
/// it); `client_encoding` must be there or psycopg2 refuses the connection, and `DateStyle`
/// ISO spares a `SET datestyle` from it.
pub fn welcome(out: &mut BytesMut) {
    let version = format!("{PGBOUNCER_VERSION}/pgprism");
    for (name, value) in [
        ("server_version", version.as_str()),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "GMT"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "on"),
    ] {
        // Cannot fail: fixed names and values without NUL.
        let _ = encode::parameter_status(out, name, value);
    }
}

// ------------------------------------------------------------------------------------------
// What the console reads and asks for
// ------------------------------------------------------------------------------------------

/// A change the console asks the proxy to make. Database names are as the client wrote
/// them; the console itself refuses the admin databases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop lending connections (of one database, or all); clients wait. The console answers
    /// once the snapshots show no active server connection of those pools (bounded by
    /// `pool.query-wait-timeout-ms` as in force when it runs).
    Pause(Option<String>),
    /// Undo PAUSE. PgBouncer's errors: "pooler is not paused/suspended" (all),
    /// "database X is not paused" (one).
    Resume(Option<String>),
    /// Close server connections (of one database, or all) as they are released.
    Reconnect(Option<String>),
    /// Drop every client and server connection of a database at once.
    Kill(String),
    /// Reread the configuration file (as SIGHUP).
    Reload,
    /// Drain and exit (as SIGTERM). The console answers nothing and closes, as PgBouncer.
    Shutdown,
    /// Change a configuration key at run time (every shard's pools follow it); `key` is
    /// pgprism's key path (`pool.size`), `value` already in pgprism's units.
    Set { key: &'static str, value: SetValue },
}

/// A value of `SET`, converted to pgprism's units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetValue {
    /// Counts, and durations in milliseconds (PgBouncer's seconds × 1000).
    Number(u64),
    Text(String),
    /// `admin_users`, `stats_users`: PgBouncer's comma-separated list, split.
    Users(Vec<String>),
}

/// One mirror for `SHOW MIRRORS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorRow {
    pub name: String,
    pub sessions: u64,
    pub statements: u64,
    pub rows: u64,
    pub errors: u64,
    pub bytes: u64,
    /// Every `skipped_*` counter together.
    pub skipped: u64,
    pub transactions_cut: u64,
    pub timeouts: u64,
    pub reconnects: u64,
    pub connect_failures: u64,
    pub queue_messages: u64,
    pub queue_bytes: u64,
    pub lag_us: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
}

impl From<&MirrorReport> for MirrorRow {
    fn from(m: &MirrorReport) -> MirrorRow {
        let c = &m.counters;
        let h = &m.latency_us;
        let quantile = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        MirrorRow {
            name: m.name.clone(),
            sessions: c.sessions,
            statements: c.statements,
            rows: c.rows,
            errors: c.errors,
            bytes: c.bytes,
            skipped: c.skipped_filter
                + c.skipped_overflow
                + c.skipped_down
                + c.skipped_resync
                + c.skipped_unprepared,
            transactions_cut: c.transactions_cut,
            timeouts: c.timeouts,
            reconnects: c.reconnects,
            connect_failures: c.connect_failures,
            queue_messages: m.queue_messages,
            queue_bytes: m.queue_bytes,
            lag_us: m.lag_us,
            latency_p50_us: quantile(0.5),
            latency_p99_us: quantile(0.99),
            latency_max_us: if h.is_empty() { 0 } else { h.max() },
        }
    }
}

/// Compare mode for `SHOW COMPARE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompareRow {
    pub statements: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub slow: u64,
    pub explains: u64,
    pub fallbacks: u64,
    pub shadow_connect_failures: u64,
    pub shadow_lost: u64,
    pub shadow_timeouts: u64,
    /// Reports the control thread received, and those it could not write.
    pub reports: u64,
    pub report_write_errors: u64,
}

impl From<&Counters> for CompareRow {
    /// The shard counters' part; `reports` and `report_write_errors` stay 0 (the control
    /// thread's `compare::report::Book` has them).
    fn from(c: &Counters) -> CompareRow {
        CompareRow {
            statements: c.compare_statements,
            mismatches: c.compare_mismatches,
            skipped: c.compare_skipped,
            slow: c.compare_slow,
            explains: c.compare_explains,
            fallbacks: c.compare_fallbacks,
            shadow_connect_failures: c.compare_shadow_connect_failures,
            shadow_lost: c.compare_shadow_lost,
            shadow_timeouts: c.compare_shadow_timeouts,
            reports: 0,
            report_write_errors: 0,
        }
    }
}

/// What the console reads and the changes it asks for; the session code implements it.
/// Every method is called on the shard serving the console session and must not block.
pub trait ConsoleView {
    /// Every shard's latest snapshot (`PoolBoard::read`), console clients among the
    /// clients (database `pgbouncer`/`pgprism`, state `active`).
    fn shards(&self) -> Vec<ShardPools>;
    /// The configuration in force, the console's SETs included (SHOW CONFIG, DATABASES,
    /// USERS; access rules).
    fn config(&self) -> std::sync::Arc<Config>;
    /// When the process started: SHOW STATS's averages are over its lifetime (PgBouncer's
    /// are over its last `stats_period`).
    fn started(&self) -> SystemTime;
    fn mirrors(&self) -> Vec<MirrorRow>;
    /// `None` when compare mode is off.
    fn compare(&self) -> Option<CompareRow>;
    /// Carries out `action`. `Ok(Some(text))`: a NOTICE to show before the command tag;
    /// `Err(text)`: the ERROR (08P01) the client gets, in PgBouncer's words where it has
    /// them ("no such database: x", "pooler is not paused/suspended"); for SET, the DETAIL
    /// of PgBouncer's "SET failed".
    fn act(&self, action: Action) -> Result<Option<String>, String>;
}

// ------------------------------------------------------------------------------------------
// Result sets
// ------------------------------------------------------------------------------------------

/// Column types as PgBouncer sends them (all in text format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    /// `s`: text, OID 25.
    Text,
    /// `i`: int4, OID 23 (values above `i32::MAX` are shown as `i32::MAX`).
    Int4,
    /// `q`: int8, OID 20.
    Int8,
    /// `N`: numeric, OID 1700 (PgBouncer's statistics counters).
    Numeric,
}

impl Ty {
    fn oid(self) -> u32 {
        match self {
            Ty::Text => 25,
            Ty::Int4 => 23,
            Ty::Int8 => 20,
            Ty::Numeric => 1700,
        }
    }

    fn size(self) -> i16 {
        match self {
            Ty::Text | Ty::Numeric => -1,
            Ty::Int4 => 4,
            Ty::Int8 => 8,
        }
    }
}

type Col = (&'static str, Ty);

use Ty::{Int4 as I4, Int8 as I8, Numeric as N, Text as T};

const POOLS: &[Col] = &[
    ("database", T),
    ("user", T),
    ("cl_active", I4),
    ("cl_waiting", I4),
    ("cl_active_cancel_req", I4),
    ("cl_waiting_cancel_req", I4),
    ("sv_active", I4),
    ("sv_active_cancel", I4),
    ("sv_being_canceled", I4),
    ("sv_idle", I4),
    ("sv_used", I4),
    ("sv_tested", I4),
    ("sv_login", I4),
    ("maxwait", I4),
    ("maxwait_us", I4),
    ("pool_mode", T),
];

/// SHOW CLIENTS and SHOW SERVERS (the same columns in 1.18).
const SOCKETS: &[Col] = &[
    ("type", T),
    ("user", T),
    ("database", T),
    ("state", T),
    ("addr", T),
    ("port", I4),
    ("local_addr", T),
    ("local_port", I4),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I4),
    ("wait_us", I4),
    ("close_needed", I4),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I4),
    ("tls", T),
    ("application_name", T),
];

/// PgBouncer 1.18's SHOW STATS, then `total_requests` (PgBouncer up to 1.7's name for the
/// query count): Debian's prometheus-pgbouncer-exporter 1.7 reads it and fails without it
/// (against PgBouncer 1.18 too). Readers by name or by position of 1.18's columns are
/// unaffected by a column after them.
const STATS: &[Col] = &[
    ("database", T),
    ("total_xact_count", N),
    ("total_query_count", N),
    ("total_received", N),
    ("total_sent", N),
    ("total_xact_time", N),
    ("total_query_time", N),
    ("total_wait_time", N),
    ("avg_xact_count", N),
    ("avg_query_count", N),
    ("avg_recv", N),
    ("avg_sent", N),
    ("avg_xact_time", N),
    ("avg_query_time", N),
    ("avg_wait_time", N),
    ("total_requests", N),
];

/// SHOW STATS_TOTALS and SHOW STATS_AVERAGES.
const STATS_PARTS: &[Col] = &[
    ("database", T),
    ("xact_count", N),
    ("query_count", N),
    ("bytes_received", N),
    ("bytes_sent", N),
    ("xact_time", N),
    ("query_time", N),
    ("wait_time", N),
];

const TOTALS: &[Col] = &[("name", T), ("value", N)];

const DATABASES: &[Col] = &[
    ("name", T),
    ("host", T),
    ("port", I4),
    ("database", T),
    ("force_user", T),
    ("pool_size", I4),
    ("min_pool_size", I4),
    ("reserve_pool", I4),
    ("pool_mode", T),
    ("max_connections", I4),
    ("current_connections", I4),
    ("paused", I4),
    ("disabled", I4),
];

const CONFIG: &[Col] = &[("key", T), ("value", T), ("default", T), ("changeable", T)];

const LISTS: &[Col] = &[("list", T), ("items", I4)];

const VERSION: &[Col] = &[("version", T)];

const USERS: &[Col] = &[("name", T), ("pool_mode", T)];

const MIRRORS: &[Col] = &[
    ("name", T),
    ("sessions", I8),
    ("statements", I8),
    ("rows", I8),
    ("errors", I8),
    ("bytes", I8),
    ("skipped", I8),
    ("transactions_cut", I8),
    ("timeouts", I8),
    ("reconnects", I8),
    ("connect_failures", I8),
    ("queue_messages", I8),
    ("queue_bytes", I8),
    ("lag_us", I8),
    ("latency_p50_us", I8),
    ("latency_p99_us", I8),
    ("latency_max_us", I8),
];

const COMPARE: &[Col] = &[
    ("statements", I8),
    ("mismatches", I8),
    ("skipped", I8),
    ("slow", I8),
    ("explains", I8),
    ("fallbacks", I8),
    ("shadow_connect_failures", I8),
    ("shadow_lost", I8),
    ("shadow_timeouts", I8),
    ("reports", I8),
    ("report_write_errors", I8),
];

/// One value of a row; its text follows the column's type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Null,
    Text(String),
    Num(u64),
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_string())
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<u64> for Cell {
    fn from(n: u64) -> Cell {
        Cell::Num(n)
    }
}

impl Cell {
    fn text(&self, ty: Ty) -> Option<String> {
        match self {
            Cell::Null => None,
            Cell::Text(s) => Some(s.clone()),
            Cell::Num(n) => Some(match ty {
                Ty::Int4 => (*n).min(i32::MAX as u64).to_string(),
                Ty::Int8 => (*n).min(i64::MAX as u64).to_string(),
                Ty::Numeric | Ty::Text => n.to_string(),
            }),
        }
    }
}

/// RowDescription, one DataRow per row, CommandComplete `SHOW`.
fn table(out: &mut BytesMut, cols: &[Col], rows: Vec<Vec<Cell>>) -> Result<(), WireError> {
    let fields: Vec<FieldDescription<'_>> = cols
        .iter()
        .map(|&(name, ty)| FieldDescription {
            name,
            table_oid: 0,
            column_attr: 0,
            type_oid: ty.oid(),
            type_size: ty.size(),
            type_modifier: -1,
            format: Format::Text,
        })
        .collect();
    encode::row_description(out, &fields)?;
    for row in rows {
        assert_eq!(
            row.len(),
            cols.len(),
            "a console row has one cell per column"
        );
        let texts: Vec<Option<String>> = row
            .iter()
            .zip(cols)
            .map(|(cell, &(_, ty))| cell.text(ty))
            .collect();
        let values: Vec<Option<&[u8]>> = texts
            .iter()
            .map(|t| t.as_deref().map(str::as_bytes))
            .collect();
        encode::data_row(out, &values)?;
    }
    encode::command_complete(out, "SHOW")
}

fn error(out: &mut BytesMut, severity: &str, code: &str, message: &str, detail: Option<&str>) {
    let spec = ErrorSpec {
        severity,
        code,
        message,
        detail,
        hint: None,
    };
    if encode::error_response(out, &spec).is_err() {
        // A NUL in a text from the view: say so without it rather than say nothing.
        let message = message.replace('\0', "");
        let detail = detail.map(|d| d.replace('\0', ""));
        let spec = ErrorSpec {
            message: &message,
            detail: detail.as_deref(),
            ..spec
        };
        let _ = encode::error_response(out, &spec);
    }
}

/// PgBouncer's console reports every error as ERROR 08P01.
fn console_error(out: &mut BytesMut, message: &str) {
    error(out, "ERROR", sqlstate::PROTOCOL_VIOLATION, message, None);
}

fn notice(out: &mut BytesMut, message: &str, detail: Option<&str>) {
    let spec = ErrorSpec {
        severity: "NOTICE",
        code: "00000",
        message,
        detail,
        hint: None,
    };
    if encode::notice_response(out, &spec).is_err() {
        let _ = encode::notice_response(
            out,
            &ErrorSpec {
                message: "(a notice with a NUL byte)",
                detail: None,
                ..spec
            },
        );
    }
}

// ------------------------------------------------------------------------------------------
// Aggregation over shards
// ------------------------------------------------------------------------------------------

/// Pools of the same (database, user) summed over shards; the bounds (`pool_size`,
/// `reserve_size`, `min_size`) are per process, so the largest is kept.
fn merged_pools(shards: &[ShardPools]) -> BTreeMap<(String, String), PoolRow> {
    let mut merged: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
    for row in shards.iter().flat_map(|s| &s.pools) {
        let key = (row.database.clone(), row.user.clone());
        match merged.get_mut(&key) {
            None => {
                merged.insert(key, row.clone());
            }
            Some(sum) => add_pool(sum, row),
        }
    }
    merged
}

fn add_pool(sum: &mut PoolRow, row: &PoolRow) {
    macro_rules! add {
        ($($field:ident)*) => { $(sum.$field += row.$field;)* };
    }
    add!(cl_active cl_waiting cl_idle sv_active sv_idle sv_used sv_tested sv_login pinned
        xact_count query_count bytes_received bytes_sent xact_time_us query_time_us
        wait_time_us servers_opened servers_closed lends wait_timeouts pins reprepares
        settings_applied);
    sum.maxwait_us = sum.maxwait_us.max(row.maxwait_us);
    sum.pool_size = sum.pool_size.max(row.pool_size);
    sum.reserve_size = sum.reserve_size.max(row.reserve_size);
    sum.min_size = sum.min_size.max(row.min_size);
    if sum.pool_mode.is_empty() {
        sum.pool_mode = row.pool_mode;
    }
}

/// Console sessions as PgBouncer shows its admin pool: one `statement` pool per (console
/// database, user), its clients active.
fn console_pools(shards: &[ShardPools]) -> BTreeMap<(String, String), u64> {
    let mut pools = BTreeMap::new();
    for c in shards.iter().flat_map(|s| &s.clients) {
        if is_console_database(&c.database) {
            *pools
                .entry((c.database.clone(), c.user.clone()))
                .or_insert(0) += 1;
        }
    }
    pools
}

/// A pool's server connections, open or opening.
fn servers_of(p: &PoolRow) -> u64 {
    p.sv_active + p.sv_idle + p.sv_used + p.sv_tested + p.sv_login
}

/// Server connections of the pools of `database` (all when `None`) not yet back in their
/// pool: what a PAUSE waits for.
fn busy_servers(shards: &[ShardPools], database: Option<&str>) -> u64 {
    shards
        .iter()
        .flat_map(|s| &s.pools)
        .filter(|p| database.is_none_or(|d| d == p.database))
        .map(|p| p.sv_active + p.sv_tested + p.sv_login)
        .sum()
}

/// One database's statistics summed over users and shards.
#[derive(Debug, Clone, Copy, Default)]
struct DbStats {
    xact_count: u64,
    query_count: u64,
    received: u64,
    sent: u64,
    xact_time_us: u64,
    query_time_us: u64,
    wait_time_us: u64,
}

impl DbStats {
    fn add(&mut self, p: &PoolRow) {
        self.xact_count += p.xact_count;
        self.query_count += p.query_count;
        self.received += p.bytes_received;
        self.sent += p.bytes_sent;
        self.xact_time_us += p.xact_time_us;
        self.query_time_us += p.query_time_us;
        self.wait_time_us += p.wait_time_us;
    }

    fn totals(&self) -> [u64; 7] {
        [
            self.xact_count,
            self.query_count,
            self.received,
            self.sent,
            self.xact_time_us,
            self.query_time_us,
            self.wait_time_us,
        ]
    }

    /// PgBouncer's averages over `elapsed`: counts, bytes and wait time per second;
    /// transaction and query time per transaction and per query.
    fn averages(&self, elapsed: Duration) -> [u64; 7] {
        let us = elapsed.as_micros().max(1);
        let per_second = |n: u64| u64::try_from(u128::from(n) * 1_000_000 / us).unwrap_or(u64::MAX);
        let per = |time: u64, count: u64| time.checked_div(count).unwrap_or(0);
        [
            per_second(self.xact_count),
            per_second(self.query_count),
            per_second(self.received),
            per_second(self.sent),
            per(self.xact_time_us, self.xact_count),
            per(self.query_time_us, self.query_count),
            per_second(self.wait_time_us),
        ]
    }
}

fn db_stats(shards: &[ShardPools]) -> BTreeMap<String, DbStats> {
    let mut stats: BTreeMap<String, DbStats> = BTreeMap::new();
    for p in shards.iter().flat_map(|s| &s.pools) {
        stats.entry(p.database.clone()).or_default().add(p);
    }
    stats
}

/// Time the averages are taken over: from the start to the newest snapshot.
fn stats_elapsed(shards: &[ShardPools], started: SystemTime) -> Duration {
    let newest = shards
        .iter()
        .filter_map(|s| s.taken)
        .max()
        .unwrap_or_else(SystemTime::now);
    newest.duration_since(started).unwrap_or_default()
}

// ------------------------------------------------------------------------------------------
// Rendering
// ------------------------------------------------------------------------------------------

/// What the session loop does after [`render`] (and [`answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Send what was written, then ReadyForQuery.
    Ready,
    /// PAUSE was accepted: wait until [`ConsoleView::shards`] shows no busy server connection
    /// in the pools of that database (all when `None`), then answer `PAUSE`.
    Pausing(Option<String>),
    /// Send what was written and close (SHUTDOWN).
    Close,
}

/// Answers one simple-Query text of `user`: parse, access check, [`render`].
pub fn answer(query: &str, user: &str, view: &dyn ConsoleView, out: &mut BytesMut) -> Flow {
    let command = match parse(query) {
        Ok(command) => command,
        Err(invalid) => {
            console_error(out, &invalid.to_string());
            return Flow::Ready;
        }
    };
    if !allowed(&view.config().pool, user, &command) {
        console_error(out, "admin access needed");
        return Flow::Ready;
    }
    render(&command, view, out)
}

/// Writes the answer to `command` (without ReadyForQuery), running actions through
/// [`ConsoleView::act`]. Access is the caller's check ([`allowed`]; [`answer`] does it).
pub fn render(command: &Command, view: &dyn ConsoleView, out: &mut BytesMut) -> Flow {
    let start = out.len();
    let result = match command {
        Command::Show(show) => show_table(*show, view, out).map(|()| Flow::Ready),
        Command::ShowParam(name, value) => {
            table(out, &[(name, T)], vec![vec![Cell::from(*value)]]).map(|()| Flow::Ready)
        }
        Command::SetIgnored => {
            notice(out, "SET ignored", None);
            encode::command_complete(out, "SET").map(|()| Flow::Ready)
        }
        Command::Set { name, value } => Ok(set(name, value, view, out)),
        action => Ok(run_action(action, view, out)),
    };
    match result {
        Ok(flow) => flow,
        Err(err) => {
            // Only a result too large for the protocol gets here (a text above 1 GiB).
            out.truncate(start);
            error(out, "ERROR", err.sqlstate(), &err.to_string(), None);
            Flow::Ready
        }
    }
}

fn show_table(show: Show, view: &dyn ConsoleView, out: &mut BytesMut) -> Result<(), WireError> {
    match show {
        Show::Help => {
            notice(out, "Console usage", Some(HELP));
            encode::command_complete(out, "SHOW")
        }
        Show::Pools => table(out, POOLS, pool_rows(&view.shards())),
        Show::Clients => table(out, SOCKETS, client_rows(&view.shards())),
        Show::Servers => table(out, SOCKETS, server_rows(&view.shards())),
        Show::Stats => table(out, STATS, stats_rows(view, StatsPart::Both)),
        Show::StatsTotals => table(out, STATS_PARTS, stats_rows(view, StatsPart::Totals)),
        Show::StatsAverages => table(out, STATS_PARTS, stats_rows(view, StatsPart::Averages)),
        Show::Totals => table(out, TOTALS, totals_rows(view)),
        Show::Databases => table(
            out,
            DATABASES,
            database_rows(&view.shards(), &view.config()),
        ),
        Show::Config => table(out, CONFIG, config_table(&view.config())),
        Show::Lists => table(out, LISTS, list_rows(&view.shards(), &view.config())),
        Show::Version => table(out, VERSION, vec![vec![Cell::from(version_text())]]),
        Show::Users => table(out, USERS, user_rows(&view.shards(), &view.config())),
        Show::Mirrors => table(
            out,
            MIRRORS,
            view.mirrors().iter().map(mirror_row).collect(),
        ),
        Show::Compare => table(
            out,
            COMPARE,
            view.compare().iter().map(compare_row).collect(),
        ),
    }
}

/// `SHOW VERSION`: PgBouncer's text first, for the tools that parse it.
fn version_text() -> String {
    format!(
        "PgBouncer {PGBOUNCER_VERSION} (pgprism {})",
        env!("CARGO_PKG_VERSION")
    )
}

const HELP: &str = "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\
    \tSHOW LISTS\n\
    \tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n\
    \tSHOW MIRRORS|COMPARE\n\
    \tSET key = arg\n\
    \tRELOAD\n\
    \tPAUSE [<db>]\n\
    \tRESUME [<db>]\n\
    \tRECONNECT [<db>]\n\
    \tKILL <db>\n\
    \tSHUTDOWN";

fn pool_rows(shards: &[ShardPools]) -> Vec<Vec<Cell>> {
    let merged = merged_pools(shards);
    let mut rows: Vec<Vec<Cell>> = merged
        .values()
        .map(|p| {
            pool_row(
                &p.database,
                &p.user,
                // PgBouncer counts logged-in clients between transactions as active.
                [p.cl_active + p.cl_idle, p.cl_waiting, 0, 0],
                [
                    p.sv_active,
                    0,
                    0,
                    p.sv_idle,
                    p.sv_used,
                    p.sv_tested,
                    p.sv_login,
                ],
                p.maxwait_us,
                p.pool_mode,
            )
        })
        .collect();
    for ((database, user), clients) in console_pools(shards) {
        if !merged.contains_key(&(database.clone(), user.clone())) {
            rows.push(pool_row(
                &database,
                &user,
                [clients, 0, 0, 0],
                [0; 7],
                0,
                "statement",
            ));
        }
    }
    rows
}

fn pool_row(
    database: &str,
    user: &str,
    clients: [u64; 4],
    servers: [u64; 7],
    maxwait_us: u64,
    mode: &str,
) -> Vec<Cell> {
    let mut row = vec![Cell::from(database), Cell::from(user)];
    row.extend(clients.into_iter().map(Cell::Num));
    row.extend(servers.into_iter().map(Cell::Num));
    row.push(Cell::Num(maxwait_us / 1_000_000));
    row.push(Cell::Num(maxwait_us % 1_000_000));
    row.push(Cell::from(mode));
    row
}

/// `ptr` and `link`: PgBouncer shows object addresses; pgprism shows an id that is unique
/// over shards and over clients and servers (shard in the top byte, then one bit for
/// server).
fn ptr(shard: usize, server: bool, id: u64) -> String {
    let tagged = ((shard as u64 & 0xff) << 56) | (u64::from(server) << 55) | (id & ((1 << 55) - 1));
    format!("0x{tagged:x}")
}

fn client_rows(shards: &[ShardPools]) -> Vec<Vec<Cell>> {
    shards
        .iter()
        .flat_map(|s| &s.clients)
        .map(client_row)
        .collect()
}

fn client_row(c: &ClientRow) -> Vec<Cell> {
    // PgBouncer says `active` for every logged-in client not queued for a connection.
    let state = match c.state {
        "idle" => "active",
        other => other,
    };
    socket_row(SocketRow {
        kind: "C",
        user: &c.user,
        database: &c.database,
        state,
        addr: (&c.addr, c.port),
        local: (&c.local_addr, c.local_port),
        times: (c.connect_time, c.request_time),
        wait_us: c.wait_us,
        ptr: ptr(c.shard, false, c.id),
        link: c.link.map(|id| ptr(c.shard, true, id)),
        remote_pid: c.remote_pid,
        tls: c.tls,
        application_name: &c.application_name,
    })
}

fn server_rows(shards: &[ShardPools]) -> Vec<Vec<Cell>> {
    shards
        .iter()
        .flat_map(|s| &s.servers)
        .map(server_row)
        .collect()
}

fn server_row(s: &ServerRow) -> Vec<Cell> {
    // PgBouncer calls a connection still logging in `new`.
    let state = match s.state {
        "login" => "new",
        other => other,
    };
    socket_row(SocketRow {
        kind: "S",
        user: &s.user,
        database: &s.database,
        state,
        addr: (&s.addr, s.port),
        local: (&s.local_addr, s.local_port),
        times: (s.connect_time, s.request_time),
        wait_us: 0,
        ptr: ptr(s.shard, true, s.id),
        link: s.link.map(|id| ptr(s.shard, false, id)),
        remote_pid: s.remote_pid,
        tls: s.tls,
        application_name: "",
    })
}

struct SocketRow<'a> {
    kind: &'static str,
    user: &'a str,
    database: &'a str,
    state: &'a str,
    addr: (&'a str, u16),
    local: (&'a str, u16),
    times: (SystemTime, SystemTime),
    wait_us: u64,
    ptr: String,
    link: Option<String>,
    remote_pid: i32,
    tls: bool,
    application_name: &'a str,
}

fn socket_row(r: SocketRow<'_>) -> Vec<Cell> {
    vec![
        Cell::from(r.kind),
        Cell::from(r.user),
        Cell::from(r.database),
        Cell::from(r.state),
        Cell::from(r.addr.0),
        Cell::Num(u64::from(r.addr.1)),
        Cell::from(r.local.0),
        Cell::Num(u64::from(r.local.1)),
        Cell::from(utc_text(r.times.0)),
        Cell::from(utc_text(r.times.1)),
        Cell::Num(r.wait_us / 1_000_000),
        Cell::Num(r.wait_us % 1_000_000),
        Cell::Num(0),
        Cell::from(r.ptr),
        // PgBouncer sends an empty text, not NULL, for no link and no TLS.
        Cell::from(r.link.unwrap_or_default()),
        Cell::Num(u64::try_from(r.remote_pid).unwrap_or(0)),
        Cell::from(if r.tls { "TLS" } else { "" }),
        Cell::from(r.application_name),
    ]
}

/// `2026-12-03 02:01:21 UTC`, as PgBouncer prints times (it uses the local zone; pgprism
/// always UTC).
fn utc_text(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StatsPart {
    Totals,
    Averages,
    Both,
}

fn stats_rows(view: &dyn ConsoleView, part: StatsPart) -> Vec<Vec<Cell>> {
    let shards = view.shards();
    let elapsed = stats_elapsed(&shards, view.started());
    db_stats(&shards)
        .into_iter()
        .map(|(database, s)| {
            let mut row = vec![Cell::from(database)];
            if part != StatsPart::Averages {
                row.extend(s.totals().into_iter().map(Cell::Num));
            }
            if part != StatsPart::Totals {
                row.extend(s.averages(elapsed).into_iter().map(Cell::Num));
            }
            if part == StatsPart::Both {
                row.push(Cell::Num(s.query_count));
            }
            row
        })
        .collect()
}

fn totals_rows(view: &dyn ConsoleView) -> Vec<Vec<Cell>> {
    const NAMES: [&str; 7] = [
        "xact_count",
        "query_count",
        "client_bytes",
        "server_bytes",
        "xact_time",
        "query_time",
        "wait_time",
    ];
    let shards = view.shards();
    let mut all = DbStats::default();
    for p in shards.iter().flat_map(|s| &s.pools) {
        all.add(p);
    }
    let averages = all.averages(stats_elapsed(&shards, view.started()));
    let totals = NAMES
        .iter()
        .zip(all.totals())
        .map(|(n, v)| ("total", *n, v));
    let avgs = NAMES.iter().zip(averages).map(|(n, v)| ("avg", *n, v));
    totals
        .chain(avgs)
        .map(|(prefix, name, value)| vec![Cell::from(format!("{prefix}_{name}")), Cell::Num(value)])
        .collect()
}

/// `host:port` of `proxy.listen` split (the port is what SHOW DATABASES gives the console's
/// databases, as PgBouncer gives its listen port).
fn listen_parts(listen: &str) -> (String, u16) {
    match listen.rsplit_once(':') {
        Some((host, port)) => (
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port.parse().unwrap_or(0),
        ),
        None => (listen.to_string(), 0),
    }
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

fn database_rows(shards: &[ShardPools], cfg: &Config) -> Vec<Vec<Cell>> {
    let primary = PgUrl::parse(&cfg.primary.url).ok();
    let mut current: BTreeMap<&str, u64> = BTreeMap::new();
    for p in shards.iter().flat_map(|s| &s.pools) {
        *current.entry(&p.database).or_insert(0) += servers_of(p);
    }
    // PAUSE is process-wide in pgprism: every database shows it.
    let paused = shards.iter().any(|s| s.paused);
    let pool = &cfg.pool;
    let mut rows: Vec<Vec<Cell>> = current
        .iter()
        .filter(|(db, _)| !is_console_database(db))
        .map(|(db, open)| {
            vec![
                Cell::from(*db),
                primary
                    .as_ref()
                    .map_or(Cell::Null, |u| Cell::from(u.host.as_str())),
                Cell::Num(primary.as_ref().map_or(0, |u| u64::from(u.port))),
                Cell::from(*db),
                Cell::Null,
                Cell::Num(pool.size as u64),
                Cell::Num(pool.min_size as u64),
                Cell::Num(pool.reserve_size as u64),
                Cell::from(mode_name(pool.mode)),
                Cell::Num(0),
                Cell::Num(*open),
                Cell::Num(u64::from(paused)),
                Cell::Num(0),
            ]
        })
        .collect();
    let (_, port) = listen_parts(&cfg.proxy.listen);
    for name in CONSOLE_DATABASES {
        rows.push(vec![
            Cell::from(name),
            Cell::Null,
            Cell::Num(u64::from(port)),
            Cell::from(name),
            Cell::from(name),
            Cell::Num(CONSOLE_POOL_SIZE),
            Cell::Num(0),
            Cell::Num(0),
            Cell::from("statement"),
            Cell::Num(0),
            Cell::Num(0),
            Cell::Num(0),
            Cell::Num(0),
        ]);
    }
    rows
}

fn users(shards: &[ShardPools], cfg: &Config) -> BTreeSet<String> {
    let pooled = shards.iter().flat_map(|s| &s.pools).map(|p| &p.user);
    let clients = shards.iter().flat_map(|s| &s.clients).map(|c| &c.user);
    pooled
        .chain(clients)
        .chain(&cfg.pool.admin_users)
        .chain(&cfg.pool.stats_users)
        .cloned()
        .collect()
}

fn user_rows(shards: &[ShardPools], cfg: &Config) -> Vec<Vec<Cell>> {
    users(shards, cfg)
        .into_iter()
        .map(|u| vec![Cell::from(u), Cell::Null])
        .collect()
}

fn list_rows(shards: &[ShardPools], cfg: &Config) -> Vec<Vec<Cell>> {
    let counts = [
        ("databases", database_rows(shards, cfg).len()),
        ("users", users(shards, cfg).len()),
        ("pools", pool_rows(shards).len()),
        // PgBouncer's free lists are its slab caches; pgprism has none.
        ("free_clients", 0),
        ("used_clients", shards.iter().map(|s| s.clients.len()).sum()),
        ("login_clients", 0),
        ("free_servers", 0),
        ("used_servers", shards.iter().map(|s| s.servers.len()).sum()),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    counts
        .into_iter()
        .map(|(name, n)| vec![Cell::from(name), Cell::Num(n as u64)])
        .collect()
}

fn mirror_row(m: &MirrorRow) -> Vec<Cell> {
    let mut row = vec![Cell::from(m.name.as_str())];
    row.extend(
        [
            m.sessions,
            m.statements,
            m.rows,
            m.errors,
            m.bytes,
            m.skipped,
            m.transactions_cut,
            m.timeouts,
            m.reconnects,
            m.connect_failures,
            m.queue_messages,
            m.queue_bytes,
            m.lag_us,
            m.latency_p50_us,
            m.latency_p99_us,
            m.latency_max_us,
        ]
        .into_iter()
        .map(Cell::Num),
    );
    row
}

fn compare_row(c: &CompareRow) -> Vec<Cell> {
    [
        c.statements,
        c.mismatches,
        c.skipped,
        c.slow,
        c.explains,
        c.fallbacks,
        c.shadow_connect_failures,
        c.shadow_lost,
        c.shadow_timeouts,
        c.reports,
        c.report_write_errors,
    ]
    .into_iter()
    .map(Cell::Num)
    .collect()
}

// ------------------------------------------------------------------------------------------
// Configuration under PgBouncer's names
// ------------------------------------------------------------------------------------------

/// How a key's value is written and read back by SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Count,
    /// pgprism keeps milliseconds; PgBouncer shows and takes seconds.
    Seconds,
    Text,
    Users,
}

/// One PgBouncer setting with a pgprism counterpart.
struct Knob {
    name: &'static str,
    /// pgprism's key path, what [`Action::Set`] names.
    key: &'static str,
    kind: Kind,
    /// Whether SET may change it at run time (the others need a restart or a RELOAD).
    changeable: bool,
}

const fn knob(name: &'static str, key: &'static str, kind: Kind, changeable: bool) -> Knob {
    Knob {
        name,
        key,
        kind,
        changeable,
    }
}

/// PgBouncer's settings that pgprism has, in PgBouncer's (alphabetical) order; their values
/// come from [`knob_value`]. A changeable one is a `pool.` key that the shards read where
/// they use it (`Pools::cfg`), so that a SET is in force from the next use on.
const KNOBS: &[Knob] = &[
    knob("admin_users", "pool.admin-users", Kind::Users, true),
    // The auth keys are read once, when the shards start (the auth file into memory):
    // unlike PgBouncer's, they change only with a restart.
    knob("auth_file", "pool.auth-file", Kind::Text, false),
    knob("auth_query", "pool.auth-query", Kind::Text, false),
    knob("auth_type", "pool.auth-type", Kind::Text, false),
    knob("auth_user", "pool.auth-user", Kind::Text, false),
    knob(
        "autodb_idle_timeout",
        "pool.pair-idle-timeout-ms",
        Kind::Seconds,
        true,
    ),
    knob(
        "client_login_timeout",
        "proxy.startup-timeout-ms",
        Kind::Seconds,
        false,
    ),
    knob(
        "client_tls_cert_file",
        "client-tls.cert-file",
        Kind::Text,
        false,
    ),
    knob(
        "client_tls_key_file",
        "client-tls.key-file",
        Kind::Text,
        false,
    ),
    knob("client_tls_sslmode", "client-tls.mode", Kind::Text, false),
    knob("default_pool_size", "pool.size", Kind::Count, true),
    knob("listen_addr", "proxy.listen", Kind::Text, false),
    knob("listen_backlog", "proxy.backlog", Kind::Count, false),
    knob("listen_port", "proxy.listen", Kind::Count, false),
    knob(
        "max_client_conn",
        "proxy.sessions-per-shard-max",
        Kind::Count,
        false,
    ),
    knob(
        "max_packet_size",
        "proxy.message-bytes-max",
        Kind::Count,
        false,
    ),
    knob(
        "max_prepared_statements",
        "pool.prepared-statements-max",
        Kind::Count,
        true,
    ),
    knob("min_pool_size", "pool.min-size", Kind::Count, true),
    knob("pool_mode", "pool.mode", Kind::Text, false),
    knob(
        "query_wait_timeout",
        "pool.query-wait-timeout-ms",
        Kind::Seconds,
        true,
    ),
    knob("reserve_pool_size", "pool.reserve-size", Kind::Count, true),
    knob(
        "reserve_pool_timeout",
        "pool.reserve-timeout-ms",
        Kind::Seconds,
        true,
    ),
    knob(
        "server_check_delay",
        "pool.server-check-delay-ms",
        Kind::Seconds,
        true,
    ),
    knob(
        "server_check_query",
        "pool.server-check-query",
        Kind::Text,
        true,
    ),
    knob(
        "server_connect_timeout",
        "proxy.connect-timeout-ms",
        Kind::Seconds,
        false,
    ),
    knob(
        "server_idle_timeout",
        "pool.server-idle-timeout-ms",
        Kind::Seconds,
        true,
    ),
    knob(
        "server_lifetime",
        "pool.server-lifetime-ms",
        Kind::Seconds,
        true,
    ),
    knob(
        "server_reset_query",
        "pool.server-reset-query",
        Kind::Text,
        true,
    ),
    knob("stats_users", "pool.stats-users", Kind::Users, true),
    knob(
        "unix_socket_dir",
        "proxy.unix-socket-dir",
        Kind::Text,
        false,
    ),
];

/// A knob's value in `c`, in PgBouncer's units; `None` for a name not in [`KNOBS`].
fn knob_value(name: &str, c: &Config) -> Option<String> {
    let (p, x) = (&c.pool, &c.proxy);
    Some(match name {
        "admin_users" => p.admin_users.join(","),
        "auth_file" => p.auth_file.clone(),
        "auth_query" => p.auth_query.clone(),
        "auth_type" => auth_type_name(p.auth_type).into(),
        "auth_user" => p.auth_user.clone(),
        "autodb_idle_timeout" => seconds(p.pair_idle_timeout_ms),
        "client_login_timeout" => seconds(x.startup_timeout_ms),
        "client_tls_cert_file" => c.client_tls.cert_file.clone(),
        "client_tls_key_file" => c.client_tls.key_file.clone(),
        "client_tls_sslmode" => tls_mode_name(&c.client_tls),
        "default_pool_size" => p.size.to_string(),
        "listen_addr" => listen_parts(&x.listen).0,
        "listen_backlog" => x.backlog.to_string(),
        "listen_port" => listen_parts(&x.listen).1.to_string(),
        "max_client_conn" => (x.sessions_per_shard_max.saturating_mul(c.shard_count())).to_string(),
        "max_packet_size" => x.message_bytes_max.to_string(),
        "max_prepared_statements" => p.prepared_statements_max.to_string(),
        "min_pool_size" => p.min_size.to_string(),
        "pool_mode" => mode_name(p.mode).into(),
        "query_wait_timeout" => seconds(p.query_wait_timeout_ms),
        "reserve_pool_size" => p.reserve_size.to_string(),
        "reserve_pool_timeout" => seconds(p.reserve_timeout_ms),
        "server_check_delay" => seconds(p.server_check_delay_ms),
        "server_check_query" => p.server_check_query.clone(),
        "server_connect_timeout" => seconds(x.connect_timeout_ms),
        "server_idle_timeout" => seconds(p.server_idle_timeout_ms),
        "server_lifetime" => seconds(p.server_lifetime_ms),
        "server_reset_query" => p.server_reset_query.clone(),
        "stats_users" => p.stats_users.join(","),
        "unix_socket_dir" => x.unix_socket_dir.clone(),
        _ => return None,
    })
}

fn auth_type_name(auth: AuthType) -> &'static str {
    match auth {
        AuthType::ScramSha256 => "scram-sha-256",
        AuthType::Md5 => "md5",
        AuthType::Plain => "plain",
        AuthType::Trust => "trust",
    }
}

/// `client-tls.mode` as in force (an empty mode means `allow` with a certificate, else
/// `disable`).
fn tls_mode_name(tls: &ClientTlsConfig) -> String {
    match tls.effective_mode() {
        Ok(ClientTlsMode::Disable) => "disable".into(),
        Ok(ClientTlsMode::Allow) => "allow".into(),
        Ok(ClientTlsMode::Require) => "require".into(),
        Err(_) => tls.mode.clone(),
    }
}

/// Milliseconds as PgBouncer's seconds: `3600`, or `0.25` below a whole second.
fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        let text = format!("{}.{:03}", ms / 1000, ms % 1000);
        text.trim_end_matches('0').to_string()
    }
}

/// One row of SHOW CONFIG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRow {
    /// PgBouncer's name.
    pub key: &'static str,
    /// In PgBouncer's units (seconds for durations).
    pub value: String,
    /// pgprism's default, in the same units.
    pub default: String,
    pub changeable: bool,
}

/// pgprism's settings under PgBouncer's names, where PgBouncer has a counterpart, sorted by
/// name as PgBouncer sorts them.
pub fn config_rows(cfg: &Config) -> Vec<ConfigRow> {
    let defaults = Config::default();
    KNOBS
        .iter()
        .map(|k| ConfigRow {
            key: k.name,
            value: knob_value(k.name, cfg).unwrap_or_default(),
            default: knob_value(k.name, &defaults).unwrap_or_default(),
            changeable: k.changeable,
        })
        .collect()
}

fn config_table(cfg: &Config) -> Vec<Vec<Cell>> {
    config_rows(cfg)
        .into_iter()
        .map(|r| {
            vec![
                Cell::from(r.key),
                Cell::from(r.value),
                Cell::from(r.default),
                Cell::from(if r.changeable { "yes" } else { "no" }),
            ]
        })
        .collect()
}

/// The value of `SET name = text` in pgprism's units; `Err`: why not (the DETAIL of
/// PgBouncer's "SET failed").
fn set_value(knob: &Knob, text: &str) -> Result<SetValue, String> {
    let number = |text: &str| {
        text.trim()
            .parse::<u64>()
            .map_err(|_| format!("{} expects a whole number, got \"{text}\"", knob.name))
    };
    match knob.kind {
        Kind::Count => number(text).map(SetValue::Number),
        Kind::Seconds => {
            let secs = number(text)?;
            secs.checked_mul(1000)
                .map(SetValue::Number)
                .ok_or_else(|| format!("{} is too large", knob.name))
        }
        Kind::Text => Ok(SetValue::Text(text.to_string())),
        Kind::Users => Ok(SetValue::Users(
            text.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect(),
        )),
    }
}

fn set(name: &str, value: &str, view: &dyn ConsoleView, out: &mut BytesMut) -> Flow {
    let failed = |out: &mut BytesMut, detail: &str| {
        error(
            out,
            "ERROR",
            sqlstate::PROTOCOL_VIOLATION,
            "SET failed",
            Some(detail),
        );
    };
    let Some(knob) = KNOBS.iter().find(|k| k.name.eq_ignore_ascii_case(name)) else {
        failed(out, &format!("pgprism has no setting named {name}"));
        return Flow::Ready;
    };
    if !knob.changeable {
        failed(
            out,
            &format!("{} ({}) changes only with a restart", knob.name, knob.key),
        );
        return Flow::Ready;
    }
    let parsed = match set_value(knob, value) {
        Ok(parsed) => parsed,
        Err(detail) => {
            failed(out, &detail);
            return Flow::Ready;
        }
    };
    let acted = view.act(Action::Set {
        key: knob.key,
        value: parsed,
    });
    match acted {
        Err(why) => {
            failed(out, &why);
            Flow::Ready
        }
        acted => finish_action(out, acted, &format!("SET {}={value}", knob.name)),
    }
}

fn finish_action(out: &mut BytesMut, acted: Result<Option<String>, String>, tag: &str) -> Flow {
    match acted {
        Ok(note) => {
            if let Some(text) = note {
                notice(out, &text, None);
            }
            if encode::command_complete(out, tag).is_err() {
                let _ = encode::command_complete(out, "SET");
            }
        }
        Err(message) => console_error(out, &message),
    }
    Flow::Ready
}

/// PAUSE, RESUME, RECONNECT, KILL, RELOAD, SHUTDOWN.
fn run_action(command: &Command, view: &dyn ConsoleView, out: &mut BytesMut) -> Flow {
    let console_db = |db: &Option<String>| db.clone().filter(|d| is_console_database(d));
    let refused = match command {
        Command::Pause(db) => console_db(db).map(|d| format!("cannot pause admin db: {d}")),
        Command::Resume(db) => console_db(db).map(|d| format!("database {d} is not paused")),
        Command::Reconnect(db) => console_db(db).map(|d| format!("cannot reconnect admin db: {d}")),
        Command::Kill(None) => Some("a database is required".to_string()),
        Command::Kill(db) => console_db(db).map(|d| format!("cannot kill admin db: {d}")),
        _ => None,
    };
    if let Some(message) = refused {
        console_error(out, &message);
        return Flow::Ready;
    }
    let (action, tag) = match command {
        Command::Pause(db) => (Action::Pause(db.clone()), "PAUSE"),
        Command::Resume(db) => (Action::Resume(db.clone()), "RESUME"),
        Command::Reconnect(db) => (Action::Reconnect(db.clone()), "RECONNECT"),
        Command::Kill(db) => (Action::Kill(db.clone().unwrap_or_default()), "KILL"),
        Command::Reload => (Action::Reload, "RELOAD"),
        Command::Shutdown => (Action::Shutdown, ""),
        // Rendered by `render` itself.
        Command::Show(_) | Command::ShowParam(..) | Command::SetIgnored | Command::Set { .. } => {
            return Flow::Ready;
        }
    };
    let acted = view.act(action);
    match (command, acted) {
        // PgBouncer closes without a word; the drain takes it from there.
        (Command::Shutdown, Ok(_)) => Flow::Close,
        (Command::Pause(db), Ok(note)) => {
            if let Some(text) = note {
                notice(out, &text, None);
            }
            Flow::Pausing(db.clone())
        }
        (_, acted) => finish_action(out, acted, tag),
    }
}

// ------------------------------------------------------------------------------------------
// The session loop
// ------------------------------------------------------------------------------------------

/// Bounds of a console session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleLimits {
    /// `proxy.message-bytes-max`: the largest frame read from the client.
    pub message_bytes_max: usize,
    /// `proxy.read-chunk-bytes`.
    pub read_chunk_bytes: usize,
}

/// Why a console session ended other than by the client leaving.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A malformed or oversized frame, or a message the console has no place for; the client
    /// got FATAL with the SQLSTATE before the close.
    #[error("console client broke the protocol")]
    Protocol(#[source] WireError),
    #[error("console connection failed")]
    Io(#[source] std::io::Error),
}

impl ConsoleError {
    /// A connection that went away: nothing to log as a failure.
    pub fn disconnect(&self) -> bool {
        matches!(self, ConsoleError::Io(_))
    }
}

/// What one client frame asks of the session loop.
#[derive(Debug)]
enum Step {
    /// Send what was written (if anything) and go on.
    Continue,
    /// Wait for the pause, then answer PAUSE and ReadyForQuery.
    Pause(Option<String>),
    /// Send what was written and end the session.
    End,
    /// FATAL was written: send it and close.
    Fatal(WireError),
}

/// One console session's protocol state, sans-IO: a frame in, bytes out.
struct Session<'a> {
    user: &'a str,
    view: &'a dyn ConsoleView,
    /// After an extended-protocol message: everything up to Sync is dropped, as PostgreSQL
    /// drops messages after an error until Sync.
    skipping: bool,
}

impl Session<'_> {
    fn frame(&mut self, frame: &Frame, out: &mut BytesMut) -> Step {
        let message = match FrontendMessage::decode(frame.tag(), frame.body()) {
            Ok(message) => message,
            Err(err) => return fatal(out, err),
        };
        match message {
            FrontendMessage::Terminate => Step::End,
            FrontendMessage::Sync => {
                self.skipping = false;
                encode::ready_for_query(out, TransactionStatus::Idle);
                Step::Continue
            }
            _ if self.skipping => Step::Continue,
            FrontendMessage::Query(q) => match q.query() {
                Ok(text) => self.query(text, out),
                Err(err) => fatal(out, err),
            },
            FrontendMessage::Parse(_)
            | FrontendMessage::Bind(_)
            | FrontendMessage::Describe(_)
            | FrontendMessage::Execute(_)
            | FrontendMessage::Close(_) => {
                // PgBouncer 1.18 sends this error, then ReadyForQuery, then FATAL "bad
                // packet" and closes; pgprism keeps the session for the client's next
                // simple Query.
                console_error(
                    out,
                    "extended query protocol not supported by admin console",
                );
                self.skipping = true;
                Step::Continue
            }
            // Outside COPY, PostgreSQL ignores these too.
            FrontendMessage::Flush
            | FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail(_) => Step::Continue,
            FrontendMessage::Password(_) | FrontendMessage::Other { .. } => fatal(
                out,
                WireError::UnexpectedTag {
                    expected: crate::wire::tag::QUERY,
                    found: frame.tag(),
                },
            ),
        }
    }

    fn query(&mut self, text: &str, out: &mut BytesMut) -> Step {
        match answer(text, self.user, self.view, out) {
            Flow::Ready => {
                encode::ready_for_query(out, TransactionStatus::Idle);
                Step::Continue
            }
            Flow::Pausing(db) => Step::Pause(db),
            Flow::Close => Step::End,
        }
    }
}

fn fatal(out: &mut BytesMut, err: WireError) -> Step {
    encode::fatal_for(out, &err);
    Step::Fatal(err)
}

/// How long a PAUSE waits for its pools' server connections to come back before it answers
/// with an error (the pause stays in force). PgBouncer waits without a bound;
/// `pool.query-wait-timeout-ms` is the natural value (clients held by the pause give up then
/// anyway), as in force when the PAUSE runs (a SET since the session began counts).
fn pause_wait(view: &dyn ConsoleView) -> Duration {
    Duration::from_millis(view.config().pool.query_wait_timeout_ms)
}

/// Answers a PAUSE once no server connection of its pools is busy, or with an error after
/// `limit` ([`pause_wait`]); then ReadyForQuery.
async fn await_pause(
    view: &dyn ConsoleView,
    database: Option<&str>,
    limit: Duration,
    out: &mut BytesMut,
) {
    let deadline = Instant::now() + limit;
    loop {
        let busy = busy_servers(&view.shards(), database);
        if busy == 0 {
            let _ = encode::command_complete(out, "PAUSE");
            break;
        }
        if Instant::now() >= deadline {
            let message = format!(
                "PAUSE did not complete within {} ms: {busy} server connections still busy \
                 (the pause stays in force; RESUME ends it)",
                limit.as_millis()
            );
            console_error(out, &message);
            break;
        }
        crate::exec::sleep(PAUSE_POLL).await;
    }
    encode::ready_for_query(out, TransactionStatus::Idle);
}

/// Runs a console session on `client` after the caller authenticated it and sent
/// AuthenticationOk, the ParameterStatus messages ([`welcome`]), BackendKeyData and
/// ReadyForQuery. `buf` holds what was read past the startup. Each simple Query gets its
/// answer and ReadyForQuery('I'); Terminate or the client closing ends it (`Ok`).
/// Extended-protocol messages get an error and are dropped up to Sync; a malformed or
/// oversized frame gets FATAL 08P01 (54000) and the session ends with
/// [`ConsoleError::Protocol`].
pub async fn serve(
    client: &Stream,
    mut buf: BytesMut,
    user: &str,
    view: &dyn ConsoleView,
    limits: &ConsoleLimits,
) -> Result<(), ConsoleError> {
    let mut session = Session {
        user,
        view,
        skipping: false,
    };
    let mut out = BytesMut::new();
    loop {
        loop {
            let step = match split_message(&mut buf, limits.message_bytes_max) {
                Ok(Some(frame)) => session.frame(&frame, &mut out),
                Ok(None) => break,
                Err(err) => fatal(&mut out, err),
            };
            if let Step::Pause(db) = &step {
                await_pause(view, db.as_deref(), pause_wait(view), &mut out).await;
            }
            if !out.is_empty() {
                client.write_all(&out).await.map_err(ConsoleError::Io)?;
                out.clear();
            }
            match step {
                Step::Continue | Step::Pause(_) => {}
                Step::End => return Ok(()),
                Step::Fatal(err) => return Err(ConsoleError::Protocol(err)),
            }
        }
        match client.read_buf(&mut buf, limits.read_chunk_bytes).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) => return Err(ConsoleError::Io(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::mirror::MirrorStats;
    use crate::wire::{CommandComplete, DataRow, ErrorNotice, ParameterStatus, RowDescription};

    /// A console's view of made-up shards, recording what it was asked to do.
    struct TestView {
        shards: Vec<ShardPools>,
        config: std::sync::Arc<Config>,
        started: SystemTime,
        mirrors: Vec<MirrorRow>,
        compare: Option<CompareRow>,
        acts: RefCell<Vec<Action>>,
        reply: Result<Option<String>, String>,
    }

    impl TestView {
        fn new(shards: Vec<ShardPools>) -> TestView {
            let mut config = Config::default();
            config.pool.admin_users = vec!["admin".into()];
            config.pool.stats_users = vec!["watcher".into()];
            config.primary.url = "postgres://db.internal:5433".into();
            config.proxy.listen = "127.0.0.1:6432".into();
            TestView {
                shards,
                config: std::sync::Arc::new(config),
                started: at(1_000),
                mirrors: Vec::new(),
                compare: None,
                acts: RefCell::new(Vec::new()),
                reply: Ok(None),
            }
        }
    }

    impl ConsoleView for TestView {
        fn shards(&self) -> Vec<ShardPools> {
            self.shards.clone()
        }
        fn config(&self) -> std::sync::Arc<Config> {
            self.config.clone()
        }
        fn started(&self) -> SystemTime {
            self.started
        }
        fn mirrors(&self) -> Vec<MirrorRow> {
            self.mirrors.clone()
        }
        fn compare(&self) -> Option<CompareRow> {
            self.compare.clone()
        }
        fn act(&self, action: Action) -> Result<Option<String>, String> {
            self.acts.borrow_mut().push(action);
            self.reply.clone()
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn some(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    /// What came back, decoded with the wire module's own views.
    #[derive(Debug, Default)]
    struct Reply {
        columns: Vec<(String, u32, i16)>,
        rows: Vec<Vec<Option<String>>>,
        tag: Option<String>,
        /// (severity, code, message, detail)
        errors: Vec<(String, String, String, Option<String>)>,
        notices: Vec<(String, Option<String>)>,
        ready: usize,
    }

    impl Reply {
        fn column(&self, name: &str) -> usize {
            self.columns
                .iter()
                .position(|c| c.0 == name)
                .unwrap_or_else(|| panic!("no column {name}"))
        }

        /// The row whose first column is `key`.
        fn row(&self, key: &str) -> &[Option<String>] {
            self.rows
                .iter()
                .find(|r| r[0].as_deref() == Some(key))
                .unwrap_or_else(|| panic!("no row {key} in {:?}", self.rows))
        }

        /// The value of `column` in `row`.
        fn get<'r>(&self, row: &'r [Option<String>], column: &str) -> Option<&'r str> {
            row[self.column(column)].as_deref()
        }

        /// The first error's SQLSTATE and message.
        fn error(&self) -> (&str, &str) {
            let e = &self.errors[0];
            (e.1.as_str(), e.2.as_str())
        }
    }

    fn decode(out: &BytesMut) -> Reply {
        let mut buf = out.clone();
        let mut reply = Reply::default();
        while let Some(frame) = split_message(&mut buf, 1 << 30).unwrap() {
            let body = frame.body();
            match frame.tag() {
                b'T' => {
                    let fields = RowDescription::new(body).fields().unwrap();
                    reply.columns = fields
                        .map(|f| {
                            assert_eq!(f.format, Format::Text);
                            (f.name.to_string(), f.type_oid, f.type_size)
                        })
                        .collect();
                }
                b'D' => {
                    let values = DataRow::new(body).columns().unwrap();
                    let text = |v: &[u8]| String::from_utf8(v.to_vec()).unwrap();
                    reply
                        .rows
                        .push(values.into_iter().map(|v| v.map(text)).collect());
                }
                b'C' => reply.tag = Some(CommandComplete::new(body).tag().unwrap().into()),
                b'E' => {
                    let f = ErrorNotice::new(body).parse().unwrap();
                    reply.errors.push((
                        f.severity.unwrap().into(),
                        f.code.unwrap().into(),
                        f.message.unwrap().into(),
                        f.detail.map(str::to_string),
                    ));
                }
                b'N' => {
                    let f = ErrorNotice::new(body).parse().unwrap();
                    let detail = f.detail.map(str::to_string);
                    reply.notices.push((f.message.unwrap().into(), detail));
                }
                b'Z' => reply.ready += 1,
                other => panic!("unexpected message {}", other as char),
            }
        }
        reply
    }

    fn ask(view: &TestView, user: &str, query: &str) -> (Flow, Reply) {
        let mut out = BytesMut::new();
        let flow = answer(query, user, view, &mut out);
        (flow, decode(&out))
    }

    fn show(view: &TestView, query: &str) -> Reply {
        let (flow, reply) = ask(view, "admin", query);
        assert_eq!(flow, Flow::Ready);
        assert!(reply.errors.is_empty(), "{query}: {:?}", reply.errors);
        assert_eq!(reply.tag.as_deref(), Some("SHOW"), "{query}");
        reply
    }

    fn pool(database: &str, user: &str, fill: impl FnOnce(&mut PoolRow)) -> PoolRow {
        let mut row = PoolRow {
            database: database.into(),
            user: user.into(),
            pool_mode: "transaction",
            pool_size: 20,
            ..PoolRow::default()
        };
        fill(&mut row);
        row
    }

    fn client(shard: usize, id: u64, database: &str, state: &'static str) -> ClientRow {
        ClientRow {
            id,
            shard,
            user: "app".into(),
            database: database.into(),
            state,
            addr: "10.0.0.7".into(),
            port: 40_000,
            local_addr: "10.0.0.1".into(),
            local_port: 6432,
            connect_time: at(1_700_000_000),
            request_time: at(1_700_000_005),
            wait_us: 2_500_000,
            link: None,
            remote_pid: -5,
            tls: true,
            application_name: "billing".into(),
            pinned: None,
        }
    }

    fn server(shard: usize, id: u64, state: &'static str, link: Option<u64>) -> ServerRow {
        ServerRow {
            id,
            shard,
            user: "app".into(),
            database: "shop".into(),
            state,
            addr: "10.0.0.9".into(),
            port: 5432,
            local_addr: "10.0.0.1".into(),
            local_port: 50_000,
            connect_time: at(1_700_000_000),
            request_time: at(1_700_000_001),
            link,
            remote_pid: 4242,
            tls: false,
            prepared_statements: 3,
        }
    }

    /// Two shards, both with a pool of (shop, app), one also with (shop, batch), the other
    /// with (crm, app); clients and servers on both, and one console client.
    fn two_shards() -> Vec<ShardPools> {
        let mut s0 = ShardPools {
            shard: 0,
            taken: Some(at(1_100)),
            ..ShardPools::default()
        };
        s0.pools.push(pool("shop", "app", |p| {
            p.cl_active = 1;
            p.cl_idle = 2;
            p.cl_waiting = 1;
            p.sv_active = 1;
            p.sv_idle = 3;
            p.maxwait_us = 1_250_000;
            p.xact_count = 100;
            p.query_count = 300;
            p.bytes_received = 10_000;
            p.bytes_sent = 50_000;
            p.xact_time_us = 200_000;
            p.query_time_us = 150_000;
            p.wait_time_us = 5_000;
        }));
        s0.pools.push(pool("shop", "batch", |p| {
            p.xact_count = 10;
            p.query_count = 10;
        }));
        s0.clients.push(client(0, 1, "shop", "idle"));
        let mut linked = client(0, 2, "shop", "active");
        linked.link = Some(7);
        s0.clients.push(linked);
        s0.clients.push(client(0, 3, "pgbouncer", "active"));
        s0.servers.push(server(0, 7, "active", Some(2)));
        let mut s1 = ShardPools {
            shard: 1,
            taken: Some(at(1_050)),
            ..ShardPools::default()
        };
        s1.pools.push(pool("shop", "app", |p| {
            p.cl_active = 2;
            p.cl_waiting = 3;
            p.sv_active = 2;
            p.sv_used = 1;
            p.sv_login = 1;
            p.maxwait_us = 4_000_001;
            p.xact_count = 100;
            p.query_count = 100;
            p.bytes_received = 10_000;
            p.bytes_sent = 50_000;
            p.xact_time_us = 200_000;
            p.query_time_us = 250_000;
            p.wait_time_us = 5_000;
        }));
        s1.pools.push(pool("crm", "app", |p| p.sv_idle = 1));
        s1.clients.push(client(1, 1, "crm", "waiting"));
        s1.servers.push(server(1, 1, "login", None));
        vec![s0, s1]
    }

    // --- parsing ----------------------------------------------------------------------

    #[test]
    fn commands_parse_as_pgbouncer_parses_them() {
        let pools = Ok(Command::Show(Show::Pools));
        for query in [
            "SHOW POOLS",
            "show pools",
            "Show Pools;",
            "  show   pools  ;  ",
            "\tSHOW\tPOOLS\r\n",
            "SHOW \"pools\"",
            "show Pools ;",
        ] {
            assert_eq!(parse(query), pools, "{query:?}");
        }
        let show = |s| Ok(Command::Show(s));
        assert_eq!(parse("SHOW stats_totals"), show(Show::StatsTotals));
        assert_eq!(parse("show MIRRORS"), show(Show::Mirrors));
        assert_eq!(
            parse("SHOW client_encoding"),
            Ok(Command::ShowParam("client_encoding", "UTF-8"))
        );
        assert_eq!(
            parse("SHOW DateStyle"),
            Ok(Command::ShowParam("datestyle", "ISO"))
        );
        let db = |name: &str| Some(name.to_string());
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(parse("PAUSE shop;"), Ok(Command::Pause(db("shop"))));
        assert_eq!(
            parse("resume \"my-db\"\"x\""),
            Ok(Command::Resume(db("my-db\"x")))
        );
        assert_eq!(parse("RECONNECT"), Ok(Command::Reconnect(None)));
        assert_eq!(parse("kill"), Ok(Command::Kill(None)));
        assert_eq!(parse("KILL shop"), Ok(Command::Kill(db("shop"))));
        assert_eq!(parse("reload;"), Ok(Command::Reload));
        assert_eq!(parse("SHUTDOWN"), Ok(Command::Shutdown));
        let set = |name: &str, value: &str| {
            Ok(Command::Set {
                name: name.into(),
                value: value.into(),
            })
        };
        let pool_size = set("default_pool_size", "30");
        assert_eq!(parse("SET default_pool_size = 30"), pool_size);
        assert_eq!(parse("set default_pool_size=30;"), pool_size);
        assert_eq!(
            parse("SET default_pool_size TO '31'"),
            set("default_pool_size", "31")
        );
        assert_eq!(
            parse("SET \"server_lifetime\" to 60"),
            set("server_lifetime", "60")
        );
        assert_eq!(
            parse("SET server_reset_query = 'SELECT ''x'''"),
            set("server_reset_query", "SELECT 'x'")
        );
        assert_eq!(
            parse("SET client_encoding = 'UTF8'"),
            Ok(Command::SetIgnored)
        );
        assert_eq!(parse("set TimeZone to UTC"), Ok(Command::SetIgnored));
    }

    #[test]
    fn anything_else_is_an_invalid_command_quoting_the_query() {
        for query in [
            "",
            ";",
            "SHOW",
            "SHOW POOLS; SHOW LISTS",
            "SHOW VERSION;;",
            "SHOW POOLS ;x",
            "SHOW pools x",
            "SHOW STATE",
            "SHOW FDS",
            "SHOW MEM",
            "SELECT 1",
            "BEGIN",
            "RELOAD now",
            "SHUTDOWN now",
            "PAUSE my-db",
            "PAUSE a b",
            "SET server_lifetime = 0.5",
            "SET a b",
            "SET = 1",
            "SET a = 'x",
            "SHOW \"pools",
        ] {
            let err = parse(query).expect_err(query);
            assert_eq!(
                err.to_string(),
                format!("invalid command '{query}', use SHOW HELP;")
            );
        }
        // A long query is quoted up to a bound, cut on a character boundary.
        let long = format!("SHOW {}", "é".repeat(2000));
        let text = parse(&long).unwrap_err().to_string();
        assert!(text.len() < QUOTED_BYTES_MAX + 100, "{}", text.len());
        assert!(text.ends_with("', use SHOW HELP;"));
    }

    #[test]
    fn admin_users_run_everything_stats_users_only_what_changes_nothing() {
        let cfg = PoolConfig {
            admin_users: vec!["admin".into()],
            stats_users: vec!["watcher".into(), "admin".into()],
            ..PoolConfig::default()
        };
        assert_eq!(Access::of(&cfg, "admin"), Some(Access::Admin));
        assert_eq!(Access::of(&cfg, "watcher"), Some(Access::Stats));
        assert_eq!(Access::of(&cfg, "Admin"), None);
        assert_eq!(Access::of(&cfg, "app"), None);
        let reading = [
            "SHOW POOLS",
            "SHOW CONFIG",
            "SHOW HELP",
            "SHOW client_encoding",
            "SET client_encoding = 'UTF8'",
        ];
        let changing = [
            "PAUSE",
            "RESUME x",
            "RECONNECT",
            "KILL x",
            "RELOAD",
            "SHUTDOWN",
            "SET default_pool_size = 5",
        ];
        for query in reading {
            let c = parse(query).unwrap();
            assert!(allowed(&cfg, "admin", &c), "{query}");
            assert!(allowed(&cfg, "watcher", &c), "{query}");
            assert!(!allowed(&cfg, "app", &c), "{query}");
        }
        for query in changing {
            let c = parse(query).unwrap();
            assert!(allowed(&cfg, "admin", &c), "{query}");
            assert!(!allowed(&cfg, "watcher", &c), "{query}");
            assert!(!allowed(&cfg, "app", &c), "{query}");
        }

        let view = TestView::new(two_shards());
        let (_, reply) = ask(&view, "watcher", "PAUSE");
        assert_eq!(reply.error(), ("08P01", "admin access needed"));
        let (_, reply) = ask(&view, "watcher", "SET default_pool_size = 5");
        assert_eq!(reply.error(), ("08P01", "admin access needed"));
        assert!(view.acts.borrow().is_empty());
        let (_, reply) = ask(&view, "watcher", "SET client_encoding = 'UTF8'");
        assert_eq!(reply.tag.as_deref(), Some("SET"));
        assert_eq!(reply.notices[0].0, "SET ignored");
        let (_, reply) = ask(&view, "watcher", "SHOW POOLS");
        assert_eq!(reply.tag.as_deref(), Some("SHOW"));
        let (_, reply) = ask(&view, "watcher", "SHOW STATE");
        assert_eq!(
            reply.error(),
            ("08P01", "invalid command 'SHOW STATE', use SHOW HELP;")
        );

        let mut out = BytesMut::new();
        not_allowed(&mut out);
        let reply = decode(&out);
        assert_eq!(reply.errors[0].0, "FATAL");
        assert_eq!(reply.error(), ("08P01", "not allowed"));
    }

    // --- rendering --------------------------------------------------------------------

    /// PgBouncer 1.18.0's RowDescriptions as it sends them (`name:type OID`), then
    /// pgprism's own.
    const EXPECTED: &[(&str, &str)] = &[
        (
            "SHOW POOLS",
            "database:25 user:25 cl_active:23 cl_waiting:23 cl_active_cancel_req:23 \
             cl_waiting_cancel_req:23 sv_active:23 sv_active_cancel:23 sv_being_canceled:23 \
             sv_idle:23 sv_used:23 sv_tested:23 sv_login:23 maxwait:23 maxwait_us:23 \
             pool_mode:25",
        ),
        (
            "SHOW CLIENTS",
            "type:25 user:25 database:25 state:25 addr:25 port:23 local_addr:25 local_port:23 \
             connect_time:25 request_time:25 wait:23 wait_us:23 close_needed:23 ptr:25 link:25 \
             remote_pid:23 tls:25 application_name:25",
        ),
        (
            "SHOW SERVERS",
            "type:25 user:25 database:25 state:25 addr:25 port:23 local_addr:25 local_port:23 \
             connect_time:25 request_time:25 wait:23 wait_us:23 close_needed:23 ptr:25 link:25 \
             remote_pid:23 tls:25 application_name:25",
        ),
        (
            "SHOW STATS",
            "database:25 total_xact_count:1700 total_query_count:1700 total_received:1700 \
             total_sent:1700 total_xact_time:1700 total_query_time:1700 total_wait_time:1700 \
             avg_xact_count:1700 avg_query_count:1700 avg_recv:1700 avg_sent:1700 \
             avg_xact_time:1700 avg_query_time:1700 avg_wait_time:1700 total_requests:1700",
        ),
        (
            "SHOW STATS_TOTALS",
            "database:25 xact_count:1700 query_count:1700 bytes_received:1700 bytes_sent:1700 \
             xact_time:1700 query_time:1700 wait_time:1700",
        ),
        (
            "SHOW STATS_AVERAGES",
            "database:25 xact_count:1700 query_count:1700 bytes_received:1700 bytes_sent:1700 \
             xact_time:1700 query_time:1700 wait_time:1700",
        ),
        ("SHOW TOTALS", "name:25 value:1700"),
        (
            "SHOW DATABASES",
            "name:25 host:25 port:23 database:25 force_user:25 pool_size:23 min_pool_size:23 \
             reserve_pool:23 pool_mode:25 max_connections:23 current_connections:23 paused:23 \
             disabled:23",
        ),
        ("SHOW CONFIG", "key:25 value:25 default:25 changeable:25"),
        ("SHOW LISTS", "list:25 items:23"),
        ("SHOW VERSION", "version:25"),
        ("SHOW USERS", "name:25 pool_mode:25"),
        ("SHOW client_encoding", "client_encoding:25"),
        (
            "SHOW MIRRORS",
            "name:25 sessions:20 statements:20 rows:20 errors:20 bytes:20 skipped:20 \
             transactions_cut:20 timeouts:20 reconnects:20 connect_failures:20 \
             queue_messages:20 queue_bytes:20 lag_us:20 latency_p50_us:20 latency_p99_us:20 \
             latency_max_us:20",
        ),
        (
            "SHOW COMPARE",
            "statements:20 mismatches:20 skipped:20 slow:20 explains:20 fallbacks:20 \
             shadow_connect_failures:20 shadow_lost:20 shadow_timeouts:20 reports:20 \
             report_write_errors:20",
        ),
    ];

    #[test]
    fn every_show_has_pgbouncers_column_names_and_types() {
        let mut view = TestView::new(two_shards());
        view.mirrors = vec![MirrorRow::default()];
        view.compare = Some(CompareRow::default());
        let empty = TestView::new(vec![ShardPools::default()]);
        for (query, columns) in EXPECTED {
            let want: Vec<&str> = columns.split_whitespace().collect();
            for view in [&view, &empty] {
                let reply = show(view, query);
                let got: Vec<String> = reply
                    .columns
                    .iter()
                    .map(|(name, oid, size)| {
                        let width = match oid {
                            23 => 4,
                            20 => 8,
                            _ => -1,
                        };
                        assert_eq!(*size, width, "{query} {name}");
                        format!("{name}:{oid}")
                    })
                    .collect();
                assert_eq!(got, want, "{query}");
                for row in &reply.rows {
                    assert_eq!(row.len(), want.len(), "{query}");
                }
            }
        }
    }

    #[test]
    fn pools_are_summed_over_shards_per_database_and_user() {
        let view = TestView::new(two_shards());
        let reply = show(&view, "SHOW POOLS");
        let keys: Vec<(&str, &str)> = reply
            .rows
            .iter()
            .map(|r| (r[0].as_deref().unwrap(), r[1].as_deref().unwrap()))
            .collect();
        assert_eq!(
            keys,
            [
                ("crm", "app"),
                ("shop", "app"),
                ("shop", "batch"),
                ("pgbouncer", "app")
            ]
        );
        let shop = &reply.rows[1];
        // 1 + 2 linked, plus the 2 idle between transactions.
        assert_eq!(reply.get(shop, "cl_active"), Some("5"));
        assert_eq!(reply.get(shop, "cl_waiting"), Some("4"));
        assert_eq!(reply.get(shop, "cl_active_cancel_req"), Some("0"));
        assert_eq!(reply.get(shop, "sv_active"), Some("3"));
        assert_eq!(reply.get(shop, "sv_idle"), Some("3"));
        assert_eq!(reply.get(shop, "sv_used"), Some("1"));
        assert_eq!(reply.get(shop, "sv_login"), Some("1"));
        // The longest wait of either shard, in seconds and the microseconds beyond.
        assert_eq!(reply.get(shop, "maxwait"), Some("4"));
        assert_eq!(reply.get(shop, "maxwait_us"), Some("1"));
        assert_eq!(reply.get(shop, "pool_mode"), Some("transaction"));
        // The console's own client, as PgBouncer shows its admin pool.
        let console = &reply.rows[3];
        assert_eq!(reply.get(console, "cl_active"), Some("1"));
        assert_eq!(reply.get(console, "pool_mode"), Some("statement"));
    }

    #[test]
    fn stats_are_summed_per_database_with_lifetime_averages() {
        let view = TestView::new(two_shards());
        let reply = show(&view, "SHOW STATS");
        let dbs: Vec<&str> = reply
            .rows
            .iter()
            .map(|r| r[0].as_deref().unwrap())
            .collect();
        assert_eq!(dbs, ["crm", "shop"]);
        let shop = reply.row("shop");
        let want = [
            ("total_xact_count", "210"),
            ("total_query_count", "410"),
            ("total_requests", "410"),
            ("total_received", "20000"),
            ("total_sent", "100000"),
            ("total_xact_time", "400000"),
            ("total_query_time", "400000"),
            ("total_wait_time", "10000"),
            // Over 100 s: started at 1000, the newest snapshot taken at 1100.
            ("avg_xact_count", "2"),
            ("avg_query_count", "4"),
            ("avg_recv", "200"),
            ("avg_sent", "1000"),
            ("avg_xact_time", "1904"),
            ("avg_query_time", "975"),
            ("avg_wait_time", "100"),
        ];
        for (column, value) in want {
            assert_eq!(reply.get(shop, column), Some(value), "{column}");
        }

        let totals = show(&view, "SHOW STATS_TOTALS");
        let want = ["210", "410", "20000", "100000", "400000", "400000", "10000"];
        assert_eq!(totals.row("shop")[1..], some(&want));
        let averages = show(&view, "SHOW STATS_AVERAGES");
        let want = ["2", "4", "200", "1000", "1904", "975", "100"];
        assert_eq!(averages.row("shop")[1..], some(&want));
        let all = show(&view, "SHOW TOTALS");
        assert_eq!(all.rows.len(), 14);
        assert_eq!(all.row("total_query_count")[1].as_deref(), Some("410"));
        assert_eq!(all.row("total_client_bytes")[1].as_deref(), Some("20000"));
        assert_eq!(all.row("avg_server_bytes")[1].as_deref(), Some("1000"));
    }

    #[test]
    fn clients_and_servers_come_from_every_shard() {
        let view = TestView::new(two_shards());
        let clients = show(&view, "SHOW CLIENTS");
        assert_eq!(clients.rows.len(), 4);
        let first = &clients.rows[0];
        let want = [
            ("type", "C"),
            // Logged in, between transactions: PgBouncer's `active`.
            ("state", "active"),
            ("addr", "10.0.0.7"),
            ("port", "40000"),
            ("connect_time", "2023-11-14 22:13:20 UTC"),
            ("request_time", "2023-11-14 22:13:25 UTC"),
            ("wait", "2"),
            ("wait_us", "500000"),
            ("close_needed", "0"),
            ("link", ""),
            ("remote_pid", "0"),
            ("tls", "TLS"),
            ("application_name", "billing"),
        ];
        for (column, value) in want {
            assert_eq!(clients.get(first, column), Some(value), "{column}");
        }
        assert_eq!(clients.get(&clients.rows[3], "state"), Some("waiting"));
        // Ids are unique over shards and over clients and servers; links point across.
        let ptrs: BTreeSet<&str> = clients
            .rows
            .iter()
            .map(|r| clients.get(r, "ptr").unwrap())
            .collect();
        assert_eq!(ptrs.len(), 4);
        let servers = show(&view, "SHOW SERVERS");
        assert_eq!(servers.rows.len(), 2);
        let active = &servers.rows[0];
        let linked = &clients.rows[1];
        assert_eq!(servers.get(active, "type"), Some("S"));
        assert_eq!(servers.get(active, "remote_pid"), Some("4242"));
        assert_eq!(servers.get(active, "link"), clients.get(linked, "ptr"));
        assert_eq!(clients.get(linked, "link"), servers.get(active, "ptr"));
        assert!(!ptrs.contains(servers.get(active, "ptr").unwrap()));
        // Still logging in: PgBouncer's `new`.
        assert_eq!(servers.get(&servers.rows[1], "state"), Some("new"));
    }

    #[test]
    fn databases_lists_and_users_follow_the_pools_and_the_config() {
        let mut view = TestView::new(two_shards());
        view.shards[1].paused = true;
        let dbs = show(&view, "SHOW DATABASES");
        let names: Vec<&str> = dbs.rows.iter().map(|r| r[0].as_deref().unwrap()).collect();
        assert_eq!(names, ["crm", "shop", "pgbouncer", "pgprism"]);
        let shop = dbs.row("shop");
        let want = [
            ("host", Some("db.internal")),
            ("port", Some("5433")),
            ("database", Some("shop")),
            ("force_user", None),
            ("pool_size", Some("20")),
            ("min_pool_size", Some("0")),
            ("reserve_pool", Some("0")),
            ("pool_mode", Some("session")),
            ("max_connections", Some("0")),
            // 3 active, 3 idle, 1 used, 1 logging in, over both shards.
            ("current_connections", Some("8")),
            ("paused", Some("1")),
            ("disabled", Some("0")),
        ];
        for (column, value) in want {
            assert_eq!(dbs.get(shop, column), value, "{column}");
        }
        let admin = dbs.row("pgbouncer");
        assert_eq!(dbs.get(admin, "host"), None);
        assert_eq!(dbs.get(admin, "port"), Some("6432"));
        assert_eq!(dbs.get(admin, "force_user"), Some("pgbouncer"));
        assert_eq!(dbs.get(admin, "pool_size"), Some("2"));
        assert_eq!(dbs.get(admin, "pool_mode"), Some("statement"));

        let lists = show(&view, "SHOW LISTS");
        let items: Vec<(&str, &str)> = lists
            .rows
            .iter()
            .map(|r| (r[0].as_deref().unwrap(), r[1].as_deref().unwrap()))
            .collect();
        let want = [
            ("databases", "4"),
            ("users", "4"),
            ("pools", "4"),
            ("free_clients", "0"),
            ("used_clients", "4"),
            ("login_clients", "0"),
            ("free_servers", "0"),
            ("used_servers", "2"),
            ("dns_names", "0"),
            ("dns_zones", "0"),
            ("dns_queries", "0"),
            ("dns_pending", "0"),
        ];
        assert_eq!(items, want);

        let users = show(&view, "SHOW USERS");
        let names: Vec<&str> = users
            .rows
            .iter()
            .map(|r| r[0].as_deref().unwrap())
            .collect();
        assert_eq!(names, ["admin", "app", "batch", "watcher"]);
        assert!(users.rows.iter().all(|r| r[1].is_none()));

        let version = show(&view, "SHOW VERSION");
        let text = version.rows[0][0].as_deref().unwrap();
        assert!(text.starts_with("PgBouncer 1.18.0 (pgprism "), "{text}");
        let help = show(&view, "SHOW HELP");
        assert!(help.columns.is_empty());
        assert_eq!(help.notices[0].0, "Console usage");
        let usage = help.notices[0].1.as_deref().unwrap();
        assert!(usage.contains("SHOW MIRRORS|COMPARE"), "{usage}");
        let param = show(&view, "SHOW client_encoding");
        assert_eq!(param.rows, [some(&["UTF-8"])]);
    }

    #[test]
    fn config_shows_pgprism_keys_under_pgbouncer_names() {
        let mut cfg = Config::default();
        cfg.pool.mode = PoolMode::Transaction;
        cfg.pool.size = 50;
        cfg.pool.server_lifetime_ms = 1_500;
        cfg.pool.admin_users = vec!["a".into(), "b".into()];
        cfg.pool.auth_type = AuthType::Trust;
        cfg.proxy.listen = "[::1]:7000".into();
        cfg.proxy.shards = 3;
        cfg.proxy.sessions_per_shard_max = 100;
        let rows = config_rows(&cfg);
        let keys: Vec<&str> = rows.iter().map(|r| r.key).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted, "sorted by name, as PgBouncer sorts them");
        for name in [
            "pool_mode",
            "default_pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "server_idle_timeout",
            "query_wait_timeout",
            "server_reset_query",
            "server_check_query",
            "server_check_delay",
            "max_prepared_statements",
            "auth_type",
            "auth_file",
            "auth_query",
            "auth_user",
            "admin_users",
            "stats_users",
            "listen_addr",
            "listen_port",
            "max_client_conn",
        ] {
            assert!(keys.contains(&name), "{name}");
        }
        for knob in KNOBS {
            assert!(
                knob_value(knob.name, &cfg).is_some(),
                "{} has a value",
                knob.name
            );
        }
        let row = |k: &str| rows.iter().find(|r| r.key == k).unwrap().clone();
        let want = [
            ("pool_mode", "transaction", "session"),
            ("default_pool_size", "50", "20"),
            ("server_lifetime", "1.5", "3600"),
            ("server_idle_timeout", "600", "600"),
            ("autodb_idle_timeout", "3600", "3600"),
            ("query_wait_timeout", "120", "120"),
            ("admin_users", "a,b", ""),
            ("auth_type", "trust", "scram-sha-256"),
            ("server_reset_query", "DISCARD ALL", "DISCARD ALL"),
            ("listen_addr", "::1", "127.0.0.1"),
            ("listen_port", "7000", "6432"),
            ("client_tls_sslmode", "disable", "disable"),
            ("max_client_conn", "300", ""),
        ];
        for (key, value, default) in want {
            assert_eq!(row(key).value, value, "{key}");
            if !default.is_empty() {
                assert_eq!(row(key).default, default, "{key}");
            }
        }
        assert!(row("default_pool_size").changeable);
        assert!(!row("listen_port").changeable);

        let mut view = TestView::new(Vec::new());
        view.config = std::sync::Arc::new(cfg);
        let (_, reply) = ask(&view, "a", "SHOW CONFIG");
        assert_eq!(
            reply.row("pool_mode"),
            some(&["pool_mode", "transaction", "session", "no"])
        );
        assert_eq!(
            reply.row("default_pool_size"),
            some(&["default_pool_size", "50", "20", "yes"])
        );
    }

    #[test]
    fn set_converts_to_pgprism_units_and_answers_like_pgbouncer() {
        let view = TestView::new(Vec::new());
        let (_, reply) = ask(&view, "admin", "SET default_pool_size = 30");
        assert_eq!(reply.tag.as_deref(), Some("SET default_pool_size=30"));
        let (_, reply) = ask(&view, "admin", "set SERVER_LIFETIME to '90'");
        assert_eq!(reply.tag.as_deref(), Some("SET server_lifetime=90"));
        ask(&view, "admin", "SET stats_users = 'a, b,,c'");
        ask(&view, "admin", "SET server_reset_query = 'DISCARD ALL'");
        let want = [
            Action::Set {
                key: "pool.size",
                value: SetValue::Number(30),
            },
            Action::Set {
                key: "pool.server-lifetime-ms",
                value: SetValue::Number(90_000),
            },
            Action::Set {
                key: "pool.stats-users",
                value: SetValue::Users(vec!["a".into(), "b".into(), "c".into()]),
            },
            Action::Set {
                key: "pool.server-reset-query",
                value: SetValue::Text("DISCARD ALL".into()),
            },
        ];
        assert_eq!(*view.acts.borrow(), want);
        for query in [
            "SET foo = 1",
            "SET listen_port = 1",
            "SET default_pool_size = 'x'",
            "SET server_lifetime = '99999999999999999999'",
        ] {
            let (_, reply) = ask(&view, "admin", query);
            assert_eq!(reply.error(), ("08P01", "SET failed"), "{query}");
            assert!(reply.errors[0].3.is_some(), "{query}: a detail says why");
        }
        assert_eq!(view.acts.borrow().len(), 4, "refused before act");
        // What the view refuses (the pool's checks) is the DETAIL of the same error.
        let mut refusing = TestView::new(Vec::new());
        let why = "config key `pool.min-size`: expected at most pool.size (1)";
        refusing.reply = Err(why.into());
        let (_, reply) = ask(&refusing, "admin", "SET min_pool_size = 2");
        assert_eq!(reply.error(), ("08P01", "SET failed"));
        assert_eq!(reply.errors[0].3.as_deref(), Some(why));
    }

    #[test]
    fn actions_go_to_the_view_except_on_the_console_databases() {
        let view = TestView::new(two_shards());
        for (query, tag) in [
            ("RESUME", "RESUME"),
            ("RECONNECT shop", "RECONNECT"),
            ("KILL shop", "KILL"),
            ("RELOAD", "RELOAD"),
        ] {
            let (flow, reply) = ask(&view, "admin", query);
            assert_eq!(flow, Flow::Ready);
            assert_eq!(reply.tag.as_deref(), Some(tag), "{query}");
        }
        let (flow, reply) = ask(&view, "admin", "PAUSE shop");
        assert_eq!(flow, Flow::Pausing(Some("shop".into())));
        assert!(reply.tag.is_none(), "PAUSE answers once the pause holds");
        let (flow, reply) = ask(&view, "admin", "SHUTDOWN");
        assert_eq!(flow, Flow::Close);
        assert!(reply.tag.is_none() && reply.errors.is_empty());
        let want = [
            Action::Resume(None),
            Action::Reconnect(Some("shop".into())),
            Action::Kill("shop".into()),
            Action::Reload,
            Action::Pause(Some("shop".into())),
            Action::Shutdown,
        ];
        assert_eq!(*view.acts.borrow(), want);
        for (query, message) in [
            ("PAUSE pgbouncer", "cannot pause admin db: pgbouncer"),
            ("RESUME pgprism", "database pgprism is not paused"),
            (
                "RECONNECT pgbouncer",
                "cannot reconnect admin db: pgbouncer",
            ),
            ("KILL pgprism", "cannot kill admin db: pgprism"),
            ("KILL", "a database is required"),
        ] {
            let (_, reply) = ask(&view, "admin", query);
            assert_eq!(reply.error(), ("08P01", message), "{query}");
        }
        assert_eq!(view.acts.borrow().len(), want.len());

        let mut refusing = TestView::new(Vec::new());
        refusing.reply = Err("no such database: nosuch".into());
        let (flow, reply) = ask(&refusing, "admin", "PAUSE nosuch");
        assert_eq!(flow, Flow::Ready);
        assert_eq!(reply.error(), ("08P01", "no such database: nosuch"));
        refusing.reply = Ok(Some("nothing to reconnect".into()));
        let (_, reply) = ask(&refusing, "admin", "RECONNECT");
        assert_eq!(reply.notices[0].0, "nothing to reconnect");
        assert_eq!(reply.tag.as_deref(), Some("RECONNECT"));
    }

    #[test]
    fn a_pause_waits_for_busy_servers_within_its_bound() {
        assert_eq!(busy_servers(&two_shards(), None), 4);
        assert_eq!(busy_servers(&two_shards(), Some("shop")), 4);
        assert_eq!(busy_servers(&two_shards(), Some("crm")), 0);
        crate::exec::run(64, async {
            let view = TestView::new(two_shards());
            let mut out = BytesMut::new();
            await_pause(&view, Some("crm"), Duration::from_secs(5), &mut out).await;
            let reply = decode(&out);
            assert_eq!((reply.tag.as_deref(), reply.ready), (Some("PAUSE"), 1));
            let mut out = BytesMut::new();
            await_pause(&view, None, Duration::from_millis(30), &mut out).await;
            let reply = decode(&out);
            assert_eq!(reply.error().0, "08P01");
            assert!(reply.error().1.contains("4 server connections still busy"));
            assert_eq!(reply.ready, 1);
        })
        .unwrap();
    }

    #[test]
    fn mirrors_and_compare_have_their_rows() {
        let mut view = TestView::new(Vec::new());
        let stats = MirrorStats::new(60_000_000);
        MirrorStats::bump(&stats.counters.statements, 7);
        MirrorStats::bump(&stats.counters.skipped_filter, 2);
        MirrorStats::bump(&stats.counters.skipped_down, 1);
        stats.record_latency(Duration::from_millis(1));
        view.mirrors = vec![MirrorRow::from(&stats.report(0, "replica"))];
        let reply = show(&view, "SHOW MIRRORS");
        let row = reply.row("replica");
        assert_eq!(reply.get(row, "statements"), Some("7"));
        assert_eq!(reply.get(row, "skipped"), Some("3"));
        let max: u64 = reply.get(row, "latency_max_us").unwrap().parse().unwrap();
        assert!((1000..1010).contains(&max), "{max}");
        assert!(
            show(&view, "SHOW COMPARE").rows.is_empty(),
            "compare mode off"
        );
        let counters = Counters {
            compare_statements: 9,
            compare_mismatches: 2,
            ..Counters::default()
        };
        let mut row = CompareRow::from(&counters);
        row.reports = 2;
        view.compare = Some(row);
        let reply = show(&view, "SHOW COMPARE");
        assert_eq!(reply.rows[0][..3], some(&["9", "2", "0"]));
        assert_eq!(reply.get(&reply.rows[0], "reports"), Some("2"));
    }

    #[test]
    fn times_are_written_as_pgbouncer_writes_them() {
        assert_eq!(utc_text(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(at(1_700_000_000)), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_text(at(1_709_208_000)), "2024-02-29 12:00:00 UTC");
        assert_eq!(utc_text(at(951_782_400)), "2000-02-29 00:00:00 UTC");
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(utc_text(before), "1970-01-01 00:00:00 UTC");
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(250), "0.25");
        assert_eq!(seconds(120_000), "120");
    }

    #[test]
    fn welcome_has_what_drivers_need() {
        let mut out = BytesMut::new();
        welcome(&mut out);
        let mut params = Vec::new();
        while let Some(frame) = split_message(&mut out, 1 << 20).unwrap() {
            let (name, value) = ParameterStatus::new(frame.body()).parts().unwrap();
            params.push(format!("{name}={value}"));
        }
        for want in [
            "server_version=1.18.0/pgprism",
            "client_encoding=UTF8",
            "DateStyle=ISO",
        ] {
            assert!(params.iter().any(|p| p == want), "{want} in {params:?}");
        }
    }

    // --- the session ------------------------------------------------------------------

    fn msg(tag: u8, body: &[u8]) -> Frame {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[tag]);
        buf.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        buf.extend_from_slice(body);
        split_message(&mut buf, 1 << 20).unwrap().unwrap()
    }

    fn q(sql: &str) -> Frame {
        msg(b'Q', format!("{sql}\0").as_bytes())
    }

    #[test]
    fn the_session_answers_simple_queries_and_refuses_the_extended_protocol() {
        let view = TestView::new(two_shards());
        let mut session = Session {
            user: "admin",
            view: &view,
            skipping: false,
        };
        let mut out = BytesMut::new();
        assert_eq!(session.frame(&q("SHOW VERSION"), &mut out), Step::Continue);
        let reply = decode(&out);
        assert_eq!((reply.rows.len(), reply.ready), (1, 1));

        // Parse/Bind/Describe/Execute, a Query among them, Flush, Sync: one error, then
        // ReadyForQuery at Sync.
        let mut out = BytesMut::new();
        for frame in [
            msg(b'P', b"\0SHOW POOLS\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'D', b"P\0"),
            msg(b'E', b"\0\0\0\0\0"),
            q("SHOW POOLS"),
            msg(b'H', b""),
            msg(b'S', b""),
        ] {
            assert_eq!(session.frame(&frame, &mut out), Step::Continue);
        }
        let reply = decode(&out);
        assert_eq!(reply.errors.len(), 1);
        assert_eq!(
            reply.error(),
            (
                "08P01",
                "extended query protocol not supported by admin console"
            )
        );
        assert_eq!(reply.ready, 1);
        assert!(
            reply.columns.is_empty(),
            "the Query before Sync was dropped"
        );

        // Back to simple queries; an error still ends in ReadyForQuery.
        let mut out = BytesMut::new();
        session.frame(&q("SHOW NOTHING"), &mut out);
        session.frame(&q("SHOW LISTS"), &mut out);
        let reply = decode(&out);
        assert_eq!((reply.errors.len(), reply.rows.len()), (1, 12));
        assert_eq!(reply.ready, 2);

        let mut out = BytesMut::new();
        assert_eq!(session.frame(&q("PAUSE"), &mut out), Step::Pause(None));
        assert!(out.is_empty(), "PAUSE is answered by the loop");
        assert_eq!(session.frame(&q("SHUTDOWN"), &mut out), Step::End);
        assert_eq!(session.frame(&msg(b'X', b""), &mut out), Step::End);
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_frames_get_fatal_08p01() {
        let view = TestView::new(Vec::new());
        let mut session = Session {
            user: "admin",
            view: &view,
            skipping: false,
        };
        for frame in [
            msg(b'Q', b"SHOW POOLS"),
            msg(b'Q', b"SHOW\xffPOOLS\0"),
            msg(b'X', b"junk"),
            msg(b'p', b"secret\0"),
            msg(b'F', b"\0\0\0\0"),
        ] {
            let mut out = BytesMut::new();
            let step = session.frame(&frame, &mut out);
            assert!(matches!(step, Step::Fatal(_)), "{frame:?}");
            let reply = decode(&out);
            assert_eq!(reply.errors[0].0, "FATAL");
            assert_eq!(reply.error().0, "08P01");
        }
    }

    impl PartialEq for Step {
        fn eq(&self, other: &Step) -> bool {
            match (self, other) {
                (Step::Continue, Step::Continue) | (Step::End, Step::End) => true,
                (Step::Pause(a), Step::Pause(b)) => a == b,
                (Step::Fatal(a), Step::Fatal(b)) => a.to_string() == b.to_string(),
                _ => false,
            }
        }
    }

    /// A plain socket for the test thread, connected to a stream inside the shard.
    fn peer() -> (std::net::SocketAddr, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (listener.local_addr().unwrap(), listener)
    }

    #[test]
    fn serve_answers_over_a_socket_and_closes_on_an_oversized_frame() {
        use std::io::{Read, Write};
        let (addr, listener) = peer();
        let client = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut send = Vec::new();
            for sql in ["SHOW VERSION;", "show lists"] {
                send.extend_from_slice(q(sql).bytes());
            }
            // Then the header of a frame above the bound.
            send.push(b'Q');
            send.extend_from_slice(&100_000i32.to_be_bytes());
            sock.write_all(&send).unwrap();
            let mut got = Vec::new();
            sock.read_to_end(&mut got).unwrap();
            got
        });
        crate::exec::run(64, async move {
            let view = TestView::new(two_shards());
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            let limits = ConsoleLimits {
                message_bytes_max: 1024,
                read_chunk_bytes: 7,
            };
            let end = serve(&stream, BytesMut::new(), "watcher", &view, &limits).await;
            let err = end.unwrap_err();
            assert!(matches!(err, ConsoleError::Protocol(_)), "{err:?}");
            assert!(!err.disconnect());
            stream.shutdown();
        })
        .unwrap();
        let got = BytesMut::from(&client.join().unwrap()[..]);
        let reply = decode(&got);
        assert_eq!(reply.ready, 2);
        assert_eq!(reply.rows.len(), 1 + 12);
        assert_eq!(reply.errors.len(), 1);
        assert_eq!(reply.errors[0].0, "FATAL");
        assert_eq!(reply.error().0, "54000");
    }

    #[test]
    fn serve_ends_quietly_on_terminate_and_on_close() {
        use std::io::{Read, Write};
        let (addr, listener) = peer();
        let client = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            let mut send = q("SHOW USERS").bytes().to_vec();
            send.extend_from_slice(msg(b'X', b"").bytes());
            send.extend_from_slice(q("SHOW USERS").bytes());
            first.write_all(&send).unwrap();
            let mut got = Vec::new();
            first.read_to_end(&mut got).unwrap();
            let (second, _) = listener.accept().unwrap();
            drop(second);
            got
        });
        crate::exec::run(64, async move {
            let view = TestView::new(two_shards());
            let limits = ConsoleLimits {
                message_bytes_max: 1 << 20,
                read_chunk_bytes: 4096,
            };
            for _ in 0..2 {
                let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
                let end = serve(&stream, BytesMut::new(), "admin", &view, &limits).await;
                assert!(end.is_ok(), "{end:?}");
                stream.shutdown();
            }
        })
        .unwrap();
        let got = BytesMut::from(&client.join().unwrap()[..]);
        let reply = decode(&got);
        assert_eq!(reply.ready, 1, "nothing after Terminate is answered");
        assert_eq!(reply.rows.len(), 4);
    }
}
