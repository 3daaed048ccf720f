//! Mirror mode against real PostgreSQL servers: one primary, two mirrors.

mod support;

use std::io::Write;
use std::time::Duration;

use pgprism::embed::Instance;
use support::{PASSWORD, Proxy, SCRAM_USER, eventually, start_primary};

/// A checksum of a whole table's contents (order-independent), `cols` selecting the columns.
fn checksum(inst: &Instance, table: &str, cols: &str) -> String {
    inst.psql(&format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(r, '|' ORDER BY r)), '') \
         FROM (SELECT ({cols})::text AS r FROM {table}) x"
    ))
    .unwrap_or_else(|e| format!("error: {e}"))
    .trim()
    .to_string()
}

/// A primary and a mirror, each with the same schema (`ddl`).
fn primary_and_mirror(primary: &str, mirror: &str, ddl: &str) -> (Instance, Instance) {
    let (p, m1) = (start_primary(primary), start_primary(mirror));
    for inst in [&p, &m1] {
        inst.psql(ddl).unwrap();
    }
    (p, m1)
}

fn mirror_url(m: &Instance) -> String {
    format!(
        "postgres://{SCRAM_USER}:{}@127.0.0.1:{}/postgres",
        PASSWORD.replace(' ', "%20"),
        m.port()
    )
}

/// pgprism with one mirror whose queue is small (20 messages, 256 KiB), so a stalled mirror
/// overflows it quickly.
fn small_queue_proxy(p: &Instance, m1: &Instance) -> Proxy {
    Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(m1),
            "--mirror-queue-messages",
            "20",
            "--mirror-queue-bytes",
            "262144",
        ],
    )
}

/// Holds an exclusive lock on `table` of `inst` (in an open transaction) until the returned
/// client ends it: the mirror's session blocks on its first statement touching the table.
fn lock_table(inst: &Instance, table: &str) -> postgres::Client {
    let mut blocker = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            inst.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    blocker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .unwrap();
    blocker
}

/// Bound on a mirror's catching up with what the primary ran (a loaded machine's replay of a
/// test's workload); spent in full only when it never converges.
const CONVERGED: Duration = Duration::from_secs(60);

/// Waits until `table` has the same contents on the primary and every mirror.
fn converged(primary: &Instance, mirrors: &[&Instance], table: &str, cols: &str) -> bool {
    let want = checksum(primary, table, cols);
    eventually(CONVERGED, || {
        mirrors.iter().all(|m| checksum(m, table, cols) == want)
    })
}

#[test]
fn ddl_dml_workload_in_transactions_converges_on_both_mirrors() {
    let (p, m1, m2) = (
        start_primary("mp"),
        start_primary("m1"),
        start_primary("m2"),
    );
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--mirror", &mirror_url(&m2)],
    );
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE acct (id int PRIMARY KEY, balance bigint, note text)")
        .unwrap();
    c.batch_execute("CREATE INDEX acct_balance ON acct (balance)")
        .unwrap();
    for t in 0..50 {
        let mut tx = c.transaction().unwrap();
        tx.execute(
            "INSERT INTO acct VALUES ($1, $2, $3)",
            &[&t, &(t as i64 * 10), &format!("n{t}")],
        )
        .unwrap();
        tx.execute(
            "UPDATE acct SET balance = balance + 1 WHERE id % 7 = $1",
            &[&(t % 7)],
        )
        .unwrap();
        if t % 5 == 0 {
            tx.execute("DELETE FROM acct WHERE id = $1", &[&(t - 1)])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    // A rolled-back transaction leaves nothing on the mirrors either.
    c.batch_execute("BEGIN; INSERT INTO acct VALUES (1000, 0, 'never'); ROLLBACK")
        .unwrap();
    c.batch_execute("ALTER TABLE acct ADD COLUMN flag bool DEFAULT false; UPDATE acct SET flag = true WHERE id < 10").unwrap();
    drop(c);
    let mirrors = [&m1, &m2];
    assert!(
        converged(&p, &mirrors, "acct", "id, balance, note, flag"),
        "mirrors differ from the primary:\nprimary {}\nm1 {}\nm2 {}",
        checksum(&p, "acct", "id, balance, note, flag"),
        checksum(&m1, "acct", "id, balance, note, flag"),
        checksum(&m2, "acct", "id, balance, note, flag")
    );
    assert_eq!(
        m1.psql("SELECT count(*) FROM acct WHERE id = 1000")
            .unwrap()
            .trim(),
        "0"
    );
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        > 0));
}

#[test]
fn pgbench_prepared_tpcb_replays_exactly() {
    let (p, m1) = (start_primary("bp"), start_primary("bm"));
    // The same initial data on both (pgbench -i is deterministic).
    for inst in [&p, &m1] {
        let out = std::process::Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &inst.port().to_string(),
                "-U",
                "postgres",
                "-i",
                "-s",
                "1",
                "-q",
                "postgres",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let proxy = Proxy::start(&p.url(), &["--mirror", &mirror_url(&m1)]);
    for mode in ["prepared", "extended", "simple"] {
        let out = std::process::Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port().to_string(),
                "-U",
                "postgres",
                "-n",
            ])
            .args(["-c", "4", "-j", "2", "-t", "100", "-M", mode, "postgres"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Binary and text parameters, prepared statements, all replayed: balances match exactly.
    for (table, cols) in [
        ("pgbench_accounts", "aid, bid, abalance"),
        ("pgbench_branches", "bid, bbalance"),
        ("pgbench_tellers", "tid, bbalance"),
        ("pgbench_history", "tid, bid, aid, delta"),
    ] {
        let cols = if table == "pgbench_tellers" {
            "tid, tbalance"
        } else {
            cols
        };
        assert!(converged(&p, &[&m1], table, cols), "{table} differs");
    }
}

#[test]
fn filters_select_ddl_dml_and_transaction_control() {
    let (p, m1) = (start_primary("fp"), start_primary("fm"));
    // Default (DDL + DML): SELECTs are not mirrored. nextval() makes a SELECT visible.
    {
        let proxy = Proxy::start(&p.url(), &["--mirror", &mirror_url(&m1)]);
        let mut c = proxy.client();
        c.batch_execute("CREATE SEQUENCE s1").unwrap();
        for _ in 0..3 {
            c.query_one("SELECT nextval('s1')", &[]).unwrap();
        }
        drop(c);
        assert!(eventually(Duration::from_secs(10), || m1
            .psql("SELECT 1 FROM pg_class WHERE relname = 's1'")
            .unwrap()
            .trim()
            == "1"));
        assert_eq!(
            m1.psql("SELECT is_called FROM s1").unwrap().trim(),
            "f",
            "a SELECT reached the mirror"
        );
    }
    // --mirror-all-queries: they are.
    {
        let proxy = Proxy::start(
            &p.url(),
            &["--mirror", &mirror_url(&m1), "--mirror-all-queries"],
        );
        let mut c = proxy.client();
        c.batch_execute("CREATE SEQUENCE s2").unwrap();
        for _ in 0..3 {
            c.query_one("SELECT nextval('s2')", &[]).unwrap();
        }
        drop(c);
        assert!(eventually(Duration::from_secs(10), || m1
            .psql("SELECT last_value FROM s2")
            .map(|v| v.trim() == "3")
            .unwrap_or(false)));
    }
    // --mirror-ddl-only: the table appears, its rows do not.
    {
        let proxy = Proxy::start(
            &p.url(),
            &["--mirror", &mirror_url(&m1), "--mirror-ddl-only"],
        );
        let mut c = proxy.client();
        c.batch_execute("CREATE TABLE only_ddl (v int); INSERT INTO only_ddl VALUES (1), (2)")
            .unwrap();
        c.batch_execute("CREATE TABLE ddl_marker (v int)").unwrap();
        drop(c);
        assert!(eventually(Duration::from_secs(10), || m1
            .psql("SELECT 1 FROM pg_class WHERE relname = 'ddl_marker'")
            .unwrap()
            .trim()
            == "1"));
        assert_eq!(
            m1.psql("SELECT count(*) FROM only_ddl").unwrap().trim(),
            "0"
        );
    }
    // --mirror-dml-only: rows arrive, DDL does not (the table exists on both beforehand).
    {
        p.psql("CREATE TABLE only_dml (v int)").unwrap();
        m1.psql("CREATE TABLE only_dml (v int)").unwrap();
        let proxy = Proxy::start(
            &p.url(),
            &["--mirror", &mirror_url(&m1), "--mirror-dml-only"],
        );
        let mut c = proxy.client();
        c.batch_execute("CREATE TABLE not_on_mirror (v int)")
            .unwrap();
        c.batch_execute("INSERT INTO only_dml VALUES (7)").unwrap();
        drop(c);
        assert!(eventually(Duration::from_secs(10), || m1
            .psql("SELECT count(*) FROM only_dml")
            .unwrap()
            .trim()
            == "1"));
        assert_eq!(
            m1.psql("SELECT count(*) FROM pg_class WHERE relname = 'not_on_mirror'")
                .unwrap()
                .trim(),
            "0"
        );
    }
    // Skipping transaction control: a rolled-back insert is autocommitted on the mirror.
    {
        p.psql("CREATE TABLE txc (v int)").unwrap();
        m1.psql("CREATE TABLE txc (v int)").unwrap();
        let proxy = Proxy::start(
            &p.url(),
            &[
                "--mirror",
                &mirror_url(&m1),
                "--mirror-skip-transaction-control",
            ],
        );
        let mut c = proxy.client();
        c.batch_execute("BEGIN; INSERT INTO txc VALUES (1); ROLLBACK")
            .unwrap();
        c.batch_execute("INSERT INTO txc VALUES (2)").unwrap();
        drop(c);
        assert!(eventually(Duration::from_secs(10), || m1
            .psql("SELECT string_agg(v::text, ',' ORDER BY v) FROM txc")
            .unwrap()
            .trim()
            == "1,2"));
        assert_eq!(
            p.psql("SELECT string_agg(v::text, ',' ORDER BY v) FROM txc")
                .unwrap()
                .trim(),
            "2"
        );
    }
}

#[test]
fn prepared_statements_survive_filtered_parses() {
    let (p, m1) = (start_primary("pp"), start_primary("pm"));
    let proxy = Proxy::start(&p.url(), &["--mirror", &mirror_url(&m1)]);
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE kv (k bigint PRIMARY KEY, v bytea, f float8)")
        .unwrap();
    // Named statements: a SELECT (filtered) between the INSERT's preparation and its uses,
    // binary parameters (the postgres crate sends int8/bytea/float8 in binary).
    let insert = c.prepare("INSERT INTO kv VALUES ($1, $2, $3)").unwrap();
    let select = c.prepare("SELECT v FROM kv WHERE k = $1").unwrap();
    for k in 0..20i64 {
        c.execute(
            &insert,
            &[&k, &vec![k as u8, 0xff, 0x00], &(k as f64 / 3.0)],
        )
        .unwrap();
        let _ = c.query(&select, &[&k]).unwrap();
    }
    // Unnamed statements, alternating a filtered SELECT and a mirrored UPDATE.
    for k in 0..20i64 {
        c.query("SELECT $1::bigint", &[&k]).unwrap();
        c.execute("UPDATE kv SET f = f * 2 WHERE k = $1", &[&k])
            .unwrap();
    }
    drop(c);
    assert!(converged(&p, &[&m1], "kv", "k, v, f"));
    // The mirror never saw a Bind for a statement it did not have.
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        >= 40));
    assert_eq!(
        proxy.metric("pgprism_mirror_errors_total"),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn dead_mirror_costs_the_primary_nothing_and_is_reconnected() {
    let p = start_primary("dp");
    // The mirror's data directory, in a directory of its own (the server creates it).
    let scratch = support::TempDir::new("mirror-dead");
    let dir = scratch.join("data");
    let start_mirror = |port: Option<u16>| {
        Instance::start(pgprism::embed::InstanceConfig {
            name: "dm".into(),
            port,
            data: pgprism::embed::DataDir::Path(dir.clone()),
            ..Default::default()
        })
        .unwrap()
    };
    let m1 = start_mirror(None);
    let port = m1.port();
    m1.psql("CREATE TABLE ev (session int, n int)").unwrap();
    p.psql("CREATE TABLE ev (session int, n int)").unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &url,
            "--retry-delay",
            "50ms",
            "--mirror-retries",
            "100",
        ],
    );
    let mut c = proxy.client();
    c.execute("INSERT INTO ev VALUES (1, 0)", &[]).unwrap();
    assert!(eventually(Duration::from_secs(10), || m1
        .psql("SELECT count(*) FROM ev")
        .unwrap()
        .trim()
        == "1"));
    // Kill the mirror mid-session: the client carries on as if nothing happened.
    m1.stop().unwrap();
    // Every statement succeeds with the mirror gone (a hang here is what the test's timeout
    // catches; no wall-clock bound is asserted).
    for n in 1..=50 {
        c.execute("INSERT INTO ev VALUES (1, $1)", &[&n]).unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_skipped_down_total")
        > 0));
    // Bring it back on the same port and data: the link reconnects and mirrors again.
    let m1 = start_mirror(Some(port));
    assert!(
        eventually(Duration::from_secs(20), || {
            let _ = c.execute("INSERT INTO ev VALUES (1, 100)", &[]);
            proxy.metric("pgprism_mirror_reconnects_total") >= 1
                && m1
                    .psql("SELECT count(*) FROM ev WHERE n = 100")
                    .unwrap()
                    .trim()
                    != "0"
        }),
        "{}",
        proxy.admin_get("/status").1
    );
    drop(c);
}

