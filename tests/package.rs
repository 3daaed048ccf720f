//! The Debian package and the systemd unit, as an administrator meets them: the package built
//! by `packaging/build-deb` (dev profile, to spare CI a release build), read back with
//! `dpkg-deb`; installed with `dpkg -i` on a fresh Debian made by `debootstrap` (cached under
//! /var/tmp, copied per run), where `pgprism check` runs as the `pgprism` user, and purged
//! again; the unit's `systemd-analyze security` score and `systemd-analyze verify`.
//!
//! Needs root (chroot, setpriv), dpkg-deb, cargo-deb, debootstrap, systemd-nspawn and
//! systemd-analyze: `.ci/run` installs them and CI runs as root. The tests that need root skip
//! (saying so) only when not root; under root a missing tool is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pgprism::embed::{Instance, InstanceConfig};

mod support;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory the test binaries were built in (`target/debug/pgprism`'s grandparent).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pgprism"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgprism-package-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the test can run: it needs root (chroot, setpriv, systemd-nspawn). Not root (a
/// developer's `cargo nextest run`), it says why and the test returns. Under root nothing is
/// skipped: CI runs as root with every tool `.ci/run` installs (debootstrap, systemd-nspawn,
/// cargo-deb...), so a missing one fails the test instead of hiding behind a skip.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        eprintln!(
            "SKIPPED {test}: needs root (chroot, setpriv, systemd-nspawn) and runs as uid {uid}; \
             CI runs it as root"
        );
    }
    uid == 0
}

/// The package, built once per test process around the binary the tests run (dev profile),
/// in `target/package-tests/<pid>/`; directories of processes that are gone are removed first.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let parent = target_dir().join("package-tests");
        if let Ok(dirs) = std::fs::read_dir(&parent) {
            for dir in dirs.flatten() {
                let pid = dir.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
                if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir_all(dir.path());
                }
            }
        }
        let out = parent
            .join(std::process::id().to_string())
            .join("pgprism.deb");
        std::fs::create_dir_all(out.parent().unwrap()).expect("package dir");
        ok(Command::new(repo().join("packaging/build-deb"))
            .args(["--profile", "dev", "--fast", "--no-build", "--output"])
            .arg(&out)
            .env("CARGO_TARGET_DIR", target_dir()));
        out
    })
}

fn field(deb: &Path, name: &str) -> String {
    text(&ok(Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .arg(name)))
    .trim()
    .to_string()
}

