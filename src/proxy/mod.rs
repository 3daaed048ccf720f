//! The data path: client sessions, their primary connections and the pumps between them.
//! Everything here runs on a shard's executor and must never block it.

pub mod backend;
pub mod fingerprints;
mod session;
pub mod stats;

pub use session::{ProxySettings, ShardCtx, serve_client};
