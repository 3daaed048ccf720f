//! What the shards connect to, resolved once on the main thread before any shard starts (DNS
//! and TLS files block): the primary, the mirrors, the compare shadow, and the client-side
//! TLS slot SIGHUP swaps. It must never resolve on a shard; moving hosts are followed by the
//! DNS refresh thread it starts.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::config::dns::{LiveEndpoint, Refresher};
use crate::config::{Config, ConfigError, PgUrl};
use crate::tls::{ClientTlsSlot, Upstream};

use super::RuntimeError;

/// Every backend's role (`primary`, `mirror NAME`, `shadow`) and live address, for `/status`.
pub(super) type Backends = Vec<(String, LiveEndpoint)>;

/// The backends and TLS settings every shard's sessions share (cheap clones per shard).
pub(super) struct Upstreams {
    pub(super) primary: PgUrl,
    pub(super) primary_label: String,
    pub(super) primary_addr: LiveEndpoint,
    pub(super) primary_tls: Upstream,
    pub(super) client_tls: Arc<ClientTlsSlot>,
    pub(super) mirrors: Vec<crate::mirror::Resolved>,
    pub(super) compare: Option<crate::compare::Resolved>,
    /// Compare reports: shards → control thread, bounded (a full ring drops and counts).
    pub(super) compare_reports: Receiver<crate::compare::Record>,
}

impl Upstreams {
    /// Parses and resolves the primary, the client TLS files, the mirrors and the shadow, in
    /// that order (so the first problem in the file is the one reported).
    pub(super) fn resolve(cfg: &Config) -> Result<Self, RuntimeError> {
        let primary = cfg
            .primary
            .url
            .parse::<PgUrl>()
            .map_err(|e| ConfigError::invalid("primary.url", &e))?;
        let primary_label = primary.address();
        let (tls_config, tls_required) = crate::tls::client_side(&cfg.client_tls)?;
        let client_tls = Arc::new(ClientTlsSlot::new(tls_config, tls_required));
        let primary_tls =
            Upstream::try_from(&primary).map_err(|e| ConfigError::invalid("primary.url", &e))?;
        let primary_addr =
            crate::config::dns::resolve(&primary).map_err(|source| RuntimeError::Resolve {
                addr: primary_label.clone(),
                source,
            })?;
        let mirrors = crate::mirror::resolve(cfg).map_err(RuntimeError::Mirror)?;
        let (report_tx, compare_reports) =
            crossbeam_channel::bounded(cfg.compare.report_queue_max.max(1));
        let compare = crate::compare::resolve(cfg, report_tx).map_err(RuntimeError::Compare)?;
        Ok(Upstreams {
            primary,
            primary_label,
            primary_addr,
            primary_tls,
            client_tls,
            mirrors,
            compare,
            compare_reports,
        })
    }

    /// Starts following backend host names that move (failover by DNS), so new connections
    /// go to the new address. Returns every backend's role and live address (for `/status`)
    /// and the refresh thread, which stops when dropped.
    pub(super) fn follow_dns(
        &self,
        cfg: &Config,
    ) -> Result<(Backends, Option<Refresher>), RuntimeError> {
        let mut followed = vec![(
            "primary".to_string(),
            self.primary.clone(),
            self.primary_addr.clone(),
        )];
        for m in &self.mirrors {
            followed.push((format!("mirror {}", m.name), m.url.clone(), m.addr.clone()));
        }
        if let Some(c) = &self.compare {
            followed.push(("shadow".to_string(), c.url.clone(), c.addr.clone()));
        }
        let backends: Backends = followed
            .iter()
            .map(|(role, _, live)| (role.clone(), live.clone()))
            .collect();
        let every = Duration::from_millis(cfg.proxy.dns_refresh_ms);
        let dns = crate::config::dns::start(followed, every)
            .map_err(|source| RuntimeError::Dns { source })?;
        Ok((backends, dns))
    }
}
