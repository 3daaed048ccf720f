//! Compare mode against real PostgreSQL servers: a primary and a shadow seeded the same, then
//! made to differ on purpose.

mod support;

use std::time::Duration;

use pgprism::embed::Instance;
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use support::{Pair, Proxy, eventually, start_primary};

fn pair(name: &str) -> Pair {
    Pair::new(
        start_primary(&format!("{name}p")),
        start_primary(&format!("{name}s")),
    )
}

/// What only this file's tests ask of a pair.
impl Pair {
    /// Waits for a report about `statement`.
    fn report_for(&self, statement: &str) -> sonic_rs::Value {
        let mut found = None;
        eventually(Duration::from_secs(10), || {
            found = self
                .reports()
                .into_iter()
                .find(|r| r["statement"].as_str() == Some(statement));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no report for {statement:?}; reports: {:?}",
                std::fs::read_to_string(&self.report).unwrap_or_default()
            )
        })
    }

    /// A session on the shadow itself, past pgprism.
    fn shadow_session(&self) -> postgres::Client {
        postgres::Client::connect(&self.shadow.url(), postgres::NoTls)
            .expect("connect to the shadow")
    }

    /// A shadow session holding `table` locked (ACCESS EXCLUSIVE, in an open transaction): the
    /// shadow's side of any statement reading it waits until that session's ROLLBACK.
    fn lock_on_the_shadow(&self, table: &str) -> postgres::Client {
        let mut blocker = self.shadow_session();
        blocker
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .expect("lock the table on the shadow");
        blocker
    }

    fn reported(&self, statement: &str) -> bool {
        self.reports()
            .iter()
            .any(|r| r["statement"].as_str() == Some(statement))
    }
}

fn kinds(report: &sonic_rs::Value) -> Vec<String> {
    report["kinds"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn description(report: &sonic_rs::Value) -> String {
    report["description"].as_str().unwrap_or("").to_string()
}

/// Bound on what a loaded test machine may take for what takes a second alone (a slow
/// statement's runs and EXPLAINs); spent in full only by a test that fails.
const LOADED: Duration = Duration::from_secs(60);

/// Waits until every shard reported a counter at least `min`.
fn counter_reaches(proxy: &Proxy, name: &str, min: u64) -> bool {
    eventually(Duration::from_secs(10), || proxy.metric(name) >= min)
}

const SEED: &str = "
    CREATE TABLE miss (id int PRIMARY KEY, v text);
    INSERT INTO miss SELECT g, 'v' || g FROM generate_series(1, 5) g;
    CREATE TABLE chg (id int PRIMARY KEY, v text);
    INSERT INTO chg SELECT g, 'v' || g FROM generate_series(1, 5) g;
    CREATE TABLE tagt (id int PRIMARY KEY, v text);
    INSERT INTO tagt SELECT g, 'v' || g FROM generate_series(1, 5) g;
    CREATE TABLE ign (id int PRIMARY KEY, updated_at text);
    CREATE TABLE fl (id int PRIMARY KEY, x float8);
";

#[test]
fn differences_are_caught_and_described() {
    let p = pair("diff");
    p.both(SEED);
    // Made to differ: the shadow lost a row, changed a value, has an extra column, a wider
    // type, fewer rows to update, no table at all, and the other order under ORDER BY.
    p.shadow.psql("DELETE FROM miss WHERE id = 3").unwrap();
    p.shadow
        .psql("UPDATE chg SET v = 'changed' WHERE id = 2")
        .unwrap();
    p.primary
        .psql("CREATE TABLE extra (id int, v text); INSERT INTO extra VALUES (1, 'a')")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE extra (id int, v text, z int); INSERT INTO extra VALUES (1, 'a', 7)")
        .unwrap();
    p.primary
        .psql("CREATE TABLE typ (id int, v int); INSERT INTO typ VALUES (1, 10)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE typ (id int, v bigint); INSERT INTO typ VALUES (1, 10)")
        .unwrap();
    p.shadow.psql("DELETE FROM tagt WHERE id = 5").unwrap();
    p.primary
        .psql("CREATE TABLE only_p (id int); INSERT INTO only_p VALUES (1)")
        .unwrap();
    p.primary.psql("CREATE TABLE ord (id int, k int); INSERT INTO ord SELECT g, g FROM generate_series(1, 6) g").unwrap();
    p.shadow.psql("CREATE TABLE ord (id int, k int); INSERT INTO ord SELECT g, -g FROM generate_series(1, 6) g").unwrap();
    // And made to differ where it must not be reported: physical order, float noise,
    // ignored columns, declared type equivalence.
    p.primary
        .psql(
            "CREATE TABLE noord (id int); INSERT INTO noord SELECT g FROM generate_series(1, 50) g",
        )
        .unwrap();
    p.shadow.psql("CREATE TABLE noord (id int); INSERT INTO noord SELECT g FROM generate_series(50, 1, -1) g").unwrap();
    p.primary
        .psql("INSERT INTO fl VALUES (1, 1.0000001), (2, 2.5)")
        .unwrap();
    p.shadow
        .psql("INSERT INTO fl VALUES (1, 1.0000002), (2, 2.5)")
        .unwrap();
    p.primary
        .psql("INSERT INTO ign VALUES (1, 'monday'), (2, 'tuesday')")
        .unwrap();
    p.shadow
        .psql("INSERT INTO ign VALUES (1, 'friday'), (2, 'saturday')")
        .unwrap();
    p.primary
        .psql("CREATE TABLE eqv (id int, n int8); INSERT INTO eqv VALUES (1, 5), (2, -7)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE eqv (id int, n numeric); INSERT INTO eqv VALUES (1, 5.00), (2, -7)")
        .unwrap();

    let proxy = p.proxy(&[
        "--float-tolerance",
        "0.001",
        "--compare-ignore-column",
        "^updated_at$",
        "--type-equivalence",
        "int8=numeric",
    ]);
    let mut c = proxy.client();
    let caught = [
        (
            "SELECT * FROM miss",
            "row_count",
            vec!["primary 5 rows, shadow 4 rows", "(3, v3)"],
        ),
        (
            "SELECT * FROM chg",
            "values",
            vec!["row values differ", "changed"],
        ),
        (
            "SELECT * FROM extra",
            "columns",
            vec!["primary 2 (id, v), shadow 3 (id, v, z)"],
        ),
        (
            "SELECT * FROM typ",
            "column_types",
            vec!["column `v` type differs: primary int4, shadow int8"],
        ),
        (
            "UPDATE tagt SET v = v || '!'",
            "command_tag",
            vec!["primary `UPDATE 5`, shadow `UPDATE 4`"],
        ),
        (
            "SELECT * FROM only_p",
            "error",
            vec!["error on shadow only: 42P01"],
        ),
        (
            "SELECT id FROM ord ORDER BY k",
            "order",
            vec!["different order under ORDER BY"],
        ),
    ];
    for (sql, _, _) in &caught {
        // The client sees the primary's answer in report mode, whatever the shadow said.
        c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // The extended protocol is compared too.
    let rows = c
        .query("SELECT v FROM chg WHERE id = $1", &[&2i32])
        .unwrap();
    assert_eq!(
        rows[0].get::<_, String>(0),
        "v2",
        "report mode returns the primary's row"
    );
    let not_reported = [
        "SELECT * FROM noord",
        "SELECT * FROM fl",
        "SELECT * FROM ign",
        "SELECT * FROM eqv",
        "SELECT now(), * FROM chg",
        "SELECT id FROM noord ORDER BY id",
    ];
    for sql in &not_reported {
        c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    for (sql, kind, words) in &caught {
        let report = p.report_for(sql);
        assert!(
            kinds(&report).iter().any(|k| k == kind),
            "{sql}: expected kind {kind}, got {report:?}"
        );
        let text = format!(
            "{} {}",
            description(&report),
            sonic_rs::to_string(&report).unwrap()
        );
        for w in words {
            assert!(text.contains(w), "{sql}: expected {w:?} in {text}");
        }
    }
    let extended = p.report_for("SELECT v FROM chg WHERE id = $1");
    assert_eq!(kinds(&extended), vec!["values"], "{extended:?}");
    // Barrier before the absences: end the session and wait until it is counted closed.
    // A session ends only after its downstream pump has read the shadow to its end and
    // judged every statement (src/proxy/session.rs), and the shard report counting the close
    // also counts every mismatch of the session. Each mismatch sends exactly one report
    // (`judge` in src/compare/exchange.rs), so 8 mismatches with the 8 reports above found
    // leaves no room for a report about anything else.
    drop(c);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    assert!(proxy.metric("pgprism_compare_statements_total") >= 13);
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        8,
        "{:?}",
        p.reports()
    );
    for sql in &not_reported {
        assert!(
            !p.reported(sql),
            "{sql} must not be reported: {:?}",
            p.reports()
        );
    }
    // /status groups by fingerprint, with examples.
    let (code, body) = proxy.admin_get("/status");
    assert_eq!(code, 200);
    let status: sonic_rs::Value = sonic_rs::from_str(&body).unwrap();
    let groups = status["compare"]["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 8, "{body}");
    let chg = groups
        .iter()
        .find(|g| g["statement"].as_str() == Some("select * from chg"))
        .expect("chg group");
    assert_eq!(chg["count"].as_u64(), Some(1));
    assert_eq!(chg["examples"].as_array().map(|a| a.len()), Some(1));
    let metrics = proxy.admin_get("/metrics").1;
    assert!(
        metrics.contains("pgprism_compare_mismatch_kinds_total{kind=\"values\"} 2"),
        "{metrics}"
    );
}

#[test]
fn fail_on_differences_gives_xx000_and_report_mode_gives_the_primary_result() {
    let p = pair("fail");
    p.both(SEED);
    p.shadow
        .psql("UPDATE chg SET v = 'changed' WHERE id = 2")
        .unwrap();
    let strict = p.proxy(&["--fail-on-differences"]);
    let mut c = strict.client();
    let err = c.simple_query("SELECT * FROM chg").unwrap_err();
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "XX000");
    assert!(
        db.message()
            .starts_with("Query results differ between primary and shadow: row values differ"),
        "{}",
        db.message()
    );
    let detail = db.detail().unwrap_or("");
    assert!(detail.contains("statement: SELECT * FROM chg"), "{detail}");
    // Extended protocol too, and the session stays usable afterwards.
    let err = c
        .query("SELECT v FROM chg WHERE id = $1", &[&2i32])
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("XX000"));
    let rows = c
        .query("SELECT v FROM chg WHERE id = $1", &[&1i32])
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "v1");
    // Inside a transaction: the failed statement is reported and the transaction goes on.
    let mut tx = c.transaction().unwrap();
    tx.execute("INSERT INTO miss VALUES (100, 'x')", &[])
        .unwrap();
    assert!(tx.simple_query("SELECT * FROM chg").is_err());
    drop(tx);
    drop(c);
    drop(strict);

    // Above the buffering bound the statement streams, with a warning, and is only reported.
    let bounded = p.proxy(&["--fail-on-differences", "--compare-buffer-bytes", "1024"]);
    let mut c = bounded.client();
    p.both("CREATE TABLE wide AS SELECT g AS id, repeat('w', 100) AS pad FROM generate_series(1, 200) g");
    p.shadow
        .psql("UPDATE wide SET pad = 'x' WHERE id = 150")
        .unwrap();
    let msgs = c
        .simple_query("SELECT * FROM wide")
        .expect("falls back to report mode");
    let rows = msgs
        .iter()
        .filter(|m| matches!(m, postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 200);
    let report = p.report_for("SELECT * FROM wide");
    assert_eq!(report["fallback_to_report"].as_bool(), Some(true));
    assert_eq!(report["client_failed"].as_bool(), Some(false));
    assert!(counter_reaches(
        &bounded,
        "pgprism_compare_fallbacks_total",
        1
    ));
    // Small results are still held and judged in the same session.
    assert!(c.simple_query("SELECT * FROM chg").is_err());
    drop(c);
    drop(bounded);

    let lenient = p.proxy(&[]);
    let mut c = lenient.client();
    let rows = c.query("SELECT id, v FROM chg ORDER BY id", &[]).unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get::<_, String>(1)).collect();
    assert_eq!(got, vec!["v1", "v2", "v3", "v4", "v5"]);
    assert!(counter_reaches(
        &lenient,
        "pgprism_compare_mismatches_total",
        1
    ));
}

#[test]
fn source_of_truth_shadow_returns_the_shadow_results() {
    let p = pair("sot");
    p.both(SEED);
    p.shadow
        .psql("UPDATE chg SET v = 'shadow-value' WHERE id = 2")
        .unwrap();
    let proxy = p.proxy(&["--source-of-truth", "shadow"]);
    let mut c = proxy.client();
    let rows = c
        .query("SELECT v FROM chg WHERE id = $1", &[&2i32])
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "shadow-value");
    let msgs = c.simple_query("SELECT v FROM chg WHERE id = 2").unwrap();
    let value = msgs.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("shadow-value"));
    // Writes still reach both.
    c.execute("INSERT INTO miss VALUES (42, 'both')", &[])
        .unwrap();
    for inst in [&p.primary, &p.shadow] {
        assert_eq!(
            inst.psql("SELECT v FROM miss WHERE id = 42")
                .unwrap()
                .trim(),
            "both"
        );
    }
    let report = p.report_for("SELECT v FROM chg WHERE id = $1");
    assert_eq!(kinds(&report), vec!["values"]);
}

