//! Client authentication when pgprism, not the primary, authenticates clients (transaction
//! pooling and the admin console): where a user's secret comes from (`pool.auth-file`, then
//! `pool.auth-query` on the primary, cached per shard), and the console's shared state.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::session::{ShardCtx, error_bytes};
use crate::config::AuthType;
use crate::exec::net::Stream;
use crate::stats::ShardStats;
use crate::stats::pools::PoolBoard;
use crate::wire::{Secret, ServerLogin, sqlstate};

/// How long a secret found by `auth-query` is trusted before it is asked again.
const AUTH_QUERY_CACHE: Duration = Duration::from_secs(60);
/// User names remembered per shard (beyond it the cache starts over).
const AUTH_QUERY_CACHE_MAX: usize = 10_000;
/// `auth-query` lookups running at once per shard; beyond it a login fails (28P01) rather
/// than open yet another primary connection for a client that has not authenticated.
const AUTH_QUERY_CONCURRENT_MAX: usize = 8;

/// A shard's view of the users' secrets.
pub struct Secrets {
    pub auth_type: AuthType,
    userlist: Option<Arc<super::credentials::Userlist>>,
    auth_query: String,
    auth_user: String,
    /// auth-query results: user → (secret, when read).
    cache: RefCell<HashMap<String, (Option<Secret>, Instant)>>,
    /// Lookups running now.
    lookups: std::cell::Cell<usize>,
}

impl Secrets {
    pub fn new(
        auth_type: AuthType,
        userlist: Option<Arc<super::credentials::Userlist>>,
        auth_query: String,
        auth_user: String,
    ) -> Secrets {
        Secrets {
            auth_type,
            userlist,
            auth_query,
            auth_user,
            cache: RefCell::new(HashMap::new()),
            lookups: std::cell::Cell::new(0),
        }
    }

    /// `user`'s secret: the auth file first, then the auth query (cached).
    async fn find(&self, shard: &ShardCtx, user: &str, fresh: bool) -> Option<Secret> {
        if let Some(secret) = self.userlist.as_ref().and_then(|u| u.get(user)) {
            return Some(secret.clone());
        }
        if self.auth_query.is_empty() || self.auth_user.is_empty() {
            return None;
        }
        if !fresh
            && let Some((secret, at)) = self.cache.borrow().get(user)
            && at.elapsed() < AUTH_QUERY_CACHE
        {
            return secret.clone();
        }
        // Unauthenticated clients choose the user names: bound what they can make pgprism
        // do (lookups at once, and names remembered).
        if self.lookups.get() >= AUTH_QUERY_CONCURRENT_MAX {
            return None;
        }
        let pools = shard.pools.as_ref()?;
        let up = &pools.upstream;
        // The auth user logs in with its own secret from the auth file, or the primary
        // URL's password.
        let login = match self.userlist.as_ref().and_then(|u| u.get(&self.auth_user)) {
            Some(secret) => secret.server_login(),
            None if up.url_user == self.auth_user && !up.url_password.is_empty() => {
                ServerLogin::Password(up.url_password.clone())
            }
            None => ServerLogin::None,
        };
        let database = "postgres";
        let addr = up.addr.get();
        let target = super::credentials::AuthQuery {
            addr: &addr,
            limit: up.connect_timeout,
            query: &self.auth_query,
            database,
            auth_user: &self.auth_user,
            login: &login,
            message_bytes_max: up.message_bytes_max,
            tls: &up.tls,
        };
        self.lookups.set(self.lookups.get() + 1);
        let found = super::credentials::lookup(&target, user).await;
        self.lookups.set(self.lookups.get() - 1);
        match found {
            Ok(secret) => {
                if self.cache.borrow().len() >= AUTH_QUERY_CACHE_MAX {
                    self.cache.borrow_mut().clear();
                }
                self.cache
                    .borrow_mut()
                    .insert(user.to_string(), (secret.clone(), Instant::now()));
                secret
            }
            Err(err) => {
                tracing::warn!(
                    shard = shard.index,
                    error = %crate::config::error_text(&err),
                    "pool.auth-query failed"
                );
                None
            }
        }
    }
}

