//! Throw-away PostgreSQL servers started from the system binaries, for the integration tests
//! and later for `pgprism embed`/`demo`.
//!
//! This module owns: finding the server binaries ([`PgBinaries`]), a per-version `initdb`
//! template cache shared by every process on the machine, copying that template into a fresh
//! data directory (tmpfs or a given path), spawning `postgres` directly, waiting until it is
//! ready, and stopping it again ([`Instance`]).
//!
//! On top of that, [`Supervisor`] runs named instances with one-for-one restarts, a registry
//! of running servers for cleaning up after a killed pgprism, and [`run_embed`] is
//! `pgprism embed`: instances from the config, an admin endpoint, until SIGTERM.
//!
//! It must never touch a server it did not start (or adopt from the process an upgrade
//! replaced, after checking it is the server that process recorded), never run the server as root (PostgreSQL
//! refuses; we drop to an unprivileged OS user instead), never remove a data directory the
//! caller owns ([`DataDir::Path`]), and never block without a bound: every wait here has a
//! deadline. It is not on the proxy's hot path; it does blocking I/O and must only be used from
//! ordinary threads (tests, the control thread, the CLI), never from a shard.

mod binaries;
mod datadir;
mod instance;
mod process;
mod registry;
mod run;
mod supervisor;
mod template;

use std::io;
use std::path::PathBuf;

pub use binaries::PgBinaries;
pub use datadir::{PASSFILE, generate_password, kept_password};
pub use instance::Instance;
pub use registry::{STATE_DIR_ENV, default_state_dir};
pub use run::{EmbedBound, admin_routes, instance_config, parse_instance_flag, run_embed};
pub use supervisor::{
    InstanceInfo, InstanceState, Supervisor, SupervisorHandle, SupervisorSettings,
};

/// Where an instance keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// A fresh directory under `/dev/shm` (tmpfs), with `fsync=off` and
    /// `full_page_writes=off`; removed when the instance stops.
    Memory,
    /// A directory the caller owns. Created from the template when it is missing or empty,
    /// reused as is when it already holds a cluster (`PG_VERSION`), and kept on stop.
    Path(PathBuf),
}

/// What to start. Build it with `InstanceConfig { name: "x".into(), ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// Shows up in the memory data directory's name; keep it short (socket paths are
    /// limited to 107 bytes).
    pub name: String,
    /// `listen_addresses`, and the host put in URLs.
    pub host: String,
    /// `None` picks a free port (and retries when another process races us to it).
    pub port: Option<u16>,
    pub data: DataDir,
    /// OS user the server runs as when we are root (PostgreSQL refuses to run as root).
    /// `None` means `postgres`. Ignored when we are not root: the server then runs as us.
    pub os_user: Option<String>,
    /// Database superuser created by `initdb`.
    pub superuser: String,
    /// The superuser's password. `Some`: TCP connections authenticate with scram-sha-256
    /// (the password is set through the Unix socket after the start and written to `pgpass`
    /// in the data directory, mode 0600); what pgprism runs for a user (`pgprism embed`,
    /// `pgprism run`, `pgprism demo`) always has one, or any local user could connect as
    /// superuser and run programs as the server's OS user (`COPY ... TO PROGRAM`). `None`:
    /// loopback TCP is trusted, for servers a test starts for itself.
    pub password: Option<String>,
    /// Database in [`Instance::url`]; created after start when it does not exist.
    pub database: String,
    /// Extra `postgresql.conf` settings, applied after the defaults so they win.
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines placed before the default `trust` lines, so they match first.
    pub hba: Vec<String>,
    /// Directory holding `postgres`, `initdb` and `psql`; see [`PgBinaries::locate`].
    pub bindir: Option<PathBuf>,
    /// Bound on the wait for the server to report `ready` in `postmaster.pid`.
    pub start_timeout_ms: u64,
    /// Bound on the wait after the fast-shutdown signal before the server is killed.
    pub stop_timeout_ms: u64,
    /// No parent-death signal: the server outlives this process, for a `pgprism run` that
    /// hands its servers to a new process on an upgrade (a server left by a killed pgprism
    /// is found in the registry and stopped at the next start, or adopted by an upgrade).
    pub outlive_parent: bool,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            name: "pgprism".to_owned(),
            host: "127.0.0.1".to_owned(),
            port: None,
            data: DataDir::Memory,
            os_user: None,
            superuser: "postgres".to_owned(),
            password: None,
            database: "postgres".to_owned(),
            settings: Vec::new(),
            hba: Vec::new(),
            bindir: None,
            start_timeout_ms: 30_000,
            stop_timeout_ms: 10_000,
            outlive_parent: false,
        }
    }
}

/// Everything that can go wrong while locating, preparing, starting or stopping a server.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "PostgreSQL server binaries not found (looked in: {searched}); \
         install them with `apt-get install postgresql`"
    )]
    BinariesNotFound { searched: String },

    #[error(
        "configured PostgreSQL bindir {path} has no `postgres` executable; \
         fix the path or install the server with `apt-get install postgresql`"
    )]
    ConfiguredBindirInvalid { path: PathBuf },

    #[error("could not read the PostgreSQL major version from `{program} --version`: {output:?}")]
    VersionUnknown { program: PathBuf, output: String },

    #[error("OS user {user:?} to run PostgreSQL as (we are root) does not exist")]
    OsUserNotFound { user: String },

    #[error("initdb into {dir} failed ({status}); output tail:\n{output_tail}")]
    InitdbFailed {
        dir: PathBuf,
        status: String,
        output_tail: String,
    },

    #[error(
        "data directory {path} is not empty and holds no PostgreSQL cluster; refusing to use it"
    )]
    DataDirNotEmpty { path: PathBuf },

    #[error(
        "the server in {data_dir} has no Unix socket (unix_socket_directories is empty, or the \
         data directory's path is too long for one), which pgprism needs to set the \
         superuser's password"
    )]
    NoSocketForPassword { data_dir: PathBuf },

    #[error("timed out after {waited_ms} ms waiting for the template lock {path}")]
    TemplateLockTimeout { path: PathBuf, waited_ms: u64 },

    #[error("port {port} on {host} is already in use; log tail:\n{log_tail}")]
    PortInUse {
        host: String,
        port: u16,
        log_tail: String,
    },

    #[error("server in {data_dir} not ready after {waited_ms} ms; log tail:\n{log_tail}")]
    StartTimeout {
        data_dir: PathBuf,
        waited_ms: u64,
        log_tail: String,
    },

    #[error("server in {data_dir} exited during startup ({status}); log tail:\n{log_tail}")]
    ChildExited {
        data_dir: PathBuf,
        status: String,
        log_tail: String,
    },

    #[error("psql failed ({status}); stderr:\n{stderr}")]
    PsqlFailed { status: String, stderr: String },

    #[error("no instance named `{name}`")]
    UnknownInstance { name: String },

    #[error("an instance named `{name}` already exists")]
    DuplicateInstance { name: String },

    #[error("invalid instance name: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("the embed supervisor thread is gone")]
    SupervisorGone,

    #[error("invalid embed configuration")]
    Config(#[source] crate::config::ConfigError),

    #[error("cannot start the admin endpoint on {addr}")]
    Admin {
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error("could not run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl EmbedError {
    /// Adapter for `map_err` that names the operation and the path involved.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}
