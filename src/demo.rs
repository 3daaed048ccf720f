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
    crate::server::signals::block();
    let (primary, shadow) = start_servers()?;
    println!(
        "\n1. side-by-side latency: the built-in workload (pgbench-style point selects) on both \
         servers at once for {} s",
        args.duration.as_secs_f64()
    );
    bench::run(bench_args(&args, vec![primary.url(), shadow.url()], None))
        .map_err(DemoError::Bench)?;
    let mut proxy = compare(&args, &primary, &shadow)?;
    let serve = args.serve.unwrap_or_else(|| std::io::stdin().is_terminal());
    if serve {
        serve_until_stopped(&proxy, &primary);
    }
    proxy.stop();
    drop(primary);
    drop(shadow);
    Ok(())
}

/// Starts and seeds the primary and the shadow, then makes the shadow differ.
fn start_servers() -> Result<(Instance, Instance), DemoError> {
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
        primary.url_without_password(),
        shadow.url_without_password()
    );
    Ok((primary, shadow))
}

/// Runs the workload through `pgprism proxy` in compare mode and prints what it found. The
/// proxy is left running for the caller to serve or stop; on an error it is stopped here.
fn compare(args: &DemoArgs, primary: &Instance, shadow: &Instance) -> Result<Proxy, DemoError> {
    let _ = std::fs::create_dir_all(&args.out);
    let report = args.out.join("mismatches.jsonl");
    let _ = std::fs::remove_file(&report);
    let mut proxy = Proxy::start(primary, shadow, args.port, &report)?;
    println!(
        "\n2. compare mode: pgprism on {} (admin http://{}) runs every statement on the primary \
         and the shadow at once and compares the results",
        proxy.listen, proxy.admin
    );
    // The client's password reaches the primary through pgprism, which relays the login.
    let password = primary.password().unwrap_or_default();
    let through = format!("postgres://postgres:{password}@{}/postgres", proxy.listen);
    let outcome = bench::run(bench_args(args, vec![through], Some(COMPARED_TRANSACTIONS)));
    if let Err(err) = outcome {
        proxy.stop();
        return Err(DemoError::Bench(err));
    }
    audit(primary, &proxy);

    println!("\nwhat pgprism found (report: {}):", report.display());
    let found = wait_for_findings(&report);
    print_findings(&found);
    println!(
        "\nchart: {}  (open it in a browser; also latency.html there)",
        args.out.join("latency.svg").display()
    );
    Ok(proxy)
}

/// Says how to connect and waits for Ctrl-C (or SIGTERM). The password is the primary's
/// (pgprism relays the login), read by psql from the primary's passfile (mode 0600, any
/// host and port) rather than printed.
fn serve_until_stopped(proxy: &Proxy, primary: &Instance) {
    let passfile = primary
        .passfile()
        .map(|path| format!("PGPASSFILE={} ", path.display()))
        .unwrap_or_default();
    println!(
        "\npgprism keeps serving. Connect with:\n  {passfile}psql -h {} -p {} -U postgres postgres\n\
         metrics: curl http://{}/metrics   status: curl http://{}/status\nCtrl-C to stop.",
        proxy.listen.ip(),
        proxy.listen.port(),
        proxy.admin,
        proxy.admin
    );
    while crate::server::signals::wait(Duration::from_secs(1))
        != Some(crate::server::signals::Signal::Stop)
    {}
    println!("stopping...");
}

