//! The pooled compare shadow (issue 14, point 4): `--shadow-pool-size N` lends a few shadow
//! connections to every client session per transaction. Against two real PostgreSQL servers:
//! hundreds of clients on a shadow that accepts 30 connections are all compared with no
//! mismatch while the shadow never sees more than the pool; prepared statements (pgbench
//! `-M prepared`, clients whose statements share names with other texts) and session settings
//! (`SET search_path`) follow each session from connection to connection; a real divergence
//! is still a mismatch; a client that leaves inside a transaction leaves no dirty shadow
//! connection behind.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgprism::embed::Instance;
use sonic_rs::JsonValueTrait;
use support::{Pair, Proxy, eventually};

/// The database the clients use; the tests' own observers connect to `postgres`, so they are
/// never counted among pgprism's connections.
const DB: &str = "app";
const POOL: i64 = 10;
/// The primary's pool when the client side pools too (`--pool-mode transaction`).
const PRIMARY_POOL: i64 = 8;
/// The client side in transaction pooling mode, on [`PRIMARY_POOL`] primary connections.
const TRANSACTION_POOLING: &[&str] = &[
    "--pool-mode",
    "transaction",
    "--pool-size",
    "8",
    "--auth-type",
    "trust",
];

/// A server whose `max_connections` is `max_connections`, with [`DB`] created.
fn start_server(name: &str, max_connections: usize) -> Instance {
    support::start_capped(name, DB, max_connections)
}

fn pair(name: &str) -> Pair {
    Pair::new(
        start_server(&format!("cp{name}p"), 300),
        start_server(&format!("cp{name}s"), 30),
    )
    .seeding(DB)
    .with_args(&["--shadow-pool-size", &POOL.to_string()])
}

/// [`pair`] for a test run in session mode (`client_side` empty) or with the client side
/// pooled (its servers' names start with `tx`).
fn pair_for(name: &str, client_side: &[&str]) -> Pair {
    let pooled = if client_side.is_empty() { "" } else { "tx" };
    pair(&format!("{pooled}{name}"))
}

/// The client backends of [`DB`] on `inst` (pgprism's shadow connections; the tests' own
/// observers connect to `postgres`).
fn backends_sql() -> String {
    format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{DB}' \
         AND backend_type = 'client backend'"
    )
}

fn observer(inst: &Instance) -> postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        inst.port()
    );
    postgres::Client::connect(&conninfo, postgres::NoTls).expect("observer connects")
}

