//! Slow-query analyzer: `EXPLAIN (ANALYZE, BUFFERS)` of a read-only statement on both sides,
//! each over a fresh connection of its own (never the client's sessions, never a write: the
//! caller only hands over statements classified as reads, without parameters). Runs as a
//! task on the shard; its report goes to the control thread like any other.

use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;

use super::{CompareTarget, Record, open_as};
use crate::exec::net::Stream;
use crate::exec::within;
use crate::wire::{self, tag};

/// Plan text kept per side.
const PLAN_BYTES_MAX: usize = 64 << 10;

pub(crate) async fn run(
    target: Rc<CompareTarget>,
    params: Rc<Vec<(String, String)>>,
    statement: String,
    mut record: Record,
) {
    // EXPLAIN ANALYZE runs the statement once more on each side: only what a re-check of
    // order may run again (built-ins without effects, in a read-only session, on a database
    // without functions of its own that reading may run unnamed).
    if !super::recheck::calls_only_safe_functions(&statement) {
        let not = "<not run: the statement calls a function that is not on the list of built-ins without side effects, and EXPLAIN ANALYZE would run it once more on each side>";
        record.primary.plan = Some(not.into());
        record.shadow.plan = Some(not.into());
        target.send(record);
        return;
    }
    let limit = Duration::from_millis(target.cfg.connect_timeout_ms);
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {statement}");
    let (primary, shadow) = futures_lite::future::zip(
        plan(
            &target,
            &target.primary_addr.get(),
            &target.primary_url,
            &target.primary_tls,
            &params,
            &sql,
            limit,
        ),
        plan(
            &target,
            &target.addr.get(),
            &target.url,
            &target.tls,
            &params,
            &sql,
            limit,
        ),
    )
    .await;
    record.primary.plan = Some(primary);
    record.shadow.plan = Some(shadow);
    target.send(record);
}

async fn plan(
    target: &CompareTarget,
    addr: &crate::config::Endpoint,
    url: &crate::config::PgUrl,
    tls: &crate::tls::Upstream,
    params: &[(String, String)],
    sql: &str,
    limit: Duration,
) -> String {
    let max = 1 << 20;
    // EXPLAIN ANALYZE runs the statement: bound it like the statement itself might be, by
    // the server as well (the session's statement_timeout).
    let budget = limit.max(Duration::from_secs(60));
    let budget_ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
    let params = super::recheck::guarded_params(params, budget_ms);
    let stream = match open_as(addr, url, tls, &params, limit, max).await {
        Ok(opened) => opened.stream,
        Err(err) => return format!("<cannot connect for EXPLAIN: {err}>"),
    };
    let text = within(budget, explain(&stream, sql, max, budget_ms))
        .await
        .unwrap_or_else(|| "<EXPLAIN timed out>".into());
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    stream.shutdown();
    let _ = target;
    text
}

/// The messages of one side's EXPLAIN: the re-check's preamble (a read-only transaction, its
/// statement timeout, the guard against functions of the database's own), then the EXPLAIN
/// alone through the extended protocol, where PostgreSQL refuses more than one command: text
/// the SQL reader misread can never smuggle a COMMIT and a write past the READ ONLY. The
/// transaction is never committed.
fn messages(sql: &str, timeout_ms: u64) -> Result<BytesMut, wire::WireError> {
    let mut out = BytesMut::new();
    wire::encode::query(&mut out, &super::recheck::preamble(timeout_ms))?;
    wire::encode::parse(&mut out, "", sql, &[])?;
    wire::encode::bind(&mut out, "", "", &[], &[], &[])?;
    wire::encode::execute(&mut out, "", 0)?;
    wire::encode::sync(&mut out);
    Ok(out)
}

async fn explain(stream: &Stream, sql: &str, max: usize, timeout_ms: u64) -> String {
    let Ok(out) = messages(sql, timeout_ms) else {
        return "<statement contains NUL>".into();
    };
    if stream.write_all(&out).await.is_err() {
        return "<connection lost>".into();
    }
    let mut buf = BytesMut::new();
    let mut plan = String::new();
    // The preamble's answer: `Some(clean)` once the guard's row came.
    let mut guard = None;
    let mut began = false;
    loop {
        match wire::split_message(&mut buf, max) {
            Ok(Some(frame)) if !began => match frame.tag() {
                tag::DATA_ROW => guard = super::recheck::guard_clean(frame.body()),
                tag::READY_FOR_QUERY => match (frame.body(), guard) {
                    ([b'T'], Some(true)) => began = true,
                    ([b'T'], Some(false)) => {
                        return "<not run: the database has functions of its own that reading may run without naming them (operators, casts, views, type input/output, domain checks or policies), and EXPLAIN ANALYZE would run them once more>".into();
                    }
                    _ => {
                        return "<EXPLAIN not run: its read-only transaction did not begin>".into();
                    }
                },
                tag::ERROR_RESPONSE => {
                    return "<EXPLAIN not run: its read-only transaction did not begin>".into();
                }
                _ => {}
            },
            Ok(Some(frame)) => match frame.tag() {
                tag::DATA_ROW => {
                    if let Ok(values) = wire::DataRow::new(frame.body()).columns()
                        && let Some(Some(line)) = values.iter().next()
                        && plan.len() < PLAN_BYTES_MAX
                    {
                        plan.push_str(&String::from_utf8_lossy(line));
                        plan.push('\n');
                    }
                }
                tag::ERROR_RESPONSE => {
                    let fields = wire::ErrorNotice::new(frame.body()).parse();
                    if let Ok(f) = fields {
                        plan.push_str(&format!(
                            "<EXPLAIN failed: {} {}>",
                            f.code.unwrap_or("?"),
                            f.message.unwrap_or("")
                        ));
                    }
                }
                tag::READY_FOR_QUERY => return plan,
                _ => {}
            },
            Ok(None) => match stream.read_buf(&mut buf, 16 << 10).await {
                Ok(0) | Err(_) => return plan,
                Ok(_) => {}
            },
            Err(_) => return plan,
        }
    }
}
