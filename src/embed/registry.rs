//! The registry of running servers: one small file per supervised instance in a state
//! directory, so that a pgprism started after one that was killed can find and stop what the
//! dead one left behind.
//!
//! It must never signal a process it cannot prove is the server it recorded: the pid is
//! checked against the recorded start time (pids are recycled), the executable must be a
//! `postgres`, and its working directory (the postmaster `chdir`s into its data directory)
//! or its command line must name the recorded data directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::EmbedError;
use super::datadir;

/// Overrides the default state directory (the `embed.state-dir` key overrides this).
pub const STATE_DIR_ENV: &str = "PGPRISM_STATE_DIR";
const ENTRY_SUFFIX: &str = ".instance";
/// Bound on registry files read per start, so a littered directory costs little.
const ENTRIES_MAX: usize = 1024;
const EXIT_POLL_MS: u64 = 10;

/// What is recorded about one running server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) name: String,
    pub(super) pgprism_pid: u32,
    /// Start time of the pgprism process in clock ticks since boot (`/proc/<pid>/stat`).
    pub(super) pgprism_start_ticks: u64,
    pub(super) postmaster_pid: u32,
    pub(super) postmaster_start_ticks: u64,
    pub(super) data_dir: PathBuf,
    pub(super) port: u16,
    pub(super) memory: bool,
}

impl Entry {
    fn file_name(pgprism_pid: u32, name: &str) -> String {
        format!("{pgprism_pid}-{name}{ENTRY_SUFFIX}")
    }

    fn render(&self) -> String {
        format!(
            "name={}\npgprism_pid={}\npgprism_start_ticks={}\npostmaster_pid={}\n\
             postmaster_start_ticks={}\nport={}\nmemory={}\ndata_dir={}\n",
            self.name,
            self.pgprism_pid,
            self.pgprism_start_ticks,
            self.postmaster_pid,
            self.postmaster_start_ticks,
            self.port,
            self.memory,
            self.data_dir.display()
        )
    }

    fn parse(text: &str) -> Option<Entry> {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        };
        Some(Entry {
            name: field("name")?.to_owned(),
            pgprism_pid: field("pgprism_pid")?.parse().ok()?,
            pgprism_start_ticks: field("pgprism_start_ticks")?.parse().ok()?,
            postmaster_pid: field("postmaster_pid")?.parse().ok()?,
            postmaster_start_ticks: field("postmaster_start_ticks")?.parse().ok()?,
            port: field("port")?.parse().ok()?,
            memory: field("memory")?.parse().ok()?,
            data_dir: PathBuf::from(field("data_dir")?),
        })
    }
}

