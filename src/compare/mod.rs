//! Compare mode: every client statement runs on the primary and on a shadow at the same time;
//! both answers are folded into digests as they stream (bounded memory whatever the result
//! size) and compared per statement: command tag, row count, columns and types, row values
//! (ordered under a top-level ORDER BY, order-insensitive otherwise), SQLSTATE.
//!
//! This module owns the digests, the normalisation rules, the verdicts, the per-session
//! pairing of the two answer streams ([`Comparer`]) and the slow-query analyzer. It never
//! writes to the client itself (the session does), never blocks the shard, and sends reports
//! to the control thread over a bounded ring: when it is full, a report is dropped and counted.

pub mod digest;
mod exchange;
mod explain;
pub mod footprint;
mod lease;
pub mod order;
mod place;
mod pump;
mod recheck;
pub mod report;
pub mod rules;
mod shape;
pub mod verdict;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};

use crate::backend;
use crate::config::{
    CompareConfig, Config, ConfigError, Endpoint, LiveEndpoint, PgUrl, SourceOfTruth, UrlError,
};
use crate::tls::{TlsError, Upstream};

pub use exchange::{Cancel, Comparer, Dispatch, Exchange, Fed, PRIMARY, SHADOW, ShadowWriter};
pub use lease::Shadow;
pub use pump::{Host, Primary, Pump, PumpSettings, Relayed};
pub use rules::{Rules, parse_equivalence, validate};
pub use verdict::Kind;

/// A mismatch or slow-query report, sent from a shard to the control thread.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// `mismatch`, `inconclusive` or `slow`.
    pub record: &'static str,
    /// `mismatch`, `inconclusive: concurrent` or `inconclusive: nondeterministic` (empty for
    /// `slow`).
    pub verdict: &'static str,
    /// Why an inconclusive result differs by nature (`now()`, `an OID`...), or empty.
    pub reason: &'static str,
    pub kinds: Vec<&'static str>,
    pub description: String,
    pub statement: String,
    pub fingerprint: u64,
    pub fingerprint_text: String,
    pub primary: Side,
    pub shadow: Side,
    pub primary_us: u64,
    pub shadow_us: u64,
    pub shard: usize,
    pub session: u64,
    pub transaction: u64,
    pub in_transaction: bool,
    /// The statement streamed past `compare.buffer-bytes-max`: reported, not enforced.
    pub fallback: bool,
    /// The client received an XX000 error instead of the result.
    pub failed_client: bool,
    pub unix_ms: u64,
}

/// One side's verdict as a report shows it.
#[derive(Debug, Clone, Default)]
pub struct Side {
    pub tag: String,
    pub rows: u64,
    pub columns: Vec<(String, String)>,
    pub error: Option<String>,
    pub message: String,
    /// Sample rows found on this side only (within the kept samples), else the first rows.
    pub sample: Vec<String>,
    pub plan: Option<String>,
}

