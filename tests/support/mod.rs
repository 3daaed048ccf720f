//! Shared pieces of the integration tests: real PostgreSQL servers (through `pgprism::embed`)
//! and the real `pgprism` binary run as a child process, exactly as users run it.

#![allow(dead_code)]
// `pub` here is for the test crates that include this module privately, never reachable from
// a crate root: the `unreachable_pub` lint does not apply.
#![allow(unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgprism::embed::{Instance, InstanceConfig};

pub mod clients;

pub const MD5_USER: &str = "md5user";
pub const SCRAM_USER: &str = "scramuser";
pub const PASSWORD: &str = "s3cret pass";

/// The client side in transaction pooling mode on 2 primary connections, clients trusted: for
/// the tests that run a session-mode case pooled too.
pub const TRANSACTION_POOLING: &[&str] = &[
    "--pool-mode",
    "transaction",
    "--pool-size",
    "2",
    "--auth-type",
    "trust",
];

/// A server whose `max_connections` is `max_connections`, with `database` created (for
/// tests that count pgprism's connections: their own observers connect to `postgres`).
#[allow(dead_code)] // not every test binary caps its servers
pub fn start_capped(name: &str, database: &str, max_connections: usize) -> Instance {
    Instance::start(InstanceConfig {
        name: name.into(),
        database: database.into(),
        settings: vec![("max_connections".into(), max_connections.to_string())],
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL")
}

/// The records of a compare report file, one JSON value a line. Only complete lines: pgprism
/// may be writing the last one as the test reads (a line still without its newline waits for
/// the next read); a complete line that is not JSON fails the test.
#[allow(dead_code)] // not every test binary compares
pub fn report_records(path: &std::path::Path) -> Vec<sonic_rs::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .map(|l| sonic_rs::from_str(l).unwrap_or_else(|e| panic!("report line {l:?}: {e}")))
        .collect()
}

/// The servers of a compare-mode test: a primary and a shadow, and the compare report file
/// in a directory of the pair's own (removed on drop, with whatever else the test puts there).
pub struct Pair {
    pub primary: Instance,
    pub shadow: Instance,
    pub report: std::path::PathBuf,
    pub dir: TempDir,
    /// The database [`Pair::both`] seeds (`None`: the servers' default).
    database: Option<&'static str>,
    /// What every [`Pair::proxy`] of this pair is given ahead of the test's own arguments.
    args: Vec<String>,
}

impl Pair {
    pub fn new(primary: Instance, shadow: Instance) -> Pair {
        let dir = TempDir::new("compare");
        Pair {
            primary,
            shadow,
            report: dir.join("report.jsonl"),
            dir,
            database: None,
            args: Vec::new(),
        }
    }

    /// [`Pair::both`] seeds `database`.
    pub fn seeding(mut self, database: &'static str) -> Pair {
        self.database = Some(database);
        self
    }

    /// Every proxy of the pair gets `args` too.
    pub fn with_args(mut self, args: &[&str]) -> Pair {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Runs `sql` on both servers alike.
    pub fn both(&self, sql: &str) {
        for (side, inst) in [("primary", &self.primary), ("shadow", &self.shadow)] {
            match self.database {
                Some(db) => inst.psql_db(db, sql),
                None => inst.psql(sql),
            }
            .unwrap_or_else(|e| panic!("seed the {side}: {e}"));
        }
    }

    /// A compare-mode proxy of the pair (see [`Proxy::compare`]).
    pub fn proxy(&self, extra: &[&str]) -> Proxy {
        let report = self.report.display().to_string();
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Proxy::compare(
            &self.primary.url(),
            Some(&self.shadow.url()),
            &report,
            &args,
        )
    }

    /// The report's records so far (see [`report_records`]).
    pub fn reports(&self) -> Vec<sonic_rs::Value> {
        report_records(&self.report)
    }
}

/// Whether the compare report line `r` is a mismatch of a statement starting with `prefix`
/// that has the difference `kind` (`values`, `column_types`, ...).
#[allow(dead_code)] // not every test binary compares
pub fn is_mismatch(r: &sonic_rs::Value, prefix: &str, kind: &str) -> bool {
    use sonic_rs::{JsonContainerTrait, JsonValueTrait};
    r["record"].as_str() == Some("mismatch")
        && r["statement"]
            .as_str()
            .is_some_and(|s| s.starts_with(prefix))
        && r["kinds"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k.as_str() == Some(kind)))
}

/// A PostgreSQL server with two password users besides the trusted superuser:
/// `md5user` (md5) and `scramuser` (scram-sha-256), both with [`PASSWORD`], over TCP and
/// over the server's Unix socket alike.
pub fn start_primary(name: &str) -> Instance {
    let inst = Instance::start(InstanceConfig {
        name: name.into(),
        hba: vec![
            format!("host all {MD5_USER} 127.0.0.1/32 md5"),
            format!("host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256"),
            format!("local all {MD5_USER} md5"),
            format!("local all {SCRAM_USER} scram-sha-256"),
        ],
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL");
    inst.psql(&format!(
        "SET password_encryption = 'md5'; CREATE ROLE {MD5_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}';
         SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}';"
    ))
    .expect("create password roles");
    inst
}

/// A fresh directory of the test's own under the system's temp dir, removed with all it holds
/// on drop (a failing test's too). Its name is new (`pgprism-TAG-PID-N`, N counted up past
/// any name taken), so what an earlier run left behind never reaches the test.
/// The per-shard busy figures a test sets for client placement and rebalancing
/// (`PGPRISM_TEST_SHARD_BUSY_FILE`), so that clients move by what the test says and not by
/// how loaded the machine is.
#[allow(dead_code)] // not every test binary places clients
pub struct ShardBusy {
    dir: TempDir,
}

#[allow(dead_code)]
impl ShardBusy {
    /// The figures start as `figures` (`0=95,1=0`: percent per shard).
    pub fn new(figures: &str) -> ShardBusy {
        let busy = ShardBusy {
            dir: TempDir::new("shard-busy"),
        };
        busy.set(figures);
        busy
    }

    /// The environment the proxy needs to read them.
    pub fn env(&self) -> (&'static str, String) {
        (
            "PGPRISM_TEST_SHARD_BUSY_FILE",
            self.dir.join("busy").display().to_string(),
        )
    }

    /// Replaces the figures at once (a rename: the proxy never reads half a file).
    pub fn set(&self, figures: &str) {
        let next = self.dir.join("busy.next");
        std::fs::write(&next, figures).expect("write busy figures");
        std::fs::rename(&next, self.dir.join("busy")).expect("publish busy figures");
    }
}

pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("pgprism-{tag}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `pgprism proxy`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proxy {
    pub child: Child,
    pub listen: SocketAddr,
    /// The Unix socket file, when started with `--unix-socket-dir`.
    pub unix: Option<std::path::PathBuf>,
    pub admin: Option<SocketAddr>,
    stderr_path: std::path::PathBuf,
}

pub fn pgprism_command() -> Command {
    pgprism_command_of(env!("CARGO_BIN_EXE_pgprism"))
}

/// [`pgprism_command`] for another build of pgprism (a benchmark's other side).
#[allow(dead_code)]
pub fn pgprism_command_of(bin: &str) -> Command {
    let mut cmd = Command::new(bin);
    // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            // A test process that dies must not leave a proxy behind.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

impl Proxy {
    /// Starts `pgprism proxy` in front of `primary_url` on a free port with 2 shards.
    pub fn start(primary_url: &str, extra: &[&str]) -> Proxy {
        Proxy::start_on("127.0.0.1:0", primary_url, extra)
    }

    /// A compare-mode proxy: `shadow_url` as the shadow (`None`: the arguments in `extra`
    /// say, e.g. `--calibrate`), differences reported to `report`, and no slow-query reports
    /// unless `extra` sets `--slow-query-min-ms` (timing noise on a busy test machine must
    /// not add them).
    #[allow(dead_code)] // not every test binary compares
    pub fn compare(
        primary_url: &str,
        shadow_url: Option<&str>,
        report: &str,
        extra: &[&str],
    ) -> Proxy {
        let mut args = Vec::new();
        if let Some(shadow) = shadow_url {
            args.extend(["--shadow", shadow]);
        }
        args.extend(["--compare-report", report]);
        if !extra.contains(&"--slow-query-min-ms") {
            args.extend(["--slow-query-min-ms", "60000"]);
        }
        args.extend_from_slice(extra);
        Proxy::start(primary_url, &args)
    }

    /// [`Proxy::start`] with environment variables (failpoints).
    #[allow(dead_code)] // not every test binary arms failpoints
    pub fn start_env(primary_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::start_on_env("127.0.0.1:0", primary_url, extra, env)
    }

    /// [`Proxy::start`] on a given address.
    pub fn start_on(listen: &str, primary_url: &str, extra: &[&str]) -> Proxy {
        Proxy::start_on_env(listen, primary_url, extra, &[])
    }

    fn start_on_env(
        listen: &str,
        primary_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        let stderr_path = std::env::temp_dir().join(format!(
            "pgprism-test-proxy-{}-{}.log",
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace("::", "-")
        ));
        let stderr = std::fs::File::create(&stderr_path).expect("proxy log file");
        let mut child = pgprism_command()
            .args([
                "proxy",
                "--listen",
                listen,
                "--admin",
                "127.0.0.1:0",
                "--no-pin",
                "--log",
                "pgprism=debug",
                "--primary",
                primary_url,
            ])
            // Two shards unless the test says otherwise.
            .args(if extra.contains(&"--shards") {
                &[][..]
            } else {
                &["--shards", "2"][..]
            })
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn pgprism");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut unix = None;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read ready line");
            // `pgprism unix socket PATH` comes before the ready line when there is one.
            match line.trim_end().strip_prefix("pgprism unix socket ") {
                Some(path) => unix = Some(std::path::PathBuf::from(path)),
                None => break,
            }
        }
        let mut words = line.split_whitespace();
        let listen = words.nth(3).and_then(|w| w.parse().ok());
        let admin = words.nth(1).and_then(|w| w.parse().ok());
        let Some(listen) = listen else {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let _ = child.kill();
            panic!("pgprism did not start: stdout {line:?}, stderr:\n{log}");
        };
        Proxy {
            child,
            listen,
            unix,
            admin,
            stderr_path,
        }
    }

    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// libpq-style connection string through the proxy.
    pub fn conninfo(&self, user: &str, password: Option<&str>) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=10",
            self.port()
        );
        if let Some(p) = password {
            s.push_str(&format!(" password='{p}'"));
        }
        s
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo("postgres", None), postgres::NoTls)
            .expect("connect through pgprism")
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            // Polling interval of this bounded wait for the exit, not a wait in itself.
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// GET on the admin endpoint; returns (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin.expect("admin endpoint"), path)
    }

    /// Current value of a counter summed over shards, from `/metrics`. Shards report every
    /// second, so callers poll with [`eventually`].
    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Bound on a pgprism child's orderly exit after SIGTERM when a test cleans up (drains, the
