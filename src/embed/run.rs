//! `pgprism embed`: start the configured instances under a [`Supervisor`], serve them on the
//! admin endpoint (`GET /instances`, `POST /instances/{name}/start|stop|restart`), and run
//! until SIGTERM/SIGINT, then stop them all. Blocking by design; never on a shard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::supervisor::{InstanceInfo, Supervisor, SupervisorHandle, SupervisorSettings};
use super::{DataDir, EmbedError, InstanceConfig};
use crate::config::{
    AdminConfig, ConfigError, EMBED_DATA_MEMORY, EmbedConfig, EmbedInstanceConfig,
};
use crate::control::{AdminError, AdminServer, ControlState, ExtraRoutes, RouteResponse};
use crate::server::signals;

/// How often the main loop looks for a stop signal.
const SIGNAL_TICK: Duration = Duration::from_millis(200);
/// Histogram bound for the (unused by embed) proxy state behind `/metrics`.
const LATENCY_US_MAX: u64 = 60_000_000;

/// What `pgprism embed` is serving, handed to the ready callback.
pub struct EmbedBound {
    pub instances: Vec<InstanceInfo>,
    pub admin: Option<SocketAddr>,
}

/// Parses `NAME:PORT[:memory|:DIR]` (port 0 picks a free port; no third part means memory).
pub fn parse_instance_flag(spec: &str) -> Result<EmbedInstanceConfig, ConfigError> {
    let bad = |message: String| ConfigError::Key {
        path: "--instance".into(),
        message,
    };
    let mut parts = spec.splitn(3, ':');
    let name = parts.next().unwrap_or_default();
    let port = parts.next().ok_or_else(|| {
        bad(format!(
            "expected NAME:PORT[:memory|:DIR], got `{spec}` (no port)"
        ))
    })?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("expected a port number in `{spec}`, got `{port}`")))?;
    let data = match parts.next() {
        None | Some("") => EMBED_DATA_MEMORY.to_owned(),
        Some(data) => data.to_owned(),
    };
    Ok(EmbedInstanceConfig {
        name: name.to_owned(),
        port,
        data,
        ..EmbedInstanceConfig::default()
    })
}

/// The [`InstanceConfig`] for one `[[embed.instance]]`: always with a password (the
/// configured one, else the one a directory kept, else a new one), which the supervisor
/// keeps across restarts.
pub fn instance_config(
    cfg: &EmbedConfig,
    inst: &EmbedInstanceConfig,
) -> Result<InstanceConfig, EmbedError> {
    let data = if inst.data == EMBED_DATA_MEMORY {
        DataDir::Memory
    } else {
        DataDir::Path(PathBuf::from(&inst.data))
    };
    let kept = match &data {
        DataDir::Path(dir) => super::datadir::kept_password(dir),
        DataDir::Memory => None,
    };
    let password = match (inst.password.as_str(), kept) {
        ("", Some(kept)) => kept,
        ("", None) => super::datadir::generate_password()
            .map_err(EmbedError::io("generate a password for", &inst.data))?,
        (given, _) => given.to_owned(),
    };
    Ok(InstanceConfig {
        name: inst.name.clone(),
        host: inst.host.clone(),
        port: (inst.port != 0).then_some(inst.port),
        data,
        os_user: Some(cfg.os_user.clone()),
        superuser: inst.user.clone(),
        password: Some(password),
        database: inst.database.clone(),
        settings: inst.settings_text(),
        hba: Vec::new(),
        bindir: cfg.bindir.clone(),
        start_timeout_ms: cfg.start_timeout_ms,
        stop_timeout_ms: cfg.stop_timeout_ms,
        outlive_parent: false,
    })
}

