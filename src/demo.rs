//! `pgprism demo`: the first-run experience. Starts two in-memory PostgreSQL servers (primary
//! and shadow) seeded alike except for one deliberate difference, puts `pgprism proxy` in
//! front of the primary with the shadow as a mirror of every statement, runs a short built-in
//! workload through it beside the shadow, prints the side-by-side latency and the difference
//! it found, writes the latency chart, and keeps serving until Ctrl-C when run from a
//! terminal.
//!
//! Everything here is real: the servers are the system's PostgreSQL (through `embed`), the
//! proxy is this binary, the load is `pgprism bench`. It owns nothing long-lived besides
//! those children and must leave nothing running behind it.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bench::{self, BenchArgs};
use crate::embed::{Instance, InstanceConfig};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the built-in workload runs (e.g. 5s, 10s).
    #[arg(long, value_parser = bench::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Client connections of the workload.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Port clients connect to pgprism on (0: any free port).
    #[arg(long, default_value_t = 6432)]
    pub port: u16,
    /// Keep serving after the report until Ctrl-C (default: only when stdin is a terminal).
    #[arg(long, action = clap::ArgAction::Set)]
    pub serve: Option<bool>,
    /// Where the chart and the latency files go.
    #[arg(long, default_value = "bench-results/demo")]
    pub out: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the {which} PostgreSQL server")]
    Instance {
        which: &'static str,
        #[source]
        source: crate::embed::EmbedError,
    },
    #[error("cannot seed the {which} server")]
    Seed {
        which: &'static str,
        #[source]
        source: crate::embed::EmbedError,
    },
    #[error("cannot start pgprism proxy: {0}")]
    Proxy(String),
    #[error("the workload failed")]
    Bench(#[source] bench::BenchError),
}

/// The pgbench scale of the demo data (100,000 accounts).
const SCALE: u64 = 1;

/// The account whose balance differs on the shadow.
const CHANGED_AID: u32 = 4242;

pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    crate::runtime::signals::block();
    println!("pgprism demo: starting two in-memory PostgreSQL servers (primary, shadow)...");
    let primary = start("primary")?;
    let shadow = start("shadow")?;
    seed(&primary, "primary")?;
    seed(&shadow, "shadow")?;
    // The deliberate difference: the shadow lost the primary key of pgbench_accounts (as a
    // forgotten index in a migration would) and one balance differs.
    shadow
        .psql(&format!(
            "ALTER TABLE pgbench_accounts DROP CONSTRAINT pgbench_accounts_pkey;
             UPDATE pgbench_accounts SET abalance = 42 WHERE aid = {CHANGED_AID};"
        ))
        .map_err(|source| DemoError::Seed {
            which: "shadow",
            source,
        })?;
    println!(
        "  primary  {}\n  shadow   {}  (no primary key on pgbench_accounts; aid {CHANGED_AID} differs)",
        primary.url(),
        shadow.url()
    );

    let mut proxy = Proxy::start(&primary, &shadow, args.port)?;
    println!(
        "pgprism proxy listening on {} (admin http://{}), mirroring every statement to the shadow",
        proxy.listen, proxy.admin
    );
    println!(
        "\nrunning the built-in workload (pgbench-style point selects) for {} s: \
         through pgprism, and directly on the shadow beside it",
        args.duration.as_secs_f64()
    );
    let through = format!("postgres://postgres@{}/postgres", proxy.listen);
    let outcome = bench::run(BenchArgs {
        targets: vec![through, shadow.url()],
        labels: vec!["primary via pgprism".into(), "shadow".into()],
        clients: args.clients,
        threads: None,
        duration: Some(args.duration),
        transactions: None,
        rate: None,
        workload: bench::WorkloadKind::Select,
        sql: Vec::new(),
        scale: SCALE,
        protocol: bench::Protocol::Prepared,
        warmup: Duration::ZERO,
        out: args.out.clone(),
        seed: Some(7),
        init: false,
        tx_timeout: Duration::from_secs(30),
        quiet: !std::io::stderr().is_terminal(),
    });
    if let Err(err) = outcome {
        proxy.stop();
        return Err(DemoError::Bench(err));
    }

    println!("\nlatency by statement, primary vs shadow, as pgprism measured it while mirroring:");
    print_statement_latency(&proxy);

    println!("\ndifferences between primary and shadow:");
    let differences = diff_accounts(&primary, &shadow);
    if differences.is_empty() {
        println!("  none found");
    } else {
        for line in &differences {
            println!("  {line}");
        }
    }
    println!(
        "\nchart: {}  (open it in a browser; also latency.html there)",
        args.out.join("latency.svg").display()
    );

    let serve = args.serve.unwrap_or_else(|| std::io::stdin().is_terminal());
    if serve {
        println!(
            "\npgprism keeps serving. Connect with:\n  psql -h {} -p {} -U postgres postgres\n\
             metrics: curl http://{}/metrics   status: curl http://{}/status\nCtrl-C to stop.",
            proxy.listen.ip(),
            proxy.listen.port(),
            proxy.admin,
            proxy.admin
        );
        while crate::runtime::signals::wait(Duration::from_secs(1))
            != Some(crate::runtime::signals::Signal::Stop)
        {}
        println!("stopping...");
    }
    proxy.stop();
    drop(primary);
    drop(shadow);
    Ok(())
}

fn start(which: &'static str) -> Result<Instance, DemoError> {
    Instance::start(InstanceConfig {
        name: format!("demo-{which}"),
        settings: vec![("max_connections".into(), "100".into())],
        ..InstanceConfig::default()
    })
    .map_err(|source| DemoError::Instance { which, source })
}

