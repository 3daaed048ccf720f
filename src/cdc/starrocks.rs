//! StarRocks sink: Stream Load over HTTP with ureq (blocking; runs on the loader thread only).
//!
//! The FE answers a Stream Load with `307` and a BE address; redirects are followed here, not
//! by ureq, so the Basic credentials go to the BE too (ureq drops `Authorization` on a
//! redirect to another host, as it should for arbitrary redirects). `Expect: 100-continue` is
//! sent and ureq waits for the interim answer before the body, so a rejected load (or the
//! FE's redirect) costs no body upload. Labels make every retry and every replay after a crash
//! safe: StarRocks loads a label at most once.

use std::time::Duration;

use base64::Engine;

use super::pipeline::{Batch, BodyFormat};

/// `http://user:password@host:port`: the FE's HTTP address.
#[derive(Clone)]
pub struct StarRocksUrl {
    pub base: String,
    /// Host alone (for the query port).
    pub host: String,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for StarRocksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (user {})", self.base, self.user)
    }
}

impl StarRocksUrl {
    pub fn parse(text: &str) -> Result<StarRocksUrl, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("expected http://user:password@host:port, got `{text}`"))?;
        let rest = rest.trim_end_matches('/');
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((u, h)) => (u, h),
            None => ("root:", rest),
        };
        if host.is_empty() || host.contains('/') {
            return Err("expected http://user:password@host:port (no path)".into());
        }
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        Ok(StarRocksUrl {
            base: format!("http://{host}"),
            host: bare
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            user: user.to_string(),
            password: password.to_string(),
        })
    }

    fn authorization(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "StarRocks rejected the credentials of user `{user}` (HTTP {status}); check cdc.starrocks"
    )]
    Auth { user: String, status: u16 },
    #[error("StarRocks table {database}.{table} does not exist or is not visible to `{user}`")]
    TableMissing {
        database: String,
        table: String,
        user: String,
    },
    #[error(
        "Stream Load {label} into {table} filtered rows and failed: {message}{}",
        error_url.as_deref().map(|u| format!(" (rejected rows: {u})")).unwrap_or_default()
    )]
    Filtered {
        table: String,
        label: String,
        message: String,
        error_url: Option<String>,
    },
    #[error("Stream Load {label} into {table} still failing after {attempts} attempts: {last}")]
    GaveUp {
        table: String,
        label: String,
        attempts: u32,
        last: String,
    },
    #[error("StarRocks answered {what} without a usable response: {detail}")]
    Protocol { what: &'static str, detail: String },
    /// A StarRocks transaction ended without its rows (a failed load, prepare or commit, an
    /// FE restart): nothing of it is visible, and the flush cycle is loaded again from the
    /// checkpoint under the same label (StarRocks lets an aborted label be used again).
    #[error(
        "StarRocks transaction {label} was aborted ({why}); loading it again from the checkpoint"
    )]
    TxnAborted { label: String, why: String },
    /// A table's columns changed inside a flush cycle that had loaded it: the transaction
    /// was rolled back, and the cycle is loaded again from the checkpoint with the table's
    /// new column list planned from its first load (see `txn::ColumnPlans`).
    #[error(
        "StarRocks transaction {label} is loaded again from the checkpoint with the new column list of {table} from its first load"
    )]
    Replan { label: String, table: String },
    #[error(transparent)]
    Schema(Box<super::ddl::Incompatible>),
    /// Reading the values a partial change left out failed (see `fill`): the flush cycle is
    /// loaded again from the checkpoint.
    #[error(
        "StarRocks did not answer `{statement}`; loading the flush cycle again from the checkpoint"
    )]
    Query {
        statement: String,
        #[source]
        source: super::mysql::MysqlError,
    },
    /// StarRocks answered a `SELECT` of `fill` with an error (no `SELECT` privilege, say):
    /// the flush cycle is loaded again from the checkpoint, and the table's partial changes
    /// that need StarRocks' values load as partial updates for the rest of the run.
    #[error("StarRocks refused to let fill-rows read {table}")]
    SelectRefused {
        table: String,
        #[source]
        source: super::mysql::MysqlError,
    },
    /// A value `fill` read from StarRocks (or a key it would ask for) is not UTF-8, and a
    /// JSON load cannot carry it unchanged: the flush cycle is loaded again from the
    /// checkpoint, and the table's partial changes that need StarRocks' values load as
    /// partial updates for the rest of the run (which keep StarRocks' bytes as they are).
    #[error(
        "a value of {table}.{column} in StarRocks is not UTF-8: a JSON load cannot carry it unchanged"
    )]
    NotUtf8 { table: String, column: String },
    /// A partial change (an unchanged TOAST value, a soft delete without the old row) of a
    /// key StarRocks does not have left out a column whose StarRocks default pgprism cannot
    /// give: `NOT NULL` without a default (StarRocks' own partial update refuses such a row
    /// too), or a default computed per row. Not retried: the replay would meet it again.
    #[error(
        "{table}.{column} in StarRocks is {why}, and a change of a key StarRocks does not have left this column out (an unchanged TOAST value, or a soft delete without the old row): its value cannot be filled; give the StarRocks column a literal default or make it nullable, or copy the table's rows first (an initial snapshot), then restart"
    )]
    NoDefault {
        table: String,
        column: String,
        why: String,
    },
    /// A transaction committed before is still publishing after `cdc.load-timeout-ms`: the
    /// values partial changes left out cannot be read from StarRocks before its rows are
    /// visible (see `fill`).
    #[error(
        "StarRocks transaction {label} is {state}, not yet visible, after cdc.load-timeout-ms; loading the flush cycle again from the checkpoint"
    )]
    NotVisible { label: String, state: String },
    #[error("StarRocks refused `{statement}`")]
    Ddl {
        statement: String,
        #[source]
        source: super::mysql::MysqlError,
    },
    #[error("StarRocks schema change `{statement}` ended {state}: {message}")]
    SchemaChange {
        statement: String,
        state: String,
        message: String,
    },
    #[error(
        "StarRocks refused a transaction on {table}: {message}; StarRocks before 4.0 takes one table per transaction (set cdc.transaction-mode = \"per-table\")"
    )]
    MultiTableUnsupported { table: String, message: String },
}

