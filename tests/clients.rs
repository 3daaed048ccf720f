//! Real drivers through pgprism: the PostgreSQL JDBC driver and psycopg2 run application-like
//! workloads (tests/clients/) through the plain proxy, through compare mode against an
//! identical shadow, and through mirror mode, against real PostgreSQL servers. Each client
//! must get exactly the answers it gets directly.
//!
//! Needs java and the JDBC driver (`libpostgresql-jdbc-java`) and Debian's python3 with
//! `python3-psycopg2`; `.ci/run` installs them. The workloads' runners and expectations are
//! in `support/clients.rs` (the pooling scale test runs them too).

mod support;

use std::time::Duration;

use pgprism::embed::Instance;
use support::clients::{Login, assert_jdbc, assert_psycopg};
use support::{MD5_USER, PASSWORD, Proxy, SCRAM_USER, eventually, start_primary};

/// Runs the JDBC workload as the SCRAM user through `port`, creating `table`.
fn jdbc(port: u16, table: &str) -> String {
    support::clients::jdbc(&password_login(port, SCRAM_USER), table)
}

/// Runs the psycopg2 workload as the MD5 user through `port`, creating `table`.
fn psycopg(port: u16, table: &str) -> String {
    support::clients::psycopg(&password_login(port, MD5_USER), table)
}

/// `user` with [`PASSWORD`] on `postgres` through `port`.
fn password_login(port: u16, user: &str) -> Login<'_> {
    Login {
        port,
        database: "postgres",
        user,
        password: Some(PASSWORD),
        connect_timeout_s: 10,
    }
}

/// count:md5 of a table's rows, for comparing two servers.
fn checksum(inst: &Instance, table: &str) -> String {
    support::clients::checksum(inst, "postgres", table)
}

#[test]
fn jdbc_and_psycopg2_work_through_the_proxy() {
    let primary = start_primary("clients");
    let proxy = Proxy::start(&primary.url(), &[]);
    assert_jdbc(&jdbc(proxy.port(), "jdbc_t"));
    assert_psycopg(&psycopg(proxy.port(), "psy_t"));
    // And the same answers directly, so the expectations are the server's, not pgprism's.
    assert_jdbc(&jdbc(primary.port(), "jdbc_d"));
    assert_psycopg(&psycopg(primary.port(), "psy_d"));
    assert_eq!(proxy.metric("pgprism_protocol_errors_total"), 0);
}

#[test]
fn jdbc_and_psycopg2_through_compare_mode_agree_with_an_identical_shadow() {
    let primary = start_primary("clientsp");
    let shadow = start_primary("clientss");
    let dir = support::TempDir::new("clients-compare");
    let report = dir.join("report.jsonl");
    let proxy = Proxy::compare(
        &primary.url(),
        Some(&shadow.url()),
        &report.display().to_string(),
        &[],
    );
    assert_jdbc(&jdbc(proxy.port(), "jdbc_t"));
    assert_psycopg(&psycopg(proxy.port(), "psy_t"));
    // Every sync point of both workloads was judged (the listener's LISTEN included).
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("pgprism_compare_statements_total")
            >= 150),
        "compared: {}",
        proxy.metric("pgprism_compare_statements_total")
    );
    let reports = std::fs::read_to_string(&report).unwrap_or_default();
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "reports:\n{reports}"
    );
    for table in ["jdbc_t", "psy_t"] {
        assert_eq!(
            checksum(&primary, table),
            checksum(&shadow, table),
            "{table}"
        );
    }
}

#[test]
fn jdbc_and_psycopg2_replay_onto_a_mirror() {
    let primary = start_primary("clientsm");
    let mirror = start_primary("clientsn");
    let mirror_url = format!(
        "postgres://{SCRAM_USER}:{}@127.0.0.1:{}/postgres",
        PASSWORD.replace(' ', "%20"),
        mirror.port()
    );
    let proxy = Proxy::start(&primary.url(), &["--mirror", &mirror_url]);
    assert_jdbc(&jdbc(proxy.port(), "jdbc_t"));
    assert_psycopg(&psycopg(proxy.port(), "psy_t"));
    for table in ["jdbc_t", "psy_t"] {
        let want = checksum(&primary, table);
        assert!(
            eventually(Duration::from_secs(20), || checksum(&mirror, table) == want),
            "{table}: primary {want}, mirror {}",
            checksum(&mirror, table)
        );
    }
    // The mirror answers exactly what the primary answered: the two duplicate-key INSERTs
    // the workloads make on purpose fail there too, and nothing else does.
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("pgprism_mirror_errors_total")
            == 2),
        "{}",
        proxy.admin_get("/status").1
    );
    let metrics = proxy.admin_get("/metrics").1;
    support::clients::assert_mirror_errors_are_the_drivers_duplicates(&metrics);
}

// Transaction pooling (issue 14): the same workloads, several at once, through a few shared
// server connections. pgprism authenticates the drivers itself against an auth file that
// holds the secrets PostgreSQL stores (a SCRAM secret, an MD5 hash) and logs in to the
// server with what each exchange leaves it.

/// `pgprism proxy --pool-mode transaction --pool-size N --auth-file F` in front of `primary`,
/// F holding the password users' secrets as `pg_authid` has them. Returns the proxy and the
/// directory of F (removed by the caller).
fn pooled_proxy(primary: &Instance, pool_size: usize, extra: &[&str]) -> (Proxy, support::TempDir) {
    let mut lines = String::new();
    for user in [SCRAM_USER, MD5_USER] {
        let secret = primary
            .psql(&format!(
                "SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'"
            ))
            .unwrap();
        lines.push_str(&format!("\"{user}\" \"{}\"\n", secret.trim()));
    }
    let dir = support::TempDir::new("clients-pool");
    let userlist = dir.join("userlist.txt");
    std::fs::write(&userlist, lines).unwrap();
    let size = pool_size.to_string();
    let file = userlist.display().to_string();
    let mut args = vec![
        "--pool-mode",
        "transaction",
        "--pool-size",
        &size,
        "--auth-file",
        &file,
    ];
    args.extend_from_slice(extra);
    (Proxy::start(&primary.url(), &args), dir)
}