#[test]
fn package_holds_the_binary_unit_config_user_man_pages_and_completions() {
    let deb = package();
    assert_eq!(field(deb, "Package"), "pgprism");
    assert_eq!(field(deb, "Architecture"), "amd64");
    assert_eq!(
        field(deb, "Version"),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    let depends = field(deb, "Depends");
    assert!(depends.contains("libc6 (>="), "{depends}");
    assert!(
        depends.contains("systemd | systemd-standalone-sysusers | systemd-sysusers"),
        "{depends}"
    );

    // Files and their modes, as `dpkg-deb -c` lists them.
    let listing = text(&ok(Command::new("dpkg-deb").arg("-c").arg(deb)));
    let mode_of = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
            .to_string()
    };
    assert_eq!(mode_of("/usr/bin/pgprism"), "-rwxr-xr-x");
    for file in [
        "/usr/lib/systemd/system/pgprism.service",
        "/usr/lib/sysusers.d/pgprism.conf",
        "/etc/pgprism/pgprism.toml",
        "/etc/sysctl.d/60-pgprism.conf",
        "/etc/security/limits.d/pgprism.conf",
        "/usr/share/man/man1/pgprism.1.gz",
        "/usr/share/man/man1/pgprism-run.1.gz",
        "/usr/share/man/man1/pgprism-check.1.gz",
        "/usr/share/bash-completion/completions/pgprism",
        "/usr/share/zsh/vendor-completions/_pgprism",
        "/usr/share/fish/vendor_completions.d/pgprism.fish",
        "/usr/share/doc/pgprism/examples/low-port.conf",
        "/usr/share/doc/pgprism/examples/grafana/pgprism.json",
        "/usr/share/doc/pgprism/install.md",
        "/usr/share/doc/pgprism/copyright",
    ] {
        assert_eq!(mode_of(file), "-rw-r--r--", "{file}");
    }
    // The hidden generator subcommand gets no page.
    assert!(!listing.contains("package-assets"), "{listing}");

    // Control files: the conffiles are exactly the /etc files; the maintainer scripts create
    // the user on configure and remove it (with the state) on purge.
    let dir = scratch("control");
    ok(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&dir));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    let mut conffiles: Vec<String> = read("conffiles").lines().map(String::from).collect();
    conffiles.sort();
    assert_eq!(
        conffiles,
        [
            "/etc/pgprism/pgprism.toml",
            "/etc/security/limits.d/pgprism.conf",
            "/etc/sysctl.d/60-pgprism.conf"
        ]
    );
    let postinst = read("postinst");
    assert!(
        postinst.contains("systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} pgprism.conf"),
        "{postinst}"
    );
    assert!(postinst.contains("chown root:pgprism /etc/pgprism/pgprism.toml"));
    // Installed, not started or restarted: a restart on upgrade would drop every client.
    assert!(!postinst.contains("deb-systemd-invoke"), "{postinst}");
    let postrm = read("postrm");
    assert!(postrm.contains("userdel pgprism"), "{postrm}");
    assert!(
        postrm.contains("rm -rf /var/lib/pgprism /var/cache/pgprism /var/log/pgprism /run/pgprism")
    );

    // The payload: the unit runs the packaged binary, the example config passes `check`, the
    // man page and the completions come from the real command.
    let root = scratch("payload");
    ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/pgprism.service")).expect("unit");
    assert_eq!(
        unit,
        std::fs::read_to_string(repo().join("systemd/pgprism.service")).unwrap()
    );
    for line in unit.lines().filter(|l| l.starts_with("ExecStart")) {
        let program = line.split_once('=').unwrap().1.split_whitespace().next();
        assert_eq!(program, Some("/usr/bin/pgprism"), "{line}");
    }
    let checked = ok(Command::new(root.join("usr/bin/pgprism"))
        .args(["check", "--config"])
        .arg(root.join("etc/pgprism/pgprism.toml")));
    assert!(text(&checked).contains("[primary]"));
    let man = text(&ok(Command::new("gzip")
        .arg("-dc")
        .arg(root.join("usr/share/man/man1/pgprism.1.gz"))));
    assert!(man.starts_with(".ie"), "not roff: {man}");
    assert!(man.contains(".TH pgprism 1"), "{man}");
    assert!(man.contains("pgprism\\-run(1)"), "{man}");
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/pgprism"))
        .unwrap();
    assert!(bash.contains("complete -F _pgprism"), "{bash}");
    for sub in ["proxy", "run", "embed", "cdc", "check", "bench", "demo"] {
        assert!(bash.contains(&format!("pgprism,{sub})")), "{sub} missing");
    }
    let fish =
        std::fs::read_to_string(root.join("usr/share/fish/vendor_completions.d/pgprism.fish"))
            .unwrap();
    assert!(fish.contains("complete -c pgprism"));
    let zsh =
        std::fs::read_to_string(root.join("usr/share/zsh/vendor-completions/_pgprism")).unwrap();
    assert!(zsh.starts_with("#compdef pgprism"));
    let sysusers = std::fs::read_to_string(root.join("usr/lib/sysusers.d/pgprism.conf")).unwrap();
    assert!(
        sysusers
            .lines()
            .any(|l| l.starts_with("u pgprism - ")
                && l.ends_with("/var/lib/pgprism /usr/sbin/nologin")),
        "{sysusers}"
    );
    for dir in [dir, root] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `systemd-analyze security --offline=yes`'s overall exposure of a unit file.
fn exposure(unit: &Path) -> f64 {
    let out = ok(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit));
    let report = text(&out);
    report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for pgprism.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"))
}

