//! `pgprism bench`: a latency load generator for one or two PostgreSQL URLs (direct or through
//! pgprism). Closed loop (each client sends its next transaction when the last one finished)
//! or constant rate (`--rate`: latency counted from when a transaction *should* have been
//! sent, so a stall is not hidden by coordinated omission). Built-in workloads on pgbench's
//! schema, or custom SQL. Results: HDR histograms per target, a table on stdout, `.hgrm`
//! percentile files, an SVG/HTML latency-by-percentile chart and a JSON summary.
//!
//! It owns its worker threads (one io_uring runtime each, no locks on the hot path) and its
//! output directory. It must never count a failed transaction as a latency sample, never let
//! one broken connection end the run (errors are counted per SQLSTATE), and never run
//! unbounded: every transaction has a timeout and reconnects are limited.

mod chart;
pub use chart::LatencyAxis;
pub mod client;
mod driver;
mod progress;
mod report;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{PgUrl, UrlError};
use crate::exec;

pub use client::{ClientError, Completion, ConnectParams, PgConnection, ServerError};
pub use workload::{Protocol, WorkloadKind, init_statements};

use driver::{Plan, Stop, Target};
use workload::Workload;

/// Most targets in one run: the chart's palette and the side-by-side table stay readable.
const TARGETS_MAX: usize = 4;
/// Most client connections per target.
const CLIENTS_MAX: usize = 10_000;
/// Most worker threads.
const THREADS_MAX: usize = 1024;

/// Flags of `pgprism bench`. Short flags follow pgbench where one exists.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// PostgreSQL URL to load (postgres://user:password@host:port/db). Repeat it (up to 4)
    /// to measure targets side by side in one run; each gets the full load (--clients
    /// connections and --rate each).
    #[arg(long = "target", required = true, value_name = "URL")]
    pub targets: Vec<String>,
    /// Name for each target in the output, in --target order (default: host:port).
    #[arg(long = "label", value_name = "NAME")]
    pub labels: Vec<String>,
    /// Client connections per target.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub clients: usize,
    /// Worker threads (default: one per core, at most one per client).
    #[arg(long, short = 'j')]
    pub threads: Option<usize>,
    /// Measured run time, after the warm-up (e.g. 10s, 500ms, 2m). Default 10s.
    #[arg(long, short = 'T', value_parser = parse_duration, conflicts_with = "transactions")]
    pub duration: Option<Duration>,
    /// Measured transactions per target (split over its clients), instead of --duration.
    #[arg(long, short = 't')]
    pub transactions: Option<u64>,
    /// Constant rate in transactions per second per target; omit for a closed loop.
    #[arg(long, short = 'R')]
    pub rate: Option<f64>,
    /// What each transaction runs (on pgbench's tables, except custom).
    #[arg(long, value_enum, default_value = "select")]
    pub workload: WorkloadKind,
    /// A statement of the custom workload (repeat for several; they run in order as one
    /// transaction). `:id` and `$1` stand for a random key in 1..=scale*100000; `:aid`,
    /// `:bid`, `:tid`, `:delta` are pgbench's variables.
    #[arg(long = "sql", value_name = "SQL")]
    pub sql: Vec<String>,
    /// Scale factor of the pgbench tables (sets the key ranges; and the size with --init).
    #[arg(long, short = 's', default_value_t = 1)]
    pub scale: u64,
    /// Query protocol: simple (Query messages) or prepared (Parse once, then Bind/Execute).
    #[arg(long, short = 'M', value_enum, default_value = "simple")]
    pub protocol: Protocol,
    /// Run this long before measuring; those transactions are not recorded.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,
    /// Directory for the .hgrm, SVG, HTML and JSON files (created if missing).
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Seed for the random keys (default: random; the JSON summary records it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Create pgbench's tables at --scale on every target first (drops existing ones).
    #[arg(long)]
    pub init: bool,
    /// A transaction running longer is abandoned and counted as error `timeout`; its
    /// connection is replaced.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub tx_timeout: Duration,
    /// No progress line on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Latency axis of the chart: `log` (powers of ten) keeps a fast target readable beside
    /// a slow one, which `linear` flattens onto zero.
    #[arg(long, value_enum, default_value = "linear")]
    pub latency_axis: LatencyAxis,
}