#[test]
fn divergence_in_a_transaction_is_reported_once_and_resynced() {
    let p = pair("div");
    p.both(SEED);
    p.primary.psql("CREATE TABLE only_p (id int)").unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute("INSERT INTO only_p VALUES (1)").unwrap();
    for i in 0..20 {
        c.simple_query(&format!("SELECT * FROM chg WHERE id = {}", i % 5))
            .unwrap();
    }
    c.batch_execute("COMMIT").unwrap();
    // Back in step: a later difference is caught again.
    p.shadow
        .psql("UPDATE chg SET v = 'changed' WHERE id = 2")
        .unwrap();
    c.simple_query("SELECT * FROM chg").unwrap();
    let report = p.report_for("SELECT * FROM chg");
    assert_eq!(kinds(&report), vec!["values"]);
    let first = p.report_for("INSERT INTO only_p VALUES (1)");
    assert_eq!(kinds(&first), vec!["error"]);
    // No wait needed for the absences: the report of the session's last statement is in.
    // One session's sync points are judged in order, their reports go over one FIFO ring
    // and the control thread writes them in that order (src/compare/exchange.rs `settle`,
    // src/control/mod.rs `collect_compare`), so every report of the 20 skipped statements
    // would be in the file before it.
    assert_eq!(p.reports().len(), 2, "{:?}", p.reports());
    // The shard report counting the last mismatch counts the earlier skips too.
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_mismatches_total",
        2
    ));
    assert!(proxy.metric("pgprism_compare_skipped_total") >= 20);
}

#[test]
fn slow_statement_on_the_shadow_gets_both_plans() {
    let p = pair("slow");
    p.both(
        "CREATE TABLE big (id int, k int, pad text);
         INSERT INTO big SELECT g, g, repeat('x', 40) FROM generate_series(1, 300000) g;
         ANALYZE big;",
    );
    p.primary.psql("CREATE INDEX big_k ON big (k)").unwrap();
    let proxy = p.proxy(&["--slow-query-ratio", "3", "--slow-query-min-ms", "1"]);
    let mut c = proxy.client();
    let sql = "SELECT id FROM big WHERE k = 123456";
    // A single run can miss the ratio on a busy machine (the primary's lookup waits for a
    // core as long as the shadow's scan): run again until one is judged slow, within a
    // deadline a loaded machine does not reach. Each run is waited for until it is counted as
    // compared, then its verdict is read.
    let deadline = std::time::Instant::now() + LOADED;
    let mut run = 0;
    while proxy.metric("pgprism_compare_slow_total") == 0 && std::time::Instant::now() < deadline {
        run += 1;
        c.simple_query(sql).unwrap();
        assert!(
            eventually(LOADED, || proxy.metric("pgprism_compare_statements_total")
                >= run),
            "run {run} was never compared"
        );
        // Bumped in the same verdict as the comparison count (`judge` in
        // src/compare/exchange.rs), so the report that counts this run shows it.
    }
    assert!(
        proxy.metric("pgprism_compare_slow_total") > 0,
        "none of {run} runs was judged slow"
    );
    // The slow report follows its EXPLAIN runs.
    let mut report = None;
    eventually(LOADED, || {
        report = p
            .reports()
            .into_iter()
            .find(|r| r["record"].as_str() == Some("slow"));
        report.is_some()
    });
    let report = report.unwrap_or_else(|| panic!("no slow report: {:?}", p.reports()));
    assert_eq!(report["statement"].as_str(), Some(sql));
    let primary_plan = report["primary"]["plan"].as_str().unwrap_or("");
    let shadow_plan = report["shadow"]["plan"].as_str().unwrap_or("");
    assert!(
        primary_plan.contains("Index"),
        "primary plan: {primary_plan}"
    );
    assert!(
        shadow_plan.contains("Seq Scan"),
        "shadow plan: {shadow_plan}"
    );
    assert!(
        shadow_plan.contains("Buffers"),
        "shadow plan: {shadow_plan}"
    );
    assert!(report["shadow_us"].as_u64() > report["primary_us"].as_u64());
    drop(c);
    drop(proxy);
    // fail-on-slow-queries: the slow statement fails like a difference.
    let strict = p.proxy(&[
        "--fail-on-differences",
        "--fail-on-slow-queries",
        "--slow-query-ratio",
        "3",
        "--slow-query-min-ms",
        "1",
    ]);
    let mut c = strict.client();
    let err = c.simple_query(sql).unwrap_err();
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "XX000");
    assert!(db.message().contains("shadow took"), "{}", db.message());
}

/// One client's share of the zero-mismatch workload: reads with and without ORDER BY,
/// writes, transactions (committed and rolled back), errors, prepared statements.
fn workload(conninfo: String, client: i32, statements: usize) -> usize {
    let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    let table = format!("w{client}");
    let get = c
        .prepare(&format!("SELECT id, v, f, n FROM {table} WHERE id = $1"))
        .unwrap();
    let upd = c
        .prepare(&format!("UPDATE {table} SET v = v + 1 WHERE id = $1"))
        .unwrap();
    let mut sent = 0;
    let mut i = 0i32;
    while sent < statements {
        i += 1;
        let id = i % 200;
        match i % 10 {
            0 => {
                let mut tx = c.transaction().unwrap();
                tx.execute(&upd, &[&id]).unwrap();
                tx.execute(
                    &format!(
                        "INSERT INTO {table} VALUES ($1, 0, 0.5, 3) ON CONFLICT (id) DO NOTHING"
                    ),
                    &[&(1000 + i)],
                )
                .unwrap();
                tx.commit().unwrap();
                sent += 4;
            }
            1 => {
                // An error on both sides, inside a transaction that is rolled back.
                let mut tx = c.transaction().unwrap();
                tx.execute(&upd, &[&id]).unwrap();
                assert!(tx.batch_execute("SELECT 1/0").is_err());
                drop(tx);
                sent += 4;
            }
            2 => {
                c.simple_query(&format!(
                    "SELECT id, v FROM {table} WHERE id < {} ORDER BY id DESC",
                    id + 20
                ))
                .unwrap();
                sent += 1;
            }
            3 => {
                c.simple_query(&format!(
                    "SELECT count(*), sum(v) FROM {table}; SELECT * FROM {table} WHERE id % 17 = 3"
                ))
                .unwrap();
                sent += 2;
            }
            4 => {
                assert!(
                    c.execute(&format!("INSERT INTO {table} VALUES (1, 0, 0, 0)"), &[])
                        .is_err()
                );
                sent += 1;
            }
            _ => {
                c.query(&get, &[&id]).unwrap();
                sent += 1;
            }
        }
    }
    sent
}

#[test]
fn identical_databases_and_ten_thousand_statements_give_zero_mismatches() {
    let p = pair("same");
    let mut seed = String::new();
    for t in 0..4 {
        seed.push_str(&format!(
            "CREATE TABLE w{t} (id int PRIMARY KEY, v int, f float8, n numeric);
             INSERT INTO w{t} SELECT g, g * 3, g / 7.0, g * 1.5 FROM generate_series(0, 299) g;"
        ));
    }
    p.both(&seed);
    let proxy = p.proxy(&[]);
    let conninfo = proxy.conninfo("postgres", None);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let conninfo = conninfo.clone();
            std::thread::spawn(move || workload(conninfo, t, 2500))
        })
        .collect();
    let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total >= 10_000);
    // Barrier before the absences: the four clients have left; wait until their sessions are
    // counted closed. A session ends only after its downstream pump has read the shadow to its
    // end and judged every statement (src/proxy/session.rs), and the shard report counting
    // the close also counts every mismatch of the session (each of which would send a report).
    assert!(
        counter_reaches(&proxy, "pgprism_sessions_closed_total", 4),
        "closed {}",
        proxy.metric("pgprism_sessions_closed_total")
    );
    assert!(
        proxy.metric("pgprism_compare_statements_total") >= 9_000,
        "compared {}",
        proxy.metric("pgprism_compare_statements_total")
    );
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "{:?}",
        p.reports().into_iter().take(5).collect::<Vec<_>>()
    );
    assert!(p.reports().is_empty());
    // Both databases really ran the writes (the shadow finishes what it was sent even after
    // the clients have left).
    for t in 0..4 {
        let q = format!("SELECT sum(v)::text || ':' || count(*) FROM w{t}");
        let want = p.primary.psql(&q).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || p.shadow.psql(&q).unwrap()
                == want),
            "w{t}: primary {want}, shadow {}",
            p.shadow.psql(&q).unwrap()
        );
    }
}

#[test]
fn primary_only_patterns_keep_statements_off_the_shadow() {
    let p = pair("route");
    p.both(SEED);
    let proxy = p.proxy(&["--compare-primary-only", "pg_catalog|/\\* primary \\*/"]);
    let mut c = proxy.client();
    // Catalog contents differ between any two servers; routed, they are never compared.
    c.simple_query("SELECT count(*) FROM pg_catalog.pg_stat_activity")
        .unwrap();
    c.execute("INSERT INTO miss VALUES (77, 'p') /* primary */", &[])
        .unwrap();
    // A prepared statement routed to the primary only, used again in later batches.
    let stmt = c
        .prepare("SELECT v FROM miss WHERE id = $1 /* primary */")
        .unwrap();
    for _ in 0..3 {
        let rows = c.query(&stmt, &[&77i32]).unwrap();
        assert_eq!(rows[0].get::<_, String>(0), "p");
    }
    // Everything else still runs on both and is compared.
    c.execute("INSERT INTO miss VALUES (78, 'both')", &[])
        .unwrap();
    c.simple_query("SELECT * FROM chg").unwrap();
    assert_eq!(
        p.primary
            .psql("SELECT count(*) FROM miss WHERE id = 77")
            .unwrap()
            .trim(),
        "1"
    );
    // The shadow runs one session's statements in order, so once it has the later row 78 it
    // would have row 77 too, had that INSERT been sent to it.
    assert!(eventually(Duration::from_secs(10), || p
        .shadow
        .psql("SELECT count(*) FROM miss WHERE id = 78")
        .unwrap()
        .trim()
        == "1"));
    assert_eq!(
        p.shadow
            .psql("SELECT count(*) FROM miss WHERE id = 77")
            .unwrap()
            .trim(),
        "0"
    );
    // Barrier before the absences: end the session and wait until it is counted closed. A
    // session ends only after its downstream pump has read the shadow to its end and judged
    // every statement (src/proxy/session.rs), and the shard report counting the close also
    // counts every mismatch of the session (each of which would send a report).
    drop(c);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    assert!(proxy.metric("pgprism_compare_statements_total") >= 2);
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "{:?}",
        p.reports()
    );
    assert!(p.reports().is_empty(), "{:?}", p.reports());
}

