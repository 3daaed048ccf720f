//! CDC benchmarks as tests: the pipeline benchmark on a tiny input (so it cannot rot), and the
//! end-to-end comparison with `pg_recvlogical`, ignored by default because it is a benchmark:
//!
//! `cargo nextest run --release --test cdc_bench --run-ignored only --no-capture`
//! (`PGPRISM_BENCH_ROWS` sets the row count, default 1,000,000), and the initial snapshot
//! against `COPY ... TO STDOUT` into /dev/null (`benches/cdc-snapshot.sh`).

#[allow(dead_code)]
#[path = "../benches/cdc_pipeline.rs"]
mod pipeline_bench;
#[path = "support/starrocks.rs"]
mod starrocks;
mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgprism::embed::{Instance, InstanceConfig};

/// The emulator runs in this process and allocates per row: glibc's malloc spent a tenth of the
/// benchmark's CPU consolidating its free lists. mimalloc is what pgprism itself runs on.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use starrocks::{ColType, StarRocks};
use support::{eventually, pgprism_command, pgprism_command_of};

#[test]
fn pipeline_bench_runs_on_tiny_input() {
    let a = pipeline_bench::run(2_500);
    let b = pipeline_bench::run(2_500);
    assert_eq!(a.rows, 2_500);
    assert_eq!(a.checksum, b.checksum, "deterministic input and output");
    println!("checksum {:016x}", a.checksum);
}

/// Runs of each side, alternated; medians are reported (the build machines are shared).
const RUNS: usize = 3;

/// The emulator as the end-to-end benchmarks use it: storing every row (the default), or,
/// with `PGPRISM_BENCH_EMULATOR=sink`, checking and counting loads without keeping rows
/// ([`StarRocks::sink`]), so that on a small machine the figure is pgprism's rather than the
/// emulator's. Which one ran is printed with the figures.
struct Target {
    sr: StarRocks,
    sink: bool,
}

impl Target {
    fn start() -> Target {
        let sr = StarRocks::start("root", "pw");
        let sink = std::env::var("PGPRISM_BENCH_EMULATOR").is_ok_and(|m| m == "sink");
        if sink {
            sr.sink();
        }
        println!(
            "emulator mode: {}",
            if sink {
                "sink (loads checked and counted, rows not kept)"
            } else {
                "store (every row kept in its table)"
            }
        );
        Target { sr, sink }
    }

    /// The benchmarks' table `db.t`, with room for `rows` rows.
    fn create(&self, db: &str, rows: usize) {
        self.sr.create_table(
            db,
            "t",
            &["id"],
            &[
                ("id", ColType::Int),
                ("v", ColType::Text),
                ("n", ColType::Int),
            ],
        );
        self.sr.reserve(db, "t", rows);
    }

    /// Rows in `db.t`: the table's, or in sink mode the rows made visible since `base` (the
    /// benchmarks load each key once).
    fn rows(&self, db: &str, base: usize) -> usize {
        if self.sink {
            self.sr.applied_rows(db, "t") - base
        } else {
            self.sr.row_count(db, "t")
        }
    }
}

