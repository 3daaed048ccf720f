//! Supervision of embedded PostgreSQL servers, against real servers: the `Supervisor` API
//! (isolation, persistence, crash restarts, the restart cap, clear errors), the registry
//! cleanup after a killed pgprism, and the `pgprism embed` binary with its admin routes.
//! Every wait is a poll with a deadline.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgprism::embed::{
    DataDir, EmbedError, Instance, InstanceConfig, InstanceInfo, InstanceState, Supervisor,
    SupervisorSettings,
};
use support::{TempDir, eventually, http_get, pgprism_command};

const DEADLINE: Duration = Duration::from_secs(30);

fn settings(state_dir: &Path) -> SupervisorSettings {
    SupervisorSettings {
        state_dir: Some(state_dir.to_path_buf()),
        restart_backoff: Duration::from_millis(50),
        restart_backoff_max: Duration::from_millis(400),
        ..SupervisorSettings::default()
    }
}

fn instance(name: &str, data: DataDir) -> InstanceConfig {
    InstanceConfig {
        name: name.to_owned(),
        data,
        ..InstanceConfig::default()
    }
}

fn connect(info: &InstanceInfo) -> postgres::Client {
    postgres::Client::connect(&info.url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", info.url))
}

fn count_rows(client: &mut postgres::Client, table: &str) -> Option<i64> {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .ok()
        .map(|row| row.get(0))
}

/// Running and not a zombie (a killed process's orphans may wait a moment to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| {
            let rest = &text[text.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

fn start_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &text[text.rfind(')').expect(")") + 1..];
    rest.split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .expect("starttime")
}

/// Waits until `name` is running with a pid other than `old_pid`.
fn wait_running_with_new_pid(sup: &Supervisor, name: &str, old_pid: u32) -> InstanceInfo {
    let mut last = None;
    let ok = eventually(DEADLINE, || {
        let info = sup.get(name).expect("instance");
        let done = info.state == InstanceState::Running && info.pid.is_some_and(|p| p != old_pid);
        last = Some(info);
        done
    });
    let info = last.expect("polled");
    assert!(ok, "not restarted in time: {info:?}");
    info
}

fn kill9(pid: u32) {
    // SAFETY: the pid is a postmaster this test's supervisor started and still owns.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
}

#[test]
fn instances_are_isolated_and_only_path_data_survives_a_restart() {
    let scratch = TempDir::new("sup-iso");
    let sup = Supervisor::start(settings(&scratch.join("state"))).expect("supervisor");
    let mem = sup
        .add(instance("mem", DataDir::Memory))
        .expect("start memory instance");
    let disk = sup
        .add(instance("disk", DataDir::Path(scratch.join("disk"))))
        .expect("start path instance");
    assert_ne!(mem.port, disk.port);
    assert_eq!(sup.list().len(), 2);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", mem.pid.expect("pid")))
            .expect("status");
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .expect("uid");
        assert_ne!(uid, "0", "servers must not run as root");
    }
    let registry: Vec<_> = std::fs::read_dir(scratch.join("state"))
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(registry.len(), 2, "{registry:?}");

    let mut m = connect(&mem);
    let mut d = connect(&disk);
    m.batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1), (2);")
        .expect("write memory");
    d.batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1), (2), (3);")
        .expect("write disk");
    m.batch_execute("CREATE TABLE only_mem (id int)")
        .expect("create");
    assert_eq!(
        count_rows(&mut d, "only_mem"),
        None,
        "tables leak between instances"
    );
    drop((m, d));

    for name in ["mem", "disk"] {
        let stopped = sup.stop(name).expect("stop");
        assert_eq!(stopped.state, InstanceState::Stopped);
        assert_eq!(stopped.pid, None);
    }
    assert!(
        !Path::new(&mem.data_dir).exists(),
        "memory dir kept after stop"
    );
    assert_eq!(
        std::fs::read_dir(scratch.join("state"))
            .expect("state")
            .count(),
        0,
        "registry entries kept after stop"
    );

    let mem2 = sup.start("mem").expect("start memory again");
    let disk2 = sup.start("disk").expect("start path again");
    assert_eq!((mem2.port, disk2.port), (mem.port, disk.port));
    assert_eq!(count_rows(&mut connect(&disk2), "kept"), Some(3));
    assert_eq!(count_rows(&mut connect(&mem2), "kept"), None);

    let restarted = sup.restart("disk").expect("restart");
    assert_ne!(restarted.pid, disk2.pid);
    assert_eq!(restarted.restarts, 0, "requested restarts are not crashes");
    assert_eq!(count_rows(&mut connect(&restarted), "kept"), Some(3));

    assert!(matches!(
        sup.stop("nope"),
        Err(EmbedError::UnknownInstance { .. })
    ));
    assert!(matches!(
        sup.add(instance("mem", DataDir::Memory)),
        Err(EmbedError::DuplicateInstance { .. })
    ));
    sup.shutdown();
}