/// Drivers such as JDBC, pgx and rust-postgres describe a prepared statement once and then
/// send Bind/Execute without Describe, asking for binary results: those executions are still
/// checked against the statement's columns, and normalised with them.
#[test]
fn prepared_executions_without_describe_use_the_statements_columns() {
    let p = pair("prep");
    p.both(SEED);
    p.shadow
        .psql("UPDATE chg SET v = 'changed' WHERE id = 2")
        .unwrap();
    p.primary
        .psql("INSERT INTO ign VALUES (1, 'monday'), (2, 'tuesday')")
        .unwrap();
    p.shadow
        .psql("INSERT INTO ign VALUES (1, 'friday'), (2, 'saturday')")
        .unwrap();
    p.primary
        .psql("CREATE TABLE typ (id int, v int); INSERT INTO typ VALUES (1, 10)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE typ (id int, v bigint); INSERT INTO typ VALUES (1, 10)")
        .unwrap();
    p.primary
        .psql("CREATE TABLE eqv (id int, n int8); INSERT INTO eqv VALUES (1, 5), (2, -7), (3, 123456789012)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE eqv (id int, n numeric); INSERT INTO eqv VALUES (1, 5.00), (2, -7), (3, 123456789012.0)")
        .unwrap();
    p.primary
        .psql("CREATE TABLE eqx (id int, n int8); INSERT INTO eqx VALUES (1, 5)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE eqx (id int, n numeric); INSERT INTO eqx VALUES (1, 5.5)")
        .unwrap();
    let proxy = p.proxy(&[
        "--compare-ignore-column",
        "^updated_at$",
        "--type-equivalence",
        "int8=numeric",
    ]);
    let mut c = proxy.client();
    // Described in this order, so a digester that kept the last description (ign's, whose
    // second column is ignored) would hide chg's difference.
    let chg = c.prepare("SELECT id, v FROM chg ORDER BY id").unwrap();
    let ign = c
        .prepare("SELECT id, updated_at FROM ign ORDER BY id")
        .unwrap();
    let typ = c.prepare("SELECT id, v FROM typ").unwrap();
    let eqv = c.prepare("SELECT id, n FROM eqv ORDER BY id").unwrap();
    let eqx = c.prepare("SELECT id, n FROM eqx").unwrap();
    // SQL-level PREPARE/EXECUTE: the EXECUTE is compared as the statement it runs, here
    // under its ORDER BY.
    p.primary
        .psql("CREATE TABLE ordp (id int, k int); INSERT INTO ordp SELECT g, g FROM generate_series(1, 6) g")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE ordp (id int, k int); INSERT INTO ordp SELECT g, -g FROM generate_series(1, 6) g")
        .unwrap();
    c.simple_query("PREPARE o AS SELECT id FROM ordp ORDER BY k; EXECUTE o")
        .unwrap();
    for _ in 0..2 {
        let rows = c.query(&chg, &[]).unwrap();
        assert_eq!(rows[1].get::<_, String>(1), "v2", "the primary's rows");
        assert_eq!(c.query(&ign, &[]).unwrap().len(), 2);
        assert_eq!(c.query(&typ, &[]).unwrap()[0].get::<_, i32>(1), 10);
        assert_eq!(
            c.query(&eqv, &[]).unwrap()[2].get::<_, i64>(1),
            123456789012
        );
        assert_eq!(c.query(&eqx, &[]).unwrap()[0].get::<_, i64>(1), 5);
    }
    // A barrier: the last statement of the session, reported after everything before it.
    c.simple_query("SELECT * FROM chg WHERE id = 2").unwrap();
    p.report_for("SELECT * FROM chg WHERE id = 2");
    let reports = p.reports();
    let about = |sql: &str| -> Vec<&sonic_rs::Value> {
        reports
            .iter()
            .filter(|r| r["statement"].as_str() == Some(sql))
            .collect()
    };
    let chg_reports = about("SELECT id, v FROM chg ORDER BY id");
    assert_eq!(chg_reports.len(), 2, "{reports:?}");
    assert_eq!(
        kinds(chg_reports[0]),
        vec!["values"],
        "{:?}",
        chg_reports[0]
    );
    let columns = sonic_rs::to_string(&chg_reports[0]["primary"]["columns"]).unwrap();
    assert!(
        columns.contains("\"id\"") && columns.contains("\"v\""),
        "the statement's described columns are in the report: {columns}"
    );
    // Binary-format rows are shown as values, not bytes.
    let text = sonic_rs::to_string(&chg_reports[0]).unwrap();
    assert!(
        text.contains("(2, v2)") && text.contains("(2, changed)"),
        "{text}"
    );
    let typ_reports = about("SELECT id, v FROM typ");
    assert_eq!(typ_reports.len(), 2, "{reports:?}");
    assert!(
        description(typ_reports[0]).contains("column `v` type differs: primary int4, shadow int8"),
        "{:?}",
        typ_reports[0]
    );
    // Binary int8 5 and binary numeric 5.5 are different numbers.
    let eqx_reports = about("SELECT id, n FROM eqx");
    assert_eq!(eqx_reports.len(), 2, "{reports:?}");
    assert_eq!(
        kinds(eqx_reports[0]),
        vec!["values"],
        "{:?}",
        eqx_reports[0]
    );
    let order = about("EXECUTE o");
    assert_eq!(order.len(), 1, "{reports:?}");
    assert_eq!(kinds(order[0]), vec!["order"], "{:?}", order[0]);
    // Ignored columns and declared equivalences hold for binary results too.
    assert!(
        about("SELECT id, updated_at FROM ign ORDER BY id").is_empty(),
        "{reports:?}"
    );
    assert!(
        about("SELECT id, n FROM eqv ORDER BY id").is_empty(),
        "{reports:?}"
    );
}

/// Declared equivalences compare values by what they mean across types, in text and binary
/// formats: int4/int8, float4/float8 (0.1 as float4 is 0.1, not 0.10000000149), a timestamp
/// stored at 3 digits against one stored at 6 (rounded as PostgreSQL stores it),
/// timestamptz/timestamp, time(3)/time. Values that differ beyond that still differ.
#[test]
fn equivalent_types_compare_by_value_in_text_and_binary() {
    let p = pair("eqty");
    p.primary
        .psql(
            "CREATE TABLE eqt (id int, a int4, b float4, t timestamp(3), z timestamptz, m time(3));
             INSERT INTO eqt VALUES
               (1, 5, 0.1, '2024-01-01 10:00:00.1234', '2024-01-01 10:00:00+00', '10:00:00.1234'),
               (2, -7, 1e20, '1999-12-31 23:59:59.9996', '1999-12-31 23:59:59.5+00', '23:59:59.9994');
             CREATE TABLE eqd (id int, a int4, b float4, t timestamp(3), m time(3));
             INSERT INTO eqd VALUES (1, 5, 0.1, '2024-01-01 10:00:00.123', '10:00:00.123')",
        )
        .unwrap();
    p.shadow
        .psql(
            "CREATE TABLE eqt (id int, a int8, b float8, t timestamp, z timestamp, m time);
             INSERT INTO eqt VALUES
               (1, 5, 0.1, '2024-01-01 10:00:00.1234', '2024-01-01 10:00:00', '10:00:00.1234'),
               (2, -7, 1e20, '1999-12-31 23:59:59.9996', '1999-12-31 23:59:59.5', '23:59:59.9994');
             CREATE TABLE eqd (id int, a int8, b float8, t timestamp, m time);
             INSERT INTO eqd VALUES (1, 6, 0.2, '2024-01-01 10:00:00.1244', '10:00:00.1236')",
        )
        .unwrap();
    let proxy = p.proxy(&[
        "--type-equivalence",
        "int4=int8",
        "--type-equivalence",
        "float4=float8",
        "--type-equivalence",
        "timestamp(3)=timestamp",
        "--type-equivalence",
        "timestamptz=timestamp",
        "--type-equivalence",
        "time(3)=time",
    ]);
    let mut c = proxy.client();
    c.simple_query("SET TIME ZONE 'UTC'").unwrap();
    let same = "SELECT id, a, b, t, z, m FROM eqt ORDER BY id";
    let differ = [
        "SELECT id, a FROM eqd",
        "SELECT id, b FROM eqd",
        "SELECT id, t FROM eqd",
        "SELECT id, m FROM eqd",
    ];
    for sql in std::iter::once(&same).chain(&differ) {
        // Text (simple protocol), then binary (the postgres crate asks for binary results).
        c.simple_query(sql).unwrap();
        c.query(*sql, &[]).unwrap();
    }
    drop(c);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    eventually(Duration::from_secs(10), || p.reports().len() >= 8);
    let reports = p.reports();
    let about = |sql: &str| {
        reports
            .iter()
            .filter(|r| r["statement"].as_str() == Some(sql))
            .collect::<Vec<_>>()
    };
    assert!(about(same).is_empty(), "{:?}", about(same));
    for sql in differ {
        let found = about(sql);
        assert_eq!(found.len(), 2, "{sql}: {reports:?}");
        for r in found {
            assert_eq!(kinds(r), ["values"], "{r:?}");
            assert_eq!(r["verdict"].as_str(), Some("mismatch"), "{r:?}");
        }
    }
    assert_eq!(reports.len(), 8, "{reports:?}");
}

/// A precision declared on one type of a pair of two types brings the other type's values
/// to it: a timestamptz(3) column on the primary against a timestamp column on the shadow.
#[test]
fn a_precision_on_one_type_of_an_equivalence_rounds_the_other() {
    let p = pair("eqpr");
    p.primary
        .psql(
            "CREATE TABLE tp (id int, t timestamptz(3));
             INSERT INTO tp VALUES (1, '2024-01-01 10:00:00.1234+00'), (2, '2024-01-01 10:00:00.5+00')",
        )
        .unwrap();
    p.shadow
        .psql(
            "CREATE TABLE tp (id int, t timestamp);
             INSERT INTO tp VALUES (1, '2024-01-01 10:00:00.1234'), (2, '2024-01-01 10:00:00.5016')",
        )
        .unwrap();
    let proxy = p.proxy(&["--type-equivalence", "timestamptz(3)=timestamp"]);
    let mut c = proxy.client();
    c.simple_query("SET TIME ZONE 'UTC'").unwrap();
    let same = "SELECT id, t FROM tp WHERE id = 1";
    let differ = "SELECT id, t FROM tp WHERE id = 2";
    for sql in [same, differ] {
        c.simple_query(sql).unwrap();
        c.query(sql, &[]).unwrap();
    }
    drop(c);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    eventually(Duration::from_secs(10), || p.reports().len() >= 2);
    let reports = p.reports();
    assert!(!p.reported(same), "{reports:?}");
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in &reports {
        assert_eq!(r["statement"].as_str(), Some(differ), "{r:?}");
        assert_eq!(kinds(r), ["values"], "{r:?}");
    }
}

/// A shadow that stops answering (here: blocked on a lock) must not hold the client in
/// fail-on-differences mode: after compare.shadow-timeout-ms the session stops comparing and
/// the client gets the primary's answer.
#[test]
fn a_shadow_that_falls_behind_stops_comparing_instead_of_holding_the_client() {
    let p = pair("lag");
    p.both("CREATE TABLE slow (id int); INSERT INTO slow VALUES (1)");
    let proxy = p.proxy(&[
        "--fail-on-differences",
        "--compare-shadow-timeout-ms",
        "300",
    ]);
    let mut blocker = p.lock_on_the_shadow("slow");
    let conninfo = proxy.conninfo("postgres", None);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        let first = c.query("SELECT id FROM slow", &[]).map(|r| r.len());
        let second = c.simple_query("SELECT 2").map(|r| r.len());
        let _ = tx.send((first.map_err(|e| e.to_string()), second.is_ok()));
    });
    // Bounded: without the timeout the client would wait for the shadow forever.
    let (first, second) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the client got its answer although the shadow is blocked");
    assert_eq!(first, Ok(1));
    assert!(second, "the session goes on without comparing");
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_shadow_timeouts_total",
        1
    ));
    blocker.batch_execute("ROLLBACK").unwrap();
    // A new session compares again.
    let mut c = proxy.client();
    c.simple_query("SELECT id FROM slow").unwrap();
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_statements_total",
        1
    ));
}

