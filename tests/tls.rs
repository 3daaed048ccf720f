//! TLS on both legs, against real PostgreSQL servers with `ssl = on` and real clients (psql):
//! clients to pgprism (`[client-tls]`), pgprism to the primary, mirrors and shadow (libpq's
//! `sslmode` in their URLs). Certificates come from the `openssl` command, made per test run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgprism::embed::{Instance, InstanceConfig};
use sonic_rs::JsonValueTrait;
use support::{PASSWORD, Proxy, eventually, pgprism_command};

const TLS_USER: &str = "tlsuser";

/// A CA, and a server certificate it signed for `localhost` and `127.0.0.1`.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("pgprism-tls-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=pgprism test CA"];
        ca.extend_from_slice(&ec);
        ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.crt"]);
        openssl(&ca);
        let mut csr = vec!["req", "-subj", "/CN=localhost"];
        csr.extend_from_slice(&ec);
        csr.extend_from_slice(&["-keyout", "server.key", "-out", "server.csr"]);
        openssl(&csr);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        // A second, unrelated CA: trusting it must fail verification.
        let mut other = vec!["req", "-x509", "-days", "2", "-subj", "/CN=other CA"];
        other.extend_from_slice(&ec);
        other.extend_from_slice(&["-keyout", "other.key", "-out", "other.crt"]);
        openssl(&other);
        // PostgreSQL insists its key is private to the user it runs as.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        std::fs::set_permissions(
            dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server with `ssl = on` where `tlsuser` may only log in over TLS (SCRAM).
fn start_tls_server(name: &str, certs: &Certs) -> Instance {
    let inst = Instance::start(InstanceConfig {
        name: name.into(),
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), certs.path("server.crt")),
            ("ssl_key_file".into(), certs.path("server.key")),
        ],
        hba: vec![
            format!("hostnossl all {TLS_USER} 127.0.0.1/32 reject"),
            format!("hostssl all {TLS_USER} 127.0.0.1/32 scram-sha-256"),
        ],
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL with ssl = on");
    inst.psql(&format!(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE {TLS_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}';"
    ))
    .expect("create the TLS-only role");
    inst
}