#[test]
#[ignore = "benchmark; run with --release --run-ignored only"]
fn end_to_end_against_pg_recvlogical() {
    let rows: usize = std::env::var("PGPRISM_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pg = Instance::start(InstanceConfig {
        name: "cdc-bench".into(),
        settings: vec![
            ("max_wal_size".into(), "4GB".into()),
            ("max_replication_slots".into(), "16".into()),
            ("max_wal_senders".into(), "16".into()),
        ],
        ..InstanceConfig::default()
    })
    .unwrap();
    let mut c = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    let target = Target::start();
    let sr = &target.sr;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text, n bigint);
         ALTER TABLE t REPLICA IDENTITY FULL;
         CREATE PUBLICATION bench_pub FOR TABLE t;",
    )
    .unwrap();
    // Every run gets its own slot made before the insert, so each drains the same change.
    for run in 0..RUNS {
        target.create(&format!("bench{run}"), rows);
        for slot in [format!("recv{run}"), format!("cdc{run}")] {
            // One statement each: a slot cannot be created in a transaction that wrote.
            c.batch_execute(&format!(
                "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
            ))
            .unwrap();
        }
    }
    let per_txn = 10_000;
    let mut sql = String::new();
    for start in (0..rows).step_by(per_txn) {
        let end = (start + per_txn).min(rows);
        sql.push_str(&format!(
            "INSERT INTO t SELECT g, 'row ' || g, g * 7 FROM generate_series({}, {end}) g;\n",
            start + 1
        ));
    }
    let t = Instant::now();
    c.batch_execute(&sql).unwrap();
    println!(
        "inserted {rows} rows in {:.2} s ({per_txn} rows per transaction)",
        t.elapsed().as_secs_f64()
    );
    let end_lsn: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);

    let recvlogical = pg.psql_path().with_file_name("pg_recvlogical");
    let (mut recv_secs, mut cdc_secs) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let t = Instant::now();
        let status = std::process::Command::new(&recvlogical)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args([
                "--slot",
                &format!("recv{run}"),
                "--start",
                "--no-loop",
                "--endpos",
                &end_lsn,
            ])
            .args([
                "-f",
                "/dev/null",
                "-o",
                "proto_version=2",
                "-o",
                "publication_names=bench_pub",
            ])
            .args(["-o", "streaming=on"])
            .status()
            .expect("run pg_recvlogical");
        recv_secs.push(t.elapsed().as_secs_f64());
        assert!(status.success(), "pg_recvlogical failed");

        let db = format!("bench{run}");
        let t = Instant::now();
        let mut child = pgprism_command()
            .args([
                "cdc",
                "--source",
                &pg.url(),
                "--starrocks",
                &sr.url(),
                "--database",
                &db,
                // Schema changes follow the source by default: the FE query port is needed.
                "--starrocks-query-port",
                &sr.query.port().to_string(),
            ])
            .args([
                "--tables",
                "t",
                "--publication",
                "bench_pub",
                "--slot",
                &format!("cdc{run}"),
            ])
            .args(["--log", "warn", "--flush-interval-ms", "200"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // Setup (checks, slot, StarRocks tables) until pgprism says it streams.
        let setup = t.elapsed().as_secs_f64();
        let done = eventually(Duration::from_secs(600), || target.rows(&db, 0) == rows);
        cdc_secs.push(t.elapsed().as_secs_f64());
        let cpu = cpu_seconds(&child.id().to_string());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            done,
            "pgprism did not drain {rows} rows (has {})",
            target.rows(&db, 0)
        );
        println!(
            "run {run}: pg_recvlogical {:.2} s, pgprism {:.2} s (setup {setup:.2} s; pgprism CPU {cpu:.2} s)",
            recv_secs[run], cdc_secs[run]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (recv, cdc) = (median(&mut recv_secs), median(&mut cdc_secs));
    let (recv_rate, cdc_rate) = (rows as f64 / recv, rows as f64 / cdc);
    println!("pg_recvlogical to /dev/null: median {recv:.2} s = {recv_rate:.0} rows/s");
    println!("pgprism cdc into the emulator: median {cdc:.2} s = {cdc_rate:.0} rows/s");
    println!(
        "ratio pgprism / pg_recvlogical = {:.2}",
        cdc_rate / recv_rate
    );
    println!("emulator (this process) CPU {:.2} s", cpu_seconds("self"));
}

/// The initial snapshot of one table (2 workers) against `psql -c "COPY t TO STDOUT"` into
/// /dev/null, same table, same run, alternated; medians. Also timed in each run: `COPY t TO
/// '/dev/null'` on the server, and two clients each reading half the table with `COPY
/// (SELECT ...) TO STDOUT (FORMAT csv)` at once (the most a 2-worker CSV snapshot could do
/// with nothing else running). The snapshot's time runs from the
/// start of `pgprism cdc` until the emulator holds every row (setup and slot creation
/// included); COPY's from the start of psql to its exit.
#[test]
#[ignore = "benchmark; run with benches/cdc-snapshot.sh"]
fn snapshot_against_copy() {
    struct Side {
        bin: String,
        args: Vec<String>,
    }
    let rows: usize = std::env::var("PGPRISM_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pg = Instance::start(InstanceConfig {
        name: "cdc-snap-bench".into(),
        settings: vec![
            ("max_wal_size".into(), "4GB".into()),
            ("max_replication_slots".into(), "16".into()),
            ("max_wal_senders".into(), "16".into()),
        ],
        ..InstanceConfig::default()
    })
    .unwrap();
    let mut c = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text, n bigint);
         INSERT INTO t SELECT g, 'row ' || g, g * 7 FROM generate_series(1, {rows}) g;"
    ))
    .unwrap();
    // (Its own statement: VACUUM cannot run in the implicit transaction of a batch.)
    c.batch_execute("VACUUM ANALYZE t").unwrap();
    let target = Target::start();
    let sr = &target.sr;
    let (mut copy_secs, mut snap_secs) = (Vec::new(), Vec::new());
    let (mut file_secs, mut halves_secs) = (Vec::new(), Vec::new());
    let psql = |sql: &str| {
        std::process::Command::new(pg.psql_path())
            .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-X", "-q"])
            .args(["-c", sql])
            .stdout(Stdio::from(std::fs::File::create("/dev/null").unwrap()))
            .spawn()
            .expect("run psql")
    };
    // A side (this build, PGPRISM_BENCH_ARGS added to its command line) and, when
    // PGPRISM_BENCH_ARGS_B or PGPRISM_BENCH_BIN_B is set, a B side beside it in each run
    // (that binary, those arguments): an interleaved A/B on a machine others load.
    let side = |bin: Option<String>, args: Option<String>| Side {
        bin: bin.unwrap_or_else(|| env!("CARGO_BIN_EXE_pgprism").to_string()),
        args: args
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect(),
    };
    // (Empty is unset: benches/cdc-snapshot.sh passes every variable.)
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let a_side = side(None, var("PGPRISM_BENCH_ARGS"));
    let (b_bin, b_args) = (var("PGPRISM_BENCH_BIN_B"), var("PGPRISM_BENCH_ARGS_B"));
    let b_side = (b_bin.is_some() || b_args.is_some()).then(|| side(b_bin, b_args));
    if let Some(b) = &b_side {
        println!("side A: {:?}; side B: {} {:?}", a_side.args, b.bin, b.args);
    }
    let mut b_secs = Vec::new();
    // One snapshot of the table by `pgprism cdc` into a fresh emulator database: its wall
    // time (until the emulator holds every row), setup time and pgprism's CPU.
    // Also the machine's busy CPU and this process's CPU over the same span as the wall time
    // (read in `last_busy`).
    let last_busy = std::cell::Cell::new((0.0, 0.0));
    // pgprism's minor page faults in the last snapshot.
    let last_faults = std::cell::Cell::new(0u64);
    let snapshot = |slot: &str, side: &Side| -> (f64, f64, f64) {
        // Created afresh each run: the emulator keeps every row in memory.
        let db = "snap".to_string();
        target.create(&db, rows);
        let base = sr.applied_rows(&db, "t");
        let (busy, own) = (machine_busy_seconds(), cpu_seconds("self"));
        let t = Instant::now();
        let mut child = pgprism_command_of(&side.bin)
            .args(["cdc", "--source", &pg.url(), "--starrocks", &sr.url()])
            .args(["--database", &db, "--tables", "t"])
            .args(["--slot", slot, "--snapshot-workers", "2"])
            .args(
                ["--log", "warn"]
                    .iter()
                    .filter(|_| !side.args.iter().any(|a| a == "--log")),
            )
            .args(&side.args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let setup = t.elapsed().as_secs_f64();
        // Ends early when pgprism does (a bad argument, say), rather than waiting out the
        // deadline.
        let done = eventually(Duration::from_secs(1800), || {
            target.rows(&db, base) == rows || !matches!(child.try_wait(), Ok(None))
        }) && target.rows(&db, base) == rows;
        let secs = t.elapsed().as_secs_f64();
        last_busy.set((machine_busy_seconds() - busy, cpu_seconds("self") - own));
        let cpu = cpu_seconds(&child.id().to_string());
        last_faults.set(minor_faults(&child.id().to_string()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            done,
            "the snapshot did not copy {rows} rows (has {})",
            target.rows(&db, base)
        );
        (secs, setup, cpu)
    };
    // The whole machine's busy CPU seconds per phase (all processes, from /proc/stat): with
    // the emulator's and pgprism's own CPU, what the snapshot asks of the database, and the
    // wall time the cores allow for that much work.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut busy_lines = Vec::new();
    for run in 0..RUNS {
        let busy = machine_busy_seconds();
        let t = Instant::now();
        let status = psql("COPY t TO STDOUT").wait().unwrap();
        copy_secs.push(t.elapsed().as_secs_f64());
        assert!(status.success(), "COPY failed");
        // The floors: the server writing the table to /dev/null itself (the measure),
        // and what the snapshot's two workers cannot go below, two clients each reading half
        // of the key range in CSV and doing nothing else.
        let copy_busy = machine_busy_seconds() - busy;
        let busy = machine_busy_seconds();
        let t = Instant::now();
        assert!(psql("COPY t TO '/dev/null'").wait().unwrap().success());
        file_secs.push(t.elapsed().as_secs_f64());
        let file_busy = machine_busy_seconds() - busy;
        let busy = machine_busy_seconds();
        let t = Instant::now();
        let half = rows / 2;
        let mut a = psql(&format!(
            "COPY (SELECT * FROM t WHERE id <= {half}) TO STDOUT (FORMAT csv)"
        ));
        let mut b = psql(&format!(
            "COPY (SELECT * FROM t WHERE id > {half}) TO STDOUT (FORMAT csv)"
        ));
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        halves_secs.push(t.elapsed().as_secs_f64());
        let halves_busy = machine_busy_seconds() - busy;

        // The sides take turns going first: the first snapshot after the COPYs ran slower
        // (the same build on both sides at 10 M rows, load 9 to 17: 6.93 s against 6.30 s).
        let b_first = run % 2 == 1;
        let mut b_line = None;
        let mut side_b = || {
            if let Some(b) = &b_side {
                let (secs, setup, cpu) = snapshot(&format!("snapb{run}"), b);
                b_secs.push(secs);
                b_line = Some(format!(
                    "run {run}: side B snapshot {secs:.2} s (setup {setup:.2} s; pgprism CPU {cpu:.2} s, {} minor faults){}",
                    last_faults.get(),
                    if b_first { ", ran first" } else { "" }
                ));
            }
        };
        if b_first {
            side_b();
        }
        let (secs, setup, cpu) = snapshot(&format!("snap{run}"), &a_side);
        let (snap_busy, emulator) = last_busy.get();
        let faults = last_faults.get();
        busy_lines.push(format!(
            "run {run}, machine CPU busy (all processes): COPY TO STDOUT {copy_busy:.2} s, TO '/dev/null' \
             {file_busy:.2} s, two halves {halves_busy:.2} s, snapshot {snap_busy:.2} s = pgprism \
             {cpu:.2} + this test process (the emulator, its polling) {emulator:.2} + the rest (PostgreSQL, psql, kernel threads) {:.2}; \
             {cores} cores: the snapshot's work takes at least {:.2} s of wall time ({:.0}% of \
             the cores busy while it ran)",
            snap_busy - cpu - emulator,
            snap_busy / cores,
            100.0 * snap_busy / (cores * secs),
        ));
        if !b_first {
            side_b();
        }
        snap_secs.push(secs);
        println!(
            "run {run}: COPY TO STDOUT {:.2} s, COPY TO '/dev/null' {:.2} s, two half-range COPYs in CSV {:.2} s, pgprism snapshot {:.2} s (setup {setup:.2} s; pgprism CPU {cpu:.2} s, {faults} minor faults)",
            copy_secs[run], file_secs[run], halves_secs[run], snap_secs[run]
        );
        if let Some(line) = b_line {
            println!("{line}");
        }
        println!("{}", busy_lines[run]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (copy, snap) = (median(&mut copy_secs), median(&mut snap_secs));
    let (file, halves) = (median(&mut file_secs), median(&mut halves_secs));
    println!(
        "COPY t TO '/dev/null' (server side): median {file:.2} s; two half-range COPYs in CSV to psql: median {halves:.2} s"
    );
    let (copy_rate, snap_rate) = (rows as f64 / copy, rows as f64 / snap);
    println!("COPY t TO STDOUT > /dev/null: median {copy:.2} s = {copy_rate:.0} rows/s");
    println!(
        "pgprism snapshot into the emulator (2 workers): median {snap:.2} s = {snap_rate:.0} rows/s"
    );
    println!("ratio snapshot / COPY = {:.2}", snap_rate / copy_rate);
    if !b_secs.is_empty() {
        let b = median(&mut b_secs);
        let b_rate = rows as f64 / b;
        println!(
            "side B snapshot: median {b:.2} s = {b_rate:.0} rows/s, ratio to COPY = {:.2}",
            b_rate / copy_rate
        );
    }
    println!("emulator (this process) CPU {:.2} s", cpu_seconds("self"));
}

/// One transaction of ROWS rows (default 5,000,000) streamed through `pgprism cdc` with the
/// default `stream-buffer-bytes-max` (64 MiB): it spills, and pgprism's peak resident memory
/// (`VmHWM`) must stay under 256 MiB. Prints the time until the emulator holds every row.
#[test]
#[ignore = "benchmark; run with benches/cdc-spill.sh"]
fn large_transaction_in_bounded_memory() {
    let rows: usize = std::env::var("PGPRISM_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let pg = Instance::start(InstanceConfig {
        name: "cdc-spill-bench".into(),
        settings: vec![("max_wal_size".into(), "8GB".into())],
        ..InstanceConfig::default()
    })
    .unwrap();
    let mut c = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text, n bigint)")
        .unwrap();
    let sr = StarRocks::start("root", "pw");
    sr.create_table(
        "spill",
        "t",
        &["id"],
        &[
            ("id", ColType::Int),
            ("v", ColType::Text),
            ("n", ColType::Int),
        ],
    );
    let scratch = support::TempDir::new("spill-bench");
    let dir = scratch.join("spill");
    let mut child = pgprism_command()
        .args(["cdc", "--source", &pg.url(), "--starrocks", &sr.url()])
        // Schema changes follow the source by default: the FE query port is needed (without
        // it pgprism stopped at its first load and this benchmark waited an hour).
        .args(["--starrocks-query-port", &sr.query.port().to_string()])
        .args(["--database", "spill", "--tables", "t", "--log", "warn"])
        .args(["--spill-dir", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let t = Instant::now();
    c.batch_execute(&format!(
        "INSERT INTO t SELECT g, 'row ' || g, g * 7 FROM generate_series(1, {rows}) g"
    ))
    .unwrap();
    let inserted = t.elapsed().as_secs_f64();
    let done = eventually(Duration::from_secs(3600), || {
        sr.row_count("spill", "t") == rows || !matches!(child.try_wait(), Ok(None))
    }) && sr.row_count("spill", "t") == rows;
    let secs = t.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let cpu = cpu_seconds(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        done,
        "pgprism did not stream {rows} rows (has {})",
        sr.row_count("spill", "t")
    );
    println!(
        "one {rows}-row transaction: inserted in {inserted:.2} s, in StarRocks after {secs:.2} s, pgprism CPU {cpu:.2} s"
    );
    println!("pgprism peak RSS (VmHWM) {} MiB", peak_kb / 1024);
    assert!(peak_kb < 256 * 1024, "peak RSS {peak_kb} kB");
}

/// The Stream Load emulator alone, without PostgreSQL or pgprism: ROWS rows (default
/// 1,000,000) of the benchmarks' table, as pgprism writes them, loaded through the transaction
/// interface in transactions of 50,000 rows (`snapshot-chunk-rows`) from one client thread.
/// The rate is the emulator's ceiling on this machine, to compare with the end-to-end figures.
#[test]
#[ignore = "benchmark; run with --release --run-ignored only"]
fn emulator_alone() {
    let rows: usize = std::env::var("PGPRISM_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let target = Target::start();
    let sr = &target.sr;
    // Not reserved: the map grows as it does in the other benchmarks' first runs.
    sr.create_table(
        "alone",
        "t",
        &["id"],
        &[
            ("id", ColType::Int),
            ("v", ColType::Text),
            ("n", ColType::Int),
        ],
    );
    let per_txn = 50_000;
    let bodies: Vec<String> = (0..rows)
        .step_by(per_txn)
        .map(|start| {
            let rows = (start + 1..=(start + per_txn).min(rows))
                .map(|g| {
                    format!(
                        "{{\"id\":{g},\"v\":\"row {g}\",\"n\":{},\"__op\":0}}",
                        g * 7
                    )
                })
                .collect::<Vec<_>>();
            format!("[{}]", rows.join(","))
        })
        .collect();
    let cpu_before = cpu_seconds("self");
    let t = Instant::now();
    for (i, body) in bodies.iter().enumerate() {
        let label = format!("alone-{i}");
        let headers = [("label", label.as_str()), ("db", "alone"), ("table", "t")];
        for op in ["begin", "load", "prepare", "commit"] {
            let load = [
                ("format", "json"),
                ("strip_outer_array", "true"),
                ("columns", "id,v,n,__op"),
            ];
            let extra: &[(&str, &str)] = if op == "load" { &load } else { &[] };
            let body = if op == "load" { body.as_str() } else { "" };
            let answer = http(
                sr.be,
                &format!("/api/transaction/{op}"),
                &headers,
                extra,
                body,
            );
            assert!(answer.contains("\"Status\":\"OK\""), "{op}: {answer}");
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds("self") - cpu_before;
    assert_eq!(target.rows("alone", 0), rows);
    println!(
        "emulator alone: {rows} rows in {secs:.2} s = {:.0} rows/s, {cpu:.2} s CPU ({:.2} us per row)",
        rows as f64 / secs,
        cpu * 1e6 / rows as f64
    );
}

/// One HTTP/1.1 request with Basic auth (`root:pw`); the answer's body.
fn http(
    to: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    extra: &[(&str, &str)],
    body: &str,
) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(to).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {to}\r\nAuthorization: Basic cm9vdDpwdw==\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers.iter().chain(extra) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(answer)
}

/// The CPU seconds the whole machine spent busy so far (every CPU's user, nice, system, irq,
/// softirq and steal time in /proc/stat's first line).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum::<f64>()
        / 100.0
}

/// Minor page faults of a process (all its threads, the ended ones too), from /proc: a
/// fresh page the kernel maps and zeroes costs more than the bytes written into it.
fn minor_faults(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|x| x.1.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
