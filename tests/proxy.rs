//! The transparent proxy against real PostgreSQL servers, with real clients: the `postgres`
//! crate (tokio-postgres underneath), psql, pgbench, and raw sockets for what clients won't
//! send (garbage, pipelines, stalls).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::{
    MD5_USER, PASSWORD, Proxy, SCRAM_USER, closed_by_server, eventually, raw, sqlstate,
    start_primary,
};

#[test]
fn simple_extended_multi_statement_and_transactions() {
    let pg = start_primary("p-basic");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut c = proxy.client();

    // Multi-statement simple query: every statement runs, results come back in order.
    let results = c
        .simple_query("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1,'a'),(2,'b'); SELECT count(*) FROM t")
        .unwrap();
    let count = results.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("2"));

    // Extended protocol with parameters, prepared once and executed many times.
    let stmt = c.prepare("SELECT v FROM t WHERE id = $1").unwrap();
    for (id, want) in [(1, "a"), (2, "b")] {
        let row = c.query_one(&stmt, &[&id]).unwrap();
        assert_eq!(row.get::<_, String>(0), want);
    }

    // A failed transaction stays failed (25P02) until ROLLBACK, exactly as without a proxy.
    let mut tx = c.transaction().unwrap();
    tx.execute("INSERT INTO t VALUES (3,'c')", &[]).unwrap();
    let dup = tx
        .execute("INSERT INTO t VALUES (1,'dup')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&dup).as_deref(), Some("23505"));
    let aborted = tx.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(sqlstate(&aborted).as_deref(), Some("25P02"));
    tx.rollback().unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 2, "the rolled-back insert is gone");

    // Committed work is visible on the primary directly.
    c.batch_execute("BEGIN; INSERT INTO t VALUES (4,'d'); COMMIT")
        .unwrap();
    assert_eq!(pg.psql("SELECT v FROM t WHERE id = 4").unwrap().trim(), "d");
}