#[test]
fn stalled_mirror_overflows_without_slowing_the_primary_or_splitting_transactions() {
    let (p, m1) = primary_and_mirror(
        "sp",
        "sm",
        "CREATE TABLE pairs (txn int, part int, pad text)",
    );
    let proxy = small_queue_proxy(&p, &m1);
    // Hold a lock on the mirror: its session blocks on the first INSERT.
    let mut blocker = lock_table(&m1, "pairs");
    let mut c = proxy.client();
    // One statement per message, 40 KB per transaction: 8 MB in all, more than the socket
    // buffers between pgprism and the stalled mirror can absorb.
    let pad = "x".repeat(20_000);
    let txn = |c: &mut postgres::Client, t: i32| {
        c.batch_execute("BEGIN").unwrap();
        c.batch_execute(&format!("INSERT INTO pairs VALUES ({t}, 1, '{pad}')"))
            .unwrap();
        c.batch_execute(&format!("INSERT INTO pairs VALUES ({t}, 2, '{pad}')"))
            .unwrap();
        c.batch_execute("COMMIT").unwrap();
    };
    for t in 0..200 {
        txn(&mut c, t);
    }
    // The primary never waited for the mirror: all 200 transactions committed there while
    // the mirror, still blocked by the lock, has applied none of them.
    assert_eq!(p.psql("SELECT count(*) FROM pairs").unwrap().trim(), "400");
    // (Read by the lock's holder: anyone else would queue behind the lock.)
    let on_mirror: i64 = blocker
        .query_one("SELECT count(*) FROM pairs", &[])
        .unwrap()
        .get(0);
    assert_eq!(on_mirror, 0, "the mirror applied rows through a held lock");
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_transactions_cut_total")
        > 0));
    blocker.batch_execute("COMMIT").unwrap();
    // Once released, the mirror catches up with what it kept (the link resumes only once its
    // queue has drained: on a loaded machine that takes a while), and it holds whole
    // transactions only: never one part of a pair without the other.
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_queue_messages")
        == 0));
    for t in 200..210 {
        txn(&mut c, t);
    }
    drop(c);
    assert!(eventually(Duration::from_secs(20), || m1
        .psql("SELECT count(*) FROM pairs WHERE txn = 209")
        .unwrap()
        .trim()
        == "2"));
    assert_eq!(
        m1.psql("SELECT count(*) FROM (SELECT txn FROM pairs GROUP BY txn HAVING count(*) <> 2) x")
            .unwrap()
            .trim(),
        "0"
    );
    let on_mirror: u64 = m1
        .psql("SELECT count(*) FROM pairs")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        on_mirror < 420,
        "some transactions must have been skipped, got {on_mirror} rows"
    );
    assert!(proxy.metric("pgprism_mirror_skipped_overflow_total") > 0);
}

#[test]
fn bad_mirror_credentials_are_counted_and_bad_urls_rejected() {
    let (p, m1) = (start_primary("cp"), start_primary("cm"));
    let wrong = format!(
        "postgres://{SCRAM_USER}:nope@127.0.0.1:{}/postgres",
        m1.port()
    );
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &wrong,
            "--mirror-retries",
            "1",
            "--retry-delay",
            "10ms",
        ],
    );
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || proxy
        .metric("pgprism_mirror_connect_failures_total")
        >= 1));
    let (_, metrics) = proxy.admin_get("/metrics");
    assert!(metrics.contains("sqlstate=\"28P01\""), "{metrics}");
    drop(c);
    // A malformed mirror URL is a configuration error naming the key.
    let out = support::pgprism_command()
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "",
            "--primary",
            &p.url(),
            "--mirror",
            "mysql://x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mirror[0].url"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_config_starts_embedded_servers_a_proxy_and_a_mirror() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (p_port, m_port) = (free(), free());
    let (dir, config) = support::RunConfig::write(
        "mirror",
        &format!(
            r#"
[primary]
url = "postgres://127.0.0.1:{p_port}"
[[mirror]]
name = "copy"
url = "postgres://postgres:mirror-pw@127.0.0.1:{m_port}/postgres"
[embed]
state-dir = "{{dir}}/state"
[[embed.instance]]
name = "primary"
port = {p_port}
password = "primary-pw"
[[embed.instance]]
name = "copy"
port = {m_port}
password = "mirror-pw"
"#
        ),
    );
    let mut run = support::RunConfig::start(dir, config);
    let listen = run.listen.to_string();
    // Embedded servers take passwords on TCP; the client's reaches the primary through pgprism.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres password=primary-pw dbname=postgres",
        listen.rsplit(':').next().unwrap()
    );
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    c.batch_execute("CREATE TABLE r (v int); INSERT INTO r VALUES (1), (2)")
        .unwrap();
    drop(c);
    let mirror =
        format!("host=127.0.0.1 port={m_port} user=postgres password=mirror-pw dbname=postgres");
    assert!(eventually(Duration::from_secs(10), || {
        postgres::Client::connect(&mirror, postgres::NoTls)
            .and_then(|mut m| m.query_one("SELECT count(*) FROM r", &[]))
            .map(|row| row.get::<_, i64>(0) == 2)
            .unwrap_or(false)
    }));
    let status = run.stop();
    assert!(status.success(), "{status}");
    // The embedded servers are gone with it.
    assert!(std::net::TcpStream::connect(("127.0.0.1", p_port)).is_err());
}

#[test]
fn extended_protocol_copy_replays_and_keeps_the_session_in_step() {
    let (p, m1) = (start_primary("xp"), start_primary("xm"));
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--mirror-timeout", "5s"],
    );
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE cp (id int, v text)").unwrap();
    // The postgres crate runs COPY through Bind/Execute/Sync, then the data, CopyDone, Sync:
    // the server ignores the first Sync, and so must the session's accounting.
    for round in 0..3 {
        let mut w = c.copy_in("COPY cp FROM STDIN").unwrap();
        for i in 0..1000 {
            writeln!(w, "{}\tr{round}-{i}", round * 1000 + i).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 1000);
    }
    c.batch_execute("INSERT INTO cp VALUES (-1, 'after')")
        .unwrap();
    drop(c);
    assert!(converged(&p, &[&m1], "cp", "id, v"));
    assert_eq!(proxy.metric("pgprism_mirror_timeouts_total"), 0);
    assert_eq!(proxy.metric("pgprism_mirror_errors_total"), 0);
    // The session was idle at the end (a drain would have closed it at once).
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_sessions_closed_total")
        >= 1));
}

#[test]
fn block_policy_passes_a_frame_larger_than_the_queue() {
    let (p, m1) = (start_primary("kp"), start_primary("km"));
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-overflow",
            "block",
            "--mirror-queue-bytes",
            "1024",
        ],
    );
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE big (v text)").unwrap();
    let literal = "y".repeat(50_000);
    for _ in 0..5 {
        c.batch_execute(&format!("INSERT INTO big VALUES ('{literal}')"))
            .unwrap();
    }
    drop(c);
    assert!(converged(&p, &[&m1], "big", "length(v)"));
    // The shard is responsive (a spin on the full queue would have frozen it).
    proxy.client().query_one("SELECT 1", &[]).unwrap();
}