/// Authenticates a pooled (or console) client; `None` when it failed (the client was told).
pub(super) async fn authenticate_client(
    shard: &ShardCtx,
    client: &Stream,
    buf: &mut BytesMut,
    user: &str,
    deadline: Instant,
) -> Option<ServerLogin> {
    let secrets = shard.secrets.as_ref()?;
    let secret = if secrets.auth_type == AuthType::Trust {
        None
    } else {
        secrets.find(shard, user, false).await
    };
    let limit = deadline.saturating_duration_since(Instant::now());
    let max = shard.settings.message_bytes_max;
    let exchange =
        super::auth::authenticate(client, buf, user, secret.as_ref(), secrets.auth_type, max);
    match crate::exec::within(limit, exchange).await {
        Some(Ok(login)) => Some(login),
        Some(Err(_)) => {
            ShardStats::bump(&shard.stats.counters.auth_failures, 1);
            None
        }
        None => {
            ShardStats::bump(&shard.stats.counters.startup_timeouts, 1);
            let msg = error_bytes(
                "FATAL",
                sqlstate::PROTOCOL_VIOLATION,
                "authentication not completed within proxy.startup-timeout-ms",
            );
            client.write_now(&msg);
            None
        }
    }
}

/// Process-wide console state: what every shard publishes, and the actions the console asks
/// of every shard (applied at their next care tick).
pub struct ConsoleCtx {
    pub board: PoolBoard,
    /// The configuration in force: the file's and the flags', then the console's SETs.
    config: std::sync::Mutex<Arc<crate::config::Config>>,
    /// Bumped by each SET, after `config` changed: each shard then takes `config`'s `[pool]`
    /// keys for its pools.
    pub settings: AtomicU64,
    pub started: std::time::SystemTime,
    /// PAUSE without a database: every pool stops lending.
    pub paused_all: AtomicBool,
    /// PAUSE of single databases.
    pub paused: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Bumped by RECONNECT: each shard closes its connections once it sees a new value.
    pub reconnects: AtomicU64,
    /// Bumped by KILL, after `killed`: each shard then closes the pooled clients of every
    /// database whose count in `killed` it has not seen yet.
    pub kills: AtomicU64,
    /// How many times each database was killed (only known databases: bounded by them), so
    /// that two KILLs between two looks of a shard both take effect.
    pub killed: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Each shard's mirrors, as it last published them.
    pub mirrors: std::sync::Mutex<Vec<Vec<super::console::MirrorRow>>>,
    /// Each shard's compare counters, as it last published them.
    pub compare: std::sync::Mutex<Vec<Option<super::console::CompareRow>>>,
}

