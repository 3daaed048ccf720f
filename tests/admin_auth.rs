//! The admin endpoint's access rule against the real running binary: the bearer token from
//! `admin.token-file` for state-changing requests (and for every request beyond loopback),
//! 401 with `WWW-Authenticate: Bearer` counted in `/metrics`, 403 naming the key when no token
//! is configured, the refusal to start that names the key, and HTTPS (with curl).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use pgprism::embed::{Instance, InstanceConfig};
use support::{ADMIN_TOKEN, Proxy, admin_token_file, http_request, pgprism_command};

fn primary(name: &str) -> Instance {
    Instance::start(InstanceConfig {
        name: name.into(),
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL")
}

/// The refusals counted by reason, from `/metrics` (read without a token on loopback).
fn refused(proxy: &Proxy, reason: &str) -> u64 {
    let (_, body) = proxy.admin_get("/metrics");
    let line = format!("pgprism_admin_requests_refused_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in /metrics:\n{body}"))
}

#[test]
fn a_token_guards_state_changes_and_refusals_are_counted() {
    let pg = primary("admin-token");
    let token = admin_token_file();
    let token_arg = token.display().to_string();
    let proxy = Proxy::start(&pg.url(), &["--admin-token-file", &token_arg]);
    let admin = proxy.admin.expect("admin endpoint");

    // Reads on loopback need nothing.
    let (code, _, body) = http_request(admin, "GET", "/health", None);
    assert_eq!(code, 200, "{body}");
    // A state-changing request without the token, then with a wrong one: 401, a challenge.
    let (code, head, _) = http_request(admin, "POST", "/health", None);
    assert_eq!(code, 401, "{head}");
    assert!(
        head.contains("WWW-Authenticate: Bearer realm=\"pgprism\""),
        "{head}"
    );
    let (code, head, _) = http_request(admin, "POST", "/health", Some("not-the-token-at-all"));
    assert_eq!(code, 401, "{head}");
    assert!(head.contains("error=\"invalid_token\""), "{head}");
    // With the token the request reaches the routes (the proxy has no POST route: 405).
    let (code, _, body) = http_request(admin, "POST", "/health", Some(ADMIN_TOKEN));
    assert_eq!(code, 405, "{body}");
    assert_eq!(refused(&proxy, "unauthorized"), 2);
    assert_eq!(refused(&proxy, "forbidden"), 0);
}

#[test]
fn without_a_token_state_changes_are_forbidden_by_name() {
    let pg = primary("admin-none");
    let proxy = Proxy::start(&pg.url(), &[]);
    let admin = proxy.admin.expect("admin endpoint");
    let (code, _, body) = http_request(admin, "POST", "/instances/a/stop", Some(ADMIN_TOKEN));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin.token-file"), "{body}");
    assert_eq!(http_request(admin, "GET", "/status", None).0, 200);
    assert_eq!(refused(&proxy, "forbidden"), 1);
    assert_eq!(refused(&proxy, "unauthorized"), 0);
}

/// `pgprism proxy` with `args` (its own `--admin`), stdout and stderr kept for the test.
struct Started {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proxy_args(pg: &Instance, admin: &str) -> Vec<String> {
    [
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        admin,
        "--shards",
        "1",
        "--no-pin",
        "--primary",
        &pg.url(),
    ]
    .map(String::from)
    .to_vec()
}

/// Starts and waits for the ready line; panics with stderr when it exits instead.
fn start(args: &[String]) -> Started {
    let mut child = pgprism_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgprism");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the ready line");
    let Some(admin) = line
        .split_whitespace()
        .nth(5)
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        let out = child.wait_with_output().expect("wait");
        panic!(
            "pgprism did not start: {line:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The endpoint listens on every address; reach it over loopback.
    let admin = SocketAddr::from(([127, 0, 0, 1], admin.port()));
    Started { child, admin }
}

/// Runs to its exit (it must refuse to start) and returns stderr.
fn refuses(args: &[String]) -> String {
    let out = pgprism_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pgprism");
    assert!(
        !out.status.success(),
        "started: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn beyond_loopback_every_route_needs_the_token_and_none_refuses_to_start() {
    let pg = primary("admin-wide");
    let err = refuses(&proxy_args(&pg, "0.0.0.0:0"));
    assert!(
        err.contains("admin.token-file") && err.contains("beyond this machine"),
        "{err}"
    );

    let token = admin_token_file();
    let mut args = proxy_args(&pg, "0.0.0.0:0");
    args.extend(["--admin-token-file".into(), token.display().to_string()]);
    let started = start(&args);
    let (code, head, _) = http_request(started.admin, "GET", "/metrics", None);
    assert_eq!(code, 401, "{head}");
    assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    let (code, _, body) = http_request(started.admin, "GET", "/metrics", Some(ADMIN_TOKEN));
    assert_eq!(code, 200);
    assert!(
        body.contains("pgprism_admin_requests_refused_total{reason=\"unauthorized\"} 1"),
        "{body}"
    );
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let pg = primary("admin-mode");
    let dir = scratch("mode");
    let path = dir.join("token");
    std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut args = proxy_args(&pg, "127.0.0.1:0");
    args.extend(["--admin-token-file".into(), path.display().to_string()]);
    let err = refuses(&args);
    assert!(
        err.contains("admin.token-file") && err.contains("0644") && err.contains("chmod 600"),
        "{err}"
    );
    // `pgprism check` (the unit's ExecStartPre) says the same before anything starts.
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[primary]\nurl = \"{}\"\n[admin]\ntoken-file = \"{}\"\n",
            pg.url(),
            path.display()
        ),
    )
    .unwrap();
    let err = refuses(&[
        "check".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    assert!(
        err.contains("admin.token-file") && err.contains("0644"),
        "{err}"
    );
}

fn scratch(tag: &str) -> support::TempDir {
    support::TempDir::new(&format!("admin-{tag}"))
}

/// A self-signed certificate for 127.0.0.1 (openssl, as tests/tls.rs makes its own).
fn self_signed(dir: &Path) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            "admin.key",
            "-out",
            "admin.crt",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// curl over HTTPS, trusting only `ca`; returns (status code, body).
fn curl(ca: &Path, method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["-X", method, "--write-out", "\n%{http_code}", url]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = cmd.output().expect("curl (apt-get install curl)");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn https_with_the_client_tls_key_names_serves_and_checks_the_token() {
    let pg = primary("admin-tls");
    let dir = scratch("tls");
    self_signed(&dir);
    let token = admin_token_file();
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\ntoken-file = \"{}\"\ncert-file = \"{}\"\nkey-file = \"{}\"\n",
            token.display(),
            dir.join("admin.crt").display(),
            dir.join("admin.key").display()
        ),
    )
    .unwrap();
    let mut args = proxy_args(&pg, "127.0.0.1:0");
    args.extend(["--config".into(), config.display().to_string()]);
    let started = start(&args);
    let ca = dir.join("admin.crt");
    let base = format!("https://127.0.0.1:{}", started.admin.port());
    let (code, body) = curl(&ca, "GET", &format!("{base}/health"), None);
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = curl(&ca, "POST", &format!("{base}/cdc/pause"), None);
    assert_eq!(code, 401);
    let (code, _) = curl(&ca, "POST", &format!("{base}/cdc/pause"), Some(ADMIN_TOKEN));
    assert_eq!(code, 405, "authorised, and the proxy has no such route");
    let (code, body) = curl(&ca, "GET", &format!("{base}/metrics"), None);
    assert_eq!(code, 200);
    assert!(
        body.contains("pgprism_admin_requests_refused_total{reason=\"unauthorized\"} 1"),
        "{body}"
    );
    // Plain HTTP to the HTTPS endpoint gets no HTTP answer.
    let mut plain = std::net::TcpStream::connect(started.admin).expect("connect");
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = plain.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
}