#[test]
fn password_users_md5_and_scram_are_relayed() {
    let pg = start_primary("p-auth");
    let proxy = Proxy::start(&pg.url(), &[]);
    for user in [MD5_USER, SCRAM_USER] {
        let mut c =
            postgres::Client::connect(&proxy.conninfo(user, Some(PASSWORD)), postgres::NoTls)
                .unwrap_or_else(|e| panic!("{user} through pgprism: {e}"));
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        let wrong =
            postgres::Client::connect(&proxy.conninfo(user, Some("wrong")), postgres::NoTls)
                .err()
                .unwrap_or_else(|| panic!("{user} with a wrong password was let in"));
        assert_eq!(
            sqlstate(&wrong).as_deref(),
            Some("28P01"),
            "{user}: {wrong}"
        );
    }
    // psql (libpq) with SCRAM as well.
    let out = Command::new("psql")
        .args([
            "-X",
            "-w",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port().to_string(),
        ])
        .args(["-U", SCRAM_USER, "-d", "postgres", "-c", "SELECT 40 + 2"])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[test]
fn psql_sslmode_prefer_falls_back_and_notices_arrive() {
    let pg = start_primary("p-psql");
    let proxy = Proxy::start(&pg.url(), &[]);
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=prefer",
            proxy.port()
        ))
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-c",
            "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$",
        ])
        .args(["-c", "SELECT 'done'"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("hello from plpgsql"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
    // sslmode=require must fail cleanly: pgprism does not speak TLS yet and says 'N'.
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            proxy.port()
        ))
        .args(["-X", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SSL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pgbench_simple_extended_and_prepared() {
    let pg = start_primary("p-bench");
    let proxy = Proxy::start(&pg.url(), &[]);
    let port = proxy.port().to_string();
    support::pgbench_init(proxy.port());
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-n"])
            .args(["-c", "8", "-j", "2", "-t", "50", "-M", mode, "postgres"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {}\nproxy log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            proxy.log()
        );
        assert!(
            stdout.contains("number of transactions actually processed: 400/400"),
            "{mode}: {stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{mode}: {stdout}"
        );
    }
    // The TPC-B transactions really ran on the primary.
    let history: u64 = pg
        .psql("SELECT count(*) FROM pgbench_history")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(history, 1200);
}

#[test]
fn pipelined_extended_batch_is_answered_in_order() {
    let pg = start_primary("p-pipe");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut s = raw::connect_ready(proxy.listen);
    // Three Parse/Bind/Execute/Sync groups in a single write, the second one failing: each
    // Sync gets its own ReadyForQuery, and the failure does not leak into the third.
    let mut batch = Vec::new();
    for sql in ["SELECT 1", "SELECT 1/0", "SELECT 3"] {
        let mut parse = vec![0u8];
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        batch.extend(raw::message(b'P', &parse));
        batch.extend(raw::message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        batch.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
        batch.extend(raw::message(b'S', &[]));
    }
    s.write_all(&batch).unwrap();
    let mut tags = Vec::new();
    for _ in 0..3 {
        let msgs = raw::read_until_ready(&mut s);
        tags.push(msgs.iter().map(|m| m.0 as char).collect::<String>());
    }
    // `1/0` is constant-folded when the unnamed statement is planned, at Bind.
    assert_eq!(tags, ["12DCZ", "1EZ", "12DCZ"]);
}

#[test]
fn copy_in_and_out_100k_rows() {
    let pg = start_primary("p-copy");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE c (id int, v text)").unwrap();
    let mut input = String::with_capacity(2 << 20);
    for i in 0..100_000 {
        input.push_str(&format!("{i}\trow-{i}\n"));
    }
    let mut w = c.copy_in("COPY c FROM STDIN").unwrap();
    w.write_all(input.as_bytes()).unwrap();
    assert_eq!(w.finish().unwrap(), 100_000);
    let mut output = String::new();
    c.copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT")
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    assert_eq!(
        output, input,
        "COPY TO returns exactly what COPY FROM loaded"
    );
    // A COPY the client aborts leaves nothing behind and the session usable.
    let mut w = c.copy_in("COPY c FROM STDIN").unwrap();
    w.write_all(b"1\tpartial\n").unwrap();
    drop(w); // dropping without finish sends CopyFail
    let n: i64 = c.query_one("SELECT count(*) FROM c", &[]).unwrap().get(0);
    assert_eq!(n, 100_000);
}

#[test]
fn fifty_megabyte_result_streams_without_buffering() {
    let pg = start_primary("p-large");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut s = raw::connect_ready(proxy.listen);
    // The proxy's own peak so far (start-up, shards, a session): what the result may add to
    // it is judged against that, not against an absolute figure that moves with the build.
    let before_kb = peak_rss_kb(proxy.child.id());
    // 50,000 rows of 1,000 bytes: 50 MB of DataRows.
    let sql = b"SELECT repeat('x', 1000) FROM generate_series(1, 50000)\0";
    s.write_all(&raw::message(b'Q', sql)).unwrap();
    let (mut rows, mut bytes) = (0u64, 0u64);
    loop {
        let (tag, body) = raw::read_message(&mut s).expect("result stream");
        match tag {
            b'D' => {
                rows += 1;
                bytes += body.len() as u64;
                if rows % 5_000 == 0 {
                    // A slow reader: the proxy must hold back (backpressure), not buffer.
                    // Part of the scenario (being slow), not a wait for any state.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(rows, 50_000);
    assert!(bytes > 50_000_000);
    let hwm_kb = peak_rss_kb(proxy.child.id());
    assert!(
        hwm_kb < before_kb + 16 * 1024,
        "pgprism's peak RSS went from {before_kb} to {hwm_kb} KiB for a 50 MB result: \
         it buffered the result"
    );
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Issue 14: with `proxy.client-placement = "pack"` a new client goes to the first shard that
/// is not busy, whichever shard's listener the kernel gave it: a few idle clients connecting
/// one after another all land on shard 0 (those the kernel gave shard 1 are handed over) and
/// every one is served, a cancel included.
#[test]
fn clients_pack_on_the_first_shard_under_pack() {
    let pg = start_primary("p-pack");
    let proxy = Proxy::start(&pg.url(), &["--client-placement", "pack"]);
    let mut clients: Vec<_> = (0..16).map(|_| proxy.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let row = c.query_one("SELECT $1::int", &[&(i as i32)]).unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32);
    }
    let by_shard = || {
        let (_, body) = proxy.admin_get("/metrics");
        let mut sessions = [0u64; 2];
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("pgprism_sessions_active{shard=\"")
                && let Some((shard, value)) = rest.split_once("\"} ")
                && let (Ok(shard), Ok(value)) = (shard.parse::<usize>(), value.parse())
                && shard < 2
            {
                sessions[shard] = value;
            }
        }
        sessions
    };
    assert!(
        eventually(Duration::from_secs(5), || by_shard() == [16, 0]),
        "sessions by shard: {:?}",
        by_shard()
    );
    // Each connection counted once, by the shard that served it; none kept back by a full
    // hand-over queue.
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_connections_accepted_total")
        == 16));
    assert_eq!(proxy.metric("pgprism_handover_overflows_total"), 0);
    let (first, rest) = clients.split_at_mut(1);
    support::assert_cancel_reaches_only(pg.port(), &mut first[0], &mut rest[0]);
}

/// Through the pack placement: 200 clients connecting at once are handed over between the
/// shards while they connect (a burst that large spreads), and each is served to its end.
#[test]
fn two_hundred_concurrent_clients() {
    let pg = start_primary("p-many");
    let proxy = Proxy::start(&pg.url(), &["--client-placement", "pack"]);
    pg.psql("CREATE TABLE hits (client int, n int)").unwrap();
    let conninfo = proxy.conninfo("postgres", None);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let conninfo = conninfo.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                barrier.wait(); // all 200 sessions are open at the same time
                for n in 0..10 {
                    c.execute("INSERT INTO hits VALUES ($1, $2)", &[&i, &n])
                        .unwrap();
                }
                let mine: i64 = c
                    .query_one("SELECT count(*) FROM hits WHERE client = $1", &[&i])
                    .unwrap()
                    .get(0);
                assert_eq!(mine, 10);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(pg.psql("SELECT count(*) FROM hits").unwrap().trim(), "2000");
}

#[test]
fn cancel_request_reaches_the_right_backend() {
    let pg = start_primary("p-cancel");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut busy = proxy.client();
    let mut bystander = proxy.client();
    support::assert_cancel_reaches_only(pg.port(), &mut busy, &mut bystander);
}

#[test]
fn listen_notify_through_the_proxy() {
    let pg = start_primary("p-notify");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut listener = proxy.client();
    listener.batch_execute("LISTEN jobs").unwrap();
    let mut sender = proxy.client();
    sender.batch_execute("NOTIFY jobs, 'job-42'").unwrap();
    use postgres::fallible_iterator::FallibleIterator;
    let mut notes = listener.notifications();
    let note = notes
        .timeout_iter(Duration::from_secs(10))
        .next()
        .unwrap()
        .expect("notification delivered");
    assert_eq!((note.channel(), note.payload()), ("jobs", "job-42"));
}

#[test]
fn garbage_gets_08p01_and_others_keep_working() {
    let pg = start_primary("p-garbage");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut good = proxy.client();

    // Garbage instead of a startup packet.
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00\x00\x00\x10GET / HTTP/1.1\r\n").unwrap();
    let (tag, body) = raw::read_message(&mut s).expect("an ErrorResponse");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("08P01"));
    assert!(
        raw::read_message(&mut s).is_none(),
        "connection closed after the error"
    );

    // A negative length after a good startup.
    let mut s = raw::connect_ready(proxy.listen);
    s.write_all(b"Q\xff\xff\xff\xf0junk").unwrap();
    let (tag, body) = raw::read_message(&mut s).expect("an ErrorResponse");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("08P01"));

    // Random bytes of every kind never take the process down.
    for seed in 0..50u64 {
        let mut bytes = Vec::new();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for _ in 0..(seed as usize * 7 % 300 + 1) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        if let Ok(mut s) = TcpStream::connect(proxy.listen) {
            let _ = s.write_all(&bytes);
        }
    }
    let v: i32 = good.query_one("SELECT 7", &[]).unwrap().get(0);
    assert_eq!(v, 7, "the established session is unaffected");
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_protocol_errors_total")
        >= 2));
    proxy.client(); // and new sessions are accepted
}

#[test]
fn oversized_message_gets_54000() {
    let pg = start_primary("p-big");
    let proxy = Proxy::start(&pg.url(), &["--message-bytes-max", "4096"]);
    let mut s = raw::connect_ready(proxy.listen);
    let mut sql = b"SELECT '".to_vec();
    sql.extend(std::iter::repeat_n(b'x', 10_000));
    sql.extend_from_slice(b"'\0");
    s.write_all(&raw::message(b'Q', &sql)).unwrap();
    let (tag, body) = raw::read_message(&mut s).expect("an ErrorResponse");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("54000"));
    assert!(raw::error_field(&body, b'M').unwrap().contains("4096"));
    // Below the limit all is well.
    let mut c = proxy.client();
    let v: String = c.query_one("SELECT repeat('y', 3000)", &[]).unwrap().get(0);
    assert_eq!(v.len(), 3000);
}

