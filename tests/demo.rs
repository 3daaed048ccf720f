//! `pgprism demo`: the README's first command, end to end on real PostgreSQL servers.

mod support;

use std::io::{BufRead, BufReader};

/// Whether `text` holds a `postgres://user:password@...` URL.
fn has_url_with_password(text: &str) -> bool {
    text.match_indices("postgres://").any(|(at, scheme)| {
        let rest = &text[at + scheme.len()..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '/')
            .unwrap_or(rest.len());
        rest[..end]
            .split_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
    })
}

/// Command lines of `pid` and its children that hold a URL with a password (only these: other
/// programs on the machine are not the demo's business).
fn argv_with_passwords(pid: u32) -> Vec<String> {
    let parent_of = |dir: &std::path::Path| -> Option<u32> {
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let path = entry.path();
        let ours =
            entry.file_name().to_str() == Some(&pid.to_string()) || parent_of(&path) == Some(pid);
        if !ours {
            continue;
        }
        if let Ok(raw) = std::fs::read(path.join("cmdline")) {
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            if has_url_with_password(&line) {
                found.push(line);
            }
        }
    }
    found
}

/// How many processes `pid` has as parent.
fn children_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|text| text.split_whitespace().count())
        .unwrap_or(0)
}

/// Files the demo wrote for its proxy child (they hold passwords) still in `dir`.
fn files_named_proxy(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("proxy-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn demo_runs_reports_the_deliberate_difference_and_exits() {
    let out_dir = support::TempDir::new("demo");
    let mut demo = support::pgprism_command()
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
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run pgprism demo");
    let mut stdout = String::new();
    let mut proxy_checked = false;
    let demo_pid = demo.id();
    for line in BufReader::new(demo.stdout.take().unwrap()).lines() {
        let line = line.expect("demo output");
        if line.starts_with("2. compare mode") {
            // The proxy child runs now: no process shows a server's password in its argv
            // (readable by every local user), and its config file is gone already.
            let shown = argv_with_passwords(demo_pid);
            assert_eq!(shown, Vec::<String>::new());
            assert!(
                children_of(demo_pid) > 0,
                "the proxy child is not running:\n{stdout}"
            );
            assert_eq!(files_named_proxy(&out_dir), Vec::<String>::new());
            proxy_checked = true;
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = demo.wait().expect("wait for pgprism demo");
    assert!(status.success(), "stdout:\n{stdout}");
    assert!(proxy_checked, "no compare step in:\n{stdout}");
    // Printed URLs carry no password.
    assert!(!has_url_with_password(&stdout), "{stdout}");
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
}
