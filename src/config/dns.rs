//! Backend addresses that follow DNS. pgprism resolves every backend host at start-up (DNS
//! blocks, so never on a shard); when a host is a name rather than an address, a small thread
//! resolves it again every `proxy.dns-refresh-ms` and new connections go to the new address
//! (a failover that moves a name, as managed databases do). Connections already open stay
//! where they are. A failed lookup keeps the last good address.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{Endpoint, PgUrl};

/// A backend's address as last resolved; shards read it at each connect.
#[derive(Clone, Debug)]
pub struct LiveEndpoint {
    current: Arc<RwLock<Endpoint>>,
}

impl LiveEndpoint {
    pub fn new(endpoint: Endpoint) -> LiveEndpoint {
        LiveEndpoint {
            current: Arc::new(RwLock::new(endpoint)),
        }
    }

    pub fn get(&self) -> Endpoint {
        match self.current.read() {
            Ok(e) => e.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// `true` when the address changed.
    fn set(&self, endpoint: Endpoint) -> bool {
        let mut current = match self.current.write() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *current == endpoint {
            return false;
        }
        *current = endpoint;
        true
    }
}

impl std::fmt::Display for LiveEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// Resolves `url` now and wraps it.
pub fn resolve(url: &PgUrl) -> std::io::Result<LiveEndpoint> {
    Ok(LiveEndpoint::new(url.endpoint()?))
}

/// The refresher thread; dropping it stops the thread (within one lookup).
pub struct Refresher {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `url` names its host (and so may move): not an IP literal, not a socket directory.
pub fn follows_dns(url: &PgUrl) -> bool {
    url.socket_path().is_none() && url.host.parse::<IpAddr>().is_err()
}

/// Starts re-resolving every `(what, url, endpoint)` whose host is a name, every `every`.
/// `None` when there is nothing to follow or `every` is zero.
pub fn start(
    backends: Vec<(String, PgUrl, LiveEndpoint)>,
    every: Duration,
) -> std::io::Result<Option<Refresher>> {
    let backends: Vec<_> = backends
        .into_iter()
        .filter(|(_, url, _)| follows_dns(url))
        .collect();
    if backends.is_empty() || every.is_zero() {
        return Ok(None);
    }
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("pgprism-dns".into())
        .spawn(move || run(backends, every, stopped))?;
    Ok(Some(Refresher {
        stop: Some(stop),
        thread: Some(thread),
    }))
}

fn run(backends: Vec<(String, PgUrl, LiveEndpoint)>, every: Duration, stopped: Receiver<()>) {
    let mut failing = vec![false; backends.len()];
    loop {
        match stopped.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        for (i, (what, url, live)) in backends.iter().enumerate() {
            match url.endpoint() {
                Ok(endpoint) => {
                    failing[i] = false;
                    let before = live.get();
                    if live.set(endpoint.clone()) {
                        tracing::info!(
                            backend = %what,
                            host = %url.host,
                            from = %before,
                            to = %endpoint,
                            "backend host resolves to a new address; new connections go there"
                        );
                    }
                }
                Err(err) => {
                    if !failing[i] {
                        tracing::warn!(
                            backend = %what,
                            host = %url.host,
                            error = %err,
                            "cannot resolve the backend host again; keeping its last address"
                        );
                    }
                    failing[i] = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_are_followed() {
        let url = |s: &str| PgUrl::parse(s).unwrap();
        assert!(follows_dns(&url("postgres://db.example.com:5432")));
        assert!(follows_dns(&url("postgres://localhost:5432")));
        assert!(!follows_dns(&url("postgres://127.0.0.1:5432")));
        assert!(!follows_dns(&url("postgres://[::1]:5432")));
        assert!(!follows_dns(&url("postgres://%2Frun%2Fpostgresql:5432")));
    }

    #[test]
    fn live_endpoint_reports_changes() {
        let a: Endpoint = Endpoint::Tcp("127.0.0.1:1".parse().unwrap());
        let b: Endpoint = Endpoint::Tcp("127.0.0.2:1".parse().unwrap());
        let live = LiveEndpoint::new(a.clone());
        let copy = live.clone();
        assert!(!live.set(a));
        assert!(live.set(b.clone()));
        assert_eq!(copy.get(), b);
    }

    #[test]
    fn refresher_stops_when_dropped() {
        let url = PgUrl::parse("postgres://localhost:5432").unwrap();
        let live = resolve(&url).unwrap();
        let refresher = start(
            vec![("primary".into(), url, live.clone())],
            Duration::from_millis(5),
        )
        .unwrap()
        .expect("a name is followed");
        drop(refresher);
        assert!(matches!(live.get(), Endpoint::Tcp(a) if a.ip().is_loopback()));
    }
}
