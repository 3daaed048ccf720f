//! Integration tests for `pgprism::embed` against real PostgreSQL servers started from the
//! system binaries. Each test starts its own instances, so they run in parallel (nextest runs
//! each in its own process).

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pgprism::embed::{DataDir, EmbedError, Instance, InstanceConfig, PgBinaries};
use support::TempDir;

fn config(name: &str) -> InstanceConfig {
    InstanceConfig {
        name: name.to_owned(),
        ..InstanceConfig::default()
    }
}

/// psql as an arbitrary role over TCP with the password in PGPASSWORD, never prompting.
fn psql_with_password(inst: &Instance, user: &str, password: &str, sql: &str) -> Output {
    Command::new(inst.psql_path())
        .args([
            "-X",
            "-w",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            inst.host(),
            "-U",
            user,
        ])
        .args(["-d", "postgres", "-p", &inst.port().to_string(), "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .expect("run psql")
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn two_instances_are_isolated() {
    let a = Instance::start(config("iso-a")).expect("start a");
    let b = Instance::start(config("iso-b")).expect("start b");
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());

    a.psql("CREATE TABLE only_in_a (id int); INSERT INTO only_in_a VALUES (42);")
        .expect("create in a");
    assert_eq!(
        a.psql("SELECT id FROM only_in_a").expect("select a").trim(),
        "42"
    );
    let absent = b
        .psql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'")
        .expect("query b");
    assert_eq!(absent.trim(), "0");
    let err = b
        .psql("SELECT * FROM only_in_a")
        .expect_err("table must be absent in b");
    assert!(
        matches!(err, EmbedError::PsqlFailed { ref stderr, .. } if stderr.contains("does not exist")),
        "{err:?}"
    );

    a.stop().expect("stop a");
    b.stop().expect("stop b");
}

#[test]
fn defaults_are_applied_and_database_is_created() {
    let cfg = InstanceConfig {
        database: "app db".to_owned(),
        settings: vec![("work_mem".to_owned(), "7MB".to_owned())],
        ..config("defaults")
    };
    let inst = Instance::start(cfg).expect("start");
    let show = |name: &str| {
        inst.psql(&format!("SHOW {name}"))
            .expect("show")
            .trim()
            .to_owned()
    };
    assert_eq!(show("max_connections"), "300");
    assert_eq!(show("wal_level"), "logical");
    assert_eq!(show("max_replication_slots"), "10");
    assert_eq!(show("fsync"), "off");
    assert_eq!(show("full_page_writes"), "off");
    assert_eq!(show("work_mem"), "7MB");
    assert_eq!(
        inst.psql("SELECT current_database()").expect("db").trim(),
        "app db"
    );
    assert_eq!(show("server_encoding"), "UTF8");
    assert_eq!(
        inst.url(),
        format!("postgres://postgres@127.0.0.1:{}/app%20db", inst.port())
    );
    // The unix socket lives in the data dir, so nothing needs /var/run/postgresql.
    assert!(
        inst.data_dir()
            .join(format!(".s.PGSQL.{}", inst.port()))
            .exists()
    );
    assert!(inst.data_dir().join("server.log").exists());
}

#[test]
fn path_instance_keeps_data_across_restart() {
    let scratch = TempDir::new("test-keep");
    let dir = scratch.join("data");
    let cfg = InstanceConfig {
        data: DataDir::Path(dir.clone()),
        ..config("keep")
    };
    let first = Instance::start(cfg.clone()).expect("first start");
    assert_eq!(first.data_dir(), dir);
    first
        .psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here');")
        .expect("write");
    first.stop().expect("stop");
    assert!(
        dir.join("PG_VERSION").exists(),
        "path data dir must be kept"
    );

    let second = Instance::start(cfg).expect("second start");
    assert_eq!(
        second.psql("SELECT v FROM kept").expect("read").trim(),
        "still here"
    );
    // Path instances are durable-ish: full_page_writes stays on.
    assert_eq!(
        second.psql("SHOW full_page_writes").expect("show").trim(),
        "on"
    );
    second.stop().expect("stop again");
}

#[test]
fn path_dir_with_foreign_files_is_refused() {
    let scratch = TempDir::new("test-foreign");
    std::fs::write(scratch.join("precious.txt"), "keep me").expect("write");
    let cfg = InstanceConfig {
        data: DataDir::Path(scratch.to_path_buf()),
        ..config("foreign")
    };
    let err = Instance::start(cfg).expect_err("must not copy a cluster over foreign files");
    assert!(matches!(err, EmbedError::DataDirNotEmpty { .. }), "{err:?}");
    assert_eq!(
        std::fs::read_to_string(scratch.join("precious.txt")).expect("still there"),
        "keep me"
    );
}

#[test]
fn memory_dir_is_removed_after_stop_and_drop() {
    let inst = Instance::start(config("mem")).expect("start");
    let dir = inst.data_dir().to_path_buf();
    assert!(dir.starts_with("/dev/shm"), "{}", dir.display());
    assert!(dir.join("PG_VERSION").exists());
    inst.stop().expect("stop");
    assert!(
        !dir.exists(),
        "memory data dir {} left behind",
        dir.display()
    );

    // Drop does the same, and the server is gone afterwards.
    let inst = Instance::start(config("mem-drop")).expect("start");
    let dir = inst.data_dir().to_path_buf();
    let pid = inst.pid();
    drop(inst);
    assert!(
        !dir.exists(),
        "memory data dir {} left behind by drop",
        dir.display()
    );
    assert!(!process_alive(pid), "postmaster {pid} survived drop");
}

#[test]
fn second_instance_on_a_used_port_is_port_in_use() {
    let first = Instance::start(config("port-a")).expect("start first");
    let cfg = InstanceConfig {
        port: Some(first.port()),
        ..config("port-b")
    };
    let err = Instance::start(cfg).expect_err("second start on the same port must fail");
    match err {
        EmbedError::PortInUse { port, .. } => assert_eq!(port, first.port()),
        other => panic!("expected PortInUse, got {other:?}"),
    }
    // The first one is untouched.
    assert_eq!(
        first.psql("SELECT 1").expect("first still serves").trim(),
        "1"
    );
}

#[test]
fn locate_rejects_a_configured_dir_that_does_not_exist() {
    let err = PgBinaries::locate(Some(Path::new("/nonexistent"))).expect_err("must not fall back");
    assert!(
        matches!(err, EmbedError::ConfiguredBindirInvalid { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("apt-get install postgresql"),
        "{err}"
    );

    let found = PgBinaries::locate(None).expect("system binaries");
    assert!(found.bindir.join("postgres").is_file());
    assert!(found.version_major >= 10, "{found:?}");
    let again = PgBinaries::locate(Some(&found.bindir)).expect("explicit dir");
    assert_eq!(again, found);
}

#[test]
fn scram_hba_line_is_enforced_for_a_role_with_a_password() {
    let cfg = InstanceConfig {
        hba: vec!["host all u 127.0.0.1/32 scram-sha-256".to_owned()],
        ..config("scram")
    };
    let inst = Instance::start(cfg).expect("start");
    inst.psql("CREATE ROLE u LOGIN PASSWORD 'p'")
        .expect("create role");

    let ok = psql_with_password(&inst, "u", "p", "SELECT current_user");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "u");

    let bad = psql_with_password(&inst, "u", "wrong", "SELECT current_user");
    assert!(!bad.status.success(), "wrong password was accepted");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );

    // url_for carries the credentials too.
    let via_url = Command::new(inst.psql_path())
        .args(["-X", "-w", "-At", "-c", "SELECT current_user"])
        .arg(inst.url_for("u", "p", "postgres"))
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .expect("run psql");
    assert!(
        via_url.status.success(),
        "{}",
        String::from_utf8_lossy(&via_url.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&via_url.stdout).trim(), "u");
}

#[test]
fn server_dies_when_the_spawning_thread_exits() {
    // The instance is leaked on purpose: only the parent-death signal can stop the server.
    // As root the server runs as `postgres`, so this also shows the signal survives the uid
    // switch std does before our pre_exec hook.
    let (pid, dir) = std::thread::spawn(|| {
        let inst = Instance::start(config("pdeath")).expect("start");
        let out = (inst.pid(), inst.data_dir().to_path_buf());
        std::mem::forget(inst);
        out
    })
    .join()
    .expect("thread");

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reaped = false;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: pid is our own child (leaked by the instance); WNOHANG never blocks.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc == pid as libc::pid_t {
            reaped = true;
            break;
        }
        // Polling interval of this bounded wait for the exit, not a wait in itself.
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        reaped,
        "postmaster {pid} still running after its spawning thread exited"
    );
}

#[test]
fn many_instances_start_concurrently() {
    // Races for ports and for the template lock, as in a parallel test run.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let inst = Instance::start(config(&format!("conc-{i}"))).expect("start");
                let got = inst.psql(&format!("SELECT {i}")).expect("query");
                inst.stop().expect("stop");
                got.trim().parse::<i32>().expect("number")
            })
        })
        .collect();
    let results: Vec<i32> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_eq!(results, vec![0, 1, 2, 3]);
}