#[test]
fn session_settings_are_replayed_after_a_mirror_reconnect() {
    let (p, m1) = primary_and_mirror("rp", "rm", "CREATE SCHEMA app; CREATE TABLE app.t (v int)");
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--retry-delay", "20ms"],
    );
    let mut c = proxy.client();
    c.batch_execute("SET search_path = app").unwrap();
    c.batch_execute("INSERT INTO t VALUES (1)").unwrap();
    assert!(eventually(Duration::from_secs(10), || m1
        .psql("SELECT count(*) FROM app.t")
        .unwrap()
        .trim()
        == "1"));
    // The mirror session dies mid-session; pgprism reconnects.
    m1.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_reconnects_total")
        >= 1));
    // Unqualified names keep resolving to `app` on the mirror: the SET was replayed there.
    assert!(
        eventually(Duration::from_secs(20), || {
            c.batch_execute("INSERT INTO t VALUES (2)").unwrap();
            m1.psql("SELECT count(*) FROM app.t WHERE v = 2")
                .unwrap()
                .trim()
                != "0"
        }),
        "{}",
        proxy.admin_get("/status").1
    );
    // 42P01 (relation "t" does not exist) would mean the insert ran without the setting.
    let (_, metrics) = proxy.admin_get("/metrics");
    assert!(!metrics.contains("sqlstate=\"42P01\""), "{metrics}");
}

/// A simple Query on a raw connection; panics on an ErrorResponse.
fn raw_query(s: &mut std::net::TcpStream, sql: &str) {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    s.write_all(&support::raw::message(b'Q', &body)).unwrap();
    expect_ready(s, sql);
}

/// Reads up to ReadyForQuery; panics on an ErrorResponse.
fn expect_ready(s: &mut std::net::TcpStream, what: &str) {
    let msgs = support::raw::read_until_ready(s);
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{what}: {msgs:?}");
    if let Some((_, body)) = msgs.iter().find(|m| m.0 == b'E') {
        panic!(
            "{what}: {:?}",
            support::raw::error_field(body, b'M').unwrap_or_default()
        );
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Parse with explicit parameter types.
fn parse_msg(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&(types.len() as u16).to_be_bytes());
    for t in types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    support::raw::message(b'P', &body)
}

/// Bind (unnamed portal, text parameters), Execute and Sync.
fn bind_execute_sync(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, statement);
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p.as_bytes());
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    let mut out = support::raw::message(b'B', &body);
    let mut exec = Vec::new();
    cstr(&mut exec, "");
    exec.extend_from_slice(&0i32.to_be_bytes());
    out.extend(support::raw::message(b'E', &exec));
    out.extend(support::raw::message(b'S', &[]));
    out
}

