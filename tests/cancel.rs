//! A client's CancelRequest reaches every side a session runs on (the primary, the shadow of
//! compare mode, each mirror), and values each side takes from its own clock agree within
//! `compare.timestamp-tolerance-ms`. Real PostgreSQL servers on every side.

mod support;

use std::time::Duration;

use pgprism::embed::Instance;
use support::{Proxy, eventually, start_primary};

/// Compare mode's report file for one test, removed on drop.
struct Report(std::path::PathBuf);

impl Report {
    fn new(name: &str) -> Report {
        let path = std::env::temp_dir().join(format!(
            "pgprism-cancel-{}-{name}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Report(path)
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }

    fn lines(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts compare mode between `primary` and `shadow`.
fn compare_proxy(primary: &Instance, shadow: &Instance, report: &Report, extra: &[&str]) -> Proxy {
    Proxy::compare(&primary.url(), Some(&shadow.url()), &report.path(), extra)
}

/// Waits until every session the proxy served is counted closed (each one's statements are
/// all judged by then).
fn closed(proxy: &Proxy, sessions: u64) {
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_sessions_closed_total")
        >= sessions));
}

#[test]
fn timestamps_from_each_sides_clock_agree_within_the_tolerance() {
    let primary = start_primary("tsp");
    let shadow = start_primary("tss");
    let seed = "CREATE TABLE stamped (id int PRIMARY KEY, at timestamptz DEFAULT now(), \
                local timestamp DEFAULT localtimestamp, t time DEFAULT localtime)";
    primary.psql(seed).unwrap();
    shadow.psql(seed).unwrap();
    let read = "SELECT id, at, local, t FROM stamped ORDER BY id";

    // Exact: each side stored its own now(), a value apart by the time between them.
    let report = Report::new("ts-exact");
    let proxy = compare_proxy(&primary, &shadow, &report, &[]);
    let mut c = proxy.client();
    c.simple_query("INSERT INTO stamped (id) VALUES (1)")
        .unwrap();
    c.simple_query(read).unwrap();
    drop(c);
    closed(&proxy, 1);
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        1,
        "{}",
        report.lines()
    );
    assert!(report.lines().contains("values"), "{}", report.lines());
    drop(proxy);

    // Within a minute: equal, in text (simple query) and binary (extended) formats alike.
    // (A grid step, as floats: values a few ms apart straddle a step's midpoint once in
    // about ten thousand.)
    let report = Report::new("ts-tolerant");
    let proxy = compare_proxy(
        &primary,
        &shadow,
        &report,
        &["--timestamp-tolerance-ms", "60000"],
    );
    let mut c = proxy.client();
    c.simple_query("INSERT INTO stamped (id) VALUES (2)")
        .unwrap();
    c.simple_query(read).unwrap();
    assert_eq!(c.query(read, &[]).unwrap().len(), 2);
    drop(c);
    closed(&proxy, 1);
    assert!(proxy.metric("pgprism_compare_statements_total") >= 3);
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "{}",
        report.lines()
    );
}

/// Statements `sql` the server runs now (active), as `pg_stat_activity` shows them.
fn active(server: &Instance, sql: &str) -> i64 {
    active_at(&server.url(), sql)
}

/// [`active`] on the server at `url` (-1 when it cannot be asked).
fn active_at(url: &str, sql: &str) -> i64 {
    let Ok(mut watch) = postgres::Client::connect(url, postgres::NoTls) else {
        return -1;
    };
    watch
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
            &[&sql],
        )
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
}

/// The client cancels `sql` once it runs on every server of `wait_on`: its answer is 57014.
fn cancel_while_running(
    proxy: &Proxy,
    sql: &'static str,
    wait_on: Vec<String>,
) -> postgres::Client {
    let mut client = proxy.client();
    let token = client.cancel_token();
    let canceller = std::thread::spawn(move || {
        for url in wait_on {
            let running = eventually(Duration::from_secs(10), || active_at(&url, sql) > 0);
            assert!(running, "{sql} never ran on {url}");
        }
        token.cancel_query(postgres::NoTls).expect("cancel");
    });
    let err = client.simple_query(sql).expect_err("cancelled");
    canceller.join().expect("canceller");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    client
}

/// The session goes on, on every side. Sent only once the side's statement is gone: a
/// statement written behind the cancelled one before the cancel's turn on that side came
/// makes pgprism leave the side alone (the cancel could hit it; `cancels_skipped`), which
/// happens when the notice of the cancel reaches the session's shard after the primary's
/// 57014 (the cancel went to the primary from another shard).
fn goes_on(mut client: postgres::Client) {
    assert_eq!(client.simple_query("SELECT 1").unwrap().len(), 3);
}

const SLEEP: &str = "SELECT pg_sleep(30)";

