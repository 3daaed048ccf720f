//! The admin console against the real `prometheus-pgbouncer-exporter` (Debian's package,
//! 1.7, Python): it logs in to the virtual database `pgbouncer` with psycopg2, reads SHOW
//! STATS, POOLS, DATABASES and LISTS, and must export sane `pgbouncer_*` metrics for a
//! pgprism in transaction pooling mode with a client connected.
//!
//! Installs nothing: without the exporter (`apt-get install prometheus-pgbouncer-exporter`,
//! as `.ci/run` does) the test says so and passes.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Proxy, eventually, start_primary};

/// The Debian package's entry point.
const EXPORTER: &str = "/usr/bin/prometheus-pgbouncer-exporter";

/// How long the exporter may take to start and to show what the shards published.
const SCRAPE_WAIT: Duration = Duration::from_secs(30);

/// The exporter as a child process, killed on drop; its output goes to a file for failures.
struct Exporter {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Exporter {
    fn start(proxy_port: u16) -> Exporter {
        let addr = free_addr();
        let log =
            std::env::temp_dir().join(format!("pgprism-test-exporter-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).expect("exporter log file");
        let child = Command::new(EXPORTER)
            .args([
                "--pgbouncer-host",
                "127.0.0.1",
                "--pgbouncer-user",
                "pgbouncer",
            ])
            .args(["--pgbouncer-port", &proxy_port.to_string()])
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            // Its settings also come from the environment (configargparse): none of ours.
            .env_remove("CONFIG")
            .env_remove("PORT")
            .env_remove("HOST")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn the exporter");
        Exporter { child, addr, log }
    }

    /// `/metrics`, or why not: the exporter exited (it does on a console it cannot read),
    /// or it is not listening yet.
    fn scrape(&mut self) -> Result<String, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(format!("the exporter exited ({status}):\n{log}"));
        }
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .map_err(|e| format!("not listening yet: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        match resp.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_string()),
            _ => Err(format!("unexpected answer: {resp}")),
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address")
}

/// The value of the sample `key` (name and labels as the exporter writes them).
fn sample(metrics: &str, key: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

#[test]
fn pgbouncer_exporter_reads_the_console() {
    if !Path::new(EXPORTER).exists() {
        println!("skipped: {EXPORTER} is missing (apt-get install prometheus-pgbouncer-exporter)");
        return;
    }
    let pg = start_primary("console-exporter");
    let dir = std::env::temp_dir().join(format!("pgprism-console-exporter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("config dir");
    let config = dir.join("pgprism.toml");
    std::fs::write(&config, "[pool]\nadmin-users = [\"pgbouncer\"]\n").expect("write config");
    let config = config.display().to_string();
    let proxy = Proxy::start(
        &pg.url(),
        &[
            "--config",
            &config,
            "--pool-mode",
            "transaction",
            "--auth-type",
            "trust",
        ],
    );

    // A pooled client that ran a statement and stays logged in.
    let mut app = proxy.client();
    app.simple_query("SELECT 1")
        .expect("a statement through the pool");

    let mut exporter = Exporter::start(proxy.port());
    let mut last = Err(String::from("never scraped"));
    let ready = eventually(SCRAPE_WAIT, || {
        last = exporter.scrape();
        // The first scrapes may predate the shards' next snapshot.
        last.as_ref().is_ok_and(|m| {
            sample(m, "pgbouncer_requests_total{database=\"postgres\"}").is_some_and(|n| n >= 1.0)
        })
    });
    let metrics = match (&last, ready) {
        (Ok(m), true) => m.clone(),
        (Ok(m), false) => panic!("no request counted for postgres:\n{m}\n{}", proxy.log()),
        (Err(why), _) => panic!("no metrics: {why}\n{}", proxy.log()),
    };
    let get = |key: &str| {
        sample(&metrics, key).unwrap_or_else(|| panic!("no sample {key} in:\n{metrics}"))
    };

    // SHOW LISTS: the pool and the clients (the application and the exporter itself).
    assert!(get("pgbouncer_databases") >= 1.0);
    assert!(get("pgbouncer_users") >= 1.0);
    assert!(get("pgbouncer_pools") >= 1.0);
    assert!(get("pgbouncer_used_clients") >= 1.0);
    assert_eq!(get("pgbouncer_dns_pending"), 0.0);
    // SHOW POOLS: the application's client is logged in (active, in PgBouncer's terms).
    let pool = "{database=\"postgres\",user=\"postgres\"}";
    assert!(get(&format!("pgbouncer_active_clients{pool}")) >= 1.0);
    assert_eq!(get(&format!("pgbouncer_waiting_clients{pool}")), 0.0);
    // SHOW DATABASES: the configured bounds.
    assert_eq!(get("pgbouncer_pool_size{database=\"postgres\"}"), 20.0);
    assert_eq!(get("pgbouncer_reserve_pool{database=\"postgres\"}"), 0.0);
    // SHOW STATS: traffic both ways and time spent.
    let db = "{database=\"postgres\"}";
    assert!(get(&format!("pgbouncer_received_bytes_total{db}")) > 0.0);
    assert!(get(&format!("pgbouncer_sent_bytes_total{db}")) > 0.0);
    // The app's SELECT 1 ran on a lent connection: its time counts.
    assert!(get(&format!("pgbouncer_query_microseconds_total{db}")) > 0.0);

    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
}