/// fast shutdown of its embedded servers, CDC's last checkpoint): generous for a loaded
/// machine, and spent in full only on a process that hangs.
pub const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// Ends a pgprism child as systemd stops it: SIGTERM, a wait bounded by `limit`, then SIGKILL.
/// Whether it exited on its own. SIGTERM first matters for `pgprism run` with a proxy: it
/// starts its embedded servers without a parent-death signal (an upgrade hands them to the
/// next process), so only its own shutdown stops them; a SIGKILL leaves them running.
pub fn terminate(child: &mut Child, limit: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    // SAFETY: signalling our own child, not reaped yet (try_wait saw it running).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        // Polling interval of this bounded wait for the exit, not a wait in itself.
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Stops the embedded servers recorded in the registry `state_dir` whose pgprism is gone (a
/// `pgprism run` killed before it could stop them), with pgprism's own clean-up: a supervisor
/// started on a state directory stops what dead pgprism processes left there, after checking
/// each is the very server recorded. Returns one line per server it found. Call it once every
/// pgprism using the directory has exited; a missing directory has nothing to clean.
pub fn stop_servers_left_in(state_dir: &std::path::Path) -> Vec<String> {
    if !state_dir.is_dir() {
        return Vec::new();
    }
    let settings = pgprism::embed::SupervisorSettings {
        state_dir: Some(state_dir.to_path_buf()),
        ..pgprism::embed::SupervisorSettings::default()
    };
    match pgprism::embed::Supervisor::start(settings) {
        Ok(supervisor) => {
            let cleaned = supervisor.leftovers_cleaned().to_vec();
            supervisor.shutdown();
            cleaned
        }
        Err(error) => vec![format!("cannot clean {}: {error}", state_dir.display())],
    }
}

/// Fails the test (unless it is failing already) when its clean-up had to stop servers
/// that its pgprism left running: a pgprism that does not stop its servers on SIGTERM.
pub fn assert_no_servers_left(cleaned: &[String]) {
    if !cleaned.is_empty() && !std::thread::panicking() {
        panic!(
            "servers outlived their pgprism (stopped by the test's clean-up):\n{}",
            cleaned.join("\n")
        );
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).expect("admin endpoint")
}

/// [`http_get`], with the error when the server is gone (a process that died).
pub fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((code, body))
}

/// The bearer token of [`admin_token_file`].
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A file holding [`ADMIN_TOKEN`] with the mode pgprism accepts (0600), for
/// `--admin-token-file`: state-changing admin requests need the token. Removed on drop: keep
/// it while the pgprism given it runs.
pub fn admin_token_file() -> TokenFile {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("token");
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    TokenFile { path, _dir: dir }
}

/// The file of [`admin_token_file`], in a [`TempDir`] of its own.
pub struct TokenFile {
    path: std::path::PathBuf,
    _dir: TempDir,
}

impl std::ops::Deref for TokenFile {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

/// One HTTP/1.1 request with `Authorization: Bearer TOKEN` when a token is given; returns
/// (status code, response head, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("admin read");
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (code, head.to_string(), body.to_string())
}

/// Polls `check` until it returns true or `limit` passes. For state that becomes visible
/// asynchronously (metrics reports); it returns as soon as the condition holds.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Polling interval: the condition decides, not this pause.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `busy` runs `SELECT pg_sleep(30)` and cancels it with its own cancel token (through
/// wherever it is connected) once the primary on `primary_port` runs it, so the cancel cannot
/// arrive before it. Asserts that the statement was cancelled (57014, the proof the cancel
/// reached that backend: pg_sleep(30) never ends with it otherwise) and that only that
/// backend was: `busy` and `bystander` both carry on.
pub fn assert_cancel_reaches_only(
    primary_port: u16,
    busy: &mut postgres::Client,
    bystander: &mut postgres::Client,
) {
    let token = busy.cancel_token();
    let pid: i32 = busy
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let canceller = std::thread::spawn(move || {
        let mut watcher = postgres::Client::connect(
            &format!("host=127.0.0.1 port={primary_port} user=postgres dbname=postgres"),
            postgres::NoTls,
        )
        .expect("watcher connects to the primary");
        let running = eventually(Duration::from_secs(10), || {
            watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                    &[&pid],
                )
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        });
        assert!(running, "pg_sleep never started");
        token.cancel_query(postgres::NoTls)
    });
    let err = busy.simple_query("SELECT pg_sleep(30)").unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    canceller.join().unwrap().unwrap();
    let one: i32 = busy.query_one("SELECT 1", &[]).unwrap().get(0);
    let two: i32 = bystander.query_one("SELECT 2", &[]).unwrap().get(0);
    assert_eq!((one, two), (1, 2), "only that backend was cancelled");
}

