#!/usr/bin/env bash
# Median start-to-ready of an embedded PostgreSQL instance from a warm template: the path
# every `pgprism embed` start and crash restart of a memory instance takes (template copy to
# /dev/shm, settings, spawn, `ready` in postmaster.pid).
#
#   benches/embed-start.sh [STARTS]    (default 20)
#
# Runs the `bench_start_to_ready` test of tests/embed_supervise.rs in release and prints its
# summary line (median, p90, min, max). Needs the PostgreSQL server binaries
# (`apt-get install postgresql`).
set -euo pipefail
cd "$(dirname "$0")/.."
starts="${1:-20}"
PGPRISM_BENCH_STARTS="$starts" cargo test --release --quiet --test embed_supervise \
    bench_start_to_ready -- --exact --nocapture 2>&1 | grep 'embed start-to-ready'