#[test]
fn stalled_startup_times_out() {
    let pg = start_primary("p-stall");
    let proxy = Proxy::start(&pg.url(), &["--startup-timeout-ms", "300"]);
    let mut silent = TcpStream::connect(proxy.listen).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The client sends nothing: an ErrorResponse within the read timeout can only come from
    // the startup timeout, and the connection is closed after it.
    let (tag, body) = raw::read_message(&mut silent).expect("an ErrorResponse");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("08P01"));
    assert!(raw::read_message(&mut silent).is_none());
    // Half a startup packet is a stall too.
    let mut half = TcpStream::connect(proxy.listen).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    half.write_all(&raw::startup("postgres", "postgres")[..6])
        .unwrap();
    let (tag, _) = raw::read_message(&mut half).expect("an ErrorResponse");
    assert_eq!(tag, b'E');
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_startup_timeouts_total")
        >= 2));
}

#[test]
fn primary_down_gives_08001_naming_it() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://127.0.0.1:{port}");
    let proxy = Proxy::start(&url, &[]);
    let err = postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls)
        .err()
        .expect("no primary, no session");
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err}");
    let text = format!("{err:?}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

#[test]
fn primary_dying_mid_query_gives_08006_and_the_proxy_lives_on() {
    let pg = start_primary("p-die");
    let proxy = Proxy::start(&pg.url(), &[]);
    // Raw protocol: the client libraries race their own end-of-stream handling against the
    // last message, so only the bytes on the wire say reliably what pgprism sent.
    let mut s = raw::connect_ready(proxy.listen);
    s.write_all(&raw::message(b'Q', b"SELECT pg_backend_pid()\0"))
        .unwrap();
    let pid: i32 = raw::read_until_ready(&mut s)
        .iter()
        .find(|m| m.0 == b'D')
        .map(|m| String::from_utf8_lossy(&m.1[6..]).parse().unwrap())
        .expect("a DataRow with the pid");
    s.write_all(&raw::message(b'Q', b"SELECT pg_sleep(30)\0"))
        .unwrap();
    // Kill the backend only once it runs the statement (seen directly on the primary).
    let running = eventually(Duration::from_secs(10), || {
        pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE pid = {pid} AND state = 'active' AND query LIKE '%pg_sleep%'"
        ))
        .is_ok_and(|out| out.trim() == "1")
    });
    assert!(running, "pg_sleep never started");
    // SAFETY: killing a PostgreSQL backend process we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (tag, body) = raw::read_message(&mut s).expect("an ErrorResponse");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("08006"));
    assert!(
        raw::error_field(&body, b'M')
            .unwrap()
            .contains("lost the connection to primary")
    );
    assert!(
        raw::read_message(&mut s).is_none(),
        "then the connection is closed"
    );
    // The postmaster restarts its backends after the crash; pgprism serves the next session.
    assert!(eventually(Duration::from_secs(20), || {
        postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls)
            .and_then(|mut c| c.query_one("SELECT 1", &[]))
            .is_ok()
    }));
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_primary_lost_total")
        >= 1));
}

