//! The Grafana dashboard (`contrib/grafana/pgprism.json`) queries only metrics pgprism
//! exports. The exported names come from a real `pgprism run` with every metrics section
//! present (proxy, a mirror, a compare shadow, CDC into the Stream Load emulator) scraping
//! `/metrics` and `/cdc/metrics`, so a renamed or removed metric fails here, not on a
//! dashboard in production. The same goes for labels: every label a query filters on
//! (`{mirror="..."}`), groups by (`by (shard)`), reads in `label_values` or shows in a
//! legend (`{{table}}`) must be on the exported series of the metrics it applies to, and a
//! filter's literal value (`quantile="0.999"`) on one of them.

#[path = "support/starrocks.rs"]
mod starrocks;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgprism::embed::{Instance, InstanceConfig};
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use starrocks::{ColType, StarRocks};
use support::eventually;

const DB: &str = "analytics";

fn dashboard() -> sonic_rs::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/pgprism.json");
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    sonic_rs::from_str(&text).expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn expressions(dash: &sonic_rs::Value) -> Vec<String> {
    let mut out = Vec::new();
    let panels = dash["panels"].as_array().expect("panels");
    for panel in panels.iter() {
        if let Some(targets) = panel["targets"].as_array() {
            for target in targets.iter() {
                out.push(target["expr"].as_str().expect("expr").to_string());
            }
        }
    }
    let variables = dash["templating"]["list"].as_array().expect("templating");
    for var in variables.iter() {
        if let Some(def) = var["definition"].as_str() {
            out.push(def.to_string());
        }
    }
    out
}

/// Metric names in PromQL text: pgprism's all start with `pgprism_`.
fn names_in(exprs: &[String]) -> BTreeSet<String> {
    let re = regex::Regex::new(r"pgprism_[a-z0-9_]+").unwrap();
    exprs
        .iter()
        .flat_map(|e| re.find_iter(e).map(|m| m.as_str().to_string()))
        .collect()
}

/// Names of a Prometheus exposition: families from `# TYPE` lines and every sample's name
/// (summaries' `_sum`/`_count` samples are names of their own in PromQL).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') || line.is_empty() => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name {
            names.insert(name.to_string());
        }
    }
    names
}

/// Labels Prometheus puts on every series it scrapes (the target's), not pgprism's to export.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// What the dashboard asks of one metric's labels.
#[derive(Debug, Default)]
struct LabelUse {
    /// Labels it filters on, groups by, or reads (`label_values`).
    labels: BTreeSet<String>,
    /// `label="literal"` filters: some exported series must have that value.
    values: BTreeSet<(String, String)>,
    /// Where each label is asked for, for the failure message.
    queries: BTreeSet<String>,
}

