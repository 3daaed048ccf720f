#!/usr/bin/env bash
# One transaction of ROWS rows streamed through `pgprism cdc` (pgoutput streaming, default
# stream-buffer-bytes-max of 64 MiB, so it spills to files); prints the time until the Stream
# Load emulator holds every row and pgprism's peak resident memory (VmHWM), which must stay
# under 256 MiB.
#
#   benches/cdc-spill.sh [ROWS]    (default 5000000)
#
# Runs the ignored `large_transaction_in_bounded_memory` test of tests/cdc_bench.rs in release.
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-5000000}"
PGPRISM_BENCH_ROWS="$rows" cargo test --release --quiet --test cdc_bench \
    large_transaction_in_bounded_memory -- --exact --ignored --nocapture 2>&1 |
    grep -E '^(one |pgprism peak)'
