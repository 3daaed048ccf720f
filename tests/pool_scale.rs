//! Transaction pooling at scale (issue 14, "Tests and figures"): 2,000 pgbench clients through
//! `--pool-mode transaction --pool-size 20` in front of a primary that accepts 60 connections,
//! with one pooled mirror (`--mirror-pool-size 8`) that accepts 40, once with `-M prepared`
//! and once with `-M simple`, and beside them, through the same proxy and pools, every other
//! real client the issue names: a psql session, the JDBC and psycopg2 applications of
//! `tests/clients/` and a `postgres`-crate client. Every transaction must succeed, every
//! client get the answers it gets directly, the mirror receive every write, and neither server
//! ever see more of pgprism's connections than its pool allows.
//! Also pgbench `-M prepared` with many clients per thread on a pool smaller than its
//! clients on each shard.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgprism::embed::Instance;
use support::clients::{Login, OBSERVER, assert_jdbc, assert_psycopg};
use support::{Proxy, eventually};

const CLIENTS: usize = 2_000;
const TRANSACTIONS: usize = 3;
const POOL_SIZE: i64 = 20;
const MIRROR_POOL_SIZE: i64 = 8;
/// The database the clients use; the tests' own observers connect to `postgres`, or carry
/// [`OBSERVER`] as their `application_name`, so they are never counted among pgprism's
/// connections.
const DB: &str = "bench";

/// A server whose `max_connections` is `max_connections`, with [`DB`] created.
fn start_server(name: &str, max_connections: usize) -> Instance {
    support::start_capped(name, DB, max_connections)
}

/// pgbench needs a descriptor per client, and so does pgprism (plus its pools' connections):
/// each process's soft open-files limit must be above [`CLIENTS`]. pgprism does not raise
/// its own, so the test raises its soft limit (up to the hard limit) for both children to
/// inherit. Returns the limit now in force.
fn raise_open_files_limit(want: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

/// Samples, until `stop`, the client backends of [`DB`] on `inst` but the tests' own
/// ([`OBSERVER`]: the checksums): pgprism's connections. Returns the most seen at once and the samples.
fn sample_connections(
    inst: &Instance,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(i64, usize)> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        inst.port()
    );
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        let count = c
            .prepare(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{DB}' \
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                 AND application_name IS DISTINCT FROM '{OBSERVER}'"
            ))
            .unwrap();
        let (mut most, mut samples) = (0, 0);
        while !stop.load(Ordering::Acquire) {
            let seen: i64 = c.query_one(&count, &[]).unwrap().get(0);
            most = most.max(seen);
            samples += 1;
            // Sampling interval of an observer: the maximum over the run is what counts.
            std::thread::sleep(Duration::from_millis(5));
        }
        (most, samples)
    })
}

/// count:md5 of the rows of `table` in [`DB`] on `inst`, order-independent (read by an
/// [`OBSERVER`]: the samplers leave it out).
fn checksum(inst: &Instance, table: &str) -> String {
    support::clients::checksum(inst, DB, table)
}

/// A connection of the test's own to [`DB`] on `inst`, as an [`OBSERVER`] (the samplers
/// leave it out).
fn observe(inst: &Instance) -> postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB} application_name={OBSERVER}",
        inst.port()
    );
    postgres::Client::connect(&conninfo, postgres::NoTls).expect("observe the server")
}

/// How one pgbench run is made.
struct Bench<'a> {
    clients: usize,
    threads: usize,
    transactions: usize,
    /// `-M`: simple, extended or prepared.
    mode: &'a str,
    script: &'a std::path::Path,
}

/// Runs pgbench through `proxy` and asserts that every transaction succeeded.
fn pgbench(proxy: &Proxy, b: &Bench) {
    let out = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &proxy.port().to_string()])
        .args(["-U", "postgres", "-n", "-M", b.mode])
        .args(["-c", &b.clients.to_string(), "-j", &b.threads.to_string()])
        .args(["-t", &b.transactions.to_string()])
        // The run's mark in every row: 1 for prepared, 2 for the others.
        .args([
            "-D",
            &format!("mode={}", if b.mode == "prepared" { 1 } else { 2 }),
        ])
        .arg("-f")
        .arg(b.script)
        .arg(DB)
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let total = b.clients * b.transactions;
    assert!(
        out.status.success()
            && stdout.contains("number of failed transactions: 0")
            && stdout.contains(&format!(
                "number of transactions actually processed: {total}/{total}"
            )),
        "pgbench -M {} -c {} -j {} ({}):\n{stdout}\n{}\npgprism's log ends:\n{}",
        b.mode,
        b.clients,
        b.threads,
        out.status,
        head(&String::from_utf8_lossy(&out.stderr), 20),
        tail(&proxy.log(), 40)
    );
}