/// The index of the parenthesis closing the one at `open`.
fn closing(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The index of the parenthesis opening the one that closes at `close`.
fn opening(text: &str, close: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[..=close].char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Each label list (`by`, `without`, `on`, `ignoring`, `group_left`, `group_right`) with the
/// metrics it applies to: an aggregation's argument (`sum by (x) (ARG)` or `sum (ARG) by
/// (x)`); for vector matching, both operands, taken as the whole expression.
fn label_lists(expr: &str) -> Vec<(BTreeSet<String>, BTreeSet<String>)> {
    let clause =
        regex::Regex::new(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
            .unwrap();
    let mut out = Vec::new();
    for found in clause.captures_iter(expr) {
        let whole = found.get(0).unwrap();
        let labels: BTreeSet<String> = found[2]
            .split(',')
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let scope = match &found[1] {
            "by" | "without" => {
                let after = expr[whole.end()..].trim_start();
                if after.starts_with('(') {
                    let open = expr.len() - after.len();
                    closing(expr, open).map(|close| &expr[open..=close])
                } else {
                    let before = expr[..whole.start()].trim_end();
                    before
                        .strip_suffix(')')
                        .and_then(|_| opening(expr, before.len() - 1))
                        .map(|open| &expr[open..before.len()])
                }
            }
            _ => Some(expr),
        };
        let scope =
            scope.unwrap_or_else(|| panic!("no argument for `{}` in {expr}", whole.as_str()));
        out.push((labels, names_in(&[scope.to_string()])));
    }
    out
}

/// What every query (and legend) asks of each metric's labels, and the legends that show a
/// label their query aggregates away.
fn label_uses(dash: &sonic_rs::Value) -> (BTreeMap<String, LabelUse>, Vec<String>) {
    let selector = regex::Regex::new(r"(pgprism_[a-z0-9_]+)\s*\{([^}]*)\}").unwrap();
    let matcher =
        regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)""#).unwrap();
    let legend_label = regex::Regex::new(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}").unwrap();
    let label_values =
        regex::Regex::new(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)").unwrap();
    let mut uses: BTreeMap<String, LabelUse> = BTreeMap::new();
    let mut ask = |metric: &str, label: &str, value: Option<&str>, query: &str| {
        let entry = uses.entry(metric.to_string()).or_default();
        entry.labels.insert(label.to_string());
        if let Some(value) = value {
            entry.values.insert((label.to_string(), value.to_string()));
        }
        entry.queries.insert(query.to_string());
    };
    let aggregation = regex::Regex::new(r"\b(sum|max|min|avg|count)\s*(by|without|\()").unwrap();
    let mut lost = Vec::new();
    let mut queries: Vec<(String, Option<String>)> = Vec::new();
    for panel in dash["panels"].as_array().unwrap().iter() {
        if let Some(targets) = panel["targets"].as_array() {
            for t in targets.iter() {
                let expr = t["expr"].as_str().unwrap().to_string();
                queries.push((expr, t["legendFormat"].as_str().map(str::to_string)));
            }
        }
    }
    for (expr, legend) in &queries {
        for sel in selector.captures_iter(expr) {
            for m in matcher.captures_iter(&sel[2]) {
                // A literal equality must match a series; a regex or a variable may not.
                let literal = (&m[2] == "=" && !m[3].contains('$')).then_some(&m[3]);
                ask(&sel[1], &m[1], literal, expr);
            }
        }
        let lists = label_lists(expr);
        for (labels, metrics) in &lists {
            for label in labels {
                for metric in metrics {
                    ask(metric, label, None, expr);
                }
            }
        }
        // A legend shows labels of the result: those the outermost aggregation keeps, or the
        // series' own when nothing aggregates.
        let shown: Vec<String> = legend
            .iter()
            .flat_map(|l| legend_label.captures_iter(l).map(|c| c[1].to_string()))
            .collect();
        let aggregates = aggregation.is_match(expr);
        for label in &shown {
            if aggregates {
                if !lists.iter().any(|(labels, _)| labels.contains(label)) {
                    lost.push(format!(
                        "the legend shows {{{{{label}}}}} but the query aggregates it away: {expr}"
                    ));
                }
            } else {
                for metric in names_in(std::slice::from_ref(expr)) {
                    ask(&metric, label, None, expr);
                }
            }
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap().iter() {
        if let Some(def) = var["definition"].as_str()
            && let Some(found) = label_values.captures(def)
        {
            for metric in names_in(&[found[1].to_string()]) {
                ask(&metric, &found[2], None, def);
            }
        }
    }
    (uses, lost)
}

/// Label names and values of each exported metric's samples (summaries' `quantile` on the
/// family's own name).
fn exported_labels(text: &str) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let pair = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).unwrap();
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let entry = out.entry(name.to_string()).or_default();
        if let Some((_, rest)) = line.split_once('{')
            && let Some((labels, _)) = rest.rsplit_once('}')
        {
            for p in pair.captures_iter(labels) {
                entry.insert((p[1].to_string(), p[2].to_string()));
            }
        }
    }
    out
}

/// Every label the dashboard asks of a metric is on its exported samples (and each literal
/// value on one of them); a metric asked for a label must have samples to check.
fn check_labels(
    uses: &BTreeMap<String, LabelUse>,
    exported: &BTreeMap<String, BTreeSet<(String, String)>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (metric, want) in uses {
        let own: BTreeSet<&str> = want
            .labels
            .iter()
            .map(String::as_str)
            .filter(|l| !TARGET_LABELS.contains(l))
            .collect();
        if own.is_empty() {
            continue;
        }
        let Some(have) = exported.get(metric) else {
            problems.push(format!(
                "{metric}: no samples exported to check {own:?} against"
            ));
            continue;
        };
        let names: BTreeSet<&str> = have.iter().map(|(l, _)| l.as_str()).collect();
        for label in own.iter().filter(|l| !names.contains(**l)) {
            problems.push(format!(
                "{metric} has no label `{label}` (it has {names:?}), asked by {:?}",
                want.queries
            ));
        }
        for (label, value) in &want.values {
            if !TARGET_LABELS.contains(&label.as_str())
                && names.contains(label.as_str())
                && !have.contains(&(label.clone(), value.clone()))
            {
                problems.push(format!(
                    "no {metric} series has {label}=\"{value}\", asked by {:?}",
                    want.queries
                ));
            }
        }
    }
    problems
}

#[test]
fn the_label_check_finds_what_it_should() {
    // The checker itself, on a made-up exposition: it must see each kind of label use.
    let dash: sonic_rs::Value = sonic_rs::from_str(
        r#"{"panels": [{"targets": [
            {"expr": "sum by (shard) (rate(pgprism_a_total{instance=~\"$instance\"}[1m]))", "legendFormat": "{{shard}}"},
            {"expr": "max(pgprism_b_seconds{quantile=\"0.999\"})"},
            {"expr": "sum(rate(pgprism_c_total[1m])) by (mirror) / on (mirror) pgprism_d", "legendFormat": "{{mirror}}"},
            {"expr": "pgprism_e", "legendFormat": "{{table}}"},
            {"expr": "sum(pgprism_f)", "legendFormat": "{{kind}}"}
        ]}], "templating": {"list": [{"definition": "label_values(pgprism_g, db)"}]}}"#,
    )
    .unwrap();
    let good = "pgprism_a_total{shard=\"0\"} 1\npgprism_b_seconds{quantile=\"0.999\"} 1\n\
                pgprism_c_total{mirror=\"m\"} 1\npgprism_d{mirror=\"m\"} 1\n\
                pgprism_e{table=\"t\"} 1\npgprism_f 1\npgprism_g{db=\"x\"} 1\n";
    let (uses, lost) = label_uses(&dash);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].contains("{{kind}}"), "{lost:?}");
    assert_eq!(
        check_labels(&uses, &exported_labels(good)),
        Vec::<String>::new()
    );
    let bad = good
        .replace("shard=", "core=")
        .replace("0.999", "0.99")
        .replace("pgprism_d{mirror", "pgprism_d{target")
        .replace("table=", "relation=")
        .replace("db=", "database=");
    let problems = check_labels(&uses, &exported_labels(&bad)).join("\n");
    for expected in [
        "pgprism_a_total has no label `shard`",
        "no pgprism_b_seconds series has quantile=\"0.999\"",
        "pgprism_d has no label `mirror`",
        "pgprism_e has no label `table`",
        "pgprism_g has no label `db`",
    ] {
        assert!(
            problems.contains(expected),
            "{expected} not in:\n{problems}"
        );
    }
    assert!(
        !problems.lines().any(|p| p.starts_with("pgprism_c_total")),
        "{problems}"
    );
    let none = check_labels(&uses, &exported_labels(""));
    assert!(
        none.iter()
            .any(|p| p.contains("pgprism_a_total: no samples")),
        "{none:?}"
    );
}