/// `pgbench -i -s 1` through pgprism listening on `port`: pgbench's tables in `postgres`.
pub fn pgbench_init(port: u16) {
    let init = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-i", "-s", "1", "-q", "postgres"])
        .output()
        .expect("run pgbench");
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// SQLSTATE of a postgres crate error, when it came from the server (or the proxy).
pub fn sqlstate(err: &postgres::Error) -> Option<String> {
    err.code().map(|c| c.code().to_string())
}

/// Whether `err` says the server side closed the session (a drain's 57P01): the client read
/// the 57P01 or the end of the connection, or, when its query went out after the close, its
/// write failed.
#[allow(dead_code)]
pub fn closed_by_server(err: &postgres::Error) -> bool {
    let write_failed = std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            )
        });
    err.is_closed() || sqlstate(err).as_deref() == Some("57P01") || write_failed
}

/// Minimal raw protocol helpers for what the client crates will not do (garbage, pipelining).
/// `admin`'s SHOW CLIENTS `ptr`s of clients of database `db` (the top byte is the shard).
pub fn console_client_ptrs(
    admin: &mut postgres::Client,
    db: &str,
) -> std::collections::HashSet<u64> {
    admin
        .simple_query("SHOW CLIENTS")
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some(db) => {
                let ptr = r.get("ptr")?.strip_prefix("0x")?;
                u64::from_str_radix(ptr, 16).ok()
            }
            _ => None,
        })
        .collect()
}

