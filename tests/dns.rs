//! A primary whose host name moves to another address (failover by DNS, as managed databases
//! do): new sessions follow the name, open sessions stay where they are. The name lives in
//! `/etc/hosts` for the length of the test, so it needs root (CI runs as root).

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use pgprism::embed::{Instance, InstanceConfig};
use sonic_rs::JsonValueTrait;
use support::{Proxy, eventually};

const HOSTS: &str = "/etc/hosts";

/// One `/etc/hosts` line of ours, replaced atomically and removed on drop.
struct HostsEntry {
    name: String,
}

impl HostsEntry {
    fn point(name: &str, ip: Ipv4Addr) -> HostsEntry {
        let entry = HostsEntry { name: name.into() };
        entry.set(Some(ip));
        entry
    }

    fn set(&self, ip: Option<Ipv4Addr>) {
        let current = std::fs::read_to_string(HOSTS).unwrap_or_default();
        let mut text: String = current
            .lines()
            .filter(|l| !l.split_whitespace().any(|w| w == self.name))
            .map(|l| format!("{l}\n"))
            .collect();
        if let Some(ip) = ip {
            text.push_str(&format!("{ip} {}\n", self.name));
        }
        // A rename, so a lookup elsewhere never reads half a file.
        let tmp = format!("{HOSTS}.pgprism-{}", std::process::id());
        std::fs::write(&tmp, &text).unwrap();
        if std::fs::rename(&tmp, HOSTS).is_err() {
            let _ = std::fs::remove_file(&tmp);
            std::fs::write(HOSTS, &text).unwrap();
        }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        self.set(None);
    }
}

/// A port free on both addresses.
fn port_free_on(a: Ipv4Addr, b: Ipv4Addr) -> u16 {
    for _ in 0..50 {
        let first = TcpListener::bind(SocketAddr::from((a, 0))).unwrap();
        let port = first.local_addr().unwrap().port();
        if TcpListener::bind(SocketAddr::from((b, port))).is_ok() {
            return port;
        }
    }
    panic!("no port free on both {a} and {b}");
}

fn server_on(name: &str, ip: Ipv4Addr, port: u16) -> Instance {
    Instance::start(InstanceConfig {
        name: name.into(),
        host: ip.to_string(),
        port: Some(port),
        hba: vec!["host all all 127.0.0.0/8 trust".into()],
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL")
}

fn server_addr(c: &mut postgres::Client) -> String {
    c.query_one("SELECT host(inet_server_addr())", &[])
        .unwrap()
        .get(0)
}

#[test]
fn new_sessions_follow_a_primary_name_that_moves() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new(HOSTS).exists() {
        eprintln!("skipped: editing {HOSTS} needs root");
        return;
    }
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let port = port_free_on(a, b);
    let (old, new) = (server_on("dnsa", a, port), server_on("dnsb", b, port));
    let name = format!("pgprism-dns-{}.test", std::process::id());
    let hosts = HostsEntry::point(&name, a);
    let proxy = Proxy::start(
        &format!("postgres://{name}:{port}"),
        &["--dns-refresh-ms", "100"],
    );
    let mut before = proxy.client();
    assert_eq!(server_addr(&mut before), a.to_string());

    hosts.set(Some(b));
    assert!(
        eventually(Duration::from_secs(10), || server_addr(&mut proxy.client())
            == b.to_string()),
        "new sessions did not follow {name} to {b}:\n{}",
        proxy.log()
    );
    // The session opened before the move stays on the old server.
    assert_eq!(server_addr(&mut before), a.to_string());
    assert!(
        proxy.log().contains("resolves to a new address"),
        "{}",
        proxy.log()
    );
    // /status shows where new connections go now.
    let status = proxy.admin_get("/status").1;
    let parsed: sonic_rs::Value = sonic_rs::from_str(&status).unwrap();
    let address = parsed["backends"][0]["address"]
        .as_str()
        .map(str::to_string);
    assert_eq!(address, Some(format!("{b}:{port}")), "{status}");
    drop((old, new));
}

/// A primary given by name starts the DNS refresh thread; a SIGTERM still drains (exit status
/// 0, the Unix socket file removed). The thread starts after signals are blocked: started
/// before, it would take a SIGTERM that arrives while the control loop is not waiting in
/// `sigtimedwait` and end the process on the spot. That window is timing: this test checks
/// the drain with the thread running, and would catch the race only when it lands.
#[test]
fn sigterm_drains_when_a_dns_thread_runs() {
    let pg = Instance::start(InstanceConfig {
        name: "dns-sigterm".into(),
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL");
    let dir = support::TempDir::new("dns-sig");
    let mut proxy = Proxy::start(
        &format!("postgres://localhost:{}", pg.port()),
        &[
            "--dns-refresh-ms",
            "1000",
            "--unix-socket-dir",
            dir.to_str().unwrap(),
        ],
    );
    let socket = proxy.unix.clone().expect("unix socket");
    assert!(socket.exists());
    proxy.signal(libc::SIGTERM);
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        proxy.log()
    );
    assert!(!socket.exists(), "the socket file is removed by the drain");
}
