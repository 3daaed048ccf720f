//! Digest throughput on DataRow bytes: how fast one core folds a result stream into the
//! ordered and order-insensitive digests compare mode keeps per statement.
//!
//!   cargo bench --bench compare-digest            # ~256 MiB per case
//!   cargo bench --bench compare-digest -- --quick # tiny input (also run by `cargo test`)
//!
//! Prints GB/s per case and a checksum of the digests so the work cannot be optimised away.

use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use pgprism::compare::digest::{Digester, hash64};
use pgprism::compare::rules::Rules;
use pgprism::config::CompareConfig;
use pgprism::wire::{FieldDescription, Format, encode};

/// A RowDescription and `rows` DataRows like a wide-ish OLTP table: int, text, float8,
/// numeric, timestamp in text format, about 100 bytes per row.
fn stream(rows: usize) -> (Vec<u8>, Vec<u8>) {
    let mut head = BytesMut::new();
    let col = |name: &'static str, type_oid: u32| FieldDescription {
        name,
        table_oid: 0,
        column_attr: 0,
        type_oid,
        type_size: -1,
        type_modifier: -1,
        format: Format::Text,
    };
    let fields = [
        col("id", 23),
        col("name", 25),
        col("score", 701),
        col("amount", 1700),
        col("at", 1114),
    ];
    let _ = encode::row_description(&mut head, &fields);
    let mut body = BytesMut::new();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..rows {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = i.to_string();
        let name = format!("customer-{:016x}-{}", x, x % 97);
        let score = format!("{}", (x % 100_000) as f64 / 7.0);
        let amount = format!("{}.{:02}", x % 1_000_000, x % 100);
        let at = "2026-11-22 06:32:02.123456";
        let values: [Option<&[u8]>; 5] = [
            Some(id.as_bytes()),
            Some(name.as_bytes()),
            Some(score.as_bytes()),
            Some(amount.as_bytes()),
            Some(at.as_bytes()),
        ];
        let _ = encode::data_row(&mut body, &values);
    }
    (head.to_vec(), body.to_vec())
}

fn run(label: &str, cfg: &CompareConfig, head: &[u8], body: &[u8], passes: usize) -> u64 {
    let mut rows_per_pass = 0u64;
    let rules = Rc::new(Rules::new(cfg).expect("rules"));
    let mut digester = Digester::new(rules);
    let mut checksum = 0u64;
    let start = Instant::now();
    for _ in 0..passes {
        digester.visit(head[0], &head[5..]);
        let mut at = 0;
        while at < body.len() {
            let len = u32::from_be_bytes([body[at + 1], body[at + 2], body[at + 3], body[at + 4]])
                as usize;
            digester.visit(body[at], &body[at + 5..at + 1 + len]);
            at += 1 + len;
        }
        digester.visit(b'C', b"SELECT 1\0");
        let sync = digester.finish_sync(b'I', Instant::now());
        let d = &sync.results[0];
        checksum ^= d.ordered ^ d.unordered.0 ^ d.unordered.1 ^ d.rows;
        rows_per_pass = d.rows;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = (body.len() * passes) as f64;
    println!(
        "{label:<44} {:>8.2} GB/s  ({} MB in {:.3} s, {:.1} ns/row)",
        bytes / secs / 1e9,
        (bytes / 1e6) as u64,
        secs,
        secs * 1e9 / (passes as f64 * rows_per_pass.max(1) as f64)
    );
    checksum
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick" || a == "--test");
    let (rows, passes) = if quick { (1000, 3) } else { (100_000, 25) };
    let (head, body) = stream(rows);
    println!(
        "rows {rows}, {} bytes of DataRows per pass ({:.0} bytes/row), {passes} passes",
        body.len(),
        body.len() as f64 / rows as f64
    );
    let mut checksum = 0u64;
    let start = Instant::now();
    let mut h = 0u64;
    for _ in 0..passes {
        h ^= hash64(&body, 7);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:<44} {:>8.2} GB/s",
        "hash64 over the whole buffer (upper bound)",
        (body.len() * passes) as f64 / secs / 1e9
    );
    checksum ^= h;
    let plain = CompareConfig::default();
    checksum ^= run(
        "ordered + order-insensitive, no rules",
        &plain,
        &head,
        &body,
        passes,
    );
    let tolerant = CompareConfig {
        float_tolerance: 0.001,
        ..CompareConfig::default()
    };
    checksum ^= run(
        "with float tolerance (2 of 5 columns parsed)",
        &tolerant,
        &head,
        &body,
        passes,
    );
    let ignoring = CompareConfig {
        ignore_columns: vec!["^at$".into()],
        ..CompareConfig::default()
    };
    checksum ^= run("with one ignored column", &ignoring, &head, &body, passes);
    println!("checksum {checksum:016x}");
}
