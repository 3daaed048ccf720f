//! Preparing a data directory: copying the template, handing it to the server's OS user,
//! writing our settings and `pg_hba.conf`, and removing memory directories. Never removes a
//! directory that is not a memory directory made by this module.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::process::OsUser;
use super::{EmbedError, InstanceConfig};

/// File our per-start settings go into; the template's `postgresql.conf` includes it.
pub(super) const SETTINGS_FILE: &str = "pgprism.conf";
/// Server stdout/stderr, kept in the data directory for debugging.
pub(super) const LOG_FILE: &str = "server.log";
/// Prefix of memory data directories, followed by `<pid>-<seq>-<name>`; the pid lets a
/// later process find directories whose owner died without cleaning up.
const MEMORY_PREFIX: &str = "pgprism-";
/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const SOCKET_PATH_BYTES_MAX: usize = 107;
/// Bound on stale memory directories removed per start, so a huge /dev/shm costs little.
const SWEEP_ENTRIES_MAX: usize = 256;

static MEMORY_SEQ: AtomicU32 = AtomicU32::new(0);

/// The tmpfs where memory instances live; the temp dir when there is no /dev/shm.
fn memory_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A new, unique path for a memory instance (not created yet).
pub(super) fn new_memory_path(name: &str) -> PathBuf {
    let seq = MEMORY_SEQ.fetch_add(1, Ordering::Relaxed);
    // Only a short, safe slice of the name: it ends up in the socket path.
    let safe: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(24)
        .collect();
    memory_root().join(format!(
        "{MEMORY_PREFIX}{}-{seq}-{safe}",
        std::process::id()
    ))
}

/// Whether `path` is a memory data directory made by this module (a direct child of the
/// memory root with our prefix), the only kind pgprism may remove on its own.
pub(super) fn is_memory_dir(path: &Path) -> bool {
    path.parent() == Some(memory_root().as_path())
        && path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(MEMORY_PREFIX))
}

/// Best effort: removes memory directories left by processes that no longer exist (killed
/// test runs). Their servers died with them through the parent-death signal.
pub(super) fn sweep_stale_memory_dirs() {
    let Ok(entries) = fs::read_dir(memory_root()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok).take(SWEEP_ENTRIES_MAX) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(MEMORY_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid <= 0 || process_exists(pid) {
            continue;
        }
        let path = entry.path();
        // Made by a pgprism that is gone, but its server may live on: an upgrade hands the
        // servers to the new process, which adopts them where they are.
        if server_running_in(&path) {
            continue;
        }
        // Only directories that look like ours: a cluster or a half-made copy of one.
        if path.join(LOG_FILE).exists() || path.join("PG_VERSION").exists() {
            tracing::debug!(path = %path.display(), "removing stale memory data dir");
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Removes a PostgreSQL lock file (`postmaster.pid`, or a Unix socket's `.s.PGSQL.PORT.lock`)
/// when it names `pid`, a postmaster known to have exited. An adopted server is not our
/// child: once it dies it stays a zombie until its parent (the old pgprism, or init, which in
/// a container may never reap) waits for it, and PostgreSQL takes a lock file naming a pid
/// that still answers `kill(pid, 0)` for a live postmaster, refusing to start. Its
/// shared-memory check still guards against backends of the dead server that linger.
pub(super) fn remove_dead_lock_file(path: &Path, pid: u32) {
    let names_it = fs::read_to_string(path)
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
        == Some(pid);
    if names_it && let Err(error) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %error, "cannot remove the dead server's lock file");
    }
}

/// Whether `postmaster.pid` in `dir` names a running process (a live server there).
fn server_running_in(dir: &Path) -> bool {
    fs::read_to_string(dir.join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<libc::pid_t>().ok())
        .is_some_and(|pid| pid > 0 && process_exists(pid))
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission; it delivers nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Whether `dir` already holds a cluster.
pub(super) fn has_cluster(dir: &Path) -> bool {
    dir.join("PG_VERSION").is_file()
}

/// Whether `dir` exists and has anything in it.
pub(super) fn has_entries(dir: &Path) -> Result<bool, EmbedError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(EmbedError::io("read directory", dir)(error)),
    }
}

/// Creates `dir` (0700, as PostgreSQL demands) owned by the server's user.
pub(super) fn create_owned_dir(dir: &Path, owner: Option<&OsUser>) -> Result<(), EmbedError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(EmbedError::io("create directory", dir))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(EmbedError::io("set permissions of", dir))?;
    chown(dir, owner)
}

fn chown(path: &Path, owner: Option<&OsUser>) -> Result<(), EmbedError> {
    match owner {
        Some(user) => std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .map_err(EmbedError::io("change owner of", path)),
        None => Ok(()),
    }
}