/// Why compare mode cannot start: its URLs, TLS files or rules. `key` is the config key at
/// fault (`shadow.url`, `primary.url`, `compare.exclude-patterns`, ...).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{key}: invalid URL")]
    Url {
        key: &'static str,
        #[source]
        source: UrlError,
    },
    #[error("{key}: cannot resolve {addr}")]
    Resolve {
        key: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: invalid TLS settings")]
    Tls {
        key: &'static str,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{key}: a pattern does not compile")]
    Pattern {
        key: &'static str,
        #[source]
        source: regex::Error,
    },
    #[error("expected `type=type` (e.g. int8=numeric), got `{pair}`")]
    Equivalence { pair: String },
    #[error("unknown type `{name}`")]
    UnknownType { name: String },
}

/// The configured shadow with its address resolved (on the main thread: DNS blocks).
#[derive(Clone)]
pub struct Resolved {
    pub url: PgUrl,
    pub addr: LiveEndpoint,
    pub primary_url: PgUrl,
    /// TLS towards the shadow and the primary (for EXPLAIN), certificates read at start-up.
    pub tls: Upstream,
    pub primary_tls: Upstream,
    pub cfg: CompareConfig,
    pub reports: Sender<Record>,
    /// The primary's completion order, shared by every shard (ordered shadow dispatch).
    pub ledger: Arc<order::Ledger>,
    /// The pooled shadow's settings (`shadow.pool-size` above 0), with the bound over every
    /// shard; `None`: one shadow connection per session.
    pub pool: Option<(crate::config::PoolConfig, backend::pool::Budgets)>,
    pub shards: usize,
    pub message_bytes_max: usize,
    /// Order re-checks running in the whole process (`compare.order-rechecks-total-max`).
    pub rechecks: Arc<std::sync::atomic::AtomicU64>,
}

pub fn resolve(cfg: &Config, reports: Sender<Record>) -> Result<Option<Resolved>, CompareError> {
    if cfg.shadow.url.is_empty() {
        return Ok(None);
    }
    let parse = |key, text: &str| {
        text.parse::<PgUrl>()
            .map_err(|source| CompareError::Url { key, source })
    };
    let upstream = |key, url: &PgUrl| {
        Upstream::try_from(url).map_err(|source| CompareError::Tls { key, source })
    };
    let url = parse("shadow.url", &cfg.shadow.url)?;
    let addr = crate::config::dns::resolve(&url).map_err(|source| CompareError::Resolve {
        key: "shadow.url",
        addr: url.address(),
        source,
    })?;
    let primary_url = parse("primary.url", &cfg.primary.url)?;
    validate(&cfg.compare)?;
    let tls = upstream("shadow.url", &url)?;
    let primary_tls = upstream("primary.url", &primary_url)?;
    Ok(Some(Resolved {
        url,
        addr,
        primary_url,
        tls,
        primary_tls,
        cfg: cfg.compare.clone(),
        reports,
        ledger: Arc::new(
            order::Ledger::new(Duration::from_millis(cfg.compare.order_hold_ms))
                .with_read_lead(Duration::from_micros(cfg.compare.order_read_lead_us)),
        ),
        pool: (cfg.shadow.pool_size > 0).then(|| (shadow_pool_config(cfg), Default::default())),
        shards: cfg.shard_count(),
        message_bytes_max: cfg.proxy.message_bytes_max,
        rechecks: Arc::default(),
    }))
}

/// The shadow pool's settings: `shadow.pool-size` connections for the process, the
/// connections' lifetimes, checks and reset as `[pool]` has them at start, and a session
/// waiting for one at most `compare.shadow-timeout-ms` (then it stops comparing, as a shadow
/// that falls behind does). Copied once: a console `SET` of a `[pool]` key changes the
/// primary's pools only, never the shadow pool (documented in docs/pooling.md).
fn shadow_pool_config(cfg: &Config) -> crate::config::PoolConfig {
    crate::config::PoolConfig {
        size: cfg.shadow.pool_size,
        min_size: 0,
        reserve_size: 0,
        query_wait_timeout_ms: cfg.compare.shadow_timeout_ms,
        shared_depth_max: 1,
        ..cfg.pool.clone()
    }
}

/// Counters of one shard's compare mode, by mismatch kind.
#[derive(Default)]
pub struct CompareStats {
    pub kinds: [Cell<u64>; Kind::ALL.len()],
    /// CancelRequests sent to the shadow for a statement a client cancelled.
    pub cancels_forwarded: Cell<u64>,
    /// Cancels not sent to the shadow because its next statement was already written behind
    /// the cancelled one (a cancel could land on it).
    pub cancels_skipped: Cell<u64>,
    /// Order re-checks running now (at most `compare.order-rechecks-max`).
    pub rechecks_running: Cell<u64>,
    /// Order re-checks done, and those that found ties only (no difference).
    pub order_rechecks: Cell<u64>,
    pub order_recheck_ties: Cell<u64>,
    /// Verdicts of order re-checks (mismatch, inconclusive: concurrent, inconclusive:
    /// nondeterministic), reached after the statement was settled.
    pub rechecked: [Cell<u64>; 3],
    /// Re-checks inconclusive (concurrent) because they read other rows (also in
    /// `rechecked[1]`): their reason, `order_recheck`.
    pub rechecked_changed: Cell<u64>,
    /// Reads placed by a re-read on the shadow (see `place`), the re-reads made, and those
    /// left inconclusive (concurrent) after a placement found no place, by reason
    /// (overlapped, in flight).
    pub placed: Cell<u64>,
    pub place_rereads: Cell<u64>,
    pub unplaced: [Cell<u64>; 2],
    /// Their reports dropped because the ring to the control thread was full.
    pub reports_dropped: Cell<u64>,
    /// Extended batches that passed `compare.shadow-batch-bytes-max` before their Sync.
    pub batches_released: Cell<u64>,
    /// Batches sent to the shadow before their Sync that then named a statement routed to
    /// the primary only: the rest withheld from the shadow, the sync point not compared.
    pub batches_cut: Cell<u64>,
    /// pgprism's own Describes of a portal before an Execute of a statement the client never
    /// described (see `Dispatch::describe_unseen`).
    pub own_describes: Cell<u64>,
}

/// Compare mode as one shard sees it.
pub struct CompareTarget {
    pub url: PgUrl,
    pub addr: LiveEndpoint,
    pub primary_url: PgUrl,
    pub primary_addr: LiveEndpoint,
    pub tls: Upstream,
    pub primary_tls: Upstream,
    pub cfg: CompareConfig,
    pub rules: Rc<Rules>,
    pub reports: Sender<Record>,
    pub stats: CompareStats,
    /// EXPLAIN runs left for this shard.
    pub explains_left: Cell<u64>,
    pub shard: usize,
    /// Ordered shadow dispatch (None: `compare.order-wait-ms` = 0).
    pub port: Option<Rc<order::Port>>,
    /// Calibration (A/A): per fingerprint, its text, statements compared and those that
    /// differed; at most [`CALIBRATION_FINGERPRINTS_MAX`] fingerprints.
    pub calibration: std::cell::RefCell<std::collections::HashMap<u64, (String, u64, u64)>>,
    /// The shard's shadow pools (`shadow.pool-size` above 0).
    pub shadow_pools: Option<Rc<backend::pool::Pools>>,
    /// Order re-checks running in the whole process, shared by every shard.
    pub rechecks: Arc<std::sync::atomic::AtomicU64>,
    /// What was read of statement texts, per shape (`compare.shape-cache-max`).
    pub(crate) shapes: std::cell::RefCell<shape::Shapes>,
}

/// Fingerprints a shard counts while calibrating; further ones are counted under 0.
pub const CALIBRATION_FINGERPRINTS_MAX: usize = 1000;

impl CompareTarget {
    pub fn new(
        resolved: &Resolved,
        primary_addr: LiveEndpoint,
        shard: usize,
    ) -> Result<Rc<CompareTarget>, CompareError> {
        Ok(Rc::new(CompareTarget {
            url: resolved.url.clone(),
            addr: resolved.addr.clone(),
            primary_url: resolved.primary_url.clone(),
            primary_addr,
            tls: resolved.tls.clone(),
            primary_tls: resolved.primary_tls.clone(),
            cfg: resolved.cfg.clone(),
            rules: Rc::new(Rules::new(&resolved.cfg)?),
            reports: resolved.reports.clone(),
            stats: CompareStats::default(),
            explains_left: Cell::new(resolved.cfg.explains_max),
            shard,
            port: (resolved.cfg.order_wait_ms > 0)
                .then(|| order::Port::new(resolved.ledger.clone(), shard)),
            calibration: Default::default(),
            rechecks: resolved.rechecks.clone(),
            shapes: std::cell::RefCell::new(shape::Shapes::new(
                usize::try_from(resolved.cfg.shape_cache_max).unwrap_or(usize::MAX),
            )),
            shadow_pools: resolved.pool.as_ref().map(|(cfg, budgets)| {
                let upstream = backend::pool::Upstream {
                    addr: resolved.addr.clone(),
                    label: resolved.url.address(),
                    tls: resolved.tls.clone(),
                    connect_timeout: Duration::from_millis(resolved.cfg.connect_timeout_ms),
                    message_bytes_max: resolved.message_bytes_max,
                    url_user: resolved.url.user.clone().unwrap_or_default(),
                    url_password: resolved.url.password.clone().unwrap_or_default(),
                };
                Rc::new(backend::pool::Pools::new(
                    shard,
                    cfg.clone(),
                    upstream,
                    budgets.clone(),
                    resolved.shards,
                ))
            }),
        }))
    }

    /// The session's shadow: a lease on the shard's shadow pool when it has one (nothing is
    /// opened until the session writes), else a connection of its own ([`open_shadow`]).
    ///
    /// [`open_shadow`]: Self::open_shadow
    pub async fn shadow_session(
        &self,
        client_params: &[(String, String)],
        message_bytes_max: usize,
        settings_max: usize,
    ) -> Result<Shadow, backend::BackendError> {
        let Some(pools) = &self.shadow_pools else {
            let opened = self.open_shadow(client_params, message_bytes_max).await?;
            return Ok(Shadow::Own {
                stream: opened.stream,
                key: opened.key,
            });
        };
        let (user, database) = login_names(&self.url, client_params);
        let pool = pools.pool_unbounded(&user, &database);
        // The connections log in with the user and database only: the client's other startup
        // parameters, its `options` and the calibration guard are applied as settings.
        let mut params: Vec<(String, String)> = client_params
            .iter()
            .filter(|(k, _)| k != "options")
            .cloned()
            .collect();
        if let Some((_, options)) = client_params.iter().find(|(k, _)| k == "options") {
            params.extend(lease::options_settings(options));
        }
        if self.cfg.calibrate {
            params.push(("default_transaction_read_only".into(), "on".into()));
        }
        let baseline = backend::replay::baseline(&params);
        Ok(Shadow::Pooled(lease::Lease::new(
            pools.clone(),
            pool,
            baseline,
            settings_max,
            message_bytes_max,
        )))
    }

    /// The shadow pools' cumulative counters: lends, wait timeouts, pins, statements prepared
    /// again, lends that applied settings, connections opened, connections closed dirty.
    pub fn shadow_pool_counts(&self) -> [u64; 7] {
        let mut totals = [0u64; 7];
        let Some(pools) = &self.shadow_pools else {
            return totals;
        };
        let all = pools.all();
        // The pools that went count too: the totals never go down.
        for c in all
            .iter()
            .map(|pool| &pool.counters)
            .chain([pools.retired()])
        {
            for (t, v) in totals.iter_mut().zip([
                c.lends.get(),
                c.wait_timeouts.get(),
                c.pins.get(),
                c.reprepares.get(),
                c.settings_applied.get(),
                c.servers_opened.get(),
                c.dirty_closed.get(),
            ]) {
                *t += v;
            }
        }
        totals
    }

    /// Closes idle shadow pool connections past their idle timeout or lifetime (the shard's
    /// periodic care).
    pub fn maintain(&self) {
        if let Some(pools) = &self.shadow_pools {
            pools.maintain();
        }
    }

    pub fn shadow_is_source(&self) -> bool {
        self.cfg.source_of_truth == SourceOfTruth::Shadow
    }

    /// Counts one compared statement while calibrating.
    pub(crate) fn calibrated(&self, text: &str, differed: bool) {
        let (mut id, fingerprint) = crate::sql::fingerprint(text.as_bytes(), 200);
        let mut table = self.calibration.borrow_mut();
        if !table.contains_key(&id) && table.len() >= CALIBRATION_FINGERPRINTS_MAX {
            id = 0;
        }
        let entry = table.entry(id).or_insert_with(|| {
            let text = if id == 0 { "other".into() } else { fingerprint };
            (text, 0, 0)
        });
        entry.1 += 1;
        entry.2 += u64::from(differed);
    }

    pub fn calibration(&self) -> Vec<(u64, String, u64, u64)> {
        self.calibration
            .borrow()
            .iter()
            .map(|(id, (text, compared, differed))| (*id, text.clone(), *compared, *differed))
            .collect()
    }

    pub fn kind_counts(&self) -> Vec<(&'static str, u64)> {
        Kind::ALL
            .iter()
            .map(|k| (k.name(), self.stats.kinds[k.index()].get()))
            .collect()
    }

    /// Queues a report for the control thread; `false` when the ring was full (dropped).
    pub fn send(&self, record: Record) -> bool {
        match self.reports.try_send(record) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Disconnected(_)) => true,
        }
    }

    /// Opens this session's shadow connection with the shadow URL's credentials (the
    /// client's user and database when the URL has none) and the client's other startup
    /// parameters, so settings such as `DateStyle` match the primary session's.
    pub async fn open_shadow(
        &self,
        client_params: &[(String, String)],
        message_bytes_max: usize,
    ) -> Result<backend::Opened, backend::BackendError> {
        // Calibrating, the "shadow" is the primary itself: whatever the scanner takes for a
        // read but writes (a function, nextval, a FunctionCall) must fail there, not run twice
        // on production.
        let read_only;
        let params = if self.cfg.calibrate {
            let mut params = client_params.to_vec();
            let guard = "-c default_transaction_read_only=on";
            match params.iter_mut().find(|(k, _)| k == "options") {
                Some((_, options)) => *options = format!("{options} {guard}"),
                None => params.push(("options".into(), guard.into())),
            }
            read_only = params;
            &read_only[..]
        } else {
            client_params
        };
        open_as(
            &self.addr.get(),
            &self.url,
            &self.tls,
            params,
            Duration::from_millis(self.cfg.connect_timeout_ms),
            message_bytes_max,
        )
        .await
    }
}

/// Opens a pgprism-owned session to `addr` for `url`, defaulting user and database to the
/// client's.
pub(crate) async fn open_as(
    addr: &Endpoint,
    url: &PgUrl,
    tls: &Upstream,
    client_params: &[(String, String)],
    limit: Duration,
    message_bytes_max: usize,
) -> Result<backend::Opened, backend::BackendError> {
    let (user, database) = login_names(url, client_params);
    let mut params: Vec<(&str, &str)> = client_params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    params.push(("user", &user));
    params.push(("database", &database));
    let password = url.password.clone().unwrap_or_default();
    backend::open(
        addr,
        limit,
        &params,
        &user,
        &password,
        message_bytes_max,
        tls,
    )
    .await
}

/// The user and database a pgprism-owned session logs in as: the URL's, else the client's.
fn login_names(url: &PgUrl, client_params: &[(String, String)]) -> (String, String) {
    let param = |name: &str| {
        client_params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let user = url
        .user
        .clone()
        .or_else(|| param("user"))
        .unwrap_or_else(|| "postgres".into());
    let database = url
        .database
        .clone()
        .or_else(|| param("database"))
        .unwrap_or_else(|| user.clone());
    (user, database)
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