#[test]
fn killed_postmaster_is_restarted_on_its_data_and_clients_reconnect() {
    let scratch = TempDir::new("sup-kill9");
    let sup = Supervisor::start(settings(&scratch.join("state"))).expect("supervisor");
    let before = sup
        .add(instance("k9", DataDir::Path(scratch.join("data"))))
        .expect("start");
    let mut client = connect(&before);
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100);")
        .expect("write");

    kill9(before.pid.expect("pid"));
    let after = wait_running_with_new_pid(&sup, "k9", before.pid.expect("pid"));
    assert_eq!(after.restarts, 1);
    assert_eq!(after.port, before.port);
    assert!(
        after
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("exited unexpectedly")),
        "{after:?}"
    );

    // The old connection died with the server; a new one works and sees the data (WAL
    // recovery on the same directory).
    assert!(client.simple_query("SELECT 1").is_err());
    let mut again = connect(&after);
    assert_eq!(count_rows(&mut again, "t"), Some(100));
    again
        .batch_execute("INSERT INTO t VALUES (101)")
        .expect("write after restart");
    sup.shutdown();
}

#[test]
fn memory_instance_restarts_empty_after_a_crash() {
    let scratch = TempDir::new("sup-memcrash");
    let sup = Supervisor::start(settings(&scratch.join("state"))).expect("supervisor");
    let before = sup.add(instance("mc", DataDir::Memory)).expect("start");
    connect(&before)
        .batch_execute("CREATE TABLE gone (id int)")
        .expect("write");
    kill9(before.pid.expect("pid"));
    let after = wait_running_with_new_pid(&sup, "mc", before.pid.expect("pid"));
    assert_eq!(after.restarts, 1);
    assert_ne!(after.data_dir, before.data_dir);
    assert!(
        !Path::new(&before.data_dir).exists(),
        "crashed memory dir kept"
    );
    assert_eq!(count_rows(&mut connect(&after), "gone"), None);
    sup.shutdown();
}