/// Samples, until `stop`, pgprism's connections to `inst`; returns the most seen at once and
/// the number of samples.
fn sample_backends(
    inst: &Instance,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(i64, usize)> {
    let mut c = observer(inst);
    std::thread::spawn(move || {
        let count = c.prepare(&backends_sql()).unwrap();
        let (mut most, mut samples) = (0, 0);
        while !stop.load(Ordering::Acquire) {
            let seen: i64 = c.query_one(&count, &[]).unwrap().get(0);
            most = most.max(seen);
            samples += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (most, samples)
    })
}

/// Statements judged so far: compared ones (those with differences included) and skipped.
fn judged(proxy: &Proxy) -> u64 {
    proxy.metric("pgprism_compare_statements_total") + proxy.metric("pgprism_compare_skipped_total")
}

/// Statements skipped, by reason (`pgprism_compare_skipped_*_total`).
fn skip_reasons(proxy: &Proxy) -> String {
    ["excluded", "routed", "withheld", "diverged", "shadow_gone"]
        .iter()
        .map(|r| {
            let n = proxy.metric(&format!("pgprism_compare_skipped_{r}_total"));
            format!("{r} {n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn wait_judged(proxy: &Proxy, statements: u64) {
    let caught_up = eventually(Duration::from_secs(120), || judged(proxy) >= statements);
    assert!(
        caught_up,
        "the shadow did not catch up: {} of {statements} judged\n{}",
        judged(proxy),
        proxy.log()
    );
}

fn pgbench(proxy: &Proxy, args: &[&str]) -> String {
    let port = proxy.port().to_string();
    let out = Command::new("pgbench")
        .args(["-n", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(args)
        .arg(DB)
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// count:md5 of the rows of `t`, order-independent.
fn checksum(inst: &Instance) -> String {
    inst.psql_db(
        DB,
        "SELECT count(*) || ':' || coalesce(md5(string_agg(r, '|' ORDER BY r)), '') \
         FROM (SELECT (client, id, v)::text AS r FROM t) x",
    )
    .expect("checksum")
}

const TABLE: &str = "CREATE TABLE t (client int, id int, v int, PRIMARY KEY (client, id));";

/// Each transaction: a write of the client's own row, a read of it, and a read of a shared
/// table, inside BEGIN..END; then an autocommit read.
const SCRIPT: &str = "\\set id random(1, 1000000000)
BEGIN;
INSERT INTO t VALUES (:client_id, :id, 1) ON CONFLICT (client, id) DO UPDATE SET v = t.v + 1;
SELECT v FROM t WHERE client = :client_id AND id = :id;
SELECT count(*) FROM shared;
END;
SELECT count(*) FROM t WHERE client = :client_id;
";
/// Statements per transaction of [`SCRIPT`].
const SCRIPT_STATEMENTS: u64 = 6;

fn many_clients_on_a_small_pool(name: &str, mode: &str, client_side: &[&str]) {
    let p = pair(name);
    p.both(TABLE);
    p.both("CREATE TABLE shared AS SELECT g FROM generate_series(1, 10) g;");
    let script = p.dir.join("script.sql");
    std::fs::write(&script, SCRIPT).expect("write the script");
    // Room for a loaded test machine: a session gives up on the shadow only past this.
    let mut args = vec!["--compare-shadow-timeout-ms", "120000"];
    args.extend_from_slice(client_side);
    let proxy = p.proxy(&args);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_backends(&p.shadow, stop.clone());
    let primary_sampler = sample_backends(&p.primary, stop.clone());
    let (clients, per_client) = (200u64, 4u64);
    // Pooled clients get a pgbench thread each: pgbench prepares a statement synchronously
    // (PQprepare) the first time a client runs it, and one prepared between transactions
    // needs a primary connection until the pool has seen it, so a thread serving several
    // clients whose others hold every connection inside their transactions waits on itself
    // (as through PgBouncer; pgprism without compare as well).
    let threads = if client_side.is_empty() {
        "4".to_string()
    } else {
        clients.to_string()
    };
    pgbench(
        &proxy,
        &[
            "-M",
            mode,
            "-c",
            &clients.to_string(),
            "-j",
            &threads,
            "-t",
            &per_client.to_string(),
            "-f",
            &script.display().to_string(),
        ],
    );
    let statements = clients * per_client * SCRIPT_STATEMENTS;
    wait_judged(&proxy, statements);
    stop.store(true, Ordering::Release);
    let (most, samples) = sampler.join().expect("sampler");
    let (primary_most, _) = primary_sampler.join().expect("sampler");
    let compared = proxy.metric("pgprism_compare_statements_total");
    let mismatches = proxy.metric("pgprism_compare_mismatches_total");
    eprintln!(
        "{clients} clients -M {mode} {client_side:?}, shadow pool {POOL}: {compared} of \
         {statements} compared, {mismatches} mismatches, {} inconclusive, {} skipped ({}), at \
         most {most} shadow and {primary_most} primary backends in {samples} samples, {} lends, \
         {} order waits expired, {} lock breaks",
        proxy.metric("pgprism_compare_inconclusive_concurrent_total"),
        proxy.metric("pgprism_compare_skipped_total"),
        skip_reasons(&proxy),
        proxy.metric("pgprism_shadow_pool_lends_total"),
        proxy.metric("pgprism_compare_order_waits_expired_total"),
        proxy.metric("pgprism_compare_order_lock_breaks_total"),
    );
    assert_eq!(mismatches, 0, "{:?}", p.reports().first());
    let log = proxy.log();
    let tail: Vec<&str> = log.lines().rev().take(10).collect();
    assert_eq!(
        compared,
        statements,
        "every statement compared (skipped: {}; rollbacks {}, begins {}, shadow timeouts {}, lost {}, wait timeouts {}); log: {tail:#?}; reports: {:?}",
        skip_reasons(&proxy),
        proxy.metric("pgprism_compare_rollbacks_total"),
        proxy.metric("pgprism_compare_begins_total"),
        proxy.metric("pgprism_compare_shadow_timeouts_total"),
        proxy.metric("pgprism_compare_shadow_lost_total"),
        proxy.metric("pgprism_shadow_pool_wait_timeouts_total"),
        p.reports()
            .iter()
            .filter(|r| !r["shadow"]["sqlstate"].is_null() || !r["primary"]["sqlstate"].is_null())
            .take(3)
            .map(|r| format!(
                "{} | p {} {} | s {} {}",
                r["statement"].as_str().unwrap_or(""),
                r["primary"]["sqlstate"].as_str().unwrap_or(""),
                r["primary"]["message"].as_str().unwrap_or(""),
                r["shadow"]["sqlstate"].as_str().unwrap_or(""),
                r["shadow"]["message"].as_str().unwrap_or("")
            ))
            .collect::<Vec<_>>(),
    );
    assert_eq!(proxy.metric("pgprism_compare_shadow_timeouts_total"), 0);
    assert_eq!(proxy.metric("pgprism_compare_shadow_lost_total"), 0);
    assert!(samples > 0);
    assert!(
        most <= POOL,
        "the shadow saw {most} of pgprism's connections (pool {POOL})"
    );
    if !client_side.is_empty() {
        assert!(
            primary_most <= PRIMARY_POOL,
            "the primary saw {primary_most} of pgprism's connections (pool {PRIMARY_POOL})"
        );
        assert!(proxy.metric("pgprism_pool_lends_total") >= clients);
    }
    assert!(
        proxy.metric("pgprism_shadow_pool_lends_total") >= clients,
        "the sessions borrowed their shadow connections"
    );
    assert_eq!(
        checksum(&p.primary),
        checksum(&p.shadow),
        "both ran every write"
    );
}

#[test]
fn two_hundred_clients_compare_on_ten_shadow_connections() {
    many_clients_on_a_small_pool("simple", "simple", &[]);
}

#[test]
fn pgbench_prepared_statements_survive_the_pooled_shadow() {
    many_clients_on_a_small_pool("prep", "prepared", &[]);
}

/// The client side pooled too (`--pool-mode transaction`): 200 clients on 8 primary and 10
/// shadow connections, every statement compared as in session mode.
#[test]
fn transaction_pooled_clients_compare_on_small_pools_on_both_sides() {
    many_clients_on_a_small_pool("txsimple", "simple", TRANSACTION_POOLING);
}

#[test]
fn transaction_pooled_prepared_statements_compare_on_small_pools() {
    many_clients_on_a_small_pool("txprep", "prepared", TRANSACTION_POOLING);
}

/// Sessions with their own `search_path` (and statements whose names other sessions use for
/// other texts) interleave on the pool: each must find its own schema and statements on
/// whichever connection it gets.
#[test]
fn settings_and_prepared_statements_follow_each_session() {
    settings_and_prepared_statements_follow(&[]);
}

/// The same with the client side pooled: each client's settings and statements follow it on
/// the primary's connections too.
#[test]
fn settings_and_prepared_statements_follow_transaction_pooled_clients() {
    settings_and_prepared_statements_follow(TRANSACTION_POOLING);
}

fn settings_and_prepared_statements_follow(client_side: &[&str]) {
    let p = pair_for("set", client_side);
    p.both(
        "CREATE SCHEMA s0; CREATE SCHEMA s1;
         CREATE TABLE s0.k (v int); INSERT INTO s0.k VALUES (0);
         CREATE TABLE s1.k (v int); INSERT INTO s1.k VALUES (1), (1);",
    );
    let proxy = p.proxy(client_side);
    let sessions = 24usize;
    let rounds = 15usize;
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let conninfo = format!(
                "host=127.0.0.1 port={} user=postgres dbname={DB}",
                proxy.port()
            );
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                let schema = i % 2;
                c.batch_execute(&format!("SET search_path = s{schema}, public"))
                    .unwrap();
                // The crate names statements s0, s1, ... per connection: the same names
                // carry other texts in other sessions.
                let mine = c
                    .prepare(&format!("SELECT sum(v)::int + {i} FROM k"))
                    .unwrap();
                let count = c.prepare("SELECT count(*)::int FROM k").unwrap();
                for _ in 0..rounds {
                    let sum: i32 = c.query_one(&mine, &[]).unwrap().get(0);
                    assert_eq!(sum as usize, schema * 2 + i);
                    let mut tx = c.transaction().unwrap();
                    let n: i32 = tx.query_one(&count, &[]).unwrap().get(0);
                    assert_eq!(n as usize, schema + 1);
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    // Per round: two prepared executions, BEGIN and COMMIT; per session the SET.
    let statements = (sessions * (1 + rounds * 4)) as u64;
    wait_judged(&proxy, statements);
    let mismatches = proxy.metric("pgprism_compare_mismatches_total");
    assert_eq!(mismatches, 0, "{:?}", p.reports().first());
    assert!(proxy.metric("pgprism_compare_statements_total") >= statements);
    assert!(
        proxy.metric("pgprism_shadow_pool_settings_applied_total") > 0,
        "some lend brought a connection to a session's settings"
    );
    assert!(
        proxy.metric("pgprism_shadow_pool_reprepares_total") > 0,
        "some lend prepared a session's statements again"
    );
}

/// [`SCRIPT`], then a read of a column the shadow has with another type, and client 7's own
/// write and read of a table whose writes the shadow alters (no other session touches it, so
/// its reads are never concurrent with another's writes).
const DIVERGENT_SCRIPT: &str = "\\set id random(1, 1000000000)
BEGIN;
INSERT INTO t VALUES (:client_id, :id, 1) ON CONFLICT (client, id) DO UPDATE SET v = t.v + 1;
SELECT v FROM t WHERE client = :client_id AND id = :id;
SELECT count(*) FROM shared;
END;
SELECT count(*) FROM t WHERE client = :client_id;
SELECT n FROM typed WHERE id = 1;
\\if :client_id = 7
INSERT INTO skewed VALUES (:id, 1);
SELECT v FROM skewed WHERE id = :id;
\\endif
";

#[test]
fn a_divergence_on_the_shadow_is_still_a_mismatch() {
    divergence_is_a_mismatch(&[]);
}

#[test]
fn a_divergence_under_transaction_pooling_is_still_a_mismatch() {
    divergence_is_a_mismatch(TRANSACTION_POOLING);
}

fn divergence_is_a_mismatch(client_side: &[&str]) {
    let p = pair_for("div", client_side);
    p.both(TABLE);
    p.both("CREATE TABLE shared AS SELECT g FROM generate_series(1, 10) g;");
    p.both("CREATE TABLE skewed (id int PRIMARY KEY, v int);");
    p.primary
        .psql_db(
            DB,
            "CREATE TABLE typed (id int PRIMARY KEY, n int); INSERT INTO typed VALUES (1, 7)",
        )
        .expect("typed");
    p.shadow
        .psql_db(
            DB,
            "CREATE TABLE typed (id int PRIMARY KEY, n bigint); INSERT INTO typed VALUES (1, 7)",
        )
        .expect("typed");
    p.shadow
        .psql_db(
            DB,
            "CREATE FUNCTION skew() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.v := NEW.v + 1000; RETURN NEW; END $$;
             CREATE TRIGGER skew BEFORE INSERT ON skewed FOR EACH ROW EXECUTE FUNCTION skew();",
        )
        .expect("the shadow's trigger");
    let proxy = p.proxy(client_side);
    let script = p.dir.join("divergent.sql");
    std::fs::write(&script, DIVERGENT_SCRIPT).expect("write the script");
    let (clients, per_client) = (40u64, 3u64);
    pgbench(
        &proxy,
        &[
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &per_client.to_string(),
            "-f",
            &script.display().to_string(),
        ],
    );
    let statements = clients * per_client * (SCRIPT_STATEMENTS + 1) + per_client * 2;
    wait_judged(&proxy, statements);
    let mismatches = |prefix: &str, kind: &str| {
        p.reports()
            .iter()
            .filter(|r| support::is_mismatch(r, prefix, kind))
            .count() as u64
    };
    assert!(
        eventually(Duration::from_secs(20), || {
            mismatches("SELECT v FROM skewed", "values") == per_client
                && mismatches("SELECT n FROM typed", "column_types") == clients * per_client
        }),
        "every altered write and every read of the other type is a mismatch: {} and {}",
        mismatches("SELECT v FROM skewed", "values"),
        mismatches("SELECT n FROM typed", "column_types"),
    );
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        per_client + clients * per_client,
        "nothing else differs"
    );
}

/// A client that leaves inside a transaction block (and one with a statement still running
/// on the shadow) leaves the pool no connection in a transaction, and no row of it.
#[test]
fn a_client_leaving_mid_transaction_leaves_no_dirty_shadow_connection() {
    client_leaving_mid_transaction(&[]);
}

/// The same with the client side pooled: neither the primary's connection nor the shadow's
/// is left in the client's transaction.
#[test]
fn a_transaction_pooled_client_leaving_mid_transaction_leaves_neither_side_dirty() {
    client_leaving_mid_transaction(TRANSACTION_POOLING);
}

fn client_leaving_mid_transaction(client_side: &[&str]) {
    let p = pair_for("left", client_side);
    p.both("CREATE TABLE t (v int);");
    let mut args = vec!["--compare-shadow-timeout-ms", "20000"];
    args.extend_from_slice(client_side);
    let proxy = p.proxy(&args);
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB}",
        proxy.port()
    );
    for _ in 0..3 {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        c.batch_execute("BEGIN; INSERT INTO t VALUES (1);").unwrap();
        c.batch_execute("INSERT INTO t VALUES (2)").unwrap();
        drop(c);
    }
    // Leaves while the shadow still runs its statement.
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (3);").unwrap();
    drop(c);
    let in_block = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{DB}' \
         AND state LIKE 'idle in transaction%'"
    );
    for (side, inst) in [("shadow", &p.shadow), ("primary", &p.primary)] {
        let mut watch = observer(inst);
        let clean = eventually(Duration::from_secs(20), || {
            let n: i64 = watch.query_one(&in_block, &[]).unwrap().get(0);
            n == 0
        });
        assert!(clean, "a {side} connection stayed in a transaction block");
    }
    // The next sessions get clean connections: no row of the ones that left, and their own
    // transactions compare equal.
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    for _ in 0..5 {
        let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
        assert_eq!(n, 0);
        let mut tx = c.transaction().unwrap();
        tx.execute("INSERT INTO t VALUES (9)", &[]).unwrap();
        tx.rollback().unwrap();
    }
    drop(c);
    assert!(eventually(Duration::from_secs(20), || {
        proxy.metric("pgprism_compare_statements_total") >= 5 * 4
    }));
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "{:?}",
        p.reports()
    );
    for (side, inst) in [("shadow", &p.shadow), ("primary", &p.primary)] {
        assert_eq!(
            inst.psql_db(DB, "SELECT count(*) FROM t")
                .expect("count")
                .trim(),
            "0",
            "what the clients that left wrote was rolled back on the {side}"
        );
    }
}

/// A session that creates a temporary table (and one that listens) is pinned to its shadow
/// connection: its temporary table is there in every later transaction, while other sessions
/// share the rest of the pool; once it leaves, the connection is reset before anyone else
/// gets it.
#[test]
fn what_cannot_be_shared_pins_the_session_to_its_shadow_connection() {
    let p = pair("pin");
    p.both("CREATE TABLE t (v int);");
    let proxy = p.proxy(&[]);
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB}",
        proxy.port()
    );
    let others: Vec<_> = (0..12)
        .map(|i| {
            let conninfo = conninfo.clone();
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
                for _ in 0..20 {
                    let mut tx = c.transaction().unwrap();
                    tx.execute("INSERT INTO t VALUES ($1)", &[&i]).unwrap();
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    let mut pinned = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    pinned
        .batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1), (2)")
        .unwrap();
    let mut listener = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    listener.batch_execute("LISTEN jobs").unwrap();
    for round in 0..10 {
        let mut tx = pinned.transaction().unwrap();
        tx.execute("INSERT INTO mine VALUES ($1)", &[&round])
            .unwrap();
        let n: i64 = tx
            .query_one("SELECT count(*) FROM mine", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 3 + round as i64);
        tx.commit().unwrap();
        listener.batch_execute("SELECT 1").unwrap();
    }
    for t in others {
        t.join().expect("client");
    }
    // 12 x 20 x 3 (BEGIN, INSERT, COMMIT), the temporary table's 2 + 10 x 4 statements, and
    // the listener's LISTEN and 10 SELECTs.
    let statements = 12 * 20 * 3 + 2 + 10 * 4 + 11;
    wait_judged(&proxy, statements);
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "{:?}",
        p.reports()
    );
    assert_eq!(proxy.metric("pgprism_compare_statements_total"), statements);
    assert_eq!(proxy.metric("pgprism_shadow_pool_pins_total"), 2);
    drop(pinned);
    drop(listener);
    // Back in the pool reset (DISCARD ALL): no connection keeps the temporary table.
    let temp_tables = "SELECT count(*) FROM pg_class WHERE relpersistence = 't'";
    let mut shadow_db = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname={DB}",
            p.shadow.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            let n: i64 = shadow_db.query_one(temp_tables, &[]).unwrap().get(0);
            n == 0
        }),
        "the pinned connection was reset (DISCARD ALL) when its session left"
    );
}

