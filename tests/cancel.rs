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
    let shadow = shadow.url();
    let report = report.path();
    let mut args = vec![
        "--shadow",
        &shadow,
        "--compare-report",
        &report,
        "--slow-query-min-ms",
        "60000",
    ];
    args.extend_from_slice(extra);
    Proxy::start(&primary.url(), &args)
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