impl ConsoleCtx {
    pub fn new(config: crate::config::Config, shards: usize) -> ConsoleCtx {
        ConsoleCtx {
            board: PoolBoard::new(shards),
            config: std::sync::Mutex::new(Arc::new(config)),
            settings: AtomicU64::new(0),
            started: std::time::SystemTime::now(),
            paused_all: AtomicBool::new(false),
            paused: std::sync::Mutex::new(Default::default()),
            reconnects: AtomicU64::new(0),
            kills: AtomicU64::new(0),
            killed: std::sync::Mutex::new(Default::default()),
            mirrors: std::sync::Mutex::new(vec![Vec::new(); shards]),
            compare: std::sync::Mutex::new(vec![None; shards]),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<crate::config::Config> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Console SET of `key` (a `pool.` key path, as [`super::console::Action::Set`] names
    /// it): the `[pool]` table in force with that one value replaced, read back through the
    /// same deserializer and checks as the file, is in force for the console at once and for
    /// every shard's pools at its next care tick. `Err`: why not; nothing changed.
    pub fn set(&self, key: &str, value: super::console::SetValue) -> Result<(), String> {
        use super::console::SetValue;
        let Some(name) = key.strip_prefix("pool.") else {
            return Err(format!("{key} is not a [pool] key"));
        };
        let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = match toml::Value::try_from(&config.pool) {
            Ok(toml::Value::Table(table)) => table,
            _ => return Err("the [pool] table in force cannot be written out".into()),
        };
        let value = match value {
            SetValue::Number(n) => toml::Value::Integer(
                i64::try_from(n).map_err(|_| format!("{key}: {n} is too large"))?,
            ),
            SetValue::Text(text) => toml::Value::String(text),
            SetValue::Users(users) => {
                toml::Value::Array(users.into_iter().map(toml::Value::String).collect())
            }
        };
        if table.insert(name.to_string(), value).is_none() {
            return Err(format!("{key} is not a [pool] key"));
        }
        let pool: crate::config::PoolConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| format!("{key}: {}", e.message()))?;
        pool.validate().map_err(|e| crate::config::error_text(&e))?;
        let mut changed = (**config).clone();
        changed.pool = pool;
        *config = Arc::new(changed);
        drop(config);
        self.settings.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Whether `database`'s pools are paused.
    pub fn is_paused(&self, database: &str) -> bool {
        self.paused_all.load(Ordering::Acquire)
            || self
                .paused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(database)
    }

    /// The databases paused one by one (for the shards' pools).
    pub fn paused_databases(&self) -> Vec<String> {
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A shard's mirrors and compare counters, for SHOW MIRRORS / COMPARE.
    pub fn publish_modes(
        &self,
        shard: usize,
        mirrors: Vec<super::console::MirrorRow>,
        compare: Option<super::console::CompareRow>,
    ) {
        if let Some(slot) = self
            .mirrors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(shard)
        {
            *slot = mirrors;
        }
        if let Some(slot) = self
            .compare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(shard)
        {
            *slot = compare;
        }
    }
}

/// The console as the shard serving it sees the process.
struct View<'a> {
    shard: &'a ShardCtx,
    ctx: &'a ConsoleCtx,
}

impl super::console::ConsoleView for View<'_> {
    fn shards(&self) -> Vec<crate::stats::pools::ShardPools> {
        if let Some(pools) = &self.shard.pools {
            // This shard's part is fresh; the others' are at most a care tick old.
            super::pooled::publish(self.shard, pools);
        }
        self.ctx.board.read()
    }

    fn config(&self) -> Arc<crate::config::Config> {
        self.ctx.config()
    }

    fn started(&self) -> std::time::SystemTime {
        self.ctx.started
    }

    fn mirrors(&self) -> Vec<super::console::MirrorRow> {
        let shards = self.ctx.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: Vec<super::console::MirrorRow> = Vec::new();
        for rows in shards.iter() {
            for row in rows {
                match total.iter_mut().find(|t| t.name == row.name) {
                    None => total.push(row.clone()),
                    Some(t) => {
                        t.sessions += row.sessions;
                        t.statements += row.statements;
                        t.rows += row.rows;
                        t.errors += row.errors;
                        t.bytes += row.bytes;
                        t.skipped += row.skipped;
                        t.transactions_cut += row.transactions_cut;
                        t.timeouts += row.timeouts;
                        t.reconnects += row.reconnects;
                        t.connect_failures += row.connect_failures;
                        t.queue_messages += row.queue_messages;
                        t.queue_bytes += row.queue_bytes;
                        t.lag_us = t.lag_us.max(row.lag_us);
                        // Quantiles do not add: the worst shard's stands for all.
                        t.latency_p50_us = t.latency_p50_us.max(row.latency_p50_us);
                        t.latency_p99_us = t.latency_p99_us.max(row.latency_p99_us);
                        t.latency_max_us = t.latency_max_us.max(row.latency_max_us);
                    }
                }
            }
        }
        total
    }

    fn compare(&self) -> Option<super::console::CompareRow> {
        let shards = self.ctx.compare.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: Option<super::console::CompareRow> = None;
        for row in shards.iter().flatten() {
            let t = total.get_or_insert_with(Default::default);
            t.statements += row.statements;
            t.mismatches += row.mismatches;
            t.skipped += row.skipped;
            t.slow += row.slow;
            t.explains += row.explains;
            t.fallbacks += row.fallbacks;
            t.shadow_connect_failures += row.shadow_connect_failures;
            t.shadow_lost += row.shadow_lost;
            t.shadow_timeouts += row.shadow_timeouts;
        }
        total
    }

    fn act(&self, action: super::console::Action) -> Result<Option<String>, String> {
        use super::console::Action;
        let known = |db: &str| self.knows_database(db);
        match action {
            Action::Pause(None) => {
                self.ctx.paused_all.store(true, Ordering::Release);
                self.apply_now();
                Ok(None)
            }
            Action::Pause(Some(db)) => {
                if !known(&db) {
                    return Err(format!("no such database: {db}"));
                }
                self.ctx
                    .paused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(db);
                self.apply_now();
                Ok(None)
            }
            Action::Resume(None) => {
                let was = self.ctx.paused_all.swap(false, Ordering::AcqRel);
                let mut dbs = self.ctx.paused.lock().unwrap_or_else(|e| e.into_inner());
                if !was && dbs.is_empty() {
                    return Err("pooler is not paused/suspended".into());
                }
                dbs.clear();
                drop(dbs);
                self.apply_now();
                Ok(None)
            }
            Action::Resume(Some(db)) => {
                let removed = self
                    .ctx
                    .paused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&db);
                if !removed {
                    return Err(format!("database {db} is not paused"));
                }
                self.apply_now();
                Ok(None)
            }
            Action::Reconnect(db) => {
                if let Some(db) = db.filter(|db| !known(db)) {
                    return Err(format!("no such database: {db}"));
                }
                self.ctx.reconnects.fetch_add(1, Ordering::AcqRel);
                Ok(None)
            }
            Action::Kill(db) => {
                if !known(&db) {
                    return Err(format!("no such database: {db}"));
                }
                *self
                    .ctx
                    .killed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(db)
                    .or_default() += 1;
                self.ctx.kills.fetch_add(1, Ordering::AcqRel);
                Ok(None)
            }
            Action::Reload => {
                // As SIGHUP: the control thread rereads the file.
                // SAFETY: sending a signal to our own process.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGHUP);
                }
                Ok(None)
            }
            Action::Shutdown => {
                // SAFETY: as above; SIGTERM drains and exits.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
                Ok(None)
            }
            Action::Set { key, value } => {
                self.ctx.set(key, value)?;
                // This shard at once (the others at their next care tick).
                if let Some(pools) = &self.shard.pools {
                    pools.set_cfg(self.ctx.config().pool.clone());
                }
                Ok(None)
            }
        }
    }
}