#[test]
fn dashboard_is_well_formed() {
    let dash = dashboard();
    assert_eq!(dash["uid"].as_str(), Some("pgprism"));
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut queried = 0;
    for panel in panels.iter() {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        if panel["type"].as_str() == Some("row") {
            continue;
        }
        // Every panel reads the data source the importer picks.
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some("${datasource}"),
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} queries nothing", panel["title"]);
        for t in targets.iter() {
            let expr = t["expr"].as_str().unwrap();
            // Series are per instance; the variable must narrow every query.
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{}: {expr}",
                panel["title"]
            );
            queried += 1;
        }
    }
    assert!(queried > 40, "{queried} queries");
}

#[test]
fn every_panel_query_is_valid_promql() {
    // promtool (Debian's prometheus package) parses each query as a recording rule, with
    // Grafana's variables replaced by what Grafana would put there.
    let dash = dashboard();
    let mut rules = Vec::new();
    for panel in dash["panels"].as_array().unwrap().iter() {
        let Some(targets) = panel["targets"].as_array() else {
            continue;
        };
        for t in targets.iter() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            rules.push(sonic_rs::json!({
                "record": format!("dashboard:query_{}", rules.len()),
                "expr": expr,
            }));
        }
    }
    assert!(rules.len() > 40);
    let dir = support::TempDir::new("dashboard-rules");
    let file = dir.join("rules.json");
    // JSON is YAML: promtool reads it as a rules file.
    let doc = sonic_rs::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, sonic_rs::to_string(&doc).unwrap()).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (apt-get install prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let used = names_in(&expressions(&dashboard()));
    // What the dashboard promises to show: throughput, latency, mirrors, compare, CDC, pool.
    for wanted in [
        "pgprism_statements_total",
        "pgprism_client_latency_seconds",
        "pgprism_primary_latency_seconds",
        "pgprism_mirror_lag_seconds_micro",
        "pgprism_mirror_skipped_overflow_total",
        "pgprism_compare_mismatches_total",
        "pgprism_compare_mismatch_kinds_total",
        "pgprism_cdc_lag_bytes",
        "pgprism_cdc_rows_loaded_total",
        "pgprism_pool_lends_total",
        "pgprism_sessions_active",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }

    // One PostgreSQL is the primary and the CDC source, another the mirror and the shadow.
    let primary = Instance::start(InstanceConfig {
        name: "dashboard-primary".into(),
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL");
    let other = Instance::start(InstanceConfig {
        name: "dashboard-mirror".into(),
        ..InstanceConfig::default()
    })
    .expect("start PostgreSQL");
    let sr = StarRocks::start("root", "pw");
    for inst in [&primary, &other] {
        inst.psql("CREATE TABLE t (id int PRIMARY KEY, v text)")
            .expect("create table");
    }
    sr.create_table(
        DB,
        "t",
        &["id"],
        &[("id", ColType::Int), ("v", ColType::Text)],
    );
    let (dir, config) = support::RunConfig::write(
        "dashboard",
        &format!(
            r#"
[primary]
url = "{primary}"
[[mirror]]
name = "copy"
url = "postgres://postgres@127.0.0.1:{other}/postgres"
[shadow]
url = "postgres://postgres@127.0.0.1:{other}/postgres"
[cdc]
source = "{primary}"
starrocks = "{starrocks}"
starrocks-query-port = {query}
database = "{DB}"
tables = ["t"]
flush-interval-ms = 100
"#,
            primary = primary.url(),
            other = other.port(),
            starrocks = sr.url(),
            query = sr.query.port(),
        ),
    );
    let run = support::RunConfig::start(dir, config);
    let mut client = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            run.listen.port()
        ),
        postgres::NoTls,
    )
    .expect("connect through pgprism");
    client
        .batch_execute("INSERT INTO t VALUES (1, 'a'); SELECT * FROM t")
        .unwrap();
    // A statement the mirror fails (42P01), for the series labelled by SQLSTATE: a write,
    // since a mirror takes only DDL and DML by default. (The INSERT into `t` above may fail
    // on the mirror or not: the mirror and the shadow share a server, and whichever of the
    // two runs it second gets 23505.)
    primary
        .psql("CREATE TABLE only_primary (id int)")
        .expect("create table");
    client
        .batch_execute("INSERT INTO only_primary VALUES (1)")
        .unwrap();

    // Mirror and compare sections appear once the shards have reported them.
    let mut metrics = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            metrics = support::http_get(run.admin, "/metrics").1;
            metrics.contains("# TYPE pgprism_mirror_lag_seconds_micro")
                && metrics.contains("# TYPE pgprism_compare_mismatch_kinds_total")
                && metrics.contains("pgprism_mirror_errors_by_sqlstate_total{")
        }),
        "no mirror or compare metrics:\n{metrics}"
    );
    let (code, cdc) = support::http_get(run.admin, "/cdc/metrics");
    assert_eq!(code, 200, "{cdc}");
    let mut names = exported(&metrics);
    names.extend(exported(&cdc));
    let missing: Vec<&String> = used.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics pgprism does not export: {missing:?}\nexported: {names:?}"
    );
    let mut labels = exported_labels(&metrics);
    labels.extend(exported_labels(&cdc));
    let (uses, mut problems) = label_uses(&dashboard());
    problems.extend(check_labels(&uses, &labels));
    // For the record (--no-capture): what was checked.
    let asked: usize = uses.values().map(|u| u.labels.len()).sum();
    eprintln!("{asked} label uses over {} metrics checked", uses.len());
    assert!(
        problems.is_empty(),
        "the dashboard asks for labels pgprism does not export:\n{}\n\n{metrics}\n{cdc}",
        problems.join("\n")
    );
}
