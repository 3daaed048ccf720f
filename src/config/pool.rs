//! `[pool]`: how client sessions get their primary connections (PgBouncer's names, so its
//! users feel at home), how pgprism authenticates clients when connections are shared, and
//! who may use the admin console.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `pool.mode` (`--pool-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// Each client owns one primary connection for its whole life, and authentication is
    /// relayed to the primary verbatim (transparent; the default).
    #[default]
    Session,
    /// A primary connection is lent to a client from the first statement of a transaction
    /// until the server reports idle, then goes back to the pool; pgprism authenticates the
    /// clients itself.
    Transaction,
}

/// `pool.auth-type`: how pgprism authenticates clients in transaction mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthType {
    /// SCRAM-SHA-256 against the user's secret (a SCRAM secret or a plain password); a user
    /// whose secret is an MD5 hash is asked for MD5 instead, as PostgreSQL does.
    // PostgreSQL's spelling (pg_hba.conf, `--auth-type`); kebab-case alone would make it
    // `scram-sha256`, which the file accepted before and still does.
    #[default]
    #[serde(rename = "scram-sha-256", alias = "scram-sha256")]
    ScramSha256,
    /// MD5 against an MD5 hash or a plain password; a SCRAM secret is asked for SCRAM.
    Md5,
    /// Cleartext password (only sensible over TLS).
    Plain,
    /// No password at all (tests, Unix sockets behind file permissions).
    Trust,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolConfig {
    /// How client sessions get their primary connections.
    pub mode: PoolMode,
    /// Most primary connections per (user, database) for the whole process, however many
    /// shards (`--pool-size`; Frenzy's `--max-conns`).
    pub size: usize,
    /// Connections per (user, database) kept open even when idle (Frenzy's `--min-conns`),
    /// once a client of that pair has logged in (its credentials are needed).
    pub min_size: usize,
    /// Extra connections a pair may open beyond `size` for clients that waited longer than
    /// `reserve-timeout-ms`.
    pub reserve_size: usize,
    /// How long a client waits for a connection before it may use the reserve.
    pub reserve_timeout_ms: u64,
    /// A connection older than this is closed when it comes back (Frenzy's
    /// `--max-conn-lifetime`); 0: never.
    pub server_lifetime_ms: u64,
    /// A connection idle longer than this is closed (Frenzy's `--max-conn-idle-time`);
    /// 0: never.
    pub server_idle_timeout_ms: u64,
    /// A connection pgprism closes keeps its place in `size` until the server has closed its
    /// end too (its backend has left `pg_stat_activity` and no longer counts against
    /// `max_connections`), at most this long; 0: its place is free at once.
    pub server_close_wait_ms: u64,
    /// A client that waits longer than this for a connection gets SQLSTATE 53300 naming the
    /// pool (every wait has a bound: 0 is refused).
    pub query_wait_timeout_ms: u64,
    /// Clients waiting per shard and pair, bounded in two places, each on its own: the
    /// pool's queue (clients waiting for a connection of their own) and, with pipelined
    /// lending (`shared-depth-max` above 1), the line of autocommit statements waiting for
    /// room on a shared connection, whose first client also waits in the pool's queue. So up
    /// to about twice this many clients may wait on one shard. A client that would go beyond
    /// either bound gets 53300 at once.
    pub waiters_max: usize,
    /// A (user, database) pair's pool with no server connection (they close after
    /// `server-idle-timeout-ms`), no client and no `min-size` to keep is removed after it
    /// has been unused this long, on every shard (PgBouncer's `autodb_idle_timeout`); 0:
    /// never. A pair whose first server login failed (a database or user that does not
    /// exist) is removed at once, whatever this says.
    pub pair_idle_timeout_ms: u64,
    /// Most (user, database) pairs with a pool at once, over the whole process (a pair
    /// counts until its pool goes, see `pair-idle-timeout-ms`): a login that would make one
    /// more is refused with 53300 naming this key. Each pair costs a pool per shard and a
    /// row in SHOW POOLS; each pair in use holds a server connection, so a thousand in use
    /// at once need ten times PostgreSQL's default `max_connections`. Raise it for more
    /// databases or users used within `pair-idle-timeout-ms`.
    pub pairs_max: usize,
    /// Run on a connection a client pinned (LISTEN, temporary tables, ...) before it is lent
    /// to anyone else; empty: such a connection is closed instead.
    pub server_reset_query: String,
    /// Run on a connection idle longer than `server-check-delay-ms` before it is lent; empty:
    /// no check.
    pub server_check_query: String,
    /// Idle time after which a connection is checked with `server-check-query` before it
    /// is lent.
    pub server_check_delay_ms: u64,
    /// Server-side prepared statements kept per connection (PgBouncer's
    /// `max_prepared_statements`); the least recently used is closed beyond it.
    pub prepared_statements_max: usize,
    /// Several clients' autocommit statements may share one connection in one write, up to
    /// this many sync points in flight on it (1: one client per connection at a time).
    /// Compare mode (`shadow.url`) needs 1.
    pub shared_depth_max: usize,
    /// How long a shared connection whose statements are all answered waits for the next
    /// one before it goes back to the pool (0: at once). It goes back sooner when a client
    /// waits for a connection of its own, on any shard, or the pool is paused.
    pub shared_linger_us: u64,
    /// How pgprism authenticates clients in transaction mode (session mode relays
    /// authentication to the primary).
    pub auth_type: AuthType,
    /// PgBouncer's userlist format: `"user" "password or md5... or SCRAM-SHA-256$..."` per
    /// line.
    pub auth_file: String,
    /// Run on the primary (as `auth-user`) to find the secret of a user that is not in
    /// `auth-file`; `$1` is the user name. Empty: only `auth-file`.
    pub auth_query: String,
    /// The user `auth-query` runs as; its own secret comes from `auth-file` or the primary
    /// URL's password.
    pub auth_user: String,
    /// Users who may run every console command (`pgbouncer`/`pgprism` virtual databases).
    pub admin_users: Vec<String>,
    /// Users who may run the console's SHOW commands.
    pub stats_users: Vec<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            size: 20,
            min_size: 0,
            reserve_size: 0,
            reserve_timeout_ms: 5_000,
            server_lifetime_ms: 3_600_000,
            server_idle_timeout_ms: 600_000,
            server_close_wait_ms: 2_000,
            query_wait_timeout_ms: 120_000,
            waiters_max: 10_000,
            pair_idle_timeout_ms: 3_600_000,
            pairs_max: 1_000,
            server_reset_query: "DISCARD ALL".into(),
            server_check_query: "SELECT 1".into(),
            server_check_delay_ms: 30_000,
            prepared_statements_max: 200,
            shared_depth_max: 1,
            shared_linger_us: 1_000,
            auth_type: AuthType::ScramSha256,
            auth_file: String::new(),
            auth_query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            auth_user: String::new(),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
        }
    }
}

