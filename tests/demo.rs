//! `pgprism demo`: the README's first command, end to end on real PostgreSQL servers.

mod support;

#[test]
fn demo_runs_reports_the_deliberate_difference_and_exits() {
    let out_dir = std::env::temp_dir().join(format!("pgprism-demo-{}", std::process::id()));
    let out = support::pgprism_command()
        .args([
            "demo",
            "--duration",
            "5",
            "--port",
            "0",
            "--serve",
            "false",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .expect("run pgprism demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Compare mode found the changed balance (with the rows) and the missing index (the
    // shadow's plan scans the table while the primary's uses the index).
    for expected in [
        "MISMATCH  SELECT aid, abalance FROM pgbench_accounts WHERE aid = 4242",
        "row values differ",
        "primary rows [\"(4242, 0)\"]",
        "shadow rows  [\"(4242, 42)\"]",
        "primary plan: Index Scan",
        "shadow plan:  Seq Scan",
        // Side-by-side latency of the two servers.
        "shadow / primary: p50",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    let svg = std::fs::read_to_string(out_dir.join("latency.svg")).expect("chart written");
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);
    let _ = std::fs::remove_dir_all(&out_dir);
}
