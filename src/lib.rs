//! pgprism: a thread-per-core, io_uring data plane for PostgreSQL traffic.

pub mod cdc;
pub mod cli;
pub mod config;
pub mod control;
pub mod embed;
pub mod proxy;
pub mod runtime;
pub mod wire;
