//! The `initdb` template cache: one freshly initialised cluster per server build and initdb
//! options, shared by every process on the machine and copied for each instance.
//!
//! Many test processes start at once, so a template is built only under an exclusive `flock`,
//! into a temporary directory that is `rename`d into place: a template directory that exists
//! is complete. Instances never write into a template.
//!
//! The cache directory belongs to whoever created it first: a cache made by root is not
//! writable by an ordinary user, who then needs their own via `PGPRISM_TEMPLATE_DIR`.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::EmbedError;
use super::binaries::PgBinaries;
use super::datadir;
use super::process::{self, OsUser};

/// Overrides where templates are kept.
pub(super) const TEMPLATE_DIR_ENV: &str = "PGPRISM_TEMPLATE_DIR";
const TEMPLATE_DIR_DEFAULT: &str = "/var/tmp/pgprism-templates";
/// Bump when the way templates are made changes, so stale caches are not reused.
const TEMPLATE_FORMAT: u32 = 1;
/// Bound on waiting for another process's initdb (which takes a few seconds).
const LOCK_WAIT_MS_MAX: u64 = 180_000;
const LOCK_POLL_MS: u64 = 20;

/// Returns the template directory for these binaries and superuser, building it first if no
/// process has yet.
pub(super) fn ensure(
    bins: &PgBinaries,
    superuser: &str,
    run_as: Option<&OsUser>,
) -> Result<PathBuf, EmbedError> {
    let root = template_root();
    let key = template_key(bins, superuser);
    let template = root.join(&key);
    // Fast path without the lock: rename is atomic, so an existing directory is complete.
    if datadir::has_cluster(&template) {
        return Ok(template);
    }
    create_root(&root)?;
    let lock_path = root.join(format!("{key}.lock"));
    let _lock = lock_exclusive(&lock_path)?;
    if datadir::has_cluster(&template) {
        // Another process built it while we waited for the lock.
        return Ok(template);
    }
    build(bins, superuser, run_as, &root, &key, &template)?;
    Ok(template)
}

fn template_root() -> PathBuf {
    std::env::var_os(TEMPLATE_DIR_ENV)
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(TEMPLATE_DIR_DEFAULT), PathBuf::from)
}

fn create_root(root: &Path) -> Result<(), EmbedError> {
    if root.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(EmbedError::io("create directory", root))?;
    // The server's OS user runs initdb inside it, so it must be able to traverse it whatever
    // our umask is.
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
        .map_err(EmbedError::io("set permissions of", root))
}

/// `<major>-<hash>`: the hash covers what makes an initdb result differ (server build,
/// superuser, options). Runtime settings are not in it: they are written per start.
fn template_key(bins: &PgBinaries, superuser: &str) -> String {
    let postgres = bins.program("postgres");
    // The binary's mtime changes on every package upgrade, which is when catalogs may change.
    let mtime_ns = fs::metadata(&postgres)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let identity = format!(
        "{TEMPLATE_FORMAT}\0{}\0{}\0{mtime_ns}\0{superuser}",
        bins.bindir.display(),
        bins.version_major
    );
    format!(
        "{}-{:016x}",
        bins.version_major,
        fnv1a_64(identity.as_bytes())
    )
}

/// FNV-1a: stable across Rust releases (std's `DefaultHasher` is not), and this is a cache
/// key, not a defence against anyone.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Holds an exclusive `flock` until dropped (closing the file releases it).
struct TemplateLock {
    _file: File,
}

fn lock_exclusive(path: &Path) -> Result<TemplateLock, EmbedError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(EmbedError::io("open lock file", path))?;
    let started = Instant::now();
    loop {
        // SAFETY: the fd belongs to `file`, which stays open for the whole call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(TemplateLock { _file: file });
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
            _ => return Err(EmbedError::io("lock", path)(error)),
        }
        let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if waited_ms >= LOCK_WAIT_MS_MAX {
            return Err(EmbedError::TemplateLockTimeout {
                path: path.to_path_buf(),
                waited_ms,
            });
        }
        thread::sleep(Duration::from_millis(LOCK_POLL_MS));
    }
}

/// Runs initdb into `<key>.tmp-<pid>` and renames it to `template`. Caller holds the lock.
fn build(
    bins: &PgBinaries,
    superuser: &str,
    run_as: Option<&OsUser>,
    root: &Path,
    key: &str,
    template: &Path,
) -> Result<(), EmbedError> {
    remove_stale_builds(root, key);
    let tmp = root.join(format!("{key}.tmp-{}", std::process::id()));
    let started = Instant::now();
    let mut outcome = run_initdb(bins, superuser, run_as, &tmp, "--locale=C.UTF-8")?;
    if !outcome.status.success() {
        // Systems without the C.UTF-8 locale: plain C collation with UTF-8 encoding.
        tracing::info!("initdb with C.UTF-8 failed; retrying with --no-locale");
        outcome = run_initdb(bins, superuser, run_as, &tmp, "--no-locale")?;
    }
    if !outcome.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        let mut text = String::from_utf8_lossy(&outcome.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&outcome.stderr));
        let lines: Vec<&str> = text.lines().collect();
        return Err(EmbedError::InitdbFailed {
            dir: tmp,
            status: outcome.status.to_string(),
            output_tail: lines[lines.len().saturating_sub(20)..].join("\n"),
        });
    }
    datadir::ensure_settings_include(&tmp)?;
    fs::rename(&tmp, template).map_err(EmbedError::io("rename template into", template))?;
    tracing::info!(
        template = %template.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "built PostgreSQL template"
    );
    Ok(())
}

fn run_initdb(
    bins: &PgBinaries,
    superuser: &str,
    run_as: Option<&OsUser>,
    dir: &Path,
    locale_arg: &str,
) -> Result<Output, EmbedError> {
    // initdb wants an empty directory it owns; start from scratch for each attempt.
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(EmbedError::io("remove", dir))?;
    }
    datadir::create_owned_dir(dir, run_as)?;
    let program = bins.program("initdb");
    process::supervised_command(&program, run_as, true)
        .arg("-D")
        .arg(dir)
        .args([
            "-U",
            superuser,
            "-A",
            "trust",
            "-E",
            "UTF8",
            locale_arg,
            "--no-sync",
        ])
        .output()
        .map_err(|source| EmbedError::Spawn { program, source })
}

/// Removes half-built templates of `key` left by processes that died mid-initdb. Safe because
/// we hold the lock: nobody else is building this key right now.
fn remove_stale_builds(root: &Path, key: &str) {
    let prefix = format!("{key}.tmp-");
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fnv1a_64;

    #[test]
    fn fnv1a_matches_reference_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
