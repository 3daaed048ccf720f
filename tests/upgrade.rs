//! Upgrade without dropping a client, against the real binary and a real PostgreSQL: SIGUSR2
//! starts the binary again, hands it the listening sockets (TCP, Unix, admin), and the old
//! process lets its sessions end. pgbench (a new connection per transaction, and long
//! sessions) runs through pgprism while it is upgraded twice; a bad configuration at upgrade
//! time leaves the old process serving; the shard count may change between the two. A
//! `pgprism run` with CDC hands its stream over (every row in the Stream Load emulator
//! exactly once across two upgrades).

#[path = "support/starrocks.rs"]
mod starrocks;
mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgprism::embed::{Instance, InstanceConfig};
use support::{eventually, http_get, pgprism_command};

/// Generous bound on anything that should take a second: upgrades, exits, ready lines.
const DEADLINE: Duration = Duration::from_secs(60);

/// A directory of the test's own, removed when the test ends (passed or not).
fn scratch(tag: &str) -> support::TempDir {
    support::TempDir::new(&format!("upgrade-{tag}"))
}

/// Whether the process is gone: no such pid, or a zombie nobody reaped (the old process's
/// parent after the first upgrade is init, which may not reap in a container).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started (directly or through an upgrade).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// A pgprism proxy the test upgrades: every process it becomes shares the pid file, the log
/// and stdout files, and the systemd notification socket of the test.
struct Upgradable {
    first: Child,
    dir: PathBuf,
    pid_file: PathBuf,
    notify: UnixDatagram,
    listen: SocketAddr,
    admin: SocketAddr,
    unix: Option<PathBuf>,
    /// Every pid it has had, so a failing test leaves no process behind.
    pids: Vec<u32>,
}

impl Upgradable {
    fn start(dir: &Path, args: &[&str]) -> Upgradable {
        Upgradable::start_with(dir, args, &[])
    }

    /// [`Upgradable::start`] with environment variables (failpoints) for every process.
    fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Upgradable {
        let pid_file = dir.join("pgprism.pid");
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        notify.set_nonblocking(true).unwrap();
        let first = pgprism_command()
            .args(args)
            .args(["--log-format", "json", "--pid-file"])
            .arg(&pid_file)
            .env("NOTIFY_SOCKET", &notify_path)
            // Embedded servers are recorded here unless the config says otherwise (the tests'
            // configs name this very directory), for the clean-up to find.
            .env(pgprism::embed::STATE_DIR_ENV, dir.join("state"))
            .envs(env.iter().copied())
            .stdout(File::create(dir.join("stdout")).unwrap())
            .stderr(File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("spawn pgprism");
        let mut proxy = Upgradable {
            pids: vec![first.id()],
            first,
            dir: dir.to_path_buf(),
            pid_file,
            notify,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            unix: None,
        };
        let ready = eventually(DEADLINE, || {
            proxy.pid() == Some(proxy.pids[0]) && proxy.stdout().contains("pgprism listening on")
        });
        assert!(ready, "pgprism did not start:\n{}", proxy.log());
        let stdout = proxy.stdout();
        for line in stdout.lines() {
            if let Some(path) = line.strip_prefix("pgprism unix socket ") {
                proxy.unix = Some(PathBuf::from(path));
            }
            if let Some(rest) = line.strip_prefix("pgprism listening on ") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                proxy.listen = words[0].parse().expect("listen address");
                proxy.admin = words[2].parse().expect("admin address");
            }
        }
        proxy
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Waits (bounded) until the shared log says `what`.
    fn wait_log(&self, what: &str) {
        assert!(
            eventually(DEADLINE, || self.log().contains(what)),
            "the log never said `{what}`:\n{}",
            self.log()
        );
    }

    /// Waits (bounded) until the shared log says `what` `times` times.
    fn wait_log_count(&self, what: &str, times: usize) {
        assert!(
            eventually(DEADLINE, || self.log().matches(what).count() >= times),
            "the log never said `{what}` {times} times:\n{}",
            self.log()
        );
    }

    /// The pid of the new process the serving one started for the last SIGUSR2, from its log.
    fn successor_pid(&self) -> u32 {
        let log = self.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("started the new process"))
            .unwrap_or_else(|| panic!("no new process started:\n{log}"));
        line.split("\"pid\":")
            .nth(1)
            .and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no pid in {line}"))
    }

