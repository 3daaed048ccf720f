//! The start-up, in order: checks, preflight, upstreams, DNS following, listeners, signal
//! mask, control state and admin endpoint, shard threads; then the ready announcement. Every
//! step that fails returns before anything is served, and what was made so far is dropped
//! (the Unix socket file with it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::dns::Refresher;
use crate::config::{Config, parse_addr};
use crate::control::{self, AdminServer, ControlState, ExtraRoutes};

use super::listener::{self, Listeners, SocketFile};
use super::spawn::ShardThreads;
use super::upstreams::{Backends, Upstreams};
use super::{Bound, RING_MEMORY_BYTES, RuntimeError, check, preflight, signals};

/// A started proxy: shards serving, admin endpoint up; the control thread drives it from here.
pub(super) struct Server<'a> {
    pub(super) cfg: &'a Config,
    pub(super) shards: usize,
    pub(super) state: Arc<Mutex<ControlState>>,
    pub(super) threads: ShardThreads,
    pub(super) upstreams: Upstreams,
    /// Removes the Unix socket's file when taken and dropped, at the start of a drain.
    pub(super) unix_file: Option<SocketFile>,
    pub(super) admin: Option<AdminServer>,
    pub(super) bound: Bound,
    /// Stops the DNS refresh thread when dropped, after the drain.
    _dns: Option<Refresher>,
}

impl<'a> Server<'a> {
    /// Runs every start-up step up to serving shards; the first that fails is the error.
    pub(super) fn start(
        cfg: &'a Config,
        routes: Option<ExtraRoutes>,
    ) -> Result<Self, RuntimeError> {
        let shards = preflight(cfg)?;
        // Signals go to the control loop only: block them before any other thread exists
        // (the DNS refresh thread below inherits the mask; started before it, it could take
        // a SIGTERM and end the process without a drain).
        signals::block();
        let upstreams = Upstreams::resolve(cfg)?;
        let (backends, dns) = upstreams.follow_dns(cfg)?;
        // One Unix listener for all shards (see `listener`); its file goes when `unix_file`
        // does: at the start of a drain, or on any early return below.
        let Listeners {
            listen,
            sockets,
            unix_socket,
            unix_file,
        } = listener::bind_all(cfg, shards)?;
        let unix_path = unix_file.as_ref().map(|f| f.path().to_path_buf());

        let unix = unix_path.as_deref();
        let state = control_state(cfg, shards, listen, unix, &upstreams, backends);
        let admin = start_admin(cfg, &state, routes)?;
        let threads = ShardThreads::spawn(cfg, sockets, unix_socket.as_ref(), &upstreams)?;
        // The shards hold their dups; ours would keep accepting into the backlog after a drain.
        drop(unix_socket);

        let bound = Bound {
            listen,
            unix: unix_path,
            admin: admin.as_ref().map(|a| a.addr),
        };
        Ok(Server {
            cfg,
            shards,
            state,
            threads,
            upstreams,
            unix_file,
            admin,
            bound,
            _dns: dns,
        })
    }

    /// Logs that the proxy is ready, tells the caller where it listens, then tells systemd.
    pub(super) fn announce(&self, on_ready: impl FnOnce(&Bound)) {
        let bound = &self.bound;
        tracing::info!(
            listen = %bound.listen,
            unix = %bound.unix.as_deref().map_or("-".into(), |p| p.display().to_string()),
            shards = self.shards,
            primary = %self.upstreams.primary.masked(),
            "pgprism proxy ready"
        );
        on_ready(bound);
        let unix_note = bound
            .unix
            .as_deref()
            .map_or(String::new(), |p| format!(" and {}", p.display()));
        control::systemd::notify(&format!(
            "READY=1\nSTATUS=serving on {}{unix_note} with {} shard(s)",
            bound.listen, self.shards
        ));
    }
}

/// The configuration check and the kernel checks; returns the shard count.
fn preflight(cfg: &Config) -> Result<usize, RuntimeError> {
    check(cfg)?;
    if let Some(problem) = preflight::io_uring_problem() {
        return Err(RuntimeError::IoUring(problem));
    }
    let shards = cfg.shard_count();
    if let Some(warning) = preflight::memlock_problem(shards, RING_MEMORY_BYTES) {
        tracing::warn!("{warning}");
    }
    // Warn only below a modest floor: the per-shard session bound is a ceiling, not a plan.
    if let Some(warning) = preflight::raise_open_files(4096) {
        tracing::warn!("{warning}");
    }
    Ok(shards)
}

/// The control thread's state, which the admin endpoint reads and the report rings fill.
fn control_state(
    cfg: &Config,
    shards: usize,
    listen: SocketAddr,
    unix_path: Option<&Path>,
    upstreams: &Upstreams,
    backends: Backends,
) -> Arc<Mutex<ControlState>> {
    let state = Arc::new(Mutex::new(ControlState::new(
        shards,
        listen.to_string(),
        upstreams.primary.masked(),
        cfg.metrics.latency_us_max,
    )));
    {
        let mut locked = control::lock(&state);
        locked.unix_socket = unix_path.map(|p| p.display().to_string());
        locked.backends = backends;
        locked.client_tls = Some(upstreams.client_tls.clone());
    }
    if upstreams.compare.is_some() {
        control::lock(&state).compare = Some(crate::compare::report::Book::new(&cfg.compare));
    }
    state
}

/// The admin endpoint, when `admin.listen` is set, serving the proxy's routes and `routes`.
fn start_admin(
    cfg: &Config,
    state: &Arc<Mutex<ControlState>>,
    routes: Option<ExtraRoutes>,
) -> Result<Option<AdminServer>, RuntimeError> {
    if cfg.admin.listen.is_empty() {
        return Ok(None);
    }
    let addr = parse_addr("admin.listen", &cfg.admin.listen)?;
    AdminServer::start_with_routes(addr, state.clone(), routes)
        .map(Some)
        .map_err(|source| RuntimeError::Admin { addr, source })
}