/// psql through pgprism with `conninfo` extras; (success, stdout, stderr).
fn psql(inst: &Instance, port: u16, extra: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new(inst.psql_path())
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=postgres connect_timeout=10 {extra}"
        ))
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn tls_on_both_legs_with_verified_certificates() {
    let certs = Certs::make("both");
    let primary = start_tls_server("tlsp", &certs);
    // The primary's URL asks for a verified certificate; pgprism presents the same certificate
    // to its clients, so SCRAM channel binding (libpq's default) holds end to end.
    let url = format!(
        "postgres://127.0.0.1:{}?sslmode=verify-full&sslrootcert={}",
        primary.port(),
        certs.path("ca.crt")
    );
    let proxy = Proxy::start(
        &url,
        &[
            "--client-tls-cert",
            &certs.path("server.crt"),
            "--client-tls-key",
            &certs.path("server.key"),
        ],
    );
    let verified = format!(
        "user={TLS_USER} sslmode=verify-full sslrootcert={}",
        certs.path("ca.crt")
    );
    let (ok, out, err) = psql(
        &primary,
        proxy.port(),
        &verified,
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(ok, "psql over TLS through pgprism: {err}");
    assert_eq!(out.trim(), "t|TLSv1.3", "the primary sees a TLS session");
    let status = proxy.admin_get("/status").1;
    let parsed: sonic_rs::Value = sonic_rs::from_str(&status).unwrap();
    assert_eq!(parsed["client_tls"].as_str(), Some("allow"), "{status}");
    // 5 MB through both TLS legs, in many records each way.
    let (ok, out, err) = psql(
        &primary,
        proxy.port(),
        &verified,
        "SELECT repeat(chr(97 + g % 26), 1000) FROM generate_series(1, 5000) g",
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5000);
    assert!(lines.iter().all(|l| l.len() == 1000));
    assert_eq!(&lines[0][..3], "bbb");
    // A client that does not trust pgprism's CA is refused by its own libpq.
    let (ok, _, err) = psql(
        &primary,
        proxy.port(),
        &format!(
            "user={TLS_USER} sslmode=verify-full sslrootcert={}",
            certs.path("other.crt")
        ),
        "SELECT 1",
    );
    assert!(!ok && err.contains("certificate verify failed"), "{err}");
    // Plain-text clients still work in the default `allow` mode.
    let (ok, out, err) = psql(
        &primary,
        proxy.port(),
        &format!("user={TLS_USER} sslmode=disable"),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "t", "still TLS towards the primary");
    assert!(
        eventually(Duration::from_secs(10), || {
            proxy.metric("pgprism_client_tls_sessions_total") == 2
                && proxy.metric("pgprism_client_tls_failures_total") >= 1
        }),
        "{}",
        proxy.admin_get("/metrics").1
    );
}

#[test]
fn required_tls_is_enforced_on_both_legs() {
    let certs = Certs::make("req");
    let plain = support::start_primary("tlsplain");
    let secure = start_tls_server("tlssec", &certs);

    // client-tls.mode = require: a plain-text client gets 28000 on TCP; the Unix socket (which
    // libpq never encrypts) is exempt, as `local` is from `hostssl`.
    let socket_dir = certs.dir.join("sock");
    std::fs::create_dir_all(&socket_dir).unwrap();
    let proxy = Proxy::start(
        &secure.url(),
        &[
            "--client-tls-mode",
            "require",
            "--client-tls-cert",
            &certs.path("server.crt"),
            "--client-tls-key",
            &certs.path("server.key"),
            "--unix-socket-dir",
            &socket_dir.display().to_string(),
        ],
    );
    let local = Command::new(secure.psql_path())
        .arg(format!(
            "host={} port={} dbname=postgres user=postgres connect_timeout=10",
            socket_dir.display(),
            proxy.port()
        ))
        .args(["-XAtq", "-c", "SELECT 'local'"])
        .output()
        .unwrap();
    assert!(
        local.status.success() && String::from_utf8_lossy(&local.stdout).trim() == "local",
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let (ok, _, err) = psql(
        &secure,
        proxy.port(),
        "user=postgres sslmode=disable",
        "SELECT 1",
    );
    assert!(
        !ok && err.contains("pgprism accepts TLS connections only"),
        "{err}"
    );
    let (ok, out, err) = psql(
        &secure,
        proxy.port(),
        "user=postgres sslmode=require",
        "SELECT 7",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "7");
    assert!(eventually(Duration::from_secs(10), || proxy
        .metric("pgprism_client_tls_refused_total")
        == 1));
    drop(proxy);

    // sslmode=require towards a server without TLS: the client learns why.
    let proxy = Proxy::start(
        &format!("postgres://127.0.0.1:{}?sslmode=require", plain.port()),
        &[],
    );
    let (ok, _, err) = psql(&plain, proxy.port(), "user=postgres", "SELECT 1");
    assert!(
        !ok && err.contains("does not support TLS, but sslmode=require"),
        "{err}"
    );
    drop(proxy);

    // verify-full against the wrong CA: refused; sslmode=disable towards a TLS-only user:
    // the server's own refusal reaches the client.
    let proxy = Proxy::start(
        &format!(
            "postgres://127.0.0.1:{}?sslmode=verify-full&sslrootcert={}",
            secure.port(),
            certs.path("other.crt")
        ),
        &[],
    );
    let (ok, _, err) = psql(&secure, proxy.port(), "user=postgres", "SELECT 1");
    assert!(!ok && err.contains("could not connect to primary"), "{err}");
    drop(proxy);
    let proxy = Proxy::start(
        &format!("postgres://127.0.0.1:{}?sslmode=disable", secure.port()),
        &[],
    );
    let (ok, _, err) = psql(
        &secure,
        proxy.port(),
        &format!("user={TLS_USER}"),
        "SELECT 1",
    );
    assert!(!ok && err.contains("rejects connection"), "{err}");
}

/// Mirrors connect with the TLS their URLs ask for, and the certificate files are read when
/// pgprism starts, never on a shard's first mirror connection: the CA file is gone before the
/// first client arrives, and every mirror session still verifies the server.
#[test]
fn mirrors_connect_with_tls_from_their_urls() {
    let certs = Certs::make("mirror");
    let primary = support::start_primary("tlsmp");
    let mirror = start_tls_server("tlsmm", &certs);
    let ca_copy = certs.path("ca-for-pgprism.crt");
    std::fs::copy(certs.path("ca.crt"), &ca_copy).unwrap();
    let mirror_url = format!(
        "postgres://{TLS_USER}:{}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={ca_copy}",
        PASSWORD.replace(' ', "%20"),
        mirror.port(),
    );
    for inst in [&primary, &mirror] {
        inst.psql("CREATE TABLE t (id int PRIMARY KEY, v text)")
            .unwrap();
    }
    let proxy = Proxy::start(&primary.url(), &["--mirror", &mirror_url]);
    std::fs::remove_file(&ca_copy).unwrap();
    let mut c = proxy.client();
    for i in 0..50 {
        c.execute("INSERT INTO t VALUES ($1, $2)", &[&i, &format!("v{i}")])
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || mirror
            .psql("SELECT count(*) FROM t")
            .map(|s| s.trim() == "50")
            .unwrap_or(false)),
        "mirror rows: {:?}\n{}",
        mirror.psql("SELECT count(*) FROM t"),
        proxy.admin_get("/status").1
    );
    assert_eq!(proxy.metric("pgprism_mirror_errors_total"), 0);
}

#[test]
fn check_names_the_tls_keys_at_fault() {
    let dir = support::TempDir::new("tls-check");
    let cases = [
        (
            "[primary]\nurl = \"postgres://127.0.0.1:5432\"\n[client-tls]\ncert-file = \"/nonexistent/server.crt\"\nkey-file = \"/nonexistent/server.key\"\n",
            "client-tls.cert-file",
        ),
        (
            "[primary]\nurl = \"postgres://127.0.0.1:5432\"\n[client-tls]\nmode = \"require\"\n",
            "client-tls.cert-file",
        ),
        (
            "[primary]\nurl = \"postgres://127.0.0.1:5432?sslmode=verify-full\"\n",
            "primary.url",
        ),
        (
            "[primary]\nurl = \"postgres://127.0.0.1:5432?sslmode=sometimes\"\n",
            "primary.url",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let file = dir.join(format!("c{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = pgprism_command()
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} must fail");
        assert!(err.contains(key), "case {i}: expected {key} in {err}");
    }
    let path = dir.to_path_buf();
    drop(dir);
    assert!(!Path::new(&path).exists());
}

#[test]
fn sighup_rotates_the_client_certificate_and_keeps_a_bad_one_out() {
    let (first, second) = (Certs::make("rot1"), Certs::make("rot2"));
    let primary = support::start_primary("tlsrot");
    let dir = support::TempDir::new("tls-rot");
    let (cert, key, config) = (
        dir.join("pgprism.crt"),
        dir.join("pgprism.key"),
        dir.join("pgprism.toml"),
    );
    let install = |certs: &Certs| {
        std::fs::copy(certs.path("server.crt"), &cert).unwrap();
        std::fs::copy(certs.path("server.key"), &key).unwrap();
    };
    install(&first);
    std::fs::write(&config, "[proxy]\nbacklog = 100\n").unwrap();
    let proxy = Proxy::start(
        &primary.url(),
        &[
            "--config",
            &config.display().to_string(),
            "--client-tls-cert",
            &cert.display().to_string(),
            "--client-tls-key",
            &key.display().to_string(),
        ],
    );
    let trusting = |certs: &Certs| {
        psql(
            &primary,
            proxy.port(),
            &format!(
                "user=postgres sslmode=verify-full sslrootcert={}",
                certs.path("ca.crt")
            ),
            "SELECT 1",
        )
        .0
    };
    assert!(trusting(&first));
    assert!(!trusting(&second));

    // Rotation: new files at the same paths, then SIGHUP.
    install(&second);
    std::fs::write(&config, "[proxy]\nbacklog = 200\n").unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || trusting(&second)),
        "{}",
        proxy.log()
    );
    assert!(!trusting(&first));
    assert!(eventually(Duration::from_secs(5), || {
        let log = proxy.log();
        log.contains("client TLS settings reloaded")
            && log.contains("proxy.backlog")
            && log.contains("takes effect at the next restart")
    }));

    // A broken certificate is refused; the running one stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .log()
            .contains("reload failed")),
        "{}",
        proxy.log()
    );
    assert!(trusting(&second));
}

