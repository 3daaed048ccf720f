//! One running PostgreSQL server: start (template copy, settings, spawn, readiness), the
//! `psql` helper, and stop. Owns its child process and, for memory instances, its data
//! directory; never outlives the thread that started it (see [`Instance::start`]).

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::binaries::PgBinaries;
use super::datadir;
use super::process::{self, OsUser};
use super::template;
use super::{DataDir, EmbedError, InstanceConfig};
use crate::wire::{SCRAM_ITERATIONS_DEFAULT, ScramSecret};

/// Bound on start attempts when we pick the port and other processes keep taking it first.
const PORT_ATTEMPTS_MAX: u32 = 10;
/// `postmaster.pid` is polled this often while waiting for `ready`.
const READY_POLL_MS: u64 = 5;
/// Line 8 of `postmaster.pid` once the server accepts connections (PM_STATUS_READY).
const PM_STATUS_READY: &str = "ready";

/// A running PostgreSQL server started by [`Instance::start`]. Dropping it stops the server.
#[derive(Debug)]
pub struct Instance {
    /// `None` once stopped, so `Drop` after `stop` does nothing.
    child: Option<Child>,
    /// A server an upgrade's predecessor started, supervised here ([`Instance::adopt`]).
    adopted: Option<process::Adopted>,
    host: String,
    port: u16,
    data_dir: PathBuf,
    /// Memory instances remove their directory when they stop.
    memory: bool,
    superuser: String,
    /// The superuser's password on TCP (`None`: loopback TCP is trusted).
    password: Option<String>,
    database: String,
    psql_path: PathBuf,
    stop_timeout: Duration,
    /// The directory of the server's Unix socket, if it has one.
    socket_dir: Option<PathBuf>,
}

