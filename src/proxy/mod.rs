//! The data path: client sessions, their primary connections and the pumps between them.
//! Everything here runs on a shard's executor and must never block it.

pub mod auth;
pub mod console;
pub mod credentials;
mod login;
mod pipeline;
mod pooled;
mod session;

pub use login::{ConsoleCtx, Secrets};
pub use pooled::{CancelKeys, MovedClient, pool_care, resume};
pub(crate) use session::shutdown_error;
pub use session::{Mover, Pooling, ProxySettings, ShardCtx, serve_client};