#[test]
fn sigterm_drains_sessions_then_exits_zero() {
    sigterm_drains("p-drain", &[]);
}

#[test]
fn sigterm_drains_sessions_then_exits_zero_with_clients_packed() {
    sigterm_drains("p-drain-pack", &["--client-placement", "pack"]);
}

/// The same in transaction mode under pack placement with rebalancing on: an idle client
/// that moved to another shard (its settings with it) is closed by the drain there, and the
/// one inside a transaction on the shard it left finishes it. The busy figures come from
/// the test (`PGPRISM_TEST_SHARD_BUSY_FILE`), so the move happens whatever the machine's
/// load.
#[test]
fn sigterm_drains_pooled_sessions_with_clients_moving() {
    let pg = start_primary("p-drain-move");
    // Shard 0 too busy for new clients, shard 1 busy enough to keep its own: both clients
    // are placed on shard 1.
    let figures = support::ShardBusy::new("0=95,1=60");
    let (var, path) = figures.env();
    let dir = support::TempDir::new("p-drain-move");
    let config = dir.join("pgprism.toml");
    std::fs::write(&config, "[pool]\nadmin-users = [\"postgres\"]\n").unwrap();
    let config = config.display().to_string();
    let mut proxy = Proxy::start_env(
        &pg.url(),
        &[
            "--drain-timeout-ms",
            "20000",
            "--shards",
            "2",
            "--client-placement",
            "pack",
            "--pool-mode",
            "transaction",
            "--auth-type",
            "trust",
            "--config",
            &config,
        ],
        &[(var, &path)],
    );
    pg.psql("CREATE TABLE d (v int)").unwrap();
    let mut busy = raw::connect_ready(proxy.listen);
    let mut idle = postgres::Client::connect(
        &format!(
            "{} application_name=drain-idle",
            proxy.conninfo("postgres", None)
        ),
        postgres::NoTls,
    )
    .unwrap();
    idle.batch_execute("SET search_path TO moved, public")
        .unwrap();
    let mut console = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=pgbouncer connect_timeout=10",
            proxy.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    // (application_name, shard) of the clients of database postgres.
    let mut rows = Vec::new();
    let clients = |console: &mut postgres::Client| -> Vec<(String, usize)> {
        let mut rows: Vec<(String, usize)> = console
            .simple_query("SHOW CLIENTS")
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("postgres") => {
                    let ptr = r.get("ptr")?.strip_prefix("0x")?;
                    let shard = (u64::from_str_radix(ptr, 16).ok()? >> 56) as usize;
                    let name = r.get("application_name").unwrap_or_default();
                    Some((name.to_string(), shard))
                }
                _ => None,
            })
            .collect();
        rows.sort();
        rows
    };
    let both_on = |shard_busy: usize, shard_idle: usize| {
        vec![
            (String::new(), shard_busy),
            ("drain-idle".to_string(), shard_idle),
        ]
    };
    assert!(
        eventually(Duration::from_secs(30), || {
            rows = clients(&mut console);
            rows == both_on(1, 1)
        }),
        "{rows:?}"
    );
    let begun = raw::query(&mut busy, "BEGIN; INSERT INTO d VALUES (1)");
    assert_eq!(begun.last(), Some(&(b'Z', b"T".to_vec())), "{begun:?}");
    // Both shards light: shard 1 hands its idle client to shard 0; the one inside a
    // transaction holds its server connection and stays.
    figures.set("0=0,1=0");
    assert!(
        eventually(Duration::from_secs(30), || {
            rows = clients(&mut console);
            rows == both_on(1, 0)
        }),
        "{rows:?}"
    );
    // Both between 40% and 80% from now on: nobody moves during the drain.
    figures.set("0=60,1=60");
    let path: String = idle.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(path, "moved, public");
    assert!(eventually(Duration::from_secs(30), || proxy
        .metric("pgprism_clients_moved_in_total")
        >= 1));
    drop(console);
    proxy.signal(libc::SIGTERM);
    // New connections are refused once the listeners are closed.
    assert!(eventually(Duration::from_secs(30), || TcpStream::connect(
        proxy.listen
    )
    .is_err()));
    // The idle session was closed with 57P01 on the shard it moved to; the one inside a
    // transaction may finish it.
    let err = idle.simple_query("SELECT 1").unwrap_err();
    assert!(closed_by_server(&err), "{err:?}");
    raw::finish_while_draining(&mut busy, "INSERT INTO d VALUES (2); COMMIT", b"CC");
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        proxy.log()
    );
    assert_eq!(pg.psql("SELECT count(*) FROM d").unwrap().trim(), "2");
}