#[test]
fn unit_scores_ok_with_and_without_the_low_port_drop_in() {
    let unit = repo().join("systemd/pgprism.service");
    let score = exposure(&unit);
    assert!(score <= 2.0, "exposure {score} above 2.0 (OK)");
    // The drop-in adds CAP_NET_BIND_SERVICE and gives up PrivateUsers: still OK. Drop-ins
    // extend the [Service] section, so appending it to a copy is the unit systemd would load.
    let dir = scratch("low-port");
    let mut merged = std::fs::read_to_string(&unit).unwrap();
    merged.push_str(&std::fs::read_to_string(repo().join("systemd/low-port.conf")).unwrap());
    std::fs::write(dir.join("pgprism.service"), merged).unwrap();
    let with_drop_in = exposure(&dir.join("pgprism.service"));
    assert!(with_drop_in > score, "{with_drop_in} <= {score}");
    assert!(
        with_drop_in <= 2.0,
        "exposure {with_drop_in} above 2.0 (OK)"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unit_verifies_clean() {
    // `verify` wants the ExecStart programs to exist and `man:` documentation to resolve. The
    // binary is not installed at /usr/bin/pgprism on a build machine, so verify a copy whose
    // only change is that path, pointing at the built binary; the man page comes from the
    // same generator the package uses, through MANPATH.
    let dir = scratch("verify");
    let unit = std::fs::read_to_string(repo().join("systemd/pgprism.service")).unwrap();
    let binary = env!("CARGO_BIN_EXE_pgprism");
    std::fs::write(
        dir.join("pgprism.service"),
        unit.replace("/usr/bin/pgprism ", &format!("{binary} ")),
    )
    .unwrap();
    let assets = dir.join("assets");
    ok(Command::new(binary)
        .args(["package-assets", "--out"])
        .arg(&assets));
    std::fs::create_dir_all(dir.join("man/man1")).unwrap();
    std::fs::copy(assets.join("man/pgprism.1"), dir.join("man/man1/pgprism.1")).unwrap();
    let out = ok(Command::new("systemd-analyze")
        .args(["verify", "--no-pager"])
        .arg(dir.join("pgprism.service"))
        .env("MANPATH", dir.join("man")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "verify complained:\n{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_names_a_low_port_the_process_may_not_bind() {
    if !root_or_skip("check_names_a_low_port_the_process_may_not_bind") {
        return;
    }
    let dir = scratch("check-low-port");
    let low = dir.join("low.toml");
    std::fs::write(
        &low,
        "[proxy]\nlisten = \"127.0.0.1:443\"\n[primary]\nurl = \"postgres://127.0.0.1:5432\"\n",
    )
    .unwrap();
    let high = dir.join("high.toml");
    std::fs::write(
        &high,
        "[proxy]\nlisten = \"127.0.0.1:6432\"\n[primary]\nurl = \"postgres://127.0.0.1:5432\"\n",
    )
    .unwrap();
    let check = |config: &Path, unprivileged: bool| -> Output {
        let mut cmd = if unprivileged {
            // As the unit runs it: another user, no capabilities at all.
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(env!("CARGO_BIN_EXE_pgprism"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_pgprism"))
        };
        cmd.args(["check", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    // Root holds CAP_NET_BIND_SERVICE: port 443 is fine.
    assert!(check(&low, false).status.success());
    // Without it, `check` refuses and names the key and the drop-in.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let refused = check(&low, true);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("`proxy.listen`: port 443 is below"), "{why}");
    assert!(why.contains("CAP_NET_BIND_SERVICE"), "{why}");
    assert!(why.contains("pgprism.service.d/low-port.conf"), "{why}");
    // A port from 1024 up needs nothing.
    let fine = check(&high, true);
    assert!(
        fine.status.success(),
        "{}",
        String::from_utf8_lossy(&fine.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The Debian release of this machine (`VERSION_CODENAME`) and its first apt mirror, for a
/// chroot of the same release from the same place.
fn release_and_mirror() -> (String, String) {
    let os = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .expect("VERSION_CODENAME")
        .trim_matches('"')
        .to_string();
    let mut sources = String::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            sources.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            sources.push('\n');
        }
    }
    sources.push_str(&std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    // deb822 (`URIs: ...` with `Suites: bookworm ...`) or one-line (`deb URI bookworm main`).
    let deb822 = sources.split("\n\n").find_map(|stanza| {
        let suites = stanza.lines().find_map(|l| l.strip_prefix("Suites:"))?;
        suites
            .split_whitespace()
            .any(|s| s == codename)
            .then_some(())?;
        let uri = stanza.lines().find_map(|l| l.strip_prefix("URIs:"))?;
        uri.split_whitespace().next().map(String::from)
    });
    let one_line = || {
        sources.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "deb").then_some(())?;
            let uri = w.next()?;
            (w.next()? == codename).then(|| uri.to_string())
        })
    };
    let mirror = deb822
        .or_else(one_line)
        .expect("an apt source for this release");
    (codename, mirror)
}

/// A fresh Debian with systemd (systemd-sysusers and deb-systemd-helper for the package, and
/// PID 1 for booting the unit) and PostgreSQL (for embedded servers under the unit), made once
/// by debootstrap and kept under /var/tmp; every run installs into its own copy.
fn debian_root() -> PathBuf {
    let (codename, mirror) = release_and_mirror();
    // The suffix names the recipe: a cache made with other packages gets another name.
    let cached = PathBuf::from(format!("/var/tmp/pgprism-test-debian-{codename}-pg"));
    let ready = |root: &Path| {
        root.join("usr/bin/systemd-sysusers").exists() && root.join("usr/lib/postgresql").is_dir()
    };
    // One debootstrap at a time (the tests using it run in parallel processes).
    let lock = std::fs::File::create("/var/tmp/pgprism-test-debian.lock").expect("lock file");
    // SAFETY: flock on a descriptor we own; the lock goes with the file at the end of scope.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(locked, 0, "flock");
    if !ready(&cached) {
        let building = PathBuf::from(format!(
            "{}.partial-{}",
            cached.display(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&building);
        ok(Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,postgresql",
                &codename,
            ])
            .arg(&building)
            .arg(&mirror));
        assert!(
            ready(&building),
            "debootstrap left no systemd or PostgreSQL"
        );
        // A whole tree or none: rename is atomic, a failed debootstrap leaves no cache.
        let _ = std::fs::remove_dir_all(&cached);
        std::fs::rename(&building, &cached).expect("keep the Debian tree");
    }
    drop(lock);
    let copy = scratch("chroot");
    ok(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", cached.display()))
        .arg(&copy));
    copy
}

/// `chroot [--userspec=UID:GID] ROOT ARGS...` with a clean environment.
fn in_root_as(root: &Path, user: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    if let Some(user) = user {
        cmd.arg(format!("--userspec={user}"));
    }
    cmd.arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

fn in_root(root: &Path, args: &[&str]) -> Command {
    in_root_as(root, None, args)
}

#[test]
fn installs_on_a_fresh_debian_checks_as_pgprism_and_purges_clean() {
    if !root_or_skip("installs_on_a_fresh_debian_checks_as_pgprism_and_purges_clean") {
        return;
    }
    let root = debian_root();
    std::fs::copy(package(), root.join("tmp/pgprism.deb")).unwrap();
    ok(&mut in_root(&root, &["dpkg", "-i", "/tmp/pgprism.deb"]));

    // The user, made by systemd-sysusers from the package's sysusers.d file.
    let passwd = text(&ok(&mut in_root(&root, &["getent", "passwd", "pgprism"])));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[5], "/var/lib/pgprism", "{passwd}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{passwd}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {passwd}");
    let gid = fields[3];

    // The config: root's, readable by the service's group only.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(root.join("etc/pgprism/pgprism.toml")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o640));
    assert_eq!(meta.gid().to_string(), gid);

    // `pgprism check`, as the unit's ExecStartPre runs it: the pgprism user, no capabilities.
    let user = format!("{uid}:{gid}");
    let as_pgprism = |config: &str| {
        in_root_as(
            &root,
            Some(&user),
            &["/usr/bin/pgprism", "check", "--config", config],
        )
        .output()
        .unwrap()
    };
    let checked = as_pgprism("/etc/pgprism/pgprism.toml");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(String::from_utf8_lossy(&checked.stderr).contains("is valid"));
    assert!(String::from_utf8_lossy(&checked.stdout).contains("listen = \"127.0.0.1:6432\""));
    // The installed man page and the unit where systemd looks for them.
    assert!(root.join("usr/share/man/man1/pgprism.1.gz").is_file());
    assert!(
        root.join("usr/lib/systemd/system/pgprism.service")
            .is_file()
    );
    // Registered with deb-systemd-helper, not enabled: the config names no primary yet.
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/pgprism.service")
            .exists()
    );

    // Purge: the files, the conffiles, the state and the user go.
    std::fs::create_dir_all(root.join("var/lib/pgprism/scratch")).unwrap();
    ok(&mut in_root(&root, &["dpkg", "--purge", "pgprism"]));
    assert!(!root.join("usr/bin/pgprism").exists());
    assert!(!root.join("etc/pgprism").exists());
    assert!(!root.join("etc/sysctl.d/60-pgprism.conf").exists());
    assert!(!root.join("var/lib/pgprism").exists());
    let gone = in_root(&root, &["getent", "passwd", "pgprism"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "user left behind: {}", text(&gone));
    let _ = std::fs::remove_dir_all(&root);
}

/// A port no one listens on now (bound, then released), for an embedded server the config
/// names before it starts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `pgprism run`, stopped with SIGTERM (then SIGKILL) when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                // Polling interval of this bounded wait for the exit.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn runs_embedded_servers_as_the_units_unprivileged_user() {
    // The unit runs pgprism as `pgprism`, not root, with no capabilities: embedded servers
    // then run as that same user (embed.os-user applies only to root), their state and
    // template directories where the unit's environment puts them. Here: user 65534, no
    // capabilities, the same two variables.
    if !root_or_skip("runs_embedded_servers_as_the_units_unprivileged_user") {
        return;
    }
    use std::io::BufRead;
    let dir = scratch("unprivileged");
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let port = free_port();
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin-cores = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [primary]\nurl = \"postgres://postgres:unit-pw@127.0.0.1:{port}\"\n\
             [[embed.instance]]\nname = \"unit-user\"\nport = {port}\ndata = \"memory\"\n\
             password = \"unit-pw\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_pgprism"))
        .args(["run", "--config"])
        .arg(&config)
        .env("PGPRISM_STATE_DIR", dir.join("state"))
        .env("PGPRISM_TEMPLATE_DIR", dir.join("templates"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .expect("spawn setpriv pgprism run");
    let stdout = child.stdout.take().unwrap();
    let mut run = Running(child);
    // The ready line, or EOF when pgprism exits.
    let listen = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let rest = line.strip_prefix("pgprism listening on ")?;
            rest.split_whitespace()
                .next()?
                .parse::<std::net::SocketAddr>()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "pgprism run did not start:\n{}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            )
        });
    let mut client = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres password=unit-pw dbname=postgres",
            listen.port()
        ),
        postgres::NoTls,
    )
    .expect("connect through pgprism");
    let row = client
        // jit is off by default for embedded servers (the unit forbids its W+X memory).
        .query_one("SELECT pg_backend_pid(), current_setting('jit')", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "off");
    // The backend serving this query runs as the unprivileged user.
    let backend: i32 = row.get(0);
    let status = std::fs::read_to_string(format!("/proc/{backend}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert_eq!(uid, "65534", "{status}");
    drop(client);
    // SIGTERM drains and stops the server: a clean exit.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = run.0.wait().expect("wait for pgprism run");
    assert!(
        status.success(),
        "{status}\n{}",
        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
    );
    drop(run);
    let _ = std::fs::remove_dir_all(dir);
}

/// The pid of the process listening on 127.0.0.1:`port` (from /proc/net/tcp's socket inode),
/// whatever mount namespace it runs in.
fn listener_pid(port: u16) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    let inode = tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address, state 0A = LISTEN, inode
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(9).map(|i| i.to_string()))?
    })?;
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
                })
                .then_some(pid)
        })
}