impl PoolConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("pool.size", self.size),
            ("pool.prepared-statements-max", self.prepared_statements_max),
            ("pool.shared-depth-max", self.shared_depth_max),
            ("pool.waiters-max", self.waiters_max),
            ("pool.pairs-max", self.pairs_max),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "expected at least 1"));
            }
        }
        if self.query_wait_timeout_ms == 0 {
            return Err(ConfigError::key(
                "pool.query-wait-timeout-ms",
                "expected a duration above 0 ms (every wait has a bound)",
            ));
        }
        if self.min_size > self.size {
            return Err(ConfigError::key(
                "pool.min-size",
                format!("expected at most pool.size ({})", self.size),
            ));
        }
        if self.shared_linger_us > 10_000_000 {
            return Err(ConfigError::key(
                "pool.shared-linger-us",
                "expected at most 10000000 (10 s)",
            ));
        }
        if self.shared_depth_max > 1024 {
            return Err(ConfigError::key(
                "pool.shared-depth-max",
                "expected at most 1024",
            ));
        }
        for (key, users) in [
            ("pool.admin-users", &self.admin_users),
            ("pool.stats-users", &self.stats_users),
        ] {
            if users.iter().any(|u| u.is_empty()) {
                return Err(ConfigError::key(key, "a user name is empty"));
            }
        }
        Ok(())
    }
}