impl Instance {
    /// Starts a server and waits until it accepts connections.
    ///
    /// The server gets a parent-death signal so it does not outlive a crashed test process;
    /// Linux sends it when the *thread* that spawned the server exits. Call this from a
    /// thread that outlives the instance (a test's own thread is fine; a short-lived helper
    /// thread is not).
    pub fn start(cfg: InstanceConfig) -> Result<Instance, EmbedError> {
        let started = Instant::now();
        let bins = PgBinaries::locate(cfg.bindir.as_deref())?;
        let run_as = process::server_user(cfg.os_user.as_deref())?;
        let template = template::ensure(&bins, &cfg.superuser, run_as.as_ref())?;
        let (data_dir, memory) = match &cfg.data {
            DataDir::Memory => {
                datadir::sweep_stale_memory_dirs();
                (datadir::new_memory_path(&cfg.name), true)
            }
            DataDir::Path(path) => {
                let absolute =
                    std::path::absolute(path).map_err(EmbedError::io("resolve", path))?;
                (absolute, false)
            }
        };
        let result = start_in(&cfg, &bins, run_as.as_ref(), &template, &data_dir, memory);
        if result.is_err() && memory {
            datadir::remove_memory_dir(&data_dir);
        }
        let (child, port) = result?;
        let psql = bins.program("psql");
        let socket_dir = socket_dir_of(&cfg, &data_dir);
        let mut instance = Instance {
            child: Some(child),
            adopted: None,
            host: cfg.host.clone(),
            port,
            data_dir,
            memory,
            superuser: cfg.superuser.clone(),
            password: None,
            // initdb always creates `postgres`; use it until cfg.database surely exists.
            database: "postgres".to_owned(),
            psql_path: if psql.is_file() {
                psql
            } else {
                PathBuf::from("psql")
            },
            stop_timeout: Duration::from_millis(cfg.stop_timeout_ms),
            socket_dir,
        };
        // Dropping `instance` on error stops the server again.
        if let Some(password) = &cfg.password {
            instance.set_password(password, run_as.as_ref())?;
        }
        instance.ensure_database(&cfg.database)?;
        instance.database = cfg.database;
        tracing::debug!(
            port,
            data_dir = %instance.data_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "PostgreSQL started"
        );
        Ok(instance)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket `.s.PGSQL.<port>` (libpq's `host` for
    /// a local connection); `None` when it listens on TCP only.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.socket_dir.as_deref()
    }

    /// Takes over a running server that another pgprism started (the process an upgrade
    /// replaced): `pid` is its postmaster, checked by the caller against the registry; its
    /// `postmaster.pid` must name it and say it is ready. Its password is the configured one,
    /// else the one its `pgpass` keeps. From here on it is supervised and stopped like one
    /// this process started.
    pub fn adopt(
        cfg: &InstanceConfig,
        pid: u32,
        data_dir: PathBuf,
        port: u16,
        memory: bool,
    ) -> Result<Instance, EmbedError> {
        let bins = PgBinaries::locate(cfg.bindir.as_deref())?;
        let pidfile = data_dir.join("postmaster.pid");
        let text = fs::read_to_string(&pidfile).map_err(EmbedError::io("read", &pidfile))?;
        let lines: Vec<&str> = text.lines().collect();
        let named = lines.first().and_then(|l| l.trim().parse::<u32>().ok());
        let ready = lines.get(7).is_some_and(|l| l.trim() == PM_STATUS_READY);
        if named != Some(pid) || !ready {
            return Err(EmbedError::io("adopt the server in", &data_dir)(
                std::io::Error::other(format!(
                    "postmaster.pid names {named:?} (not {pid}) or the server is not ready"
                )),
            ));
        }
        let adopted = process::Adopted::open(pid)
            .map_err(EmbedError::io("open a pidfd on the server in", &data_dir))?;
        let psql = bins.program("psql");
        let password = cfg
            .password
            .clone()
            .or_else(|| datadir::kept_password(&data_dir));
        Ok(Instance {
            child: None,
            adopted: Some(adopted),
            host: cfg.host.clone(),
            port,
            socket_dir: socket_dir_of(cfg, &data_dir),
            data_dir,
            memory,
            superuser: cfg.superuser.clone(),
            password,
            database: cfg.database.clone(),
            psql_path: if psql.is_file() {
                psql
            } else {
                PathBuf::from("psql")
            },
            stop_timeout: Duration::from_millis(cfg.stop_timeout_ms),
        })
    }

    /// Lets go of the server without stopping it (an upgrade hands it to the new process,
    /// which adopts it): no signal, the data directory stays, and nothing reaps it here.
    pub fn release(mut self) {
        // The handle goes; the process does not (dropping a `Child` neither kills nor waits).
        drop(self.child.take());
        drop(self.adopted.take());
    }

    /// Process id of the postmaster; 0 once stopped.
    pub fn pid(&self) -> u32 {
        match (&self.child, &self.adopted) {
            (Some(child), _) => child.id(),
            (None, Some(adopted)) => adopted.pid(),
            (None, None) => 0,
        }
    }

    /// How the server ended once it has exited on its own (crashed, killed), for the log;
    /// `None` while it runs. Never blocks.
    pub fn exited(&mut self) -> Result<Option<String>, EmbedError> {
        if let Some(adopted) = &self.adopted {
            // Not our child: its exit status is its parent's to read.
            return Ok(adopted
                .exited_within(Duration::ZERO)
                .then(|| "server exited unexpectedly".to_owned()));
        }
        Ok(self
            .exit_status()?
            .map(|status| format!("server exited unexpectedly ({status})")))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the data lives in a memory directory (removed on stop).
    pub fn is_memory(&self) -> bool {
        self.memory
    }

    /// `Some` once the server has exited on its own (crashed, killed); reaps it then.
    /// `None` while it runs. Never blocks.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>, EmbedError> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(EmbedError::io("wait for server in", &self.data_dir)),
            None => Ok(None),
        }
    }

    /// The `psql` this instance uses (from the server's bindir, else `psql` on PATH).
    pub fn psql_path(&self) -> &Path {
        &self.psql_path
    }

