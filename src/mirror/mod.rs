//! Mirror mode: every client session gets, per mirror, its own mirror session on the same
//! shard, fed with the client's frames (the same refcounted `Bytes`) through a bounded queue.
//!
//! With `pool-size` above 0 a mirror's connections are pooled per shard instead (`pool`): a
//! session's frames are collected until a transaction boundary and the whole unit is replayed
//! on a shared connection, so the mirror's connection count does not depend on the number of
//! clients.
//!
//! This module owns the routing decision per message (filters, prepared-statement tracking,
//! resync at transaction boundaries), the per-session queues and the mirror connections. It
//! must never make the client wait, except under the `block` overflow policy the user asked
//! for, and it must never let a mirror apply half a transaction: whatever a mirror misses is
//! skipped up to the next transaction boundary (with a ROLLBACK on the mirror) and counted.

mod link;
mod pool;
mod route;

pub mod stats;

use std::rc::Rc;

use crate::config::{Config, LiveEndpoint, MirrorConfig, PgUrl, UrlError};
use crate::tls::{TlsError, Upstream};

pub use link::{Link, start as start_link};
pub use pool::shard_share;
pub use route::Router;
pub use stats::{MirrorReport, MirrorStats};

/// One configured mirror as seen by one shard: settings, resolved address, statistics.
pub struct MirrorTarget {
    pub index: usize,
    pub name: String,
    pub cfg: MirrorConfig,
    pub url: PgUrl,
    pub addr: LiveEndpoint,
    /// TLS towards the mirror, its certificate files read at start-up (never on a shard).
    pub tls: Upstream,
    pub stats: MirrorStats,
    /// The shard's pools of connections to the mirror (`None`: one per client session).
    pools: Option<pool::Pools>,
}

/// A configured mirror with its address resolved.
#[derive(Clone)]
pub struct Resolved {
    pub name: String,
    pub cfg: MirrorConfig,
    pub url: PgUrl,
    pub addr: LiveEndpoint,
    pub tls: Upstream,
    /// Shards the process runs (`pool-size` is split over them).
    pub shards: usize,
}

/// Why a mirror cannot be set up; `index` is its place in the config (`mirror[INDEX].url`).
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror[{index}].url: invalid URL")]
    Url {
        index: usize,
        #[source]
        source: UrlError,
    },
    #[error("mirror[{index}].url: cannot resolve {addr}")]
    Resolve {
        index: usize,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mirror[{index}].url: invalid TLS settings")]
    Tls {
        index: usize,
        #[source]
        source: TlsError,
    },
}

/// Resolves every configured mirror (on the main thread, before shards start: DNS blocks).
pub fn resolve(cfg: &Config) -> Result<Vec<Resolved>, MirrorError> {
    cfg.mirror
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let url = m
                .url
                .parse::<PgUrl>()
                .map_err(|source| MirrorError::Url { index, source })?;
            let addr =
                crate::config::dns::resolve(&url).map_err(|source| MirrorError::Resolve {
                    index,
                    addr: url.address(),
                    source,
                })?;
            let tls =
                Upstream::try_from(&url).map_err(|source| MirrorError::Tls { index, source })?;
            Ok(Resolved {
                tls,
                name: cfg.mirror_name(index),
                cfg: m.clone(),
                url,
                addr,
                shards: cfg.shard_count(),
            })
        })
        .collect()
}

impl MirrorTarget {
    /// Opens and authenticates a connection to the mirror as `user` with the startup
    /// parameters `params`, within `connect-timeout-ms` (a session's own link and a pool's
    /// connection alike).
    pub(crate) async fn open(
        &self,
        params: &[(String, String)],
        user: &str,
        password: &str,
        message_bytes_max: usize,
    ) -> Result<crate::backend::Opened, crate::backend::BackendError> {
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        crate::backend::open(
            &self.addr.get(),
            std::time::Duration::from_millis(self.cfg.connect_timeout_ms),
            &params,
            user,
            password,
            message_bytes_max,
            &self.tls,
        )
        .await
    }

    /// The mirror as shard 0 sees it.
    pub fn new(index: usize, resolved: &Resolved, latency_us_max: u64) -> Rc<MirrorTarget> {
        MirrorTarget::on_shard(index, resolved, latency_us_max, 0)
    }

    /// The mirror as shard `shard` sees it: with `pool-size` above 0, the shard's share of
    /// the pool ([`shard_share`]).
    pub fn on_shard(
        index: usize,
        resolved: &Resolved,
        latency_us_max: u64,
        shard: usize,
    ) -> Rc<MirrorTarget> {
        let pools = (resolved.cfg.pool_size > 0)
            .then(|| pool::Pools::new(shard_share(resolved.cfg.pool_size, resolved.shards, shard)));
        Rc::new(MirrorTarget {
            index,
            name: resolved.name.clone(),
            cfg: resolved.cfg.clone(),
            url: resolved.url.clone(),
            addr: resolved.addr.clone(),
            tls: resolved.tls.clone(),
            stats: MirrorStats::new(latency_us_max),
            pools,
        })
    }

    /// Nothing of the mirror's pooled units waits or is in flight (always true without
    /// pools: per-session links flush as their sessions end).
    pub fn flushed(&self) -> bool {
        self.pools.as_ref().is_none_or(pool::Pools::flushed)
    }
}