fn sigterm_drains(name: &str, placement: &[&str]) {
    let pg = start_primary(name);
    let mut args = vec!["--drain-timeout-ms", "20000"];
    args.extend_from_slice(placement);
    let mut proxy = Proxy::start(&pg.url(), &args);
    pg.psql("CREATE TABLE d (v int)").unwrap();
    let mut busy = raw::connect_ready(proxy.listen);
    let mut idle = proxy.client();
    let begun = raw::query(&mut busy, "BEGIN; INSERT INTO d VALUES (1)");
    assert_eq!(begun.last(), Some(&(b'Z', b"T".to_vec())), "{begun:?}");
    proxy.signal(libc::SIGTERM);
    // New connections are refused once the listeners are closed.
    assert!(eventually(Duration::from_secs(5), || TcpStream::connect(
        proxy.listen
    )
    .is_err()));
    // The idle session was closed with 57P01; the one inside a transaction may finish it.
    let err = idle.simple_query("SELECT 1").unwrap_err();
    assert!(closed_by_server(&err), "{err:?}");
    raw::finish_while_draining(&mut busy, "INSERT INTO d VALUES (2); COMMIT", b"CC");
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        proxy.log()
    );
    assert_eq!(pg.psql("SELECT count(*) FROM d").unwrap().trim(), "2");
}