impl View<'_> {
    /// Whether KILL, PAUSE or RECONNECT of `database` names a database pgprism knows: the
    /// primary URL's, or one some client logged in to (or tried), on any shard, from the
    /// moment its pool was made. (The snapshots lag by up to a publishing tick: a KILL right
    /// after a database's first client connected was "no such database".)
    fn knows_database(&self, database: &str) -> bool {
        let configured = crate::config::PgUrl::parse(&self.ctx.config().primary.url)
            .ok()
            .and_then(|url| url.database)
            .is_some_and(|db| db == database);
        configured
            || self
                .shard
                .pools
                .as_ref()
                .is_some_and(|pools| pools.knows_database(database))
    }

    /// This shard applies a PAUSE/RESUME at once (the others at their next care tick).
    fn apply_now(&self) {
        if let Some(pools) = &self.shard.pools {
            pools.set_paused(
                self.ctx.paused_all.load(Ordering::Acquire),
                self.ctx.paused_databases(),
            );
        }
    }
}

/// A console session, once authenticated: the welcome, then the console itself.
pub(super) async fn serve_console(shard: &Rc<ShardCtx>, client: Stream, user: &str, buf: BytesMut) {
    let Some(ctx) = shard.console.clone() else {
        return;
    };
    let id = shard.next_session_id();
    let mut hello = BytesMut::new();
    crate::wire::encode::authentication_ok(&mut hello);
    super::console::welcome(&mut hello);
    let (pid, secret) = (i32::MIN + id as i32 % 1_000_000, 0);
    crate::wire::encode::backend_key_data(&mut hello, pid, secret);
    crate::wire::encode::ready_for_query(&mut hello, crate::wire::TransactionStatus::Idle);
    if client.write_all(&hello).await.is_err() {
        return;
    }
    let state = Rc::new(super::pooled::ClientState::new(
        id,
        user,
        "pgbouncer",
        &client,
        &[],
        pid,
    ));
    state.busy.set(true);
    let _registration = shard.register_pooled(id, &client, state);
    let view = View { shard, ctx: &ctx };
    let limits = super::console::ConsoleLimits {
        message_bytes_max: shard.settings.message_bytes_max,
        read_chunk_bytes: shard.read_chunk_bytes(),
    };
    if let Err(err) = super::console::serve(&client, buf, user, &view, &limits).await {
        tracing::debug!(shard = shard.index, error = %crate::config::error_text(&err), "console session ended");
    }
}