#[test]
fn a_cancel_reaches_the_shadow_whether_it_runs_the_statement_already_or_later() {
    let primary = start_primary("cxp");
    let shadow = start_primary("cxs");
    let pooled_shadow = [support::TRANSACTION_POOLING, &["--shadow-pool-size", "2"]].concat();
    let own_shadow = [
        support::TRANSACTION_POOLING,
        &["--compare-order-wait-ms", "0"],
    ]
    .concat();
    // Ordered dispatch (the default): the shadow gets the statement once the primary answered
    // it, cancelled; it is cancelled there as it starts. Unordered: the shadow runs it at the
    // same time, and is cancelled once the primary's answer says the cancel took.
    for (name, extra, wait_on) in [
        ("ordered", &[][..], vec![primary.url()]),
        (
            "unordered",
            &["--compare-order-wait-ms", "0"][..],
            vec![primary.url(), shadow.url()],
        ),
        // A pooled shadow: the cancel uses the key of the connection lent to the session.
        (
            "pooled",
            &["--shadow-pool-size", "2"][..],
            vec![primary.url()],
        ),
        (
            "pooled-unordered",
            &["--shadow-pool-size", "2", "--compare-order-wait-ms", "0"][..],
            vec![primary.url(), shadow.url()],
        ),
        // The client side pooled too: the client holds pgprism's key, the primary's cancel
        // goes to the connection lent to it, the shadow's through the shard registry.
        (
            "transaction-pooled",
            &pooled_shadow[..],
            vec![primary.url()],
        ),
        (
            "transaction-pooled-own-shadow",
            &own_shadow[..],
            vec![primary.url(), shadow.url()],
        ),
    ] {
        let report = Report::new(name);
        let proxy = compare_proxy(&primary, &shadow, &report, extra);
        let client = cancel_while_running(&proxy, SLEEP, wait_on);
        // Gone from the shadow long before its 30 s.
        assert!(
            eventually(Duration::from_secs(10), || active(&shadow, SLEEP) == 0),
            "{name}: still running on the shadow (cancels forwarded {}, skipped {}); log:\n{}",
            proxy.metric("pgprism_shadow_cancels_forwarded_total"),
            proxy.metric("pgprism_shadow_cancels_skipped_total"),
            proxy.log()
        );
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .metric("pgprism_shadow_cancels_forwarded_total")
                >= 1),
            "{name}: no cancel went to the shadow"
        );
        goes_on(client);
        // Closing waits for the shadow's every answer (both 57014: equal, nothing to report).
        closed(&proxy, 1);
        assert_eq!(active(&primary, SLEEP), 0);
        assert_eq!(
            proxy.metric("pgprism_compare_mismatches_total"),
            0,
            "{name}: {}",
            report.lines()
        );
        assert!(
            !report.lines().contains("pg_sleep"),
            "{name}: {}",
            report.lines()
        );
    }
}

/// Rows of `table` on `server` (-1 when it cannot be read).
fn rows(server: &Instance, table: &str) -> i64 {
    let Ok(mut c) = postgres::Client::connect(&server.url(), postgres::NoTls) else {
        return -1;
    };
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
}

#[test]
fn a_cancel_never_lands_on_the_statement_queued_behind_it_on_the_shadow() {
    let primary = start_primary("cqp");
    let shadow = start_primary("cqs");
    let seed = "CREATE TABLE held (id int); CREATE TABLE hit (id int); CREATE TABLE after (id int)";
    primary.psql(seed).unwrap();
    shadow.psql(seed).unwrap();
    let report = Report::new("queued");
    let proxy = compare_proxy(&primary, &shadow, &report, &[]);
    // The shadow lags: a lock there holds the session's first statement, and what follows
    // is written behind it.
    let mut shadow_lock = postgres::Client::connect(&shadow.url(), postgres::NoTls).unwrap();
    shadow_lock
        .batch_execute("BEGIN; LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    // On the primary a lock holds the second statement, which the client cancels there.
    let mut primary_lock = postgres::Client::connect(&primary.url(), postgres::NoTls).unwrap();
    primary_lock
        .batch_execute("BEGIN; LOCK TABLE hit IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let mut c = proxy.client();
    c.simple_query("INSERT INTO held VALUES (0)").unwrap();
    let cancelled = "INSERT INTO hit VALUES (1)";
    let token = c.cancel_token();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            assert!(
                eventually(Duration::from_secs(10), || active(&primary, cancelled) == 1),
                "never waited on the primary"
            );
            token.cancel_query(postgres::NoTls).expect("cancel");
        });
        let err = c.simple_query(cancelled).expect_err("cancelled");
        assert_eq!(support::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    });
    primary_lock.batch_execute("ROLLBACK").unwrap();
    // The next statement, long enough on the shadow that a cancel meant for the one before
    // would catch it there.
    c.simple_query("INSERT INTO after SELECT 2 FROM pg_sleep(1)")
        .unwrap();
    assert_eq!(
        active(&shadow, "INSERT INTO held VALUES (0)"),
        1,
        "the shadow lags behind its lock"
    );
    shadow_lock.batch_execute("ROLLBACK").unwrap();
    // Everything queued runs on the shadow: the cancelled statement, left running there (a
    // later one was written behind it), and the later one, never hit.
    assert!(
        eventually(Duration::from_secs(10), || rows(&shadow, "after") == 1),
        "the statement behind the cancelled one did not complete on the shadow"
    );
    assert_eq!(rows(&shadow, "hit"), 1);
    assert_eq!(rows(&shadow, "held"), 1);
    assert_eq!(rows(&primary, "hit"), 0);
    drop(c);
    closed(&proxy, 1);
    assert!(eventually(Duration::from_secs(10), || proxy
        .metric("pgprism_shadow_cancels_skipped_total")
        >= 1));
    assert_eq!(proxy.metric("pgprism_shadow_cancels_forwarded_total"), 0);
}