/// Mirror ErrorResponses other than the FATAL 57P01 a terminated mirror session sends last.
fn mirror_errors_but_terminations(proxy: &Proxy) -> u64 {
    let (_, body) = proxy.admin_get("/metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("pgprism_mirror_errors_by_sqlstate_total{")
                && !l.contains("sqlstate=\"57P01\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Ends every client session on `inst` (the mirror sessions pgprism holds there).
/// Terminates every client session on `inst`, waiting (bounded) until there is at least
/// one: the mirror's connection may still be on its way when the test gets here (its
/// statements wait for it), and terminating nothing would leave nothing to reconnect.
fn terminate_sessions(inst: &Instance) {
    let terminated = eventually(Duration::from_secs(10), || {
        inst.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .is_ok_and(|n| n.trim() != "0")
    });
    assert!(terminated, "no client session to terminate on the mirror");
}

#[test]
fn sql_prepared_statements_replay_under_the_default_filter() {
    let (p, m1, m2) = (
        start_primary("qp"),
        start_primary("q1"),
        start_primary("q2"),
    );
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--mirror", &mirror_url(&m2)],
    );
    let mut c = proxy.client();
    c.batch_execute("CREATE TABLE sp (id int PRIMARY KEY, v text); CREATE SEQUENCE sq")
        .unwrap();
    // Outside transactions, one statement per Query.
    c.batch_execute("PREPARE ins(int, text) AS INSERT INTO sp VALUES ($1, $2)")
        .unwrap();
    c.batch_execute("EXECUTE ins(1, 'a')").unwrap();
    c.batch_execute("EXECUTE ins(2, 'b')").unwrap();
    // Inside transactions: a statement the mirror would reject there would abort the rest of
    // the transaction on it (and the mirror would silently miss the rows).
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute("EXECUTE ins(3, 'c')").unwrap();
    c.batch_execute("EXECUTE ins(4, 'd')").unwrap();
    c.batch_execute("COMMIT").unwrap();
    // A SELECT's PREPARE is filtered; its EXECUTE and DEALLOCATE must not reach the mirrors.
    // (nextval() makes a SELECT that reached a mirror visible there.)
    c.batch_execute("PREPARE sel AS SELECT count(*), nextval('sq') FROM sp")
        .unwrap();
    c.batch_execute("EXECUTE sel").unwrap();
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute("EXECUTE sel").unwrap();
    c.batch_execute("EXECUTE ins(5, 'e')").unwrap();
    c.batch_execute("COMMIT").unwrap();
    // All of it in multi-statement Queries.
    c.batch_execute(
        "BEGIN; PREPARE upd(int) AS UPDATE sp SET v = v || '!' WHERE id = $1; \
         EXECUTE upd(1); EXECUTE sel; EXECUTE ins(6, 'f'); COMMIT",
    )
    .unwrap();
    c.batch_execute("EXECUTE sel; DEALLOCATE sel; EXECUTE upd(2)")
        .unwrap();
    c.batch_execute("DEALLOCATE sel; PREPARE sel AS SELECT 1; DEALLOCATE PREPARE sel")
        .unwrap_err();
    c.batch_execute("PREPARE sel AS SELECT 1; DEALLOCATE PREPARE sel")
        .unwrap();
    // Quoted names keep their case, unquoted ones fold to lower case.
    c.batch_execute(r#"PREPARE "InsQ"(int) AS INSERT INTO sp VALUES ($1, 'quoted')"#)
        .unwrap();
    c.batch_execute(r#"EXECUTE "InsQ"(7)"#).unwrap();
    c.batch_execute("PREPARE InsU(int) AS INSERT INTO sp VALUES ($1, 'folded')")
        .unwrap();
    c.batch_execute("EXECUTE insu(8); EXECUTE INSU(9)").unwrap();
    // Deallocated where it exists, so preparing the name again works on the mirrors too.
    c.batch_execute("DEALLOCATE ins").unwrap();
    c.batch_execute("PREPARE ins(int, text) AS INSERT INTO sp VALUES ($1, $2 || '2')")
        .unwrap();
    c.batch_execute("EXECUTE ins(10, 'x')").unwrap();
    c.batch_execute("DEALLOCATE ALL").unwrap();
    c.batch_execute("PREPARE ins(int) AS INSERT INTO sp VALUES ($1, 'after all'); EXECUTE ins(11)")
        .unwrap();
    drop(c);
    let cols = "id, v";
    assert!(
        converged(&p, &[&m1, &m2], "sp", cols),
        "mirrors differ:\nprimary {}\nm1 {}\nm2 {}\n{}",
        checksum(&p, "sp", cols),
        checksum(&m1, "sp", cols),
        checksum(&m2, "sp", cols),
        proxy.admin_get("/status").1
    );
    assert_eq!(checksum(&p, "sp", "id").split(':').next(), Some("11"));
    for m in [&m1, &m2] {
        assert_eq!(
            m.psql("SELECT is_called FROM sq").unwrap().trim(),
            "f",
            "a SELECT reached a mirror"
        );
    }
    // 22 statements per mirror: everything but the SELECTs' PREPARE, EXECUTE and DEALLOCATE
    // and the one Query the primary rejected (its DEALLOCATE of a statement already gone),
    // none of which reached the mirrors.
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        >= 2 * 22));
    assert_eq!(proxy.metric("pgprism_mirror_statements_total"), 2 * 22);
    assert_eq!(
        proxy.metric("pgprism_mirror_errors_total"),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn sql_prepared_statements_follow_their_statement_under_dml_only() {
    let (p, m1) = primary_and_mirror(
        "op",
        "om",
        "CREATE TABLE od (id int, v text); CREATE SEQUENCE oseq",
    );
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--mirror-dml-only"],
    );
    let mut c = proxy.client();
    c.batch_execute("PREPARE ins(int) AS INSERT INTO od VALUES ($1, 'x')")
        .unwrap();
    // nextval() makes a SELECT that reached the mirror visible there.
    c.batch_execute("PREPARE sel AS SELECT nextval('oseq')")
        .unwrap();
    c.batch_execute("EXECUTE ins(1)").unwrap();
    c.batch_execute("EXECUTE sel").unwrap();
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute("EXECUTE sel").unwrap();
    c.batch_execute("EXECUTE ins(2)").unwrap();
    c.batch_execute("COMMIT").unwrap();
    c.batch_execute("BEGIN; EXECUTE sel; EXECUTE ins(3); DEALLOCATE sel; EXECUTE ins(4); COMMIT")
        .unwrap();
    c.batch_execute("DEALLOCATE ins").unwrap();
    drop(c);
    assert!(
        converged(&p, &[&m1], "od", "id, v"),
        "{}",
        proxy.admin_get("/status").1
    );
    assert_eq!(checksum(&m1, "od", "id").split(':').next(), Some("4"));
    assert_eq!(
        m1.psql("SELECT is_called FROM oseq").unwrap().trim(),
        "f",
        "a SELECT reached the mirror"
    );
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_skipped_filter_total")
        >= 4));
    assert_eq!(
        proxy.metric("pgprism_mirror_errors_total"),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn prepared_statements_are_prepared_again_after_a_mirror_reconnect() {
    let (p, m1) = primary_and_mirror("ap", "am", "CREATE TABLE rp (id int, how text)");
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--retry-delay", "20ms"],
    );
    // A raw session: SQL-level and protocol-level statements side by side (one namespace).
    let mut s = support::raw::connect_ready(proxy.listen);
    raw_query(
        &mut s,
        "PREPARE ins(int) AS INSERT INTO rp VALUES ($1, 'sql')",
    );
    raw_query(
        &mut s,
        "PREPARE sqlbind(int) AS INSERT INTO rp VALUES ($1, 'sql, bound')",
    );
    let mut parse = parse_msg("proto_ins", "INSERT INTO rp VALUES ($1, 'protocol')", &[23]);
    parse.extend(support::raw::message(b'S', &[]));
    s.write_all(&parse).unwrap();
    expect_ready(&mut s, "Parse proto_ins");
    raw_query(&mut s, "EXECUTE ins(1)");
    assert!(eventually(Duration::from_secs(10), || m1
        .psql("SELECT count(*) FROM rp")
        .unwrap()
        .trim()
        == "1"));
    // The mirror session dies: its prepared statements with it.
    terminate_sessions(&m1);
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_reconnects_total")
        >= 1));
    // An EXECUTE of a statement prepared by PREPARE, one prepared by Parse (inside a
    // transaction block), and a Bind of one prepared by PREPARE: each is prepared again on
    // the new mirror session first.
    raw_query(&mut s, "EXECUTE ins(2)");
    raw_query(&mut s, "BEGIN");
    raw_query(&mut s, "EXECUTE ins(3)");
    raw_query(&mut s, "EXECUTE proto_ins(4)");
    raw_query(&mut s, "COMMIT");
    s.write_all(&bind_execute_sync("sqlbind", &["5"])).unwrap();
    expect_ready(&mut s, "Bind sqlbind");
    s.write_all(&bind_execute_sync("proto_ins", &["6"]))
        .unwrap();
    expect_ready(&mut s, "Bind proto_ins");
    raw_query(&mut s, "EXECUTE sqlbind(7)");
    drop(s);
    assert!(
        converged(&p, &[&m1], "rp", "id, how"),
        "primary {}\nmirror {}\n{}",
        checksum(&p, "rp", "id, how"),
        checksum(&m1, "rp", "id, how"),
        proxy.admin_get("/status").1
    );
    assert_eq!(checksum(&m1, "rp", "id").split(':').next(), Some("7"));
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_reprepared_total")
        >= 3));
    assert_eq!(proxy.metric("pgprism_mirror_reprepared_total"), 3);
    assert_eq!(
        mirror_errors_but_terminations(&proxy),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn transaction_scoped_settings_are_not_replayed_after_a_reconnect() {
    let (p, m1) = (start_primary("lp"), start_primary("lm"));
    for inst in [&p, &m1] {
        inst.psql(
            "CREATE SCHEMA app; CREATE SCHEMA other; \
             CREATE TABLE app.t (v int, tag text DEFAULT current_setting('app.tag', true)); \
             CREATE TABLE other.t (LIKE app.t INCLUDING DEFAULTS)",
        )
        .unwrap();
    }
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--retry-delay", "20ms"],
    );
    let mut c = proxy.client();
    // The session's settings: one made in a multi-statement Query, one through the extended
    // protocol (the postgres crate's `execute`).
    c.batch_execute("SET search_path = app; INSERT INTO t VALUES (-1)")
        .unwrap();
    c.execute("SET app.tag = 'extended'", &[]).unwrap();
    // Transaction-scoped settings, more of them than the kept settings' bound: kept as
    // session state, they would push `search_path = app` out of what is replayed.
    for i in 0..70 {
        c.batch_execute("BEGIN").unwrap();
        if i % 2 == 0 {
            c.batch_execute("SET LOCAL search_path = other").unwrap();
        } else {
            c.batch_execute("SELECT set_config('search_path', 'other', true)")
                .unwrap();
        }
        c.batch_execute(&format!("INSERT INTO t VALUES ({i})"))
            .unwrap();
        c.batch_execute("COMMIT").unwrap();
    }
    // A session-level SET that is rolled back is undone on the primary.
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute("SET search_path = other").unwrap();
    c.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("INSERT INTO t VALUES (100)").unwrap();
    assert!(converged(&p, &[&m1], "other.t", "v, tag"));
    assert!(converged(&p, &[&m1], "app.t", "v, tag"));
    terminate_sessions(&m1);
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_reconnects_total")
        >= 1));
    // After the reconnect the mirror session gets `search_path = app` and `app.tag` back,
    // and nothing else.
    c.batch_execute("INSERT INTO t VALUES (200)").unwrap();
    c.batch_execute("INSERT INTO t VALUES (201)").unwrap();
    drop(c);
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql("SELECT count(*) FROM app.t WHERE v >= 200")
            .unwrap()
            .trim()
            == "2"),
        "app.t: {}, other.t: {}\n{}",
        checksum(&m1, "app.t", "v, tag"),
        checksum(&m1, "other.t", "v, tag"),
        proxy.admin_get("/metrics").1
    );
    for table in ["app.t", "other.t"] {
        assert_eq!(
            checksum(&m1, table, "v, tag"),
            checksum(&p, table, "v, tag"),
            "{table}"
        );
    }
    assert_eq!(
        p.psql("SELECT count(*) FROM app.t WHERE tag = 'extended'")
            .unwrap()
            .trim(),
        "3"
    );
    assert_eq!(
        mirror_errors_but_terminations(&proxy),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn settings_missed_while_a_cut_link_skips_are_replayed_when_it_resumes() {
    let (p, m1) = primary_and_mirror(
        "kp2",
        "km2",
        "CREATE SCHEMA app; CREATE TABLE app.t (v int, pad text)",
    );
    let proxy = small_queue_proxy(&p, &m1);
    // A lock on the mirror stalls its session, so its queue overflows and the link is cut.
    let mut blocker = lock_table(&m1, "app.t");
    let mut c = proxy.client();
    // 40 KB per transaction, until the socket buffers towards the stalled mirror are full and
    // its queue overflows (bounded: 40 MB).
    let pad = "x".repeat(20_000);
    let mut t = 0;
    while proxy.metric("pgprism_mirror_transactions_cut_total") == 0 {
        assert!(t < 1000, "{}", proxy.admin_get("/status").1);
        for _ in 0..50 {
            c.batch_execute("BEGIN").unwrap();
            for _ in 0..2 {
                c.batch_execute(&format!("INSERT INTO app.t VALUES ({t}, '{pad}')"))
                    .unwrap();
            }
            c.batch_execute("COMMIT").unwrap();
            t += 1;
        }
    }
    // The link skips until its queue drains: this SET never reaches the mirror as it is.
    c.batch_execute("SET search_path = app").unwrap();
    blocker.batch_execute("COMMIT").unwrap();
    // Once the link resumes, unqualified names resolve on the mirror as on the primary.
    assert!(
        eventually(Duration::from_secs(20), || {
            c.batch_execute("INSERT INTO t VALUES (1000, '')").unwrap();
            m1.psql("SELECT count(*) FROM app.t WHERE v = 1000")
                .unwrap()
                .trim()
                != "0"
        }),
        "{}",
        proxy.admin_get("/status").1
    );
    drop(c);
    let (_, metrics) = proxy.admin_get("/metrics");
    assert!(!metrics.contains("sqlstate=\"42P01\""), "{metrics}");
}

/// 30 inserts, then two updates of row 1: the mirror ends with 'abc' there only if it
/// applied them in order.
fn ordered_writes(c: &mut postgres::Client) {
    for n in 1..=30 {
        c.execute("INSERT INTO seq VALUES ($1, 'a')", &[&n])
            .unwrap();
    }
    c.batch_execute("BEGIN; UPDATE seq SET v = v || 'b' WHERE n = 1; COMMIT")
        .unwrap();
    c.batch_execute("UPDATE seq SET v = v || 'c' WHERE n = 1")
        .unwrap();
}

#[test]
fn flush_delay_coalesces_a_sessions_statements_in_order() {
    let (p, m1) = primary_and_mirror("fp", "fm", "CREATE TABLE seq (n int PRIMARY KEY, v text)");
    // A delay no test run reaches: only the client's leaving flushes this session's frames.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-flush-delay-us",
            "600000000",
        ],
    );
    let mut c = proxy.client();
    ordered_writes(&mut c);
    // Held, not sent: the mirror has none of it while the session lasts.
    assert_eq!(m1.psql("SELECT count(*) FROM seq").unwrap().trim(), "0");
    drop(c);
    assert!(
        eventually(Duration::from_secs(20), || converged(
            &p,
            &[&m1],
            "seq",
            "n, v"
        )),
        "{}",
        proxy.admin_get("/status").1
    );
    assert_eq!(
        m1.psql("SELECT v FROM seq WHERE n = 1").unwrap().trim(),
        "abc"
    );
    // 32 statements, one write.
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        == 32));
    assert_eq!(proxy.metric("pgprism_mirror_writes_total"), 1);
}

/// The mirror's `table` converges on the primary's, whose ids (in order) are `ids`, and the
/// mirror answered no error (but the terminations tests cause).
fn assert_mirror_holds(p: &Instance, m1: &Instance, proxy: &Proxy, table: &str, ids: &str) {
    assert!(
        eventually(Duration::from_secs(20), || converged(p, &[m1], table, "id")),
        "primary {}\nmirror {}\n{}",
        checksum(p, table, "id"),
        checksum(m1, table, "id"),
        proxy.admin_get("/status").1
    );
    assert_eq!(
        p.psql(&format!(
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}"
        ))
        .unwrap()
        .trim(),
        ids
    );
    assert_eq!(
        mirror_errors_but_terminations(proxy),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn sql_prepared_statements_through_the_extended_protocol_replay() {
    let (p, m1) = primary_and_mirror("xp", "xm", "CREATE TABLE xp (id int)");
    // DML only: a PREPARE passes as what it prepares, an EXECUTE as what it runs.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-dml-only",
            "--retry-delay",
            "20ms",
        ],
    );
    // The `postgres` crate sends each of these through Parse/Bind/Execute.
    let mut c = proxy.client();
    c.execute("PREPARE ins(int) AS INSERT INTO xp VALUES ($1)", &[])
        .unwrap();
    c.execute("PREPARE cnt AS SELECT count(*) FROM xp", &[])
        .unwrap();
    c.execute("EXECUTE ins(1)", &[]).unwrap();
    let n: i64 = c.query_one("EXECUTE cnt", &[]).unwrap().get(0);
    assert_eq!(n, 1);
    assert!(eventually(Duration::from_secs(10), || m1
        .psql("SELECT count(*) FROM xp")
        .unwrap()
        .trim()
        == "1"));
    // The mirror session dies with its prepared statements: the next EXECUTE prepares `ins`
    // again there first.
    terminate_sessions(&m1);
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_reconnects_total")
        >= 1));
    c.execute("EXECUTE ins(2)", &[]).unwrap();
    c.batch_execute("BEGIN").unwrap();
    c.execute("EXECUTE ins(3)", &[]).unwrap();
    c.execute("DEALLOCATE ins", &[]).unwrap();
    c.execute("PREPARE ins(int) AS INSERT INTO xp VALUES ($1 * 10)", &[])
        .unwrap();
    c.execute("EXECUTE ins(4)", &[]).unwrap();
    c.batch_execute("COMMIT").unwrap();
    let n: i64 = c.query_one("EXECUTE cnt", &[]).unwrap().get(0);
    assert_eq!(n, 4);
    drop(c);
    assert_mirror_holds(&p, &m1, &proxy, "xp", "1,2,3,40");
    // `ins` was prepared again on the new mirror session.
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_reprepared_total")
        >= 1));
    // The SELECTs were not mirrored: PREPARE cnt and both EXECUTE cnt.
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metric("pgprism_mirror_skipped_filter_total")
            >= 3),
        "{}",
        proxy.admin_get("/metrics").1
    );
}

