//! The CDC pipeline alone: pgoutput parsing, batching and JSON encoding, from pgoutput bytes
//! held in memory (no network, no PostgreSQL, no loader), on one core.
//!
//! `cargo bench --bench cdc_pipeline -- [rows] [fill]` (default 1,000,000; `fill`: keep the
//! flush cycle's values for partial changes, as without `REPLICA IDENTITY FULL`). The input is built with a
//! fixed seed in the shape PostgreSQL sends for `INSERT INTO t SELECT g, 'row ' || g, g`
//! (plus every tenth change an update with a full old row), in transactions of 1,000 rows.
//! It prints rows per second and a checksum of the JSON produced, so the work cannot be
//! optimised away. `tests/cdc_bench.rs` runs it on a tiny input as a test.

// `tests/cdc_bench.rs` includes this file as a private module: its `pub` items serve that test.
#![allow(unreachable_pub)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgprism::cdc::lsn::Lsn;
use pgprism::cdc::pgoutput::build;
use pgprism::cdc::pipeline::{Pipeline, PipelineConfig, Work};
use pgprism::config::{CdcDeleteMode, CdcSchemaChanges, CdcToastMode};

/// Captured-style input: one payload per XLogData message.
pub fn input(rows: usize, seed: u64) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(rows + rows / 500 + 2);
    let mut rel = Vec::new();
    build::relation(
        &mut rel,
        16384,
        "public",
        "t",
        &[(true, "id", 23), (false, "v", 25), (false, "n", 20)],
    );
    let mut state = seed;
    let mut next = || {
        // xorshift: deterministic, cheap.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut lsn = 0x1_0000_0000u64;
    let per_txn = 1000;
    let mut i = 0;
    while i < rows {
        let mut m = Vec::new();
        build::begin(&mut m, Lsn(lsn + 100_000), (i / per_txn) as u32);
        out.push(Bytes::from(m));
        if i == 0 {
            out.push(Bytes::from(rel.clone()));
        }
        for _ in 0..per_txn.min(rows - i) {
            let id = (i + 1).to_string();
            let v = format!("row {} {:x}", i + 1, next() % 1_000_000);
            let n = (next() % 1_000_000_000).to_string();
            let mut m = Vec::with_capacity(64);
            if i % 10 == 9 {
                m.push(b'U');
                m.extend_from_slice(&16384u32.to_be_bytes());
                m.push(b'O');
                build::tuple(
                    &mut m,
                    &[Some(Some(&id)), Some(Some("old")), Some(Some("1"))],
                );
                m.push(b'N');
                build::tuple(&mut m, &[Some(Some(&id)), Some(Some(&v)), Some(Some(&n))]);
            } else {
                build::insert(
                    &mut m,
                    16384,
                    &[Some(Some(&id)), Some(Some(&v)), Some(Some(&n))],
                );
            }
            out.push(Bytes::from(m));
            i += 1;
        }
        let mut m = Vec::new();
        build::commit(&mut m, Lsn(lsn + 100_000), Lsn(lsn + 100_100));
        out.push(Bytes::from(m));
        lsn += 200_000;
    }
    out
}

pub struct Report {
    pub rows: u64,
    pub elapsed: Duration,
    pub json_bytes: u64,
    pub checksum: u64,
}

pub fn run(rows: usize) -> Report {
    run_with(rows, false)
}

/// `fill`: as without `REPLICA IDENTITY FULL` (`toast-mode = "partial"`, `fill-rows`): the
/// pipeline keeps the flush cycle's values of `v` for partial changes (see `cdc::fill`).
pub fn run_with(rows: usize, fill: bool) -> Report {
    let payloads = input(rows, 0x5eed);
    let cfg = PipelineConfig {
        label_prefix: "bench".into(),
        flush_rows: 50_000,
        flush_bytes: 32 << 20,
        flush_interval: Duration::from_secs(1),
        delete_mode: CdcDeleteMode::Hard,
        toast_mode: if fill {
            CdcToastMode::Partial
        } else {
            CdcToastMode::FullRow
        },
        audit_prefix: None,
        stream_buffer_bytes_max: 1 << 30,
        schema_changes: CdcSchemaChanges::Ignore,
        fill_rows: fill,
        fill_bytes_max: 64 << 20,
        non_utf8_replace: false,
    };
    let keys = [("public.t".to_string(), vec!["id".to_string()])].into();
    let mut pipeline = Pipeline::new(cfg, keys);
    let mut out = Vec::new();
    let (mut json_bytes, mut checksum, mut loaded) = (0u64, 0xcbf2_9ce4_8422_2325u64, 0u64);
    let mut consume = |out: &mut Vec<Work>| {
        for w in out.drain(..) {
            if let Work::Load(b) = w {
                json_bytes += b.body.len() as u64;
                loaded += b.rows;
                // Sample the body so the checksum covers the encoder's output cheaply.
                for chunk in b.body.chunks(4096) {
                    checksum = (checksum ^ u64::from(chunk[0])).wrapping_mul(0x0100_0000_01b3);
                }
                checksum ^= b.body.len() as u64;
            }
        }
    };
    let start = Instant::now();
    for p in &payloads {
        if let Err(e) = pipeline.handle(p, &mut out) {
            panic!("pipeline rejected bench input: {e}");
        }
        if !out.is_empty() {
            consume(&mut out);
        }
    }
    pipeline.flush_all(&mut out);
    consume(&mut out);
    let elapsed = start.elapsed();
    assert_eq!(loaded, rows as u64, "every row encoded once");
    Report {
        rows: loaded,
        elapsed,
        json_bytes,
        checksum,
    }
}

#[allow(dead_code)]
fn main() {
    let rows = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // `fill`: keep the cycle's rows as without REPLICA IDENTITY FULL.
    let fill = std::env::args().any(|a| a == "fill");
    // Warm-up, then the best of three (the machine is shared).
    let _ = run_with(rows.min(100_000), fill);
    let best = (0..3)
        .map(|_| run_with(rows, fill))
        .min_by_key(|r| r.elapsed)
        .unwrap();
    let secs = best.elapsed.as_secs_f64();
    println!(
        "cdc pipeline: {} rows in {:.3} s = {:.0} rows/s on one core, {:.1} MB JSON ({:.0} MB/s), checksum {:016x}",
        best.rows,
        secs,
        best.rows as f64 / secs,
        best.json_bytes as f64 / 1e6,
        best.json_bytes as f64 / 1e6 / secs,
        best.checksum
    );
}
