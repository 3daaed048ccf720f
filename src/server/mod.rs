//! Process orchestration: preflight checks, one listener and one pinned executor thread per
//! shard (plus, optionally, one Unix-domain listener every shard accepts from), the control
//! loop on the main thread (reports, signals, drain). Shards share nothing but a stop notifier
//! (an eventfd each), the Unix listener's socket and their report rings.
//!
//! One step per file: `assembly` starts everything in order, from `upstreams` (what the
//! shards connect to) and `listener` (what they accept from) to `spawn` (the shard threads,
//! each running `shard`); `control_loop` serves and drains; `reload` answers SIGHUP.

mod assembly;
mod check;
mod control_loop;
mod listener;
mod low_port;
mod preflight;
mod reload;
mod shard;
pub mod signals;
mod spawn;
mod upstreams;

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::Config;

pub use check::check;
pub use listener::ListenError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    IoUring(String),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot resolve primary address {addr}")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the mirrors")]
    Mirror(#[source] crate::mirror::MirrorError),
    #[error("cannot set up compare mode")]
    Compare(#[source] crate::compare::CompareError),
    #[error("cannot start the admin endpoint on {addr}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start shard {index}")]
    Shard {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the DNS refresh thread")]
    Dns {
        #[source]
        source: std::io::Error,
    },
}

/// Submission queue entries per shard ring. Each socket holds one multishot poll, which
/// occupies an entry only until it is submitted, so this bounds a burst, not connections.
const RING_ENTRIES: u32 = 1024;
/// Locked memory a shard's ring needs (its SQ/CQ arrays), for the memlock preflight check.
const RING_MEMORY_BYTES: usize = RING_ENTRIES as usize * (64 + 2 * 16);

/// Where a running proxy can be reached; printed at start-up and used by tests.
#[derive(Debug, Clone)]
pub struct Bound {
    pub listen: SocketAddr,
    /// The Unix socket file, when `proxy.unix-socket-dir` is set.
    pub unix: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
}

/// Reads the configuration again for SIGHUP (the file, with the command line's flags on top).
pub type Reload = Box<dyn Fn() -> Result<Config, crate::config::ConfigError>>;

/// Runs the proxy until SIGTERM/SIGINT, then drains and returns.
pub fn run_proxy(cfg: &Config, on_ready: impl FnOnce(&Bound)) -> Result<(), RuntimeError> {
    run_proxy_with(cfg, None, None, on_ready)
}

/// [`run_proxy`] with extra admin routes (the embed supervisor's, when `pgprism run` also
/// runs embedded servers).
pub fn run_proxy_with(
    cfg: &Config,
    routes: Option<crate::control::ExtraRoutes>,
    reload: Option<Reload>,
    on_ready: impl FnOnce(&Bound),
) -> Result<(), RuntimeError> {
    let server = assembly::Server::start(cfg, routes)?;
    server.announce(on_ready);
    server.serve(reload.as_ref());
    server.drain();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn start_up_errors_name_what_failed() {
        let dns = RuntimeError::Dns {
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        };
        assert_eq!(dns.to_string(), "cannot start the DNS refresh thread");
        let source = dns.source().expect("the spawn error is kept as the source");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::OutOfMemory)
        );
        let compare = RuntimeError::Compare(crate::compare::CompareError::Resolve {
            key: "shadow.url",
            addr: "db:5432".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(compare.to_string(), "cannot set up compare mode");
        let cause = compare
            .source()
            .expect("compare's error is kept as the source");
        assert_eq!(cause.to_string(), "shadow.url: cannot resolve db:5432");
        assert!(
            cause.source().is_some(),
            "and the resolver's error under it"
        );
    }
}