/// Copies the template's contents into the existing directory `to`, preserving modes and
/// giving every entry to `owner`. The template is never modified.
pub(super) fn copy_tree(from: &Path, to: &Path, owner: Option<&OsUser>) -> Result<(), EmbedError> {
    for entry in fs::read_dir(from).map_err(EmbedError::io("read directory", from))? {
        let entry = entry.map_err(EmbedError::io("read directory", from))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(EmbedError::io("stat", &source))?;
        if kind.is_dir() {
            let mode = entry
                .metadata()
                .map_err(EmbedError::io("stat", &source))?
                .permissions()
                .mode();
            fs::DirBuilder::new()
                .mode(mode & 0o7777)
                .create(&target)
                .map_err(EmbedError::io("create directory", &target))?;
            chown(&target, owner)?;
            copy_tree(&source, &target, owner)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&source).map_err(EmbedError::io("read link", &source))?;
            std::os::unix::fs::symlink(&link, &target)
                .map_err(EmbedError::io("create symlink", &target))?;
            chown(&target, owner)?;
        } else {
            // fs::copy keeps the permission bits and uses copy_file_range where it can.
            fs::copy(&source, &target).map_err(EmbedError::io("copy file to", &target))?;
            chown(&target, owner)?;
        }
    }
    Ok(())
}

/// A `postgresql.conf` string literal: quoted, with quotes doubled and backslashes escaped.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Where the server's Unix socket goes unless the settings say otherwise: the data directory
/// itself, when the socket path fits the kernel's limit. A longer path makes the postmaster
/// fail; TCP alone is enough for everything here, so the socket is left out then.
pub(super) fn default_socket_dir(dir: &Path) -> Option<&Path> {
    let socket_path_bytes = dir.as_os_str().len() + "/.s.PGSQL.65535".len();
    (socket_path_bytes <= SOCKET_PATH_BYTES_MAX).then_some(dir)
}

/// Writes the settings for one start into [`SETTINGS_FILE`] (rewritten each start, so a
/// reused directory gets the new port instead of an ever-growing config).
pub(super) fn write_settings(
    dir: &Path,
    cfg: &InstanceConfig,
    port: u16,
    memory: bool,
    owner: Option<&OsUser>,
) -> Result<(), EmbedError> {
    let socket_dirs = match default_socket_dir(dir) {
        Some(socket_dir) => socket_dir.to_string_lossy().into_owned(),
        None => {
            tracing::warn!(dir = %dir.display(), "data dir path too long for a unix socket; TCP only");
            String::new()
        }
    };
    let port_text = port.to_string();
    let mut settings: Vec<(&str, &str)> = vec![
        ("port", &port_text),
        ("listen_addresses", &cfg.host),
        ("unix_socket_directories", &socket_dirs),
        // The socket is trusted (`write_hba`): only the server's OS user (and root) may
        // connect to it, wherever the settings put it.
        ("unix_socket_permissions", "0700"),
        // Tests open a couple of hundred concurrent clients.
        ("max_connections", "300"),
        // CDC reads logical replication from these servers.
        ("wal_level", "logical"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("shared_buffers", "32MB"),
        // LLVM JIT maps memory writable and executable, which the packaged unit forbids
        // (MemoryDenyWriteExecute): a query above jit_above_cost would fail there. A user's
        // own `jit` setting (below) still wins.
        ("jit", "off"),
    ];
    if memory {
        // Data in RAM dies with the server anyway: durability buys nothing and costs time.
        // Persistent directories keep PostgreSQL's durable defaults.
        settings.extend([
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
        ]);
    }
    settings.extend(cfg.settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut text = String::from("# Written by pgprism embed on every start; edits are lost.\n");
    for (name, value) in settings {
        text.push_str(name);
        text.push_str(" = ");
        text.push_str(&conf_quote(value));
        text.push('\n');
    }
    write_owned(&dir.join(SETTINGS_FILE), &text, owner)
}

/// Writes `pg_hba.conf`: the caller's lines first (first match wins), then the Unix socket
/// trusted (only the server's OS user and root can reach it: it lives in the 0700 data
/// directory, or has mode 0700, see [`write_settings`]) and loopback TCP with scram-sha-256
/// when `password` (else trusted too), replication included.
pub(super) fn write_hba(
    dir: &Path,
    hba: &[String],
    password: bool,
    owner: Option<&OsUser>,
) -> Result<(), EmbedError> {
    let mut text = String::from("# Written by pgprism embed on every start; edits are lost.\n");
    for line in hba {
        text.push_str(line);
        text.push('\n');
    }
    let tcp = if password { "scram-sha-256" } else { "trust" };
    for database in ["all", "replication"] {
        text.push_str(&format!("local {database} all trust\n"));
        text.push_str(&format!("host {database} all 127.0.0.1/32 {tcp}\n"));
        text.push_str(&format!("host {database} all ::1/128 {tcp}\n"));
    }
    write_owned(&dir.join("pg_hba.conf"), &text, owner)
}

/// The file in the data directory holding the superuser's password, in libpq's passfile
/// format so `PGPASSFILE=` can name it.
pub const PASSFILE: &str = "pgpass";

/// Writes [`PASSFILE`] (mode 0600, the server's OS user's: libpq refuses a passfile others
/// may read) for `user`, any host, port and database.
pub(super) fn write_passfile(
    dir: &Path,
    user: &str,
    password: &str,
    owner: Option<&OsUser>,
) -> Result<(), EmbedError> {
    let line = format!(
        "*:*:*:{}:{}\n",
        pgpass_escape(user),
        pgpass_escape(password)
    );
    write_owned(&dir.join(PASSFILE), &line, owner)
}

/// The password [`write_passfile`] left in `dir`, if any (a directory instance keeps its
/// password across restarts).
pub fn kept_password(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join(PASSFILE)).ok()?;
    let line = text.lines().next()?;
    // Five fields split at unescaped colons; the last is the password.
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next()?),
            ':' => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5 && !fields[4].is_empty()).then(|| fields.swap_remove(4))
}