/// Samples, until `stop`, how many connections `user` has on `inst` (pgprism's: the tests'
/// own observers log in as `postgres`); returns the most seen at once.
fn most_connections(
    inst: &Instance,
    user: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<i64> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        inst.port()
    );
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        let mut most = 0;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&user],
                )
                .unwrap()
                .get(0);
            most = most.max(n);
            // Sampling interval of an observer: the maximum over the run is what counts.
            std::thread::sleep(Duration::from_millis(5));
        }
        most
    })
}

/// Runs `workload(i)` for `i` in `0..n` at once, each in its own thread; returns the outputs.
fn at_once(n: usize, workload: impl Fn(usize) -> String + Send + Sync + 'static) -> Vec<String> {
    let workload = std::sync::Arc::new(workload);
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let workload = workload.clone();
            std::thread::spawn(move || workload(i))
        })
        .collect();
    runs.into_iter()
        .map(|r| r.join().expect("a workload failed"))
        .collect()
}

/// What the pool did, for the test's output (`--nocapture`).
fn pool_figures(what: &str, proxy: &Proxy, most: i64) {
    let figure = |name: &str| proxy.metric(&format!("pgprism_pool_{name}_total"));
    eprintln!(
        "{what} in transaction mode: at most {most} server connections; lends {}, waited {} µs, \
         servers opened {} (closed {}, dirty {}, lost {}), statements prepared on demand {}, \
         settings applied {}, pins {}",
        figure("lends"),
        figure("wait_us"),
        figure("servers_opened"),
        figure("servers_closed"),
        figure("dirty_closed"),
        figure("servers_lost"),
        figure("reprepares"),
        figure("settings_applied"),
        figure("pins"),
    );
}

/// Four JDBC applications at once on two server connections: every statement of each (named
/// server-side statements past prepareThreshold, batches, rollbacks, a fetch-size cursor
/// inside a transaction, COPY both ways) goes out on whichever connection it is lent. Each
/// gets the answers it gets directly, and its table ends up as a direct run's does.
#[test]
fn jdbc_in_transaction_mode_four_applications_share_two_connections() {
    const APPS: usize = 4;
    const POOL: i64 = 2;
    let primary = start_primary("clientsj");
    let (proxy, _dir) = pooled_proxy(&primary, POOL as usize, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = most_connections(&primary, SCRAM_USER, stop.clone());
    let port = proxy.port();
    let outputs = at_once(APPS, move |i| jdbc(port, &format!("jdbc_{i}")));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let most = sampler.join().unwrap();
    for out in &outputs {
        assert_jdbc(out);
    }
    // The same workload directly: every pooled table holds exactly what it holds.
    assert_jdbc(&jdbc(primary.port(), "jdbc_d"));
    let direct = checksum(&primary, "jdbc_d");
    for i in 0..APPS {
        assert_eq!(checksum(&primary, &format!("jdbc_{i}")), direct, "jdbc_{i}");
    }
    assert!(
        (1..=POOL).contains(&most),
        "{most} server connections for {SCRAM_USER} at once (pool {POOL})"
    );
    // Nothing the JDBC workload does pins.
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_pool_lends_total")
        > 0));
    assert_eq!(proxy.metric("pgprism_pool_pins_total"), 0);
    pool_figures("JDBC", &proxy, most);
    assert_eq!(proxy.metric("pgprism_protocol_errors_total"), 0);
}

/// Four psycopg2 applications at once in transaction mode. Each opens a second connection
/// that LISTENs: that one is pinned to its server connection until it closes (LISTEN cannot
/// be shared), so the pool has one connection more than the applications, which guarantees
/// every application's main connection a server connection while all four listeners hold
/// theirs. A pool of `APPS` or fewer can deadlock: four pinned listeners, each waiting for
/// its own application's NOTIFY, which waits for a connection.
#[test]
fn psycopg2_in_transaction_mode_four_applications_share_the_pool() {
    const APPS: usize = 4;
    const POOL: i64 = APPS as i64 + 1;
    let primary = start_primary("clientsy");
    let (proxy, _dir) = pooled_proxy(&primary, POOL as usize, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = most_connections(&primary, MD5_USER, stop.clone());
    let port = proxy.port();
    let outputs = at_once(APPS, move |i| psycopg(port, &format!("psy_{i}")));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let most = sampler.join().unwrap();
    for out in &outputs {
        assert_psycopg(out);
    }
    assert_psycopg(&psycopg(primary.port(), "psy_d"));
    let direct = checksum(&primary, "psy_d");
    for i in 0..APPS {
        assert_eq!(checksum(&primary, &format!("psy_{i}")), direct, "psy_{i}");
    }
    assert!(
        (1..=POOL).contains(&most),
        "{most} server connections for {MD5_USER} at once (pool {POOL})"
    );
    // The listeners, and nothing else, were pinned.
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metric("pgprism_pool_pins_total")
            == APPS as u64),
        "pins: {}",
        proxy.metric("pgprism_pool_pins_total")
    );
    pool_figures("psycopg2", &proxy, most);
    assert_eq!(proxy.metric("pgprism_protocol_errors_total"), 0);
}
