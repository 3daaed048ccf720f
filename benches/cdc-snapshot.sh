#!/usr/bin/env bash
# The initial snapshot's rate against COPY: one table of ROWS rows (id int primary key, text,
# bigint), copied by `pgprism cdc` (2 snapshot workers, default chunk size) into the Stream
# Load emulator, and read by `psql -c "COPY t TO STDOUT" > /dev/null`, alternated three
# times in the same run; prints both medians and their ratio.
#
#   benches/cdc-snapshot.sh [ROWS]    (default 10000000)
#
# Runs the ignored `snapshot_against_copy` test of tests/cdc_bench.rs in release. Needs the
# PostgreSQL server binaries (`apt-get install postgresql`). The emulator runs in the test
# process and parses every JSON row, so on a small machine it competes with pgprism and
# PostgreSQL for the same cores (COPY's side has no such consumer). EMULATOR=sink runs it in
# its sink mode (loads checked and counted, rows not kept, CSV rows counted by their
# delimiters rather than split into fields; benchmarks only), which takes most of the
# emulator's work, done by a real StarRocks on machines of its own, out of the figure.
#
# An interleaved A/B in the same run: BIN_B=<another pgprism build> and/or ARGS_B="<cdc flags>"
# (ARGS="<cdc flags>" for this build); the two sides take turns going first.
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-10000000}"
PGPRISM_BENCH_EMULATOR="${EMULATOR:-store}" PGPRISM_BENCH_ROWS="$rows" \
    PGPRISM_BENCH_ARGS="${ARGS:-}" PGPRISM_BENCH_ARGS_B="${ARGS_B:-}" \
    PGPRISM_BENCH_BIN_B="${BIN_B:-}" \
    cargo test --release --quiet --test cdc_bench \
    snapshot_against_copy -- --exact --ignored --nocapture 2>&1 |
    grep -E '^(emulator|run [0-9]|COPY|two|pgprism|ratio|side)'