#[test]
fn create_table_as_execute_of_a_filtered_select_reaches_the_mirror() {
    let (p, m1) = (start_primary("cp"), start_primary("cm"));
    // The default filter (DDL + DML): the PREPARE of a SELECT is not mirrored, but a CREATE
    // TABLE AS EXECUTE of it is DDL, so the mirror is given the statement first.
    let proxy = Proxy::start(&p.url(), &["--mirror", &mirror_url(&m1)]);
    let mut c = proxy.client();
    c.batch_execute("PREPARE sel(int) AS SELECT g FROM generate_series(1, $1) g")
        .unwrap();
    c.batch_execute("CREATE TABLE made AS EXECUTE sel(5)")
        .unwrap();
    // The same through the extended protocol.
    c.execute("CREATE TABLE made2 AS EXECUTE sel(3) WITH DATA", &[])
        .unwrap();
    drop(c);
    for (table, rows) in [("made", "5"), ("made2", "3")] {
        assert!(
            eventually(Duration::from_secs(20), || converged(
                &p,
                &[&m1],
                table,
                "g"
            )),
            "{table}: primary {} mirror {}\n{}",
            checksum(&p, table, "g"),
            checksum(&m1, table, "g"),
            proxy.admin_get("/status").1
        );
        assert_eq!(
            m1.psql(&format!("SELECT count(*) FROM {table}"))
                .unwrap()
                .trim(),
            rows
        );
    }
    assert_eq!(
        mirror_errors_but_terminations(&proxy),
        0,
        "{}",
        proxy.admin_get("/status").1
    );
}

#[test]
fn discard_all_and_trailing_semicolons_through_the_extended_protocol() {
    let (p, m1) = primary_and_mirror("dp", "dm", "CREATE TABLE dz (id int)");
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--retry-delay", "20ms"],
    );
    let mut c = proxy.client();
    c.execute("PREPARE ins(int) AS INSERT INTO dz VALUES ($1)", &[])
        .unwrap();
    c.execute("EXECUTE ins(1)", &[]).unwrap();
    // DISCARD ALL drops `ins` on the primary; it must on the mirror too, or the next PREPARE
    // of the same name fails there (42P05).
    c.execute("DISCARD ALL", &[]).unwrap();
    c.execute("PREPARE ins(int) AS INSERT INTO dz VALUES ($1 * 10)", &[])
        .unwrap();
    c.execute("EXECUTE ins(2);", &[]).unwrap();
    // A filtered statement, deallocated with a trailing `;`: not sent where it never was.
    c.execute("PREPARE sel AS SELECT count(*) FROM dz;", &[])
        .unwrap();
    c.execute("DEALLOCATE sel;", &[]).unwrap();
    // After a reconnect, `EXECUTE ins;`-style text is prepared again first.
    terminate_sessions(&m1);
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_reconnects_total")
        >= 1));
    c.execute("EXECUTE ins(3) ;", &[]).unwrap();
    drop(c);
    assert_mirror_holds(&p, &m1, &proxy, "dz", "1,20,30");
}

#[test]
fn a_large_statement_behind_coalesced_ones_does_not_cut_a_healthy_mirror() {
    let (p, m1) = primary_and_mirror("lp", "lm", "CREATE TABLE big (id int, pad text)");
    // 256 KiB queue; statements held for a long time.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-queue-bytes",
            "262144",
            "--mirror-flush-delay-us",
            "600000000",
        ],
    );
    let mut c = proxy.client();
    c.batch_execute("INSERT INTO big VALUES (1, 'small')")
        .unwrap();
    // Larger than the whole queue, behind a held statement: it goes in, and both are sent.
    let pad = "x".repeat(300_000);
    c.batch_execute(&format!("INSERT INTO big VALUES (2, '{pad}')"))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql("SELECT count(*) FROM big")
            .unwrap()
            .trim()
            == "2"),
        "{}",
        proxy.admin_get("/status").1
    );
    drop(c);
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        == 2));
    assert_eq!(proxy.metric("pgprism_mirror_transactions_cut_total"), 0);
}

#[test]
fn coalesced_answers_are_read_late_counted_all_and_timed_one_write_in_n() {
    let (p, m1) = primary_and_mirror("dp", "dm", "CREATE TABLE d (id int PRIMARY KEY)");
    // A flush delay no test run reaches, but a queue of 2 messages: half of it (one statement)
    // sends at once. Only write 0 in 1000 is timed; the answers to the others are read a
    // flush delay after their write (never, in this test), or at once when the client leaves.
    let args = |every: &'static str| {
        vec![
            "--mirror".to_string(),
            mirror_url(&m1),
            "--mirror-all-queries".into(),
            "--mirror-flush-delay-us".into(),
            "600000000".into(),
            "--mirror-queue-messages".into(),
            "2".into(),
            "--mirror-overflow".into(),
            "block".into(),
            "--mirror-timeout".into(),
            "600s".into(),
            "--mirror-latency-sample-every".into(),
            every.into(),
        ]
    };
    let run = |proxy: &Proxy, first: i32| {
        let mut c = proxy.client();
        // Write 0, alone: its answer is read before the others are sent.
        c.batch_execute(&format!("INSERT INTO d VALUES ({first})"))
            .unwrap();
        assert!(
            eventually(Duration::from_secs(20), || proxy
                .metric("pgprism_mirror_rows_total")
                == 1),
            "{}",
            proxy.admin_get("/metrics").1
        );
        for id in first + 1..first + 20 {
            c.batch_execute(&format!("INSERT INTO d VALUES ({id})"))
                .unwrap();
        }
        // Fails on both sides: the mirror's error is counted like its rows.
        c.batch_execute("SELECT 1/0").unwrap_err();
        assert!(
            eventually(Duration::from_secs(20), || m1
                .psql(&format!("SELECT count(*) FROM d WHERE id >= {first}"))
                .unwrap()
                .trim()
                == "20"),
            "{}",
            proxy.admin_get("/status").1
        );
        c
    };
    let sampled_args = args("1000");
    let sampled = Proxy::start(
        &p.url(),
        &sampled_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let c = run(&sampled, 1);
    // The mirror ran all of them, but only write 0's answer was read so far.
    assert!(
        eventually(Duration::from_secs(20), || sampled
            .metric("pgprism_mirror_statements_total")
            == 21),
        "{}",
        sampled.admin_get("/metrics").1
    );
    assert_eq!(sampled.metric("pgprism_mirror_rows_total"), 1);
    assert_eq!(mirror_errors_but_terminations(&sampled), 0);
    drop(c);
    // The client left: the rest is read at once and counted, but not timed.
    assert!(
        eventually(Duration::from_secs(20), || sampled
            .metric("pgprism_mirror_rows_total")
            == 20
            && mirror_errors_but_terminations(&sampled) == 1),
        "{}",
        sampled.admin_get("/metrics").1
    );
    assert_eq!(sampled.metric("pgprism_mirror_latency_seconds_count"), 1);
    assert_eq!(sampled.metric("pgprism_mirror_timeouts_total"), 0);

    // Every write timed: every answer is read as it arrives.
    let every_args = args("1");
    let every = Proxy::start(
        &p.url(),
        &every_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let c = run(&every, 101);
    assert!(
        eventually(Duration::from_secs(20), || every
            .metric("pgprism_mirror_rows_total")
            == 20
            && mirror_errors_but_terminations(&every) == 1),
        "{}",
        every.admin_get("/metrics").1
    );
    assert_eq!(every.metric("pgprism_mirror_latency_seconds_count"), 21);
    drop(c);
    assert!(converged(&p, &[&m1], "d", "id"));
}

#[test]
fn a_mirror_that_stops_answering_late_read_statements_times_out() {
    let (p, m1) = primary_and_mirror(
        "tp",
        "tm",
        "CREATE TABLE w (id int); CREATE TABLE locked (id int)",
    );
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-flush-delay-us",
            "5000",
            "--mirror-latency-sample-every",
            "1000",
            "--mirror-timeout",
            "1s",
        ],
    );
    let mut c = proxy.client();
    // Write 0 (timed) is answered; what follows is read late.
    c.batch_execute("INSERT INTO w VALUES (1)").unwrap();
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_rows_total")
        == 1));
    let _lock = lock_table(&m1, "locked");
    c.batch_execute("INSERT INTO locked VALUES (1)").unwrap();
    // The mirror never answers it: the late reads find nothing, and the statement times out.
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .metric("pgprism_mirror_timeouts_total")
            >= 1),
        "{}",
        proxy.admin_get("/metrics").1
    );
}

