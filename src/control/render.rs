//! Text the admin endpoint serves: Prometheus exposition for `/metrics`, JSON for `/status`.

use std::fmt::Write;

use hdrhistogram::Histogram;

use super::ControlState;

const QUANTILES: [(f64, &str); 5] = [
    (0.5, "0.5"),
    (0.9, "0.9"),
    (0.99, "0.99"),
    (0.999, "0.999"),
    (0.9999, "0.9999"),
];

pub(super) fn metrics(state: &ControlState) -> String {
    let totals = state.totals();
    let mut out = String::with_capacity(8 << 10);
    for (name, help, _) in totals.counters.fields() {
        let _ = writeln!(out, "# HELP pgprism_{name}_total {help}");
        let _ = writeln!(out, "# TYPE pgprism_{name}_total counter");
        for report in state.shard_reports() {
            let value = report
                .counters
                .fields()
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|f| f.2)
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "pgprism_{name}_total{{shard=\"{}\"}} {value}",
                report.shard
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP pgprism_sessions_active client sessions open now"
    );
    let _ = writeln!(out, "# TYPE pgprism_sessions_active gauge");
    for report in state.shard_reports() {
        let _ = writeln!(
            out,
            "pgprism_sessions_active{{shard=\"{}\"}} {}",
            report.shard, report.sessions_active
        );
    }
    summary(
        &mut out,
        "pgprism_client_latency_seconds",
        "statement latency seen by clients (read of the statement to write of ReadyForQuery)",
        &totals.client_latency_us,
    );
    summary(
        &mut out,
        "pgprism_primary_latency_seconds",
        "statement latency of the primary (read of the statement to its ReadyForQuery)",
        &totals.primary_latency_us,
    );
    let _ = writeln!(out, "# HELP pgprism_uptime_seconds seconds since start");
    let _ = writeln!(out, "# TYPE pgprism_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "pgprism_uptime_seconds {}",
        state.started.elapsed().as_secs_f64()
    );
    out
}

fn summary(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} summary");
    for (q, label) in QUANTILES {
        let seconds = h.value_at_quantile(q) as f64 / 1e6;
        let _ = writeln!(out, "{name}{{quantile=\"{label}\"}} {seconds}");
    }
    let sum: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / 1e6;
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {}", h.len());
}

fn latency_json(h: &Histogram<u64>) -> sonic_rs::Value {
    sonic_rs::json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "p9999_us": h.value_at_quantile(0.9999),
        "max_us": h.max(),
        "mean_us": h.mean(),
    })
}

pub(super) fn status(state: &ControlState) -> String {
    let totals = state.totals();
    let mut counters = sonic_rs::Object::new();
    for (name, _, value) in totals.counters.fields() {
        counters.insert(&name, value);
    }
    let shards: Vec<sonic_rs::Value> = state
        .shard_reports()
        .map(|r| {
            sonic_rs::json!({
                "shard": r.shard,
                "sessions_active": r.sessions_active,
                "statements": r.counters.statements,
                "client_latency": latency_json(&r.client_latency_us),
            })
        })
        .collect();
    let value = sonic_rs::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "listen": state.listen.as_str(),
        "primary": state.primary.as_str(),
        "uptime_s": state.started.elapsed().as_secs(),
        "started_unix_s": state.started_unix_s,
        "draining": state.draining,
        "shards_reporting": totals.shards_reporting,
        "sessions_active": totals.sessions_active,
        "counters": counters,
        "client_latency": latency_json(&totals.client_latency_us),
        "primary_latency": latency_json(&totals.primary_latency_us),
        "shards": shards,
    });
    sonic_rs::to_string_pretty(&value).unwrap_or_else(|_| "{}".into())
}
