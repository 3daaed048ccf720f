//! Command line: subcommands and flags. Flags override the config file; the merged config is
//! validated once, before anything starts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "pgprism",
    version,
    about = "Thread-per-core io_uring data plane for PostgreSQL traffic: proxy, mirror, compare, CDC, embedded servers"
)]
struct Cli {
    /// Log filter (e.g. `info`, `pgprism=debug`); RUST_LOG works too.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of a primary (flags, optionally on top of a config file).
    Proxy(ProxyArgs),
    /// Run everything the config file describes.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Stream PostgreSQL changes (logical replication) into StarRocks with Stream Load.
    Cdc(crate::cdc::cmd::CdcArgs),
    /// Validate a config file and print the effective configuration.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct ProxyArgs {
    /// Config file to start from; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address clients connect to.
    #[arg(long)]
    listen: Option<String>,
    /// Primary database URL (postgres://host:port).
    #[arg(long)]
    primary: Option<String>,
    /// Number of shards (0 = one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Admin endpoint address (`""` disables it).
    #[arg(long)]
    admin: Option<String>,
    /// listen(2) backlog per shard.
    #[arg(long)]
    backlog: Option<u32>,
    /// Largest protocol message accepted, in bytes.
    #[arg(long)]
    message_bytes_max: Option<usize>,
    /// Startup and authentication timeout, in milliseconds.
    #[arg(long)]
    startup_timeout_ms: Option<u64>,
    /// Drain timeout on SIGTERM/SIGINT, in milliseconds.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    no_pin: bool,
}

impl ProxyArgs {
    fn into_config(self) -> Result<Config, crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            cfg.proxy.listen = v;
        }
        if let Some(v) = self.primary {
            cfg.primary.url = v;
        }
        if let Some(v) = self.shards {
            cfg.proxy.shards = v;
        }
        if let Some(v) = self.admin {
            cfg.admin.listen = v;
        }
        if let Some(v) = self.backlog {
            cfg.proxy.backlog = v;
        }
        if let Some(v) = self.message_bytes_max {
            cfg.proxy.message_bytes_max = v;
        }
        if let Some(v) = self.startup_timeout_ms {
            cfg.proxy.startup_timeout_ms = v;
        }
        if let Some(v) = self.drain_timeout_ms {
            cfg.proxy.drain_timeout_ms = v;
        }
        if self.no_pin {
            cfg.proxy.pin_cores = false;
        }
        Ok(cfg)
    }
}

/// Prints an error with its whole source chain, one cause per line.
fn report(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("pgprism: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::FAILURE
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let cfg = match cli.command {
        Command::Check { config } => {
            let checked = Config::load(&config).and_then(|cfg| cfg.validate().map(|()| cfg));
            return match checked {
                Ok(cfg) => {
                    print!("{}", cfg.to_toml());
                    eprintln!("pgprism: {} is valid", config.display());
                    ExitCode::SUCCESS
                }
                Err(err) => report(&err),
            };
        }
        Command::Cdc(args) => return crate::cdc::cmd::main(args),
        Command::Run { config } => match Config::load(&config) {
            Ok(cfg) => cfg,
            Err(err) => return report(&err),
        },
        Command::Proxy(args) => match args.into_config() {
            Ok(cfg) => cfg,
            Err(err) => return report(&err),
        },
    };
    let ready = |bound: &crate::runtime::Bound| {
        // One parseable line on stdout so scripts and tests know where to connect.
        let admin = bound.admin.map(|a| a.to_string()).unwrap_or_default();
        println!("pgprism listening on {} admin {}", bound.listen, admin);
    };
    match crate::runtime::run_proxy(&cfg, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}