#[test]
fn a_client_that_leaves_with_a_backlog_gets_its_late_answers_counted() {
    use std::io::Write;
    use support::raw::{message, read_until_ready};
    let (p, m1) = primary_and_mirror(
        "bp",
        "bm",
        "CREATE TABLE w (id int); CREATE TABLE locked (a int, b text)",
    );
    // Late reads (1 ms flush delay), large queues so nothing is cut, and a statement timeout
    // far below the test's patience: an answer left unread shows up as a timeout.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-flush-delay-us",
            "1000",
            "--mirror-timeout",
            "10s",
            "--mirror-queue-bytes",
            "400000000",
            "--mirror-queue-messages",
            "1000000",
        ],
    );
    let line = format!("1\t{}\n", "y".repeat(200));
    let mut want = 0u64;
    for round in 0..2u64 {
        let lines = 100_000 + 330 * round as usize;
        want += lines as u64 + 2;
        // The mirror cannot take the COPY: its data backs up in pgprism's writes, and the
        // client leaves while they are under way.
        let lock = lock_table(&m1, "locked");
        let mut s = support::raw::connect_ready(proxy.listen);
        for _ in 0..2 {
            s.write_all(&message(b'Q', b"INSERT INTO w VALUES (1)\0"))
                .unwrap();
            read_until_ready(&mut s);
            // Separate writes to the mirror (each past the 1 ms flush delay).
            std::thread::sleep(Duration::from_millis(200));
        }
        s.write_all(&message(b'Q', b"COPY locked FROM STDIN\0"))
            .unwrap();
        for chunk in line.repeat(lines).as_bytes().chunks(8192) {
            s.write_all(&message(b'd', chunk)).unwrap();
        }
        s.write_all(&message(b'c', &[])).unwrap();
        let answer = read_until_ready(&mut s);
        assert_eq!(answer.last().map(|m| m.0), Some(b'Z'));
        s.write_all(&message(b'X', &[])).unwrap();
        drop(s);
        // Meanwhile the late reads find nothing: the mirror is stuck behind the lock.
        std::thread::sleep(Duration::from_millis(1500));
        drop(lock);
        // Once the client is gone its last answers are read as they arrive: all counted
        // before the statement timeout.
        assert!(
            eventually(Duration::from_secs(30), || proxy
                .metric("pgprism_mirror_rows_total")
                >= want
                || proxy.metric("pgprism_mirror_timeouts_total") > 0),
            "{}",
            proxy.admin_get("/metrics").1
        );
        assert_eq!(
            proxy.metric("pgprism_mirror_timeouts_total"),
            0,
            "round {round}: {}",
            proxy.admin_get("/metrics").1
        );
        assert_eq!(proxy.metric("pgprism_mirror_rows_total"), want);
    }
}

#[test]
fn an_in_flight_bound_of_one_sends_one_sync_point_per_write_and_loses_nothing() {
    let (p, m1) = primary_and_mirror("ip", "im", "CREATE TABLE seq (n int PRIMARY KEY, v text)");
    // Everything is held until the client leaves, as in the coalescing test, which sends it
    // all in one write; with one answer in flight at a time, no write carries two sync points.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-flush-delay-us",
            "600000000",
            "--mirror-in-flight-messages",
            "1",
        ],
    );
    let mut c = proxy.client();
    ordered_writes(&mut c);
    assert_eq!(m1.psql("SELECT count(*) FROM seq").unwrap().trim(), "0");
    drop(c);
    assert!(
        converged(&p, &[&m1], "seq", "n, v"),
        "{}",
        proxy.admin_get("/status").1
    );
    // In order, and nothing cut, dropped or timed out.
    assert_eq!(
        m1.psql("SELECT v FROM seq WHERE n = 1").unwrap().trim(),
        "abc"
    );
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        == 32));
    for counter in [
        "pgprism_mirror_transactions_cut_total",
        "pgprism_mirror_skipped_overflow_total",
        "pgprism_mirror_skipped_down_total",
        "pgprism_mirror_timeouts_total",
        "pgprism_mirror_reconnects_total",
    ] {
        assert_eq!(proxy.metric(counter), 0, "{counter}");
    }
    // Each statement ends in its own sync point: at least one write per statement.
    let writes = proxy.metric("pgprism_mirror_writes_total");
    assert!(writes >= 32, "{writes} writes");
    assert_eq!(mirror_errors_but_terminations(&proxy), 0);

    // A bound of 0 could never send a statement: a configuration error naming the key.
    let out = support::pgprism_command()
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "",
            "--primary",
            &p.url(),
            "--mirror",
            &mirror_url(&m1),
            "--mirror-in-flight-messages",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mirror[0].in-flight-messages-max"),
        "{stderr}"
    );
}

#[test]
fn a_pipelining_client_behind_a_full_in_flight_bound_is_mirrored_while_it_stays() {
    use support::raw::{message, read_until_ready};
    let (p, m1) = primary_and_mirror("jp", "jm", "CREATE TABLE pl (id int PRIMARY KEY)");
    // Late reads (1 write in 8 timed), due a flush delay after their write that no test run
    // reaches, and a queue of 2 messages (half of it sends at once, a full one makes the client wait),
    // with at most 2 answers in flight: a full bound makes the reader read at once, so the
    // writer never waits out the flush delay (or the statement timeout) for room.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-flush-delay-us",
            "600000000",
            "--mirror-queue-messages",
            "2",
            "--mirror-overflow",
            "block",
            "--mirror-in-flight-messages",
            "2",
            "--mirror-timeout",
            "600s",
        ],
    );
    let statements = 500u64;
    let mut s = support::raw::connect_ready(proxy.listen);
    let mut pipelined = Vec::new();
    for id in 1..=statements {
        pipelined.extend(message(
            b'Q',
            format!("INSERT INTO pl VALUES ({id})\0").as_bytes(),
        ));
    }
    s.write_all(&pipelined).unwrap();
    for _ in 0..statements {
        let answer = read_until_ready(&mut s);
        assert_eq!(answer.last().map(|m| m.0), Some(b'Z'), "{answer:?}");
    }
    // All of it reaches the mirror while the session lasts (the answers to the last writes
    // may wait for their late read: they are counted once the client leaves).
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql("SELECT count(*) FROM pl")
            .unwrap()
            .trim()
            == statements.to_string()),
        "{}",
        proxy.admin_get("/metrics").1
    );
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_statements_total")
        == statements));
    // No write carried more than 2 of the statements.
    let writes = proxy.metric("pgprism_mirror_writes_total");
    assert!(writes >= statements / 2, "{writes} writes");
    s.write_all(&message(b'X', &[])).unwrap();
    drop(s);
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .metric("pgprism_mirror_rows_total")
            == statements),
        "{}",
        proxy.admin_get("/metrics").1
    );
    for counter in [
        "pgprism_mirror_timeouts_total",
        "pgprism_mirror_transactions_cut_total",
        "pgprism_mirror_reconnects_total",
    ] {
        assert_eq!(proxy.metric(counter), 0, "{counter}");
    }
    assert_mirror_holds(
        &p,
        &m1,
        &proxy,
        "pl",
        &(1..=statements)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
}

// Pooled mirrors (`--mirror-pool-size`): a few connections per mirror, shared by every session.

/// A server like `start_primary`'s (the mirror URL's SCRAM user), with extra settings.
fn start_server_with(name: &str, settings: &[(&str, &str)]) -> Instance {
    let inst = Instance::start(pgprism::embed::InstanceConfig {
        name: name.into(),
        hba: vec![format!("host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256")],
        settings: settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..pgprism::embed::InstanceConfig::default()
    })
    .expect("start PostgreSQL");
    inst.psql(&format!(
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}';"
    ))
    .expect("create the mirror's role");
    inst
}

/// The connections pgprism holds on a mirror (it logs in as the mirror URL's user; the
/// tests' own connections as `postgres`).
const POOL_CONNECTIONS_SQL: &str =
    "SELECT count(*)::int FROM pg_stat_activity WHERE usename = 'scramuser'";

/// Samples the connections pgprism holds on `m` until `stop`; returns the most seen at once.
fn sample_pool_connections(
    m: &Instance,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<i32> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        m.port()
    );
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        let mut most = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let seen: i32 = c.query_one(POOL_CONNECTIONS_SQL, &[]).unwrap().get(0);
            most = most.max(seen);
            // Sampling interval: the maximum over the run is what counts.
            std::thread::sleep(Duration::from_millis(2));
        }
        most
    })
}

/// Close (statement) and Sync.
fn close_sync(statement: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    cstr(&mut body, statement);
    let mut out = support::raw::message(b'C', &body);
    out.extend(support::raw::message(b'S', &[]));
    out
}

/// The statement every session prepares as `S_1`, one of three texts (`variant`): sessions
/// sharing a pool connection prepare the same name with different texts.
fn s1_text(variant: usize) -> String {
    format!(
        "INSERT INTO pooled VALUES ($1, $2, 'variant-{variant}', \
         current_setting('application_name'))"
    )
}

/// One session's workload: transactions over several batches, autocommit statements, two
/// pipelined ones, session settings read back into the rows (one undone by a rollback), the
/// protocol-level statement `S_1` (replaced halfway by another text) alone and in a block,
/// and an in-order append to the session's own row. Returns the rows it committed.
fn pooled_session(addr: std::net::SocketAddr, s: usize, rounds: usize) -> usize {
    let mut c = support::raw::connect_ready(addr);
    let n = std::cell::Cell::new(0);
    let next = || {
        n.set(n.get() + 1);
        n.get()
    };
    let insert = |kind: &str, note: &str| {
        format!(
            "INSERT INTO pooled VALUES ({s}, {}, '{kind}', {note})",
            next()
        )
    };
    raw_query(
        &mut c,
        &format!("INSERT INTO pooled VALUES ({s}, 0, 'seq', '')"),
    );
    c.write_all(&parse_msg("S_1", &s1_text(s % 3), &[23, 23]))
        .unwrap();
    c.write_all(&support::raw::message(b'S', &[])).unwrap();
    expect_ready(&mut c, "parse S_1");
    // Round r writes rows 8r+1 ..= 8r+8; 8r+6 ..= 8r+8 read the round's setting.
    for r in 0..rounds {
        raw_query(&mut c, "BEGIN");
        raw_query(&mut c, &insert("block", "'a'"));
        raw_query(&mut c, &insert("block", "'b'"));
        raw_query(&mut c, "COMMIT");
        raw_query(&mut c, &insert("auto", "'c'"));
        let mut pipelined = Vec::new();
        for _ in 0..2 {
            let sql = insert("pipelined", "'d'");
            pipelined.extend(support::raw::message(b'Q', format!("{sql}\0").as_bytes()));
        }
        c.write_all(&pipelined).unwrap();
        expect_ready(&mut c, "pipelined 1");
        expect_ready(&mut c, "pipelined 2");
        raw_query(&mut c, &format!("SET application_name = 'app-{s}-{r}'"));
        raw_query(
            &mut c,
            &insert("setting", "current_setting('application_name')"),
        );
        c.write_all(&bind_execute_sync(
            "S_1",
            &[&s.to_string(), &next().to_string()],
        ))
        .unwrap();
        expect_ready(&mut c, "S_1 alone");
        raw_query(&mut c, "BEGIN");
        c.write_all(&bind_execute_sync(
            "S_1",
            &[&s.to_string(), &next().to_string()],
        ))
        .unwrap();
        expect_ready(&mut c, "S_1 in a block");
        raw_query(&mut c, "COMMIT");
        raw_query(
            &mut c,
            &format!("UPDATE pooled SET note = note || ',{r}' WHERE session = {s} AND n = 0"),
        );
        // Undone on the primary, so on the mirror too: the setting included.
        raw_query(&mut c, "BEGIN");
        raw_query(&mut c, "SET application_name = 'never'");
        raw_query(
            &mut c,
            &format!("INSERT INTO pooled VALUES ({s}, -1, 'never', '')"),
        );
        raw_query(&mut c, "ROLLBACK");
        if r == rounds / 2 {
            c.write_all(&close_sync("S_1")).unwrap();
            expect_ready(&mut c, "close S_1");
            c.write_all(&parse_msg("S_1", &s1_text((s + 1) % 3), &[23, 23]))
                .unwrap();
            c.write_all(&support::raw::message(b'S', &[])).unwrap();
            expect_ready(&mut c, "parse S_1 again");
        }
    }
    c.write_all(&support::raw::message(b'X', &[])).unwrap();
    n.get() + 1
}

