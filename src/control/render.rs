//! Text the admin endpoint serves: Prometheus exposition for `/metrics`, JSON for `/status`.

use std::fmt::Write;

use hdrhistogram::Histogram;

use super::{ControlState, FingerprintTotals};
use crate::mirror::MirrorReport;

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
    mirror_metrics(&mut out, state);
    if state.compare.is_some() {
        summary(
            &mut out,
            "pgprism_compare_shadow_lag_seconds",
            "compare: how long after the primary's answer to a sync point the shadow's came (read of one to read of the other; 1 us when the shadow was first)",
            &totals.shadow_lag_us,
        );
    }
    compare_metrics(&mut out, state);
    let _ = writeln!(out, "# HELP pgprism_uptime_seconds seconds since start");
    let _ = writeln!(out, "# TYPE pgprism_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "pgprism_uptime_seconds {}",
        state.started.elapsed().as_secs_f64()
    );
    admin_metrics(&mut out, state);
    out
}

/// Requests the admin endpoint refused, by reason.
fn admin_metrics(out: &mut String, state: &ControlState) {
    let _ = writeln!(
        out,
        "# HELP pgprism_admin_requests_refused_total admin requests refused: unauthorized (401, no or wrong bearer token), forbidden (403, state-changing request and no admin.token-file)"
    );
    let _ = writeln!(out, "# TYPE pgprism_admin_requests_refused_total counter");
    for (reason, value) in [
        ("unauthorized", state.admin_unauthorized),
        ("forbidden", state.admin_forbidden),
    ] {
        let _ = writeln!(
            out,
            "pgprism_admin_requests_refused_total{{reason=\"{reason}\"}} {value}"
        );
    }
}

/// Fingerprints exposed on /metrics (label cardinality stays bounded).
const METRIC_FINGERPRINTS_MAX: usize = 20;

fn mirror_metrics(out: &mut String, state: &ControlState) {
    let mirrors = state.mirrors();
    if mirrors.is_empty() {
        return;
    }
    mirror_counters(out, &mirrors);
    mirror_gauges(out, &mirrors);
    mirror_errors(out, &mirrors);
    mirror_latency(out, &mirrors);
    mirror_lag(out, &mirrors);
    statement_latency(out, state, &mirrors);
}

/// One counter per field of the mirrors' counters, labelled by mirror.
fn mirror_counters(out: &mut String, mirrors: &[MirrorReport]) {
    let names: Vec<(&str, &str)> = mirrors[0]
        .counters
        .fields()
        .into_iter()
        .map(|(n, h, _)| (n, h))
        .collect();
    for (name, help) in names {
        let _ = writeln!(out, "# HELP pgprism_mirror_{name}_total {help}");
        let _ = writeln!(out, "# TYPE pgprism_mirror_{name}_total counter");
        for m in mirrors {
            let value = m
                .counters
                .fields()
                .iter()
                .find(|f| f.0 == name)
                .map(|f| f.2)
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "pgprism_mirror_{name}_total{{mirror=\"{}\"}} {value}",
                m.name
            );
        }
    }
}

/// The mirrors' queue depths and lag.
fn mirror_gauges(out: &mut String, mirrors: &[MirrorReport]) {
    for (metric, help, get) in [
        (
            "pgprism_mirror_queue_messages",
            "messages queued for the mirror now",
            (|m: &MirrorReport| m.queue_messages) as fn(&MirrorReport) -> u64,
        ),
        (
            "pgprism_mirror_queue_bytes",
            "bytes queued for the mirror now",
            |m| m.queue_bytes,
        ),
        (
            "pgprism_mirror_lag_seconds_micro",
            "longest queueing delay in the last report interval, in microseconds",
            |m| m.lag_us,
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} gauge");
        for m in mirrors {
            let _ = writeln!(out, "{metric}{{mirror=\"{}\"}} {}", m.name, get(m));
        }
    }
}

/// The mirrors' ErrorResponses by SQLSTATE, codes in order.
fn mirror_errors(out: &mut String, mirrors: &[MirrorReport]) {
    let _ = writeln!(
        out,
        "# HELP pgprism_mirror_errors_by_sqlstate_total ErrorResponses from the mirror by SQLSTATE"
    );
    let _ = writeln!(
        out,
        "# TYPE pgprism_mirror_errors_by_sqlstate_total counter"
    );
    for m in mirrors {
        let mut codes: Vec<_> = m.errors_by_code.iter().collect();
        codes.sort();
        for (code, n) in codes {
            let _ = writeln!(
                out,
                "pgprism_mirror_errors_by_sqlstate_total{{mirror=\"{}\",sqlstate=\"{code}\"}} {n}",
                m.name
            );
        }
    }
}