/// Connections `connect` makes to database `db`, one at a time, until each of the proxy's
/// `N` shards has `each` (at most `32 * each` tries); by shard (the one row the console
/// `admin`'s SHOW CLIENTS gains tells a new one's shard).
/// Kept beyond `each` too (closing them would not change the test).
pub fn clients_by_shard<const N: usize, T>(
    admin: &mut postgres::Client,
    db: &str,
    each: usize,
    mut connect: impl FnMut() -> T,
) -> [Vec<T>; N] {
    let mut known = console_client_ptrs(admin, db);
    let mut by_shard: [Vec<T>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..32 * each {
        if by_shard.iter().all(|c| c.len() >= each) {
            break;
        }
        let client = connect();
        let mut new = Vec::new();
        assert!(eventually(Duration::from_secs(15), || {
            new = console_client_ptrs(admin, db)
                .difference(&known)
                .copied()
                .collect();
            !new.is_empty()
        }));
        assert_eq!(new.len(), 1, "one client connected");
        known.insert(new[0]);
        let shard = (new[0] >> 56) as usize;
        assert!(shard < N, "client on shard {shard} of {N}");
        by_shard[shard].push(client);
    }
    assert!(
        by_shard.iter().all(|c| c.len() >= each),
        "{} clients, too few on one shard",
        32 * each
    );
    by_shard
}

pub mod raw {
    use super::*;

    pub fn startup(user: &str, db: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&196608u32.to_be_bytes());
        for (k, v) in [("user", user), ("database", db)] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        msg
    }

    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut msg = vec![tag];
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(body);
        msg
    }

    /// Reads one backend message: (tag, body). `None` on EOF.
    pub fn read_message(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.checked_sub(4)?];
        s.read_exact(&mut body).ok()?;
        Some((head[0], body))
    }

    /// Reads messages until ReadyForQuery; returns all of them.
    pub fn read_until_ready(s: &mut impl Read) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((tag, body)) = read_message(s) {
            out.push((tag, body));
            if tag == b'Z' {
                break;
            }
        }
        out
    }

    /// The value of one field (e.g. b'C' for SQLSTATE) of an ErrorResponse body.
    pub fn error_field(body: &[u8], field: u8) -> Option<String> {
        let mut rest = body;
        while let Some((&t, tail)) = rest.split_first() {
            if t == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if t == field {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    /// Reads messages until the other side closes the connection; returns all of them.
    pub fn read_to_end(s: &mut impl Read) -> Vec<(u8, Vec<u8>)> {
        std::iter::from_fn(|| read_message(s)).collect()
    }

    /// Sends `sql` as one simple Query and reads its answer up to ReadyForQuery.
    pub fn query(s: &mut (impl Read + Write), sql: &str) -> Vec<(u8, Vec<u8>)> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        s.write_all(&message(b'Q', &body)).unwrap();
        read_until_ready(s)
    }

    /// Connects and authenticates (trust) as `postgres`, returning the ready socket.
    pub fn connect_ready(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        start_session(s)
    }

    /// Starts a session (trust, as `postgres`) on a connected socket; returns it ready.
    pub fn start_session<S: Read + Write>(mut s: S) -> S {
        s.write_all(&startup("postgres", "postgres")).unwrap();
        let msgs = read_until_ready(&mut s);
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "startup: {msgs:?}");
        s
    }

    /// Finishes the transaction a drain let run (`sql` ends it) and reads to the end: the
    /// answer comes whole, ReadyForQuery 'I', and only then the drain's 57P01 and the close.
    /// Read message by message, as the order is what counts: the farewell may share a read
    /// with the answer (the postgres crate then reports it as the error of the call).
    pub fn finish_while_draining(s: &mut (impl Read + Write), sql: &str, answer_tags: &[u8]) {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        s.write_all(&message(b'Q', &body)).unwrap();
        let msgs = read_to_end(s);
        let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
        let mut expected = answer_tags.to_vec();
        expected.extend_from_slice(b"ZE");
        assert_eq!(tags, expected, "{msgs:?}");
        assert_eq!(
            msgs[msgs.len() - 2].1,
            b"I",
            "idle after the transaction: {msgs:?}"
        );
        let code = error_field(&msgs[msgs.len() - 1].1, b'C');
        assert_eq!(code.as_deref(), Some("57P01"), "{msgs:?}");
    }
}