/// Counters that say something was not mirrored.
const SKIPPED: [&str; 7] = [
    "pgprism_mirror_skipped_overflow_total",
    "pgprism_mirror_skipped_down_total",
    "pgprism_mirror_skipped_resync_total",
    "pgprism_mirror_skipped_unprepared_total",
    "pgprism_mirror_transactions_cut_total",
    "pgprism_mirror_units_lost_total",
    "pgprism_mirror_timeouts_total",
];

#[test]
fn pooled_mirror_replays_sixty_sessions_on_four_connections() {
    sixty_sessions_on_four_connections(&[]);
}

/// With `pool-batch-wait-us` a connection holds the units it would write next while its last
/// write is unanswered: every unit still arrives whole, in its session's order, with its
/// settings and prepared statements, within the pool's four connections.
#[test]
fn pooled_mirror_with_a_batch_wait_replays_sixty_sessions_on_four_connections() {
    sixty_sessions_on_four_connections(&["--mirror-pool-batch-wait-us", "1000"]);
}

/// The messages written to the mirror (`pgprism_mirror_messages_total`) and the cumulative
/// buckets of `pgprism_mirror_lag_seconds` from one scrape, `+Inf` last.
fn lag_histogram(proxy: &Proxy) -> (u64, Vec<u64>) {
    let (_, body) = proxy.admin_get("/metrics");
    let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
    let sent = body
        .lines()
        .filter(|l| l.starts_with("pgprism_mirror_messages_total{"))
        .filter_map(value)
        .sum();
    let buckets = body
        .lines()
        .filter(|l| l.starts_with("pgprism_mirror_lag_seconds_bucket{"))
        .filter_map(value)
        .collect();
    (sent, buckets)
}

fn sixty_sessions_on_four_connections(extra: &[&str]) {
    const SESSIONS: usize = 60;
    const ROUNDS: usize = 4;
    let ddl = "CREATE TABLE pooled (session int, n int, kind text, note text, \
               PRIMARY KEY (session, n))";
    let p = start_primary("pp");
    // 60 sessions with a connection each would be refused past 20.
    let m1 = start_server_with("pm", &[("max_connections", "20")]);
    for inst in [&p, &m1] {
        inst.psql(ddl).unwrap();
    }
    // Sixty sessions start at once, each with a SCRAM login to the primary through pgprism,
    // and the pool's four SCRAM logins to the mirror: on a loaded machine these take longer
    // than the default bounds on a login (10 s for the client's, 5 s for a server
    // connection's). Generous bounds here: the test is about the replay, not login times.
    let dir = support::TempDir::new("mirror-sixty");
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nstartup-timeout-ms = 120000\nconnect-timeout-ms = 120000\n\
             [[mirror]]\nurl = \"{}\"\npool-size = 4\nconnect-timeout-ms = 120000\n",
            mirror_url(&m1)
        ),
    )
    .unwrap();
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&p.url(), &args);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_pool_connections(&m1, stop.clone());
    let addr = proxy.listen;
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|s| std::thread::spawn(move || pooled_session(addr, s, ROUNDS)))
        .collect();
    let rows: usize = sessions.into_iter().map(|t| t.join().unwrap()).sum();
    let cols = "session, n, kind, note";
    assert_eq!(
        p.psql("SELECT count(*) FROM pooled").unwrap().trim(),
        rows.to_string()
    );
    assert!(
        converged(&p, &[&m1], "pooled", cols),
        "primary {}\nmirror {}\n{}",
        checksum(&p, "pooled", cols),
        checksum(&m1, "pooled", cols),
        proxy.admin_get("/metrics").1
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(
        (1..=4).contains(&most),
        "{most} pgprism connections on the mirror at once"
    );
    // The settings reached the rows that read them, the rolled-back one nowhere.
    assert_eq!(
        m1.psql(
            "SELECT count(*) FROM pooled WHERE n > 0 AND (n - 1) % 8 >= 5 \
             AND note = 'app-' || session || '-' || (n - 1) / 8"
        )
        .unwrap()
        .trim(),
        (SESSIONS * ROUNDS * 3).to_string()
    );
    assert_eq!(
        m1.psql("SELECT count(*) FROM pooled WHERE note = 'never' OR kind = 'never'")
            .unwrap()
            .trim(),
        "0"
    );
    assert!(eventually(CONVERGED, || proxy
        .metric("pgprism_mirror_units_total")
        >= (SESSIONS * ROUNDS * 8) as u64));
    for counter in SKIPPED {
        assert_eq!(proxy.metric(counter), 0, "{counter}");
    }
    assert_eq!(
        proxy.metric("pgprism_mirror_errors_total"),
        0,
        "{}",
        proxy.admin_get("/metrics").1
    );
    // Every message written to the mirror has its queueing delay in the lag histogram.
    assert!(
        eventually(CONVERGED, || {
            let (sent, lag) = lag_histogram(&proxy);
            sent > 0 && lag.last() == Some(&sent) && lag.windows(2).all(|w| w[0] <= w[1])
        }),
        "{}",
        proxy.admin_get("/metrics").1
    );
    // Sessions sharing a connection prepared S_1 under different texts.
    assert!(proxy.metric("pgprism_mirror_reprepared_total") > 0);
    // Several sessions' units went out in one write.
    assert!(
        proxy.metric("pgprism_mirror_writes_total") < proxy.metric("pgprism_mirror_units_total")
    );
}

#[test]
fn pooled_connections_move_between_the_databases_clients_use() {
    let ddl = "CREATE TABLE t (session int, n int, PRIMARY KEY (session, n))";
    let (p, m1) = (start_primary("dp"), start_server_with("dm", &[]));
    // A statement on database `database` of `inst`, its one value as text.
    let on = |inst: &Instance, database: &str, sql: &str| -> String {
        let mut c = postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname={database}",
                inst.port()
            ),
            postgres::NoTls,
        )
        .unwrap();
        let messages = c.simple_query(sql).unwrap();
        let row = messages.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        });
        row.unwrap_or_default()
    };
    for inst in [&p, &m1] {
        inst.psql("CREATE DATABASE other").unwrap();
        inst.psql(ddl).unwrap();
        on(inst, "other", ddl);
    }
    // No database in the URL: each session's own, so two pools share one connection per shard.
    let url = format!(
        "postgres://{SCRAM_USER}:{}@127.0.0.1:{}",
        PASSWORD.replace(' ', "%20"),
        m1.port()
    );
    let proxy = Proxy::start(&p.url(), &["--mirror", &url, "--mirror-pool-size", "2"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_pool_connections(&m1, stop.clone());
    let sessions: Vec<_> = (0..6)
        .map(|s| {
            let database = if s % 2 == 0 { "postgres" } else { "other" };
            let conninfo = format!(
                "host=127.0.0.1 port={} user=postgres dbname={database}",
                proxy.port()
            );
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                for n in 0..30 {
                    c.batch_execute(&format!("INSERT INTO t VALUES ({s}, {n})"))
                        .unwrap();
                    if n % 10 == 9 {
                        // Let the other database's sessions take the connection.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    for s in sessions {
        s.join().unwrap();
    }
    for database in ["postgres", "other"] {
        let count = |inst: &Instance| on(inst, database, "SELECT count(*) FROM t");
        assert_eq!(count(&p), "90");
        assert!(
            eventually(Duration::from_secs(20), || count(&m1) == "90"),
            "{database}: {}\n{}",
            count(&m1),
            proxy.admin_get("/metrics").1
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(
        (1..=2).contains(&most),
        "{most} pgprism connections at once"
    );
    for counter in SKIPPED {
        assert_eq!(proxy.metric(counter), 0, "{counter}");
    }
}

#[test]
fn a_killed_pool_connection_is_replaced_and_its_units_counted_lost() {
    let (p, m1) = primary_and_mirror(
        "kp",
        "km",
        "CREATE TABLE killed (session int, n int, PRIMARY KEY (session, n))",
    );
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-pool-size",
            "2",
            "--retry-delay",
            "20ms",
        ],
    );
    // The mirror holds every unit in flight behind a lock.
    let blocker = lock_table(&m1, "killed");
    let sessions: Vec<_> = (0..8)
        .map(|s| {
            let conninfo = proxy.conninfo("postgres", None);
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                for n in 0..20 {
                    c.batch_execute(&format!("INSERT INTO killed VALUES ({s}, {n})"))
                        .unwrap();
                }
            })
        })
        .collect();
    for s in sessions {
        s.join().unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql(&format!(
                "{POOL_CONNECTIONS_SQL} AND wait_event_type = 'Lock'"
            ))
            .unwrap()
            .trim()
            != "0"),
        "{}",
        proxy.admin_get("/metrics").1
    );
    m1.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'scramuser'")
        .unwrap();
    drop(blocker);
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_mirror_units_lost_total")
        > 0
        && proxy.metric("pgprism_mirror_reconnects_total") > 0));
    // The connections were replaced: later units reach the mirror.
    let mut c = proxy.client();
    for n in 0..10 {
        c.batch_execute(&format!("INSERT INTO killed VALUES (99, {n})"))
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql("SELECT count(*) FROM killed WHERE session = 99")
            .unwrap()
            .trim()
            == "10"),
        "{}",
        proxy.admin_get("/metrics").1
    );
    // Every unit the mirror lacks was counted lost (one insert each), none skipped.
    let primary: u64 = p
        .psql("SELECT count(*) FROM killed")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            let mirror: u64 = m1
                .psql("SELECT count(*) FROM killed")
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            mirror + proxy.metric("pgprism_mirror_units_lost_total") == primary
        }),
        "mirror {} of {primary}\n{}",
        m1.psql("SELECT count(*) FROM killed").unwrap(),
        proxy.admin_get("/metrics").1
    );
    assert!(m1.psql(POOL_CONNECTIONS_SQL).unwrap().trim() != "0");
    assert_eq!(proxy.metric("pgprism_mirror_skipped_down_total"), 0);
}

