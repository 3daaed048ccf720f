//! Unix-domain sockets on both sides of pgprism, against real PostgreSQL servers: clients on
//! pgprism's `proxy.unix-socket-dir` socket (psql, the `postgres` crate, raw bytes), and
//! primaries, mirrors and shadows reached over their own socket with libpq's URL forms.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pgprism::embed::Instance;
use support::{
    MD5_USER, PASSWORD, Proxy, SCRAM_USER, closed_by_server, eventually, raw, sqlstate,
    start_primary,
};

/// A short, fresh directory for pgprism's socket (socket paths are limited to 107 bytes),
/// removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new(tag: &str) -> SocketDir {
        let dir = PathBuf::from(format!("/tmp/pgprism-ux-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket dir");
        SocketDir(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn server_socket_dir(pg: &Instance) -> &str {
    pg.socket_dir()
        .and_then(Path::to_str)
        .expect("the test server has a Unix socket")
}

/// `postgres://userinfo@%2Fdir:port/postgres`: the socket directory in the authority.
fn authority_url(pg: &Instance, userinfo: &str) -> String {
    format!(
        "postgres://{userinfo}@{}:{}/postgres",
        percent_encode(server_socket_dir(pg)),
        pg.port()
    )
}

/// `postgres://userinfo@/postgres?host=/dir&port=N`: the socket directory as a query option.
fn query_url(pg: &Instance, userinfo: &str) -> String {
    format!(
        "postgres://{userinfo}@/postgres?host={}&port={}",
        server_socket_dir(pg),
        pg.port()
    )
}

/// The real psql over pgprism's Unix socket.
fn psql_unix(dir: &str, port: u16, user: &str, password: Option<&str>, sql: &str) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", "-h", dir])
        .args([
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd.output().expect("run psql")
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn unix_client(dir: &str, port: u16, user: &str, password: Option<&str>) -> postgres::Client {
    let mut conninfo =
        format!("host={dir} port={port} user={user} dbname=postgres connect_timeout=10");
    if let Some(p) = password {
        conninfo.push_str(&format!(" password='{p}'"));
    }
    postgres::Client::connect(&conninfo, postgres::NoTls)
        .unwrap_or_else(|e| panic!("{user} over pgprism's Unix socket: {e}"))
}

#[test]
fn psql_through_the_unix_socket_to_a_tcp_primary() {
    let pg = start_primary("ux-psql");
    let dir = SocketDir::new("psql");
    let proxy = Proxy::start(&pg.url(), &["--unix-socket-dir", dir.arg()]);
    let path = dir.0.join(format!(".s.PGSQL.{}", proxy.port()));
    assert_eq!(proxy.unix.as_deref(), Some(path.as_path()));
    let meta = std::fs::metadata(&path).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777, "as PostgreSQL's");

    pg.psql("CREATE TABLE fruit (id int PRIMARY KEY, name text); INSERT INTO fruit VALUES (1, 'apple'), (2, 'pear'), (3, 'plum')")
        .unwrap();
    let out = psql_unix(
        dir.arg(),
        proxy.port(),
        "postgres",
        None,
        "SELECT id || ':' || name FROM fruit WHERE id >= 2 ORDER BY id",
    );
    assert_eq!(stdout_ok(&out), "2:pear\n3:plum");

    // Authentication is relayed as on TCP: the primary checks the md5 user's password.
    let out = psql_unix(
        dir.arg(),
        proxy.port(),
        MD5_USER,
        Some(PASSWORD),
        "SELECT current_user",
    );
    assert_eq!(stdout_ok(&out), MD5_USER);
    let out = psql_unix(dir.arg(), proxy.port(), MD5_USER, Some("wrong"), "SELECT 1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An SSLRequest on the Unix socket is answered 'N' (PostgreSQL refuses SSL there too) and
    // the session then starts in clear on the same connection.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&raw::startup("postgres", "postgres")).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    // Read up to and including ReadyForQuery ('Z', length 5, status 'I').
    while !reply.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "startup reply: {reply:?}");
        reply.push(byte[0]);
    }
    drop(s);

    // TCP clients are served as before, and both kinds are counted.
    let mut c = proxy.client();
    let n: i64 = c
        .query_one("SELECT count(*) FROM fruit", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    assert!(
        eventually(Duration::from_secs(5), || {
            proxy.metric("pgprism_unix_connections_accepted_total") >= 4
                && proxy.metric("pgprism_connections_accepted_total") >= 5
                && proxy.metric("pgprism_ssl_refused_total") >= 1
        }),
        "{}",
        proxy.admin_get("/metrics").1
    );
    let (_, status) = proxy.admin_get("/status");
    assert!(status.contains(&path.display().to_string()), "{status}");
}

#[test]
fn password_users_through_tcp_to_a_primary_on_its_unix_socket() {
    let pg = start_primary("ux-auth");
    // Both of libpq's spellings of a socket directory.
    for url in [authority_url(&pg, "ignored"), query_url(&pg, "ignored")] {
        let proxy = Proxy::start(&url, &[]);
        for user in [MD5_USER, SCRAM_USER] {
            let mut c =
                postgres::Client::connect(&proxy.conninfo(user, Some(PASSWORD)), postgres::NoTls)
                    .unwrap_or_else(|e| panic!("{user} through pgprism to {url}: {e}"));
            let row = c
                .query_one("SELECT current_user::text, inet_server_addr() IS NULL", &[])
                .unwrap();
            assert_eq!(row.get::<_, String>(0), user);
            assert!(
                row.get::<_, bool>(1),
                "the primary session is on its Unix socket"
            );
            let wrong =
                postgres::Client::connect(&proxy.conninfo(user, Some("wrong")), postgres::NoTls)
                    .err()
                    .unwrap_or_else(|| panic!("{user} with a wrong password was let in"));
            assert_eq!(sqlstate(&wrong).as_deref(), Some("28P01"), "{wrong}");
        }
    }
}

#[test]
fn cancel_over_the_unix_socket_reaches_the_backend() {
    let pg = start_primary("ux-cancel");
    let dir = SocketDir::new("cancel");
    // Unix sockets on both sides: the forwarded CancelRequest also travels over one.
    let proxy = Proxy::start(
        &authority_url(&pg, "postgres"),
        &["--unix-socket-dir", dir.arg()],
    );
    let mut busy = unix_client(dir.arg(), proxy.port(), SCRAM_USER, Some(PASSWORD));
    let mut bystander = unix_client(dir.arg(), proxy.port(), "postgres", None);
    support::assert_cancel_reaches_only(pg.port(), &mut busy, &mut bystander);
    assert!(eventually(Duration::from_secs(5), || {
        proxy.metric("pgprism_cancels_forwarded_total") >= 1
            && proxy.metric("pgprism_unix_connections_accepted_total") >= 3
    }));
}

#[test]
fn stale_socket_file_is_replaced_and_a_live_one_refuses_a_second_pgprism() {
    let pg = start_primary("ux-stale");
    let dir = SocketDir::new("stale");
    // A pgprism killed with SIGKILL leaves its socket file behind, with nobody listening.
    let mut crashed = Proxy::start(&pg.url(), &["--unix-socket-dir", dir.arg()]);
    let port = crashed.port();
    let path = crashed.unix.clone().expect("unix socket");
    crashed.signal(libc::SIGKILL);
    crashed.child.wait().expect("SIGKILL ends it");
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "the crashed pgprism's socket file is still there"
    );
    // The kernel tears a dead process's io_uring down asynchronously, and its pending polls
    // keep the listening socket open a moment longer.
    assert!(eventually(Duration::from_secs(5), || UnixStream::connect(
        &path
    )
    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)));
    drop(crashed);

    // The next pgprism on the same port replaces it and serves on it.
    let listen = format!("127.0.0.1:{port}");
    let mut proxy = Proxy::start_on(&listen, &pg.url(), &["--unix-socket-dir", dir.arg()]);
    assert_eq!(proxy.unix.as_deref(), Some(path.as_path()));
    assert_eq!(
        stdout_ok(&psql_unix(
            dir.arg(),
            port,
            "postgres",
            None,
            "SELECT 'fresh'"
        )),
        "fresh"
    );
    assert!(proxy.log().contains("stale socket file"), "{}", proxy.log());

    // A second pgprism whose socket would be the same file (same port, another TCP address)
    // refuses to start and leaves the live socket alone.
    let out = support::pgprism_command()
        .args(["proxy", "--listen", &format!("127.0.0.2:{port}")])
        .args(["--unix-socket-dir", dir.arg(), "--admin", ""])
        .args(["--primary", &pg.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{} is already served by another process",
            path.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        stdout_ok(&psql_unix(
            dir.arg(),
            port,
            "postgres",
            None,
            "SELECT 'still'"
        )),
        "still"
    );

    // A clean shutdown removes the file.
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!path.exists(), "socket file removed on shutdown");

    // Anything but a socket in its place is refused, never removed.
    std::fs::write(&path, "precious").unwrap();
    let out = support::pgprism_command()
        .args(["proxy", "--listen", &listen, "--admin", ""])
        .args(["--unix-socket-dir", dir.arg(), "--primary", &pg.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn sigterm_drains_unix_sessions_and_removes_the_socket_file() {
    let pg = start_primary("ux-drain");
    let dir = SocketDir::new("drain");
    let mut proxy = Proxy::start(
        &pg.url(),
        &[
            "--unix-socket-dir",
            dir.arg(),
            "--drain-timeout-ms",
            "20000",
        ],
    );
    let path = proxy.unix.clone().expect("unix socket");
    pg.psql("CREATE TABLE d (v int)").unwrap();
    let busy = UnixStream::connect(&path).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut busy = raw::start_session(busy);
    let mut idle = unix_client(dir.arg(), proxy.port(), "postgres", None);
    let begun = raw::query(&mut busy, "BEGIN; INSERT INTO d VALUES (1)");
    assert_eq!(begun.last(), Some(&(b'Z', b"T".to_vec())), "{begun:?}");
    proxy.signal(libc::SIGTERM);
    // New local clients find no socket once the drain starts.
    assert!(eventually(Duration::from_secs(5), || !path.exists()
        && UnixStream::connect(&path).is_err()));
    // The idle session is closed with 57P01. The socket file goes before the shards are told
    // to drain, so a query sent right now may still reach a shard that has not begun: it is
    // answered, and the session is closed once idle again (within a drain poll).
    let err = (0..100)
        .find_map(|_| match idle.simple_query("SELECT 1") {
            Ok(_) => {
                std::thread::sleep(Duration::from_millis(50));
                None
            }
            Err(err) => Some(err),
        })
        .expect("the idle session was never closed");
    assert!(closed_by_server(&err), "{err:?}");
    raw::finish_while_draining(&mut busy, "INSERT INTO d VALUES (2); COMMIT", b"CC");
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        proxy.log()
    );
    assert_eq!(pg.psql("SELECT count(*) FROM d").unwrap().trim(), "2");
}

#[test]
fn mirror_and_shadow_urls_may_name_a_socket_directory() {
    let primary = start_primary("ux-prim");
    let mirror = start_primary("ux-mirr");
    let shadow = start_primary("ux-shad");
    for pg in [&primary, &mirror, &shadow] {
        pg.psql("CREATE TABLE m (id int PRIMARY KEY)").unwrap();
    }
    let password = percent_encode(PASSWORD);
    let mirror_url = query_url(&mirror, &format!("{SCRAM_USER}:{password}"));
    let shadow_url = authority_url(&shadow, &format!("{MD5_USER}:{password}"));
    let reports = SocketDir::new("reports");
    let report = reports.0.join("mismatches.jsonl");
    let proxy = Proxy::start(
        &primary.url(),
        &[
            "--mirror",
            &mirror_url,
            "--shadow",
            &shadow_url,
            "--compare-report",
            report.to_str().unwrap(),
        ],
    );
    let mut c = proxy.client();
    c.batch_execute("INSERT INTO m VALUES (1), (2)").unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM m", &[]).unwrap().get(0);
    assert_eq!(n, 2);
    assert!(
        eventually(Duration::from_secs(10), || mirror
            .psql("SELECT count(*) FROM m")
            .is_ok_and(|out| out.trim() == "2")),
        "the mirror got the rows over its Unix socket: {}",
        proxy.log()
    );
    assert_eq!(shadow.psql("SELECT count(*) FROM m").unwrap().trim(), "2");
    assert!(eventually(Duration::from_secs(5), || proxy
        .metric("pgprism_compare_statements_total")
        >= 2));
    assert_eq!(
        proxy.metric("pgprism_compare_shadow_connect_failures_total"),
        0
    );
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 0);
}

#[test]
fn an_unreachable_primary_socket_is_named_in_the_error() {
    let dir = SocketDir::new("nowhere");
    let url = format!("postgres://{}:5999", percent_encode(dir.arg()));
    let proxy = Proxy::start(&url, &[]);
    let err = postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls)
        .err()
        .expect("no primary to connect to");
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err}");
    let socket = format!("{}/.s.PGSQL.5999", dir.arg());
    let message = |e: &postgres::Error| e.as_db_error().map(|d| d.message().to_string());
    let text = message(&err).unwrap_or_default();
    assert!(text.contains(&socket), "{err:?}");
    assert!(text.contains("No such file"), "{text}");
    // A live-looking but stale file: refused, named the same way.
    drop(UnixListener::bind(&socket).unwrap());
    let err = postgres::Client::connect(&proxy.conninfo("postgres", None), postgres::NoTls)
        .err()
        .expect("nobody listens on the stale socket");
    let text = message(&err).unwrap_or_default();
    assert!(text.contains(&socket), "{err:?}");
    assert!(text.contains("refused"), "{text}");
}