/// Review of issue 14's placement: connections another shard queued for a shard that then
/// stops were never read again (the queue's reader ended with the serve loop) and their
/// clients hung until the process exited. Shard 0 here leaves its queue unread (failpoint
/// `placement-adopt`) while clients connect, so those the kernel gave shard 1 are queued for
/// it; at SIGTERM its drain serves them (and closes them as idle) or refuses them, each with
/// 57P01, and the process exits.
#[test]
fn a_stopping_shard_serves_or_refuses_the_clients_queued_for_it() {
    let pg = start_primary("p-pack-queued");
    let mut proxy = Proxy::start_env(
        &pg.url(),
        &["--client-placement", "pack", "--drain-timeout-ms", "20000"],
        &[("PGPRISM_FAILPOINTS", "placement-adopt=error")],
    );
    let mut clients: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(proxy.listen).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(&raw::startup("postgres", "postgres")).unwrap();
            s
        })
        .collect();
    // With 16 connections the kernel gives shard 1 some (all on shard 0: 1 in 65,536).
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("pgprism_clients_handed_over_total")
            >= 1),
        "nothing handed over:\n{}",
        proxy.log()
    );
    let queued = proxy.metric("pgprism_clients_handed_over_total");
    proxy.signal(libc::SIGTERM);
    let mut unanswered = 0;
    for c in &mut clients {
        let msgs = raw::read_to_end(c);
        match msgs.last() {
            Some((b'E', body)) => {
                assert_eq!(
                    raw::error_field(body, b'C').as_deref(),
                    Some("57P01"),
                    "{msgs:?}"
                )
            }
            _ => unanswered += 1,
        }
    }
    assert_eq!(unanswered, 0, "{queued} queued; log:\n{}", proxy.log());
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        proxy.log()
    );
}

