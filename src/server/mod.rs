//! Process orchestration: preflight checks, one listener and one pinned executor thread per
//! shard (plus, optionally, one Unix-domain listener every shard accepts from), the control
//! loop on the main thread (reports, signals, drain). Shards share nothing but a stop notifier
//! (an eventfd each), the Unix listener's socket and their report rings.

mod check;
mod listener;
mod preflight;
mod shard;
pub mod signals;

use crate::exec;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, PgUrl, parse_addr, socket_file};
use crate::control::{self, AdminServer, ControlState};
use crate::proxy::ProxySettings;

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
    #[error("{0}")]
    Mirror(String),
    /// `compare::resolve` describes its failures as text that names the key (`shadow.url:
    /// ...`), so there is no typed source to keep.
    #[error("cannot set up compare mode: {0}")]
    Compare(String),
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
    check(cfg)?;
    if let Some(problem) = preflight::io_uring_problem() {
        return Err(RuntimeError::IoUring(problem));
    }
    let shards = cfg.shard_count();
    if let Some(warning) = preflight::memlock_problem(shards, RING_MEMORY_BYTES) {
        tracing::warn!("{warning}");
    }

    let primary =
        PgUrl::parse(&cfg.primary.url).map_err(|message| crate::config::ConfigError::Key {
            path: "primary.url".into(),
            message,
        })?;
    let primary_label = primary.address();
    let (tls_config, tls_required) = crate::tls::client_side(&cfg.client_tls)?;
    let client_tls = std::sync::Arc::new(crate::tls::ClientTlsSlot::new(tls_config, tls_required));
    let primary_tls = crate::tls::Upstream::for_url(&primary).map_err(|message| {
        crate::config::ConfigError::Key {
            path: "primary.url".into(),
            message,
        }
    })?;
    let primary_addr =
        crate::config::dns::resolve(&primary).map_err(|source| RuntimeError::Resolve {
            addr: primary_label.clone(),
            source,
        })?;

    let mirrors = crate::mirror::resolve(cfg).map_err(RuntimeError::Mirror)?;
    // Compare reports: shards → control thread, bounded (a full ring drops and counts).
    let (report_tx, report_rx) = crossbeam_channel::bounded(cfg.compare.report_queue_max.max(1));
    let compare = crate::compare::resolve(cfg, report_tx).map_err(RuntimeError::Compare)?;
    // New connections follow backend host names that move (failover by DNS).
    let mut followed = vec![("primary".to_string(), primary.clone(), primary_addr.clone())];
    for m in &mirrors {
        followed.push((format!("mirror {}", m.name), m.url.clone(), m.addr.clone()));
    }
    if let Some(c) = &compare {
        followed.push(("shadow".to_string(), c.url.clone(), c.addr.clone()));
    }
    let backends: Vec<_> = followed
        .iter()
        .map(|(role, _, live)| (role.clone(), live.clone()))
        .collect();
    let _dns = crate::config::dns::start(followed, Duration::from_millis(cfg.proxy.dns_refresh_ms))
        .map_err(|source| RuntimeError::Dns { source })?;
    let mut listen = parse_addr("proxy.listen", &cfg.proxy.listen)?;
    listener::ensure_free(listen)?;
    let mut sockets = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = listener::bind_shard(listen, cfg.proxy.backlog)?;
        if listen.port() == 0 {
            // Port 0: the first bind picks the port, the other shards join it.
            if let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
                listen = local;
            }
        }
        sockets.push(socket);
    }
    // One Unix listener for all shards (see `listener`); its file goes when `unix_file` does:
    // at the start of a drain, or on any early return below.
    let (unix_socket, mut unix_file) = match cfg.proxy.unix_socket_dir.as_str() {
        "" => (None, None),
        dir => {
            let path = socket_file(dir, listen.port());
            let (socket, file) = listener::bind_unix(&path, cfg.proxy.backlog)?;
            (Some(socket), Some(file))
        }
    };
    let unix_path = unix_file.as_ref().map(|f| f.path().to_path_buf());

    // Signals go to the control loop only: block them before any other thread exists.
    signals::block();

    let state = Arc::new(Mutex::new(ControlState::new(
        shards,
        listen.to_string(),
        primary.masked(),
        cfg.metrics.latency_us_max,
    )));
    {
        let mut locked = control::lock(&state);
        locked.unix_socket = unix_path.as_ref().map(|p| p.display().to_string());
        locked.backends = backends;
        locked.client_tls = Some(client_tls.clone());
    }
    if compare.is_some() {
        control::lock(&state).compare = Some(crate::compare::report::Book::new(&cfg.compare));
    }
    let admin = if cfg.admin.listen.is_empty() {
        None
    } else {
        let addr = parse_addr("admin.listen", &cfg.admin.listen)?;
        Some(
            AdminServer::start_with_routes(addr, state.clone(), routes)
                .map_err(|source| RuntimeError::Admin { addr, source })?,
        )
    };

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    // Counts shards whose executor returned, so the control loop notices one that died early.
    let exited = Arc::new(AtomicUsize::new(0));
    let mut rings = Vec::with_capacity(shards);
    let mut handles = Vec::with_capacity(shards);
    let mut stops = Vec::with_capacity(shards);
    for (index, socket) in sockets.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::bounded(cfg.metrics.ring_capacity);
        rings.push(rx);
        let stop = exec::Notifier::new().map_err(|source| RuntimeError::Shard { index, source })?;
        stops.push(stop.clone());
        // Each shard owns a dup of the one Unix listener, so each closes its own descriptor.
        let unix = unix_socket
            .as_ref()
            .map(|s| s.try_clone())
            .transpose()
            .map_err(|source| RuntimeError::Shard { index, source })?;
        let plan = shard::ShardPlan {
            index,
            socket,
            unix,
            settings: ProxySettings {
                primary_addr: primary_addr.clone(),
                primary_label: primary_label.clone(),
                message_bytes_max: cfg.proxy.message_bytes_max,
                startup_timeout: Duration::from_millis(cfg.proxy.startup_timeout_ms),
                connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
                sessions_per_shard_max: cfg.proxy.sessions_per_shard_max,
                pipeline_depth_max: cfg.proxy.pipeline_depth_max,
                session_limits: crate::session::Limits {
                    names_max: cfg.proxy.session_names_max,
                    settings_max: cfg.proxy.session_settings_max,
                    // Mirror routing and compare planning still keep their own statement
                    // maps (their payloads: re-prepare sources, result descriptions), so
                    // no mode reads the tracker's yet: decoding them twice would only cost.
                    statements: false,
                },
                client_tls: client_tls.clone(),
                primary_tls: primary_tls.clone(),
            },
            read_chunk_bytes: cfg.proxy.read_chunk_bytes,
            latency_us_max: cfg.metrics.latency_us_max,
            report_interval: Duration::from_millis(cfg.metrics.report_interval_ms),
            drain_timeout: Duration::from_millis(cfg.proxy.drain_timeout_ms),
            reports: tx,
            stop,
            mirrors: mirrors.clone(),
            fingerprints_max: cfg.metrics.fingerprints_max,
            compare: compare.clone(),
        };
        let core = (cfg.proxy.pin_cores && !cores.is_empty()).then(|| cores[index % cores.len()]);
        let send_queue_bytes = cfg.proxy.send_queue_bytes;
        let close_linger = Duration::from_millis(cfg.proxy.close_linger_ms);
        let exited = ExitCount(exited.clone());
        let handle = std::thread::Builder::new()
            .name(format!("pgprism-shard-{index}"))
            .spawn(move || {
                let _exited = exited;
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    tracing::warn!(
                        shard = index,
                        core = core.id,
                        "cannot pin shard to its core"
                    );
                }
                exec::set_send_queue_bytes(send_queue_bytes);
                exec::set_close_linger(close_linger);
                if let Err(err) = exec::run(RING_ENTRIES, shard::run(plan)) {
                    tracing::error!(shard = index, error = %err, "shard runtime failed");
                }
            })
            .map_err(|source| RuntimeError::Shard { index, source })?;
        handles.push(handle);
    }
    // The shards hold their dups; ours would keep accepting into the backlog after a drain.
    drop(unix_socket);

    let bound = Bound {
        listen,
        unix: unix_path,
        admin: admin.as_ref().map(|a| a.addr),
    };
    tracing::info!(
        listen = %bound.listen,
        unix = %bound.unix.as_deref().map_or("-".into(), |p| p.display().to_string()),
        shards,
        primary = %primary.masked(),
        "pgprism proxy ready"
    );
    on_ready(&bound);
    let unix_note = bound
        .unix
        .as_deref()
        .map_or(String::new(), |p| format!(" and {}", p.display()));
    control::systemd::notify(&format!(
        "READY=1\nSTATUS=serving on {}{unix_note} with {shards} shard(s)",
        bound.listen
    ));
    let watchdog = control::systemd::watchdog_interval();
    let mut watchdog_at = Instant::now();

    let tick = Duration::from_millis(cfg.metrics.report_interval_ms.min(200));
    loop {
        control::collect(&state, &rings);
        control::collect_compare(&state, &report_rx);
        match signals::wait(tick) {
            Some(signals::Signal::Stop) => break,
            Some(signals::Signal::Reload) => {
                control::systemd::notify("RELOADING=1");
                let status = reload_config(cfg, reload.as_ref(), &client_tls);
                control::systemd::notify(&format!("READY=1\nSTATUS={status}"));
            }
            None => {}
        }
        if let Some(every) = watchdog
            && watchdog_at.elapsed() >= every
        {
            // Pinged from the control loop, so a wedged control thread stops the pings.
            control::systemd::notify("WATCHDOG=1");
            watchdog_at = Instant::now();
        }
        if exited.load(Ordering::Relaxed) > 0 {
            tracing::error!("a shard stopped unexpectedly; shutting down");
            break;
        }
    }

    tracing::info!(
        drain_timeout_ms = cfg.proxy.drain_timeout_ms,
        "stopping: no new connections, draining sessions"
    );
    control::lock(&state).draining = true;
    // New local clients find no socket file; the shards close their listeners next.
    unix_file.take();
    control::systemd::notify("STOPPING=1\nSTATUS=draining sessions");
    for stop in &stops {
        stop.notify();
    }
    let drain_started = Instant::now();
    for handle in handles {
        if handle.join().is_err() {
            tracing::error!("a shard panicked during shutdown");
        }
    }
    control::collect(&state, &rings);
    control::collect_compare(&state, &report_rx);
    let totals = control::lock(&state).totals();
    tracing::info!(
        drained_ms = drain_started.elapsed().as_millis() as u64,
        sessions = totals.counters.sessions_closed,
        statements = totals.counters.statements,
        "stopped"
    );
    drop(admin);
    Ok(())
}