fn start(which: &'static str) -> Result<Instance, DemoError> {
    // A password on TCP, as every server pgprism runs for a user has (see `embed`).
    let password = crate::embed::generate_password().map_err(|err| DemoError::Instance {
        which,
        source: crate::embed::EmbedError::io("generate a password for", "demo")(err),
    })?;
    Instance::start(InstanceConfig {
        name: format!("demo-{which}"),
        settings: vec![("max_connections".into(), "100".into())],
        password: Some(password),
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

/// Point selects compared through pgprism (enough to show the slow plans, quick on a
/// shadow that scans the table for each).
const COMPARED_TRANSACTIONS: u64 = 100;

fn bench_args(args: &DemoArgs, targets: Vec<String>, transactions: Option<u64>) -> BenchArgs {
    let labels = if targets.len() == 2 {
        vec!["primary".into(), "shadow".into()]
    } else {
        vec!["through pgprism".into()]
    };
    BenchArgs {
        targets,
        labels,
        clients: args.clients,
        threads: None,
        duration: transactions.is_none().then_some(args.duration),
        transactions,
        rate: None,
        workload: bench::WorkloadKind::Select,
        sql: Vec::new(),
        scale: SCALE,
        protocol: bench::Protocol::Simple,
        warmup: Duration::ZERO,
        // The compared run writes its files elsewhere: the chart stays the side-by-side one.
        out: if transactions.is_some() {
            args.out.join("compared")
        } else {
            args.out.clone()
        },
        seed: Some(7),
        init: false,
        tx_timeout: Duration::from_secs(30),
        quiet: !std::io::stderr().is_terminal(),
        // The shadow's sequential scans are ~100 times slower than the primary's index
        // lookups: on a linear axis the primary's curve lies on zero.
        latency_axis: bench::LatencyAxis::Log,
    }
}

/// Statements an application's test suite would run, through pgprism: one of them reads the
/// row that differs.
fn audit(primary: &Instance, proxy: &Proxy) {
    let statements = [
        format!("SELECT aid, abalance FROM pgbench_accounts WHERE aid = {CHANGED_AID}"),
        "SELECT bid, sum(abalance) FROM pgbench_accounts GROUP BY bid ORDER BY bid".to_string(),
        "SELECT count(*) FROM pgbench_branches".to_string(),
    ];
    for sql in statements {
        let out = crate::subprocess::reset_signals(&mut Command::new(primary.psql_path()))
            .env("PGPASSWORD", primary.password().unwrap_or_default())
            .args(["-X", "-q", "-At", "-h", &proxy.listen.ip().to_string()])
            .args([
                "-p",
                &proxy.listen.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", &sql])
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The report lines, once the control thread wrote the mismatch (bounded wait: reports
/// travel from the shards once a second).
fn wait_for_findings(report: &std::path::Path) -> Vec<sonic_rs::Value> {
    use sonic_rs::JsonValueTrait;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<sonic_rs::Value> = std::fs::read_to_string(report)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| sonic_rs::from_str(l).ok())
            .collect();
        let mismatch = lines
            .iter()
            .any(|l| l.get("record").and_then(|v| v.as_str()) == Some("mismatch"));
        if mismatch || std::time::Instant::now() >= deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_findings(lines: &[sonic_rs::Value]) {
    use sonic_rs::JsonValueTrait;
    let text = |v: &sonic_rs::Value, key: &str| {
        v.get(key)
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    let mismatches: Vec<_> = lines
        .iter()
        .filter(|l| text(l, "record") == "mismatch")
        .collect();
    let slow: Vec<_> = lines
        .iter()
        .filter(|l| text(l, "record") == "slow")
        .collect();
    if mismatches.is_empty() {
        println!("  no result differences");
    }
    for m in mismatches.iter().take(3) {
        println!("  MISMATCH  {}", text(m, "statement"));
        println!("            {}", text(m, "description"));
        let sample = |side: &str| {
            m.get(side)
                .and_then(|v| v.get("sample_rows"))
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        println!("            primary rows {}", sample("primary"));
        println!("            shadow rows  {}", sample("shadow"));
    }
    if let Some(s) = slow.first() {
        let plan = |side: &str| {
            s.get(side)
                .and_then(|v| v.get("plan"))
                .and_then(|v| v.as_str())
                .and_then(|p| p.lines().next())
                .unwrap_or("(no plan)")
                .trim()
                .to_string()
        };
        let ms = |key: &str| s.get(key).and_then(|v| v.as_u64()).unwrap_or(0) as f64 / 1000.0;
        println!(
            "  SLOW      {} statement(s) slower on the shadow, e.g. {:.2} ms vs {:.2} ms on the primary:",
            slow.len(),
            ms("shadow_us"),
            ms("primary_us")
        );
        println!("            {}", text(s, "statement"));
        println!("            primary plan: {}", plan("primary"));
        println!("            shadow plan:  {}", plan("shadow"));
    }
}

/// `pgprism proxy` as a child process, stopped with SIGTERM (it drains and exits 0).
struct Proxy {
    child: Child,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Proxy {
    fn start(
        primary: &Instance,
        shadow: &Instance,
        port: u16,
        report: &std::path::Path,
    ) -> Result<Proxy, DemoError> {
        let exe = std::env::current_exe().map_err(|e| DemoError::Proxy(e.to_string()))?;
        // The URLs carry the servers' passwords: they go in a 0600 config file, not in the
        // child's argv (`/proc/PID/cmdline` is readable by every local user), and the file
        // is removed as soon as the child has read it (it is listening then).
        let secrets = report.with_file_name(format!("proxy-{}.toml", std::process::id()));
        write_private(&secrets, &proxy_config(primary, shadow))
            .map_err(|e| DemoError::Proxy(format!("{}: {e}", secrets.display())))?;
        let spawn = |port: u16| {
            crate::subprocess::reset_signals(&mut Command::new(&exe))
                .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--config")
                .arg(&secrets)
                .args(["--admin", "127.0.0.1:0", "--log", "warn"])
                .arg("--compare-report")
                .arg(report)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
        };
        let started = Self::spawn_listening(port, spawn);
        let _ = std::fs::remove_file(&secrets);
        started
    }

    /// Spawns the proxy on `port`, then on any port if that one is taken, and reads the
    /// addresses from its first line.
    fn spawn_listening(
        port: u16,
        spawn: impl Fn(u16) -> std::io::Result<Child>,
    ) -> Result<Proxy, DemoError> {
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
}

/// The proxy's config file: the primary and the shadow, with their passwords.
fn proxy_config(primary: &Instance, shadow: &Instance) -> String {
    let url = |inst: &Instance| toml::Value::String(inst.url()).to_string();
    format!(
        "[primary]\nurl = {}\n\n[shadow]\nurl = {}\n",
        url(primary),
        url(shadow)
    )
}

/// Writes `text` to a new file only its owner can read, mode 0600 from the start (a file
/// of that name left over is replaced, never reused with its old mode).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}
