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

use crate::config::{Config, LiveEndpoint, MirrorConfig, PgUrl};
use crate::tls::Upstream;

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

/// Resolves every configured mirror (on the main thread, before shards start: DNS blocks).
pub fn resolve(cfg: &Config) -> Result<Vec<Resolved>, String> {
    cfg.mirror
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let url = PgUrl::parse(&m.url).map_err(|e| format!("mirror[{i}].url: {e}"))?;
            let addr = crate::config::dns::resolve(&url)
                .map_err(|e| format!("mirror[{i}].url: cannot resolve {}: {e}", url.address()))?;
            let tls = Upstream::for_url(&url).map_err(|e| format!("mirror[{i}].url: {e}"))?;
            Ok(Resolved {
                tls,
                name: cfg.mirror_name(i),
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