    /// `postgres://superuser[:password]@host:port/database`, to connect with.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => self.url_for(&self.superuser, password, &self.database),
            None => self.url_without_password(),
        }
    }

    /// `postgres://superuser@host:port/database`, to show (the password is in
    /// [`Instance::passfile`]).
    pub fn url_without_password(&self) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            percent_encode(&self.superuser),
            url_host(&self.host),
            self.port,
            percent_encode(&self.database)
        )
    }

    /// The superuser's password on TCP; `None` when loopback TCP is trusted.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The passfile holding the superuser's password (libpq's format), when it has one.
    pub fn passfile(&self) -> Option<PathBuf> {
        self.password
            .as_ref()
            .map(|_| self.data_dir.join(datadir::PASSFILE))
    }

    pub fn url_for(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            percent_encode(user),
            percent_encode(password),
            url_host(&self.host),
            self.port,
            percent_encode(database)
        )
    }

    /// Runs SQL with the system `psql` as the superuser (unaligned, tuples only, stop on the
    /// first error) and returns its stdout.
    pub fn psql(&self, sql: &str) -> Result<String, EmbedError> {
        run_psql(
            &self.psql_path,
            &self.host,
            self.port,
            (&self.superuser, self.password.as_deref()),
            &self.database,
            sql,
        )
    }

    /// [`psql`](Self::psql) in another database of the server.
    pub fn psql_db(&self, database: &str, sql: &str) -> Result<String, EmbedError> {
        run_psql(
            &self.psql_path,
            &self.host,
            self.port,
            (&self.superuser, self.password.as_deref()),
            database,
            sql,
        )
    }

    /// Sets the superuser's password through the Unix socket (trusted, reachable only by the
    /// server's OS user and root) and writes the passfile; TCP takes only this password from
    /// the start (a role without one cannot log in with scram-sha-256).
    ///
    /// The server gets the SCRAM-SHA-256 verifier computed here (random salt, 4096
    /// iterations, as libpq's `PQencryptPasswordConn`), never the password itself, and the
    /// statement goes to psql on its stdin: the password reaches no process's argv, no
    /// server log and no `pg_stat_statements`.
    fn set_password(&mut self, password: &str, owner: Option<&OsUser>) -> Result<(), EmbedError> {
        let Some(socket_dir) = self.socket_dir.clone() else {
            return Err(EmbedError::NoSocketForPassword {
                data_dir: self.data_dir.clone(),
            });
        };
        datadir::write_passfile(&self.data_dir, &self.superuser, password, owner)?;
        let verifier = scram_verifier(password).map_err(EmbedError::io(
            "draw a salt for the password of",
            &self.data_dir,
        ))?;
        run_psql_stdin(
            &self.psql_path,
            &socket_dir.to_string_lossy(),
            self.port,
            &self.superuser,
            "postgres",
            &alter_role_password(&self.superuser, &verifier),
        )?;
        self.password = Some(password.to_owned());
        Ok(())
    }

    /// Fast shutdown, a bounded wait, SIGKILL if it did not stop; then removes a memory
    /// data directory.
    pub fn stop(mut self) -> Result<(), EmbedError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), EmbedError> {
        if let Some(adopted) = self.adopted.take() {
            let result = adopted.shut_down(self.stop_timeout);
            if self.memory {
                datadir::remove_memory_dir(&self.data_dir);
            }
            let gone = result.map_err(EmbedError::io("stop server in", &self.data_dir))?;
            if gone {
                datadir::remove_dead_lock_file(
                    &self.data_dir.join("postmaster.pid"),
                    adopted.pid(),
                );
                if let Some(dir) = &self.socket_dir {
                    let lock = dir.join(format!(".s.PGSQL.{}.lock", self.port));
                    datadir::remove_dead_lock_file(&lock, adopted.pid());
                }
            }
            tracing::debug!(gone, data_dir = %self.data_dir.display(), "PostgreSQL stopped");
            return Ok(());
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let result = process::shut_down(&mut child, self.stop_timeout);
        if self.memory {
            datadir::remove_memory_dir(&self.data_dir);
        }
        let status = result.map_err(EmbedError::io("stop server in", &self.data_dir))?;
        tracing::debug!(%status, data_dir = %self.data_dir.display(), "PostgreSQL stopped");
        Ok(())
    }

    fn ensure_database(&self, database: &str) -> Result<(), EmbedError> {
        if database == self.database {
            return Ok(());
        }
        let literal = sql_literal(database);
        let exists = self.psql(&format!(
            "SELECT 1 FROM pg_database WHERE datname = {literal}"
        ))?;
        if exists.trim().is_empty() {
            let ident = database.replace('"', "\"\"");
            self.psql(&format!("CREATE DATABASE \"{ident}\""))?;
        }
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down() {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "stopping PostgreSQL on drop failed"
            );
        }
    }
}