#[test]
fn crash_loop_stops_at_the_restart_cap_with_a_clear_message() {
    let scratch = TempDir::new("sup-loop");
    let backoff_max = Duration::from_millis(100);
    let sup = Supervisor::start(SupervisorSettings {
        restarts_max: 2,
        restart_backoff: Duration::from_millis(20),
        restart_backoff_max: backoff_max,
        ..settings(&scratch.join("state"))
    })
    .expect("supervisor");
    let info = sup
        .add(instance("loop", DataDir::Path(scratch.join("data"))))
        .expect("start");
    // A setting that is accepted now but makes every later start fail: the crash loop.
    connect(&info)
        .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pgprism_no_such_library'")
        .expect("alter system");
    kill9(info.pid.expect("pid"));

    let mut last = None;
    let failed = eventually(DEADLINE, || {
        let now = sup.get("loop").expect("instance");
        let done = now.state == InstanceState::Failed;
        last = Some(now);
        done
    });
    let last = last.expect("polled");
    assert!(failed, "never marked failed: {last:?}");
    assert_eq!(last.restarts, 2);
    assert_eq!(last.pid, None);
    let message = last.last_error.expect("message");
    for needle in [
        "gave up after 2 restarts",
        "embed.restarts-max = 2",
        "pgprism_no_such_library",
    ] {
        assert!(message.contains(needle), "{needle:?} missing in: {message}");
    }
    // It stays failed: no more restarts behind our back. Such a restart would wait on a
    // retry timer of at most `backoff_max`, set when the last crash was noticed (before the
    // failed state seen above): let that timer run out — the timer is the scenario, not a
    // guess — then make sure the supervisor has run a monitor pass since. Its loop serves a
    // request, then monitors, then takes the next request (src/embed/supervisor.rs `run`),
    // so the second of two requests is answered after a monitor pass that began after the
    // sleep, with the table published.
    std::thread::sleep(backoff_max);
    for _ in 0..2 {
        assert!(sup.start("no-such-instance").is_err());
    }
    assert_eq!(sup.get("loop").expect("instance").restarts, 2);
    assert_eq!(
        sup.get("loop").expect("instance").state,
        InstanceState::Failed
    );
    sup.shutdown();
}

#[test]
fn port_in_use_and_missing_binaries_are_clear_errors() {
    let scratch = TempDir::new("sup-errors");
    let sup = Supervisor::start(settings(&scratch.join("state"))).expect("supervisor");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let err = sup
        .add(InstanceConfig {
            port: Some(port),
            ..instance("busy", DataDir::Memory)
        })
        .expect_err("port is taken");
    assert!(matches!(err, EmbedError::PortInUse { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("port {port} on 127.0.0.1 is already in use")),
        "{err}"
    );

    let err = sup
        .add(InstanceConfig {
            bindir: Some(PathBuf::from("/nonexistent/pgprism/bin")),
            ..instance("nobin", DataDir::Memory)
        })
        .expect_err("no binaries");
    assert!(
        err.to_string().contains("apt-get install postgresql"),
        "{err}"
    );
    assert!(sup.list().is_empty(), "failed instances must not be added");
    sup.shutdown();

    // The same through the binary: a non-zero exit and the hint on stderr.
    let out = pgprism_command()
        .args(["embed", "--instance", "a:0", "--admin", ""])
        .args(["--bindir", "/nonexistent/pgprism/bin", "--state-dir"])
        .arg(scratch.join("state"))
        .output()
        .expect("run pgprism");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("apt-get install postgresql"), "{stderr}");
}

/// Writes a registry entry the way a pgprism with pid `pgprism_pid` would have.
fn write_entry(state: &Path, pgprism_pid: u32, name: &str, pid: u32, dir: &Path, memory: bool) {
    std::fs::create_dir_all(state).expect("state dir");
    std::fs::write(
        state.join(format!("{pgprism_pid}-{name}.instance")),
        format!(
            "name={name}\npgprism_pid={pgprism_pid}\npgprism_start_ticks=0\npostmaster_pid={pid}\n\
             postmaster_start_ticks={}\nport=1\nmemory={memory}\ndata_dir={}\n",
            start_ticks(pid),
            dir.display()
        ),
    )
    .expect("write entry");
}

/// A pid that surely belongs to no process now: a child that already exited.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

