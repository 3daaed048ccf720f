//! Always-on invariant checks for what protects data (queue accounting, sync-point counts,
//! COPY state, the pairing of primary and shadow answers). The check is a branch on the fast
//! path; the failure is a cold, never-inlined function, so the hot code stays small (as
//! Redpanda's `vassert`). A failed invariant is pgprism's own bug, never bad input: input
//! errors are `Result`s.

/// Stops the thread with what was violated; `#[track_caller]` names the check's line.
#[cold]
#[inline(never)]
#[track_caller]
pub fn failed(what: &str) -> ! {
    panic!("pgprism invariant violated: {what}")
}

/// `invariant!(condition, "what must hold")`: always on, in release builds too.
#[macro_export]
macro_rules! invariant {
    ($cond:expr, $what:expr $(,)?) => {
        if !$cond {
            $crate::invariant::failed($what)
        }
    };
}