/// The first of `unix_socket_directories` when the settings name it, else the default.
fn socket_dir_of(cfg: &InstanceConfig, data_dir: &Path) -> Option<PathBuf> {
    match cfg
        .settings
        .iter()
        .find(|(name, _)| name == "unix_socket_directories")
    {
        Some((_, dirs)) => dirs
            .split(',')
            .map(str::trim)
            .find(|d| !d.is_empty())
            .map(PathBuf::from),
        None => datadir::default_socket_dir(data_dir).map(Path::to_path_buf),
    }
}

/// Prepares `data_dir` and starts the server there, retrying on port races when we chose
/// the port. Returns the running child and its port.
fn start_in(
    cfg: &InstanceConfig,
    bins: &PgBinaries,
    run_as: Option<&OsUser>,
    template: &Path,
    data_dir: &Path,
    memory: bool,
) -> Result<(Child, u16), EmbedError> {
    if !datadir::has_cluster(data_dir) {
        // Copying a cluster over someone's files would mix the two; only an empty or
        // missing directory becomes a new cluster.
        if datadir::has_entries(data_dir)? {
            return Err(EmbedError::DataDirNotEmpty {
                path: data_dir.to_path_buf(),
            });
        }
        datadir::create_owned_dir(data_dir, run_as)?;
        datadir::copy_tree(template, data_dir, run_as)?;
    }
    datadir::ensure_settings_include(data_dir)?;
    datadir::write_hba(data_dir, &cfg.hba, cfg.password.is_some(), run_as)?;
    let mut attempt = 1;
    loop {
        let port = match cfg.port {
            Some(port) => port,
            None => free_port(&cfg.host, data_dir)?,
        };
        datadir::write_settings(data_dir, cfg, port, memory, run_as)?;
        match spawn_and_wait(cfg, bins, run_as, data_dir) {
            Ok(child) => return Ok((child, port)),
            Err(EmbedError::PortInUse { .. })
                if cfg.port.is_none() && attempt < PORT_ATTEMPTS_MAX =>
            {
                tracing::debug!(port, attempt, "picked port was taken meanwhile; retrying");
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// A port that was free a moment ago: bind port 0, read what the kernel chose, close it.
/// Another process may take it before the server binds; the caller retries then.
fn free_port(host: &str, data_dir: &Path) -> Result<u16, EmbedError> {
    let ip = host
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(EmbedError::io("bind a free port for", data_dir))?;
    let port = listener
        .local_addr()
        .map_err(EmbedError::io("bind a free port for", data_dir))?
        .port();
    Ok(port)
}

fn spawn_and_wait(
    cfg: &InstanceConfig,
    bins: &PgBinaries,
    run_as: Option<&OsUser>,
    data_dir: &Path,
) -> Result<Child, EmbedError> {
    let log = datadir::open_log(data_dir, run_as)?;
    // Only this attempt's lines explain this attempt's failure.
    let log_start_bytes = log.metadata().map_or(0, |m| m.len());
    let log_err = log
        .try_clone()
        .map_err(EmbedError::io("open", data_dir.join(datadir::LOG_FILE)))?;
    let program = bins.program("postgres");
    let mut child = process::supervised_command(&program, run_as, !cfg.outlive_parent)
        .arg("-D")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| EmbedError::Spawn { program, source })?;
    match wait_ready(&mut child, cfg, data_dir, log_start_bytes) {
        Ok(()) => Ok(child),
        Err(error) => {
            // Do not leave a half-started server behind; its state no longer matters.
            let _ = child.kill();
            let _ = child.wait();
            Err(error)
        }
    }
}

/// Polls `postmaster.pid` until it is ours and says `ready`, failing early when the server
/// exits (with the log tail) and after `start_timeout_ms`.
fn wait_ready(
    child: &mut Child,
    cfg: &InstanceConfig,
    data_dir: &Path,
    log_start_bytes: u64,
) -> Result<(), EmbedError> {
    let pid_file = data_dir.join("postmaster.pid");
    let log_file = data_dir.join(datadir::LOG_FILE);
    let timeout = Duration::from_millis(cfg.start_timeout_ms);
    let started = Instant::now();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(EmbedError::io("wait for server in", data_dir))?
        {
            let log_tail = datadir::tail(&log_file, log_start_bytes);
            // The postmaster logs this and exits when it cannot listen on its port.
            if log_tail.contains("could not bind")
                || log_tail.contains("could not create any TCP/IP sockets")
            {
                return Err(EmbedError::PortInUse {
                    host: cfg.host.clone(),
                    port: port_of(cfg, data_dir),
                    log_tail,
                });
            }
            return Err(EmbedError::ChildExited {
                data_dir: data_dir.to_path_buf(),
                status: status.to_string(),
                log_tail,
            });
        }
        // A stale file from an earlier run has another pid on line 1; only ours counts.
        if let Ok(text) = fs::read_to_string(&pid_file) {
            let mut lines = text.lines();
            let pid_matches = lines.next().map(str::trim) == Some(child.id().to_string().as_str());
            let status = lines.nth(6).map(str::trim);
            if pid_matches && status == Some(PM_STATUS_READY) {
                return Ok(());
            }
        }
        if started.elapsed() >= timeout {
            return Err(EmbedError::StartTimeout {
                data_dir: data_dir.to_path_buf(),
                waited_ms: cfg.start_timeout_ms,
                log_tail: datadir::tail(&log_file, log_start_bytes),
            });
        }
        thread::sleep(Duration::from_millis(READY_POLL_MS));
    }
}

/// The port written for this attempt (for the error message).
fn port_of(cfg: &InstanceConfig, data_dir: &Path) -> u16 {
    if let Some(port) = cfg.port {
        return port;
    }
    fs::read_to_string(data_dir.join(datadir::SETTINGS_FILE))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("port = '"))
                .and_then(|rest| rest.trim_end_matches('\'').parse().ok())
        })
        .unwrap_or(0)
}