/// An error that stops `pgprism bench`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("invalid workload")]
    Workload(#[from] workload::WorkloadError),
    #[error("target `{label}`: invalid URL")]
    Url {
        label: String,
        #[source]
        source: UrlError,
    },
    #[error("cannot connect to target `{label}` ({url})")]
    Connect {
        label: String,
        url: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("target `{label}` ({url}): {step} failed{hint}")]
    Setup {
        label: String,
        url: String,
        step: String,
        hint: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("cannot start the io_uring runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start worker thread {index}")]
    Thread {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("worker thread {index} panicked")]
    WorkerPanicked { index: usize },
    #[error("cannot write {}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the JSON summary")]
    Json(#[source] sonic_rs::Error),
}

/// Parses `10s`, `500ms`, `2m`, `1h`, `1.5s` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
}

/// Runs `pgprism bench` with its flags: prints the table, writes the files.
pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    let plan = Arc::new(plan(&args)?);
    let preflight = preflight(&plan, &args)?;
    let progress = progress::Progress::new(&plan, !args.quiet);
    let outcome = driver::run(plan.clone(), progress)?;
    let summary = report::Summary::new(&plan, &preflight, &outcome);
    print!("{}", summary.table());
    let written = report::write_files(&args.out, &summary, &outcome, args.latency_axis)?;
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn usage(message: impl Into<String>) -> BenchError {
    BenchError::Usage(message.into())
}

fn plan(args: &BenchArgs) -> Result<Plan, BenchError> {
    check_flags(args)?;
    let workload = Workload::new(args.workload, args.scale, &args.sql)?;
    let targets = targets(args)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let clients_total = args.clients * targets.len();
    let threads = args.threads.unwrap_or(cores);
    if !(1..=THREADS_MAX).contains(&threads) {
        return Err(usage(format!("--threads must be 1..={THREADS_MAX}")));
    }
    let stop = match (args.duration, args.transactions) {
        (_, Some(n)) => Stop::Transactions(n),
        (Some(d), None) => Stop::Duration(d),
        (None, None) => Stop::Duration(Duration::from_secs(10)),
    };
    let seed = match args.seed {
        Some(seed) => seed,
        None => getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }),
    };
    Ok(Plan {
        targets,
        workload,
        protocol: args.protocol,
        clients: args.clients,
        threads: threads.min(clients_total),
        stop,
        rate: args.rate,
        warmup: args.warmup,
        seed,
        tx_timeout: args.tx_timeout,
    })
}

/// The flags' ranges and their agreement with each other, before anything is resolved.
fn check_flags(args: &BenchArgs) -> Result<(), BenchError> {
    if args.targets.len() > TARGETS_MAX {
        return Err(usage(format!("at most {TARGETS_MAX} --target URLs")));
    }
    if !args.labels.is_empty() && args.labels.len() != args.targets.len() {
        return Err(usage(format!(
            "{} --label names for {} --target URLs: give one per target or none",
            args.labels.len(),
            args.targets.len()
        )));
    }
    if !(1..=CLIENTS_MAX).contains(&args.clients) {
        return Err(usage(format!("--clients must be 1..={CLIENTS_MAX}")));
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(usage("--rate must be a positive number of transactions/s"));
    }
    if args.transactions == Some(0) {
        return Err(usage("--transactions must be at least 1"));
    }
    if args.duration.is_some_and(|d| d.is_zero()) {
        return Err(usage("--duration must be positive"));
    }
    if args.tx_timeout.is_zero() {
        return Err(usage("--tx-timeout must be positive"));
    }
    Ok(())
}