#[test]
fn start_time_with_a_cached_template() {
    // The first start may build the template; measure the ones after it.
    Instance::start(config("warm"))
        .expect("warm-up start")
        .stop()
        .expect("stop");
    let mut timings_ms = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let inst = Instance::start(config("timed")).expect("start");
        timings_ms.push(started.elapsed().as_millis());
        inst.stop().expect("stop");
    }
    println!("Instance::start with a cached template: {timings_ms:?} ms");
}

/// A server with a password takes TCP connections only with it (no superuser shell for any
/// local user through `COPY ... TO PROGRAM`); its passfile (mode 0600) holds it, and the
/// helpers (url, psql) use it.
#[test]
fn a_server_with_a_password_refuses_tcp_without_it() {
    let scratch = TempDir::new("test-password");
    let data = scratch.join("data");
    let password = pgprism::embed::generate_password().unwrap();
    assert_eq!(password.len(), 32);
    let inst = Instance::start(InstanceConfig {
        password: Some(password.clone()),
        data: DataDir::Path(data.clone()),
        ..config("password")
    })
    .expect("start");
    let bare = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        inst.port()
    );
    let err = postgres::Client::connect(&bare, postgres::NoTls)
        .err()
        .expect("refused without the password");
    // The server asked for a password (SCRAM) the client does not have.
    assert!(format!("{err:?}").contains("password missing"), "{err:?}");
    let out = psql_with_password(&inst, "postgres", "guess", "SELECT 1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The URL carries it; psql() uses it.
    let mut client = postgres::Client::connect(&inst.url(), postgres::NoTls).unwrap();
    client.simple_query("SELECT 1").unwrap();
    assert_eq!(inst.psql("SELECT 2").unwrap().trim(), "2");
    assert!(!inst.url_without_password().contains(&password));
    use std::os::unix::fs::PermissionsExt;
    let passfile = inst.passfile().expect("a passfile");
    let mode = std::fs::metadata(&passfile).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(pgprism::embed::kept_password(&data), Some(password.clone()));
    // libpq takes the file as it is (PGPASSFILE).
    let out = Command::new(inst.psql_path())
        .args([
            "-X",
            "-At",
            "-w",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-p")
        .arg(inst.port().to_string())
        .args(["-c", "SELECT 3"])
        .env("PGPASSFILE", &passfile)
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(client);
    inst.stop().unwrap();
}

/// Processes whose command line (`/proc/PID/cmdline`, readable by every local user)
/// contains `secret`.
fn processes_showing(secret: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(secret) {
            found.push(line);
        }
    }
    found
}

/// The superuser's password never shows: not in any process's argv while the server starts
/// or after, not in the server log even with every statement logged, not in the catalog
/// (which holds a SCRAM-SHA-256 verifier of 4096 iterations made from it). A password and a
/// database name with quotes and backslashes survive `standard_conforming_strings = off`.
#[test]
fn the_password_shows_nowhere_and_survives_any_quoting() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let scratch = TempDir::new("test-password-hidden");
    let data = scratch.join("data");
    let password = format!(
        "p\\'w\" x'{}\\",
        pgprism::embed::generate_password().unwrap()
    );
    let database = "db\\'q";
    // Watch every process's argv for as long as the start takes.
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (done, seen, password) = (done.clone(), seen.clone(), password.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                seen.lock().unwrap().extend(processes_showing(&password));
            }
        })
    };
    let started = Instance::start(InstanceConfig {
        password: Some(password.clone()),
        database: database.to_owned(),
        data: DataDir::Path(data.clone()),
        settings: vec![
            ("standard_conforming_strings".into(), "off".into()),
            ("log_statement".into(), "all".into()),
        ],
        ..config("password-hidden")
    });
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let inst = started.expect("start");
    assert_eq!(*seen.lock().unwrap(), Vec::<String>::new());
    assert_eq!(processes_showing(&password), Vec::<String>::new());

    // Login with it works, into the database with the odd name; the setting is in force.
    let mut client = postgres::Client::connect(&inst.url(), postgres::NoTls).unwrap();
    let row = client
        .query_one(
            "SELECT current_database(), current_setting('standard_conforming_strings')",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), database);
    assert_eq!(row.get::<_, String>(1), "off");

    // The catalog holds the verifier of this very password.
    let stored: String = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'",
            &[],
        )
        .unwrap()
        .get(0);
    let secret = pgprism::wire::ScramSecret::parse(&stored).expect("a SCRAM verifier");
    assert_eq!(secret.iterations(), 4096);
    assert_eq!(secret.salt().len(), 16);
    assert_eq!(
        secret,
        pgprism::wire::ScramSecret::from_password(&password, secret.salt(), 4096)
    );
    // Logging works (the statement above is in the log), and never showed the password.
    let log = std::fs::read_to_string(data.join("server.log")).expect("server log");
    assert!(log.contains("pg_authid"), "{log}");
    assert!(!log.contains(&password), "{log}");
    inst.stop().unwrap();
}