/// A pair whose shadow holds table `slow` locked, a proxy with `--compare-shadow-timeout-ms
/// timeout_ms`, and a client that read `SELECT id FROM slow` (the primary's answer, without
/// waiting for the shadow) and left at once, the shadow still owing its answer. Returns the
/// pair, the proxy and the shadow session holding the lock.
fn a_client_leaves_the_shadow_owing(
    name: &str,
    timeout_ms: &str,
) -> (Pair, Proxy, postgres::Client) {
    let p = pair(name);
    p.both("CREATE TABLE slow (id int); INSERT INTO slow VALUES (1)");
    let proxy = p.proxy(&["--compare-shadow-timeout-ms", timeout_ms]);
    let blocker = p.lock_on_the_shadow("slow");
    let mut c = proxy.client();
    let rows = c.simple_query("SELECT id FROM slow").unwrap();
    let rows = rows
        .iter()
        .filter(|m| matches!(m, postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(
        rows, 1,
        "the primary's answer, without waiting for the shadow"
    );
    (p, proxy, blocker)
}

/// A client that leaves while the shadow still owes answers: the shadow gets
/// compare.shadow-timeout-ms to give them, as while the client was there (not a fixed drain
/// of its own), and a shadow given up on then is counted as a timeout, its statements as
/// skipped because the shadow was gone.
#[test]
fn a_shadow_that_falls_behind_after_the_client_left_is_given_up_at_the_shadow_timeout() {
    let (_p, proxy, mut blocker) = a_client_leaves_the_shadow_owing("drain", "300");
    assert!(
        counter_reaches(&proxy, "pgprism_compare_shadow_timeouts_total", 1),
        "the shadow given up on after the client left is counted as a timeout"
    );
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_skipped_shadow_gone_total",
        1
    ));
    assert_eq!(proxy.metric("pgprism_compare_skipped_total"), 1);
    assert_eq!(proxy.metric("pgprism_compare_statements_total"), 0);
    blocker.batch_execute("ROLLBACK").unwrap();
}

/// A shadow connection that fails after the client left, while it still owes answers: its
/// statements are skipped and the session is counted as one whose shadow was lost.
#[test]
fn a_shadow_lost_after_the_client_left_is_counted() {
    let (p, proxy, mut blocker) = a_client_leaves_the_shadow_owing("drainlost", "60000");
    let mut observer = p.shadow_session();
    // pgprism's shadow connection, blocked behind the lock: ended under it.
    let terminated = eventually(Duration::from_secs(10), || {
        let row = observer
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap();
        row.get::<_, i64>(0) > 0
    });
    assert!(terminated, "the shadow's statement waited on the lock");
    assert!(
        counter_reaches(&proxy, "pgprism_compare_shadow_lost_total", 1),
        "the lost shadow is counted"
    );
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_skipped_shadow_gone_total",
        1
    ));
    assert_eq!(proxy.metric("pgprism_compare_shadow_timeouts_total"), 0);
    assert_eq!(proxy.metric("pgprism_compare_statements_total"), 0);
    blocker.batch_execute("ROLLBACK").unwrap();
}

/// Waits until `sessions` sessions were counted closed (each was judged whole by then), then
/// asserts no mismatch was counted.
fn assert_no_mismatch_once_closed(p: &Pair, proxy: &Proxy, sessions: u64) {
    assert!(counter_reaches(
        proxy,
        "pgprism_sessions_closed_total",
        sessions
    ));
    assert_eq!(
        proxy.metric("pgprism_compare_mismatches_total"),
        0,
        "{:?}",
        p.reports()
    );
}

/// Parse (unnamed), Bind (unnamed portal), Execute: one extended-protocol statement without
/// its Sync.
fn raw_extended(sql: &str) -> Vec<u8> {
    use support::raw::message;
    let mut parse = Vec::new();
    parse.extend_from_slice(sql.as_bytes());
    let mut out = message(b'P', &[&[0u8][..], &parse, &[0, 0, 0]].concat());
    // Bind: portal "", statement "", no formats, no parameters, no result formats.
    out.extend(message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    // Execute: portal "", no row limit.
    out.extend(message(b'E', &[0, 0, 0, 0, 0]));
    out
}

/// An extended batch is held for the shadow until its Sync only up to
/// compare.shadow-batch-bytes-max: a longer pipeline goes to the shadow as it comes (and is
/// still compared), and one routed to the primary only stops being held.
#[test]
fn a_long_pipelined_batch_is_bounded_before_its_sync() {
    use std::io::Write;
    use support::raw::{message, read_until_ready};
    let p = pair("bbat");
    p.primary
        .psql("CREATE TABLE bb (id int, v text); INSERT INTO bb SELECT g, 'v' || g FROM generate_series(1, 300) g")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE bb (id int, v text); INSERT INTO bb SELECT g, 'v' || g FROM generate_series(1, 300) g; UPDATE bb SET v = 'changed' WHERE id = 250")
        .unwrap();
    let proxy = p.proxy(&["--compare-batch-bytes", "2048"]);
    let mut s = support::raw::connect_ready(proxy.listen);
    // 300 statements in one batch, written in parts before the Sync.
    let statements: Vec<Vec<u8>> = (1..=300)
        .map(|i| raw_extended(&format!("SELECT v FROM bb WHERE id = {i}")))
        .collect();
    for part in statements.chunks(50) {
        s.write_all(&part.concat()).unwrap();
        s.flush().unwrap();
    }
    // Past the bound the batch is not held for its Sync: the shadow runs its last statement
    // before the client has synced.
    let ran = || {
        p.shadow
            .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT v FROM bb WHERE id = 300'")
            .unwrap()
            .trim()
            == "1"
    };
    assert!(
        eventually(Duration::from_secs(10), ran),
        "the shadow ran the batch before its Sync"
    );
    s.write_all(&message(b'S', &[])).unwrap();
    let answers = read_until_ready(&mut s);
    let rows = answers.iter().filter(|m| m.0 == b'D').count();
    assert_eq!(rows, 300, "every row reached the client");
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_batches_released_total",
        1
    ));
    // Still compared: the one row the shadow changed is reported.
    p.report_for("SELECT v FROM bb WHERE id = 250");
    assert_eq!(proxy.metric("pgprism_compare_batches_released_total"), 1);
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_mismatches_total",
        1
    ));
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 1);
    // The session goes on in step: a statement after the batch compares.
    support::raw::query(&mut s, "SELECT v FROM bb WHERE id = 250 ORDER BY 1");
    p.report_for("SELECT v FROM bb WHERE id = 250 ORDER BY 1");
    drop(s);
    drop(proxy);

    // Routed to the primary only by its first statement: past the bound, nothing more of it
    // is held, and the shadow never runs it.
    let proxy = p.proxy(&[
        "--compare-batch-bytes",
        "2048",
        "--compare-primary-only",
        "pg_catalog",
    ]);
    let mut s = support::raw::connect_ready(proxy.listen);
    s.write_all(&raw_extended(
        "SELECT count(*) > 0 FROM pg_catalog.pg_class",
    ))
    .unwrap();
    let statements: Vec<Vec<u8>> = (1..=300)
        .map(|i| raw_extended(&format!("SELECT v, {i} FROM bb WHERE id = {i}")))
        .collect();
    for part in statements.chunks(50) {
        s.write_all(&part.concat()).unwrap();
        s.flush().unwrap();
    }
    s.write_all(&message(b'S', &[])).unwrap();
    let answers = read_until_ready(&mut s);
    assert_eq!(answers.iter().filter(|m| m.0 == b'D').count(), 301);
    support::raw::query(&mut s, "SELECT v, 0 FROM bb WHERE id = 250");
    p.report_for("SELECT v, 0 FROM bb WHERE id = 250");
    assert!(!p.reported("SELECT v, 250 FROM bb WHERE id = 250"));
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_batches_released_total",
        1
    ));
}

/// A batch already sent to the shadow (past the bound) that then names a statement routed
/// to the primary only fails closed: the shadow never runs it nor what follows, and the
/// batch is not compared.
#[test]
fn a_released_batch_never_sends_primary_only_statements_to_the_shadow() {
    use std::io::Write;
    use support::raw::{message, read_until_ready};
    let p = pair("bcut");
    p.both("CREATE TABLE bb (id int, v text); INSERT INTO bb SELECT g, 'v' || g FROM generate_series(1, 300) g; CREATE TABLE log (n int)");
    let proxy = p.proxy(&[
        "--compare-batch-bytes",
        "2048",
        "--compare-primary-only",
        "pg_catalog",
    ]);
    let mut s = support::raw::connect_ready(proxy.listen);
    let mut batch: Vec<Vec<u8>> = (1..=100)
        .map(|i| raw_extended(&format!("SELECT v FROM bb WHERE id = {i}")))
        .collect();
    batch.push(raw_extended(
        "INSERT INTO log SELECT 1 FROM pg_catalog.pg_class LIMIT 1",
    ));
    batch.push(raw_extended("INSERT INTO log VALUES (2)"));
    for part in batch.chunks(20) {
        s.write_all(&part.concat()).unwrap();
        s.flush().unwrap();
    }
    s.write_all(&message(b'S', &[])).unwrap();
    let answers = read_until_ready(&mut s);
    assert_eq!(answers.iter().filter(|m| m.0 == b'D').count(), 100);
    assert!(!answers.iter().any(|m| m.0 == b'E'), "{answers:?}");
    // The session goes on in step with the shadow.
    support::raw::query(&mut s, "SELECT count(*) FROM bb");
    drop(s);
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_batches_cut_total",
        1
    ));
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    assert_eq!(
        p.primary.psql("SELECT count(*) FROM log").unwrap().trim(),
        "2"
    );
    assert_eq!(
        p.shadow.psql("SELECT count(*) FROM log").unwrap().trim(),
        "0"
    );
    assert!(p.reports().is_empty(), "{:?}", p.reports());
}

/// COPY both ways (extended and simple protocol) and FunctionCall are compared: the same
/// data agrees, divergent data is a mismatch.
#[test]
fn copy_both_ways_and_function_calls_are_compared() {
    use std::io::{Read, Write};
    use support::raw::{message, read_message, read_until_ready};
    let p = pair("cpfn");
    p.both(
        "CREATE TABLE cin (id int, v text);
         CREATE TABLE cout (id int, v text); INSERT INTO cout VALUES (1, 'a'), (2, 'b');
         CREATE TABLE coutd (id int, v text); INSERT INTO coutd VALUES (1, 'a'), (2, 'b')",
    );
    // The shadow refuses a row the primary takes, and holds another value.
    p.primary
        .psql("CREATE TABLE cdiv (id int, v text)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE cdiv (id int CHECK (id < 2), v text); UPDATE coutd SET v = 'changed' WHERE id = 2")
        .unwrap();
    p.primary
        .psql("ALTER DATABASE postgres SET pgprism.same = 'x'; ALTER DATABASE postgres SET pgprism.side = 'primary'")
        .unwrap();
    p.shadow
        .psql("ALTER DATABASE postgres SET pgprism.same = 'x'; ALTER DATABASE postgres SET pgprism.side = 'shadow'")
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    // Extended protocol (the postgres crate).
    for table in ["cin", "cdiv"] {
        let mut w = c.copy_in(&format!("COPY {table} FROM STDIN")).unwrap();
        w.write_all(b"1\ta\n2\tb\n").unwrap();
        assert_eq!(w.finish().unwrap(), 2, "the primary's count");
    }
    for table in ["cout", "coutd"] {
        let mut text = String::new();
        c.copy_out(&format!("COPY {table} TO STDOUT"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "1\ta\n2\tb\n", "the primary's rows");
    }
    drop(c);
    // Simple protocol, and FunctionCall, over a raw connection.
    let mut s = support::raw::connect_ready(proxy.listen);
    for table in ["cin", "cdiv"] {
        let sql = format!("COPY {table} (id, v) FROM STDIN\0");
        s.write_all(&message(b'Q', sql.as_bytes())).unwrap();
        assert_eq!(read_message(&mut s).map(|m| m.0), Some(b'G'));
        s.write_all(&message(b'd', b"1\ta\n2\tb\n")).unwrap();
        s.write_all(&message(b'c', &[])).unwrap();
        let answer = read_until_ready(&mut s);
        assert!(answer.iter().any(|m| m.0 == b'C'), "{answer:?}");
    }
    for table in ["cout", "coutd"] {
        let answer = support::raw::query(&mut s, &format!("COPY {table} (id, v) TO STDOUT"));
        assert_eq!(answer.iter().filter(|m| m.0 == b'd').count(), 2);
    }
    let oid: u32 = p
        .primary
        .psql("SELECT 'current_setting(text)'::regprocedure::oid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for setting in ["pgprism.same", "pgprism.side"] {
        // FunctionCall: the function's OID, one text argument, a text result.
        let mut body = oid.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 1, 0, 0, 0, 1]);
        body.extend_from_slice(&(setting.len() as i32).to_be_bytes());
        body.extend_from_slice(setting.as_bytes());
        body.extend_from_slice(&[0, 0]);
        s.write_all(&message(b'F', &body)).unwrap();
        let answer = read_until_ready(&mut s);
        assert!(answer.iter().any(|m| m.0 == b'V'), "{answer:?}");
    }
    support::raw::query(&mut s, "SELECT 1");
    drop(s);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 2));
    eventually(Duration::from_secs(10), || p.reports().len() >= 5);
    let reports = p.reports();
    let about = |sql: &str| {
        reports
            .iter()
            .filter(|r| r["statement"].as_str() == Some(sql))
            .collect::<Vec<_>>()
    };
    for sql in [
        "COPY cin FROM STDIN",
        "COPY cout TO STDOUT",
        "COPY cin (id, v) FROM STDIN",
        "COPY cout (id, v) TO STDOUT",
    ] {
        assert!(about(sql).is_empty(), "{sql}: {:?}", about(sql));
    }
    for (sql, kind) in [
        ("COPY cdiv FROM STDIN", "error"),
        ("COPY cdiv (id, v) FROM STDIN", "error"),
        ("COPY coutd TO STDOUT", "values"),
        ("COPY coutd (id, v) TO STDOUT", "values"),
    ] {
        let found = about(sql);
        assert_eq!(found.len(), 1, "{sql}: {reports:?}");
        assert_eq!(kinds(found[0]), [kind], "{:?}", found[0]);
        assert_eq!(
            found[0]["verdict"].as_str(),
            Some("mismatch"),
            "{:?}",
            found[0]
        );
    }
    // The FunctionCall whose value differs, and only it.
    let calls: Vec<_> = reports
        .iter()
        .filter(|r| r["primary"]["tag"].as_str() == Some("FUNCTION CALL"))
        .collect();
    assert_eq!(calls.len(), 1, "{reports:?}");
    let text = sonic_rs::to_string(calls[0]).unwrap();
    assert!(
        text.contains("(primary)") && text.contains("(shadow)"),
        "{text}"
    );
    assert_eq!(kinds(calls[0]), ["values"], "{text}");
    assert_eq!(reports.len(), 5, "{reports:?}");
}

