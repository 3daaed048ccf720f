//! The real drivers' workloads (`tests/clients/`: a JDBC application and a psycopg2 one), run
//! as child processes against a proxy or a server, and what their output must say. Shared by
//! the driver tests (`tests/clients.rs`) and the transaction-pooling scale test
//! (`tests/pool_scale.rs`), which runs them beside 2,000 pgbench clients.
//!
//! Needs java and the JDBC driver (`libpostgresql-jdbc-java`) and Debian's python3 with
//! `python3-psycopg2`; `.ci/run` installs them. A missing one fails the test, naming the
//! package, rather than skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgprism::embed::Instance;

pub const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";
pub const PYTHON: &str = "/usr/bin/python3";

/// The `application_name` of the tests' own connections that read results (checksums): tests
/// that count pgprism's server connections leave these out.
pub const OBSERVER: &str = "pgprism-test-observer";

/// Where and as whom a workload logs in.
pub struct Login<'a> {
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
    /// `None`: the server (or pgprism) trusts the user.
    pub password: Option<&'a str>,
    /// The drivers' connect timeout: a login through a proxy busy with thousands of clients
    /// takes longer than one to an idle server.
    pub connect_timeout_s: u32,
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs `cmd` to its end and returns its stdout; fails the test with its output when it fails.
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e} (see .ci/run for what to install)"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the JDBC workload (`tests/clients/JdbcWorkload.java`) as `login` says, creating
/// `table`; returns its output (see [`assert_jdbc`]).
pub fn jdbc(login: &Login, table: &str) -> String {
    assert!(
        Path::new(JDBC_JAR).exists(),
        "{JDBC_JAR} is missing: apt-get install libpostgresql-jdbc-java"
    );
    // sslmode=prefer (the driver's default, made explicit): the SSLRequest is answered 'N'
    // and the driver goes on in plain text. prepareThreshold=3: named server statements soon.
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/{}?sslmode=prefer&prepareThreshold=3&connectTimeout={}",
        login.port, login.database, login.connect_timeout_s
    );
    run(
        Command::new("java")
            .arg("-cp")
            .arg(JDBC_JAR)
            .arg(clients_dir().join("JdbcWorkload.java"))
            .args([&url, login.user, login.password.unwrap_or(""), table]),
        "the JDBC workload",
    )
}

/// Runs the psycopg2 workload (`tests/clients/psycopg_workload.py`) as `login` says,
/// creating `table`; returns its output (see [`assert_psycopg`]).
pub fn psycopg(login: &Login, table: &str) -> String {
    let mut dsn = format!(
        "host=127.0.0.1 port={} dbname={} user={} connect_timeout={}",
        login.port, login.database, login.user, login.connect_timeout_s
    );
    if let Some(password) = login.password {
        dsn.push_str(&format!(" password='{password}'"));
    }
    run(
        Command::new(PYTHON)
            .arg(clients_dir().join("psycopg_workload.py"))
            .args([&dsn, table]),
        "the psycopg2 workload",
    )
}

/// The JDBC workload got the answers it gets from PostgreSQL directly.
pub fn assert_jdbc(out: &str) {
    for line in [
        "inserted=20",
        "batched=100",
        "selected_cents=21500",
        "fetched=121 id_sum=16161",
        "duplicate_state=23505",
        "aborted_state=25P02",
        "copy_in=1000",
        "copy_out=1121 copy_lines=1121",
        "count=1121 total=2515661",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "JDBC: expected {line:?} in\n{out}"
        );
    }
}

/// The psycopg2 workload got the answers it gets from PostgreSQL directly.
pub fn assert_psycopg(out: &str) {
    let first_name: String = "n1 \u{fc}\u{65e5}"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    for line in [
        format!("named_rows=100 first_name={first_name}"),
        "copy_out_lines=1100".into(),
        "duplicate_state=23505".into(),
        "notice=True".into(),
        "notify=payload 42".into(),
        "count=1100 total=1504550 score=1501262.5".into(),
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "psycopg2: expected {line:?} in\n{out}"
        );
    }
}

/// count:md5 of the rows of `table` in `database` on `inst`, order-independent, for comparing
/// two servers (or two tables). Read as the superuser on a connection named [`OBSERVER`]; an
/// error comes back as the text `error: ...` (a table a mirror has not created yet).
pub fn checksum(inst: &Instance, database: &str, table: &str) -> String {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname={database} application_name={OBSERVER}",
        inst.port()
    );
    let sum = || -> Result<String, postgres::Error> {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls)?;
        c.query_one(
            &format!(
                "SELECT count(*) || ':' || coalesce(md5(string_agg(r, '|' ORDER BY r)), '') \
                 FROM (SELECT x::text AS r FROM {table} x) y"
            ),
            &[],
        )?
        .try_get(0)
    };
    sum().unwrap_or_else(|e| match e.as_db_error() {
        Some(db) => format!("error: {}", db.message()),
        None => format!("error: {e}"),
    })
}

/// The mirror's errors in `metrics` (pgprism's `/metrics`) are exactly the two duplicate keys
/// (23505) the JDBC and psycopg2 programs insert on purpose, one each.
pub fn assert_mirror_errors_are_the_drivers_duplicates(metrics: &str) {
    let by_state: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pgprism_mirror_errors_by_sqlstate_total{"))
        .collect();
    assert!(
        by_state.len() == 1
            && by_state[0].contains("sqlstate=\"23505\"")
            && by_state[0].ends_with(" 2"),
        "{by_state:?}"
    );
}