/// `--fail-on-differences` with the client side pooled: a difference reaches the client as
/// XX000 (its answer held until the shadow's, never the primary connection, which went back
/// when the primary answered), in the simple and the extended protocol, inside a transaction
/// too, and the session goes on with the next connection it is lent.
#[test]
fn fail_on_differences_under_transaction_pooling() {
    let p = pair("txfail");
    p.both("CREATE TABLE chg (id int PRIMARY KEY, v text); INSERT INTO chg VALUES (1, 'v1'), (2, 'v2');");
    p.shadow
        .psql_db(DB, "UPDATE chg SET v = 'changed' WHERE id = 2")
        .expect("the shadow differs");
    let mut args = vec!["--fail-on-differences"];
    args.extend_from_slice(TRANSACTION_POOLING);
    let proxy = p.proxy(&args);
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB}",
        proxy.port()
    );
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    let code = |err: &postgres::Error| support::sqlstate(err);
    let err = c.simple_query("SELECT * FROM chg").unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX000"), "{err}");
    let err = c
        .query("SELECT v FROM chg WHERE id = $1", &[&2i32])
        .unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("XX000"), "{err}");
    let rows = c
        .query("SELECT v FROM chg WHERE id = $1", &[&1i32])
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "v1");
    let mut tx = c.transaction().unwrap();
    tx.execute("INSERT INTO chg VALUES (3, 'x')", &[]).unwrap();
    assert!(tx.simple_query("SELECT * FROM chg").is_err());
    tx.rollback().unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM chg", &[]).unwrap().get(0);
    assert_eq!(n, 2);
    assert!(eventually(Duration::from_secs(20), || proxy
        .metric("pgprism_compare_mismatches_total")
        >= 3));
}