#[test]
fn fail_mode_never_holds_what_the_client_waits_for_copy_flush_and_notifications() {
    use std::io::Write;
    let p = pair("fw");
    p.both("CREATE TABLE cp (a int)");
    let proxy = p.proxy(&["--fail-on-differences"]);
    let mut c = proxy.client();
    // COPY FROM STDIN through the extended protocol (Bind/Execute/Sync, data, CopyDone/Sync):
    // the client waits for CopyInResponse before it sends any data.
    let mut w = c.copy_in("COPY cp FROM STDIN").unwrap();
    w.write_all(b"1\n2\n3\n").unwrap();
    assert_eq!(w.finish().unwrap(), 3);
    // The Sync the servers ignored during that COPY does not shift the pairing: an excluded
    // statement stays excluded (it would fail with XX000 if judged as another).
    c.query("SELECT now(), clock_timestamp()", &[]).unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM cp", &[]).unwrap().get(0);
    assert_eq!(n, 3);
    // Execute then Flush, no Sync: the rows come before the client syncs.
    let mut s = support::raw::connect_ready(proxy.listen);
    let mut batch = raw_extended("SELECT a FROM cp ORDER BY a");
    batch.extend(support::raw::message(b'H', &[]));
    s.write_all(&batch).unwrap();
    let mut tags = Vec::new();
    while let Some((tag, _)) = support::raw::read_message(&mut s) {
        tags.push(tag);
        if tag == b'C' {
            break;
        }
    }
    assert_eq!(tags, b"12DDDC".to_vec(), "answers before Sync");
    s.write_all(&support::raw::message(b'S', &[])).unwrap();
    assert_eq!(support::raw::read_message(&mut s).map(|m| m.0), Some(b'Z'));
    // A notification reaches an idle listener without waiting for its next statement.
    s.write_all(&support::raw::message(b'Q', b"LISTEN ch\0"))
        .unwrap();
    let answered = support::raw::read_until_ready(&mut s);
    assert_eq!(answered.last().map(|m| m.0), Some(b'Z'));
    p.primary.psql("NOTIFY ch, 'hi'").unwrap();
    let (tag, body) = support::raw::read_message(&mut s).expect("a notification");
    assert_eq!(tag, b'A');
    assert!(body.ends_with(b"ch\0hi\0"), "{body:?}");
    // Nothing of this is a difference (both sessions closed, so every statement was judged).
    drop(c);
    drop(s);
    assert_no_mismatch_once_closed(&p, &proxy, 2);
    assert!(
        proxy.metric("pgprism_compare_statements_total") >= 4,
        "{}",
        proxy.admin_get("/metrics").1
    );
}

#[test]
fn a_copy_that_fails_before_it_starts_keeps_the_pairing() {
    use std::io::Write;
    use support::raw::{message, read_until_ready};
    let p = pair("fc");
    let proxy = p.proxy(&["--fail-on-differences"]);
    let mut s = support::raw::connect_ready(proxy.listen);
    let tags = |answer: &[(u8, Vec<u8>)]| answer.iter().map(|m| m.0).collect::<Vec<u8>>();
    // Fails at Execute, before COPY mode starts: the servers answer its Sync...
    let mut batch = raw_extended("COPY no_such_table FROM STDIN");
    batch.extend(message(b'S', &[]));
    s.write_all(&batch).unwrap();
    assert_eq!(tags(&read_until_ready(&mut s)), b"12EZ".to_vec());
    // ...and the CopyFail and Sync a client sends after it (as the `postgres` crate does):
    // that Sync is answered too, and must not be taken for one a COPY swallowed.
    let mut fail = message(b'f', b"no copy\0");
    fail.extend(message(b'S', &[]));
    s.write_all(&fail).unwrap();
    assert_eq!(tags(&read_until_ready(&mut s)), b"Z".to_vec());
    // Each later statement is paired with its own answer.
    s.write_all(&message(b'Q', b"SELECT now(), clock_timestamp()\0"))
        .unwrap();
    assert_eq!(tags(&read_until_ready(&mut s)), b"TDCZ".to_vec());
    s.write_all(&message(b'Q', b"SELECT 7\0")).unwrap();
    let answer = read_until_ready(&mut s);
    assert_eq!(tags(&answer), b"TDCZ".to_vec());
    assert_eq!(&answer[1].1[6..], b"7");
    drop(s);
    assert_no_mismatch_once_closed(&p, &proxy, 1);
}

#[test]
fn ties_under_order_by_may_come_in_any_order_but_the_keys_may_not() {
    let p = pair("tie");
    p.primary
        .psql(
            "CREATE TABLE tie (k int, v text); INSERT INTO tie VALUES (1, 'a'), (1, 'b'), (2, 'c')",
        )
        .unwrap();
    p.shadow
        .psql(
            "CREATE TABLE tie (k int, v text); INSERT INTO tie VALUES (2, 'c'), (1, 'b'), (1, 'a')",
        )
        .unwrap();
    // The same words, sorted by two collations: the sort keys' order itself differs.
    p.primary
        .psql("CREATE TABLE coll (v text COLLATE \"C\"); INSERT INTO coll VALUES ('a'), ('B')")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE coll (v text COLLATE \"und-x-icu\"); INSERT INTO coll VALUES ('a'), ('B')")
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    for sql in [
        "SELECT k, v FROM tie ORDER BY k",
        "SELECT k, v FROM tie ORDER BY 1 DESC",
        "SELECT tie.k AS k, v FROM tie ORDER BY tie.k",
        "SELECT v FROM coll ORDER BY v",
    ] {
        c.simple_query(sql).unwrap();
        c.query(sql, &[]).unwrap();
    }
    drop(c);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    let reports = p.reports();
    let about = |sql: &str| {
        reports
            .iter()
            .filter(|r| r["statement"].as_str() == Some(sql))
            .collect::<Vec<_>>()
    };
    for sql in [
        "SELECT k, v FROM tie ORDER BY k",
        "SELECT k, v FROM tie ORDER BY 1 DESC",
        "SELECT tie.k AS k, v FROM tie ORDER BY tie.k",
    ] {
        assert!(about(sql).is_empty(), "{sql}: {:?}", about(sql));
    }
    let coll = about("SELECT v FROM coll ORDER BY v");
    assert_eq!(coll.len(), 2, "{reports:?}");
    assert!(coll.iter().all(|r| kinds(r) == ["order"]), "{coll:?}");
}

/// Under an ORDER BY whose keys are not output columns (an expression, a column not selected),
/// rows in another order are re-checked with the keys in the output: ties in another order
/// are no difference, keys in another order (another collation) are a mismatch, and what
/// cannot be re-checked is inconclusive, never a mismatch.
#[test]
fn order_by_keys_not_in_the_output_are_re_checked_with_the_keys() {
    let p = pair("rechk");
    // Equal keys in another physical order: small sorts keep it, so the sides differ.
    p.primary
        .psql("CREATE TABLE ex (id int, k text, v text); INSERT INTO ex VALUES (1, 'a', 'x'), (2, 'A', 'y'), (3, 'b', 'z')")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE ex (id int, k text, v text); INSERT INTO ex VALUES (2, 'A', 'y'), (1, 'a', 'x'), (3, 'b', 'z')")
        .unwrap();
    // The same words under two collations: the keys themselves sort apart.
    p.primary
        .psql("CREATE TABLE cl (id int, w text COLLATE \"C\"); INSERT INTO cl VALUES (1, 'a'), (2, 'B')")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE cl (id int, w text COLLATE \"und-x-icu\"); INSERT INTO cl VALUES (1, 'a'), (2, 'B')")
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    let ties = [
        "SELECT id FROM ex ORDER BY lower(k)",
        "SELECT id, v FROM ex ORDER BY lower(k) DESC NULLS LAST, id > 5",
    ];
    let orders = [
        "SELECT id FROM cl ORDER BY w",
        "SELECT id FROM cl ORDER BY w || ''",
    ];
    // One re-check at a time (`compare.order-rechecks-max` is 8): wait for each.
    let mut rechecks = 0;
    for sql in ties.iter().chain(&orders) {
        c.simple_query(sql).unwrap();
        c.query(*sql, &[]).unwrap();
        rechecks += 2;
        assert!(counter_reaches(
            &proxy,
            "pgprism_compare_order_rechecks_total",
            rechecks
        ));
    }
    // Not rewritable with certainty, or with parameters: inconclusive, whatever the cause.
    let with = "SELECT id FROM cl ORDER BY w USING <";
    c.simple_query(with).unwrap();
    // A WITH before the outer SELECT is re-checked like a plain one.
    let cte = "WITH x AS (SELECT * FROM cl) SELECT id FROM x ORDER BY w";
    c.simple_query(cte).unwrap();
    let param = "SELECT id FROM ex WHERE id > $1 ORDER BY lower(k)";
    c.query(param, &[&0i32]).unwrap();
    drop(c);
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_order_rechecks_total",
        9
    ));
    assert_eq!(proxy.metric("pgprism_compare_order_rechecks_total"), 9);
    assert_eq!(proxy.metric("pgprism_compare_order_recheck_ties_total"), 4);
    eventually(Duration::from_secs(10), || p.reports().len() >= 7);
    let reports = p.reports();
    let about = |sql: &str| {
        reports
            .iter()
            .filter(|r| r["statement"].as_str() == Some(sql))
            .collect::<Vec<_>>()
    };
    for sql in ties {
        assert!(about(sql).is_empty(), "{sql}: {:?}", about(sql));
    }
    for sql in orders.iter().chain(&[cte]) {
        let found = about(sql);
        assert_eq!(
            found.len(),
            1 + usize::from(*sql != cte),
            "{sql}: {reports:?}"
        );
        for r in found {
            assert_eq!(r["verdict"].as_str(), Some("mismatch"), "{r:?}");
            assert_eq!(kinds(r), ["order"], "{r:?}");
            assert!(
                description(r).contains("sort keys in a different order"),
                "{r:?}"
            );
        }
    }
    for sql in [with, param] {
        let found = about(sql);
        assert_eq!(found.len(), 1, "{sql}: {reports:?}");
        assert_eq!(
            found[0]["verdict"].as_str(),
            Some("inconclusive: nondeterministic"),
            "{:?}",
            found[0]
        );
        assert!(
            found[0]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("not re-checked"),
            "{:?}",
            found[0]
        );
    }
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_mismatches_total",
        5
    ));
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 5);
    // Every inconclusive (concurrent) verdict, re-checked or not, names a reason.
    assert_eq!(
        inconclusive_by_reason(&proxy),
        proxy.metric("pgprism_compare_inconclusive_concurrent_total")
    );
}

