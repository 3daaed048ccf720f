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
    let stream = match open_as(addr, url, tls, params, limit, max).await {
        Ok(opened) => opened.stream,
        Err(err) => return format!("<cannot connect for EXPLAIN: {err}>"),
    };
    // EXPLAIN ANALYZE runs the statement: bound it like the statement itself might be.
    let budget = limit.max(Duration::from_secs(60));
    let text = within(budget, explain(&stream, sql, max))
        .await
        .unwrap_or_else(|| "<EXPLAIN timed out>".into());
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    stream.shutdown();
    let _ = target;
    text
}

async fn explain(stream: &Stream, sql: &str, max: usize) -> String {
    let mut out = BytesMut::new();
    // A read-only transaction: even a misclassified statement cannot write.
    if wire::encode::query(&mut out, &format!("BEGIN READ ONLY; {sql}; ROLLBACK")).is_err() {
        return "<statement contains NUL>".into();
    }
    if stream.write_all(&out).await.is_err() {
        return "<connection lost>".into();
    }
    let mut buf = BytesMut::new();
    let mut plan = String::new();
    loop {
        match wire::split_message(&mut buf, max) {
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
