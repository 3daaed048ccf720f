//! The start-up, in order: checks, preflight, upstreams, DNS following, listeners, signal
//! mask, control state and admin endpoint, shard threads; then the ready announcement. Every
//! step that fails returns before anything is served, and what was made so far is dropped
//! (the Unix socket file with it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::config::dns::Refresher;
use crate::control::{self, AdminServer, ControlState, ExtraRoutes};

use super::listener::{self, Listeners, SocketFile};
use super::spawn::ShardThreads;
use super::upgrade::{HandOver, Inherited};
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
    /// Descriptors of every listening socket for an upgrade to hand over; closed at the start
    /// of any drain, or the sockets would outlive the shards' and fill their backlogs.
    pub(super) hand_over: Option<HandOver>,
    /// The sockets an upgrade added (more shards than before), bound but not listening until
    /// [`Server::open`]: descriptors of the ones the shards own.
    pending: Vec<socket2::Socket>,
    pub(super) bound: Bound,
    /// Stops the DNS refresh thread when dropped, after the drain.
    _dns: Option<Refresher>,
}

impl<'a> Server<'a> {
    /// Runs every start-up step up to serving shards; the first that fails is the error.
    /// `inherited`: the sockets an upgraded process handed over, used instead of binding.
    pub(super) fn start(
        cfg: &'a Config,
        routes: Option<ExtraRoutes>,
        mut inherited: Option<&mut Inherited>,
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
            pending,
            unix_socket,
            unix_file,
        } = listener::bind_all(cfg, shards, inherited.as_deref_mut())?;
        let unix_path = unix_file.as_ref().map(|f| f.path().to_path_buf());

        let unix = unix_path.as_deref();
        let state = control_state(cfg, shards, listen, unix, &upstreams, backends);
        let admin = start_admin(cfg, &state, routes, inherited)?;
        let hand_over = hand_over(
            &sockets,
            &pending,
            unix_socket.as_ref(),
            unix_path.as_deref(),
        );
        let to_listen = pending
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(RuntimeError::ListenLate)?;
        let mut threads = ShardThreads::spawn(
            cfg,
            shards,
            sockets,
            pending,
            unix_socket.as_ref(),
            &upstreams,
        )?;
        // The shards hold their dups; ours would keep accepting into the backlog after a drain.
        drop(unix_socket);
        // Ready will mean able to serve: every shard has its ring, listeners and context.
        let waited = std::time::Duration::from_millis(cfg.proxy.shard_start_timeout_ms);
        if let Err(err) = threads.wait_started(waited) {
            threads.stop_all(false);
            // A shard that never started may never see the stop either: bounded like the
            // start, after which its thread is left to the process's exit.
            if !threads.join_within(waited) {
                tracing::error!("a shard did not stop after a failed start; leaving it");
            }
            return Err(err);
        }

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
            hand_over,
            pending: to_listen,
            bound,
            _dns: dns,
        })
    }

    /// Lets the shards accept: the sockets an upgrade added start listening (joining the
    /// SO_REUSEPORT group only now), then every shard registers its listeners. Before this a
    /// new process of an upgrade takes no connection, so one that fails its start-up costs
    /// no client.
    pub(super) fn open(&mut self) -> Result<(), RuntimeError> {
        for socket in self.pending.drain(..) {
            listener::listen(&socket, self.cfg.proxy.backlog).map_err(RuntimeError::ListenLate)?;
        }
        self.threads.open_all();
        Ok(())
    }

    /// Logs that the proxy is ready, tells the caller where it listens, writes the pid file,
    /// then tells systemd (with this process's pid after an upgrade: the unit's main process
    /// changes to this one).
    pub(super) fn announce(
        &self,
        on_ready: impl FnOnce(&Bound),
        pid_file: Option<&Path>,
        upgraded: bool,
    ) {
        let bound = &self.bound;
        tracing::info!(
            listen = %bound.listen,
            unix = %bound.unix.as_deref().map_or("-".into(), |p| p.display().to_string()),
            shards = self.shards,
            primary = %self.upstreams.primary.masked(),
            upgraded,
            "pgprism proxy ready"
        );
        on_ready(bound);
        // An adopted socket file is this process's from now on.
        if let Some(file) = &self.unix_file {
            file.arm();
        }
        if let Some(path) = pid_file {
            write_pid_file(path);
        }
        let unix_note = bound
            .unix
            .as_deref()
            .map_or(String::new(), |p| format!(" and {}", p.display()));
        let main_pid = if upgraded {
            format!("MAINPID={}\n", std::process::id())
        } else {
            String::new()
        };
        control::systemd::notify(&format!(
            "READY=1\n{main_pid}STATUS=serving on {}{unix_note} with {} shard(s)",
            bound.listen, self.shards
        ));
    }
}

/// Writes this process's id to `path` (through a temporary file and a rename, so a reader
/// never sees half a pid). A failure is logged: the proxy serves all the same.
pub fn write_pid_file(path: &Path) {
    let pid = std::process::id();
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{pid}.tmp"));
    let written = std::fs::write(&temporary, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temporary);
        tracing::warn!(path = %path.display(), error = %err, "cannot write the pid file");
    }
}

/// Removes the pid file at a stop, when it still names this process (after an upgrade that
/// failed late, it may name another one).
pub fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if ours && let Err(err) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove the pid file");
    }
}

/// A second descriptor of every listening socket, for an upgrade to hand over; `None` when
/// the kernel will not give one (an upgrade then says so).
fn hand_over(
    sockets: &[socket2::Socket],
    pending: &[socket2::Socket],
    unix_socket: Option<&socket2::Socket>,
    unix_path: Option<&Path>,
) -> Option<HandOver> {
    let dup = || -> std::io::Result<HandOver> {
        // The pending ones listen by the time an upgrade can start (after `open`).
        let tcp = sockets
            .iter()
            .chain(pending)
            .map(|s| s.try_clone())
            .collect::<Result<_, _>>()?;
        let unix = match (unix_socket, unix_path) {
            (Some(socket), Some(path)) => Some((path.to_path_buf(), socket.try_clone()?)),
            _ => None,
        };
        Ok(HandOver { tcp, unix })
    };
    match dup() {
        Ok(hand_over) => Some(hand_over),
        Err(err) => {
            tracing::warn!(error = %err, "cannot keep the listening sockets for an upgrade (SIGUSR2)");
            None
        }
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

/// The admin endpoint, when `admin.listen` is set, serving the proxy's routes and `routes`;
/// on the socket an upgraded process handed over when it listens where `admin.listen` asks.
fn start_admin(
    cfg: &Config,
    state: &Arc<Mutex<ControlState>>,
    routes: Option<ExtraRoutes>,
    inherited: Option<&mut Inherited>,
) -> Result<Option<AdminServer>, RuntimeError> {
    let configured = match cfg.admin.listen.as_str() {
        "" => None,
        listen => Some(crate::config::parse_addr("admin.listen", listen)?),
    };
    match inherited.and_then(|i| i.take_admin(configured)) {
        Some(listener) => AdminServer::start_on(listener, &cfg.admin, state.clone(), routes)
            .map(Some)
            .map_err(RuntimeError::Admin),
        None => AdminServer::start(&cfg.admin, state.clone(), routes).map_err(RuntimeError::Admin),
    }
}