/// The reasons an inconclusive (concurrent) verdict names (`order.rs` `Unpinned`, and a
/// re-check that read other rows), summed over `pgprism_compare_inconclusive_<reason>_total`.
fn inconclusive_by_reason(proxy: &Proxy) -> u64 {
    [
        "overlapped",
        "in_flight",
        "wait_expired",
        "lock_break",
        "primary_only",
        "abandoned",
        "order_recheck",
    ]
    .iter()
    .map(|name| proxy.metric(&format!("pgprism_compare_inconclusive_{name}_total")))
    .sum()
}

/// An order re-check that reads other rows than the statement did (here the statement saw
/// its own transaction's insert, which the re-check, on connections of its own, cannot see)
/// settles nothing: inconclusive (concurrent) with the reason `order_recheck`, counted like
/// the ordering rules' reasons so that the reasons sum to the concurrent verdicts.
#[test]
fn an_order_re_check_that_reads_other_rows_is_inconclusive_with_its_reason() {
    let p = pair("rechkc");
    p.primary
        .psql(
            "CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (1, 'a'), (2, 'A'), (3, 'b')",
        )
        .unwrap();
    p.shadow
        .psql(
            "CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (2, 'A'), (1, 'a'), (3, 'b')",
        )
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    let sql = "SELECT id FROM ex ORDER BY lower(k)";
    c.simple_query("BEGIN").unwrap();
    c.simple_query("INSERT INTO ex VALUES (4, 'c')").unwrap();
    c.simple_query(sql).unwrap();
    c.simple_query("ROLLBACK").unwrap();
    drop(c);
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_order_rechecks_total",
        1
    ));
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_inconclusive_order_recheck_total",
        1
    ));
    let concurrent = proxy.metric("pgprism_compare_inconclusive_concurrent_total");
    assert_eq!(concurrent, 1);
    assert_eq!(inconclusive_by_reason(&proxy), concurrent);
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 0);
    assert!(eventually(Duration::from_secs(10), || p.reported(sql)));
    let reports = p.reports();
    let found: Vec<_> = reports
        .iter()
        .filter(|r| r["statement"].as_str() == Some(sql))
        .collect();
    assert_eq!(found.len(), 1, "{reports:?}");
    assert_eq!(
        found[0]["verdict"].as_str(),
        Some("inconclusive: concurrent"),
        "{:?}",
        found[0]
    );
    assert_eq!(
        found[0]["reason"].as_str(),
        Some("order_recheck"),
        "{:?}",
        found[0]
    );
}

/// The re-check reads a statement once more on both sides: text that hides a write behind a
/// comment PostgreSQL ends at `\r` must never run again there.
#[test]
fn an_order_re_check_never_writes() {
    let p = pair("rechkw");
    p.primary
        .psql("CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (1, 'a'), (2, 'A'), (3, 'b'); CREATE TABLE log (n int)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (2, 'A'), (1, 'a'), (3, 'b'); CREATE TABLE log (n int)")
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    // PostgreSQL ends the comment at `\r`: the client's own text runs the INSERT once per side.
    c.batch_execute("SELECT id FROM ex ORDER BY lower(k) --x\r; COMMIT; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; INSERT INTO log VALUES (1)")
        .unwrap();
    drop(c);
    // The SELECT alone is re-checked (its rows tie under lower(k)); nothing else is.
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_order_rechecks_total",
        1
    ));
    assert_eq!(proxy.metric("pgprism_compare_order_recheck_ties_total"), 1);
    for side in [&p.primary, &p.shadow] {
        assert_eq!(side.psql("SELECT count(*) FROM log").unwrap().trim(), "1");
    }
}

/// A statement that names only built-ins may still run the database's own functions without
/// naming them (here through a view, and through a function of the database's own named like
/// a built-in that wins overload resolution for its argument type; an operator, a cast or a
/// type's output would do the same): where the database has such functions a re-check never
/// runs, and the difference in order is inconclusive.
#[test]
fn an_order_re_check_never_runs_functions_of_the_database() {
    let cases = [
        (
            "rechkf",
            "CREATE FUNCTION twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';
             CREATE TABLE ex (id int, k text);
             CREATE VIEW vx AS SELECT id, k, twice(id) AS t FROM ex;",
            "SELECT id FROM vx ORDER BY lower(k)",
        ),
        (
            "rechko",
            "CREATE FUNCTION public.lower(varchar) RETURNS text LANGUAGE sql AS 'SELECT pg_catalog.lower($1::text)';
             CREATE TABLE ex (id int, k varchar);",
            "SELECT id FROM ex ORDER BY lower(k)",
        ),
    ];
    for (name, schema, sql) in cases {
        let p = pair(name);
        p.primary
            .psql(&format!(
                "{schema} INSERT INTO ex VALUES (1, 'a'), (2, 'A'), (3, 'b')"
            ))
            .unwrap();
        p.shadow
            .psql(&format!(
                "{schema} INSERT INTO ex VALUES (2, 'A'), (1, 'a'), (3, 'b')"
            ))
            .unwrap();
        let proxy = p.proxy(&[]);
        let mut c = proxy.client();
        c.simple_query(sql).unwrap();
        drop(c);
        assert!(counter_reaches(
            &proxy,
            "pgprism_compare_order_rechecks_total",
            1
        ));
        assert_eq!(
            proxy.metric("pgprism_compare_order_recheck_ties_total"),
            0,
            "{name}"
        );
        assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 0);
        eventually(Duration::from_secs(10), || p.reported(sql));
        let reports = p.reports();
        let found: Vec<_> = reports
            .iter()
            .filter(|r| r["statement"].as_str() == Some(sql))
            .collect();
        assert_eq!(found.len(), 1, "{name}: {reports:?}");
        assert_eq!(
            found[0]["verdict"].as_str(),
            Some("inconclusive: nondeterministic"),
            "{name}: {:?}",
            found[0]
        );
        assert!(
            found[0]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("functions of its own"),
            "{name}: {:?}",
            found[0]
        );
    }
}

/// Keys that tie by value but not by bytes (numeric 1.0 and 1.00): each server decides what
/// ties, so rows in another order among them are no difference.
#[test]
fn an_order_re_check_lets_each_server_decide_what_ties() {
    let p = pair("rechkt");
    p.primary
        .psql("CREATE TABLE nt (id int, n numeric); INSERT INTO nt VALUES (1, 1.0), (2, 1.00), (3, 2)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE nt (id int, n numeric); INSERT INTO nt VALUES (2, 1.00), (1, 1.0), (3, 2)")
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    let sql = "SELECT id FROM nt ORDER BY n + 0";
    c.simple_query(sql).unwrap();
    drop(c);
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_order_rechecks_total",
        1
    ));
    assert_eq!(proxy.metric("pgprism_compare_order_recheck_ties_total"), 1);
    assert!(!p.reported(sql), "{:?}", p.reports());
}

/// The process-wide bound on re-checks holds whatever each shard's allows.
#[test]
fn order_re_checks_are_bounded_in_the_whole_process() {
    let p = pair("rechkb");
    p.primary
        .psql("CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (1, 'a'), (2, 'A')")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (2, 'A'), (1, 'a')")
        .unwrap();
    let config = p.dir.join("rechecks.toml");
    std::fs::write(&config, "[compare]\norder-rechecks-total-max = 0\n").unwrap();
    let proxy = p.proxy(&["--config", config.to_str().unwrap()]);
    let mut c = proxy.client();
    let sql = "SELECT id FROM ex ORDER BY lower(k)";
    c.simple_query(sql).unwrap();
    let report = p.report_for(sql);
    assert_eq!(
        report["verdict"].as_str(),
        Some("inconclusive: nondeterministic"),
        "{report:?}"
    );
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or("")
            .contains("compare.order-rechecks-total-max"),
        "{report:?}"
    );
    assert_eq!(proxy.metric("pgprism_compare_order_rechecks_total"), 0);
}

/// A re-check runs the statement once more per side: not when it calls a function that may
/// do more than return a value.
#[test]
fn an_order_re_check_never_runs_user_functions_again() {
    let p = pair("rechkf");
    let f = "CREATE FUNCTION f(text) RETURNS text LANGUAGE sql AS 'SELECT lower($1)';";
    p.primary
        .psql(&format!("CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (1, 'a'), (2, 'A'), (3, 'b'); {f}"))
        .unwrap();
    p.shadow
        .psql(&format!("CREATE TABLE ex (id int, k text); INSERT INTO ex VALUES (2, 'A'), (1, 'a'), (3, 'b'); {f}"))
        .unwrap();
    let proxy = p.proxy(&[]);
    let mut c = proxy.client();
    let sql = "SELECT id FROM ex ORDER BY f(k)";
    c.simple_query(sql).unwrap();
    let report = p.report_for(sql);
    assert_eq!(
        report["verdict"].as_str(),
        Some("inconclusive: nondeterministic"),
        "{report:?}"
    );
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or("")
            .contains("side effects"),
        "{report:?}"
    );
    // The same order with a built-in is re-checked (and its rows tie).
    c.simple_query("SELECT id FROM ex ORDER BY lower(k)")
        .unwrap();
    drop(c);
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_order_rechecks_total",
        1
    ));
    assert_eq!(proxy.metric("pgprism_compare_order_recheck_ties_total"), 1);
    assert_eq!(proxy.metric("pgprism_compare_order_rechecks_total"), 1);
}

#[test]
fn a_client_that_stops_sending_still_gets_the_answers_held_for_the_shadow() {
    use std::io::Write;
    let p = pair("hc");
    // The same answer from both, but one side takes longer, so either the primary or the
    // shadow closes first once the client has sent all it will.
    let slow_on = |port: u16| {
        format!(
            "SELECT 42, pg_sleep(CASE WHEN current_setting('port')::int = {port} THEN 0.3 ELSE 0 END)\0"
        )
    };
    for source in ["primary", "shadow"] {
        let proxy = p.proxy(&["--fail-on-differences", "--source-of-truth", source]);
        for slow in [p.primary.port(), p.shadow.port()] {
            let query = slow_on(slow);
            let what = format!("source {source}, slow side on port {slow}");
            // Half-closed: the query, then end-of-stream (no Terminate); it still reads.
            let mut s = support::raw::connect_ready(proxy.listen);
            s.write_all(&support::raw::message(b'Q', query.as_bytes()))
                .unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut tags = Vec::new();
            while let Some((tag, _)) = support::raw::read_message(&mut s) {
                tags.push(tag);
            }
            assert_eq!(tags, b"TDCZ".to_vec(), "half-closed, {what}");
            // A malformed frame after a query: the query's answer, then the FATAL.
            let mut s = support::raw::connect_ready(proxy.listen);
            let mut bytes = support::raw::message(b'Q', query.as_bytes());
            bytes.extend_from_slice(&[b'Q', 0, 0, 0, 1]);
            s.write_all(&bytes).unwrap();
            let mut tags = Vec::new();
            let mut code = None;
            while let Some((tag, body)) = support::raw::read_message(&mut s) {
                if tag == b'E' {
                    code = support::raw::error_field(&body, b'C');
                }
                tags.push(tag);
            }
            assert_eq!(tags, b"TDCZE".to_vec(), "malformed frame, {what}");
            assert_eq!(code.as_deref(), Some("08P01"), "{what}");
        }
        assert_no_mismatch_once_closed(&p, &proxy, 4);
    }
}