#[test]
fn a_second_pgprism_on_the_same_address_is_refused() {
    let pg = start_primary("p-twice");
    let first = Proxy::start(&pg.url(), &[]);
    let out = support::pgprism_command()
        .args([
            "proxy",
            "--listen",
            &first.listen.to_string(),
            "--admin",
            "",
            "--primary",
            &pg.url(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already served by another process"),
        "{stderr}"
    );
    first.client(); // the first one is untouched
}

#[test]
fn admin_endpoint_serves_metrics_status_and_health() {
    let pg = start_primary("p-admin");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut c = proxy.client();
    for _ in 0..20 {
        c.query_one("SELECT 1", &[]).unwrap();
    }
    assert_eq!(proxy.admin_get("/health"), (200, "ok\n".to_string()));
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_statements_total")
        >= 20));
    let (code, metrics) = proxy.admin_get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("# TYPE pgprism_client_latency_seconds summary"));
    assert!(metrics.contains("pgprism_client_latency_seconds{quantile=\"0.99\"}"));
    let (code, status) = proxy.admin_get("/status");
    assert_eq!(code, 200);
    let status: sonic_rs::Value = sonic_rs::from_str(&status).expect("status is JSON");
    use sonic_rs::JsonValueTrait;
    assert!(status["client_latency"]["count"].as_u64().unwrap() >= 20);
    assert_eq!(status["sessions_active"].as_u64(), Some(1));
    assert_eq!(proxy.admin_get("/nope").0, 404);
}

#[test]
fn check_prints_effective_config_and_names_bad_keys() {
    let dir = support::TempDir::new("check");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[proxy]\nlisten = \"127.0.0.1:${PGPRISM_TEST_PORT:-7432}\"\n[primary]\nurl = \"postgres://u:pw@127.0.0.1:5432\"\n",
    )
    .unwrap();
    let out = support::pgprism_command()
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("listen = \"127.0.0.1:7432\""), "{shown}");
    assert!(shown.contains("backlog = 4096"), "{shown}");
    assert!(!shown.contains("pw@"), "password masked: {shown}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[proxy]\nbacklog = \"lots\"\n").unwrap();
    let out = support::pgprism_command()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.backlog"));
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    use sonic_rs::JsonValueTrait;
    let primary = start_primary("logjson");
    let proxy = Proxy::start(&primary.url(), &["--log-format", "json"]);
    let mut c = proxy.client();
    c.simple_query("SELECT 1").unwrap();
    drop(c);
    assert!(eventually(Duration::from_secs(5), || proxy
        .log()
        .contains("pgprism proxy ready")));
    let log = proxy.log();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: sonic_rs::Value =
            sonic_rs::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        assert!(v["level"].as_str().is_some(), "{line}");
        assert!(v["fields"]["message"].as_str().is_some(), "{line}");
        lines += 1;
    }
    assert!(lines >= 1, "{log}");
}

