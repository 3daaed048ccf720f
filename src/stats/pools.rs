//! What each shard's pools look like right now, published for the admin console (`SHOW
//! POOLS`, `CLIENTS`, `SERVERS`, ...), which any shard may serve. Shards publish a fresh
//! snapshot on every metrics report and whenever the console asks (cold path: a mutex, never
//! touched by a running session).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One (user, database) pool on one shard.
#[derive(Debug, Clone, Default)]
pub struct PoolRow {
    pub database: String,
    pub user: String,
    /// `session` or `transaction`.
    pub pool_mode: &'static str,
    /// Clients linked to a server connection (lent one, or pinned).
    pub cl_active: u64,
    /// Clients waiting for a connection.
    pub cl_waiting: u64,
    /// Clients logged in and holding none (between transactions).
    pub cl_idle: u64,
    pub sv_active: u64,
    pub sv_idle: u64,
    /// Idle connections that need the check query before lending (idle beyond
    /// `server-check-delay-ms`).
    pub sv_used: u64,
    pub sv_tested: u64,
    /// Connections being opened.
    pub sv_login: u64,
    /// The longest current wait of a client, in microseconds.
    pub maxwait_us: u64,
    /// Pinned clients (LISTEN, temporary tables, session advisory locks, WITH HOLD cursors).
    pub pinned: u64,
    /// The per-process bound (`pool.size`) and this shard's open connections.
    pub pool_size: u64,
    pub reserve_size: u64,
    pub min_size: u64,
    /// Cumulative: transactions and statements run, bytes each way, time in transactions
    /// and statements and time waited for a connection, in microseconds.
    pub xact_count: u64,
    pub query_count: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
    /// Cumulative: connections opened and closed, lends, waits that timed out (53300),
    /// clients pinned, prepared statements prepared on a server connection on demand,
    /// settings applied on lending.
    pub servers_opened: u64,
    pub servers_closed: u64,
    pub lends: u64,
    pub wait_timeouts: u64,
    pub pins: u64,
    pub reprepares: u64,
    pub settings_applied: u64,
}

/// One client connection (pooled sessions and console sessions).
#[derive(Debug, Clone)]
pub struct ClientRow {
    /// pgprism's id of the session (`ptr` in PgBouncer's SHOW CLIENTS).
    pub id: u64,
    pub shard: usize,
    pub user: String,
    pub database: String,
    /// `active`, `waiting`, `idle` (PgBouncer: `active` for both linked and idle logged-in
    /// clients, `waiting` while queued).
    pub state: &'static str,
    pub addr: String,
    pub port: u16,
    pub local_addr: String,
    pub local_port: u16,
    pub connect_time: SystemTime,
    pub request_time: SystemTime,
    pub wait_us: u64,
    /// The server connection lent to it, if any (its id).
    pub link: Option<u64>,
    /// The BackendKeyData pid pgprism gave the client.
    pub remote_pid: i32,
    pub tls: bool,
    pub application_name: String,
    pub pinned: Option<&'static str>,
}

/// One server connection of a pool.
#[derive(Debug, Clone)]
pub struct ServerRow {
    pub id: u64,
    pub shard: usize,
    pub user: String,
    pub database: String,
    /// `active`, `idle`, `used`, `tested`, `login`.
    pub state: &'static str,
    pub addr: String,
    pub port: u16,
    pub local_addr: String,
    pub local_port: u16,
    pub connect_time: SystemTime,
    pub request_time: SystemTime,
    /// The client it is lent to, if any.
    pub link: Option<u64>,
    /// The server's own backend pid.
    pub remote_pid: i32,
    pub tls: bool,
    pub prepared_statements: u64,
}

/// One shard's pools, clients and servers at `taken`.
#[derive(Debug, Clone, Default)]
pub struct ShardPools {
    pub shard: usize,
    pub taken: Option<SystemTime>,
    pub paused: bool,
    pub pools: Vec<PoolRow>,
    pub clients: Vec<ClientRow>,
    pub servers: Vec<ServerRow>,
}

/// Where the shards publish their snapshots; shared by every shard and the control thread.
#[derive(Debug, Default, Clone)]
pub struct PoolBoard {
    shards: Arc<Mutex<Vec<ShardPools>>>,
}

impl PoolBoard {
    pub fn new(shards: usize) -> PoolBoard {
        PoolBoard {
            shards: Arc::new(Mutex::new(
                (0..shards)
                    .map(|shard| ShardPools {
                        shard,
                        ..ShardPools::default()
                    })
                    .collect(),
            )),
        }
    }

    pub fn publish(&self, snapshot: ShardPools) {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = shards.get_mut(snapshot.shard) {
            *slot = snapshot;
        }
    }

    /// Every shard's latest snapshot.
    pub fn read(&self) -> Vec<ShardPools> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
