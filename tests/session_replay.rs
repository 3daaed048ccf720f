//! The session tracker against real traffic: psql, pgbench, the `postgres` crate, JDBC and
//! psycopg2 run through pgprism (in front of a real PostgreSQL) behind a recorder that keeps
//! every connection's bytes in causal order; each recording is then replayed through
//! `pgprism::session::Tracker`, which must predict every ReadyForQuery the server sent (each
//! sync point it opened answered, none left over), end between batches at the client's Terminate,
//! read every body, and know the statement behind every Execute.
//!
//! With `PGPRISM_WRITE_SESSION_CORPUS=1` the recordings are also written as seeds for the
//! `session_track` fuzzer (fuzz/corpus/session_track).

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;

use pgprism::session::{Limits, Tracker};
use pgprism::wire::{self, StartupPacket};
use support::{MD5_USER, PASSWORD, Proxy, SCRAM_USER, start_primary};

/// One connection's bytes: `true` for client → server, in the order they crossed.
type Recording = Vec<(bool, Vec<u8>)>;

/// A TCP relay in front of `upstream` that records every connection.
struct Recorder {
    port: u16,
    sessions: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>>,
}

impl Recorder {
    fn start(upstream: u16) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sessions: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>> = Arc::default();
        let all = sessions.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let recording: Arc<Mutex<Recording>> = Arc::default();
                all.lock().unwrap().push(recording.clone());
                for (from, to, from_client) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (server, client, false),
                ] {
                    let recording = recording.clone();
                    thread::spawn(move || copy(from, to, from_client, &recording));
                }
            }
        });
        Recorder { port, sessions }
    }

    fn recordings(&self) -> Vec<Recording> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }
}