    /// The pid in the pid file, once it is there.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGUSR2 to the serving process; returns the new pid once the pid file names it.
    fn upgrade(&mut self) -> u32 {
        let old = self.pid().expect("a pid file");
        signal(old, libc::SIGUSR2);
        let changed = eventually(DEADLINE, || self.pid().is_some_and(|p| p != old));
        assert!(changed, "no new process took over:\n{}", self.log());
        let new = self.pid().expect("the new pid");
        self.pids.push(new);
        new
    }

    /// Every systemd notification received so far.
    fn notifications(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    /// Statements the serving process has counted (its own, since its start).
    fn statements(&self) -> u64 {
        let (_, body) = http_get(self.admin, "/metrics");
        body.lines()
            .filter(|l| l.starts_with("pgprism_statements_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
            self.listen.port()
        )
    }
}

impl Drop for Upgradable {
    fn drop(&mut self) {
        // SIGTERM to the serving process first: a `run` with a proxy starts its embedded
        // servers without a parent-death signal (they move on upgrade), so only its own
        // shutdown stops them; a SIGKILL alone left one running after every test run.
        if let Some(pid) = self.pid().filter(|&pid| !gone(pid)) {
            signal(pid, libc::SIGTERM);
            eventually(support::EXIT_LIMIT, || gone(pid));
        }
        for &pid in &self.pids {
            if !gone(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
        // What a killed process still left running (a test that failed mid-upgrade).
        let cleaned = support::stop_servers_left_in(&self.dir.join("state"));
        let _ = std::fs::remove_dir_all(&self.dir);
        support::assert_no_servers_left(&cleaned);
    }
}

fn primary(name: &str) -> Instance {
    Instance::start(InstanceConfig {
        name: name.into(),
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL")
}

fn pgbench(host: &str, port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", host, "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits (bounded) for a pgbench run and checks it lost nothing: exit status 0 (an aborted
/// client, e.g. a refused connection, makes it 2), no error, no failed transaction.
fn clean_run(what: &str, child: Child) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    let mut child = child;
    while child.try_wait().expect("pgbench status").is_none() {
        assert!(Instant::now() < deadline, "{what}: pgbench did not finish");
        // Polling interval of this bounded wait for pgbench's own -T.
        std::thread::sleep(Duration::from_millis(100));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("pgbench output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    assert!(status.success(), "{what}: {status}\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains("error") && !stderr.contains("aborted"),
        "{what}: {stderr}"
    );
    let number = |label: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no `{label}` in\n{stdout}"))
    };
    assert_eq!(
        number("number of failed transactions: "),
        0,
        "{what}: {stdout}"
    );
    let processed = number("number of transactions actually processed: ");
    assert!(processed > 0, "{what}: {stdout}");
    // For the record (shown with --no-capture): what ran through the upgrades.
    eprintln!("{what}: {processed} transactions, 0 failed, no client aborted");
    processed
}

#[test]
fn two_upgrades_under_pgbench_lose_no_transaction_and_refuse_no_connection() {
    upgrades_under_pgbench("upgrade-bench", "kernel");
}

/// The same with `client-placement = "pack"`: connections accepted while a process stops may
/// be queued for a shard that is draining; each is served or refused, none is left waiting.
#[test]
fn two_upgrades_under_pgbench_with_clients_packed() {
    upgrades_under_pgbench("upgrade-pack", "pack");
}

fn upgrades_under_pgbench(name: &str, placement: &str) {
    let pg = primary(name);
    let init = pgbench("127.0.0.1", pg.port(), &["-i", "-q", "-s", "1"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let dir = scratch(name);
    let sockets = dir.display().to_string();
    let url = pg.url();
    let mut proxy = Upgradable::start(
        &dir,
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--unix-socket-dir",
            &sockets,
            "--shards",
            "2",
            "--no-pin",
            "--client-placement",
            placement,
            // Long enough for the long sessions to end on their own (pgbench -T 20).
            "--drain-timeout-ms",
            "60000",
            "--primary",
            &url,
        ],
    );
    let first = proxy.pid().unwrap();
    let port = proxy.listen.port();
    // A new connection per transaction over TCP and over the Unix socket, and long sessions.
    let per_tcp = pgbench(
        "127.0.0.1",
        port,
        &["-n", "-C", "-S", "-T", "20", "-c", "2"],
    )
    .spawn()
    .expect("pgbench -C");
    let per_unix = pgbench(&sockets, port, &["-n", "-C", "-S", "-T", "20", "-c", "2"])
        .spawn()
        .expect("pgbench -C over the Unix socket");
    let sessions = pgbench("127.0.0.1", port, &["-n", "-T", "20", "-c", "4", "-j", "2"])
        .spawn()
        .expect("pgbench");

    assert!(
        eventually(DEADLINE, || proxy.statements() > 0),
        "no traffic"
    );
    let second = proxy.upgrade();
    // The admin endpoint is the new process's now: its own counters start at zero.
    assert!(
        eventually(DEADLINE, || proxy.statements() > 0),
        "the new process serves nothing:\n{}",
        proxy.log()
    );
    let third = proxy.upgrade();
    assert!(eventually(DEADLINE, || proxy.statements() > 0));
    assert!(first != second && second != third && first != third);

    let done = [
        clean_run("pgbench -C over TCP", per_tcp),
        clean_run("pgbench -C over the Unix socket", per_unix),
        clean_run("pgbench with long sessions", sessions),
    ];
    assert!(done.iter().all(|&n| n > 0));
    // The old processes end once their sessions have.
    assert!(
        eventually(DEADLINE, || gone(first) && gone(second)),
        "an old process is still running:\n{}",
        proxy.log()
    );
    assert!(!gone(third));
    assert_eq!(proxy.pid(), Some(third), "the pid file follows");
    // systemd heard READY with each new main pid.
    let notes = proxy.notifications();
    for pid in [second, third] {
        assert!(
            notes
                .iter()
                .any(|n| n.contains("READY=1") && n.contains(&format!("MAINPID={pid}\n"))),
            "{notes:?}"
        );
    }
    let log = proxy.log();
    assert!(!log.contains("upgrade failed"), "{log}");
    // The last one serves TCP and the Unix socket, and removes its files when it stops.
    let mut client = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    client.simple_query("SELECT 1").unwrap();
    drop(client);
    let unix = proxy.unix.clone().expect("the Unix socket");
    assert!(unix.exists());
    signal(third, libc::SIGTERM);
    assert!(eventually(DEADLINE, || gone(third)));
    assert!(!unix.exists(), "the last process removes the socket file");
    assert!(!proxy.pid_file.exists(), "and the pid file");
}

#[test]
fn a_bad_config_at_upgrade_leaves_the_old_process_serving_and_shards_may_change() {
    let pg = primary("upgrade-config");
    let dir = scratch("config");
    let config = dir.join("pgprism.toml");
    std::fs::write(&config, "[proxy]\nshards = 2\n").unwrap();
    let config_arg = config.display().to_string();
    let url = pg.url();
    let mut proxy = Upgradable::start(
        &dir,
        &[
            "proxy",
            "--config",
            &config_arg,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--no-pin",
            "--drain-timeout-ms",
            "60000",
            "--primary",
            &url,
        ],
    );
    let first = proxy.pid().unwrap();
    let mut session = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    session.simple_query("SELECT 1").unwrap();

    std::fs::write(&config, "[proxy]\nshards = \"many\"\n").unwrap();
    signal(first, libc::SIGUSR2);
    assert!(
        eventually(DEADLINE, || proxy.log().contains("upgrade failed")),
        "{}",
        proxy.log()
    );
    assert!(proxy.log().contains("proxy.shards"), "{}", proxy.log());
    assert_eq!(proxy.pid(), Some(first));
    assert!(!gone(first));
    session.simple_query("SELECT 2").unwrap();
    let mut fresh = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    fresh.simple_query("SELECT 3").unwrap();
    drop(fresh);

    // Fixed, and with one shard more: the new process binds the missing socket.
    std::fs::write(&config, "[proxy]\nshards = 3\n").unwrap();
    let second = proxy.upgrade();
    assert!(proxy.log().contains("\"shards\":3"), "{}", proxy.log());
    let conninfo = proxy.conninfo();
    let connects_all = || {
        (0..24).try_for_each(|i| {
            postgres::Client::connect(&conninfo, postgres::NoTls)
                .and_then(|mut c| c.simple_query("SELECT 1"))
                .map(|_| ())
                .map_err(|e| format!("connection {i}: {e:?}"))
        })
    };
    if let Err(err) = connects_all() {
        panic!("{err}\n{}", proxy.log());
    }
    // The old process keeps its session to the end, and goes when the client does.
    session.simple_query("SELECT 4").unwrap();
    assert!(!gone(first));
    drop(session);
    assert!(eventually(DEADLINE, || gone(first)), "{}", proxy.log());

    // Down to one shard: it accepts from all three inherited sockets, so every one of the
    // connections the kernel spreads over them is served.
    std::fs::write(&config, "[proxy]\nshards = 1\n").unwrap();
    let third = proxy.upgrade();
    assert!(eventually(DEADLINE, || gone(second)), "{}", proxy.log());
    if let Err(err) = connects_all() {
        panic!("{err}\n{}", proxy.log());
    }
    assert_eq!(proxy.pid(), Some(third));

    // SIGTERM (what `systemctl stop` sends every process of the unit) ends an old process's
    // patience: its idle session gets 57P01 now instead of at the 60 s drain timeout.
    let mut session = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    session.simple_query("SELECT 5").unwrap();
    let fourth = proxy.upgrade();
    assert!(!gone(third), "the session keeps it");
    signal(third, libc::SIGTERM);
    assert!(
        eventually(Duration::from_secs(20), || gone(third)),
        "{}",
        proxy.log()
    );
    let err = session.simple_query("SELECT 6").unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    assert!(!gone(fourth), "{}", proxy.log());
}

/// The environment of a process, as it was exec'd.
fn environment(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', "\n")
}

#[test]
fn embed_refuses_an_upgrade_keeps_its_servers_and_they_want_a_password() {
    let scratch_dir = support::TempDir::new("upgrade-embed");
    let dir = scratch_dir.to_path_buf();
    let state = dir.join("state");
    let log = dir.join("stderr");
    // As if started by an upgrade: the variable must not reach the servers it spawns.
    let mut child = pgprism_command()
        .args(["embed", "--admin", "", "--instance", "a:0", "--state-dir"])
        .arg(&state)
        .env("PGPRISM_UPGRADE_FD", "99")
        .stdout(Stdio::piped())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn pgprism embed");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut port = None;
    let mut passfile = None;
    let mut postmaster = None;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0 {
        if let Some(rest) = line.split(" ready on ").nth(1) {
            port = rest
                .split_whitespace()
                .next()
                .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
            passfile = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("PGPASSFILE="))
                .map(PathBuf::from);
            let words: Vec<&str> = line.split_whitespace().collect();
            postmaster = words
                .iter()
                .position(|w| *w == "pid")
                .and_then(|i| words.get(i + 1)?.parse::<u32>().ok());
        }
        if line.starts_with("pgprism embed ready") {
            break;
        }
        line.clear();
    }
    let port = port.expect("the instance's port");
    let passfile = passfile.expect("the instance's passfile");
    signal(child.id(), libc::SIGUSR2);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        eventually(DEADLINE, || read_log().contains("SIGUSR2")),
        "{}",
        read_log()
    );
    assert!(
        read_log().contains("cannot hand its servers"),
        "{}",
        read_log()
    );
    assert!(child.try_wait().unwrap().is_none(), "{}", read_log());

    // Over TCP the superuser needs the password; the passfile holds it, for its owner alone.
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let refused = postgres::Client::connect(&conninfo, postgres::NoTls)
        .err()
        .expect("refused without the password");
    // The server asked for a password (SCRAM) the client does not have.
    assert!(
        format!("{refused:?}").contains("password missing"),
        "{refused:?}"
    );
    let wrong = postgres::Client::connect(&format!("{conninfo} password=guess"), postgres::NoTls)
        .err()
        .expect("refused with a wrong password");
    assert_eq!(
        support::sqlstate(&wrong).as_deref(),
        Some("28P01"),
        "{wrong:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&passfile).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", passfile.display());
    let password = pgprism::embed::kept_password(passfile.parent().unwrap()).expect("password");
    let mut client =
        postgres::Client::connect(&format!("{conninfo} password={password}"), postgres::NoTls)
            .unwrap();
    client.simple_query("SELECT 1").unwrap();
    // The postmaster's environment, as pgprism exec'd it.
    let env = environment(postmaster.expect("the postmaster's pid"));
    assert!(env.contains("PATH="), "{env}");
    assert!(!env.contains("PGPRISM_UPGRADE_FD"), "{env}");
    drop(client);
    signal(child.id(), libc::SIGTERM);
    let _ = child.wait();
}

/// `GET /instances` of a `pgprism run`: (name, state, pid, restarts) of each server.
fn instances(admin: SocketAddr) -> Vec<(String, String, Option<u32>, u64)> {
    let (code, body) = http_get(admin, "/instances");
    assert_eq!(code, 200, "{body}");
    let list: sonic_rs::Value = sonic_rs::from_str(&body).expect("json");
    use sonic_rs::{JsonContainerTrait, JsonValueTrait};
    list.as_array()
        .expect("a list")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_string(),
                i["state"].as_str().unwrap_or_default().to_string(),
                i["pid"].as_u64().map(|p| p as u32),
                i["restarts"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The pid of server `name`, once it runs.
fn server_pid(admin: SocketAddr, name: &str) -> Option<u32> {
    instances(admin)
        .into_iter()
        .find(|(n, state, _, _)| n == name && state == "running")
        .and_then(|(_, _, pid, _)| pid)
}

/// A client that writes through the proxy without pause, one connection per row (as an
/// application with a pool being recycled): every row it counts was committed.
fn proxy_writer(
    conninfo: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Result<i64, String>> {
    std::thread::spawn(move || {
        let mut written = 0i64;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let mut client = postgres::Client::connect(&conninfo, postgres::NoTls)
                .map_err(|e| format!("connect after {written} rows: {e:?}"))?;
            client
                .execute("INSERT INTO written VALUES ($1)", &[&(written as i32 + 1)])
                .map_err(|e| format!("insert after {written} rows: {e:?}"))?;
            written += 1;
        }
        Ok(written)
    })
}

#[test]
fn run_with_embedded_servers_upgrades_and_the_new_process_adopts_them() {
    let dir = scratch("run-embed");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (disk_port, ram_port) = (free_port(), free_port());
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nshards = 1\npin-cores = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [primary]\nurl = \"postgres://postgres:run-pw@127.0.0.1:{disk_port}\"\n\
             [embed]\nstate-dir = \"{state}\"\nrestart-backoff-ms = 50\n\
             [[embed.instance]]\nname = \"disk\"\nport = {disk_port}\npassword = \"run-pw\"\n\
             data = \"{data}\"\n\
             [[embed.instance]]\nname = \"ram\"\nport = {ram_port}\npassword = \"ram-pw\"\n",
            state = dir.join("state").display(),
            data = dir.join("disk").display(),
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let mut proxy = Upgradable::start(&dir, &["run", "--config", &config]);
    let first = proxy.pid().unwrap();
    let conninfo = format!("{} password=run-pw", proxy.conninfo());
    postgres::Client::connect(&conninfo, postgres::NoTls)
        .unwrap()
        .batch_execute("CREATE TABLE written (id int PRIMARY KEY)")
        .unwrap();
    let ram_url =
        format!("host=127.0.0.1 port={ram_port} user=postgres password=ram-pw dbname=postgres");
    let mut ram = postgres::Client::connect(&ram_url, postgres::NoTls).unwrap();
    ram.batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('in RAM')")
        .unwrap();
    let pids = |proxy: &Upgradable| {
        (
            server_pid(proxy.admin, "disk").expect("disk runs"),
            server_pid(proxy.admin, "ram").expect("ram runs"),
        )
    };
    let (disk_pid, ram_pid) = pids(&proxy);

    // Upgraded while a client writes through the proxy: the new process adopts both servers
    // where they run (same pids), and the old one leaves them running when it exits.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = proxy_writer(conninfo.clone(), stop.clone());
    let second = proxy.upgrade();
    proxy.wait_log("upgrade: embedded server taken over");
    assert!(eventually(DEADLINE, || gone(first)), "{}", proxy.log());
    assert_eq!(pids(&proxy), (disk_pid, ram_pid), "{}", proxy.log());
    assert!(!gone(disk_pid) && !gone(ram_pid));
    // The in-memory server kept its data (its tmpfs directory is not tied to a process).
    let rows = ram
        .simple_query("SELECT v FROM kept")
        .expect("the RAM server still serves");
    let kept = rows.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(kept.as_deref(), Some("in RAM"));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let written = writing
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
    assert!(written > 0);

    // The new process supervises them: a killed postmaster is restarted by it, on its data.
    signal(disk_pid, libc::SIGKILL);
    let restarted = eventually(DEADLINE, || {
        server_pid(proxy.admin, "disk").is_some_and(|pid| pid != disk_pid)
    });
    assert!(
        restarted,
        "not restarted:\n{:?}\n{}",
        instances(proxy.admin),
        proxy.log()
    );
    // Not the new process's child: dead, it stays a zombie of init (which in a container may
    // never reap it), and its lock file must not keep PostgreSQL from starting again.
    assert!(
        !proxy.log().contains("already exists"),
        "a restart met the dead server's lock file:\n{}",
        proxy.log()
    );
    let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM written", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, written, "rows written through the upgrade");
    drop(client);

    // Once more, with a server the new process started itself (its child) among them.
    let (disk_pid, ram_pid) = pids(&proxy);
    let third = proxy.upgrade();
    proxy.wait_log_count("upgrade: embedded server taken over", 4);
    assert!(eventually(DEADLINE, || gone(second)), "{}", proxy.log());
    assert_eq!(pids(&proxy), (disk_pid, ram_pid), "{}", proxy.log());

    // A stop (what `systemctl stop` sends) stops them with the process that supervises them.
    let ram_dir = instances_dir(&dir, ram_pid);
    signal(third, libc::SIGTERM);
    assert!(eventually(DEADLINE, || gone(third)), "{}", proxy.log());
    assert!(
        gone(disk_pid) && gone(ram_pid),
        "servers outlived the stop:\n{}",
        proxy.log()
    );
    if let Some(ram_dir) = ram_dir {
        assert!(!ram_dir.exists(), "{} left behind", ram_dir.display());
    }
}

#[test]
fn a_new_process_that_fails_leaves_the_embedded_servers_to_the_old_one() {
    let dir = scratch("embed-fail");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nshards = 1\npin-cores = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [primary]\nurl = \"postgres://postgres:fail-pw@127.0.0.1:{port}\"\n\
             [embed]\nstate-dir = \"{}\"\nrestart-backoff-ms = 50\n\
             [[embed.instance]]\nname = \"db\"\nport = {port}\npassword = \"fail-pw\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    // The new process gets as far as its supervisor (waiting to adopt) and its shards, then
    // a shard fails: it stops with an error, and must not have touched the servers.
    let failpoint = [("PGPRISM_FAILPOINTS", "upgrade-shard-ring=error")];
    let proxy = Upgradable::start_with(&dir, &["run", "--config", &config], &failpoint);
    let first = proxy.pid().unwrap();
    let pid = server_pid(proxy.admin, "db").expect("db runs");
    let conninfo = format!("{} password=fail-pw", proxy.conninfo());
    let mut session = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    signal(first, libc::SIGUSR2);
    proxy.wait_log("upgrade failed");
    assert!(
        proxy.log().contains("a shard stopped during start-up"),
        "{}",
        proxy.log()
    );
    assert_eq!(proxy.pid(), Some(first));
    assert_eq!(server_pid(proxy.admin, "db"), Some(pid), "{}", proxy.log());
    assert!(!gone(pid));
    session.simple_query("SELECT 1").unwrap();
    // Still the old process's to supervise: it restarts a killed postmaster.
    drop(session);
    signal(pid, libc::SIGKILL);
    assert!(
        eventually(DEADLINE, || server_pid(proxy.admin, "db")
            .is_some_and(|p| p != pid)),
        "{}",
        proxy.log()
    );
    assert!(
        eventually(DEADLINE, || postgres::Client::connect(
            &conninfo,
            postgres::NoTls
        )
        .and_then(|mut c| c.simple_query("SELECT 2"))
        .is_ok()),
        "{}",
        proxy.log()
    );
}

/// The data directory of a running server (its working directory), if readable.
fn instances_dir(_dir: &Path, pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// `[proxy]` settings of a test's config file, with the primary's URL.
fn config_file(dir: &Path, url: &str, proxy: &str) -> String {
    let path = dir.join("pgprism.toml");
    std::fs::write(
        &path,
        format!("[primary]\nurl = \"{url}\"\n[proxy]\n{proxy}\n"),
    )
    .unwrap();
    path.display().to_string()
}

fn upgradable_args(config: &str) -> Vec<String> {
    [
        "proxy",
        "--config",
        config,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--no-pin",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_new_process_that_fails_before_it_is_ready_costs_no_client_and_never_takes_over() {
    let pg = primary("upgrade-fail");
    let url = pg.url();

    // It dies 3 s after its start-up, more shards than before: the connections opened in
    // the meantime must all be the old process's (no accept before ready, and the sockets
    // it adds do not listen yet), so all of them still work once it is gone.
    let dir = scratch("fail-open");
    let config = config_file(&dir, &url, "shards = 1");
    let args = upgradable_args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let failpoint = [("PGPRISM_FAILPOINTS", "upgrade-before-open=exit-after-3000")];
    let proxy = Upgradable::start_with(&dir, &args, &failpoint);
    let first = proxy.pid().unwrap();
    config_file(&dir, &url, "shards = 4");
    signal(first, libc::SIGUSR2);
    proxy.wait_log("failpoint upgrade-before-open fired");
    let mut clients: Vec<postgres::Client> = (0..16)
        .map(|i| {
            let mut client = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls)
                .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", proxy.log()));
            client.simple_query("SELECT 1").unwrap();
            client
        })
        .collect();
    proxy.wait_log("upgrade failed");
    for (i, client) in clients.iter_mut().enumerate() {
        if let Err(err) = client.simple_query("SELECT 2") {
            panic!(
                "connection {i} died with the failed new process: {err:?}\n{}",
                proxy.log()
            );
        }
    }
    assert_eq!(proxy.pid(), Some(first));
    assert!(
        !proxy.notifications().iter().any(|n| n.contains("MAINPID=")),
        "a process that failed told systemd it is the main one"
    );
    drop(clients);
    drop(proxy);

    // A shard whose ring cannot be made: the new process never says ready.
    let dir = scratch("fail-ring");
    let config = config_file(&dir, &url, "shards = 2");
    let args = upgradable_args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let failpoint = [("PGPRISM_FAILPOINTS", "upgrade-shard-ring=error")];
    let proxy = Upgradable::start_with(&dir, &args, &failpoint);
    let first = proxy.pid().unwrap();
    let mut session = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    signal(first, libc::SIGUSR2);
    proxy.wait_log("upgrade failed");
    assert!(
        proxy.log().contains("a shard stopped during start-up"),
        "{}",
        proxy.log()
    );
    assert_eq!(proxy.pid(), Some(first), "{}", proxy.log());
    assert!(!proxy.notifications().iter().any(|n| n.contains("MAINPID=")));
    session.simple_query("SELECT 1").unwrap();
    let mut fresh = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    fresh.simple_query("SELECT 2").unwrap();
}

#[test]
fn the_old_process_never_kills_an_announced_one_and_a_second_usr2_does_not_kill_the_new() {
    let pg = primary("upgrade-race");
    let url = pg.url();

    // Slower than proxy.upgrade-timeout-ms between serving and saying ready: the old process
    // kills it, so it must not have written the pid file or told systemd MAINPID before.
    let dir = scratch("race-kill");
    let config = config_file(&dir, &url, "upgrade-timeout-ms = 1000");
    let args = upgradable_args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let failpoint = [(
        "PGPRISM_FAILPOINTS",
        "upgrade-before-ready-message=pause-4000",
    )];
    let proxy = Upgradable::start_with(&dir, &args, &failpoint);
    let first = proxy.pid().unwrap();
    signal(first, libc::SIGUSR2);
    proxy.wait_log("upgrade failed");
    assert!(
        proxy.log().contains("proxy.upgrade-timeout-ms"),
        "{}",
        proxy.log()
    );
    assert_eq!(
        proxy.pid(),
        Some(first),
        "the pid file names a killed process"
    );
    let notes = proxy.notifications();
    assert!(!notes.iter().any(|n| n.contains("MAINPID=")), "{notes:?}");
    let mut client = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    client.simple_query("SELECT 1").unwrap();
    drop(client);
    drop(proxy);

    // A second SIGUSR2 that reaches the new process while it starts (before it blocks the
    // signal itself) must not end it: the old process blocked it between fork and exec.
    let dir = scratch("race-usr2");
    let config = config_file(&dir, &url, "shards = 1");
    let args = upgradable_args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let failpoint = [("PGPRISM_FAILPOINTS", "upgrade-start=pause-2000")];
    let mut proxy = Upgradable::start_with(&dir, &args, &failpoint);
    let first = proxy.pid().unwrap();
    signal(first, libc::SIGUSR2);
    proxy.wait_log("failpoint upgrade-start fired");
    let child = proxy.successor_pid();
    proxy.pids.push(child);
    signal(child, libc::SIGUSR2);
    assert!(
        eventually(DEADLINE, || proxy.pid() == Some(child)),
        "the new process did not take over:\n{}",
        proxy.log()
    );
    proxy.wait_log("SIGUSR2 reached this process while it took over; ignored");
    assert!(!proxy.log().contains("upgrade failed"), "{}", proxy.log());
    assert!(eventually(DEADLINE, || gone(first)), "{}", proxy.log());
    let mut client = postgres::Client::connect(&proxy.conninfo(), postgres::NoTls).unwrap();
    client.simple_query("SELECT 1").unwrap();
    // The one that took over serves on; the SIGUSR2 started no upgrade of its own.
    assert!(!gone(child));
    assert_eq!(proxy.pid(), Some(child));
}

/// Rows the writer has inserted (ids 1..=n, one autocommit INSERT each), written directly to
/// the source until `stop`.
fn writer(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<i64> {
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("writer connects");
        let mut id = 0i64;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            id += 1;
            client
                .execute("INSERT INTO moving VALUES ($1, 'row')", &[&(id as i32)])
                .expect("insert");
            // Pacing of the writer (a few hundred rows a second), not a wait for anything.
            std::thread::sleep(Duration::from_millis(3));
        }
        id
    })
}

#[test]
fn cdc_moves_to_the_new_process_and_every_row_arrives_exactly_once() {
    use starrocks::{ColType, StarRocks};
    const DB: &str = "moved";
    let pg = primary("upgrade-cdc");
    pg.psql("CREATE TABLE moving (id int PRIMARY KEY, v text)")
        .expect("create table");
    let sr = StarRocks::start("root", "pw");
    sr.create_table(
        DB,
        "moving",
        &["id"],
        &[("id", ColType::Int), ("v", ColType::Text)],
    );
    let dir = scratch("cdc");
    let config = dir.join("pgprism.toml");
    let good = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshards = 1\npin-cores = false\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [primary]\nurl = \"{url}\"\n\
         [cdc]\nsource = \"{url}\"\nstarrocks = \"{sr}\"\nstarrocks-query-port = {query}\n\
         database = \"{DB}\"\ntables = [\"moving\"]\nflush-interval-ms = 100\n\
         handover-timeout-ms = 30000\nsnapshot = false\n",
        url = pg.url(),
        sr = sr.url(),
        query = sr.query.port(),
    );
    std::fs::write(&config, &good).unwrap();
    let config_arg = config.display().to_string();
    let mut proxy = Upgradable::start(&dir, &["run", "--config", &config_arg]);
    let first = proxy.pid().unwrap();
    // No initial snapshot (its copy of a row the stream also carries would be a second,
    // legitimate application): every row comes from the stream, written once it runs.
    proxy.wait_log("starting replication");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = writer(pg.url(), stop.clone());
    // Rows arrive, and keep arriving: each check waits for more than a count seen before.
    let more_than = |seen: usize, proxy: &Upgradable| {
        assert!(
            eventually(DEADLINE, || sr.row_count(DB, "moving") > seen),
            "no rows beyond {seen} reached StarRocks:\n{}",
            proxy.log()
        );
        sr.row_count(DB, "moving")
    };
    let mut seen = more_than(0, &proxy);

    // A new process that fails leaves the old one's CDC running.
    std::fs::write(&config, "[proxy]\nshards = \"many\"\n").unwrap();
    signal(first, libc::SIGUSR2);
    proxy.wait_log("upgrade failed");
    assert_eq!(proxy.pid(), Some(first));
    assert!(!proxy.log().contains("CDC stopped here"), "{}", proxy.log());
    seen = more_than(seen, &proxy);
    std::fs::write(&config, &good).unwrap();

    // Two upgrades while the writer writes: each old process stops its CDC, the new one
    // starts it from the checkpoint, and rows keep arriving.
    let mut pids = vec![first];
    for round in 1..=2 {
        let new = proxy.upgrade();
        let count = |what: &str| proxy.log().matches(what).count();
        assert!(
            eventually(DEADLINE, || count("pgprism cdc started after the upgrade")
                == round),
            "round {round}: the new process did not start CDC:\n{}",
            proxy.log()
        );
        assert_eq!(
            count("upgrade: CDC stopped here (checkpointed)"),
            round,
            "{}",
            proxy.log()
        );
        assert_eq!(
            count("the old process stopped its CDC; starting it here"),
            round
        );
        seen = more_than(seen, &proxy);
        pids.push(new);
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let written = writing.join().expect("writer") as usize;
    let converged = eventually(DEADLINE, || sr.row_count(DB, "moving") == written);
    assert!(
        converged,
        "StarRocks has {} of {written} rows:\n{}",
        sr.row_count(DB, "moving"),
        proxy.log()
    );
    // Exactly once: no row applied twice (a load repeated under its label is answered as
    // loaded, never applied), and every id there.
    assert_eq!(
        sr.applied_rows(DB, "moving"),
        written,
        "rows applied more than once:\n{}",
        proxy.log()
    );
    let ids: std::collections::BTreeSet<i64> = sr
        .rows(DB, "moving", &["id"])
        .into_iter()
        .filter_map(|r| r[0].as_ref()?.parse().ok())
        .collect();
    assert_eq!(ids.len(), written);
    assert_eq!(ids.last().copied(), Some(written as i64));
    eprintln!("{written} rows through two upgrades, each applied once");
    // The old processes are gone (no sessions of theirs), the last one serves.
    for old in &pids[..2] {
        assert!(eventually(DEADLINE, || gone(*old)), "{}", proxy.log());
    }
    assert_eq!(proxy.pid(), Some(pids[2]));
}