#[test]
fn leftovers_of_a_dead_pgprism_are_stopped_and_nothing_else_is() {
    let scratch = TempDir::new("sup-leftover");
    let state = scratch.join("state");
    // A server whose pgprism "died": leaked on purpose so only the cleanup can stop it.
    let leaked = Instance::start(instance("leak", DataDir::Memory)).expect("start");
    let (pid, dir) = (leaked.pid(), leaked.data_dir().to_path_buf());
    std::mem::forget(leaked);
    let dead = dead_pid();
    write_entry(&state, dead, "leak", pid, &dir, true);
    // An entry pointing at a process that is not that server must not get it killed.
    let mut bystander = Command::new("sleep").arg("60").spawn().expect("sleep");
    write_entry(&state, dead, "other", bystander.id(), &dir, false);

    let sup = Supervisor::start(settings(&state)).expect("supervisor");
    let cleaned = sup.leftovers_cleaned().join("\n");
    assert!(
        cleaned.contains("instance leak") && cleaned.contains("stopped its server"),
        "{cleaned}"
    );
    assert!(cleaned.contains("instance other"), "{cleaned}");
    let mut reaped = false;
    let ok = eventually(DEADLINE, || {
        let mut status = 0;
        // SAFETY: pid is our own child (leaked above); WNOHANG never blocks.
        reaped = reaped
            || unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) }
                == pid as libc::pid_t;
        reaped
    });
    assert!(ok, "leftover postmaster {pid} still running");
    assert!(!dir.exists(), "leftover memory dir kept");
    assert_eq!(
        std::fs::read_dir(&state).expect("state").count(),
        0,
        "cleaned entries kept"
    );
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "an unrelated process was signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    sup.shutdown();
}

/// A running `pgprism embed`, killed on drop.
struct Embed {
    child: Child,
    /// name → (port, pid)
    instances: Vec<(String, u16, u32)>,
    /// Each instance's superuser password (TCP takes no connection without it).
    passwords: Vec<String>,
    admin: Option<SocketAddr>,
    _token: support::TokenFile,
}

impl Embed {
    fn start(state: &Path, args: &[&str]) -> Embed {
        let token = support::admin_token_file();
        let mut child = pgprism_command()
            .args(["embed", "--admin", "127.0.0.1:0", "--admin-token-file"])
            .arg(&*token)
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pgprism embed");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut instances = Vec::new();
        let mut passwords = Vec::new();
        let mut admin = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).expect("read") == 0 {
                let _ = child.kill();
                panic!("pgprism embed exited before it was ready");
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with("pgprism embed ready") {
                admin = words.get(4).and_then(|w| w.parse().ok()).or(admin);
                break;
            }
            // pgprism embed: instance NAME ready on HOST:PORT pid PID ...
            let port = words[6].rsplit(':').next().and_then(|p| p.parse().ok());
            instances.push((
                words[3].to_owned(),
                port.expect("port"),
                words[8].parse().expect("pid"),
            ));
            assert!(line.contains(" psql 'postgres://"), "{line}");
            // The password is in the instance's passfile, not in the line.
            let passfile = words[12]
                .strip_prefix("PGPASSFILE=")
                .unwrap_or_else(|| panic!("no passfile in {line}"));
            let password = pgprism::embed::kept_password(Path::new(passfile).parent().unwrap());
            passwords.push(password.expect("a password in the passfile"));
        }
        Embed {
            child,
            instances,
            passwords,
            admin,
            _token: token,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            // Polling interval of this bounded wait for the exit, not a wait in itself.
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Embed {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_exit().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A POST with the admin token (the instance actions change state, so they need it).
fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    let (code, _, body) = support::http_request(addr, "POST", path, Some(support::ADMIN_TOKEN));
    (code, body)
}

#[derive(serde::Deserialize, Debug)]
struct Listed {
    name: String,
    state: String,
    port: u16,
    pid: Option<u32>,
    restarts: u32,
}

#[test]
fn killed_pgprism_embed_leaves_no_server_and_the_next_start_cleans_up() {
    let scratch = TempDir::new("sup-sigkill");
    let state = scratch.join("state");
    let data = scratch.join("b").display().to_string();
    let mut first = Embed::start(
        &state,
        &["--instance", "a:0", "--instance", &format!("b:0:{data}")],
    );
    assert_eq!(first.instances.len(), 2);
    let first_pid = first.child.id();
    first.signal(libc::SIGKILL);
    first.wait_exit().expect("killed");
    for (name, _, pid) in &first.instances {
        assert!(
            eventually(DEADLINE, || !alive(*pid)),
            "postmaster of {name} (pid {pid}) outlived its pgprism"
        );
    }
    let stale = |state: &Path| {
        std::fs::read_dir(state)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{first_pid}-"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        stale(&state),
        2,
        "the killed pgprism's entries are the evidence"
    );

    // The next start finds the dead pgprism's entries and cleans them; the path data is
    // still there and the new server recovers it.
    let second = Embed::start(&state, &["--instance", &format!("b:0:{data}")]);
    assert_eq!(stale(&state), 0, "entries of the killed pgprism kept");
    let (_, port, _) = &second.instances[0];
    let password = &second.passwords[0];
    let mut client = postgres::Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres password={password} dbname=postgres"),
        postgres::NoTls,
    )
    .expect("connect");
    client.simple_query("SELECT 1").expect("query");
}

#[test]
fn admin_lists_and_restarts_instances_of_the_binary() {
    let scratch = TempDir::new("sup-admin");
    let mut embed = Embed::start(
        &scratch.join("state"),
        &["--instance", "a:0", "--instance", "b:0:memory"],
    );
    let admin = embed.admin.expect("admin address");
    let list = |admin| {
        let (code, body) = http_get(admin, "/instances");
        assert_eq!(code, 200, "{body}");
        sonic_rs::from_str::<Vec<Listed>>(&body).expect("json list")
    };
    let before = list(admin);
    assert_eq!(before.len(), 2);
    assert!(
        before
            .iter()
            .all(|i| i.state == "running" && i.restarts == 0)
    );
    let a_pid = before[0].pid.expect("pid");
    assert_eq!(before[0].name, "a");
    assert_eq!(before[0].port, embed.instances[0].1);

    let (code, body) = http_post(admin, "/instances/a/restart");
    assert_eq!(code, 200, "{body}");
    let restarted: Listed = sonic_rs::from_str(&body).expect("json");
    assert_eq!(restarted.state, "running");
    assert_ne!(restarted.pid, Some(a_pid));
    assert!(!alive(a_pid), "old postmaster still running");
    assert_eq!(list(admin)[0].pid, restarted.pid);

    let (code, body) = http_post(admin, "/instances/b/stop");
    assert_eq!(code, 200, "{body}");
    assert_eq!(list(admin)[1].state, "stopped");
    let (code, _) = http_post(admin, "/instances/b/start");
    assert_eq!(code, 200);
    assert_eq!(list(admin)[1].state, "running");
    let (code, body) = http_post(admin, "/instances/zz/restart");
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        http_get(admin, "/health").0,
        200,
        "built-in routes still served"
    );