#[cfg(test)]
mod tests {
    use super::super::console::SetValue;
    use super::*;

    #[test]
    fn set_replaces_one_pool_key_after_the_files_checks_or_changes_nothing() {
        let ctx = ConsoleCtx::new(crate::config::Config::default(), 2);
        ctx.set("pool.size", SetValue::Number(5)).unwrap();
        ctx.set("pool.server-lifetime-ms", SetValue::Number(90_000))
            .unwrap();
        ctx.set(
            "pool.stats-users",
            SetValue::Users(vec!["a".into(), "b".into()]),
        )
        .unwrap();
        ctx.set("pool.server-reset-query", SetValue::Text("SELECT 1".into()))
            .unwrap();
        let config = ctx.config();
        let pool = &config.pool;
        assert_eq!(pool.size, 5);
        assert_eq!(pool.server_lifetime_ms, 90_000);
        assert_eq!(pool.stats_users, ["a", "b"]);
        assert_eq!(pool.server_reset_query, "SELECT 1");
        assert_eq!(ctx.settings.load(Ordering::Acquire), 4, "one bump per SET");
        // The key the message names, and a word of the reason itself.
        for (key, value, named, why) in [
            ("pool.size", SetValue::Number(0), "pool.size", "at least 1"),
            (
                "pool.min-size",
                SetValue::Number(6),
                "pool.min-size",
                "at most",
            ),
            (
                "pool.size",
                SetValue::Number(u64::MAX),
                "pool.size",
                "too large",
            ),
            (
                "pool.size",
                SetValue::Text("x".into()),
                "pool.size",
                "invalid type",
            ),
            (
                "pool.no-such-key",
                SetValue::Number(1),
                "pool.no-such-key",
                "not a [pool] key",
            ),
            (
                "proxy.backlog",
                SetValue::Number(1),
                "proxy.backlog",
                "not a [pool] key",
            ),
        ] {
            let err = ctx.set(key, value).expect_err(key);
            assert!(err.contains(named) && err.contains(why), "{key}: {err}");
        }
        assert_eq!(ctx.config().pool.size, 5, "refused SETs change nothing");
        assert_eq!(ctx.settings.load(Ordering::Acquire), 4);
    }
}