/// A raw client of [`DB`] through `proxy`, started (trust) and ready.
fn raw_client(proxy: &Proxy) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&support::raw::startup("postgres", DB)).unwrap();
    let msgs = support::raw::read_until_ready(&mut s);
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "startup: {msgs:?}");
    s
}

fn query_frame(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    support::raw::message(b'Q', &body)
}

/// A transaction-pooled compared client that leaves while its statement runs on the primary
/// (ordered shadow dispatch, the default): pgprism reads the primary's answer before it lets
/// the connection go, so the shadow gets the statement's turn and then the client's end. An
/// autocommit UPDATE that commits on the primary runs on the shadow too, and one inside a
/// transaction leaves no shadow connection in that transaction, both well within the 30 s
/// the shadow is given to drain (before, the shadow waited for an answer that never came).
#[test]
fn a_transaction_pooled_client_leaving_mid_statement_leaves_the_shadow_in_step() {
    use std::io::Write;
    let p = pair("txmid");
    p.both("CREATE TABLE acc (id int PRIMARY KEY, v int); INSERT INTO acc VALUES (1, 0), (2, 0);");
    let proxy = p.proxy(TRANSACTION_POOLING);
    let value = |inst: &Instance, id: i32| {
        inst.psql_db(DB, &format!("SELECT v FROM acc WHERE id = {id}"))
            .expect("read the row")
            .trim()
            .to_string()
    };
    let running = |inst: &Instance, sql_like: &str| {
        let mut watch = observer(inst);
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{DB}' \
             AND state = 'active' AND query LIKE '{sql_like}%'"
        );
        eventually(Duration::from_secs(10), || {
            let n: i64 = watch.query_one(&sql, &[]).unwrap().get(0);
            n == 1
        })
    };
    // The client `c` sends `sql` (an UPDATE starting with `update`) and leaves while the
    // primary runs it.
    let leave_during = |mut c: std::net::TcpStream, update: &str, sql: &str| {
        c.write_all(&query_frame(sql)).unwrap();
        assert!(running(&p.primary, update), "the UPDATE runs");
    };
    // Autocommit: the primary commits the UPDATE after its client left.
    leave_during(
        raw_client(&proxy),
        "UPDATE acc SET v = v + 1",
        "UPDATE acc SET v = v + 1 WHERE id = 1 AND pg_sleep(2) IS NOT NULL",
    );
    let started = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(12), || value(&p.primary, 1) == "1"
            && value(&p.shadow, 1) == "1"),
        "the row agrees on both sides: primary {}, shadow {}",
        value(&p.primary, 1),
        value(&p.shadow, 1)
    );
    // Inside a transaction: both sides roll it back, and soon.
    let mut c = raw_client(&proxy);
    let msgs = support::raw::query(&mut c, "BEGIN; UPDATE acc SET v = v + 5 WHERE id = 2");
    assert_eq!(
        msgs.last().map(|m| m.1.as_slice()),
        Some(&b"T"[..]),
        "{msgs:?}"
    );
    leave_during(
        c,
        "UPDATE acc SET v = v + 10",
        "UPDATE acc SET v = v + 10 WHERE id = 2 AND pg_sleep(2) IS NOT NULL",
    );
    let in_block = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{DB}' \
         AND (state LIKE 'idle in transaction%' OR backend_xid IS NOT NULL)"
    );
    for (side, inst) in [("shadow", &p.shadow), ("primary", &p.primary)] {
        let mut watch = observer(inst);
        let clean = eventually(Duration::from_secs(12), || {
            let n: i64 = watch.query_one(&in_block, &[]).unwrap().get(0);
            n == 0
        });
        assert!(
            clean,
            "a {side} connection stayed in the client's transaction"
        );
        assert_eq!(value(inst, 2), "0", "rolled back on the {side}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the shadow did not wait out its 30 s drain: {:?}",
        started.elapsed()
    );
}

