//! Compare mode on live concurrent traffic (issue 15): pgbench clients through `pgprism proxy
//! --shadow` against two real PostgreSQL servers. On identical databases, contended rows must
//! not produce mismatches (the shadow runs conflicting statements in the primary's completion
//! order); real divergences on the shadow must still be found and named.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use pgprism::embed::Instance;
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use support::{Pair, Proxy, eventually, start_primary};

const HOT: &str = "CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL);
    INSERT INTO hot SELECT g, 0 FROM generate_series(1, 5) g;";

const HOT_SCRIPT: &str = "\\set id random(1, 5)
UPDATE hot SET v = v + 1 WHERE id = :id;
SELECT v FROM hot WHERE id = :id;
";

/// A pair with [`HOT_SCRIPT`] written to [`script`].
fn pair(name: &str) -> Pair {
    let p = Pair::new(
        start_primary(&format!("cc{name}p")),
        start_primary(&format!("cc{name}s")),
    );
    std::fs::write(script(&p), HOT_SCRIPT).expect("write the pgbench script");
    p
}

/// The pair's pgbench script.
fn script(p: &Pair) -> PathBuf {
    p.dir.join("hot.sql")
}

fn pgbench(proxy: &Proxy, args: &[&str]) -> String {
    let port = proxy.port().to_string();
    let out = Command::new("pgbench")
        .args(["-n", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("run pgbench");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {stderr}\nproxy log:\n{}",
        proxy.log()
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Statements judged so far: compared ones (those with differences included) and skipped.
fn judged(proxy: &Proxy) -> u64 {
    proxy.metric("pgprism_compare_statements_total") + proxy.metric("pgprism_compare_skipped_total")
}

/// Waits until the shadow caught up with `statements` statements; returns
/// (mismatches, inconclusive concurrent, inconclusive nondeterministic, compared).
fn verdicts(proxy: &Proxy, statements: u64) -> (u64, u64, u64, u64) {
    let caught_up = eventually(Duration::from_secs(60), || judged(proxy) >= statements);
    if !caught_up {
        let (_, metrics) = proxy.admin_get("/metrics");
        let compare: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("pgprism_compare") || l.starts_with("pgprism_sync_points"))
            .collect();
        panic!(
            "the shadow did not catch up: {} of {statements} judged\n{}",
            judged(proxy),
            compare.join("\n")
        );
    }
    (
        proxy.metric("pgprism_compare_mismatches_total"),
        proxy.metric("pgprism_compare_inconclusive_concurrent_total"),
        proxy.metric("pgprism_compare_inconclusive_nondeterministic_total"),
        proxy.metric("pgprism_compare_statements_total"),
    )
}

fn sum_v(inst: &Instance) -> String {
    inst.psql("SELECT sum(v) FROM hot").expect("sum")
}

/// Runs the hot-row workload at `clients`: no mismatch at all, and at most `inconclusive_max`
/// of the compared statements inconclusive. (Issue 15 aims at 1%. Every inconclusive read
/// overlapped a write of its own row on the primary; with the answers numbered by their kernel
/// receive timestamps and held for earlier-sent ones (`compare.order-hold-ms`), the 2-core
/// build machine shared by several builds gave 0.04-0.6% at 8 clients and 0.25-1.2% at 64
/// (numbered as read: 1.3-4.6% and 13-29%); the bounds leave room for a machine under
/// heavier parallel test load and still fail if the numbering by arrival is lost.
/// docs/compare.md gives measured rates; `hot_row_order_gap` measures the order itself.)
fn hot_rows_without_false_mismatches(
    name: &str,
    clients: usize,
    per_client: usize,
    inconclusive_max: f64,
    extra: &[&str],
) {
    let p = pair(name);
    p.both(HOT);
    // More proxy flags for an A/B of the same test (`PGPRISM_HOT_ARGS="--compare-place-reads-max 0"`).
    let more = std::env::var("PGPRISM_HOT_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra
        .iter()
        .copied()
        .chain(more.split_whitespace())
        .collect();
    let proxy = p.proxy(&extra);
    let script = script(&p).display().to_string();
    let c = clients.to_string();
    let t = per_client.to_string();
    pgbench(&proxy, &["-c", &c, "-j", "2", "-t", &t, "-f", &script]);
    let statements = (clients * per_client * 2) as u64;
    let (mismatches, concurrent, nondeterministic, compared) = verdicts(&proxy, statements);
    let rate = concurrent as f64 / compared.max(1) as f64;
    // The shadow's lag behind the primary, per sync point, on /status and /metrics.
    let (_, status) = proxy.admin_get("/status");
    let status: sonic_rs::Value = sonic_rs::from_str(&status).expect("status JSON");
    let lag = &status["compare_shadow_lag"];
    eprintln!(
        "hot rows, {clients} clients {extra:?}: {compared} compared, {mismatches} mismatches, \
         {concurrent} inconclusive (concurrent, {:.3}%), {nondeterministic} nondeterministic, \
         {} unpinned, {} placed ({} re-reads), {} waits expired, {} lock breaks, shadow lag \
         p50 {:?} us, p99 {:?} us, max {:?} us",
        rate * 100.0,
        proxy.metric("pgprism_compare_unpinned_total"),
        proxy.metric("pgprism_compare_placed_total"),
        proxy.metric("pgprism_compare_place_rereads_total"),
        proxy.metric("pgprism_compare_order_waits_expired_total"),
        proxy.metric("pgprism_compare_order_lock_breaks_total"),
        lag["p50_us"].as_u64(),
        lag["p99_us"].as_u64(),
        lag["max_us"].as_u64(),
    );
    assert!(
        lag["count"].as_u64().unwrap_or(0) >= statements,
        "every sync point's lag is recorded: {lag:?}"
    );
    assert!(
        proxy.metric("pgprism_compare_shadow_lag_seconds_count") >= statements,
        "the lag is on /metrics"
    );
    eprintln!("{}", drift(&p.reports()));
    let (by_reason, sum) = reasons(&proxy);
    eprintln!("{by_reason}");
    // Each report of one names its reason too.
    for r in p.reports() {
        if r["verdict"].as_str() == Some("inconclusive: concurrent") {
            let reason = r["reason"].as_str().unwrap_or_default();
            assert!(
                REASONS.contains(&reason) || reason == RECHECK_REASON,
                "reason {reason:?} in {r:?}"
            );
        }
    }
    assert_eq!(
        mismatches,
        0,
        "false mismatches on identical databases: {:?}",
        p.reports().first()
    );
    assert_eq!(
        sum, concurrent,
        "each inconclusive statement has its reason: {by_reason}"
    );
    assert!(
        rate <= inconclusive_max,
        "inconclusive rate {rate} above {inconclusive_max}"
    );
    assert!(
        compared >= statements,
        "{compared} of {statements} compared"
    );
    assert_eq!(
        sum_v(&p.primary),
        sum_v(&p.shadow),
        "both sides ran every update"
    );
}

/// The reasons a statement is unpinned (`compare::order::Unpinned`).
const REASONS: [&str; 6] = [
    "overlapped",
    "in_flight",
    "wait_expired",
    "lock_break",
    "primary_only",
    "abandoned",
];

/// The reason of an order re-check that read other rows than its statement (a statement the
/// ordering rules pinned: inconclusive only, `pgprism_compare_inconclusive_order_recheck_total`).
const RECHECK_REASON: &str = "order_recheck";

/// Why the compared statements were unpinned, and the inconclusive ones among them, by the
/// ordering rule that left them so (`pgprism_compare_{unpinned,inconclusive}_<reason>_total`),
/// and those whose order re-check read other rows; and the inconclusive ones summed over the
/// reasons.
fn reasons(proxy: &Proxy) -> (String, u64) {
    let mut line = String::from("unpinned / inconclusive by reason:");
    let mut sum = 0;
    for name in REASONS {
        let unpinned = proxy.metric(&format!("pgprism_compare_unpinned_{name}_total"));
        let inconclusive = proxy.metric(&format!("pgprism_compare_inconclusive_{name}_total"));
        sum += inconclusive;
        line.push_str(&format!(" {name} {unpinned} / {inconclusive};"));
    }
    let rechecked = proxy.metric(&format!(
        "pgprism_compare_inconclusive_{RECHECK_REASON}_total"
    ));
    sum += rechecked;
    line.push_str(&format!(" {RECHECK_REASON} - / {rechecked};"));
    (line, sum)
}

/// Where the shadow put the reads that differed: the shadow's value minus the primary's
/// (each write adds 1), counted by drift. Positive: the shadow ran the read after writes
/// the primary's read had not seen.
fn drift(reports: &[sonic_rs::Value]) -> String {
    let mut counts = std::collections::BTreeMap::<i64, u32>::new();
    let value = |side: &sonic_rs::Value| -> Option<i64> {
        let row = side["sample_rows"][0].as_str()?;
        row.trim_start_matches('(')
            .trim_end_matches(')')
            .parse()
            .ok()
    };
    for r in reports {
        if let (Some(p), Some(s)) = (value(&r["primary"]), value(&r["shadow"])) {
            *counts.entry(s - p).or_default() += 1;
        }
    }
    format!("drift of the differing reads (shadow - primary: count): {counts:?}")
}

#[test]
fn hot_rows_at_8_clients_give_no_false_mismatch() {
    hot_rows_without_false_mismatches("h8", 8, 150, 0.025, &[]);
}

#[test]
fn hot_rows_at_64_clients_give_no_false_mismatch() {
    hot_rows_without_false_mismatches("h64", 64, 25, 0.05, &[]);
}

/// One read that saw a write whose answer came after its own, driven by the test: session A
/// updates row 1 in a transaction, then sends `COMMIT; SELECT pg_advisory_lock(..)` while the
/// test holds that advisory lock on the primary, so the commit is visible there long before
/// the sync point's answer; session B reads row 1 after the commit is visible (it reads 1),
/// and only then is the lock released. Numbered by their answers, the read comes first, so
/// the shadow runs it before the commit (it reads 0), and it overlapped the write on the
/// primary. `shadow` is run on the shadow first. Returns (mismatches, inconclusive
/// concurrent, placed) once it was judged.
fn read_that_saw_a_later_answered_write(
    name: &str,
    extra: &[&str],
    shadow: &str,
) -> (u64, u64, u64) {
    let p = pair(name);
    p.both(HOT);
    if !shadow.is_empty() {
        p.shadow.psql(shadow).expect("set the shadow up");
    }
    let proxy = p.proxy(extra);
    let mut holder = postgres::Client::connect(&p.primary.url(), postgres::NoTls).unwrap();
    let mut direct = postgres::Client::connect(&p.primary.url(), postgres::NoTls).unwrap();
    holder
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .unwrap();
    let mut a = proxy.client();
    a.batch_execute("BEGIN").unwrap();
    a.batch_execute("UPDATE hot SET v = v + 1 WHERE id = 1")
        .unwrap();
    let writer = std::thread::spawn(move || {
        a.batch_execute("COMMIT; SELECT pg_advisory_lock(4242)")
            .unwrap();
        a
    });
    let committed = eventually(Duration::from_secs(30), || {
        direct
            .query_one("SELECT v FROM hot WHERE id = 1", &[])
            .is_ok_and(|r| r.get::<_, i32>(0) == 1)
    });
    assert!(committed, "the commit became visible on the primary");
    let mut b = proxy.client();
    let read = b.simple_query("SELECT v FROM hot WHERE id = 1").unwrap();
    let value = read.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(
        value.as_deref(),
        Some("1"),
        "the read saw the commit on the primary"
    );
    holder
        .batch_execute("SELECT pg_advisory_unlock(4242)")
        .unwrap();
    let a = writer.join().unwrap();
    drop((a, b));
    let placed = |proxy: &Proxy| {
        proxy.metric("pgprism_compare_placed_total")
            + proxy.metric("pgprism_compare_inconclusive_concurrent_total")
            + proxy.metric("pgprism_compare_mismatches_total")
    };
    assert!(
        eventually(Duration::from_secs(60), || placed(&proxy) >= 1),
        "the read was judged: {}",
        proxy.log()
    );
    // /status counts it too.
    let (_, status) = proxy.admin_get("/status");
    let status: sonic_rs::Value = sonic_rs::from_str(&status).expect("status JSON");
    assert_eq!(
        status["counters"]["compare_placed"].as_u64(),
        Some(proxy.metric("pgprism_compare_placed_total")),
        "placed reads on /status"
    );
    (
        proxy.metric("pgprism_compare_mismatches_total"),
        proxy.metric("pgprism_compare_inconclusive_concurrent_total"),
        proxy.metric("pgprism_compare_placed_total"),
    )
}

/// Placing a read by its own result (`compare.place-reads-max`): the read above differs on
/// the shadow, is read again there just after the write it overlapped, agrees, and is a
/// match; without placement the same read is inconclusive.
#[test]
fn a_read_numbered_before_a_write_it_saw_is_placed_after_it() {
    assert_eq!(
        read_that_saw_a_later_answered_write("pl", &[], ""),
        (0, 0, 1),
        "(mismatches, inconclusive, placed) with placement"
    );
    assert_eq!(
        read_that_saw_a_later_answered_write("pl0", &["--compare-place-reads-max", "0"], ""),
        (0, 1, 0),
        "(mismatches, inconclusive, placed) without placement"
    );
}

/// A shadow whose sessions default to repeatable read (the role's setting, which the
/// placement's own session gets too): each re-read is a read-committed transaction of its
/// own, begun after its wait, so it sees the write it was placed after.
#[test]
fn a_read_is_placed_on_a_shadow_that_defaults_to_repeatable_read() {
    assert_eq!(
        read_that_saw_a_later_answered_write(
            "plrr",
            &[],
            "ALTER ROLE CURRENT_USER SET default_transaction_isolation = 'repeatable read'",
        ),
        (0, 0, 1),
        "(mismatches, inconclusive, placed)"
    );
}

/// The client side pooled per transaction: the session reads the lent connections' answers
/// with their kernel receive timestamps and relays them to compare's pump with them, so the
/// completion order is the one a session-mode pump gets (without them, numbered as the pump
/// read them: see docs/compare.md).
const TRANSACTION_POOLING: &[&str] = &[
    "--pool-mode",
    "transaction",
    "--pool-size",
    "16",
    "--auth-type",
    "trust",
];

#[test]
fn transaction_pooled_hot_rows_at_8_clients_give_no_false_mismatch() {
    hot_rows_without_false_mismatches("t8", 8, 150, 0.025, TRANSACTION_POOLING);
}

#[test]
fn transaction_pooled_hot_rows_at_64_clients_give_no_false_mismatch() {
    hot_rows_without_false_mismatches("t64", 64, 25, 0.05, TRANSACTION_POOLING);
}

/// Row granularity, end to end and through the extended protocol (`-M prepared`: the row
/// comes from each Bind's value): every client updates and reads its own row of one table.
/// A read then never overlaps another session's write of its row, so every read is pinned
/// (ordered per relation, each would overlap the other clients' writes: about twice as many
/// unpinned), and only writes, which are ordered per relation whatever the rows, may be.
#[test]
fn reads_of_rows_no_other_session_writes_are_pinned() {
    let p = pair("own");
    p.both(
        "CREATE TABLE own (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO own SELECT g, 0 FROM generate_series(1, 8) g;",
    );
    let script = p.dir.join("own.sql");
    std::fs::write(
        &script,
        "\\set id :client_id + 1
UPDATE own SET v = v + 1 WHERE id = :id;
SELECT v FROM own WHERE id = :id;
",
    )
    .expect("write the script");
    let proxy = p.proxy(&[]);
    let (clients, per_client) = (8u64, 100u64);
    let out = pgbench(
        &proxy,
        &[
            "-M",
            "prepared",
            "-c",
            "8",
            "-j",
            "2",
            "-t",
            "100",
            "-f",
            &script.display().to_string(),
        ],
    );
    assert!(out.contains("prepared"), "{out}");
    let writes = clients * per_client;
    let (mismatches, concurrent, _, compared) = verdicts(&proxy, 2 * writes);
    let unpinned = proxy.metric("pgprism_compare_unpinned_total");
    eprintln!(
        "own rows, 8 clients, prepared: {compared} compared, {mismatches} mismatches, \
         {concurrent} inconclusive, {unpinned} unpinned"
    );
    assert_eq!(
        (mismatches, concurrent),
        (0, 0),
        "{:?}",
        p.reports().first()
    );
    // Some slack for a read whose time on the primary spanned more writes of the table than
    // the ledger remembers (a stalled connection): such a read counts as unpinned.
    assert!(
        unpinned <= writes + writes / 4,
        "{unpinned} unpinned of {compared}: reads of rows only their session writes overlapped"
    );
    let sum = "SELECT sum(v) FROM own";
    assert_eq!(p.primary.psql(sum).ok(), p.shadow.psql(sum).ok());
}

#[test]
fn pgbench_builtin_workloads_give_no_false_mismatch() {
    let p = pair("pgb");
    for inst in [&p.primary, &p.shadow] {
        let port = inst.port().to_string();
        let out = Command::new("pgbench")
            .args(["-i", "-s", "1", "-q", "-h", inst.host(), "-p", &port])
            .args(["-U", "postgres", "postgres"])
            .output()
            .expect("pgbench -i");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let proxy = p.proxy(&[]);
    // -N: 5 statements a transaction (BEGIN, UPDATE, SELECT, INSERT, END); TPC-B: 7.
    pgbench(&proxy, &["-N", "-c", "8", "-j", "2", "-t", "60"]);
    pgbench(&proxy, &["-c", "8", "-j", "2", "-t", "60"]);
    let statements = 8 * 60 * (5 + 7);
    let (mismatches, concurrent, _, compared) = verdicts(&proxy, statements);
    let rate = concurrent as f64 / compared.max(1) as f64;
    eprintln!(
        "pgbench -N and TPC-B, 8 clients: {compared} compared, {mismatches} mismatches, \
         {concurrent} inconclusive ({:.3}%), {} waits expired, {} lock breaks",
        rate * 100.0,
        proxy.metric("pgprism_compare_order_waits_expired_total"),
        proxy.metric("pgprism_compare_order_lock_breaks_total")
    );
    assert_eq!(mismatches, 0, "{:?}", p.reports().first());
    assert!(rate <= 0.01, "inconclusive rate {rate} above 1%");
    let balance = "SELECT sum(bbalance), sum(tbalance) FROM pgbench_branches, pgbench_tellers";
    assert_eq!(p.primary.psql(balance).ok(), p.shadow.psql(balance).ok());
}

/// Waits for a mismatch report whose statement starts with `prefix` and has `kind`.
fn mismatch_named(p: &Pair, prefix: &str, kind: &str) -> bool {
    eventually(Duration::from_secs(20), || {
        p.reports()
            .iter()
            .any(|r| support::is_mismatch(r, prefix, kind))
    })
}

#[test]
fn real_divergences_under_concurrency_are_mismatches() {
    let p = pair("div");
    p.both(HOT);
    // The shadow alters 1 write in 50; has a column of another type; and a unique index the
    // primary lacks.
    p.shadow
        .psql(
            "CREATE SEQUENCE every;
             CREATE FUNCTION skew() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF nextval('every') % 50 = 0 THEN NEW.v := NEW.v + 1000; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER skew BEFORE UPDATE ON hot FOR EACH ROW EXECUTE FUNCTION skew();",
        )
        .unwrap();
    p.primary
        .psql("CREATE TABLE typed (id int PRIMARY KEY, n int); INSERT INTO typed VALUES (1, 7)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE typed (id int PRIMARY KEY, n bigint); INSERT INTO typed VALUES (1, 7)")
        .unwrap();
    p.primary
        .psql("CREATE TABLE uniq (id serial PRIMARY KEY, k int)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE uniq (id serial PRIMARY KEY, k int UNIQUE)")
        .unwrap();
    let extra = p.dir.join("extra.sql");
    std::fs::write(
        &extra,
        "\\set k random(1, 1000000)
SELECT n FROM typed WHERE id = 1;
INSERT INTO uniq (k) VALUES (:k % 40);
",
    )
    .unwrap();
    let proxy = p.proxy(&[]);
    let script = script(&p).display().to_string();
    let extra_script = extra.display().to_string();
    pgbench(&proxy, &["-c", "8", "-j", "2", "-t", "100", "-f", &script]);
    pgbench(
        &proxy,
        &["-c", "4", "-j", "2", "-t", "25", "-f", &extra_script],
    );
    assert!(
        mismatch_named(&p, "SELECT v FROM hot", "values"),
        "the skewed writes were not found"
    );
    assert!(
        mismatch_named(&p, "SELECT n FROM typed", "column_types"),
        "the column of another type was not found"
    );
    assert!(
        mismatch_named(&p, "INSERT INTO uniq", "error"),
        "the unique violation on one side was not found"
    );
}

#[test]
fn calibration_against_the_primary_itself_finds_no_mismatch() {
    let p = pair("aa");
    p.primary.psql(HOT).unwrap();
    let report = p.report.display().to_string();
    let proxy = Proxy::compare(&p.primary.url(), None, &report, &["--calibrate"]);
    let script = script(&p).display().to_string();
    pgbench(&proxy, &["-c", "8", "-j", "2", "-t", "100", "-f", &script]);
    let (mismatches, concurrent, _, compared) = verdicts(&proxy, 8 * 100 * 2);
    eprintln!("calibration: {compared} compared, {concurrent} inconclusive");
    let first = p
        .reports()
        .into_iter()
        .find(|r| r["record"].as_str() == Some("mismatch"));
    assert_eq!(mismatches, 0, "{first:?}");
    // The writes ran once: on the primary.
    assert_eq!(sum_v(&p.primary).trim(), "800");
    // The noise rate per fingerprint, on /status: every read compared, the differences
    // counted as noise.
    let mut row = None;
    let counted = eventually(Duration::from_secs(10), || {
        let (_, body) = proxy.admin_get("/status");
        let status: sonic_rs::Value = sonic_rs::from_str(&body).expect("status JSON");
        row = status["compare"]["calibration"]
            .as_array()
            .and_then(|rows| {
                rows.iter()
                    .find(|r| r["statement"].as_str() == Some("select v from hot where id = ?"))
                    .cloned()
            });
        row.as_ref()
            .is_some_and(|r| r["compared"].as_u64() == Some(800))
    });
    let row = row.unwrap_or_default();
    assert!(counted, "calibration row on /status: {row:?}");
    assert_eq!(row["differed"].as_u64(), Some(concurrent));
    eprintln!(
        "calibration noise rate of the read: {:?}",
        row["noise_rate"].as_f64()
    );
}

#[test]
fn a_statement_cancelled_on_one_side_only_is_inconclusive() {
    let p = pair("cancel");
    let proxy = p.proxy(&[]);
    let mut client = proxy.client();
    // Cancelled on the primary alone (by another session there: a client's own CancelRequest
    // through pgprism reaches the shadow too, see tests/cancel.rs), the shadow runs it on.
    let primary = p.primary.url();
    let canceller = std::thread::spawn(move || {
        let mut watch = postgres::Client::connect(&primary, postgres::NoTls).expect("watch");
        let running = eventually(Duration::from_secs(10), || {
            watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(3)' AND state = 'active'",
                    &[],
                )
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        });
        assert!(running, "the statement never ran on the primary");
        watch
            .execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(3)' AND state = 'active'",
                &[],
            )
            .expect("cancel");
    });
    let err = client
        .simple_query("SELECT pg_sleep(3)")
        .expect_err("cancelled");
    canceller.join().expect("canceller");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("57014"));
    let found = eventually(Duration::from_secs(20), || {
        p.reports().iter().any(|r| {
            r["statement"].as_str() == Some("SELECT pg_sleep(3)")
                && r["record"].as_str() == Some("inconclusive")
                && r["reason"].as_str() == Some("a statement cancelled on one side")
        })
    });
    assert!(found, "reports: {:?}", p.reports());
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 0);
}