/// The state directory: the configured one, else `$PGPRISM_STATE_DIR`, else `/run/pgprism`
/// as root, else `$XDG_RUNTIME_DIR/pgprism`, else `/tmp/pgprism-<uid>`.
pub fn default_state_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(dir) = configured {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if super::process::running_as_root() {
        return PathBuf::from("/run/pgprism");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("pgprism");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/pgprism-{uid}"))
}

/// The registry in one state directory.
#[derive(Debug, Clone)]
pub(super) struct Registry {
    dir: PathBuf,
    own_pid: u32,
    own_start_ticks: u64,
}

impl Registry {
    pub(super) fn open(dir: PathBuf) -> Result<Registry, EmbedError> {
        fs::create_dir_all(&dir).map_err(EmbedError::io("create state directory", &dir))?;
        let own_pid = std::process::id();
        Ok(Registry {
            dir,
            own_pid,
            own_start_ticks: start_ticks(own_pid).unwrap_or(0),
        })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a server this process just started.
    pub(super) fn record(
        &self,
        name: &str,
        postmaster_pid: u32,
        data_dir: &Path,
        port: u16,
        memory: bool,
    ) -> Result<(), EmbedError> {
        let entry = Entry {
            name: name.to_owned(),
            pgprism_pid: self.own_pid,
            pgprism_start_ticks: self.own_start_ticks,
            postmaster_pid,
            postmaster_start_ticks: start_ticks(postmaster_pid).unwrap_or(0),
            data_dir: data_dir.to_path_buf(),
            port,
            memory,
        };
        let path = self.dir.join(Entry::file_name(self.own_pid, name));
        // Write then rename: a reader never sees half an entry.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, entry.render()).map_err(EmbedError::io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(EmbedError::io("rename", &path))
    }

    /// What `pgprism_pid` recorded about its server `name`, if it is still that running
    /// server (same start time, a `postgres` in the recorded data directory).
    pub(super) fn live_entry_of(&self, pgprism_pid: u32, name: &str) -> Option<Entry> {
        let path = self.dir.join(Entry::file_name(pgprism_pid, name));
        let entry = Entry::parse(&fs::read_to_string(path).ok()?)?;
        (entry.pgprism_pid == pgprism_pid && is_recorded_server(&entry)).then_some(entry)
    }

    /// Removes `pgprism_pid`'s entry for `name` (a server this process adopted from it).
    pub(super) fn forget_of(&self, pgprism_pid: u32, name: &str) {
        let _ = fs::remove_file(self.dir.join(Entry::file_name(pgprism_pid, name)));
    }

    /// Forgets a server this process stopped (or saw exit).
    pub(super) fn forget(&self, name: &str) {
        let path = self.dir.join(Entry::file_name(self.own_pid, name));
        if let Err(error) = fs::remove_file(&path)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "could not remove registry entry");
        }
    }

    /// Stops the servers of pgprism processes that no longer exist, removes their memory
    /// directories and their entries. Returns one line per entry cleaned, for the log.
    /// `spare`: a pgprism whose servers this process adopts (an upgrade's predecessor), left
    /// alone even once it has exited.
    pub(super) fn clean_leftovers(
        &self,
        stop_timeout: Duration,
        spare: Option<u32>,
    ) -> Vec<String> {
        let mut cleaned = Vec::new();
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return cleaned;
        };
        for file in dir.filter_map(Result::ok).take(ENTRIES_MAX) {
            let path = file.path();
            if !path.to_string_lossy().ends_with(ENTRY_SUFFIX) {
                continue;
            }
            let Some(entry) = fs::read_to_string(&path)
                .ok()
                .and_then(|text| Entry::parse(&text))
            else {
                tracing::warn!(path = %path.display(), "ignoring unreadable registry entry");
                continue;
            };
            if entry.pgprism_pid == self.own_pid
                || Some(entry.pgprism_pid) == spare
                || same_process_alive(entry.pgprism_pid, entry.pgprism_start_ticks)
            {
                continue;
            }
            cleaned.push(clean_entry(&entry, stop_timeout));
            let _ = fs::remove_file(&path);
        }
        cleaned
    }
}

/// Stops the server of `entry` (the one a replaced process ran, which this process could
/// not adopt) if it still is that server, and removes its memory directory: a server nobody
/// supervises must not run on beside the one started afresh. Says what was done.
pub(super) fn stop_unadopted(entry: &Entry, stop_timeout: Duration) -> String {
    clean_entry(entry, stop_timeout)
}

/// Stops one leftover server if it still runs, removes its memory directory, and says what
/// was done.
fn clean_entry(entry: &Entry, stop_timeout: Duration) -> String {
    let pid = entry.postmaster_pid;
    let what = format!(
        "instance {} (pgprism pid {}, postmaster pid {pid}, port {}, {})",
        entry.name,
        entry.pgprism_pid,
        entry.port,
        entry.data_dir.display()
    );
    let mut done = Vec::new();
    if is_recorded_server(entry) {
        match stop_foreign(pid, stop_timeout) {
            Ok(()) => done.push("stopped its server".to_owned()),
            Err(error) => done.push(format!("could not stop its server ({error})")),
        }
    } else {
        done.push("its server was no longer running".to_owned());
    }
    if entry.memory {
        if datadir::is_memory_dir(&entry.data_dir) {
            if entry.data_dir.exists() {
                datadir::remove_memory_dir(&entry.data_dir);
                done.push("removed its memory data dir".to_owned());
            }
        } else {
            done.push("kept its data dir (not a pgprism memory dir)".to_owned());
        }
    }
    format!("left behind by a dead pgprism: {what}: {}", done.join(", "))
}