/// pgprism's own FATAL (a malformed frame right after COMMIT, in one write) under
/// `--fail-on-differences` with the client side pooled: the COMMIT's answer, held for the
/// shadow's, still reaches the client ahead of the FATAL (the COMMIT went through on the
/// primary, so the client must hear of it).
#[test]
fn a_commit_before_pgprisms_own_fatal_reaches_the_client() {
    use std::io::Write;
    let p = pair("txfatal");
    p.both("CREATE TABLE k (v int);");
    let mut args = vec!["--fail-on-differences"];
    args.extend_from_slice(TRANSACTION_POOLING);
    let proxy = p.proxy(&args);
    let mut c = raw_client(&proxy);
    let msgs = support::raw::query(&mut c, "BEGIN; INSERT INTO k VALUES (1)");
    assert_eq!(
        msgs.last().map(|m| m.1.as_slice()),
        Some(&b"T"[..]),
        "{msgs:?}"
    );
    let mut write = query_frame("COMMIT");
    // A frame whose length is below its own header's.
    write.extend_from_slice(&[b'Q', 0, 0, 0, 1]);
    c.write_all(&write).unwrap();
    let msgs = support::raw::read_to_end(&mut c);
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"CZE", "{msgs:?}");
    assert_eq!(msgs[0].1, b"COMMIT\0", "{msgs:?}");
    assert_eq!(msgs[1].1, b"I", "{msgs:?}");
    let code = support::raw::error_field(&msgs[2].1, b'C');
    assert_eq!(code.as_deref(), Some("08P01"), "{msgs:?}");
    let severity = support::raw::error_field(&msgs[2].1, b'V');
    assert_eq!(severity.as_deref(), Some("FATAL"), "{msgs:?}");
    assert_eq!(
        p.primary
            .psql_db(DB, "SELECT count(*) FROM k")
            .unwrap()
            .trim(),
        "1",
        "the COMMIT went through on the primary"
    );
}
