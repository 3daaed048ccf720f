//! What every program pgprism starts (postgres, initdb, psql, pg_config, a new pgprism on
//! upgrade, the demo's proxy) gets from it: a clean signal state. pgprism blocks SIGTERM,
//! SIGINT, SIGHUP and SIGUSR2 in every thread (`server::signals`) and collects them with
//! `sigtimedwait`; a child inherits the blocked mask and every ignored disposition across
//! `exec`, and the std `Command` of this toolchain resets neither (it used to reset the
//! mask). A postgres started so would never see the SIGINT of a fast shutdown nor the SIGTERM
//! of a smart one, and psql would ignore Ctrl-C. This module never decides what a child runs,
//! only what it inherits.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Highest signal number on Linux (`_NSIG - 1`), real-time signals included.
const SIGNAL_MAX: libc::c_int = 64;

/// Makes `cmd`'s child start with no signal blocked and every signal at its default action.
/// Register it before any other `pre_exec` closure that blocks a signal on purpose (the
/// upgrade's new process keeps SIGUSR2 and SIGHUP blocked): closures run in order.
pub fn reset_signals(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and makes only the
    // async-signal-safe calls sigemptyset, pthread_sigmask and sigaction on stack values; it
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            reset_in_child();
            Ok(())
        })
    }
}

/// The body of [`reset_signals`]'s closure, for a child already forked.
fn reset_in_child() {
    // SAFETY: see `reset_signals`; every structure is a zeroed local that the calls fill.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut default.sa_mask);
        for signal in 1..=SIGNAL_MAX {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            // Handlers reset at exec anyway; this is for ignored ones. The C library refuses
            // the signals it keeps for itself (EINVAL), which is fine: they are not ours.
            libc::sigaction(signal, &default, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of `/proc/self/status` as the child saw it, parsed as the hex mask it is.
    fn mask(status: &str, field: &str) -> u64 {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} in {status}"));
        u64::from_str_radix(line.trim(), 16).expect("a hex mask")
    }

    fn bit(signal: libc::c_int) -> u64 {
        1 << (signal - 1)
    }

    #[test]
    fn a_child_of_a_thread_that_blocks_and_ignores_signals_starts_clean() {
        // In a thread of its own: the mask set here must not leak into other tests.
        std::thread::spawn(|| {
            // SAFETY: as in `server::signals::block`: a set we own, this thread's mask only.
            // SIGUSR1's disposition is process-wide; the test harness uses none of it.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
                    libc::sigaddset(&mut set, s);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
            }
            let mut cmd = Command::new("cat");
            cmd.arg("/proc/self/status");
            reset_signals(&mut cmd);
            let out = cmd.output().expect("cat runs");
            let clean = String::from_utf8(out.stdout).expect("status is text");
            assert_eq!(mask(&clean, "SigBlk:"), 0, "{clean}");
            assert_eq!(mask(&clean, "SigIgn:") & bit(libc::SIGUSR1), 0, "{clean}");
            assert_eq!(mask(&clean, "SigIgn:") & bit(libc::SIGPIPE), 0, "{clean}");
            // SAFETY: restores the process-wide disposition the test changed.
            unsafe { libc::signal(libc::SIGUSR1, libc::SIG_DFL) };
        })
        .join()
        .expect("the test thread");
    }
}