fn pgpass_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace(':', "\\:")
}

/// A fresh password: 32 hex digits from the kernel's random source.
pub fn generate_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes sure `postgresql.conf` includes [`SETTINGS_FILE`] (the template has it; a cluster
/// made elsewhere may not).
pub(super) fn ensure_settings_include(dir: &Path) -> Result<(), EmbedError> {
    let conf = dir.join("postgresql.conf");
    let text = fs::read_to_string(&conf).map_err(EmbedError::io("read", &conf))?;
    if text.contains(&include_line()) {
        return Ok(());
    }
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(EmbedError::io("open", &conf))?;
    io::Write::write_all(&mut file, format!("\n{}\n", include_line()).as_bytes())
        .map_err(EmbedError::io("append to", &conf))
}

pub(super) fn include_line() -> String {
    format!("include_if_exists = '{SETTINGS_FILE}'")
}

/// Writes `text` to `path`, mode 0600 and owned by `owner`, from the first byte on: a
/// temporary file beside it is created with that mode (`O_EXCL`, so never an existing
/// file or a link someone planted), written, given to `owner`, then renamed over `path`.
/// A reader sees the old file or the whole new one, never a readable half-made one.
fn write_owned(path: &Path, text: &str, owner: Option<&OsUser>) -> Result<(), EmbedError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let temp = path.with_file_name(name);
    // A temp file left by an earlier crash of this same pid (pids are reused).
    let _ = fs::remove_file(&temp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(EmbedError::io("create", &temp))?;
        // The umask cannot widen 0600, but a parent's default ACL could: set it exactly.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(EmbedError::io("set permissions of", &temp))?;
        io::Write::write_all(&mut file, text.as_bytes()).map_err(EmbedError::io("write", &temp))?;
        chown(&temp, owner)?;
        fs::rename(&temp, path).map_err(EmbedError::io("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Opens (appending) the server log, owned by the server's user so it can be read there too.
pub(super) fn open_log(dir: &Path, owner: Option<&OsUser>) -> Result<fs::File, EmbedError> {
    let path = dir.join(LOG_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(EmbedError::io("open", &path))?;
    chown(&path, owner)?;
    Ok(file)
}

/// The last lines of a log file written after byte `since_bytes`, for error messages; a
/// note instead when it cannot be read.
pub(super) fn tail(path: &Path, since_bytes: u64) -> String {
    const TAIL_BYTES_MAX: u64 = 4096;
    const TAIL_LINES_MAX: usize = 20;
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(
            len.saturating_sub(TAIL_BYTES_MAX).max(since_bytes),
        ))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(TAIL_LINES_MAX)..].join("\n")
        }
        Err(_) => format!("(could not read {})", path.display()),
    }
}

/// Removes a memory data directory; logs instead of failing, since it runs in `Drop` too.
pub(super) fn remove_memory_dir(dir: &Path) {
    if let Err(error) = fs::remove_dir_all(dir)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), %error, "could not remove memory data dir");
    }
}

#[cfg(test)]
mod tests {
    use super::{conf_quote, write_owned};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn quotes_conf_values() {
        assert_eq!(conf_quote("300"), "'300'");
        assert_eq!(conf_quote("it's"), "'it''s'");
        assert_eq!(conf_quote(r"a\b"), r"'a\\b'");
    }

    /// A private file replaces what was there (a readable file, a planted link) with a new
    /// 0600 file, never writing through the link or keeping the old mode; no temp file stays.
    #[test]
    fn owned_files_are_private_and_replace_links() {
        let dir = std::env::temp_dir().join(format!("pgprism-write-owned-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgpass");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_owned(&path, "secret", None).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "secret");

        let elsewhere = dir.join("elsewhere");
        fs::write(&elsewhere, "untouched").unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        write_owned(&path, "secret 2", None).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(fs::read_to_string(&path).unwrap(), "secret 2");
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "untouched");
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["elsewhere", "pgpass"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