/// A primary answer pgprism cannot read (a row beyond `--message-bytes-max`) ends the session
/// with pgprism's FATAL (08P01, counted), after every message ahead of it (the first answer
/// and the second's RowDescription): those held for the shadow's (fail-on-differences, the
/// shadow 2 s slower) are released unjudged first, as streamed ones (report mode) are,
/// whether or not they came in the bad answer's read; with the client side pooled too.
#[test]
fn answers_before_a_primary_answer_pgprism_cannot_read_reach_the_client_before_its_fatal() {
    use std::io::Write;
    let p = pair("badans");
    let query = format!(
        "SELECT 42, pg_sleep(CASE WHEN current_setting('port')::int = {} THEN 2 ELSE 0 END)\0",
        p.shadow.port()
    );
    let fail_pooled = [&["--fail-on-differences"], support::TRANSACTION_POOLING].concat();
    for mode in [&["--fail-on-differences"][..], &[][..], &fail_pooled[..]] {
        let mut args = vec!["--message-bytes-max", "4096"];
        args.extend_from_slice(mode);
        let proxy = p.proxy(&args);
        let mut s = support::raw::connect_ready(proxy.listen);
        let mut bytes = support::raw::message(b'Q', query.as_bytes());
        bytes.extend(support::raw::message(b'Q', b"SELECT repeat('x', 10000)\0"));
        s.write_all(&bytes).unwrap();
        let msgs = support::raw::read_to_end(&mut s);
        let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(tags, b"TDCZTE", "{mode:?}: {msgs:?}");
        let row = &msgs[1].1;
        assert!(row.windows(2).any(|w| w == b"42"), "{mode:?}: {msgs:?}");
        let field = |f| support::raw::error_field(&msgs[5].1, f);
        assert_eq!(field(b'C').as_deref(), Some("08P01"), "{mode:?}");
        assert_eq!(field(b'V').as_deref(), Some("FATAL"), "{mode:?}");
        assert!(
            field(b'M').is_some_and(|m| m.contains("invalid message from the primary")),
            "{mode:?}: {msgs:?}"
        );
        assert!(counter_reaches(&proxy, "pgprism_protocol_errors_total", 1));
    }
}

/// A shadow answer pgprism cannot read (a row beyond `--message-bytes-max` on the shadow
/// alone) costs only the comparing: the client gets the primary's answer and its session goes
/// on (report mode, fail-on-differences, the client side pooled too); the shadow's session is
/// dropped and counted (a protocol error, a lost shadow), also when the shadow is pooled. With
/// the shadow as the source of truth the client's answers are the shadow's: its session ends with pgprism's FATAL (08P01).
#[test]
fn a_shadow_answer_pgprism_cannot_read_ends_only_the_comparing() {
    use std::io::Write;
    let p = pair("badshd");
    let query = format!(
        "SELECT repeat('x', CASE WHEN current_setting('port')::int = {} THEN 10000 ELSE 10 END)",
        p.shadow.port()
    );
    let fail_pooled = [&["--fail-on-differences"], support::TRANSACTION_POOLING].concat();
    let shadow_pooled = ["--shadow-pool-size", "2"];
    let modes = [
        &[][..],
        &["--fail-on-differences"][..],
        &fail_pooled[..],
        &shadow_pooled[..],
    ];
    for mode in modes {
        let mut args = vec!["--message-bytes-max", "4096"];
        args.extend_from_slice(mode);
        let proxy = p.proxy(&args);
        let mut c = proxy.client();
        let rows = c.simple_query(&query).expect("the primary's answer");
        let value = rows.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(value.as_deref(), Some("xxxxxxxxxx"), "{mode:?}");
        let n: i32 = c
            .query_one("SELECT 7", &[])
            .expect("the session goes on")
            .get(0);
        assert_eq!(n, 7, "{mode:?}");
        assert!(
            counter_reaches(&proxy, "pgprism_protocol_errors_total", 1),
            "{mode:?}"
        );
        assert!(
            counter_reaches(&proxy, "pgprism_compare_shadow_lost_total", 1),
            "{mode:?}"
        );
    }
    let proxy = p.proxy(&["--message-bytes-max", "4096", "--source-of-truth", "shadow"]);
    // Read raw: the FATAL comes right before the close (the postgres crate may see the close
    // first).
    let mut s = support::raw::connect_ready(proxy.listen);
    let query = format!("{query}\0");
    s.write_all(&support::raw::message(b'Q', query.as_bytes()))
        .unwrap();
    let msgs = support::raw::read_to_end(&mut s);
    let fatal = msgs.last().filter(|m| m.0 == b'E').map(|m| &m.1[..]);
    let field = |f| fatal.and_then(|body| support::raw::error_field(body, f));
    assert_eq!(field(b'C').as_deref(), Some("08P01"), "{msgs:?}");
    assert_eq!(field(b'V').as_deref(), Some("FATAL"), "{msgs:?}");
    assert!(counter_reaches(&proxy, "pgprism_protocol_errors_total", 1));
}

#[test]
fn a_shadow_left_in_a_failed_transaction_is_rolled_back_before_the_next_statement() {
    let p = pair("rb");
    p.both("CREATE TABLE t (id int); CREATE TABLE u (id int PRIMARY KEY)");
    // Only the shadow has the row the transaction's last INSERT collides with.
    p.shadow.psql("INSERT INTO u VALUES (1)").unwrap();
    let shadow_port = p.shadow.port();
    for mode in [&[][..], &["--fail-on-differences"][..]] {
        p.both("TRUNCATE t");
        p.primary.psql("TRUNCATE u").unwrap();
        let proxy = p.proxy(mode);
        let mut c = proxy.client();
        c.batch_execute("BEGIN").unwrap();
        // The primary commits at once; the shadow, slower, fails the INSERT and stays in a
        // failed transaction block. Meanwhile the client (answered by the primary, in report
        // mode) already sends its next statements.
        let ending = format!(
            "SELECT pg_sleep(CASE WHEN current_setting('port')::int = {shadow_port} THEN 0.5 ELSE 0 END); \
             INSERT INTO u VALUES (1); COMMIT"
        );
        let result = c.batch_execute(&ending);
        assert_eq!(result.is_err(), !mode.is_empty(), "{result:?}");
        if mode.is_empty() {
            // Outside any transaction on the primary: each commits at once, on the shadow too.
            c.batch_execute("INSERT INTO t VALUES (2)").unwrap();
            c.batch_execute("INSERT INTO t VALUES (3)").unwrap();
            let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
            assert_eq!(n, 2);
        } else {
            // The client got the difference (XX000) and the primary's status, idle.
            c.batch_execute("INSERT INTO t VALUES (2)").unwrap();
            c.batch_execute("INSERT INTO t VALUES (3)").unwrap();
        }
        drop(c);
        assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
        assert_eq!(
            p.shadow
                .psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")
                .unwrap()
                .trim(),
            "2,3",
            "mode {mode:?}: the shadow ran the statements after the divergence outside it"
        );
        // Only the divergence itself differs: what follows is compared and agrees.
        assert_eq!(
            proxy.metric("pgprism_compare_mismatches_total"),
            1,
            "{:?}",
            p.reports()
        );
        assert_eq!(proxy.metric("pgprism_compare_rollbacks_total"), 1);

        // The other way round: the primary opens a transaction block, the shadow does not
        // (the statement before the BEGIN fails there). The shadow gets a BEGIN of its own,
        // so what the client then rolls back is rolled back there too.
        p.primary.psql("TRUNCATE u").unwrap();
        let mut c = proxy.client();
        let opening = format!(
            "SELECT pg_sleep(CASE WHEN current_setting('port')::int = {shadow_port} THEN 0.5 ELSE 0 END);              INSERT INTO u VALUES (1); BEGIN"
        );
        assert_eq!(c.batch_execute(&opening).is_err(), !mode.is_empty());
        c.batch_execute("INSERT INTO t VALUES (4)").unwrap();
        c.batch_execute("ROLLBACK").unwrap();
        c.batch_execute("INSERT INTO t VALUES (5)").unwrap();
        drop(c);
        assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 2));
        assert_eq!(
            p.shadow
                .psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")
                .unwrap()
                .trim(),
            "2,3,5",
            "mode {mode:?}: the shadow kept what the primary rolled back"
        );
        assert_eq!(proxy.metric("pgprism_compare_begins_total"), 1);
        assert_eq!(
            proxy.metric("pgprism_compare_mismatches_total"),
            2,
            "{:?}",
            p.reports()
        );
    }
}

/// The ROLLBACK that brings a diverged shadow back in step goes before what the client
/// pipelined behind the diverging statement, in the same write: those statements never run
/// in the shadow's stale (failed) transaction.
#[test]
fn statements_pipelined_behind_a_divergence_run_after_the_shadows_rollback() {
    use std::io::Write;
    use support::raw::{message, read_until_ready};
    let p = pair("rbp");
    p.both("CREATE TABLE t (id int); CREATE TABLE u (id int PRIMARY KEY)");
    // Only the shadow has the row the transaction's INSERT collides with.
    p.shadow.psql("INSERT INTO u VALUES (1), (2)").unwrap();
    let proxy = p.proxy(&[]);
    let mut s = support::raw::connect_ready(proxy.listen);
    let query = |sql: &str| message(b'Q', format!("{sql}\0").as_bytes());
    let sync = message(b'S', &[]);
    // Simple protocol: the diverging query and the next ones in one write.
    let mut write = query("BEGIN");
    write.extend(query("INSERT INTO u VALUES (1); COMMIT"));
    write.extend(query("INSERT INTO t VALUES (2)"));
    write.extend(raw_extended("INSERT INTO t VALUES (3)"));
    write.extend(&sync);
    // Extended protocol: a batch that diverges (the INSERT fails on the shadow, which then
    // skips the COMMIT to the Sync) and the next batch, in one write.
    write.extend(query("BEGIN"));
    write.extend(raw_extended("INSERT INTO u VALUES (2)"));
    write.extend(raw_extended("COMMIT"));
    write.extend(&sync);
    write.extend(raw_extended("INSERT INTO t VALUES (4)"));
    write.extend(&sync);
    s.write_all(&write).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let answer = read_until_ready(&mut s);
        assert_eq!(answer.last().map(|m| m.0), Some(b'Z'), "{answer:?}");
        statuses.push(answer.last().map_or(0, |m| m.1[0]));
    }
    // The primary: in the block, committed, autocommit, twice.
    assert_eq!(statuses, b"TIIITII");
    drop(s);
    assert!(counter_reaches(&proxy, "pgprism_sessions_closed_total", 1));
    assert_eq!(
        p.shadow
            .psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")
            .unwrap()
            .trim(),
        "2,3,4",
        "the statements behind the divergence ran outside the shadow's failed transaction"
    );
    assert_eq!(proxy.metric("pgprism_compare_rollbacks_total"), 2);
}

#[test]
fn a_copy_in_the_same_query_as_begin_is_not_held_back_from_the_shadow() {
    use std::io::Write;
    let p = pair("gc");
    p.both("CREATE TABLE cp (a int)");
    for source in ["primary", "shadow"] {
        let proxy = p.proxy(&["--fail-on-differences", "--source-of-truth", source]);
        let mut s = support::raw::connect_ready(proxy.listen);
        // A transaction statement with others in one query holds what follows off the
        // shadow until both answered it; the COPY's own data must not wait with it.
        s.write_all(&support::raw::message(b'Q', b"BEGIN; COPY cp FROM STDIN\0"))
            .unwrap();
        let mut tags = Vec::new();
        while let Some((tag, _)) = support::raw::read_message(&mut s) {
            tags.push(tag);
            if tag == b'G' {
                break;
            }
        }
        assert_eq!(tags, b"CG".to_vec(), "source {source}");
        let mut data = support::raw::message(b'd', b"1\n2\n");
        data.extend(support::raw::message(b'c', &[]));
        s.write_all(&data).unwrap();
        let answered = support::raw::read_until_ready(&mut s);
        let tags: Vec<u8> = answered.iter().map(|m| m.0).collect();
        assert_eq!(tags, b"CZ".to_vec(), "source {source}");
        s.write_all(&support::raw::message(b'Q', b"COMMIT\0"))
            .unwrap();
        let answered = support::raw::read_until_ready(&mut s);
        assert_eq!(answered.first().map(|m| m.0), Some(b'C'));
        drop(s);
        assert_no_mismatch_once_closed(&p, &proxy, 1);
    }
    assert_eq!(
        p.shadow.psql("SELECT count(*) FROM cp").unwrap().trim(),
        "4"
    );
}

#[test]
fn a_copy_started_before_any_sync_follows_its_own_batchs_routing() {
    use std::io::Write;
    use support::raw::message;
    let p = pair("cf");
    p.both("CREATE TABLE cp (a int)");
    let proxy = p.proxy(&[
        "--fail-on-differences",
        "--compare-primary-only",
        "pg_catalog",
    ]);
    let mut s = support::raw::connect_ready(proxy.listen);
    // The batch before is routed to the primary only.
    s.write_all(&message(
        b'Q',
        b"SELECT count(*) FROM pg_catalog.pg_class\0",
    ))
    .unwrap();
    support::raw::read_until_ready(&mut s);
    // COPY through Parse/Bind/Execute and a Flush: the client waits for CopyInResponse before
    // it sends the data and the Sync, so the batch's routing is decided at the Flush.
    let mut batch = raw_extended("COPY cp FROM STDIN");
    batch.extend(message(b'H', &[]));
    s.write_all(&batch).unwrap();
    let mut tags = Vec::new();
    while let Some((tag, _)) = support::raw::read_message(&mut s) {
        tags.push(tag);
        if tag == b'G' {
            break;
        }
    }
    assert_eq!(tags, b"12G".to_vec());
    let mut rest = message(b'd', b"1\n2\n3\n");
    rest.extend(message(b'c', &[]));
    rest.extend(message(b'S', &[]));
    s.write_all(&rest).unwrap();
    let answered = support::raw::read_until_ready(&mut s);
    let tags: Vec<u8> = answered.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"CZ".to_vec());
    drop(s);
    assert_no_mismatch_once_closed(&p, &proxy, 1);
    // The shadow ran the COPY with its data too.
    assert_eq!(
        p.shadow.psql("SELECT count(*) FROM cp").unwrap().trim(),
        "3"
    );
}

