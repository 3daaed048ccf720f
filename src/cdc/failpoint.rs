//! Named failpoints for crash tests, driven by `PGPRISM_FAILPOINTS`:
//! `name=action[,name=action]` where action is `kill` (SIGKILL ourselves, like a power cut
//! for this process), `exit` (exit code 86 without cleanup), `exit-after-MS` (sleep, then
//! exit: a process that dies while a test acts on it), `pause-MS` (sleep, then go on),
//! `wait-PATH` (go on once the file PATH exists, at most 5 minutes: a test acts at exactly
//! this point, then creates it),
//! `error` (the caller fails the step, see [`fails`]) or `N*action` (act on the N-th hit
//! only). Unset (production) costs one relaxed load per hit. CDC's crash tests and the
//! upgrade's (`server::upgrade`) use them.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Point {
    action: String,
    on_hit: u64,
    hits: AtomicU64,
}

fn points() -> &'static HashMap<String, Point> {
    static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("PGPRISM_FAILPOINTS").unwrap_or_default();
        spec.split(',')
            .filter_map(|item| item.split_once('='))
            .map(|(name, action)| {
                let (on_hit, action) = match action.split_once('*') {
                    Some((n, a)) => (n.trim().parse().unwrap_or(1), a),
                    None => (1, action),
                };
                (
                    name.trim().to_string(),
                    Point {
                        action: action.trim().to_string(),
                        on_hit,
                        hits: AtomicU64::new(0),
                    },
                )
            })
            .collect()
    })
}

/// Passes through unless the failpoint `name` is armed and due.
pub fn hit(name: &str) {
    if let Some(action) = due(name) {
        act(name, action);
    }
}

/// Like [`hit`], and answers true when the armed action is `error`: the caller then fails
/// the step it guards as if the operation had failed.
pub fn fails(name: &str) -> bool {
    match due(name) {
        Some("error") => {
            eprintln!("pgprism: failpoint {name} fired (error)");
            true
        }
        Some(action) => {
            act(name, action);
            false
        }
        None => false,
    }
}

/// The action of `name` when it is armed and this hit is the one it acts on.
fn due(name: &str) -> Option<&'static str> {
    let points = points();
    if points.is_empty() {
        return None;
    }
    let point = points.get(name)?;
    let n = point.hits.fetch_add(1, Ordering::Relaxed) + 1;
    (n == point.on_hit).then_some(point.action.as_str())
}

fn act(name: &str, action: &str) {
    eprintln!("pgprism: failpoint {name} fired ({action})");
    let millis = |prefix: &str| action.strip_prefix(prefix)?.parse::<u64>().ok();
    if let Some(path) = action.strip_prefix("wait-") {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !std::path::Path::new(path).exists() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        return;
    }
    if let Some(ms) = millis("pause-") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        return;
    }
    if let Some(ms) = millis("exit-after-") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    match action {
        // SAFETY: raising a signal against our own pid has no memory-safety preconditions.
        "kill" => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
        _ => {
            // SAFETY: _exit ends the process at once; nothing after it runs.
            unsafe { libc::_exit(86) }
        }
    }
}
