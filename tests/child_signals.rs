//! pgprism blocks SIGTERM, SIGINT, SIGHUP and SIGUSR2 in every thread and collects them with
//! `sigtimedwait`; the programs it starts must not inherit that mask (nor an ignored
//! disposition). A `pgprism run` with a proxy in front of an embedded server runs its servers
//! from a bin directory whose `postgres` is a wrapper: it records the signal state it was
//! started with (`/proc/self/status`) and execs the real server.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::{RunConfig, eventually};

/// The bin directory of the system's PostgreSQL (what `embed` would find itself).
fn real_bindir() -> std::path::PathBuf {
    pgprism::embed::PgBinaries::locate(None)
        .expect("PostgreSQL binaries")
        .bindir
}

/// `dir/bin`: every program of the real bin directory, `postgres` wrapped.
fn wrapped_bindir(dir: &Path) -> std::path::PathBuf {
    let real = real_bindir();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "postgres" {
            std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
        }
    }
    let postgres = real.join("postgres");
    // Builtins only: bash blocks SIGINT and SIGTERM around the children it forks, so a
    // `grep` would record bash's own doing. It keeps an inherited blocked mask and ignored
    // signals as they come (and ignores SIGQUIT itself, which the test leaves alone). Then
    // the real server under its own path (it finds its share directory from argv[0]).
    let script = format!(
        "#!/bin/bash\n\
         while IFS= read -r line; do case $line in Sig[BI]*) echo \"$line\";; esac; \
         done < /proc/$$/status > {out}/status.$$\n\
         exec -a {postgres} {postgres} \"$@\"\n",
        out = dir.display(),
        postgres = postgres.display()
    );
    let wrapper = bin.join("postgres");
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// The hex mask of `field` in a recorded status.
fn mask(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

fn bit(signal: libc::c_int) -> u64 {
    1 << (signal - 1)
}

#[test]
fn servers_started_by_pgprism_run_inherit_no_blocked_or_ignored_signal() {
    let server = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (dir, config) = RunConfig::write(
        "child-signals",
        &format!(
            "[primary]\nurl = \"postgres://postgres:sig-pw@127.0.0.1:{server}\"\n\
             [embed]\nstate-dir = \"{{dir}}/state\"\nbindir = \"{{dir}}/bin\"\n\
             [[embed.instance]]\nname = \"sig\"\nport = {server}\npassword = \"sig-pw\"\n"
        ),
    );
    wrapped_bindir(&dir);
    // As root the server runs as `postgres`, and the wrapper writes its record as that user.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut run = RunConfig::start(dir.clone(), config);
    // Through the proxy to the wrapped server: it is the one that runs.
    let mut client = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres password=sig-pw dbname=postgres",
            run.listen.port()
        ),
        postgres::NoTls,
    )
    .expect("connect through pgprism");
    client.simple_query("SELECT 1").expect("query");
    let statuses = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("status."))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter(|s| s.contains("SigIgn:"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The postmaster's own record (the wrapper execs it under its pid), besides those of
    // `postgres --version` runs.
    let (code, body) = support::http_get(run.admin, "/instances");
    assert_eq!(code, 200, "{body}");
    let pid = body
        .split("\"pid\":")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no pid in {body}"));
    let postmaster = dir.join(format!("status.{pid}"));
    assert!(
        eventually(Duration::from_secs(30), || std::fs::read_to_string(
            &postmaster
        )
        .is_ok_and(|s| s.contains("SigIgn:"))),
        "no record of the postmaster {pid}; the wrapper recorded {:?}",
        statuses()
    );
    let pgprism_blocks =
        bit(libc::SIGTERM) | bit(libc::SIGINT) | bit(libc::SIGHUP) | bit(libc::SIGUSR2);
    for status in statuses() {
        assert_eq!(
            mask(&status, "SigBlk:") & pgprism_blocks,
            0,
            "a server started with pgprism's signals blocked: {status}"
        );
        assert_eq!(
            mask(&status, "SigIgn:") & (bit(libc::SIGPIPE) | pgprism_blocks),
            0,
            "a server started with signals ignored: {status}"
        );
    }
    drop(client);
    assert!(run.stop().success());
}