    let pids: Vec<u32> = list(admin).iter().filter_map(|i| i.pid).collect();
    embed.signal(libc::SIGTERM);
    let status = embed.wait_exit().expect("exits on SIGTERM");
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(!alive(pid), "postmaster {pid} running after SIGTERM");
    }
}

/// Start-to-ready of a memory instance from a warm template (the path every supervised start
/// and crash restart takes). Runs 3 starts as a test; `benches/embed-start.sh` runs it in
/// release with `PGPRISM_BENCH_STARTS=20` and reads the printed median.
#[test]
fn bench_start_to_ready() {
    let starts: usize = std::env::var("PGPRISM_BENCH_STARTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    Instance::start(instance("warm", DataDir::Memory))
        .expect("warm-up")
        .stop()
        .expect("stop");
    let mut timings_us: Vec<u128> = (0..starts)
        .map(|_| {
            let started = Instant::now();
            let inst = Instance::start(instance("bench", DataDir::Memory)).expect("start");
            let elapsed = started.elapsed().as_micros();
            inst.stop().expect("stop");
            elapsed
        })
        .collect();
    timings_us.sort_unstable();
    let pick = |q: f64| timings_us[((timings_us.len() - 1) as f64 * q).round() as usize];
    println!(
        "embed start-to-ready over {starts} starts: median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms",
        pick(0.5) as f64 / 1000.0,
        pick(0.9) as f64 / 1000.0,
        timings_us[0] as f64 / 1000.0,
        timings_us[timings_us.len() - 1] as f64 / 1000.0,
    );
    assert!(pick(0.5) > 0);
}