/// What one attempt ended with.
enum Attempt {
    Done(LoadOutcome),
    Retry(String),
}

/// How a batch ended up in StarRocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    Loaded,
    /// `Publish Timeout`: committed, becomes visible later.
    Committed,
    /// `Label Already Exists` with a finished job: an earlier run loaded it.
    AlreadyLoaded,
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub database: String,
    pub query_port: u16,
    /// Longest wait for an asynchronous schema change job.
    pub schema_change_timeout: Duration,
    pub max_filter_ratio: f64,
    pub attempts_max: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    /// StarRocks transaction timeout (`timeout` and `idle_transaction_timeout` at begin).
    pub txn_timeout: Duration,
}

pub struct StarRocks {
    pub url: StarRocksUrl,
    cfg: SinkConfig,
    agent: ureq::Agent,
    auth: String,
    /// Attempts that were retried, for the stats.
    pub retries: u64,
}

impl From<super::ddl::Incompatible> for LoadError {
    fn from(e: super::ddl::Incompatible) -> LoadError {
        LoadError::Schema(Box::new(e))
    }
}

/// What a call of the Stream Load transaction interface answered (documented fields only).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct TxnReply {
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "ExistingJobStatus")]
    pub existing_job_status: Option<String>,
    #[serde(rename = "NumberFilteredRows")]
    pub filtered_rows: u64,
    #[serde(rename = "ErrorURL")]
    pub error_url: Option<String>,
}

/// The fields of the Stream Load response pgprism reads.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Response {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "Message")]
    message: String,
    #[serde(rename = "ExistingJobStatus")]
    existing_job_status: Option<String>,
    #[serde(rename = "ErrorURL")]
    error_url: Option<String>,
    #[serde(rename = "NumberFilteredRows")]
    filtered_rows: u64,
}

/// ureq's own resolver, skipped for a host that is an IP address. With a timeout set (ours
/// always is), ureq resolves every request's host on a thread it starts for that lookup, an
/// address included: five threads per flush cycle (begin, load, its redirect, prepare,
/// commit), which an initial snapshot makes one cycle per chunk. (ureq marks its resolver
/// interface as outside semver: Cargo.lock pins the version this is written for.)
#[derive(Debug, Default)]
struct LiteralAddress(ureq::unversioned::resolver::DefaultResolver);

