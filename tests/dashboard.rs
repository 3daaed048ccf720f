//! The Grafana dashboard (`contrib/grafana/pgprism.json`) queries only metrics pgprism
//! exports. The exported names come from a real `pgprism run` with every metrics section
//! present (proxy, a mirror, a compare shadow, CDC into the Stream Load emulator) scraping
//! `/metrics` and `/cdc/metrics`, so a renamed or removed metric fails here, not on a
//! dashboard in production.

#[path = "support/starrocks.rs"]
mod starrocks;
mod support;

use std::collections::BTreeSet;
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

    // Mirror and compare sections appear once the shards have reported them.
    let mut metrics = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            metrics = support::http_get(run.admin, "/metrics").1;
            metrics.contains("# TYPE pgprism_mirror_lag_seconds_micro")
                && metrics.contains("# TYPE pgprism_compare_mismatch_kinds_total")
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
}
