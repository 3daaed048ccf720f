//! Transaction pooling at scale (issue 14, "Tests and figures"): 2,000 pgbench clients through
//! `--pool-mode transaction --pool-size 20` in front of a primary that accepts 60 connections,
//! with one pooled mirror (`--mirror-pool-size 8`) that accepts 40, once with `-M prepared`
//! and once with `-M simple`. Every transaction must succeed, the mirror must receive every
//! write, and neither server may ever see more of pgprism's connections than its pool allows.
//! Also pgbench `-M prepared` with many clients per thread on a pool smaller than its
//! clients on each shard.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgprism::embed::Instance;
use support::{Proxy, eventually};

const CLIENTS: usize = 2_000;
const TRANSACTIONS: usize = 3;
const POOL_SIZE: i64 = 20;
const MIRROR_POOL_SIZE: i64 = 8;
/// The database the clients use; the tests' own observers connect to `postgres`, so they are
/// never counted among pgprism's connections.
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
/// ([`OBSERVER`]): pgprism's connections. Returns the most seen at once and the samples.
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

/// The tests' own connections to [`DB`] carry this `application_name`: the samplers leave
/// them out.
const OBSERVER: &str = "pool-scale-observer";

/// count:md5 of the rows of `t` on `inst`, order-independent.
fn checksum(inst: &Instance) -> String {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB} application_name={OBSERVER}",
        inst.port()
    );
    let sum = || -> Result<String, postgres::Error> {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls)?;
        c.query_one(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(r, '|' ORDER BY r)), '') \
             FROM (SELECT (mode, client, id)::text AS r FROM t) x",
            &[],
        )?
        .try_get(0)
    };
    sum().unwrap_or_else(|e| format!("error: {e}"))
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
    let mut runs = Vec::new();
    for mode in ["prepared", "simple"] {
        let t = Instant::now();
        let bench = Bench {
            clients: CLIENTS,
            threads: 2,
            transactions: TRANSACTIONS,
            mode,
            script: &script,
        };
        pgbench(&proxy, &bench);
        runs.push(format!("-M {mode}: {:.1}s", t.elapsed().as_secs_f64()));
    }
    let total = 2 * CLIENTS * TRANSACTIONS;
    let want = checksum(&primary);
    assert!(
        want.starts_with(&format!("{total}:")),
        "the primary holds every row: {want}"
    );
    let converge = Instant::now();
    assert!(
        eventually(Duration::from_secs(120), || checksum(&mirror) == want),
        "the mirror holds the primary's rows: primary {want}, mirror {}\n{}",
        checksum(&mirror),
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

    // Nothing skipped, lost, cut or timed out on the way to the mirror, and no errors there.
    // Shards report their counters every second: wait until the units are all counted.
    assert!(
        eventually(Duration::from_secs(60), || proxy
            .metric("pgprism_mirror_units_total")
            >= total as u64),
        "{}",
        proxy.admin_get("/metrics").1
    );
    let metrics = proxy.admin_get("/metrics").1;
    let not_mirrored: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            name.starts_with("pgprism_mirror_")
                && (name.contains("skipped")
                    || [
                        "pgprism_mirror_transactions_cut_total",
                        "pgprism_mirror_units_lost_total",
                        "pgprism_mirror_timeouts_total",
                        "pgprism_mirror_errors_total",
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
    eprintln!(
        "pool_scale: {CLIENTS} clients x {TRANSACTIONS} transactions, {}; mirror converged {:.1}s \
         after; most connections seen: primary {most_primary}/{POOL_SIZE} ({samples_primary} \
         samples), mirror {most_mirror}/{MIRROR_POOL_SIZE} ({samples_mirror} samples); \
         {:.1}s in all",
        runs.join(", "),
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