/// Writes the clients' script (a transaction inserting one row) to a fresh directory;
/// returns the directory (removed on drop) and the script.
fn insert_script(tag: &str) -> (support::TempDir, std::path::PathBuf) {
    let dir = support::TempDir::new(tag);
    let script = dir.join("insert.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 1000000000)\n\
         BEGIN;\n\
         INSERT INTO t VALUES (:mode, :client_id, :id);\n\
         COMMIT;\n",
    )
    .unwrap();
    (dir, script)
}

/// The tables of the real clients that run beside pgbench. The psql session and the
/// `postgres`-crate client each put their own schema first on their `search_path` and write to
/// a plain `t`, which must resolve to their schema's `t` on every connection they are lent
/// (and on the mirror's): a lend without their setting would write into pgbench's `public.t`,
/// whose rows are counted.
const JDBC_TABLE: &str = "jdbc_scale";
const PSYCOPG_TABLE: &str = "psy_scale";
const PSQL_SCHEMA: &str = "psql_s";
const CRATE_SCHEMA: &str = "crate_s";
/// The crate client's rounds (a committed and a rolled-back transaction and a read each) go on
/// while pgbench's `-M prepared` pass runs, and number at least this many.
const CRATE_ROUNDS_MIN: i32 = 5;

/// The real clients' login: as pgbench's, trusted, so that all share one pool (pools are per
/// user and database) and one mirror pool.
fn login(port: u16) -> Login<'static> {
    Login {
        port,
        database: DB,
        user: "postgres",
        password: None,
        // Logging in behind 2,000 pgbench clients on a loaded machine (see startup-timeout-ms).
        connect_timeout_s: 120,
    }
}

/// A psql session: its own schema first on its search_path, `\copy`, SQL `PREPARE`d
/// statements run inside explicit transactions, one committed and one rolled back. Returns its
/// output: `count=102 sum=5253` and the search_path.
fn psql_session(port: u16, dir: &std::path::Path) -> String {
    let script = dir.join("session.sql");
    std::fs::write(
        &script,
        format!(
            "CREATE SCHEMA {PSQL_SCHEMA};\n\
             SET search_path = {PSQL_SCHEMA}, public;\n\
             CREATE TABLE t (n int PRIMARY KEY, note text);\n\
             \\copy t (n) from program 'seq 1 100'\n\
             PREPARE ins(int, text) AS INSERT INTO t VALUES ($1, $2);\n\
             BEGIN;\n\
             EXECUTE ins(101, 'committed');\n\
             EXECUTE ins(102, 'committed');\n\
             COMMIT;\n\
             BEGIN;\n\
             EXECUTE ins(103, 'rolled back');\n\
             ROLLBACK;\n\
             SELECT 'count=' || count(*) || ' sum=' || sum(n) FROM t;\n\
             SHOW search_path;\n"
        ),
    )
    .unwrap();
    support::clients::run(
        std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&script)
            .arg(DB),
        "the psql session",
    )
}