/// Runs `pgprism embed` until SIGTERM/SIGINT: cleans up after a killed predecessor, starts
/// every instance (any failure stops the ones already started and is returned), serves the
/// admin endpoint on `admin.listen` (empty: none), calls `on_ready`, then waits.
pub fn run_embed(
    cfg: &EmbedConfig,
    admin: &AdminConfig,
    on_ready: impl FnOnce(&EmbedBound),
) -> Result<(), EmbedError> {
    cfg.validate().map_err(EmbedError::Config)?;
    if cfg.instance.is_empty() {
        return Err(EmbedError::Config(ConfigError::Key {
            path: "embed.instance".into(),
            message: "no instances: pass --instance NAME:PORT[:memory|:DIR] or add [[embed.instance]] to the config".into(),
        }));
    }
    admin.validate().map_err(EmbedError::Config)?;
    // Signals go to this loop only: block them before any other thread exists.
    signals::block();
    let supervisor = Supervisor::start(SupervisorSettings::from_config(cfg))?;
    let mut instances = Vec::with_capacity(cfg.instance.len());
    for inst in &cfg.instance {
        // On error the supervisor is dropped, which stops the instances already running.
        instances.push(supervisor.add(instance_config(cfg, inst)?)?);
    }
    let admin_server = start_admin(admin, &supervisor)?;
    let bound = EmbedBound {
        instances,
        admin: admin_server.as_ref().map(|server| server.addr),
    };
    tracing::info!(
        instances = bound.instances.len(),
        state_dir = %supervisor.state_dir().display(),
        "pgprism embed ready"
    );
    on_ready(&bound);
    wait_for_stop();
    tracing::info!("stopping: shutting down every instance");
    drop(admin_server);
    supervisor.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Serves the instance routes (and the empty proxy state behind `/metrics`) on
/// `admin.listen`, with its access rule; `None` when it is empty.
fn start_admin(
    admin: &AdminConfig,
    supervisor: &Supervisor,
) -> Result<Option<AdminServer>, EmbedError> {
    let state = Arc::new(Mutex::new(ControlState::new(
        0,
        String::new(),
        String::new(),
        LATENCY_US_MAX,
    )));
    AdminServer::start(admin, state, Some(admin_routes(supervisor.handle()))).map_err(|err| {
        match err {
            AdminError::Config(err) => EmbedError::Config(err),
            other => EmbedError::Admin {
                addr: admin.listen.clone(),
                source: std::io::Error::other(other),
            },
        }
    })
}

/// Blocks until SIGTERM or SIGINT; SIGHUP is logged and ignored.
fn wait_for_stop() {
    loop {
        match signals::wait(SIGNAL_TICK) {
            Some(signals::Signal::Stop) => break,
            Some(signals::Signal::Reload) => {
                tracing::info!("SIGHUP: configuration reload is not supported by embed; ignoring");
            }
            Some(signals::Signal::Upgrade) => {
                // The servers are this process's children: a new binary cannot take them
                // over, and starting them twice would fight over their ports and data.
                tracing::warn!(
                    "SIGUSR2: embed cannot hand its servers to a new binary; ignoring (restart \
                     pgprism to run a new version)"
                );
            }
            None => {}
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn json<T: Serialize>(code: u16, value: &T) -> RouteResponse {
    let body = sonic_rs::to_string(value)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot render: {e}\"}}"));
    RouteResponse {
        code,
        content_type: "application/json",
        body: body + "\n",
    }
}

fn error(code: u16, message: String) -> RouteResponse {
    json(code, &ErrorBody { error: message })
}

/// The admin routes for instances:
/// `GET /instances`, `GET /instances/{name}`, `POST /instances/{name}/start|stop|restart`.
pub fn admin_routes(handle: SupervisorHandle) -> ExtraRoutes {
    Arc::new(move |method: &str, path: &str| {
        let rest = path.strip_prefix("/instances")?;
        let rest = rest.trim_end_matches('/');
        let mut parts = rest.split('/').skip(1);
        let name = parts.next();
        let action = parts.next();
        if parts.next().is_some() {
            return Some(error(404, format!("not found: {path}")));
        }
        Some(match (method, name, action) {
            ("GET", None, None) => json(200, &handle.list()),
            ("GET", Some(name), None) => match handle.get(name) {
                Some(info) => json(200, &info),
                None => error(404, format!("no instance named `{name}`")),
            },
            ("POST", Some(name), Some(action)) => {
                let result = match action {
                    "start" => handle.start(name),
                    "stop" => handle.stop(name),
                    "restart" => handle.restart(name),
                    other => {
                        return Some(error(
                            404,
                            format!("unknown action `{other}`: use start, stop or restart"),
                        ));
                    }
                };
                match result {
                    Ok(info) => json(200, &info),
                    Err(e @ EmbedError::UnknownInstance { .. }) => error(404, e.to_string()),
                    Err(e) => error(500, crate::config::error_text(&e)),
                }
            }
            _ => error(
                405,
                "use GET /instances[/{name}] or POST /instances/{name}/start|stop|restart".into(),
            ),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instance_flags() {
        let a = parse_instance_flag("a:5433").unwrap();
        assert_eq!(
            (a.name.as_str(), a.port, a.data.as_str()),
            ("a", 5433, "memory")
        );
        let b = parse_instance_flag("b:0:memory").unwrap();
        assert_eq!((b.port, b.data.as_str()), (0, "memory"));
        let c = parse_instance_flag("c:5434:/var/lib/x:y").unwrap();
        assert_eq!(c.data, "/var/lib/x:y");
        assert!(parse_instance_flag("d").is_err());
        assert!(parse_instance_flag("d:port").is_err());
    }
}