/// Each mirror's statement latency as a summary.
fn mirror_latency(out: &mut String, mirrors: &[MirrorReport]) {
    let _ = writeln!(
        out,
        "# HELP pgprism_mirror_latency_seconds statement latency on the mirror (sent to ReadyForQuery)"
    );
    let _ = writeln!(out, "# TYPE pgprism_mirror_latency_seconds summary");
    for m in mirrors {
        for (q, label) in QUANTILES {
            let _ = writeln!(
                out,
                "pgprism_mirror_latency_seconds{{mirror=\"{}\",quantile=\"{label}\"}} {}",
                m.name,
                m.latency_us.value_at_quantile(q) as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "pgprism_mirror_latency_seconds_count{{mirror=\"{}\"}} {}",
            m.name,
            m.latency_us.len()
        );
    }
}

/// Upper bounds (microseconds) of the buckets of `pgprism_mirror_lag_seconds`: fine around
/// the few milliseconds a lag target is set at, so a scraper (or a benchmark taking the
/// difference of two scrapes) reads a percentile of one interval to a bucket.
const LAG_BUCKETS_US: [u64; 18] = [
    50, 100, 250, 500, 1_000, 2_000, 3_000, 4_000, 5_000, 7_500, 10_000, 25_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 2_500_000,
];

/// Each mirror's queueing delay (read of a client message to its write to the mirror) as a
/// cumulative histogram of every message sent.
fn mirror_lag(out: &mut String, mirrors: &[MirrorReport]) {
    let name = "pgprism_mirror_lag_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} how long each message waited before its write to the mirror"
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for m in mirrors {
        let h = &m.lag_hist_us;
        for bound in LAG_BUCKETS_US {
            let _ = writeln!(
                out,
                "{name}_bucket{{mirror=\"{}\",le=\"{}\"}} {}",
                m.name,
                bound as f64 / 1e6,
                h.count_between(0, bound)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{mirror=\"{}\",le=\"+Inf\"}} {}",
            m.name,
            h.len()
        );
        let sum: f64 = h
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum::<f64>()
            / 1e6;
        let _ = writeln!(out, "{name}_sum{{mirror=\"{}\"}} {sum}", m.name);
        let _ = writeln!(out, "{name}_count{{mirror=\"{}\"}} {}", m.name, h.len());
    }
}

/// p50 and p99 of the top fingerprints, on the primary and on each mirror.
fn statement_latency(out: &mut String, state: &ControlState, mirrors: &[MirrorReport]) {
    let _ = writeln!(
        out,
        "# HELP pgprism_statement_latency_seconds latency by statement fingerprint, primary and each mirror"
    );
    let _ = writeln!(out, "# TYPE pgprism_statement_latency_seconds gauge");
    for f in state.fingerprints(METRIC_FINGERPRINTS_MAX) {
        let targets = std::iter::once(("primary", &f.primary)).chain(
            mirrors
                .iter()
                .map(|m| m.name.as_str())
                .zip(f.mirrors.iter()),
        );
        for (target, h) in targets {
            for (q, label) in [(0.5, "0.5"), (0.99, "0.99")] {
                let _ = writeln!(
                    out,
                    "pgprism_statement_latency_seconds{{fingerprint=\"{:016x}\",target=\"{target}\",quantile=\"{label}\"}} {}",
                    f.id,
                    h.value_at_quantile(q) as f64 / 1e6
                );
            }
        }
    }
}

fn compare_metrics(out: &mut String, state: &ControlState) {
    let Some(book) = &state.compare else {
        return;
    };
    let _ = writeln!(
        out,
        "# HELP pgprism_compare_mismatch_kinds_total differences found, by kind (one statement can show several)"
    );
    let _ = writeln!(out, "# TYPE pgprism_compare_mismatch_kinds_total counter");
    for (kind, n) in state.compare_kinds() {
        let _ = writeln!(
            out,
            "pgprism_compare_mismatch_kinds_total{{kind=\"{kind}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP pgprism_compare_reports_by_fingerprint_total reports received by the control thread, by statement fingerprint"
    );
    let _ = writeln!(
        out,
        "# TYPE pgprism_compare_reports_by_fingerprint_total counter"
    );
    for g in book.groups().iter().take(METRIC_FINGERPRINTS_MAX) {
        let _ = writeln!(
            out,
            "pgprism_compare_reports_by_fingerprint_total{{fingerprint=\"{:016x}\",record=\"{}\"}} {}",
            g.fingerprint, g.record, g.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP pgprism_compare_report_write_errors_total failed writes of the report file"
    );
    let _ = writeln!(
        out,
        "# TYPE pgprism_compare_report_write_errors_total counter"
    );
    let _ = writeln!(
        out,
        "pgprism_compare_report_write_errors_total {}",
        book.write_errors
    );
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
    let mirrors = state.mirrors();
    let mirrors_json: Vec<sonic_rs::Value> = mirrors.iter().map(mirror_status).collect();
    let statements: Vec<sonic_rs::Value> = state
        .fingerprints(50)
        .iter()
        .map(|f| statement_status(f, &mirrors))
        .collect();
    let mut compare = match &state.compare {
        Some(book) => book.status_json(),
        None => sonic_rs::json!(null),
    };
    let calibration = state.calibration();
    if !calibration.is_empty()
        && let Some(object) = sonic_rs::JsonValueMutTrait::as_object_mut(&mut compare)
    {
        // A/A: every difference is noise; its rate per fingerprint is what calibration is for.
        let rows: Vec<sonic_rs::Value> = calibration
            .iter()
            .map(|(id, text, compared, noisy)| {
                sonic_rs::json!({
                    "fingerprint": format!("{id:016x}"),
                    "statement": text.as_str(),
                    "compared": compared,
                    "differed": noisy,
                    "noise_rate": *noisy as f64 / (*compared).max(1) as f64,
                })
            })
            .collect();
        object.insert("calibration", rows);
    }
    let value = sonic_rs::json!({
        "compare": compare,
        "mirrors": mirrors_json,
        "statements": statements,
        "version": env!("CARGO_PKG_VERSION"),
        "listen": state.listen.as_str(),
        "unix_socket": state.unix_socket.as_deref(),
        "primary": state.primary.as_str(),
        "backends": state
            .backends
            .iter()
            .map(|(role, live)| sonic_rs::json!({"role": role.as_str(), "address": live.to_string()}))
            .collect::<Vec<_>>(),
        "client_tls": match state.client_tls.as_ref().map(|slot| slot.get()) {
            Some((Some(_), true)) => "require",
            Some((Some(_), false)) => "allow",
            _ => "disable",
        },
        "uptime_s": state.started.elapsed().as_secs(),
        "started_unix_s": state.started_unix_s,
        "draining": state.draining,
        "shards_reporting": totals.shards_reporting,
        "sessions_active": totals.sessions_active,
        "counters": counters,
        "client_latency": latency_json(&totals.client_latency_us),
        "primary_latency": latency_json(&totals.primary_latency_us),
        "compare_shadow_lag": latency_json(&totals.shadow_lag_us),
        "shards": shards,
    });
    sonic_rs::to_string_pretty(&value).unwrap_or_else(|_| "{}".into())
}

/// One mirror's entry in `/status`: counters, queue, lag, errors and latency.
fn mirror_status(m: &MirrorReport) -> sonic_rs::Value {
    let mut counters = sonic_rs::Object::new();
    for (name, _, value) in m.counters.fields() {
        counters.insert(&name, value);
    }
    let mut errors = sonic_rs::Object::new();
    for (code, n) in &m.errors_by_code {
        errors.insert(code, *n);
    }
    sonic_rs::json!({
        "name": m.name.as_str(),
        "counters": counters,
        "queue_messages": m.queue_messages,
        "queue_bytes": m.queue_bytes,
        "lag_us": m.lag_us,
        "lag": latency_json(&m.lag_hist_us),
        "errors_by_sqlstate": errors,
        "latency": latency_json(&m.latency_us),
    })
}

/// One fingerprint's entry in `/status`: its latency on the primary and on each mirror, with
/// the mirror's ratio to the primary.
fn statement_status(f: &FingerprintTotals, mirrors: &[MirrorReport]) -> sonic_rs::Value {
    let mut per_mirror = sonic_rs::Object::new();
    for (m, h) in mirrors.iter().zip(&f.mirrors) {
        let p50_ratio = ratio(h.value_at_quantile(0.5), f.primary.value_at_quantile(0.5));
        let p99_ratio = ratio(h.value_at_quantile(0.99), f.primary.value_at_quantile(0.99));
        per_mirror.insert(
            &m.name,
            sonic_rs::json!({
                "count": h.len(),
                "p50_us": h.value_at_quantile(0.5),
                "p99_us": h.value_at_quantile(0.99),
                "p50_ratio_to_primary": p50_ratio,
                "p99_ratio_to_primary": p99_ratio,
            }),
        );
    }
    sonic_rs::json!({
        "fingerprint": format!("{:016x}", f.id),
        "statement": f.text.as_str(),
        "primary": {
            "count": f.primary.len(),
            "p50_us": f.primary.value_at_quantile(0.5),
            "p99_us": f.primary.value_at_quantile(0.99),
        },
        "mirrors": per_mirror,
    })
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}
