//! Mirror mode: every client session gets, per mirror, its own mirror session on the same
//! shard, fed with the client's frames (the same refcounted `Bytes`) through a bounded queue.
//!
//! This module owns the routing decision per message (filters, prepared-statement tracking,
//! resync at transaction boundaries), the per-session queues and the mirror connections. It
//! must never make the client wait, except under the `block` overflow policy the user asked
//! for, and it must never let a mirror apply half a transaction: whatever a mirror misses is
//! skipped up to the next transaction boundary (with a ROLLBACK on the mirror) and counted.

mod link;
mod route;

pub mod stats;

use std::rc::Rc;

use crate::config::{Config, LiveEndpoint, MirrorConfig, PgUrl, UrlError};
use crate::tls::{TlsError, Upstream};

pub use link::{Link, start as start_link};
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
}

/// A configured mirror with its address resolved.
#[derive(Clone)]
pub struct Resolved {
    pub name: String,
    pub cfg: MirrorConfig,
    pub url: PgUrl,
    pub addr: LiveEndpoint,
    pub tls: Upstream,
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
            })
        })
        .collect()
}

impl MirrorTarget {
    pub fn new(index: usize, resolved: &Resolved, latency_us_max: u64) -> Rc<MirrorTarget> {
        Rc::new(MirrorTarget {
            index,
            name: resolved.name.clone(),
            cfg: resolved.cfg.clone(),
            url: resolved.url.clone(),
            addr: resolved.addr.clone(),
            tls: resolved.tls.clone(),
            stats: MirrorStats::new(latency_us_max),
        })
    }
}