/// A `postgres`-crate application: its own schema first on its search_path, statements
/// prepared once (the crate's named statements) and run on whichever connection each
/// transaction is lent, explicit transactions committed and rolled back, and a read of its
/// own round's rows after each, round after round until `prepared_done` and at least
/// [`CRATE_ROUNDS_MIN`] times. Returns `rounds=N search_path=...`.
fn crate_client(port: u16, prepared_done: &AtomicBool) -> String {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=postgres dbname={DB} \
         application_name=pool-scale-crate connect_timeout=120"
    );
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls)
        .expect("the postgres crate client logs in");
    c.batch_execute(&format!("CREATE SCHEMA {CRATE_SCHEMA}"))
        .unwrap();
    c.batch_execute(&format!("SET search_path = {CRATE_SCHEMA}, public"))
        .unwrap();
    c.batch_execute("CREATE TABLE t (round int, n int, note text)")
        .unwrap();
    let insert = c.prepare("INSERT INTO t VALUES ($1, $2, $3)").unwrap();
    let read = c
        .prepare("SELECT count(*), coalesce(sum(n), 0) FROM t WHERE round = $1")
        .unwrap();
    let mut rounds = 0;
    while rounds < CRATE_ROUNDS_MIN || !prepared_done.load(Ordering::Acquire) {
        let mut tx = c.transaction().unwrap();
        tx.execute(&insert, &[&rounds, &1, &"committed"]).unwrap();
        tx.execute(&insert, &[&rounds, &2, &"committed"]).unwrap();
        tx.commit().unwrap();
        let mut tx = c.transaction().unwrap();
        tx.execute(&insert, &[&rounds, &4, &"rolled back"]).unwrap();
        tx.rollback().unwrap();
        let row = c.query_one(&read, &[&rounds]).unwrap();
        let (count, sum): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            (count, sum),
            (2, 3),
            "round {rounds}: the committed rows, not the rolled-back one"
        );
        rounds += 1;
    }
    let path: String = c.query_one("SHOW search_path", &[]).unwrap().get(0);
    format!("rounds={rounds} search_path={path}")
}

/// A real client run in a thread of its own, started at once.
struct RealClient {
    name: &'static str,
    run: std::thread::JoinHandle<Ran>,
}

/// What a real client printed, and from when to when it ran (since the test's start).
struct Ran {
    out: String,
    from: Duration,
    to: Duration,
}

impl RealClient {
    fn start(
        name: &'static str,
        t0: Instant,
        work: impl FnOnce() -> String + Send + 'static,
    ) -> RealClient {
        let run = std::thread::spawn(move || {
            let from = t0.elapsed();
            let out = work();
            Ran {
                out,
                from,
                to: t0.elapsed(),
            }
        });
        RealClient { name, run }
    }

    fn join(self) -> (&'static str, Ran) {
        let ran = self
            .run
            .join()
            .unwrap_or_else(|_| panic!("the {} client failed (its panic is above)", self.name));
        (self.name, ran)
    }
}