#[test]
fn check_prints_the_unix_socket_dir_and_names_bad_values() {
    let dir = SocketDir::new("check");
    let good = dir.0.join("good.toml");
    std::fs::write(
        &good,
        "[proxy]\nunix-socket-dir = \"/var/run/pgprism\"\n\
         [primary]\nurl = \"postgres://app:pw@/app?host=/var/run/postgresql&port=5433\"\n",
    )
    .unwrap();
    let out = support::pgprism_command()
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("unix-socket-dir = \"/var/run/pgprism\""),
        "{shown}"
    );
    assert!(
        shown.contains("postgres://app:***@%2Fvar%2Frun%2Fpostgresql:5433/app"),
        "{shown}"
    );

    for (text, key) in [
        (
            "[proxy]\nunix-socket-dir = \"relative/dir\"\n[primary]\nurl = \"postgres://h\"\n",
            "proxy.unix-socket-dir",
        ),
        ("[proxy]\nunix-socket-dir = 7\n", "proxy.unix-socket-dir"),
        (
            "[primary]\nurl = \"postgres:///db?host=/tmp&port=nope\"\n",
            "primary.url",
        ),
        (
            "[primary]\nurl = \"postgres://h\"\n[[mirror]]\nurl = \"postgres:///db\"\n",
            "mirror[0].url",
        ),
    ] {
        let bad = dir.0.join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = support::pgprism_command()
            .args(["check", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{text}: {stderr}");
    }
}

#[test]
fn run_config_serves_the_unix_socket_with_a_socket_primary() {
    let pg = start_primary("ux-run");
    let sock = SocketDir::new("run");
    let config_dir = std::env::temp_dir().join(format!("pgprism-ux-run-{}", std::process::id()));
    std::fs::create_dir_all(&config_dir).unwrap();
    let config = config_dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nunix-socket-dir = \"{}\"\nshards = 2\npin-cores = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[primary]\nurl = \"{}\"\n",
            sock.arg(),
            query_url(&pg, "postgres")
        ),
    )
    .unwrap();
    let mut run = support::RunConfig::start(config_dir, config);
    let port = run.listen.port();
    let out = psql_unix(
        sock.arg(),
        port,
        SCRAM_USER,
        Some(PASSWORD),
        "SELECT current_user || ' ' || (inet_server_addr() IS NULL)",
    );
    assert_eq!(stdout_ok(&out), format!("{SCRAM_USER} true"));
    let path = sock.0.join(format!(".s.PGSQL.{port}"));
    assert!(path.exists());
    assert!(run.stop().success());
    assert!(!path.exists(), "socket file removed on shutdown");
}
