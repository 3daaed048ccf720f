//! The data path: client sessions, their primary connections and the pumps between them.
//! Everything here runs on a shard's executor and must never block it.

pub mod auth;
pub mod console;
pub mod credentials;
mod session;

pub use session::{ProxySettings, ShardCtx, serve_client};