fn mirror_url(m: &Instance) -> String {
    format!("postgres://postgres@127.0.0.1:{}/postgres", m.port())
}

#[test]
fn a_cancel_reaches_each_mirror_on_its_own_and_on_pooled_connections() {
    let primary = start_primary("cmp");
    let mirror = start_primary("cmm");
    let url = mirror_url(&mirror);
    // Session mode with the session's own mirror connection, with pooled mirror
    // connections, and a transaction-pooled client (its key is pgprism's own).
    for (name, pooled, clients_pooled) in [
        ("session", false, false),
        ("pooled", true, false),
        ("transaction pooling", false, true),
    ] {
        let mut args = vec!["--mirror", &url, "--mirror-all-queries"];
        if pooled {
            args.extend_from_slice(&["--mirror-pool-size", "2"]);
        }
        if clients_pooled {
            args.extend_from_slice(&["--pool-mode", "transaction", "--auth-type", "trust"]);
        }
        let proxy = Proxy::start(&primary.url(), &args);
        // A session's own mirror connection runs the statement as the primary does; a pooled
        // one may get it once the primary answered (its unit whole), and is cancelled as it
        // starts it.
        let wait_on = if pooled {
            vec![primary.url()]
        } else {
            vec![primary.url(), mirror.url()]
        };
        let client = cancel_while_running(&proxy, SLEEP, wait_on);
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .metric("pgprism_mirror_cancels_forwarded_total")
                >= 1),
            "{name}: no cancel went to the mirror"
        );
        assert!(
            eventually(Duration::from_secs(10), || active(&mirror, SLEEP) == 0),
            "{name}: still running on the mirror"
        );
        goes_on(client);
        // The mirror ran the statement and was cancelled there, then ran the next one.
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .metric("pgprism_mirror_errors_total")
                >= 1),
            "{name}"
        );
        assert_eq!(active(&primary, SLEEP), 0);
    }
}

#[test]
fn a_wrong_secret_cancels_nothing_anywhere() {
    use std::io::Write;
    let primary = start_primary("cwp");
    let shadow = start_primary("cws");
    let mirror = start_primary("cwm");
    let report = Report::new("wrong");
    let url = mirror_url(&mirror);
    let proxy = compare_proxy(
        &primary,
        &shadow,
        &report,
        &[
            "--mirror",
            &url,
            "--mirror-all-queries",
            "--compare-order-wait-ms",
            "0",
        ],
    );
    let mut s = std::net::TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&support::raw::startup("postgres", "postgres"))
        .unwrap();
    let hello = support::raw::read_until_ready(&mut s);
    let key = hello
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .map(|(_, body)| body.clone())
        .expect("BackendKeyData");
    let sql = "SELECT pg_sleep(2)";
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    s.write_all(&support::raw::message(b'Q', &body)).unwrap();
    for server in [&primary, &shadow, &mirror] {
        assert!(eventually(Duration::from_secs(10), || active(server, sql) == 1));
    }
    // The right pid with a wrong secret.
    let mut wrong = key.clone();
    wrong[7] ^= 0x55;
    let mut packet = 16u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80877102u32.to_be_bytes());
    packet.extend_from_slice(&wrong);
    let mut c = std::net::TcpStream::connect(proxy.listen).unwrap();
    c.write_all(&packet).unwrap();
    let _ = support::raw::read_to_end(&mut c);
    // The statement completes everywhere: no 57014 on the primary...
    let answer = support::raw::read_until_ready(&mut s);
    assert!(answer.iter().all(|(tag, _)| *tag != b'E'), "{answer:?}");
    // ...nor on the shadow (compared equal) or the mirror (its answers read in order: a
    // later statement's row counted means the sleep's answer was counted before it).
    let answer = support::raw::query(&mut s, "SELECT 1");
    assert!(answer.iter().all(|(tag, _)| *tag != b'E'), "{answer:?}");
    assert!(eventually(Duration::from_secs(10), || proxy
        .metric("pgprism_mirror_rows_total")
        >= 2));
    assert_eq!(proxy.metric("pgprism_mirror_errors_total"), 0);
    assert_eq!(proxy.metric("pgprism_mirror_cancels_forwarded_total"), 0);
    s.write_all(&support::raw::message(b'X', &[])).unwrap();
    closed(&proxy, 1);
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 0);
    assert_eq!(proxy.metric("pgprism_shadow_cancels_forwarded_total"), 0);
    // (The primary got the request verbatim, as PostgreSQL's clients send it, and checked the
    // secret itself: its statement completed above.)
    assert!(!report.lines().contains("pg_sleep"), "{}", report.lines());
}
