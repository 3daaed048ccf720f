//! What a run reports: the summary table on stdout, one `.hgrm` percentile file per target
//! (HdrHistogram's text format, readable by its plotter), the latency-by-percentile chart
//! (SVG, and HTML with the table), and `summary.json`. Latencies are recorded in
//! microseconds and reported in milliseconds with three decimals, so every figure here is
//! exactly the histogram's value (the JSON max equals the `.hgrm` max).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use super::chart::{self, Series};
use super::driver::{Outcome, Plan, Stop};
use super::workload::{Protocol, WorkloadKind};
use super::{BenchError, TargetInfo};

/// Quantile steps per half distance to 100% in `.hgrm` files and the chart (HdrHistogram's
/// usual 5).
const TICKS_PER_HALF_DISTANCE: u32 = 5;

pub(super) const SVG_FILE: &str = "latency.svg";
pub(super) const HTML_FILE: &str = "latency.html";
pub(super) const JSON_FILE: &str = "summary.json";

/// The run as written to `summary.json`.
#[derive(Debug, serde::Serialize)]
pub(super) struct Summary {
    pub pgprism_version: &'static str,
    pub workload: WorkloadKind,
    pub protocol: Protocol,
    /// `closed` (closed loop) or `rate` (constant rate).
    pub mode: &'static str,
    pub clients_per_target: usize,
    pub threads: usize,
    pub rate_per_target: Option<f64>,
    pub duration_s: Option<f64>,
    pub transactions_per_target: Option<u64>,
    pub warmup_s: f64,
    pub seed: u64,
    pub targets: Vec<TargetSummary>,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct TargetSummary {
    pub label: String,
    /// The URL with the password masked.
    pub url: String,
    pub server_version: Option<String>,
    /// Measured transactions that completed (the histogram's sample count).
    pub count: u64,
    /// Measured transactions that failed.
    pub errors: u64,
    pub errors_by_sqlstate: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Completed transactions per second over `elapsed_s`.
    pub rate_tps: f64,
    pub mean_ms: f64,
    pub stdev_ms: f64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub p99_99_ms: f64,
    pub max_ms: f64,
    /// The target's `.hgrm` file, in the output directory.
    pub hgrm_file: String,
}

/// Microseconds to milliseconds, exact to the microsecond.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Summary {
    pub(crate) fn new(plan: &Plan, infos: &[TargetInfo], outcome: &Outcome) -> Summary {
        let targets = plan
            .targets
            .iter()
            .zip(infos)
            .zip(&outcome.targets)
            .enumerate()
            .map(|(index, ((target, info), stats))| {
                let h = &stats.histogram;
                let elapsed = outcome.elapsed(index).as_secs_f64();
                let q = |quantile: f64| ms(h.value_at_quantile(quantile));
                TargetSummary {
                    label: target.label.clone(),
                    url: target.url.masked(),
                    server_version: info.server_version.clone(),
                    count: stats.count,
                    errors: stats.error_count(),
                    errors_by_sqlstate: stats.errors.clone(),
                    elapsed_s: elapsed,
                    rate_tps: if elapsed > 0.0 {
                        stats.count as f64 / elapsed
                    } else {
                        0.0
                    },
                    mean_ms: h.mean() / 1000.0,
                    stdev_ms: h.stdev() / 1000.0,
                    min_ms: ms(h.min()),
                    p50_ms: q(0.5),
                    p90_ms: q(0.9),
                    p99_ms: q(0.99),
                    p99_9_ms: q(0.999),
                    p99_99_ms: q(0.9999),
                    max_ms: ms(h.max()),
                    hgrm_file: hgrm_file_name(&target.label),
                }
            })
            .collect();
        let (duration_s, transactions_per_target) = match plan.stop {
            Stop::Duration(d) => (Some(d.as_secs_f64()), None),
            Stop::Transactions(n) => (None, Some(n)),
        };
        Summary {
            pgprism_version: env!("CARGO_PKG_VERSION"),
            workload: plan.workload.kind(),
            protocol: plan.protocol,
            mode: if plan.rate.is_some() {
                "rate"
            } else {
                "closed"
            },
            clients_per_target: plan.clients,
            threads: plan.threads,
            rate_per_target: plan.rate,
            duration_s,
            transactions_per_target,
            warmup_s: plan.warmup.as_secs_f64(),
            seed: plan.seed,
            targets,
        }
    }

    /// One line describing the run, for the table and the chart's subtitle.
    pub(crate) fn describe(&self) -> String {
        let load = match self.rate_per_target {
            Some(rate) => format!("constant rate {rate} tx/s"),
            None => "closed loop".to_string(),
        };
        let length = match (self.duration_s, self.transactions_per_target) {
            (Some(d), _) => format!("{d}s"),
            (None, Some(n)) => format!("{n} transactions"),
            (None, None) => String::new(),
        };
        format!(
            "workload {:?}, protocol {:?}, {} clients per target, {load}, {length}",
            self.workload, self.protocol, self.clients_per_target
        )
        .to_lowercase()
    }