/// `pgprism run --config FILE` as a child process, for the tests of whole config files. The
/// file is `RUN_HEADER` (proxy and admin on free ports) followed by the test's own sections.
pub struct RunConfig {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config: std::path::PathBuf,
    dir: std::path::PathBuf,
}

pub const RUN_HEADER: &str = "[proxy]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin-cores = false\n[admin]\nlisten = \"127.0.0.1:0\"\n";

impl RunConfig {
    /// Writes the config (`RUN_HEADER` + `sections`) to a fresh directory; `{dir}` in
    /// `sections` stands for that directory (for state directories and the like).
    pub fn write(tag: &str, sections: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "pgprism-run-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("config dir");
        let config = dir.join("pgprism.toml");
        let sections = sections.replace("{dir}", &dir.display().to_string());
        std::fs::write(&config, format!("{RUN_HEADER}{sections}")).expect("write config");
        (dir, config)
    }

    /// Runs a config written by [`RunConfig::write`] until its proxy is listening. Embedded
    /// servers are recorded in `{dir}/state` unless the config names another state directory
    /// (the clean-up looks there for servers a killed run left).
    pub fn start(dir: std::path::PathBuf, config: std::path::PathBuf) -> RunConfig {
        let mut child = pgprism_command()
            .args(["run", "--config"])
            .arg(&config)
            .env(pgprism::embed::STATE_DIR_ENV, dir.join("state"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pgprism run");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (listen, admin) = loop {
            let line = lines.next().expect("a ready line").expect("stdout");
            if let Some(rest) = line.strip_prefix("pgprism listening on ") {
                let mut words = rest.split_whitespace();
                let listen = words.next().and_then(|w| w.parse().ok()).expect("listen");
                let admin = words.nth(1).and_then(|w| w.parse().ok()).expect("admin");
                break (listen, admin);
            }
        };
        RunConfig {
            child,
            listen,
            admin,
            config,
            dir,
        }
    }

    /// SIGTERM and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().expect("wait for pgprism run")
    }
}

impl Drop for RunConfig {
    fn drop(&mut self) {
        terminate(&mut self.child, EXIT_LIMIT);
        let cleaned = stop_servers_left_in(&self.dir.join("state"));
        let _ = std::fs::remove_dir_all(&self.dir);
        assert_no_servers_left(&cleaned);
    }
}