/// One primary completion of the order-gap measurement, from pgprism's trace.
struct Completion {
    /// pgprism's number in the completion order.
    c: u64,
    /// When the answer reached pgprism's socket (kernel timestamp, ns; 0: none).
    stamp: u64,
    /// When pgprism read it (ns).
    seen: u64,
    shard: u64,
    id: u64,
    write: bool,
    /// The row's value in the answer: a write's position in the row's order (from 1), or
    /// how many writes a read saw.
    v: i64,
}

/// The completions in a proxy log (`compare order: primary completion` trace lines).
fn completions(log: &str) -> Vec<Completion> {
    let mut out = Vec::new();
    for raw in log
        .lines()
        .filter(|l| l.contains("compare order: primary completion"))
    {
        // Without the terminal's colour escapes.
        let mut line = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' {
                for e in chars.by_ref() {
                    if e == 'm' {
                        break;
                    }
                }
            } else {
                line.push(ch);
            }
        }
        let num = |key: &str| -> Option<u64> {
            let at = line.find(&format!(" {key}="))? + key.len() + 2;
            line[at..]
                .split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let quoted = |key: &str| -> Option<&str> {
            let at = line.find(&format!("{key}=Some(\""))? + key.len() + 7;
            line[at..].split('"').next()
        };
        let (Some(c), Some(statement), Some(row)) = (num("c"), quoted("statement"), quoted("row"))
        else {
            continue;
        };
        let Some(id) = statement
            .split("id = ")
            .nth(1)
            .and_then(|t| t.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|t| t.parse().ok())
        else {
            continue;
        };
        let Ok(v) = row.trim_matches(|ch| ch == '(' || ch == ')').parse() else {
            continue;
        };
        out.push(Completion {
            c,
            stamp: num("stamp_ns").unwrap_or(0),
            seen: num("seen_ns").unwrap_or(0),
            shard: num("shard").unwrap_or(0),
            id,
            write: statement.starts_with("UPDATE"),
            v,
        });
    }
    out
}