/// Whether `entry.postmaster_pid` is still the very server the entry describes.
fn is_recorded_server(entry: &Entry) -> bool {
    let pid = entry.postmaster_pid;
    if !same_process_alive(pid, entry.postmaster_start_ticks) {
        return false;
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let is_postgres = fs::read_link(proc_dir.join("exe"))
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n == "postgres"))
        .unwrap_or(false);
    if !is_postgres {
        return false;
    }
    let cwd_matches = fs::read_link(proc_dir.join("cwd")).ok().as_deref() == Some(&entry.data_dir);
    let cmdline_matches = fs::read(proc_dir.join("cmdline"))
        .map(|bytes| {
            bytes
                .split(|b| *b == 0)
                .any(|arg| arg == entry.data_dir.as_os_str().as_encoded_bytes())
        })
        .unwrap_or(false);
    cwd_matches || cmdline_matches
}

/// Fast shutdown of a server that is not our child, a bounded wait, then SIGKILL.
fn stop_foreign(pid: u32, timeout: Duration) -> io::Result<()> {
    signal(pid, libc::SIGINT)?;
    if wait_gone(pid, timeout) {
        return Ok(());
    }
    tracing::warn!(pid, "leftover PostgreSQL ignored fast shutdown; killing it");
    signal(pid, libc::SIGKILL)?;
    if wait_gone(pid, timeout) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "still running after SIGKILL",
        ))
    }
}

fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions; the caller checked that this pid is
    // the recorded server (start time, executable, data directory).
    if unsafe { libc::kill(pid, sig) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(error);
    }
    Ok(())
}

/// Polls until the process is gone (or a zombie nobody reaped yet), up to `timeout`.
pub(super) fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(EXIT_POLL_MS));
    }
}

/// Whether a process runs (exists and is not a zombie).
pub(super) fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|stat| stat.state != 'Z')
}

fn same_process_alive(pid: u32, recorded_ticks: u64) -> bool {
    match proc_stat(pid) {
        Some(stat) => {
            stat.state != 'Z' && (recorded_ticks == 0 || stat.start_ticks == recorded_ticks)
        }
        None => false,
    }
}

fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|stat| stat.start_ticks)
}

struct ProcStat {
    state: char,
    start_ticks: u64,
}

/// Fields 3 (state) and 22 (starttime) of `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so parse from the last `)`.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // starttime is field 22; `rest` starts at field 3.
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

/// Processes whose working directory is `dir`: what is left of a postmaster's children
/// after the postmaster was killed (every PostgreSQL process runs in its data directory).
pub(super) fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir) && alive(*pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let entry = Entry {
            name: "a".into(),
            pgprism_pid: 12,
            pgprism_start_ticks: 34,
            postmaster_pid: 56,
            postmaster_start_ticks: 78,
            data_dir: PathBuf::from("/dev/shm/pgprism-12-0-a"),
            port: 5433,
            memory: true,
        };
        assert_eq!(Entry::parse(&entry.render()), Some(entry));
        assert_eq!(Entry::parse("name=a\n"), None);
    }

    #[test]
    fn reads_our_own_stat() {
        let me = std::process::id();
        assert!(alive(me));
        let ticks = start_ticks(me).expect("own start time");
        assert!(same_process_alive(me, ticks));
        assert!(!same_process_alive(me, ticks + 1));
    }
}