/// `Name:\tvalue` of /proc/PID/status.
fn proc_status(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// A booted container (`systemd-nspawn --boot`), shut down (SIGTERM: an orderly poweroff)
/// when dropped.
struct Booted {
    child: std::process::Child,
    log: PathBuf,
}

impl Booted {
    /// Waits (bounded) for the container to power off; true when it did.
    fn shut_down(&mut self) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            // Polling interval of this bounded wait for the poweroff.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if !self.shut_down() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Enables the unit in `root` and boots it (systemd as PID 1, the host's network).
fn boot(root: &Path) -> Booted {
    ok(&mut in_root(
        root,
        &["systemctl", "enable", "pgprism.service"],
    ));
    let log = root.with_extension("boot.log");
    Booted {
        child: Command::new("systemd-nspawn")
            .args(["--quiet", "--register=no", "--keep-unit", "--boot", "-D"])
            .arg(root)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("systemd-nspawn"),
        log,
    }
}

/// The container's PID 1 (its systemd), as seen from here: the descendant of the nspawn
/// process whose pid in its own namespace is 1.
fn container_init(nspawn: u32) -> Option<u32> {
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let text = status(pid)?;
        let nspid = text.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        (nspid.split_whitespace().nth(1) == Some("1")).then_some(())?;
        // Up the parents to the nspawn process (a few steps at most).
        let mut at = pid;
        for _ in 0..4 {
            let parent: u32 = status(at)?
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))?
                .trim()
                .parse()
                .ok()?;
            if parent == nspawn {
                return Some(pid);
            }
            at = parent;
        }
        None
    })
}