    /// The table printed on stdout, with the ratios to the first target when there are more.
    pub(crate) fn table(&self) -> String {
        let width = self
            .targets
            .iter()
            .map(|t| t.label.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let mut out = format!("pgprism bench: {}\n", self.describe());
        let _ = writeln!(
            out,
            "{:<width$} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
            "target",
            "count",
            "tx/s",
            "mean",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "p99.99",
            "max",
            "errors"
        );
        for t in &self.targets {
            let _ = writeln!(
                out,
                "{:<width$} {:>9} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}",
                t.label,
                t.count,
                t.rate_tps,
                t.mean_ms,
                t.p50_ms,
                t.p90_ms,
                t.p99_ms,
                t.p99_9_ms,
                t.p99_99_ms,
                t.max_ms,
                t.errors
            );
        }
        out.push_str("(latencies in ms)\n");
        if let Some((first, rest)) = self.targets.split_first() {
            for t in rest {
                let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
                let _ = writeln!(
                    out,
                    "{} / {}: p50 {:.2}x  p99 {:.2}x",
                    t.label,
                    first.label,
                    ratio(t.p50_ms, first.p50_ms),
                    ratio(t.p99_ms, first.p99_ms)
                );
            }
        }
        for t in &self.targets {
            for (code, n) in &t.errors_by_sqlstate {
                let _ = writeln!(out, "{}: {n} transactions failed with {code}", t.label);
            }
        }
        out
    }
}

/// `<label>.hgrm`, with anything but `[A-Za-z0-9._-]` in the label replaced by `_`.
pub(super) fn hgrm_file_name(label: &str) -> String {
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.hgrm")
}

/// The histogram as HdrHistogram's percentile distribution text (what Java's
/// `outputPercentileDistribution` writes, values in milliseconds), which HdrHistogram's
/// plotter reads: `Value Percentile TotalCount 1/(1-Percentile)` rows ending at percentile
/// 1.0, then the `#[Mean ...]`, `#[Max ...]` and `#[Buckets ...]` footer lines.
pub(super) fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for step in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += step.count_since_last_iteration();
        let quantile = step.quantile_iterated_to();
        let value = ms(step.value_iterated_to());
        if quantile < 1.0 {
            let _ = writeln!(
                out,
                "{value:12.3} {quantile:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - quantile)
            );
        } else {
            // The last row has no finite 1/(1-p); Java leaves the column out.
            let _ = writeln!(out, "{value:12.3} {quantile:2.12} {total:10}");
        }
    }
    // Same layout as HdrHistogram's sub-bucket count: the power of two covering 2 * 10^sigfig.
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        ms(h.max()),
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

/// The chart's points for one histogram: (quantile, latency ms) at HdrHistogram's quantile
/// steps, ending with the max at quantile 1.0.
fn chart_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .map(|step| (step.quantile_iterated_to(), ms(step.value_iterated_to())))
        .collect()
}

/// Writes every output file into `dir`; returns their paths.
pub(super) fn write_files(
    dir: &Path,
    summary: &Summary,
    outcome: &Outcome,
    latency_axis: chart::LatencyAxis,
) -> Result<Vec<PathBuf>, BenchError> {
    let write = |name: &str, content: &str| -> Result<PathBuf, BenchError> {
        let path = dir.join(name);
        std::fs::write(&path, content).map_err(|source| BenchError::Output {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    };
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Output {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for (target, stats) in summary.targets.iter().zip(&outcome.targets) {
        written.push(write(&target.hgrm_file, &hgrm(&stats.histogram))?);
    }
    let series: Vec<Series> = summary
        .targets
        .iter()
        .zip(&outcome.targets)
        .map(|(target, stats)| Series {
            label: target.label.clone(),
            points: chart_points(&stats.histogram),
        })
        .collect();
    let svg = chart::svg(
        "Latency by percentile",
        &summary.describe(),
        &series,
        outcome
            .targets
            .iter()
            .map(|s| s.histogram.len())
            .max()
            .unwrap_or(0),
        latency_axis,
    );
    written.push(write(SVG_FILE, &svg)?);
    written.push(write(HTML_FILE, &html(summary, &svg))?);
    let json = sonic_rs::to_string_pretty(summary).map_err(BenchError::Json)?;
    written.push(write(JSON_FILE, &(json + "\n"))?);
    Ok(written)
}

/// A standalone page: the chart inline and the summary table.
fn html(summary: &Summary, svg: &str) -> String {
    let esc = chart::escape;
    let mut rows = String::new();
    for t in &summary.targets {
        let _ = writeln!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.label),
            esc(&t.url),
            t.count,
            t.rate_tps,
            t.mean_ms,
            t.p50_ms,
            t.p90_ms,
            t.p99_ms,
            t.p99_9_ms,
            t.p99_99_ms,
            t.max_ms,
            t.errors,
            esc(&t.hgrm_file)
        );
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pgprism bench: latency by percentile</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child, td:nth-child(2) {{ text-align: left; }}
</style>
</head>
<body>
<h1>pgprism bench</h1>
<p>{describe}; seed {seed}; pgprism {version}</p>
{svg}
<table>
<tr><th>target</th><th>url</th><th>count</th><th>tx/s</th><th>mean ms</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>p99.99 ms</th><th>max ms</th><th>errors</th><th>histogram</th></tr>
{rows}</table>
</body>
</html>
"#,
        describe = esc(&summary.describe()),
        seed = summary.seed,
        version = summary.pgprism_version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_ends_at_percentile_one_with_the_max() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in 1..=10_000u64 {
            h.record(us * 10).unwrap();
        }
        let text = hgrm(&h);
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .skip(1)
            .collect();
        let last: Vec<&str> = rows.last().unwrap().split_whitespace().collect();
        assert_eq!(last[1].parse::<f64>().unwrap(), 1.0);
        assert_eq!(last[0].parse::<f64>().unwrap(), ms(h.max()));
        assert_eq!(last[2], "10000");
        assert!(text.contains("#[Max     ="));
        assert!(text.contains("SubBuckets     =         2048]"));
        // Rows are in increasing percentile order.
        let percentiles: Vec<f64> = rows
            .iter()
            .map(|r| r.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect();
        assert!(percentiles.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(hgrm_file_name("127.0.0.1:5432"), "127.0.0.1_5432.hgrm");
        assert_eq!(hgrm_file_name("a/b c"), "a_b_c.hgrm");
    }
}