/// Sets its flag when dropped: a pass that fails ends the crate client's rounds all the same.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn two_thousand_clients_on_twenty_connections_with_a_pooled_mirror() {
    let started = Instant::now();
    let fds = raise_open_files_limit(CLIENTS as libc::rlim_t + 1024);
    assert!(
        fds >= CLIENTS as libc::rlim_t + 256,
        "the open-files limit ({fds}) is too low for {CLIENTS} clients: raise the hard limit"
    );
    let primary = start_server("scalep", 60);
    let mirror = start_server("scalem", 40);
    let ddl = "CREATE TABLE t (mode int, client int, id bigint)";
    for inst in [&primary, &mirror] {
        inst.psql_db(DB, ddl).unwrap();
    }
    let mirror_url = format!("postgres://postgres@127.0.0.1:{}/{DB}", mirror.port());
    let (dir, script) = insert_script("pool-scale");
    // A loaded machine (a whole suite on two cores) stretches every wait of 2,000 clients on
    // 20 connections: the bounds on a login, a server connection and a mirror statement are
    // raised far beyond the defaults, so only a stuck pool or mirror reaches them (the
    // test's verdict is about connections and rows, not time).
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nstartup-timeout-ms = 120000\nconnect-timeout-ms = 120000\n\
             [[mirror]]\nurl = \"{mirror_url}\"\npool-size = {MIRROR_POOL_SIZE}\n\
             connect-timeout-ms = 120000\ntimeout-ms = 120000\n"
        ),
    )
    .unwrap();
    let proxy = Proxy::start(
        &primary.url(),
        &[
            "--pool-mode",
            "transaction",
            "--pool-size",
            &POOL_SIZE.to_string(),
            "--auth-type",
            "trust",
            // A client waits its turn behind ~100 others, longer on a loaded machine; a stuck
            // pool still fails the run in two minutes, within the test's liveness bound.
            "--query-wait-timeout",
            "120s",
            "--config",
            config.to_str().unwrap(),
        ],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let on_primary = sample_connections(&primary, stop.clone());
    let on_mirror = sample_connections(&mirror, stop.clone());
    let prepared_done = Arc::new(AtomicBool::new(false));
    let (passes, ran) = std::thread::scope(|s| {
        let passes = s.spawn(|| {
            // A pass that fails ends the crate client's rounds all the same.
            let _prepared_done = SetOnDrop(prepared_done.clone());
            let mut passes = Vec::new();
            for mode in ["prepared", "simple"] {
                let from = started.elapsed();
                let bench = Bench {
                    clients: CLIENTS,
                    threads: 2,
                    transactions: TRANSACTIONS,
                    mode,
                    script: &script,
                };
                pgbench(&proxy, &bench);
                prepared_done.store(true, Ordering::Release);
                passes.push(format!(
                    "-M {mode} {:.1}-{:.1}s",
                    from.as_secs_f64(),
                    started.elapsed().as_secs_f64()
                ));
            }
            passes
        });
        // The real clients start once the `-M prepared` pass commits (pgbench connects all
        // its clients first), so every lend of theirs waits its turn among 2,000 pgbench
        // clients'. The crate client goes on until that pass is over; the others do their
        // fixed work, into the `-M simple` pass and past pgbench's end if pgbench leaves them
        // too few turns.
        let mut watcher = observe(&primary);
        let committing = eventually(Duration::from_secs(120), || {
            passes.is_finished()
                || watcher
                    .query_one("SELECT count(*) FROM public.t", &[])
                    .is_ok_and(|r| r.get::<_, i64>(0) > 0)
        });
        assert!(committing, "pgbench committed nothing in 2 minutes");
        let port = proxy.port();
        let session_dir = dir.path().to_path_buf();
        let done = prepared_done.clone();
        let real = [
            RealClient::start("psql", started, move || psql_session(port, &session_dir)),
            RealClient::start("JDBC", started, move || {
                support::clients::jdbc(&login(port), JDBC_TABLE)
            }),
            RealClient::start("psycopg2", started, move || {
                support::clients::psycopg(&login(port), PSYCOPG_TABLE)
            }),
            RealClient::start("postgres crate", started, move || crate_client(port, &done)),
        ];
        let passes = passes
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let ran: Vec<(&str, Ran)> = real.into_iter().map(RealClient::join).collect();
        (passes, ran)
    });
    let out = |name: &str| {
        ran.iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, r)| r.out.as_str())
    };
    assert_jdbc(out("JDBC"));
    assert_psycopg(out("psycopg2"));
    let search_path = |schema: &str| format!("{schema}, public");
    assert_eq!(
        out("psql").lines().collect::<Vec<_>>(),
        ["count=102 sum=5253", search_path(PSQL_SCHEMA).as_str()],
        "the psql session's answers"
    );
    let crate_out = out("postgres crate");
    let rounds: usize = crate_out
        .strip_prefix("rounds=")
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the crate client's rounds: {crate_out:?}"));
    assert!(
        crate_out.ends_with(&format!(" search_path={}", search_path(CRATE_SCHEMA))),
        "the crate client's setting: {crate_out:?}"
    );

    // Every write on the primary where it belongs (pgbench's table holds pgbench's rows and
    // none that a lost search_path sent there), and the same rows on the mirror.
    let total = 2 * CLIENTS * TRANSACTIONS;
    let psql_table = format!("{PSQL_SCHEMA}.t");
    let crate_table = format!("{CRATE_SCHEMA}.t");
    let tables = [
        ("public.t", total),
        (JDBC_TABLE, 1121),
        (PSYCOPG_TABLE, 1100),
        (psql_table.as_str(), 102),
        (crate_table.as_str(), 2 * rounds),
    ];
    let want: Vec<String> = tables
        .iter()
        .map(|(table, rows)| {
            let sum = checksum(&primary, table);
            assert!(
                sum.starts_with(&format!("{rows}:")),
                "the primary holds {rows} rows in {table}: {sum}"
            );
            sum
        })
        .collect();
    let on_the_mirror = || -> Vec<String> {
        tables
            .iter()
            .map(|(table, _)| checksum(&mirror, table))
            .collect()
    };
    let converge = Instant::now();
    assert!(
        eventually(Duration::from_secs(120), || on_the_mirror() == want),
        "the mirror holds the primary's rows: tables {:?}, primary {want:?}, mirror {:?}\n{}",
        tables.map(|t| t.0),
        on_the_mirror(),
        proxy.admin_get("/metrics").1
    );
    let converge = converge.elapsed();
    stop.store(true, Ordering::Release);
    let (most_primary, samples_primary) = on_primary.join().unwrap();
    let (most_mirror, samples_mirror) = on_mirror.join().unwrap();
    assert!(
        (1..=POOL_SIZE).contains(&most_primary),
        "pgprism held {most_primary} connections on the primary at once (pool {POOL_SIZE})"
    );
    assert!(
        (1..=MIRROR_POOL_SIZE).contains(&most_mirror),
        "pgprism held {most_mirror} connections on the mirror at once (pool {MIRROR_POOL_SIZE})"
    );

    // Nothing skipped, lost, cut or timed out on the way to the mirror, and no errors there
    // but the two duplicate-key INSERTs the JDBC and psycopg2 workloads make on purpose (they
    // fail on the mirror as on the primary). The real clients' reads are left out by the
    // mirror's query filter (`queries = "ddl-dml"`, the default: `skipped_filter`), by
    // design; their writes all arrived (the tables above). Shards report their counters
    // every second: wait until the units are all counted.
    assert!(
        eventually(Duration::from_secs(60), || proxy
            .metric("pgprism_mirror_units_total")
            >= total as u64),
        "{}",
        proxy.admin_get("/metrics").1
    );
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("pgprism_mirror_errors_total")
            == 2),
        "{}",
        proxy.admin_get("/metrics").1
    );
    let metrics = proxy.admin_get("/metrics").1;
    support::clients::assert_mirror_errors_are_the_drivers_duplicates(&metrics);
    let not_mirrored: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            name.starts_with("pgprism_mirror_")
                && ((name.contains("skipped") && name != "pgprism_mirror_skipped_filter_total")
                    || [
                        "pgprism_mirror_transactions_cut_total",
                        "pgprism_mirror_units_lost_total",
                        "pgprism_mirror_timeouts_total",
                    ]
                    .contains(&name))
        })
        .collect();
    assert!(
        not_mirrored.iter().any(|l| l.contains("skipped")),
        "the skipped counters are exported:\n{metrics}"
    );
    for line in &not_mirrored {
        assert!(
            line.ends_with(" 0"),
            "{line}\nall metrics:\n{metrics}\nlog tail:\n{}",
            tail(&proxy.log(), 60)
        );
    }
    let clients: Vec<String> = ran
        .iter()
        .map(|(name, r)| {
            format!(
                "{name} {:.1}-{:.1}s",
                r.from.as_secs_f64(),
                r.to.as_secs_f64()
            )
        })
        .collect();
    eprintln!(
        "pool_scale: {CLIENTS} clients x {TRANSACTIONS} transactions, {}; beside them {} \
         ({rounds} crate rounds); mirror converged {:.1}s after; most connections seen: \
         primary {most_primary}/{POOL_SIZE} ({samples_primary} samples), mirror \
         {most_mirror}/{MIRROR_POOL_SIZE} ({samples_mirror} samples); {:.1}s in all",
        passes.join(", "),
        clients.join(", "),
        converge.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn head(text: &str, lines: usize) -> String {
    text.lines().take(lines).collect::<Vec<_>>().join("\n")
}

/// pgbench -M prepared prepares each statement with PQprepare, synchronously, the first time
/// each client reaches it: a thread serving several clients waits for that answer while its
/// other clients sit in their transactions holding server connections. pgprism answers a
/// Parse of a statement its pool already prepared without lending a connection (the pool's
/// `known` statements), so that wait never needs a connection. That knowledge is shared by
/// the shards: the thread's first client on the other shard must not need a connection for
/// its BEGIN while its clients on the first shard hold the whole pool. With one pgbench
/// thread, 16 clients and a pool of 1 over 2 shards, per-shard knowledge stopped the run
/// until query-wait-timeout (53300).
#[test]
fn pgbench_prepared_with_clients_on_both_shards_never_waits_on_itself() {
    let primary = start_server("knownp", 20);
    primary
        .psql_db(DB, "CREATE TABLE t (mode int, client int, id bigint)")
        .unwrap();
    let proxy = Proxy::start(
        &primary.url(),
        &[
            "--pool-mode",
            "transaction",
            "--pool-size",
            "1",
            "--auth-type",
            "trust",
            "--query-wait-timeout",
            "10s",
        ],
    );
    let (_dir, script) = insert_script("pool-known");
    let bench = Bench {
        clients: 16,
        threads: 1,
        transactions: 3,
        mode: "prepared",
        script: &script,
    };
    pgbench(&proxy, &bench);
    assert_eq!(
        primary
            .psql_db(DB, "SELECT count(*) FROM t")
            .unwrap()
            .trim(),
        "48"
    );
}