/// Parses and resolves each `--target` URL and gives it its label.
fn targets(args: &BenchArgs) -> Result<Vec<Target>, BenchError> {
    let mut targets = Vec::with_capacity(args.targets.len());
    for (index, text) in args.targets.iter().enumerate() {
        let given = args.labels.get(index).cloned();
        let fallback = || format!("target{}", index + 1);
        let url = text.parse::<PgUrl>().map_err(|source| BenchError::Url {
            label: given.clone().unwrap_or_else(fallback),
            source,
        })?;
        let label = given.unwrap_or_else(|| url.address());
        if label.is_empty() {
            return Err(usage("a --label may not be empty"));
        }
        let params = ConnectParams::resolve(&url).map_err(|source| BenchError::Connect {
            label: label.clone(),
            url: url.masked(),
            source: Box::new(source),
        })?;
        targets.push(Target { label, url, params });
    }
    // Default labels can collide (the same server twice): number them.
    let duplicated =
        (1..targets.len()).any(|i| targets[..i].iter().any(|t| t.label == targets[i].label));
    if duplicated {
        if !args.labels.is_empty() {
            return Err(usage("--label names must be distinct"));
        }
        for (index, target) in targets.iter_mut().enumerate() {
            target.label = format!("target{}", index + 1);
        }
    }
    Ok(targets)
}

/// What the pre-flight connection learnt about each target.
pub(crate) struct TargetInfo {
    pub server_version: Option<String>,
}

/// One connection per target before the run, from this thread: says clearly which target
/// cannot be reached or lacks the tables, runs `--init`, and checks every statement parses.
fn preflight(plan: &Plan, args: &BenchArgs) -> Result<Vec<TargetInfo>, BenchError> {
    let result = std::rc::Rc::new(std::cell::RefCell::new(None));
    let out = result.clone();
    let init = args.init;
    let scale = args.scale;
    // The targets are cloned into the task: `exec::run` wants a 'static future.
    let targets: Vec<(String, String, ConnectParams)> = plan
        .targets
        .iter()
        .map(|t| (t.label.clone(), t.url.masked(), t.params.clone()))
        .collect();
    let workload = plan.workload.clone();
    exec::run(64, async move {
        let mut infos = Vec::new();
        for (label, url, params) in targets {
            match check_target(&label, &url, &params, &workload, init, scale).await {
                Ok(info) => infos.push(info),
                Err(err) => {
                    *out.borrow_mut() = Some(Err(err));
                    return;
                }
            }
        }
        *out.borrow_mut() = Some(Ok(infos));
    })
    .map_err(BenchError::Runtime)?;
    result
        .take()
        .unwrap_or_else(|| Err(usage("pre-flight check did not finish")))
}

async fn check_target(
    label: &str,
    url: &str,
    params: &ConnectParams,
    workload: &Workload,
    init: bool,
    scale: u64,
) -> Result<TargetInfo, BenchError> {
    let mut conn = PgConnection::connect(params)
        .await
        .map_err(|source| BenchError::Connect {
            label: label.to_string(),
            url: url.to_string(),
            source: Box::new(source),
        })?;
    let setup = |step: String, source: ClientError| {
        let missing_table = source.server_error().is_some_and(|e| e.code == "42P01");
        let hint = if missing_table && workload.kind() != WorkloadKind::Custom {
            format!(" (run `pgbench -i -s {scale}` against it, or pass --init)")
        } else {
            String::new()
        };
        BenchError::Setup {
            label: label.to_string(),
            url: url.to_string(),
            step,
            hint,
            source: Box::new(source),
        }
    };
    if init {
        for sql in workload::init_statements(scale) {
            conn.simple_query(&sql)
                .await
                .map_err(|e| setup(format!("--init (`{sql}`)"), e))?;
        }
    }
    // Parse checks names and syntax without running anything (nothing is written).
    for (index, statement) in workload.statements().iter().enumerate() {
        conn.prepare("", statement.prepared_sql(), &[])
            .await
            .map_err(|e| setup(format!("statement {} check", index + 1), e))?;
    }
    let info = TargetInfo {
        server_version: conn.parameter("server_version").map(str::to_string),
    };
    conn.close().await;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }
}