/// With the shadow as the source of truth, the client's answer is the shadow's: a drain that
/// comes after the primary answered but before the shadow did must wait for it, not close the
/// session as idle with 57P01 (the statement ran; its result must reach the client).
#[test]
fn a_drain_waits_for_the_answer_the_shadow_still_owes() {
    let p = pair("drainsot");
    let mut proxy = p.proxy(&["--source-of-truth", "shadow", "--drain-timeout-ms", "20000"]);
    let sql = format!(
        "SELECT pg_sleep(CASE WHEN current_setting('port') = '{}' THEN 3 ELSE 0 END), 'done'",
        p.shadow.port()
    );
    // psql, not the `postgres` crate: the 57P01 that follows the answer once the session is
    // idle may arrive in the same read, and that client then reports the connection's error
    // instead of the answer it already has; libpq returns the answer (and psql prints it)
    // before it looks at what follows.
    let port = proxy.port().to_string();
    let client = std::thread::spawn(move || {
        std::process::Command::new("psql")
            .args(["-X", "-w", "-At", "-h", "127.0.0.1", "-p", &port])
            .args(["-U", "postgres", "-d", "postgres", "-c", &sql])
            .output()
            .expect("run psql")
    });
    let running = |inst: &Instance| {
        inst.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(CASE%'",
        )
        .map(|n| n.trim() == "1")
        .unwrap_or(false)
    };
    // The primary has answered (its sleep is 0) while the shadow still sleeps.
    assert!(eventually(Duration::from_secs(10), || running(&p.shadow)
        && !running(&p.primary)));
    proxy.signal(libc::SIGTERM);
    let out = client.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some("|done"),
        "stderr: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        proxy.log()
    );
}

/// The client describes a statement in a batch routed to the primary only (the shadow never
/// gets that Describe), then executes it in a compared batch without one: the shadow is
/// described by pgprism alone, so both sides have the columns' types and a binary float
/// within `float-tolerance` is equal (without them the shadow's raw bytes would differ).
/// pgprism's Describe planned for the shadow in a batch that then names a statement routed
/// to the primary only goes nowhere and is not counted.
#[test]
fn a_describe_kept_off_the_shadow_still_gives_the_shadow_its_types() {
    use support::raw::message;
    let p = pair("undwh");
    p.primary
        .psql("CREATE TABLE fb (id int, x float8); INSERT INTO fb VALUES (1, 0.1), (2, 2.5)")
        .unwrap();
    p.shadow
        .psql("CREATE TABLE fb (id int, x float8); INSERT INTO fb VALUES (1, 0.1000001), (2, 2.5)")
        .unwrap();
    let float = "SELECT id, x FROM fb ORDER BY id";
    let parse = [
        message(b'P', &[&b"fl\0"[..], float.as_bytes(), &[0, 0, 0]].concat()),
        message(b'S', &[]),
    ]
    .concat();
    // Describe of "fl", then a statement routed to the primary only: the whole batch is.
    let mut withheld = message(b'D', b"Sfl\0");
    withheld.extend(undescribed("", Some("SELECT 1 /* primary */"), 0));
    // An Execute of "fl" (pgprism plans the shadow's Describe of it), then a statement routed
    // to the primary only, before the Sync: the whole batch, that Describe too, stays off it.
    let mut dropped = undescribed("fl", None, 1);
    dropped.truncate(dropped.len() - 5);
    dropped.extend(undescribed("", Some("SELECT 1 /* primary */"), 0));
    let batches = [parse, withheld, dropped, undescribed("fl", None, 1)];
    let modes: [(&str, &[&str]); 2] = [
        ("session", &[]),
        ("transaction pooling", support::TRANSACTION_POOLING),
    ];
    for (mode, extra) in modes {
        let _ = std::fs::remove_file(&p.report);
        let mut args = vec![
            "--float-tolerance",
            "0.001",
            "--compare-primary-only",
            "/\\* primary \\*/",
        ];
        args.extend_from_slice(extra);
        let proxy = p.proxy(&args);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port()));
        let got = run_undescribed(addr, &batches);
        let tags: Vec<Vec<u8>> = got
            .iter()
            .map(|a| a.iter().map(|m| m.0).collect())
            .collect();
        assert_eq!(
            tags,
            [
                b"1Z".to_vec(),
                b"tT12DCZ".to_vec(),
                b"2DDC12DCZ".to_vec(),
                b"2DDCZ".to_vec()
            ],
            "{mode}: the client gets only the answers it asked for"
        );
        assert!(
            counter_reaches(&proxy, "pgprism_compare_statements_total", 1),
            "{mode}"
        );
        assert!(
            counter_reaches(&proxy, "pgprism_sessions_closed_total", 1),
            "{mode}"
        );
        assert_eq!(
            proxy.metric("pgprism_compare_mismatches_total"),
            0,
            "{mode}: {:?}",
            p.reports()
        );
        assert!(p.reports().is_empty(), "{mode}: {:?}", p.reports());
        // The shadow alone was described, once (the Describe dropped with the primary-only
        // batch never went).
        assert_eq!(
            proxy.metric("pgprism_compare_own_describes_total"),
            1,
            "{mode}"
        );
    }
}

/// Frames of an extended-protocol statement that is never described: Parse `statement`
/// (when `sql` is given), Bind of the unnamed portal asking for `format` (0 text, 1 binary)
/// results, Execute, Sync.
fn undescribed(statement: &str, sql: Option<&str>, format: u8) -> Vec<u8> {
    use support::raw::message;
    let name = [statement.as_bytes(), &[0]].concat();
    let mut out = Vec::new();
    if let Some(sql) = sql {
        out.extend(message(
            b'P',
            &[&name[..], sql.as_bytes(), &[0], &[0, 0]].concat(),
        ));
    }
    // Bind: portal "", the statement, no parameter formats or values, one result format.
    out.extend(message(
        b'B',
        &[&[0u8][..], &name, &[0, 0, 0, 0, 0, 1, 0, format]].concat(),
    ));
    out.extend(message(b'E', &[0, 0, 0, 0, 0]));
    out.extend(message(b'S', &[]));
    out
}

/// What a client gets for [`undescribed`] batches, message by message.
fn run_undescribed(addr: std::net::SocketAddr, batches: &[Vec<u8>]) -> Vec<Vec<(u8, Vec<u8>)>> {
    use std::io::Write;
    let mut s = support::raw::connect_ready(addr);
    batches
        .iter()
        .map(|batch| {
            s.write_all(batch).unwrap();
            support::raw::read_until_ready(&mut s)
        })
        .collect()
}

/// A client that sends Parse/Bind/Execute/Sync and never a Describe still has its results
/// compared with their column types: pgprism describes the portal itself on both sides (once
/// per prepared statement) and keeps the answers from the client. So a binary float within
/// `float-tolerance` is equal, and a column of another type on the shadow is reported as
/// such, in session mode and with transaction pooling; the client's bytes are exactly what
/// the source of truth alone would have sent.
#[test]
fn statements_never_described_compare_with_their_types() {
    let p = pair("undesc");
    p.primary
        .psql(
            "CREATE TABLE fb (id int, x float8); INSERT INTO fb VALUES (1, 0.1), (2, 2.5);
             CREATE TABLE typ (id int, v int); INSERT INTO typ VALUES (1, 10)",
        )
        .unwrap();
    p.shadow
        .psql(
            "CREATE TABLE fb (id int, x float8); INSERT INTO fb VALUES (1, 0.1000001), (2, 2.5);
             CREATE TABLE typ (id int, v bigint); INSERT INTO typ VALUES (1, 10)",
        )
        .unwrap();
    let float = "SELECT id, x FROM fb ORDER BY id";
    let typed = "SELECT id, v FROM typ";
    let batches = [
        // A named statement, binary results; then executed again without its Parse.
        undescribed("fl", Some(float), 1),
        undescribed("fl", None, 1),
        // The unnamed statement, text results: the values agree, the types do not.
        undescribed("", Some(typed), 0),
        undescribed("", Some(typed), 0),
    ];
    let addr = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let direct = |inst: &Instance| run_undescribed(addr(inst.port()), &batches);
    let (from_primary, from_shadow) = (direct(&p.primary), direct(&p.shadow));
    for answers in [&from_primary, &from_shadow] {
        let tags: Vec<Vec<u8>> = answers
            .iter()
            .map(|a| a.iter().map(|m| m.0).collect())
            .collect();
        assert_eq!(
            tags,
            [
                b"12DDCZ".to_vec(),
                b"2DDCZ".to_vec(),
                b"12DCZ".to_vec(),
                b"12DCZ".to_vec()
            ],
            "no description reaches a client that asked for none"
        );
    }
    let modes: [(&str, &[&str]); 4] = [
        ("session", &[]),
        ("transaction pooling", support::TRANSACTION_POOLING),
        ("the shadow as source", &["--source-of-truth", "shadow"]),
        ("a pooled shadow", &["--shadow-pool-size", "2"]),
    ];
    for (mode, extra) in modes {
        let _ = std::fs::remove_file(&p.report);
        let mut args = vec!["--float-tolerance", "0.001"];
        args.extend_from_slice(extra);
        let proxy = p.proxy(&args);
        let got = run_undescribed(addr(proxy.port()), &batches);
        let expected = if mode == "the shadow as source" {
            &from_shadow
        } else {
            &from_primary
        };
        assert_eq!(&got, expected, "{mode}: the client's bytes are unchanged");
        assert!(
            counter_reaches(&proxy, "pgprism_compare_statements_total", 4),
            "{mode}: every statement compared"
        );
        let report = p.report_for(typed);
        assert_eq!(kinds(&report), ["column_types"], "{mode}: {report:?}");
        assert!(
            description(&report).contains("column `v` type differs: primary int4, shadow int8"),
            "{mode}: {report:?}"
        );
        eventually(Duration::from_secs(10), || p.reports().len() >= 2);
        let reports = p.reports();
        assert!(
            !p.reported(float),
            "{mode}: within the tolerance: {reports:?}"
        );
        assert_eq!(reports.len(), 2, "{mode}: {reports:?}");
        assert_eq!(
            proxy.metric("pgprism_compare_mismatches_total"),
            2,
            "{mode}"
        );
        // Once for the named statement, once per Parse of the unnamed one.
        assert_eq!(
            proxy.metric("pgprism_compare_own_describes_total"),
            3,
            "{mode}"
        );
    }
    // Held until both sides answered (fail-on-differences), the answers come whole and
    // without the description too (the float within the tolerance is no difference).
    let _ = std::fs::remove_file(&p.report);
    let proxy = p.proxy(&["--float-tolerance", "0.001", "--fail-on-differences"]);
    let got = run_undescribed(addr(proxy.port()), &batches[..2]);
    assert_eq!(got, from_primary[..2], "fail-on-differences");
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_statements_total",
        2
    ));
    assert_eq!(proxy.metric("pgprism_compare_own_describes_total"), 1);
    assert_eq!(proxy.metric("pgprism_compare_mismatches_total"), 0);
    // A client that describes (the postgres crate describes at prepare) gets none.
    let proxy = p.proxy(&["--float-tolerance", "0.001"]);
    let mut c = proxy.client();
    let statement = c.prepare(float).unwrap();
    for _ in 0..2 {
        assert_eq!(c.query(&statement, &[]).unwrap().len(), 2);
    }
    c.simple_query(typed).unwrap();
    assert!(counter_reaches(
        &proxy,
        "pgprism_compare_statements_total",
        3
    ));
    assert_eq!(proxy.metric("pgprism_compare_own_describes_total"), 0);
}