/// CDC's own blocking client (slot setup, checkpoints, the replication stream) honours the
/// source URL's sslmode like the proxy's connections do.
#[test]
fn cdc_source_connections_use_tls_from_the_url() {
    use pgprism::cdc::pgconn::PgConn;
    let certs = Certs::make("cdc");
    let source = start_tls_server("tlscdc", &certs);
    let url = |mode: &str, ca: &str| {
        pgprism::config::PgUrl::parse(&format!(
            "postgres://{TLS_USER}:{}@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            PASSWORD.replace(' ', "%20"),
            source.port(),
            certs.path(ca)
        ))
        .unwrap()
    };
    let limit = Duration::from_secs(10);
    let mut conn = PgConn::connect(&url("verify-full", "ca.crt"), false, limit)
        .expect("TLS connection to a TLS-only user");
    let rows = conn
        .query("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid(); SELECT repeat('y', 1000) FROM generate_series(1, 500)")
        .unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("true"));
    assert_eq!(rows.len(), 501);
    assert!(
        rows[1..]
            .iter()
            .all(|r| r[0].as_deref().map(str::len) == Some(1000))
    );
    let err = PgConn::connect(&url("verify-full", "other.crt"), false, limit)
        .err()
        .expect("an untrusted CA must fail");
    assert!(format!("{err:?}").contains("InvalidCertificate"), "{err:?}");
    let err = PgConn::connect(&url("disable", "ca.crt"), false, limit)
        .err()
        .expect("plain text is rejected by pg_hba");
    assert_eq!(err.code(), Some("28000"), "{err}");
}
