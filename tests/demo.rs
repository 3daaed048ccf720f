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
    // The changed balance and the missing index are both found and described.
    assert!(
        stdout.contains("pgbench_accounts aid=4242: primary (4242,1,0) / shadow (4242,1,42)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 on the primary, 0 on the shadow"),
        "{stdout}"
    );
    // Side-by-side latency: the bench table with both targets, and pgprism's own view.
    assert!(stdout.contains("primary via pgprism"), "{stdout}");
    assert!(
        stdout.contains("shadow / primary via pgprism: p50"),
        "{stdout}"
    );
    assert!(
        stdout.contains("select abalance from pgbench_accounts where aid"),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(out_dir.join("latency.svg")).expect("chart written");
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);
    let _ = std::fs::remove_dir_all(&out_dir);
}