#[test]
fn a_pool_smaller_than_the_shards_is_refused_naming_its_key() {
    let out = support::pgprism_command()
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--no-pin",
            "--primary",
            "postgres://postgres@127.0.0.1:1/postgres",
            "--mirror",
            "postgres://postgres@127.0.0.1:1/postgres",
            "--mirror-pool-size",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mirror[0].pool-size"), "{stderr}");
}

#[test]
fn a_pooled_mirror_under_block_holds_clients_back_and_skips_a_transaction_too_large() {
    let (p, m1) = primary_and_mirror(
        "bp",
        "bm",
        "CREATE TABLE big (id int PRIMARY KEY); CREATE TABLE held (id int PRIMARY KEY)",
    );
    // 20 messages per session, 2 sync points in flight per connection.
    let proxy = Proxy::start(
        &p.url(),
        &[
            "--mirror",
            &mirror_url(&m1),
            "--mirror-pool-size",
            "2",
            "--mirror-overflow",
            "block",
            "--mirror-queue-messages",
            "20",
            "--mirror-in-flight-messages",
            "2",
        ],
    );
    // A transaction of 32 frames can never be handed over whole: skipped, the client not held.
    let mut s = support::raw::connect_ready(proxy.listen);
    raw_query(&mut s, "BEGIN");
    for id in 0..30 {
        raw_query(&mut s, &format!("INSERT INTO big VALUES ({id})"));
    }
    raw_query(&mut s, "COMMIT");
    raw_query(&mut s, "INSERT INTO big VALUES (100)");
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql("SELECT count(*) FROM big WHERE id = 100")
            .unwrap()
            .trim()
            == "1"),
        "{}",
        proxy.admin_get("/metrics").1
    );
    assert_eq!(m1.psql("SELECT count(*) FROM big").unwrap().trim(), "1");
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_transactions_cut_total")
        == 1));
    // A mirror that cannot keep up holds the client back (its units wait in the pool, up to
    // the session's bound), and gets everything once it can.
    let blocker = lock_table(&m1, "held");
    let conninfo = proxy.conninfo("postgres", None);
    let client = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        for id in 0..60 {
            c.batch_execute(&format!("INSERT INTO held VALUES ({id})"))
                .unwrap();
        }
    });
    let on_primary = || -> u64 {
        p.psql("SELECT count(*) FROM held")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(eventually(Duration::from_secs(20), || on_primary() >= 20));
    // Held: the bound does not let it through while the mirror is locked.
    std::thread::sleep(Duration::from_millis(300));
    assert!(on_primary() < 60, "the client was not held back");
    drop(blocker);
    client.join().unwrap();
    assert!(converged(&p, &[&m1], "held", "id"));
    assert_eq!(proxy.metric("pgprism_mirror_transactions_cut_total"), 1);
    assert_eq!(proxy.metric("pgprism_mirror_units_lost_total"), 0);
    assert_eq!(proxy.metric("pgprism_mirror_skipped_down_total"), 0);
}

/// A pooled proxy (2 connections) over a primary and a mirror with `ddl`.
fn pooled_pair(primary: &str, mirror: &str, ddl: &str) -> (Instance, Instance, Proxy) {
    let (p, m1) = primary_and_mirror(primary, mirror, ddl);
    let proxy = Proxy::start(
        &p.url(),
        &["--mirror", &mirror_url(&m1), "--mirror-pool-size", "2"],
    );
    (p, m1, proxy)
}

#[test]
fn pooled_mirror_keeps_a_unit_open_while_the_primary_stays_in_a_failed_block() {
    let (p, m1, proxy) = pooled_pair("fbp", "fbm", "CREATE TABLE t (id int, v text)");
    let mut c =
        postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls).unwrap();
    // The error skips the COMMIT: the primary stays in the failed block.
    let err = c
        .batch_execute(
            "BEGIN; INSERT INTO t VALUES (1, 'a'); INSERT INTO t VALUES (1/0, 'x'); COMMIT",
        )
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    std::thread::sleep(Duration::from_millis(200));
    let err = c
        .batch_execute("INSERT INTO t VALUES (2, 'after-error')")
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    std::thread::sleep(Duration::from_millis(200));
    c.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("INSERT INTO t VALUES (3, 'clean')")
        .unwrap();
    // A block that commits in one Query, the client leaving right after it.
    c.batch_execute("BEGIN; INSERT INTO t VALUES (4, 'a'); COMMIT")
        .unwrap();
    drop(c);
    assert!(
        converged(&p, &[&m1], "t", "id, v"),
        "primary {} mirror {}\n{}",
        checksum(&p, "t", "id, v"),
        checksum(&m1, "t", "id, v"),
        proxy.admin_get("/metrics").1
    );
    assert_eq!(
        p.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")
            .unwrap()
            .trim(),
        "3,4"
    );
}

#[test]
fn pooled_mirror_rolls_back_a_unit_left_in_a_block_before_other_sessions_units() {
    let (p, m1, proxy) = pooled_pair("gbp", "gbm", "CREATE TABLE t (id int, v text)");
    // Only the primary has `f`: on the mirror the block below fails before its COMMIT.
    p.psql("CREATE TABLE f (id int)").unwrap();
    let blocker = lock_table(&m1, "t");
    let mut a =
        postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls).unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (100, 'a'); INSERT INTO f VALUES (1); COMMIT")
        .unwrap();
    a.batch_execute("SELECT 1").unwrap();
    // Other sessions' units queue behind it on the same connections (one per shard).
    for s in 0..4 {
        let mut b =
            postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls).unwrap();
        for i in 0..2 {
            b.batch_execute(&format!("INSERT INTO t VALUES ({}, 'b')", 10 + s * 2 + i))
                .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(blocker);
    assert!(
        eventually(Duration::from_secs(20), || m1
            .psql("SELECT count(*) FROM t WHERE v = 'b'")
            .unwrap()
            .trim()
            == "8"),
        "mirror {}\n{}",
        checksum(&m1, "t", "id, v"),
        proxy.admin_get("/metrics").1
    );
    assert_eq!(
        m1.psql("SELECT count(*) FROM t WHERE id = 100")
            .unwrap()
            .trim(),
        "0"
    );
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_mirror_units_rolled_back_total")
        == 1));
}

#[test]
fn pooled_mirror_prepares_again_a_statement_whose_unit_failed_there() {
    let (p, m1, proxy) = pooled_pair("npp", "npm", "CREATE TABLE t (id int, v text)");
    // Only the primary has `f`: on the mirror the Query fails before its PREPARE.
    p.psql("CREATE TABLE f (id int)").unwrap();
    for inst in [&p, &m1] {
        inst.psql("CREATE TABLE g (id int)").unwrap();
    }
    // The unit waits on the mirror for `g`'s lock, so the next units go out behind it before
    // its failure is known: planned on the strength of a PREPARE not answered yet, they must
    // prepare `p` again all the same.
    let blocker = lock_table(&m1, "g");
    let mut c =
        postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls).unwrap();
    c.batch_execute(
        "INSERT INTO g VALUES (1); INSERT INTO f VALUES (1); \
         PREPARE p AS INSERT INTO t VALUES ($1, 'p')",
    )
    .unwrap();
    let sent = || proxy.metric("pgprism_mirror_statements_total");
    assert!(eventually(Duration::from_secs(10), || sent() >= 1));
    let before = sent();
    c.batch_execute("EXECUTE p(5)").unwrap();
    c.batch_execute("INSERT INTO t VALUES (6, 'plain')")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || sent() >= before + 2),
        "the next units did not go out behind the blocked one"
    );
    drop(blocker);
    assert!(
        converged(&p, &[&m1], "t", "id, v"),
        "primary {} mirror {}\n{}",
        checksum(&p, "t", "id, v"),
        checksum(&m1, "t", "id, v"),
        proxy.admin_get("/metrics").1
    );
}

#[test]
fn pooled_mirror_restores_startup_parameters_after_a_reset() {
    let (p, m1, proxy) = pooled_pair("rsp", "rsm", "CREATE TABLE t (id int, v text)");
    let conninfo = format!("{} application_name=appX", proxy.conninfo("postgres", None));
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    let steps = [
        "INSERT INTO t SELECT 1, current_setting('application_name')",
        "SET application_name = 'changed'",
        "INSERT INTO t SELECT 2, current_setting('application_name')",
        "RESET ALL",
        "INSERT INTO t SELECT 3, current_setting('application_name')",
        "SET application_name = 'again'",
        "RESET application_name",
        "INSERT INTO t SELECT 4, current_setting('application_name')",
        "SET application_name = 'more'",
        "DISCARD ALL",
        "INSERT INTO t SELECT 5, current_setting('application_name')",
    ];
    for sql in steps {
        c.batch_execute(sql).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        converged(&p, &[&m1], "t", "id, v"),
        "primary {}\nmirror {}",
        p.psql("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t")
            .unwrap(),
        m1.psql("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t")
            .unwrap()
    );
    assert_eq!(
        p.psql("SELECT count(*) FROM t WHERE v = 'appX'")
            .unwrap()
            .trim(),
        "4"
    );
}
