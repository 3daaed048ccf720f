//! Ports below `net.ipv4.ip_unprivileged_port_start` (1024 unless changed) need
//! CAP_NET_BIND_SERVICE, which the shipped unit does not grant (its capability bounding set is
//! empty; systemd/low-port.conf adds the one capability). `check` finds out before any bind,
//! so `ExecStartPre=pgprism check` names the address and the drop-in instead of the start
//! failing later with a bare EACCES. Reads /proc only; never touches a socket.

use crate::config::{Config, ConfigError};

/// CAP_NET_BIND_SERVICE's bit in the capability sets (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;

/// The addresses pgprism itself listens on with a port the kernel reserves, when this process
/// may not bind them: an error naming the first one.
pub(super) fn check(cfg: &Config) -> Result<(), ConfigError> {
    let mut listens = Vec::new();
    // The proxy listens only when it has a primary (`pgprism run` without one serves CDC or
    // embedded servers alone); the admin endpoint whenever it is set.
    if !cfg.primary.url.is_empty() {
        listens.push(("proxy.listen", cfg.proxy.listen.as_str()));
    }
    if !cfg.admin.listen.is_empty() {
        listens.push(("admin.listen", cfg.admin.listen.as_str()));
    }
    let start = unprivileged_port_start();
    let low = listens.into_iter().find_map(|(key, addr)| {
        port_of(addr)
            .filter(|p| *p != 0 && *p < start)
            .map(|p| (key, p))
    });
    let Some((key, port)) = low else {
        return Ok(());
    };
    if may_bind_low_ports() {
        return Ok(());
    }
    Err(ConfigError::key(
        key,
        format!(
            "port {port} is below {start} (net.ipv4.ip_unprivileged_port_start) and this \
             process lacks CAP_NET_BIND_SERVICE. Under systemd, install the drop-in \
             /usr/share/doc/pgprism/examples/low-port.conf as \
             /etc/systemd/system/pgprism.service.d/low-port.conf and run `systemctl \
             daemon-reload`; or listen on a port from {start} up"
        ),
    ))
}

/// The port of `host:port` or `[v6]:port`; `None` when there is none to read.
fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// The lowest port an unprivileged process may bind (the kernel's default is 1024).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Whether CAP_NET_BIND_SERVICE is in the effective set. When /proc cannot say, the bind
/// itself will: do not refuse on a guess.
fn may_bind_low_ports() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_caps(&status))
        .is_none_or(|caps| caps & (1 << CAP_NET_BIND_SERVICE) != 0)
}

/// The `CapEff:` mask of a /proc/PID/status text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_v4_v6_and_names() {
        assert_eq!(port_of("0.0.0.0:443"), Some(443));
        assert_eq!(port_of("[::]:80"), Some(80));
        assert_eq!(port_of("db.example:6432"), Some(6432));
        assert_eq!(port_of("localhost"), None);
    }

    #[test]
    fn effective_set_from_status() {
        let status = "Name:\tpgprism\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000400\n\
                      CapEff:\t0000000000000400\nCapBnd:\t0000000000000400\n";
        let caps = effective_caps(status).unwrap();
        assert_ne!(caps & (1 << CAP_NET_BIND_SERVICE), 0);
        let none = "CapEff:\t0000000000000000\n";
        assert_eq!(effective_caps(none), Some(0));
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }
}