/// Relays one direction. A chunk is recorded before it is forwarded, so an answer is always
/// recorded after what it answers.
fn copy(mut from: TcpStream, mut to: TcpStream, from_client: bool, recording: &Mutex<Recording>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                recording
                    .lock()
                    .unwrap()
                    .push((from_client, buf[..n].to_vec()));
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// What replaying one recording found.
#[derive(Debug)]
struct Replayed {
    tracker: Tracker,
    ready_for_query: u64,
}

/// Replays a recording through a tracker: the untagged startup packets (an SSLRequest is
/// answered by one untagged byte) first, then every frame in both directions.
fn replay(recording: &Recording) -> Result<Replayed, String> {
    let mut tracker = Tracker::new(Limits::default());
    let (mut client, mut server) = (Vec::new(), Vec::new());
    let mut started = false;
    let mut server_skip = 0usize;
    let mut ready_for_query = 0u64;
    for (from_client, bytes) in recording {
        if *from_client {
            client.extend_from_slice(bytes);
        } else {
            server.extend_from_slice(bytes);
        }
        while !started {
            let mut buf = bytes::BytesMut::from(&client[..]);
            let Some(packet) = wire::split_startup(&mut buf, 10_000).map_err(|e| e.to_string())?
            else {
                break;
            };
            client.drain(..packet.len());
            match StartupPacket::parse(&packet).map_err(|e| e.to_string())? {
                StartupPacket::SslRequest | StartupPacket::GssEncRequest => server_skip += 1,
                StartupPacket::Startup { .. } => started = true,
                StartupPacket::Cancel { .. } => return Err("a cancel connection".into()),
            }
        }
        let skip = server_skip.min(server.len());
        server.drain(..skip);
        server_skip -= skip;
        if !started {
            continue;
        }
        let n = tracker
            .client_bytes(&client, 1 << 30)
            .map_err(|e| e.to_string())?;
        client.drain(..n);
        let n = wire::complete_prefix(&server, 1 << 30, |tag, body| {
            ready_for_query += u64::from(tag == wire::tag::READY_FOR_QUERY);
            tracker.server(tag, body);
        })
        .map_err(|e| e.to_string())?;
        server.drain(..n);
    }
    if !client.is_empty() || !server.is_empty() {
        return Err(format!(
            "{} client and {} server bytes left over",
            client.len(),
            server.len()
        ));
    }
    Ok(Replayed {
        tracker,
        ready_for_query,
    })
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn psql(port: u16, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new("psql");
    cmd.arg(format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=prefer"
    ))
    .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
    .args(args);
    match stdin {
        None => run(&mut cmd, "psql"),
        Some(input) => {
            use std::process::Stdio;
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "psql: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }
}

fn pgbench(port: u16, args: &[&str]) {
    let port = port.to_string();
    run(
        Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres"),
        "pgbench",
    );
}

/// The `postgres` crate: prepared statements, a transaction with a savepoint, COPY FROM
/// STDIN through the extended protocol, a failed statement and simple queries.
fn rust_driver(port: u16) {
    use std::io::Write as _;
    let mut client = postgres::Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        postgres::NoTls,
    )
    .unwrap();
    client
        .batch_execute("CREATE TABLE rs (id int PRIMARY KEY, v text); SET search_path = public")
        .unwrap();
    let insert = client.prepare("INSERT INTO rs VALUES ($1, $2)").unwrap();
    for i in 0..20 {
        client.execute(&insert, &[&i, &format!("v{i}")]).unwrap();
    }
    let mut tx = client.transaction().unwrap();
    tx.execute("UPDATE rs SET v = 'x' WHERE id = $1", &[&1])
        .unwrap();
    let mut sp = tx.savepoint("s").unwrap();
    assert!(sp.execute("INSERT INTO rs VALUES (1, 'dup')", &[]).is_err());
    sp.rollback().unwrap();
    tx.commit().unwrap();
    let mut writer = client.copy_in("COPY rs FROM STDIN").unwrap();
    for i in 100..200 {
        writeln!(writer, "{i}\tc{i}").unwrap();
    }
    writer.finish().unwrap();
    let rows = client.query("SELECT count(*) FROM rs", &[]).unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 120);
    assert!(client.simple_query("SELECT * FROM missing_table").is_err());
    client.simple_query("SELECT 1; SELECT 2").unwrap();
}

fn clients_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

#[test]
fn the_tracker_predicts_every_answer_of_real_clients_through_pgprism() {
    let primary = start_primary("replay");
    let proxy = Proxy::start(&primary.url(), &[]);
    let recorder = Recorder::start(proxy.port());
    let port = recorder.port;

    psql(
        port,
        &[
            "-c",
            "CREATE TABLE ps (id int, v text)",
            "-c",
            "PREPARE ins (int) AS INSERT INTO ps VALUES ($1, 'p'); EXECUTE ins(1); DEALLOCATE ins",
            "-c",
            "BEGIN; SET LOCAL statement_timeout = 5000; SET search_path = public; COMMIT",
        ],
        None,
    );
    let copied = psql(
        port,
        &[
            "-c",
            "\\copy ps FROM STDIN",
            "-c",
            "SELECT count(*) FROM ps",
        ],
        Some("2\ta\n3\tb\n\\.\n"),
    );
    assert_eq!(copied.trim(), "3");
    pgbench(port, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        pgbench(port, &["-M", mode, "-c", "2", "-t", "20"]);
    }
    rust_driver(port);
    let url =
        format!("jdbc:postgresql://127.0.0.1:{port}/postgres?sslmode=prefer&prepareThreshold=3");
    run(
        Command::new("java")
            .arg("-cp")
            .arg("/usr/share/java/postgresql.jar")
            .arg(clients_dir().join("JdbcWorkload.java"))
            .args([&url, SCRAM_USER, PASSWORD, "jdbc_r"]),
        "the JDBC workload",
    );
    let dsn =
        format!("host=127.0.0.1 port={port} dbname=postgres user={MD5_USER} password='{PASSWORD}'");
    run(
        Command::new("/usr/bin/python3")
            .arg(clients_dir().join("psycopg_workload.py"))
            .args([&dsn, "psy_r"]),
        "the psycopg2 workload",
    );

    // Every client has closed its connection; the recorder's relays finish as the proxy
    // closes its side.
    drop(proxy);
    let recordings = recorder.recordings();
    // psql 3, pgbench 1 + 3 * (2 clients + 1 setup), the postgres crate 1, JDBC and
    // psycopg2 at least 1 each.
    assert!(
        recordings.len() >= 13,
        "{} sessions recorded",
        recordings.len()
    );
    let mut totals = (0u64, 0u64, 0u64);
    for (i, recording) in recordings.iter().enumerate() {
        let replayed = replay(recording).unwrap_or_else(|e| panic!("session {i}: {e}"));
        let t = &replayed.tracker;
        let (opened, answered) = t.sync_points();
        assert!(t.ready(), "session {i}: startup never ended");
        assert_eq!(
            replayed.ready_for_query,
            answered + 1,
            "session {i}: the tracker counted the server's ReadyForQuery messages"
        );
        assert_eq!(
            opened, answered,
            "session {i}: every sync point the tracker saw opened was answered, and no more"
        );
        // A client may close inside a transaction block (psycopg2 does), never mid-batch.
        assert!(
            !t.extended_open() && matches!(t.status(), b'I' | b'T' | b'E'),
            "session {i}: ends between batches (status {})",
            t.status()
        );
        assert!(t.terminated(), "session {i}: said Terminate");
        assert_eq!(t.unreadable(), 0, "session {i}: every body read");
        assert_eq!(
            t.unknown_executes(),
            0,
            "session {i}: every Execute's statement known"
        );
        totals.0 += opened;
        totals.1 += u64::from(t.names().0 > 0);
        totals.2 += t.quiet_syncs();
        if std::env::var_os("PGPRISM_WRITE_SESSION_CORPUS").is_some() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/session_track");
            std::fs::create_dir_all(&dir).unwrap();
            // Seeds stay small: the first 16 KiB of each session.
            let mut seed = pgprism::session::fuzzing::encode(recording);
            seed.truncate(16 << 10);
            std::fs::write(dir.join(format!("recorded_{i:02}")), seed).unwrap();
        }
    }
    assert!(totals.0 > 200, "{} sync points in all", totals.0);
    assert!(
        totals.1 >= 3,
        "named statements seen in {} sessions",
        totals.1
    );
    // The postgres crate's and JDBC's COPY FROM STDIN go through Execute: the Sync sent
    // during the COPY is ignored, the one after it answered for it.
    assert!(totals.2 >= 1, "{} quiet Syncs", totals.2);
}
