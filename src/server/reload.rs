//! SIGHUP: what a running proxy can change without a restart (the client-side TLS settings)
//! and what it names as waiting for one. It must never leave a half-applied configuration:
//! an invalid file changes nothing.

use crate::config::Config;

use super::{Reload, check};

/// SIGHUP: reads the configuration again and applies what can change while serving: the
/// `[client-tls]` certificate, key and mode (files are read again even when their paths did
/// not change, for certificate rotation). Every other changed key is named in the log as
/// taking effect at the next restart. An invalid configuration changes nothing. Returns a
/// one-line status.
pub(super) fn reload_config(
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