impl ureq::unversioned::resolver::Resolver for LiteralAddress {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let ip = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok());
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => None,
        });
        match (ip, port) {
            (Some(ip), Some(port)) => {
                let mut addrs = self.empty();
                addrs.push(std::net::SocketAddr::new(ip, port));
                Ok(addrs)
            }
            _ => self.0.resolve(uri, config, timeout),
        }
    }
}

impl StarRocks {
    pub fn new(url: StarRocksUrl, cfg: SinkConfig) -> StarRocks {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(cfg.timeout))
            .timeout_connect(Some(Duration::from_secs(10)))
            .build();
        let auth = url.authorization();
        StarRocks {
            url,
            cfg,
            agent: ureq::Agent::with_parts(
                config,
                ureq::unversioned::transport::DefaultConnector::default(),
                LiteralAddress::default(),
            ),
            auth,
            retries: 0,
        }
    }

    /// Checks the credentials and that the table exists (FE `GET /api/{db}/{table}/_schema`).
    pub fn check_table(&self, table: &str) -> Result<(), LoadError> {
        let url = format!(
            "{}/api/{}/{}/_schema",
            self.url.base, self.cfg.database, table
        );
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &self.auth)
            .call()
            .map_err(|e| LoadError::Protocol {
                what: "the schema request",
                detail: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        match status {
            401 | 403 => Err(LoadError::Auth {
                user: self.url.user.clone(),
                status,
            }),
            200 if !missing_in(&body) => Ok(()),
            _ => Err(LoadError::TableMissing {
                database: self.cfg.database.clone(),
                table: table.to_string(),
                user: self.url.user.clone(),
            }),
        }
    }

    /// Empties a table (a TRUNCATE in PostgreSQL) over the FE's MySQL-protocol port, with the
    /// same retry policy as loads (TRUNCATE is idempotent).
    pub fn truncate(&mut self, table: &str) -> Result<(), LoadError> {
        let quote = |s: &str| format!("`{}`", s.replace('`', "``"));
        let sql = format!(
            "TRUNCATE TABLE {}.{}",
            quote(&self.cfg.database),
            quote(table)
        );
        let mut delay = self.cfg.backoff;
        let mut last = String::new();
        for attempt in 1..=self.cfg.attempts_max {
            if attempt > 1 {
                self.retries += 1;
                std::thread::sleep(delay);
                delay = (delay * 2).min(self.cfg.backoff_max);
            }
            let result = super::mysql::Mysql::connect(
                &self.url.host,
                self.cfg.query_port,
                &self.url.user,
                &self.url.password,
                Duration::from_secs(30),
            )
            .and_then(|mut c| c.execute(&sql));
            match result {
                Ok(()) => return Ok(()),
                Err(super::mysql::MysqlError::Server { code: 1045, .. }) => {
                    return Err(LoadError::Auth {
                        user: self.url.user.clone(),
                        status: 1045,
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(LoadError::GaveUp {
            table: table.to_string(),
            label: sql,
            attempts: self.cfg.attempts_max,
            last,
        })
    }

    /// Loads one batch, retrying transient failures with backoff under the same label.
    pub fn load(&mut self, batch: &Batch) -> Result<LoadOutcome, LoadError> {
        let mut delay = self.cfg.backoff;
        let mut last = String::new();
        for attempt in 1..=self.cfg.attempts_max {
            if attempt > 1 {
                self.retries += 1;
                tracing::warn!(label = %batch.label, table = %batch.table, attempt, error = %last, "retrying Stream Load");
                std::thread::sleep(delay);
                delay = (delay * 2).min(self.cfg.backoff_max);
            }
            match self.attempt(batch)? {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::Retry(why) => last = why,
            }
        }
        Err(LoadError::GaveUp {
            table: batch.table.clone(),
            label: batch.label.clone(),
            attempts: self.cfg.attempts_max,
            last,
        })
    }

    fn attempt(&self, batch: &Batch) -> Result<Attempt, LoadError> {
        let mut url = format!(
            "{}/api/{}/{}/_stream_load",
            self.url.base, self.cfg.database, batch.table
        );
        // FE → BE: one redirect is the protocol; a few more are tolerated, no loops.
        for _ in 0..4 {
            let mut resp = match self
                .request(&url, batch, &batch.label)
                .send(&batch.body[..])
            {
                Ok(r) => r,
                Err(e) => return Ok(Attempt::Retry(format!("HTTP error: {e}"))),
            };
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let Some(location) = resp.headers().get("location").and_then(|v| v.to_str().ok())
                else {
                    return Err(LoadError::Protocol {
                        what: "a redirect",
                        detail: "no Location header".into(),
                    });
                };
                url = location.to_string();
                continue;
            }
            if status == 401 || status == 403 {
                return Err(LoadError::Auth {
                    user: self.url.user.clone(),
                    status,
                });
            }
            let body = match resp.body_mut().read_to_string() {
                Ok(b) => b,
                Err(e) => return Ok(Attempt::Retry(format!("reading the response: {e}"))),
            };
            if status != 200 {
                return Ok(Attempt::Retry(format!("HTTP {status}: {body}")));
            }
            let parsed: Response = match sonic_rs::from_str(&body) {
                Ok(r) => r,
                Err(e) => return Ok(Attempt::Retry(format!("unreadable response ({e}): {body}"))),
            };
            return outcome(batch, parsed);
        }
        Err(LoadError::Protocol {
            what: "Stream Load",
            detail: "too many redirects".into(),
        })
    }

    /// The Stream Load PUT for `batch` to `url` (the FE, or the BE it redirected to), under
    /// `label` (the batch's own, or the transaction's).
    fn request(
        &self,
        url: &str,
        batch: &Batch,
        label: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let req = self
            .agent
            .put(url)
            .header("Authorization", &self.auth)
            .header("Expect", "100-continue")
            .header("label", label);
        let req = match batch.format {
            BodyFormat::Json => req
                .header("format", "json")
                .header("strip_outer_array", "true")
                .header("Content-Type", "application/json"),
            // PostgreSQL's CSV (see `BodyFormat::Csv`): StarRocks' default separator is a
            // tab, and without `enclose` a quoted field would keep its quotes. No `escape`:
            // StarRocks applies it inside quotes too, and PostgreSQL doubles quotes instead.
            BodyFormat::Csv => req
                .header("format", "csv")
                .header("column_separator", ",")
                .header("enclose", "\"")
                .header("Content-Type", "text/csv"),
        };
        let req = req
            .header("columns", &batch.columns)
            .header("max_filter_ratio", self.cfg.max_filter_ratio.to_string());
        if batch.partial {
            req.header("partial_update", "true")
                .header("partial_update_mode", "row")
        } else {
            req
        }
    }
}

impl StarRocks {
    /// One call of the Stream Load transaction interface (`/api/transaction/{op}`) on the FE,
    /// following its redirect to a BE for `load`. `Err` is a call without an answer (a lost
    /// connection, a timeout): whether it happened is unknown.
    pub(super) fn txn_call(
        &self,
        op: &str,
        label: &str,
        table: Option<&str>,
        batch: Option<&Batch>,
    ) -> Result<TxnReply, String> {
        let mut url = format!("{}/api/transaction/{op}", self.url.base);
        // Whole seconds, rounded up: StarRocks must not abort before the configured time.
        let timeout_s = self
            .cfg
            .txn_timeout
            .as_millis()
            .div_ceil(1000)
            .max(1)
            .to_string();
        for _ in 0..4 {
            let sent = match batch {
                Some(batch) => self
                    .request(&url, batch, label)
                    .header("db", &self.cfg.database)
                    .header("table", &batch.table)
                    .send(&batch.body[..]),
                None => {
                    let mut req = self
                        .agent
                        .post(&url)
                        .header("Authorization", &self.auth)
                        .header("label", label)
                        .header("db", &self.cfg.database);
                    if let Some(table) = table {
                        req = req.header("table", table);
                    }
                    if op == "begin" {
                        req = req
                            .header("timeout", &timeout_s)
                            .header("idle_transaction_timeout", &timeout_s);
                    }
                    req.send_empty()
                }
            };
            let mut resp = sent.map_err(|e| format!("HTTP error: {e}"))?;
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                url = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or("a redirect without Location")?
                    .to_string();
                continue;
            }
            let body = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| format!("reading the answer: {e}"))?;
            if status == 401 || status == 403 {
                return Ok(TxnReply {
                    status: "AUTH".into(),
                    message: format!("HTTP {status}"),
                    ..TxnReply::default()
                });
            }
            if status != 200 {
                return Err(format!("HTTP {status}: {body}"));
            }
            return sonic_rs::from_str(&body)
                .map_err(|e| format!("unreadable answer ({e}): {body}"));
        }
        Err("too many redirects".into())
    }

    /// The state of the load or transaction under `label` (`GET /api/{db}/get_load_state`):
    /// `UNKNOWN`, `PREPARE`, `PREPARED`, `COMMITTED`, `VISIBLE` or `ABORTED`.
    pub(super) fn label_state(&self, label: &str) -> Result<String, String> {
        let url = format!(
            "{}/api/{}/get_load_state?label={label}",
            self.url.base, self.cfg.database
        );
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &self.auth)
            .call()
            .map_err(|e| format!("HTTP error: {e}"))?;
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading the answer: {e}"))?;
        let doc: sonic_rs::Value =
            sonic_rs::from_str(&body).map_err(|e| format!("unreadable answer ({e}): {body}"))?;
        use sonic_rs::JsonValueTrait;
        ["state", "State"]
            .iter()
            .find_map(|k| {
                doc.get(*k)
                    .and_then(|v| v.as_str())
                    .map(str::to_ascii_uppercase)
            })
            .ok_or_else(|| format!("no state in {body}"))
    }

    pub(super) fn config(&self) -> &SinkConfig {
        &self.cfg
    }

    pub(super) fn auth_error(&self, status: u16) -> LoadError {
        LoadError::Auth {
            user: self.url.user.clone(),
            status,
        }
    }
}

impl StarRocks {
    /// A connection to the FE query port.
    fn query_conn(&self) -> Result<super::mysql::Mysql, LoadError> {
        super::mysql::Mysql::connect(
            &self.url.host,
            self.cfg.query_port,
            &self.url.user,
            &self.url.password,
            Duration::from_secs(30),
        )
        .map_err(|source| match source {
            super::mysql::MysqlError::Server { code: 1045, .. } => self.auth_error(1045),
            source => LoadError::Ddl {
                statement: "(connect)".into(),
                source,
            },
        })
    }

    /// Runs one DDL statement and waits for the schema change job it starts (StarRocks runs
    /// ALTER TABLE asynchronously: the statement returns, then the job runs; `SHOW ALTER
    /// TABLE COLUMN` tells its state, and loads with the new columns fail until it finishes).
    pub fn ddl(&self, table: &str, statement: &str) -> Result<(), LoadError> {
        let mut conn = self.query_conn()?;
        let err = |source| LoadError::Ddl {
            statement: statement.to_string(),
            source,
        };
        let jobs_sql = format!(
            "SHOW ALTER TABLE COLUMN FROM {} WHERE TableName = \"{}\"",
            super::ddl::quote(&self.cfg.database),
            table.replace('"', "")
        );
        let before = alter_jobs(&mut conn, &jobs_sql)
            .map_err(err)?
            .iter()
            .map(|j| j.0)
            .max()
            .unwrap_or(0);
        conn.execute(statement).map_err(err)?;
        tracing::info!(%statement, "schema change");
        let deadline = std::time::Instant::now() + self.cfg.schema_change_timeout;
        loop {
            let jobs = alter_jobs(&mut conn, &jobs_sql).map_err(err)?;
            let mine: Vec<_> = jobs.iter().filter(|j| j.0 > before).collect();
            if let Some(bad) = mine.iter().find(|j| j.1 == "CANCELLED") {
                return Err(LoadError::SchemaChange {
                    statement: statement.to_string(),
                    state: bad.1.clone(),
                    message: bad.2.clone(),
                });
            }
            if mine.iter().all(|j| j.1 == "FINISHED") {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(LoadError::SchemaChange {
                    statement: statement.to_string(),
                    state: format!("still {} after cdc.schema-change-timeout-ms", mine[0].1),
                    message: String::new(),
                });
            }
            // Polling interval for a job that takes seconds to hours.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one `SELECT` over the FE query port (see `fill`).
    pub(super) fn query(&self, sql: &str) -> Result<super::mysql::ResultSet, LoadError> {
        self.query_conn()?
            .query(sql)
            .map_err(|source| LoadError::Query {
                statement: sql.chars().take(200).collect(),
                source,
            })
    }

    /// [`StarRocks::query`] with the values as StarRocks sent them (see `fill`).
    pub(super) fn query_raw(&self, sql: &str) -> Result<super::mysql::RawResultSet, LoadError> {
        self.query_conn()?
            .query_raw(sql)
            .map_err(|source| LoadError::Query {
                statement: sql.chars().take(200).collect(),
                source,
            })
    }

    /// StarRocks' columns of `table`: (name, type as `information_schema.columns` says).
    pub fn columns(&self, table: &str) -> Result<Vec<(String, String)>, LoadError> {
        let sql = format!(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.columns WHERE TABLE_SCHEMA = '{}' AND TABLE_NAME = '{}'",
            self.cfg.database.replace('\'', "''"),
            table.replace('\'', "''")
        );
        let (_, rows) = self
            .query_conn()?
            .query(&sql)
            .map_err(|source| LoadError::Ddl {
                statement: sql.clone(),
                source,
            })?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let mut r = r.into_iter();
                Some((r.next()??, r.next().flatten().unwrap_or_default()))
            })
            .collect())
    }

    /// The statements that make the StarRocks table follow `change` (none when it already
    /// does, as after a replay); without `apply` (`schema-changes = "fail"`), an error if
    /// any is needed.
    pub fn plan_schema(
        &self,
        change: &super::ddl::SchemaChange,
        apply: bool,
    ) -> Result<Vec<String>, LoadError> {
        let existing = self.columns(&change.table)?;
        if let Some(blocker) = change.blocker(&existing) {
            return Err(blocker.into());
        }
        let statements = super::ddl::alter_statements(&self.cfg.database, change, &existing, apply);
        if !apply && !statements.is_empty() {
            return Err(super::ddl::Incompatible::Refused {
                table: change.source.clone(),
                what: statements.join("; "),
            }
            .into());
        }
        Ok(statements)
    }
}

