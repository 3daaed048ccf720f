//! pgprism: a thread-per-core, io_uring data plane for PostgreSQL traffic.
//!
//! The core (`exec`, `wire`, `sql`, `session`, `backend`, `stats`, `tls`, `subprocess`,
//! `config`) knows no mode; the modes (`proxy`, `mirror`, `compare`, `cdc`, `embed`, `bench`)
//! stand on it and never on each other; `server`, `control`, `cli` and `demo` assemble them
//! (docs/architecture.md).

// The core.
pub mod backend;
pub mod config;
pub mod exec;
pub mod invariant;
pub mod session;
pub mod sql;
pub mod stats;
pub mod subprocess;
pub mod tls;
pub mod wire;

// The modes.
pub mod bench;
pub mod cdc;
pub mod compare;
pub mod embed;
pub mod mirror;
pub mod proxy;

// The assembly.
pub mod cli;
pub mod control;
pub mod demo;
pub mod server;