/// How far an order `key` of the completions is from the primary's own order (each write's
/// RETURNING value): writes out of place and reads placed among another number of writes
/// than they saw, with a histogram of how many places.
fn order_gap(all: &[Completion], key: impl Fn(&Completion) -> u64) -> String {
    let bucket = |d: i64| match d.unsigned_abs() {
        0 => 0,
        1 => 1,
        2 => 2,
        3..=5 => 3,
        6..=10 => 4,
        _ => 5,
    };
    let (mut writes, mut reads) = ([0u64; 6], [0u64; 6]);
    let (mut adjacent, mut cross_shard) = (0u64, 0u64);
    let mut ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let mut row: Vec<&Completion> = all.iter().filter(|e| e.id == id && e.write).collect();
        row.sort_by_key(|e| e.v);
        let mut keys: Vec<u64> = row.iter().map(|e| key(e)).collect();
        for (i, e) in row.iter().enumerate() {
            let rank = keys.iter().filter(|&&k| k < key(e)).count();
            writes[bucket(rank as i64 - i as i64)] += 1;
        }
        for pair in row.windows(2) {
            if key(pair[1]) < key(pair[0]) {
                adjacent += 1;
                cross_shard += u64::from(pair[0].shard != pair[1].shard);
            }
        }
        keys.sort_unstable();
        for r in all.iter().filter(|e| e.id == id && !e.write) {
            let placed = keys.partition_point(|&k| k < key(r)) as i64;
            reads[bucket(placed - r.v)] += 1;
        }
    }
    let share = |h: &[u64; 6]| {
        let n: u64 = h.iter().sum();
        100.0 * (n - h[0]) as f64 / n.max(1) as f64
    };
    format!(
        "writes out of place {:.1}% (by 0/1/2/3-5/6-10/>10 places: {writes:?}), adjacent \
         writes inverted {adjacent} ({cross_shard} across shards); reads misplaced {:.1}% \
         ({reads:?})",
        share(&writes),
        share(&reads)
    )
}