/// (JobId, State, Msg) of the schema change jobs `sql` lists.
fn alter_jobs(
    conn: &mut super::mysql::Mysql,
    sql: &str,
) -> Result<Vec<(u64, String, String)>, super::mysql::MysqlError> {
    let (names, rows) = conn.query(sql)?;
    let at = |name: &str| names.iter().position(|n| n.eq_ignore_ascii_case(name));
    let (Some(id), Some(state)) = (at("JobId"), at("State")) else {
        return Ok(Vec::new());
    };
    let msg = at("Msg");
    Ok(rows
        .into_iter()
        .map(|r| {
            let get = |i: Option<usize>| i.and_then(|i| r.get(i).cloned().flatten());
            (
                get(Some(id)).and_then(|v| v.parse().ok()).unwrap_or(0),
                get(Some(state)).unwrap_or_default().to_ascii_uppercase(),
                get(msg).unwrap_or_default(),
            )
        })
        .collect())
}

/// What a Stream Load's JSON answer means for `batch`.
fn outcome(batch: &Batch, parsed: Response) -> Result<Attempt, LoadError> {
    Ok(match parsed.status.as_str() {
        "Success" => Attempt::Done(LoadOutcome::Loaded),
        "Publish Timeout" => Attempt::Done(LoadOutcome::Committed),
        "Label Already Exists" => match parsed.existing_job_status.as_deref() {
            // Still running under this label (an earlier attempt): wait for it.
            Some("RUNNING") | Some("PREPARE") | Some("PREPARED") => {
                Attempt::Retry(format!("label {} is still loading", batch.label))
            }
            _ => Attempt::Done(LoadOutcome::AlreadyLoaded),
        },
        _ if parsed.filtered_rows > 0 || parsed.message.contains("filtered") => {
            return Err(LoadError::Filtered {
                table: batch.table.clone(),
                label: batch.label.clone(),
                message: parsed.message,
                error_url: parsed.error_url,
            });
        }
        other => Attempt::Retry(format!("status {other}: {}", parsed.message)),
    })
}

/// The FE answers a schema request for a missing table with 200 and an error document.
fn missing_in(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    lower.contains("\"status\":404")
        || lower.contains("\"code\":\"404\"")
        || lower.contains("not found")
        || lower.contains("does not exist")
        || lower.contains("unknown table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = StarRocksUrl::parse("http://root:pw@fe:8030/").unwrap();
        assert_eq!(
            (u.base.as_str(), u.user.as_str(), u.password.as_str()),
            ("http://fe:8030", "root", "pw")
        );
        assert!(StarRocksUrl::parse("https://fe").is_err());
        assert!(format!("{u:?}").contains("root") && !format!("{u:?}").contains("pw"));
    }
}