#[test]
fn a_half_closed_client_still_gets_its_answers() {
    let pg = start_primary("p-half");
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut s = raw::connect_ready(proxy.listen);
    s.write_all(&raw::message(b'Q', b"SELECT 42\0")).unwrap();
    // The client is done sending (no Terminate), but still reads.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut tags = Vec::new();
    let mut value = None;
    while let Some((tag, body)) = raw::read_message(&mut s) {
        if tag == b'D' {
            value = Some(body[6..].to_vec());
        }
        tags.push(tag);
    }
    assert_eq!(tags, b"TDCZ".to_vec());
    assert_eq!(value.as_deref(), Some(&b"42"[..]));
}

#[test]
fn startup_parameters_that_are_not_utf8_reach_the_primary() {
    let pg = start_primary("p-latin1");
    let proxy = Proxy::start(&pg.url(), &[]);
    // What psql sends with PGAPPNAME in Latin-1.
    let mut body = 196608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0application_name\0caf\xe9\0\0");
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&packet).unwrap();
    let startup = raw::read_until_ready(&mut s);
    assert_eq!(startup.last().map(|m| m.0), Some(b'Z'), "{startup:?}");
    s.write_all(&raw::message(b'Q', b"SHOW application_name\0"))
        .unwrap();
    let answer = raw::read_until_ready(&mut s);
    let row = answer.iter().find(|m| m.0 == b'D').expect("a row");
    // PostgreSQL itself replaces what is not ASCII in application_name.
    assert_eq!(&row.1[6..], b"caf?");
}

/// A primary answer pgprism cannot read (a row beyond `--message-bytes-max`) ends the session
/// with pgprism's FATAL (08P01, counted), after every message ahead of it (the first answer
/// and the second's RowDescription): those read together with it are not dropped.
#[test]
fn answers_before_a_primary_answer_pgprism_cannot_read_reach_the_client() {
    let pg = start_primary("p-badans");
    let proxy = Proxy::start(&pg.url(), &["--message-bytes-max", "4096"]);
    let mut s = raw::connect_ready(proxy.listen);
    // Both in one write: the primary's two answers often share a read of pgprism's.
    let mut bytes = raw::message(b'Q', b"SELECT 42\0");
    bytes.extend(raw::message(b'Q', b"SELECT repeat('x', 10000)\0"));
    s.write_all(&bytes).unwrap();
    let msgs = raw::read_to_end(&mut s);
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"TDCZTE", "{msgs:?}");
    assert!(msgs[1].1.ends_with(b"42"), "{msgs:?}");
    assert_eq!(raw::error_field(&msgs[5].1, b'C').as_deref(), Some("08P01"));
    assert_eq!(raw::error_field(&msgs[5].1, b'V').as_deref(), Some("FATAL"));
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_protocol_errors_total")
        >= 1));
}

#[test]
fn messages_before_a_malformed_frame_still_run() {
    let pg = start_primary("p-badtail");
    pg.psql("CREATE TABLE bf (a int)").unwrap();
    let proxy = Proxy::start(&pg.url(), &[]);
    let mut s = raw::connect_ready(proxy.listen);
    // A good Query and, in the same write, a header whose length is below its own size.
    let mut bytes = raw::message(b'Q', b"INSERT INTO bf VALUES (1)\0");
    bytes.extend_from_slice(&[b'Q', 0, 0, 0, 2]);
    s.write_all(&bytes).unwrap();
    let mut tags = Vec::new();
    let mut code = None;
    while let Some((tag, body)) = raw::read_message(&mut s) {
        if tag == b'E' {
            code = raw::error_field(&body, b'C');
        }
        tags.push(tag);
    }
    // As PostgreSQL does: the INSERT's answer, then the error, then the end.
    assert_eq!(tags, b"CZE".to_vec());
    assert_eq!(code.as_deref(), Some("08P01"));
    assert_eq!(pg.psql("SELECT count(*) FROM bf").unwrap().trim(), "1");
}