/// The order-gap measurement of issue 15, not a pass/fail test: runs the hot-row workload
/// with `UPDATE ... RETURNING v` (the primary's own order of each row's writes) at 8 and 64
/// clients, with 2 shards and 1, and prints how far pgprism's completion order, the order in
/// which pgprism read the answers and the order of the kernel's receive timestamps are from
/// the primary's. `PGPRISM_GAP_RUNS` (e.g. `8:2,64:1`: clients:shards) picks the runs,
/// `PGPRISM_GAP_ARGS` adds proxy flags (e.g. `--compare-order-hold-ms 0`).
#[test]
#[ignore = "a measurement: cargo nextest run --test compare_concurrent hot_row_order_gap --run-ignored only --no-capture"]
fn hot_row_order_gap() {
    // SAFETY: nextest runs each test in a process of its own, and nothing else in it reads
    // the environment concurrently; the proxies started below inherit it.
    unsafe {
        std::env::set_var("RUST_LOG", "pgprism=info,pgprism::compare::exchange=trace");
    }
    let runs = std::env::var("PGPRISM_GAP_RUNS").unwrap_or_else(|_| "8:2,8:1,64:2,64:1".into());
    for run in runs.split(',') {
        let (clients, shards) = run.split_once(':').expect("clients:shards");
        let clients: usize = clients.parse().expect("clients");
        let per_client = if clients >= 32 { 25 } else { 150 };
        let p = pair(&format!("gap{clients}x{shards}"));
        p.both(HOT);
        std::fs::write(
            script(&p),
            "\\set id random(1, 5)
UPDATE hot SET v = v + 1 WHERE id = :id RETURNING v;
SELECT v FROM hot WHERE id = :id;
",
        )
        .expect("write the script");
        let extra = std::env::var("PGPRISM_GAP_ARGS").unwrap_or_default();
        let mut args = vec!["--shards", shards];
        args.extend(extra.split_whitespace());
        let proxy = p.proxy(&args);
        let script = script(&p).display().to_string();
        let (c, t) = (clients.to_string(), per_client.to_string());
        pgbench(&proxy, &["-c", &c, "-j", "2", "-t", &t, "-f", &script]);
        let statements = (clients * per_client * 2) as u64;
        let (mismatches, concurrent, _, compared) = verdicts(&proxy, statements);
        let (_, status) = proxy.admin_get("/status");
        let status: sonic_rs::Value = sonic_rs::from_str(&status).expect("status JSON");
        let lag = &status["compare_shadow_lag"];
        let log = proxy.log();
        // The raw trace, for working out other numberings offline.
        if let Ok(dir) = std::env::var("PGPRISM_GAP_DUMP") {
            let path = format!("{dir}/gap-{clients}x{shards}.log");
            std::fs::write(&path, &log).expect("write the trace");
        }
        let all = completions(&log);
        let mut delays: Vec<u64> = all
            .iter()
            .filter(|e| e.stamp > 0)
            .map(|e| e.seen.saturating_sub(e.stamp) / 1000)
            .collect();
        delays.sort_unstable();
        let pct = |q: f64| {
            delays
                .get(((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1)))
                .copied()
        };
        eprintln!(
            "order gap, {clients} clients, {shards} shard(s): {compared} compared, {mismatches} \
             mismatches, {concurrent} inconclusive ({:.2}%), {} unpinned, {} waits expired, {} \
             lock breaks, shadow lag p50 {:?} p99 {:?} us; {} completions traced, {} stamped; read delay after the socket (us) p50 {:?} p99 {:?} max {:?}\n  \
             pgprism's numbers: {}\n  read order:        {}\n  kernel stamps:     {}",
            100.0 * concurrent as f64 / compared.max(1) as f64,
            proxy.metric("pgprism_compare_unpinned_total"),
            proxy.metric("pgprism_compare_order_waits_expired_total"),
            proxy.metric("pgprism_compare_order_lock_breaks_total"),
            lag["p50_us"].as_u64(),
            lag["p99_us"].as_u64(),
            all.len(),
            delays.len(),
            pct(0.5),
            pct(0.99),
            delays.last(),
            order_gap(&all, |e| e.c),
            order_gap(&all, |e| e.seen),
            order_gap(&all, |e| if e.stamp > 0 { e.stamp } else { e.seen }),
        );
    }
}