/// `systemctl ARGS` inside the container (nsenter into its namespaces); stdout, trimmed.
fn systemctl_in(init: u32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--target={init}"))
        .args([
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--",
            "systemctl",
        ])
        .args(args)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_unit_runs_the_proxy_and_an_embedded_server_under_systemd() {
    // The package on a fresh Debian booted with systemd as PID 1 (systemd-nspawn, sharing the
    // host's network): the unit starts with its whole sandbox, `pgprism run` supervises an
    // embedded PostgreSQL server whose data lives in the StateDirectory, and the proxy in
    // front of it answers from the host.
    if !root_or_skip("the_unit_runs_the_proxy_and_an_embedded_server_under_systemd") {
        return;
    }
    let root = debian_root();
    std::fs::copy(package(), root.join("tmp/pgprism.deb")).unwrap();
    ok(&mut in_root(&root, &["dpkg", "-i", "/tmp/pgprism.deb"]));
    let (server, listen, admin) = (free_port(), free_port(), free_port());
    // Written in place: the conffile keeps its owner and mode (root:pgprism 0640).
    std::fs::write(
        root.join("etc/pgprism/pgprism.toml"),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{listen}\"\nshards = 2\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [primary]\nurl = \"postgres://postgres:db-pw@127.0.0.1:{server}\"\n\
             [[embed.instance]]\nname = \"db\"\nport = {server}\n\
             data = \"/var/lib/pgprism/db\"\npassword = \"db-pw\"\n"
        ),
    )
    .unwrap();
    let mut booted = boot(&root);
    let conninfo = format!(
        "host=127.0.0.1 port={listen} user=postgres password=db-pw dbname=postgres connect_timeout=5"
    );
    let mut client = None;
    assert!(
        support::eventually(std::time::Duration::from_secs(120), || {
            client = postgres::Client::connect(&conninfo, postgres::NoTls).ok();
            client.is_some()
        }),
        "pgprism did not serve on {listen}; boot log:\n{}",
        booted.log()
    );
    let mut client = client.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .unwrap();
    let row = client
        .query_one(
            "SELECT count(*), current_setting('data_directory'), current_setting('jit') FROM t",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, String>(1), "/var/lib/pgprism/db");
    assert_eq!(row.get::<_, String>(2), "off");

    // pgprism as the unit runs it: the pgprism user, no capabilities, no new privileges, a
    // seccomp filter; its server inherits all of it.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let uid = passwd
        .lines()
        .find_map(|l| l.strip_prefix("pgprism:x:"))
        .and_then(|l| l.split(':').next())
        .expect("pgprism in /etc/passwd")
        .to_string();
    let pgprism = listener_pid(listen).expect("the process listening for clients");
    // pg_backend_pid() is a pid of the container's namespace; the postmaster, pgprism's child,
    // is found from here by its parent.
    let postmaster = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines().any(|l| l == format!("PPid:\t{pgprism}"))
                    && s.lines().any(|l| l == "Name:\tpostgres")
            })
        })
        .expect("the embedded server, a child of pgprism");
    for pid in [pgprism, postmaster] {
        assert_eq!(proc_status(pid, "Uid"), uid, "pid {pid}");
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000", "pid {pid}");
        assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000", "pid {pid}");
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "pid {pid}");
        assert_eq!(proc_status(pid, "Seccomp"), "2", "pid {pid}");
    }
    let cmdline = std::fs::read(format!("/proc/{pgprism}/cmdline")).unwrap();
    assert!(cmdline.starts_with(b"/usr/bin/pgprism\0run\0--config\0/etc/pgprism/pgprism.toml"));
    let (code, metrics) = support::http_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], admin)),
        "/metrics",
    );
    assert_eq!(code, 200);
    assert!(metrics.contains("pgprism_statements_total"), "{metrics}");
    drop(client);

    // An orderly poweroff stops the unit (drain, then the server) like `systemctl stop`.
    assert!(booted.shut_down(), "the container did not power off");
    assert!(root.join("var/lib/pgprism/db/PG_VERSION").is_file());
    use std::os::unix::fs::MetadataExt;
    let data = std::fs::metadata(root.join("var/lib/pgprism/db")).unwrap();
    assert_eq!(data.uid().to_string(), uid);
    assert!(
        !root.join("var/lib/pgprism/db/postmaster.pid").exists(),
        "the server was not stopped cleanly; boot log:\n{}",
        booted.log()
    );
    drop(booted);
    let _ = std::fs::remove_file(root.with_extension("boot.log"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn usr2_under_the_unit_hands_over_to_a_new_process_systemd_follows() {
    // `systemctl kill -s USR2 --kill-whom=main pgprism` under the shipped unit: the new process
    // (a child of the old one) tells systemd its pid (NotifyAccess=all), the old one drains
    // and exits, and the service stays active with the new main pid, serving throughout.
    // (Upgrades refuse while pgprism runs embedded servers, so the primary runs here, on the
    // host.)
    if !root_or_skip("usr2_under_the_unit_hands_over_to_a_new_process_systemd_follows") {
        return;
    }
    let primary = Instance::start(InstanceConfig {
        name: "unit-upgrade".into(),
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL");
    let root = debian_root();
    std::fs::copy(package(), root.join("tmp/pgprism.deb")).unwrap();
    ok(&mut in_root(&root, &["dpkg", "-i", "/tmp/pgprism.deb"]));
    let (listen, admin) = (free_port(), free_port());
    std::fs::write(
        root.join("etc/pgprism/pgprism.toml"),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{listen}\"\nshards = 2\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [primary]\nurl = \"postgres://127.0.0.1:{}\"\n",
            primary.port()
        ),
    )
    .unwrap();
    let booted = boot(&root);
    let conninfo =
        format!("host=127.0.0.1 port={listen} user=postgres dbname=postgres connect_timeout=5");
    assert!(
        support::eventually(std::time::Duration::from_secs(120), || {
            postgres::Client::connect(&conninfo, postgres::NoTls).is_ok()
        }),
        "pgprism did not serve on {listen}; boot log:\n{}",
        booted.log()
    );
    let init = container_init(booted.child.id()).expect("the container's systemd");
    let main_pid = || {
        systemctl_in(
            init,
            &["show", "--property=MainPID", "--value", "pgprism.service"],
        )
    };
    assert_eq!(
        systemctl_in(init, &["is-active", "pgprism.service"]),
        "active"
    );
    let main_before = main_pid();
    let old = listener_pid(listen).expect("pgprism listening");
    // A session open across the upgrade finishes on the old process.
    let mut session = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();

    // As docs/upgrade.md says, run inside the container: only the main process gets USR2.
    systemctl_in(
        init,
        &["kill", "-s", "USR2", "--kill-whom=main", "pgprism.service"],
    );
    let mut main_after = String::new();
    assert!(
        support::eventually(std::time::Duration::from_secs(60), || {
            main_after = main_pid();
            !main_after.is_empty() && main_after != "0" && main_after != main_before
        }),
        "systemd kept main pid {main_before}; boot log:\n{}",
        booted.log()
    );
    assert_eq!(
        session.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0),
        1
    );
    drop(session);
    assert!(
        support::eventually(std::time::Duration::from_secs(60), || {
            !Path::new(&format!("/proc/{old}")).exists() || proc_status(old, "State") == "Z"
        }),
        "the old process did not exit"
    );
    let new = listener_pid(listen).expect("the new process listening");
    assert_ne!(new, old);
    let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    assert_eq!(
        client.query_one("SELECT 2", &[]).unwrap().get::<_, i32>(0),
        2
    );
    assert_eq!(
        systemctl_in(init, &["is-active", "pgprism.service"]),
        "active"
    );
    assert_eq!(main_pid(), main_after);
    assert_eq!(proc_status(new, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(new, "NoNewPrivs"), "1");
    assert_eq!(proc_status(new, "Seccomp"), "2");
    drop(client);
    drop(booted);
    let _ = std::fs::remove_file(root.with_extension("boot.log"));
    let _ = std::fs::remove_dir_all(&root);
}
