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
mod placement;
mod preflight;
mod reload;
mod shard;
pub mod signals;
mod spawn;
mod upgrade;
mod upstreams;

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::Config;

pub use assembly::{remove_pid_file, write_pid_file};
pub use check::check;
pub use listener::ListenError;
pub use upgrade::Released;
pub use upgrade::UpgradeError;
pub use upgrade::take_environment as take_upgrade_environment;

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
    #[error("cannot start the admin endpoint")]
    Admin(#[source] crate::control::AdminError),
    #[error("cannot start shard {index}")]
    Shard {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("a shard stopped during start-up (its error is logged above)")]
    ShardStopped,
    #[error("the shards did not start within proxy.shard-start-timeout-ms ({waited_ms} ms)")]
    ShardStartTimeout { waited_ms: u64 },
    #[error("cannot listen on the sockets added after an upgrade")]
    ListenLate(#[source] std::io::Error),
    #[error("cannot start the DNS refresh thread")]
    Dns {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot take over from the process being upgraded")]
    Upgrade(#[source] UpgradeError),
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

/// What the caller adds to a proxy run beyond its configuration.
#[derive(Default)]
pub struct Options {
    /// Extra admin routes (the embed supervisor's and CDC's, under `pgprism run`).
    pub routes: Option<crate::control::ExtraRoutes>,
    /// How SIGHUP reads the configuration again.
    pub reload: Option<Reload>,
    /// `--pid-file`: written once serving; after an upgrade the new process writes its own.
    pub pid_file: Option<PathBuf>,
    /// Why SIGUSR2 cannot upgrade this process (it runs more than the proxy); `None`: it can.
    pub upgrade_refused: Option<&'static str>,
    /// What moves to the new process on an upgrade rather than running in both, in the
    /// order it is released and taken over.
    pub movable: Vec<Movable>,
}

/// A part of a `pgprism run` that moves to the new process on an upgrade instead of running
/// in both (CDC: its replication slot admits one reader, and two loaders would race; the
/// embedded servers: two supervisors would fight over them).
pub struct Movable {
    /// Its name on the upgrade channel (`released NAME`).
    pub name: &'static str,
    /// In the old process, once the new one serves (on a thread of its own, while the
    /// sessions drain): lets go of it; `true` once done, and the new process hears
    /// `released NAME`; `false` when it did not in time, and the channel stays open (saying
    /// nothing more) until this process exits.
    pub release: Box<dyn FnOnce() -> bool + Send>,
    /// In a process an upgrade started, once it serves (on a thread of its own): takes it
    /// over, given how the old process released it.
    pub take_over: Box<dyn FnOnce(Released) + Send>,
    /// How long the new process waits for `released NAME`.
    pub wait: std::time::Duration,
}

/// Whether this process was started by an upgrade (`pgprism run` starts what moves with an
/// upgrade only once the old process has released it).
pub fn started_by_upgrade() -> bool {
    upgrade::started_by_upgrade()
}

/// Runs the proxy until SIGTERM/SIGINT, then drains and returns.
pub fn run_proxy(cfg: &Config, on_ready: impl FnOnce(&Bound)) -> Result<(), RuntimeError> {
    run_proxy_with(cfg, Options::default(), on_ready)
}

/// [`run_proxy`] with [`Options`]. Started by an upgrade (SIGUSR2 to a running pgprism), it
/// serves on the sockets the old process hands over and tells it when it is ready; on SIGUSR2
/// itself it hands them to a new process and, once that one serves, drains and returns.
pub fn run_proxy_with(
    cfg: &Config,
    opts: Options,
    on_ready: impl FnOnce(&Bound),
) -> Result<(), RuntimeError> {
    // As this process was started, before anything could change: a package upgrade replaces
    // the file at this path, and the next SIGUSR2 starts what is there then.
    let invocation = upgrade::Invocation::current();
    let upgraded = upgrade::started_by_upgrade();
    let (predecessor, mut inherited) = match upgrade::Predecessor::take() {
        Ok(Some((predecessor, inherited))) => (Some(predecessor), Some(inherited)),
        Ok(None) => (None, None),
        Err(err) => return Err(RuntimeError::Upgrade(err)),
    };
    // Every shard has its ring, listeners and context when this returns; none accepts yet.
    let mut server = assembly::Server::start(cfg, opts.routes, inherited.as_mut())?;
    drop(inherited);
    if predecessor.is_some() {
        crate::cdc::failpoint::hit("upgrade-before-open");
    }
    // Ready means able to serve: the shards accept from here on (and the sockets an upgrade
    // added listen), then the old process hears it and lets go, then systemd and the pid file.
    if let Err(err) = server.open() {
        server.drain();
        return Err(err);
    }
    let mut movable = opts.movable;
    if let Some(predecessor) = predecessor {
        let mut released = predecessor.ready();
        let parts: Vec<_> = movable
            .iter_mut()
            .map(|part| {
                let take_over: Box<dyn FnOnce(Released) + Send> =
                    std::mem::replace(&mut part.take_over, Box::new(|_| {}));
                (part.name, part.wait, take_over)
            })
            .collect();
        if !parts.is_empty() {
            // Each wait is bounded by its part's key; nothing joins this thread: a stop
            // meanwhile is the caller's to notice (a part starts nothing once stopping).
            let started = std::thread::Builder::new()
                .name("upgrade-take-over".into())
                .spawn(move || {
                    for (name, wait, take_over) in parts {
                        take_over(released.wait_for(name, wait));
                    }
                });
            if let Err(err) = started {
                tracing::error!(error = %err, "cannot start the take-over thread");
            }
        }
        if signals::discard_pending_upgrade() {
            tracing::info!(
                "SIGUSR2 reached this process while it took over; ignored (it is the upgrade)"
            );
        }
    }
    server.announce(on_ready, opts.pid_file.as_deref(), upgraded);
    let upgrades = control_loop::Upgrades {
        invocation,
        refused: opts.upgrade_refused,
    };
    match server.serve(opts.reload.as_ref(), &upgrades) {
        control_loop::Outcome::Stopped => {
            server.drain();
            if let Some(path) = &opts.pid_file {
                assembly::remove_pid_file(path);
            }
        }
        // The pid file is the new process's now.
        control_loop::Outcome::HandedOver { hurry, successor } => {
            let channel = successor.into_release();
            // Stopped while the sessions drain, so the new process starts them as soon as it
            // can; the drain does not wait for it, the exit does.
            let releases: Vec<_> = movable
                .into_iter()
                .map(|part| (part.name, part.release))
                .collect();
            let releasing = if releases.is_empty() {
                // Nothing to release: the new process hears so now, not after the drain.
                drop(channel);
                None
            } else {
                Some(
                    std::thread::Builder::new()
                        .name("upgrade-release".into())
                        .spawn(move || {
                            for (name, release) in releases {
                                let done = release();
                                match &channel {
                                    Some(channel) if done => channel.released(name),
                                    _ if done => {}
                                    _ => {
                                        if let Some(channel) = channel {
                                            channel.hold();
                                        }
                                        return;
                                    }
                                }
                            }
                        }),
                )
            };
            server.hand_off(hurry);
            match releasing {
                Some(Ok(thread)) => {
                    let _ = thread.join();
                }
                Some(Err(err)) => {
                    tracing::error!(error = %err, "cannot start the release thread");
                }
                None => {}
            }
        }
    }
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