/// `psql` as `user` (with its password, if any) on `host` (a Unix socket's directory too).
fn run_psql(
    psql: &Path,
    host: &str,
    port: u16,
    (user, password): (&str, Option<&str>),
    database: &str,
    sql: &str,
) -> Result<String, EmbedError> {
    let mut command = psql_command(psql, host, port, user, database);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    command.arg("-c").arg(sql).stdin(Stdio::null());
    let output = command.output().map_err(|source| EmbedError::Spawn {
        program: psql.to_path_buf(),
        source,
    })?;
    psql_output(output)
}

/// `psql` as `user` (trusted: a Unix socket) running `script` read from its stdin, so the
/// script shows in no process's argv (`/proc/PID/cmdline` is readable by every local user).
fn run_psql_stdin(
    psql: &Path,
    host: &str,
    port: u16,
    user: &str,
    database: &str,
    script: &str,
) -> Result<String, EmbedError> {
    let spawn_error = |source| EmbedError::Spawn {
        program: psql.to_path_buf(),
        source,
    };
    let mut child = psql_command(psql, host, port, user, database)
        .args(["-q", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    // The script is small (far below a pipe's buffer), so writing it all before reading the
    // output cannot deadlock; dropping the handle closes psql's stdin.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| std::io::Write::write_all(&mut stdin, script.as_bytes()));
    let output = child.wait_with_output().map_err(spawn_error)?;
    if let Some(Err(source)) = written
        && output.status.success()
    {
        return Err(spawn_error(source));
    }
    psql_output(output)
}

/// The psql command line both runners share: no psqlrc, stop at the first error, bare
/// output, never prompt.
fn psql_command(psql: &Path, host: &str, port: u16, user: &str, database: &str) -> Command {
    let mut command = Command::new(psql);
    crate::subprocess::reset_signals(&mut command);
    command
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-h",
            host,
            "-U",
            user,
            "-d",
            database,
        ])
        .arg("-p")
        .arg(port.to_string())
        // Never prompt: a password prompt would hang the test instead of failing it.
        .arg("-w")
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// psql's stdout, or its stderr as the error when it failed.
fn psql_output(output: std::process::Output) -> Result<String, EmbedError> {
    if !output.status.success() {
        return Err(EmbedError::PsqlFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Bytes of random salt in a verifier (PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`).
const SCRAM_SALT_BYTES: usize = 16;

/// The SCRAM-SHA-256 verifier of `password` with a fresh random salt:
/// `SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>` (base64 parts, so only
/// `[A-Za-z0-9+/=:$-]`).
fn scram_verifier(password: &str) -> std::io::Result<String> {
    let mut salt = [0u8; SCRAM_SALT_BYTES];
    getrandom::fill(&mut salt).map_err(std::io::Error::other)?;
    Ok(ScramSecret::from_password(password, &salt, SCRAM_ITERATIONS_DEFAULT).to_rolpassword())
}

/// The script that sets `role`'s password to `verifier`. Its literals hold whatever
/// `standard_conforming_strings` the instance's settings chose (the session forces it on
/// and [`sql_literal`] does not depend on it anyway), and the statement is kept out of the
/// server log even where the settings log every statement.
fn alter_role_password(role: &str, verifier: &str) -> String {
    format!(
        "SET standard_conforming_strings = on;\n\
         SET log_statement = 'none';\n\
         SET log_min_duration_statement = -1;\n\
         ALTER ROLE {} PASSWORD {};\n",
        sql_identifier(role),
        sql_literal(verifier)
    )
}

/// A quoted SQL identifier (double quotes doubled).
fn sql_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A SQL string literal that means `text` whatever `standard_conforming_strings` is (as
/// libpq's `PQescapeLiteral`): with a backslash in it, an escape string `E'...'` with the
/// backslashes doubled; quotes doubled in either form.
fn sql_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// IPv6 literals need brackets in URLs.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any user, password or
/// database name survives the URL.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{percent_encode, scram_verifier, sql_literal, url_host};
    use crate::wire::ScramSecret;

    #[test]
    fn literals_mean_the_text_whatever_standard_conforming_strings_is() {
        assert_eq!(sql_literal("plain"), "'plain'");
        assert_eq!(sql_literal("it's"), "'it''s'");
        // With a backslash: an escape string, the same under both settings.
        assert_eq!(sql_literal(r"a\'b\"), r"E'a\\''b\\'");
    }

    #[test]
    fn verifiers_are_salted_scram_of_the_password_in_safe_characters() {
        let password = "p\\'w";
        let first = scram_verifier(password).unwrap();
        let second = scram_verifier(password).unwrap();
        assert_ne!(first, second, "a fresh salt each time");
        let parsed = ScramSecret::parse(&first).unwrap();
        assert_eq!(parsed.iterations(), 4096);
        assert_eq!(parsed.salt().len(), 16);
        assert_eq!(
            parsed,
            ScramSecret::from_password(password, parsed.salt(), 4096)
        );
        assert!(
            first
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=:$-".contains(c)),
            "{first}"
        );
    }

    #[test]
    fn encodes_url_parts() {
        assert_eq!(percent_encode("u"), "u");
        assert_eq!(percent_encode("p@ss word/:"), "p%40ss%20word%2F%3A");
        assert_eq!(url_host("::1"), "[::1]");
        assert_eq!(url_host("127.0.0.1"), "127.0.0.1");
    }
}
