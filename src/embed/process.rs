//! Spawning PostgreSQL processes tied to our lifetime, as an unprivileged OS user when we are
//! root, and signalling/reaping them with bounded waits. Never signals a process it did not
//! spawn.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use super::EmbedError;

/// Poll interval while waiting for a child to exit.
const WAIT_POLL_MS: u64 = 5;

/// The OS account a server runs as when we are root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OsUser {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

pub(super) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The account to run servers as: `Some` only when we are root, because PostgreSQL refuses
/// to run as root and an ordinary user cannot switch accounts anyway.
pub(super) fn server_user(configured: Option<&str>) -> Result<Option<OsUser>, EmbedError> {
    if !running_as_root() {
        return Ok(None);
    }
    lookup_os_user(configured.unwrap_or("postgres")).map(Some)
}

fn lookup_os_user(name: &str) -> Result<OsUser, EmbedError> {
    let not_found = || EmbedError::OsUserNotFound {
        user: name.to_owned(),
    };
    let cname = CString::new(name).map_err(|_| not_found())?;
    // 16 KiB is far above any real passwd entry; getpwnam_r reports ERANGE if not.
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is a plain C struct for which all-zero bytes are a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call, buf.len() is the real
    // length of buf, and pwd's string fields point into buf, which we do not read.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(not_found());
    }
    Ok(OsUser {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// A command for a PostgreSQL program that dies with the spawning thread (`tied`), or that
/// outlives this process (a `pgprism run` that may hand its servers to a new process on an
/// upgrade: a parent-death signal would end them when the old process exits).
///
/// The child gets `PR_SET_PDEATHSIG = SIGQUIT` (immediate shutdown for a postmaster), so a
/// test process that panics, is killed, or exits without dropping its `Instance` does not
/// leave servers behind. Linux delivers that signal when the *thread* that forked the child
/// exits, so the caller must spawn from a thread that outlives the child.
///
/// Linux clears the parent-death signal on a credential change. std applies `uid`/`gid`
/// before it runs `pre_exec` closures (checked by the `pdeathsig_survives_uid_switch` test in
/// `tests/embed.rs`), so setting the signal in `pre_exec` is late enough to stick.
pub(super) fn supervised_command(program: &Path, run_as: Option<&OsUser>, tied: bool) -> Command {
    let mut cmd = Command::new(program);
    crate::subprocess::reset_signals(&mut cmd);
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
        // initdb and postgres look at HOME/USER only for messages, but a root HOME they
        // cannot read produces confusing warnings.
        cmd.env("USER", &user.name).env("LOGNAME", &user.name);
    }
    // Our working directory may be unreadable by the server's user; "/" always works.
    cmd.current_dir("/");
    // Settings from the caller's environment would silently override ours.
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGOPTIONS",
        "PGTZ",
        "PGCLIENTENCODING",
    ] {
        cmd.env_remove(var);
    }
    if !tied {
        return cmd;
    }
    let parent_pid = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe syscalls prctl and getppid; it allocates nothing (the error is built
    // from a raw errno) and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGQUIT as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // If the parent died between fork and prctl, the signal will never come: we have
            // been reparented already, so give up instead of running unsupervised.
            if libc::getppid() as u32 != parent_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// Sends `signal` to a child we spawned and have not reaped yet.
pub(super) fn send_signal(child: &Child, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(child.id()).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions. The pid is our own unreaped child, so
    // it cannot have been recycled for another process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for the child to exit; `None` if it is still running.
pub(super) fn wait_bounded(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(WAIT_POLL_MS));
    }
}

/// Fast shutdown (SIGINT: abort open transactions, checkpoint, exit), a bounded wait, then
/// SIGKILL and a reap. Returns how the child ended.
pub(super) fn shut_down(child: &mut Child, timeout: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // ESRCH here only means it exited between try_wait and kill; the wait below reaps it.
    let _ = send_signal(child, libc::SIGINT);
    if let Some(status) = wait_bounded(child, timeout)? {
        return Ok(status);
    }
    tracing::warn!(
        pid = child.id(),
        "PostgreSQL ignored fast shutdown; killing it"
    );
    child.kill()?;
    child.wait()
}

/// A server this process did not start (an upgrade's predecessor did) but supervises: held by
/// a pidfd, so signals reach that very process even once its pid could be reused, and its
/// exit is seen without being its parent (`pidfd_open` works on any process).
#[derive(Debug)]
pub(super) struct Adopted {
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
}

impl Adopted {
    /// Opens a pidfd on `pid`; the caller has checked that it is the recorded server.
    pub(super) fn open(pid: u32) -> io::Result<Adopted> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        let pidfd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Ok(Adopted { pid, pidfd })
    }

    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (a pidfd polls readable then), waiting up to `limit`.
    pub(super) fn exited_within(&self, limit: Duration) -> bool {
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.pidfd),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        ready > 0 && poll.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    /// Sends `signal` to that very process (not to a later one with its pid).
    pub(super) fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with our pidfd, a signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&self.pidfd),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fast shutdown (SIGINT), a bounded wait, then SIGKILL; whether it has exited. Its
    /// parent (the old pgprism, or init once that one is gone) reaps it.
    pub(super) fn shut_down(&self, timeout: Duration) -> io::Result<bool> {
        if self.exited_within(Duration::ZERO) {
            return Ok(true);
        }
        // ESRCH only means it exited meanwhile.
        let _ = self.signal(libc::SIGINT);
        if self.exited_within(timeout) {
            return Ok(true);
        }
        tracing::warn!(
            pid = self.pid,
            "PostgreSQL ignored fast shutdown; killing it"
        );
        let _ = self.signal(libc::SIGKILL);
        Ok(self.exited_within(timeout))
    }
}
