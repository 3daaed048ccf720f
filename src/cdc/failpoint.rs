//! Named failpoints for crash tests, driven by `PGPRISM_FAILPOINTS`:
//! `name=action[,name=action]` where action is `kill` (SIGKILL ourselves, like a power cut
//! for this process), `exit` (exit code 86 without cleanup) or `N*action` (act on the N-th
//! hit only). Unset (production) costs one relaxed load per hit.

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
    let points = points();
    if points.is_empty() {
        return;
    }
    let Some(point) = points.get(name) else {
        return;
    };
    let n = point.hits.fetch_add(1, Ordering::Relaxed) + 1;
    if n != point.on_hit {
        return;
    }
    eprintln!("pgprism: failpoint {name} fired ({})", point.action);
    match point.action.as_str() {
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
