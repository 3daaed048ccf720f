//! pgprism: a thread-per-core, io_uring data plane for PostgreSQL traffic.

pub mod bench;
pub mod cdc;
pub mod cli;
pub mod compare;
pub mod config;
pub mod control;
pub mod demo;
pub mod embed;
pub mod mirror;
pub mod proxy;
pub mod report;
pub mod runtime;
pub mod sql;
pub mod tls;
pub mod wire;
