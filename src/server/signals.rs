//! Signals are blocked in every thread and collected by the control thread with
//! `sigtimedwait`, so no handler runs on a shard and no async-signal-safety puzzles arise.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGUSR2: start the binary again and hand it the listening sockets (`upgrade`).
    Upgrade,
}

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        // Blocked everywhere pgprism blocks the others: its default action would end the
        // process, and a process that cannot upgrade must only log that it will not.
        libc::sigaddset(&mut set, libc::SIGUSR2);
        set
    }
}

/// Blocks the stop/reload signals in the calling thread; threads spawned afterwards inherit
/// the mask. Call before spawning shards.
pub fn block() {
    let set = set();
    // SAFETY: pthread_sigmask with a valid set and a null old-set pointer.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits up to `limit` for a blocked signal.
pub fn wait(limit: Duration) -> Option<Signal> {
    let set = set();
    let timeout = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: limit.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
    match sig {
        libc::SIGTERM | libc::SIGINT => Some(Signal::Stop),
        libc::SIGHUP => Some(Signal::Reload),
        libc::SIGUSR2 => Some(Signal::Upgrade),
        _ => None,
    }
}

/// Takes a pending SIGUSR2 off the process, if one is pending: a new process of an upgrade
/// drops the one that reached it while it started (`upgrade`). Returns whether there was one.
pub(super) fn discard_pending_upgrade() -> bool {
    // SAFETY: sigemptyset/sigaddset fill a set we own; sigtimedwait with a zero timeout only
    // takes a pending signal of that set (blocked in every thread, see `block`).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) == libc::SIGUSR2
    }
}