fn seed(inst: &Instance, which: &'static str) -> Result<(), DemoError> {
    // One statement per call: psql runs a multi-statement string as one transaction, and
    // VACUUM refuses to run inside one.
    for sql in bench::init_statements(SCALE) {
        inst.psql(&sql)
            .map_err(|source| DemoError::Seed { which, source })?;
    }
    Ok(())
}

/// `pgprism proxy` as a child process, stopped with SIGTERM (it drains and exits 0).
struct Proxy {
    child: Child,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Proxy {
    fn start(primary: &Instance, shadow: &Instance, port: u16) -> Result<Proxy, DemoError> {
        let exe = std::env::current_exe().map_err(|e| DemoError::Proxy(e.to_string()))?;
        let spawn = |port: u16| {
            Command::new(&exe)
                .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin", "127.0.0.1:0", "--primary", &primary.url()])
                .args([
                    "--mirror",
                    &shadow.url(),
                    "--mirror-all-queries",
                    "--log",
                    "warn",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
        };
        // The usual port may be taken (another pgprism, a PgBouncer): fall back to any.
        for port in [port, 0] {
            let mut child = spawn(port).map_err(|e| DemoError::Proxy(e.to_string()))?;
            let mut line = String::new();
            if let Some(out) = child.stdout.take() {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let mut words = line.split_whitespace();
            let listen = words.nth(3).and_then(|w| w.parse().ok());
            let admin = words.nth(1).and_then(|w| w.parse().ok());
            if let (Some(listen), Some(admin)) = (listen, admin) {
                return Ok(Proxy {
                    child,
                    listen,
                    admin,
                });
            }
            let _ = child.wait();
        }
        Err(DemoError::Proxy(
            "it exited before listening (see its error above)".into(),
        ))
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    fn status(&self) -> Option<sonic_rs::Value> {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: pgprism\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        sonic_rs::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }
}

/// Primary vs shadow (mirror) latency per statement fingerprint from pgprism's /status. The
/// shards report once a second, so wait for the figures to settle first.
fn print_statement_latency(proxy: &Proxy) {
    use sonic_rs::{JsonContainerTrait, JsonValueTrait};
    std::thread::sleep(Duration::from_millis(1_500));
    let Some(status) = proxy.status() else {
        println!("  (status unavailable)");
        return;
    };
    let Some(statements) = status.get("statements").and_then(|s| s.as_array()) else {
        println!("  (no statements recorded)");
        return;
    };
    println!(
        "  {:<48} {:>9} {:>11} {:>11} {:>11} {:>11}",
        "statement", "count", "primary p50", "shadow p50", "primary p99", "shadow p99"
    );
    for s in statements.iter().take(5) {
        let text = s.get("statement").and_then(|v| v.as_str()).unwrap_or("?");
        let count = s
            .pointer(["primary", "count"])
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let us =
            |path: [&str; 2]| s.pointer(path).and_then(|v| v.as_u64()).unwrap_or(0) as f64 / 1000.0;
        let mirror = s
            .get("mirrors")
            .and_then(|m| m.as_object())
            .and_then(|m| m.iter().next().map(|(_, v)| v.clone()));
        let mirror_us = |key: &str| {
            mirror
                .as_ref()
                .and_then(|m| m.get(key))
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as f64
                / 1000.0
        };
        let shown: String = text.chars().take(48).collect();
        println!(
            "  {:<48} {:>9} {:>9.2}ms {:>9.2}ms {:>9.2}ms {:>9.2}ms",
            shown,
            count,
            us(["primary", "p50_us"]),
            mirror_us("p50_us"),
            us(["primary", "p99_us"]),
            mirror_us("p99_us"),
        );
    }
}

/// Rows of pgbench_accounts that differ, by primary key (at most a few, described).
fn diff_accounts(primary: &Instance, shadow: &Instance) -> Vec<String> {
    let digest = |inst: &Instance| {
        inst.psql("SELECT aid || ':' || md5(a::text) FROM pgbench_accounts a ORDER BY aid")
            .unwrap_or_default()
    };
    let (p, s) = (digest(primary), digest(shadow));
    let mut out = Vec::new();
    for (lp, ls) in p.lines().zip(s.lines()) {
        if lp != ls && out.len() < 5 {
            let aid = lp.split(':').next().unwrap_or("?");
            let row = |inst: &Instance| {
                inst.psql(&format!(
                    "SELECT (aid, bid, abalance)::text FROM pgbench_accounts WHERE aid = {aid}"
                ))
                .unwrap_or_default()
                .trim()
                .to_string()
            };
            out.push(format!(
                "pgbench_accounts aid={aid}: primary {} / shadow {}",
                row(primary),
                row(shadow)
            ));
        }
    }
    let (np, ns) = (p.lines().count(), s.lines().count());
    if np != ns {
        out.push(format!(
            "pgbench_accounts: {np} rows on the primary, {ns} on the shadow"
        ));
    }
    let has_pkey = |inst: &Instance| {
        inst.psql("SELECT count(*) FROM pg_indexes WHERE tablename = 'pgbench_accounts'")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    if has_pkey(primary) != has_pkey(shadow) {
        out.push(format!(
            "pgbench_accounts indexes: {} on the primary, {} on the shadow (the shadow's selects scan the table)",
            has_pkey(primary),
            has_pkey(shadow)
        ));
    }
    out
}
