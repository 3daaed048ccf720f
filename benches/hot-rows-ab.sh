#!/usr/bin/env bash
# Interleaved A/B of compare's inconclusive rate on the hot-row workload (issue 15): the
# release build of tests/compare_concurrent.rs's `hot_rows_at_64` tests (session mode and
# transaction pooling), once per arm per round, each arm's proxy flags given through
# PGPRISM_HOT_ARGS. The machine's speed drifts between runs more than most changes move the
# rate, so arms alternate within each round. Prints the load average before each run and the
# test's summary lines (inconclusive, placed reads, re-reads).
#
#   benches/hot-rows-ab.sh                                    # placement off / on
#   ROUNDS=6 ARMS='--compare-order-read-lead-us 0|' benches/hot-rows-ab.sh
#   FILTER='test(hot_rows_at_8)' benches/hot-rows-ab.sh
#
# ARMS: flag sets separated by `|` (an empty one: the defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
ARMS=${ARMS:-"--compare-place-reads-max 0|"}
FILTER=${FILTER:-'test(hot_rows_at_64)'}
IFS='|' read -r -a arms <<< "$ARMS"
[[ "$ARMS" == *"|" ]] && arms+=("")
nice -n 19 cargo nextest run --release -j1 --test compare_concurrent --no-run >/dev/null 2>&1
for round in $(seq 1 "$ROUNDS"); do
  for arm in "${arms[@]}"; do
    echo "=== round $round arm [$arm] load $(cut -d' ' -f1-3 /proc/loadavg)"
    PGPRISM_HOT_ARGS="$arm" nice -n 19 cargo nextest run --release -j1 --test compare_concurrent \
      -E "$FILTER" --no-capture 2>&1 | grep -E "^hot rows|unpinned /|FAIL|panicked" || true
  done
done