/// Increments the shared count when dropped: on a shard's normal return and on a panic alike.
struct ExitCount(Arc<AtomicUsize>);

impl Drop for ExitCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// SIGHUP: reads the configuration again and applies what can change while serving: the
/// `[client-tls]` certificate, key and mode (files are read again even when their paths did
/// not change, for certificate rotation). Every other changed key is named in the log as
/// taking effect at the next restart. An invalid configuration changes nothing. Returns a
/// one-line status.
fn reload_config(
    running: &Config,
    reload: Option<&Reload>,
    client_tls: &crate::tls::ClientTlsSlot,
) -> String {
    let Some(reload) = reload else {
        tracing::info!("SIGHUP: started without a configuration file; nothing to reload");
        return "nothing to reload".into();
    };
    let new = match reload().and_then(|c| check(&c).map(|()| c)) {
        Ok(new) => new,
        Err(err) => {
            tracing::error!(error = %err, "SIGHUP: reload failed; the running configuration stays");
            return format!("reload failed: {err}");
        }
    };
    match crate::tls::client_side(&new.client_tls) {
        Ok((config, required)) => {
            let offered = config.is_some();
            client_tls.set(config, required);
            tracing::info!(
                tls = offered,
                required,
                "SIGHUP: client TLS settings reloaded"
            );
        }
        Err(err) => {
            tracing::error!(error = %err, "SIGHUP: reload failed; the running configuration stays");
            return format!("reload failed: {err}");
        }
    }
    let pending = changed_keys(running, &new)
        .into_iter()
        .filter(|k| !k.starts_with("client-tls."))
        .collect::<Vec<_>>();
    for key in &pending {
        tracing::warn!(
            key = %key,
            "SIGHUP: changed, but takes effect at the next restart"
        );
    }
    if pending.is_empty() {
        "configuration reloaded".into()
    } else {
        format!(
            "configuration reloaded; needs a restart for {}",
            pending.join(", ")
        )
    }
}

/// Key paths (`proxy.backlog`, `mirror[0].url`, ...) whose values differ.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, x.get(k), y.get(k), out);
                }
            }
            (Some(toml::Value::Array(x)), Some(toml::Value::Array(y))) if x.len() == y.len() => {
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{prefix}[{i}]"), Some(p), Some(q), out);
                }
            }
            (x, y) if x != y => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let value = |c: &Config| toml::Value::try_from(c).ok();
    let mut out = Vec::new();
    walk("", value(a).as_ref(), value(b).as_ref(), &mut out);
    out
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
        let compare = RuntimeError::Compare("shadow.url: cannot resolve db:5432".into());
        assert_eq!(
            compare.to_string(),
            "cannot set up compare mode: shadow.url: cannot resolve db:5432"
        );
    }
}
